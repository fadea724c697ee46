"""Word-level probing: how much part-of-speech information a frozen model's token states carry.

LLM2Vec (paper Sec. 3.1, word-level tasks) first checks what each step does to *token* representations:
a linear classifier is trained on frozen hidden states to tag words (chunking, NER, POS). Switching a
decoder to bidirectional attention without any training hurts these tags; MNTP brings the quality back.
This module repeats that experiment on Universal Dependencies UPOS tags:

    words --(join with spaces, tokenize, BOS in front)--> token ids (T,)
          --(frozen model, no grad, fp32)--> hidden states (T, H), last layer by default
          --(one position per word)--> features (n_words, H)
          --(standardise, softmax regression with L2, full-batch L-BFGS)--> tag accuracy

Which position stands for a word (`mode`):
* "first": the word's first sub-token, the usual choice for encoders (BERT-style token classification).
* "next_token": the position just before it (i - 1; the BOS token for the first word). After MNTP the
  state at i - 1 is trained to predict token i, so it is where a word's identity lives.

How the official code does it (McGill-NLP/llm2vec, `experiments/run_word_task.py`, `test_word_task.py`
and `train_configs/word-task/*.json`, read for this module): CoNLL-2003 `pos_tags` words go to the Hugging
Face tokenizer with `is_split_into_words=True` (each word gets its own leading-space marker, which is the
same as joining the words with single spaces) and the default special tokens (Llama: BOS in front, no EOS).
The features are the base model's last output (after the final norm). Uni and Bi are run with
`retroactive_labels="same_token"` (our "first"); Bi+MNTP and Bi+MNTP+SimCSE with "next_token" (label
moved to position i - 1). All configs set `merge_subwords=True`: a word's sub-token states are averaged
first (in "next_token" mode over the window shifted by one); our `merge_subwords=True` does the same. The
classifier there is a dropout-0.1 linear layer trained with Adam (lr 5e-4, at most 4000 steps, bf16); here
it is the convex equivalent without dropout, solved to convergence, so that a number does not depend on
a learning-rate schedule.

BOS goes in front whenever the tokenizer has one (`bos_id`), also for tokenizers that do not add it on
their own (SmolLM2's): then every word, the first included, has a position before it.

Aligning words to tokens: with a `tokenizers` backend (`tokenizer.tokenizer`, as in our `Tokenizer`) one
encode of the whole sentence and its character offsets suffice: word k starts at the first token that ends
after word k-1 does, so a bare space token ("▁" before a digit in Llama 2) counts as the word's first
sub-token, as `word_ids()` in transformers would count it. Any other tokenizer (only `encode`) is aligned
by encoding each prefix `" ".join(words[:k])`: word k starts at the prefix's length, provided the prefix's
ids begin the sentence's ids. A tokenizer that merges across a word boundary raises `DataError`.

References:
1) BehnamGhader et al., "LLM2Vec", 2024, https://arxiv.org/abs/2404.05961 (Sec. 3.1, word-level tasks)
2) https://github.com/McGill-NLP/llm2vec/blob/main/experiments/run_word_task.py (the official probe)
3) Hewitt & Liang, "Designing and interpreting probes with control tasks", 2019,
   https://arxiv.org/abs/1909.03368 (compare a probe with a baseline, here the majority tag)
4) de Marneffe et al., "Universal Dependencies", 2021, https://doi.org/10.1162/coli_a_00402 (UPOS)
"""

from __future__ import annotations

import time
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import read_conllu
from .errors import ConfigError, DataError, TrainingError
from .model import LlamaModel
from .util import decoder_of, is_int, left_pad

PROBE_MODES = ("first", "next_token")


# ----------------------------------------------------------------------------------------- words -> tokens

def _backend(tokenizer):
    """The wrapped `tokenizers.Tokenizer` (for character offsets), or None."""
    inner = getattr(tokenizer, "tokenizer", None)
    try:
        import tokenizers
    except ImportError:  # pragma: no cover - tokenizers is a runtime dependency
        return None
    return inner if isinstance(inner, tokenizers.Tokenizer) else None


