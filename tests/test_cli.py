"""The `coreinfer` command as a newcomer meets it: help with defaults, --compare, bad prompts and devices
refused before the model loads, Ctrl-C in chat, and the conversion cache (list, clear)."""

import argparse
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from test_loading import random_hf_weights, write_tiny_gguf

from coreinfer.api import LLM, Completion, RuntimeConfig, StreamEvent
from coreinfer.cli.args import report_speed
from coreinfer.cli.main import COMMANDS, build_parser, main
from coreinfer.engine.compiled import decode_forward, use_cache_dir
from coreinfer.engine.generate import GenerationConfig
from coreinfer.io import loading


def parsers(parser: argparse.ArgumentParser, name: str = "coreinfer"):
    """(command name, parser) for the parser and every subcommand under it."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from parsers(sub, f"{name} {sub_name}")


def test_every_command_shows_its_defaults():
    checked = 0
    for name, parser in parsers(build_parser()):
        text = parser.format_help()
        # one entry per flag: from a line starting with "  -" to the next such line or section
        entries = re.split(r"\n(?=  -|\S)", text)
        for action in parser._actions:
            d = action.default
            if not action.option_strings or d is None or d is False or d == [] or d == argparse.SUPPRESS:
                continue
            flag = re.escape(action.option_strings[0]) + r"(?![\w-])"  # --layer, not --layers
            [entry] = [e for e in entries if re.match(flag, e.lstrip())]
            assert "default" in entry, f"{name} --help: {entry.strip()!r} shows no default"
            checked += 1
    assert checked > 50


def test_generate_help_and_top_level_help(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert exit.value.code == 0
    assert "tokens to decode at most (default: 128)" in out and "0.85 when other core flags are given" in out
    assert "'auto', the default when no core flag is given" in out
    assert "--compare" in out and "--chat" in out
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    description = out.split("positional arguments")[0].split("\n\n", 1)[1].strip()
    assert description.endswith("(CoreInfer).") and "Flags map" not in out


def run_cli(*argv, timeout=120) -> subprocess.CompletedProcess:
    """`coreinfer ARGV` in a fresh process (argv items may be bytes: what a shell hands over)."""
    return subprocess.run([sys.executable, "-m", "coreinfer.cli.main", *argv], capture_output=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def test_top_level_help_and_a_mistyped_command_import_no_torch():
    """They build no subcommand, so they import neither torch nor transformers (seconds each)."""
    probe = ("import sys\nfrom coreinfer.cli.main import main\n"
             "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
             "print('exit', code, sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    for argv, code in [(["--help"], 0), (["genrate", "hi"], 2), ([], 2)]:
        done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        assert done.stdout.strip().splitlines()[-1] == f"exit {code} []", (argv, done.stdout, done.stderr)
    assert "calibrate" in run_cli("--help").stdout.decode()


def test_the_command_list_matches_each_command():
    """The one-line help the lazy command list shows is the one each command's own module declares."""
    full = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    declared = {c.dest: c.help for c in full._choices_actions}
    assert declared == {name: help for name, (_, help) in COMMANDS.items()}


def test_non_utf8_prompt_is_one_line_exit_2():
    done = run_cli("generate", b"caf\xe9 au lait", "--max-new-tokens", "2")
    [line] = done.stderr.decode().strip().splitlines()
    assert done.returncode == 2 and line.startswith("coreinfer: error: the prompt is not valid UTF-8"), line
    assert "\\xe9" in line and "character 3" in line


