"""The native kernels of coreinfer/kernels/ against PyTorch references: each op equals its own arithmetic
(the int8 activations, dequantized, times the weights, in float64) up to float32 summation order, is close
to the float product, runs inside torch.compile(fullgraph=True), and its wrapper falls back to the
reference where the op is unavailable. Shapes: K = 32·n (tails of 32, 64 and 96 past the last full chunk),
N not a multiple of 16 (nor of 4), M = 1..16."""

import pytest
import torch

from coreinfer.kernels import activations, q4, q8_0, rows

SHAPES = [(1, 37, 32), (3, 5, 96), (16, 100, 576), (7, 44, 1312), (2, 1, 160)]  # (M, N, K)


def needs(module):
    return pytest.mark.skipif(not module.available(),
                              reason=f"optional: no AVX512-VNNI CPU or no C++ compiler for {module.__name__}")


def with_threads(threads: int, fn):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


def relative_max(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def relative_norm(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def random_q8_0(N: int, K: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    qs = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    d = (torch.rand(N, K // 32, generator=g) * 0.01 + 1e-4).half()
    return qs, d


def activation_rows(M: int, K: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(M, K, generator=g) * torch.rand(K, generator=g) * 4  # uneven channel magnitudes


@needs(q8_0)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_q8_0_gemv_matches_its_arithmetic(M, N, K, threads):
    g = torch.Generator().manual_seed(N * K)
    qs, d = random_q8_0(N, K, g)
    x = activation_rows(M, K, g)
    out = with_threads(threads, lambda: torch.ops.coreinfer.q8_0_gemv(x, qs, d))
    ref = activations.dequantized(x) @ q8_0.dequantize(qs, d).double().t()
    err = relative_max(out, ref)
    print(f"q8_0_gemv M={M} N={N} K={K} threads={threads}: max |kernel - its arithmetic| / max|ref| {err:.2e}")
    assert out.shape == (M, N) and out.dtype == torch.float32
    assert err < 1e-5  # float32 accumulation order only


@needs(q8_0)
def test_q8_0_gemv_close_to_float_product():
    """The activation quantization's own error: about 0.5% of the output's norm for Gaussian inputs."""
    g = torch.Generator().manual_seed(0)
    qs, d = random_q8_0(1536, 576, g)
    x = torch.randn(2, 576, generator=g)
    err = relative_norm(q8_0.gemv(x, qs, d), q8_0.reference(x, qs, d))
    print(f"q8_0_gemv vs the float product: {err:.4f}")
    assert err < 0.01


def test_q8_0_gemv_falls_back_to_the_reference(monkeypatch):
    monkeypatch.setattr(q8_0, "load", lambda: False)
    g = torch.Generator().manual_seed(1)
    qs, d = random_q8_0(12, 64, g)
    x = torch.randn(2, 64, generator=g)
    assert torch.equal(q8_0.gemv(x, qs, d), x @ (qs.float() * d.float().repeat_interleave(32, 1)).t())


def random_q4(N: int, K: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q in 0..15 packed, d > 0 and m = -8 d plus noise (a Q4_0-like centre, but any m is allowed)."""
    qs = q4.pack(torch.randint(0, 16, (N, K), generator=g))
    d = torch.rand(N, K // 32, generator=g) * 0.01 + 1e-4
    m = -8 * d + torch.randn(N, K // 32, generator=g) * 0.01
    return qs, d.half(), m.half()


def test_q4_pack_is_the_contract_layout():
    """Byte 16 b + i: q[32 b + i] low, q[32 b + 16 + i] high, as ggml's Q4_0 (independent of unpack)."""
    q = torch.randint(0, 16, (3, 64), generator=torch.Generator().manual_seed(2))
    qs = q4.pack(q)
    assert torch.equal(qs[:, 16 + 5], (q[:, 32 + 5] | q[:, 48 + 5] << 4).to(torch.uint8))
    assert torch.equal(q4.unpack(qs), q.to(torch.uint8))


@needs(q4)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_q4_gemv_matches_its_arithmetic(M, N, K, threads):
    g = torch.Generator().manual_seed(N * K + 1)
    qs, d, m = random_q4(N, K, g)
    x = activation_rows(M, K, g)
    out = with_threads(threads, lambda: torch.ops.coreinfer.q4_gemv(x, qs, d, m))
    ref = activations.dequantized(x) @ q4.dequantize(qs, d, m).double().t()
    err = relative_max(out, ref)
    print(f"q4_gemv M={M} N={N} K={K} threads={threads}: max |kernel - its arithmetic| / max|ref| {err:.2e}")
    assert out.shape == (M, N) and out.dtype == torch.float32
    assert err < 1e-5  # float32 accumulation order only


@needs(q4)
def test_q4_gemv_close_to_float_product():
    g = torch.Generator().manual_seed(3)
    qs, d, m = random_q4(1536, 576, g)
    x = torch.randn(2, 576, generator=g)
    err = relative_norm(q4.gemv(x, qs, d, m), q4.reference(x, qs, d, m))
    print(f"q4_gemv vs the float product: {err:.4f}")
    assert err < 0.01


def test_q4_gemv_falls_back_to_the_reference(monkeypatch):
    monkeypatch.setattr(q4, "load", lambda: False)
    g = torch.Generator().manual_seed(4)
    qs, d, m = random_q4(12, 64, g)
    x = torch.randn(2, 64, generator=g)
    assert torch.equal(q4.gemv(x, qs, d, m), x @ q4.dequantize(qs, d, m).t())


ROW_SHAPES = [(1, 96, 64, None), (1, 1536, 576, 700), (3, 40, 32, 5), (16, 300, 160, 299), (5, 64, 96, None)]


@needs(rows)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("M,F,dm,R", ROW_SHAPES)  # R None: all rows in order
@pytest.mark.parametrize("fmt", ["int8", "q8_0", "q4"])
def test_neuron_rows_match_the_reference(fmt, M, F, dm, R, threads):
    """Float arithmetic on both sides (no activation quantization): float32 summation order only. Rows
    are chosen at random, with repeats, out of order; R % 4 != 0 exercises the short last group."""
    g = torch.Generator().manual_seed(F * dm + M)
    qs, d = random_q8_0(F, dm, g)
    scale = (torch.rand(dm, generator=g) * 0.02).bfloat16()
    index = None if R is None else torch.randint(0, F, (R,), generator=g)
    coef = torch.randn(M, F if R is None else R, generator=g)
    if fmt == "int8":
        out = with_threads(threads, lambda: torch.ops.coreinfer.int8_rows(coef, qs, scale, index))
        ref = rows.int8_rows_reference(coef.double(), qs, scale.double(), index)
    elif fmt == "q8_0":
        out = with_threads(threads, lambda: torch.ops.coreinfer.q8_0_rows(coef, qs, d, index))
        ref = coef.double() @ q8_0.dequantize(qs, d).double()[slice(None) if index is None else index]
    else:
        q4s, q4d, q4m = random_q4(F, dm, g)
        out = with_threads(threads, lambda: torch.ops.coreinfer.q4_rows(coef, q4s, q4d, q4m, index))
        ref = coef.double() @ q4.dequantize(q4s, q4d, q4m).double()[slice(None) if index is None else index]
    err = relative_max(out, ref)
    print(f"{fmt}_rows M={M} F={F} dm={dm} R={R} threads={threads}: max |kernel - reference| / max|ref| {err:.2e}")
    assert out.shape == (M, dm) and out.dtype == torch.float32
    assert err < 1e-5


@needs(rows)
def test_neuron_rows_refuse_a_row_out_of_range():
    qs, d = random_q8_0(8, 32, torch.Generator().manual_seed(5))
    with pytest.raises(RuntimeError, match="row 8 outside 0..7"):
        torch.ops.coreinfer.q8_0_rows(torch.ones(1, 2), qs, d, torch.tensor([0, 8]))


def test_neuron_rows_fall_back_to_the_reference(monkeypatch):
    monkeypatch.setattr(rows, "load", lambda: False)
    g = torch.Generator().manual_seed(6)
    qs, d = random_q8_0(10, 64, g)
    coef, index = torch.randn(2, 3, generator=g), torch.tensor([7, 0, 7])
    w = qs.float() * d.float().repeat_interleave(32, 1)  # [F, dm]
    assert torch.allclose(rows.q8_0_rows(coef, qs, d, index), coef @ w[index], rtol=1e-6, atol=1e-6)
    scale = torch.rand(64, generator=g)
    assert torch.allclose(rows.int8_rows(coef, qs, scale, index), coef @ (qs.float() * scale)[index],
                          rtol=1e-5, atol=1e-4)  # the reference scales after the sum: float rounding of ~1e-5
    q4s, q4d, q4m = random_q4(10, 64, g)
    assert torch.allclose(rows.q4_rows(coef, q4s, q4d, q4m, index), coef @ q4.dequantize(q4s, q4d, q4m)[index],
                          rtol=1e-6, atol=1e-6)


@needs(q8_0)
@needs(q4)
@needs(rows)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("M", [17, 40])
@pytest.mark.parametrize("fmt", ["q8_0", "q4"])
def test_format_matmuls_of_more_rows_take_the_kernels_in_chunks(fmt, M, threads):
    """A prefill-sized x (M > 16, the ops' limit) goes through the native ops 16 rows at a time: equal bit
    for bit to the ops row by row (a row's result depends on that row alone), and to the ops' own
    arithmetic up to float32 summation order (int8 activations for the GEMV, floats for the rows)."""
    from coreinfer.formats import FORMATS

    g = torch.Generator().manual_seed(M + len(fmt))
    K, N = 576, 100
    t = FORMATS[fmt].pack(torch.randn(N, K, generator=g) * 0.05)
    x, coef, index = activation_rows(M, K, g), torch.randn(M, 37, generator=g), torch.randint(0, N, (37,), generator=g)
    w = (q8_0.dequantize(t["qs"], t["d"]) if fmt == "q8_0" else q4.dequantize(t["qs"], t["d"], t["m"])).double()
    matmul = lambda x: FORMATS[fmt].matmul(x, t)  # noqa: E731
    down = lambda c: FORMATS[fmt].rows_matmul(c, t, index)  # noqa: E731
    out, by_row = with_threads(threads, lambda: (matmul(x), torch.cat([matmul(x[i:i + 1]) for i in range(M)])))
    rows_out, rows_by_row = with_threads(threads, lambda: (down(coef), torch.cat([down(coef[i:i + 1]) for i in range(M)])))
    err = relative_max(out, activations.dequantized(x) @ w.t())
    rows_err = relative_max(rows_out, coef.double() @ w[index])
    print(f"{fmt} M={M} threads={threads}: matmul vs its arithmetic {err:.2e}, rows_matmul vs float {rows_err:.2e}")
    assert torch.equal(out, by_row) and torch.equal(rows_out, rows_by_row)
    assert err < 1e-5 and rows_err < 1e-5


class NativeOps(torch.nn.Module):
    """Every operator of coreinfer/kernels/ in one graph, weights as buffers (as coreinfer's modules hold them)."""

    def __init__(self, g: torch.Generator):
        super().__init__()
        qs, d = random_q8_0(40, 64, g)
        q4s, q4d, q4m = random_q4(24, 64, g)
        for name, t in (("qs", qs), ("d", d), ("q4s", q4s), ("q4d", q4d), ("q4m", q4m),
                        ("scale", torch.rand(64, generator=g) * 0.01), ("index", torch.tensor([3, 0, 17, 3, 9]))):
            self.register_buffer(name, t)

    def forward(self, x):  # x [1, 64]
        a = q8_0.gemv(x, self.qs, self.d)  # [1, 40]
        b = q4.gemv(x, self.q4s, self.q4d, self.q4m)  # [1, 24]
        c = rows.q8_0_rows(a[:, :5], self.qs, self.d, self.index)  # [1, 64]
        return torch.cat([a, b, c, rows.int8_rows(a, self.qs, self.scale, None)], dim=-1)


@needs(q8_0)
@needs(q4)
@needs(rows)
def test_ops_compile_fullgraph_with_coreinfer_options():
    """The fake kernels let dynamo trace every op, inductor's C++ wrapper calls them (no graph break), and the
    compiled graph computes what eager computes."""
    from coreinfer.engine.compiled import inductor_options

    model = NativeOps(torch.Generator().manual_seed(7)).eval()
    x = torch.randn(1, 64)
    with torch.inference_mode():
        eager = model(x)
        torch._dynamo.reset()
        fast = torch.compile(model, fullgraph=True, dynamic=False, options=inductor_options("cpp-wrapper"))(x)
    print(f"compiled vs eager max |diff| {(fast - eager).abs().max().item():.2e}")
    assert torch.equal(fast, eager)
