"""The compacted FFN: each sequence's core rows of up, gate and down, decoded as small dense matmuls."""

import torch
import torch.nn as nn

from .models.common import FFN
from .quant import INT8_K_ALIGN, int8_matmul


class CompactFFN(nn.Module):
    """Core weights of one FFN layer, per sequence: up/gate/down [B, k, d], up bias [B, k].

    int8 FFNs keep the int8 kernel's layout: down [B, d, k] (core *columns*) and per-neuron scales
    [B, k] for up/gate. The buffers are allocated on the first load and reused by every later load of
    the same shape, so serving many prompts allocates nothing after warm-up. Not in the state dict.
    """

    def __init__(self):
        super().__init__()
        self.act = None
        self.up = self.gate = self.down = self.up_bias = self.down_bias = None
        self.up_scale = self.gate_scale = self.down_scale = None
        self.quantized = self.loaded = False

    def _gather(self, name: str, source: torch.Tensor | None, index: torch.Tensor, dim: int = 0):
        """Gather `index` [B, k] along `dim` of `source` into the reused buffer `name` [B, ...]."""
        if source is None:
            setattr(self, name, None)
            return
        shape = list(source.shape)
        shape[dim] = index.shape[1]
        shape = (index.shape[0], *shape)
        buf = getattr(self, name)
        if buf is None or buf.shape != shape or buf.dtype != source.dtype or buf.device != source.device:
            buf = torch.empty(shape, dtype=source.dtype, device=source.device)
            setattr(self, name, buf)
        for b in range(index.shape[0]):
            torch.index_select(source, dim, index[b], out=buf[b])

    @torch.inference_mode()
    def load(self, ffn: FFN, index: torch.Tensor) -> None:
        """Gather the neurons `index` [B, k] (one row of neuron ids per sequence) of `ffn`."""
        self.act, self.quantized, self.down_bias = ffn.act, ffn.quantized, ffn.down_bias
        k = index.shape[1]
        if ffn.quantized and k % INT8_K_ALIGN:
            # pad the core to the int8 kernel's block with repeats of its first neuron; their down
            # columns are zeroed below, so they add nothing
            pad = index[:, :1].expand(-1, INT8_K_ALIGN - k % INT8_K_ALIGN)
            index = torch.cat([index, pad], dim=1)
        self._gather("up", ffn.up, index)
        self._gather("gate", ffn.gate, index)
        self._gather("down", ffn.down, index, dim=1 if ffn.quantized else 0)
        self._gather("up_bias", ffn.up_bias, index)
        if ffn.quantized:
            self._gather("up_scale", ffn.up_scale, index)
            self._gather("gate_scale", getattr(ffn, "gate_scale", None), index)
            self.down_scale = ffn.down_scale
            self.down[:, :, k:] = 0  # [B, d, k_padded]: the padding neurons' columns
        self.loaded = True

    def clear(self) -> None:
        self.loaded = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, d] -> [B, T, d] through the k core neurons of each sequence."""
        if self.quantized:
            out = torch.stack([self._int8(x[b], b) for b in range(x.shape[0])])
        else:
            up = torch.bmm(x, self.up.transpose(1, 2))  # [B, T, k]
            if self.up_bias is not None:
                up = up + self.up_bias[:, None, :]
            a = self.act(up) if self.gate is None else self.act(torch.bmm(x, self.gate.transpose(1, 2))) * up
            out = torch.bmm(a, self.down)  # [B, T, k] @ [B, k, d]
        return out if self.down_bias is None else out + self.down_bias

    def _int8(self, x: torch.Tensor, b: int) -> torch.Tensor:
        """One sequence: x [T, d] -> [T, d]; the int8 kernel takes one weight matrix at a time."""
        up = int8_matmul(x, self.up[b], self.up_scale[b])  # [T, k]
        if self.up_bias is not None:
            up = up + self.up_bias[b]
        a = self.act(up) if self.gate is None else self.act(int8_matmul(x, self.gate[b], self.gate_scale[b])) * up
        return int8_matmul(a, self.down[b], self.down_scale)  # [T, k] x [d, k]^T
