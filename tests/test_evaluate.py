"""STS scoring: our numpy correlations against scipy.stats, cosines against torch, evaluate_sts on
encoders whose answer is known, and the real STS-B dev file."""

import math

import numpy as np
import pytest
import torch
from conftest import Reference, missing

from llm2vec_mini.data import STSSubset, load_sts
from llm2vec_mini.errors import DataError
from llm2vec_mini.evaluate import (
    cosine_scores,
    encode_unique,
    evaluate_sts,
    format_table,
    pearson,
    rankdata,
    spearman,
)

scipy = Reference("scipy")

# ----------------------------------------------------------------------------------------- correlations

@pytest.mark.parametrize("seed", range(5))
def test_rankdata_matches_scipy_average_ranks_with_many_ties(seed):
    x = np.random.default_rng(seed).integers(0, 6, size=200).astype(float)  # 6 values in 200: ties everywhere
    np.testing.assert_array_equal(rankdata(x), scipy.stats.rankdata(x, method="average"))


def test_rankdata_small_example():
    np.testing.assert_array_equal(rankdata([10, 20, 20, 5]), [2, 3.5, 3.5, 1])


@pytest.mark.parametrize("n", [2, 3, 7, 50, 1500])
@pytest.mark.parametrize("ties", [False, True])
def test_spearman_and_pearson_match_scipy(n, ties):
    rng = np.random.default_rng(n + 1000 * ties)
    if ties:  # STS-like: gold scores on a coarse grid, predictions with repeats
        x = rng.integers(0, 21, size=n) / 4.0
        y = np.round(x + rng.normal(0, 1.5, size=n), 1)
    else:
        x, y = rng.normal(size=n), rng.normal(size=n)
    if np.all(x == x[0]) or np.all(y == y[0]):
        pytest.skip("this draw is constant")
    assert spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y).statistic, abs=1e-12)
    assert pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y).statistic, abs=1e-12)


def test_correlations_of_monotone_and_reversed_data():
    x = np.linspace(-3, 3, 40)
    assert spearman(x, np.exp(x)) == pytest.approx(1.0, abs=1e-12)  # monotone but not linear
    assert pearson(x, np.exp(x)) < 0.95
    assert spearman(x, -x ** 3) == pytest.approx(-1.0, abs=1e-12)
    assert pearson(x, 2 * x + 1) == pytest.approx(1.0, abs=1e-12)


def test_constant_or_non_finite_input_gives_nan_like_scipy():
    x = np.arange(10.0)
    const = np.full(10, 0.1)  # 0.1 is not exact in binary: a mean-based check could see "variance"
    with pytest.warns(Warning):  # scipy warns and returns nan; we return nan quietly
        assert math.isnan(scipy.stats.spearmanr(x, const).statistic)
    assert math.isnan(spearman(x, const)) and math.isnan(pearson(x, const))
    assert math.isnan(spearman(const, x)) and math.isnan(pearson(const, x))
    bad = x.copy()
    bad[3] = np.nan
    assert math.isnan(spearman(x, bad)) and math.isnan(pearson(bad, x))
    bad[3] = np.inf
    assert math.isnan(spearman(bad, x)) and math.isnan(pearson(x, bad))


def test_bad_correlation_arguments_raise_data_error():
    with pytest.raises(DataError, match="different lengths"):
        spearman([1, 2, 3], [1, 2])
    with pytest.raises(DataError, match="at least 2"):
        pearson([1.0], [2.0])
    with pytest.raises(DataError, match="one-dimensional"):
        spearman(np.ones((3, 2)), np.ones((3, 2)))


def test_cosine_scores_match_torch():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(30, 16)), rng.normal(size=(30, 16))
    expected = torch.nn.functional.cosine_similarity(torch.tensor(a), torch.tensor(b), dim=1).numpy()
    np.testing.assert_allclose(cosine_scores(a, b), expected, rtol=0, atol=1e-12)
    a[0] = 0.0  # a zero vector: cosine 0, not nan
    assert cosine_scores(a, b)[0] == 0.0
    with pytest.raises(DataError, match="one shape"):
        cosine_scores(a, b[:, :8])


# ----------------------------------------------------------------------------------------- evaluate_sts

class UnitCircleEncoder:
    """Sentence "anchor" -> (1, 0); sentence "s<i>" -> (c_i, sqrt(1 - c_i^2)), so cos(anchor, s<i>) = c_i.

    Records every call, to check that each distinct sentence is encoded exactly once.
    """

    def __init__(self, cosines: dict):
        self.cosines, self.calls = cosines, []

    def __call__(self, sentences):
        self.calls.append(list(sentences))
        out = []
        for t in sentences:
            c = 1.0 if t == "anchor" else self.cosines[t]
            out.append([c, math.sqrt(1.0 - c * c)])
        return np.array(out, dtype=np.float32)


