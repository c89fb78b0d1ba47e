"""Predicted per-token sparsity (engine/predictor.py) and rotated input sparsity (engine/rotation.py)
against masked dense math from the plain FFN, bytes counted as read, the rotation's fold at keep 1."""

import pytest
import torch

from coreinfer.api import LLM
from coreinfer.engine.adaptive import AdaptivePolicy
from coreinfer.engine.policy import StabilityPolicy
from coreinfer.engine.predictor import PredictedFFN, PredictPlan, fit_lowrank, predictor_quality
from coreinfer.engine.rotation import RotatedFFN, RotatePlan, fit_rotation
from coreinfer.engine.selection import keep_count
from coreinfer.engine.session import Session


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return LLM(str(tiny_model_dir), progress=False)


def top(score: torch.Tensor, k: int) -> torch.Tensor:
    return torch.zeros_like(score).scatter_(-1, score.topk(k, dim=-1).indices, 1.0)


def inputs(ffn, n: int = 200, seed: int = 0) -> torch.Tensor:
    """Correlated inputs [n, d], so a rotation and a low-rank fit have structure to find."""
    g = torch.Generator().manual_seed(seed)
    d = ffn.up.shape[1]
    return torch.randn(n, d // 4, generator=g) @ torch.randn(d // 4, d, generator=g) + 0.1 * torch.randn(n, d, generator=g)


def predicted_oracle(ffn, x, plan: PredictPlan) -> torch.Tensor:
    """Masked dense math from the plain FFN: x [T, d] -> [T, d] (whole FFN as the superset)."""
    F, dn = ffn.width, ffn.down.norm(dim=1)
    a = ffn.activations(x[None])[0]  # [T, F]
    if plan.scorer == "gate":
        score = torch.nn.functional.silu(x @ ffn.gate.T).abs() * dn
    elif plan.scorer == "lowrank":
        f = plan.factors
        score = (torch.nn.functional.silu(x @ f["gate_a"] @ f["gate_b"]) * (x @ f["up_a"] @ f["up_b"])).abs() * dn
    else:
        score = a.abs() * dn
    a = a * top(score, keep_count(plan.keep, F))
    a = a * top(a.abs() * dn, keep_count(plan.down, F))
    return ffn.project(a[None])[0]


def check_decode(ffn, plan, oracle_fn):
    """Decode two tokens over the whole width; the step must equal its masked reference and the masked
    dense math of oracle_fn(ffn, x [T, d], plan). Returns (core, x [B=2, T=1, d], reference)."""
    core = plan.build()
    core.load(ffn, torch.arange(ffn.width)[None].expand(2, -1))
    x = inputs(ffn, 2, seed=1)[:, None]  # [B=2, T=1, d]
    with torch.inference_mode():
        fast, ref = core(x), core.reference(x)
        oracle = torch.stack([oracle_fn(ffn, x[b], plan) for b in range(2)])
    print(f"{plan.scorer}: max|fast-ref| {(fast - ref).abs().max():.2e}, max|ref-oracle| {(ref - oracle).abs().max():.2e}")
    assert torch.allclose(fast, ref, atol=1e-5) and torch.allclose(ref, oracle, atol=1e-5)
    return core, x, ref


@pytest.mark.parametrize("scorer", ["oracle", "gate", "lowrank"])
def test_predicted_decode_equals_reference_and_masked_dense(tiny, scorer):
    ffn = tiny.model.ffns()[1]
    factors = fit_lowrank(ffn, inputs(ffn), 8) if scorer == "lowrank" else {}
    core, x, ref = check_decode(ffn, PredictPlan(scorer, 0.5, 0.3, factors), predicted_oracle)
    assert not torch.allclose(ref, ffn(x), atol=1e-3)  # the sparsity is real


def test_predicted_bytes_count_what_a_token_reads(tiny):
    ffn = tiny.model.ffns()[1]
    F, d = ffn.up.shape
    row = d * 4
    for scorer, expected in (("oracle", (2 * 64 + 32) * row), ("gate", F * row + 64 * row + 32 * row)):
        core = PredictPlan(scorer, 0.5, 0.25).build()
        core.load(ffn, torch.arange(F)[None])
        assert core.nbytes() == expected, scorer
    factors = fit_lowrank(ffn, inputs(ffn), 8)
    core = PredictPlan("lowrank", 0.5, 0.25, factors).build()
    core.load(ffn, torch.arange(F)[None])
    assert core.nbytes() == 2 * 8 * (d + F) * 4 + (2 * 64 + 32) * row


def test_full_rank_predictor_finds_the_oracle_set(tiny):
    ffn = tiny.model.ffns()[2]
    x = inputs(ffn, 400)
    full = predictor_quality(ffn, x, PredictPlan("lowrank", 0.5, 0.5, fit_lowrank(ffn, x, ffn.width)))
    low = predictor_quality(ffn, x, PredictPlan("lowrank", 0.5, 0.5, fit_lowrank(ffn, x, 2)))
    print(full, low)
    assert full["recall"] > 0.999 and abs(full["mass"] - full["oracle_mass"]) < 1e-4
    assert low["recall"] < full["recall"] and low["mass"] < low["oracle_mass"]


def test_rotation_is_orthogonal_and_orders_variance(tiny):
    x = inputs(tiny.model.ffns()[0])
    q = fit_rotation(x)
    assert torch.allclose(q.T @ q, torch.eye(q.shape[0]), atol=1e-5)
    var = (x @ q).square().mean(0)
    assert bool((var[:-1] >= var[1:] - 1e-4).all())


def rotated_oracle(ffn, x, q, input_keep, down) -> torch.Tensor:
    """Masked dense math in the model's own basis: drop the rotated entries, rotate back, plain FFN."""
    z = x @ q
    col = torch.cat([ffn.up @ q, ffn.gate @ q]).norm(dim=0)
    x_kept = (z * top(z.abs() * col, keep_count(input_keep, z.shape[-1]))) @ q.T
    a = ffn.activations(x_kept[None])[0]
    a = a * top(a.abs() * ffn.down.norm(dim=1), keep_count(down, ffn.width))
    return ffn.project(a[None])[0]


def test_rotated_decode_equals_reference_and_masked_dense(tiny):
    ffn = tiny.model.ffns()[1]
    q = fit_rotation(inputs(ffn))
    core = RotatePlan(q, 0.5, 0.4).build()
    core.load(ffn, torch.arange(ffn.width)[None].expand(2, -1))
    x = inputs(ffn, 2, seed=3)[:, None]
    with torch.inference_mode():
        fast, ref = core(x), core.reference(x)
        oracle = torch.stack([rotated_oracle(ffn, x[b], q, 0.5, 0.4) for b in range(2)])
    print(f"max|fast-ref| {(fast - ref).abs().max():.2e}, max|ref-oracle| {(ref - oracle).abs().max():.2e}")
    assert torch.allclose(fast, ref, atol=1e-5) and torch.allclose(ref, oracle, atol=1e-4)
    d, F = q.shape[0], ffn.width
    assert core.nbytes() == 2 * (d * d * 4 + 2 * F * (d // 2) * 4 + keep_count(0.4, F) * d * 4)


def test_rotation_fold_at_keep_one_gives_the_dense_logits(tiny):
    model = tiny.model
    layers = list(range(len(model.ffns())))
    rot = {l: fit_rotation(inputs(model.ffns()[l], seed=l)) for l in layers}
    policy = AdaptivePolicy(StabilityPolicy({l: 1.0 for l in layers}, model.ffns()[0].width),
                            {l: RotatePlan(rot[l]) for l in layers})
    prompt, cont = [5, 9, 17, 33, 2, 64], [7, 80, 11, 3, 41]
    dense = Session(model, [prompt], len(cont)).score([cont])
    session = Session(model, [prompt], len(cont), policy=policy)
    folded = session.score([cont])
    assert all(isinstance(session.cores.get(l), RotatedFFN) for l in layers)
    print(f"max|folded - dense| {(folded - dense).abs().max():.2e}")
    assert torch.allclose(folded, dense, atol=1e-4)


def test_predicted_policy_decodes_as_it_scores(tiny):
    """Step-by-step decoding through the gathered rows equals the one-forward teacher-forced score."""
    model = tiny.model
    layers = [1, 2]
    policy = AdaptivePolicy(StabilityPolicy({l: 1.0 for l in layers}, model.ffns()[0].width),
                            {l: PredictPlan("gate", 0.5, 0.4) for l in layers})
    prompt, cont = [5, 9, 17, 33, 2, 64], [7, 80, 11, 3]
    scored = Session(model, [prompt], len(cont), policy=policy).score([cont])[0]
    session = Session(model, [prompt], len(cont), policy=policy)
    steps = [session.prefill()[0]] + [session.step(torch.tensor([t]))[0] for t in cont[:-1]]
    assert isinstance(session.cores.get(1), PredictedFFN)
    assert torch.allclose(torch.stack(steps), scored, atol=1e-4)
    dense = Session(model, [prompt], len(cont)).score([cont])[0]
    assert not torch.allclose(dense, scored, atol=1e-3)


def test_bad_plans_fail_in_one_line():
    with pytest.raises(ValueError, match="scorer"):
        PredictPlan("magic", 0.5)
    with pytest.raises(ValueError, match="factors"):
        PredictPlan("lowrank", 0.5)
    with pytest.raises(ValueError, match="shares"):
        RotatePlan(torch.eye(4), 1.5)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_quantized_scorer_against_its_own_copy(tiny, bits):
    """The quant scorer ranks by its dequantized copy: its predicted set is that copy's top set, and
    more bits find more of the oracle's."""
    from coreinfer.engine.predictor import fit_quantized

    ffn = tiny.model.ffns()[1]
    factors = fit_quantized(ffn, bits)
    levels = torch.unique(factors["gate_q"][0] / factors["gate_q"][0].abs().min())
    assert len(levels) <= 2 ** bits
    plan = PredictPlan("quant", 0.5, 0.5, factors, bits)
    core = plan.build()
    core.load(ffn, torch.arange(ffn.width)[None])
    x = inputs(ffn, 1, seed=5)[:, None]
    with torch.inference_mode():
        g, u = x[0] @ factors["gate_q"].T, x[0] @ factors["up_q"].T
        score = (torch.nn.functional.silu(g) * u).abs() * ffn.down.norm(dim=1)
        a = ffn.activations(x)[0] * top(score, 64)
        a = a * top(a.abs() * ffn.down.norm(dim=1), 64)
        assert torch.allclose(core(x)[0], ffn.project(a[None])[0], atol=1e-5)
    F, d = ffn.up.shape
    assert core.nbytes() == 2 * (F * d * bits // 8 + F * 4) + (2 * 64 + 64) * d * 4
    recall = predictor_quality(ffn, inputs(ffn, 300), plan)["recall"]
    print(f"{bits} bits: recall {recall:.3f}")
    assert recall > {1: 0.6, 2: 0.7, 4: 0.85}[bits]


def test_a_predicted_profile_round_trips_decodes_and_refuses_another_model(tiny, tmp_path):
    import transformers

    from coreinfer.engine.policy import CoreConfig
    from coreinfer.engine.profile import LayerBudget, Profile
    from coreinfer.engine.session import make_policy
    from oracle import hf_pair

    model = tiny.model
    layers = {1: LayerBudget(1.0, 0.25, 1.0, 0.5, 4), 2: LayerBudget(1.0, 0.5)}
    path = tmp_path / "p.json"
    Profile.for_model(model, layers, {"meets_target": True}).save(path)
    loaded = Profile.load(path)
    assert loaded.layers == layers and loaded.per_token
    # layer 1: gate/up over half the rows, a quarter of down, a 4-bit copy of gate and up (4/32 each)
    assert loaded.ffn_share(model) == pytest.approx((2 + (2 * 0.5 + 0.25 + 2 * 4 / 32) / 3 + (2 + 0.5) / 3) / 4)
    session = Session(model, [tiny.tokenizer.encode("The capital of France is")], 1,
                      policy=make_policy(CoreConfig(profile=str(path)), model))
    session.prefill()
    core = session.cores.get(1)
    assert isinstance(core, PredictedFFN) and core.sizes() == (64, 32) and core.plan.bits == 4
    F, d = model.ffns()[1].up.shape
    assert core.nbytes() == 2 * (F * d // 2 + F * 4) + (2 * 64 + 32) * d * 4  # what the profile's share estimates
    config = transformers.LlamaConfig(vocab_size=model.embed_tokens.weight.shape[0], hidden_size=64,
                                      intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=256)
    _, other = hf_pair(config, seed=3)
    with pytest.raises(ValueError, match="calibrated on another model"):
        make_policy(CoreConfig(profile=str(path)), other)
    with pytest.raises(ValueError, match="predicted layer"):
        LayerBudget(1.0, None, 0.5, 0.5, 4)


def test_calibrate_can_choose_predicted_layers(tiny_model_dir, tmp_path, capsys):
    from coreinfer.cli import main as cli
    from coreinfer.engine.profile import Profile
    from coreinfer.eval.calibrate import layer_errors

    out = tmp_path / "tiny.profile.json"
    flags = ["--model", str(tiny_model_dir), "--docs", "2", "--eval-docs", "2", "--max-tokens", "48", "--layers", "all"]
    assert cli.main(["calibrate", *flags, "--budgets", "0.5", "--target-agree", "0.01", "--predictor-bits", "4",
                     "--output", str(out)]) == 0
    profile = Profile.load(out)
    assert profile.info["tried"][0]["ffn_read"] <= 0.5 + 1e-9
    assert any(b.predict is not None for b in profile.layers.values())  # at half the bytes prediction is cheaper
    assert cli.main(["calibrate", *flags, "--predictor-bits", "9", "--output", str(out)]) == 2
    assert "--predictor-bits" in capsys.readouterr().err
    llm = LLM(str(tiny_model_dir), progress=False)
    ffn = llm.model.ffns()[1]
    errors = layer_errors(ffn, inputs(ffn, 64), 4)
    predicted = {b: e for b, e in errors.items() if b.predict is not None}
    assert predicted and errors[next(b for b in errors if b.predict is None and b.refine is None
                                     and b.input_keep == 1)] < 1e-10
    # reading fewer predicted rows never lowers the error (same down share, nested sets)
    assert predicted[next(b for b in predicted if b.predict == 0.9 and b.refine is None)] <= \
        predicted[next(b for b in predicted if b.predict == 0.4 and b.refine is None)]


def trained_oracle(ffn, x, plan: PredictPlan) -> torch.Tensor:
    """Masked dense math for the trained scorer: the net's logits pick the rows, |a|*||down|| the down rows."""
    from coreinfer.engine.trained import logits

    F, dn = ffn.width, ffn.down.norm(dim=1)
    a = ffn.activations(x[None])[0]  # [T, F]
    a = a * top(logits(plan.factors, x), keep_count(plan.keep, F))
    a = a * top(a.abs() * dn, keep_count(plan.down, F))
    return ffn.project(a[None])[0]


def test_trained_decode_equals_reference_and_masked_dense_inside_a_superset(tiny):
    from coreinfer.engine.trained import TrainConfig, train_predictor

    ffn = tiny.model.ffns()[1]
    factors = train_predictor(ffn, inputs(ffn), TrainConfig(hidden=16, steps=20))
    core, x, _ = check_decode(ffn, PredictPlan("trained", 0.5, 0.3, factors), trained_oracle)
    F, d = ffn.up.shape
    net = 16 * (d + F) + 16 + F
    assert core.nbytes() == 2 * net * 4 + 2 * (2 * 64 + keep_count(0.3, F)) * d * 4  # its own net, per sequence
    # inside a superset of half the width the net's columns are gathered with the rows
    half = torch.arange(0, F, 2)
    core.load(ffn, half[None])
    with torch.inference_mode():
        assert torch.allclose(core(x[:1]), core.reference(x[:1]), atol=1e-5)
    assert core.scorer["net_b"].shape == (1, 16, F // 2) and core.scorer["prior_b"].shape == (1, F // 2)


def test_a_trained_predictor_beats_a_random_one(tiny):
    from coreinfer.engine.trained import TrainConfig, random_predictor, train_predictor

    ffn = tiny.model.ffns()[2]
    x = inputs(ffn, 800)  # one distribution: the seed also draws its correlation
    train, held = x[:600], x[600:]
    F, d = ffn.width, ffn.up.shape[1]
    trained = predictor_quality(ffn, held, PredictPlan("trained", 0.5, 0.5, train_predictor(
        ffn, train, TrainConfig(hidden=32, label_keep=0.5, steps=200))))
    untrained = predictor_quality(ffn, held, PredictPlan("trained", 0.5, 0.5, random_predictor(d, F, 32)))
    print(f"recall trained {trained['recall']:.3f}, random {untrained['recall']:.3f}")
    assert trained["recall"] > untrained["recall"] + 0.1 and trained["mass"] > untrained["mass"]


def test_a_trained_profile_round_trips_and_refuses_another_models_nets(tiny, tmp_path):
    import shutil

    import transformers

    from coreinfer.engine.policy import CoreConfig
    from coreinfer.engine.profile import LayerBudget, Profile, nets_path
    from coreinfer.engine.session import make_policy
    from coreinfer.engine.trained import TrainConfig, predictor_bytes, train_predictor
    from oracle import hf_pair

    model = tiny.model
    ffn = model.ffns()[1]
    net = train_predictor(ffn, inputs(ffn), TrainConfig(hidden=8, steps=5))
    share = predictor_bytes(net) / ffn.neuron_bytes()
    layers = {1: LayerBudget(1.0, 0.25, 1.0, 0.5, 0, share), 2: LayerBudget(1.0, 0.5)}
    path = tmp_path / "p.json"
    Profile.for_model(model, layers, {"meets_target": True}, nets={1: net, 2: net}).save(path)
    loaded = Profile.load(path)
    assert loaded.layers == layers and set(loaded.nets) == {1}  # only the layer that uses a net keeps one
    assert all(torch.equal(loaded.nets[1][k], net[k]) for k in net)
    session = Session(model, [tiny.tokenizer.encode("The capital of France is")], 1,
                      policy=make_policy(CoreConfig(profile=str(path)), model))
    session.prefill()
    core = session.cores.get(1)
    assert isinstance(core, PredictedFFN) and core.plan.scorer == "trained" and core.sizes() == (64, 32)
    F, d = ffn.up.shape
    # the profile's share estimate is what the decode step counts
    assert core.nbytes() / ffn.neuron_bytes() == pytest.approx(layers[1].ffn_share(True) * 1.0, abs=1e-9)
    config = transformers.LlamaConfig(vocab_size=model.embed_tokens.weight.shape[0], hidden_size=64,
                                      intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=256)
    _, other = hf_pair(config, seed=3)
    theirs = tmp_path / "theirs.json"
    Profile.for_model(other, layers, {"meets_target": True}, nets={1: net}).save(theirs)
    shutil.copy(nets_path(theirs), nets_path(path))
    with pytest.raises(ValueError, match="another model's predictors"):
        Profile.load(path)
    nets_path(path).unlink()
    with pytest.raises(ValueError, match="cannot be read"):
        Profile.load(path)
    with pytest.raises(ValueError, match="trained net"):
        LayerBudget(1.0, None, 1.0, 0.5, 4, share)  # a copy's bits and a net at once


def test_calibrate_trains_predictors_and_scores_uniform_settings(tiny_model_dir, tmp_path):
    from coreinfer.cli import main as cli
    from coreinfer.engine.profile import Profile

    out = tmp_path / "tiny.profile.json"
    flags = ["--model", str(tiny_model_dir), "--docs", "2", "--eval-docs", "2", "--max-tokens", "48", "--layers", "all"]
    assert cli.main(["calibrate", *flags, "--budgets", "0.5", "--target-agree", "0.01", "--predictor-hidden", "8",
                     "--output", str(out)]) == 0
    profile = Profile.load(out)
    kinds = {t["kind"] for t in profile.info["tried"]}
    assert kinds == {"mix", "uniform"} and profile.info["tried"][-1]["ffn_read"] <= 0.5 + 1e-9
    uses_net = {l for l, b in profile.layers.items() if b.net}
    assert set(profile.nets) == uses_net and (out.with_suffix(".nets.safetensors").exists() == bool(uses_net))
