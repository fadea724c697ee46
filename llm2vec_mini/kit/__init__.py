"""The teaching kit: students write each component, the project's checks grade it, a course runs on it.

    python -m llm2vec_mini.kit new my_llm2vec.py              a fresh stub: every exercise to write
    python -m llm2vec_mini.kit check --impl my_llm2vec.py     passed / failed (why) / not attempted
    python -m llm2vec_mini.kit check --impl my_llm2vec.py --in-model    and inside the real model
    python -m llm2vec_mini.kit tutorial 02 --impl my_llm2vec.py         a tutorial, run on your code
    python -m llm2vec_mini.kit grade alice.py bob.py --csv grades.csv  a class, each in its own process
    python -m llm2vec_mini.kit notebooks                      regenerate tutorials/exercises/

The pieces, one idea per module:

    exercises.py   the twelve exercises: what a student writes, where it is taught, what it mirrors
    reference.py   each exercise's signature and docstring, answered by the package (the solution)
    stub.py        a student's starting file, generated from reference.py
    checks/        one check per exercise, against computations written in the check
    run.py         load an implementation, run the checks, hidden checks of an instructor
    swap.py        `use(impl)`: the student's code inside the real model
    grade.py       a class: one process per submission, time and memory limits, forbidden shortcuts
    notebooks.py   the exercise notebooks: the tutorials with their hand derivations left blank
    wrong/         known-wrong submissions, one planted bug each, which the checks must catch
    test_exercises.py   the checks as pytest tests (LLM2VEC_MINI_KIT_IMPL=my_llm2vec.py)

The kit imports the package (it is a runner, like the CLI); the checks themselves need only torch and
numpy. The ideas come from teaching codebases: Stanford CS336's `tests/adapters.py` seam, minitorch's
per-task markers and classroom grading, nbgrader's generated exercise versions, karpathy's in-notebook
self-checks.
"""

from .exercises import EXERCISES
from .run import FAILED, NOT_ATTEMPTED, PASSED, Result, check, load_impl
from .swap import in_model, use

__all__ = ["EXERCISES", "check", "load_impl", "use", "in_model", "Result", "PASSED", "FAILED",
           "NOT_ATTEMPTED"]
