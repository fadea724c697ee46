"""convert/checks.py: the shapes a config implies, against a model built from it; the check every
reader runs before building a model, on each of its four rules; the tokenizer against the vocabulary."""

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import models

from llm2vec_mini import LlamaConfig, LlamaForCausalLM
from llm2vec_mini.convert.checks import Stored, check_fits, check_tokenizer, llama_shapes
from llm2vec_mini.errors import CheckpointError
from llm2vec_mini.tokenizer import Tokenizer

CONFIGS = {
    "tiny_gqa": LlamaConfig.tiny(),
    "smollm2_tied": LlamaConfig.smollm2_135m(num_hidden_layers=3),
    "explicit_head_dim": LlamaConfig.tiny(hidden_size=48, num_attention_heads=4, head_dim=16),
    "sheared_shape": LlamaConfig.sheared_llama_1_3b(num_hidden_layers=2),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_llama_shapes_are_the_models_own(name):
    """The arithmetic table against the parameters of the model itself (built on meta: no memory)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(CONFIGS[name])
    assert llama_shapes(CONFIGS[name]) == {k: tuple(v.shape) for k, v in model.state_dict().items()}


def stored_for(config, **changes):
    """{name: Stored} of a file that holds exactly the model's fp32 tensors, with some changed."""
    out = {n: Stored(s, 4 * torch.Size(s).numel(), Path("w.safetensors"))
           for n, s in llama_shapes(config).items()}
    if config.tie_word_embeddings:
        del out["lm_head.weight"]
    out.update(changes)
    return {k: v for k, v in out.items() if v is not None}


def total(stored):
    return sum(s.nbytes for s in stored.values())


def test_a_file_that_fits_passes():
    for config in CONFIGS.values():
        stored = stored_for(config)
        check_fits(config, stored, total(stored), "w.safetensors")


@pytest.mark.parametrize("changes, data_bytes, match", [
    (dict(num_hidden_layers=100_000), None, r"says the model has 100000 layers, but the file holds tensors "
                                            r"for 2"),
    (dict(num_hidden_layers=1), None, r"says the model has 1 layers, but the file holds tensors for 2"),
    (dict(intermediate_size=2**30), None, r"'model\.layers\.0\.mlp\.gate_proj\.weight': expected shape "
                                           r"\(1073741824, 64\), found \(128, 64\)"),
    (dict(vocab_size=2**31 - 1), None, r"'model\.embed_tokens\.weight': expected shape \(2147483647, 64\)"),
    (dict(), -1, r"the tensors claim \d+ bytes, but the file holds \d+ bytes"),
])
def test_a_config_the_file_does_not_justify_is_refused(changes, data_bytes, match):
    stored = stored_for(LlamaConfig.tiny())
    config = LlamaConfig.tiny(**changes)
    with pytest.raises(CheckpointError, match=r"w\.safetensors: .*" + match):
        check_fits(config, stored, total(stored) + (data_bytes or 0), "w.safetensors")


def test_names_missing_unexpected_and_a_tied_head():
    config = LlamaConfig.tiny()
    gone = stored_for(config, **{"model.norm.weight": None, "lm_head.weight": None})
    with pytest.raises(CheckpointError, match=r"2 tensors missing: 'model\.norm\.weight' \(64,\), 'lm_head"):
        check_fits(config, gone, 10**9, "w")
    extra = Stored((64,), 256, Path("w.safetensors"))
    with_bias = stored_for(config, **{"model.layers.0.self_attn.q_proj.bias": extra})
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.q_proj"):
        check_fits(config, with_bias, 10**9, "w")
    tied = LlamaConfig.tiny(tie_word_embeddings=True)
    head = Stored((256, 64), 256 * 64 * 4, Path("w.safetensors"))
    stored = stored_for(tied, **{"lm_head.weight": head})  # a stored copy of a tied head: checked, uncounted
    check_fits(tied, stored, total(stored) - head.nbytes, "w")
    wrong = Stored((256, 32), 256 * 32 * 4, Path("w.safetensors"))
    with pytest.raises(CheckpointError, match=r"'lm_head\.weight': expected shape \(256, 64\), found "
                                              r"\(256, 32\)"):
        check_fits(tied, stored_for(tied, **{"lm_head.weight": wrong}), 10**9, "w")


def test_names_the_file_as_gguf_calls_it():
    config = LlamaConfig.tiny()
    stored = stored_for(config, **{"model.norm.weight": None})
    with pytest.raises(CheckpointError, match=r"1 tensors missing: 'output_norm\.weight'"):
        check_fits(config, stored, 10**9, "m.gguf", file_name=lambda n: "output_norm.weight")


def test_a_tokenizer_may_have_fewer_ids_than_the_vocabulary_never_more():
    vocab = {f"w{i}": i for i in range(10)}
    tok = Tokenizer(RawTokenizer(models.WordLevel(vocab, unk_token="w0")), path="tok.json")
    check_tokenizer(tok, LlamaConfig.tiny(vocab_size=10))
    check_tokenizer(tok, LlamaConfig.tiny(vocab_size=16))  # a padded vocabulary
    with pytest.raises(CheckpointError, match=r"tok\.json: the tokenizer has ids up to 9 \('w9'\).*8 rows"):
        check_tokenizer(tok, LlamaConfig.tiny(vocab_size=8), tok.path)
    sparse = Tokenizer(RawTokenizer(models.WordLevel({"a": 0, "b": 500}, unk_token="a")))  # 2 ids, up to 500
    with pytest.raises(CheckpointError, match="ids up to 500"):
        check_tokenizer(sparse, LlamaConfig.tiny(vocab_size=256))
