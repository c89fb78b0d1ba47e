"""OPT family (facebook/opt-125m ... opt-66b, opt-350m with post-LN and projected embeddings).

LayerNorm blocks, pre-LN or post-LN (`do_layer_norm_before`), learned absolute positions, multi-head
attention without RoPE, biases everywhere (`enable_bias`), a plain (ungated) ReLU FFN, and a tied
head; embeddings narrower than the model (`word_embed_proj_dim`) are projected in and out.
"""

from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn

from .common import FFN, Attention, CausalLM, attention_mask, feed_forward

# OPT's position table reserves its first two rows (a fairseq legacy): position p reads row p + 2.
POSITION_OFFSET = 2


@dataclass
class OPTConfig:
    """Field names are the keys of the checkpoint's config.json, so a config loads by splatting."""

    model_type: str = "opt"
    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    ffn_dim: int = 3072
    num_attention_heads: int = 12
    max_position_embeddings: int = 2048
    do_layer_norm_before: bool = True
    _remove_final_layer_norm: bool = False
    word_embed_proj_dim: int | None = None
    activation_function: str = "relu"
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    tie_word_embeddings: bool = True
    bos_token_id: int | list | None = None
    eos_token_id: int | list | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.word_embed_proj_dim = self.word_embed_proj_dim or self.hidden_size
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")

    @classmethod
    def from_dict(cls, d: dict) -> "OPTConfig":
        names = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in d.items() if k in names}, extra={k: v for k, v in d.items() if k not in names})


class Block(nn.Module):
    def __init__(self, c: OPTConfig, layer_id: int):
        super().__init__()
        d, heads = c.hidden_size, c.num_attention_heads
        self.pre_ln = c.do_layer_norm_before
        self.self_attn_layer_norm = nn.LayerNorm(d, elementwise_affine=c.layer_norm_elementwise_affine)
        self.self_attn = Attention(d, heads, heads, d // heads, scale=(d // heads) ** -0.5,
                                   qkv_bias=c.enable_bias, out_bias=c.enable_bias)
        self.final_layer_norm = nn.LayerNorm(d, elementwise_affine=c.layer_norm_elementwise_affine)
        self.mlp = FFN(layer_id, d, c.ffn_dim, c.activation_function, gated=False, bias=c.enable_bias)

    def forward(self, x, slots, mask, ffn, cache):
        if self.pre_ln:
            x = x + self.self_attn(self.self_attn_layer_norm(x), None, slots, mask, cache)
            return x + feed_forward(self.mlp, self.final_layer_norm(x), ffn)
        # post-LN (opt-350m): each residual sum is normalized, the sublayers see it raw
        x = self.self_attn_layer_norm(x + self.self_attn(x, None, slots, mask, cache))
        return self.final_layer_norm(x + feed_forward(self.mlp, x, ffn))


class Model(CausalLM):
    def __init__(self, c: OPTConfig):
        super().__init__()
        self.config = c
        d, e = c.hidden_size, c.word_embed_proj_dim
        self.embed_tokens = nn.Embedding(c.vocab_size, e)
        self.embed_positions = nn.Embedding(c.max_position_embeddings + POSITION_OFFSET, d)
        self.project_in = nn.Linear(e, d, bias=False) if e != d else None
        self.layers = nn.ModuleList(Block(c, i) for i in range(c.num_hidden_layers))
        # post-LN models end on a normalized sum already, so only pre-LN ones have a final norm
        final_norm = c.do_layer_norm_before and not c._remove_final_layer_norm
        self.final_layer_norm = nn.LayerNorm(d, elementwise_affine=c.layer_norm_elementwise_affine) \
            if final_norm else None
        self.project_out = nn.Linear(d, e, bias=False) if e != d else None
        self.lm_head = nn.Linear(e, c.vocab_size, bias=False)

    def forward(self, tokens, positions, slots, key_valid, caches, ffn=None, last_only=False) -> torch.Tensor:
        """tokens/positions/slots [B, T], key_valid [B, S'] -> logits [B, T, V] ([B, 1, V] if last_only)."""
        x = self.embed_tokens(tokens)  # [B, T, e]
        if self.project_in is not None:
            x = self.project_in(x)  # [B, T, d]
        x = x + self.embed_positions(positions + POSITION_OFFSET)
        mask = attention_mask(slots, key_valid, None)
        for layer, cache in zip(self.layers, caches):
            x = layer(x, slots, mask, ffn, cache)
        if last_only:
            x = x[:, -1:]  # [B, 1, d]
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)  # [B, T, e]
        return self.lm_head(x)


RENAMES = {"out_proj.": "o_proj.", "fc1.weight": "mlp.up", "fc1.bias": "mlp.up_bias", "fc2.bias": "mlp.down_bias"}


def sanitize(weights: dict, config: OPTConfig) -> dict:
    """HF parameter names -> ours: drop the `model.decoder.` prefix (the original facebook/opt
    checkpoints have only `decoder.`), rename attention and FFN, store down (fc2) as [F, d]."""
    out = {}
    for name, w in weights.items():
        name = name.removeprefix("model.").removeprefix("decoder.")
        if name.startswith("lm_head") and config.tie_word_embeddings:
            continue
        for old, new in RENAMES.items():
            name = name.replace(old, new)
        if name.endswith("fc2.weight"):
            name, w = name.replace("fc2.weight", "mlp.down"), w.t()
        out[name] = w
    if config.tie_word_embeddings:
        out["lm_head.weight"] = out["embed_tokens.weight"]
    return out
