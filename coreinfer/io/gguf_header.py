"""A GGUF file's metadata and tensor table, read in a fraction of a second.

Why: gguf-py's `GGUFReader` builds a numpy view per array element, so a file with a 152k-token
vocabulary (Qwen2.5, Llama 3) takes ~10 s to open, on every start. Loading needs only the scalar
metadata, the sizes of the vocabulary arrays and the tensor table; the token strings are read by
the tokenizer conversion, once per file. `read_header` parses the header with `struct` from one
memory map, skipping string arrays without decoding them, and returns an object with the part of
`GGUFReader`'s interface that io/gguf.py uses: `fields[key].contents()`, `len(fields[key].data)` and
`tensors` (name, tensor_type, shape innermost first, data_offset from the start of the file).
tests/test_loading.py checks it against gguf-py on the embedded models.
"""

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf.constants import GGML_QUANT_SIZES  # (weights per block, bytes per block) by type code

# GGUF value types: struct formats of the scalars (7 is bool, 8 a string, 9 an array)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9
DEFAULT_ALIGNMENT = 32


class HeaderError(ValueError):
    """The header is truncated or malformed."""


@dataclass
class Field:
    """One metadata value: a scalar or string, or an array (numbers as a list; strings as their count,
    decoded only by `contents()`)."""

    value: object
    count: int = 1  # elements of an array
    strings: tuple[bytes, int] | None = None  # a string array not decoded: (the map, offset of its first)

    @property
    def data(self) -> range:
        """One index per element, as gguf-py's ReaderField.data: len() is the array's length."""
        return range(self.count)

    def contents(self):
        if self.strings is not None:
            blob, pos = self.strings
            out = []
            for _ in range(self.count):
                text, pos = _string(blob, pos)
                out.append(text)
            return out
        return self.value


@dataclass
class TensorInfo:
    name: str
    tensor_type: int  # the GGML type code
    shape: tuple[int, ...]  # innermost first, as the file lists it
    data_offset: int  # of the tensor's first byte in the file


@dataclass
class Header:
    fields: dict[str, Field]
    tensors: list[TensorInfo]


def read_header(path: Path) -> Header:
    with open(path, "rb") as file:
        blob = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _parse(blob)
    except (struct.error, UnicodeDecodeError, IndexError) as exc:
        raise HeaderError(f"truncated or corrupt GGUF file ({type(exc).__name__}: {exc})") from exc


def _parse(blob) -> Header:
    magic, version = struct.unpack_from("<4sI", blob, 0)
    if magic != b"GGUF":
        raise HeaderError("not a GGUF file (it does not start with the GGUF magic bytes)")
    if version < 2:
        raise HeaderError(f"GGUF version {version} is not supported (2 or later)")
    n_tensors, n_fields = struct.unpack_from("<QQ", blob, 8)
    pos, fields = 24, {}
    for _ in range(n_fields):
        key, pos = _string(blob, pos)
        (kind,), pos = struct.unpack_from("<I", blob, pos), pos + 4
        fields[key], pos = _value(blob, pos, kind)
    infos = []
    for _ in range(n_tensors):
        name, pos = _string(blob, pos)
        (dims,), pos = struct.unpack_from("<I", blob, pos), pos + 4
        shape, pos = struct.unpack_from(f"<{dims}Q", blob, pos), pos + 8 * dims
        kind, offset = struct.unpack_from("<IQ", blob, pos)
        infos.append((name, kind, shape, offset))
        pos += 12
    align = fields["general.alignment"].value if "general.alignment" in fields else DEFAULT_ALIGNMENT
    start = -(-pos // align) * align  # the tensor data begins at the next multiple of the alignment
    tensors = [TensorInfo(name, kind, tuple(int(d) for d in shape), start + offset) for name, kind, shape, offset in infos]
    for t in tensors:  # a file cut short (an interrupted download) fails here, not at the first read
        if t.data_offset + _nbytes(t) > len(blob):
            raise HeaderError(f"truncated or corrupt GGUF file (tensor {t.name} ends past the end of the file)")
    return Header(fields, tensors)


def _nbytes(t: TensorInfo) -> int:
    if t.tensor_type not in GGML_QUANT_SIZES:
        return 0  # an unknown type: io/gguf.py names it in its own error
    block, size = GGML_QUANT_SIZES[t.tensor_type]
    return math.prod(t.shape) // block * size


def _string(blob, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", blob, pos)
    end = pos + 8 + n
    if end > len(blob):
        raise IndexError("a string runs past the end of the file")
    return blob[pos + 8:end].decode("utf-8"), end


def _value(blob, pos: int, kind: int) -> tuple[Field, int]:
    if kind == _STRING:
        text, pos = _string(blob, pos)
        return Field(text), pos
    if kind in _SCALARS:
        fmt = "<" + _SCALARS[kind]
        return Field(struct.unpack_from(fmt, blob, pos)[0]), pos + struct.calcsize(fmt)
    if kind != _ARRAY:
        raise HeaderError(f"unknown GGUF value type {kind}")
    item, count = struct.unpack_from("<IQ", blob, pos)
    pos += 12
    if item == _STRING:  # skip the strings: u64 length + bytes each
        first = pos
        for _ in range(count):
            pos += 8 + struct.unpack_from("<Q", blob, pos)[0]
        return Field(None, count, (blob, first)), pos
    if item not in _NUMPY:
        raise HeaderError(f"GGUF arrays of type {item} are not supported")
    values = np.frombuffer(blob, _NUMPY[item], count, pos)
    return Field(values.tolist(), count), pos + values.nbytes
