"""The safetensors container, read and written from its specification (no `safetensors` package).

A safetensors file is three parts, back to back:

    [ 8 bytes: N, little-endian unsigned ][ N bytes: UTF-8 JSON header ][ data section ]

The header is one JSON object. Its optional `__metadata__` entry maps strings to strings; every other
entry describes one tensor:

    "model.norm.weight": {"dtype": "F32", "shape": [2048], "data_offsets": [begin, end]}

`begin`/`end` are byte offsets relative to the start of the data section, the bytes are the tensor in
row-major (C) order, little-endian. Nothing in the file is code: reading it is parsing JSON and
viewing bytes, which is why Hugging Face made it the default over pickles.

We map the file into memory (`mmap`) and hand out tensors that *view* the mapping: loading costs no
copy and the operating system pages the bytes in when they are first touched. The mapping is private
(copy-on-write): writing to a returned tensor never changes the file, but callers that want a tensor
independent of the file should `.clone()` it. Everything in the header is checked before it is trusted,
and every problem is a `CheckpointError` naming the file and the tensor.

References:
1) The format: https://github.com/huggingface/safetensors#format
2) Hugging Face, "safetensors audit", 2023, https://huggingface.co/blog/safetensors-security-audit
"""

from __future__ import annotations

import json
import math
import mmap
import os
import sys
from typing import Dict, Optional

import torch

from ..errors import CheckpointError
from ..util import is_int, parse_json

# dtype name in the header -> (torch dtype, bytes per element)
DTYPES: Dict[str, tuple] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
    "U64": (torch.uint64, 8),
    "U32": (torch.uint32, 4),
    "U16": (torch.uint16, 2),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
}
_NAME_OF = {dtype: name for name, (dtype, _) in DTYPES.items()}

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference refuses larger headers too: a guard against bombs
_ALIGN = 8  # the header is padded with spaces so that the data section starts 8-byte aligned

if sys.byteorder != "little":  # the bytes are little-endian and we view them without swapping
    raise ImportError("llm2vec_mini.convert.safetensors needs a little-endian machine")


