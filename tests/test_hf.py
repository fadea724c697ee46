"""Hugging Face directories loaded by our converter give transformers' logits; bad ones fail clearly."""

import json

import pytest
import torch
from conftest import Reference

from llm2vec_mini.convert import hf
from llm2vec_mini.convert.hf import find_weights, load_hf_model, read_config
from llm2vec_mini.errors import CheckpointError, ConfigError

transformers = Reference("transformers")
safetensors_torch = Reference("safetensors.torch")


def st_save_file(*args, **kwargs):  # the reference writer
    return safetensors_torch.save_file(*args, **kwargs)

ATOL = RTOL = 1e-5


def tiny_hf_model(kv_heads=2, tied=False, seed=0):
    """A tiny random transformers Llama with every weight (norms included) away from its init."""
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=kv_heads, tie_word_embeddings=tied,
        max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=5000.0)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    return model


def save_bin(model, d, shards=1):
    """A `.bin` checkpoint as older transformers wrote it (torch.save of the state dict), maybe sharded."""
    d.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(d)
    state = model.state_dict()
    if shards == 1:
        torch.save(state, d / "pytorch_model.bin")
        return
    names = list(state)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        fname = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save({n: state[n] for n in part}, d / fname)
        weight_map.update({n: fname for n in part})
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def save_dir(model, d, layout):
    if layout == "safetensors":
        model.save_pretrained(d)
    elif layout == "sharded_safetensors":
        model.save_pretrained(d, max_shard_size="40KB")
    elif layout == "bin":
        save_bin(model, d)
    elif layout == "sharded_bin":
        save_bin(model, d, shards=3)
    return d


