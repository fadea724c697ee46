"""PEFT LoRA adapters merged by us give the logits of peft's own merge_and_unload()."""

import copy
import json

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file as st_load  # noqa: E402
from safetensors.torch import save_file as st_save  # noqa: E402
from test_hf import input_ids, tiny_hf_model, write_tokenizer  # noqa: E402

from llm2vec_mini.convert.hf import load_hf_model, load_pretrained  # noqa: E402
from llm2vec_mini.convert.peft import merge_adapter, module_scale, read_adapter  # noqa: E402
from llm2vec_mini.errors import CheckpointError  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOL = dict(rtol=1e-5, atol=1e-5)


def peft_adapter(base, out_dir, seed, **lora_kwargs):
    """Wrap a copy of `base` with a peft LoRA whose B is random (not the zero init), save it, and
    return peft's merged model (merge_and_unload) as the reference."""
    kwargs = dict(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0)
    kwargs.update(lora_kwargs)
    wrapped = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.2)
    wrapped.save_pretrained(out_dir)
    return wrapped.merge_and_unload().eval()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny transformers Llama saved as a HF directory with a tokenizer."""
    d = tmp_path_factory.mktemp("base")
    model = tiny_hf_model(kv_heads=2)
    model.save_pretrained(d)
    write_tokenizer(d)
    return model, d


def test_keys_peft_writes(base, tmp_path):
    """The two key layouts we accept, as peft writes them for a CausalLM and for a bare LlamaModel."""
    model, _ = base
    peft_adapter(model, tmp_path / "lm", 0, target_modules=["q_proj"])
    peft_adapter(model.model, tmp_path / "bare", 0, target_modules=["q_proj"])
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in \
        st_load(str(tmp_path / "lm" / "adapter_model.safetensors"))
    assert "base_model.model.layers.0.self_attn.q_proj.lora_A.weight" in \
        st_load(str(tmp_path / "bare" / "adapter_model.safetensors"))
    for d in ("lm", "bare"):
        _, weights = read_adapter(tmp_path / d)
        assert sorted(weights) == ["layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj"]


def test_one_adapter_matches_merge_and_unload(base, tmp_path):
    model, d = base
    ref = peft_adapter(model, tmp_path / "a1", seed=1)
    ours = merge_adapter(load_hf_model(d), tmp_path / "a1")
    ids = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(input_ids=ids).logits, **TOL)
        base_logits = model(input_ids=ids).logits
    assert (ours(ids) - base_logits).abs().max() > 1e-2, "the adapter should change the logits"


def test_two_adapters_in_sequence_like_llm2vec(base, tmp_path):
    """MNTP adapter on a CausalLM base, merged; then a SimCSE-style adapter saved on the merged *bare
    LlamaModel* (as llm2vec does), with rsLoRA and per-module rank/alpha, merged on top."""
    model, d = base
    merged1 = peft_adapter(model, tmp_path / "mntp", seed=2)
    merged2 = peft_adapter(merged1.model, tmp_path / "simcse", seed=3, r=6, lora_alpha=12,
                           use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
                           rank_pattern={"layers.1.self_attn.q_proj": 2},
                           alpha_pattern={"down_proj": 3.0})
    config, weights = read_adapter(tmp_path / "simcse")
    assert weights["layers.1.self_attn.q_proj"][0].shape == (2, 64)
    assert module_scale(config, "layers.0.self_attn.q_proj") == pytest.approx(12 / 6 ** 0.5)
    assert module_scale(config, "layers.1.self_attn.q_proj") == pytest.approx(12 / 2 ** 0.5)
    assert module_scale(config, "layers.0.mlp.down_proj") == pytest.approx(3 / 6 ** 0.5)

    ours, tok = load_pretrained(d, adapters=[tmp_path / "mntp", tmp_path / "simcse"])
    ids = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(ours.model(ids), merged2(input_ids=ids).last_hidden_state, **TOL)
        merged1.model = merged2  # the head of the first merge over the second merged decoder
        torch.testing.assert_close(ours(ids), merged1(input_ids=ids).logits, **TOL)


def test_bin_adapter_on_a_bare_model(base, tmp_path):
    model, d = base
    ref = peft_adapter(model.model, tmp_path / "a", seed=4, target_modules=["k_proj", "up_proj"])
    adapter = tmp_path / "a"
    torch.save(st_load(str(adapter / "adapter_model.safetensors")), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    ours = merge_adapter(load_hf_model(d).model, adapter)  # a LlamaModel works as the target too
    ids = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(input_ids=ids).last_hidden_state, **TOL)


# ---------------------------------------------------------------------------------------------
# Adapters we must refuse


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    d = tmp_path_factory.mktemp("adapter")
    peft_adapter(base[0], d, seed=5, target_modules=["q_proj", "v_proj"])
    return d


def edited(adapter, tmp_path, config=None, weights=None):
    """A copy of `adapter` with its config updated by `config` and its tensors by `weights(dict)`."""
    out = tmp_path / "edited"
    out.mkdir()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg.update(config or {})
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    tensors = st_load(str(adapter / "adapter_model.safetensors"))
    if weights:
        weights(tensors)
    st_save(tensors, str(out / "adapter_model.safetensors"))
    return out


KEY = "base_model.model.model.layers.1.self_attn.q_proj.lora_{}.weight"


@pytest.mark.parametrize("config,weights,match", [
    ({"r": 8}, None, r"'layers.0.self_attn.q_proj': rank mismatch: the config says r=8"),
    ({"rank_pattern": {"v_proj": 2}}, None, "'layers.0.self_attn.v_proj': rank mismatch"),
    ({"use_dora": True}, None, "use_dora: DoRA"),
    ({"bias": "all"}, None, "bias: only 'none'"),
    ({"fan_in_fan_out": True}, None, "fan_in_fan_out"),
    ({"peft_type": "IA3"}, None, "peft_type: only 'LORA'"),
    ({"modules_to_save": ["lm_head"]}, None, "modules_to_save"),
    ({"target_modules": ["q_proj"]}, None, "'layers.0.self_attn.v_proj'.*not in target_modules"),
    (None, lambda t: t.pop(KEY.format("B")), r"'layers.1.self_attn.q_proj' has lora_A but no lora_B"),
    (None, lambda t: t.update({KEY.format("A").replace("lora_A", "lora_magnitude_vector"): torch.ones(64)}),
     "unexpected key.*lora_magnitude_vector"),
    (None, lambda t: t.update({"base_model.model.lm_head.lora_A.weight": torch.ones(4, 64),
                               "base_model.model.lm_head.lora_B.weight": torch.ones(96, 4)}),
     "LoRA on 'lm_head' is not supported"),
])
def test_bad_adapters_are_refused(adapter, tmp_path, config, weights, match):
    with pytest.raises(CheckpointError, match=match) as err:
        read_adapter(edited(adapter, tmp_path, config, weights))
    assert "edited" in str(err.value)


def test_merge_checks_the_model_before_touching_it(base, adapter, tmp_path):
    model = load_hf_model(base[1])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # Both halves of one targeted module gone: every other module is fine, but this one is missing.
    missing = edited(adapter, tmp_path,
                     weights=lambda t: (t.pop(KEY.format("A")), t.pop(KEY.format("B"))))
    with pytest.raises(CheckpointError,
                       match="1 targeted modules have no LoRA weights.*layers.1.self_attn.q_proj"):
        merge_adapter(model, missing)
    narrow = tmp_path / "narrow"  # an adapter for a narrower model: its shapes do not fit this one
    narrow_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2))
    peft_adapter(narrow_model, narrow, seed=0, target_modules=["q_proj"])
    with pytest.raises(CheckpointError, match=r"lora_B @ lora_A is \(32, 32\) but the weight is \(64, 64\)"):
        merge_adapter(model, narrow)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a failed merge"


def test_missing_files(tmp_path, adapter):
    with pytest.raises(CheckpointError, match="adapter directory not found"):
        read_adapter(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"adapter_config\.json: file not found"):
        read_adapter(empty)
    (empty / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    with pytest.raises(CheckpointError, match="no adapter weights"):
        read_adapter(empty)


@pytest.mark.parametrize("config, match", [
    ({"target_modules": "(q_proj+)+$"}, "repeats a repeated group"),  # exponential backtracking
    ({"target_modules": r"(\w+\.?)*x"}, "repeats a repeated group"),
    ({"target_modules": ".*.*.*.*.*q"}, "5 unbounded repeats"),
    ({"rank_pattern": {"(a|aa)*b": 4}}, "repeats an alternation"),
    ({"target_modules": "("}, "not a valid regex"),
    ({"lora_alpha": float("inf")}, "lora_alpha"),
    ({"alpha_pattern": {"q_proj": float("inf")}}, "alpha_pattern"),
])
def test_patterns_that_could_hang_the_matcher_are_refused(adapter, tmp_path, config, match):
    """A hostile adapter_config.json must not hang the loader: Python's regex engine backtracks."""
    with pytest.raises(CheckpointError, match=match) as err:
        read_adapter(edited(adapter, tmp_path, config))
    assert "adapter_config.json" in str(err.value)


def test_the_patterns_peft_writes_are_accepted(adapter, tmp_path):
    config, _ = read_adapter(edited(adapter, tmp_path, {
        "target_modules": r".*decoder.*(self_attn|mlp)\.(q_proj|v_proj|up_proj)$|.*(q|k|v|o)_proj",
        "rank_pattern": {"model.layers.0.self_attn.q_proj": 4}}))
    assert config["rank_pattern"] == {"model.layers.0.self_attn.q_proj": 4}
