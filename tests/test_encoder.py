"""LLM2Vec.encode against a reference built by hand from transformers' model and tokenizer.

The live comparison with the official llm2vec library is in tests/reference/ (its own venv); here the
reference is transformers 5 plus the official rules written out in the test: join instruction and
text with a space, pool the last n positions where n is the text's own token count.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import Reference

from llm2vec_mini.encoder import LLM2Vec
from llm2vec_mini.errors import CheckpointError, ConfigError

transformers = Reference("transformers")

TEXTS = ["A man is playing a guitar.", "Two dogs run on the beach, chasing a red ball!",
         "Hi", "The quick brown fox jumps over the lazy dog near the river bank at dawn.",
         "Stocks fell sharply on Monday.", "", "A woman slices an onion."]
INSTRUCTION = "Retrieve semantically similar text:"
# fp32, which the comparisons to 1e-5 need: the default dtype "auto" computes in bf16 on a CPU with
# bf16 instructions (checked against fp32 in tests/test_precision.py)
FP32 = dict(device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    tok = transformers.AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = transformers.LlamaModel.from_pretrained(tiny_llama_dir, torch_dtype=torch.float32).eval()
    return tok, model


def hand_embedding(reference, instruction, text, mode="mean", bidirectional=True):
    """One sentence, no padding: the official rules applied by hand on transformers' model."""
    tok, model = reference
    full = f"{instruction.strip()} {text}" if instruction else text
    if mode == "eos_token":
        full, text = f"{full.strip()} </s>", f"{text.strip()} </s>" if not instruction else f"{text} </s>"
    ids = tok(full, add_special_tokens=True)["input_ids"]
    n_text = len(tok(text, add_special_tokens=False)["input_ids"])
    T = len(ids)
    kwargs = {"attention_mask": torch.zeros(1, 1, T, T)} if bidirectional else {}
    with torch.no_grad():
        h = model(input_ids=torch.tensor([ids]), **kwargs).last_hidden_state[0]  # (T, H)
    if mode == "mean":
        return (h[T - n_text:] if n_text else h).mean(0)
    if mode == "weighted_mean":
        w = torch.arange(1, n_text + 1, dtype=torch.float32)
        return (h[T - n_text:] * (w / w.sum())[:, None]).sum(0)
    if mode in ("eos_token", "last_token"):
        return h[-1]
    return h[0]  # bos_token


def assert_close_rows(got, expected, tol=1e-5):
    got, expected = torch.as_tensor(got), torch.stack(expected)
    cos = torch.nn.functional.cosine_similarity(got, expected, dim=-1)
    assert (1 - cos).max() <= tol, (1 - cos).max()
    assert (got - expected).abs().max() <= 2e-4 * expected.abs().max()


@pytest.fixture(scope="module")
def encoder(tiny_llama_dir):
    return LLM2Vec.from_pretrained(tiny_llama_dir, **FP32)


@pytest.mark.parametrize("with_instruction", [False, True])
def test_mean_pooling_matches_hand_reference(encoder, reference, with_instruction):
    instruction = INSTRUCTION if with_instruction else ""
    inputs = [[instruction, t] for t in TEXTS] if with_instruction else TEXTS
    got = encoder.encode(inputs, batch_size=3)
    assert got.shape == (len(TEXTS), 64) and got.dtype == np.float32
    assert_close_rows(got, [hand_embedding(reference, instruction, t) for t in TEXTS if True])


@pytest.mark.parametrize("mode", ["weighted_mean", "eos_token", "last_token", "bos_token"])
def test_other_pooling_modes_match_hand_reference(tiny_llama_dir, reference, mode):
    enc = LLM2Vec.from_pretrained(tiny_llama_dir, pooling=mode, **FP32)
    texts = [t for t in TEXTS if t]
    got = enc.encode([[INSTRUCTION, t] for t in texts], batch_size=4)
    assert_close_rows(got, [hand_embedding(reference, INSTRUCTION, t, mode) for t in texts])


