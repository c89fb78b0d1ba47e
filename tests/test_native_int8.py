"""The native int8 x int8 GEMV (engine/gemv.py): exact against its own arithmetic done in PyTorch, close
to the float product, dispatched by int8_matmul only where it applies (told apart by that arithmetic),
and inside the compiled step."""

import pytest
import torch

from coreinfer.engine import gemv
from coreinfer.engine.compiled import inductor_options
from coreinfer.engine.quant import int8_matmul, quantize_int8

needs_gemv = pytest.mark.skipif(not gemv.available(),
                                reason="optional: no AVX512-VNNI CPU or no C compiler for the int8 GEMV")


def blockwise_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What the kernel computes, in float64: x [M, K] quantized per block of 32 (scale max|x| / 127,
    round half to even), dotted with q [N, K] exactly, times the block and row scales."""
    M, K = x.shape
    pad = -K % 32  # a last block of 16 (K % 32 == 16) is quantized alone, like the zeros after it
    xb = torch.nn.functional.pad(x.double(), (0, pad)).view(M, -1, 32)  # [M, B, 32]
    s = (xb.abs().amax(-1, keepdim=True).float() / 127).double()  # the kernel's float32 scales
    inv = torch.where(s > 0, (127 / xb.abs().amax(-1, keepdim=True).float()).double(), torch.zeros_like(s))
    xq = torch.round((xb.float() * inv.float()).double())  # [M, B, 32] integers
    qb = torch.nn.functional.pad(q.double(), (0, pad)).view(q.shape[0], -1, 32)  # [N, B, 32]
    dots = torch.einsum("mbk,nbk->mnb", xq, qb)  # exact integer dots per block
    return (dots * s.squeeze(-1)[:, None, :]).sum(-1) * scale.double()  # [M, N]


@needs_gemv
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("M,N,K", [(1, 960, 576), (2, 576, 1536), (3, 8, 16), (1, 44, 1312), (2, 12, 1296)])
def test_gemv_matches_its_arithmetic(M, N, K, threads):
    """K % 64 of 0, 32 and 16 (masked tail chunks, a half block) and a single chunk."""
    g = torch.Generator().manual_seed(K)
    q, s = quantize_int8(torch.randn(N, K, generator=g))
    s = s.bfloat16()
    x = torch.randn(M, K, generator=g) * torch.rand(K, generator=g) * 4  # uneven channel magnitudes
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = torch.ops.coreinfer.int8_gemv(x, q, s)
    finally:
        torch.set_num_threads(old)
    ref = blockwise_reference(x, q, s.float())
    err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    print(f"M={M} N={N} K={K} threads={threads}: max |kernel - its arithmetic in float64| / max|ref| {err:.2e}")
    assert out.shape == (M, N) and out.dtype == torch.float32
    assert err < 1e-5  # float32 accumulation order only


@needs_gemv
def test_gemv_close_to_float_product():
    """The activation quantization's own error: about 0.5% of the output's norm for Gaussian inputs,
    twice that of the bf16 activations PyTorch's kernel takes."""
    g = torch.Generator().manual_seed(0)
    q, s = quantize_int8(torch.randn(1536, 576, generator=g))
    x = torch.randn(2, 576, generator=g)
    ref = x @ (q.float() * s.bfloat16().float()[:, None]).t()
    err = ((torch.ops.coreinfer.int8_gemv(x, q, s.bfloat16()) - ref).norm() / ref.norm()).item()
    print(f"relative error vs the float product: {err:.4f}")
    assert err < 0.01


def took_gemv(out: torch.Tensor, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether `out` is the GEMV's arithmetic (int8 activations) rather than PyTorch's kernel (bf16 ones)."""
    ref = blockwise_reference(x.reshape(-1, x.shape[-1]), q, scale.float()).view(out.shape)
    return ((out.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5


@needs_gemv
@pytest.mark.parametrize("M,N,K,native_path", [
    (1, 24, 64, True), (gemv.MAX_M, 24, 64, True),
    (gemv.MAX_M + 1, 24, 64, False),  # prefill-sized: PyTorch's GEMM
    (1, 22, 64, False),  # N % 4: the kernel's rows come in fours
    (1, 24, 40, False),  # K % 16
])
def test_int8_matmul_dispatch(M, N, K, native_path):
    q, s = quantize_int8(torch.randn(N, K))
    x = torch.randn(1, M, K)
    ref = x @ (q.float() * s.bfloat16().float()[:, None]).t()
    out = int8_matmul(x, q, s.bfloat16())
    assert out.shape == (1, M, N) and took_gemv(out, x, q, s.bfloat16()) == native_path
    assert ((out - ref).norm() / ref.norm()).item() < 0.01


def test_without_a_compiler_int8_matmul_takes_pytorch(monkeypatch, tmp_path, capsys):
    """No C++ compiler: the build says so in one line and int8_matmul keeps PyTorch's kernel."""
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert gemv.build(tmp_path) is None
    assert "no native int8 gemv" in capsys.readouterr().err
    monkeypatch.setattr(gemv, "load", lambda: False)
    q, s = quantize_int8(torch.randn(24, 64))
    x = torch.randn(1, 64)
    ref = x @ (q.float() * s.bfloat16().float()[:, None]).t()
    out = int8_matmul(x, q, s.bfloat16())
    assert ((out - ref).norm() / ref.norm()).item() < 0.01 and not took_gemv(out, x, q, s.bfloat16())


class TwoLayers(torch.nn.Module):
    """Two int8 projections as buffers, as coreinfer's modules hold them (frozen by max-autotune)."""

    def __init__(self):
        super().__init__()
        for name, shape in (("a", (128, 64)), ("b", (64, 128))):
            q, s = quantize_int8(torch.randn(*shape))
            self.register_buffer(name, q)
            self.register_buffer(f"{name}_scale", s.bfloat16())

    def forward(self, x):
        return int8_matmul(torch.relu(int8_matmul(x, self.a, self.a_scale)), self.b, self.b_scale)


@needs_gemv
@pytest.mark.parametrize("mode", ["cpp-wrapper", "max-autotune"])
def test_compiled_with_coreinfer_options_equals_eager(mode):
    """The operator survives dynamo, the C++ wrapper (and freezing), and computes what eager computes
    (tests/test_compile.py decodes a tiny int8 model compiled, through this kernel, token for token)."""
    model = TwoLayers().eval()
    x = torch.randn(1, 1, 64)
    with torch.inference_mode():
        eager = model(x)
        torch._dynamo.reset()
        fast = torch.compile(model, fullgraph=True, dynamic=False, options=inductor_options(mode))(x)
        hidden = torch.relu(int8_matmul(x, model.a, model.a_scale))
    print(f"compiled vs eager max |diff| {(fast - eager).abs().max().item():.2e}")
    assert torch.equal(fast, eager)
    assert took_gemv(fast, hidden, model.b, model.b_scale)  # the compiled graph ran the GEMV, not PyTorch's GEMM
