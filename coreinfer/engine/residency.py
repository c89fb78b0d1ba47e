"""CPU memory-limited mode (`--max-memory`): the FFN weights stay in the memory-mapped file, and only
each prompt's core rows are resident, with attention, norms, embeddings and the KV caches.

    streamer = FileStreamer(model)            # the model's FFN tensors are views of the mapped file
    session = ResidentSession(model, prompts, 64, policy=..., budget=parse_bytes("3GiB"), streamer=streamer)
    session.prefill()   # reads each layer's FFN from the file once, selects and gathers its core rows,
                        # then drops the layer's file pages (unmapped, and out of the page cache)
    session.step(tokens)                      # decodes from the resident rows: no FFN page is touched

It is the GPU mode of engine/offload.py with RAM as the device and the file as the host memory: the
same session, selection inside the forward and budget planner (engine/budget.py); what differs is the
streamer. Nothing is copied to stage a layer: its mapped pages are the staging (one layer's worth,
which the plan counts), the next layer's pages are requested ahead (MADV_WILLNEED) so the disk reads
while this layer computes, and a layer's pages are dropped once its core rows are gathered.
"""

import ctypes
import ctypes.util
import mmap
import os

import torch

from ..models.common import FFN
from .budget import plan, resident_bytes, streamed_tensors
from .ffn_file import GGUFStreamer, runtime_bytes
from .offload import OffloadSession

PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def page_span(t: torch.Tensor, inward: bool) -> tuple[int, int]:
    """(address, length) of the whole pages under t's bytes: inward, only pages t alone covers (safe
    to drop: a neighbouring tensor's bytes are not on them); outward, every page t touches."""
    start, end = t.data_ptr(), t.data_ptr() + extent(t)
    if inward:
        lo, hi = -(-start // PAGE) * PAGE, end // PAGE * PAGE
    else:
        lo, hi = start // PAGE * PAGE, -(-end // PAGE) * PAGE
    return lo, max(0, hi - lo)


def extent(t: torch.Tensor) -> int:
    """Bytes from t's first element to just past its last one (a transposed view spans its storage)."""
    if t.numel() == 0:
        return 0
    return (sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1) * t.element_size()


def file_mapping(t: torch.Tensor) -> tuple[str, int] | None:
    """(file path, offset of t's first page in it) when t lies in a file mapping, else None."""
    addr = t.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= addr < hi:
                path = fields[5].strip() if len(fields) == 6 else ""
                return (path, int(fields[2], 16) + addr // PAGE * PAGE - lo) if path.startswith("/") else None
    return None


def advise(t: torch.Tensor, advice: int) -> None:
    lo, n = page_span(t, inward=advice == mmap.MADV_DONTNEED)
    if n and _libc.madvise(lo, n, advice) != 0:
        raise OSError(ctypes.get_errno(), f"madvise({advice}) failed: {os.strerror(ctypes.get_errno())}")


def drop_pages(t: torch.Tensor) -> None:
    """Unmap t's pages from this process and evict them from the page cache: the next read of t goes
    to the disk. Only for tensors that are never written (a private mapping's written pages would be
    lost)."""
    where = file_mapping(t)
    advise(t, mmap.MADV_DONTNEED)
    if where is not None:
        path, offset = where
        lo, n = page_span(t, inward=True)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, offset + lo - t.data_ptr() // PAGE * PAGE, n, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached_bytes(t: torch.Tensor) -> int:
    """Bytes of t's pages in memory (for a file mapping: in the page cache), by mincore."""
    lo, n = page_span(t, inward=False)
    pages = (n + PAGE - 1) // PAGE
    vec = (ctypes.c_ubyte * max(pages, 1))()
    if n and _libc.mincore(lo, n, vec) != 0:
        raise OSError(ctypes.get_errno(), f"mincore failed: {os.strerror(ctypes.get_errno())}")
    return sum(v & 1 for v in vec[:pages]) * PAGE


def mapped_from_file(ffn: FFN) -> bool:
    return all(file_mapping(t) is not None for t in streamed_tensors(ffn).values())


def open_streamer(model, budget: int, in_file: dict | None = None, formats: str = "dense"):
    """The streamer of a model whose FFN weights stay in their file: a GGUF's FileTensors left in
    `in_file` by block-format loading (models/adopt.py), converted layer by layer (GGUFStreamer), or
    tensors of a memory-mapped checkpoint in the model's own dtype (FileStreamer). The weights that
    stay resident and the staging must fit `budget`, else one line naming what fits."""
    if in_file is not None:
        streamer = GGUFStreamer(model, in_file, formats)
    elif all(mapped_from_file(f) for f in model.ffns()):
        streamer = FileStreamer(model)
    else:
        raise ValueError("--max-memory reads FFN weights from their file: this checkpoint's FFN weights are in "
                         "RAM (converted on loading; a GGUF takes --weights auto, a safetensors model --dtype fp32)")
    plan(model, 1, 1, None, 0, staging_layers=streamer.staging_layers, flag=ResidentSession.flag,
         runtime=streamer.runtime).check(budget)
    return streamer


class FileStreamer:
    """The Streamer of engine/offload.py for FFNs that stay in their memory-mapped file: `fetch(layer)`
    is the model's own FFN (its pages fault in as the prefill reads them) and asks the kernel to start
    reading the next; `release(layer)` drops the layer's pages. `bytes_moved`: FFN bytes read by
    fetches (from the disk unless the page cache still held them). `runtime`: see ffn_file.runtime_bytes
    (a lower bound here: the resident weights still in the file's pages are not yet in memory)."""

    def __init__(self, model):
        self.ffns, self.device = model.ffns(), torch.device("cpu")
        if any(f.quantized for f in self.ffns):
            raise ValueError("--max-memory keeps the checkpoint's float FFN weights in the file: use --weights dense")
        self.bytes_moved = 0
        self.runtime = runtime_bytes(resident_bytes(model))

    staging_layers = 1  # the mapped pages of the layer being prefilled

    def prefetch(self, layer: int) -> None:
        for t in streamed_tensors(self.ffns[layer]).values():
            advise(t, mmap.MADV_WILLNEED)

    def fetch(self, layer: int, then: int | None = None) -> FFN:
        self.bytes_moved += self.ffns[layer].neuron_bytes()
        if then is not None:
            self.prefetch(then)
        return self.ffns[layer]

    def release(self, layer: int) -> None:
        for t in streamed_tensors(self.ffns[layer]).values():
            drop_pages(t)

    def cached_bytes(self) -> int:
        """FFN bytes now in memory, all layers (the benchmark's and the tests' view of residency)."""
        return sum(cached_bytes(t) for f in self.ffns for t in streamed_tensors(f).values())


class ResidentSession(OffloadSession):
    """An OffloadSession on the CPU whose FFNs are read from their file (see the module docstring):
    once a layer's rows are gathered (core rows, or all of a layer the policy keeps dense), its file
    pages are dropped. Layers left streamed (a dense session over budget) are read from the file on
    every step, as llama.cpp's mmap does."""

    flag = "--max-memory"

    def keep_rows(self, layer: int, dev: FFN, index: torch.Tensor) -> None:
        super().keep_rows(layer, dev, index)
        self.streamer.release(layer)
