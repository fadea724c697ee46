"""PyTorch `.bin` checkpoints (`pytorch_model.bin`, `adapter_model.bin`), loaded without running code.

A `.bin` file is what `torch.save(state_dict, path)` writes: since PyTorch 1.6 a zip archive holding a
pickle (`data.pkl`) plus one raw record per storage; before that, one legacy stream of pickles. A
pickle is a small program: its opcodes can import any callable and call it, so `pickle.load` of an
untrusted file runs the author's code. `torch.load(..., weights_only=True)` unpickles with an allow
list (tensors, storages, dicts, lists, numbers, strings) and refuses every other global before
calling it, which is the only way we ever open these files. `mmap=True` maps the storages instead of
reading them, so a 5 GB checkpoint costs no copy; legacy files cannot be mapped and are read whole.

References:
1) PyTorch, "torch.load and weights_only", https://pytorch.org/docs/stable/notes/serialization.html
2) Python docs, "pickle: Restricting globals", https://docs.python.org/3/library/pickle.html
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import zipfile
from typing import Dict

import torch

from ..errors import CheckpointError


def load_torch_bin(path) -> Dict[str, torch.Tensor]:
    """A `torch.save`d state dict (name -> tensor) on the CPU, memory-mapped when the file allows.

    Raises CheckpointError (naming the file) for a pickle that would import or call anything beyond
    plain tensors and containers, a truncated or garbage file, a payload that is not a dict, or a
    value that is not a tensor.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError("no such file", path)
    # Zip archives (every torch.save since 1.6) can be memory-mapped; legacy pickles cannot.
    try:
        mmap = zipfile.is_zipfile(path)
    except (zipfile.BadZipFile, ValueError, EOFError) as e:  # a damaged end record can raise here too
        raise CheckpointError(f"a damaged zip archive ({e})", path) from None
    if mmap:
        _check_records(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:  # the weights-only unpickler refused a global or an opcode
        found = imported_globals(path)
        reason = (f"it imports {', '.join(f'GLOBAL {g}' for g in found[:3])}, which a state dict of tensors "
                  f"never needs" if found else "an opcode or a type a state dict of tensors never needs")
        raise CheckpointError(f"refused by the weights-only unpickler: {reason}; nothing in the file was "
                              f"run", path) from e
    except Exception as e:  # RuntimeError, EOFError, zipfile errors, ...: a truncated or garbage file
        message = " ".join(str(e).split())[:300]
        raise CheckpointError(f"unreadable PyTorch checkpoint ({type(e).__name__}: {message})", path) from e

    if not isinstance(payload, dict):
        raise CheckpointError(f"expected a dict of tensors (a state dict), found a "
                              f"{type(payload).__name__}", path)
    for name, value in payload.items():
        if not isinstance(name, str):
            raise CheckpointError(f"state dict keys must be strings, found {name!r}", path)
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"tensor {name!r}: expected a tensor, found a {type(value).__name__}"
                                  f" (nested checkpoints such as {{'state_dict': ...}} are not "
                                  f"supported)", path)
        # A weight is a plain dense tensor with its bytes in the file: not a meta tensor (no data at
        # all), not sparse or quantised (another layout), not a tensor subclass.
        if value.is_meta or value.layout != torch.strided or value.is_quantized or \
                type(value) not in (torch.Tensor, torch.nn.Parameter):
            kind = "meta" if value.is_meta else str(value.layout) if value.layout != torch.strided else \
                "quantised" if value.is_quantized else type(value).__name__
            raise CheckpointError(f"tensor {name!r}: a {kind} tensor; a weight must be a plain dense tensor "
                                  f"stored in the file", path)
    return dict(payload)


def _check_records(path) -> None:
    """torch.save stores every record of its zip archive as it is. A compressed record could expand
    to any size when read (a zip bomb), so one is refused before anything is read."""
    try:
        with zipfile.ZipFile(path) as archive:
            packed = [i.filename for i in archive.infolist() if i.compress_type != zipfile.ZIP_STORED]
    except (OSError, zipfile.BadZipFile, ValueError, EOFError, NotImplementedError) as e:
        raise CheckpointError(f"a damaged zip archive ({type(e).__name__}: {e})", path) from None
    if packed:
        raise CheckpointError(f"record {packed[0]!r} is compressed, which torch.save never does: it could "
                              f"expand to any size when read", path)


def imported_globals(path, limit: int = 1 << 26) -> list[str]:
    """The callables a checkpoint's pickle imports (GLOBAL / STACK_GLOBAL opcodes), other than torch's
    own and collections': what the weights-only unpickler refuses. Read, never run (`pickletools`)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                with archive.open(name) if name else io.BytesIO() as record:
                    data = record.read(limit)  # never more than `limit`, however large the record
        else:  # a legacy file: several pickles in a row, before the tensor bytes
            with open(path, "rb") as f:
                data = f.read(limit)
    except (OSError, zipfile.BadZipFile, ValueError, EOFError, NotImplementedError):
        return []
    stream, found, strings = io.BytesIO(data), [], []
    while stream.tell() < len(data):
        try:
            for opcode, arg, _ in pickletools.genops(stream):
                if isinstance(arg, str) and "UNICODE" in opcode.name:
                    strings = (strings + [arg])[-2:]  # STACK_GLOBAL takes the last two
                if opcode.name in ("GLOBAL", "INST"):
                    found.append(arg.replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) == 2:
                    found.append(".".join(strings))
        except Exception:  # garbage after (or instead of) a pickle: stop reading
            break
    return [g for g in dict.fromkeys(found) if not g.startswith(("torch.", "collections."))]
