"""The CPU memory-limited mode (`--max-memory`, engine/residency.py) on a tiny random model saved as
safetensors and memory-mapped back, and on a tiny random GGUF whose FFNs stay in the file and are
converted layer by layer into block formats (engine/ffn_file.py): the FFN weights stay in the file,
the plan counts what is resident, prefill evicts each layer's file pages once its core rows are
gathered (mincore says so), decoding touches none of them, a budget too small says in one line which
keep fits, and the output equals the ordinary session's at the same keep."""

import os

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from coreinfer.engine.budget import plan, resident_bytes
from coreinfer.engine.policy import CoreConfig
from coreinfer.engine.residency import FileStreamer, ResidentSession, cached_bytes, mapped_from_file, open_streamer
from coreinfer.engine.selection import keep_count
from coreinfer.engine.session import cache_length, stability_policy
from coreinfer.models import build_model
from oracle import hf_pair, our_logits

# FFN tensors of 64 KiB (16 pages each), so dropping whole pages leaves at most 2 boundary pages
TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
PROMPTS = [[5, 17, 3, 88, 42, 9, 61, 2, 33, 12, 70], [7, 21, 64]]
CONTS = [[11, 4, 90, 23, 6], [50, 8, 19, 70, 2]]
CORE = CoreConfig(alpha=0.4, beta=0.25, layers="1-2")  # layers 0 and 3 stay dense
CACHE = cache_length(len(PROMPTS[0]) + 5, TINY["max_position_embeddings"])
BIG = 1 << 40


@pytest.fixture
def mapped(tmp_path):
    """(the model built from tensors memory-mapped from a safetensors file, the same model in RAM, the file)."""
    hf, in_ram = hf_pair(transformers.Qwen2Config(**TINY))
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(path))
    with open(path, "rb") as f:  # on disk and out of memory, as a model file is before it loads: pages
        os.fsync(f.fileno())      # that writing left in the page cache do not all leave it on request
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return build_model(hf.config.to_dict(), load_file(str(path)), contiguous=False), in_ram, path


def resident_logits(m, policy, budget=BIG):
    session = ResidentSession(m, PROMPTS, 5, policy=policy, budget=budget, streamer=FileStreamer(m))
    pre = session.prefill(all_logits=True)
    T0 = session.batch.prompt_len
    rows = [[pre[b, T0 - len(p):]] for b, p in enumerate(PROMPTS)]
    after_prefill = session.streamer.cached_bytes()
    for step in range(5):
        logits = session.step(torch.tensor([c[step] for c in CONTS]))
        for b in range(len(PROMPTS)):
            rows[b].append(logits[b:b + 1])
    return [torch.cat(r) for r in rows], session, after_prefill


def boundary_bytes(m) -> int:
    """What dropping whole pages may leave of the FFN tensors: a partial page at each end of each."""
    return sum(2 * 4096 for f in m.ffns() for _ in f.neuron_tensors())


def test_ffn_tensors_stay_in_the_file(mapped):
    m, in_ram, _ = mapped
    assert all(mapped_from_file(f) for f in m.ffns())
    assert not any(mapped_from_file(f) for f in in_ram.ffns())
    assert m.ffns()[0].down.shape == (256, 64) and not m.ffns()[0].down.is_contiguous()  # the file's [d, F]


def test_plan_counts_resident_weights_one_staged_layer_and_core_rows(mapped):
    m, _, path = mapped
    policy = stability_policy(CORE, m)
    p = plan(m, 2, CACHE, policy.keep, BIG, staging_layers=FileStreamer.staging_layers, flag=ResidentSession.flag)
    ffn = m.ffns()[0]
    row = ffn.neuron_bytes() // ffn.width  # up, gate and down rows of one neuron, fp32
    assert row == 3 * 64 * 4
    in_file = sum(t.nbytes for name, t in load_file(str(path)).items() if ".mlp." not in name)
    assert p.resident == resident_bytes(m) == in_file + sum(b.nbytes for b in m.buffers())  # + RoPE tables
    assert p.staging == ffn.neuron_bytes()
    assert p.cores == 2 * 2 * keep_count(0.25, 256) * row  # 2 sparse layers, 2 sequences
    assert p.dense_ffns == 2 * 2 * ffn.neuron_bytes()  # layers 0 and 3, a copy per sequence
    assert p.kv_cache == 4 * 2 * 2 * 2 * CACHE * 16 * 4  # layers, k+v, batch, kv heads, slots, head dim, fp32


