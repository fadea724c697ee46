"""e02, wrong: RoPE rotating the interleaved pairs (2i, 2i + 1), Meta's layout, not rotate-half."""

import torch

from llm2vec_mini.kit.reference import *  # noqa: F403  (every other exercise: the reference)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1]
    cos, sin = cos[:, None, :, : d // 2], sin[:, None, :, : d // 2]  # (B, 1, T, d/2): one per frequency
    even, odd = x[..., 0::2], x[..., 1::2]  # the bug: pairs (2i, 2i + 1)
    rotated = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1)  # (B, n, T, d/2, 2)
    return rotated.flatten(-2)
