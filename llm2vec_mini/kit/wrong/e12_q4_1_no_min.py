"""e12, wrong: Q4_1 without its minimum (w = d q, forgetting + m)."""

import numpy as np

from llm2vec_mini.kit.reference import *  # noqa: F403  (every other exercise: the reference)


def dequantize_q4_1(raw):
    blocks = raw.reshape(-1, 20)
    d = blocks[:, 0:2].copy().view("<f2").astype(np.float32)  # (n, 1)
    qs = blocks[:, 4:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # (n, 32)
    return (d * q.astype(np.float32)).reshape(-1)  # the bug: + m is missing
