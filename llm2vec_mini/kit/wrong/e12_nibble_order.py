"""e12, wrong: Q4_1's nibbles read in the interleaved order (byte j holds weights 2j and 2j + 1)."""

import numpy as np

from llm2vec_mini.kit.reference import *  # noqa: F403  (every other exercise: the reference)


def dequantize_q4_1(raw):
    blocks = raw.reshape(-1, 20)
    d = blocks[:, 0:2].copy().view("<f2").astype(np.float32)  # (n, 1)
    m = blocks[:, 2:4].copy().view("<f2").astype(np.float32)
    qs = blocks[:, 4:]
    q = np.stack([qs & 0x0F, qs >> 4], axis=-1).reshape(-1, 32)  # the bug: low, high, low, high, ...
    return (d * q.astype(np.float32) + m).reshape(-1)
