"""MNTP: the collator's statistics, and the loss against transformers' causal-LM loss."""

import pytest
import torch
from conftest import Reference

from llm2vec_mini import ConfigError, LlamaConfig, LlamaForCausalLM
from llm2vec_mini.mntp import IGNORE, MNTPCollator, group_texts, mntp_loss, mntp_loss_full

transformers = Reference("transformers")


def test_group_texts_concatenates_and_drops_the_tail():
    blocks = group_texts([[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]], block_size=4)
    assert blocks.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    with pytest.raises(ConfigError, match="fewer than one block"):
        group_texts([[1, 2]], block_size=4)


def test_collator_statistics_over_many_draws():
    vocab, special, mask_id = 1000, [0, 1, 2], 7
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (400, 128), generator=gen)
    ids[:, 0] = 1  # bos at every block start
    ids[::3, 64] = 2  # some eos
    collate = MNTPCollator(mask_id=mask_id, vocab_size=vocab, special_ids=special, mask_ratio=0.2)
    inputs, labels = collate(ids, generator=gen)
    chosen = labels != IGNORE
    is_special = torch.isin(ids, torch.tensor(special))
    assert not (chosen & is_special).any()  # never a special token
    assert torch.equal(labels[chosen], ids[chosen])  # labels are the originals
    assert torch.equal(inputs[~chosen], ids[~chosen])  # unchosen positions untouched
    n = int(chosen.sum())
    frac = n / int((~is_special).sum())
    assert abs(frac - 0.2) < 0.005
    masked = float((inputs[chosen] == mask_id).float().mean())
    kept = float((inputs[chosen] == ids[chosen]).float().mean())
    randomised = 1 - masked - kept
    assert abs(masked - 0.8) < 0.01 and abs(kept - 0.1) < 0.01 and abs(randomised - 0.1) < 0.01


def test_all_mask_replaces_every_chosen_token():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(10, 500, (50, 64), generator=gen)
    inputs, labels = MNTPCollator(mask_id=3, vocab_size=500, all_mask=True)(ids, generator=gen)
    chosen = labels != IGNORE
    assert (inputs[chosen] == 3).all() and torch.equal(inputs[~chosen], ids[~chosen])


def test_mask_ratio_is_checked():
    with pytest.raises(ConfigError, match="mask_ratio"):
        MNTPCollator(mask_id=3, vocab_size=10, mask_ratio=1.5)


def tiny_pair(seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig.tiny()
    hc = transformers.LlamaConfig(**cfg.to_hf_config())
    hc._attn_implementation = "eager"
    ref = transformers.LlamaForCausalLM(hc).eval()
    ours = LlamaForCausalLM(cfg).eval()
    ours.load_state_dict(ref.state_dict())
    return cfg, ref, ours


@pytest.mark.parametrize("causal", [True, False])
def test_loss_equals_transformers_shifted_lm_loss(causal):
    cfg, ref, ours = tiny_pair(seed=2)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, cfg.vocab_size, (4, 32), generator=gen)
    inputs, labels = MNTPCollator(mask_id=5, vocab_size=cfg.vocab_size, special_ids=[0, 1, 2])(ids, gen)
    ours.set_causal(causal)
    kwargs = {}
    if not causal:  # transformers' model made bidirectional with an explicit all-visible mask
        kwargs["attention_mask"] = torch.zeros(4, 1, 32, 32)
    with torch.no_grad():
        expected = ref(input_ids=inputs, labels=labels, **kwargs).loss  # shifts labels inside
        got = mntp_loss(ours.model(inputs), labels, ours.lm_head)
    assert abs(float(got) - float(expected)) <= 1e-5


def test_selective_projection_equals_full_projection_value_and_gradient():
    _, _, ours = tiny_pair(seed=4)
    ours.set_causal(False).train()
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 256, (3, 24), generator=gen)
    inputs, labels = MNTPCollator(mask_id=5, vocab_size=256, special_ids=[0, 1, 2])(ids, gen)
    losses, grads = [], []
    for selective in (True, False):
        ours.zero_grad()
        hidden = ours.model(inputs)
        loss = mntp_loss(hidden, labels, ours.lm_head) if selective else mntp_loss_full(
            ours.lm_head(hidden), labels)
        loss.backward()
        losses.append(loss.item())
        grads.append(ours.model.layers[0].self_attn.q_proj.weight.grad.clone())
    assert abs(losses[0] - losses[1]) <= 1e-6
    torch.testing.assert_close(grads[0], grads[1], atol=1e-7, rtol=1e-5)


def test_a_batch_with_nothing_masked_gives_zero_loss():
    _, _, ours = tiny_pair(seed=6)
    ids = torch.randint(3, 256, (2, 8))
    loss = mntp_loss(ours.model(ids), torch.full_like(ids, IGNORE), ours.lm_head)
    assert loss.item() == 0.0 and loss.requires_grad


# -------------------------------------------------------------------------------------------------
# unfreeze_lm_head: the official MNTP run trains lm_head too

def test_unfreeze_lm_head_trains_the_head_but_refuses_a_tied_one(tmp_path):
    from llm2vec_mini.convert.safetensors import load_file
    from llm2vec_mini.lora import add_lora
    from llm2vec_mini.mntp import MNTPTask, unfreeze_lm_head
    from llm2vec_mini.train import TrainConfig, train
    torch.manual_seed(0)
    model = add_lora(LlamaForCausalLM(LlamaConfig.tiny()).set_causal(False), r=4, alpha=8)
    unfreeze_lm_head(model)
    head = model.lm_head.weight.detach().clone()
    embed = model.model.embed_tokens.weight.detach().clone()
    blocks = torch.randint(3, 256, (8, 16), generator=torch.Generator().manual_seed(1))
    task = MNTPTask(model, blocks, MNTPCollator(mask_id=5, vocab_size=256, special_ids=[1, 2]))
    train(task, TrainConfig(steps=2, batch_size=4, lr=1e-2, progress=False), tmp_path)
    assert (model.lm_head.weight - head).abs().max() > 1e-3  # trained
    assert torch.equal(model.model.embed_tokens.weight, embed)  # the rest stays frozen
    assert all(".lora_" in k for k in load_file(tmp_path / "adapter_model.safetensors"))  # not saved
    tied = LlamaForCausalLM(LlamaConfig.tiny(tie_word_embeddings=True))
    with pytest.raises(ConfigError, match="tied"):
        unfreeze_lm_head(tied)
