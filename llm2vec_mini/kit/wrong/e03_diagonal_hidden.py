"""e03, wrong: the causal mask hides the diagonal too (query i cannot see key i)."""

import torch

from llm2vec_mini.kit.reference import *  # noqa: F403  (every other exercise: the reference)


def build_attention_mask(attention_mask, seq_len, causal, dtype):
    visible = torch.ones(1, 1, seq_len, seq_len, dtype=torch.bool)
    if causal:
        visible = visible.tril(diagonal=-1)  # the bug: j < i instead of j <= i
    if attention_mask is not None:
        visible = visible & attention_mask.bool()[:, None, None, :]
    return torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)
