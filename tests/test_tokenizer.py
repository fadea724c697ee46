"""`Tokenizer` on Hugging Face folders against transformers' `AutoTokenizer` reading the same folder,
its save/load round trip, and its typed errors.

The folders are written here with the `tokenizers` library in the layouts the real checkpoints use
(Llama 2: normalizer + `TemplateProcessing` "<s> $A"; GPT-2 and SmolLM2: byte-level with a `ByteLevel`
post-processor), from the vocabularies in shared/data/tokenizers and, when cached, SmolLM2's GGUF.
"""

import json
import types

import pytest
import torch
from conftest import Reference, ggml_vocab_cases, shared_data_dir
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as RawTokenizer

from llm2vec_mini.config import LlamaConfig
from llm2vec_mini.convert.gguf import load_gguf_tokenizer, read_gguf
from llm2vec_mini.convert.hf_tokenizer import load_hf_tokenizer, save_hf_tokenizer
from llm2vec_mini.errors import CheckpointError, ConfigError, DataError
from llm2vec_mini.tokenizer import Tokenizer

transformers = Reference("transformers")


def generate_merges(*args):  # transformers' merges from SentencePiece scores
    return Reference("transformers.tokenization_utils_base").generate_merges(*args)

LLAMA_SPM, GPT2 = "ggml-vocab-llama-spm.gguf", "ggml-vocab-gpt-2.gguf"
SPECIAL_TEXTS = ["Hello world", "a</s>b", "x <s> y", "<|endoftext|>end", " lead", "trail ", "", "\n\n"]


def added(content):  # a special token as tokenizer_config.json writes it
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False,
            "rstrip": False, "single_word": False}


def write_folder(folder, tok, config, special_tokens_map=None):
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    if special_tokens_map is not None:
        (folder / "special_tokens_map.json").write_text(json.dumps(special_tokens_map), encoding="utf-8")
    return folder


def llama2_tokenizer_json():
    """Llama 2's tokenizer.json layout, with merges derived by transformers from the scores."""
    meta = read_gguf(shared_data_dir() / "tokenizers" / LLAMA_SPM).metadata
    tokens, scores = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = RawTokenizer(models.BPE(vocab, generate_merges(vocab, dict(zip(tokens, scores))), unk_token="<unk>",
                                  byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tok.post_processor = processors.TemplateProcessing(single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1",
                                                       special_tokens=[("<s>", 1)])
    return tok


def byte_level_tokenizer_json(meta, digits=False):
    """GPT-2's (digits=False) or SmolLM2's (digits=True) tokenizer.json layout, from GGUF metadata."""
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    tok = RawTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if digits else byte_level)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, meta["tokenizer.ggml.token_type"]) if kind == 3])
    return tok


LLAMA2_CONFIG = {"add_bos_token": True, "add_eos_token": False, "bos_token": added("<s>"),
                 "eos_token": added("</s>"), "unk_token": added("<unk>"), "pad_token": None, "legacy": False,
                 "clean_up_tokenization_spaces": False, "model_max_length": 4096,
                 "tokenizer_class": "LlamaTokenizer"}
LLAMA2_SPECIAL_MAP = {"bos_token": added("<s>"), "eos_token": added("</s>"), "unk_token": added("<unk>")}


@pytest.fixture(scope="module")
def llama2_json():
    return llama2_tokenizer_json()


@pytest.fixture(scope="module")
def llama2_dirs(tmp_path_factory, llama2_json):
    """The Llama 2 tokenizer as a "LlamaTokenizer" folder and as a generic "PreTrainedTokenizerFast" one."""
    root = tmp_path_factory.mktemp("llama2")
    llama = write_folder(root / "llama", llama2_json, LLAMA2_CONFIG, LLAMA2_SPECIAL_MAP)
    generic = write_folder(root / "generic", llama2_json,
                           {**LLAMA2_CONFIG, "tokenizer_class": "PreTrainedTokenizerFast"})
    return llama, generic


@pytest.fixture(scope="module")
def sts_texts(sts_dev_texts):
    """The first 1,000 STS-B dev sentences: plenty for the folder logic (the GGUF tests use all 3,000)."""
    return sts_dev_texts[:1000]


def assert_same_as_transformers(folder, texts):
    """`Tokenizer.from_dir` and `AutoTokenizer` on one folder give the same ids, with and without
    special tokens; returns our tokenizer and our ids with special tokens."""
    ours = load_hf_tokenizer(folder)
    ref = transformers.AutoTokenizer.from_pretrained(str(folder))
    for special in (False, True):
        ids = ours.encode_batch(texts, add_special_tokens=special)
        assert ids == ref(texts, add_special_tokens=special)["input_ids"]
    return ours, ids


