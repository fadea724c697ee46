"""The checks of the file formats: e11 a safetensors reader (on files written here from the format's
definition), e12 GGUF's Q8_0 and Q4_1 blocks and its order of the W_q/W_k rows."""

from __future__ import annotations

import json
import os
import struct
import tempfile

import numpy as np
import torch

from .expect import expect, expect_close, need, tensor

# -------------------------------------------------------------------------------------------------
# e11 the safetensors reader

def write_safetensors(path, tensors: dict, metadata: dict) -> None:
    """A safetensors file from {name: (dtype name, shape, raw bytes)}, written from the format's
    definition: the data in reverse name order (the header lists names sorted), one tensor right after
    the other (the format allows no holes in the data), the header padded with spaces."""
    header, data = {"__metadata__": metadata}, b""
    for name in sorted(tensors, reverse=True):
        dtype, shape, raw = tensors[name]
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(dict(sorted(header.items())), separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)


def bytes_of(t: torch.Tensor) -> bytes:
    """A tensor's raw bytes, row-major, as this (little-endian) machine holds them."""
    return t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


def check_e11(impl):
    load_safetensors = need(impl, "load_safetensors")
    rng = np.random.default_rng(11)
    bf16 = torch.randn(3, 4, generator=torch.Generator().manual_seed(11)).bfloat16()
    values = {  # name: (safetensors dtype, the torch tensor the reader must return)
        "model.embed_tokens.weight": ("BF16", bf16),
        "model.norm.weight": ("F16", torch.from_numpy(rng.normal(size=6).astype("<f2"))),
        "q_proj.weight": ("F32", torch.from_numpy(rng.normal(size=(2, 3)).astype("<f4"))),
        "f64": ("F64", torch.from_numpy(rng.normal(size=(2,)).astype("<f8"))),
        "step": ("I64", torch.tensor([1000, -2 ** 40])),
        "i32": ("I32", torch.tensor([[7, -8]], dtype=torch.int32)),
        "i16": ("I16", torch.tensor([300, -300, 5], dtype=torch.int16)),
        "i8": ("I8", torch.tensor([-128, 127], dtype=torch.int8)),
        "u8": ("U8", torch.tensor([0, 255, 3], dtype=torch.uint8)),
        "flags": ("BOOL", torch.tensor([True, False, True])),
        "scalar": ("F32", torch.tensor(2.5)),
        "empty": ("F32", torch.zeros(0, 3)),
    }
    raw = {name: (dtype, tuple(t.shape), bytes_of(t)) for name, (dtype, t) in values.items()}
    with tempfile.TemporaryDirectory(prefix="kit_e11_") as folder:
        path = os.path.join(folder, "model.safetensors")
        write_safetensors(path, raw, {"format": "pt"})
        got = load_safetensors(path)
        dtypes = ", ".join(sorted({d for d, _ in values.values()}))
        what = f"load_safetensors on a file with the dtypes {dtypes}"
        expect(isinstance(got, dict), f"{what}: expected a dict, got {type(got).__name__}")
        expect(set(got) == set(values), f"{what}: expected the names {sorted(values)}, got {sorted(got)}")
        for name, (dtype, want) in values.items():
            t = tensor(got[name], f"{what}: tensor {name!r}")
            expect(t.dtype == want.dtype, f"{what}: tensor {name!r} ({dtype}) should come back as "
                   f"{want.dtype}, got {t.dtype}")
            expect(tuple(t.shape) == tuple(want.shape), f"{what}: tensor {name!r} should have shape "
                   f"{tuple(want.shape)}, got {tuple(t.shape)}")
            if want.numel():
                expect(bytes_of(t) == bytes_of(want), f"{what}: tensor {name!r} ({dtype}): expected "
                       f"{want.flatten()[:4].tolist()}, got {t.flatten()[:4].tolist()}")


# -------------------------------------------------------------------------------------------------
# e12 GGUF: Q8_0 and Q4_1 blocks, and the Q/K row order

def check_e12(impl):
    rng = np.random.default_rng(12)
    n = 7  # blocks
    d = rng.uniform(0.001, 0.05, n).astype(np.float16)
    q8 = rng.integers(-128, 128, (n, 32)).astype(np.int8)
    blocks = b"".join(d[i].astype("<f2").tobytes() + q8[i].tobytes() for i in range(n))
    want = (d.astype(np.float32)[:, None] * q8.astype(np.float32)).reshape(-1)
    got = need(impl, "dequantize_q8_0")(np.frombuffer(blocks, dtype=np.uint8).copy())
    expect_close(got, torch.from_numpy(want), f"dequantize_q8_0 on {n} blocks (w = d q)", atol=0, rtol=1e-6,
                 dtype=torch.float32)
    m = rng.uniform(-0.5, 0, n).astype(np.float16)
    q4 = rng.integers(0, 16, (n, 32)).astype(np.uint8)
    packed = q4[:, :16] | (q4[:, 16:] << 4)  # weight j in the low nibble of byte j, j + 16 in the high one
    blocks = b"".join(d[i].astype("<f2").tobytes() + m[i].astype("<f2").tobytes() + packed[i].tobytes()
                      for i in range(n))
    want = (d.astype(np.float32)[:, None] * q4.astype(np.float32) + m.astype(np.float32)[:, None]).reshape(-1)
    got = need(impl, "dequantize_q4_1")(np.frombuffer(blocks, dtype=np.uint8).copy())
    expect_close(got, torch.from_numpy(want), f"dequantize_q4_1 on {n} blocks (w = d q + m; low nibbles "
                 f"are weights 0-15)", atol=1e-6, rtol=1e-6, dtype=torch.float32)
    unpermute_qk = need(impl, "unpermute_qk")
    for n_head, head_dim in ((1, 8), (3, 4), (2, 16)):
        hf = np.arange(n_head * head_dim * 3, dtype=np.float32).reshape(n_head * head_dim, 3)  # rows numbered
        stored = np.empty_like(hf)  # llama.cpp's order: row i and row i + d/2 of a head at 2i and 2i + 1
        for h in range(n_head):
            for i in range(head_dim // 2):
                for p in (0, 1):
                    stored[h * head_dim + 2 * i + p] = hf[h * head_dim + i + p * head_dim // 2]
        got = unpermute_qk(stored.copy(), n_head)
        expect_close(torch.from_numpy(np.asarray(got)), torch.from_numpy(hf),
                     f"unpermute_qk(w of shape {stored.shape}, n_head={n_head}) (head_dim {head_dim}; "
                     f"rows 2i and 2i + 1 of a head go back to i and i + head_dim/2)", atol=0, rtol=0)
