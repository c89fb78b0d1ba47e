"""Adaptive core neurons: per-token sparsity inside the prompt's core set, and drift checks.

A prompt-fixed core set cannot reach dense quality on free continuation (docs/quality.md): the
neurons a continuation needs are not all the prompt's. Per-token top-k by |a| is nearly free, but
needs `a`, so it must read gate and up. These policies combine the two, each a wrapper around any
base `SelectionPolicy` (stability, similarity):

- `Plan(down_rows, input_keep)` tells the session how a compacted layer runs each decoded token
  (`AdaptiveFFN`): `a` over the core set's (the *superset's*) gate/up rows, then the down projection
  over only the `down_rows` rows with the largest WINA score |a_i| * ||down_i||; optionally gate/up
  read only the `input_keep` share of the input's entries with the largest |x_j| * ||W[:, j]||
  (TEAL/WINA input sparsity: a column of W per skipped entry of x is never read).
- `AdaptivePolicy(base, plan)` adds a plan to every layer the base selects.
- `DriftPolicy(base, period, threshold)`: every `period` decode steps one step runs dense and
  measures how much of that token's statistic the core set covers; below `threshold` the set is
  re-chosen from a running blend of the prompt's and the recent tokens' statistic and recompacted,
  with no re-prefill.

`AdaptiveFFN.reference` is the oracle (masked dense math over the gathered rows); the decode path
reads only the chosen rows, in place, with the native weighted row sum of engine/native.py (float32 on
the CPU; elsewhere, or without a C compiler, index_select and a small matmul). Bytes are counted as
read: the superset's gate/up (or their kept columns) and only the chosen down rows.
"""

from dataclasses import dataclass

import torch

from . import native
from .compact import CompactFFN
from .observe import RunningStats, Statistic
from .policy import CoreConfig, Selection, SelectionPolicy
from .selection import keep_count, rank_neurons


@dataclass(frozen=True)
class Plan:
    """How a compacted layer decodes: down rows per token (None: all of the core set), and the share
    of the input's entries gate/up read (1.0: all)."""

    down_rows: int | None = None
    input_keep: float = 1.0

    def __post_init__(self):
        if self.down_rows is not None and self.down_rows < 1:
            raise ValueError(f"down rows per token must be >= 1, got {self.down_rows}")
        if not 0 < self.input_keep <= 1:
            raise ValueError(f"input keep must be in (0, 1], got {self.input_keep}")

    def build(self) -> "AdaptiveFFN":
        return AdaptiveFFN(self)


