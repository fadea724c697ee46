"""LlamaConfig: both config.json layouts, presets, and typed errors for inconsistent values."""

import pytest
from conftest import Reference

from llm2vec_mini import ConfigError, LlamaConfig

transformers = Reference("transformers")

CLASSIC = {  # the layout transformers 4.x writes (Sheared-LLaMA has no rope_theta at all)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5504, "num_hidden_layers": 24,
    "num_attention_heads": 16, "num_key_value_heads": 16, "rms_norm_eps": 1e-5,
    "max_position_embeddings": 4096, "tie_word_embeddings": False, "rope_scaling": None,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
}


def test_classic_layout_missing_rope_theta_means_10000():
    cfg = LlamaConfig.from_hf_config(CLASSIC)
    assert cfg.rope_theta == 10000.0
    assert cfg.head_dim == 128 and cfg.num_key_value_heads == 16
    assert cfg == LlamaConfig.sheared_llama_1_3b()


def test_transformers5_layout_with_llama3_scaling_round_trips_through_transformers():
    # transformers 5 writes rope_parameters; read what it writes, not what we think it writes.
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    hf = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  rope_theta=500000.0, rope_scaling=dict(scaling)).to_dict()
    assert "rope_parameters" in hf
    cfg = LlamaConfig.from_hf_config(hf)
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == scaling
    # and our classic output is read back by transformers to the same numbers
    back = transformers.LlamaConfig(**cfg.to_hf_config())
    assert back.rope_parameters["rope_theta"] == 500000.0
    assert back.rope_parameters["rope_type"] == "llama3"
    assert back.rope_parameters["factor"] == 8.0


def test_default_rope_parameters_mean_no_scaling():
    hf = dict(CLASSIC, rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
    cfg = LlamaConfig.from_hf_config(hf)
    assert cfg.rope_scaling is None and cfg.rope_theta == 100000.0


def test_smollm2_preset_matches_its_published_shape():
    cfg = LlamaConfig.smollm2_135m()
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim, cfg.tie_word_embeddings) == (576, 30, 9, 3, 64, True)


@pytest.mark.parametrize("field, value", [
    ("hidden_size", 0), ("intermediate_size", -1), ("num_hidden_layers", 0), ("vocab_size", 0),
    ("num_attention_heads", 0), ("num_key_value_heads", -2),
])
def test_non_positive_sizes_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        LlamaConfig.tiny(**{field: value})


def test_hidden_not_divisible_by_heads():
    with pytest.raises(ConfigError, match="hidden_size"):
        LlamaConfig.tiny(hidden_size=66, num_attention_heads=4)


def test_heads_not_divisible_by_kv_heads():
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        LlamaConfig.tiny(num_attention_heads=4, num_key_value_heads=3)


@pytest.mark.parametrize("bad, field", [
    ({"model_type": "gpt2"}, "model_type"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_type"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_size": "2048"}, "hidden_size"),
    ({"rms_norm_eps": None}, "rms_norm_eps"),
    ({"rope_theta": "10000"}, "rope_theta"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": None}}, "rope_theta"),
    ({"attention_dropout": "0.1"}, "attention_dropout"),
    ({"tie_word_embeddings": "no"}, "tie_word_embeddings"),
])
def test_unsupported_hf_configs_name_the_field(bad, field):
    with pytest.raises(ConfigError, match=field):
        LlamaConfig.from_hf_config(dict(CLASSIC, **bad))


def test_missing_required_field():
    hf = dict(CLASSIC)
    del hf["num_hidden_layers"]
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        LlamaConfig.from_hf_config(hf)


@pytest.mark.parametrize("field", ["bos_token_id", "eos_token_id", "pad_token_id"])
def test_token_ids_that_are_booleans_are_refused(field):
    """Issue 16, class 10: `"bos_token_id": true` was taken as id 1 (in Python, True == 1)."""
    with pytest.raises(ConfigError, match=field):
        LlamaConfig.from_hf_config(dict(CLASSIC, **{field: True}))
    with pytest.raises(ConfigError, match=field):
        LlamaConfig.from_hf_config(dict(CLASSIC, **{field: [True]}))


@pytest.mark.parametrize("field, value", [
    ("vocab_size", 2**62), ("vocab_size", 2**64), ("hidden_size", 2**40), ("num_hidden_layers", 2**31),
    ("max_position_embeddings", 2**63), ("head_dim", 2**40),
])
def test_sizes_no_model_has_are_refused_before_torch_sees_them(field, value):
    """vocab_size 2^62 or 2^64 overflowed inside torch; nothing real comes near 2^31."""
    with pytest.raises(ConfigError, match=field):
        LlamaConfig.from_hf_config(dict(CLASSIC, **{field: value}))
