"""Predicted per-token sparsity of the whole FFN: a cheap scorer picks each token's neurons *before*
gate and up run, so gate, up and down all read only the predicted rows (Deja Vu / ShadowLLM style).

Fidelity note: the quant scorer's copy is held dequantized (float) and its *packed* size is what the
bytes count; a kernel that reads packed bits is the fast-path's to write.

Per decoded token and sparse layer:
1. a scorer (`PredictPlan.scorer`) ranks the superset's neurons:
   - "quant": a `bits`-bit copy of gate and up (1-4 bits a weight, one scale per row;
     `fit_quantized`), score |act(g~) * u~| * ||down_i||; it reads 2 F d bits / 8 bytes and the scales;
   - "lowrank": a data-aware low-rank copy of gate and up (`fit_lowrank`: the top-r right singular
     vectors of the calibration tokens' gate and up outputs), score |act(g~) * u~| * ||down_i||;
     it reads its own factors, 2 r (d + F) values;
   - "gate": gate in full, score |act(g)| * ||down_i|| (CATS-like); it reads all gate rows, and the
     predicted rows then read only up;
   - "trained": a small MLP trained on calibration tokens against the oracle's top set
     (engine/trained.py), score its logits; it reads its own net, h (d + F) + h + F values;
   - "oracle": the exact |a_i| * ||down_i||, the bound no predictor can beat; its scoring is free in
     the byte count, which makes it the frontier's reference, not a policy to decode with.
2. gate and up run over the top `keep` share (of the FFN width) of those scores;
3. down reads the `down` share of rows inside that set with the largest |a_i| * ||down_i|| (WINA).

`PredictedFFN.reference` computes the function with masks over all rows (teacher-forced scoring, the
oracle of the tests); a decode step (T = 1) gathers only the chosen rows. Bytes count as read: the
scorer's own, the predicted gate/up rows, the refined down rows.
"""

from dataclasses import dataclass, field

import torch

from .adaptive import top_mask
from .compact import CompactFFN
from .selection import keep_count

SCORERS = ("quant", "lowrank", "trained", "gate", "oracle")
# Uniform midrise quantizer steps for a unit Gaussian at 1-4 bits (Max, 1960): w ~ (floor(w / s) + 1/2) s
GAUSS_STEP = {1: 1.596, 2: 0.996, 3: 0.586, 4: 0.335}


@torch.inference_mode()
def fit_quantized(ffn, bits: int) -> dict[str, torch.Tensor]:
    """`bits`-bit copies of gate and up, each row on its own Gaussian step (std * GAUSS_STEP[bits]),
    stored dequantized -> {"gate_q"/"up_q": [F, d]}. A token's cost is the packed size (`PredictedFFN.nbytes`)."""
    if bits not in GAUSS_STEP:
        raise ValueError(f"a quantized scorer takes 1-4 bits a weight, got {bits}")
    out, top = {}, 2 ** (bits - 1)
    for name, w in (("gate", ffn.gate), ("up", ffn.up)):
        if w is None:
            continue
        step = w.float().std(dim=1, keepdim=True) * GAUSS_STEP[bits]  # [F, 1]
        q = (w.float() / step).floor().clamp(-top, top - 1)
        out[f"{name}_q"] = ((q + 0.5) * step).to(w.dtype)
    return out


@torch.inference_mode()
def fit_lowrank(ffn, x: torch.Tensor, rank: int) -> dict[str, torch.Tensor]:
    """Data-aware rank-`rank` factors of gate and up from calibration inputs x [N, d]:
    W^T ~ (W^T V) V^T with V [F, r] the top right singular vectors of x W^T, the best rank-r fit of
    the outputs on these tokens. -> {"gate_a"/"up_a": [d, r], "gate_b"/"up_b": [r, F]}."""
    out = {}
    for name, w in (("gate", ffn.gate), ("up", ffn.up)):
        if w is None:
            continue
        vh = torch.linalg.svd(x.float() @ w.float().T, full_matrices=False).Vh[:rank]  # [r, F]
        out[f"{name}_a"], out[f"{name}_b"] = (w.float().T @ vh.T).to(w.dtype), vh.to(w.dtype).contiguous()
    return out


