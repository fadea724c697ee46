"""llama.cpp's GGUF format: the reader, the block dequantisers, and the Llama mapping.

A GGUF file is one little-endian binary (spec: ref. 1):

    magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv x        (key: string, value type: u32, value)          <- metadata (config, vocabulary)
    n_tensors x   (name: string, n_dims: u32, ne: n_dims x u64, ggml type: u32, offset: u64)
    padding to `general.alignment` (default 32), then the tensor data; each offset is relative to it.

A string is a u64 byte length then UTF-8 bytes; an array is (element type u32, count u64, elements).
`ne` lists dimensions fastest-varying first, so a PyTorch (out, in) weight is stored as ne = (in, out).

Quantised tensors are cut along their rows into blocks of 32 (or 256 for the "K" types) weights; each
block stores small integers q plus fp16 scales, and a weight is w = d * q (+ m). The dequantisers below
are vectorised over all blocks of a tensor at once. Their arithmetic follows ggml's reference C code
(ref. 2), so the results equal it bit for bit.

llama.cpp's converter reorders the rows of W_q and W_k inside each head (ref. 3): Hugging Face rotates
the pair (x[i], x[i + d/2]), llama.cpp the pair (x[2i], x[2i+1]). `unpermute_qk` undoes it.

References:
1) GGUF specification, https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
2) ggml block formats, https://github.com/ggml-org/ggml/blob/master/src/ggml-quants.c (`dequantize_row_*`)
3) llama.cpp `convert_hf_to_gguf.py`, `LlamaModel.permute`
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

import numpy as np
import torch

from ..config import LlamaConfig
from ..errors import CheckpointError, ConfigError
from ..model import LlamaForCausalLM
from ..tokenizer import Tokenizer
from ..util import is_int, is_number
from .checks import Stored, check_fits, check_tokenizer
from .gguf_tokenizer import tokenizer_from_gguf

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # v1 used 32-bit counts and is long gone
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NESTING = 8  # arrays of arrays of ... deeper than this are not a real file
MAX_ARRAY = 1 << 24  # elements of one metadata array; the largest vocabularies have a few 100,000

# ggml type id -> (name, weights per block, bytes per block). Every type a file may hold, so the
# reader can size any tensor; `dequantize` supports the subset in _DEQUANTISERS.
GGML_TYPES: Dict[int, Tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
}

# Metadata value types: id -> numpy dtype of one number, and its struct format. 8 is a string, 9 an array.
_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
            10: "<u8", 11: "<i8", 12: "<f8"}
_STRUCT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "B", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY, _BOOL = 8, 9, 7
_U64 = struct.Struct("<Q")


@dataclass
class GGUFTensorInfo:
    name: str
    shape: Tuple[int, ...]  # PyTorch order: the reverse of ggml's ne
    ggml_type: int  # a key of GGML_TYPES
    offset: int  # absolute byte offset of the data in the file
    nbytes: int  # bytes of data

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.ggml_type][0]


@dataclass
class GGUFFile:
    path: str
    version: int
    metadata: Dict[str, Any]  # strings as str, arrays (nested too) as Python lists
    tensors: Dict[str, GGUFTensorInfo]  # in file order
    alignment: int
    data: np.ndarray = field(repr=False)  # the whole file, memory-mapped read-only, uint8
    data_start: int = 0  # where the tensor data begins (offsets in `tensors` are absolute)

    def __repr__(self) -> str:  # the vocabulary alone would fill a screen
        return (f"GGUFFile(path={self.path!r}, version={self.version}, {len(self.metadata)} metadata keys, "
                f"{len(self.tensors)} tensors, alignment={self.alignment})")

    def info(self, name: str) -> GGUFTensorInfo:
        """The tensor info of `name`; CheckpointError (naming the file) if there is no such tensor."""
        if name not in self.tensors:
            raise CheckpointError(f"no tensor named {name!r} in this GGUF file", self.path)
        return self.tensors[name]

    def raw(self, name: str) -> np.ndarray:
        """The bytes of one tensor: a read-only uint8 view into the memory map (no copy)."""
        info = self.info(name)
        return self.data[info.offset:info.offset + info.nbytes]

    def tensor(self, name: str) -> np.ndarray:
        """One tensor dequantised to a fresh float32 array of shape `info.shape`."""
        info = self.info(name)
        return dequantize(self.raw(name), info.ggml_type, info.shape, name=name, path=self.path)


# -------------------------------------------------------------------------------------------------
# The reader

class _Cursor:
    """Reads little-endian values from the mapped header, checking every length against the file."""

    def __init__(self, buf: np.ndarray, path: str):
        self.buf = memoryview(buf)  # struct and slicing are much faster on a memoryview than on numpy
        self.path, self.pos, self.size = path, 0, len(buf)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise CheckpointError(f"truncated or corrupt file: {what} needs {n} bytes at offset "
                                  f"{self.pos}, but the file has {self.size} bytes", self.path)

    def scalar(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, what: str) -> str:
        n = self.scalar("Q", what)
        self.need(n, f"{what} (a string of {n} bytes)")
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{what} is not valid UTF-8 ({e})", self.path) from None

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            value = self.scalar(_STRUCT[vtype], what)
            return bool(value) if vtype == _BOOL else value
        if vtype == _STRING:
            return self.string(what)
        if vtype != _ARRAY:
            raise CheckpointError(f"{what} has unknown value type {vtype}", self.path)
        if depth >= MAX_NESTING:
            raise CheckpointError(f"{what} nests arrays deeper than {MAX_NESTING}", self.path)
        etype, count = self.scalar("I", what), self.scalar("Q", what)
        if count > MAX_ARRAY:  # read as Python values, an element costs up to 10x its bytes
            raise CheckpointError(f"{what} (an array of {count} elements) is longer than any metadata "
                                  f"array needs ({MAX_ARRAY})", self.path)
        # The smallest element is 1 byte (8 for a string's length, 12 for an array's header), so
        # a count the rest of the file cannot hold is caught here, before anything is allocated.
        min_size = np.dtype(_SCALARS[etype]).itemsize if etype in _SCALARS else 8 if etype == _STRING else 12
        self.need(count * min_size, f"{what} (an array of {count} elements)")
        if etype in _SCALARS:  # numbers: one vectorised read, then plain Python values
            arr = np.frombuffer(self.buf, dtype=_SCALARS[etype], count=count, offset=self.pos)
            self.pos += count * arr.itemsize
            return arr.astype(bool).tolist() if etype == _BOOL else arr.tolist()
        if etype == _STRING:
            return self.strings(count, what)
        return [self.value(etype, f"{what}[{i}]", depth + 1) for i in range(count)]

    def strings(self, count: int, what: str) -> List[str]:
        """`string()` repeated `count` times, in one tight loop (a vocabulary has ~50k strings)."""
        out, buf, pos, size, u64 = [], self.buf, self.pos, self.size, _U64.unpack_from
        try:
            for i in range(count):
                if pos + 8 > size:
                    break
                (n,) = u64(buf, pos)
                if pos + 8 + n > size:
                    break
                out.append(str(buf[pos + 8:pos + 8 + n], "utf-8"))
                pos += 8 + n
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{what}[{len(out)}] is not valid UTF-8 ({e})", self.path) from None
        self.pos = pos
        if len(out) < count:  # let string() say precisely what ran past the end
            self.string(f"{what}[{len(out)}]")
        return out


def read_gguf(path: Union[str, os.PathLike]) -> GGUFFile:
    """Parse a GGUF v2/v3 file's header; the tensor data stays in a read-only memory map.

    Raises CheckpointError (naming the file, and the tensor where there is one) for a bad magic, an
    unsupported version, a truncated header, absurd counts or lengths, and data past the end of file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError("cannot read GGUF file: no such file (or not a regular file)", path)
    try:
        size = os.path.getsize(path)
        if size < 4:
            raise CheckpointError("not a GGUF file: too short to hold the magic", path)
        data = np.memmap(path, dtype=np.uint8, mode="r")
    except OSError as e:
        raise CheckpointError(f"cannot read GGUF file: {e.strerror}", path) from None
    cur = _Cursor(data, path)
    if data[:4].tobytes() != GGUF_MAGIC:
        raise CheckpointError(f"not a GGUF file: magic is {data[:4].tobytes()!r}, expected b'GGUF'", path)
    cur.pos = 4
    version = cur.scalar("I", "version")
    if version not in SUPPORTED_VERSIONS:
        raise CheckpointError(f"unsupported GGUF version {version} (supported: 2, 3)", path)
    n_tensors, n_kv = cur.scalar("Q", "tensor count"), cur.scalar("Q", "metadata count")
    cur.need(n_kv * 13, f"{n_kv} metadata entries")  # each is at least key length + type + 1 byte
    cur.need(n_tensors * 24, f"{n_tensors} tensor infos")  # name length, n_dims, type, offset

    metadata: Dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        if key in metadata:
            raise CheckpointError(f"duplicate metadata key {key!r}", path)
        metadata[key] = cur.value(cur.scalar("I", f"type of {key!r}"), f"metadata {key!r}")

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not is_int(alignment) or alignment <= 0 \
            or alignment & (alignment - 1):
        raise CheckpointError(f"general.alignment must be a power of two, got {alignment!r}", path)

    infos = []
    for i in range(n_tensors):
        name = cur.string(f"tensor name #{i}")
        n_dims = cur.scalar("I", f"n_dims of tensor {name!r}")
        if n_dims > MAX_DIMS:
            raise CheckpointError(f"tensor {name!r} has {n_dims} dimensions (at most {MAX_DIMS})", path)
        ne = [cur.scalar("Q", f"shape of tensor {name!r}") for _ in range(n_dims)]
        ggml_type = cur.scalar("I", f"type of tensor {name!r}")
        offset = cur.scalar("Q", f"offset of tensor {name!r}")
        infos.append((name, ne, ggml_type, offset))

    data_start = -(-cur.pos // alignment) * alignment  # round up to the alignment
    tensors: Dict[str, GGUFTensorInfo] = {}
    for name, ne, ggml_type, offset in infos:
        if name in tensors:
            raise CheckpointError(f"duplicate tensor {name!r}", path)
        if ggml_type not in GGML_TYPES:
            raise CheckpointError(f"tensor {name!r} has unknown ggml type {ggml_type}", path)
        type_name, block, block_bytes = GGML_TYPES[ggml_type]
        if ne and ne[0] % block:
            raise CheckpointError(f"tensor {name!r}: row length {ne[0]} is not a multiple of the "
                                  f"{type_name} block size {block}", path)
        n = int(np.prod(ne, dtype=object)) if ne else 1  # Python ints: no overflow on absurd shapes
        nbytes = n // block * block_bytes
        if offset % alignment:
            raise CheckpointError(f"tensor {name!r}: offset {offset} is not a multiple of the "
                                  f"alignment {alignment}", path)
        start = data_start + offset
        if start + nbytes > size:
            raise CheckpointError(f"tensor {name!r}: its data ({nbytes} bytes at offset {start}) "
                                  f"runs past the end of the file ({size} bytes)", path)
        tensors[name] = GGUFTensorInfo(name, tuple(reversed(ne)), ggml_type, start, nbytes)
    return GGUFFile(path, version, metadata, tensors, alignment, data, data_start)


# -------------------------------------------------------------------------------------------------
# Dequantisers. Each takes the bytes of n blocks, shaped (n, bytes per block), and writes the
# weights into `out` (n, weights per block) float32. Bytes are split into the fields of ggml's
# `block_q4_0`, ... structs; a 4-bit field packs weight j in the low nibble and j + 16 (j + 32 in
# the K types) in the high nibble of the same byte. Integer codes meet their float scale in a single
# np.multiply(..., out=out), which casts them exactly and saves a float temporary.

def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 at byte `at` of every block, as float32. (n, bytes) -> (n, 1)"""
    return blocks[:, at:at + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(..., m) bytes -> (..., 2m) values 0..15: the m low nibbles, then the m high nibbles."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """(n, 4) bytes of a little-endian u32 -> (n, 32) bits, bit j for weight j, scaled to 0 or 16."""
    return np.unpackbits(qh, axis=-1, bitorder="little") << 4


def _q8_0(b, out):  # d: f16, qs: 32 x int8.   w = d * q
    np.multiply(b[:, 2:].view(np.int8), _f16(b, 0), out=out)


def _q4_0(b, out):  # d: f16, qs: 16 bytes of nibbles.   w = d * (q - 8)
    np.multiply(_nibbles(b[:, 2:]).view(np.int8) - np.int8(8), _f16(b, 0), out=out)


def _q4_1(b, out):  # d, m: f16, qs: 16 bytes of nibbles.   w = d * q + m
    np.multiply(_nibbles(b[:, 4:]), _f16(b, 0), out=out)
    out += _f16(b, 2)


def _q5_0(b, out):  # d: f16, qh: u32 of fifth bits, qs: 16 bytes of nibbles.   w = d * (q - 16)
    q = _nibbles(b[:, 6:]) | _fifth_bits(b[:, 2:6])
    np.multiply(q.view(np.int8) - np.int8(16), _f16(b, 0), out=out)


def _q5_1(b, out):  # d, m: f16, qh: u32, qs: 16 bytes.   w = d * q + m
    np.multiply(_nibbles(b[:, 8:]) | _fifth_bits(b[:, 4:8]), _f16(b, 0), out=out)
    out += _f16(b, 2)


def _k_scales_mins(s: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins, each (n, 8) float32.

    Bytes 0-3 hold scales 0-3, bytes 4-7 mins 0-3 (low 6 bits). Bytes 8-11 hold the low 4 bits of
    scales 4-7 (low nibble) and of mins 4-7 (high nibble); their top 2 bits sit in the top 2 bits of
    bytes 0-3 (scales) and 4-7 (mins).
    """
    lo_sc, lo_m, packed = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scales = np.concatenate([lo_sc & 63, (packed & 0x0F) | ((lo_sc >> 6) << 4)], axis=-1)
    mins = np.concatenate([lo_m & 63, (packed >> 4) | ((lo_m >> 6) << 4)], axis=-1)
    return scales.astype(np.float32), mins.astype(np.float32)


def _k_quant(b, out, q):
    """Q4_K/Q5_K with their codes q (n, 8, 32): w = (d * scale) * q - (dmin * min), per sub-block."""
    sc, m = _k_scales_mins(b[:, 4:16])
    out = out.reshape(q.shape)  # (n, 8, 32), a view
    np.multiply(q, (_f16(b, 0) * sc)[:, :, None], out=out)
    out -= (_f16(b, 2) * m)[:, :, None]


def _q4_k(b, out):  # d, dmin: f16, 12 bytes of scales/mins, 128 bytes of nibbles; 8 sub-blocks of 32
    n = b.shape[0]
    _k_quant(b, out, _nibbles(b[:, 16:].reshape(n, 4, 32)).reshape(n, 8, 32))  # byte group c -> 2c, 2c+1


def _q5_k(b, out):  # d, dmin: f16, 12 bytes of scales/mins, qh: 32 bytes, qs: 128 bytes of nibbles
    n = b.shape[0]
    low = _nibbles(b[:, 48:].reshape(n, 4, 32)).reshape(n, 8, 32)
    # Bit s of qh[l] is the fifth bit of weight l of sub-block s. (n, 32, 8) -> (n, 8, 32)
    high = np.unpackbits(b[:, 16:48, None], axis=-1, bitorder="little").transpose(0, 2, 1) << 4
    _k_quant(b, out, low | high)


def _q6_k(b, out):  # ql: 128 bytes, qh: 64 bytes, scales: 16 x int8, d: f16.   w = (d * sc) * (q - 32)
    n = b.shape[0]
    # Each half of 128 weights: ql's 64 bytes give 4 bits (low nibbles: weights 0-63, high
    # nibbles: 64-127), qh's 32 bytes give 2 bits at shifts 0, 2, 4, 6 for weights l + 32 k.
    low = _nibbles(b[:, :128].reshape(n, 2, 64))  # (n, 2, 128)
    qh = b[:, 128:192].reshape(n, 2, 1, 32)
    high = ((qh >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]) & 3).reshape(n, 2, 128)
    q = ((low | (high << 4)).view(np.int8) - np.int8(32)).reshape(n, 16, 16)  # 16 groups of 16
    scale = _f16(b, 208) * b[:, 192:208].view(np.int8).astype(np.float32)  # (n, 16)
    np.multiply(q, scale[:, :, None], out=out.reshape(n, 16, 16))