def top_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask [..., n] of the k largest scores of each row."""
    if k >= score.shape[-1]:
        return torch.ones_like(score, dtype=torch.bool)
    return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, score.topk(k, dim=-1, sorted=False).indices, True)


class AdaptiveFFN(CompactFFN):
    """A compacted layer (the superset's rows, per sequence) that picks rows per token; see `Plan`."""

    def __init__(self, plan: Plan):
        super().__init__()
        self.plan = plan
        self.down_norm = self.in_norm = None
        self.scratch: dict[str, torch.Tensor] = {}  # per-token outputs, reused: "out" [B, d], "up"/"gate" [B, k]
        self.source = None  # the dense FFN whose weights `weights` views, when the superset is all of it
        self.lib = None  # the native kernels (native.py) where they can read these weights in place

    @torch.inference_mode()
    def load(self, ffn, index: torch.Tensor) -> None:
        if ffn.quantized:
            raise NotImplementedError("per-token refinement runs on float weights; use --weights dense")
        if index.shape == (1, ffn.width) and bool((index[0] == torch.arange(ffn.width, device=index.device)).all()):
            # The superset is the whole FFN (keep 1, as calibrated profiles choose): read the dense
            # weights in place instead of copying them, and keep the norms and transposed copies,
            # which then do not depend on the prompt, for every later prompt.
            if self.source is not ffn:
                self.clear()
                self.act, self.down_bias = ffn.act, ffn.down_bias
                self.weights = {name: t.unsqueeze(0) for name, (t, _) in ffn.neuron_tensors().items()}  # [1, F, ...]
                self.prepare()
                self.source = ffn
            return
        if self.source is not None:
            self.clear()  # views of the dense weights must not become the gather's reused buffers
        super().load(ffn, index)
        self.prepare()

    def prepare(self) -> None:
        """The per-layer constants of the gathered rows: WINA norms, transposed gate/up, output buffers."""
        w = self.weights
        self.down_norm = w["down"].norm(dim=-1)  # [B, k]: ||down row i||, the WINA weight of a_i
        inputs = [w["up"]] + ([w["gate"]] if "gate" in w else [])
        self.in_norm = torch.stack([t.norm(dim=1) for t in inputs]).norm(dim=0)  # [B, d]: ||W[:, j]|| over gate/up
        if self.plan.input_keep < 1:
            # columns of gate/up as rows, so that skipping an input entry skips a contiguous row
            w["up_t"] = w.pop("up").transpose(1, 2).contiguous()  # [B, d, k]
            if "gate" in w:
                w["gate_t"] = w.pop("gate").transpose(1, 2).contiguous()
        (B, k, d), like = w["down"].shape, w["down"]
        self.scratch = {"out": like.new_empty(B, d), "up": like.new_empty(B, k), "gate": like.new_empty(B, k)}
        self.lib = native.load() if native.usable(like[0]) else None  # None: the PyTorch gather

    def clear(self) -> None:
        super().clear()
        self.scratch.clear()
        self.source = None

    def sizes(self) -> tuple[int, int]:
        """(input entries read, down rows read) per token."""
        w = self.weights
        d, k = w["down"].shape[2], w["down"].shape[1]
        return keep_count(self.plan.input_keep, d), min(k, self.plan.down_rows or k)

    def nbytes(self) -> int:
        """Bytes one decode step reads for this layer, all sequences: kept columns of gate/up, chosen down rows."""
        d_in, m = self.sizes()
        w, total = self.weights, 0
        for name, t in w.items():
            if name in ("up_t", "gate_t"):
                total += t.nbytes * d_in // t.shape[1]
            elif name == "down":
                total += t.nbytes * m // t.shape[1]
            else:
                total += t.nbytes
        return total

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, d] with its small entries zeroed (all kept when input_keep is 1)."""
        d_in, _ = self.sizes()
        if d_in == x.shape[-1]:
            return x
        return x * top_mask(x.abs() * self.in_norm[:, None, :], d_in)

    def _gate_up(self, x: torch.Tensor) -> torch.Tensor:
        """a [B, T, k] over the superset, from x [B, T, d] (already masked)."""
        w = self.weights
        up = torch.bmm(x, w["up_t"]) if "up_t" in w else torch.bmm(x, w["up"].transpose(1, 2))
        if "up_bias" in w:
            up = up + w["up_bias"][:, None, :]
        if "gate_t" in w or "gate" in w:
            gate = torch.bmm(x, w["gate_t"]) if "gate_t" in w else torch.bmm(x, w["gate"].transpose(1, 2))
            return self.act(gate) * up
        return self.act(up)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The oracle: x [B, T, d] -> [B, T, d] with masks over every gathered row (reads them all)."""
        _, m = self.sizes()
        a = self._gate_up(self._inputs(x))  # [B, T, k]
        a = a * top_mask(a.abs() * self.down_norm[:, None, :], m)
        out = torch.bmm(a, self.weights["down"])
        return out if self.down_bias is None else out + self.down_bias

    @staticmethod
    def _rows(lib, weight: torch.Tensor, rows: torch.Tensor, coef: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out [n] = coef [m] @ weight[rows] for weight [R, n]: in place with the native kernel, else
        through a gathered copy."""
        if lib is not None:
            return native.rowsum(lib, weight, rows, coef, out)
        return torch.mv(weight.index_select(0, rows).t(), coef, out=out)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Decode steps (T = 1) read only the chosen rows; longer inputs (teacher-forced scoring) take
        the reference, which computes the same function. A decode step returns a view of a reused
        buffer, valid until the next call."""
        if x.shape[1] != 1:
            return self.reference(x)
        w, (d_in, m), buf, lib = self.weights, self.sizes(), self.scratch, self.lib
        for b in range(x.shape[0]):
            xb = x[b, 0]  # [d]
            if "up_t" in w:
                cols = (xb.abs() * self.in_norm[b]).topk(d_in, sorted=False).indices  # [d_in]
                xs = xb[cols]
                up = self._rows(lib, w["up_t"][b], cols, xs, buf["up"][b])  # [k]
                gate = self._rows(lib, w["gate_t"][b], cols, xs, buf["gate"][b]) if "gate_t" in w else None
            else:
                up = w["up"][b] @ xb
                gate = w["gate"][b] @ xb if "gate" in w else None
            if "up_bias" in w:
                up = up + w["up_bias"][b]
            a = self.act(up) if gate is None else self.act(gate) * up  # [k]
            rows = (a.abs() * self.down_norm[b]).topk(m, sorted=False).indices  # [m]
            self._rows(lib, w["down"][b], rows, a[rows], buf["out"][b])  # [m] @ [m, d]
        out = buf["out"][:, None]  # [B, 1, d]
        return out if self.down_bias is None else out + self.down_bias


@dataclass
class AdaptivePolicy(SelectionPolicy):
    """The base policy's core sets as supersets, decoded per token by `plans` (layer -> Plan; a layer
    without one keeps the plain compacted FFN)."""

    base: SelectionPolicy
    plans: dict[int, Plan]

    def wanted(self) -> dict[int, Statistic]:
        return self.base.wanted()

    def select(self, stats: dict[int, RunningStats]) -> Selection:
        chosen = self.base.select(stats)
        chosen.plans = {**chosen.plans, **{l: p for l, p in self.plans.items() if l in chosen.index}}
        return chosen

    def check(self, step: int) -> bool:
        return self.base.check(step)

    def revise(self, stats: dict[int, RunningStats], current: Selection) -> Selection | None:
        return self.base.revise(stats, current)


def coverage(primary: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Share of each sequence's statistic [B, F] that its core ids [B, k] hold -> [B]."""
    return primary.gather(1, index).sum(1) / primary.sum(1).clamp_min(torch.finfo(primary.dtype).tiny)


@dataclass
class DriftPolicy(SelectionPolicy):
    """Checks every `period`-th decode step whether the core sets still fit (see the module docstring).

    rate: weight of each checked token in the running per-token statistic the new set is chosen
    from (the prompt's per-token mean starts it). Drift is any sequence's coverage, averaged over the
    layers, below `threshold`; the whole batch is then re-chosen (one recompaction)."""

    base: SelectionPolicy
    period: int
    threshold: float
    rate: float = 0.5

    def __post_init__(self):
        if self.period < 1:
            raise ValueError(f"the drift check period must be >= 1 decode steps, got {self.period}")
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"the drift threshold is a coverage in [0, 1], got {self.threshold}")
        if not 0 < self.rate <= 1:
            raise ValueError(f"the drift rate must be in (0, 1], got {self.rate}")
        self.scores: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.last_coverage: torch.Tensor | None = None  # [B] of the latest check
        self.checks = self.refreshes = 0

    def wanted(self) -> dict[int, Statistic]:
        return self.base.wanted()

    def select(self, stats: dict[int, RunningStats]) -> Selection:
        self.scores = {l: (s.primary / s.tokens, s.secondary / s.tokens) for l, s in stats.items()}
        return self.base.select(stats)

    def check(self, step: int) -> bool:
        return (step + 1) % self.period == 0

    def revise(self, stats: dict[int, RunningStats], current: Selection) -> Selection | None:
        """One dense step's statistics -> a new selection on drift, else None."""
        self.checks += 1
        cov = torch.stack([coverage(stats[l].primary, ids) for l, ids in current.index.items()]).mean(0)  # [B]
        self.last_coverage = cov
        r = self.rate
        for l, s in stats.items():
            p, q = self.scores[l]
            self.scores[l] = ((1 - r) * p + r * s.primary, (1 - r) * q + r * s.secondary)
        if bool((cov >= self.threshold).all()):
            return None
        self.refreshes += 1
        index = {l: rank_neurons(*self.scores[l], ids.shape[1]) for l, ids in current.index.items()}
        return Selection(index, current.cluster, current.cluster_score, dict(current.plans))


def adapt(core: CoreConfig, base: SelectionPolicy, model) -> SelectionPolicy:
    """The base policy wrapped as `core`'s adaptive settings ask (unchanged when they are off)."""
    policy, width = base, model.ffns()[0].width
    if not core.profile and (core.refine is not None or core.input_keep < 1):  # a profile brings its plans
        down_rows = keep_count(core.refine, width) if core.refine is not None else None
        plans = {layer: Plan(down_rows, core.input_keep) for layer in core.sparse_layers(len(model.ffns()))}
        policy = AdaptivePolicy(policy, plans)
    if core.drift_period:
        if core.mode != "stability":
            raise ValueError("drift checks re-choose a prompt's own core set: use them with --mode stability")
        policy = DriftPolicy(policy, core.drift_period, core.drift_threshold)
    return policy
