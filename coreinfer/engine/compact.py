"""Compacted FFNs: each sequence's core neurons of a layer, gathered into small dense matrices.

A neuron is one slice of each of the FFN's per-neuron tensors (`FFN.neuron_tensors`): a row of up
and gate, a row of down in float ([F, d]) or a column in int8 ([d, F], the kernel's layout). int4 up
and gate are gathered as columns of their `_src` copies, then packed into the int4 kernel's layout
(int4.py). Block formats (q8_0/q4 up and gate, q8_0/q4 neuron-major down; FFN.adopt_) are all rows:
compaction is row gathers of every tensor, with no padding, and the core runs through the formats'
own matmuls (formats/).
"""

import numpy as np
import torch

from ..formats import FORMATS
from . import int4, native
from .quant import INT8_K_ALIGN, int8_matmul


class CompactFFN:
    """Core weights of one FFN layer, per sequence: up/gate/down [B, k, d] (int8 down [B, d, k]),
    up bias and int8 scales [B, k]; int4 up/gate packed [B, k, d/2], their scales and zeros
    [B, d/G, k, 2].

    The buffers are allocated on the first load and reused by every later load of the same shape, so
    serving many prompts allocates nothing after warm-up; `clear` frees them.
    """

    plan = None  # how the layer decodes: None for this plain module (see CoreWeights.load)

    def __init__(self):
        self.act = self.down_bias = self.down_scale = None
        self.weights: dict[str, torch.Tensor] = {}
        self.gathered: dict[str, torch.Tensor] = {}  # int4 up/gate columns [B, d/2, k] on their way to `weights`
        self.quantized = self.int4 = False
        self.blocked = None  # the block format of up/gate (q8_0 or q4) when the FFN holds one, else None
        self.down_format = None  # and of its neuron-major down

    def _buffer(self, store: dict, name: str, shape: tuple, like: torch.Tensor) -> torch.Tensor:
        """store[name], reused when it has this shape, dtype and device, else allocated."""
        buf = store.get(name)
        if buf is None or buf.shape != shape or buf.dtype != like.dtype or buf.device != like.device:
            store.pop(name, None)  # drop the old buffer before allocating its successor
            buf = store[name] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return buf

    def _gather(self, name: str, source: torch.Tensor, axis: int, index: torch.Tensor) -> None:
        """Gather `index` [B, k] along `axis` of `source` into the reused buffer `name` [B, ...]."""
        shape = list(source.shape)
        shape[axis] = index.shape[1]
        store = self.gathered if name.endswith("_src") else self.weights
        buf = self._buffer(store, name, (index.shape[0], *shape), source)
        lib = native.load() if axis == 1 and source.device.type == "cpu" else None
        for b in range(index.shape[0]):
            if lib is not None and source.dtype == torch.int8 and source.stride(1) == 1:
                # int8 down's neurons are columns: torch gathers them byte by byte (13 ms a layer on
                # SmolLM2's [576, 1536]), numpy's take 0.7 ms, the native loop (native.py) faster
                native.take_columns(lib, source, index[b], buf[b])
            elif axis == 1 and source.device.type == "cpu" and source.dtype != torch.bfloat16:  # numpy lacks bf16
                np.take(source.numpy(), index[b].numpy(), axis=1, out=buf[b].numpy())
            else:
                torch.index_select(source, axis, index[b], out=buf[b])

    @torch.inference_mode()
    def load(self, ffn, index: torch.Tensor) -> None:
        """Gather the neurons `index` [B, k] (one row of neuron ids per sequence) of `ffn`."""
        self.act, self.quantized, self.down_bias = ffn.act, ffn.quantized, ffn.down_bias
        self.int4 = ffn.format == "int4"
        self.blocked = ffn.format if ffn.blocked else None
        self.down_format = ffn.down_format if ffn.blocked else None
        self.down_scale = getattr(ffn, "down_scale", None)
        k = index.shape[1]
        align = int4.BLOCK_N if self.int4 else INT8_K_ALIGN
        if ffn.quantized and not ffn.blocked and k % align:
            # pad the core to the kernel's block (int8 down's K; int4's packed blocks) with repeats of
            # its first neuron; their down columns are zeroed below, so they add nothing
            pad = index[:, :1].expand(-1, align - k % align)
            index = torch.cat([index, pad], dim=1)
        tensors = ffn.neuron_tensors()
        packed = {name.removesuffix("_src") for name in tensors if name.endswith("_src")}  # int4 up/gate
        for name in set(self.weights) - set(tensors) - packed:
            del self.weights[name]
        for name in set(self.gathered) - set(tensors):
            del self.gathered[name]
        for name, (source, axis) in tensors.items():
            self._gather(name, source, axis, index)
        for name in packed:
            src = self.gathered[f"{name}_src"]  # [B, d/2, k]
            out = self._buffer(self.weights, name, (src.shape[0], src.shape[2], src.shape[1]), src.view(torch.uint8))
            for b in range(src.shape[0]):
                int4.pack_core(src[b], out[b])  # [k, d/2]
        if ffn.quantized and not ffn.blocked:
            self.weights["down"][:, :, k:] = 0  # [B, d, k_padded]: the padding neurons' columns

    @property
    def loaded(self) -> bool:
        return bool(self.weights)

    def clear(self) -> None:
        """Free the gathered weights."""
        self.weights.clear()
        self.gathered.clear()

    def nbytes(self) -> int:
        """Bytes of the gathered weights: what one decode step reads for this layer's neurons, all sequences."""
        return sum(t.nbytes for t in self.weights.values())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, d] -> [B, T, d] through the k core neurons of each sequence."""
        w = self.weights
        if self.blocked:
            out = torch.stack([self._blocked(x[b], b) for b in range(x.shape[0])])
        elif self.quantized:
            out = torch.stack([self._int8(x[b], b) for b in range(x.shape[0])])
        else:
            up = torch.bmm(x, w["up"].transpose(1, 2))  # [B, T, k]
            if "up_bias" in w:
                up = up + w["up_bias"][:, None, :]
            a = self.act(up) if "gate" not in w else self.act(torch.bmm(x, w["gate"].transpose(1, 2))) * up
            out = torch.bmm(a, w["down"])  # [B, T, k] @ [B, k, d]
        return out if self.down_bias is None else out + self.down_bias

    def _role(self, name: str, b: int) -> dict[str, torch.Tensor]:
        """Sequence b's gathered format tensors of up, gate or down: {qs, d[, m]} [k, ...]."""
        prefix = f"{name}_"
        return {key[len(prefix):]: t[b] for key, t in self.weights.items() if key.startswith(prefix) and key != "up_bias"}

    def _blocked(self, x: torch.Tensor, b: int) -> torch.Tensor:
        """One sequence on block-format weights: x [T, d] -> [T, d]."""
        fmt = FORMATS[self.blocked]
        up = fmt.matmul(x, self._role("up", b))  # [T, k]
        if "up_bias" in self.weights:
            up = up + self.weights["up_bias"][b]
        gate = self._role("gate", b)
        a = self.act(fmt.matmul(x, gate)) * up if gate else self.act(up)
        return FORMATS[self.down_format].rows_matmul(a, self._role("down", b))  # [T, k] @ [k, d]

    def _int8(self, x: torch.Tensor, b: int) -> torch.Tensor:
        """One sequence: x [T, d] -> [T, d]; the int8 and int4 kernels take one weight matrix at a time."""
        w = self.weights
        up = self._rows(x, "up", b)  # [T, k]
        if "up_bias" in w:
            up = up + w["up_bias"][b]
        a = self.act(up) if "gate" not in w else self.act(self._rows(x, "gate", b)) * up
        return int8_matmul(a, w["down"][b], self.down_scale)  # [T, k] x [d, k]^T

    def _rows(self, x: torch.Tensor, name: str, b: int) -> torch.Tensor:
        """x [T, d] @ W.T -> [T, k] for sequence b's quantized up or gate."""
        w = self.weights
        if self.int4:
            return int4.int4_matmul(x, w[name][b], w[f"{name}_sz"][b])
        return int8_matmul(x, w[name][b], w[f"{name}_scale"][b])