_DEQUANTISERS = {2: _q4_0, 3: _q4_1, 6: _q5_0, 7: _q5_1, 8: _q8_0, 12: _q4_k, 13: _q5_k, 14: _q6_k}
_CHUNK_BLOCKS = 4096  # blocks per step: the temporaries stay in cache (~0.5 MB)


def dequantize(raw: np.ndarray, ggml_type: int, shape, name: str = "tensor", path=None) -> np.ndarray:
    """Raw bytes of one tensor (uint8, any layout) -> a fresh float32 array of `shape` (PyTorch order).

    Supports F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K; other types raise
    CheckpointError naming the tensor and the type.
    """
    type_name, block, block_bytes = GGML_TYPES.get(ggml_type, (f"unknown ({ggml_type})", 1, 1))
    n = int(np.prod(shape, dtype=np.int64))
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
    if n % block or raw.size != n // block * block_bytes:
        raise CheckpointError(f"tensor {name!r}: {raw.size} bytes do not hold {type_name} "
                              f"weights of shape {tuple(shape)}", path)
    if ggml_type == 0:  # F32
        return raw.view(np.float32).reshape(shape).copy()
    if ggml_type == 1:  # F16
        return raw.view(np.float16).astype(np.float32).reshape(shape)
    if ggml_type == 30:  # BF16 is the top half of a float32
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    kernel = _DEQUANTISERS.get(ggml_type)
    if kernel is None:
        raise CheckpointError(f"tensor {name!r}: ggml type {type_name} is not supported (supported: "
                              f"F32, F16, BF16, {', '.join(GGML_TYPES[t][0] for t in _DEQUANTISERS)})", path)
    blocks = raw.reshape(-1, block_bytes)  # (n_blocks, bytes per block)
    out = np.empty((blocks.shape[0], block), dtype=np.float32)  # (n_blocks, weights per block)
    for i in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        kernel(blocks[i:i + _CHUNK_BLOCKS], out[i:i + _CHUNK_BLOCKS])
    return out.reshape(shape)


