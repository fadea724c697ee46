"""e11, wrong: a safetensors reader that reads BF16 as F16 (both are two bytes, but not the same bits)."""

import json
import struct

import torch

from llm2vec_mini.kit.reference import *  # noqa: F403  (every other exercise: the reference)

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.float16,  # the bug
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


def load_safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        chunk = bytearray(data[begin:end])
        dtype = DTYPES[entry["dtype"]]
        flat = torch.frombuffer(chunk, dtype=dtype) if chunk else torch.empty(0, dtype=dtype)
        out[name] = flat.reshape(entry["shape"])
    return out
