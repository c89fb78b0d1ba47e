"""The weight formats (coreinfer/formats): GGML blocks against gguf-py's dequantize, runtime formats
against their float values."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from coreinfer.formats import FORMATS, ggml_type
from coreinfer.formats.ggml import TYPES

N, K = 8, 512  # two K-quant super-blocks a row


def random_blocks(code: int, seed: int = 0) -> np.ndarray:
    """uint8 [N, row bytes] of valid blocks: quantized random floats where gguf-py quantizes the type,
    else random bytes with their fp16 scale fields set to finite values."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((N, K)).astype(np.float32) * 0.05
    if code in (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1):
        return gguf_quantize(w, code).reshape(N, -1)
    kind = TYPES[code]
    raw = rng.integers(0, 256, (N * K // kind.block, kind.nbytes), dtype=np.uint8)
    scales = rng.uniform(1e-4, 1e-2, (raw.shape[0], 2)).astype(np.float16).view(np.uint8)  # [n, 4]
    at = (208,) if code == Q.Q6_K else (0, 2)  # where the block's fp16 d (and dmin) lie
    for i, offset in enumerate(at):
        raw[:, offset:offset + 2] = scales[:, 2 * i:2 * i + 2]
    return raw.reshape(N, -1)


@pytest.mark.parametrize("code", list(TYPES), ids=lambda c: Q(c).name)
def test_ggml_dequantize_equals_gguf_py(code):
    raw = random_blocks(code)
    ours = ggml_type(code).dequantize(torch.from_numpy(raw), (N, K))
    ref = torch.from_numpy(gguf_dequantize(raw, code).astype(np.float32))
    assert ours.shape == ref.shape == (N, K)
    assert torch.equal(ours, ref), f"max |diff| {(ours - ref).abs().max():.3g}"


def test_unknown_ggml_type_is_one_line():
    with pytest.raises(ValueError, match="GGML type IQ2_XS is not supported"):
        ggml_type(Q.IQ2_XS)


@pytest.mark.parametrize("code", [Q.Q8_0])
def test_q8_0_takes_q8_0_blocks_verbatim(code):
    raw = random_blocks(code)
    t = FORMATS["q8_0"].from_blocks(ggml_type(code), torch.from_numpy(raw), (N, K))
    assert t["qs"].dtype == torch.int8 and t["qs"].shape == (N, K) and t["d"].shape == (N, K // 32)
    blocks = raw.reshape(N, K // 32, 34)
    assert np.array_equal(t["qs"].numpy().view(np.uint8).reshape(N, K // 32, 32), blocks[..., 2:])
    assert np.array_equal(t["d"].numpy().view(np.uint8).reshape(N, K // 32, 2), blocks[..., :2])
    ref = torch.from_numpy(gguf_dequantize(raw, code))
    assert torch.equal(FORMATS["q8_0"].dequantize(t), ref)


@pytest.mark.parametrize("code", [Q.Q4_0, Q.Q4_1])
def test_q4_takes_q4_0_and_q4_1_exactly(code):
    raw = random_blocks(code)
    t = FORMATS["q4"].from_blocks(ggml_type(code), torch.from_numpy(raw), (N, K))
    assert t["qs"].shape == (N, K // 2) and t["d"].shape == t["m"].shape == (N, K // 32)
    assert torch.equal(FORMATS["q4"].dequantize(t), torch.from_numpy(gguf_dequantize(raw, code)))


def test_q4_takes_q4_k_per_sub_block():
    """Q4_K's sub-block scale d_super * sc and min dmin * mn rounded to fp16: each weight within
    15 * |d| * 2^-11 + |m| * 2^-11 of gguf-py's value, and the 4-bit codes themselves exact."""
    raw = random_blocks(Q.Q4_K)
    t = FORMATS["q4"].from_blocks(ggml_type(Q.Q4_K), torch.from_numpy(raw), (N, K))
    ours = FORMATS["q4"].dequantize(t)
    ref = torch.from_numpy(gguf_dequantize(raw, Q.Q4_K))
    d, m = t["d"].float().repeat_interleave(32, 1), t["m"].float().repeat_interleave(32, 1)
    bound = (15 * d.abs() + m.abs()) * 2**-11 + 1e-7
    diff = (ours - ref).abs()
    print(f"Q4_K -> q4: max |diff| {diff.max():.3g}, max diff / bound {(diff / bound).max():.3f}")
    assert bool((diff <= bound).all())
    codes = FORMATS["q4"].dequantize(dict(t, d=torch.ones_like(t["d"]), m=torch.zeros_like(t["m"])))
    scaled = d > 0  # a zero scale (sc = 0) leaves the codes undetermined by the values
    expect = torch.round((ref - m) / d.clamp_min(1e-30))  # m and d rounded: still within 0.02 of an integer
    assert torch.equal(codes[scaled], expect[scaled])


@pytest.mark.parametrize("code", [Q.Q5_K, Q.Q6_K, Q.F16, Q.BF16, Q.F32, Q.Q4_K])
def test_q8_0_requantizes_other_types_like_ggml(code):
    """Other types become q8_0 as ggml's quantize_row_q8_0 would quantize their float values
    (gguf-py's Q8_0 quantize is bit-exact with it)."""
    raw = random_blocks(code)
    t = FORMATS["q8_0"].from_blocks(ggml_type(code), torch.from_numpy(raw), (N, K))
    floats = gguf_dequantize(raw, code).astype(np.float32)
    ref = gguf_quantize(floats, Q.Q8_0).reshape(N, K // 32, 34)
    assert np.array_equal(t["d"].numpy().view(np.uint8).reshape(N, K // 32, 2), ref[..., :2])
    assert np.array_equal(t["qs"].numpy().view(np.uint8).reshape(N, K // 32, 32), ref[..., 2:])


@pytest.mark.parametrize("name", list(FORMATS))
def test_runtime_format_interface(name):
    """pack, dequantize, rows, matmul and rows_matmul of each format agree with the float weight it holds."""
    fmt = FORMATS[name]
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(1))
    t = fmt.pack(w)
    back = fmt.dequantize(t)
    err = (back - w).abs().max().item()
    assert err <= {"dense": 0, "int8": 0.02, "q8_0": 0.02, "q4": 0.3}[name], err
    index = torch.tensor([5, 0, 63, 5])
    assert torch.equal(fmt.dequantize(fmt.rows(t, index)), back[index])
    x = torch.randn(3, 96)
    ref = x @ back.t()
    # int8's native GEMV quantizes x per block of 32 too (engine/gemv.py): ~0.5% of the output's scale
    tol = 1e-2 * ref.abs().max().item() if name == "int8" else 1e-3
    torch.testing.assert_close(fmt.matmul(x, t), ref, rtol=0, atol=tol)
    coef = torch.randn(2, 4)
    torch.testing.assert_close(fmt.rows_matmul(coef, t, index), coef @ back[index], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fmt.rows_matmul(torch.randn(2, 64), t, None).shape, torch.Size([2, 96]))
    assert fmt.nbytes(t) == sum(v.nbytes for v in t.values())
