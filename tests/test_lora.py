"""LoRA: our layout against peft's, both ways, and merge/unmerge against W + scale·B·A by hand."""

import json

import pytest
import torch
from conftest import Reference

from llm2vec_mini import ConfigError, LlamaConfig, LlamaForCausalLM
from llm2vec_mini.convert.peft import load_adapter, save_adapter
from llm2vec_mini.lora import (
    LLM2VEC_TARGETS,
    LoRALinear,
    add_lora,
    lora_layers,
    merge_and_unload,
    merge_lora,
    unmerge_lora,
)

peft = Reference("peft")
transformers = Reference("transformers")


def tiny_pair(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig.tiny()
    hc = transformers.LlamaConfig(**cfg.to_hf_config())
    hc._attn_implementation = "eager"
    ref = transformers.LlamaForCausalLM(hc).eval()
    ours = LlamaForCausalLM(cfg).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def randomise_lora(model, seed):
    torch.manual_seed(seed)
    for m in lora_layers(model).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.1)
        torch.nn.init.normal_(m.lora_A.weight, std=0.1)


def test_fresh_adapter_changes_nothing_and_only_lora_trains():
    _, ours = tiny_pair()
    ids = torch.randint(3, 256, (2, 7))
    before = ours(ids)
    add_lora(ours, r=4, alpha=8)
    torch.testing.assert_close(ours(ids), before, atol=0, rtol=0)  # B = 0
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * len(LLM2VEC_TARGETS) * 2  # A and B, 7 projections, 2 layers
    assert not any("lm_head" in n or "embed" in n for n in trainable)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_merge_equals_w_plus_scaled_ba_and_unmerge_restores_w(use_rslora):
    _, ours = tiny_pair()
    add_lora(ours, r=4, alpha=12, dropout=0.0, use_rslora=use_rslora)
    randomise_lora(ours, 1)
    layer = ours.model.layers[1].mlp.down_proj
    w0 = layer.weight.detach().clone()
    scale = 12 / (4 ** 0.5 if use_rslora else 4)
    expected = w0 + scale * layer.lora_B.weight.detach() @ layer.lora_A.weight.detach()
    ids = torch.randint(3, 256, (2, 7))
    unmerged_out = ours(ids)
    merge_lora(ours)
    torch.testing.assert_close(layer.weight.detach(), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours(ids), unmerged_out, atol=1e-5, rtol=1e-5)  # same function
    unmerge_lora(ours)
    torch.testing.assert_close(layer.weight.detach(), w0, atol=1e-6, rtol=0)


