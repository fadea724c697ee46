"""e03, wrong: the padding is never hidden (the attention_mask argument is ignored)."""

import torch

from llm2vec_mini.kit.reference import *  # noqa: F403  (every other exercise: the reference)


def build_attention_mask(attention_mask, seq_len, causal, dtype):
    B = 1 if attention_mask is None else attention_mask.shape[0]
    visible = torch.ones(B, 1, seq_len, seq_len, dtype=torch.bool)  # the bug: padding keys stay visible
    if causal:
        visible = visible.tril()
    return torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)