# --------------------------------------------------------------------------------------------
# Hugging Face folders against AutoTokenizer


def test_llama2_folder_matches_transformers(llama2_dirs, sts_texts):
    tok, ids = assert_same_as_transformers(llama2_dirs[0], sts_texts)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos, tok.add_eos, tok.vocab_size) == \
        (1, 2, None, True, False, 32000)
    assert all(i[0] == 1 for i in ids)


def test_llama2_folder_keeps_sentencepiece_spaces(llama2_dirs):
    """Leading spaces follow the file's normalizer, as SentencePiece and llama.cpp do (" " -> "▁▁"):
    llama.cpp's vectors, with BOS. (transformers 5 rebuilds a "LlamaTokenizer" folder with Metaspace,
    which drops one "▁" there; the generic folder below shows it agrees with the file itself.)"""
    llama, _ = llama2_dirs
    tok = load_hf_tokenizer(llama)
    for text, ids in ggml_vocab_cases(LLAMA_SPM):
        assert tok.encode(text) == [1] + ids, repr(text)


def test_generic_llama2_folder_matches_transformers_everywhere(llama2_dirs):
    assert_same_as_transformers(llama2_dirs[1], [t for t, _ in ggml_vocab_cases(LLAMA_SPM)] + SPECIAL_TEXTS)


def test_gpt2_folder_matches_transformers(tmp_path, sts_texts):
    meta = read_gguf(shared_data_dir() / "tokenizers" / GPT2).metadata
    config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
              "unk_token": "<|endoftext|>", "add_prefix_space": False, "model_max_length": 1024}
    folder = write_folder(tmp_path, byte_level_tokenizer_json(meta), config)
    texts = sts_texts + [t for t, _ in ggml_vocab_cases(GPT2)] + SPECIAL_TEXTS
    tok, ids = assert_same_as_transformers(folder, texts)
    specials = (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos, tok.add_eos)
    assert specials == (50256, 50256, None, False, False)
    assert ids[-5] == [50256, 437]  # "<|endoftext|>end": the special token stays whole


def test_smollm2_folder_matches_transformers(tmp_path, smollm2_gguf, sts_texts):
    meta = read_gguf(smollm2_gguf).metadata
    config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
              "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>", "add_prefix_space": False,
              "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "model_max_length": 8192}
    folder = write_folder(tmp_path, byte_level_tokenizer_json(meta, digits=True), config)
    texts = sts_texts + ["<|im_start|>user\nIn 2013, 42 cats.<|im_end|>"] + SPECIAL_TEXTS
    tok, _ = assert_same_as_transformers(folder, texts)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos, tok.add_eos) == (1, 2, 2, False, False)


def test_config_flag_disagreeing_with_post_processor_warns(tmp_path, llama2_json):
    """transformers ignores tokenizer_config's add_bos_token once there is a tokenizer.json; so do we."""
    folder = write_folder(tmp_path, llama2_json, {**LLAMA2_CONFIG, "add_bos_token": False,
                                                  "tokenizer_class": "PreTrainedTokenizerFast"})
    with pytest.warns(UserWarning, match="add_bos_token is False"):
        tok = load_hf_tokenizer(folder)
    ref = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert tok.encode("Hello world") == ref("Hello world")["input_ids"] == [1, 15043, 3186]


# --------------------------------------------------------------------------------------------
# Saving, and the constructor


@pytest.mark.parametrize("name", [LLAMA_SPM, GPT2])
def test_save_round_trip_through_transformers(tmp_path, name):
    tok = load_gguf_tokenizer(shared_data_dir() / "tokenizers" / name)
    if name == GPT2:  # ask for EOS too: the saved post-processor must add it
        tok = Tokenizer(tok.tokenizer, bos_id=tok.bos_id, eos_id=tok.eos_id, add_bos=False, add_eos=True)
    save_hf_tokenizer(tok, tmp_path)
    again = load_hf_tokenizer(tmp_path)
    assert (again.bos_id, again.eos_id, again.pad_id, again.add_bos, again.add_eos) == \
        (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos, tok.add_eos)
    texts = [t for t, _ in ggml_vocab_cases(name)] + SPECIAL_TEXTS
    want = [[1] * (name == LLAMA_SPM) + ids + [50256] * (name == GPT2) for _, ids in ggml_vocab_cases(name)]
    assert again.encode_batch(texts)[:len(want)] == want
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.encode_batch(texts) == ref(texts)["input_ids"]
    assert [tok.decode(ids, skip_special_tokens=True) for ids in tok.encode_batch(texts)] == \
        ref.batch_decode(ref(texts)["input_ids"], skip_special_tokens=True)


