"""Pieces every model family shares: norms, rotary embeddings, the KV cache, attention, the FFN.

Shapes: B batch, T new tokens, S cache slots, H query heads, Hkv key/value heads, hd head dim,
d model width, F FFN width.

Caches belong to the caller (the engine's Session), not the model: a forward takes one KVCache per
layer. Every new token has its own cache slot per sequence, `slots` [B, T]: a left-padded batch
writes the same slots in every row, while rows of a continuously batched decode may be at different
slots. RoPE positions [B, T] skip the padding. A decode step's shapes never change from one step to
the next (the key mask is a view of a preallocated [B, S] buffer), which is what compilation needs.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..engine import int4
from ..engine.quant import int8_matmul, quantize_int8
from ..formats import BLOCKED, FORMATS

ACTIVATIONS = {
    "silu": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32. Gemma stores its scale as w and multiplies by (1 + w): `offset=1`."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim) if offset == 0 else torch.zeros(dim))
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one fused kernel instead of six elementwise ops: norms run 60+ times per decoded token
        weight = self.weight.float() + self.offset if self.offset else self.weight.float()
        return F.rms_norm(x.float(), weight.shape, weight, self.eps).type_as(x)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [hd/2] and the cos/sin scale, for the rope_scaling types checkpoints use.

    Computed on the CPU in fp64 (models are built on the meta device); the tables move to the
    model's device in `Rotary.ensure`."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv.float(), 1.0
    if kind == "linear":
        return (inv / scaling["factor"]).float(), 1.0
    if kind == "llama3":
        # Llama 3.1: long wavelengths slowed by `factor`, short kept, a smooth ramp between.
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old_len / wavelen - lo) / (hi - lo)
        ramped = (1 - smooth) * inv / factor + smooth * inv
        out = torch.where(wavelen > old_len / lo, inv / factor, inv)
        is_mid = (wavelen <= old_len / lo) & (wavelen >= old_len / hi)
        return torch.where(is_mid, ramped, out).float(), 1.0
    if kind == "yarn":
        factor, old_len = scaling["factor"], scaling["original_max_position_embeddings"]
        beta_fast, beta_slow = scaling.get("beta_fast", 32), scaling.get("beta_slow", 1)

        def dim_of(rotations):  # the dimension whose wavelength makes `rotations` turns over old_len
            return head_dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        lo = max(math.floor(dim_of(beta_fast)), 0)
        hi = min(math.ceil(dim_of(beta_slow)), head_dim - 1)
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float64, device="cpu") - lo) / max(hi - lo, 1e-3)).clamp(0, 1)
        extrapolate = 1 - ramp
        inv = (inv / factor) * (1 - extrapolate) + inv * extrapolate
        mscale = scaling.get("attention_factor") or (0.1 * math.log(factor) + 1.0)
        return inv.float(), mscale
    raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: default, linear, llama3, yarn")


class Rotary(nn.Module):
    """cos/sin tables [S, hd], built for the cache length by `new_caches`, looked up by position."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None = None):
        super().__init__()
        self.inv_freq, self.scale = rope_inv_freq(head_dim, theta, scaling)
        self.cos = self.sin = None

    def ensure(self, length: int, device) -> None:
        if self.cos is not None and self.cos.shape[0] >= length and self.cos.device == torch.device(device):
            return
        angles = torch.outer(torch.arange(length, dtype=torch.float32, device="cpu"), self.inv_freq)  # [S, hd/2]
        angles = torch.cat([angles, angles], dim=-1).to(device)  # [S, hd], half-split layout as in HF
        self.cos, self.sin = angles.cos() * self.scale, angles.sin() * self.scale

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # [B, T] -> [B, T, 1, hd], broadcast over the heads of a [B, T, heads, hd] tensor
        return self.cos[positions].unsqueeze(2).to(dtype), self.sin[positions].unsqueeze(2).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Preallocated keys and values [B, Hkv, S, hd]; a forward writes its T slots in place."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.rows = torch.arange(batch, device=device)[:, None]  # [B, 1]: update's batch index, made once

    def update(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int):
        """Write k, v [B, Hkv, T, hd] at `slots` [B, T]; return the first `kv_len` slots (views, no copy).

        An index_put_, not a scatter_: inductor writes an index_put_ on a graph input in place, while a
        scatter_ became a copy of the whole cache, the scatter and a copy back, for K and V of every layer
        (4 x 786 KB per layer and step at 512 slots of SmolLM2: ~94 MB of traffic a token, as much as the
        weights)."""
        rows = self.rows[:slots.shape[0]]  # [B, 1], broadcast against slots
        self.k[rows, :, slots] = k.transpose(1, 2)  # the indexed dims lead: [B, T, Hkv, hd]
        self.v[rows, :, slots] = v.transpose(1, 2)
        return self.k[:, :, :kv_len], self.v[:, :, :kv_len]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def attention_mask(slots: torch.Tensor, key_valid: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean mask [B, 1, T, S'] of the keys each new token may see.

    slots [B, T]: cache slots of the new tokens; key_valid [B, S']: slots that hold real tokens (not padding).
    A token always sees itself so that padding rows never softmax over nothing (NaN would leak into V).
    Slot distance equals position distance within a sequence, so the sliding window is checked on slots.
    """
    k_slots = torch.arange(key_valid.shape[1], device=slots.device)
    dist = slots[:, :, None] - k_slots  # [B, T, S']
    visible = dist >= 0
    if window is not None:
        visible &= dist < window
    mask = (visible & key_valid[:, None, :]) | (dist == 0)  # [B, T, S']
    return mask[:, None]


def attend(q, k, v, mask, scale: float) -> torch.Tensor:
    """q [B, H, T, hd], k/v [B, Hkv, S', hd] -> [B, T, H*hd]; GQA by repeating kv heads inside SDPA."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2).flatten(2)


class FFN(nn.Module):
    """The one FFN interface every family uses, so the core engine never looks inside a family.

    Gated (SwiGLU/GeGLU): a = act(x W_gate^T) * (x W_up^T); plain (OPT): a = act(x W_up^T + b_up).
    out = a @ down + b_down. `down` is stored transposed, [F, d], so a neuron is a *row* of up, gate
    and down alike and compaction is three row gathers.

    After `quantize_()` the weights are int8 (see quant.py): up/gate [F, d] with a scale per neuron,
    down as [d, F] with a scale per output channel, the layout the int8 kernel reads; a neuron is
    then a row of up/gate and a column of down. `quantize_("int4")` packs up/gate group-wise int4 for
    the dense matmul and keeps `{up,gate}_src` [d/2, F], the same values a neuron per column, for
    compaction (see int4.py); down stays int8.

    `adopt_` takes weights in a block format of the contract instead (formats/, as a GGUF holds them):
    up/gate in q4 or q8_0 ([F, d] rows, blocks along d), down neuron-major [F, d] in q4 or q8_0
    (`down_format`; blocks along d), buffers `<role>_<tensor>` (up_qs, up_d, ...): a neuron is then a row of every tensor.
    """

    def __init__(self, layer_id: int, dim: int, hidden: int, act: str, gated: bool, bias: bool):
        super().__init__()
        self.layer_id = layer_id  # what selection policies and the session key this layer's state by
        self.act_name, self.act, self.gated = act, activation(act), gated
        self.format = "dense"  # of up/gate: dense, int8 or int4 (`quantize_`), q8_0 or q4 (`adopt_`)
        self.down_format = "q8_0"  # of a blocked FFN's neuron-major down (`adopt_`): q8_0 or q4
        self.hidden = hidden
        self.up = nn.Parameter(torch.empty(hidden, dim))  # [F, d]
        self.gate = nn.Parameter(torch.empty(hidden, dim)) if gated else None  # [F, d]
        self.down = nn.Parameter(torch.empty(hidden, dim))  # [F, d]
        self.up_bias = nn.Parameter(torch.zeros(hidden)) if bias else None  # [F]
        self.down_bias = nn.Parameter(torch.zeros(dim)) if bias else None  # [d]

    @property
    def width(self) -> int:
        return self.hidden

    @property
    def quantized(self) -> bool:
        return self.format != "dense"

    @property
    def blocked(self) -> bool:
        """Whether the weights are in a block format (`adopt_`): every neuron tensor is gathered by row."""
        return self.format in BLOCKED

    def role(self, name: str) -> dict[str, torch.Tensor]:
        """The format tensors of `name` (up, gate or down) of a blocked FFN: {qs, d[, m]}."""
        prefix = f"{name}_"
        return {key[len(prefix):]: t for key, t in self.named_buffers(recurse=False) if key.startswith(prefix)}

    @torch.no_grad()
    def adopt_(self, fmt: str, up: dict, gate: dict | None, down_fmt: str, down: dict) -> None:
        """Hold up/gate in block format `fmt` ({qs, d[, m]} of [F, d]) and down neuron-major in `down_fmt`."""
        if fmt not in BLOCKED or down_fmt not in BLOCKED:
            raise ValueError(f"adopt_ takes {BLOCKED}, got {fmt!r} and {down_fmt!r}")
        self.format, self.down_format = fmt, down_fmt
        for name, tensors in (("up", up), ("gate", gate), ("down", down)):
            delattr(self, name)
            for key, t in (tensors or {}).items():
                self.register_buffer(f"{name}_{key}", t)

    def neuron_tensors(self) -> dict[str, tuple[torch.Tensor, int]]:
        """Every tensor with one slice per neuron, and the axis that indexes the neurons: up, gate and
        their int8 scales by row; down by row in float ([F, d]) but by column in int8 ([d, F]). int4 up
        and gate: by column of their `_src` copies and of their scales and zeros [d/G, F, 2] (as many
        bytes as the packed rows a dense step reads). Block formats (`adopt_`): every tensor by row."""
        if self.blocked:
            out = {name: (t, 0) for name, t in self.named_buffers(recurse=False) if t is not None}
            return {**out, **({"up_bias": (self.up_bias, 0)} if self.up_bias is not None else {})}
        out = {"up": (self.up, 0), "gate": (self.gate, 0), "down": (self.down, 1 if self.quantized else 0),
               "up_bias": (self.up_bias, 0)}
        if self.format == "int4":
            del out["up"], out["gate"]
            out.update(up_src=(self.up_src, 1), up_sz=(self.up_sz, 1), gate_src=(getattr(self, "gate_src", None), 1),
                       gate_sz=(getattr(self, "gate_sz", None), 1))
        elif self.quantized:
            out.update(up_scale=(self.up_scale, 0), gate_scale=(getattr(self, "gate_scale", None), 0))
        return {name: (t, axis) for name, (t, axis) in out.items() if t is not None}

    def neuron_bytes(self) -> int:
        """Weight bytes all F neurons cost a decode step (rows, scales and biases; not down's bias)."""
        return sum(t.nbytes for t, _ in self.neuron_tensors().values())

    @torch.no_grad()
    def quantize_(self, fmt: str = "int8") -> None:
        """int8, or int4 up/gate where the int4 kernel takes their [F, d] (else int8; see int4.py)."""
        scale_dtype = torch.bfloat16 if self.up.device.type == "cpu" else self.up.dtype
        self.format = "int4" if fmt == "int4" and int4.fits(*self.up.shape) else "int8"
        for name, w in (("up", self.up), ("gate", self.gate), ("down", self.down)):
            if w is None:
                continue
            delattr(self, name)
            if self.format == "int4" and name != "down":
                q, sz = int4.quantize_int4(w)  # q [F, d], sz [d/G, F, 2]
                self.register_buffer(name, int4.pack(q))  # [F, d/2], the kernel's interleaved layout
                self.register_buffer(f"{name}_sz", sz)
                # [d/2, F]: read only when compacting; not persistent, so not in what a decode step reads
                self.register_buffer(f"{name}_src", int4.source(q), persistent=False)
                continue
            q, scale = quantize_int8(w.t().contiguous() if name == "down" else w)  # down: [d, F], scale [d]
            self.register_buffer(name, q)
            self.register_buffer(f"{name}_scale", scale.to(scale_dtype))

    def _rows(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """x [B, T, d] -> x @ W.T [B, T, F] for W the quantized up or gate."""
        if self.blocked:
            return FORMATS[self.format].matmul(x, self.role(name))
        if self.format == "int4":
            return int4.int4_matmul(x, getattr(self, name), getattr(self, f"{name}_sz"))
        return int8_matmul(x, getattr(self, name), getattr(self, f"{name}_scale"))

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, d] -> a [B, T, F], the input of the down projection."""
        if self.quantized:
            up = self._rows(x, "up")
            up = up if self.up_bias is None else up + self.up_bias
            return self.act(self._rows(x, "gate")) * up if self.gated else self.act(up)
        up = F.linear(x, self.up, self.up_bias)
        if self.gate is None:
            return self.act(up)
        return self.act(F.linear(x, self.gate)) * up

    def project(self, a: torch.Tensor) -> torch.Tensor:
        if self.blocked:
            out = FORMATS[self.down_format].rows_matmul(a, self.role("down"))  # [B, T, F] @ [F, d]
        elif self.quantized:
            out = int8_matmul(a, self.down, self.down_scale)  # [B, T, F] x [d, F]^T
        else:
            out = a @ self.down  # [B, T, F] @ [F, d]
        return out if self.down_bias is None else out + self.down_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.activations(x))


class QLinear(nn.Module):
    """A projection x @ W.T + b with W [N, K] in a weight format (formats/), its tensors as buffers.
    Two QLinears (or a QLinear and a QEmbedding) may hold the same tensors: a tied head."""

    def __init__(self, fmt: str, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None = None):
        super().__init__()
        self.fmt = fmt
        self.names = tuple(tensors)
        for name, t in tensors.items():
            self.register_buffer(name, t)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.names}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = FORMATS[self.fmt].matmul(x, self.tensors())
        return out if self.bias is None else out + self.bias


class QEmbedding(nn.Module):
    """A token embedding table [V, d] kept in a weight format: a lookup dequantizes only the rows it reads."""

    def __init__(self, fmt: str, tensors: dict[str, torch.Tensor], dtype: torch.dtype):
        super().__init__()
        self.fmt, self.dtype, self.names = fmt, dtype, tuple(tensors)
        for name, t in tensors.items():
            self.register_buffer(name, t)
        self.shape = FORMATS[fmt].dequantize(FORMATS[fmt].rows(tensors, torch.zeros(1, dtype=torch.long,
                                             device=next(iter(tensors.values())).device))).shape[1:]
        self.num_embeddings = next(iter(tensors.values())).shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.names}

    @property
    def weight(self) -> torch.Tensor:
        """A stand-in with the table's shape [V, d], compute dtype and device, for code that asks those
        of `embed_tokens.weight` (KV caches take its dtype); it holds no values (zeros, no storage)."""
        ref = next(iter(self.tensors().values()))
        return torch.zeros((), dtype=self.dtype, device=ref.device).expand(self.num_embeddings, *self.shape)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        fmt = FORMATS[self.fmt]
        rows = fmt.dequantize(fmt.rows(self.tensors(), tokens.reshape(-1)), self.dtype)  # [B T, d]
        return rows.view(*tokens.shape, rows.shape[-1])


class Attention(nn.Module):
    """Multi-head attention with GQA, optional q/k/v bias (Qwen2, OPT), per-head q/k RMSNorm (Gemma 3
    with 1 + w, Qwen3 with w: `qk_norm_offset`), RoPE.

    q, k and v come from one fused projection `qkv_proj` ([H + 2 Hkv] * hd rows; `fuse_qkv` builds it
    from a checkpoint's three), and RoPE turns q and k in one go: fewer kernels per decoded token.
    """

    def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int, scale: float,
                 qkv_bias: bool = False, out_bias: bool = False, qk_norm_eps: float | None = None,
                 qk_norm_offset: float = 1.0):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.scale = heads, kv_heads, head_dim, scale
        self.qkv_proj = nn.Linear(dim, (heads + 2 * kv_heads) * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=out_bias)
        self.q_norm = RMSNorm(head_dim, qk_norm_eps, qk_norm_offset) if qk_norm_eps else None
        self.k_norm = RMSNorm(head_dim, qk_norm_eps, qk_norm_offset) if qk_norm_eps else None

    def forward(self, x, rope, slots, mask, cache: KVCache) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hkv = self.heads, self.kv_heads
        qkv = self.qkv_proj(x).view(B, T, H + 2 * Hkv, self.head_dim)
        qk, v = qkv[:, :, :H + Hkv], qkv[:, :, H + Hkv:]  # [B, T, H + Hkv, hd], [B, T, Hkv, hd]
        if self.q_norm is not None:
            qk = torch.cat([self.q_norm(qk[:, :, :H]), self.k_norm(qk[:, :, H:])], dim=2)
        if rope is not None:
            qk = apply_rotary(qk, *rope)
        q, k, v = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, hd]
        k, v = cache.update(slots, k, v, kv_len=mask.shape[-1])  # [B, Hkv, S', hd]
        return self.o_proj(attend(q, k, v, mask, self.scale))


def fuse_qkv(state: dict) -> dict:
    """Checkpoint q/k/v projections -> one `qkv_proj` per attention (rows stacked q, k, v)."""
    out = {}
    for name, w in state.items():
        if ".q_proj." in name:
            parts = [state[name.replace(".q_proj.", f".{p}.")] for p in ("q_proj", "k_proj", "v_proj")]
            out[name.replace(".q_proj.", ".qkv_proj.")] = torch.cat(parts)
        elif ".k_proj." not in name and ".v_proj." not in name:
            out[name] = w
    return out


def feed_forward(ffn: FFN, h: torch.Tensor, run) -> torch.Tensor:
    """A block's FFN, dense, or through `run(ffn, h)` when the session decides how this layer runs
    (observe its activations during prefill, use its compacted core weights while decoding)."""
    return ffn(h) if run is None else run(ffn, h)


class CausalLM(nn.Module):
    """What every family shares: `layers` of blocks, each with an FFN `.mlp` and attention `.self_attn`.

    forward(tokens, positions, slots, key_valid, caches, ffn=None, last_only=False): tokens, positions
    and slots [B, T], key_valid [B, S'], one KVCache per layer (`new_caches`); `ffn` is how the FFNs run
    (None: dense; see `feed_forward`); `last_only` computes logits for the last position only, which
    is all a prefill needs ([B, 1, V] instead of [B, T, V]: 400 MB for 2k tokens of a 49k vocabulary).
    """

    def new_caches(self, batch: int, max_len: int) -> list[KVCache]:
        """One KV cache per layer for `batch` sequences of up to `max_len` tokens (and RoPE tables that long)."""
        ref = self.embed_tokens.weight  # FFN weights may be int8; the cache takes the compute dtype
        for rotary in self.rotaries():
            rotary.ensure(max_len, ref.device)
        return [KVCache(batch, layer.self_attn.kv_heads, max_len, layer.self_attn.head_dim, ref.dtype, ref.device)
                for layer in self.layers]

    def rotaries(self) -> list[Rotary]:
        return [m for m in self.children() if isinstance(m, Rotary)]

    def ffns(self) -> list[FFN]:
        """The FFN of every layer, in layer order (ffns()[i].layer_id == i)."""
        return [layer.mlp for layer in self.layers]

    @property
    def max_context(self) -> int:
        return self.config.max_position_embeddings

    def weight_bytes(self) -> int:
        """Weight bytes one dense decode step reads: every parameter and persistent buffer, less the
        embedding table when untied (a lookup reads one row)."""
        seen, total = set(), 0
        for t in self.state_dict().values():
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.nbytes
        embed = {t.data_ptr(): t.nbytes for t in self.embed_tokens.state_dict().values()}
        if not embed.keys() & {t.data_ptr() for t in self.lm_head.state_dict().values()}:  # untied
            total -= sum(embed.values())
        return total
