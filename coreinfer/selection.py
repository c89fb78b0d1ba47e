"""Core-neuron selection: pure functions from activations to neuron indices.

`a` is one layer's FFN activation for one prompt, the input of its down projection: [T, F].
No model, no state: these functions are the method's math and are tested on hand-made matrices.
"""

import math

import torch

RANKINGS = ("abs", "signed", "relu")
STATISTICS = ("frequency", "norm")


def keep_count(fraction: float, total: int) -> int:
    """How many of `total` items a keep fraction in (0, 1] means; never zero."""
    return max(1, min(total, round(fraction * total)))


def token_core(a: torch.Tensor, alpha: float, ranking: str = "abs") -> torch.Tensor:
    """Token-wise core neurons as a mask [T, F]: each token's top-`alpha` fraction by strength.

    abs:    strength |a|. Right for gated FFNs, whose products are often large and negative.
    signed: strength a, as the reference code ranks; for reproduction only (drops large negatives).
    relu:   the paper's ReLU definition: the top-`alpha` fraction of each token's *positive* neurons.
    """
    T, F = a.shape
    if ranking == "relu":
        order = a.argsort(dim=1, descending=True)  # [T, F]
        k = (a > 0).sum(dim=1, keepdim=True).float().mul(alpha).round().long()  # [T, 1] per-token count
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(F, device=a.device).expand(T, F))
        return (ranks < k) & (a > 0)
    if ranking not in RANKINGS:
        raise ValueError(f"ranking must be one of {RANKINGS}, got {ranking!r}")
    strength = a.abs() if ranking == "abs" else a
    top = strength.topk(keep_count(alpha, F), dim=1).indices  # [T, k]
    return torch.zeros(T, F, dtype=torch.bool, device=a.device).scatter_(1, top, True)


def rank_neurons(primary: torch.Tensor, secondary: torch.Tensor, k: int) -> torch.Tensor:
    """The `k` neurons with the largest `primary` score, ties broken by `secondary`; sorted ids [k]."""
    by_secondary = secondary.argsort(descending=True, stable=True)
    by_both = by_secondary[primary[by_secondary].argsort(descending=True, stable=True)]
    return by_both[:k].sort().values


def frequency_core(a: torch.Tensor, alpha: float, beta: float, ranking: str = "abs") -> torch.Tensor:
    """Sentence-wise core neurons [k]: the top-`beta` fraction of all F neurons by how many tokens
    hold them in their token-wise core; ties broken by mean |a|."""
    counts = token_core(a, alpha, ranking).sum(dim=0)  # [F]
    return rank_neurons(counts, a.abs().float().mean(dim=0), keep_count(beta, a.shape[1]))


def norm_core(a: torch.Tensor, beta: float) -> torch.Tensor:
    """GRIFFIN's statistic: neuron n scores ||a[:, n] / ||a[t, :]|| ||_2 over tokens; top-`beta` [k]."""
    a = a.float()
    unit = a / a.norm(dim=1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)  # [T, F], rows of norm 1
    score = unit.norm(dim=0)  # [F]
    return rank_neurons(score, torch.zeros_like(score), keep_count(beta, a.shape[1]))


def core_neurons(a: torch.Tensor, alpha: float, beta: float, statistic: str = "frequency",
                 ranking: str = "abs") -> torch.Tensor:
    """Dispatch on the sentence-wise statistic; a [T, F] -> sorted neuron ids [k]."""
    if statistic == "frequency":
        return frequency_core(a, alpha, beta, ranking)
    if statistic == "norm":
        return norm_core(a, beta)
    raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")


def overlap(x: torch.Tensor, y: torch.Tensor) -> float:
    """|x ∩ y| / |x| for two index sets of equal size (the paper's core-set similarity)."""
    if x.numel() == 0:
        return math.nan
    return torch.isin(x, y).float().mean().item()
