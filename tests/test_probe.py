"""The word-level probe: alignment against transformers' `word_ids()` and hand-counted positions, features
against an unbatched forward pass, the probe against scipy on the same objective, and the experiment on a
synthetic CoNLL-U file where the tag is (or is not) a function of the word."""

import json
import random

import numpy as np
import pytest
import torch
from conftest import missing

from llm2vec_mini.config import LlamaConfig
from llm2vec_mini.errors import ConfigError, DataError
from llm2vec_mini.model import LlamaForCausalLM, LlamaModel
from llm2vec_mini.probe import (
    align_words,
    extract_word_features,
    probe_accuracy,
    probe_main,
    run_probe,
    train_probe,
)

TAGS = ["NOUN", "VERB", "ADJ", "DET", "PUNCT"]


class ChunkTokenizer:
    """Stand-in tokenizer: drops the spaces and cuts each word into pieces of 2 characters, one id each."""

    bos_id, eos_id, pad_id = 1, 2, 0

    def __init__(self, words, bos=True):
        pieces = sorted({p for w in words for p in self.pieces(w)})
        self.vocab = {p: i for i, p in enumerate(pieces, start=3)}
        if not bos:
            self.bos_id = None

    @staticmethod
    def pieces(word):
        return [word[i:i + 2] for i in range(0, len(word), 2)]

    def encode(self, text, add_special_tokens=True):
        ids = [self.vocab[p] for w in text.split(" ") for p in self.pieces(w)]
        return ([self.bos_id] if add_special_tokens and self.bos_id is not None else []) + ids


def make_words(n=50, seed=0):
    """n words whose first 2-character piece is unique, followed by 0-4 characters from 'xyz'."""
    rng = random.Random(seed)
    heads = rng.sample([a + b for a in "abcdefghij" for b in "abcdefghij"], n)
    return [h + "".join(rng.choice("xyz") for _ in range(rng.randrange(5))) for h in heads]


def write_conllu(path, sentences):
    with open(path, "w", encoding="utf-8") as f:
        for s, (words, tags) in enumerate(sentences):
            f.write(f"# sent_id = s{s}\n# text = {' '.join(words)}\n")
            for i, (w, t) in enumerate(zip(words, tags), start=1):
                f.write(f"{i}\t{w}\t_\t{t}\t_\t_\t0\tdep\t_\t_\n")
            f.write("\n")
    return path


def synthetic_split(words, tag_of, n_sentences, rng, shuffled=False):
    out = []
    for _ in range(n_sentences):
        sent = [rng.choice(words) for _ in range(rng.randint(4, 9))]
        tags = [rng.choice(TAGS) if shuffled else tag_of[w] for w in sent]
        out.append((sent, tags))
    return out


def tiny_model(causal=True, seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig.tiny()).set_causal(causal).eval()


# ----------------------------------------------------------------------------------------- alignment

def test_alignment_of_multi_token_words_counted_by_hand():
    words = ["abxy", "cd", "efxyz", "gh"]  # pieces: ab xy | cd | ef xy z | gh
    tok = ChunkTokenizer(words)
    ids, starts = align_words(tok, words)
    v = tok.vocab
    assert ids == [1, v["ab"], v["xy"], v["cd"], v["ef"], v["xy"], v["z"], v["gh"]]
    assert starts == [1, 3, 4, 7]
    ids, starts = align_words(ChunkTokenizer(words, bos=False), words)
    assert ids[0] == v["ab"] and starts == [0, 2, 3, 6]


def test_offsets_alignment_agrees_with_transformers_word_ids_and_with_prefixes():
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as TK
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from llm2vec_mini.tokenizer import Tokenizer

    corpus = ["the cat sat on the mat in 1999", "a dog ran 42 times round the garden",
              "cats and dogs sleep", "unbelievable things happened yesterday"]
    tk = TK(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=45, special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    tk.train_from_iterator(corpus, trainer)
    ours = Tokenizer(tk, bos_id=1, eos_id=2, pad_id=0, add_bos=True)

    class EncodeOnly:  # the same tokenizer without a backend: aligned by prefixes
        bos_id = 1

        def encode(self, text, add_special_tokens=True):
            return ours.encode(text, add_special_tokens)

    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tk)
    n_multi = 0
    for sentence in corpus + ["the unbelievable garden 4242 sat"]:
        words = sentence.split()
        ref = hf(words, is_split_into_words=True, add_special_tokens=False)
        word_ids = ref.word_ids()
        ref_starts = [1 + word_ids.index(k) for k in range(len(words))]  # +1: our BOS
        ids, starts = align_words(ours, words)
        assert ids == [1] + ref["input_ids"]
        assert starts == ref_starts
        assert align_words(EncodeOnly(), words) == (ids, starts)
        n_multi += sum(b - a > 1 for a, b in zip(starts, starts[1:] + [len(ids)]))
    assert n_multi >= 5  # the small vocabulary really splits words


