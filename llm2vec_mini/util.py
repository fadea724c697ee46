"""Small helpers every other module shares: JSON files, type checks, device names, the decoder inside a
model, left padding, and seeds derived from a tuple. One home each, so that no rule is written twice.
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

from .errors import CheckpointError, ConfigError, Llm2VecMiniError

PathLike = Union[str, os.PathLike]
_REQUIRED = object()


def is_int(value: Any) -> bool:
    """An integer and not a bool (in Python `True == 1`): a Python or numpy integer."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A real number (int or float, Python or numpy) and not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


MAX_JSON_BYTES = 64 << 20  # a config, index or settings file is kilobytes; tokenizer.json is not read here
MAX_JSON_DEPTH = 64  # ours nest 3 or 4 levels; far deeper is garbage, and Python's repr would overflow on it


def read_json(path: PathLike, error: Type[Llm2VecMiniError] = CheckpointError, default: Any = _REQUIRED,
              expect: type | None = None) -> Any:
    """The value of a JSON file, or `error` naming the file when it is absent (unless a `default` is
    given), unreadable, over MAX_JSON_BYTES, not UTF-8, not JSON, nested deeper than MAX_JSON_DEPTH,
    or not of type `expect`."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_JSON_BYTES + 1)
    except FileNotFoundError:
        if default is not _REQUIRED:
            return default
        raise error("file not found", path) from None
    except OSError as e:
        raise error(f"cannot read ({e.strerror or e})", path) from None
    if len(data) > MAX_JSON_BYTES:
        raise error(f"over {MAX_JSON_BYTES >> 20} MB: not a JSON settings file", path)
    value = parse_json(data, path, error)
    if expect is not None and not isinstance(value, expect):
        raise error(f"expected a JSON {'object' if expect is dict else expect.__name__}, got "
                    f"{type(value).__name__}", path)
    return value


def parse_json(data: Union[str, bytes], path: Any = None, error: Type[Llm2VecMiniError] = CheckpointError,
               object_pairs_hook=None, strict: bool = False, what: str = "a valid JSON file") -> Any:
    """JSON text (bytes must be UTF-8) -> value, or `error` naming `path` (a file, or "file, line 3")
    and saying it is not `what` when the data are not UTF-8, not JSON, or nested
    deeper than MAX_JSON_DEPTH (checked after parsing, without recursion: a value that deep would
    make any recursive walk over it, `repr` in an error message included, raise RecursionError).
    `strict`: NaN and Infinity, which Python reads but JSON does not have, and strings holding lone
    surrogates are refused too."""
    def no_constant(name):
        raise ValueError(f"{name} is not JSON")
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        value = json.loads(text, object_pairs_hook=object_pairs_hook,
                           parse_constant=no_constant if strict else None)
    except RecursionError:
        raise error(f"not {what} (nested deeper than {MAX_JSON_DEPTH} levels)", path) from None
    except UnicodeDecodeError as e:
        raise error(f"not {what} (not UTF-8: {e.reason} at byte {e.start})", path) from None
    except ValueError as e:
        raise error(f"not {what} ({e})", path) from None
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        if children and depth >= MAX_JSON_DEPTH:
            raise error(f"not {what} (nested deeper than {MAX_JSON_DEPTH} levels)", path)
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
        if strict:
            texts = [*item, *children] if isinstance(item, dict) else [item, *children]  # keys too
            if not all(_is_utf8(text) for text in texts if isinstance(text, str)):
                raise error(f"not {what} (a string holds a lone surrogate, \\udXXX)", path)
    return value


def _is_utf8(text: str) -> bool:
    """False for a string with a lone surrogate (JSON can escape one, "\\ud800"; UTF-8 cannot hold it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_file(path: PathLike) -> bool:
    """Path(path).is_file(), but False, not OSError, for a name the system cannot even look up (longer
    than NAME_MAX, a loop of links): such names come from files (a shard in an index, a base model)."""
    try:
        return Path(path).is_file()
    except (OSError, ValueError):
        return False


def is_dir(path: PathLike) -> bool:
    """Path(path).is_dir(), False for a name the system cannot look up (see `is_file`)."""
    try:
        return Path(path).is_dir()
    except (OSError, ValueError):
        return False


def torch_device(value: Any, name: str = "device") -> torch.device:
    """A device argument ("cpu", "cuda", "cuda:1", a torch.device) -> torch.device, or ConfigError naming
    the argument when torch does not know it, or it is a GPU this machine does not have."""
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"{name}: unknown device {value!r} (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{name} {value}: this machine has no CUDA GPU that torch can use")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"{name} {value}: there are only {torch.cuda.device_count()} GPUs")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{name} {value}: this machine has no Apple GPU that torch can use")
    elif device.type not in ("cpu", "mps"):
        raise ConfigError(f"{name}: device type {device.type!r} is not supported (cpu, cuda, cuda:1, mps)")
    return device


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
