"""Logit parity of every family with its transformers implementation, on tiny random configs, and
config validation (models/validate.py).

Prefill and several cached decode steps, alone and in a left-padded batch of prompts of different
lengths, must match an uncached transformers forward to 1e-4 (fp32, max abs). A config field of the
wrong type or range is refused in one line naming it, through the API and the CLI.
"""

import json
import shutil
import subprocess
import sys

import pytest
import torch
import transformers

from coreinfer.models import FAMILIES, UnsupportedModel, build_model, validate
from coreinfer.models.common import fuse_qkv
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
    "qwen3-attention-bias": transformers.Qwen3Config(**TINY, head_dim=24, attention_bias=True),  # q/k/v and o
    "qwen3-tied-sliding": transformers.Qwen3Config(**TINY, head_dim=24, tie_word_embeddings=True,
                                                   use_sliding_window=True, sliding_window=4, max_window_layers=2),
}

PROMPTS = [[5, 17, 3, 88, 42, 9, 61, 2, 33], [7, 21, 64]]
CONTS = [[11, 4, 90, 23], [50, 8, 19, 70]]


@pytest.mark.parametrize("name", CONFIGS)
def test_parity_with_transformers(name):
    assert_parity(name, CONFIGS[name], PROMPTS, CONTS, TOL)


def family_config(kind: str, **overrides) -> dict:
    base = {"llama": transformers.LlamaConfig(**TINY), "qwen3": transformers.Qwen3Config(**TINY),
            "mistral": transformers.MistralConfig(**TINY, sliding_window=5),
            "gemma3": transformers.Gemma3TextConfig(**TINY), "opt": transformers.OPTConfig(
                vocab_size=97, hidden_size=64, ffn_dim=96, num_hidden_layers=3, num_attention_heads=4)}[kind]
    return {**base.to_dict(), **overrides}


# (family, overrides, what the one line must say): integer, float, bool, list and dict fields of each family
BAD_CONFIGS = [
    ("llama", dict(hidden_size="big"), 'hidden_size must be an integer, got "big"'),
    ("llama", dict(num_hidden_layers=True), "num_hidden_layers must be an integer, got true"),
    ("llama", dict(intermediate_size=0), "intermediate_size must be at least 1, got 0"),
    ("llama", dict(rms_norm_eps="1e-5"), 'rms_norm_eps must be a number, got "1e-5"'),
    ("llama", dict(tie_word_embeddings="yes"), 'tie_word_embeddings must be true or false, got "yes"'),
    ("llama", dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}),
     "rope_parameters of rope_type 'llama3' lacks low_freq_factor (a number)"),
    ("llama", dict(rope_scaling={"rope_type": "linear", "factor": "2"}), 'rope_scaling.factor must be a number'),
    ("llama", dict(rope_scaling=[2.0]), "rope_scaling must be an object or null, got [2.0]"),
    ("llama", dict(num_key_value_heads=3), "num_attention_heads (4) is not a multiple of num_key_value_heads (3)"),
    ("qwen3", dict(head_dim=2.5), "head_dim must be an integer or null, got 2.5"),
    ("qwen3", dict(max_window_layers=-1), "max_window_layers must be at least 0, got -1"),
    ("qwen3", dict(use_sliding_window="false"), 'use_sliding_window must be true or false, got "false"'),
    ("mistral", dict(sliding_window="4096"), 'sliding_window must be an integer or null, got "4096"'),
    ("gemma3", dict(query_pre_attn_scalar=-1), "query_pre_attn_scalar must be a number above 0, got -1"),
    ("gemma3", dict(layer_types=[0, 1, 0]), "layer_types must be a list of strings or null"),
    ("gemma3", dict(rope_parameters={"full_attention": {"rope_type": "dynamic", "factor": 2.0}}),
     'rope_parameters.full_attention: unsupported rope_type "dynamic"'),
    ("opt", dict(do_layer_norm_before=1), "do_layer_norm_before must be true or false, got 1"),
    ("opt", dict(ffn_dim=None), "ffn_dim must be an integer, got null"),
]


@pytest.mark.parametrize("kind,overrides,message", BAD_CONFIGS, ids=[f"{k}-{next(iter(o))}" for k, o, _ in BAD_CONFIGS])
def test_bad_config_field_is_one_line(kind, overrides, message):
    """Refused before any weight is looked at (there are none here), in one line naming the field."""
    with pytest.raises(ValueError) as err:
        build_model(family_config(kind, **overrides), {})
    print(err.value)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unsupported_architecture_named():
    config = family_config("llama", model_type="mamba", architectures=["MambaForCausalLM"])
    with pytest.raises(UnsupportedModel, match=r"model_type 'mamba', architectures \['MambaForCausalLM'\]"):
        build_model(config, {})


def test_cli_bad_config_is_one_line(tiny_model_dir, tmp_path):
    """`coreinfer generate --model folder` with "hidden_size": "big": exit 2, one line, no traceback."""
    folder = shutil.copytree(tiny_model_dir, tmp_path / "bad")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": "big"}))
    run = subprocess.run([sys.executable, "-m", "coreinfer.cli.main", "generate", "hi", "--model", str(folder)],
                         capture_output=True, text=True, timeout=300)
    print(run.stderr)
    assert run.returncode == 2
    expected = 'coreinfer: error: model config: hidden_size must be an integer, got "big"'
    assert run.stderr.strip().splitlines() == [expected]


# config.json as the hub ships it (keys that matter here), and the parameter count the model card states
HUB = {
    "Llama-3.2-1B": (dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=2048,
                          intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                          head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                          rope_scaling=dict(factor=32.0, high_freq_factor=4.0, low_freq_factor=1.0,
                                            original_max_position_embeddings=8192, rope_type="llama3"),
                          tie_word_embeddings=True, bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
                          hidden_act="silu", attention_bias=False, mlp_bias=False, torch_dtype="bfloat16"),
                     1_235_814_400),
    "Qwen3-0.6B": (dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=151936, hidden_size=1024,
                        intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                        head_dim=128, max_position_embeddings=40960, max_window_layers=28, rms_norm_eps=1e-6,
                        rope_theta=1000000.0, rope_scaling=None, sliding_window=None, use_sliding_window=False,
                        tie_word_embeddings=True, attention_bias=False, hidden_act="silu", bos_token_id=151643,
                        eos_token_id=151645, torch_dtype="bfloat16"),
                   596_049_920),
    "Mistral-7B-v0.1": (dict(model_type="mistral", architectures=["MistralForCausalLM"], vocab_size=32000,
                             hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                             num_key_value_heads=8, max_position_embeddings=32768, rms_norm_eps=1e-5,
                             rope_theta=10000.0, sliding_window=4096, tie_word_embeddings=False, hidden_act="silu",
                             bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16"),
                        7_241_732_096),
}


@pytest.mark.parametrize("name", HUB)
def test_hub_config_builds_the_published_model(name):
    """A hub config.json passes validation and builds (on the meta device) the model its card counts,
    with every parameter the shape transformers gives it."""
    config, count = HUB[name]
    config_cls, model_cls, sanitize = FAMILIES[validate.check(config, FAMILIES)]
    cfg = config_cls.from_dict(config)
    with torch.device("meta"):
        ours = model_cls(cfg)
        hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config))
    tied = ours.embed_tokens.weight.numel() if cfg.tie_word_embeddings else 0
    assert sum(p.numel() for p in ours.parameters()) - tied == count
    theirs = fuse_qkv(sanitize(hf.state_dict(), cfg))
    assert {k: v.shape for k, v in theirs.items()} == {k: v.shape for k, v in ours.state_dict().items()}
