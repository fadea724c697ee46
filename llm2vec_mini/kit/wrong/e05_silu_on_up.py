"""e05, wrong: SwiGLU with silu on the up branch instead of the gate."""

import torch.nn.functional as F

from llm2vec_mini.kit.reference import *  # noqa: F403  (every other exercise: the reference)


def swiglu(x, gate_proj, up_proj, down_proj):
    return down_proj(gate_proj(x) * F.silu(up_proj(x)))  # the bug: silu(up) * gate
