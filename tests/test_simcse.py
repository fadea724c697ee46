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


# -------------------------------------------------------------------------------------------------
# pool_all_positions: the official SimCSE training's pooling, against transformers

def test_pool_all_positions_is_the_mean_of_the_padded_row_as_transformers_numbers_it():
    """The official training pools every position of a left-padded row, padding included, with
    transformers' default positions 0..T-1; computed here with transformers' LlamaModel and a
    bidirectional 4-D mask built by hand."""
    transformers = pytest.importorskip("transformers")

    from llm2vec_mini import LlamaForCausalLM
    from llm2vec_mini.simcse import SimCSETask
    torch.manual_seed(0)
    cfg = LlamaConfig.tiny()
    hc = transformers.LlamaConfig(**cfg.to_hf_config())
    hc._attn_implementation = "eager"
    ref = transformers.LlamaModel(hc).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(std=0.1)
    ours = LlamaForCausalLM(cfg).eval()
    ours.model.load_state_dict(ref.state_dict())
    ours.set_causal(False)
    sentences = [[1, 5, 6, 7, 8, 9, 10], [1, 11, 12], [1, 13, 14, 15, 16]]
    task = SimCSETask(ours, sentences, pad_id=2, bos_id=1, pool_all_positions=True)
    ids, mask = task.make_batch([0, 1, 2], None)  # (3, 7), left padding
    visible = torch.zeros(3, 1, 7, 7).masked_fill(mask[:, None, None, :] == 0, torch.finfo(torch.float32).min)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=visible).last_hidden_state.mean(1)  # every position
        got = task.embed(ids, mask)
        text_only = SimCSETask(ours, sentences, pad_id=2, bos_id=1).embed(ids, mask)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (text_only - expected).abs().max() > 1e-2  # our default pools the text alone: different


def test_pool_all_positions_is_a_form_of_mean_pooling():
    from llm2vec_mini import ConfigError
    from llm2vec_mini.simcse import SimCSETask
    with pytest.raises(ConfigError, match="mean"):
        SimCSETask(torch.nn.Module(), [[1, 2]], pad_id=2, pooling="eos_token", pool_all_positions=True)
