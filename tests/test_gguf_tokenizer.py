"""Tokenizers rebuilt from GGUF metadata, against llama.cpp's reference token ids, transformers' GGUF
tokenizer, and a naive SentencePiece-BPE encoder written here; and against broken metadata."""

import math

import pytest
from conftest import ggml_vocab_cases, shared_data_dir

from llm2vec_mini.convert.gguf import load_gguf_tokenizer, read_gguf
from llm2vec_mini.convert.gguf_tokenizer import tokenizer_from_gguf
from llm2vec_mini.errors import CheckpointError

LLAMA_SPM, GPT2 = "ggml-vocab-llama-spm.gguf", "ggml-vocab-gpt-2.gguf"


@pytest.fixture(scope="module")
def vocab_gguf():
    """name -> the read GGUF file, read once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = read_gguf(shared_data_dir() / "tokenizers" / name)
        return cache[name]
    return get


# --------------------------------------------------------------------------------------------
# llama.cpp's own test vectors (made with the reference tokenizers), token for token


@pytest.mark.parametrize("name", [LLAMA_SPM, GPT2])
def test_matches_llama_cpp_vectors(vocab_gguf, name):
    tok = load_gguf_tokenizer(vocab_gguf(name))
    cases = ggml_vocab_cases(name)
    assert len(cases) == 46
    for text, expected in cases:
        assert tok.encode(text, add_special_tokens=False) == expected, repr(text)
    # llama.cpp's defaults when the file is silent: SentencePiece adds BOS, GPT-2 adds nothing.
    want_bos = name == LLAMA_SPM
    assert (tok.add_bos, tok.add_eos) == (want_bos, False)
    assert tok.encode_batch([t for t, _ in cases]) == [[1] * want_bos + ids for _, ids in cases]
    # The bare tokenizers.Tokenizer adds the same BOS through its post-processor.
    bare, _ = tokenizer_from_gguf(vocab_gguf(name).metadata)
    assert bare.encode("Hello world").ids == [1] * want_bos + (
        [15043, 3186] if name == LLAMA_SPM else [15496, 995])


@pytest.mark.parametrize("name", [LLAMA_SPM, GPT2])
def test_decode_inverts_encode_on_vectors(vocab_gguf, name):
    tok = load_gguf_tokenizer(vocab_gguf(name))
    for text, _ in ggml_vocab_cases(name):
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text, repr(text)
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == text, repr(text)


def test_specials_and_ids(vocab_gguf):
    llama = load_gguf_tokenizer(vocab_gguf(LLAMA_SPM))
    assert (llama.bos_id, llama.eos_id, llama.pad_id, llama.vocab_size) == (1, 2, None, 32000)
    assert llama.id_to_token(13) == "<0x0A>" and llama.token_to_id("▁Hello") == 15043
    # A control token in the text stays whole; a character outside the vocabulary becomes its bytes.
    assert llama.encode("a</s>", add_special_tokens=False) == [263, 2]
    assert llama.encode("\u2603", add_special_tokens=False) == [29871, 0xE2 + 3, 0x98 + 3, 0x83 + 3]
    assert llama.decode([29871, 0xE2 + 3, 0x98 + 3, 0x83 + 3]) == "\u2603"
    gpt2 = load_gguf_tokenizer(vocab_gguf(GPT2))
    assert (gpt2.bos_id, gpt2.eos_id, gpt2.vocab_size) == (50256, 50256, 50257)
    assert gpt2.encode("Hello<|endoftext|>") == [15496, 50256]
    assert gpt2.decode([15496, 50256], skip_special_tokens=True) == "Hello"


def test_smollm_pre_tokenizer_splits_digits(vocab_gguf):
    """pre = "smollm" (as "starcoder") cuts every digit off before GPT-2's regex (llama.cpp's table):
    with the GPT-2 vocabulary, " 2013 ab" then encodes like " ", "2", "0", "1", "3", " ab" apart."""
    meta = dict(vocab_gguf(GPT2).metadata)
    plain, _ = tokenizer_from_gguf(meta)
    digits, _ = tokenizer_from_gguf({**meta, "tokenizer.ggml.pre": "smollm"})
    one_by_one = [i for piece in [" ", "2", "0", "1", "3", " ab"] for i in plain.encode(piece).ids]
    assert digits.encode(" 2013 ab").ids == one_by_one
    assert plain.encode(" 2013 ab").ids != one_by_one  # GPT-2's own split keeps " 2013" together


# --------------------------------------------------------------------------------------------
# SentencePiece BPE: the merges we derive from scores reproduce the merge-by-score algorithm


def spm_reference(text, piece_id, score, byte_id):
    """SentencePiece BPE as llama.cpp's llm_tokenizer_spm runs it, written plainly: prepend "▁", spaces
    to "▁", then merge the adjacent pair whose concatenation is the best-scoring token (leftmost on
    ties) until none is a token; a leftover character that is no token becomes its UTF-8 bytes."""
    if not text:
        return []
    symbols = list("▁" + text.replace(" ", "▁"))

    def pair_score(i):
        joined = symbols[i] + symbols[i + 1]
        return score[joined] if joined in score else -math.inf

    scores = [pair_score(i) for i in range(len(symbols) - 1)]
    while scores and max(scores) > -math.inf:
        i = scores.index(max(scores))  # the leftmost best pair
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
        del scores[i]
        if i < len(scores):
            scores[i] = pair_score(i)
        if i > 0:
            scores[i - 1] = pair_score(i - 1)
    return [i for s in symbols for i in ([piece_id[s]] if s in piece_id else
                                         [byte_id[b] for b in s.encode("utf-8")])]


def test_spm_merge_order_matches_reference_on_stsb(vocab_gguf, sts_dev_texts):
    meta = vocab_gguf(LLAMA_SPM).metadata
    tokens, scores, types = (meta[f"tokenizer.ggml.{k}"] for k in ("tokens", "scores", "token_type"))
    piece_id = {t: i for i, (t, k) in enumerate(zip(tokens, types)) if k == 1}
    score = {t: scores[i] for t, i in piece_id.items()}
    byte_id = {b: tokens.index(f"<0x{b:02X}>") for b in range(256)}
    tok = load_gguf_tokenizer(vocab_gguf(LLAMA_SPM))
    texts = sts_dev_texts + ["naïve café ☃ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "  two  spaces ", "x\ty\nz"]
    ours = tok.encode_batch(texts, add_special_tokens=False)
    for text, ids in zip(texts, ours):
        assert ids == spm_reference(text, piece_id, score, byte_id), text


# --------------------------------------------------------------------------------------------
# SmolLM2's GGUF tokenizer against transformers' GGUF tokenizer, on all STS-B dev sentences


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    """(ours, transformers' GGUF tokenizer). `AutoTokenizer.from_pretrained(folder, gguf_file=name)`
    resolves this file to `PreTrainedTokenizerFast` (TokenizersBackend) and builds it with this same
    call; it only reads the model config first, which takes 10-20 s on 2 cores, so we call it directly."""
    transformers = pytest.importorskip("transformers")
    ref = transformers.PreTrainedTokenizerFast.from_pretrained(str(smollm2_gguf.parent),
                                                                gguf_file=smollm2_gguf.name)
    return load_gguf_tokenizer(read_gguf(smollm2_gguf)), ref


def test_smollm2_matches_transformers_on_stsb(smollm2, sts_dev_texts):
    ours, ref = smollm2
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.add_bos, ours.add_eos) == (1, 2, 2, False, False)
    assert ours.vocab_size == len(ref) == 49152
    assert len(sts_dev_texts) == 3000
    assert ours.encode_batch(sts_dev_texts) == ref(sts_dev_texts)["input_ids"]
    assert ours.encode_batch(sts_dev_texts, add_special_tokens=False) == \
        ref(sts_dev_texts, add_special_tokens=False)["input_ids"]
    chat = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert ours.encode(chat) == ref(chat)["input_ids"]
    assert ours.encode(chat)[0] == 1  # <|im_start|> is a control token: never cut into pieces


@pytest.mark.parametrize("which", ["smollm2", "gpt-2"])
def test_gpt2_decode_inverts_encode_on_stsb(which, request, vocab_gguf, sts_dev_texts):
    if which == "smollm2":
        tok = request.getfixturevalue("smollm2")[0]
    else:
        tok = load_gguf_tokenizer(vocab_gguf(GPT2))
    for text, ids in zip(sts_dev_texts, tok.encode_batch(sts_dev_texts)):
        assert tok.decode(ids) == text


# --------------------------------------------------------------------------------------------
# Broken metadata: typed errors that name the key


def tiny_gpt2(**changes):
    tokens = ["a", "b", "ab", "Ġ", "<|end|>"]
    meta = {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1, 1, 1, 1, 3], "tokenizer.ggml.merges": ["a b"],
        "tokenizer.ggml.bos_token_id": 4, "tokenizer.ggml.eos_token_id": 4,
    }
    meta.update(changes)
    return {k: v for k, v in meta.items() if v is not None}


def tiny_llama(**changes):
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["▁", "a", "▁a"]
    meta = {
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * 259 + [-1.0, -2.0, -3.0],
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1, 1, 1],
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
    }
    meta.update(changes)
    return {k: v for k, v in meta.items() if v is not None}


def test_tiny_vocabularies_work():
    tok, specials = tokenizer_from_gguf(tiny_gpt2())
    assert tok.encode("ab<|end|>b").ids == [2, 4, 1]
    assert specials == dict(bos_id=4, eos_id=4, pad_id=None, add_bos=False, add_eos=False)
    tok, specials = tokenizer_from_gguf(tiny_llama())
    assert tok.encode("a a").ids == [1, 261, 261]  # "▁a▁a": "▁a" twice, after BOS
    assert tok.encode("é", add_special_tokens=False).ids == [259, 0xC3 + 3, 0xA9 + 3]  # "▁", then bytes


@pytest.mark.parametrize("meta, key", [
    (tiny_gpt2(**{"tokenizer.ggml.model": "bert"}), "unsupported tokenizer model"),
    (tiny_gpt2(**{"tokenizer.ggml.model": None}), "tokenizer.ggml.model"),
    (tiny_gpt2(**{"tokenizer.ggml.tokens": None}), "tokenizer.ggml.tokens"),
    (tiny_gpt2(**{"tokenizer.ggml.tokens": ["a", "a"]}), "tokenizer.ggml.tokens"),
    (tiny_gpt2(**{"tokenizer.ggml.token_type": [1, 1]}), "tokenizer.ggml.token_type"),
    (tiny_gpt2(**{"tokenizer.ggml.merges": None}), "tokenizer.ggml.merges"),
    (tiny_gpt2(**{"tokenizer.ggml.merges": ["a b", "ab"]}), "tokenizer.ggml.merges[1]"),
    (tiny_gpt2(**{"tokenizer.ggml.merges": ["a b", "a c"]}), "tokenizer.ggml"),  # "c": no such token
    (tiny_gpt2(**{"tokenizer.ggml.pre": "qwen2"}), "tokenizer.ggml.pre"),
    (tiny_gpt2(**{"tokenizer.ggml.bos_token_id": 5}), "tokenizer.ggml.bos_token_id"),
    (tiny_gpt2(**{"tokenizer.ggml.add_bos_token": "yes"}), "tokenizer.ggml.add_bos_token"),
    (tiny_gpt2(**{"tokenizer.ggml.add_eos_token": True, "tokenizer.ggml.eos_token_id": None}),
     "tokenizer.ggml.eos_token_id"),
    (tiny_llama(**{"tokenizer.ggml.scores": [0.0] * 10}), "tokenizer.ggml.scores"),
    (tiny_llama(**{"tokenizer.ggml.scores": None}), "tokenizer.ggml.scores"),
    (tiny_llama(**{"tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>", "▁"], "tokenizer.ggml.scores": [0.0] * 4,
                   "tokenizer.ggml.token_type": [2, 3, 3, 1]}), "<0x00>"),
])
def test_broken_metadata_raises_naming_the_key(meta, key):
    with pytest.raises(CheckpointError, match="model.gguf") as e:
        tokenizer_from_gguf(meta, path="model.gguf")
    assert key in str(e.value)


@pytest.mark.parametrize("meta, key", [
    (tiny_gpt2(**{"tokenizer.ggml.tokens": 7}), "tokenizer.ggml.tokens"),
    (tiny_gpt2(**{"tokenizer.ggml.tokens": "abc"}), "tokenizer.ggml.tokens"),  # not three tokens a, b, c
    (tiny_gpt2(**{"tokenizer.ggml.tokens": [1, 2, 3, 4, 5]}), "tokenizer.ggml.tokens[0]"),
    (tiny_gpt2(**{"tokenizer.ggml.token_type": ["1"] * 5}), "tokenizer.ggml.token_type[0]"),
    (tiny_gpt2(**{"tokenizer.ggml.token_type": 1}), "tokenizer.ggml.token_type"),
    (tiny_gpt2(**{"tokenizer.ggml.merges": [1, 2]}), "tokenizer.ggml.merges[0]"),
    (tiny_gpt2(**{"tokenizer.ggml.merges": "a b"}), "tokenizer.ggml.merges"),
    (tiny_gpt2(**{"tokenizer.ggml.pre": ["gpt-2"]}), "tokenizer.ggml.pre"),
    (tiny_gpt2(**{"tokenizer.ggml.model": ["gpt2"]}), "tokenizer.ggml.model"),
    (tiny_gpt2(**{"tokenizer.ggml.add_bos_token": [True]}), "tokenizer.ggml.add_bos_token"),
    (tiny_llama(**{"tokenizer.ggml.scores": ["1"] * 262}), "tokenizer.ggml.scores[0]"),
    (tiny_llama(**{"tokenizer.ggml.scores": 1.0}), "tokenizer.ggml.scores"),
])
def test_metadata_of_the_wrong_type_raises_naming_the_key(meta, key):
    """Issue 16, class 3: these gave a raw TypeError or ValueError from inside the builder."""
    with pytest.raises(CheckpointError, match="model.gguf") as e:
        tokenizer_from_gguf(meta, path="model.gguf")
    assert key in str(e.value)


def brute_force_merges(tokens, scores, types):
    """The definition, written out: every split of every mergeable token into two mergeable tokens."""
    from llm2vec_mini.convert.gguf_tokenizer import BYTE, CONTROL, UNKNOWN
    mergeable = {t: i for i, (t, kind) in enumerate(zip(tokens, types))
                 if kind not in (UNKNOWN, CONTROL, BYTE)}
    ranked = sorted(((-scores[i], i, cut), t[:cut], t[cut:]) for t, i in mergeable.items()
                    for cut in range(1, len(t)) if t[:cut] in mergeable and t[cut:] in mergeable)
    return [(left, right) for _, left, right in ranked]


def test_spm_merges_skip_only_splits_that_cannot_be_tokens():
    """Splits are tried only where both halves have the length of some token; on a vocabulary of
    tokens of many lengths (and one long token) that gives exactly the merges of trying every split."""
    import random

    from llm2vec_mini.convert.gguf_tokenizer import _spm_merges
    rng = random.Random(0)
    tokens = sorted({"".join(rng.choice("ab▁") for _ in range(rng.choice([1, 1, 2, 3, 5, 8, 13])))
                     for _ in range(400)}) + ["▁" + "ab" * 5000]
    scores = [rng.uniform(-10, 0) for _ in tokens]
    types = [rng.choice([1, 1, 1, 1, 3, 4, 6]) for _ in tokens]
    expected = brute_force_merges(tokens, scores, types)
    assert len(expected) > 40
    assert _spm_merges(tokens, scores, types) == expected


def test_one_very_long_token_builds_without_quadratic_work(monkeypatch):
    """Issue 16, class 4: a token of 2,000,000 characters made the builder slice it 2,000,000 times
    (hours). No token has the length of either half of any of its splits, so none is tried: the
    budget of sliced characters, set to the long token's length here, is never reached."""
    from llm2vec_mini.convert import gguf_tokenizer
    monkeypatch.setattr(gguf_tokenizer, "MAX_MERGE_WORK", 2_000_000, raising=False)
    meta = tiny_llama()
    meta["tokenizer.ggml.tokens"] = meta["tokenizer.ggml.tokens"] + ["▁" + "a" * 2_000_000]
    meta["tokenizer.ggml.scores"] = meta["tokenizer.ggml.scores"] + [-4.0]
    meta["tokenizer.ggml.token_type"] = meta["tokenizer.ggml.token_type"] + [1]
    tok, _ = tokenizer_from_gguf(meta, path="model.gguf")
    assert tok.encode("a a").ids == [1, 261, 261]  # the vocabulary still works as before


def test_a_vocabulary_built_to_be_quadratic_is_refused():
    """Tokens a, aa, aaa, ... of 1,500 lengths: every split of each is two tokens, 10^9 characters to
    compare. Refused, with the reason, before the work is done."""
    meta = tiny_llama()
    extra = ["a" * k for k in range(2, 1502)]
    meta["tokenizer.ggml.tokens"] = meta["tokenizer.ggml.tokens"] + extra
    meta["tokenizer.ggml.scores"] = meta["tokenizer.ggml.scores"] + [-5.0] * len(extra)
    meta["tokenizer.ggml.token_type"] = meta["tokenizer.ggml.token_type"] + [1] * len(extra)
    with pytest.raises(CheckpointError, match=r"model\.gguf.*SentencePiece merges.*longest token has 1,501"):
        tokenizer_from_gguf(meta, path="model.gguf")