class CoreWeights:
    """The compacted FFNs of a model, keyed by layer id; reused across sessions (see CompactFFN)."""

    def __init__(self):
        self.layers: dict[int, CompactFFN] = {}

    def load(self, ffns: list, index: dict[int, torch.Tensor], plans: dict | None = None) -> None:
        """Compact ffns[l] to index[l] [B, k] for each l in `index`; free every other layer's. `plans`
        maps a layer to how it decodes (an object with `build()` -> a CompactFFN subclass, such as
        adaptive.Plan); other layers get a plain CompactFFN."""
        plans = plans or {}
        for layer in set(self.layers) - set(index):
            self.layers.pop(layer).clear()
        for layer, ids in index.items():
            plan, core = plans.get(layer), self.layers.get(layer)
            if core is None or core.plan != plan:
                if core is not None:
                    core.clear()
                core = self.layers[layer] = CompactFFN() if plan is None else plan.build()
            core.load(ffns[layer], ids)

    def clear(self) -> None:
        for core in self.layers.values():
            core.clear()
        self.layers.clear()

    def get(self, layer: int) -> CompactFFN | None:
        return self.layers.get(layer)

    def step_bytes(self, ffns: list, dense_bytes: int) -> int:
        """Weight bytes one decode step of the whole batch reads: `dense_bytes` (the dense model's step),
        with each compacted layer's neurons counted as its gathered weights (every sequence reads its own
        core rows)."""
        return dense_bytes - sum(ffns[l].neuron_bytes() - c.nbytes() for l, c in self.layers.items())