def test_causal_mode_matches_hand_reference(tiny_llama_dir, reference):
    enc = LLM2Vec.from_pretrained(tiny_llama_dir, bidirectional=False, **FP32)
    got = enc.encode(TEXTS[:4], batch_size=2)
    assert_close_rows(got, [hand_embedding(reference, "", t, bidirectional=False) for t in TEXTS[:4]])


def test_batch_size_does_not_change_results_and_order_is_kept(encoder):
    one = encoder.encode(TEXTS, batch_size=1)
    seven = encoder.encode(TEXTS, batch_size=7, convert_to="torch")
    assert isinstance(seven, torch.Tensor)
    np.testing.assert_allclose(one, seven.numpy(), atol=1e-5, rtol=1e-5)
    reversed_ = encoder.encode(TEXTS[::-1], batch_size=3)
    np.testing.assert_allclose(reversed_[::-1], one, atol=1e-5, rtol=1e-5)


def test_normalize_gives_unit_vectors(encoder):
    got = encoder.encode(TEXTS[:3], normalize=True)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_empty_list_and_single_string(encoder):
    assert encoder.encode([]).shape == (0, 64)
    assert encoder.encode("one text").shape == (1, 64)


def test_long_text_is_truncated_to_the_limits(tiny_llama_dir, reference):
    enc = LLM2Vec.from_pretrained(tiny_llama_dir, max_length=24, doc_max_length=12, **FP32)
    long_text = " ".join(["word"] * 200 + ["tail"])
    (ids, n_text), = enc.prepare([[INSTRUCTION, long_text]])
    tok = reference[0]
    assert len(ids) <= 24 and n_text <= 12
    # the text was cut at word boundaries to at most 12 tokens, and those are what is pooled
    assert n_text == len(tok(" ".join(["word"] * n_text), add_special_tokens=False)["input_ids"])
    assert np.isfinite(enc.encode([[INSTRUCTION, long_text], "x" * 5000])).all()


@pytest.mark.parametrize("bad, match", [
    ([["only one"]], r"sentences\[0\]"),
    (["fine", 3], r"sentences\[1\]"),
    ([["a", 1]], r"sentences\[0\]"),
    ([("a", "b", "c")], r"sentences\[0\]"),
])
def test_bad_items_name_the_item(encoder, bad, match):
    with pytest.raises(ValueError, match=match):
        encoder.encode(bad)


def test_bad_arguments(tiny_llama_dir, encoder):
    with pytest.raises(ValueError, match="batch_size"):
        encoder.encode(["a"], batch_size=0)
    with pytest.raises(ValueError, match="convert_to"):
        encoder.encode(["a"], convert_to="list")
    with pytest.raises(ValueError, match="pooling"):
        LLM2Vec.from_pretrained(tiny_llama_dir, pooling="max", device="cpu")
    with pytest.raises(ValueError, match="dtype"):
        LLM2Vec.from_pretrained(tiny_llama_dir, dtype="int8", device="cpu")
    enc = LLM2Vec.from_pretrained(tiny_llama_dir, device="cpu")
    enc.tokenizer.add_bos = False  # a vocabulary like SmolLM2's, which adds no BOS token
    with pytest.raises(ValueError, match="bos_token.*BOS"):
        LLM2Vec(enc.model, enc.tokenizer, pooling="bos_token", device="cpu")


def test_save_and_load_back_keep_weights_and_settings(tiny_llama_dir, tmp_path):
    enc = LLM2Vec.from_pretrained(tiny_llama_dir, pooling="weighted_mean", doc_max_length=100,
                                  **FP32)
    before = enc.encode(TEXTS[:3])
    enc.save(tmp_path / "saved")
    back = LLM2Vec.from_pretrained(tmp_path / "saved", **FP32)
    assert back.settings() == enc.settings()
    # llm2vec_config.json holds exactly the official constructor's keyword arguments (llm2vec 0.2.3
    # passes every key to LLM2Vec.__init__, so one more key would break it there)
    official = json.loads((tmp_path / "saved" / "llm2vec_config.json").read_text())
    assert official == {"pooling_mode": "weighted_mean", "max_length": 512, "doc_max_length": 100,
                        "skip_instruction": True}
    np.testing.assert_allclose(back.encode(TEXTS[:3]), before, atol=1e-6, rtol=1e-6)
    # and transformers reads the saved directory as the same model
    ref = transformers.LlamaModel.from_pretrained(tmp_path / "saved").eval()
    ids = torch.tensor([[1, 450, 4996, 17354]])
    with torch.no_grad():
        torch.testing.assert_close(ref(input_ids=ids).last_hidden_state,
                                   back.model.set_causal(True)(ids), atol=1e-5, rtol=1e-5)


