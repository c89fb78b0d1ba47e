"""Teacher-forced sparse scoring: the log-probabilities sparse decoding would assign to a given text.

The prompt is prefilled densely and the core set chosen from it, exactly as in generation; the whole
continuation then runs through the compacted FFN in one forward (`Session.score`), instead of token
by token. Every quality number coreinfer reports comes through here, so accuracy is measured on the
sparse model.
"""

import torch

from ..engine.policy import CoreConfig, SelectionPolicy
from ..engine.session import Session, make_policy


def continuation_logits(model, prompts: list[list[int]], continuations: list[list[int]],
                        core: CoreConfig | SelectionPolicy | None, pad_id: int = 0, cores=None) -> torch.Tensor:
    """Logits [B, L, V] predicting each continuation token (L = longest continuation), under dense
    or core decoding; `cores` are CoreWeights to reuse."""
    if len(prompts) != len(continuations) or any(len(c) == 0 for c in continuations):
        raise ValueError("give one non-empty continuation per prompt")
    session = Session(model, prompts, max(len(c) for c in continuations), pad_id, make_policy(core, model), cores)
    return session.score(continuations)


def per_token(logits: torch.Tensor, continuations: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """logits [B, L, V] -> per sequence (log p of each continuation token [len], argmax token [len])."""
    out = []
    for b, c in enumerate(continuations):  # one row at a time: [L, V] in fp32 is the peak memory
        logp = logits[b, :len(c)].float().log_softmax(-1)
        target = torch.tensor(c, device=logp.device)
        out.append((logp.gather(1, target[:, None])[:, 0].cpu(), logp.argmax(-1).cpu()))
    return out


def continuation_logprobs(model, prompts: list[list[int]], continuations: list[list[int]],
                          core: CoreConfig | SelectionPolicy | None, pad_id: int = 0) -> list[torch.Tensor]:
    """Per sequence, log p(cont[j] | prompt, cont[:j]) [len(cont)] under dense or core decoding."""
    logits = continuation_logits(model, prompts, continuations, core, pad_id)  # [B, L, V]
    return [logprobs for logprobs, _ in per_token(logits, continuations)]
