"""Weight formats: the GGML block types of a file (ggml.py) and the runtime formats the engine computes
with, one module each with the same small interface:

    pack(w [N, K]) -> tensors             from_blocks(ggml type, bytes [N, row bytes], (N, K)) -> tensors
    dequantize(tensors, dtype) -> [N, K]  rows(tensors, index) -> tensors of those rows (neurons)
    matmul(x [..., K], tensors) -> x @ W.T   nbytes(tensors)
    rows_matmul(coef [..., R], tensors, index) -> coef @ W[index]  (neuron-major down; native for q8_0 and q4)

`tensors` is a dict of plain tensors (the names each module's docstring gives), so modules hold them
as buffers and compaction gathers them row by row without knowing the format.
"""

from . import dense, int8, q4, q8_0
from .ggml import GGMLType, ggml_type

FORMATS = {m.NAME: m for m in (dense, int8, q8_0, q4)}
BLOCKED = ("q8_0", "q4")  # the block formats of the contract (blocks of 32 along K)


def file_format(kind: GGMLType) -> str:
    """The runtime format that holds a file's type most faithfully: q4 for the 4-bit types it takes
    as they are, q8_0 for everything else (Q8_0 verbatim; Q5_K, Q6_K, F16, BF16, F32 requantized)."""
    return "q4" if kind.name in q4.FILE_TYPES else "q8_0"


def common_format(names: list[str]) -> str:
    """One format for weights that are fused (q/k/v): theirs if they share it, else q8_0."""
    return names[0] if len(set(names)) == 1 else "q8_0"


__all__ = ["FORMATS", "BLOCKED", "GGMLType", "ggml_type", "file_format", "common_format"]