def test_saved_settings_keep_causal_attention_and_bad_settings_name_the_file(tiny_llama_dir, tmp_path):
    enc = LLM2Vec.from_pretrained(tiny_llama_dir, bidirectional=False, device="cpu")
    enc.save(tmp_path / "causal")
    back = LLM2Vec.from_pretrained(tmp_path / "causal", device="cpu")
    assert back.bidirectional is False and back.model.causal is True
    assert LLM2Vec.from_pretrained(tmp_path / "causal", bidirectional=True, device="cpu").bidirectional
    (tmp_path / "causal" / "llm2vec_config.json").write_text('{"pooling": "mean"}')
    with pytest.raises(ValueError, match=r"causal/llm2vec_config\.json.*pooling_mode"):
        LLM2Vec.from_pretrained(tmp_path / "causal", device="cpu")


def test_texts_with_no_tokens_left_encode_without_a_bos_token(tiny_llama_dir, reference):
    """SmolLM2's tokenizer adds no BOS: an empty text has no token at all, and the official word-level
    cut leaves nothing of one word longer than doc_max_length. Neither may become NaN."""
    from llm2vec_mini.convert.hf import load_pretrained
    from llm2vec_mini.tokenizer import Tokenizer

    model, tok = load_pretrained(tiny_llama_dir)
    no_bos = Tokenizer(tok.tokenizer, bos_id=None, eos_id=tok.eos_id, add_bos=False)
    enc = LLM2Vec(model, no_bos, doc_max_length=8, **FP32)
    word = "x" * 5000
    got = enc.encode(["", word, "A man is playing a guitar."], batch_size=2)
    assert np.isfinite(got).all()
    ref_tok, ref_model = reference
    with torch.no_grad():  # the empty text: the state of one eos token read alone, whatever its batch
        eos_state = ref_model(input_ids=torch.tensor([[tok.eos_id]])).last_hidden_state[0, 0]
    assert_close_rows(got[:1], [eos_state])
    assert_close_rows(enc.encode([""]), [eos_state])
    ids = ref_tok(word, add_special_tokens=False)["input_ids"][:8]  # the long word: its first 8 tokens
    with torch.no_grad():
        h = ref_model(input_ids=torch.tensor([ids]), attention_mask=torch.zeros(1, 1, 8, 8)).last_hidden_state
    assert_close_rows(got[1:2], [h[0].mean(0)])


def test_one_adapter_as_a_string_reads_its_settings(tiny_llama_dir, tmp_path):
    from llm2vec_mini.convert.hf import load_pretrained
    from llm2vec_mini.convert.peft import save_adapter
    from llm2vec_mini.encoder import write_settings
    from llm2vec_mini.lora import add_lora

    model, _ = load_pretrained(tiny_llama_dir)
    add_lora(model, r=4, alpha=8.0)
    save_adapter(model, tmp_path)
    write_settings(tmp_path, {"pooling_mode": "weighted_mean", "max_length": 128, "doc_max_length": 100,
                              "skip_instruction": True, "bidirectional": False})
    one = LLM2Vec.from_pretrained(tiny_llama_dir, adapters=str(tmp_path), device="cpu")
    assert one.settings() == {"pooling_mode": "weighted_mean", "max_length": 128, "doc_max_length": 100,
                              "skip_instruction": True, "bidirectional": False}


# -------------------------------------------------------------------------------------------------
# Issue 16: typed errors naming the argument, the item or the file


