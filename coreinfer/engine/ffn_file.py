"""FFN weights streamed from a GGUF file, for the CPU memory-limited mode (`--max-memory` with
`--weights auto` or `q8_0`): the model holds every other weight in its format, while each FFN stays
in the file as its FileTensors (models/adopt.py's `in_file`) and the model's FFN modules hold
placeholders of their runtime format's shapes (what the planner counts; they hold no values).

    in_file = {}
    model = build_model(config, weights, formats="auto", in_file=in_file)
    streamer = GGUFStreamer(model, in_file, "auto")
    ffn = streamer.fetch(3, then=4)   # layer 3 read from the file chunk by chunk, converted into the
                                      # one staging FFN; layer 4's bytes requested from the disk

A fetch reads a layer's bytes with pread, `CHUNK_BYTES` at a time, converts each chunk with adopt.py's
`convert` into its rows of the staging FFN (up and gate: rows; neuron-major down: the file holds it
[d, F], so a chunk of its rows is a band of the staging down's columns), and drops the chunk's pages
from the page cache (POSIX_FADV_DONTNEED: in a memory cgroup the page cache is charged to it).
`prefetch` asks the kernel to read the next layer ahead (POSIX_FADV_WILLNEED) while this one computes.
"""

import ctypes
import ctypes.util
import mmap
import os
import time
from dataclasses import replace

import torch

from ..formats import FORMATS
from ..kernels import ffn_convert
from ..models.adopt import convert, ffn_formats
from ..models.common import FFN
from .budget import resident_bytes

CHUNK_BYTES = 8 << 20  # file bytes read and converted at a time: the conversion's float temporaries stay small
PAGE = mmap.PAGESIZE
FOLIO = 2 << 20  # the largest page-cache folio (a PMD): what a layer's final drop is aligned to
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.malloc_trim.argtypes = [ctypes.c_size_t]


def runtime_bytes(weights: int) -> int:
    """The memory this process holds now beyond `weights` bytes of resident weights: the interpreter,
    torch's and the kernels' libraries, and the heap the load leaves (its freed chunks handed back
    first). The CPU budget holds it as the tensors: 0.35 GiB beside the 7B shape's 1.43 GiB of resident
    weights, where the planner without it missed ~0.3 GiB at decode (docs/speed.md)."""
    _libc.malloc_trim(0)
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * PAGE  # resident pages, anonymous and file-backed
    return max(0, rss - weights)


def placeholders(fmt: str, rows: int, cols: int) -> dict[str, torch.Tensor]:
    """Tensors of format `fmt` shaped and typed as it holds a [rows, cols] weight, with no storage
    (one element each, expanded): their nbytes are the real format's."""
    one = FORMATS[fmt].pack(torch.zeros(1, cols))
    return {name: torch.zeros((1,) * t.dim(), dtype=t.dtype).expand(rows, *t.shape[1:]) for name, t in one.items()}


def file_rows(w, start: int, stop: int):
    """The file rows start..stop of FileTensor w as a FileTensor of their own (a row is whole blocks)."""
    return replace(w, offset=w.offset + start * w.kind.row_bytes(w.shape[-1]), shape=(stop - start, *w.shape[1:]))


def span(w) -> tuple[int, int]:
    """(offset, bytes) of FileTensor w in its file."""
    return w.offset, w.shape[0] * w.kind.row_bytes(w.shape[-1])


def advise(path, offset: int, length: int, advice: int, align: int = PAGE) -> None:
    """posix_fadvise over the byte range widened to multiples of `align`: the kernel leaves a page (or a
    large folio of the page cache, up to FOLIO) that is only partly in the range. A neighbour's page
    dropped too is only read again: the file is never written."""
    lo, hi = offset // align * align, -(-(offset + length) // align) * align
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, lo, hi - lo, advice)
    finally:
        os.close(fd)


