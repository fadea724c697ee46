"""e07, wrong: BERT's unshifted loss (token i predicted from position i, not i - 1)."""

import torch.nn.functional as F

from llm2vec_mini.kit.reference import *  # noqa: F403  (every other exercise: the reference)


def mntp_loss(logits, labels):
    where = labels != -100  # the bug: no shift
    if not where.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[where].float(), labels[where])