def test_alignment_on_ud_ewt_with_the_llama2_vocabulary(data_dir):
    from llm2vec_mini.convert.gguf import load_gguf_tokenizer
    from llm2vec_mini.data import read_conllu

    vocab = data_dir / "tokenizers" / "ggml-vocab-llama-spm.gguf"
    conllu = data_dir / "ud_english_ewt" / "en_ewt-ud-dev.conllu"
    for path in (vocab, conllu):
        if not path.is_file():
            missing(f"{path} not found")
    tok = load_gguf_tokenizer(vocab)
    sentences = read_conllu(conllu)[:300]
    for words, _ in sentences:
        ids, starts = align_words(tok, words)
        assert ids[0] == tok.bos_id and ids[1:] == tok.encode(" ".join(words), add_special_tokens=False)
        for k, (a, b) in enumerate(zip(starts, starts[1:] + [len(ids)])):
            assert tok.decode(ids[a:b]).strip() == words[k]  # each word's sub-tokens spell the word


# ----------------------------------------------------------------------------------------- features

@pytest.mark.slow
@pytest.mark.parametrize("causal", [True, False])
def test_features_equal_an_unbatched_forward_at_the_right_positions(causal):
    words = make_words(12, seed=1)
    tok = ChunkTokenizer(words)
    model = tiny_model(causal)
    rng = random.Random(3)
    sentences = [[rng.choice(words) for _ in range(n)] for n in (5, 1, 8, 3, 6)]
    unbatched = []  # one sentence at a time, no padding: (T, H) each
    for sent in sentences:
        ids = [1] + [tok.vocab[p] for w in sent for p in tok.pieces(w)]
        with torch.no_grad():
            unbatched.append(model.model(torch.tensor([ids]))[0])
    for mode, shift in (("first", 0), ("next_token", 1)):
        for merge in (False, True):
            got = extract_word_features(model, tok, sentences, mode=mode, batch_size=2, merge_subwords=merge)
            expected = []
            for sent, h in zip(sentences, unbatched):  # positions counted from the pieces
                pos = 1
                for w in sent:
                    n = len(tok.pieces(w))
                    span = h[pos - shift:pos - shift + n]
                    expected.append(span.mean(0) if merge else span[0])
                    pos += n
            torch.testing.assert_close(torch.from_numpy(got), torch.stack(expected), rtol=1e-4, atol=1e-5)


def test_next_token_mode_reads_the_position_before_the_word():
    words = make_words(6, seed=2)
    tok = ChunkTokenizer(words)
    model = tiny_model(causal=True)
    a = [words[0], words[1], words[2]]
    b = [words[0], words[3], words[2]]  # word 1 changed
    for mode, word1_moves in (("first", True), ("next_token", False)):
        fa, fb = (extract_word_features(model, tok, [s], mode=mode) for s in (a, b))
        np.testing.assert_allclose(fa[0], fb[0], rtol=1e-5, atol=1e-6)  # word 0 never sees word 1
        assert (np.abs(fa[1] - fb[1]).max() > 1e-3) == word1_moves  # causal: i-1 cannot see word i
    with torch.no_grad():  # next_token of word 0 is the BOS state
        bos_state = model.model(torch.tensor([[1]]))[0, 0].numpy()
    np.testing.assert_allclose(extract_word_features(model, tok, [a], mode="next_token")[0], bos_state,
                               rtol=1e-5, atol=1e-6)


