"""Logit parity of every family with its transformers implementation, on tiny random configs.

Prefill and several cached decode steps, alone and in a left-padded batch of prompts of different
lengths, must match an uncached transformers forward to 1e-4 (fp32, max abs).
"""

import pytest
import transformers

from oracle import assert_parity

TOL = 1e-4
TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)

CONFIGS = {
    "llama": transformers.LlamaConfig(**TINY, tie_word_embeddings=False),
    "llama-tied-rope-llama3": transformers.LlamaConfig(
        **TINY, tie_word_embeddings=True,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=16)),
    "llama-linear-rope": transformers.LlamaConfig(**TINY, rope_scaling=dict(rope_type="linear", factor=2.0)),
    "llama-yarn-rope": transformers.LlamaConfig(
        **TINY, rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32)),
    # Llama 3.x: rope_theta 5e5 and llama3 scaling (factor 32 as Llama 3.2), untied
    "llama3.x": transformers.LlamaConfig(
        **TINY, rope_scaling=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
                                  high_freq_factor=4.0, original_max_position_embeddings=32)),
    "qwen2": transformers.Qwen2Config(**TINY),
    # the window (4) is shorter than the prompts; only layers >= max_window_layers slide
    "qwen2-sliding-from-layer-1": transformers.Qwen2Config(**TINY, use_sliding_window=True, sliding_window=4,
                                                           max_window_layers=1),
    "mistral": transformers.MistralConfig(**TINY, sliding_window=5),
    "mistral-head-dim": transformers.MistralConfig(**TINY, sliding_window=5, head_dim=24),  # as Mistral Nemo
    # Qwen3: per-head q/k RMSNorm (plain w), no q/k/v bias, head_dim (24) not hidden_size / heads (16)
    "qwen3": transformers.Qwen3Config(**TINY, head_dim=24),
    "qwen3-tied-sliding": transformers.Qwen3Config(**TINY, head_dim=24, tie_word_embeddings=True,
                                                   use_sliding_window=True, sliding_window=4, max_window_layers=2),
}

PROMPTS = [[5, 17, 3, 88, 42, 9, 61, 2, 33], [7, 21, 64]]
CONTS = [[11, 4, 90, 23], [50, 8, 19, 70]]


@pytest.mark.parametrize("name", CONFIGS)
def test_parity_with_transformers(name):
    assert_parity(name, CONFIGS[name], PROMPTS, CONTS, TOL)
