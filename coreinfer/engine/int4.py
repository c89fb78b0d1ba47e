"""Weight-only int4, group-wise, on the CPU: PyTorch's int4 kernel for the FFNs' up and gate; down,
attention and the head stay int8 per channel (quant.py).

The kernel (`_weight_int4pack_mm_for_cpu`, torch 2.13) multiplies bf16 x [M, K] by a weight [N, K]
stored as 4-bit values q in 0..15, dequantized per group of GROUP_SIZE inputs as (q - 8) * scale + zero
(torchao's asymmetric convention, scale and zero in bf16, `scales_and_zeros` [K/G, N, 2]). Measured on
SmolLM2's shapes (1 thread, batch 1): 0.06-0.07 ms against int8's 0.075-0.086 for up/down, 2.1 against
2.4 ms for the 49k-row head; the bytes halve, the time does not (the kernel unpacks nibbles in registers).

Group size 32: with every projection int4, SmolLM2's perplexity is 21.2 at 32 and 27.2 at 64 (fp32:
20.0; docs/speed.md); 64 would save 0.06 byte a weight and no measurable time. Int4 attention and
head cost that 21.2: with them int8 and the FFNs' up/gate int4 it is 20.0, so they stay int8.

The packed layout is not per row: `_convert_weight_to_int4pack_for_cpu` interleaves rows in blocks of
BLOCK_N = 64 (on AVX-512; checked once by `fast_layout`): block b is [K, 32] bytes, byte [k, c] holding
row 64 b + c in its low nibble and row 64 b + 32 + c in its high one. A neuron of up/gate is a row, so
compaction cannot slice the packed tensor. Each FFN keeps a second copy in a gatherable layout, `src`
[K/2, N] (a neuron per column, two inputs a byte; the same bytes as the packed copy, read only when
compacting): the int8 column gather (native.take_columns) picks the core, `pack_core` interleaves it
into the kernel's layout with a few tensor ops, 0.14 ms a matrix (the op itself, fed unpacked int32,
costs 1.6 ms a matrix at SmolLM2's keep 0.5: 100 ms a prompt, over the 30 ms budget). Cores are padded to
64 neurons so that every block is full; where the layout probe fails they take the op's slow path.

Down's neurons are its inner dimension, which int4's groups span: a core would mix groups, so it
would need requantizing at compaction (a second rounding, and compacted != masked dense). Down stays
int8 per channel instead: compaction stays the exact column gather, and its matmul was only ~10% faster
in int4 (0.068 against 0.075 ms). llama.cpp's Q4_K_M keeps ffn_down at higher precision too.

FFNs whose widths the kernel cannot take (d not a multiple of GROUP_SIZE, F not of 16) stay int8
(`fits`); CUDA's `_weight_int4pack_mm` packs differently and is not supported (api.RuntimeConfig refuses).
`torch.compile` traces the kernel (a tiny model's compiled steps equal eager's) and decodes SmolLM2 at
111-127 tok/s against eager's 65 (docs/speed.md), so int4 compiles by default like int8.
"""

from functools import cache

import torch

GROUP_SIZE = 32  # inputs sharing a scale and zero; the kernel takes 32, 64, 128 or 256
N_ALIGN = 16  # the kernel packs rows in blocks of 16, 32, 48 or 64
BLOCK_N = 64  # rows a block of the packed layout interleaves (AVX-512); a core pads to a multiple of it
LOW = 0x0F0F0F0F0F0F0F0F  # the low nibble of each byte of an int64


def fits(n: int, k: int) -> bool:
    """Whether the CPU kernel takes a weight [n, k]."""
    return k % GROUP_SIZE == 0 and n % N_ALIGN == 0


