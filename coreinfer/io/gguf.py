"""Read a GGUF file (llama.cpp's format): its HF config, its tokenizer, and its tensors where they lie.

`tensors` names every tensor by its HF parameter name as a `FileTensor`: where its blocks are in the
file, their GGML type (formats/ggml.py) and shape; nothing is read until the model adopts it, one
tensor at a time (models/adopt.py), so no float copy of the model is ever made. What
`coreinfer.io.loading` caches is only `config.json` and the tokenizer files. Supported GGUF
architectures are `llama`, `qwen2`, `qwen3` (q/k RMSNorms) and `gemma3`.

llama.cpp's `convert_hf_to_gguf.py` does not store weights verbatim, and this module undoes what it
changes: it permutes the rows of q/k projections for `llama` (for its rotary layout; undone as a row
order, which every block type allows: a row is whole blocks), and it stores Gemma's RMSNorm weights
as `1 + w` (Gemma computes `x * (1 + w)`). Qwen2, Qwen3 and Gemma3 are not permuted, and Qwen3's q/k
norms are stored as they are (it computes `x * w`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..formats.ggml import GGMLType, ggml_type
from . import gguf_header

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3")

_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text"}
_HF_CLASS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
             "gemma3": "Gemma3ForCausalLM"}

# GGUF per-layer tensor names -> HF names (below `model.layers.N.`).
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
}
_ARCH_LAYER_NAMES = {
    "llama": {"ffn_norm": "post_attention_layernorm"},
    "qwen2": {"ffn_norm": "post_attention_layernorm"},
    "qwen3": {"ffn_norm": "post_attention_layernorm", "attn_q_norm": "self_attn.q_norm",
              "attn_k_norm": "self_attn.k_norm"},
    "gemma3": {
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

# llama.cpp hard-codes these for Gemma 3 rather than storing them (see its `llm_load_hparams`).
_GEMMA3_GLOBAL_EVERY = 6  # every 6th layer attends globally, the rest use the sliding window
_GEMMA3_LOCAL_ROPE_BASE = 10000.0
_GEMMA3_27B_LAYERS = 62  # the one size that scales queries by hidden/heads instead of head_dim

# Gemma GGUFs may carry no chat template; this is Gemma 3's own template, text-only.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '')"
    " + message['content'] | trim + '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


class GGUFError(ValueError):
    """The file is not a GGUF this module can convert; the message says why in one line."""


def open_gguf(path: Path):
    """Parse a GGUF header and tensor table (io/gguf_header.py: gguf-py's reader takes ~10 s on a large
    vocabulary, on every start)."""
    try:
        reader = gguf_header.read_header(path)
    except OSError as exc:
        raise GGUFError(f"cannot read it ({_describe(exc)})") from exc
    except gguf_header.HeaderError as exc:
        raise GGUFError(str(exc)) from exc
    arch = _field(reader, "general.architecture", None)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(
            f"GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    return reader


def _describe(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _field(reader, key: str, default=KeyError):
    field = reader.fields.get(key)
    if field is None:
        if default is KeyError:
            raise GGUFError(f"the GGUF metadata lacks the key {key!r}")
        return default
    return field.contents()


def _f32(value: float) -> float:
    """A float32 metadata value as HF writes it (9.999999747e-06 -> 1e-05)."""
    return float(np.format_float_positional(np.float32(value), unique=True))


def hf_config(reader) -> dict:
    """The HF `config.json` dict described by the GGUF metadata."""
    arch = _field(reader, "general.architecture")

    def meta(key, default=KeyError):
        return _field(reader, f"{arch}.{key}", default)

    hidden, heads = meta("embedding_length"), meta("attention.head_count")
    head_dim = meta("attention.key_length", None) or meta("rope.dimension_count", None) or hidden // heads
    names = {tensor.name for tensor in reader.tensors}
    config = {
        "architectures": [_HF_CLASS[arch]],
        "model_type": _MODEL_TYPE[arch],
        "vocab_size": _vocab_size(reader),
        "hidden_size": hidden,
        "intermediate_size": meta("feed_forward_length"),
        "num_hidden_layers": meta("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": meta("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "max_position_embeddings": meta("context_length"),
        "rms_norm_eps": _f32(meta("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(meta("rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(meta),
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "gelu_pytorch_tanh" if arch == "gemma3" else "silu",
        "attention_bias": "blk.0.attn_q.bias" in names,
        "torch_dtype": "float32",
    }
    for hf_key, gguf_key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        config[f"{hf_key}_token_id"] = _field(reader, f"tokenizer.ggml.{gguf_key}_token_id", None)
    if arch == "gemma3":
        config.update(_gemma3_config(meta, config))
    return config


def _vocab_size(reader) -> int:
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise GGUFError("the GGUF has no tokenizer (no tokenizer.ggml.tokens in its metadata)")
    return len(tokens.data)  # one entry per token: no need to decode the strings


def _rope_scaling(meta) -> dict | None:
    kind = meta("rope.scaling.type", None)
    if kind in (None, "none"):
        return None
    scaling = {"rope_type": kind, "factor": _f32(meta("rope.scaling.factor"))}
    original = meta("rope.scaling.original_context_length", None)
    if original:
        scaling["original_max_position_embeddings"] = original
    return scaling


def _gemma3_config(meta, config: dict) -> dict:
    layers = config["num_hidden_layers"]
    per_head = config["hidden_size"] // config["num_attention_heads"]
    return {
        "hidden_activation": config["hidden_act"],  # the key Gemma3TextConfig itself uses
        "sliding_window": meta("attention.sliding_window"),
        "layer_types": [
            "full_attention" if i % _GEMMA3_GLOBAL_EVERY == _GEMMA3_GLOBAL_EVERY - 1 else "sliding_attention"
            for i in range(layers)
        ],
        "rope_local_base_freq": _GEMMA3_LOCAL_ROPE_BASE,
        "query_pre_attn_scalar": per_head if layers == _GEMMA3_27B_LAYERS else config["head_dim"],
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
    }


def hf_name(arch: str, gguf_name: str) -> str:
    """HF parameter name of a GGUF tensor, or GGUFError for a tensor we do not understand."""
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match:
        layer, part, kind = match.groups()
        hf_part = _LAYER_NAMES.get(part) or _ARCH_LAYER_NAMES[arch].get(part)
        if hf_part:
            return f"model.layers.{layer}.{hf_part}.{kind}"
    else:
        base, _, kind = gguf_name.rpartition(".")
        if base in _GLOBAL_NAMES and kind in ("weight", "bias"):
            return f"{_GLOBAL_NAMES[base]}.{kind}"
    raise GGUFError(f"unsupported tensor {gguf_name!r} for GGUF architecture {arch!r}")


@dataclass(frozen=True)
class FileTensor:
    """One tensor of a GGUF file, not yet read: `read()` returns its bytes, `dequantize()` its values.

    shape is HF's ([out, in] for a matrix, innermost last). `row_order` reorders rows as they are read
    (llama's q/k); `shift` is added to the values (Gemma's norms); `transposed` marks a matrix the
    model stores transposed (down, neuron-major), so only its float values can be taken."""

    path: Path
    offset: int  # of its first byte in the file
    kind: GGMLType
    shape: tuple[int, ...]
    name: str = ""  # the GGUF name, for messages
    row_order: torch.Tensor | None = None
    shift: float = 0.0
    transposed: bool = False

    def read(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The blocks of rows start..stop, uint8 [rows, row bytes] (a 1-D tensor is one row). Read with
        pread into this process's own memory: the file's pages go to the page cache, not to our
        resident set, so loading tensor after tensor does not pile the file up in RSS as a map would."""
        row = self.kind.row_bytes(self.shape[-1])
        rows = self.shape[0] if len(self.shape) == 2 else 1
        if self.row_order is not None and len(self.shape) == 2:  # reordered rows: read all, then pick
            return self.read_range(0, rows, row)[self.row_order][start:stop]
        stop = rows if stop is None else min(stop, rows)
        return self.read_range(start, stop, row)

    def read_range(self, start: int, stop: int, row: int) -> torch.Tensor:
        raw = bytearray((stop - start) * row)
        with open(self.path, "rb", buffering=0) as file:
            got = os.preadv(file.fileno(), [raw], self.offset + start * row)
        if got != len(raw):
            raise GGUFError(f"tensor {self.name}: the file ends {len(raw) - got} bytes early")
        return torch.frombuffer(raw, dtype=torch.uint8).view(stop - start, row)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        w = self.kind.dequantize(self.read(), self.shape)
        if self.row_order is not None and len(self.shape) == 1:  # a bias: its elements are the rows
            w = w[self.row_order]
        if self.shift:
            w = w + self.shift
        return (w.t() if self.transposed else w).to(dtype).contiguous()

    def t(self) -> "FileTensor":
        """The same tensor, taken transposed (see `transposed`)."""
        return replace(self, transposed=not self.transposed, shape=self.shape)

    @property
    def model_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape)) if self.transposed else self.shape


