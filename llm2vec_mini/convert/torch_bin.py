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

import os
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
    mmap = zipfile.is_zipfile(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # UnpicklingError for refused globals, RuntimeError/EOFError for garbage
        message = " ".join(str(e).split())  # torch's messages span many lines
        if "Weights only load failed" in message:  # keep the reason, drop torch's advice to trust the file
            # torch words it "... WeightsUnpickler error: <reason> Check the documentation ..." or
            # "... from a trusted source. <reason> Check the documentation ..."
            reason = message
            for marker in ("WeightsUnpickler error:", "trusted source."):
                if marker in reason:
                    reason = reason.split(marker, 1)[1]
                    break
            reason = reason.split(" Check the documentation")[0].strip().rstrip(".")
            raise CheckpointError(f"refused by the weights-only unpickler ({reason}); nothing in "
                                  f"the file was run", path) from e
        raise CheckpointError(f"unreadable PyTorch checkpoint ({type(e).__name__}: "
                              f"{message[:300]})", path) from e

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
    return dict(payload)
