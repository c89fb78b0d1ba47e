"""GGUF FFN blocks converted into the staging FFN's formats by ffn_convert.cpp (the CPU memory-limited
mode's prefill, engine/ffn_file.py), writing into the staging tensors in place; False from `load()`
where it does not build, and the caller keeps models/adopt.py's PyTorch conversion.

    q4k_to_q4(raw, out)               # Q4_K rows [N, row bytes] -> q4 rows, verbatim but for fp16 scales
    to_q8_0_t(raw, kind, out, c0)     # file rows [R, F row bytes] of down -> its neuron-major q8_0 columns
                                      # c0..c0 + R (kind: Q4_K, Q6_K or Q8_0)
"""

from functools import cache

import torch
from gguf import GGMLQuantizationType

from . import build as builder

FALLBACK = "GGUF FFNs convert in PyTorch"
DOWN_KINDS = {name: GGMLQuantizationType[name].value for name in ("Q8_0", "Q4_K", "Q6_K")}  # what to_q8_0_t
# reads, by gguf's type code (the kernel switches on it)


@cache
def load() -> bool:
    return builder.load_operators("ffn_convert.cpp", FALLBACK)


def q4k_to_q4(raw: torch.Tensor, out: dict[str, torch.Tensor]) -> None:
    """Q4_K rows uint8 [N, K / 256 * 144] -> out's q4 tensors {qs [N, K/2], d, m [N, K/32]} (contiguous)."""
    torch.ops.coreinfer.q4k_to_q4(raw, out["qs"], out["d"], out["m"])


def to_q8_0_t(raw: torch.Tensor, kind: str, out: dict[str, torch.Tensor], c0: int) -> None:
    """Down's file rows c0..c0 + R (uint8 [R, row bytes], R a multiple of 32) -> columns c0..c0 + R of
    out's neuron-major q8_0 {qs [F, d], d [F, d/32]} (contiguous)."""
    torch.ops.coreinfer.to_q8_0_t(raw, DOWN_KINDS[kind], out["qs"], out["d"], c0)
