"""What a memory-limited session keeps resident, against a budget: one planner for the GPU mode
(engine/offload.py, `--max-gpu-memory`) and the CPU mode (engine/residency.py, `--max-memory`).

Resident: every weight but the FFN neurons (attention, norms, embeddings, head), the KV caches, the
staging of the FFN being prefilled (copies on a GPU, the file's mapped pages on the CPU), the FFNs
kept whole or as core rows, and on the CPU the runtime: what the process holds beyond its weights
(the interpreter, torch's and the kernels' libraries, the heap), measured by the streamer when the
mode opens. Exact for the tensors; activations and the allocator's later slack are not counted
(`HEADROOM` leaves room for them).
"""

import math
import re
from dataclasses import dataclass, field

import torch

from ..models.common import FFN
from .selection import keep_count

HEADROOM = 0.9  # share of the budget plans may fill; the rest is for activations and allocator slack
GiB = 2**30
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


class BudgetError(ValueError, MemoryError):
    """The budget cannot hold the plan: a MemoryError, and bad input (a ValueError) that the CLI
    reports in its one line."""


def parse_bytes(text: str | int) -> int:
    """'2GiB', '1.5 GB', '800MiB' or a plain number of bytes -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"memory size {text!r}: give a positive number with a unit, e.g. 2GiB, 1500MB")
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


def size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.2f} MiB"


def streamed_tensors(ffn: FFN) -> dict[str, torch.Tensor]:
    """The FFN tensors that are not resident: one slice per neuron (down's bias is resident)."""
    return {name: t for name, (t, _) in ffn.neuron_tensors().items()}


def resident_bytes(model) -> int:
    """Every weight's bytes (the embedding table too) but the FFN neurons'."""
    streamed = {id(t) for f in model.ffns() for t in streamed_tensors(f).values()}
    unique = {id(t): t for t in list(model.parameters()) + list(model.buffers())}  # tied weights once
    return sum(t.nbytes for key, t in unique.items() if key not in streamed)


def kv_bytes(model, batch: int, length: int) -> int:
    ref = model.embed_tokens.weight
    return sum(2 * batch * layer.self_attn.kv_heads * length * layer.self_attn.head_dim * ref.element_size()
               for layer in model.layers)


@dataclass
class Plan:
    """Bytes a session needs: resident weights, KV caches, FFN staging, the resident FFNs of
    `dense_layers`, every sequence's core rows (both per sequence, as CoreWeights holds them) and the
    runtime (0 on a GPU, whose budget holds tensors only); the FFNs of `streamed` layers are read in
    on every decode step. `flag` names the budget in errors."""

    resident: int
    kv_cache: int
    staging: int
    dense_ffns: int
    cores: int
    core_row_bytes: int  # the core rows' bytes at keep 1.0 (sparse layers, all sequences)
    dense_layers: list[int]
    streamed: list[int]
    flag: str = "--max-gpu-memory"
    runtime: int = 0
    sparse: list[tuple[int, int]] = field(default_factory=list)  # per sparse layer: (width, bytes of a row, all sequences)

    @property
    def total(self) -> int:
        return self.resident + self.kv_cache + self.staging + self.dense_ffns + self.cores + self.runtime

    def check(self, budget: int) -> None:
        """One clear line when the plan does not fit `budget` (of which HEADROOM is usable)."""
        usable = int(budget * HEADROOM)
        if self.total <= usable:
            return
        parts = (f"resident weights {size(self.resident)}, KV cache {size(self.kv_cache)}, FFN staging "
                 f"{size(self.staging)}, dense layers' FFNs {size(self.dense_ffns)}, core rows {size(self.cores)}"
                 + (f", runtime {size(self.runtime)}" if self.runtime else ""))
        fixed = self.total - self.cores
        keep = self.keep_that_fits(usable - fixed)
        if keep is not None:
            hint = f"keep <= {keep:.2f} would fit"
        else:
            hint = f"nothing fits below {size(fixed / HEADROOM)}"
        raise BudgetError(f"{self.flag} {size(budget)} is too small: this request needs "
                          f"{size(self.total / HEADROOM)} ({parts}; {HEADROOM:.0%} of the budget usable); {hint}")


    def keep_that_fits(self, room: int) -> float | None:
        """The largest keep ratio, in hundredths, whose core rows (counted as keep_count rounds them)
        take at most `room` bytes; None when not even 0.01 fits."""
        if not self.core_row_bytes or room <= 0:
            return None
        keep = math.floor(room / self.core_row_bytes * 100) / 100
        while keep >= 0.01 and sum(keep_count(keep, w) * row for w, row in self.sparse) > room:
            keep = round(keep - 0.01, 2)
        return keep if keep >= 0.01 else None


def plan(model, batch: int, cache_len: int, keep: dict[int, float] | None, budget: int, *,
         staging_layers: int = 2, flag: str = "--max-gpu-memory", runtime: int = 0) -> Plan:
    """The bytes of a session of `batch` sequences and `cache_len` cache slots, staging
    `staging_layers` FFNs at a time, beside `runtime` bytes of the process's own. `keep` maps sparse layers to keep ratios, and every other layer's
    FFN is resident; None (dense): the leading layers' FFNs that fit in `budget` are resident, the
    rest streamed every step."""
    ffns = model.ffns()
    staging = staging_layers * max(f.neuron_bytes() for f in ffns)
    fixed = resident_bytes(model) + kv_bytes(model, batch, cache_len) + staging + runtime
    if keep is None:
        fits = max(0, (int(budget * HEADROOM) - fixed) // (batch * max(f.neuron_bytes() for f in ffns)))
        dense_layers, keep = list(range(min(len(ffns), fits))), {}
    else:
        dense_layers = [f.layer_id for f in ffns if f.layer_id not in keep]
    sparse = [(ffns[layer].width, batch * (ffns[layer].neuron_bytes() // ffns[layer].width)) for layer in keep]
    cores = sum(keep_count(beta, w) * row for beta, (w, row) in zip(keep.values(), sparse))
    return Plan(resident_bytes(model), kv_bytes(model, batch, cache_len), staging,
                batch * sum(ffns[l].neuron_bytes() for l in dense_layers), cores, sum(w * row for w, row in sparse),
                dense_layers, [f.layer_id for f in ffns if f.layer_id not in keep and f.layer_id not in dense_layers],
                flag, runtime, sparse)
