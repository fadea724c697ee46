"""A student's starting file, generated from `reference.py`: `python -m llm2vec_mini.kit new FILE`.

Each exercise keeps its signature and docstring from the reference solution; its body becomes a
`raise NotImplementedError` that names the tutorial section teaching it. The exercise class (e08) is
written as an `nn.Module`. Nothing is kept by hand: a change to an exercise's docstring in
`reference.py` reaches the next stub.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from ..errors import ConfigError
from . import reference
from .exercises import EXERCISES

HEADER = '''"""My llm2vec-mini: the exercises of the llm2vec-mini teaching kit, in my own code.

Written by `python -m llm2vec_mini.kit new`. Replace each `raise NotImplementedError(...)` by your
code, then check it:

    python -m llm2vec_mini.kit check --impl {name}                  # every exercise
    python -m llm2vec_mini.kit check --impl {name} --exercise e03   # one
    python -m llm2vec_mini.kit check --impl {name} --in-model       # and inside the real model

Rules: torch and numpy only. Not llm2vec_mini, transformers, peft, safetensors or gguf, and not
torch's ready-made F.rms_norm, nn.RMSNorm or scaled_dot_product_attention (a grader flags them).
Helper functions of your own are fine. Each docstring names the tutorial that teaches the idea.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
'''


def _blank(node, source_lines: list, message: str, indent: str) -> list:
    """A def's signature and docstring, its body replaced by `raise NotImplementedError(message)`."""
    body = node.body
    has_doc = isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
        and isinstance(body[0].value.value, str)
    keep_until = body[0].end_lineno if has_doc else body[0].lineno - 1  # signature (+ docstring)
    lines = source_lines[node.lineno - 1:keep_until]
    return lines + [f"{indent}    raise NotImplementedError({message!r})"]


def stub_source(name: str = "my_llm2vec.py") -> str:
    """The text of a fresh stub file: every exercise, in course order, raising NotImplementedError."""
    source = inspect.getsource(reference)
    source_lines = source.splitlines()
    nodes = {n.name: n for n in ast.parse(source).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    parts = [HEADER.format(name=name)]
    for exercise in EXERCISES:
        parts.append(f"\n# {'-' * 97}\n# {exercise.id} {exercise.title}: {exercise.tutorial}"
                     + (" (a stretch goal)" if exercise.stretch else "") + "\n")
        for fn_name in exercise.names:
            node = nodes[fn_name]
            message = f"{exercise.id}: write {fn_name} ({exercise.tutorial})"
            if isinstance(node, ast.FunctionDef):
                parts.append("\n" + "\n".join(_blank(node, source_lines, message, "")) + "\n")
                continue
            doc = node.body[0]  # the class's docstring, then its methods
            lines = [f"class {node.name}(nn.Module):"] + source_lines[doc.lineno - 1:doc.end_lineno]
            for method in node.body[1:]:
                message = f"{exercise.id}: write {node.name}.{method.name} ({exercise.tutorial})"
                lines += [""] + _blank(method, source_lines, message, "    ")
            parts.append("\n" + "\n".join(lines) + "\n")
    return "\n".join(parts)


def write_stub(path, force: bool = False) -> Path:
    """Write a fresh stub to `path`; an existing file is kept unless force (it may hold your work)."""
    path = Path(path)
    if path.exists() and not force:
        raise ConfigError(f"{path} exists: it may hold your work; choose another name, or pass --force to "
                          f"overwrite it")
    if path.suffix != ".py":
        raise ConfigError(f"{path}: the stub is a Python file; give it a name ending in .py")
    path.write_text(stub_source(path.name), encoding="utf-8")
    return path
