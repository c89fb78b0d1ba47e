"""The fused sparse FFN op (kernels/sparse_ffn.cpp) against its PyTorch reference, on every gate/up and down
format it takes: on the kernel's own arithmetic (x quantized per block of 32, as the op does) it chooses the
same neurons and equals the reference up to float32 summation order; it runs inside torch.compile's graph."""

import pytest
import torch

from coreinfer.formats import int8 as int8_format
from coreinfer.formats import q4, q8_0
from coreinfer.kernels import activations, sparse_ffn

needs_op = pytest.mark.skipif(not sparse_ffn.available(), reason="optional: no AVX512-VNNI CPU or no C++ compiler")


def pack(fmt: str, w: torch.Tensor) -> dict:
    """w [F, d] in a gate/up format, int8's row scales as float32 (as the op takes them)."""
    if fmt == "q8_0":
        return q8_0.pack(w)
    if fmt == "q4":
        return q4.pack(w)
    t = int8_format.pack(w)
    return {"q": t["q"], "scale": t["scale"].float()}


def pack_down(fmt: str, w: torch.Tensor) -> dict:
    """down [F, d] neuron-major: q8_0 or q4 blocks along d, or int8 with a scale per output channel [d]."""
    if fmt in ("q8_0", "q4"):
        return pack(fmt, w)
    t = int8_format.pack(w.t().contiguous())  # a scale per column of [F, d]
    return {"q": t["q"].t().contiguous(), "scale": t["scale"].float()}


