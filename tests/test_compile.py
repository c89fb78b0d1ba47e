"""The compiled decode step decodes what eager decodes: across prompts whose core sets differ (the
per-prompt core rows are graph inputs, not constants frozen on the first prompt), in a batch of 2 and
in a bucketed batch of 3, and eager again when compiling fails; compiled in the background, eager up to
the switch and compiled after it."""

import os

import pytest
import torch
import transformers

from coreinfer.api import RuntimeConfig, default_threads, physical_cores
from coreinfer.engine import rows
from coreinfer.engine.adaptive import AdaptiveFFN, AdaptivePolicy, Plan
from coreinfer.engine.compact import CoreWeights
from coreinfer.engine.background import BackgroundStep
from coreinfer.engine.compiled import CompiledStep, batch_bucket, use_cache_dir
from coreinfer.engine.policy import CoreConfig, StabilityPolicy
from coreinfer.engine.quant import quantize_model
from coreinfer.engine.selection import keep_count
from coreinfer.engine.session import Session, stability_policy
from coreinfer.models.common import KVCache
from oracle import hf_pair

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
PROMPTS = [[5, 17, 3, 88, 42, 9, 61, 2, 33], [7, 21, 64, 30, 11, 80]]
STEPS = 8


@pytest.fixture(scope="module")
def model():
    _, m = hf_pair(transformers.LlamaConfig(**TINY))
    quantize_model(m)
    return m


def greedy(model, prompts, policy, compiled, cores):
    """Greedy tokens [B, STEPS] and the session, through `compiled` (None: eager)."""
    session = Session(model, prompts, STEPS, policy=policy, cores=cores, compiled=compiled)
    token, out = session.prefill().argmax(-1), []
    for _ in range(STEPS):
        out.append(token)
        token = session.step(token).argmax(-1)
    return torch.stack(out, 1), session


def test_compiled_equals_eager_across_prompts_and_batch(model):
    """The freezing trap: the second prompt's core set differs from the first's, and the compiled
    step (max-autotune freezes the model's weights) must read the second prompt's rows."""
    policy = stability_policy(CoreConfig(beta=0.5, layers="1-2"), model)
    compiled, cores = CompiledStep(model, mode="max-autotune"), CoreWeights()
    runs = [[PROMPTS[0]], [PROMPTS[1]], PROMPTS]  # one after the other, then a batch of 2
    for prompts in runs:
        eager, ref = greedy(model, prompts, policy, None, CoreWeights())
        fast, session = greedy(model, prompts, policy, compiled, cores)
        print(f"prompts {len(prompts)}: eager {eager.tolist()} compiled {fast.tolist()}")
        assert torch.equal(fast, eager)
        for layer, ids in ref.selection.index.items():
            assert torch.equal(session.selection.index[layer], ids)
    sets = [greedy(model, [p], policy, None, CoreWeights())[1].selection.index[1] for p in PROMPTS]
    assert not torch.equal(sets[0], sets[1])  # the two prompts did need different rows
    assert compiled.failed is None and compiled.compile_s > 0
    assert len(compiled.seen) == 2  # batch 1 and batch 2: the second prompt reused the first's graph


@pytest.mark.parametrize("by_rows", [False, True], ids=["masked", "rows"])
def test_compiled_default_equals_eager_default_on_two_prompts(model, by_rows, monkeypatch):
    """A calibrated profile's plans (the whole FFN as superset, per-token down rows and input
    sparsity) on int8, compiled: two prompts one after the other, token for token against eager."""
    monkeypatch.setattr(rows, "reads_rows", lambda: by_rows)
    width = model.ffns()[0].width
    base = StabilityPolicy({1: 1.0, 2: 1.0}, width)
    policy = AdaptivePolicy(base, {1: Plan(keep_count(0.6, width), 0.75), 2: Plan(keep_count(0.5, width))})
    compiled, cores = CompiledStep(model), CoreWeights()
    for prompts in ([PROMPTS[0]], [PROMPTS[1]]):
        eager, ref = greedy(model, prompts, policy, None, CoreWeights())
        fast, session = greedy(model, prompts, policy, compiled, cores)
        print(f"eager {eager.tolist()} compiled {fast.tolist()}")
        assert torch.equal(fast, eager)
        assert isinstance(session.cores.get(1), AdaptiveFFN)
        assert (session.stats.share < 1) == by_rows  # masked coefficients read every row, and say so
    assert compiled.failed is None and len(compiled.seen) == 1