def _starts_by_offsets(tokenizer, text: str, words: Sequence[str]) -> Tuple[List[int], List[int]]:
    enc = _backend(tokenizer).encode(text, add_special_tokens=False)
    ids = list(enc.ids)
    if ids != list(tokenizer.encode(text, add_special_tokens=False)):
        raise DataError(f"the tokenizer's encode and its backend disagree on {text[:60]!r}")
    starts, end_of_previous, t = [0], len(words[0]), 0
    for k in range(1, len(words)):
        while t < len(ids) and enc.offsets[t][1] <= end_of_previous:
            t += 1  # skip the tokens of words 0..k-1
        if t == len(ids) or t <= starts[-1] or enc.offsets[t][0] < end_of_previous:
            raise DataError(f"word {k} ({words[k]!r}) or the one before has no token of its own in "
                            f"{text[:60]!r}: the tokenizer merges them or drops one")
        starts.append(t)
        end_of_previous += 1 + len(words[k])  # the space, then the word
    return ids, starts


def _starts_by_prefixes(tokenizer, text: str, words: Sequence[str]) -> Tuple[List[int], List[int]]:
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    starts = [0]
    for k in range(1, len(words)):
        prefix = list(tokenizer.encode(" ".join(words[:k]), add_special_tokens=False))
        if ids[:len(prefix)] != prefix or len(prefix) <= starts[-1]:
            raise DataError(f"word {k} ({words[k]!r}) or the one before has no token of its own in "
                            f"{text[:60]!r}: the tokens of the words before are not a prefix of the "
                            f"sentence's")
        starts.append(len(prefix))
    return ids, starts


def align_words(tokenizer, words: Sequence[str]) -> Tuple[List[int], List[int]]:
    """Token ids (T,) of `" ".join(words)` with BOS in front (if the tokenizer has one), and for each of
    the n words the index in those ids of its first sub-token (n,). Word k's sub-tokens are
    ids[starts[k]:starts[k+1]] (the last word's run to the end)."""
    if not words:
        raise DataError("a sentence has no words")
    for k, w in enumerate(words):
        if not isinstance(w, str) or not w.strip():
            raise DataError(f"word {k} is empty or not a string: {w!r}")
    text = " ".join(words)
    align = _starts_by_offsets if _backend(tokenizer) is not None else _starts_by_prefixes
    ids, starts = align(tokenizer, text, words)
    if len(ids) <= starts[-1]:
        raise DataError(f"the last word ({words[-1]!r}) has no token in {text[:60]!r}")
    bos = getattr(tokenizer, "bos_id", None)
    if bos is not None:
        ids, starts = [bos] + ids, [s + 1 for s in starts]
    return ids, starts


# ----------------------------------------------------------------------------------------- features

def _decoder(model: nn.Module) -> LlamaModel:
    decoder = decoder_of(model)  # a LlamaForCausalLM: skip the vocabulary head
    if not isinstance(decoder, LlamaModel):
        raise ConfigError(f"expected a LlamaModel or LlamaForCausalLM, got {type(model).__name__}")
    return decoder


def _hidden_states(decoder: LlamaModel, input_ids, attention_mask, layer: Optional[int]) -> torch.Tensor:
    """(B, T) -> (B, T, H): the final output (after the last norm) or the output of decoder layer `layer`."""
    if layer is None:
        return decoder(input_ids, attention_mask=attention_mask)
    captured = []
    handle = decoder.layers[layer].register_forward_hook(lambda module, args, out: captured.append(out))
    try:
        decoder(input_ids, attention_mask=attention_mask)
    finally:
        handle.remove()
    return captured[0]


