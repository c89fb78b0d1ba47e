"""LLaMA family: llama, mistral, qwen2, qwen3 (SmolLM/SmolLM2, TinyLlama, Llama 2/3.x, Mistral,
Qwen2/2.5, Qwen3 dense).

RMSNorm pre-norm blocks, RoPE, grouped-query attention, SwiGLU FFN, tied or untied head;
Qwen2 adds q/k/v biases, Mistral a sliding window on every layer, Qwen2/3 one on the layers from
`max_window_layers` on (when `use_sliding_window`), Qwen3 a plain RMSNorm (no 1 + w) on each head
of q and k before RoPE, and a head_dim of its own (not hidden_size / heads).
"""

from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn

from .common import (
    FFN,
    Attention,
    CausalLM,
    RMSNorm,
    Rotary,
    attention_mask,
    feed_forward,
)

SLIDING, FULL = "sliding_attention", "full_attention"
QWEN = ("qwen2", "qwen3")  # sliding window only with use_sliding_window, from max_window_layers on


@dataclass
class LlamaConfig:
    """Field names are the keys of the checkpoint's config.json, so a config loads by splatting."""

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    use_sliding_window: bool = False
    max_window_layers: int = field(default=28, metadata={"min": 0})  # transformers' Qwen default
    layer_types: list[str] | None = None
    bos_token_id: int | list | None = None
    eos_token_id: int | list | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.model_type == "qwen2":
            self.attention_bias = True  # Qwen2's config has no flag for its q/k/v biases
        if self.model_type in QWEN:
            # Qwen configs carry a sliding_window that is only used when use_sliding_window is set
            self.sliding_window = self.sliding_window if self.use_sliding_window else None
        if self.layer_types is None:
            start = self.max_window_layers if self.model_type in QWEN else 0
            self.layer_types = [SLIDING if self.sliding_window is not None and i >= start else FULL
                                for i in range(self.num_hidden_layers)]
        if len(self.layer_types) != self.num_hidden_layers or not set(self.layer_types) <= {SLIDING, FULL}:
            raise ValueError(f"layer_types must be {self.num_hidden_layers} of {SLIDING!r}/{FULL!r}, "
                             f"got {self.layer_types}")
        if self.mlp_bias:
            raise ValueError("gated FFNs with biases (mlp_bias=true) are not supported")

    @property
    def qk_norm(self) -> bool:
        return self.model_type == "qwen3"

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        d = normalize_rope(d)
        names = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in d.items() if k in names}, extra={k: v for k, v in d.items() if k not in names})


def normalize_rope(d: dict) -> dict:
    """transformers 5 writes `rope_parameters`; checkpoints write `rope_theta` + `rope_scaling`."""
    params = d.get("rope_parameters")
    if not params or "rope_theta" not in params:
        return d
    d = dict(d, rope_theta=params["rope_theta"])
    if params.get("rope_type", "default") != "default":
        d["rope_scaling"] = params
    return d


class Block(nn.Module):
    def __init__(self, c: LlamaConfig, layer_id: int):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                                   scale=c.head_dim**-0.5, qkv_bias=c.attention_bias, out_bias=c.attention_bias
                                   and c.model_type != "qwen2", qk_norm_eps=c.rms_norm_eps if c.qk_norm else None,
                                   qk_norm_offset=0.0)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = FFN(layer_id, c.hidden_size, c.intermediate_size, c.hidden_act, gated=True, bias=c.mlp_bias)

    def forward(self, x, rope, slots, mask, ffn, cache):
        x = x + self.self_attn(self.input_layernorm(x), rope, slots, mask, cache)
        return x + feed_forward(self.mlp, self.post_attention_layernorm(x), ffn)


class Model(CausalLM):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Block(c, i) for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.rotary = Rotary(c.head_dim, c.rope_theta, c.rope_scaling)
        # the window of each layer type present: one mask per type per forward
        self.windows = {kind: c.sliding_window if kind == SLIDING else None for kind in dict.fromkeys(c.layer_types)}

    def forward(self, tokens, positions, slots, key_valid, caches, ffn=None, last_only=False) -> torch.Tensor:
        """tokens/positions/slots [B, T], key_valid [B, S'] -> logits [B, T, V] ([B, 1, V] if last_only)."""
        x = self.embed_tokens(tokens)  # [B, T, d]
        masks = {kind: attention_mask(slots, key_valid, window) for kind, window in self.windows.items()}
        rope = self.rotary(positions, x.dtype)
        for layer, kind, cache in zip(self.layers, self.config.layer_types, caches):
            x = layer(x, rope, slots, masks[kind], ffn, cache)
        if last_only:
            x = x[:, -1:]  # [B, 1, d]
        return self.lm_head(self.norm(x))


def sanitize(weights: dict, config: LlamaConfig) -> dict:
    """HF parameter names -> ours: drop the `model.` prefix, rename the FFN, store down as [F, d]."""
    out = {}
    for name, w in weights.items():
        name = name.removeprefix("model.")
        if name.startswith("lm_head") and config.tie_word_embeddings:
            continue
        if ".mlp." in name:
            name = name.replace("gate_proj.weight", "gate").replace("up_proj.weight", "up")
            name = name.replace("up_proj.bias", "up_bias").replace("down_proj.bias", "down_bias")
            if name.endswith("down_proj.weight"):
                name, w = name.replace("down_proj.weight", "down"), w.t()
        out[name] = w
    if config.tie_word_embeddings:
        out["lm_head.weight"] = out["embed_tokens.weight"]
    return out
