"""Teacher-forced sparse scoring: the log-probabilities sparse decoding would assign to a given text.

The prompt is prefilled densely and the core set chosen from it, exactly as in generation; the whole
continuation then runs through the compacted FFN in one forward (`Session.score`), instead of token
by token. Every quality number coreinfer reports comes through here, so accuracy is measured on the
sparse model.

With quantized weights a forward over a whole continuation would run other kernels than decoding:
the native int8 GEMV takes decode-sized inputs only (gemv.MAX_M rows) and quantizes the activations
to int8 on the way, while longer inputs go to PyTorch's int8 kernel with bf16 activations, which
agrees with fp32 on more top-1 tokens (docs/speed.md: 94.1% against 93.2%). There the continuation is
scored one decode step a position (`stepped`), so the numbers are those of what decoding runs.
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


def stepwise(model) -> bool:
    """Whether scoring must step like decoding to run decoding's kernels: with quantized weights."""
    return model.ffns()[0].quantized


def stepped(session, continuations: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """per_token of the teacher-forced continuations, computed as decoding computes them: one
    Session.step a position, each matmul on decode-sized inputs. Only one step's logits [B, V] exist
    at a time."""
    B, L = len(continuations), max(len(c) for c in continuations)
    # [B, L]: a row that ends early repeats its last token, fed only after its last scored position
    feed = torch.tensor([c + c[-1:] * (L - len(c)) for c in continuations])
    logprobs, greedy = torch.empty(B, L), torch.empty(B, L, dtype=torch.long)
    logits = session.last_logits if session.last_logits is not None else session.prefill()  # [B, V]
    for j in range(L):
        if j:
            logits = session.step(feed[:, j - 1].to(logits.device))
        logp = logits.float().log_softmax(-1)
        logprobs[:, j] = logp.gather(1, feed[:, j:j + 1].to(logp.device))[:, 0].cpu()
        greedy[:, j] = logp.argmax(-1).cpu()
    return [(logprobs[b, :len(c)], greedy[b, :len(c)]) for b, c in enumerate(continuations)]


def score_session(session, continuations: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """per_token of a fresh or prefilled session's teacher-forced continuations, through the kernels
    decoding runs (`stepped` where they differ from a whole-continuation forward's)."""
    if stepwise(session.model):
        return stepped(session, continuations)
    return per_token(session.score(continuations), continuations)


def continuation_logprobs(model, prompts: list[list[int]], continuations: list[list[int]],
                          core: CoreConfig | SelectionPolicy | None, pad_id: int = 0) -> list[torch.Tensor]:
    """Per sequence, log p(cont[j] | prompt, cont[:j]) [len(cont)] under dense or core decoding."""
    if len(prompts) != len(continuations) or any(len(c) == 0 for c in continuations):
        raise ValueError("give one non-empty continuation per prompt")
    session = Session(model, prompts, max(len(c) for c in continuations), pad_id, make_policy(core, model))
    return [logprobs for logprobs, _ in score_session(session, continuations)]
