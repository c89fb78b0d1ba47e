"""Model-facing evaluation steps: tokenize as lm-eval does, score continuations sparse, decode greedily.

Every number comes from the model as sparse decoding runs it: the prompt (a task's context, a
document's first part) is prefilled densely, the core set is chosen from it, and the continuation
goes through the compacted FFN, with the kernels decoding runs (quantized weights: one decode step a
position, scoring.stepped). `teacher_forced` is `coreinfer.eval.scoring.continuation_logprobs` plus
the greedy token at each position, which top-1 agreement and lm-eval's `is_greedy` need; a test
holds the two to exact equality.

Rows are scored in batches sorted by their token content, so a set of requests is always batched
the same way whoever asks (our evaluator or the lm-eval adapter) and gives bit-identical numbers.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..engine.generate import GenerationConfig
from ..engine.policy import CoreConfig
from ..engine.session import Session, make_policy
from .data import Document, GenItem, MCItem
from ..engine.gemv import MAX_M
from .scoring import score_session, stepwise

Encode = Callable[[str], list[int]]


@dataclass(frozen=True)
class Scored:
    """One continuation under teacher forcing: log p(cont[j] | ...) and the argmax token, each [L]."""

    logprobs: torch.Tensor
    greedy: torch.Tensor

    @property
    def loglikelihood(self) -> float:
        return float(self.logprobs.double().sum())

    def is_greedy(self, continuation: Sequence[int]) -> bool:
        return self.greedy.tolist() == list(continuation)


def encode_pair(encode: Encode, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair`: trailing spaces move to the continuation, whose tokens are the tail
    of encode(context + continuation) after len(encode(context)) tokens."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    context_ids = encode(context)
    return context_ids, encode(context + continuation)[len(context_ids):]


def teacher_forced(model, prompts: list[list[int]], continuations: list[list[int]], core: CoreConfig | None,
                   pad_id: int = 0) -> list[Scored]:
    """continuation_logprobs, step for step, also keeping each position's argmax token; through the
    kernels decoding runs (scoring.score_session)."""
    if len(prompts) != len(continuations) or any(len(c) == 0 for c in continuations):
        raise ValueError("give one non-empty continuation per prompt")
    session = Session(model, prompts, max(len(c) for c in continuations), pad_id, make_policy(core, model))
    return [Scored(logprobs, greedy) for logprobs, greedy in score_session(session, continuations)]


def rows_per_batch(model, batch_size: int) -> int:
    """Stepped scoring keeps a batch decode-sized, so that each step takes decoding's kernels."""
    return min(batch_size, MAX_M) if stepwise(model) else batch_size


def score_rows(model, rows: list[tuple[list[int], list[int]]], core: CoreConfig | None, pad_id: int,
               batch_size: int, desc: str | None = None) -> list[Scored]:
    """Teacher-force every (prompt ids, continuation ids) row, in batches sorted by token content."""
    order = sorted(range(len(rows)), key=lambda i: (len(rows[i][0]), len(rows[i][1]), rows[i]))
    out: list[Scored | None] = [None] * len(rows)
    batch_size = rows_per_batch(model, batch_size)
    with tqdm(total=len(rows), desc=desc, unit="row", leave=False, disable=desc is None) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            scored = teacher_forced(model, [rows[i][0] for i in chunk], [rows[i][1] for i in chunk], core, pad_id)
            for i, s in zip(chunk, scored):
                out[i] = s
            bar.update(len(chunk))
    return out


def mc_rows(encode: Encode, items: list[MCItem]) -> list[tuple[list[int], list[int]]]:
    """One row per choice of every item; the choices of an item share (a copy of) its context."""
    return [encode_pair(encode, ctx, cont) for item in items for ctx, cont in item.requests()]