def quantize_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q [N, K] uint8 in 0..15, scales_and_zeros [K/G, N, 2] bf16), w ≈ (q - 8) * scale + zero
    per group of G inputs. q is rounded against the bf16 scale and zero the kernel will read."""
    N, K = w.shape
    g = w.float().view(N, K // GROUP_SIZE, GROUP_SIZE)
    lo, hi = g.amin(-1), g.amax(-1)  # [N, K/G]
    scale = ((hi - lo).clamp_min(1e-6) / 15).bfloat16().float()
    zero = (lo + 8 * scale).bfloat16().float()
    q = torch.round((g - zero[..., None]) / scale[..., None] + 8).clamp(0, 15).to(torch.uint8).view(N, K)
    return q, torch.stack([scale, zero], -1).transpose(0, 1).contiguous().bfloat16()


def dequantize_int4(q: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """The float weight [N, K] the kernel multiplies by (the tests' reference)."""
    N, K = q.shape
    sz = scales_and_zeros.float().transpose(0, 1)  # [N, K/G, 2]
    g = q.float().view(N, K // GROUP_SIZE, GROUP_SIZE)
    return ((g - 8) * sz[..., :1] + sz[..., 1:]).view(N, K)


def pack(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] (values 0..15) -> the kernel's packed weight [N, K/2] uint8."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 2)


def source(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] -> src [K/2, N] int8 bytes, a neuron per column: src[j, n] = q[n, 2j] | q[n, 2j + 1] << 4.
    int8 so that the native int8 column gather copies it."""
    qt = q.t()  # [K, N]
    return (qt[0::2] | (qt[1::2] << 4)).contiguous().view(torch.int8)


@cache
def fast_layout() -> bool:
    """Whether the kernel's packed layout is the BLOCK_N interleave `pack_core` writes (checked on a
    fixed pattern; other CPUs' builds interleave differently)."""
    q = (torch.arange(2 * BLOCK_N * 64).view(2 * BLOCK_N, 64) * 7 % 16).to(torch.uint8)
    out = torch.empty(2 * BLOCK_N, 32, dtype=torch.uint8)
    _interleave(source(q), out)
    return torch.equal(out, pack(q))


def _interleave(src: torch.Tensor, out: torch.Tensor) -> None:
    """src [K/2, n] -> out [n, K/2] in the packed layout, n a multiple of BLOCK_N (see the docstring).
    Works on int64 lanes of 8 bytes (masks keep each nibble in its byte): half the time of uint8 ops."""
    half, n = src.shape
    g = src.view(torch.int64).view(half, n // BLOCK_N, 2, BLOCK_N // 16)
    lo, hi = g[:, :, 0], g[:, :, 1]  # [K/2, NB, 4 lanes]: rows c and 32 + c of each block, inputs 2j | 2j + 1 << 4
    o = out.view(torch.int64).view(n // BLOCK_N, half, 2, BLOCK_N // 16).permute(1, 0, 2, 3)  # [K/2, NB, parity, 4]
    torch.bitwise_or(lo & LOW, (hi & LOW) << 4, out=o[:, :, 0])  # input 2j: row c low, row 32 + c high
    torch.bitwise_or((lo >> 4) & LOW, hi & ~LOW, out=o[:, :, 1])  # input 2j + 1


def pack_core(src: torch.Tensor, out: torch.Tensor) -> None:
    """Gathered columns src [K/2, n] (see `source`) -> out [n, K/2], the kernel's packed weight."""
    if src.shape[1] % BLOCK_N == 0 and fast_layout():
        _interleave(src, out)
        return
    u = src.view(torch.uint8)
    q = torch.stack([u & 15, u >> 4], dim=1).view(-1, src.shape[1])  # [K/2, 2, n] -> [K, n]
    out.copy_(pack(q.t()))


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ W.T -> [..., N] in x's dtype, W [N, K] the dequantized int4 weight (packed [N, K/2])."""
    flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # [M, K]
    group = x.shape[-1] // scales_and_zeros.shape[0]
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, packed, group, scales_and_zeros)
    return out.to(x.dtype).view(*x.shape[:-1], packed.shape[0])