def test_prefill_evicts_the_file_pages_and_decoding_reads_none(mapped):
    m, _, _ = mapped
    streamer = FileStreamer(m)
    total = sum(f.neuron_bytes() for f in m.ffns())
    for f in m.ffns():  # read every FFN page once, as a dense forward would
        for t in f.neuron_tensors().values():
            t[0].sum()
    assert streamer.cached_bytes() >= total  # pages counted whole: a little more than the bytes
    policy = stability_policy(CORE, m)
    _, session, after_prefill = resident_logits(m, policy)
    after_decode = session.streamer.cached_bytes()
    print(f"FFN bytes {total}, in memory after prefill {after_prefill}, after 5 decode steps {after_decode}")
    assert after_prefill <= boundary_bytes(m)
    assert after_decode == after_prefill
    assert session.offload.prefill_bytes_moved == total and session.offload.step_bytes_moved == 0
    assert sum(cached_bytes(t) for t in session.cores.get(1).weights.values()) > 0  # the rows are in RAM


def test_memory_limited_output_equals_unlimited_at_the_same_keep(mapped):
    m, in_ram, _ = mapped
    policy = stability_policy(CORE, m)
    ref, ref_session = our_logits(in_ram, PROMPTS, CONTS, policy=policy)
    got, session, _ = resident_logits(m, policy)
    for layer, ids in ref_session.selection.index.items():
        assert torch.equal(session.selection.index[layer], ids)
    err = max((a - b).abs().max().item() for a, b in zip(got, ref))
    print(f"--max-memory session vs the ordinary one at keep 0.25: max|diff| {err:.2e}")
    assert err < 1e-5


