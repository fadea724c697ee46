"""e04, wrong: key/value heads expanded with `repeat` (h reads h % n_kv) instead of `repeat_interleave`."""

import math

import torch

from llm2vec_mini.kit.reference import *  # noqa: F403  (every other exercise: the reference)


def attention(q, k, v, mask):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat(1, g, 1, 1), v.repeat(1, g, 1, 1)  # the bug: head h reads kv head h % n_kv
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, nh, T, T)
    if mask is not None:
        scores = scores + mask
    return torch.softmax(scores, dim=-1) @ v
