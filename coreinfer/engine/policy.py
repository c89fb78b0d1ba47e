"""What to keep, and who chooses it: CoreConfig (the user's settings), the layer policy, and the
selection-policy interface with the paper's stability-guided policy.

A `SelectionPolicy` names the layers it must observe during the dense prefill and the statistic it
needs there (`wanted`); after the prefill it turns those running statistics into each sequence's
core neuron ids per sparse layer (`select`). The session compacts whatever a policy returns, so the
stability policy here, the similarity policy (clusters.py) and later adaptive ones plug in alike.
"""

from dataclasses import dataclass, field

import torch

from .observe import RunningStats, Statistic
from .selection import RANKINGS, STATISTICS, keep_count, rank_neurons

MODES = ("stability", "similarity")


@dataclass
class CoreConfig:
    """What to keep. `beta` is the keep ratio of the FFN (one number, or one per sparse layer).

    The default keep, 0.85, is chosen for free continuation, where a prompt-fixed set costs most: on
    the embedded model it raises perplexity x1.19 (0.7: x1.59, 0.5: x2.6; docs/quality.md). Where the
    answer lives in the prompt (multiple choice) 0.7 or 0.5 cost only ~3 points of accuracy. The
    commands' default is not these fields' but `profile="auto"`: the model's calibrated profile.

    layers: which layers are sparse: None for the default policy (the first 10% and last 7% of layers
    stay dense: sparsifying layer 0 alone of the embedded model multiplies perplexity by 2.5, and the
    first and last few layers cost the most of the rest; benchmarks/layer_sensitivity.py), "all", a
    spec like "3-27" or "2,4-9", or a list of layer ids.
    ranking: token-wise strength; "auto" is |a| for gated FFNs and positive-only for ReLU FFNs.
    mode: "stability" takes each prompt's own core set; "similarity" assigns the prompt to a cluster of
    the cluster file `clusters` (made by `coreinfer cluster`) and takes that cluster's core set.
    refine, input_keep (engine/adaptive.py): the core set becomes a superset inside which each decoded
    token reads only its top `refine` share (of the FFN width) of down rows by |a_i| * ||down_i||, and
    gate/up read only the `input_keep` share of the input's largest entries; None and 1.0: off.
    drift_period, drift_threshold: every `drift_period` decode steps one runs dense and, where the core
    set covers less than `drift_threshold` of that token's statistic, the set is re-chosen; 0: off.
    profile: a file made by `coreinfer calibrate` (engine/profile.py): its per-layer keep, refine and
    input keep replace `beta`, `layers`, `refine` and `input_keep`. "auto": the profile calibrated on
    the model, shipped or in the cache folder, or dense without one (api.LLM.default_core).
    prior, prior_weight: a profile whose global prior (neurons core across the calibration text) is
    fused with each prompt's statistic at this weight (engine/profile.PriorPolicy).
    """

    alpha: float = 0.4
    beta: float | list[float] = 0.85
    statistic: str = "frequency"
    ranking: str = "auto"
    layers: str | list[int] | None = None
    mode: str = "stability"
    clusters: str | None = None
    refine: float | None = None
    input_keep: float = 1.0
    drift_period: int = 0
    drift_threshold: float = 0.9
    profile: str | None = None
    prior: str | None = None
    prior_weight: float = 0.5

    def __post_init__(self):
        if self.refine is not None and not 0 < self.refine <= 1:
            raise ValueError(f"refine (down rows per token, a share of the FFN width) must be in (0, 1], got {self.refine}")
        if not 0 < self.input_keep <= 1:
            raise ValueError(f"input keep (share of the FFN input gate/up read) must be in (0, 1], got {self.input_keep}")
        if self.drift_period < 0:
            raise ValueError(f"drift period must be >= 0 decode steps (0: no checks), got {self.drift_period}")
        if not 0 <= self.drift_threshold <= 1:
            raise ValueError(f"drift threshold is a coverage in [0, 1], got {self.drift_threshold}")
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
        if not 0 <= self.prior_weight <= 1:
            raise ValueError(f"prior weight must be in [0, 1], got {self.prior_weight}")
        if self.prior and (self.mode != "stability" or self.profile):
            raise ValueError("a prior fuses into a prompt's own core set: use --prior with --mode stability "
                             "and --beta, not with --profile")
        if self.profile and self.mode != "stability":
            raise ValueError("a profile sets each layer's own core set: use it with --mode stability")
        if self.mode == "similarity" and not self.clusters:
            raise ValueError("similarity mode needs a cluster file (--clusters FILE, made by `coreinfer cluster`)")

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

    def statistic_for(self, gated: bool) -> Statistic:
        """The token-wise settings, with "auto" ranking resolved: |a| for gated FFNs, positive-only
        (the paper's ReLU definition) for plain ones."""
        ranking = self.ranking if self.ranking != "auto" else ("abs" if gated else "relu")
        return Statistic(self.statistic, self.alpha, ranking)


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
class Selection:
    """A policy's choice: per sparse layer, each sequence's sorted core neuron ids {layer: [B, k]};
    similarity mode adds each sequence's cluster and its mean core-set overlap with the members."""

    index: dict[int, torch.Tensor]
    cluster: list[int] | None = None
    cluster_score: list[float] | None = None
    plans: dict = field(default_factory=dict)  # layer -> how it decodes (adaptive.Plan); absent: CompactFFN


class SelectionPolicy:
    """The interface every policy implements; see the module docstring."""

    def wanted(self) -> dict[int, Statistic]:
        """Layer id -> the statistic the prefill must collect there."""
        raise NotImplementedError

    def select(self, stats: dict[int, RunningStats]) -> Selection:
        raise NotImplementedError

    def check(self, step: int) -> bool:
        """Whether decode step `step` (from 0) runs dense, observing the wanted layers, to check drift."""
        return False

    def revise(self, stats: dict[int, RunningStats], current: Selection) -> Selection | None:
        """After a checked step: a new selection to recompact to, or None to keep the current one."""
        return None


WHOLE = Statistic("norm")


@dataclass
class StabilityPolicy(SelectionPolicy):
    """The paper's stability-guided decoding: each prompt's own sentence-wise core set per layer.

    keep: sparse layer id -> keep ratio; width: FFN width F; spec: the statistic to collect."""

    keep: dict[int, float]
    width: int
    spec: Statistic = field(default_factory=Statistic)

    def wanted(self) -> dict[int, Statistic]:
        # a layer that keeps every neuron (a calibrated profile's superset) ranks nothing: the
        # cheapest statistic, only for the batch's shape, instead of e.g. frequency's per-token top-k
        return {layer: self.spec if keep_count(beta, self.width) < self.width else WHOLE
                for layer, beta in self.keep.items()}

    def select(self, stats: dict[int, RunningStats]) -> Selection:
        index = {}
        for layer, beta in self.keep.items():
            k, s = keep_count(beta, self.width), stats[layer]
            if k == self.width:
                index[layer] = torch.arange(k, device=s.primary.device).expand(s.primary.shape[0], k)  # [B, F]
            else:
                index[layer] = rank_neurons(s.primary, s.secondary, k)  # [B, k]
        return Selection(index)