def score_shared(model, rows: list[tuple[list[int], list[int]]], core: CoreConfig | None, pad_id: int,
                 batch_size: int, desc: str | None = None) -> list[Scored]:
    """score_rows for rows that share prompts (the choices of a multiple-choice item): each distinct
    prompt is prefilled once and its session forked for its continuations, so a 4-choice item costs
    one prefill instead of four. The numbers are those of score_rows (tested): a fork copies the
    prompt's cache and core set, which is all a separate prefill would recompute.

    A batch takes distinct prompts, sorted by token content, until it holds `batch_size` rows. It is
    forked once per choice slot (each prompt's j-th continuation together), not once for all rows:
    every forked row holds its own copy of its prompt's compacted FFNs (~0.2 GB a row on the embedded
    model in fp32 at keep 0.85), so forking all of a batch's rows at once held choices x prompts copies
    (4.5 GB at 8 rows of 4-choice items); one slot at a time holds at most one copy per prompt."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (prompt, _) in enumerate(rows):
        groups.setdefault(tuple(prompt), []).append(i)
    prompts = sorted(groups, key=lambda p: (len(p), p))
    policy = make_policy(core, model)
    out: list[Scored | None] = [None] * len(rows)
    batch_size = rows_per_batch(model, batch_size)
    with tqdm(total=len(rows), desc=desc, unit="row", leave=False, disable=desc is None) as bar:
        start = 0
        while start < len(prompts):
            end, n = start + 1, len(groups[prompts[start]])
            while end < len(prompts) and n + len(groups[prompts[end]]) <= batch_size:
                n += len(groups[prompts[end]])
                end += 1
            chunk = prompts[start:end]
            longest = max(len(rows[i][1]) for p in chunk for i in groups[p])
            session = Session(model, [list(p) for p in chunk], longest, pad_id, policy)
            session.prefill()
            for slot in range(max(len(groups[p]) for p in chunk)):
                which = [j for j, p in enumerate(chunk) if slot < len(groups[p])]  # prompts with a slot-th row
                members = [groups[chunk[j]][slot] for j in which]
                conts = [rows[i][1] for i in members]
                forked = session.fork(which)
                for i, (logprobs, greedy) in zip(members, score_session(forked, conts)):
                    out[i] = Scored(logprobs, greedy)
                del forked  # its compacted FFNs go before the next slot's are gathered
                bar.update(len(members))
            start = end
    return out


def mc_loglikelihoods(llm, items: list[MCItem], core: CoreConfig | None, batch_size: int,
                      desc: str | None = None) -> list[list[float]]:
    """Per item, the summed log-likelihood of each choice (lm-eval's `loglikelihood`); each item's
    shared context is prefilled once (`score_shared`)."""
    scored = score_shared(llm.model, mc_rows(llm.tokenizer.encode, items), core, llm.tokenizer.pad_id,
                          batch_size, desc)
    lls, at = [], 0
    for item in items:
        lls.append([s.loglikelihood for s in scored[at:at + len(item.choices)]])
        at += len(item.choices)
    return lls


def greedy_matches(llm, items: list[GenItem], core: CoreConfig | None, batch_size: int,
                   desc: str | None = None) -> list[float]:
    """1.0 where greedy decoding yields the first answer's tokens exactly (LAMBADA's last-word accuracy,
    lm-eval's `is_greedy`). Teacher forcing decides it in one pass: the compacted-FFN scorer equals
    step-by-step sparse decoding, so the argmax at each position is the token decoding would pick."""
    rows = [encode_pair(llm.tokenizer.encode, item.prompt, item.answers[0]) for item in items]
    scored = score_rows(llm.model, rows, core, llm.tokenizer.pad_id, batch_size, desc)
    return [float(s.is_greedy(cont)) for s, (_, cont) in zip(scored, rows)]


def generate_texts(llm, prompts: list[str], stops: list[tuple[str, ...]], core: CoreConfig | None,
                   batch_size: int, max_new_tokens: int, desc: str | None = None) -> list[str]:
    """Sparse greedy completions, each cut at its stop strings. Batches are left-padded prompts that
    share their stop strings, sorted by prompt tokens so the batching never depends on the caller."""
    ids = [llm.tokenizer.encode(p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (stops[i], len(ids[i]), ids[i]))
    out: list[str | None] = [None] * len(prompts)
    with tqdm(total=len(prompts), desc=desc, unit="item", leave=False, disable=desc is None) as bar:
        start = 0
        while start < len(order):
            stop = stops[order[start]]
            chunk = [i for i in order[start:start + batch_size] if stops[i] == stop]  # a prefix: sorted by stop
            gen = GenerationConfig(max_new_tokens=max_new_tokens, stop=stop)
            for i, done in zip(chunk, llm.generate([prompts[i] for i in chunk], gen, core)):
                out[i] = done.text
            start += len(chunk)
            bar.update(len(chunk))
    return out


def generate_answers(llm, items: list[GenItem], core: CoreConfig | None, batch_size: int, max_new_tokens: int,
                     desc: str | None = None) -> list[str]:
    """Each item's sparse greedy answer, cut at its stop strings."""
    return generate_texts(llm, [i.prompt for i in items], [i.stop for i in items], core, batch_size,
                          max_new_tokens, desc)


def split_document(ids: list[int], prompt: float | int) -> tuple[list[int], list[int]] | None:
    """(prompt ids, continuation ids): a float in (0, 1) is the prompt's share of the tokens, an int
    its token count. None when the document is too short to leave a token on each side."""
    n = int(prompt * len(ids)) if isinstance(prompt, float) else prompt
    if n < 1 or n >= len(ids):
        return None
    return ids[:n], ids[n:]


def document_rows(encode: Encode, docs: list[Document], prompt: float | int,
                  max_tokens: int) -> list[tuple[list[int], list[int]]]:
    """The documents' (prompt, continuation) rows, each cut to its first max_tokens tokens; documents
    too short to split are left out."""
    rows = (split_document(encode(doc.text)[:max_tokens], prompt) for doc in docs)
    return [row for row in rows if row is not None]


def read_shares(model, core: CoreConfig | None) -> tuple[float, float]:
    """(all weights, FFN weights) one decode step of one sequence reads under `core`, as shares of
    dense: the compacted sizes do not depend on the prompt, so a one-token prompt measures them."""
    if core is None:
        return 1.0, 1.0
    session = Session(model, [[0]], 1, 0, make_policy(core, model))
    session.prefill()
    ffn_total = sum(f.neuron_bytes() for f in model.ffns())
    saved = session.stats.bytes_dense - session.stats.bytes_core
    return session.stats.share, (ffn_total - saved) / ffn_total
