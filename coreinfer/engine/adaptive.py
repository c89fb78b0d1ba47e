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

from . import native, rows
from .compact import CompactFFN
from .quant import int8_matmul
from .observe import RunningStats, Statistic
from .policy import CoreConfig, Selection, SelectionPolicy
from .selection import keep_count, rank_neurons
from .threshold import ThresholdFFN, ThresholdPlan


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
    """A compacted layer (the superset's rows, per sequence) that picks rows per token; see `Plan`.

    int8 weights (quant.py) keep their scales: gate/up through the int8 GEMV, down as neuron-major int8
    rows [k, d] read by `rows.int8_rows`, and with input sparsity gate/up as int8 columns [d, k] read
    the same way. Without the native rows operator (`rows.reads_rows`) a row read costs more than the
    GEMV over every row, so there the chosen rows become masked coefficients of the layouts the FFN
    stores (down [d, k]) and the step reads, and counts, every row."""

    def __init__(self, plan: Plan):
        super().__init__()
        self.plan = plan
        self.down_norm = self.in_norm = None
        self.scratch: dict[str, torch.Tensor] = {}  # per-token outputs, reused: "out" [B, d], "up"/"gate" [B, k]
        self.source = None  # the dense FFN whose weights `weights` views, when the superset is all of it
        self.lib = None  # the native kernels (native.py) where they can read these weights in place
        self.by_rows = True  # int8: read chosen rows (neuron-major down), else masked coefficients
        self.major: tuple | None = None  # int8 (ffn, down [F, d]): the neuron-major copy, made once per layer

    @torch.inference_mode()
    def load(self, ffn, index: torch.Tensor) -> None:
        if ffn.format not in ("dense", "int8"):
            raise NotImplementedError(f"per-token refinement runs on float or int8 weights, not {ffn.format}")
        whole = index.shape == (1, ffn.width) and bool((index[0] == torch.arange(ffn.width, device=index.device)).all())
        by_rows = not ffn.quantized or rows.reads_rows()
        if whole and self.source is ffn and self.by_rows == by_rows:
            return  # the norms and transposed copies do not depend on the prompt: kept from the last load
        if self.source is not None or self.by_rows != by_rows:
            self.clear()  # views of the dense weights must not become the gather's reused buffers
        for name in ("up_t", "gate_t"):  # made again from the gathered rows by `prepare`
            self.weights.pop(name, None)
        self.act, self.down_bias, self.quantized, self.by_rows = ffn.act, ffn.down_bias, ffn.quantized, by_rows
        self.down_scale = getattr(ffn, "down_scale", None)
        tensors = self.neuron_major(ffn)
        if whole:
            # The superset is the whole FFN (keep 1, as calibrated profiles choose): read the dense
            # weights in place instead of copying them, and keep the norms and transposed copies,
            # which then do not depend on the prompt, for every later prompt.
            self.weights = {name: t.unsqueeze(0) for name, (t, _) in tensors.items()}  # [1, F, ...]
            self.source = ffn
        else:
            for name, (t, axis) in tensors.items():
                buf = self._buffer(self.weights, name, (index.shape[0], *t.shape[:axis], index.shape[1],
                                                        *t.shape[axis + 1:]), t)
                for b in range(index.shape[0]):
                    torch.index_select(t, axis, index[b], out=buf[b])
        self.prepare()

    def neuron_major(self, ffn) -> dict[str, tuple[torch.Tensor, int]]:
        """The FFN's per-neuron tensors and their neuron axis, with int8 down neuron-major [F, d] where
        rows are read (a copy made once per layer: the FFN stores it [d, F] for the dense GEMV)."""
        tensors = ffn.neuron_tensors()
        if ffn.quantized and self.by_rows:
            if self.major is None or self.major[0] is not ffn:
                self.major = (ffn, ffn.down.t().contiguous())  # [F, d]
            tensors["down"] = (self.major[1], 0)
        return tensors

    def dequantized(self) -> dict[str, torch.Tensor]:
        """The gathered weights as float, in the float layout: up/gate/down [B, k, d], up bias [B, k]."""
        w = dict(self.weights)
        for name in ("up", "gate"):
            if f"{name}_t" in w:
                w[name] = w.pop(f"{name}_t").transpose(1, 2)
        if not self.quantized:
            return w
        scale = self.down_scale.float()
        down = w["down"].float() * scale if self.by_rows else (w["down"].float() * scale[:, None]).transpose(1, 2)
        out = {"down": down}  # [B, k, d]
        for name in ("up", "gate"):
            if name in w:
                out[name] = w[name].float() * w[f"{name}_scale"].float()[..., None]
        if "up_bias" in w:
            out["up_bias"] = w["up_bias"]
        return out

    def prepare(self) -> None:
        """The per-layer constants of the gathered rows: WINA norms, transposed gate/up, output buffers."""
        w, f = self.weights, self.dequantized()
        self.down_norm = f["down"].norm(dim=-1)  # [B, k]: ||down row i||, the WINA weight of a_i
        inputs = [f["up"]] + ([f["gate"]] if "gate" in f else [])
        self.in_norm = torch.stack([t.norm(dim=1) for t in inputs]).norm(dim=0)  # [B, d]: ||W[:, j]|| over gate/up
        if self.plan.input_keep < 1 and self.by_rows:
            # columns of gate/up as rows, so that skipping an input entry skips a contiguous row
            w["up_t"] = w.pop("up").transpose(1, 2).contiguous()  # [B, d, k]
            if "gate" in w:
                w["gate_t"] = w.pop("gate").transpose(1, 2).contiguous()
        (B, k), d = self.down_norm.shape, self.in_norm.shape[1]
        like = f["down"]
        self.scratch = {"out": like.new_empty(B, d), "up": like.new_empty(B, k), "gate": like.new_empty(B, k)}
        self.lib = native.load() if not self.quantized and native.usable(w["down"][0]) else None  # None: PyTorch

    def clear(self) -> None:
        super().clear()
        self.scratch.clear()
        self.source = None

    def sizes(self) -> tuple[int, int]:
        """(input entries read, down rows read) per token."""
        k, d = self.down_norm.shape[1], self.in_norm.shape[1]
        return keep_count(self.plan.input_keep, d), min(k, self.plan.down_rows or k)

    def nbytes(self) -> int:
        """Bytes one decode step reads for this layer, all sequences: kept columns of gate/up, chosen
        down rows (int8 without the rows operator: every row, masked)."""
        if self.quantized and not self.by_rows:
            return super().nbytes()
        d_in, m = self.sizes()
        total = 0
        for name, t in self.weights.items():
            if name in ("up_t", "gate_t"):
                total += t.nbytes * d_in // t.shape[1]
            elif name == "down":
                total += t.nbytes * m // t.shape[1]
            else:
                total += t.nbytes
        return total

    @staticmethod
    def planned_bytes(ffn, k: int, plan: Plan) -> int:
        """What `nbytes` counts for one sequence once k neurons of `ffn` are loaded under `plan`,
        without loading them (a batch's prefill reports it before the row joins)."""
        if isinstance(plan, ThresholdPlan):
            return ThresholdFFN.planned_bytes(ffn, k, plan)
        by_rows = not ffn.quantized or rows.reads_rows()
        d = ffn.up.shape[1]
        d_in, m = keep_count(plan.input_keep, d), min(k, plan.down_rows or k)
        total = 0
        for name, (t, axis) in ffn.neuron_tensors().items():
            per = t.nbytes // t.shape[axis] * k  # the k neurons' slices
            if by_rows and name in ("up", "gate") and d_in < d:
                per = per * d_in // d
            elif by_rows and name == "down":
                per = per * m // k
            total += per
        return total

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, d] with its small entries zeroed (all kept when input_keep is 1)."""
        d_in, _ = self.sizes()
        if d_in == x.shape[-1]:
            return x
        return x * top_mask(x.abs() * self.in_norm[:, None, :], d_in)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The oracle: x [B, T, d] -> [B, T, d] with masks over every gathered row (reads them all), in
        float math over the (dequantized) weights."""
        _, m = self.sizes()
        w, x = self.dequantized(), self._inputs(x)
        up = torch.bmm(x, w["up"].transpose(1, 2))  # [B, T, k]
        if "up_bias" in w:
            up = up + w["up_bias"][:, None, :]
        a = self.act(up) if "gate" not in w else self.act(torch.bmm(x, w["gate"].transpose(1, 2))) * up
        a = a * top_mask(a.abs() * self.down_norm[:, None, :], m)
        out = torch.bmm(a, w["down"])
        return out if self.down_bias is None else out + self.down_bias

    @staticmethod
    def _rows(lib, weight: torch.Tensor, rows: torch.Tensor, coef: torch.Tensor, out) -> torch.Tensor:
        """[n] = coef [m] @ weight[rows] for float weight [R, n]: in place with the native kernel, else
        through a gathered copy (into `out` unless it is None)."""
        if lib is not None:
            return native.rowsum(lib, weight, rows, coef, out)
        if out is None:
            return torch.mv(weight.index_select(0, rows).t(), coef)
        return torch.mv(weight.index_select(0, rows).t(), coef, out=out)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Decode steps (T = 1) read only the chosen rows; longer inputs (teacher-forced scoring) take
        the reference, which computes the same function. An eager float decode step returns a view of
        a reused buffer, valid until the next call."""
        if x.shape[1] != 1:
            return self.reference(x)
        if self.quantized:
            out = torch.stack([self._int8_token(x[b], b) for b in range(x.shape[0])])  # [B, 1, d]
        elif torch.compiler.is_compiling():  # no ctypes and no writes into reused buffers in a graph
            out = torch.stack([self._float_token(x[b, 0], b, None, {})[None] for b in range(x.shape[0])])
        else:
            for b in range(x.shape[0]):
                self._float_token(x[b, 0], b, self.lib, self.scratch)
            out = self.scratch["out"][:, None]  # [B, 1, d]
        return out if self.down_bias is None else out + self.down_bias

    def _float_token(self, xb: torch.Tensor, b: int, lib, buf: dict) -> torch.Tensor:
        """Sequence b's token xb [d] -> [d] (into buf["out"][b] where buf has it)."""
        w, (d_in, m) = self.weights, self.sizes()
        if "up_t" in w:
            cols = (xb.abs() * self.in_norm[b]).topk(d_in, sorted=False).indices  # [d_in]
            xs = xb[cols]
            up = self._rows(lib, w["up_t"][b], cols, xs, buf["up"][b] if buf else None)  # [k]
            gate = self._rows(lib, w["gate_t"][b], cols, xs, buf["gate"][b] if buf else None) if "gate_t" in w else None
        else:
            up = w["up"][b] @ xb
            gate = w["gate"][b] @ xb if "gate" in w else None
        if "up_bias" in w:
            up = up + w["up_bias"][b]
        a = self.act(up) if gate is None else self.act(gate) * up  # [k]
        chosen = (a.abs() * self.down_norm[b]).topk(m, sorted=False).indices  # [m]
        return self._rows(lib, w["down"][b], chosen, a[chosen], buf["out"][b] if buf else None)  # [m] @ [m, d]

    def _int8_token(self, xb: torch.Tensor, b: int) -> torch.Tensor:
        """Sequence b's token xb [1, d] -> [1, d] on int8 weights (see the class docstring)."""
        w, (d_in, m) = self.weights, self.sizes()
        if "up_t" in w:  # input sparsity, by rows: the kept entries' int8 columns of gate/up
            cols = (xb[0].abs() * self.in_norm[b]).topk(d_in, sorted=False).indices  # [d_in]
            xs = xb[:, cols]  # [1, d_in]
            up = rows.int8_rows(xs, w["up_t"][b], w["up_scale"][b], cols)  # [1, k]
            gate = rows.int8_rows(xs, w["gate_t"][b], w["gate_scale"][b], cols) if "gate_t" in w else None
        else:
            if d_in < xb.shape[1]:
                xb = xb * top_mask(xb.abs() * self.in_norm[b], d_in)
            up = int8_matmul(xb, w["up"][b], w["up_scale"][b])  # [1, k]
            gate = int8_matmul(xb, w["gate"][b], w["gate_scale"][b]) if "gate" in w else None
        if "up_bias" in w:
            up = up + w["up_bias"][b]
        a = self.act(up) if gate is None else self.act(gate) * up  # [1, k]
        k = a.shape[1]
        if not self.by_rows:  # the chosen rows as masked coefficients of down [d, k]
            return int8_matmul(a * top_mask(a.abs() * self.down_norm[b], m), w["down"][b], self.down_scale)
        if m == k:
            return rows.int8_rows(a, w["down"][b], self.down_scale, None)
        chosen = (a[0].abs() * self.down_norm[b]).topk(m, sorted=False).indices  # [m]
        return rows.int8_rows(a[:, chosen], w["down"][b], self.down_scale, chosen)  # [1, m] @ [m, d]


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