def _unpermute_rows(rows: int, n_heads: int) -> torch.Tensor:
    """Row order undoing llama.cpp's `LlamaModel.permute` of a q or k projection (weight or bias)."""
    half = rows // n_heads // 2
    return torch.arange(rows).view(n_heads, half, 2).transpose(1, 2).reshape(rows)


def tensors(path: Path, reader, config: dict) -> dict[str, FileTensor]:
    """Every tensor of the file by HF parameter name, converter changes undone; unknown tensors or
    GGML types fail here, before anything is read."""
    arch = _field(reader, "general.architecture")
    out = {}
    for tensor in reader.tensors:
        name = hf_name(arch, tensor.name)
        try:
            kind = ggml_type(tensor.tensor_type)
        except ValueError as exc:
            raise GGUFError(f"tensor {tensor.name}: {exc}") from exc
        shape = tuple(int(dim) for dim in reversed(tensor.shape))  # GGUF lists dimensions innermost first
        order, shift = None, 0.0
        if arch == "llama" and ".attn_q." in tensor.name:
            order = _unpermute_rows(shape[0], config["num_attention_heads"])
        elif arch == "llama" and ".attn_k." in tensor.name:
            order = _unpermute_rows(shape[0], config["num_key_value_heads"])
        elif arch == "gemma3" and tensor.name.endswith("norm.weight"):
            shift = -1.0
        out[name] = FileTensor(Path(path), int(tensor.data_offset), kind, shape, tensor.name, order, shift)
    return out


