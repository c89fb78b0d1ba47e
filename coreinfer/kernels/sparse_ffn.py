"""One decode token's sparse FFN in one native call (sparse_ffn.cpp), and its PyTorch reference.

    out [M, d], counts [M] = sparse_ffn(x [M, d], gate, up, down, down_norm [F], threshold, act, up_bias)

a = act(x gate^T) * (x up^T) (or act(x up^T + up_bias) without gate) over all F rows given (a layer's
superset); the neurons with |a_i| * down_norm_i >= threshold are chosen (a calibrated per-layer
threshold: no sort, no top-k), and only their rows of down, stored neuron-major [F, d], are read.
counts holds how many each row of x chose. The weights are format tensors (formats/):
  gate/up: q8_0 {qs, d}, q4 {qs, d, m}, or int8 {q, scale [F]};
  down:    q8_0 {qs, d} or q4 {qs, d, m} of [F, d], or int8 {q [F, d], scale [d]} (a scale per output channel).
The op runs where it applies (CPU, 1 <= M <= 16, d % 32 == 0, an AVX512-VNNI CPU; x is then quantized per
block of 32 to int8, as the dense GEMVs do), else the reference, in float math on the dequantized weights.
"""

from functools import cache

import torch
import torch.nn.functional as F

from . import build as builder
from .q4 import dequantize as q4_dequantize
from .q8_0 import dequantize as q8_0_dequantize

MAX_M = 16
FALLBACK = "sparse FFNs take the PyTorch reference"
# the model's activation name -> (the op's code for it, the same function in PyTorch)
ACTS = {"silu": (0, F.silu), "relu": (1, F.relu), "gelu": (2, F.gelu),
        "gelu_pytorch_tanh": (3, lambda v: F.gelu(v, approximate="tanh")),
        "gelu_new": (3, lambda v: F.gelu(v, approximate="tanh"))}


@cache
def load() -> bool:
    """Whether torch.ops.coreinfer.sparse_ffn runs here: built once into the cache folder, loaded, and
    this CPU has AVX512-VNNI."""
    if not builder.load_operators("sparse_ffn.cpp", FALLBACK):
        return False

    def fake(x, gate_q, gate_d, gate_m, gate_rs, up_q, up_d, up_m, up_rs, up_bias, down_q, down_d, down_m,
             down_scale, down_norm, threshold, act):
        return (x.new_empty(x.shape[0], x.shape[1], dtype=torch.float32),
                x.new_empty(x.shape[0], dtype=torch.int64))

    torch.library.register_fake("coreinfer::sparse_ffn")(fake)
    return torch.ops.coreinfer.sparse_ffn_supported()


@torch.compiler.assume_constant_result  # dynamo takes the answer as a constant instead of tracing a build
def available() -> bool:
    return load()


def dequantize(t: dict[str, torch.Tensor], down: bool = False) -> torch.Tensor:
    """A gate/up (or, with `down`, a down) matrix's format tensors -> W float32 [F, d]; int8 scales are
    per row for gate/up and per column for down."""
    if "m" in t:
        return q4_dequantize(t["qs"], t["d"], t["m"])
    if "qs" in t:
        return q8_0_dequantize(t["qs"], t["d"])
    scale = t["scale"].float()
    return t["q"].float() * (scale if down else scale[:, None])


def scores(x: torch.Tensor, gate: dict | None, up: dict, act: str, up_bias: torch.Tensor | None = None) -> torch.Tensor:
    """a [M, F] in float math (x [M, d] float32)."""
    fn = ACTS[act][1]
    u = x @ dequantize(up).t()
    if up_bias is not None:
        u = u + up_bias
    return fn(u) if gate is None else fn(x @ dequantize(gate).t()) * u


def reference(x: torch.Tensor, gate: dict | None, up: dict, down: dict, down_norm: torch.Tensor, threshold: float,
              act: str, up_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle (reads every row): x [M, d] -> (out [M, d] float32, counts [M])."""
    a = scores(x.float(), gate, up, act, up_bias)
    keep = a.abs() * down_norm >= threshold  # [M, F]
    return (a * keep) @ dequantize(down, down=True), keep.sum(1)


def _args(t: dict | None) -> list:
    """A gate/up matrix's tensors as the op's (q, d, m, rs)."""
    if t is None:
        return [None] * 4
    if "qs" in t:
        return [t["qs"], t["d"], t.get("m"), None]
    return [t["q"], None, None, t["scale"]]


def fits(x: torch.Tensor, down: dict) -> bool:
    q = down.get("qs", down.get("q"))
    return x.dim() == 2 and 1 <= x.shape[0] <= MAX_M and x.is_cpu and x.shape[1] % 32 == 0 and q.is_cpu and available()


def sparse_ffn(x: torch.Tensor, gate: dict | None, up: dict, down: dict, down_norm: torch.Tensor, threshold: float,
               act: str, up_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """See the module docstring; int8 scales must be float32 here (the caller converts them once)."""
    if not fits(x, down):
        return reference(x, gate, up, down, down_norm, threshold, act, up_bias)
    down_q, down_d, down_scale = (down["qs"], down["d"], None) if "qs" in down else (down["q"], None, down["scale"])
    return torch.ops.coreinfer.sparse_ffn(x.float().contiguous(), *_args(gate), *_args(up), up_bias, down_q, down_d,
                                          down.get("m"), down_scale, down_norm, float(threshold), ACTS[act][0])