# -------------------------------------------------------------------------------------------------
# The Llama mapping: metadata -> LlamaConfig, tensor names -> our (Hugging Face) names

# GGUF name -> our parameter name; "{}" is the layer index.
WEIGHT_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def permute_qk(w, n_head: int):
    """Hugging Face rotate-half rows -> llama.cpp's interleaved rows, as llama.cpp's converter does.

    w: (n_head * head_dim, ...) torch tensor or numpy array. Within each head, row i of the first
    half and row i of the second half (the pair HF rotates together) become rows 2i and 2i+1.
    For W_k pass the number of key/value heads.
    """
    rows = w.shape[0]
    return (w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:])  # (heads, half, d/2, ...)
            .swapaxes(1, 2)  # (heads, d/2, half, ...): the two halves interleave
            .reshape(w.shape))


def unpermute_qk(w, n_head: int):
    """The inverse of `permute_qk`: llama.cpp's interleaved rows -> Hugging Face rotate-half rows."""
    rows = w.shape[0]
    return (w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])  # (heads, d/2, pair, ...)
            .swapaxes(1, 2)  # (heads, pair, d/2, ...): even rows first, then odd rows
            .reshape(w.shape))


def gguf_config(gguf: GGUFFile) -> LlamaConfig:
    """The `llama.*` and `tokenizer.ggml.*` metadata of a file -> LlamaConfig.

    Raises CheckpointError naming the file and the missing or invalid key.
    """
    meta = gguf.metadata
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"general.architecture is {arch!r}; only 'llama' is supported", gguf.path)

    def get(key, default=None, required=False):
        if "llama." + key not in meta:
            if required:
                raise CheckpointError(f"metadata key 'llama.{key}' is missing", gguf.path)
            return default
        return meta["llama." + key]

    hidden, n_heads = get("embedding_length", required=True), get("attention.head_count", required=True)
    head_dim = get("attention.key_length")
    if head_dim is None and isinstance(hidden, int) and isinstance(n_heads, int) and n_heads > 0:
        head_dim = hidden // n_heads
    rope_dim = get("rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise CheckpointError(f"llama.rope.dimension_count ({rope_dim}) differs from the head "
                              f"dimension ({head_dim}): partial rotary embeddings are not supported",
                              gguf.path)
    vocab = get("vocab_size")
    if vocab is None and isinstance(meta.get("tokenizer.ggml.tokens"), list):
        vocab = len(meta["tokenizer.ggml.tokens"])
    if vocab is None and "token_embd.weight" in gguf.tensors:
        vocab = gguf.tensors["token_embd.weight"].shape[0]
    scaling = None
    if get("rope.scaling.type", "none") not in ("none", None):
        scaling = {"rope_type": get("rope.scaling.type"), "factor": get("rope.scaling.factor")}
    token = lambda name: meta.get(f"tokenizer.ggml.{name}_token_id")  # noqa: E731

    def number(key, default):
        value = get(key, default)
        if not is_number(value):
            raise CheckpointError(f"metadata key 'llama.{key}' must be a number, got {value!r:.80}",
                                  gguf.path)
        return float(value)

    try:
        return LlamaConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=get("feed_forward_length", required=True),
            num_hidden_layers=get("block_count", required=True), num_attention_heads=n_heads,
            num_key_value_heads=get("attention.head_count_kv"), head_dim=head_dim,
            rms_norm_eps=number("attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta=number("rope.freq_base", 10000.0), rope_scaling=scaling,
            max_position_embeddings=get("context_length", 2048),
            tie_word_embeddings="output.weight" not in gguf.tensors,
            bos_token_id=token("bos"), eos_token_id=token("eos"), pad_token_id=token("padding"))
    except (ConfigError, TypeError, ValueError) as e:
        raise CheckpointError(f"the llama.* metadata does not make a valid config: {e}", gguf.path) from None