def test_compiled_int4_equals_eager_across_prompts():
    """int4 compiles by default too (its own mode, `default_mode`): the same two prompts with different
    core sets, then both as a batch, token for token against eager."""
    _, model = hf_pair(transformers.LlamaConfig(**TINY))
    quantize_model(model, "int4")
    assert model.ffns()[0].format == "int4"
    policy = stability_policy(CoreConfig(beta=0.5, layers="1-2"), model)
    compiled, cores = CompiledStep(model), CoreWeights()
    for prompts in ([PROMPTS[0]], [PROMPTS[1]], PROMPTS):
        eager, _ = greedy(model, prompts, policy, None, CoreWeights())
        fast, _ = greedy(model, prompts, policy, compiled, cores)
        assert torch.equal(fast, eager)
    assert compiled.failed is None and len(compiled.seen) == 2


def test_batches_run_in_power_of_two_buckets(tiny_model_dir):
    """Three prompts run as a batch of 4 (the fourth a copy of the third, dropped): one graph serves
    batches of 3 and 4, and every prompt decodes what eager decodes."""
    from coreinfer import LLM, GenerationConfig

    assert [batch_bucket(n) for n in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, 16]
    gen, texts = GenerationConfig(max_new_tokens=6, ignore_eos=True), ["The capital", "a b", "Scholars argue about"]
    fast = LLM(str(tiny_model_dir), weights="int8", progress=False, background_compile=False)
    eager = LLM(str(tiny_model_dir), weights="int8", compile=False, progress=False)
    got = fast.generate(texts, gen, core=None)
    assert [c.token_ids for c in got] == [c.token_ids for c in eager.generate(texts, gen, core=None)]
    fast.generate(texts + ["more"], gen, core=None)
    assert {key[0] for key in fast.compiled.seen} == {(4, 1)}  # token shapes [B, 1]: only the bucket


def test_more_shapes_than_dynamos_recompile_limit(model):
    """Each shape is one more compiled entry of the same code; dynamo's limit (8 by default, an error
    under fullgraph) must not end a process that meets many shapes (a bench grid, a server)."""
    compiled = CompiledStep(model)
    with torch._dynamo.config.patch(recompile_limit=1):
        for prompts in ([PROMPTS[0]], PROMPTS):  # batch 1, then 2: an entry past a limit of 1
            fast, _ = greedy(model, prompts, None, compiled, CoreWeights())
            assert torch.equal(fast, greedy(model, prompts, None, None, CoreWeights())[0])
    assert compiled.failed is None and len(compiled.seen) == 2


def test_falls_back_to_eager_without_a_compiler(model):
    lines = []
    compiled = CompiledStep(model, log=lines.append)
    with torch._inductor.config.patch({"cpp.cxx": (None, "/nonexistent/c++")}):
        torch._dynamo.reset()
        fast, _ = greedy(model, [PROMPTS[0]], None, compiled, CoreWeights())
    eager, _ = greedy(model, [PROMPTS[0]], None, None, CoreWeights())
    assert torch.equal(fast, eager)
    assert compiled.failed and any("decoding eager instead" in line for line in lines)


def stepped(model, prompts, step, wait_after: int):
    """Greedy tokens [B, STEPS] through a BackgroundStep, waiting for its compile after `wait_after`
    steps, so that the switch comes at a step the test knows."""
    session = Session(model, prompts, STEPS, compiled=step)
    token, out = session.prefill().argmax(-1), []
    for i in range(STEPS):
        out.append(token)
        token = session.step(token).argmax(-1)
        if i + 1 == wait_after:
            assert step.wait(600)
    return torch.stack(out, 1)


