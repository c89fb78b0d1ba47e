"""Per-token refinement by a calibrated threshold, in one native call a layer (kernels/sparse_ffn.cpp).

`ThresholdPlan(threshold, share)` decodes a compacted layer as `adaptive.Plan` does (gate/up over the
superset, down over the rows with the largest WINA score |a_i| * ||down_i||), but picks the rows whose
score reaches a per-layer threshold that `coreinfer calibrate` chose on calibration text, instead of a
fixed count by top-k: no sort, and the whole FFN of a token is one torch operator, which the compiled
step calls from its C++ wrapper. `share` is the calibrated mean share of the superset's down rows a token
keeps: what the byte count assumes (the rows read vary per token).

It runs on the quantized formats the op reads: int8 (quantize_) and the block formats of a GGUF (q8_0 or
q4 gate/up, q8_0 neuron-major down, or q4 under `--weights small`; FFN.adopt_). Float layers keep `adaptive.Plan` (profile.LayerBudget
picks). Teacher-forced scoring (T > 1) goes through the same op, 16 rows a call, so `eval ppl` scores
what decode computes.
"""

from dataclasses import dataclass

import torch

from ..kernels import sparse_ffn
from .compact import CompactFFN

FORMATS = ("int8", "q8_0", "q4")


@dataclass(frozen=True)
class ThresholdPlan:
    """Down rows with |a_i| * ||down_i|| >= threshold; `share` (0, 1]: their calibrated mean share."""

    threshold: float
    share: float

    def __post_init__(self):
        if self.threshold < 0 or not 0 < self.share <= 1:
            raise ValueError(f"a threshold plan needs threshold >= 0 and a share in (0, 1], got "
                             f"{self.threshold}, {self.share}")

    def build(self) -> "ThresholdFFN":
        return ThresholdFFN(self)


def neuron_rows(ffn) -> dict[str, dict[str, torch.Tensor]]:
    """The FFN's gate/up/down as the op's format tensors, every one neuron-major (a neuron one row):
    block formats as they are; int8 with float scales and down transposed to [F, d] (copies made once)."""
    if ffn.blocked:
        out = {name: ffn.role(name) for name in ("up", "gate", "down")}
        return {name: t for name, t in out.items() if t}
    out = {"up": {"q": ffn.up, "scale": ffn.up_scale.float()},
           "down": {"q": ffn.down.t().contiguous(), "scale": ffn.down_scale.float()}}  # [F, d], scale [d]
    if ffn.gated:
        out["gate"] = {"q": ffn.gate, "scale": ffn.gate_scale.float()}
    return out


def row_norms(down: dict[str, torch.Tensor]) -> torch.Tensor:
    """||down_i|| [F] of the dequantized neuron-major down."""
    return sparse_ffn.dequantize(down, down=True).norm(dim=1).contiguous()


class ThresholdFFN(CompactFFN):
    """A compacted layer decoded by `ThresholdPlan`: weights per sequence ([B] lists of format tensors),
    or, when the superset is the whole FFN (keep 1, as calibrated profiles choose), one shared set read
    in place for every sequence of the batch."""

    def __init__(self, plan: ThresholdPlan):
        super().__init__()
        self.plan = plan
        self.source = None  # (ffn, its neuron-major tensors, row norms): made once per layer
        self.seqs: list[tuple[dict, torch.Tensor]] = []  # per sequence: (tensors, norms) of its superset
        self.shared = False  # every sequence reads the whole FFN
        self.act_name = None
        self.up_bias = None  # [B] list, or one [F] when shared

    @torch.inference_mode()
    def load(self, ffn, index: torch.Tensor) -> None:
        if ffn.format not in FORMATS:
            raise NotImplementedError(f"threshold refinement runs on {FORMATS} weights, not {ffn.format}")
        if self.source is None or self.source[0] is not ffn:
            tensors = neuron_rows(ffn)
            self.source = (ffn, tensors, row_norms(tensors["down"]))
        _, tensors, norms = self.source
        self.act_name, self.down_bias, self.quantized = ffn.act_name, ffn.down_bias, True
        whole = index.shape[1] == ffn.width and bool((index == torch.arange(ffn.width)).all())
        bias = None if ffn.up_bias is None else ffn.up_bias.float()
        self.shared = whole
        if whole:
            self.seqs, self.up_bias = [(tensors, norms)], bias
            return
        self.seqs = [({name: {k: (v if name == "down" and k == "scale" else v.index_select(0, ids))
                              for k, v in t.items()} for name, t in tensors.items()}, norms[ids].contiguous())
                     for ids in index]
        self.up_bias = None if bias is None else [bias[ids] for ids in index]

    @property
    def loaded(self) -> bool:
        return bool(self.seqs)

    def clear(self) -> None:
        super().clear()
        self.seqs, self.source = [], None

    def nbytes(self) -> int:
        """Bytes one decode step reads: gate/up of each superset, `share` of its down rows (one set when
        every sequence shares the whole FFN, as adaptive.AdaptiveFFN counts it)."""
        total = 0
        for tensors, _ in self.seqs:
            for name, t in tensors.items():
                part = sum(v.nbytes for k, v in t.items() if not (name == "down" and k == "scale"))
                total += int(part * self.plan.share) if name == "down" else part
        return total

    @staticmethod
    def planned_bytes(ffn, k: int, plan: ThresholdPlan) -> int:
        """What `nbytes` counts for one sequence once k neurons of `ffn` are loaded, without loading them
        (the continuous batch's prefill reports it): the k neurons' slices, down's at `share`."""
        total = 0
        for name, (t, axis) in ffn.neuron_tensors().items():
            per = t.nbytes // t.shape[axis] * k
            total += int(per * plan.share) if name.startswith("down") else per
        return total

    def _ffn(self, x: torch.Tensor, b: int) -> torch.Tensor:
        """Rows x [N, d] of sequence b (the shared weights when b is None) -> [N, d]."""
        tensors, norms = self.seqs[0 if b is None else b]
        bias = self.up_bias if b is None or self.up_bias is None else self.up_bias[b]
        parts = [sparse_ffn.sparse_ffn(x[i:i + sparse_ffn.MAX_M], tensors.get("gate"), tensors["up"], tensors["down"],
                                       norms, self.plan.threshold, self.act_name, bias)[0]
                 for i in range(0, x.shape[0], sparse_ffn.MAX_M)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, d] -> [B, T, d]; every row of x picks its own down rows."""
        B, T, d = x.shape
        if self.shared:
            out = self._ffn(x.reshape(B * T, d), None).view(B, T, d).to(x.dtype)
        else:
            out = torch.stack([self._ffn(x[b], b) for b in range(B)]).to(x.dtype)
        return out if self.down_bias is None else out + self.down_bias
