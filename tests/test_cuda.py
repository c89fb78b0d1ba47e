"""The CUDA path, on tiny random models: family parity with transformers, compacted == masked-dense,
scorer == step-by-step, CUDA-graph decode == eager across prompts with different core sets, the int8
kernel, and the memory-limited mode streaming for real. Every test skips without CUDA (the int8
kernel also runs on the CPU through Triton's interpreter when Triton is installed)."""

import os
import subprocess
import sys
from functools import partial

import pytest
import torch
import transformers

from coreinfer.engine.offload import OffloadSession, Streamer, place, plan
from coreinfer.engine.policy import CoreConfig
from coreinfer.engine.quant import quantize_int8
from coreinfer.engine.session import Session, cache_length, stability_policy
from coreinfer.models import build_model
from oracle import hf_logits, hf_pair, masked_dense_logits, our_logits

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="optional: no CUDA device on this machine")
TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**TINY),
    "qwen2": lambda: transformers.Qwen2Config(**TINY),
    "gemma3": lambda: transformers.Gemma3TextConfig(**TINY, head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
                                                    layer_types=["sliding_attention", "full_attention"] * 2),
    "opt": lambda: transformers.OPTConfig(vocab_size=97, hidden_size=64, ffn_dim=96, num_hidden_layers=4,
                                          num_attention_heads=4, max_position_embeddings=128, dropout=0.0),
}
PROMPTS = [[5, 17, 3, 88, 42, 9, 61, 2, 33, 12, 70], [7, 21, 64]]
CONTS = [[11, 4, 90, 23, 6], [50, 8, 19, 70, 2]]
CORE = CoreConfig(alpha=0.4, beta=0.5, layers="1-2")
TOL = 1e-3  # fp32 on the GPU: other kernels and summation orders than the CPU's


def pair(family):
    """transformers on the CPU (the oracle), ours on the CPU and on CUDA, all with the same weights."""
    hf, cpu = hf_pair(CONFIGS[family]())
    return hf, cpu, build_model(hf.config.to_dict(), hf.state_dict(), "cuda", torch.float32)


@needs_cuda
@pytest.mark.parametrize("family", list(CONFIGS))
def test_family_parity_on_cuda(family):
    hf, _, gpu = pair(family)
    got, _ = our_logits(gpu, PROMPTS, CONTS, prefill_chunk=4)
    for b, (p, c) in enumerate(zip(PROMPTS, CONTS)):
        err = (got[b].cpu() - hf_logits(hf, p + c)).abs().max().item()
        print(f"{family} seq{b} on CUDA: max|ours-hf| {err:.2e}")
        assert err < TOL


@needs_cuda
@pytest.mark.parametrize("family", list(CONFIGS))
def test_compacted_equals_masked_and_scorer_equals_steps_on_cuda(family):
    _, cpu, gpu = pair(family)
    got, session = our_logits(gpu, PROMPTS, CONTS, policy=stability_policy(CORE, gpu))
    index = session.selection.index
    for b, (p, c) in enumerate(zip(PROMPTS, CONTS)):
        ref = masked_dense_logits(cpu, p, c, {l: ix[b].cpu() for l, ix in index.items()})[-len(c):]
        err = (got[b][-len(c):].cpu() - ref).abs().max().item()
        print(f"{family} seq{b} on CUDA: max|compact(cuda)-masked(cpu)| {err:.2e}")
        assert err < TOL
    scored = Session(gpu, PROMPTS, len(CONTS[0]), policy=stability_policy(CORE, gpu)).score(CONTS)
    for b, c in enumerate(CONTS):
        err = (scored[b, :len(c)] - got[b][-len(c) - 1:-1]).abs().max().item()
        print(f"{family} seq{b} on CUDA: max|scored-stepped| {err:.2e}")
        assert err < TOL


@needs_cuda
@pytest.mark.parametrize("dtype,inductor", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)])
def test_cuda_graph_decode_equals_eager_across_prompts(dtype, inductor):
    """Two prompts one after the other, each with its own core set gathered into the same buffers: the
    graph captured on the first replays the second (no stale rows), with the same greedy tokens. With
    `inductor` the graph holds the compiled step (`--compile` on CUDA), whose core rows are graph inputs.
    (bf16 is not compared compiled: fused kernels round differently, so greedy ties may flip.)"""
    from coreinfer.engine.compiled import CompiledStep, decode_forward
    from coreinfer.engine.cuda_graphs import GraphedStep

    _, _, gpu = pair("llama")
    gpu = gpu.to(dtype)
    graphs = GraphedStep(CompiledStep(gpu) if inductor else partial(decode_forward, gpu))
    kept = {}  # what LLM keeps across requests: core buffers and KV caches

    def greedy(prompt, compiled, keep):
        s = Session(gpu, [prompt], 12, policy=stability_policy(CORE, gpu), compiled=compiled, **keep)
        keep.update(cores=s.cores, caches=s.caches)
        out = [s.prefill().argmax(-1)]
        for _ in range(11):
            out.append(s.step(out[-1]).argmax(-1))
        return torch.cat(out).tolist(), s.selection.index

    sets = []
    for prompt in PROMPTS:
        eager, index = greedy(prompt, None, {})
        replayed, index2 = greedy(prompt, graphs, kept)
        print(f"{dtype} prompt of {len(prompt)}: eager {eager}, graphed {replayed}")
        assert replayed == eager
        assert all(torch.equal(index[l], index2[l]) for l in index)
        sets.append(index)
    assert not torch.equal(sets[0][1], sets[1][1])  # the prompts really had different core rows
    assert graphs.captures == 1  # the second prompt replayed the first prompt's graph