def test_background_compile_decodes_eager_then_compiled(model):
    """The first steps run eager while the worker compiles, the rest compiled: the tokens are eager's
    and compiled's (equal on this model), the decoding thread never waited, one line said so."""
    lines = []
    step = BackgroundStep(CompiledStep(model, log=lines.append))
    got = stepped(model, [PROMPTS[0]], step, wait_after=3)
    eager, _ = greedy(model, [PROMPTS[0]], None, None, CoreWeights())
    fast, _ = greedy(model, [PROMPTS[0]], None, CompiledStep(model), CoreWeights())
    print(f"background {got.tolist()}: {step.eager_steps} eager, {step.compiled_steps} compiled, "
          f"compiled in {step.background_s:.1f} s")
    assert torch.equal(got, eager) and torch.equal(got, fast)
    assert 1 <= step.eager_steps <= 3 and step.eager_steps + step.compiled_steps == STEPS
    assert step.failed is None and step.compile_s == 0 and step.background_s > 0 and len(step.seen) == 1
    assert len(lines) == 1 and "in the background" in lines[0]


def test_a_failing_background_compile_stays_eager_with_one_line(model):
    lines = []
    step = BackgroundStep(CompiledStep(model, log=lines.append))
    # no C++ compiler, no cache entry to load instead (fx_graph_cache, and a batch of 3 no other test runs)
    prompts = [*PROMPTS, PROMPTS[0]]
    with torch._inductor.config.patch({"cpp.cxx": (None, "/nonexistent/c++"), "fx_graph_cache": False}), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        torch._dynamo.reset()
        got = stepped(model, prompts, step, wait_after=1)
    eager, _ = greedy(model, prompts, None, None, CoreWeights())
    print(lines)
    assert torch.equal(got, eager) and step.eager_steps == STEPS and step.compiled_steps == 0
    assert step.failed and [line for line in lines if "decoding eager instead" in line] == lines[1:]
    assert len(lines) == 2


def test_stats_line_splits_the_rate_at_the_switch(capsys):
    from coreinfer.api import Completion
    from coreinfer.cli.args import report_speed

    ids = list(range(11))  # 10 decode steps: 4 eager in 0.4 s, 6 compiled in 0.2 s
    report_speed(Completion("x", ids, "length", 3, prefill_s=0.1, decode_s=0.6, eager_steps=4, eager_s=0.4))
    line = capsys.readouterr().err
    assert "decode 11 tok at 16.7 tok/s (4 eager at 10.0 tok/s while the compiled step built in the background, " \
           "then 6 compiled at 30.0 tok/s)" in line
    report_speed(Completion("x", ids, "length", 3, prefill_s=0.1, decode_s=0.6, eager_steps=10, eager_s=0.6))
    assert "(10 eager at 16.7 tok/s while the compiled step built in the background, not ready before the end)" \
        in capsys.readouterr().err


def test_default_mode_follows_the_int8_kernel(model, monkeypatch):
    """cpp-wrapper where the native GEMV does the int8 matmuls (freezing buys nothing and costs the warm
    start), max-autotune (prepacked weights) where PyTorch's kernels do."""
    from coreinfer.engine import compiled, gemv

    monkeypatch.setattr(gemv, "available", lambda: True)
    assert compiled.default_mode(model) == "cpp-wrapper"
    monkeypatch.setattr(gemv, "available", lambda: False)
    assert compiled.default_mode(model) == "max-autotune"
    _, fp32 = hf_pair(transformers.LlamaConfig(**TINY))
    assert compiled.default_mode(fp32) == "max-autotune"


def test_compiled_by_default_where_it_pays():
    """int8 and int4 on the CPU: on by default (later starts load the compiled step, see below); else off."""
    assert RuntimeConfig(weights="int8").compiles()  # where it pays: on by default
    assert RuntimeConfig(weights="int4").compiles()
    assert not RuntimeConfig(weights="dense").compiles()  # fp32: little to gain
    assert RuntimeConfig().compiles()  # the default on the CPU: the embedded GGUF in its own block formats
    assert not RuntimeConfig(weights="int8", compile=False).compiles()
    assert RuntimeConfig(weights="int8", compile=True).compiles()


