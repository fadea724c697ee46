"""e10, wrong: the last column is taken as the last token, which is padding when a row is padded
on the right."""

from llm2vec_mini.kit import reference
from llm2vec_mini.kit.reference import *  # noqa: F403  (every other exercise: the reference)


def pool(hidden, attention_mask, embed_mask, mode):
    if mode in ("eos_token", "last_token"):
        return hidden[:, -1]  # the bug: right with left padding only
    return reference.pool(hidden, attention_mask, embed_mask, mode)
