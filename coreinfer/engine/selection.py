"""Core-neuron selection: pure functions from activations to neuron indices.

`a` is one layer's FFN activation, the input of its down projection: [T, F] for one prompt, or any
[N, F] of tokens. Selection is two steps, so that a prefill can keep running sums instead of every
token's activations: `token_scores` turns each token's activations into per-neuron scores, and the
neurons with the largest *sums* of those scores over the prompt's tokens form its core set
(`rank_neurons`). No model, no state: tested on hand-made matrices.
"""

import math

import torch

RANKINGS = ("abs", "signed", "relu")
STATISTICS = ("frequency", "norm")


def keep_count(fraction: float, total: int) -> int:
    """How many of `total` items a keep fraction in (0, 1] means; never zero."""
    return max(1, min(total, round(fraction * total)))


def token_core(a: torch.Tensor, alpha: float, ranking: str = "abs") -> torch.Tensor:
    """Token-wise core neurons as a mask [N, F]: each token's top-`alpha` fraction by strength.

    abs:    strength |a|. Right for gated FFNs, whose products are often large and negative.
    signed: strength a, as the reference code ranks; for reproduction only (drops large negatives).
    relu:   the paper's ReLU definition: the top-`alpha` fraction of each token's *positive* neurons.
    """
    N, F = a.shape
    if ranking == "relu":
        order = a.argsort(dim=1, descending=True)  # [N, F]
        k = (a > 0).sum(dim=1, keepdim=True).float().mul(alpha).round().long()  # [N, 1] per-token count
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(F, device=a.device).expand(N, F))
        return (ranks < k) & (a > 0)
    if ranking not in RANKINGS:
        raise ValueError(f"ranking must be one of {RANKINGS}, got {ranking!r}")
    strength = a.abs() if ranking == "abs" else a
    top = strength.topk(keep_count(alpha, F), dim=1).indices  # [N, k]
    return torch.zeros(N, F, dtype=torch.bool, device=a.device).scatter_(1, top, True)


def token_scores(a: torch.Tensor, statistic: str, alpha: float, ranking: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token and neuron, (primary, tie-break) scores [N, F] in fp32; a prompt's scores are their sums.

    frequency (the paper): 1 where the neuron is token-wise core, tie-broken by |a|: over a prompt the
               sums are how many tokens hold each neuron, and its total |a|.
    norm (GRIFFIN): (a[t, n] / ||a[t, :]||)^2; the sum is the square of GRIFFIN's per-neuron norm,
               which ranks the neurons alike.
    """
    if statistic == "frequency":
        return token_core(a, alpha, ranking).float(), a.abs().float()
    if statistic == "norm":
        a = a.float()
        unit = a / a.norm(dim=1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)  # [N, F], rows of norm 1
        return unit.square(), torch.zeros_like(unit)
    raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")


def rank_neurons(primary: torch.Tensor, secondary: torch.Tensor, k: int) -> torch.Tensor:
    """The `k` neurons with the largest `primary` score, ties broken by `secondary`, then by the lower
    id: [..., F] -> sorted ids [..., k]."""
    by_secondary = secondary.argsort(dim=-1, descending=True, stable=True)  # [..., F]
    by_both = by_secondary.gather(-1, primary.gather(-1, by_secondary).argsort(dim=-1, descending=True, stable=True))
    return by_both[..., :k].sort(dim=-1).values


def core_neurons(a: torch.Tensor, alpha: float, beta: float, statistic: str = "frequency",
                 ranking: str = "abs") -> torch.Tensor:
    """Sentence-wise core neurons of one prompt: a [T, F] -> the top-`beta` fraction, sorted ids [k]."""
    primary, secondary = token_scores(a, statistic, alpha, ranking)  # [T, F] each
    return rank_neurons(primary.sum(0), secondary.sum(0), keep_count(beta, a.shape[1]))


def frequency_core(a: torch.Tensor, alpha: float, beta: float, ranking: str = "abs") -> torch.Tensor:
    """The paper's sentence-wise core: neurons most often token-wise core, ties by total |a| [k]."""
    return core_neurons(a, alpha, beta, "frequency", ranking)


def norm_core(a: torch.Tensor, beta: float) -> torch.Tensor:
    """GRIFFIN's statistic: neuron n scores ||a[:, n] / ||a[t, :]|| ||_2 over tokens; top-`beta` [k]."""
    return core_neurons(a, 1.0, beta, "norm")


def overlap(x: torch.Tensor, y: torch.Tensor) -> float:
    """|x ∩ y| / |x| for two index sets of equal size (the paper's core-set similarity)."""
    if x.numel() == 0:
        return math.nan
    return torch.isin(x, y).float().mean().item()
