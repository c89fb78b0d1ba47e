"""The benchmark runs end to end on a tiny random model and emits JSON with every field."""

import json

from coreinfer.cli.main import main

FIELDS = {"name", "prefill_tok_s", "select_compact_ms", "decode_tok_s", "bytes_per_token", "gb_s",
          "share_of_bandwidth", "note", "ttft_ms", "peak_gpu_mb", "compile_s"}


def test_bench_json_on_tiny_model(tiny_model_dir, capsys):
    rc = main(["bench", "--model", str(tiny_model_dir), "--rounds", "1", "--new-tokens", "4", "--prompt-tokens", "12",
               "--weights", "dense,int8", "--beta", "0.5", "--json", "--no-compile"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    names = [r["name"] for r in out["results"]]
    assert names == ["transformers", "coreinfer dense", "coreinfer frequency keep 0.5", "coreinfer dense int8",
                     "coreinfer frequency keep 0.5 int8"]
    for r in out["results"]:
        assert set(r) == FIELDS
        assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0
    by_name = {r["name"]: r for r in out["results"]}
    assert by_name["coreinfer frequency keep 0.5"]["bytes_per_token"] < by_name["coreinfer dense"]["bytes_per_token"]
    assert by_name["coreinfer dense int8"]["bytes_per_token"] < by_name["coreinfer dense"]["bytes_per_token"] / 2
    assert out["read_bandwidth_gb_s"] > 0
    assert set(out["breakdown_ms"]["coreinfer dense"]) == {"total", "ffn", "attention_proj", "head",
                                                          "attention_sdpa_and_overhead"}
    assert out["settings"]["prompt_tokens"] == 12


def test_bench_rejects_bad_flags(tiny_model_dir, capsys):
    assert main(["bench", "--model", str(tiny_model_dir), "--weights", "int3"]) == 2
    assert "--weights" in capsys.readouterr().err