def write_tokenizer(d):
    """A small word-level tokenizer.json (+ tokenizer_config.json) built with the tokenizers library."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    words = ["<unk>", "<s>", "</s>", "hello", "world", "the", "cat", "sat"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "add_eos_token": False}))
    return tok


def input_ids(vocab=96):
    return torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("layout", ["safetensors", "sharded_safetensors", "bin", "sharded_bin"])
@pytest.mark.parametrize("kv_heads,tied", [(2, False), (4, True)], ids=["gqa_untied", "mha_tied"])
def test_logits_match_transformers(tmp_path, layout, kv_heads, tied):
    ref = tiny_hf_model(kv_heads, tied)
    d = save_dir(ref, tmp_path / "m", layout)
    weights, shards = find_weights(d)
    assert weights.name.startswith("model.safetensors" if "safetensors" in layout else "pytorch_model.bin")
    assert (len(shards) > 1) == layout.startswith("sharded")

    ours = load_hf_model(d)
    assert not ours.training
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in ours.parameters())
    assert ours.model.inv_freq.device.type == "cpu"
    if tied:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ref_state = ref.state_dict()
    for name, p in ours.state_dict().items():
        torch.testing.assert_close(p, ref_state[name], rtol=0, atol=0, msg=name)

    ids = input_ids()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on one row
    with torch.no_grad():
        for m in (None, mask):
            expected = ref(input_ids=ids, attention_mask=m).logits
            got = ours(ids, attention_mask=m)
            if m is not None:  # transformers' positions count pads; compare the unpadded row only
                expected, got = expected[0], got[0]
            torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)


def test_load_pretrained_returns_model_and_tokenizer(tmp_path):
    ref = tiny_hf_model()
    d = save_dir(ref, tmp_path / "m", "safetensors")
    reference_tok = write_tokenizer(d)
    model, tok = hf.load_pretrained(d)
    text = "the cat sat hello world"
    assert tok.encode(text) == reference_tok.encode(text).ids == [1, 5, 6, 7, 3, 4]
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(input_ids=ids).logits, rtol=RTOL, atol=ATOL)


def test_safetensors_weights_stay_memory_mapped(tmp_path):
    d = save_dir(tiny_hf_model(), tmp_path / "m", "safetensors")
    ours = load_hf_model(d)
    size = (d / "model.safetensors").stat().st_size
    # Each parameter is a view of the file's mapping (one storage the size of the file), not a copy.
    for name, p in ours.named_parameters():
        assert p.untyped_storage().nbytes() == size, name


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_writing_loaded_weights_never_changes_the_files(tmp_path, layout):
    """Weights are private (copy-on-write) maps of the file: merging an adapter in place must not
    corrupt the checkpoint on disk."""
    d = save_dir(tiny_hf_model(), tmp_path / "m", layout)
    files = {p: p.read_bytes() for p in d.iterdir()}
    model = load_hf_model(d)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert {p: p.read_bytes() for p in d.iterdir()} == files
    fresh = load_hf_model(d)
    torch.testing.assert_close(fresh.model.norm.weight + 1.0, model.model.norm.weight, rtol=0, atol=0)


def test_dtype_and_harmless_extras(tmp_path):
    ref = tiny_hf_model()
    d = tmp_path / "m"
    ref.config.save_pretrained(d)
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    state["model.layers.1.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # older transformers saved these
    st_save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    ours = load_hf_model(d, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    for name, p in ours.state_dict().items():
        torch.testing.assert_close(p, state[name].to(torch.bfloat16), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Malformed directories


@pytest.fixture
def good_dir(tmp_path):
    ref = tiny_hf_model()
    d = tmp_path / "m"
    ref.config.save_pretrained(d)
    return d, {k: v.contiguous() for k, v in ref.state_dict().items()}


def test_missing_tensor(good_dir):
    d, state = good_dir
    del state["model.layers.1.mlp.up_proj.weight"]
    st_save_file(state, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*1 tensors missing.*"
                                              r"'model\.layers\.1\.mlp\.up_proj\.weight' \(80, 64\)"):
        load_hf_model(d)


def test_untied_config_needs_lm_head(good_dir):
    d, state = good_dir
    del state["lm_head.weight"]
    st_save_file(state, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*missing.*'lm_head.weight'"):
        load_hf_model(d)


def test_tied_config_checks_a_stored_lm_head(good_dir):
    d, state = good_dir
    cfg = json.loads((d / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (d / "config.json").write_text(json.dumps(cfg))
    st_save_file(state, str(d / "model.safetensors"))  # a full-size copy of the head: skipped
    ours = load_hf_model(d)
    assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()
    state["lm_head.weight"] = state["lm_head.weight"][:, :32].contiguous()  # a head of the wrong shape
    st_save_file(state, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'lm_head\.weight': "
                                              r"expected shape \(\d+, 64\).*found \(\d+, 32\)"):
        load_hf_model(d)


def test_unexpected_tensor(good_dir):
    d, state = good_dir
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    st_save_file(state, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor "
                                              r"'model\.layers\.0\.self_attn\.q_proj\.bias'"):
        load_hf_model(d)


def test_wrong_shape_against_config(good_dir):
    d, state = good_dir
    torch.save(state, d / "pytorch_model.bin")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 72
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: tensor "
                                              r"'model\.layers\.0\.mlp\.gate_proj\.weight': "
                                              r"expected shape \(72, 64\).*found \(80, 64\)"):
        load_hf_model(d)


def test_missing_config_and_missing_weights(good_dir, tmp_path):
    d, state = good_dir
    with pytest.raises(CheckpointError, match=r"m: no weights found"):
        load_hf_model(d)
    st_save_file(state, str(d / "model.safetensors"))
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: file not found"):
        load_hf_model(d)
    with pytest.raises(CheckpointError, match="neither"):
        hf.load_pretrained(tmp_path / "does-not-exist")


def test_unsupported_config_names_the_file(good_dir):
    d, _ = good_dir
    cfg = json.loads((d / "config.json").read_text())
    cfg["hidden_act"] = "gelu"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config\.json: hidden_act"):
        read_config(d)


@pytest.mark.parametrize("index,match", [
    ("{not json", "not a valid JSON"),
    ('["a list"]', "weight_map"),
    ('{"weight_map": {}}', "weight_map"),
    ('{"weight_map": {"model.norm.weight": "../outside.safetensors"}}', "invalid shard file name"),
    ('{"weight_map": {"model.norm.weight": "gone.safetensors"}}', "'gone.safetensors' does not exist"),
    ('{"weight_map": {"model.norm.weight": "%s"}}' % ("x" * 5000), "does not exist"),  # too long to look up
])
def test_bad_index(good_dir, index, match):
    d, _ = good_dir
    (d / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match=match) as err:
        load_hf_model(d)
    assert "model.safetensors.index.json" in str(err.value)


def test_index_that_lies_about_a_shard(tmp_path):
    d = save_dir(tiny_hf_model(), tmp_path / "m", "sharded_safetensors")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    first, second = sorted(set(index["weight_map"].values()))[:2]
    moved = next(n for n, s in index["weight_map"].items() if s == second)
    index["weight_map"][moved] = first
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"does not hold.*{moved}"):
        load_hf_model(d)


def test_tensor_stored_twice(tmp_path):
    d = tmp_path / "m"
    save_bin(tiny_hf_model(), d, shards=2)
    first, second = (d / f"pytorch_model-0000{i}-of-00002.bin" for i in (1, 2))
    state1, state2 = torch.load(first), torch.load(second)
    name = next(iter(state2))
    state1[name] = state2[name]  # the index says shard 2; shard 1 holds a second copy
    torch.save(state1, first)
    with pytest.raises(CheckpointError, match=f"'{name}' is stored twice"):
        load_hf_model(d)


def test_gguf_paths_are_delegated(tmp_path, monkeypatch):
    """A `.gguf` file goes to convert.gguf.load_gguf with the dtype; nothing else reads it."""
    from llm2vec_mini import LlamaConfig, LlamaForCausalLM

    calls = []
    sentinel_tokenizer = object()

    def fake_load_gguf(path, dtype=torch.float32):
        calls.append((str(path), dtype))
        return LlamaForCausalLM(LlamaConfig.tiny()).to(dtype), sentinel_tokenizer

    monkeypatch.setattr(hf, "load_gguf", fake_load_gguf)
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    model, tok = hf.load_pretrained(path, dtype=torch.bfloat16)
    assert calls == [(str(path), torch.bfloat16)]
    assert tok is sentinel_tokenizer and model.lm_head.weight.dtype == torch.bfloat16


# -------------------------------------------------------------------------------------------------
# Issue 16: the config is checked against the file's tensors before anything is built


@pytest.mark.parametrize("changes, match", [
    ({"num_hidden_layers": 100_000}, r"config\.json says the model has 100000 layers, but the file holds "
                                     r"tensors for 2"),
    ({"intermediate_size": 2**30}, r"'model\.layers\.0\.mlp\.down_proj\.weight': expected shape "
                                   r"\(64, 1073741824\), found \(64, 80\)"),
    ({"hidden_size": 2**30, "head_dim": 16}, r"'lm_head\.weight': expected shape \(96, 1073741824\)"),
])
def test_sizes_the_file_does_not_hold_are_refused_before_the_model_is_built(good_dir, monkeypatch, changes,
                                                                            match):
    d, state = good_dir
    st_save_file(state, str(d / "model.safetensors"))
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **changes}))
    built = []
    monkeypatch.setattr(hf, "LlamaForCausalLM", lambda config: built.append(config))
    with pytest.raises(CheckpointError, match=match) as err:
        load_hf_model(d)
    assert str(d / "model.safetensors") in str(err.value) and not built  # nothing was built


def test_a_bin_view_claiming_more_bytes_than_its_storage_is_refused(good_dir):
    """A pickled tensor may view its storage with a stride of 0: lm_head (96, 64) made of one float.
    Its shape is right, but the file holds 4 bytes for its 24 KB; cast to another dtype, or at
    vocab_size 2^20, such views would allocate what the file never held."""
    d, state = good_dir
    state["lm_head.weight"] = torch.zeros(1).expand(96, 64)
    torch.save(state, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: the tensors claim \d+ bytes, but the "
                                              r"file holds \d+ bytes"):
        load_hf_model(d)


def test_a_tokenizer_with_more_ids_than_the_model_is_refused_at_load(tmp_path):
    """Issue 16, class 5: it loaded, and encode() died later with an IndexError in the embedding."""
    d = save_dir(tiny_hf_model(), tmp_path / "m", "safetensors")
    tok = write_tokenizer(d)
    tok.add_special_tokens(["<extra>"])  # id 8, fine: the model has 96 rows
    tok.add_tokens([f"w{i}" for i in range(100)])  # ids up to 108: no rows for them
    tok.save(str(d / "tokenizer.json"))
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: the tokenizer has ids up to 108 .* 96 rows"):
        hf.load_pretrained(d)


def test_adapter_folders_naming_themselves_or_each_other_as_base_are_refused(tmp_path):
    """Issue 16, class 8: these recursed until RecursionError."""
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, base in ((a, a), (b, tmp_path / "c"), (tmp_path / "c", b)):
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA",
                                                                "base_model_name_or_path": str(base)}))
    with pytest.raises(CheckpointError, match=r"name each other as their base model: .*a -> .*a"):
        hf.load_pretrained(a)
    with pytest.raises(CheckpointError, match=r"name each other as their base model: .*b -> .*c -> .*b"):
        hf.load_pretrained(b)


@pytest.mark.parametrize("device", ["tpu9", "cuda:99", 3.5])
def test_a_device_torch_or_this_machine_lacks_is_a_config_error(tmp_path, device):
    d = save_dir(tiny_hf_model(), tmp_path / "m", "safetensors")
    with pytest.raises(ConfigError, match="device"):
        hf.load_pretrained(d, device=device)


def test_an_adapter_naming_a_file_that_is_no_model_as_base_is_refused_naming_the_adapter(tmp_path):
    """A fuzz find: base_model_name_or_path "../../etc/passwd" exists, and the error named only it."""
    a = tmp_path / "a"
    a.mkdir()
    (tmp_path / "notes.txt").write_text("not a model")
    config = {"peft_type": "LORA", "base_model_name_or_path": str(tmp_path / "notes.txt")}
    (a / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"/a: this adapter folder names its base model as .*notes"):
        hf.load_pretrained(a)
