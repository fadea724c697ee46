"""The checks: one function per exercise, `check_e01(impl)` ... `check_e12(impl)`.

Each takes the implementation under test (the student's module, or `reference`) as its argument, the
seam that Stanford CS336's `tests/adapters.py` puts between a course's tests and a student's code, and
raises `CheckFailed` (an AssertionError) at the first property it breaks, in words a student can act
on: which input, what was expected, what came back. Every expected value is computed here, from the
equation, in float64 where rounding matters; none comes from the code under test, nor from the package.
The inputs are what subtle bugs break: left and right padding, a row that is all padding, fewer
key/value heads than query heads, bfloat16 input, a batch with nothing masked, gradients.
Nothing here imports llm2vec_mini: the checks need torch and numpy only, and take about a second.

    expect.py     need, expect, expect_close, expect_equal: fetch, compare, say what differs
    model.py      e01 RMSNorm, e02 RoPE, e03 the attention mask, e04 attention, e05 SwiGLU
    training.py   e06 MNTP masking, e07 the MNTP loss, e08 LoRA, e09 SimCSE, e10 pooling
    formats.py    e11 safetensors, e12 GGUF blocks and the Q/K row order

An instructor's own checks (`kit grade --hidden DIR`) have the same form (see `run.py`) and may use
the helpers: `from llm2vec_mini.kit.checks import expect, expect_close, need`.
"""

from .expect import CheckFailed, NotAttempted, expect, expect_close, expect_equal, need, shape_of, tensor
from .formats import check_e11, check_e12
from .model import check_e01, check_e02, check_e03, check_e04, check_e05
from .training import check_e06, check_e07, check_e08, check_e09, check_e10

CHECKS = {"e01": check_e01, "e02": check_e02, "e03": check_e03, "e04": check_e04, "e05": check_e05,
          "e06": check_e06, "e07": check_e07, "e08": check_e08, "e09": check_e09, "e10": check_e10,
          "e11": check_e11, "e12": check_e12}

__all__ = ["CHECKS", "CheckFailed", "NotAttempted", "expect", "expect_close", "expect_equal", "need",
           "shape_of", "tensor"]
