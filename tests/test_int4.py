"""Weight-only int4 (group-wise, CPU): the kernel against its dequantized weights, a model close to
fp32, compacted int4 equal to masked int4, widths the kernel cannot take, the API, the embedded model."""

import pytest
import torch
import transformers

from coreinfer import LLM, GenerationConfig
from coreinfer.api import RuntimeConfig
from coreinfer.engine import int4, native
from coreinfer.engine.policy import CoreConfig
from coreinfer.engine.quant import Int8Linear, quantize_model
from coreinfer.engine.session import stability_policy
from oracle import compacted_vs_masked, hf_pair, our_logits

# hidden 64 and FFN 256 fit the kernel (K a multiple of 32, N of 16)
TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
PROMPTS = [[5, 17, 3, 88, 42, 9, 61, 2, 33], [7, 21, 64]]
CONTS = [[11, 4, 90, 23], [50, 8, 19, 70]]
# Logits of the random model spread with std ~1 (max ~4). int4 rounds each weight by up to half a step,
# (max - min) / 30 of its group of 32: ~16x int8's error, and int8 stays within 0.05 (test_quant.py).
# Measured: ~0.1; the bound leaves room for other seeds, and is still a tenth of the logits' spread.
INT4_TOL = 0.3
# The same weights either way, but the kernels return bf16: down summing k core columns instead of F
# with zeros can flip one output's bf16 rounding (2^-9 of a value near 1; measured 1.95e-3 at keep 0.5).
# A packing error would be of the order of the logits.
COMPACT_TOL = 1e-2


@pytest.mark.parametrize("N,K", [(48, 64), (1536, 576), (64, 1536)])
def test_matmul_equals_its_dequantized_weights(N, K):
    w = torch.randn(N, K)
    q, sz = int4.quantize_int4(w)
    deq = int4.dequantize_int4(q, sz)
    step = (w.view(N, -1, int4.GROUP_SIZE).amax(-1) - w.view(N, -1, int4.GROUP_SIZE).amin(-1)) / 15
    assert ((deq - w).abs().view(N, -1, int4.GROUP_SIZE).amax(-1) <= step * 0.51 + 1e-2).all()  # bf16 zero
    x = torch.randn(3, K)
    ref = x.bfloat16().float() @ deq.t()
    out = int4.int4_matmul(x, int4.pack(q), sz)
    err = (out - ref).abs().max().item()
    print(f"int4 matmul [{N}, {K}] vs dequantized: {err:.2e} (max |ref| {ref.abs().max().item():.1f})")
    assert err < 0.01 * ref.abs().max().item()  # bf16 accumulation


@pytest.mark.parametrize("n", [64, 192, 48])  # 48: not a whole block, the op's path
def test_pack_core_equals_the_kernel_packing(n):
    q = torch.randint(0, 16, (300, 128), dtype=torch.uint8)
    idx = torch.randperm(300)[:n].sort().values
    out = torch.empty(n, 64, dtype=torch.uint8)
    int4.pack_core(int4.source(q)[:, idx].contiguous(), out)
    assert torch.equal(out, int4.pack(q[idx]))


def test_int4_model_close_to_fp32():
    _, dense = hf_pair(transformers.LlamaConfig(**TINY))
    ref, _ = our_logits(dense, PROMPTS, CONTS)
    _, model = hf_pair(transformers.LlamaConfig(**TINY))
    quantize_model(model, "int4")
    assert all(f.format == "int4" for f in model.ffns())
    assert isinstance(model.layers[0].self_attn.qkv_proj, Int8Linear) and isinstance(model.lm_head, Int8Linear)
    out, _ = our_logits(model, PROMPTS, CONTS)
    err = max((o - r).abs().max().item() for o, r in zip(out, ref))
    print(f"int4 vs fp32 max |logit diff| {err:.3e}")
    assert err < INT4_TOL
    int8 = hf_pair(transformers.LlamaConfig(**TINY))[1]
    quantize_model(int8, "int8")
    assert model.weight_bytes() < int8.weight_bytes()


@pytest.mark.parametrize("kernel", [True, False], ids=["native", "numpy"])  # numpy: no C compiler
@pytest.mark.parametrize("beta", [0.5, 0.45])  # k = 128, and k = 115: padded to the packed block of 64
def test_compacted_int4_equals_masked_int4(beta, kernel, monkeypatch):
    if not kernel:
        monkeypatch.setattr(native, "load", lambda: None)
    _, model = hf_pair(transformers.LlamaConfig(**TINY))
    quantize_model(model, "int4")
    policy = stability_policy(CoreConfig(beta=beta, layers="1-2"), model)
    errs, changes, _ = compacted_vs_masked(model, PROMPTS, CONTS, policy)
    print(f"compact int4 vs masked int4: {errs}")
    assert min(changes) > 1e-3  # the core set mattered
    assert max(errs) < COMPACT_TOL


@pytest.mark.parametrize("hidden,ffn", [(48, 256), (64, 100)])  # K not a multiple of 32; N not of 16
def test_widths_the_kernel_cannot_take_stay_int8(hidden, ffn):
    cfg = dict(TINY, hidden_size=hidden, intermediate_size=ffn)
    _, dense = hf_pair(transformers.LlamaConfig(**cfg))
    ref, _ = our_logits(dense, PROMPTS, CONTS)
    _, model = hf_pair(transformers.LlamaConfig(**cfg))
    quantize_model(model, "int4")
    assert all(f.format == "int8" for f in model.ffns())
    sparse, _ = our_logits(model, PROMPTS, CONTS, policy=stability_policy(CoreConfig(beta=0.5), model))
    out, _ = our_logits(model, PROMPTS, CONTS)
    assert max((o - r).abs().max().item() for o, r in zip(out, ref)) < INT4_TOL
    assert all(torch.isfinite(s).all() for s in sparse)


def test_int4_greedy_decode_through_the_api(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), weights="int4", progress=False, compile=False)  # compiled: test_compile.py
    assert llm.model.ffns()[0].format == "int4"
    dense = LLM(str(tiny_model_dir), progress=False)
    config = GenerationConfig(max_new_tokens=8)
    [out] = llm.generate("The capital of France is", config)
    [core] = llm.generate("The capital of France is", config, core=CoreConfig(beta=0.5))
    [ref] = dense.generate("The capital of France is", config)
    print("int4:", out.token_ids, "core:", core.token_ids, "fp32:", ref.token_ids)
    assert len(out.token_ids) == len(core.token_ids) == 8


def test_int4_is_refused_where_it_cannot_run():
    with pytest.raises(ValueError, match="CPU"):
        RuntimeConfig(device="cuda", weights="int4")


def test_embedded_model_int4_close_to_fp32():
    """SmolLM2-135M: int4 next-token logits on natural text against fp32's (the real weights'
    rounding, not a random model's); top-1 agreement is what greedy decoding sees."""
    fp32 = LLM(progress=False, weights="dense")
    ids = fp32.tokenizer.encode("The history of the printing press begins in the fifteenth century, when "
                                "Johannes Gutenberg combined movable metal type, oil-based inks and a wooden press.")
    ref, _ = our_logits(fp32.model, [ids], [[]])
    quantize_model(fp32.model, "int4")  # in place: one load of the checkpoint
    out, _ = our_logits(fp32.model, [ids], [[]])
    ref, out = ref[0], out[0]
    agree = (ref.argmax(-1) == out.argmax(-1)).float().mean().item()
    cos = torch.nn.functional.cosine_similarity(ref, out, dim=-1).min().item()
    print(f"SmolLM2 int4 vs fp32 over {len(ids)} positions: top-1 agreement {agree:.0%}, min cosine {cos:.3f}")
    assert agree >= 0.8 and cos > 0.9