def layer(F: int, d: int, gated: bool, bias: bool, fmt: str, down_fmt: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = {name: torch.randn(F, d, generator=g) * 0.05 for name in ("gate", "up", "down")}
    gate = pack(fmt, w["gate"]) if gated else None
    down = pack_down(down_fmt, w["down"])
    norm = sparse_ffn.dequantize(down, down=True).norm(dim=1)
    up_bias = torch.randn(F, generator=g) * 0.1 if bias else None
    return gate, pack(fmt, w["up"]), down, norm, up_bias, g


def gap_threshold(score: torch.Tensor, share: float) -> float:
    """A threshold that keeps about `share` of each row's scores and sits midway in the widest gap near
    there, so that float32 summation order cannot move a neuron across it."""
    s = score.flatten().sort().values
    n = len(s)
    lo, hi = int(n * (1 - share)) - n // 10, int(n * (1 - share)) + n // 10
    gaps = s[lo + 1:hi] - s[lo:hi - 1]
    i = lo + int(gaps.argmax())
    return float((s[i] + s[i + 1]) / 2)


@needs_op
@pytest.mark.parametrize("fmt,down_fmt,act,gated,bias,M,F,d", [
    ("q8_0", "q8_0", "silu", True, False, 1, 200, 96),
    ("q4", "q8_0", "gelu_pytorch_tanh", True, False, 3, 130, 160),
    ("int8", "int8", "silu", True, False, 1, 257, 576),
    ("q8_0", "int8", "relu", False, True, 2, 64, 64),
    ("q4", "q8_0", "gelu", True, False, 16, 96, 128),
    ("q4", "q4", "silu", True, False, 1, 1536, 576),  # SmolLM2's layer under --weights small
    ("q4", "q4", "gelu_pytorch_tanh", True, False, 5, 130, 160),  # d / 32 = 5 blocks, F % 4 != 0
    ("q8_0", "q4", "relu", False, True, 16, 64, 64),
])
@pytest.mark.parametrize("threads", [1, 2])
def test_op_equals_reference_on_its_own_arithmetic(fmt, down_fmt, act, gated, bias, M, F, d, threads):
    gate, up, down, norm, up_bias, g = layer(F, d, gated, bias, fmt, down_fmt, seed=F * d + M)
    x = torch.randn(M, d, generator=g)
    xq = activations.dequantized(x).float()  # what the op's int8 activations stand for
    a = sparse_ffn.scores(xq, gate, up, act, up_bias)
    threshold = gap_threshold(a.abs() * norm, 0.4)
    ref, ref_counts = sparse_ffn.reference(xq, gate, up, down, norm, threshold, act, up_bias)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, counts = sparse_ffn.sparse_ffn(x, gate, up, down, norm, threshold, act, up_bias)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(counts, ref_counts)
    assert 0 < int(counts.min()) and int(counts.max()) < F  # the threshold chose a real subset
    err = ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
    print(f"sparse_ffn {fmt}/{down_fmt} {act} M={M} F={F} d={d} threads={threads}: chose {counts.tolist()}, "
          f"max |op - reference| / max|ref| {err:.2e}")
    assert err < 1e-4


@needs_op
def test_op_is_close_to_the_float_ffn_and_zero_threshold_is_dense():
    gate, up, down, norm, _, g = layer(256, 192, True, False, "q8_0", "q8_0", seed=7)
    x = torch.randn(1, 192, generator=g)
    out, counts = sparse_ffn.sparse_ffn(x, gate, up, down, norm, 0.0, "silu")
    dense = sparse_ffn.scores(x, gate, up, "silu") @ sparse_ffn.dequantize(down, down=True)  # float x: no activation rounding
    assert int(counts) == 256
    assert ((out - dense).norm() / dense.norm()).item() < 0.02  # x's int8 rounding only


@needs_op
def test_op_runs_inside_a_compiled_graph():
    gate, up, down, norm, _, g = layer(128, 64, True, False, "q8_0", "q8_0", seed=3)
    x = torch.randn(1, 64, generator=g)

    def step(x):
        out, _ = sparse_ffn.sparse_ffn(x, gate, up, down, norm, 0.01, "silu")
        return out * 2

    compiled = torch.compile(step, fullgraph=True)
    assert torch.allclose(compiled(x), step(x))


def test_reference_takes_over_where_the_op_does_not_fit():
    gate, up, down, norm, _, g = layer(64, 48, True, False, "int8", "int8", seed=5)  # d % 32 != 0: no op
    x = torch.randn(1, 48, generator=g)
    out, counts = sparse_ffn.sparse_ffn(x, gate, up, down, norm, 0.0, "silu")
    dense = sparse_ffn.scores(x, gate, up, "silu") @ sparse_ffn.dequantize(down, down=True)
    assert int(counts) == 64 and torch.allclose(out, dense, atol=1e-6)


@pytest.fixture(scope="module", params=["q8_0", "int8"])
def quantized(request, tiny_model_dir):
    from coreinfer.api import LLM

    return LLM(str(tiny_model_dir), weights=request.param, progress=False, compile=False)


def dim(ffn) -> int:
    from coreinfer.engine.threshold import neuron_rows

    return sparse_ffn.dequantize(neuron_rows(ffn)["down"], down=True).shape[1]


def threshold_budgets(llm, share: float = 0.5) -> dict:
    """Sparse layers 1-2 at the threshold that keeps `share` of random FFN inputs' down rows."""
    from coreinfer.eval.thresholds import threshold_errors

    x = torch.randn(64, dim(llm.model.ffns()[1]), generator=torch.Generator().manual_seed(0))
    return {l: next(b for b in threshold_errors(llm.model.ffns()[l], x) if b.refine == share) for l in (1, 2)}


@needs_op
def test_threshold_layer_equals_masked_dense_on_every_row(quantized):
    check_threshold_layer(quantized.model.ffns()[1], threshold_budgets(quantized)[1])


@needs_op
def test_threshold_layer_with_a_q4_down_equals_masked_dense():
    """--weights small: q4 gate/up and a q4 neuron-major down (the file's 4-bit down, re-blocked along d)."""
    from coreinfer.eval.thresholds import threshold_errors
    from coreinfer.models.common import FFN

    F, d = 160, 96
    g = torch.Generator().manual_seed(4)
    ffn = FFN(0, d, F, "silu", gated=True, bias=False)
    w = {name: torch.randn(F, d, generator=g) * 0.05 for name in ("up", "gate", "down")}
    ffn.adopt_("q4", q4.pack(w["up"]), q4.pack(w["gate"]), "q4", q4.pack(w["down"]))
    x = torch.randn(64, d, generator=g)
    check_threshold_layer(ffn, next(b for b in threshold_errors(ffn, x) if b.refine == 0.5))


def check_threshold_layer(ffn, budget) -> None:
    """A ThresholdPlan layer, loaded with the whole FFN and with two 96-neuron supersets, against the
    masked dense FFN in float math (x at the op's int8 rounding): every row of 20 picks its own rows."""
    from coreinfer.engine.threshold import ThresholdPlan, neuron_rows, row_norms

    core = ThresholdPlan(budget.threshold, budget.refine).build()
    F, d = ffn.width, dim(ffn)
    g = torch.Generator().manual_seed(2)
    for index in (torch.arange(F)[None], torch.stack([torch.randperm(F, generator=g)[:96].sort().values
                                                      for _ in range(2)])):
        core.load(ffn, index)
        x = torch.randn(index.shape[0], 20, d, generator=g)  # 20 rows: two calls of the op (16 + 4)
        xq = activations.dequantized(x.reshape(-1, d)).float().view_as(x)
        with torch.inference_mode():
            out = core(x)
            t = neuron_rows(ffn)  # the whole FFN's tensors: the oracle gathers nothing
            norm = row_norms(t["down"])
            oracle = []
            for b in range(index.shape[0]):
                a = sparse_ffn.scores(xq[b], t.get("gate"), t["up"], ffn.act_name) * torch.isin(torch.arange(F), index[b])
                oracle.append((a * (a.abs() * norm >= budget.threshold)) @ sparse_ffn.dequantize(t["down"], down=True))
        err = ((out - torch.stack(oracle)).norm() / torch.stack(oracle).norm()).item()
        assert err < 1e-4, (ffn.format, index.shape, err)
        if index.shape[0] == 1:  # the whole FFN: gate/up in full, half of down's rows (int8 down's scale aside)
            whole = sum(t.nbytes for t, _ in ffn.neuron_tensors().values())
            assert 0.75 * whole < core.nbytes() < 0.9 * whole


@needs_op
@pytest.mark.parametrize("weights", ["int8", "q8_0"])
def test_a_threshold_profile_decodes_compiled_as_eager_on_two_prompts(tiny_model_dir, tmp_path, weights):
    from coreinfer.api import LLM
    from coreinfer.engine.generate import GenerationConfig
    from coreinfer.engine.policy import CoreConfig
    from coreinfer.engine.profile import Profile

    # q8_0: a block format, whose dense matmuls look their native ops up inside the traced step
    eager = LLM(str(tiny_model_dir), weights=weights, progress=False, compile=False)
    compiled = LLM(str(tiny_model_dir), weights=weights, progress=False, compile=True, background_compile=False)
    path = tmp_path / "tiny.json"
    Profile.for_model(eager.model, threshold_budgets(eager), {"meets_target": True}).save(path)
    gen, core = GenerationConfig(max_new_tokens=8, ignore_eos=True), CoreConfig(profile=str(path))
    for prompt in ("The capital of France", "Scholars argue about the press"):
        [e] = eager.generate(prompt, gen, core)
        [c] = compiled.generate(prompt, gen, core)
        [dense] = eager.generate(prompt, gen, None)
        assert e.stats is not None and e.stats.share < 1
        assert c.token_ids == e.token_ids and c.stats.share == e.stats.share
        assert compiled.compiled.failed is None  # the op ran inside the graph, not an eager fallback
        assert len(dense.token_ids) == len(e.token_ids)


@needs_op
def test_calibrate_on_block_weights_writes_thresholds_that_generate_runs(tiny_model_dir, tmp_path):
    from coreinfer.cli import main as cli
    from coreinfer.engine.profile import Profile

    out = tmp_path / "tiny.profile.json"
    flags = ["--model", str(tiny_model_dir), "--weights", "q8_0", "--docs", "2", "--eval-docs", "2", "--max-tokens", "48",
             "--layers", "all"]
    assert cli.main(["calibrate", *flags, "--budgets", "0.8", "--target-agree", "0.01", "--output", str(out)]) == 0
    profile = Profile.load(out)
    assert profile.layers and all(b.threshold is not None and b.input_keep == 1 for b in profile.layers.values())
    assert profile.info["tried"][0]["ffn_read"] <= 0.8 + 1e-9
    gen = ["generate", "The capital", "--model", str(tiny_model_dir), "--weights", "q8_0", "--max-new-tokens", "3",
           "--ignore-eos", "--no-compile"]
    assert cli.main([*gen, "--profile", str(out)]) == 0


@needs_op
def test_threshold_plans_decode_in_the_continuous_batch_as_alone(tmp_path):
    from test_batching import SEQS, alone, model_of, run_batch

    from coreinfer.engine.policy import CoreConfig
    from coreinfer.engine.profile import Profile
    from coreinfer.engine.quant import quantize_model
    from coreinfer.eval.thresholds import threshold_errors

    model = model_of()
    quantize_model(model)
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    budgets = {l: next(b for b in threshold_errors(model.ffns()[l], x) if b.refine == 0.5) for l in (1, 2)}
    path = tmp_path / "tiny.json"
    Profile.for_model(model, budgets, {"meets_target": True}).save(path)
    core = CoreConfig(profile=str(path))
    seqs = [(SEQS[0][0], core, 6, 0), (SEQS[1][0], None, 3, 0), (SEQS[2][0], core, 5, 1)]
    tokens, logits, _, _ = run_batch(model, seqs)
    for s, (prompt, c, max_new, _) in enumerate(seqs):
        ref = alone(model, prompt, c, tokens[s])
        assert len(tokens[s]) == max_new and (logits[s] - ref).abs().max().item() < 1e-4
        assert tokens[s][1:] == ref.argmax(-1).tolist()
