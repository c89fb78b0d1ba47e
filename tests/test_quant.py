"""Weight-only int8: close to fp32, and compacted int8 equals masked int8."""

import pytest
import torch
import transformers

from coreinfer.engine import gemv, native
from coreinfer.engine.policy import CoreConfig
from coreinfer.engine.quant import int8_matmul, quantize_int8, quantize_model
from coreinfer.engine.session import stability_policy
from oracle import compacted_vs_masked, hf_pair, our_logits

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
PROMPTS = [[5, 17, 3, 88, 42, 9, 61, 2, 33], [7, 21, 64]]
CONTS = [[11, 4, 90, 23], [50, 8, 19, 70]]
INT8_TOL = 0.05  # logits of a random model with std ~1; int8 rounding gives errors of a few 1e-3


def test_quantize_roundtrip():
    w = torch.randn(32, 64)
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (32,)
    err = (q.float() * s[:, None] - w).abs().max().item()
    assert err <= s.max().item() / 2 + 1e-6
    x = torch.randn(3, 64)
    ref = x @ (q.float() * s[:, None]).t()
    out = int8_matmul(x, q, s.bfloat16())
    assert (out - ref).abs().max().item() < 0.05 * ref.abs().max().item()


@pytest.mark.parametrize("K", [64, 43, 1075])
def test_int8_matmul_any_width(K):
    """Widths the CPU kernel cannot take (not a multiple of 16) still give the right product."""
    q, s = quantize_int8(torch.randn(24, K))
    x = torch.randn(2, K)
    ref = x @ (q.float() * s[:, None]).t()
    out = int8_matmul(x, q, s.bfloat16())
    assert (out - ref).abs().max().item() < 0.02 * ref.abs().max().item()


def test_int8_model_close_to_fp32():
    _, dense = hf_pair(transformers.LlamaConfig(**TINY))
    ref, _ = our_logits(dense, PROMPTS, CONTS)
    _, model = hf_pair(transformers.LlamaConfig(**TINY))
    quantize_model(model)
    out, _ = our_logits(model, PROMPTS, CONTS)
    err = max((o - r).abs().max().item() for o, r in zip(out, ref))
    print(f"int8 vs fp32 max |logit diff| {err:.3e}")
    assert err < INT8_TOL
    assert model.weight_bytes() < 0.4 * dense.weight_bytes()


@pytest.mark.parametrize("kernel", [True, False], ids=["native", "numpy"])  # numpy: no C compiler
@pytest.mark.parametrize("beta", [0.5, 0.45])  # k = 48, and k = 43: padded to the kernel's block of 16
@pytest.mark.parametrize("use_gemv", [False, True], ids=["pytorch-mm", "gemv"])
def test_compacted_int8_equals_masked_int8(beta, kernel, use_gemv, monkeypatch):
    """Exact with PyTorch's int8 kernel. With the decode GEMV (gemv.py) the compacted decode steps
    quantize their activations per block of 32 while the masked reference, a whole-sequence forward,
    keeps PyTorch's bf16 ones: close only."""
    if not kernel:
        monkeypatch.setattr(native, "load", lambda: None)
    if not use_gemv:
        monkeypatch.setattr(gemv, "MAX_M", 0)
    elif not gemv.available():
        pytest.skip("optional: no AVX512-VNNI CPU or no C++ compiler for the int8 GEMV")
    _, model = hf_pair(transformers.LlamaConfig(**TINY))
    quantize_model(model)
    policy = stability_policy(CoreConfig(beta=beta, layers="1-2"), model)
    errs, changes, _ = compacted_vs_masked(model, PROMPTS, CONTS, policy)
    print(f"compact int8 vs masked int8: {errs}")
    assert min(changes) > 1e-3  # the core set mattered
    assert max(errs) < (2e-2 if use_gemv else 1e-4)  # gemv: logits of std ~1, activation rounding ~4e-3
