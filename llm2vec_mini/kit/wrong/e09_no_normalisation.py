"""e09, wrong: dot products instead of cosines (the embeddings are not normalised)."""

import torch
import torch.nn.functional as F

from llm2vec_mini.kit.reference import *  # noqa: F403  (every other exercise: the reference)


def contrastive_loss(queries, positives, negatives=None, scale=20.0):
    candidates = positives if negatives is None else torch.cat([positives, negatives])
    scores = scale * queries.float() @ candidates.float().T  # the bug: no F.normalize
    return F.cross_entropy(scores, torch.arange(len(queries)))