def write_metadata(path: Path, reader, out_dir: Path) -> None:
    """Write `config.json` and the tokenizer files of GGUF `path` into `out_dir` (weights stay in the file)."""
    save_tokenizer(path, reader, out_dir)
    (out_dir / "config.json").write_text(json.dumps(hf_config(reader), indent=2) + "\n")


def save_tokenizer(path: Path, reader, out_dir: Path) -> None:
    """Save the GGUF's tokenizer, via transformers' GGUF tokenizer conversion, as HF tokenizer files."""
    from transformers import (
        TokenizersBackend,  # imported here: it takes over a second to import
    )

    # TokenizersBackend gives the same tokenizer as AutoTokenizer here, without AutoTokenizer's detour
    # through a full (slow, pure-Python) GGUF config parse to pick a class.
    try:
        tokenizer = TokenizersBackend.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:  # transformers raises many kinds for tokenizers it cannot convert
        raise GGUFError(f"cannot convert its tokenizer ({_describe(exc)})") from exc
    template = _field(reader, "tokenizer.chat_template", None)
    if template is None and _field(reader, "general.architecture") == "gemma3":
        template = GEMMA_CHAT_TEMPLATE
    tokenizer.chat_template = template
    tokenizer.save_pretrained(str(out_dir))
    if template is not None:
        # transformers writes chat_template.jinja; keep a copy in tokenizer_config.json as older
        # readers and plain-JSON consumers look for it there.
        config_file = out_dir / "tokenizer_config.json"
        tokenizer_config = json.loads(config_file.read_text())
        tokenizer_config["chat_template"] = template
        config_file.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")

