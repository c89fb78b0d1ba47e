"""Logit parity of the Gemma 3 and OPT families with transformers, on tiny random configs, and the
newer llama-family members (Qwen3, Mistral) through the core engine.

Same contract as test_models.py: prefill and cached decode steps, alone and in a left-padded batch
of prompts of different lengths, match an uncached transformers forward to 1e-4 (fp32, max abs).
Compacted core-neuron decoding equals the masked dense model to 1e-5, as in test_core.py.
"""

import pytest
import transformers

from coreinfer.engine.policy import CoreConfig
from coreinfer.engine.session import stability_policy
from coreinfer.models import gemma3
from oracle import assert_parity, compacted_vs_masked, hf_pair

TOL = 1e-4
GEMMA = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=128, query_pre_attn_scalar=24,
             sliding_window=4, final_logit_softcapping=3.0)
OPT = dict(vocab_size=97, hidden_size=64, ffn_dim=96, num_hidden_layers=3, num_attention_heads=4,
           max_position_embeddings=128, dropout=0.0)

CONFIGS = {
    # prompts (9 and 3 tokens) + 5 decode steps run past the 4-token window
    "gemma3": transformers.Gemma3TextConfig(
        **GEMMA, layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1000.0}}),
    "gemma3-linear-rope-untied": transformers.Gemma3TextConfig(
        **GEMMA, layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
        tie_word_embeddings=False,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0}}),
    "opt-pre-ln": transformers.OPTConfig(**OPT),
    "opt-post-ln": transformers.OPTConfig(**OPT, do_layer_norm_before=False),
    "opt-project-in-out": transformers.OPTConfig(**OPT, word_embed_proj_dim=32, activation_function="gelu"),
    "opt-no-final-norm": transformers.OPTConfig(**OPT, _remove_final_layer_norm=True),
}

PROMPTS = [[5, 17, 3, 88, 42, 9, 61, 2, 33], [7, 21, 64]]
CONTS = [[11, 4, 90, 23, 56], [50, 8, 19, 70, 31]]


@pytest.mark.parametrize("name", CONFIGS)
def test_parity_with_transformers(name):
    assert_parity(name, CONFIGS[name], PROMPTS, CONTS, TOL)


def test_gemma3_checkpoint_config_form():
    """Hub config.json keys (rope_theta, rope_local_base_freq, rope_scaling, sliding_window_pattern)
    and transformers 5's rope_parameters / layer_types describe the same model."""
    hub = dict(model_type="gemma3_text", num_hidden_layers=7, rope_theta=1e6, rope_local_base_freq=1e4,
               rope_scaling={"rope_type": "linear", "factor": 8.0}, sliding_window_pattern=6)
    ref = transformers.Gemma3TextConfig(num_hidden_layers=7, rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}}).to_dict()
    a, b = gemma3.Gemma3Config.from_dict(hub), gemma3.Gemma3Config.from_dict(ref)
    assert a.layer_types == b.layer_types == ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]
    assert (a.rope_theta, a.rope_local_base_freq) == (b.rope_theta, b.rope_local_base_freq) == (1e6, 1e4)
    assert a.rope_scaling["factor"] == b.rope_scaling["factor"] == 8.0


def test_gemma3_attn_softcapping_rejected():
    with pytest.raises(NotImplementedError, match="attn_logit_softcapping"):
        gemma3.Gemma3Config.from_dict(dict(model_type="gemma3_text", attn_logit_softcapping=50.0))


LLAMA_LIKE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
NEWER = {  # sliding windows (4) shorter than the prompts, on some layers (Qwen3) or all (Mistral)
    "qwen3": lambda: transformers.Qwen3Config(**LLAMA_LIKE, head_dim=24, use_sliding_window=True, sliding_window=4,
                                              max_window_layers=2),
    "mistral": lambda: transformers.MistralConfig(**LLAMA_LIKE, sliding_window=4),
}


@pytest.mark.parametrize("family", NEWER)
def test_core_neurons_on_newer_families(family):
    """(int8 weights are the same FFN code in every family: test_quant.py.)"""
    model = hf_pair(NEWER[family]())[1]
    policy = stability_policy(CoreConfig(alpha=0.4, beta=0.5, layers="1-2"), model)
    errs, changes, _ = compacted_vs_masked(model, [PROMPTS[0] + [12, 70], PROMPTS[1]], CONTS, policy)
    print(f"{family}: max|compact-masked| {errs}; max|compact-dense| {changes}")
    assert max(errs) < 1e-5
    assert min(changes) > 1e-3  # the core set really changed the decode
