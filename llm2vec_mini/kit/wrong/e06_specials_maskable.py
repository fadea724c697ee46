"""e06, wrong: special tokens (bos, eos, padding) can be chosen for masking."""

import torch

from llm2vec_mini.kit.reference import *  # noqa: F403  (every other exercise: the reference)


def mntp_mask(input_ids, mask_id, vocab_size, special_ids, mask_ratio, generator=None):
    inputs, labels = input_ids.clone(), input_ids.clone()
    chosen = torch.rand(input_ids.shape, generator=generator) < mask_ratio  # the bug: specials too
    labels[~chosen] = -100
    how = torch.rand(input_ids.shape, generator=generator)
    inputs[chosen & (how < 0.8)] = mask_id
    random = chosen & (how >= 0.8) & (how < 0.9)
    inputs[random] = torch.randint(vocab_size, input_ids.shape, generator=generator)[random]
    return inputs, labels