def _no_duplicate_keys(pairs):
    """json object_pairs_hook: a key written twice would let two readers see different tensors."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r} in the JSON header")
        out[key] = value
    return out


class SafetensorsFile:
    """A safetensors file opened for reading; use as `with SafetensorsFile(path) as f: f.get_tensor(k)`.

    The header is read and validated on opening; tensors are views of a private memory map, made on
    demand by `get_tensor`. They stay valid after `close()` (the mapping lives as long as a tensor
    uses it).
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                raw_len = f.read(8)
                if len(raw_len) < 8:
                    raise CheckpointError(f"file too short for a safetensors header ({size} bytes)",
                                          self.path)
                header_len = int.from_bytes(raw_len, "little")
                if header_len > MAX_HEADER_BYTES:
                    raise CheckpointError(f"header length {header_len} is over the limit of "
                                          f"{MAX_HEADER_BYTES} bytes", self.path)
                if 8 + header_len > size:
                    raise CheckpointError(f"header length {header_len} runs past the end of the "
                                          f"file ({size} bytes): truncated or not safetensors",
                                          self.path)
                header_bytes = f.read(header_len)
                # ACCESS_COPY: a private, copy-on-write mapping; writes never reach the file.
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
        except OSError as e:
            raise CheckpointError(f"cannot read: {e}", path) from e
        self._data_start = 8 + header_len
        self._data_len = size - self._data_start
        self.metadata, self._entries = self._parse_header(header_bytes)
        self._bytes = None  # the whole file as a uint8 tensor, made on first use

    # ------------------------------------------------------------------------------------------
    # Header validation

    def _fail(self, message: str):
        raise CheckpointError(message, self.path)

    def _parse_header(self, header_bytes: bytes):
        header = parse_json(header_bytes, self.path, object_pairs_hook=_no_duplicate_keys, strict=True)
        if not isinstance(header, dict):
            self._fail(f"header must be a JSON object, got {type(header).__name__}")

        metadata = header.pop("__metadata__", {})
        if not isinstance(metadata, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            self._fail("__metadata__ must be an object mapping strings to strings")

        entries = {}
        for name, info in header.items():
            entries[name] = self._check_entry(name, info)

        # No two tensors may share bytes (an empty tensor occupies none), and together they fill the
        # data section exactly, back to back, as the reference reader demands: a header length one
        # byte short would otherwise shift every tensor by a byte.
        spans = sorted((begin, end, name) for name, (_, _, begin, end) in entries.items())
        for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                self._fail(f"tensor {n1!r} (bytes {b1}..{e1}) overlaps tensor {n0!r} (bytes {b0}..{e0})")
        end = 0
        for begin, stop, name in spans:
            if begin != end:
                self._fail(f"tensor {name!r} starts at byte {begin} of the data section, where the "
                           f"tensors before it end at {end}: the offsets leave a gap")
            end = stop
        if end != self._data_len:
            self._fail(f"the tensors end at byte {end} of the data section, which has {self._data_len} "
                       f"bytes: a wrong header length, or bytes after the last tensor")
        return metadata, entries

    def _check_entry(self, name: str, info):
        if not isinstance(info, dict):
            self._fail(f"tensor {name!r}: entry must be an object, got {info!r}")
        for key in ("dtype", "shape", "data_offsets"):
            if key not in info:
                self._fail(f"tensor {name!r}: missing {key!r}")
        dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
            self._fail(f"tensor {name!r}: unknown dtype {dtype_name!r} "
                       f"(known: {', '.join(DTYPES)})")
        if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
            self._fail(f"tensor {name!r}: shape must be a list of non-negative integers, got {shape!r}")
        if math.prod(d for d in shape if d) >= 2**63:  # torch's strides are int64, an empty tensor's too
            self._fail(f"tensor {name!r}: shape {shape} is too large for any tensor")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(is_int(o) for o in offsets)):
            self._fail(f"tensor {name!r}: data_offsets must be two integers, got {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end <= self._data_len:
            self._fail(f"tensor {name!r}: data_offsets [{begin}, {end}] are outside the data "
                       f"section of {self._data_len} bytes")
        dtype, itemsize = DTYPES[dtype_name]
        expected = math.prod(shape) * itemsize
        if end - begin != expected:
            self._fail(f"tensor {name!r}: {dtype_name} shape {shape} needs {expected} bytes but "
                       f"data_offsets [{begin}, {end}] hold {end - begin}")
        return dtype, tuple(shape), begin, end

    # ------------------------------------------------------------------------------------------
    # Access

    def keys(self) -> list:
        """Tensor names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name) -> bool:
        return name in self._entries

    def _entry(self, name: str):
        if name not in self._entries:
            self._fail(f"no tensor named {name!r} in this file")
        return self._entries[name]

    def shape(self, name: str) -> tuple:
        return self._entry(name)[1]

    def dtype(self, name: str) -> torch.dtype:
        return self._entry(name)[0]

    def nbytes(self, name: str) -> int:
        """The bytes tensor `name` takes in the file (from the header; nothing is read)."""
        _, _, begin, end = self._entry(name)
        return end - begin

    @property
    def data_bytes(self) -> int:
        """The size of the data section: what all tensors together may take."""
        return self._data_len

    def get_tensor(self, name: str) -> torch.Tensor:
        """The tensor `name`, a view of the file's private mapping (clone it to detach from the file).

        A tensor whose bytes do not start at a multiple of its element size (legal, rare) is copied,
        because torch cannot view misaligned bytes as a wider dtype.
        """
        dtype, shape, begin, end = self._entry(name)
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        if self._mmap is None:
            self._fail("file is closed")
        if self._bytes is None:
            # torch.frombuffer keeps the mmap alive as long as any view of it exists.
            self._bytes = torch.frombuffer(self._mmap, dtype=torch.uint8)  # (file size,)
        start = self._data_start + begin
        raw = self._bytes[start:self._data_start + end]  # (nbytes,) uint8, no copy
        if start % DTYPES[_NAME_OF[dtype]][1]:
            raw = raw.clone()  # fresh, aligned storage
        return raw.view(dtype).view(shape)

    def close(self) -> None:
        """Forget the mapping; tensors already returned keep it alive until they are freed.

        We never call `mmap.close()`: torch.frombuffer holds a reference to the mmap object but not a
        buffer export, so closing it would unmap memory that live tensors still point into.
        """
        self._bytes = None
        self._mmap = None

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsFile({self.path!r}, {len(self._entries)} tensors)"


def load_file(path) -> Dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, by name (memory-mapped views; see `SafetensorsFile`)."""
    with SafetensorsFile(path) as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def save_file(tensors: Dict[str, torch.Tensor], path, metadata: Optional[Dict[str, str]] = None) -> None:
    """Write `tensors` (name -> CPU or device tensor) to `path` as safetensors.

    The data is laid out by element size, largest first, then by name, so every tensor starts at a
    multiple of its element size (as the reference writer does); the header lists `__metadata__`
    first, then the tensors in that order, padded with spaces to a multiple of 8 bytes.
    """
    if not isinstance(tensors, dict):
        raise CheckpointError(f"tensors must be a dict of name -> torch.Tensor, got "
                              f"{type(tensors).__name__}", path)
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise CheckpointError("metadata must be a dict mapping strings to strings", path)
    for name, t in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise CheckpointError(f"tensor names must be strings other than '__metadata__', "
                                  f"got {name!r}", path)
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"tensor {name!r} is a {type(t).__name__}, not a torch.Tensor", path)
        if t.dtype not in _NAME_OF:
            raise CheckpointError(f"tensor {name!r}: dtype {t.dtype} cannot be stored (supported: "
                                  f"{', '.join(_NAME_OF.values())})", path)

    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header = {} if not metadata else {"__metadata__": dict(metadata)}
    offset = 0
    for name in order:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _NAME_OF[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % _ALIGN)

    with open(path, "wb") as f:
        f.write(len(header_bytes).to_bytes(8, "little"))
        f.write(header_bytes)
        for name in order:
            t = tensors[name].detach()
            if t.numel() == 0:
                continue
            flat = t.to("cpu").contiguous().reshape(-1)  # (numel,), copies only if it must
            f.write(memoryview(flat.view(torch.uint8).numpy()))  # raw little-endian bytes
