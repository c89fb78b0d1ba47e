"""Adopt checkpoint tensors into a meta-device model in runtime weight formats, one tensor at a time.

The model is built on the meta device; each weight is then converted from what the checkpoint holds
(a GGUF FileTensor's blocks, or an HF tensor) straight into its format (formats/) and placed on its
module, in chunks of rows (or, for down, which the model stores transposed, of the file's columns), so
the largest float tensor ever made is one chunk (CHUNK_WEIGHTS values), never a matrix or the model.

How each weight is held, for `formats`:
- "auto": the file's own format per tensor (formats.file_format: Q4_0/Q4_1/Q4_K -> q4, else q8_0);
  an HF tensor -> q8_0.
- "small": as auto, but down in q4 too where the file's down is 4-bit (the least memory: a 7B-shape
  Q4_K_M decodes at 1.29x the file's size; top-1 agreement with the file's weights 0.969 against
  auto's 0.997 on Qwen2.5-Coder-1.5B, docs/quality.md).
- "q8_0": q8_0 everywhere.
q/k/v are fused into one projection in their common format (q8_0 where they differ), up and gate
likewise; down is neuron-major [F, d], so it is requantized along d (the file's blocks run along F):
q8_0, which keeps it faithful, except under "small"; the embedding stays in its format (a lookup
dequantizes its rows) and a tied head shares its tensors; norms and biases are dense in the compute dtype.
"""

import threading

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..formats import FORMATS, common_format, file_format, native
from .common import QEmbedding, QLinear

QUANTIZED_FORMATS = ("auto", "small", "q8_0")
CHUNK_WEIGHTS = 1 << 22  # values converted at a time (16 MB in fp32): the conversion's float intermediates
# stay small next to the model, and no output is concatenated (a vocabulary table would be held twice)


def _is_file_tensor(w) -> bool:
    return hasattr(w, "kind") and hasattr(w, "read")  # io.gguf.FileTensor; models do not import io


def choose(w, formats: str) -> str:
    if formats in ("auto", "small") and _is_file_tensor(w):
        return file_format(w.kind)
    return "q8_0"


