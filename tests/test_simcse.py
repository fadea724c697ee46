"""SimCSE losses against a direct numpy computation of the formula; gradients reach only LoRA."""

import numpy as np
import pytest
import torch

from llm2vec_mini import LlamaConfig, LlamaModel
from llm2vec_mini.lora import add_lora
from llm2vec_mini.simcse import supervised_loss, unsup_simcse_loss


def numpy_contrastive(q, candidates, scale):
    """mean_i -log softmax_j(scale * cos(q_i, c_j))[i], in float64 numpy."""
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    cn = candidates / np.linalg.norm(candidates, axis=1, keepdims=True)
    s = scale * qn @ cn.T
    s = s - s.max(axis=1, keepdims=True)
    log_softmax = s - np.log(np.exp(s).sum(axis=1, keepdims=True))
    return float(-np.mean([log_softmax[i, i] for i in range(len(q))]))


@pytest.mark.parametrize("scale", [20.0, 1.0])
def test_unsupervised_loss_equals_numpy(scale):
    rng = np.random.default_rng(0)
    e1, e2 = rng.normal(size=(8, 16)), rng.normal(size=(8, 16))
    got = unsup_simcse_loss(torch.tensor(e1, dtype=torch.float32), torch.tensor(e2, dtype=torch.float32),
                            scale=scale)
    assert abs(float(got) - numpy_contrastive(e1, e2, scale)) <= 1e-6 * max(1.0, abs(float(got)))


def test_supervised_loss_with_hard_negatives_equals_numpy():
    rng = np.random.default_rng(1)
    q, p, n = (rng.normal(size=(6, 12)) for _ in range(3))
    got = supervised_loss(*(torch.tensor(x, dtype=torch.float32) for x in (q, p, n)))  # scale 50
    expected = numpy_contrastive(q, np.concatenate([p, n]), 50.0)
    assert abs(float(got) - expected) <= 1e-6 * max(1.0, expected)


def test_identical_views_of_distinct_sentences_give_low_loss():
    e = torch.eye(4) * 3
    assert float(unsup_simcse_loss(e, e)) < 1e-6


def test_gradients_flow_only_into_lora():
    torch.manual_seed(0)
    model = add_lora(LlamaModel(LlamaConfig.tiny(attention_dropout=0.3)).set_causal(False), r=4, alpha=8)
    for m in model.modules():  # non-zero B, so A receives gradient too
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B.weight, std=0.1)
    model.train()
    ids = torch.randint(3, 256, (4, 10))
    e1, e2 = model(ids).mean(1), model(ids).mean(1)  # two dropout views
    unsup_simcse_loss(e1, e2).backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
