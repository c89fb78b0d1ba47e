"""Adaptive core neurons (engine/adaptive.py): per-token refinement and input sparsity against masked
dense math, bytes counted as read, and drift checks that refresh a core set mid-decode."""

import copy

import pytest
import torch

from coreinfer.api import LLM
from coreinfer.engine import native, rows
from coreinfer.engine.adaptive import AdaptiveFFN, AdaptivePolicy, DriftPolicy, Plan
from coreinfer.engine.policy import CoreConfig, Selection, StabilityPolicy
from coreinfer.engine.selection import keep_count, rank_neurons
from coreinfer.engine.session import Session, stability_policy


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return LLM(str(tiny_model_dir), progress=False)


def masked_ffn(ffn, x, superset, down_rows, input_keep):
    """Oracle from the dense FFN: zero x's entries outside each token's top |x_j| * ||W[:, j]|| (norms
    over the superset's gate/up rows), then keep each token's top down_rows superset neurons by
    |a_i| * ||down_i||. x [T, d], superset [k] -> [T, d]."""
    w_in = torch.cat([ffn.up[superset], ffn.gate[superset]])  # [2k, d]
    d_in = keep_count(input_keep, x.shape[-1])
    col = (x.abs() * w_in.norm(dim=0)).topk(d_in, dim=-1).indices
    x = x * torch.zeros_like(x).scatter_(-1, col, 1.0)
    a = ffn.activations(x[None])[0]  # [T, F]
    score = torch.full_like(a, -1.0)
    score[:, superset] = (a[:, superset] * ffn.down[superset].norm(dim=1)).abs()
    keep = torch.zeros_like(a).scatter_(-1, score.topk(down_rows, dim=-1).indices, 1.0)
    return ffn.project((a * keep)[None])[0]