def _word_vectors(hidden: torch.Tensor, starts: List[int], shift: int, merge_subwords: bool) -> torch.Tensor:
    """One sentence's states (L, H), unpadded, and its word starts (n,) -> (n, H).

    shift=0 reads the first sub-token ("first"), shift=1 the position before it ("next_token").
    With merge_subwords, the average over the word's sub-tokens (each position moved back by shift).
    """
    first = torch.tensor(starts) - shift  # (n,)
    if not merge_subwords:
        return hidden[first]  # (n, H)
    lengths = torch.diff(torch.tensor(starts + [hidden.shape[0]]))  # (n,) sub-tokens per word
    word_of = torch.repeat_interleave(torch.arange(len(starts)), lengths)  # (n_subtokens,)
    positions = torch.arange(starts[0], hidden.shape[0]) - shift  # (n_subtokens,)
    sums = torch.zeros(len(starts), hidden.shape[1], dtype=hidden.dtype)
    sums.index_add_(0, word_of, hidden[positions])  # (n, H): each word's sub-token states added up
    return sums / lengths[:, None].to(hidden.dtype)  # (n, H)


def extract_word_features(model: nn.Module, tokenizer, sentences: Sequence[Sequence[str]],
                          mode: str = "first", batch_size: int = 16, max_length: int = 512,
                          layer: Optional[int] = None, merge_subwords: bool = False) -> np.ndarray:
    """Frozen features of every word of every sentence, in order: (n_words, H) float32.

    model: a LlamaModel or LlamaForCausalLM, used as it is (its `causal` flag picks Uni or Bi).
    tokenizer: `encode(text, add_special_tokens=...)` and `bos_id`/`eos_id`/`pad_id` attributes.
    Sentences are batched by length, padded on the left with pad_id (else eos_id), under an attention mask.
    """
    if mode not in PROBE_MODES:
        raise ConfigError(f"unknown probe mode {mode!r}; valid modes: {', '.join(PROBE_MODES)}")
    if not (is_int(batch_size) and batch_size >= 1 and is_int(max_length) and max_length >= 2):
        raise ConfigError(f"batch_size must be >= 1 and max_length >= 2, got {batch_size!r} and "
                          f"{max_length!r}")
    bos = getattr(tokenizer, "bos_id", None)
    if mode == "next_token" and bos is None:
        raise ConfigError("mode 'next_token' reads the position before each word, and the first word has "
                          "none: the tokenizer needs a BOS token (bos_id is None)")
    decoder = _decoder(model)
    n_layers = len(decoder.layers)
    if layer is not None and not (is_int(layer) and -n_layers <= layer < n_layers):
        raise ConfigError(f"layer must be None (the final output) or in [-{n_layers}, {n_layers}), "
                          f"got {layer!r}")
    pad = next((i for i in (getattr(tokenizer, "pad_id", None), getattr(tokenizer, "eos_id", None), bos)
                if i is not None), 0)  # never attended to, any id will do

    aligned = []
    for i, words in enumerate(sentences):
        try:
            ids, starts = align_words(tokenizer, list(words))
        except DataError as e:
            raise DataError(f"sentence {i}: {e}") from None
        if len(ids) > max_length:
            raise DataError(f"sentence {i} has {len(ids)} tokens, more than max_length={max_length}")
        aligned.append((ids, starts))
    hidden_size = decoder.config.hidden_size
    if not aligned:
        return np.zeros((0, hidden_size), dtype=np.float32)

    device = next(decoder.parameters()).device
    order = sorted(range(len(aligned)), key=lambda i: len(aligned[i][0]))  # similar lengths, less padding
    features: List[Optional[torch.Tensor]] = [None] * len(aligned)
    was_training = decoder.training
    decoder.eval()
    try:
        with torch.no_grad():
            for begin in range(0, len(order), batch_size):
                batch = order[begin:begin + batch_size]
                input_ids, attention_mask = left_pad([aligned[i][0] for i in batch], pad)  # (B, T) each
                T = input_ids.shape[1]
                hidden = _hidden_states(decoder, input_ids.to(device), attention_mask.to(device), layer)
                hidden = hidden.float().cpu()  # (B, T, H)
                for row, i in enumerate(batch):
                    ids, starts = aligned[i]
                    features[i] = _word_vectors(hidden[row, T - len(ids):], starts,
                                                1 if mode == "next_token" else 0, merge_subwords)
    finally:
        decoder.train(was_training)
    return torch.cat(features).numpy()  # (n_words, H)