def test_evaluate_sts_known_answers_and_encodes_each_sentence_once():
    rng = np.random.default_rng(0)
    gold_a = rng.integers(0, 21, size=60) / 4.0  # scores in [0, 5] with ties
    gold_b = rng.uniform(0, 5, size=40)
    cosines = {f"s{i}": g / 5.0 for i, g in enumerate(gold_a)}  # cosine = gold / 5 exactly
    noisy = np.clip(gold_b[:38] / 5.0 + rng.normal(0, 0.2, size=38), -1, 1)
    cosines.update({f"t{i}": c for i, c in enumerate(noisy)})
    a = STSSubset("exact", ["anchor"] * 60, [f"s{i}" for i in range(60)], list(gold_a))
    # the second subset repeats sentences of the first, and puts "anchor" on the right-hand side
    b = STSSubset("noisy", ["anchor"] * 38 + ["s0", "s1"], [f"t{i}" for i in range(38)] + ["anchor"] * 2,
                  list(gold_b))
    enc = UnitCircleEncoder(cosines)
    results = evaluate_sts(enc, [a, b], batch_size=7)

    assert results["exact"]["spearman"] == pytest.approx(100.0, abs=1e-9)
    assert results["exact"]["pearson"] == pytest.approx(100.0, abs=1e-5)  # float32 embeddings
    assert results["exact"]["n"] == 60
    cos_b = np.array([cosines[f"t{i}"] for i in range(38)] + [cosines["s0"], cosines["s1"]])
    assert results["noisy"]["spearman"] == pytest.approx(100 * scipy.stats.spearmanr(cos_b, gold_b).statistic,
                                                         abs=1e-4)
    assert results["noisy"]["pearson"] == pytest.approx(100 * scipy.stats.pearsonr(cos_b, gold_b).statistic,
                                                        abs=1e-4)
    assert results["average"]["spearman"] == pytest.approx(
        (results["exact"]["spearman"] + results["noisy"]["spearman"]) / 2)
    assert results["average"]["n"] == 100
    assert list(results) == ["exact", "noisy", "average"]

    encoded = [t for call in enc.calls for t in call]
    assert sorted(encoded) == sorted({"anchor", *cosines})  # each distinct sentence, exactly once
    assert all(1 <= len(call) <= 7 for call in enc.calls)


def test_evaluate_sts_accepts_torch_tensors():
    gold = [0.0, 2.5, 5.0, 1.0]
    enc = UnitCircleEncoder({f"s{i}": g / 5 for i, g in enumerate(gold)})
    subset = STSSubset("t", ["anchor"] * 4, [f"s{i}" for i in range(4)], gold)
    results = evaluate_sts(lambda batch: torch.tensor(enc(batch)).requires_grad_(), [subset])
    assert results["t"]["spearman"] == pytest.approx(100.0)


def test_evaluate_sts_rejects_bad_encoders_and_names():
    subset = STSSubset("t", ["a", "b"], ["c", "d"], [1.0, 2.0])
    with pytest.raises(DataError, match=r"returned shape \(3, 4\) for 2 sentences"):
        evaluate_sts(lambda batch: np.zeros((3, 4)), [subset], batch_size=2)
    widths = iter([2, 3])
    with pytest.raises(DataError, match=r"expected \(2, 2\)"):
        encode_unique(lambda batch: np.ones((len(batch), next(widths))), ["a", "b", "c", "d"], batch_size=2)
    with pytest.raises(DataError, match="distinct"):
        evaluate_sts(lambda batch: np.ones((len(batch), 2)), [subset, subset])
    with pytest.raises(DataError, match="batch_size"):
        evaluate_sts(lambda batch: np.ones((len(batch), 2)), [subset], batch_size=0)


def test_format_table_is_aligned_and_holds_the_numbers():
    results = {"sts-dev": {"spearman": 81.234, "pearson": 79.5, "n": 1500},
               "headlines": {"spearman": 7.0, "pearson": -3.25, "n": 42},
               "average": {"spearman": 44.117, "pearson": 38.125, "n": 1542}}
    table = format_table(results)
    lines = table.splitlines()
    assert len({len(line) for line in lines}) == 1  # every line the same width
    rows = [line.split() for line in lines if not line.startswith("-")]
    assert rows[0] == ["subset", "n", "spearman", "pearson"]
    assert rows[1:] == [["sts-dev", "1500", "81.23", "79.50"], ["headlines", "42", "7.00", "-3.25"],
                        ["average", "1542", "44.12", "38.12"]]
    assert lines[-1].startswith("average")


# ----------------------------------------------------------------------------------------- real data

def _bag_of_words(vocab: dict):
    def encode(sentences):
        out = np.zeros((len(sentences), len(vocab)), dtype=np.float32)
        for row, t in enumerate(sentences):
            for w in t.lower().split():
                out[row, vocab[w]] += 1
        return out
    return encode


def test_stsb_dev_bag_of_words_baseline(data_dir):
    path = data_dir / "stsbenchmark" / "sts-dev.csv"
    if not path.is_file():
        missing(f"{path} not found")
    (dev,) = load_sts(path)
    vocab = {}
    for t in dev.sentences1 + dev.sentences2:
        for w in t.lower().split():
            vocab.setdefault(w, len(vocab))
    results = evaluate_sts(_bag_of_words(vocab), [dev], batch_size=256)
    # independent computation: torch cosines of the same count vectors, correlated by scipy. Word counts
    # give many exactly tied cosines (e.g. 1.0 for repeated sentences), and two cosine formulas round
    # such ties differently by an ulp, which reorders them: hence a tolerance of 0.01 points, not 1e-6.
    enc = _bag_of_words(vocab)
    e1, e2 = (torch.tensor(enc(s), dtype=torch.float64) for s in (dev.sentences1, dev.sentences2))
    cos = torch.nn.functional.cosine_similarity(e1, e2).numpy()
    assert results["sts-dev"]["n"] == 1500
    spearman = scipy.stats.spearmanr(cos, dev.scores).statistic
    pearson = scipy.stats.pearsonr(cos, dev.scores).statistic
    assert results["sts-dev"]["spearman"] == pytest.approx(100 * spearman, abs=0.01)
    assert results["sts-dev"]["pearson"] == pytest.approx(100 * pearson, abs=1e-6)
    assert 40 < results["sts-dev"]["spearman"] < 80  # word overlap is a weak but real signal