@pytest.mark.parametrize("kernel", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("plan", [Plan(16), Plan(48, 0.5), Plan(None, 0.25), Plan(1, 1.0)], ids=str)
def test_fast_path_equals_reference_and_masked_dense(tiny, plan, kernel, monkeypatch):
    if not kernel:  # the path taken without a C compiler
        monkeypatch.setattr(native, "load", lambda: None)
    ffn = tiny.model.ffns()[1]
    torch.manual_seed(0)
    index = torch.stack([torch.randperm(ffn.width)[:64].sort().values for _ in range(2)])  # [B=2, k=64]
    core = AdaptiveFFN(plan)
    core.load(ffn, index)
    x = torch.randn(2, 1, ffn.up.shape[1])
    with torch.inference_mode():
        fast, ref = core(x), core.reference(x)
        oracle = torch.stack([masked_ffn(ffn, x[b], index[b], plan.down_rows or 64, plan.input_keep) for b in range(2)])
    print(f"{plan}: max|fast-ref| {(fast - ref).abs().max():.2e}, max|ref-oracle| {(ref - oracle).abs().max():.2e}")
    assert torch.allclose(fast, ref, atol=1e-5) and torch.allclose(ref, oracle, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("m", [1, 3, 4, 67, 300])
def test_native_row_sum_equals_gathered_matmul(m, threads):
    lib = native.load()
    assert lib is not None, "the C compiler inductor uses must build the row-sum kernel too"
    torch.manual_seed(m)
    w = torch.randn(3, 311, 70)[1]  # [311, 70]: a view of a batched buffer, as AdaptiveFFN reads it
    rows = torch.randint(0, 311, (m,))  # repeats allowed
    coef, out = torch.randn(m), torch.full((70,), float("nan"))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = native.rowsum(lib, w, rows, coef, out)
    finally:
        torch.set_num_threads(before)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got, coef @ w[rows], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
def test_native_int8_column_gather_equals_indexing(threads):
    lib = native.load()
    src = torch.randint(-128, 128, (3, 300, 517), dtype=torch.int8)[1]  # [300, 517], a view
    idx = torch.randint(0, 517, (411,))
    out = torch.zeros(300, 411, dtype=torch.int8)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        native.take_columns(lib, src, idx, out)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out, src[:, idx])


def test_a_whole_ffn_superset_is_read_in_place_and_never_overwritten(tiny):
    ffn = tiny.model.ffns()[1]
    dense = {name: t.clone() for name, (t, _) in ffn.neuron_tensors().items()}
    core, whole = AdaptiveFFN(Plan(16, 0.5)), torch.arange(ffn.width)[None]  # keep 1: [1, F]
    x = torch.randn(1, 1, ffn.up.shape[1])
    with torch.inference_mode():
        core.load(ffn, whole)
        assert core.weights["down"].data_ptr() == ffn.down.data_ptr()  # a view: nothing copied
        first = core(x).clone()
        torch.testing.assert_close(first, masked_ffn(ffn, x[0], whole[0], 16, 0.5)[None], atol=1e-5, rtol=1e-5)
        core.load(ffn, torch.arange(0, ffn.width, 2)[None])  # a partial superset gathers into new buffers
        assert core.weights["down"].data_ptr() != ffn.down.data_ptr()
        core.load(ffn, whole)
        torch.testing.assert_close(core(x), first)
    for name, (t, _) in ffn.neuron_tensors().items():
        assert torch.equal(t, dense[name]), name


def test_bytes_count_the_rows_read(tiny):
    ffn = tiny.model.ffns()[1]
    index = torch.arange(64)[None]  # one sequence, k = 64 of F = 128
    row = ffn.up[0].nbytes  # one row of up, gate or down
    core = AdaptiveFFN(Plan(16, 0.5))
    core.load(ffn, index)
    assert core.nbytes() == 2 * 64 * row // 2 + 16 * row  # half the columns of gate/up, 16 down rows
    plain = AdaptiveFFN(Plan())
    plain.load(ffn, index)
    assert plain.nbytes() == 3 * 64 * row


def test_decode_steps_equal_teacher_forced_scoring(tiny):
    # decode steps take the row-reading path, teacher forcing the reference: the same numbers
    model, encode = tiny.model, tiny.tokenizer.encode
    width = model.ffns()[0].width
    policy = AdaptivePolicy(stability_policy(CoreConfig(beta=0.75, layers="all"), model),
                            {l: Plan(keep_count(0.4, width), 0.5) for l in range(4)})
    prompt, cont = encode("The history of the printing press"), encode(" begins in the fifteenth century")
    scored = Session(model, [prompt], len(cont), policy=policy).score([cont])[0]
    session = Session(model, [prompt], len(cont), policy=policy)
    rows = [session.prefill()] + [session.step(torch.tensor([t])) for t in cont[:-1]]
    assert isinstance(session.cores.get(0), AdaptiveFFN)
    err = (torch.cat(rows) - scored).abs().max().item()
    print(f"stepwise vs teacher-forced: {err:.2e}")
    assert err < 1e-4
    share = session.stats.bytes_core / session.stats.bytes_dense
    assert share < 1 and session.decode_bytes == len(cont[:-1]) * session.stats.bytes_core


class WorstPolicy(StabilityPolicy):
    """A hand-made drift: the prompt's *least* active neurons, so the first check must find them wrong."""

    def select(self, stats):
        return Selection({l: rank_neurons(-stats[l].primary, -stats[l].secondary, keep_count(b, self.width))
                          for l, b in self.keep.items()})


def test_drift_check_refreshes_a_set_that_does_not_fit(tiny):
    model, encode = tiny.model, tiny.tokenizer.encode
    base = stability_policy(CoreConfig(beta=0.5, layers="all", statistic="norm"), model)
    worst = WorstPolicy(base.keep, base.width, base.spec)
    prompt, cont = encode("The capital of France is Paris."), encode(" The capital of Italy is Rome.")
    for threshold, refreshes in ((0.7, 1), (0.0, 0)):
        policy = DriftPolicy(worst, period=3, threshold=threshold, rate=1.0)
        session = Session(model, [prompt], len(cont), policy=policy)
        session.prefill()
        before = {l: ids.clone() for l, ids in session.selection.index.items()}
        for t in cont[:3]:
            session.step(torch.tensor([t]))
        print(f"threshold {threshold}: coverage {policy.last_coverage.tolist()}, refreshes {session.refreshes}")
        assert session.checks == policy.checks == 1 and session.refreshes == policy.refreshes == refreshes
        assert policy.last_coverage.item() < 0.5  # the worst half of the neurons holds little
        changed = any(not torch.equal(before[l], ids) for l, ids in session.selection.index.items())
        assert changed == bool(refreshes)
        if refreshes:  # rate 1: the new set is the checked token's own top neurons, and it is compacted
            layer = 2
            primary, secondary = policy.scores[layer]
            ids = session.selection.index[layer]
            assert torch.equal(ids, rank_neurons(primary, secondary, ids.shape[1]))
            assert torch.equal(session.cores.get(layer).weights["up"][0], model.ffns()[layer].up.detach()[ids[0]])
        # 2 compacted steps + 1 dense check step (a refresh keeps the sizes, so the same bytes)
        assert session.decode_bytes == 2 * session.stats.bytes_core + session.dense_bytes


@pytest.mark.parametrize("make, message", [
    (lambda: Plan(0), "down rows"), (lambda: Plan(4, 1.5), "input keep"),
    (lambda: DriftPolicy(None, 0, 0.5), "period"), (lambda: DriftPolicy(None, 4, 1.2), "threshold"),
    (lambda: CoreConfig(refine=0.0), "refine"), (lambda: CoreConfig(input_keep=1.5), "input keep"),
    (lambda: CoreConfig(drift_period=-1), "drift period"), (lambda: CoreConfig(drift_threshold=2), "drift threshold"),
    (lambda: CoreConfig(profile="p.json", mode="similarity", clusters="c"), "profile"),
])
def test_bad_settings_fail_with_one_clear_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_bad_flags_fail_with_one_line(tiny_model_dir, capsys):
    from coreinfer.cli import main as cli

    base = ["generate", "x", "--model", str(tiny_model_dir), "--max-new-tokens", "1"]
    for flags, message in ((["--refine", "1.5"], "refine"), (["--input-keep", "0"], "input keep"),
                           (["--profile", "/nonexistent.json"], "no such file")):
        assert cli.main([*base, *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_profile_round_trips_and_refuses_another_model(tiny, tmp_path):
    import transformers

    from coreinfer.engine.profile import LayerBudget, Profile
    from coreinfer.engine.session import make_policy
    from oracle import hf_pair

    model = tiny.model
    layers = {1: LayerBudget(1.0, 0.5, 0.75), 2: LayerBudget(0.75, None, 1.0)}
    path = tmp_path / "p.json"
    Profile.for_model(model, layers, {"meets_target": True}).save(path)
    loaded = Profile.load(path)
    assert loaded.layers == layers and loaded.info == {"meets_target": True}
    loaded.check(model)
    policy = make_policy(CoreConfig(profile=str(path)), model)
    session = Session(model, [tiny.tokenizer.encode("The capital of France is")], 1, policy=policy)
    session.prefill()
    assert {l: ids.shape[1] for l, ids in session.selection.index.items()} == {1: 128, 2: 96}
    assert session.cores.get(1).plan == Plan(64, 0.75) and session.cores.get(2).plan == Plan(None, 1.0)
    share = loaded.ffn_share(model)
    assert share == pytest.approx((2 + (1.5 + 0.5) / 3 + 0.75) / 4)
    config = transformers.LlamaConfig(vocab_size=model.embed_tokens.weight.shape[0], hidden_size=64,
                                      intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=256)
    _, other = hf_pair(config, seed=3)  # same shapes, other weights
    with pytest.raises(ValueError, match="calibrated on another model"):
        make_policy(CoreConfig(profile=str(path)), other)


@pytest.mark.parametrize("text, message", [
    ('{"format": "coreinfer.profile/1", "model": {}, "probe": [], "layers": {"1": {"keep": 0}}}', "keep ratio"),
    ('{"format": "coreinfer.profile/1", "model": {}, "probe": [], "layers": {"1": {"refine": 2}}}', "refine"),
    ('{"format": "coreinfer.profile/1", "model": {}, "probe": [], "layers": {"1": {"stride": 2}}}', "bad layer"),
    ('{"format": "other"}', "not a coreinfer profile"), ("{", "not a coreinfer profile"),
])
def test_bad_profiles_fail_with_one_clear_error(tmp_path, text, message):
    from coreinfer.engine.profile import Profile

    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        Profile.load(path)


def test_calibrate_writes_a_profile_that_generate_loads(tiny_model_dir, tmp_path, capsys):
    from coreinfer.cli import main as cli

    out = tmp_path / "tiny.profile.json"
    flags = ["--model", str(tiny_model_dir), "--docs", "2", "--eval-docs", "2", "--max-tokens", "48", "--layers", "all"]
    assert cli.main(["calibrate", *flags, "--budgets", "0.6,0.9", "--target-agree", "0.01", "--output", str(out)]) == 0
    from coreinfer.engine.profile import Profile

    profile = Profile.load(out)
    assert profile.info["meets_target"] and profile.info["tried"][0]["budget"] == 0.6
    assert profile.info["tried"][0]["ffn_read"] <= 0.6 + 1e-9
    gen = ["generate", "The capital", "--model", str(tiny_model_dir), "--max-new-tokens", "3", "--ignore-eos"]
    assert cli.main([*gen, "--profile", str(out)]) == 0
    # an unreachable target: the profile says so and decodes dense
    assert cli.main(["calibrate", *flags, "--budgets", "0.3", "--target-agree", "1.0", "--output", str(out)]) == 0
    assert not Profile.load(out).layers and "no budget meets" in capsys.readouterr().err
    for bad, message in ((["--budgets", "0,0.5"], "--budgets"), (["--target-agree", "2"], "--target-agree")):
        assert cli.main(["calibrate", *flags, *bad, "--output", str(out)]) == 2
        assert message in capsys.readouterr().err


def test_prior_fuses_with_the_prompt_statistic(tiny, tmp_path):
    from coreinfer.engine.profile import LayerBudget, Profile
    from coreinfer.engine.session import make_policy

    model, width = tiny.model, tiny.model.ffns()[0].width
    prior = {l: torch.softmax(torch.randn(width, generator=torch.Generator().manual_seed(l)), 0) for l in range(4)}
    path = tmp_path / "prior.json"
    Profile.for_model(model, {1: LayerBudget()}, prior=prior).save(path)
    assert torch.allclose(Profile.load(path).prior[2], prior[2], rtol=1e-3)
    prompt = [tiny.tokenizer.encode("Scholars argue about how much the press changed")]
    picked = {}
    for weight in (0.0, 0.5, 1.0):
        core = CoreConfig(beta=0.25, layers="all", statistic="norm", prior=str(path), prior_weight=weight)
        session = Session(model, prompt, 1, policy=make_policy(core, model))
        session.prefill()
        picked[weight] = session.selection.index
    plain = Session(model, prompt, 1, policy=make_policy(CoreConfig(beta=0.25, layers="all", statistic="norm"), model))
    plain.prefill()
    loaded = Profile.load(path).prior
    for l in range(4):
        assert torch.equal(picked[0.0][l], plain.selection.index[l])  # weight 0: the prompt's own set
        assert torch.equal(picked[1.0][l][0], loaded[l].topk(32).indices.sort().values)  # weight 1: the prior's
        assert not torch.equal(picked[0.5][l], picked[0.0][l]) or not torch.equal(picked[0.5][l], picked[1.0][l])
    with pytest.raises(ValueError, match="prior weight"):
        CoreConfig(prior=str(path), prior_weight=1.5)
    with pytest.raises(ValueError, match="not with --profile"):
        CoreConfig(prior=str(path), profile=str(path))


def dequantized_copy(ffn):
    """(an int8 copy of ffn, a float FFN holding exactly its dequantized weights: the oracle's)."""
    q = copy.deepcopy(ffn)
    q.quantize_("int8")
    f = copy.deepcopy(ffn)
    with torch.no_grad():
        f.up.copy_(q.up.float() * q.up_scale.float()[:, None])
        f.gate.copy_(q.gate.float() * q.gate_scale.float()[:, None])
        f.down.copy_((q.down.float() * q.down_scale.float()[:, None]).t())  # [d, F] -> [F, d]
    return q, f


@pytest.mark.parametrize("by_rows", [True, False], ids=["rows", "masked"])
@pytest.mark.parametrize("plan", [Plan(16), Plan(48, 0.5), Plan(None, 0.25)], ids=str)
@pytest.mark.parametrize("whole", [True, False], ids=["whole", "gathered"])
def test_int8_refinement_equals_masked_dense(tiny, plan, by_rows, whole, monkeypatch):
    # by rows: neuron-major int8 down read through rows.int8_rows (its PyTorch reference here);
    # masked: the chosen rows as zeroed coefficients of the stored layouts, through the int8 GEMV
    monkeypatch.setattr(rows, "reads_rows", lambda: by_rows)
    q, f = dequantized_copy(tiny.model.ffns()[1])
    torch.manual_seed(1)
    index = (torch.arange(f.width)[None] if whole else
             torch.stack([torch.randperm(f.width)[:80].sort().values for _ in range(2)]))  # [B, k]
    core = AdaptiveFFN(plan)
    core.load(q, index)
    x = torch.randn(index.shape[0], 1, f.up.shape[1])
    k = index.shape[1]
    with torch.inference_mode():
        fast, ref = core(x), core.reference(x)
        oracle = torch.stack([masked_ffn(f, x[b], index[b], plan.down_rows or k, plan.input_keep)
                              for b in range(index.shape[0])])
    rel = ((fast - oracle).norm() / oracle.norm()).item()
    print(f"{plan}: |fast-oracle|/|oracle| {rel:.2e}, max|ref-oracle| {(ref - oracle).abs().max():.2e}")
    torch.testing.assert_close(ref, oracle, atol=1e-5, rtol=1e-4)
    # gate/up by rows (the reference rows product) compute a in float: the same rows and numbers. Through
    # the int8 GEMV, x is quantized per block of 32 (~0.5% on a), which can flip a near tie of the row
    # choice: a few % of the output, measured up to 6.6% here
    assert rel < (1e-5 if "up_t" in core.weights else 0.1)
    assert (core.weights["down"].shape[-1] == f.up.shape[1]) == by_rows  # neuron-major [B, k, d] when read by rows


def test_int8_bytes_count_rows_read_only_by_rows(tiny, monkeypatch):
    q, _ = dequantized_copy(tiny.model.ffns()[1])
    F, d = q.up.shape
    for by_rows, down_rows in ((True, 16), (False, F)):
        monkeypatch.setattr(rows, "reads_rows", lambda: by_rows)
        core = AdaptiveFFN(Plan(16, 0.5))
        core.load(q, torch.arange(F)[None])
        scales = q.up_scale.nbytes + q.gate_scale.nbytes
        inputs = 2 * F * d // (2 if by_rows else 1)  # int8: one byte a weight; by rows half the columns
        assert core.nbytes() == inputs + down_rows * d + scales, by_rows


def test_int8_rows_reference_equals_float_rows():
    torch.manual_seed(0)
    q = torch.randint(-127, 128, (50, 40), dtype=torch.int8)
    scale = torch.rand(40).to(torch.bfloat16)
    coef, picked = torch.randn(3, 7), torch.tensor([4, 0, 49, 4, 17, 3, 8])
    w = q.float() * scale.float()  # [F, dm]
    torch.testing.assert_close(rows.reference(coef, q, scale, picked), coef @ w[picked], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rows.int8_rows(coef[:, :1].expand(3, 50).contiguous(), q, scale, None),
                               coef[:, :1] * w.sum(0), atol=1e-4, rtol=1e-5)