def test_budget_too_small_says_in_one_line_which_keep_fits(mapped):
    m, _, _ = mapped
    policy, streamer = stability_policy(CORE, m), FileStreamer(m)
    need = plan(m, 2, CACHE, policy.keep, BIG, staging_layers=1, flag="--max-memory", runtime=streamer.runtime)
    budget = int((need.total - need.cores // 2) / 0.9)  # room for about half the core rows
    with pytest.raises(MemoryError) as e:
        ResidentSession(m, PROMPTS, 5, policy=policy, budget=budget, streamer=streamer)
    line = str(e.value)
    print(line)
    assert "\n" not in line and line.startswith("--max-memory") and "keep <= 0.1" in line
    fits = float(line.split("keep <= ")[1].split()[0])
    plan(m, 2, CACHE, {l: fits for l in policy.keep}, budget, staging_layers=1, runtime=streamer.runtime).check(budget)
    with pytest.raises(MemoryError, match="--max-memory .* nothing fits below"):
        open_streamer(m, need.resident + need.runtime)


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_plan_counts_the_process_runtime_beside_the_tensors(mapped):
    """On the CPU the budget is the process's memory: the plan adds what the process holds beyond its
    resident weights (interpreter, torch, heap; VmRSS less the weights, read here independently), so a
    budget that holds the tensors but not the process fails, and its line names the runtime."""
    m, _, _ = mapped
    policy = stability_policy(CORE, m)
    before = rss_bytes()
    streamer = FileStreamer(m)
    after = rss_bytes()
    tensors = plan(m, 2, CACHE, policy.keep, BIG, staging_layers=1, flag="--max-memory")
    p = plan(m, 2, CACHE, policy.keep, BIG, staging_layers=1, flag="--max-memory", runtime=streamer.runtime)
    print(f"runtime {streamer.runtime / 2**20:.1f} MiB (VmRSS {before / 2**20:.1f} -> {after / 2**20:.1f} MiB, "
          f"resident weights {resident_bytes(m) / 2**20:.2f} MiB); tensors {tensors.total / 2**20:.2f} MiB")
    assert 50 << 20 < streamer.runtime  # an interpreter with torch loaded holds far more than 50 MiB
    assert after - (16 << 20) <= streamer.runtime + resident_bytes(m) <= max(before, after) + (16 << 20)
    assert p.total == tensors.total + streamer.runtime
    budget = int((tensors.total + streamer.runtime // 2) / 0.9)  # the tensors fit, the process does not
    tensors.check(budget)
    with pytest.raises(MemoryError, match=r"^--max-memory .*, runtime [0-9.]+ [MG]iB; .*nothing fits below"):
        ResidentSession(m, PROMPTS, 5, policy=policy, budget=budget, streamer=streamer)


def test_in_ram_weights_are_refused_in_one_line(mapped):
    _, in_ram, _ = mapped
    with pytest.raises(ValueError, match="FFN weights are in RAM"):
        open_streamer(in_ram, BIG)


@pytest.mark.parametrize("kw,message", [
    (dict(max_memory="3 gigs"), "give a positive number with a unit"),
    (dict(max_memory="3GiB", weights="int8"), "needs --device cpu and --weights dense"),
])
def test_runtime_config_rejects_bad_memory_limits(kw, message):
    from coreinfer.api import RuntimeConfig

    with pytest.raises(ValueError, match=message):
        RuntimeConfig(**kw)


def test_llm_max_memory_decodes_what_the_unlimited_llm_decodes_at_the_same_keep(tiny_model_dir):
    from coreinfer import LLM, GenerationConfig

    gen, core = GenerationConfig(max_new_tokens=8, ignore_eos=True), CoreConfig(beta=0.25)
    [limited] = LLM(str(tiny_model_dir), progress=False, max_memory="16GiB").generate("The press", gen, core)
    [unlimited] = LLM(str(tiny_model_dir), progress=False).generate("The press", gen, core)
    assert limited.token_ids == unlimited.token_ids and len(limited.token_ids) == 8


def test_cli_too_small_budget_is_one_line(tiny_model_dir, capsys):
    from coreinfer.cli.main import main

    assert main(["generate", "The press", "--model", str(tiny_model_dir), "--max-memory", "200KB"]) == 2
    err = capsys.readouterr().err.strip()
    print(err)
    assert err.count("\n") == 0 and err.startswith("coreinfer: error: --max-memory 0.19 MiB is too small")


# --- a GGUF: FFNs left in the file, converted into their block formats one layer at a time ---

GGUF_PROMPTS = [[5, 17, 3, 88, 42, 9, 61, 2, 33], [7, 21, 64]]
GGUF_CORE = CoreConfig(beta=0.3)  # every layer sparse


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    from test_formats import write_gguf

    path = tmp_path_factory.mktemp("gguf") / "tiny-qwen2.gguf"
    write_gguf(path)  # qwen2, 2 layers: Q4_K/Q4_K/Q6_K and Q4_0/Q4_0/Q8_0 FFNs -> q4 up/gate, q8_0 down
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COREINFER_CACHE", str(path.parent / "cache"))
        from coreinfer.io.loading import load_checkpoint

        yield path, load_checkpoint(path, progress=False)


@pytest.fixture
def streamed(gguf_file):
    """(the model with its FFNs left in the GGUF, its GGUFStreamer, the same model fully adopted in RAM)."""
    from coreinfer.engine.ffn_file import GGUFStreamer

    path, ckpt = gguf_file
    in_file = {}
    model = build_model(ckpt.config, ckpt.weights, formats="auto", in_file=in_file)
    in_ram = build_model(ckpt.config, ckpt.weights, formats="auto")
    with open(path, "rb") as f:  # cold: loading the models read the file through the page cache
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return model, GGUFStreamer(model, in_file, "auto", blocks=(192, 96)), in_ram  # blocks: uneven splits of 512, 256


def file_ffn_bytes(streamer) -> int:
    return sum(n for layer in streamer.files for _, _, n in streamer.spans(layer))


def test_gguf_plan_counts_block_formats_and_the_ffns_hold_no_values(streamed):
    model, streamer, in_ram = streamed
    policy = stability_policy(GGUF_CORE, model)
    cache = cache_length(len(GGUF_PROMPTS[0]) + 5, model.max_context)
    p = plan(model, 2, cache, policy.keep, BIG, staging_layers=streamer.staging_layers, flag="--max-memory")
    ref = in_ram.ffns()[0]
    assert [f.format for f in model.ffns()] == [f.format for f in in_ram.ffns()] == ["q4", "q4"]
    assert [f.neuron_bytes() for f in model.ffns()] == [f.neuron_bytes() for f in in_ram.ffns()]
    assert all(t.untyped_storage().nbytes() <= 8 for f in model.ffns() for t, _ in f.neuron_tensors().values())
    ffn_bytes = sum(f.neuron_bytes() for f in in_ram.ffns())
    held = {t.data_ptr(): t.nbytes for t in list(in_ram.parameters()) + list(in_ram.buffers())}  # tied once
    assert p.resident == sum(held.values()) - ffn_bytes  # everything the RAM model holds but its FFN rows
    assert p.staging == 2 * ref.neuron_bytes()  # the converted layer and the next one's file pages
    assert p.cores == 2 * 2 * keep_count(0.3, ref.width) * (ref.neuron_bytes() // ref.width)
    session = ResidentSession(model, GGUF_PROMPTS, 5, policy=policy, budget=BIG, streamer=streamer)
    session.prefill()
    assert sum(session.cores.get(l).nbytes() for l in range(2)) == p.cores  # the rows gathered are the planned


def test_gguf_prefill_reads_each_ffn_once_and_decoding_reads_none(streamed):
    model, streamer, _ = streamed
    session = ResidentSession(model, GGUF_PROMPTS, 5, policy=stability_policy(GGUF_CORE, model), budget=BIG,
                              streamer=streamer)
    session.prefill()
    after_prefill = streamer.cached_bytes()
    for step in range(5):
        session.step(torch.tensor([c[step] for c in CONTS]))
    print(f"FFN file bytes {file_ffn_bytes(streamer)}, in the page cache after prefill {after_prefill}, "
          f"after 5 decode steps {streamer.cached_bytes()}")
    assert session.offload.prefill_bytes_moved == file_ffn_bytes(streamer)
    assert session.offload.step_bytes_moved == 0
    assert after_prefill == 0 and streamer.cached_bytes() == 0


def test_gguf_memory_limited_output_equals_unlimited_at_the_same_keep(streamed):
    model, streamer, in_ram = streamed
    ref, ref_session = our_logits(in_ram, GGUF_PROMPTS, CONTS, policy=stability_policy(GGUF_CORE, in_ram))
    session = ResidentSession(model, GGUF_PROMPTS, 5, policy=stability_policy(GGUF_CORE, model), budget=BIG,
                              streamer=streamer)
    pre = session.prefill(all_logits=True)
    T0 = session.batch.prompt_len
    got = [[pre[b, T0 - len(p):]] for b, p in enumerate(GGUF_PROMPTS)]
    for step in range(5):
        logits = session.step(torch.tensor([c[step] for c in CONTS]))
        for b in range(len(GGUF_PROMPTS)):
            got[b].append(logits[b:b + 1])
    for layer, ids in ref_session.selection.index.items():
        assert torch.equal(session.selection.index[layer], ids)
    err = max((torch.cat(g) - r).abs().max().item() for g, r in zip(got, ref))
    print(f"GGUF --max-memory vs the ordinary --weights auto session at keep 0.3: max|diff| {err:.2e}")
    assert err < 1e-5


def test_gguf_budget_too_small_says_in_one_line_which_keep_fits(streamed):
    model, streamer, _ = streamed
    policy = stability_policy(GGUF_CORE, model)
    cache = cache_length(len(GGUF_PROMPTS[0]) + 5, model.max_context)
    need = plan(model, 2, cache, policy.keep, BIG, staging_layers=2, flag="--max-memory", runtime=streamer.runtime)
    budget = int((need.total - need.cores // 2) / 0.9)
    with pytest.raises(MemoryError) as e:
        ResidentSession(model, GGUF_PROMPTS, 5, policy=policy, budget=budget, streamer=streamer)
    line = str(e.value)
    print(line)
    assert "\n" not in line and line.startswith("--max-memory") and "keep <= 0.1" in line
    fits = float(line.split("keep <= ")[1].split()[0])
    plan(model, 2, cache, {l: fits for l in policy.keep}, budget, staging_layers=2, runtime=streamer.runtime).check(budget)


def test_llm_max_memory_on_a_gguf_decodes_what_the_unlimited_llm_decodes(gguf_file, monkeypatch):
    from coreinfer import LLM, GenerationConfig

    path, _ = gguf_file
    monkeypatch.setenv("COREINFER_CACHE", str(path.parent / "cache"))
    gen, core = GenerationConfig(max_new_tokens=6, ignore_eos=True), CoreConfig(beta=0.3)
    [limited] = LLM(str(path), weights="auto", progress=False, max_memory="16GiB").generate("tt t", gen, core)
    [unlimited] = LLM(str(path), weights="auto", progress=False, compile=False).generate("tt t", gen, core)
    assert limited.token_ids == unlimited.token_ids and len(limited.token_ids) == 6
    with pytest.raises(MemoryError, match="^--max-memory 0.50 MiB is too small.*nothing fits below"):
        LLM(str(path), weights="auto", progress=False, max_memory="512KiB")


@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K", "Q8_0"])
def test_native_ffn_conversion_is_bit_for_bit_the_pytorch_one(kind):
    """kernels/ffn_convert.cpp against formats/: Q4_K up rows into q4, a down's file rows [d, F] into
    neuron-major q8_0 [F, d], converted 32 file rows at a time."""
    from gguf import GGMLQuantizationType

    from coreinfer.formats import q4, q8_0
    from coreinfer.formats.ggml import TYPES
    from coreinfer.kernels import ffn_convert

    if not ffn_convert.load():
        pytest.skip("no native ffn_convert here")
    t, g = TYPES[GGMLQuantizationType[kind]], torch.Generator().manual_seed(0)

    def blocks(rows, cols):  # random bytes, with finite fp16 scales where the type keeps them
        b = torch.randint(0, 256, (rows * cols // t.block, t.nbytes), dtype=torch.uint8, generator=g)
        h = (torch.rand(b.shape[0], 2, generator=g) * 0.01 + 1e-4).half().view(torch.uint8).reshape(-1, 4)
        at = {"Q4_K": slice(0, 4), "Q6_K": slice(208, 210), "Q8_0": slice(0, 2)}[kind]
        b[:, at] = h[:, :at.stop - at.start]
        return b.view(rows, -1).contiguous()

    if kind == "Q4_K":
        raw = blocks(96, 512)
        ref = q4.from_blocks(t, raw, (96, 512))
        got = {n: torch.empty_like(x) for n, x in ref.items()}
        ffn_convert.q4k_to_q4(raw, got)
        assert all(torch.equal(got[n].view(torch.uint8), ref[n].view(torch.uint8)) for n in ref)
    raw = blocks(96, 512)  # down's file rows: d = 96 of F = 512
    ref = q8_0.pack(t.dequantize(raw, (96, 512)).t())
    got = {"qs": torch.zeros(512, 96, dtype=torch.int8), "d": torch.zeros(512, 3, dtype=torch.half)}
    for c0 in range(0, 96, 32):
        ffn_convert.to_q8_0_t(raw[c0:c0 + 32].contiguous(), kind, got, c0)
    assert torch.equal(got["qs"], ref["qs"]) and torch.equal(got["d"].view(torch.int16), ref["d"].view(torch.int16))
