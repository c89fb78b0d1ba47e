"""A checked request (app.py's Common) as a server Job, and a finished Job's extras for the response.

Everything here is pure translation of request fields: OpenAI's names and ranges onto the engine's
GenerationConfig and CoreConfig, each failure a RequestError blaming the request's field.
"""

import asyncio
from dataclasses import replace

from ..engine.generate import GenerationConfig
from ..engine.policy import CoreConfig
from .server import CORE_FIELDS, GEN_FIELDS, Job, RequestError, Settings


def value_error(e: ValueError, fields: tuple, rename: dict) -> RequestError:
    """The engine's config checks mostly say 'FIELD must ...': blame that field of the request."""
    first = str(e).split(" ", 1)[0]
    return RequestError(400, str(e), param=rename.get(first, first if first in fields else None))


def core_for(default: CoreConfig | None, req, num_layers: int) -> CoreConfig | None:
    """The server's core settings with the request's options laid over them; None decodes dense."""
    given = {k: getattr(req, k) for k in CORE_FIELDS if getattr(req, k) is not None}
    # naming any core option asks for core neurons even when the server decodes dense by default
    dense = req.dense if req.dense is not None else default is None and not given
    if dense:
        if given:
            raise RequestError(400, f"{', '.join(given)} cannot be used with dense decoding", param=next(iter(given)))
        return None
    try:
        # keeps the server's cluster set, if any; a request's own options replace a profile's budgets
        base = default if default is not None and not (given and default.profile) else CoreConfig()
        core = replace(base, **given)
        core.keep(num_layers)  # checks the layer spec and the number of betas now, not mid-generation
    except ValueError as e:
        raise value_error(e, CORE_FIELDS, {"similarity": "mode", "bad": "layers"}) from None
    return core


def make_job(llm, settings: Settings, req, prompt, chat: bool, default_max: int) -> Job:
    """A checked request (app.py's Common) as a Job; raises RequestError on values out of range."""
    if req.n != 1:
        raise RequestError(400, "only n=1 is supported", param="n")
    if req.best_of not in (None, 1):
        raise RequestError(400, "only best_of=1 is supported", param="best_of")
    asked = getattr(req, "max_completion_tokens", None) or req.max_tokens
    if asked is not None and asked > llm.model.max_context:
        raise RequestError(400, f"max_tokens must be <= the context of {llm.model.max_context} tokens, got {asked}",
                           param="max_tokens")
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    try:
        gen = GenerationConfig(max_new_tokens=asked or default_max, temperature=req.temperature, top_k=req.top_k,
                               top_p=req.top_p, repetition_penalty=req.repetition_penalty,
                               presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                               logit_bias=logit_bias(req.logit_bias, llm.model.embed_tokens.weight.shape[0]),
                               logprobs=logprobs_asked(req, chat), seed=req.seed, stop=stop, ignore_eos=req.ignore_eos)
    except ValueError as e:
        raise value_error(e, GEN_FIELDS, {"max_new_tokens": "max_tokens"}) from None
    core = core_for(settings.core, req, len(llm.model.layers))
    return Job(prompt, chat, gen, core, asyncio.get_running_loop(), prompt_param="messages" if chat else "prompt",
               fit_max_tokens=asked is None, grammar=grammar_for(req.response_format))


def logit_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float]:
    """OpenAI's logit_bias {"token id": bias in [-100, 100]} as {id: bias}."""
    out = {}
    for key, value in (bias or {}).items():
        if not (key.isdigit() and int(key) < vocab_size):
            raise RequestError(400, f"logit_bias: {key!r} is not a token id of this model (0..{vocab_size - 1})",
                               param="logit_bias")
        if not -100 <= value <= 100:
            raise RequestError(400, f"logit_bias: the bias of token {key} must be in [-100, 100], got {value}",
                               param="logit_bias")
        out[int(key)] = value
    return out


def logprobs_asked(req, chat: bool) -> int | None:
    """How many alternatives per token the request wants with its logprobs; None: no logprobs."""
    if not chat:
        return req.logprobs
    if req.top_logprobs is not None and not req.logprobs:
        raise RequestError(400, "top_logprobs requires logprobs: true", param="top_logprobs")
    return (req.top_logprobs or 0) if req.logprobs else None


def grammar_for(response_format) -> str | None:
    """The request's response_format (app.py's ResponseFormat) as a grammar; None for free text."""
    if response_format is None or response_format.type == "text":
        return None
    schema = (response_format.json_schema or {}).get("schema")
    if response_format.type == "json_schema" and not isinstance(schema, dict):
        raise RequestError(400, "response_format.json_schema.schema must be a JSON schema object",
                           param="response_format")
    from ..engine.structured import json_grammar  # llguidance loads only once a request needs it

    try:
        return json_grammar({"type": response_format.type, "json_schema": {"schema": schema}})
    except ValueError as e:
        raise RequestError(400, f"response_format: {e}", param="response_format") from None


def core_info(job: Job, completion) -> dict:
    """What the request ran with and how it went: echoed as the response's `coreinfer` object."""
    info = {"dense": job.core is None}
    if job.core is not None:
        info.update({k: getattr(job.core, k) for k in CORE_FIELDS})
    stats = completion.stats
    if stats is not None:
        info.update(core_sizes={str(k): v for k, v in stats.core_sizes.items()}, ffn_width=stats.ffn_width,
                    weight_bytes_fraction=round(stats.share, 4),
                    select_ms=round(stats.select_ms, 2), compact_ms=round(stats.compact_ms, 2))
        if stats.cluster is not None:  # similarity mode
            info.update(cluster=stats.cluster[0], cluster_score=round(stats.cluster_score[0], 4))
    info.update(job.batching or {})
    info.update(queue_s=round(job.queue_s, 4), prefill_s=round(completion.prefill_s, 4),
                decode_s=round(completion.decode_s, 4), prefill_tok_s=round(completion.prefill_tok_s, 1),
                decode_tok_s=round(completion.decode_tok_s, 1), compile_s=round(completion.compile_s, 2))
    return info


def usage(c) -> dict:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}
