"""e01, wrong: LayerNorm's mean subtraction inside RMSNorm."""

import torch

from llm2vec_mini.kit.reference import *  # noqa: F403  (every other exercise: the reference)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 - x32.mean(-1, keepdim=True)  # the bug: RMSNorm does not centre
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight
