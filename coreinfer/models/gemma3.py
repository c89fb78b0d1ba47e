"""Gemma 3 text family (gemma3_text: Gemma 3 1B and other text-only Gemma 3 checkpoints).

LLaMA-like blocks with four Gemma (1 + w) RMSNorms each (around attention and around the FFN),
q/k RMSNorm, a GeGLU FFN, embeddings scaled by sqrt(d), attention scaled by query_pre_attn_scalar,
optional final logit softcapping, and interleaved layers: sliding-window ones with a local RoPE base,
global ones with the global base (and rope_scaling).
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


@dataclass
class Gemma3Config:
    """Field names are the keys of the checkpoint's config.json, so a config loads by splatting."""

    model_type: str = "gemma3_text"
    vocab_size: int = 262208
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0  # global layers
    rope_local_base_freq: float = 10_000.0  # sliding layers
    rope_scaling: dict | None = None  # global layers only
    query_pre_attn_scalar: float = 256
    sliding_window: int | None = 4096
    layer_types: list[str] | None = None
    sliding_window_pattern: int = 6  # every n-th layer is global; older configs carry only this
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    use_bidirectional_attention: bool = False
    attention_bias: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int | list | None = None
    eos_token_id: int | list | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.attn_logit_softcapping is not None:
            raise NotImplementedError("Gemma 3 attention logit softcapping (attn_logit_softcapping) is not supported")
        if self.use_bidirectional_attention:
            raise NotImplementedError("bidirectional Gemma 3 (embedding models) is not supported")
        if self.layer_types is None:
            self.layer_types = [SLIDING if (i + 1) % self.sliding_window_pattern else FULL
                                for i in range(self.num_hidden_layers)]
        if len(self.layer_types) != self.num_hidden_layers or not set(self.layer_types) <= {SLIDING, FULL}:
            raise ValueError(f"layer_types must be {self.num_hidden_layers} of {SLIDING!r}/{FULL!r}, "
                             f"got {self.layer_types}")

    @classmethod
    def from_dict(cls, d: dict) -> "Gemma3Config":
        d = normalize_rope(d)
        if "_sliding_window_pattern" in d:  # transformers 5 renamed the key
            d = dict(d, sliding_window_pattern=d["_sliding_window_pattern"])
        names = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in d.items() if k in names}, extra={k: v for k, v in d.items() if k not in names})


def normalize_rope(d: dict) -> dict:
    """transformers 5 writes `rope_parameters` per layer type; checkpoints write rope_theta,
    rope_local_base_freq and rope_scaling (which applies to the global layers)."""
    params = d.get("rope_parameters")
    if not params or FULL not in params:
        return d
    full, local = params[FULL] or {}, params.get(SLIDING) or {}
    if local.get("rope_type", "default") != "default":
        raise ValueError(f"unsupported RoPE scaling on sliding layers: {local}")
    d = dict(d, rope_scaling=full if full.get("rope_type", "default") != "default" else None)
    if "rope_theta" in full:
        d["rope_theta"] = full["rope_theta"]
    if "rope_theta" in local:
        d["rope_local_base_freq"] = local["rope_theta"]
    return d


class Block(nn.Module):
    def __init__(self, c: Gemma3Config, layer_id: int):
        super().__init__()
        d = c.hidden_size
        self.input_layernorm = RMSNorm(d, c.rms_norm_eps, offset=1.0)
        self.self_attn = Attention(d, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                                   scale=c.query_pre_attn_scalar**-0.5, qkv_bias=c.attention_bias,
                                   out_bias=c.attention_bias, qk_norm_eps=c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(d, c.rms_norm_eps, offset=1.0)
        self.pre_feedforward_layernorm = RMSNorm(d, c.rms_norm_eps, offset=1.0)
        self.mlp = FFN(layer_id, d, c.intermediate_size, c.hidden_activation, gated=True, bias=False)
        self.post_feedforward_layernorm = RMSNorm(d, c.rms_norm_eps, offset=1.0)

    def forward(self, x, rope, slots, mask, ffn, cache):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope, slots, mask, cache))
        h = feed_forward(self.mlp, self.pre_feedforward_layernorm(x), ffn)
        return x + self.post_feedforward_layernorm(h)


class Model(CausalLM):
    def __init__(self, c: Gemma3Config):
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Block(c, i) for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, offset=1.0)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.rotary_local = Rotary(c.head_dim, c.rope_local_base_freq)
        self.rotary_global = Rotary(c.head_dim, c.rope_theta, c.rope_scaling)

    def forward(self, tokens, positions, slots, key_valid, caches, ffn=None, last_only=False) -> torch.Tensor:
        """tokens/positions/slots [B, T], key_valid [B, S'] -> logits [B, T, V] ([B, 1, V] if last_only)."""
        c = self.config
        x = self.embed_tokens(tokens)  # [B, T, d]
        # HF rounds sqrt(d) to the compute dtype before scaling (e.g. 33.94 -> 34.0 in bf16); a Python
        # number, not a device tensor: a host-to-device copy cannot be captured in a CUDA graph
        x = x * torch.tensor(c.hidden_size**0.5, dtype=x.dtype).item()
        by_type = {  # (rope, mask) per layer type
            SLIDING: (self.rotary_local(positions, x.dtype), attention_mask(slots, key_valid, c.sliding_window)),
            FULL: (self.rotary_global(positions, x.dtype), attention_mask(slots, key_valid, None)),
        }
        for layer, kind, cache in zip(self.layers, c.layer_types, caches):
            rope, mask = by_type[kind]
            x = layer(x, rope, slots, mask, ffn, cache)
        if last_only:
            x = x[:, -1:]  # [B, 1, d]
        logits = self.lm_head(self.norm(x))
        if c.final_logit_softcapping is not None:
            logits = torch.tanh(logits / c.final_logit_softcapping) * c.final_logit_softcapping
        return logits
