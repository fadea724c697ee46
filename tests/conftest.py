"""Shared test helpers: where the data lives, and how a missing data folder is treated.

Tests that need ../shared/data skip with a reason when it is absent, except under
LLM2VEC_MINI_REQUIRE_DATA=1 (CI), where absence is a failure.
"""

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def require_data() -> bool:
    return os.environ.get("LLM2VEC_MINI_REQUIRE_DATA") == "1"


def missing(reason: str):
    """Skip, or fail when data is required (CI)."""
    if require_data():
        pytest.fail(f"{reason} (LLM2VEC_MINI_REQUIRE_DATA=1)")
    pytest.skip(reason)


def shared_data_dir() -> Path:
    """$LLM2VEC_MINI_DATA, else ../shared/data beside the repository; skip or fail when absent."""
    path = Path(os.environ.get("LLM2VEC_MINI_DATA", REPO.parent / "shared" / "data"))
    if not path.is_dir():
        missing(f"data folder {path} not found")
    return path


@pytest.fixture
def data_dir() -> Path:
    return shared_data_dir()