def test_our_adapter_loads_in_peft_with_the_same_outputs(tmp_path):
    ref, ours = tiny_pair(seed=2)
    add_lora(ours, r=4, alpha=8, dropout=0.0)
    randomise_lora(ours, 3)
    save_adapter(ours, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and sorted(cfg["target_modules"]) == sorted(LLM2VEC_TARGETS)
    # llm2vec saves adapters on the bare LlamaModel: load ours the same way
    base = transformers.LlamaModel.from_pretrained(None, config=ref.config, state_dict={
        k[len("model."):]: v for k, v in ref.state_dict().items() if k.startswith("model.")}).eval()
    with_adapter = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ids = torch.randint(3, 256, (2, 9))
    with torch.no_grad():
        expected = with_adapter(input_ids=ids).last_hidden_state
        got = ours.model(ids)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_peft_adapter_loads_in_ours_unmerged_with_the_same_outputs(tmp_path):
    ref, ours = tiny_pair(seed=4)
    config = peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj",
                                                                                    "up_proj"])
    wrapped = peft.get_peft_model(ref, config)
    torch.manual_seed(5)
    for name, p in wrapped.named_parameters():
        if "lora_" in name:
            torch.nn.init.normal_(p, std=0.1)
    wrapped.save_pretrained(tmp_path / "peft")
    load_adapter(ours, tmp_path / "peft")
    assert {n.rsplit(".", 1)[-1] for n in lora_layers(ours)} == {"q_proj", "v_proj", "up_proj"}
    ids = torch.randint(3, 256, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), wrapped.eval()(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_load_adapter_honours_rank_and_alpha_patterns(tmp_path):
    """Per-module r and alpha (PEFT's rank_pattern / alpha_pattern) give each layer its own shape and
    scale; the logits equal peft's, unmerged."""
    ref, ours = tiny_pair(seed=8)
    config = peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0,
                             target_modules=["q_proj", "v_proj", "down_proj"],
                             rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"down_proj": 3.0})
    wrapped = peft.get_peft_model(ref, config)
    torch.manual_seed(9)
    for name, p in wrapped.named_parameters():
        if "lora_" in name:
            torch.nn.init.normal_(p, std=0.1)
    wrapped.save_pretrained(tmp_path / "peft")
    load_adapter(ours, tmp_path / "peft")
    layers = lora_layers(ours)
    assert (layers["layers.1.self_attn.q_proj"].r, layers["layers.0.self_attn.q_proj"].r) == (2, 4)
    assert layers["layers.0.mlp.down_proj"].scaling == 3.0 / 4  # alpha_pattern's alpha over r
    assert layers["layers.0.self_attn.v_proj"].scaling == 16 / 4
    ids = torch.randint(3, 256, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), wrapped.eval()(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_no_base_weight_is_allocated_or_initialised_twice(monkeypatch):
    """A LoRA layer shares its base weight, and merge_and_unload hands the merged weight back: neither
    draws a throw-away (out, in) matrix (1.2 billion random numbers for Sheared-LLaMA)."""
    _, ours = tiny_pair()
    base_shapes = {tuple(p.shape) for n, p in ours.named_parameters() if n.endswith("proj.weight")}
    initialised = []
    real = torch.nn.init.kaiming_uniform_

    def record(tensor, *args, **kwargs):
        if tensor.device.type != "meta":
            initialised.append(tuple(tensor.shape))
        return real(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", record)
    weights = [p for n, p in ours.named_parameters() if n.endswith("proj.weight")]
    add_lora(ours, r=2, alpha=4)
    assert initialised and not base_shapes & set(initialised)  # only the (r, in) lora_A matrices
    assert all(any(w is p for p in ours.parameters()) for w in weights)  # the same tensors, shared
    initialised.clear()
    merge_and_unload(ours)
    assert not initialised
    after = [p for n, p in ours.named_parameters() if n.endswith("proj.weight")]
    assert len(after) == len(weights) and all(a is w for a, w in zip(after, weights))


def test_merge_and_unload_leaves_plain_linears_with_the_merged_function():
    _, ours = tiny_pair(seed=6)
    add_lora(ours, r=2, alpha=4, dropout=0.0)
    randomise_lora(ours, 7)
    ids = torch.randint(3, 256, (1, 6))
    before = ours(ids)
    merge_and_unload(ours)
    assert not lora_layers(ours)
    assert all(type(m) is torch.nn.Linear for m in ours.model.layers[0].mlp.children()
               if isinstance(m, torch.nn.Linear))
    torch.testing.assert_close(ours(ids), before, atol=1e-5, rtol=1e-5)
    add_lora(ours, r=2, alpha=4)  # a second adapter can go on top
    assert len(lora_layers(ours)) == 14


def test_bad_lora_settings_are_config_errors():
    _, ours = tiny_pair()
    with pytest.raises(ConfigError, match="lm_head"):
        add_lora(ours, targets=["lm_head"])
    with pytest.raises(ConfigError, match="r must be"):
        LoRALinear(torch.zeros(4, 4), r=0, alpha=1)
    with pytest.raises(ConfigError, match="no LoRA layers"):
        save_adapter(LlamaForCausalLM(LlamaConfig.tiny()), "/tmp/never-written")