def test_layer_option_reads_the_output_of_a_decoder_layer():
    words = make_words(6, seed=4)
    tok, model = ChunkTokenizer(words), tiny_model(causal=False)
    sentences = [words[:4], words[2:]]
    final = extract_word_features(model, tok, sentences)
    last_layer = extract_word_features(model, tok, sentences, layer=-1)  # before the final RMSNorm
    with torch.no_grad():
        normed = model.model.norm(torch.from_numpy(last_layer))
    torch.testing.assert_close(normed, torch.from_numpy(final), rtol=1e-4, atol=1e-5)
    assert not np.allclose(extract_word_features(model, tok, sentences, layer=0), last_layer, atol=1e-3)
    with pytest.raises(ConfigError, match="layer"):
        extract_word_features(model, tok, sentences, layer=2)


# ----------------------------------------------------------------------------------------- the probe

def test_train_probe_matches_scipy_on_the_same_objective():
    minimize = pytest.importorskip("scipy.optimize").minimize

    rng = np.random.default_rng(0)
    N, H, C, wd = 300, 8, 3, 0.05
    X = rng.normal(size=(N, H)) * rng.uniform(0.5, 3, size=H) + rng.normal(size=H)
    y = (X[:, 0] + 0.5 * X[:, 1] + rng.normal(scale=0.7, size=N) > 0).astype(int) + (X[:, 2] > 1)
    probe = train_probe(X.astype(np.float32), y, C, epochs=500, weight_decay=wd)

    Z = (X - X.mean(0)) / X.std(0)  # the reference: numpy loss and gradient, scipy's L-BFGS-B

    def objective(theta):
        W, b = theta[:C * H].reshape(C, H), theta[C * H:]
        logits = Z @ W.T + b
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(1, keepdims=True)
        loss = -np.log(p[np.arange(N), y]).mean() + 0.5 * wd * (W ** 2).sum()
        g = p.copy()
        g[np.arange(N), y] -= 1
        g /= N
        return loss, np.concatenate([(g.T @ Z + wd * W).ravel(), g.sum(0)])

    res = minimize(objective, np.zeros(C * H + C), jac=True, method="L-BFGS-B",
                   options=dict(gtol=1e-10, maxiter=5000))
    W_ref = res.x[:C * H].reshape(C, H)
    torch.testing.assert_close(probe.linear.weight.detach().double(), torch.from_numpy(W_ref),
                               rtol=0, atol=2e-3)
    with torch.no_grad():
        p_ours = torch.softmax(probe(torch.from_numpy(X).float()).double(), -1)
    logits_ref = Z @ W_ref.T + res.x[C * H:]
    p_ref = torch.softmax(torch.from_numpy(logits_ref), -1)
    torch.testing.assert_close(p_ours, p_ref, rtol=0, atol=2e-3)
    assert probe_accuracy(probe, X, y) == pytest.approx((p_ref.argmax(-1).numpy() == y).mean(), abs=0.01)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    words = make_words(50)
    rng = random.Random(0)
    tag_of = {w: rng.choice(TAGS) for w in words}
    d = tmp_path_factory.mktemp("conllu")
    files = {}
    for shuffled in (False, True):
        name = "shuffled" if shuffled else "word"
        train = synthetic_split(words, tag_of, 120, rng, shuffled)
        test = synthetic_split(words, tag_of, 70, rng, shuffled)
        files[name] = (write_conllu(d / f"{name}-train.conllu", train),
                       write_conllu(d / f"{name}-test.conllu", test))
    return ChunkTokenizer(words), files


@pytest.mark.slow
@pytest.mark.parametrize("causal", [True, False])
def test_probe_learns_a_tag_that_is_a_function_of_the_word(synthetic, causal):
    tok, files = synthetic
    result = run_probe(tiny_model(causal), tok, *files["word"], mode="first")
    assert result["n_test"] > 350 and result["n_classes"] == 5 and result["n_unseen_test"] == 0
    assert result["attention"] == ("causal" if causal else "bidirectional")
    assert result["majority_baseline"] < 0.45
    assert result["accuracy"] > 0.97, result


@pytest.mark.slow
def test_probe_is_at_chance_when_the_tag_ignores_the_word(synthetic):
    tok, files = synthetic
    result = run_probe(tiny_model(True), tok, *files["shuffled"], mode="first")
    assert 0.15 < result["majority_baseline"] < 0.35
    assert result["accuracy"] < result["majority_baseline"] + 0.07, result
    # a causal model's state at i-1 has not seen word i: the word's tag cannot be read there
    result = run_probe(tiny_model(True), tok, *files["word"], mode="next_token")
    assert result["accuracy"] < result["majority_baseline"] + 0.1, result


