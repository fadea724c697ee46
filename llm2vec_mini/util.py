"""Small helpers every other module shares: JSON files, type checks, the decoder inside a model, left
padding, and seeds derived from a tuple. One home each, so that no rule is written twice.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
from pathlib import Path
from typing import Any, Sequence, Type, Union

import torch
from torch import nn

from .errors import CheckpointError, Llm2VecMiniError

PathLike = Union[str, os.PathLike]
_REQUIRED = object()


def is_int(value: Any) -> bool:
    """An integer and not a bool (in Python `True == 1`): a Python or numpy integer."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A real number (int or float, Python or numpy) and not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def read_json(path: PathLike, error: Type[Llm2VecMiniError] = CheckpointError, default: Any = _REQUIRED,
              expect: type | None = None) -> Any:
    """The value of a JSON file, or `error` naming the file when it is absent (unless a `default` is
    given), unreadable, not UTF-8, not JSON, nested too deeply to parse, or not of type `expect`."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        if default is not _REQUIRED:
            return default
        raise error("file not found", path) from None
    except OSError as e:
        raise error(f"not a valid JSON file ({e})", path) from None
    value = parse_json(data, error, path, what="a valid JSON file")
    if expect is not None and not isinstance(value, expect):
        raise error(f"expected a JSON {'object' if expect is dict else expect.__name__}, got "
                    f"{type(value).__name__}", path)
    return value


def parse_json(data: Union[str, bytes], error: Type[Llm2VecMiniError], where: Any = None,
               what: str = "valid JSON") -> Any:
    """The value of a JSON text (bytes must be UTF-8), or `error` naming `where` (a file, "file, line 3")
    when it is not UTF-8, not JSON, or nested too deeply to parse."""
    try:
        return json.loads(data.decode("utf-8") if isinstance(data, bytes) else data)
    except RecursionError:
        raise error(f"not {what} (nested too deeply)", where) from None
    except (UnicodeDecodeError, ValueError) as e:
        raise error(f"not {what} ({e})", where) from None


def decoder_of(model: nn.Module) -> nn.Module:
    """The LlamaModel inside a LlamaForCausalLM (its `.model`), or the model itself."""
    return getattr(model, "model", model)


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists of different lengths -> input_ids and attention_mask, both (B, T) int64.

    Padding goes on the left, as LLM2Vec encodes: every sequence ends at column T - 1, so the last
    token (eos pooling) is in the same column for all, and the mask is 0 over the padding.
    """
    T = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros(len(seqs), T, dtype=torch.long)  # (B, T)
    for b, s in enumerate(seqs):
        if len(s):
            input_ids[b, T - len(s):] = torch.as_tensor(s, dtype=torch.long)
            attention_mask[b, T - len(s):] = 1
    return input_ids, attention_mask


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from a tuple such as (purpose, seed, step, micro_batch).

    Formulas like `seed * 7919 + step * 31 + micro` give two tuples the same seed (step 0, micro 31
    and step 1, micro 0); SHA-256 of the tuple gives every tuple its own, as surely as a 63-bit key
    is never guessed.
    """
    digest = hashlib.sha256(repr(tuple(parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generator(*parts: Any) -> torch.Generator:
    """A CPU torch.Generator seeded by `derive_seed(*parts)`."""
    return torch.Generator().manual_seed(derive_seed(*parts))