@dataclass(eq=False)
class PredictPlan:
    """How a layer decodes: the scorer, its factors (lowrank; over the whole FFN width), the share of
    the FFN width gate/up read per token (`keep`) and the share of down rows (`down`, <= keep).
    Plans compare by identity, so a session reuses a layer's buffers while its policy is the same."""

    scorer: str
    keep: float
    down: float | None = None
    factors: dict[str, torch.Tensor] = field(default_factory=dict)
    bits: int = 0  # of the quant scorer's weights

    def __post_init__(self):
        if self.scorer not in SCORERS:
            raise ValueError(f"scorer must be one of {SCORERS}, got {self.scorer!r}")
        if not 0 < self.keep <= 1 or (self.down is not None and not 0 < self.down <= 1):
            raise ValueError(f"keep and down are shares of the FFN width in (0, 1], got {self.keep}, {self.down}")
        if self.scorer in ("lowrank", "quant", "trained") and not self.factors:
            fit = {"quant": "fit_quantized", "lowrank": "fit_lowrank", "trained": "trained.train_predictor"}
            raise ValueError(f"a {self.scorer} scorer needs its factors ({fit[self.scorer]})")
        if self.scorer == "quant" and self.bits not in GAUSS_STEP:
            raise ValueError(f"a quant scorer takes 1-4 bits a weight, got {self.bits}")

    def build(self) -> "PredictedFFN":
        return PredictedFFN(self)