@pytest.mark.parametrize("bad, match", [
    (None, "sentences must be a string or a list.*NoneType"),
    (5, "sentences must be a string or a list.*int"),
    ({"text": "a dict's keys are no texts"}, "sentences must be a string or a list.*dict"),
    ({"a", "b"}, "sentences must be a string or a list.*set"),
    (["fine", "a lone \ud800 surrogate"], r"sentences\[1\] is not valid Unicode"),
    ([["instruction \udfff", "text"]], r"sentences\[0\] is not valid Unicode"),
])
def test_bad_inputs_name_the_argument_or_item(encoder, bad, match):
    """Issue 16, class 12: encode(None) and encode(5) gave a TypeError, a lone surrogate one from
    inside tokenizers, and a dict encoded its keys."""
    with pytest.raises(ConfigError, match=match):
        encoder.encode(bad)


def test_a_device_torch_does_not_know_names_the_argument(tiny_llama_dir, encoder):
    with pytest.raises(ConfigError, match="device: unknown device 'tpu9'"):
        LLM2Vec.from_pretrained(tiny_llama_dir, device="tpu9")
    with pytest.raises(ConfigError, match="device: unknown device 'tpu9'"):
        LLM2Vec(encoder.model, encoder.tokenizer, device="tpu9")


@pytest.mark.parametrize("file, content, match", [
    ("llm2vec_mini_config.json", {"bidirectional": "false"}, "bidirectional must be true or false, got 'f"),
    ("llm2vec_config.json", {"skip_instruction": "no"}, "skip_instruction must be true or false, got 'no'"),
    ("llm2vec_config.json", {"max_length": True}, "max_length must be a positive integer, got True"),
    ("llm2vec_config.json", {"doc_max_length": 0}, "doc_max_length must be a positive integer, got 0"),
    ("llm2vec_config.json", {"pooling_mode": ["mean"]}, r"pooling_mode: unknown mode \['mean'\]"),
    ("llm2vec_config.json", [1, 2], "expected a JSON object"),
])
def test_settings_files_are_checked_field_by_field_and_name_the_file(tiny_llama_dir, tmp_path, file, content,
                                                                     match):
    """Issue 16, class 9: wrong types loaded with another meaning ("false" is a true string)."""
    folder = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, folder)
    (folder / file).write_text(json.dumps(content))
    with pytest.raises(ConfigError, match=match) as err:
        LLM2Vec.from_pretrained(folder, device="cpu")
    assert str(folder / file) in str(err.value)


@pytest.mark.parametrize("argument, value", [("bidirectional", "false"), ("skip_instruction", 1),
                                             ("max_length", 2.0), ("pooling", None)])
def test_constructor_arguments_of_the_wrong_type(encoder, argument, value):
    with pytest.raises(ConfigError, match="bidirectional|skip_instruction|max_length|pooling"):
        LLM2Vec(encoder.model, encoder.tokenizer, **{argument: value}, device="cpu")


def test_a_tokenizer_with_nothing_to_pad_with_names_its_file(encoder):
    """Issue 16, class 11: a GGUF file with neither an eos nor a pad id gave an error naming nothing."""
    from llm2vec_mini.tokenizer import Tokenizer
    bare = Tokenizer(encoder.tokenizer.tokenizer, bos_id=1, eos_id=None, pad_id=None, path="model.gguf")
    with pytest.raises(ConfigError, match=r"model\.gguf: the tokenizer has no eos \(or pad\) token"):
        LLM2Vec(encoder.model, bare, device="cpu")


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(encoder):
    """Issue 16, class 5: encode() died with an IndexError inside the embedding."""
    import tokenizers

    from llm2vec_mini.tokenizer import Tokenizer
    raw = tokenizers.Tokenizer.from_str(encoder.tokenizer.tokenizer.to_str())
    raw.add_tokens(["<beyond-the-embedding>"])  # id 32000; the model has 32000 rows
    big = Tokenizer(raw, bos_id=1, eos_id=2, path="tokenizer.json")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: the tokenizer has ids up to 32000"):
        LLM2Vec(encoder.model, big, device="cpu")
