"""Stability-guided decoding: choose each sparse layer's core set from the prompt, compact its FFN.

The prompt is prefilled densely while every layer's activations are kept; `select` turns them into
per-sequence neuron ids, `compact` gathers those rows into each layer's CompactFFN once, and every
decode step after that reads only the core rows.
"""

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .selection import RANKINGS, STATISTICS, core_neurons, keep_count

if TYPE_CHECKING:
    from .similarity import ClusterSet

MODES = ("stability", "similarity")


@dataclass
class CoreConfig:
    """What to keep. `beta` is the keep ratio of the FFN (one number, or one per sparse layer).

    The default keep, 0.85, is chosen for free continuation, where a prompt-fixed set costs most: on
    the embedded model it raises perplexity x1.19 (0.7: x1.59, 0.5: x2.6; docs/quality.md). Where the
    answer lives in the prompt (multiple choice) 0.7 or 0.5 cost only ~3 points of accuracy.

    layers: which layers are sparse: None for the default policy (the first 10% and last 7% of layers
    stay dense: sparsifying layer 0 alone of the embedded model multiplies perplexity by 2.5, and the
    first and last few layers cost the most of the rest; benchmarks/layer_sensitivity.py), "all", a
    spec like "3-27" or "2,4-9", or a list of layer ids.
    ranking: token-wise strength; "auto" is |a| for gated FFNs and positive-only for ReLU FFNs.
    mode: "stability" takes each prompt's own core set; "similarity" assigns the prompt to a cluster of
    `clusters` (built by `coreinfer cluster`) and takes that cluster's precomputed core set.
    """

    alpha: float = 0.4
    beta: float | list[float] = 0.85
    statistic: str = "frequency"
    ranking: str = "auto"
    layers: str | list[int] | None = None
    mode: str = "stability"
    clusters: "ClusterSet | None" = None

    def __post_init__(self):
        if not 0 < self.alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")
        for b in self.betas:
            if not 0 < b <= 1:
                raise ValueError(f"beta must be in (0, 1], got {b}")
        if self.statistic not in STATISTICS:
            raise ValueError(f"statistic must be one of {STATISTICS}, got {self.statistic!r}")
        if self.ranking != "auto" and self.ranking not in RANKINGS:
            raise ValueError(f"ranking must be 'auto' or one of {RANKINGS}, got {self.ranking!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "similarity" and self.clusters is None:
            raise ValueError("similarity mode needs a cluster set (--clusters FILE, made by `coreinfer cluster`)")

    @property
    def betas(self) -> list[float]:
        return list(self.beta) if isinstance(self.beta, (list, tuple)) else [self.beta]

    def sparse_layers(self, num_layers: int) -> list[int]:
        ids = parse_layers(self.layers, num_layers)
        if len(self.betas) not in (1, len(ids)):
            raise ValueError(f"{len(self.betas)} keep ratios given for {len(ids)} sparse layers")
        return ids

    def keep(self, num_layers: int) -> dict[int, float]:
        """Sparse layer id -> keep ratio."""
        ids = self.sparse_layers(num_layers)
        betas = self.betas * len(ids) if len(self.betas) == 1 else self.betas
        return dict(zip(ids, betas))


def default_layers(num_layers: int) -> list[int]:
    first, last = max(1, round(0.1 * num_layers)), max(1, round(0.07 * num_layers))
    return list(range(first, num_layers - last)) or list(range(num_layers))


def parse_layers(spec: str | list[int] | None, num_layers: int) -> list[int]:
    if spec is None:
        return default_layers(num_layers)
    if spec == "all":
        return list(range(num_layers))
    if isinstance(spec, str):
        ids = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            lo, _, hi = part.partition("-")
            if not (lo.isdigit() and (not hi or hi.isdigit())):
                raise ValueError(f"bad layer spec {spec!r}: use 'all', '3-27' or '2,4-9'")
            ids.extend(range(int(lo), int(hi or lo) + 1))
    else:
        ids = list(spec)
    if not ids:
        raise ValueError("the layer list is empty: name at least one sparse layer, or use --dense")
    bad = [i for i in ids if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range for a model with {num_layers} layers")
    return sorted(set(ids))


@dataclass
class CoreStats:
    """What a core selection did: sizes per layer, its cost, and the bytes each decode step reads."""

    core_sizes: dict[int, int] = field(default_factory=dict)
    ffn_width: int = 0
    select_ms: float = 0.0
    compact_ms: float = 0.0
    bytes_dense: int = 0
    bytes_core: int = 0
    cluster: list[int] | None = None  # similarity mode: each sequence's cluster
    cluster_score: list[float] | None = None  # and its mean core-set overlap with that cluster's members


def ranking_for(core: CoreConfig, gated: bool) -> str:
    if core.ranking != "auto":
        return core.ranking
    return "abs" if gated else "relu"


@torch.inference_mode()
def select(acts: list[torch.Tensor], valid: torch.Tensor, core: CoreConfig, gated: bool) -> dict[int, torch.Tensor]:
    """Per sparse layer, each sequence's core ids: acts[l] [B, T, F], valid [B, T] -> {l: [B, k]}."""
    ranking = ranking_for(core, gated)
    out = {}
    for layer, beta in core.keep(len(acts)).items():
        a = acts[layer]
        out[layer] = torch.stack([core_neurons(a[b][valid[b]], core.alpha, beta, core.statistic, ranking)
                                  for b in range(a.shape[0])])
    return out


@torch.inference_mode()
def compact(model, index: dict[int, torch.Tensor]) -> None:
    """Load each sparse layer's core rows into its CompactFFN; every other layer decodes dense."""
    for i, layer in enumerate(model.layers):
        if i in index:
            layer.core.load(layer.mlp, index[i])
        else:
            layer.core.clear()


def decode_bytes(model, index: dict[int, torch.Tensor] | None = None) -> int:
    """Weight bytes one decode step reads: all weights and buffers but the embedding table (a lookup
    reads one row) and the caches, with each sparse layer's FFN counted at its core size."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.nbytes
    if model.lm_head.weight is not model.embed_tokens.weight:
        total -= model.embed_tokens.weight.nbytes
    total -= sum(layer.self_attn.cache.k.nbytes * 2 for layer in model.layers if layer.self_attn.cache is not None)
    for i, ix in (index or {}).items():
        ffn = model.layers[i].mlp
        total -= (ffn.width - ix.shape[1]) * ffn.row_bytes()
    return total


def select_and_compact(model, acts, valid, core: CoreConfig) -> CoreStats:
    gated = model.layers[0].mlp.gated
    sync = torch.cuda.synchronize if acts[0].is_cuda else (lambda: None)  # time the GPU's work, not its queue
    sync()
    t0 = time.perf_counter()
    chosen = scores = None
    if core.mode == "similarity":
        core.clusters.check(model)
        index, chosen, scores = core.clusters.index(acts, valid, core.keep(len(acts)))
    else:
        index = select(acts, valid, core, gated)
    sync()
    t1 = time.perf_counter()
    compact(model, index)
    sync()
    t2 = time.perf_counter()
    return CoreStats(core_sizes={i: ix.shape[1] for i, ix in index.items()}, ffn_width=acts[0].shape[-1],
                     select_ms=(t1 - t0) * 1e3, compact_ms=(t2 - t1) * 1e3,
                     bytes_dense=decode_bytes(model), bytes_core=decode_bytes(model, index),
                     cluster=chosen, cluster_score=scores)
