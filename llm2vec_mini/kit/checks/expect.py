"""The checks' vocabulary: fetch what the implementation defines, and compare what it returns.

A failing property raises `CheckFailed` (an AssertionError) whose message says, in a student's words,
which input was given, what was expected and what came back, at the first element that differs.
"""

from __future__ import annotations

import numpy as np
import torch


class CheckFailed(AssertionError):
    """The implementation breaks a property; the message says which, on which input."""


class NotAttempted(Exception):
    """The exercise's function or class is not in the implementation."""


def need(impl, name: str):
    """The implementation's `name` (a function or a class), or NotAttempted when it has none."""
    value = getattr(impl, name, None)
    if value is None:
        raise NotAttempted(f"{name} is not defined")
    return value


def expect(condition, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def shape_of(t) -> str:
    return f"shape {tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"


def tensor(value, what: str) -> torch.Tensor:
    """A torch tensor from what the implementation returned (a tensor or a numpy array)."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    expect(isinstance(value, torch.Tensor), f"{what}: expected a tensor, got {type(value).__name__}")
    return value


def expect_close(got, want, what: str, atol: float, rtol: float, dtype=None) -> None:
    """got equals want within atol + rtol * |want|, elementwise, with the same shape (and dtype)."""
    got, want = tensor(got, what), torch.as_tensor(want)
    expect(tuple(got.shape) == tuple(want.shape),
           f"{what}: expected shape {tuple(want.shape)}, got {tuple(got.shape)}")
    if dtype is not None:
        expect(got.dtype == dtype, f"{what}: expected dtype {dtype}, got {got.dtype}")
    g, w = got.detach().to(torch.float64), want.detach().to(torch.float64)
    bad = ~torch.isclose(g, w, atol=atol, rtol=rtol)  # NaN is never close
    if bad.any():
        where = tuple(int(i) for i in bad.nonzero()[0])
        at = f"at index {list(where)} " if where else ""
        raise CheckFailed(f"{what}: {at}expected {float(w[where]):.6g}, got {float(g[where]):.6g} "
                          f"({int(bad.sum())} of {bad.numel()} values off by more than {atol:g} + "
                          f"{rtol:g} x |expected|)")


def expect_equal(got, want, what: str) -> None:
    """Exactly equal tensors (integers, booleans, or bits)."""
    got, want = tensor(got, what), torch.as_tensor(want)
    expect(tuple(got.shape) == tuple(want.shape),
           f"{what}: expected shape {tuple(want.shape)}, got {tuple(got.shape)}")
    bad = got != want
    if bad.any():
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise CheckFailed(f"{what}: at index {list(where)} expected {want[where].item()}, got "
                          f"{got[where].item()} ({int(bad.sum())} of {bad.numel()} values differ)")
