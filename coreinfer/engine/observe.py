"""Prefill-time observation: running per-neuron statistics of the layers a selection policy reads.

A prefill never keeps a layer's activations [B, T, F]: each sparse layer adds its tokens' scores
(`selection.token_scores`) into running sums [B, F] and the activations are dropped, so memory does
not grow with the prompt, and chunked prefill gives the same sums as one pass.
"""

from dataclasses import dataclass

import torch

from .selection import token_scores


@dataclass(frozen=True)
class Statistic:
    """What to collect at one layer: the sentence-wise statistic and its token-wise settings."""

    statistic: str = "frequency"
    alpha: float = 0.4
    ranking: str = "abs"


class RunningStats:
    """Sums [B, F] over a batch's real prompt tokens of one layer's (primary, tie-break) token scores."""

    def __init__(self, spec: Statistic):
        self.spec = spec
        self.primary = self.secondary = None
        self.tokens = 0

    @torch.inference_mode()
    def add(self, a: torch.Tensor, valid: torch.Tensor) -> None:
        """a [B, T, F] activations of T prompt tokens; valid [B, T] masks out left padding."""
        B, T, F = a.shape
        primary, secondary = token_scores(a.reshape(B * T, F), self.spec.statistic, self.spec.alpha,
                                          self.spec.ranking)  # [B*T, F] each
        w = valid.reshape(B, T, 1).to(primary.dtype)
        primary, secondary = (primary.view(B, T, F) * w).sum(1), (secondary.view(B, T, F) * w).sum(1)  # [B, F]
        if self.primary is None:
            self.primary, self.secondary = primary, secondary
        else:
            self.primary += primary
            self.secondary += secondary
        self.tokens += T


class Observer:
    """Running statistics keyed by layer id, for the layers (and in the form) a policy asked for."""

    def __init__(self, wanted: dict[int, Statistic]):
        self.layers = {layer: RunningStats(spec) for layer, spec in wanted.items()}
        self.valid: torch.Tensor | None = None  # [B, T] of the chunk being prefilled, set by the session

    def __call__(self, layer: int, a: torch.Tensor) -> None:
        if layer in self.layers:
            self.layers[layer].add(a, self.valid)

    def __contains__(self, layer: int) -> bool:
        return layer in self.layers
