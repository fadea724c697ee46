"""e01, wrong: the normalisation computed in the input's dtype (bfloat16 stays bfloat16)."""

import torch

from llm2vec_mini.kit.reference import *  # noqa: F403  (every other exercise: the reference)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight  # the bug: no float32