def test_default_threads_are_free_physical_cores():
    assert 1 <= default_threads() <= physical_cores() <= len(os.sched_getaffinity(0))


def test_inductor_cache_under_ours_unless_the_user_chose(monkeypatch, tmp_path):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what torch writes on first use
    use_cache_dir(tmp_path / "ours")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "ours")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "theirs"))
    use_cache_dir(tmp_path / "ours")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "theirs")


WARM_START = """
import json, sys
sys.path.insert(0, {tests!r})
import torch, transformers
from torch._dynamo.utils import counters
from coreinfer.engine import rows
from coreinfer.engine.adaptive import AdaptiveFFN, AdaptivePolicy, Plan
from coreinfer.engine.compact import CoreWeights
from coreinfer.engine.compiled import CompiledStep
from coreinfer.engine.policy import CoreConfig, StabilityPolicy
from coreinfer.engine.quant import quantize_model
from coreinfer.engine.selection import keep_count
from coreinfer.engine.session import Session, stability_policy
from coreinfer.models.common import KVCache
from oracle import hf_pair
_, model = hf_pair(transformers.LlamaConfig(**{tiny!r}))
quantize_model(model)
policy = stability_policy(CoreConfig(beta=0.5, layers="1-2"), model)
session = Session(model, [[5, 17, 3, 88]], 2, policy=policy, cores=CoreWeights(), compiled=CompiledStep(model))
session.step(session.prefill().argmax(-1))
print(json.dumps(dict(counters["inductor"])))
"""


def test_a_second_process_loads_the_compiled_step_from_the_cache(tmp_path):
    """The warm start: inductor's FX-graph cache must hit in a new process (frozen weights included),
    or every start of `coreinfer generate --weights int8` compiles for minutes again."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = WARM_START.format(tests=str(Path(__file__).parent), tiny=TINY)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "OMP_NUM_THREADS": "1"}
    runs = [json.loads(subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                                      check=True, timeout=600).stdout.splitlines()[-1]) for _ in range(2)]
    print(runs)
    assert runs[0].get("fxgraph_cache_miss", 0) >= 1  # a fresh cache compiles
    assert runs[1].get("fxgraph_cache_hit", 0) >= 1 and not runs[1].get("fxgraph_cache_miss")


def test_kv_cache_writes_in_place_what_a_per_row_copy_writes():
    """KVCache.update (an index_put_, which the compiled step writes in place) against a per-row slice
    copy: rows at different slots (a continuous batch) and several new tokens (a prefill chunk); eager and
    compiled; the returned views are the cache's own storage."""
    torch.manual_seed(0)
    B, H, S, hd, T = 2, 2, 16, 8, 3
    slots = torch.tensor([[4, 5, 6], [9, 10, 11]])  # [B, T]
    k, v = torch.randn(B, H, T, hd), torch.randn(B, H, T, hd)
    want_k, want_v = torch.randn(B, H, S, hd), torch.randn(B, H, S, hd)
    start_k, start_v = want_k.clone(), want_v.clone()
    for b in range(B):
        want_k[b, :, slots[b]] = k[b]
        want_v[b, :, slots[b]] = v[b]

    def write(cache, slots, k, v):
        return cache.update(slots, k, v, kv_len=12)

    for fn in (write, torch.compile(write, fullgraph=True, dynamic=False)):
        cache = KVCache(B, H, S, hd, torch.float32, "cpu")
        cache.k.copy_(start_k), cache.v.copy_(start_v)
        out_k, out_v = fn(cache, slots, k, v)
        assert torch.equal(cache.k, want_k) and torch.equal(cache.v, want_v)
        assert torch.equal(out_k, want_k[:, :, :12]) and out_k.data_ptr() == cache.k.data_ptr()
