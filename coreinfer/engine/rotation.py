"""Rotated input sparsity (LaRoSA, ICML 2025): top-k on the FFN input in a per-layer rotated basis.

Input sparsity skips a column of gate and up per dropped entry of the FFN input x. In the model's own
basis the entries' mass is spread out and dropping any costs quality (docs/quality.md: keeping 0.7
of the entries costs 5 points of agreement on SmolLM2). An orthogonal Q [d, d] of the calibration
inputs' principal directions (`fit_rotation`) concentrates it: z = x Q, and since Q Q^T = I,
x W^T = z (W Q)^T, so gate and up are folded once, W' = W Q, and each token keeps only the
`input_keep` share of z's entries with the largest |z_j| * ||W'[:, j]|| (a column of W' per dropped
entry is never read). down can read only its top `down` share of rows by |a_i| * ||down_i|| (WINA).

The per-token rotation reads Q, d * d values: that cost counts in the bytes. (LaRoSA folds Q into the
previous layer's output and the residual stream, which this model-agnostic engine does not.)
"""

from dataclasses import dataclass

import torch

from .adaptive import top_mask
from .compact import CompactFFN
from .selection import keep_count


@torch.inference_mode()
def fit_rotation(x: torch.Tensor) -> torch.Tensor:
    """Orthogonal Q [d, d] whose columns are the principal directions of inputs x [N, d] (uncentred,
    largest second moment first)."""
    x = x.double()
    _, vecs = torch.linalg.eigh(x.T @ x)  # ascending eigenvalues
    return vecs.flip(1).to(torch.float32).contiguous()


@dataclass(eq=False)
class RotatePlan:
    """How a layer decodes: its rotation q [d, d], the share of rotated entries gate/up read, and the
    share of the FFN width in down rows (None: all of the superset). Compared by identity."""

    q: torch.Tensor
    input_keep: float = 1.0
    down: float | None = None

    def __post_init__(self):
        if not 0 < self.input_keep <= 1 or (self.down is not None and not 0 < self.down <= 1):
            raise ValueError(f"input keep and down are shares in (0, 1], got {self.input_keep}, {self.down}")

    def build(self) -> "RotatedFFN":
        return RotatedFFN(self)


class RotatedFFN(CompactFFN):
    """A compacted layer with gate and up folded into the rotated basis: up/gate [B, k, d] hold W Q."""

    def __init__(self, plan: RotatePlan):
        super().__init__()
        self.plan = plan
        self.q: torch.Tensor | None = None  # [d, d]
        self.col_norm = self.down_norm = None  # [B, d]: ||W'[:, j]|| over gate and up; [B, k]
        self.width = 0

    @torch.inference_mode()
    def load(self, ffn, index: torch.Tensor) -> None:
        if ffn.quantized:
            raise NotImplementedError("rotated input sparsity runs on float weights; use --weights dense")
        super().load(ffn, index)
        w, self.width = self.weights, ffn.width
        self.q = self.plan.q.to(w["up"])
        for name in ("up", "gate"):
            if name in w:
                w[name] = w[name] @ self.q  # [B, k, d] @ [d, d]: the fold
        self.col_norm = torch.stack([w[n].norm(dim=1) for n in ("up", "gate") if n in w]).norm(dim=0)  # [B, d]
        self.down_norm = w["down"].norm(dim=-1)

    def sizes(self) -> tuple[int, int]:
        """(rotated input entries, down rows) one token reads."""
        d, k = self.q.shape[0], self.weights["down"].shape[1]
        return keep_count(self.plan.input_keep, d), min(k, keep_count(self.plan.down, self.width)) \
            if self.plan.down is not None else k

    def nbytes(self) -> int:
        """Bytes one decode step reads for this layer, all sequences: Q, the kept columns of the folded
        gate/up, the chosen down rows."""
        d_in, m = self.sizes()
        w, B = self.weights, self.weights["down"].shape[0]
        inputs = sum(w[n].nbytes for n in ("up", "gate") if n in w) * d_in // self.q.shape[0]
        bias = w["up_bias"].nbytes if "up_bias" in w else 0
        return B * self.q.nbytes + inputs + w["down"].nbytes * m // w["down"].shape[1] + bias

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, d] -> [B, T, d], masks over every entry and row."""
        w, (d_in, m) = self.weights, self.sizes()
        z = x @ self.q  # [B, T, d], the rotated input
        z = z * top_mask(z.abs() * self.col_norm[:, None, :], d_in)
        up = torch.bmm(z, w["up"].transpose(1, 2))
        if "up_bias" in w:
            up = up + w["up_bias"][:, None, :]
        a = self.act(up) if "gate" not in w else self.act(torch.bmm(z, w["gate"].transpose(1, 2))) * up
        a = a * top_mask(a.abs() * self.down_norm[:, None, :], m)
        out = torch.bmm(a, w["down"])
        return out if self.down_bias is None else out + self.down_bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """A decode step (T = 1) reads the kept columns and rows only; longer inputs take the reference."""
        if x.shape[1] != 1:
            return self.reference(x)
        w, (d_in, m) = self.weights, self.sizes()
        out = []
        for b in range(x.shape[0]):
            z = x[b, 0] @ self.q  # [d]
            cols = (z.abs() * self.col_norm[b]).topk(d_in, sorted=False).indices  # [d_in]
            zs = z[cols]
            up = w["up"][b].index_select(1, cols) @ zs  # [k]
            if "up_bias" in w:
                up = up + w["up_bias"][b]
            a = self.act(up) if "gate" not in w else self.act(w["gate"][b].index_select(1, cols) @ zs) * up
            rows = (a.abs() * self.down_norm[b]).topk(m, sorted=False).indices  # [m]
            out.append(a[rows] @ w["down"][b].index_select(0, rows))
        y = torch.stack(out)[:, None]  # [B, 1, d]
        return y if self.down_bias is None else y + self.down_bias
