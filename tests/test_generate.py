"""Generation through the API and the CLI: the real embedded model against transformers, batching,
sampling, stop strings, streaming, and clear errors for bad input."""

import pytest
import torch
import transformers

from coreinfer import LLM, CoreConfig, GenerationConfig
from coreinfer.cli.main import main
from coreinfer.engine.generate import filter_logits
from coreinfer.io.loading import load_checkpoint
from oracle import hf_from_checkpoint

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def smol():
    return LLM(progress=False, weights="dense")  # fp32: compared with transformers


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return LLM(str(tiny_model_dir), progress=False)


def test_greedy_equals_transformers_on_embedded_model(smol):
    ckpt = load_checkpoint(None, progress=False)
    hf = hf_from_checkpoint(ckpt)
    for prompt in PROMPTS:
        ids = smol.tokenizer.encode(prompt)
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
        [ours] = smol.generate(prompt, GenerationConfig(max_new_tokens=32))
        if ref[-1] in smol.tokenizer.eos_ids:  # both stop at EOS; ours does not count it as text
            ref = ref[:-1]
            assert ours.finish_reason == "stop"
        assert len(ref) >= 16 and ours.token_ids == ref, prompt


def test_cli_names_paris(capsys):
    # the default format and profile, eager here (a compile of the real model takes minutes)
    assert main(["generate", "The capital of France is", "--max-new-tokens", "12", "--no-compile"]) == 0
    captured = capsys.readouterr()
    assert "Paris" in captured.out
    assert "decode" in captured.err and "tok/s" in captured.err
    assert "weights auto (FFN q4, down q8_0), eager; core neurons: calibrated profile SmolLM2-135M-Instruct.q4.json" \
        in captured.err


def test_batch_equals_each_prompt_alone(smol):
    gen = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    for core in (None, CoreConfig(beta=0.5)):
        batched = smol.generate(PROMPTS, gen, core)
        alone = [smol.generate(p, gen, core)[0] for p in PROMPTS]
        assert [b.token_ids for b in batched] == [a.token_ids for a in alone]


def test_core_decoding_reports_stats(smol):
    [out] = smol.generate(PROMPTS[0], GenerationConfig(max_new_tokens=4), CoreConfig(beta=0.5))
    stats = out.stats
    assert set(stats.core_sizes) == set(range(3, 28)) and set(stats.core_sizes.values()) == {768}
    assert 0.5 < stats.bytes_core / stats.bytes_dense < 0.9
    assert stats.select_ms > 0 and stats.compact_ms > 0


def test_sampling_is_seeded(tiny):
    gen = GenerationConfig(max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.9, seed=7, ignore_eos=True)
    a, b = tiny.generate("The press", gen)[0], tiny.generate("The press", gen)[0]
    c = tiny.generate("The press", GenerationConfig(**{**gen.__dict__, "seed": 8}))[0]
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids


def test_top_k_one_is_greedy(tiny):
    greedy = tiny.generate("The press", GenerationConfig(max_new_tokens=10, ignore_eos=True))[0]
    topk1 = tiny.generate("The press", GenerationConfig(max_new_tokens=10, temperature=0.7, top_k=1, seed=1,
                                                         ignore_eos=True))[0]
    assert greedy.token_ids == topk1.token_ids


def test_stop_strings_and_streaming(tiny):
    full = tiny.generate("The press", GenerationConfig(max_new_tokens=24, ignore_eos=True))[0]
    stop = full.text[6:9]
    cut = tiny.generate("The press", GenerationConfig(max_new_tokens=24, ignore_eos=True, stop=(stop,)))[0]
    assert cut.text == full.text[:full.text.index(stop)] and cut.finish_reason == "stop"
    pieces = [e.text for e in tiny.stream("The press", GenerationConfig(max_new_tokens=24, ignore_eos=True))]
    assert "".join(pieces) == full.text and len([p for p in pieces if p]) > 1


def test_max_new_tokens_zero_and_length(tiny):
    assert tiny.generate("The press", GenerationConfig(max_new_tokens=0))[0].token_ids == []
    out = tiny.generate("The press", GenerationConfig(max_new_tokens=5, ignore_eos=True))[0]
    assert out.completion_tokens == 5 and out.finish_reason == "length"


def test_chat_template(tiny):
    ids = tiny.encode("hello", chat=True)
    assert tiny.tokenizer.hf.decode(ids).endswith("<|assistant|>")


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=-1), "max_new_tokens"), (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-3), "top_k"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
])
def test_bad_sampling_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**kwargs)


def test_empty_prompt_and_too_long(tiny):
    with pytest.raises(ValueError, match="empty"):
        tiny.generate("", GenerationConfig(max_new_tokens=2))
    with pytest.raises(ValueError, match="context"):
        tiny.generate("The press " * 200, GenerationConfig(max_new_tokens=2))


@pytest.mark.parametrize("argv, message", [
    (["generate", "", "--model", "{tiny}"], "empty"),
    (["generate", "hi", "--model", "{tiny}", "--max-new-tokens", "-1"], "max_new_tokens"),
    (["generate", "hi", "--model", "{tiny}", "--top-p", "2"], "top_p"),
    (["generate", "hi", "--model", "{tiny}", "--beta", "0"], "beta"),
    (["generate", "hi", "--model", "{tiny}", "--layers", "7-9"], "out of range"),
    (["generate", "hi", "--model", "/nonexistent/model"], "nonexistent"),
    (["generate", "hi", "--model", "{tiny}", "--dtype", "fp8"], "dtype"),
    (["generate", "hi", "--model", "{tiny}", "--weights", "int3"], "weights"),
])
def test_cli_errors_are_one_clear_line(argv, message, tiny_model_dir, capsys):
    argv = [a.format(tiny=tiny_model_dir) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("coreinfer: error:") and message in err[0]


def test_chat_command_streams_turns(tiny_model_dir, monkeypatch, capsys):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nand again\n"))
    assert main(["chat", "--model", str(tiny_model_dir), "--max-new-tokens", "6", "--ignore-eos", "--dense"]) == 0
    err = capsys.readouterr().err
    assert err.count("decode 6 tok") == 2  # two turns, each reporting its speed


@pytest.mark.parametrize("kwargs", [dict(top_p=0.8), dict(top_k=7), dict(repetition_penalty=1.3),
                                    dict(top_k=20, top_p=0.6, repetition_penalty=0.8, temperature=0.7)])
def test_filters_equal_transformers_logits_processors(kwargs):
    """Repetition penalty, temperature, top-k and top-p against transformers' own processors, in the
    order its `generate` applies them; the same tokens survive with the same scores."""
    from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                              TopKLogitsWarper, TopPLogitsWarper)

    gen = GenerationConfig(**{"temperature": 1.0, **kwargs})
    torch.manual_seed(0)
    logits, history = torch.randn(3, 200) * 3, torch.randint(0, 200, (3, 12))
    chain = LogitsProcessorList()
    if gen.repetition_penalty != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(gen.repetition_penalty))
    chain.append(TemperatureLogitsWarper(gen.temperature))
    if gen.top_k:
        chain.append(TopKLogitsWarper(gen.top_k))
    if gen.top_p < 1.0:
        chain.append(TopPLogitsWarper(gen.top_p))
    ref = chain(history, logits.clone())
    ours = filter_logits(logits, gen, history, prompt_len=0)
    assert torch.equal(ours.isinf(), ref.isinf())
    kept = ~ref.isinf()
    assert 1 < int(kept.sum()) and torch.allclose(ours[kept], ref[kept])