def _rename(name: str, table: Dict[str, str]) -> str:
    """Map a name through a template table, its layer index filling "{}" ('' if not in the table).

    'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight' with WEIGHT_MAP, and back
    with the inverted table.
    """
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return table.get(".".join(parts[:i] + ["{}"] + parts[i + 1:]), "").format(part)
    return table.get(name, "")


class _SkipInit(torch.overrides.TorchFunctionMode):
    """Inside this mode, random initialisers return their tensor untouched.

    Why not the meta device: on meta, torch runs Python reference kernels whose first use imports
    torch._dynamo (seconds); unwritten CPU tensors cost no time and no resident memory either.
    """

    SKIPPED = {torch.nn.init.normal_, torch.nn.init.uniform_, torch.nn.init.kaiming_uniform_,
               torch.nn.init.trunc_normal_, torch.Tensor.normal_, torch.Tensor.uniform_}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.SKIPPED:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def load_gguf_model(path_or_file: Union[str, os.PathLike, GGUFFile],
                    dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A GGUF Llama -> our LlamaForCausalLM in `dtype`, in eval mode.

    The model is built with its random init switched off (`_SkipInit`), so its parameters are
    allocated but never written and the OS never backs them with memory; then each tensor is
    dequantised, unpermuted if it is W_q or W_k, cast, and replaces its parameter: one tensor in
    flight at a time, no second copy of the model. Names and shapes are all checked first.
    """
    gguf = path_or_file if isinstance(path_or_file, GGUFFile) else read_gguf(path_or_file)
    config = gguf_config(gguf)
    if "rope_freqs.weight" in gguf.tensors:  # Llama 3.1 and later: per-frequency RoPE divisors
        raise CheckpointError("tensor 'rope_freqs.weight': Llama-3.1-style RoPE frequency factors are "
                              "not supported in GGUF files (ignoring them would silently change the "
                              "model); load the model's Hugging Face folder instead, whose config.json "
                              "rope_scaling (rope_type llama3) is supported", gguf.path)
    # our name -> the file's; a name the table does not know keeps its own, marked so that it can
    # collide with none of ours, and is reported as unexpected
    names = {_rename(gguf_name, WEIGHT_MAP) or f"?{gguf_name}": gguf_name for gguf_name in gguf.tensors}
    theirs = {ours: gguf_name for gguf_name, ours in WEIGHT_MAP.items()}
    stored = {ours: Stored(gguf.tensors[name].shape, gguf.tensors[name].nbytes, Path(gguf.path))
              for ours, name in names.items()}
    check_fits(config, stored, len(gguf.data) - gguf.data_start, gguf.path, source="the llama.* metadata",
               file_name=lambda ours: names.get(ours) or _rename(ours, theirs))  # before anything is built
    with _SkipInit():
        model = LlamaForCausalLM(config)

    state = {}
    for ours, gguf_name in names.items():
        w = gguf.tensor(gguf_name)  # float32 numpy, shape (out, in) or (dim,)
        if ours.endswith("q_proj.weight"):
            w = unpermute_qk(w, config.num_attention_heads)
        elif ours.endswith("k_proj.weight"):
            w = unpermute_qk(w, config.num_key_value_heads)
        state[ours] = torch.from_numpy(w).to(dtype)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, assign=True)
    if config.tie_word_embeddings:  # assign=True made two Parameters; make them one again
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def load_gguf_tokenizer(path_or_file: Union[str, os.PathLike, GGUFFile]) -> Tokenizer:
    """The tokenizer a GGUF file's metadata describes (see `gguf_tokenizer.py`), as our Tokenizer.

    path_or_file: a path, or a reader result with `.metadata` (and `.path`, named in errors).
    """
    gguf = path_or_file if hasattr(path_or_file, "metadata") else read_gguf(path_or_file)
    path = getattr(gguf, "path", None)
    tok, specials = tokenizer_from_gguf(gguf.metadata, path=path)
    return Tokenizer(tok, **specials, path=path)


def load_gguf(path: Union[str, os.PathLike, GGUFFile], dtype: torch.dtype = torch.float32):
    """A GGUF Llama file -> (LlamaForCausalLM, Tokenizer); the tokenizer comes from the same metadata."""
    gguf = path if isinstance(path, GGUFFile) else read_gguf(path)
    tokenizer = load_gguf_tokenizer(gguf)  # before the weights: a bad tokenizer fails fast
    check_tokenizer(tokenizer, gguf_config(gguf), gguf.path)
    return load_gguf_model(gguf, dtype), tokenizer
