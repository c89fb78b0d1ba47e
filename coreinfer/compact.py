"""The compacted FFN: each sequence's core rows of up, gate and down, decoded as small dense matmuls."""

import torch
import torch.nn as nn

from .models.common import FFN


class CompactFFN(nn.Module):
    """Core weights of one FFN layer, per sequence: up/gate/down [B, k, d], up bias [B, k].

    The buffers are allocated on the first load and reused by every later load of the same shape, so
    serving many prompts allocates nothing after warm-up. They are not part of the state dict.
    """

    def __init__(self):
        super().__init__()
        self.act = None
        self.up = self.gate = self.down = self.up_bias = self.down_bias = None
        self.loaded = False

    def _buffer(self, old: torch.Tensor | None, shape, like: torch.Tensor) -> torch.Tensor:
        if old is not None and old.shape == shape and old.dtype == like.dtype and old.device == like.device:
            return old
        return torch.empty(shape, dtype=like.dtype, device=like.device)

    @torch.inference_mode()
    def load(self, ffn: FFN, index: torch.Tensor) -> None:
        """Gather the rows `index` [B, k] (neuron ids, one row of ids per sequence) of `ffn`."""
        B, k = index.shape
        d = ffn.up.shape[1]
        self.act = ffn.act
        self.up = self._buffer(self.up, (B, k, d), ffn.up)
        self.down = self._buffer(self.down, (B, k, d), ffn.down)
        self.gate = self._buffer(self.gate, (B, k, d), ffn.gate) if ffn.gated else None
        self.up_bias = self._buffer(self.up_bias, (B, k), ffn.up_bias) if ffn.up_bias is not None else None
        self.down_bias = ffn.down_bias
        for b in range(B):
            torch.index_select(ffn.up, 0, index[b], out=self.up[b])
            torch.index_select(ffn.down, 0, index[b], out=self.down[b])
            if self.gate is not None:
                torch.index_select(ffn.gate, 0, index[b], out=self.gate[b])
            if self.up_bias is not None:
                torch.index_select(ffn.up_bias, 0, index[b], out=self.up_bias[b])
        self.loaded = True

    def clear(self) -> None:
        self.loaded = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, d] -> [B, T, d] through the k core neurons of each sequence."""
        up = torch.bmm(x, self.up.transpose(1, 2))  # [B, T, k]
        if self.up_bias is not None:
            up = up + self.up_bias[:, None, :]
        a = self.act(up) if self.gate is None else self.act(torch.bmm(x, self.gate.transpose(1, 2))) * up
        out = torch.bmm(a, self.down)  # [B, T, k] @ [B, k, d]
        return out if self.down_bias is None else out + self.down_bias