def cached_file_bytes(path, offset: int, length: int) -> int:
    """Bytes of the file's pages under the range that are in the page cache (mincore on a fresh map)."""
    lo = offset // PAGE * PAGE
    n = offset + length - lo
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, n, mmap.PROT_READ, mmap.MAP_SHARED, fd, lo)
        if addr == ctypes.c_void_p(-1).value:
            raise OSError(ctypes.get_errno(), f"mmap failed: {os.strerror(ctypes.get_errno())}")
        try:
            pages = -(-n // PAGE)
            vec = (ctypes.c_ubyte * pages)()
            if _libc.mincore(addr, n, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore failed: {os.strerror(ctypes.get_errno())}")
            return sum(v & 1 for v in vec) * PAGE
        finally:
            _libc.munmap(addr, n)
    finally:
        os.close(fd)


def streamed_from_file(model, in_file: dict, formats: str) -> dict[int, dict[str, str]]:
    """Give the model's FFNs placeholders of the formats their layers' file weights convert to; returns
    each layer's format by role."""
    chosen = {}
    for ffn in model.ffns():
        roles = in_file[ffn.layer_id]
        if not all(hasattr(w, "kind") for w in roles.values() if w is not None):
            raise ValueError("--max-memory with --weights auto or q8_0 streams FFN weights from a GGUF file: "
                             "give a .gguf model (or --weights dense with a safetensors one)")
        fmt, down_fmt = ffn_formats(roles["up"], roles["gate"], roles["down"], formats)
        F, d = ffn.width, roles["up"].shape[-1]
        ffn.adopt_(fmt, placeholders(fmt, F, d), placeholders(fmt, F, d) if ffn.gated else None,
                   down_fmt, placeholders(down_fmt, F, d))
        chosen[ffn.layer_id] = {"up": fmt, "gate": fmt, "down": down_fmt}
    return chosen


class StagingFFN(FFN):
    """The staging FFN. Its matmuls run a block at a time, `row_block` neurons of up and gate and
    `column_block` output columns of down (a multiple of the format's block of 32). The native ops take
    a prefill 16 rows of x at a time either way (formats/native.py: by_chunks); the blocks bound the
    PyTorch path, where no native op runs, which dequantizes its weights to floats: one block's floats,
    not a layer's (1.1 GB for Qwen2.5-7B's up, gate and down). Each output element still sums over the
    whole of its input, so the blocks change no result."""

    def _rows(self, x: torch.Tensor, name: str) -> torch.Tensor:
        t = self.role(name)
        F = t["qs"].shape[0]
        return torch.cat([FORMATS[self.format].matmul(x, {k: v[a:a + self.row_block] for k, v in t.items()})
                          for a in range(0, F, self.row_block)], -1)  # [B, T, F]

    def project(self, a: torch.Tensor) -> torch.Tensor:
        t, fmt = self.role("down"), FORMATS[self.down_format]
        d = self.dim
        outs = []
        for c in range(0, d, self.column_block):  # the columns c..c+block of each tensor, in proportion
            band = {k: v[:, c * v.shape[1] // d:min(d, c + self.column_block) * v.shape[1] // d].contiguous()
                    for k, v in t.items()}
            outs.append(fmt.rows_matmul(a, band))
        out = torch.cat(outs, -1)  # [B, T, d]
        return out if self.down_bias is None else out + self.down_bias


def allocated(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    return {name: torch.empty(t.shape, dtype=t.dtype) for name, t in tensors.items()} or None


class GGUFStreamer:
    """The Streamer of engine/offload.py for FFNs left in a GGUF file (see the module docstring);
    `blocks`: the staging FFN's (row_block, column_block).
    `bytes_moved`: FFN bytes read from the file by fetches; `fetch_s`: seconds spent reading and
    converting them. `runtime`: runtime_bytes once the model is built (the staging is not yet written,
    so not yet in memory: the plan counts it)."""

    staging_layers = 2  # the converted layer computing, and the next layer's file pages read ahead

    def __init__(self, model, in_file: dict, formats: str, blocks: tuple[int, int] = (2048, 1024)):
        self.chosen = streamed_from_file(model, in_file, formats)
        self.ffns, self.device, self.files = model.ffns(), torch.device("cpu"), in_file
        like = self.ffns[0]
        dim = in_file[0]["up"].shape[-1]
        with torch.device("meta"):
            self.staging = StagingFFN(like.layer_id, dim, like.width, like.act_name, like.gated, like.up_bias is not None)
        self.staging.adopt_(like.format, allocated(like.role("up")), allocated(like.role("gate")),
                            like.down_format, allocated(like.role("down")))
        self.staging.dim = dim
        self.staging.row_block, self.staging.column_block = blocks
        self.bytes_moved, self.fetch_s = 0, 0.0
        self.runtime = runtime_bytes(resident_bytes(model))
        for path in {w.path for roles in in_file.values() for w in roles.values() if w is not None}:
            advise(path, 0, os.path.getsize(path), os.POSIX_FADV_DONTNEED)  # the load's reads of the other
            # weights: clean page cache, but charged to a memory cgroup (1.5 GB of the 7B shape's file)

    def spans(self, layer: int) -> list[tuple[object, int, int]]:
        """(path, offset, bytes) of each of the layer's FFN tensors in the file."""
        return [(w.path, *span(w)) for w in self.files[layer].values() if w is not None]

    def prefetch(self, layer: int) -> None:
        for path, offset, n in self.spans(layer):
            advise(path, offset, n, os.POSIX_FADV_WILLNEED)

    def fetch(self, layer: int, then: int | None = None) -> FFN:
        """The staging FFN holding `layer`'s weights, read from the file; starts reading `then` behind it."""
        src, dst = self.ffns[layer], self.staging
        if src.format != dst.format or any(src.role(r)[k].shape != t.shape for r in ("up", "gate", "down")
                                           for k, t in dst.role(r).items()):
            raise ValueError("--max-memory streams FFNs of one shape and format in every layer")
        t0 = time.perf_counter()
        for role, w in self.files[layer].items():
            if w is not None:
                self.read_role(w, self.chosen[layer][role], dst.role(role))
        for path, offset, n in self.spans(layer):  # with the folios at their ends, and readahead's pages
            advise(path, offset, n, os.POSIX_FADV_DONTNEED, FOLIO)
        _libc.malloc_trim(0)  # give back the heap the chunks' buffers freed: glibc keeps it otherwise
        self.fetch_s += time.perf_counter() - t0
        dst.layer_id, dst.up_bias, dst.down_bias = layer, src.up_bias, src.down_bias
        if then is not None:
            self.prefetch(then)
        return dst

    def read_role(self, w, fmt: str, out: dict[str, torch.Tensor]) -> None:
        """Convert FileTensor w, chunk by chunk, into `out`: its format `fmt`'s tensors in the staging FFN.
        Native where ffn_convert.cpp takes the file's type (Q4_K up/gate into q4; Q4_K, Q6_K or Q8_0
        down into q8_0): it writes the staging tensors in place, bit for bit what adopt.py's PyTorch
        `convert` makes, with no float temporaries (that path holds a chunk's floats, twice)."""
        step = max(1, CHUNK_BYTES // w.kind.row_bytes(w.shape[-1]))
        if w.transposed:  # down: file rows are the model's columns, converted in whole blocks of them
            block = FORMATS[fmt].BLOCK
            step = max(block, step // block * block)
        native = w.row_order is None and not w.shift and ffn_convert.load() and (
            (w.transposed and fmt == "q8_0" and w.kind.name in ffn_convert.DOWN_KINDS)
            or (not w.transposed and fmt == "q4" and w.kind.name == "Q4_K"))
        for start in range(0, w.shape[0], step):
            stop = min(w.shape[0], start + step)
            part = file_rows(w, start, stop)
            if native and w.transposed:  # file rows start..stop are down's columns start..stop
                ffn_convert.to_q8_0_t(part.read(), w.kind.name, out, start)
            elif native:
                ffn_convert.q4k_to_q4(part.read(), {name: t[start:stop] for name, t in out.items()})
            else:
                for name, t in convert(part, fmt, "cpu").items():
                    if w.transposed:  # t [F, this band's columns]
                        c0 = start * out[name].shape[1] // w.shape[0]
                        out[name][:, c0:c0 + t.shape[1]].copy_(t)
                    else:
                        out[name][start:stop].copy_(t)
            offset, n = span(part)
            advise(w.path, offset, n, os.POSIX_FADV_DONTNEED)
            self.bytes_moved += n

    def release(self, layer: int) -> None:
        """Nothing to drop: a fetch drops each chunk's pages once it is converted."""

    def cached_bytes(self) -> int:
        """FFN file bytes now in the page cache, all layers (the tests' view of what decoding reads)."""
        return sum(cached_file_bytes(*s) for layer in self.files for s in self.spans(layer))