def test_compare_prints_both_sides_and_agreement(tiny_model_dir, capsys):
    argv = ["generate", "The press", "--model", str(tiny_model_dir), "--compare", "--max-new-tokens", "8",
            "--ignore-eos", "--beta", "0.5", "--layers", "all"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "prompt: The press" in out
    assert re.search(r"dense: [\d.]+ tok/s, 100% of weights +\| core: [\d.]+ tok/s, \d+% of weights", out), out
    match = re.search(r"agreement: at (\d+) of the 8 dense tokens \((\d+)%\)", out)
    assert match and 0 <= int(match[1]) <= 8, out
    assert "the outputs are identical" in out or "the outputs diverge at token" in out


def test_compare_agreement_is_teacher_forced(tiny_model_dir):
    """Agreement counts the dense tokens that the core model ranks first given the dense text so far;
    at keep 1.0 on every layer the core model is the dense one, so it agrees everywhere."""
    from coreinfer import LLM, CoreConfig, GenerationConfig

    llm = LLM(str(tiny_model_dir), progress=False)
    gen = GenerationConfig(max_new_tokens=10, ignore_eos=True)
    full = llm.compare("The press", gen, CoreConfig(beta=1.0, layers="all"))
    assert full.agreement == 1.0 and full.diverges_at is None and full.core.stats.share == pytest.approx(1.0)
    half = llm.compare("The press", gen, CoreConfig(beta=0.25, layers="all"))
    assert half.dense.token_ids == full.dense.token_ids and half.core.stats.share < 0.9
    # the reference: score the dense tokens through a core session, one argmax per position
    session = llm.session([llm.encode("The press")], 10, CoreConfig(beta=0.25, layers="all"))
    top = session.score([half.dense.token_ids])[0].argmax(-1)
    assert half.agreement == pytest.approx((top == torch.tensor(half.dense.token_ids)).float().mean().item())
    assert half.agreement < 1.0  # a quarter of the neurons on every layer of a random model: it must differ
    first = next(i for i, (a, b) in enumerate(zip(half.dense.token_ids, half.core.token_ids)) if a != b)
    assert half.diverges_at == first


def test_compare_refuses_dense(tiny_model_dir, capsys):
    assert main(["generate", "hi", "--model", str(tiny_model_dir), "--compare", "--dense"]) == 2
    assert "drop --dense" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["generate", "  \n\t "], "whitespace"),
    (["generate", "hi", "--device", "gpu"], "cpu, cuda or cuda:N"),
    (["generate", "hi", "--device", "cuda:x"], "cpu, cuda or cuda:N"),
    (["chat", "--device", "gpu"], "cpu, cuda or cuda:N"),
])
def test_refused_before_the_model_loads(argv, message, capsys):
    """The model path does not exist: an error about it would mean the model load came first."""
    assert main(argv + ["--model", "/nonexistent/model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("coreinfer: error:") and message in err[0], err


def test_cuda_without_cuda_is_one_line_before_loading(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1"):
        assert main(["generate", "hi", "--device", device, "--model", "/nonexistent/model"]) == 2
        [line] = capsys.readouterr().err.strip().splitlines()
        assert "no CUDA device is available" in line and "nonexistent" not in line


def test_cuda_index_out_of_range(monkeypatch):
    """As if CUDA existed with one device: cuda and cuda:0 pass, cuda:1 names the devices there are."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for ok in ("cuda", "cuda:0", "cpu"):
        assert RuntimeConfig(device=ok).device == ok
    with pytest.raises(ValueError, match=r"'cuda:1' does not exist: this machine has 1 CUDA device\(s\), cuda:0"):
        RuntimeConfig(device="cuda:1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert RuntimeConfig(device="cuda:1").device == "cuda:1"


@pytest.mark.parametrize("tokens, decode_s", [(0, 1e-4), (1, 1e-4), (0, 0.0)])
def test_no_negative_decode_rate(tokens, decode_s, capsys):
    """0 tokens (EOS first) or 1 (it comes from the prefill) have no decode rate: shown as '-'."""
    c = Completion("", list(range(tokens)), "stop", prompt_tokens=3, prefill_s=0.01, decode_s=decode_s)
    assert c.decode_tok_s == 0.0
    report_speed(c)
    assert f"decode {tokens} tok at - tok/s" in capsys.readouterr().err
    two = Completion("ab", [5, 6], "length", prompt_tokens=3, prefill_s=0.01, decode_s=0.5)
    assert two.decode_tok_s == pytest.approx(2.0)


def test_divergence_wording():
    from coreinfer.cli.generate import divergence

    assert divergence(None) == "the outputs are identical"
    assert divergence(0) == "the outputs differ from the first token on"
    assert divergence(1) == "the outputs diverge at token 2 (the first is the same)"
    assert divergence(5) == "the outputs diverge at token 6 (the first 5 are the same)"


def test_stats_line_shows_compiling_apart_and_counts_threads(capsys):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        report_speed(Completion("abc", [5, 6, 7], "length", 3, prefill_s=0.01, decode_s=0.05, compile_s=95.0))
        line = capsys.readouterr().err
        assert "decode 3 tok at 40.0 tok/s (+ 95.0 s compiling or loading the decode step, not counted)" in line
        assert line.rstrip().endswith(", 1 thread")
        torch.set_num_threads(2)
        report_speed(Completion("abc", [5, 6, 7], "length", 3, prefill_s=0.01, decode_s=0.05))
        line = capsys.readouterr().err
        assert "compiling" not in line and line.rstrip().endswith(", 2 threads")
    finally:
        torch.set_num_threads(threads)


class SlowFirstStep:
    """A decode step whose first call stands for a compile: it waits `first_s` and counts it in compile_s,
    as CompiledStep does."""

    def __init__(self, model, first_s: float):
        self.model, self.first_s, self.compile_s = model, first_s, 0.0

    def __call__(self, *inputs):
        if not self.compile_s:
            time.sleep(self.first_s)
            self.compile_s = self.first_s
        return decode_forward(self.model, *inputs)


def test_decode_time_excludes_compiling(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), progress=False)
    llm.compiled = SlowFirstStep(llm.model, first_s=1.5)
    [first] = llm.generate("The press", GenerationConfig(max_new_tokens=6, ignore_eos=True))
    assert first.compile_s == 1.5 and first.decode_s < 1.5  # eight tiny steps take milliseconds
    [warm] = llm.generate("The press", GenerationConfig(max_new_tokens=6, ignore_eos=True))
    assert warm.compile_s == 0.0 and warm.token_ids == first.token_ids


def test_precompiled_headers_go_to_the_cache(tmp_path, monkeypatch):
    """Inductor fixes its precompiled-header folder in the system temp dir; use_cache_dir moves it."""
    from torch._inductor import codecache

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    for name in ("_HEADER_DIR", "_HEADER_LOCK_DIR"):
        monkeypatch.setattr(codecache, name, getattr(codecache, name))  # restored after the test
    use_cache_dir(tmp_path / "inductor")
    assert codecache._HEADER_DIR == str(tmp_path / "inductor" / "precompiled_headers")
    assert codecache._HEADER_LOCK_DIR.startswith(codecache._HEADER_DIR)


def test_cli_zero_tokens_reports_no_rate(tiny_model_dir, capsys):
    assert main(["generate", "The press", "--model", str(tiny_model_dir), "--max-new-tokens", "0"]) == 0
    assert "decode 0 tok at - tok/s" in capsys.readouterr().err


class FakeLLM:
    """Streams scripted replies; a reply given as an exception raises it mid-stream, as Ctrl-C would."""

    replies = []
    seen = []  # the messages each reply was asked for

    def __init__(self, **runtime):
        pass

    def default_core(self):
        return None, "core neurons: no calibrated profile for this model, decoding dense"

    def runtime_line(self):
        return "weights dense, eager"

    def stream(self, messages, gen, core):
        FakeLLM.seen.append([dict(m) for m in messages])
        reply = FakeLLM.replies.pop(0)
        yield StreamEvent(0, reply[0])
        if isinstance(reply[1], BaseException):
            raise reply[1]
        yield StreamEvent(0, reply[1], Completion(reply[0] + reply[1], [1, 2, 3], "stop", 4, 0.1, 0.1))


def scripted_input(monkeypatch, lines):
    """input() returns `lines` in turn; an exception in the list is raised instead (Ctrl-C, Ctrl-D)."""
    calls = []

    def fake_input(prompt=""):
        calls.append(prompt)
        line = lines.pop(0)
        if isinstance(line, BaseException):
            raise line
        return line

    monkeypatch.setattr("builtins.input", fake_input)
    return calls


def test_ctrl_c_stops_the_reply_then_quits_at_the_prompt(monkeypatch, capsys):
    monkeypatch.setattr("coreinfer.api.LLM", FakeLLM)
    FakeLLM.replies, FakeLLM.seen = [("Hel", KeyboardInterrupt()), ("Fine", ", thanks")], []
    calls = scripted_input(monkeypatch, ["hello", "how are you?", KeyboardInterrupt()])
    assert main(["chat"]) == 0  # the Ctrl-C at the prompt quits cleanly
    out, err = capsys.readouterr()
    assert len(calls) == 3  # back at the prompt after the stopped reply, and once more after the second
    assert "[reply stopped]" in err and "Hel" in out and "Fine, thanks" in out
    # the stopped reply's shown part stays in the conversation the next turn continues
    assert FakeLLM.seen[1] == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "Hel"},
                               {"role": "user", "content": "how are you?"}]


@pytest.mark.parametrize("line", ["", "   \t", EOFError()])
def test_chat_quits_on_empty_or_whitespace_line_or_ctrl_d(line, monkeypatch, capsys):
    monkeypatch.setattr("coreinfer.api.LLM", FakeLLM)
    FakeLLM.replies, FakeLLM.seen = [], []
    scripted_input(monkeypatch, [line])
    assert main(["chat"]) == 0 and FakeLLM.seen == []


def test_chat_skips_a_non_utf8_line_and_goes_on(monkeypatch, capsys):
    monkeypatch.setattr("coreinfer.api.LLM", FakeLLM)
    FakeLLM.replies, FakeLLM.seen = [("Hi", "!")], []
    scripted_input(monkeypatch, ["caf\udce9", "hello", ""])  # what a Latin-1 terminal's "café" arrives as
    assert main(["chat"]) == 0
    assert "the message is not valid UTF-8 (bytes b'\\xe9' at character 3)" in capsys.readouterr().err
    assert FakeLLM.seen == [[{"role": "user", "content": "hello"}]]


def test_api_refuses_whitespace_prompt(tiny_model_dir):
    from coreinfer import LLM, GenerationConfig

    llm = LLM(str(tiny_model_dir), progress=False)
    for prompt in ("", " ", "\n\t  \n"):
        with pytest.raises(ValueError, match="empty or only whitespace"):
            llm.generate(prompt, GenerationConfig(max_new_tokens=2))


# --- the conversion cache ---

@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COREINFER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_conversion_names_the_cache_then_list_and_clear(tmp_path, cache, capsys):
    gguf_file = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf_file, "llama", random_hf_weights("llama", {"tie_word_embeddings": False}))
    loading.load_checkpoint(gguf_file, progress=True)
    err = capsys.readouterr().err
    [entry] = loading.cache_entries()
    assert f"into {cache / entry.name}" in err and f"`coreinfer cache clear {entry.name}`" in err
    assert entry.name.startswith("tiny-") and entry.nbytes > 0

    (cache / "notes.txt").write_text("not ours")  # neither listed nor cleared
    (cache / "other").mkdir()
    assert main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    assert f"cache folder: {cache}" in out
    assert re.search(rf"\d+\.\d MB  {entry.name}\n", out) and "total, 1 entry;" in out
    assert "notes.txt" not in out and "other" not in out

    assert main(["cache", "clear", entry.name]) == 0
    assert f"removed {entry.name}" in capsys.readouterr().err
    assert loading.cache_entries() == [] and (cache / "notes.txt").exists() and (cache / "other").exists()


def test_cache_clear_all_and_errors(cache, capsys):
    converted = cache / "model-0123456789ab"
    converted.mkdir(parents=True)
    (converted / "model.safetensors").write_bytes(b"x" * 2_000_000)
    (cache / "joined.gguf").write_bytes(b"y" * 1000)
    stale = cache / ".model-0123456789ab.partial-999999999-abc"  # no such process: an interrupted run's
    stale.mkdir()
    (cache / "keep.txt").write_text("not ours")
    names = [e.name for e in loading.cache_entries()]
    assert sorted(names) == sorted([converted.name, "joined.gguf", stale.name])

    for argv, message in [(["cache", "clear"], "one NAME"), (["cache", "clear", "x", "--all"], "one NAME"),
                          (["cache", "clear", "nosuch"], "no cache entry named 'nosuch'")]:
        assert main(argv) == 2
        [line] = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("coreinfer: error:") and message in line
    assert main(["cache", "list"]) == 0
    assert "2.0 MB  model-0123456789ab" in capsys.readouterr().out
    assert main(["cache", "clear", "--all"]) == 0
    assert loading.cache_entries() == [] and sorted(p.name for p in cache.iterdir()) == ["keep.txt"]
    assert main(["cache", "list"]) == 0 and "0 entries" in capsys.readouterr().out


def test_cache_lists_and_clears_compiled_and_native_folders(cache, capsys):
    (cache / "inductor" / "precompiled_headers").mkdir(parents=True)
    (cache / "inductor" / "precompiled_headers" / "h.gch").write_bytes(b"x" * 3_000_000)
    (cache / "native").mkdir()
    (cache / "native" / "kernels-ab.so").write_bytes(b"y" * 500_000)
    assert main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"3\.0 MB  inductor/  compiled decode steps", out) and re.search(r"0\.5 MB  native/", out)
    assert "3.5 MB  total, 2 entries" in out
    assert main(["cache", "clear", "inductor"]) == 0
    assert "removed inductor/ (3.0 MB)" in capsys.readouterr().err and not (cache / "inductor").exists()
    assert main(["cache", "clear", "--all"]) == 0 and not (cache / "native").exists()
    assert main(["cache", "list"]) == 0 and "0 entries" in capsys.readouterr().out
