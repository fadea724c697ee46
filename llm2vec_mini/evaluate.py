"""Scoring sentence embeddings on STS: cosine similarity of each pair against the human score, by correlation.

The STS protocol used by LLM2Vec (through MTEB) and by SentEval/SimCSE: embed both sentences of every pair,
take the cosine similarity of the two vectors, and report the Spearman rank correlation between those
cosines and the gold scores, times 100. Spearman only asks that more similar pairs get higher cosines, not
that cosine be a linear function of the score, which is why it replaced Pearson as the headline number
(Reimers et al., 2016). We report Pearson too.

Both correlations are written here in numpy. Spearman is Pearson on ranks, where tied values share the
average of the ranks they span (STS gold scores tie a lot: STS-B dev has 1,500 pairs but few distinct scores).
A correlation is undefined when one side is constant, or when a value is NaN or infinite (a collapsed or
diverged encoder): we then return `nan`, as scipy.stats does, rather than raise, so that one bad subset does
not hide the others in a table. Inputs of different lengths or with fewer than two points raise `DataError`.

References:
1) BehnamGhader et al., "LLM2Vec", 2024, https://arxiv.org/abs/2404.05961, Sec. 3.2 (MTEB, whose STS tasks
   score the Spearman correlation of cosines; the STS results are in Tables 1 and 11)
2) Muennighoff et al., "MTEB: Massive Text Embedding Benchmark", 2023, https://arxiv.org/abs/2210.07316
3) Reimers, Beyer and Gurevych, "Task-Oriented Intrinsic Evaluation of Semantic Textual Similarity",
   COLING 2016, https://aclanthology.org/C16-1009 (why Spearman)
4) Cer et al., "SemEval-2017 Task 1" (STS Benchmark), 2017, https://aclanthology.org/S17-2001
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from .data import STSSubset
from .errors import DataError

AVERAGE = "average"  # the name of the summary row


# ----------------------------------------------------------------------------------------- correlations

def _vector(x, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise DataError(f"{name} must be one-dimensional, got shape {x.shape}")
    return x


def _pair(x, y):
    x, y = _vector(x, "x"), _vector(y, "y")
    if x.shape != y.shape:
        raise DataError(f"x and y have different lengths: {x.shape[0]} and {y.shape[0]}")
    if x.shape[0] < 2:
        raise DataError(f"a correlation needs at least 2 points, got {x.shape[0]}")
    return x, y


def rankdata(x) -> np.ndarray:
    """(N,) values -> (N,) ranks 1..N, where tied values share the average of the ranks they span.

    Example: [10, 20, 20, 5] -> [2, 3.5, 3.5, 1] (the two 20s span ranks 3 and 4).
    """
    x = _vector(x, "x")
    values, group_of, counts = np.unique(x, return_inverse=True, return_counts=True)  # sorted distinct values
    last = np.cumsum(counts)  # (G,) the highest rank each group of equal values spans
    first = last - counts + 1  # (G,) its lowest rank
    return ((first + last) / 2.0)[group_of.reshape(-1)]


def pearson(x, y) -> float:
    """Pearson correlation of two (N,) sequences; nan when either is constant or not all finite."""
    x, y = _pair(x, y)
    if not (np.isfinite(x).all() and np.isfinite(y).all()) or (x == x[0]).all() or (y == y[0]).all():
        return math.nan
    dx, dy = x - x.mean(), y - y.mean()
    r = float(dx @ dy / math.sqrt(float(dx @ dx) * float(dy @ dy)))
    return max(-1.0, min(1.0, r))  # rounding can step just past +-1


def spearman(x, y) -> float:
    """Spearman rank correlation of two (N,) sequences (Pearson on average ranks); nan as for `pearson`."""
    x, y = _pair(x, y)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return math.nan
    return pearson(rankdata(x), rankdata(y))


def cosine_scores(emb1, emb2, eps: float = 1e-12) -> np.ndarray:
    """Row-wise cosine similarity: (N, d) and (N, d) -> (N,). A zero vector has cosine 0 with anything."""
    a, b = np.asarray(emb1, dtype=np.float64), np.asarray(emb2, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise DataError(f"cosine_scores needs two (N, d) arrays of one shape, got {a.shape} and {b.shape}")
    norms = np.maximum(np.linalg.norm(a, axis=1), eps) * np.maximum(np.linalg.norm(b, axis=1), eps)  # (N,)
    return np.einsum("nd,nd->n", a, b) / norms


# ----------------------------------------------------------------------------------------- STS evaluation

def _to_numpy(out) -> np.ndarray:
    if hasattr(out, "detach"):  # a torch tensor, without importing torch here
        out = out.detach().float().cpu().numpy()
    return np.asarray(out, dtype=np.float64)


def encode_unique(encode_fn: Callable[[List[str]], np.ndarray], sentences: Sequence[str],
                  batch_size: Optional[int] = None, progress: bool = False) -> Dict[str, np.ndarray]:
    """Call `encode_fn` on each distinct sentence once, `batch_size` at a time -> {sentence: (d,) vector}.

    batch_size None: one call with every sentence (an encoder that batches by length itself, like
    `LLM2Vec.encode`, wastes the least padding that way).
    """
    unique = list(dict.fromkeys(sentences))  # distinct, in order of first appearance
    if batch_size is None:
        batch_size = max(1, len(unique))
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    starts = range(0, len(unique), batch_size)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc="encoding", unit="batch")
    table, width = {}, None
    for start in starts:
        batch = unique[start:start + batch_size]
        emb = _to_numpy(encode_fn(batch))  # (B, d)
        if emb.ndim != 2 or emb.shape[0] != len(batch) or (width is not None and emb.shape[1] != width):
            expected = f"({len(batch)}, {'d' if width is None else width})"
            raise DataError(f"encode_fn returned shape {emb.shape} for {len(batch)} sentences; "
                            f"expected {expected}")
        width = emb.shape[1]
        table.update(zip(batch, emb))
    return table


def evaluate_sts(encode_fn: Callable[[List[str]], np.ndarray], subsets: Sequence[STSSubset],
                 batch_size: Optional[int] = None, progress: bool = False) -> Dict[str, Dict[str, float]]:
    """Score an encoder on STS subsets.

    encode_fn: list of B sentences -> (B, d) embeddings (numpy, or a CPU torch tensor). Every distinct
    sentence across all subsets is encoded once. Returns {subset name: {"spearman": 100*rho, "pearson":
    100*r, "n": pairs}} in the subsets' order, then "average": the unweighted mean over subsets (as MTEB
    averages its STS tasks), with n the total number of pairs.
    """
    names = [s.name for s in subsets]
    if not names:
        raise DataError("evaluate_sts needs at least one STS subset")
    if len(set(names)) != len(names) or AVERAGE in names:
        raise DataError(f"STS subset names must be distinct and not {AVERAGE!r}: {names}")
    table = encode_unique(encode_fn, [t for s in subsets for t in (*s.sentences1, *s.sentences2)],
                          batch_size, progress)
    results: Dict[str, Dict[str, float]] = {}
    for subset in subsets:
        emb1 = np.stack([table[t] for t in subset.sentences1])  # (N, d)
        emb2 = np.stack([table[t] for t in subset.sentences2])  # (N, d)
        cos = cosine_scores(emb1, emb2)  # (N,)
        results[subset.name] = {"spearman": 100.0 * spearman(cos, subset.scores),
                                "pearson": 100.0 * pearson(cos, subset.scores), "n": len(subset)}
    rows = list(results.values())
    results[AVERAGE] = {"spearman": float(np.mean([r["spearman"] for r in rows])),
                        "pearson": float(np.mean([r["pearson"] for r in rows])),
                        "n": sum(r["n"] for r in rows)}
    return results


def format_table(results: Dict[str, Dict[str, float]]) -> str:
    """The dict from `evaluate_sts` -> an aligned plain-text table, one row per subset, the average last."""
    header = ("subset", "n", "spearman", "pearson")
    names = [k for k in results if k != AVERAGE] + ([AVERAGE] if AVERAGE in results else [])
    rows = [(k, str(results[k]["n"]), f"{results[k]['spearman']:.2f}", f"{results[k]['pearson']:.2f}")
            for k in names]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    lines = ["  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])])
             for r in [header, *rows]]
    lines.insert(1, "-" * len(lines[0]))
    if AVERAGE in results and len(rows) > 1:
        lines.insert(len(lines) - 1, "-" * len(lines[0]))
    return "\n".join(lines)
