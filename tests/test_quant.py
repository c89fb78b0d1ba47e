"""Weight-only int8: close to fp32, and compacted int8 equals masked int8."""

import pytest
import torch
import transformers

from coreinfer.core import CoreConfig, compact, decode_bytes, select
from coreinfer.quant import int8_matmul, quantize_int8, quantize_model
from oracle import hf_pair, our_logits

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
    ref = our_logits(dense, PROMPTS, CONTS)
    _, model = hf_pair(transformers.LlamaConfig(**TINY))
    quantize_model(model)
    out = our_logits(model, PROMPTS, CONTS)
    err = max((o - r).abs().max().item() for o, r in zip(out, ref))
    print(f"int8 vs fp32 max |logit diff| {err:.3e}")
    assert err < INT8_TOL
    assert decode_bytes(model) < 0.4 * decode_bytes(dense)


@pytest.mark.parametrize("beta", [0.5, 0.45])  # k = 48, and k = 43: padded to the kernel's block of 16
def test_compacted_int8_equals_masked_int8(beta):
    _, model = hf_pair(transformers.LlamaConfig(**TINY))
    quantize_model(model)
    core = CoreConfig(beta=beta, layers="1-2")
    chosen = {}

    def sparse_hook(acts, valid):
        chosen.update(select(acts, valid, core, gated=True))
        compact(model, chosen)

    sparse = our_logits(model, PROMPTS, CONTS, sparse=True, core_hook=sparse_hook)
    dense = our_logits(model, PROMPTS, CONTS)
    assert min((s - d).abs().max().item() for s, d in zip(sparse, dense)) > 1e-3  # the core set mattered
    for b, (p, c) in enumerate(zip(PROMPTS, CONTS)):
        saved = {l: model.layers[l].mlp.down.clone() for l in chosen}

        def mask_hook(acts, valid):
            for l, ix in chosen.items():
                keep = torch.zeros(model.layers[l].mlp.width, dtype=torch.bool)
                keep[ix[b]] = True
                model.layers[l].mlp.down[:, ~keep] = 0  # int8 down is [d, F]: a neuron is a column

        ref = our_logits(model, [p], [c], core_hook=mask_hook)[0]
        with torch.inference_mode():  # quantize_model made inference tensors
            for l, w in saved.items():
                model.layers[l].mlp.down.copy_(w)
        err = (sparse[b] - ref).abs().max().item()
        print(f"compact int8 vs masked int8 seq{b}: {err:.2e}")
        assert err < 1e-4