def tiny_tokenizer():
    tok = RawTokenizer(models.BPE({"<s>": 0, "</s>": 1, "a": 2, "b": 3, "ab": 4}, [("a", "b")]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    return tok


def test_ids_fall_back_to_llama_config(tmp_path):
    tiny_tokenizer().save(str(tmp_path / "tokenizer.json"))
    config = LlamaConfig.tiny(vocab_size=5, bos_token_id=0, eos_token_id=1, pad_token_id=None)
    tok = load_hf_tokenizer(tmp_path, config=config)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos, tok.add_eos) == (0, 1, None, False, False)
    assert tok.encode("ab a") == [4, 2]
    # Files win over the config; special_tokens_map.json over tokenizer_config.json.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "a", "eos_token": added("b")}))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"bos_token": {"content": "ab"}}))
    tok = load_hf_tokenizer(tmp_path, config=config)
    assert (tok.bos_id, tok.eos_id) == (4, 3)


def test_constructor_flags_and_decode_inputs():
    tok = Tokenizer(tiny_tokenizer(), bos_id=0, eos_id=1, add_bos=True, add_eos=True)
    assert tok.encode("ab b") == [0, 4, 3, 1] and tok.encode("ab b", add_special_tokens=False) == [4, 3]
    assert tok.encode_batch(["a", ""]) == [[0, 2, 1], [0, 1]]
    assert tok.decode(torch.tensor([0, 4, 1]), skip_special_tokens=True) == tok.decode([4]) == "ab"
    assert tok.token_to_id("ab") == 4 and tok.id_to_token(3) == "b" and tok.token_to_id("zz") is None


# --------------------------------------------------------------------------------------------
# Typed errors


@pytest.mark.parametrize("call, error, match", [
    (lambda t: t.encode(123), DataError, "str"),
    (lambda t: t.encode_batch("ab"), DataError, "list of str"),
    (lambda t: t.encode_batch(["a", None]), DataError, r"texts\[1\]"),
    (lambda t: t.decode([2, 5]), DataError, r"ids\[1\]"),
    (lambda t: t.decode([-1]), DataError, r"ids\[0\]"),
    (lambda t: t.decode([2.0]), DataError, r"ids\[0\]"),
    (lambda t: Tokenizer(t.tokenizer, bos_id=None, add_bos=True), ConfigError, "bos_id"),
    (lambda t: Tokenizer(t.tokenizer, bos_id=0, eos_id=None, add_eos=True), ConfigError, "eos_id"),
    (lambda t: Tokenizer(t.tokenizer, bos_id=99), ConfigError, "bos_id"),
])
def test_bad_arguments_raise_typed_errors(call, error, match):
    with pytest.raises(error, match=match):
        call(Tokenizer(tiny_tokenizer(), bos_id=0, eos_id=1))


@pytest.mark.parametrize("files, match", [
    ({}, "no tokenizer.json"),
    ({"tokenizer.model": b"\x00"}, "tokenizer.model"),
    ({"tokenizer.json": b"{not json"}, "not a valid tokenizer.json"),
    ({"tokenizer.json": None, "tokenizer_config.json": b"[1, 2]"}, "JSON object"),
    ({"tokenizer.json": None, "tokenizer_config.json": b"{"}, "not a valid JSON"),
    ({"tokenizer.json": None, "tokenizer_config.json": b'{"bos_token": 5}'}, "bos_token must be"),
    ({"tokenizer.json": None, "special_tokens_map.json": b'{"eos_token": "<nope>"}'}, "'<nope>' is not in"),
    ({"tokenizer.json": None, "tokenizer_config.json": b'{"add_bos_token": "yes"}'}, "add_bos_token"),
    ({"tokenizer.json": None, "special_tokens_map.json": b'{"pad_token": "\\ud800"}'}, "pad_token is not"),
])
def test_bad_folders_raise_checkpoint_errors_naming_the_file(tmp_path, files, match):
    for name, content in files.items():
        if content is None:
            tiny_tokenizer().save(str(tmp_path / name))
        else:
            (tmp_path / name).write_bytes(content)
    with pytest.raises(CheckpointError, match=match) as e:
        load_hf_tokenizer(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_missing_folder_and_gguf_object(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_hf_tokenizer(tmp_path / "absent")
    fake = types.SimpleNamespace(path="fake.gguf", metadata={"tokenizer.ggml.model": "bert"})
    with pytest.raises(CheckpointError, match="fake.gguf.*unsupported tokenizer model"):
        load_gguf_tokenizer(fake)


# --------------------------------------------------------------------------------------------
# Issue 16, class 6: what makes `tokenizers` panic or abort is a typed error naming the file


def tokenizer_json_with(tmp_path, **changes):
    """tiny_tokenizer's tokenizer.json with top-level fields replaced, in a folder of its own."""
    doc = {**json.loads(tiny_tokenizer().to_str()), **changes}
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc))
    return tmp_path


UNKNOWN_SPECIAL = {"type": "TemplateProcessing", "special_tokens": {},
                   "single": [{"SpecialToken": {"id": "<nope>", "type_id": 0}},
                              {"Sequence": {"id": "A", "type_id": 0}}],
                   "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}]}


@pytest.mark.parametrize("changes, match", [
    ({"post_processor": UNKNOWN_SPECIAL}, "probe text"),  # a panic in Rust (PanicException)
    ({"truncation": {"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 10}},
     r"stride \(10\) must be below max_length \(4\)"),  # a panic on the first long text
    ({"padding": {"strategy": {"Fixed": 2**40}, "direction": "Right", "pad_to_multiple_of": None,
                  "pad_id": 0, "pad_type_id": 0, "pad_token": "<s>"}}, "padding: length"),  # an abort
    ({"padding": {"strategy": "BatchLongest", "direction": "Right", "pad_to_multiple_of": 2**40,
                  "pad_id": 0, "pad_type_id": 0, "pad_token": "<s>"}}, "padding: pad_to_multiple_of"),
])
def test_settings_that_crash_tokenizers_are_refused(tmp_path, changes, match):
    with pytest.raises(CheckpointError, match=match) as e:
        load_hf_tokenizer(tokenizer_json_with(tmp_path, **changes))
    assert str(tmp_path / "tokenizer.json") in str(e.value)


def test_padding_and_truncation_of_tokenizer_json_are_switched_off(tmp_path):
    """We pad and cut ourselves, as transformers does unless a call asks: a file's own padding would
    put pad tokens between the text and the eos token, its truncation cut texts we count."""
    truncation = {"direction": "Right", "max_length": 2, "stride": 0, "strategy": "LongestFirst"}
    padding = {"strategy": {"Fixed": 8}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
               "pad_type_id": 0, "pad_token": "<s>"}
    folder = tokenizer_json_with(tmp_path, truncation=truncation, padding=padding)
    tok = load_hf_tokenizer(folder)
    assert tok.encode("ab a b a", add_special_tokens=False) == [4, 2, 3, 2]  # not cut to 2, not padded to 8
    assert tok.tokenizer.padding is None and tok.tokenizer.truncation is None


def test_texts_with_lone_surrogates_are_data_errors_naming_the_item():
    tok = Tokenizer(tiny_tokenizer(), bos_id=0, eos_id=1)
    with pytest.raises(DataError, match=r"not valid Unicode.*'\\ud800'"):
        tok.encode("a\ud800b")
    with pytest.raises(DataError, match=r"texts\[1\] is not valid Unicode"):
        tok.encode_batch(["a", "\udfff"])
    assert tok.encode("ab é") == [0, 4]  # non-ASCII text is fine ("é" is not in this vocabulary)


def test_panics_become_checkpoint_errors_and_nothing_else_is_swallowed():
    from llm2vec_mini.tokenizer import rust_errors
    PanicException = type("PanicException", (BaseException,), {})  # what pyo3 raises: no Exception
    with pytest.raises(CheckpointError, match=r"tok\.json: broken \(the tokenizers library panicked: boom\)"):
        with rust_errors("broken", "tok.json"):
            raise PanicException("boom")
    with pytest.raises(KeyboardInterrupt):
        with rust_errors("broken", "tok.json"):
            raise KeyboardInterrupt


def test_a_regex_that_backtracks_forever_is_a_checkpoint_error_not_a_hang():
    """tokenizer.json may carry any Split regex; oniguruma gives up after its retry limit and panics,
    which becomes a CheckpointError naming the file, in a fraction of a second."""
    raw = RawTokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex(r"(\w+\s?)+$"), behavior="isolated")
    tok = Tokenizer(raw, path="tokenizer.json")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: the tokenizer cannot encode this text"):
        tok.encode("word " * 30 + "!")