@pytest.mark.slow
def test_probe_main_result_is_printable(synthetic):
    tok, files = synthetic
    result = probe_main(tiny_model(False), tok, *files["word"], mode="first", max_sentences=20)
    assert result["n_train"] < 200 and result["train"] == str(files["word"][0])
    assert json.loads(json.dumps(result)) == result


# ----------------------------------------------------------------------------------------- errors

def test_bad_input_raises_typed_errors(tmp_path, synthetic):
    tok, files = synthetic
    model = tiny_model()
    bad = tmp_path / "bad.conllu"
    bad.write_text("1\tword\t_\tNOUN\n\n", encoding="utf-8")  # 4 columns instead of 10
    with pytest.raises(DataError, match="bad.conllu, line 1"):
        run_probe(model, tok, bad, files["word"][1])
    with pytest.raises(DataError, match="not found"):
        run_probe(model, tok, tmp_path / "missing.conllu", files["word"][1])
    with pytest.raises(ConfigError, match="unknown probe mode"):
        run_probe(model, tok, *files["word"], mode="last")
    with pytest.raises(ConfigError, match="max_sentences"):
        run_probe(model, tok, *files["word"], max_sentences=0)
    words = make_words(3)
    with pytest.raises(ConfigError, match="BOS"):
        extract_word_features(model, ChunkTokenizer(words, bos=False), [words], mode="next_token")
    with pytest.raises(DataError, match="sentence 0 has .* tokens, more than max_length=3"):
        extract_word_features(model, ChunkTokenizer(words), [words], max_length=3)
    with pytest.raises(DataError, match="word 1 is empty"):
        extract_word_features(model, ChunkTokenizer(words), [[words[0], ""]])
    from tokenizers import Tokenizer as TK
    from tokenizers import models, normalizers, pre_tokenizers

    from llm2vec_mini.tokenizer import Tokenizer
    tk = TK(models.WordLevel({"<unk>": 0, "a": 1, "b": 2, "<s>": 3}, unk_token="<unk>"))
    tk.normalizer, tk.pre_tokenizer = normalizers.Replace("#", ""), pre_tokenizers.WhitespaceSplit()
    dropping = Tokenizer(tk, bos_id=3, add_bos=True)  # "#" vanishes: that word has no token
    assert align_words(dropping, ["a", "b"]) == ([3, 1, 2], [1, 2])
    encode_only = type("EncodeOnly", (), dict(bos_id=3, encode=lambda self, t, add_special_tokens=True:
                                              dropping.encode(t, add_special_tokens)))()
    for tokenizer in (dropping, encode_only):  # aligned by offsets, then by prefixes
        with pytest.raises(DataError, match="word 2 .* has no token of its own"):
            align_words(tokenizer, ["a", "#", "b"])
    with pytest.raises(ConfigError, match="LlamaModel"):
        extract_word_features(torch.nn.Linear(2, 2), ChunkTokenizer(words), [words])
    with pytest.raises(DataError, match="labels must lie"):
        train_probe(np.zeros((4, 3), np.float32), np.array([0, 1, 2, 3]), 3)
    # a bare LlamaModel is accepted as well as a LlamaForCausalLM
    features = extract_word_features(LlamaModel(LlamaConfig.tiny()), ChunkTokenizer(words), [words])
    assert features.shape == (3, 64)


def test_eval_probe_command_prints_the_result(synthetic, tiny_llama_dir, capsys):
    from llm2vec_mini.cli import main

    _, files = synthetic
    for extra, attention in (([], "bidirectional"), (["--causal"], "causal")):
        assert main(["eval-probe", "--model", str(tiny_llama_dir), "--train", str(files["word"][0]),
                     "--test", str(files["word"][1]), "--max-sentences", "40", "--device", "cpu",
                     *extra]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["attention"] == attention and result["mode"] == "first"
        assert result["n_train"] > 100 and 0.0 <= result["accuracy"] <= 1.0
    assert main(["eval-probe", "--model", str(tiny_llama_dir), "--train", "missing.conllu",
                 "--test", str(files["word"][1]), "--device", "cpu"]) == 2
    assert "missing.conllu" in capsys.readouterr().err
