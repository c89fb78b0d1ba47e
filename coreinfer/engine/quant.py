"""Weight-only int8: per-output-channel symmetric int8 weights, bf16 activations into the kernel.

Why: batch-1 decode is a chain of GEMVs bound by weight bytes. On CPU, PyTorch's int8 weight kernel
(`_weight_int8pack_mm`) reads a quarter of fp32's bytes and runs ~4x faster, while bf16 `linear` is
slower than fp32. The residual stream stays in the compute dtype; only the matmul inputs are cast.
"""

import torch
import torch.nn as nn

from . import gemv, int8_gpu

# int4: group-wise, CPU only (int4.py). auto: each tensor in the block format its file holds (q4 or
# q8_0, formats/), q8_0: q8_0 throughout; both are adopted while loading (models/adopt.py), not here.
WEIGHT_FORMATS = ("dense", "int8", "int4", "auto", "small", "q8_0")
LOAD_FORMATS = ("auto", "small", "q8_0")
# The CPU int8 kernel reads K (the inner width) in blocks of 16: other widths crash it or return garbage
# (seen with torch 2.13), so they take the dequantized path and compaction pads cores to a multiple.
INT8_K_ALIGN = 16


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (int8 [N, K], scale [N]) with w ≈ q * scale[:, None]; one scale per output row."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
    return q, scale


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ (q [N, K] * scale[:, None]).T -> [..., N] in x's dtype. Decode-sized x on a VNNI CPU
    is quantized to int8 per block of 32 on the way (gemv.py, ~2x faster; ~0.5% relative error
    against the float product, twice bf16's): prefill keeps bf16 activations."""
    flat = x.reshape(-1, x.shape[-1])  # [M, K]
    if gemv.fits(flat, q, scale):  # decode on the CPU: int8 activations, VNNI dots (gemv.py)
        out = torch.ops.coreinfer.int8_gemv(flat, q, scale)
    elif flat.device.type == "cpu" and flat.shape[-1] % INT8_K_ALIGN == 0:
        out = torch.ops.aten._weight_int8pack_mm(flat.to(torch.bfloat16), q, scale)
    elif flat.device.type == "cuda" and flat.shape[0] <= int8_gpu.SMALL_M and int8_gpu.available():
        out = int8_gpu.int8_mm(flat, q, scale)  # decode: reads the int8 weights as they are
    else:  # prefill-sized M amortises a dequantized copy over its rows; CPU widths the kernel lacks
        out = flat.to(scale.dtype) @ (q.to(scale.dtype) * scale[:, None]).t()
    return out.to(x.dtype).view(*x.shape[:-1], q.shape[0])


class Int8Linear(nn.Module):
    """Drop-in for nn.Linear with int8 weights [N, K], scales [N] (bf16 on CPU, as the kernel wants)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        q, scale = quantize_int8(linear.weight.data)
        scale_dtype = torch.bfloat16 if q.device.type == "cpu" else linear.weight.dtype
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale.to(scale_dtype))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = int8_matmul(x, self.weight, self.scale)
        return out if self.bias is None else out + self.bias


@torch.inference_mode()
def quantize_model(model, fmt: str = "int8") -> None:
    """Swap every projection of every layer and the head to int8, and the FFNs' to `fmt` (int8, or int4
    up/gate: int4.py), in place. int4 attention and head measured worse: perplexity 21.2 against 20.0
    with them int8 (fp32: 20.0; docs/speed.md) for a kernel ~12% faster than int8's. Embeddings stay
    dense (a lookup reads one row), norms stay dense (tiny)."""
    if fmt not in ("int8", "int4"):
        raise ValueError(f"quantize_model takes int8 or int4, got {fmt!r}")
    if fmt == "int4" and model.lm_head.weight.device.type != "cpu":
        raise ValueError("int4 weights run on the CPU only (PyTorch's CUDA int4 kernel packs differently): "
                         "use int8 on CUDA")
    for layer in model.layers:
        attn = layer.self_attn
        for name in ("qkv_proj", "o_proj"):
            setattr(attn, name, Int8Linear(getattr(attn, name)))
        layer.mlp.quantize_(fmt)
    model.lm_head = Int8Linear(model.lm_head)
