"""The activation side of the native dot products in PyTorch (x_quant.h): rows of x quantized per block
of 32 to int8, scale max|x| / 127 in float32, round half to even. The kernels' references use it, so that
a test can hold a kernel to its own arithmetic (float32 summation order only) and, separately, to the
float product (the quantization's own error)."""

import torch


def quantize_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (K % 32 == 0) -> xq [M, K/32, 32] integer-valued float32, xs [M, K/32] float32, so that
    x ≈ xq * xs[..., None]."""
    xb = x.float().reshape(x.shape[0], -1, 32)  # [M, B, 32]
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return torch.round(xb * inv), (amax / 127).squeeze(-1)


def dequantized(x: torch.Tensor) -> torch.Tensor:
    """What a kernel's int8 activations stand for, in float64: x [M, K] -> [M, K]."""
    xq, xs = quantize_blocks(x)
    return (xq.double() * xs.double()[..., None]).reshape(x.shape)
