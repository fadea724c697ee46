"""The kit's checks as pytest tests, for a student's own file (or the package).

    LLM2VEC_MINI_KIT_IMPL=my_llm2vec.py python -m pytest --pyargs llm2vec_mini.kit.test_exercises
    LLM2VEC_MINI_KIT_IMPL=my_llm2vec.py python -m pytest --pyargs llm2vec_mini.kit.test_exercises -m e03

One test per exercise, named and marked by its id (`-m e03` or `-k e03` selects one; the markers are
registered in the repository's pyproject.toml). A failed check fails its test with the check's
message; an exercise not attempted is skipped with the reason. Without LLM2VEC_MINI_KIT_IMPL the
tests run on the package itself ("reference"), as tests/test_kit.py does.
"""

import os

import pytest

from llm2vec_mini.kit.exercises import EXERCISES
from llm2vec_mini.kit.run import NOT_ATTEMPTED, PASSED, load_impl, run_check

IMPL = os.environ.get("LLM2VEC_MINI_KIT_IMPL", "reference")


@pytest.fixture(scope="module")
def impl():
    return load_impl(IMPL)


@pytest.mark.parametrize("exercise", [pytest.param(e.id, marks=getattr(pytest.mark, e.id), id=e.id)
                                      for e in EXERCISES])
def test_exercise(impl, exercise):
    result = run_check(impl, exercise)
    if result.status == NOT_ATTEMPTED:
        pytest.skip(f"not attempted: {result.message}")
    assert result.status == PASSED, result.message