# ----------------------------------------------------------------------------------------- the probe

class LinearProbe(nn.Module):
    """Softmax regression on standardised features: logits = W (x - mean) / std + b, (N, H) -> (N, C)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, n_classes: int):
        super().__init__()
        self.register_buffer("mean", mean)  # (H,)
        self.register_buffer("std", std)  # (H,)
        self.linear = nn.Linear(mean.shape[0], n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear((x - self.mean) / self.std)  # (N, C)

    @torch.no_grad()
    def predict(self, X) -> np.ndarray:
        """(N, H) features -> (N,) class ids."""
        return self(torch.as_tensor(np.asarray(X), dtype=torch.float32)).argmax(-1).numpy()


def _check_xy(X, y, n_classes: Optional[int] = None, allow_unknown: bool = False):
    X, y = np.asarray(X, dtype=np.float32), np.asarray(y)
    if X.ndim != 2 or y.ndim != 1 or X.shape[0] != y.shape[0]:
        raise DataError(f"expected features (N, H) and labels (N,), got shapes {X.shape} and {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"labels must be integer class ids, got dtype {y.dtype}")
    if not np.isfinite(X).all():
        raise DataError("the features contain NaN or infinite values")
    low = -1 if allow_unknown else 0
    if n_classes is not None and y.size and (y.min() < low or y.max() >= n_classes):
        raise DataError(f"labels must lie in [0, {n_classes}), found {y.min()}..{y.max()}")
    return X, y


def train_probe(X, y, n_classes: int, epochs: int = 200, lr: float = 1.0, weight_decay: float = 1e-2,
                seed: int = 0) -> LinearProbe:
    """Fit a `LinearProbe` to features X (N, H) and labels y (N,) in [0, n_classes).

    Minimises mean cross-entropy + weight_decay / 2 * ||W||^2 (the bias is not penalised) over the whole
    training set with L-BFGS: `epochs` is the most iterations (each a full pass), `lr` L-BFGS's step scale.
    The objective is convex, so the result hardly depends on `seed` (which sets the small initial weights).
    """
    if not (is_int(n_classes) and n_classes >= 2):
        raise ConfigError(f"n_classes must be an integer >= 2, got {n_classes!r}")
    if not (is_int(epochs) and epochs >= 1 and lr > 0 and weight_decay >= 0):
        raise ConfigError(f"need epochs >= 1, lr > 0, weight_decay >= 0; got {epochs!r}, {lr!r}, "
                          f"{weight_decay!r}")
    X, y = _check_xy(X, y, n_classes)
    if X.shape[0] == 0:
        raise DataError("no training examples")
    X, y = torch.from_numpy(X), torch.from_numpy(y.astype(np.int64))
    mean, std = X.mean(0), X.std(0, correction=0)  # (H,) each
    std = torch.where(std > 1e-6, std, torch.ones_like(std))  # a constant feature stays as it is
    probe = LinearProbe(mean, std, n_classes)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        probe.linear.weight.copy_(0.01 * torch.randn(probe.linear.weight.shape, generator=generator))
        probe.linear.bias.zero_()
    Z = (X - mean) / std  # (N, H), standardised once
    optimizer = torch.optim.LBFGS(probe.linear.parameters(), lr=lr, max_iter=epochs, history_size=20,
                                  tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(probe.linear(Z), y) + 0.5 * weight_decay * probe.linear.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        loss = optimizer.step(closure)
    if not torch.isfinite(loss):
        raise TrainingError(f"the probe's loss is {loss.item()}; check the features")
    return probe.eval()


def probe_accuracy(probe: LinearProbe, X, y) -> float:
    """Fraction of words whose predicted tag is the gold one; a label -1 (a tag never seen in training)
    always counts as wrong."""
    X, y = _check_xy(X, y, probe.linear.out_features, allow_unknown=True)
    if X.shape[0] == 0:
        raise DataError("no test examples")
    return float((probe.predict(X) == y).mean())


# ----------------------------------------------------------------------------------------- the experiment

def _load(path, max_sentences: Optional[int]):
    sentences = read_conllu(path)
    if max_sentences is not None:
        sentences = sentences[:max_sentences]
    if not sentences:
        raise DataError(f"{path}: no sentences")
    return [words for words, _ in sentences], [tag for _, tags in sentences for tag in tags]


def run_probe(model: nn.Module, tokenizer, train_path, test_path, mode: str = "first",
              max_sentences: Optional[int] = None, batch_size: int = 16, max_length: int = 512,
              layer: Optional[int] = None, merge_subwords: bool = False, epochs: int = 200, lr: float = 1.0,
              weight_decay: float = 1e-2, seed: int = 0) -> dict:
    """Train a UPOS probe on the words of one CoNLL-U file and test it on another.

    Uses the model's attention as it is set (`set_causal(True)`: Uni, `False`: Bi). max_sentences keeps
    the first sentences of each file. Returns accuracy, majority_baseline (the most frequent training tag's
    share of the test words), train_accuracy, n_train and n_test words, n_classes, n_unseen_test (test
    words whose tag the training file lacks; always wrong), and the settings used.
    """
    if max_sentences is not None and not (isinstance(max_sentences, int) and max_sentences >= 1):
        raise ConfigError(f"max_sentences must be None or a positive integer, got {max_sentences!r}")
    train_words, train_tags = _load(train_path, max_sentences)
    test_words, test_tags = _load(test_path, max_sentences)
    tagset = sorted(set(train_tags))
    if len(tagset) < 2:
        raise DataError(f"{train_path}: a probe needs at least 2 distinct tags, found {tagset}")
    index = {tag: i for i, tag in enumerate(tagset)}
    y_train = np.array([index[t] for t in train_tags])
    y_test = np.array([index.get(t, -1) for t in test_tags])

    kwargs = dict(mode=mode, batch_size=batch_size, max_length=max_length, layer=layer,
                  merge_subwords=merge_subwords)
    X_train = extract_word_features(model, tokenizer, train_words, **kwargs)  # (n_train, H)
    X_test = extract_word_features(model, tokenizer, test_words, **kwargs)  # (n_test, H)
    probe = train_probe(X_train, y_train, len(tagset), epochs=epochs, lr=lr, weight_decay=weight_decay,
                        seed=seed)
    majority = np.bincount(y_train, minlength=len(tagset)).argmax()
    return dict(accuracy=probe_accuracy(probe, X_test, y_test),
                majority_baseline=float((y_test == majority).mean()),
                train_accuracy=probe_accuracy(probe, X_train, y_train),
                n_train=int(len(y_train)), n_test=int(len(y_test)), n_classes=len(tagset),
                n_unseen_test=int((y_test < 0).sum()), mode=mode,
                attention="causal" if _decoder(model).causal else "bidirectional",
                layer="last" if layer is None else layer, merge_subwords=merge_subwords)


def probe_main(model: nn.Module, tokenizer, train, test, mode: str = "first",
               max_sentences: Optional[int] = None) -> dict:
    """The `eval-probe` command: `run_probe` with the default probe settings, plus the file names and the
    wall time; every value is a str, int or float, ready to print or dump as JSON."""
    start = time.perf_counter()
    result = run_probe(model, tokenizer, train, test, mode=mode, max_sentences=max_sentences)
    result.update(train=str(train), test=str(test), seconds=round(time.perf_counter() - start, 1))
    return result