class PredictedFFN(CompactFFN):
    """A compacted layer (the superset's rows, per sequence) whose tokens read predicted rows only."""

    def __init__(self, plan: PredictPlan):
        super().__init__()
        self.plan = plan
        self.down_norm: torch.Tensor | None = None  # [B, k]
        self.width = 0  # F of the loaded FFN
        self.scorer: dict[str, torch.Tensor] = {}  # factors over the superset: *_a shared, *_b [B, ..., k]

    @torch.inference_mode()
    def load(self, ffn, index: torch.Tensor) -> None:
        if ffn.quantized:
            raise NotImplementedError("predicted sparsity runs on float weights; use --weights dense")
        super().load(ffn, index)
        self.width = ffn.width
        self.down_norm = self.weights["down"].norm(dim=-1)
        # per sequence, the superset's part: *_b along the neuron (last) dim [B, r, k] or [B, k], quant rows [B, k, d]
        self.scorer = {name: (t if name.endswith("_a") else
                              torch.stack([t[ids] if name.endswith("_q") else t[..., ids] for ids in index]))
                       for name, t in self.plan.factors.items()}

    def sizes(self) -> tuple[int, int]:
        """(gate/up rows, down rows) one token reads, out of the superset's k."""
        k, F = self.weights["down"].shape[1], self.width  # shares are of the FFN width F, read from k
        rows = min(k, keep_count(self.plan.keep, F))
        return rows, min(rows, keep_count(self.plan.down, F)) if self.plan.down is not None else rows

    def nbytes(self) -> int:
        """Bytes one decode step reads for this layer, all sequences (see the module docstring)."""
        w, (rows, m) = self.weights, self.sizes()
        B, k, d = w["down"].shape
        row = d * w["down"].element_size()
        scorer = sum(t.nbytes for name, t in self.scorer.items() if name.endswith("_b"))
        scorer += B * sum(t.nbytes for name, t in self.scorer.items() if name.endswith("_a"))
        # quant: the packed bits and one fp32 scale per row
        scorer += sum(t.numel() * self.plan.bits // 8 + t.shape[1] * 4 for n, t in self.scorer.items() if n.endswith("_q"))
        gated = "gate" in w
        if self.plan.scorer == "gate":
            scorer, inputs = B * k * row, B * rows * row
        else:
            inputs = B * rows * row * (2 if gated else 1)
        bias = w["up_bias"].nbytes * rows // k if "up_bias" in w else 0
        return scorer + inputs + B * m * row + bias

    def _score(self, x: torch.Tensor, b: int | None = None) -> torch.Tensor:
        """Per-token neuron scores [B, T, k] from x [B, T, d]; with `b`, x [1, T, d] is sequence b's."""
        seq = slice(None) if b is None else slice(b, b + 1)
        w, s, kind = self.weights, self.scorer, self.plan.scorer
        if kind == "oracle" or (kind == "gate" and "gate" not in w):
            return self._activations(x, seq).abs() * self.down_norm[seq, None, :]
        if kind == "gate":
            return self.act(torch.bmm(x, w["gate"][seq].transpose(1, 2))).abs() * self.down_norm[seq, None, :]
        if kind == "trained":
            hidden = torch.relu(x @ s["net_a"] + s["shift_a"])  # [B, T, h]
            return torch.bmm(hidden, s["net_b"][seq]) + s["prior_b"][seq, None, :]  # [B, T, k]
        approx = {name: torch.bmm(x, s[f"{name}_q"][seq].transpose(1, 2)) if kind == "quant"
                  else torch.bmm(x @ s[f"{name}_a"], s[f"{name}_b"][seq])
                  for name in ("up", "gate") if f"{name}_q" in s or f"{name}_a" in s}  # [B, T, k] each
        up = approx["up"] + w["up_bias"][seq, None, :] if "up_bias" in w else approx["up"]
        a = self.act(up) if "gate" not in approx else self.act(approx["gate"]) * up
        return a.abs() * self.down_norm[seq, None, :]

    def _activations(self, x: torch.Tensor, seq: slice = slice(None)) -> torch.Tensor:
        """Exact a [B, T, k] over the superset (of the sequences `seq`)."""
        w = self.weights
        up = torch.bmm(x, w["up"][seq].transpose(1, 2))
        if "up_bias" in w:
            up = up + w["up_bias"][seq, None, :]
        return self.act(up) if "gate" not in w else self.act(torch.bmm(x, w["gate"][seq].transpose(1, 2))) * up

    def chosen(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted mask, down mask) [B, T, k] for x [B, T, d]; the down mask lies inside the first."""
        rows, m = self.sizes()
        predicted = top_mask(self._score(x), rows)
        a = self._activations(x) * predicted
        return predicted, top_mask(a.abs() * self.down_norm[:, None, :], m) & predicted

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, d] -> [B, T, d] with masks over every superset row (computes them all)."""
        _, down = self.chosen(x)
        out = torch.bmm(self._activations(x) * down, self.weights["down"])
        return out if self.down_bias is None else out + self.down_bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """A decode step (T = 1) reads the predicted rows only; longer inputs take the reference."""
        if x.shape[1] != 1:
            return self.reference(x)
        w, (rows, m) = self.weights, self.sizes()
        out = []
        for b in range(x.shape[0]):
            ids = self._score(x[b:b + 1], b)[0, 0].topk(rows, sorted=False).indices  # [rows]
            xb = x[b, 0]  # [d]
            up = w["up"][b].index_select(0, ids) @ xb
            if "up_bias" in w:
                up = up + w["up_bias"][b, ids]
            a = self.act(up) if "gate" not in w else self.act(w["gate"][b].index_select(0, ids) @ xb) * up  # [rows]
            keep = (a.abs() * self.down_norm[b, ids]).topk(m, sorted=False).indices  # [m]
            out.append(a[keep] @ w["down"][b].index_select(0, ids[keep]))  # [m] @ [m, d]
        y = torch.stack(out)[:, None]  # [B, 1, d]
        return y if self.down_bias is None else y + self.down_bias


@torch.inference_mode()
def predictor_quality(ffn, x: torch.Tensor, plan: PredictPlan) -> dict[str, float]:
    """How well `plan`'s scorer finds each token's oracle top set on inputs x [N, d] of `ffn` (the
    whole FFN as superset): recall of the oracle's top-`keep` set, and the share of sum |a_i| *
    ||down_i|| the predicted set covers (the oracle's own share beside it)."""
    core = plan.build()
    core.load(ffn, torch.arange(ffn.width)[None])
    xs = x[None]  # [1, N, d]
    rows, _ = core.sizes()
    truth = core._activations(xs).abs() * core.down_norm[:, None, :]  # [1, N, F]
    oracle, predicted = top_mask(truth, rows), top_mask(core._score(xs), rows)
    total = truth.sum(-1)
    core.clear()
    return {"recall": float((oracle & predicted).sum() / oracle.sum()),
            "mass": float(((truth * predicted).sum(-1) / total).mean()),
            "oracle_mass": float(((truth * oracle).sum(-1) / total).mean())}
