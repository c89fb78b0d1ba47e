"""The benchmark runs end to end on a tiny random model and emits JSON with every field; ratios pair
contenders round by round; one row is generate's default as it runs."""

import json
from pathlib import Path

import pytest

from coreinfer.api import LLM
from coreinfer.bench.contenders import gguf_type
from coreinfer.bench.run import ratio_spread
from coreinfer.cli.main import main
from coreinfer.engine.profile import LayerBudget, Profile

FIELDS = {"name", "prefill_tok_s", "select_compact_ms", "decode_tok_s", "bytes_per_token", "gb_s",
          "share_of_bandwidth", "note", "ttft_ms", "peak_gpu_mb", "compile_s", "vs_dense", "vs_llama_cpp"}
MET = {"target_top1_agree": 0.95, "meets_target": True, "measured": {"top1_agree": 0.96},
       "tried": [{"budget": 0.5, "ffn_read": 0.5, "ppl_ratio": 1.0, "top1_agree": 0.96}]}


def test_ratios_pair_rounds_not_medians():
    """A contender 2x its reference in every round, both slowing down together: each round's ratio is
    2.0, though the medians' ratio (30 / 20) is not."""
    ours, ref = [40.0, 30.0, 10.0], [20.0, 15.0, 5.0]
    assert ratio_spread(ours, ref) == (2.0, 2.0, 2.0)
    assert ratio_spread([3.0, 1.0, 2.0], [1.0, 1.0, 1.0]) == (2.0, 1.0, 3.0)  # median, min, max
    assert ratio_spread([], []) is None
    with pytest.raises(ValueError):
        ratio_spread([1.0], [1.0, 2.0])  # rounds must pair


def test_llama_rows_name_the_file_type_in_either_case():
    """llama.cpp's row names the type the file name announces, in upper or lower case (Hugging Face repos
    often write q4_k_m), and says "gguf" where the name announces none."""
    assert gguf_type(Path("SmolLM2-135M-Instruct.Q4_1.gguf")) == "Q4_1"
    assert gguf_type(Path("qwen2.5-coder-1.5b-instruct-q4_k_m.gguf")) == "Q4_K_M"
    assert gguf_type(Path("qwen2.5-7b-q4_k_m.Q8_0.gguf")) == "Q8_0"
    assert gguf_type(Path("model.gguf")) == "gguf"


def test_bench_json_on_tiny_model(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COREINFER_CACHE", str(tmp_path))  # generate's default finds the profile made here
    llm = LLM(str(tiny_model_dir), progress=False)
    (tmp_path / "profiles").mkdir()
    Profile.for_model(llm.model, {l: LayerBudget(keep=0.5) for l in (1, 2)}, MET).save(tmp_path / "profiles" / "tiny.json")
    rc = main(["bench", "--model", str(tiny_model_dir), "--rounds", "2", "--new-tokens", "4", "--prompt-tokens", "12",
               "--weights", "dense,int8", "--beta", "0.5", "--json", "--no-compile"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    names = [r["name"] for r in out["results"]]
    default = "coreinfer default (profile tiny.json), as generate runs it"
    assert names == ["transformers", "coreinfer dense", "coreinfer frequency keep 0.5", "coreinfer dense int8",
                     "coreinfer frequency keep 0.5 int8", default]
    for r in out["results"]:
        assert set(r) == FIELDS
        assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0
    by_name = {r["name"]: r for r in out["results"]}
    assert by_name["coreinfer frequency keep 0.5"]["bytes_per_token"] < by_name["coreinfer dense"]["bytes_per_token"]
    assert by_name["coreinfer dense int8"]["bytes_per_token"] < by_name["coreinfer dense"]["bytes_per_token"] / 2
    assert by_name["coreinfer dense"]["vs_dense"] == [1.0, 1.0, 1.0] and by_name["transformers"]["vs_dense"] is None
    median, lo, hi = by_name["coreinfer frequency keep 0.5 int8"]["vs_dense"]  # against dense int8
    assert 0 < lo <= median <= hi
    # the default: generate's format (dense fp32, eager) and the calibrated profile, read at its share
    assert "calibrated profile tiny.json" in by_name[default]["note"]
    assert by_name[default]["bytes_per_token"] < by_name["coreinfer dense"]["bytes_per_token"]
    assert by_name[default]["vs_dense"] is not None
    assert out["read_bandwidth_gb_s"] > 0
    assert set(out["breakdown_ms"]["coreinfer dense"]) == {"total", "ffn", "attention_proj", "head",
                                                          "attention_sdpa_and_overhead"}
    assert out["settings"]["prompt_tokens"] == 12


def test_table_shows_ratios_with_their_spread(tiny_model_dir, capsys):
    assert main(["bench", "--model", str(tiny_model_dir), "--rounds", "2", "--new-tokens", "3", "--prompt-tokens", "8",
                 "--beta", "0.5", "--no-compile", "--no-transformers", "--no-default"]) == 0
    out = capsys.readouterr().out
    assert "median (min-max) of the rounds' ratios" in out
    [dense] = [line for line in out.splitlines() if line.startswith("| coreinfer dense |")]
    assert "| 1.00x (1.00-1.00) |" in dense


def test_bench_rejects_bad_flags(tiny_model_dir, capsys):
    assert main(["bench", "--model", str(tiny_model_dir), "--weights", "int3"]) == 2
    assert "--weights" in capsys.readouterr().err


def test_a_profile_is_one_contender_whatever_the_beta_grid(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "tiny.json"
    llm = LLM(str(tiny_model_dir), progress=False)
    Profile.for_model(llm.model, {1: LayerBudget(keep=0.5)}, {"meets_target": True}).save(path)
    flags = ["bench", "--model", str(tiny_model_dir), "--profile", str(path), "--rounds", "1", "--new-tokens", "2",
             "--prompt-tokens", "8", "--no-transformers", "--no-llama-cpp", "--no-default", "--json"]
    assert main(flags) == 0  # bench's default --beta 0.5,0.7 named the profile's row twice
    names = [r["name"] for r in json.loads(capsys.readouterr().out)["results"]]
    assert len(names) == len(set(names)) == 2