@needs_cuda
def test_memory_limited_mode_on_cuda():
    """FFN weights pinned in CPU memory, streamed for the prefill; decoding reads the GPU only; the same
    logits as the ordinary session on the GPU (same kernels, so the same core sets)."""
    hf, _, gpu = pair("qwen2")
    ref, _ = our_logits(gpu, PROMPTS, CONTS, policy=stability_policy(CORE, gpu))
    cpu_side = build_model(hf.config.to_dict(), hf.state_dict())
    place(cpu_side, "cuda")
    assert all(t.is_pinned() for f in cpu_side.ffns() for t in (f.up, f.gate, f.down))
    assert cpu_side.lm_head.weight.is_cuda
    policy = stability_policy(CORE, cpu_side)
    need = plan(cpu_side, 2, cache_length(16, 128), policy.keep, 0).total
    session = OffloadSession(cpu_side, PROMPTS, 5, policy=policy, budget=need * 2, streamer=Streamer(cpu_side, "cuda"))
    pre = session.prefill(all_logits=True)
    rows = [[pre[b, pre.shape[1] - len(p):]] for b, p in enumerate(PROMPTS)]
    for step in range(5):
        logits = session.step(torch.tensor([c[step] for c in CONTS], device="cuda"))
        assert session.offload.step_bytes_moved == 0
        for b in range(2):
            rows[b].append(logits[b:b + 1])
    err = max((torch.cat(r) - ref[b]).abs().max().item() for b, r in enumerate(rows))
    print(f"memory-limited on CUDA vs GPU session: max|diff| {err:.2e}; peak {session.offload.peak_device_bytes} B")
    assert err < TOL
    # (includes CUDA workspaces and earlier tests' leftovers: no bound at this tiny size)
    assert session.stats.peak_gpu_bytes == session.offload.peak_device_bytes > 0


INT8_CHECK = """
import torch
from coreinfer.engine import int8_gpu
from coreinfer.engine.quant import quantize_int8
torch.manual_seed(0)
device = "cuda" if torch.cuda.is_available() else "cpu"
for M, N, K in [(1, 40, 96), (3, 17, 300), (16, 64, 64)]:
    q, s = quantize_int8(torch.randn(N, K))
    x = torch.randn(M, K)
    ref = x @ (q.float() * s[:, None]).t()
    for dtype in (torch.float32, torch.bfloat16) if device == "cuda" else (torch.float32,):
        got = int8_gpu.int8_mm(x.to(device, dtype), q.to(device), s.to(device, dtype), block_k=64).float().cpu()
        err = (got - ref).abs().max().item() / ref.abs().max().item()
        print(M, N, K, dtype, f"max relative error {err:.1e}")
        assert err < 2e-2, err  # fp32 dots run in TF32 on the GPU; bf16 rounds inputs and output
"""


def test_int8_kernel_matches_dequantized_matmul():
    """The Triton int8 kernel against x @ dequantized weights: on CUDA, or on the CPU through Triton's
    interpreter (a subprocess: TRITON_INTERPRET must be set before Triton is imported)."""
    from coreinfer.engine import int8_gpu

    if not int8_gpu.available():
        pytest.skip("optional: Triton is not installed (it ships with PyTorch's CUDA builds)")
    env = dict(os.environ, **({} if CUDA else {"TRITON_INTERPRET": "1"}))
    out = subprocess.run([sys.executable, "-c", INT8_CHECK], env=env, capture_output=True, text=True, timeout=300)
    print(out.stdout, out.stderr[-2000:])
    assert out.returncode == 0


@needs_cuda
def test_int8_matmul_on_cuda_matches_dequantized():
    """int8_matmul's CUDA decode path (the Triton kernel) within bf16 rounding of the dequantized product."""
    from coreinfer.engine.quant import int8_matmul

    q, s = quantize_int8(torch.randn(64, 96))
    x = torch.randn(1, 96, dtype=torch.bfloat16)
    ref = x.float() @ (q.float() * s[:, None]).t()
    got = int8_matmul(x.cuda(), q.cuda(), s.to(torch.bfloat16).cuda()).float().cpu()
    assert (got - ref).abs().max().item() < 0.05 * ref.abs().max().item()


@needs_cuda
def test_llm_on_cuda_bf16_graphs_and_memory_limited(tiny_model_dir):
    """The API on CUDA: bf16 by default, the compiled step inside CUDA graphs unless compile=False, the
    same greedy tokens as eager; the memory-limited mode matches too (fp32 for both comparisons, so
    summation order cannot flip a token)."""
    from coreinfer import LLM, GenerationConfig
    from coreinfer.engine.compiled import CompiledStep
    from coreinfer.engine.cuda_graphs import GraphedStep

    gen, core = GenerationConfig(max_new_tokens=12, ignore_eos=True), CoreConfig(beta=0.5)
    texts = ["The capital of France is", "Scholars argue about"]

    def tokens(llm):
        return [llm.generate(t, gen, core=c)[0].token_ids for t in texts for c in (None, core)]

    llm = LLM(str(tiny_model_dir), device="cuda", progress=False)
    assert llm.model.embed_tokens.weight.dtype == torch.bfloat16 and isinstance(llm.compiled, GraphedStep)
    assert isinstance(llm.compiled.step, CompiledStep) and llm.compiled.step.mode == "default"
    assert all(len(t) == 12 for t in tokens(llm))
    eager = tokens(LLM(str(tiny_model_dir), device="cuda", dtype="fp32", compile=False, progress=False))
    assert tokens(LLM(str(tiny_model_dir), device="cuda", dtype="fp32", progress=False)) == eager
    limited = LLM(str(tiny_model_dir), device="cuda", dtype="fp32", max_gpu_memory="256MiB", progress=False)
    assert limited.model.ffns()[0].up.is_pinned()
    assert tokens(limited) == eager
