"""Teacher-forced sparse scoring: the log-probabilities sparse decoding would assign to a given text.

The prompt is prefilled densely and the core set chosen from it, exactly as in generation; the whole
continuation then runs through the compacted FFN in one forward, instead of token by token. Every
quality number coreinfer reports comes through here, so accuracy is measured on the sparse model.
"""

import torch

from .core import CoreConfig, select_and_compact
from .generate import Batch, prefill


@torch.inference_mode()
def continuation_logits(model, prompts: list[list[int]], continuations: list[list[int]],
                        core: CoreConfig | None, pad_id: int = 0) -> torch.Tensor:
    """Logits [B, L, V] predicting each continuation token (L = longest continuation), under dense
    or core decoding. Row j predicts cont[j]: row 0 from the dense prefill, the rest in one forward.

    Prompts are left-padded as in generation; continuations are right-padded, which is harmless
    because the padding comes after every scored token.
    """
    if len(prompts) != len(continuations) or any(len(c) == 0 for c in continuations):
        raise ValueError("give one non-empty continuation per prompt")
    L = max(len(c) for c in continuations)
    batch = Batch(prompts, L, pad_id, model.embed_tokens.weight.device)
    if batch.total_len > model.max_context:
        raise ValueError(f"prompt + continuation ({batch.total_len} tokens) exceeds the model's context "
                         f"of {model.max_context} tokens")
    model.setup_caches(len(prompts), batch.total_len)
    first, acts = prefill(model, batch, collect=core is not None)  # [B, V]
    if core is not None:
        select_and_compact(model, acts, batch.valid, core)
        del acts
    logits = [first[:, None]]
    if L > 1:
        T0 = batch.prompt_len
        feed = torch.tensor([c[:-1] + [pad_id] * (L - len(c)) for c in continuations], device=batch.ids.device)
        batch.key_valid[:, T0:T0 + L - 1] = True
        positions = batch.positions + torch.arange(1, L, device=feed.device)  # [B, L-1]
        logits.append(model(feed, positions, batch.slots[T0:T0 + L - 1], batch.key_valid[:, :T0 + L - 1],
                            sparse=core is not None))
    return torch.cat(logits, 1)


def per_token(logits: torch.Tensor, continuations: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """logits [B, L, V] -> per sequence (log p of each continuation token [len], argmax token [len])."""
    out = []
    for b, c in enumerate(continuations):  # one row at a time: [L, V] in fp32 is the peak memory
        logp = logits[b, :len(c)].float().log_softmax(-1)
        target = torch.tensor(c, device=logp.device)
        out.append((logp.gather(1, target[:, None])[:, 0].cpu(), logp.argmax(-1).cpu()))
    return out


def continuation_logprobs(model, prompts: list[list[int]], continuations: list[list[int]],
                          core: CoreConfig | None, pad_id: int = 0) -> list[torch.Tensor]:
    """Per sequence, log p(cont[j] | prompt, cont[:j]) [len(cont)] under dense or core decoding."""
    logits = continuation_logits(model, prompts, continuations, core, pad_id)  # [B, L, V]
    return [logprobs for logprobs, _ in per_token(logits, continuations)]