def convert(w, fmt: str, device, chunk_weights: int = CHUNK_WEIGHTS) -> dict[str, torch.Tensor]:
    """One weight [N, K] (FileTensor or tensor) -> the tensors of format `fmt` on `device`."""
    module = FORMATS[fmt]
    if not _is_file_tensor(w):
        return {name: t.to(device).contiguous() for name, t in module.pack(w).items()}
    if w.shift:
        return {name: t.to(device).contiguous() for name, t in module.pack(w.dequantize()).items()}
    rows, cols = w.model_shape
    if w.transposed:  # the file holds [K, N], blocks along N: take N in whole blocks, dequantized, turned
        raw = w.read().view(cols, -1, w.kind.nbytes)  # [K, N / block, block bytes]
        step = max(1, chunk_weights // cols // w.kind.block) * w.kind.block

        def chunk(start: int, stop: int) -> dict[str, torch.Tensor]:
            part = raw[:, start // w.kind.block:stop // w.kind.block].contiguous()
            return module.pack(w.kind.dequantize(part, (cols, stop - start)).t())
    else:  # verbatim where the format allows, else requantized
        step = max(1, chunk_weights // cols)

        def chunk(start: int, stop: int) -> dict[str, torch.Tensor]:
            return module.from_blocks(w.kind, w.read(start, stop), (stop - start, cols))
    out = None
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        part = chunk(start, stop)
        if out is None:  # the whole tensors, filled chunk by chunk: no list of parts to concatenate
            out = {name: torch.empty((rows, *t.shape[1:]), dtype=t.dtype, device=device) for name, t in part.items()}
        for name, t in part.items():
            out[name][start:stop] = t
    return out


def dense(w, dtype, device) -> torch.Tensor:
    t = w.dequantize(dtype) if _is_file_tensor(w) else w.to(dtype)
    return t.to(device).contiguous()


def shape(w) -> tuple[int, ...]:
    return tuple(w.model_shape if _is_file_tensor(w) else w.shape)


def check(name: str, parts: list, like: torch.Tensor) -> None:
    """The checkpoint weights `parts`, stacked by rows, must have the shape of the meta weight `like`."""
    rows, cols = sum(shape(w)[0] for w in parts), {shape(w)[1] for w in parts}
    if cols != {like.shape[1]} or rows != like.shape[0]:
        raise ValueError(f"{name}: checkpoint shapes {[shape(w) for w in parts]} do not make the model's {tuple(like.shape)}")


def fused(parts: list, formats: str, device) -> tuple[str, dict[str, torch.Tensor]]:
    """Weights sharing an input, stacked by rows ([sum N, K]) in their common format."""
    fmt = common_format([choose(w, formats) for w in parts])
    converted = [convert(w, fmt, device) for w in parts]
    return fmt, {name: torch.cat([c[name] for c in converted]) for name in converted[0]}


def ffn_formats(up, gate, down, formats: str) -> tuple[str, str]:
    """(format of up and gate, format of the neuron-major down) of one FFN."""
    return (common_format([choose(w, formats) for w in (up, gate) if w is not None]),
            choose(down, formats) if formats == "small" else "q8_0")


@torch.no_grad()
def adopt(model: nn.Module, state: dict, formats: str, device, dtype, progress: bool = False,
          in_file: dict | None = None) -> None:
    """Fill `model` (meta device, a llama or gemma3 family) from `state` (its sanitized names; the
    values FileTensors or tensors) in `formats` (see the module docstring); consumes `state`.
    `in_file` (a dict): the FFN weights are not converted but left as they are, in_file[layer] =
    {"up", "gate", "down": checkpoint weight or None}, and the FFNs' own weights stay on the meta device."""
    if formats not in QUANTIZED_FORMATS:
        raise ValueError(f"formats must be one of {QUANTIZED_FORMATS}, got {formats!r}")
    # The native ops these formats decode with build on a cold cache in ~20-30 s (a compiler process per
    # source): built here, beside the conversion, which leaves a core idle much of the time, instead of
    # when the first token asks for them. Loaded before adopt returns, so no later lookup races them.
    kernels = threading.Thread(target=lambda: [native.op(name) for name in native.KERNEL_MODULES], daemon=True)
    kernels.start()
    try:
        _adopt(model, state, formats, device, dtype, progress, in_file)
    finally:
        kernels.join()


def _adopt(model: nn.Module, state: dict, formats: str, device, dtype, progress: bool, in_file: dict | None) -> None:
    state, streamed = dict(state), set()
    embed = state.pop("embed_tokens.weight")
    head = state.pop("lm_head.weight")
    check("embed_tokens.weight", [embed], model.embed_tokens.weight)
    check("lm_head.weight", [head], model.lm_head.weight)
    fmt = choose(embed, formats)
    table = convert(embed, fmt, device)
    model.embed_tokens = QEmbedding(fmt, table, dtype)
    # tied: the head is the embedding table itself, held once
    model.lm_head = QLinear(fmt, table) if head is embed else QLinear(choose(head, formats), convert(head, choose(head, formats), device))
    for i, layer in enumerate(tqdm(model.layers, desc="Loading", unit="layer", disable=not progress)):
        p = f"layers.{i}."
        attn = layer.self_attn
        parts = [state.pop(f"{p}self_attn.{n}_proj.weight") for n in "qkv"]
        check(f"{p}self_attn.qkv_proj.weight", parts, attn.qkv_proj.weight)
        qkv_fmt, qkv = fused(parts, formats, device)
        biases = [state.pop(f"{p}self_attn.{n}_proj.bias", None) for n in "qkv"]
        bias = torch.cat([dense(b, dtype, device) for b in biases]) if biases[0] is not None else None
        attn.qkv_proj = QLinear(qkv_fmt, qkv, bias)
        out = state.pop(f"{p}self_attn.o_proj.weight")
        check(f"{p}self_attn.o_proj.weight", [out], attn.o_proj.weight)
        out_bias = state.pop(f"{p}self_attn.o_proj.bias", None)
        attn.o_proj = QLinear(choose(out, formats), convert(out, choose(out, formats), device),
                              None if out_bias is None else dense(out_bias, dtype, device))
        ffn = layer.mlp
        roles = {name: state.pop(f"{p}mlp.{name}", None) for name in ("up", "gate", "down")}  # down [F, d] after sanitize
        for name, w in roles.items():
            if w is not None:
                check(f"{p}mlp.{name}", [w], getattr(ffn, name))
        ffn_fmt, down_fmt = ffn_formats(roles["up"], roles["gate"], roles["down"], formats)
        if in_file is not None:  # left in the file: the CPU memory-limited mode streams them (engine/ffn_file.py)
            in_file[i] = roles
            streamed |= {f"{p}mlp.{name}" for name, w in roles.items() if w is not None}
            continue
        up, gate, down = roles.values()
        ffn.adopt_(ffn_fmt, convert(up, ffn_fmt, device), None if gate is None else convert(gate, ffn_fmt, device),
                   down_fmt, convert(down, down_fmt, device))
    rest = {name: dense(w, dtype, device) for name, w in state.items()}  # norms, FFN biases
    expected = {name: t for name, t in model.state_dict().items() if t.is_meta and name not in streamed}
    missing, unexpected = set(expected) - set(rest), set(rest) - set(model.state_dict())
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    for name, t in rest.items():
        if t.shape != expected[name].shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(t.shape)} != model {tuple(expected[name].shape)}")
    model.load_state_dict(rest, strict=False, assign=True)
