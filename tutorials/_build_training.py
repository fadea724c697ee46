"""Writes tutorials 04-07 as clean notebooks (no outputs): `.venv/bin/python tutorials/_build_training.py`.

Same conventions as `_build.py` (whose `md`, `code` and `write` helpers it uses): the cells live here
as plain strings, the test suite executes the notebooks, nothing is executed here.

    04 pooling and encoding    05 LoRA    06 MNTP (LLM2Vec step 2)    07 SimCSE (LLM2Vec step 3)

Each runs on a tiny random model with a word-level tokenizer built in the notebook. Cells that use
the real SmolLM2-135M are gated by one environment variable, `LLM2VEC_MINI_REAL=1`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _build import code, md, write  # noqa: E402  (after the path is set)

# The tiny tokenizer every notebook builds: one token per word, so that a reader can name each token.
WORD_TOKENIZER = r'''
def word_tokenizer(texts):
    """One token per lowercased word or punctuation mark of `texts`; <s> = BOS, </s> = EOS and padding."""
    specials = ["<unk>", "<s>", "</s>", "_"]  # ids 0, 1, 2, 3; "_" is MNTP's mask token (tutorial 06)
    split = pre_tokenizers.Whitespace()  # the regex \w+|[^\w\s]+
    words = sorted({w for t in texts for w, _ in split.pre_tokenize_str(t.lower())} - set(specials))
    raw = RawTokenizer(models.WordLevel({w: i for i, w in enumerate(specials + words)}, unk_token="<unk>"))
    raw.normalizer = normalizers.Lowercase()
    raw.pre_tokenizer = split
    raw.add_special_tokens(["<s>", "</s>"])  # recognised whole inside a text, never split
    return Tokenizer(raw, bos_id=1, eos_id=2, pad_id=2, add_bos=True)
'''.strip("\n")

REAL_GATE = r'''
REAL = os.environ.get("LLM2VEC_MINI_REAL") == "1"  # the one switch for the SmolLM2 cells
'''.strip("\n")


def real_model_cell(var: str, path: str, what: str) -> str:
    """The head of a cell that runs only with LLM2VEC_MINI_REAL=1 and the data file at hand."""
    return (f"from llm2vec_mini.data import read_lines\n"
            f"from llm2vec_mini.hub import find_data_dir, smollm2_path\n\n"
            f'DATA = find_data_dir(needs=["{path}"])  # $LLM2VEC_MINI_DATA, the download cache, ../shared/data\n'
            f'{var} = DATA / "{path}" if DATA else None\n'
            f"if not REAL:\n"
            f'    print("skipped: set LLM2VEC_MINI_REAL=1 to {what}")\n'
            f"elif {var} is None:\n"
            f'    print("skipped: no data folder holds {path} (python -m llm2vec_mini download data)")\n'
            f"else:\n"
            f"    import llm2vec_mini\n\n"
            f"    torch.set_num_threads(os.cpu_count() or 1)  # a real model: use every core")


# =================================================================================================
# 04: pooling and encoding

POOLING = [
md(r"""
# 04 · Pooling and encoding: from token states to one vector per text

A decoder gives one hidden state per token; a text encoder must give one vector per text. LLM2Vec
([BehnamGhader et al., 2024](https://arxiv.org/abs/2404.05961)) offers five ways to pool the hidden
states $h_1, \dots, h_T$ (its experiments compare them), and reads its inputs the way
instruction-tuned embedders do: an instruction, then the text, with only the text pooled. This
notebook covers what `llm2vec_mini.pooling` and `llm2vec_mini.encoder.LLM2Vec` do with a batch:

1. the five pooling modes, side by side on one padded batch;
2. an instruction + text input, with its attention mask and its embed mask drawn;
3. cosine similarities of a handful of sentences;
4. the STS-B benchmark: does the cosine of two embeddings follow the human similarity score?

A tiny random model with a word-level tokenizer built here runs everything in seconds. The cells
that use the real SmolLM2-135M run only with **`LLM2VEC_MINI_REAL=1`** in the environment (and the
model in the cache: `python -m llm2vec_mini download smollm2`); otherwise they print that they were
skipped. STS-B is read from the data folder (`$LLM2VEC_MINI_DATA`, the download cache of
`python -m llm2vec_mini download data`, or `../../shared/data`), and skipped when there is none.
"""),
code(r"""
import os

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import models, normalizers, pre_tokenizers
from torch.testing import assert_close

from llm2vec_mini import LlamaConfig, LlamaForCausalLM, LLM2Vec
from llm2vec_mini.pooling import POOLING_MODES, pool
from llm2vec_mini.tokenizer import Tokenizer

""" + REAL_GATE + r"""
torch.set_num_threads(1)  # tiny matrices: one thread is the fastest, and fair to a shared CPU
torch.manual_seed(0)


""" + WORD_TOKENIZER + r"""


SENTENCES = ["A man is playing a guitar.", "A man plays the guitar.",
             "A woman is slicing an onion.", "Someone is cutting an onion.",
             "The stock market fell sharply today.", "Shares dropped on Wall Street."]
INSTRUCTION = "Retrieve a sentence with the same meaning:"
tokenizer = word_tokenizer(SENTENCES + [INSTRUCTION])
model = LlamaForCausalLM(LlamaConfig.tiny(vocab_size=tokenizer.vocab_size))
# bidirectional by default; fp32, so that the checks below can redo it to the last bits (the default,
# dtype="auto", computes in bf16 where this CPU runs that faster: llm2vec_mini/precision.py)
encoder = LLM2Vec(model, tokenizer, pooling="mean", device="cpu", dtype=torch.float32)
print(tokenizer)
print([tokenizer.id_to_token(i) for i in tokenizer.encode(SENTENCES[0])])
"""),
md(r"""
## 1. Five ways to pool

Write $S = \{t_1 < t_2 < \dots < t_n\}$ for the positions that are pooled (the *embed mask*: the
text's tokens, without BOS or instruction) and $R$ for the real, non-padding positions (the
*attention mask*). LLM2Vec's modes are

$$
e_{\text{mean}} = \frac{1}{n} \sum_{k=1}^{n} h_{t_k}, \qquad
e_{\text{weighted}} = \sum_{k=1}^{n} \frac{k}{n(n+1)/2}\, h_{t_k}, \qquad
e_{\text{eos}} = e_{\text{last}} = h_{\max R}, \qquad
e_{\text{bos}} = h_{\min R}.
$$

The weighted mean, from SGPT ([Muennighoff, 2022](https://arxiv.org/abs/2202.08904)), trusts later
tokens more: in a causal decoder only they have read the whole text. `eos_token` and `last_token`
take the same position; they differ in the input, since the encoder appends an EOS token to the text
for `eos_token`. The batch is padded on the **left**, as the official library does, so the last
column is always a real token.

Below: three rows, one per padding situation, checked against a per-row loop over the positions.
"""),
code(r"""
B, T, H = 3, 7, 5
hidden = torch.randn(B, T, H)  # (B, T, H)
attention_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1],   # 2 pads, then BOS + instruction + text
                               [1, 1, 1, 1, 1, 1, 1],   # no padding
                               [0, 0, 0, 0, 1, 1, 1]])  # 4 pads
embed_mask = torch.tensor([[0, 0, 0, 0, 1, 1, 1],       # BOS and a 2-token instruction not pooled
                           [0, 1, 1, 1, 1, 1, 1],       # only BOS not pooled
                           [0, 0, 0, 0, 0, 1, 1]])


def pool_by_hand(h, real, pooled, mode):
    # one row: h (T, H), real and pooled (T,) of 0/1; the equations above, position by position
    R = [t for t in range(len(real)) if real[t]]
    S = [t for t in range(len(pooled)) if pooled[t]]
    n = len(S)
    if mode == "mean":
        return sum(h[t] for t in S) / n
    if mode == "weighted_mean":
        return sum(k * h[t] for k, t in enumerate(S, start=1)) / (n * (n + 1) / 2)
    if mode in ("eos_token", "last_token"):
        return h[max(R)]
    return h[min(R)]  # bos_token


for mode in POOLING_MODES:
    pooled = pool(hidden, attention_mask, embed_mask, mode)  # (B, H)
    for b in range(B):
        assert_close(pooled[b], pool_by_hand(hidden[b], attention_mask[b], embed_mask[b], mode))
print("all five modes agree with the per-row equations:", ", ".join(POOLING_MODES))
"""),
md(r"""
Every mode is linear in the hidden states: $e = \sum_t w_t h_t$ with weights $w_t$ that depend only on
the masks. Feeding one-hot "hidden states" $h_t = \mathbf{1}_t$ makes a mode return its weights, which
we can draw. Padding (hatched) never gets weight.
"""),
code(r"""
one_hot = torch.eye(T).expand(B, T, T)  # (B, T, T): h_t = the t-th unit vector
weights = {mode: pool(one_hot, attention_mask, embed_mask, mode) for mode in POOLING_MODES}  # (B, T)

fig, axes = plt.subplots(1, len(POOLING_MODES), figsize=(15, 2.4), sharey=True)
for ax, (mode, w) in zip(axes, weights.items()):
    ax.imshow(w, cmap="Blues", vmin=0, vmax=1)
    for b in range(B):
        for t in range(T):
            if attention_mask[b, t] == 0:
                ax.add_patch(plt.Rectangle((t - 0.5, b - 0.5), 1, 1, fill=False, hatch="///",
                                           color="gray", lw=0))
            elif w[b, t] > 0:
                ax.text(t, b, f"{w[b, t]:.2f}".lstrip("0"), ha="center", va="center", fontsize=7)
    ax.set_title(mode)
    ax.set_xlabel("position t")
axes[0].set_ylabel("row")
fig.tight_layout()
plt.show()

for mode, w in weights.items():
    assert_close(w.sum(-1), torch.ones(B))  # a weighted average: the weights sum to one
    assert (w[attention_mask == 0] == 0).all()  # padding never counts
    assert_close(pool(hidden, attention_mask, embed_mask, mode), torch.einsum("bt,bth->bh", w, hidden))
"""),
md(r"""
## 2. Instruction + text: what the model reads and what is pooled

`LLM2Vec.encode` takes a string, or an `[instruction, text]` pair. Following the official library it
joins them as `instruction + " " + SEPARATOR + text`, where `SEPARATOR` (in `llm2vec_mini.encoder`) is
the marker `!@#$%^&*()`: it is removed before tokenising, and only tells where the text begins. Then

* the **attention mask** marks every real token: BOS, instruction and text all take part in attention
  (in both directions, after LLM2Vec's first step);
* the **embed mask** marks the last $n$ tokens, $n$ being the token count of the text tokenised
  alone: only they are pooled (`skip_instruction=True`).

`prepare` tokenises, `collate` pads on the left with the EOS id. The figure draws both masks over the
tokens of a batch of three.
"""),
code(r"""
batch = [[INSTRUCTION, "A man is playing a guitar."],
         "Someone is cutting an onion.",
         [INSTRUCTION, "Shares dropped."]]
input_ids, attention, embed = encoder.collate(encoder.prepare(batch))  # (B, T) each
names = [[tokenizer.id_to_token(i) for i in row] for row in input_ids.tolist()]

fig, axes = plt.subplots(2, 1, figsize=(12, 3.6))
for ax, mask, title in zip(axes, (attention, embed), ("attention mask: who takes part in attention",
                                                       "embed mask: who is pooled")):
    ax.imshow(mask, cmap="Greens", vmin=0, vmax=2.5)
    for b, row in enumerate(names):
        for t, name in enumerate(row):
            ax.text(t, b, name, ha="center", va="center", fontsize=7,
                    color="black" if attention[b, t] else "gray")
    ax.set_title(title, fontsize=10)
    ax.set_yticks(range(len(batch)))
    ax.set_xticks([])
fig.tight_layout()
plt.show()

for b, item in enumerate(batch):
    instruction, text = item if isinstance(item, list) else ("", item)
    full = tokenizer.encode(f"{instruction} {text}".strip())  # BOS + instruction + text
    alone = tokenizer.encode(text, add_special_tokens=False)  # the text's own tokens
    n_real, n_text = int(attention[b].sum()), int(embed[b].sum())
    assert n_real == len(full) and n_text == len(alone)
    assert attention[b, -n_real:].all() and not attention[b, :-n_real].any()  # padding on the left
    assert input_ids[b, -n_real:].tolist() == full and input_ids[b, -n_text:].tolist() == alone
    assert (input_ids[b, :-n_real] == tokenizer.eos_id).all()  # padded with EOS
print("rows:", [int(a.sum()) for a in attention], "real tokens,", [int(e.sum()) for e in embed], "pooled")
"""),
md(r"""
`encode` is then the model's bidirectional forward pass followed by the pooling. We redo it by hand:
run the `LlamaModel` on the padded batch and average the hidden states over the embed mask. The
instruction is never pooled, yet it changes the embedding: the text's tokens attend to it.
"""),
code(r"""
embeddings = encoder.encode(batch, convert_to="torch")  # (3, hidden)
with torch.no_grad():
    states = encoder.model(input_ids, attention)  # (B, T, hidden)
by_hand = torch.stack([states[b][embed[b].bool()].mean(0) for b in range(len(batch))])
assert_close(embeddings, by_hand)

without = encoder.encode([item[1] if isinstance(item, list) else item for item in batch],
                         convert_to="torch")
moved = (embeddings - without).norm(dim=-1)  # (3,)
print("how far the instruction moves each embedding:", moved)
assert moved[0] > 1e-3 and moved[2] > 1e-3 and moved[1] < 1e-5  # the middle text had no instruction
"""),
md(r"""
## 3. Cosine similarity

Embeddings are compared by the cosine of their angle,
$\cos(u, v) = \frac{u^\top v}{\lVert u \rVert\, \lVert v \rVert}$; with `normalize=True` the encoder
returns unit vectors, and the cosine matrix is a plain product $E E^\top$. The tiny model is random,
so its similarities reflect only the words that sentences share (and their positions).
"""),
code(r"""
unit = encoder.encode(SENTENCES, normalize=True, convert_to="torch")  # (6, hidden), unit rows
cosines = unit @ unit.T  # (6, 6)

raw = encoder.encode(SENTENCES, convert_to="torch")
by_hand = torch.tensor([[float(raw[i] @ raw[j] / (raw[i].norm() * raw[j].norm()))
                         for j in range(len(SENTENCES))] for i in range(len(SENTENCES))])
assert_close(cosines, by_hand, atol=1e-5, rtol=1e-5)
assert_close(cosines.diagonal(), torch.ones(len(SENTENCES)))
assert_close(cosines, cosines.T)


def heatmap(ax, matrix, labels, title):
    image = ax.imshow(matrix, cmap="viridis", vmin=float(matrix.min()), vmax=1)
    ax.set_xticks(range(len(labels)))
    ax.set_yticks(range(len(labels)), [f"{s}  {i}" for i, s in enumerate(labels)], fontsize=8)
    middle = (float(matrix.min()) + 1) / 2
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if matrix[i, j] > middle else "white")
    ax.set_title(title, fontsize=10)
    return image


fig, ax = plt.subplots(figsize=(5.5, 4.5))
fig.colorbar(heatmap(ax, cosines, SENTENCES, "tiny random model, mean pooling"), ax=ax)
fig.tight_layout()
plt.show()
"""),
md(r"""
## 4. STS-B: Spearman correlation with human scores

The STS Benchmark ([Cer et al., 2017](https://aclanthology.org/S17-2001)) pairs sentences with a human
similarity score from 0 to 5. An encoder is scored, as in LLM2Vec (through MTEB), by the Spearman
correlation between the cosines $c_i$ of the pairs and the gold scores $g_i$: the Pearson correlation
of their ranks,

$$
\rho = \frac{\sum_i \big(\mathrm{rk}(c)_i - \overline{\mathrm{rk}(c)}\big)\big(\mathrm{rk}(g)_i - \overline{\mathrm{rk}(g)}\big)}
{\sqrt{\sum_i \big(\mathrm{rk}(c)_i - \overline{\mathrm{rk}(c)}\big)^2}\sqrt{\sum_i \big(\mathrm{rk}(g)_i - \overline{\mathrm{rk}(g)}\big)^2}},
$$

reported $\times 100$. Only the order of the cosines matters. In the test suite we score 100 pairs of the
dev set (every 15th) with a tiny random model whose vocabulary holds their words: it measures little
more than word overlap. `evaluate_sts` is checked against `scipy.stats.spearmanr`.
"""),
code(r"""
from llm2vec_mini.data import STSSubset, load_sts
from llm2vec_mini.evaluate import cosine_scores, evaluate_sts
from llm2vec_mini.hub import find_data_dir

DATA = find_data_dir(needs=["stsbenchmark/sts-dev.csv"])  # $LLM2VEC_MINI_DATA, the download cache, ../shared/data
dev = load_sts(DATA / "stsbenchmark" / "sts-dev.csv")[0] if DATA else None
if dev is None:
    if os.environ.get("LLM2VEC_MINI_REQUIRE_DATA") == "1":
        raise FileNotFoundError("no data folder holds stsbenchmark/sts-dev.csv (LLM2VEC_MINI_REQUIRE_DATA=1)")
    print("skipped: no data folder holds stsbenchmark/sts-dev.csv (python -m llm2vec_mini download data)")
else:
    sample = STSSubset("sts-dev (every 15th pair)", dev.sentences1[::15], dev.sentences2[::15],
                       dev.scores[::15])
    sts_tokenizer = word_tokenizer(sample.sentences1 + sample.sentences2)
    torch.manual_seed(0)
    sts_model = LlamaForCausalLM(LlamaConfig.tiny(vocab_size=sts_tokenizer.vocab_size))
    sts_encoder = LLM2Vec(sts_model, sts_tokenizer, pooling="mean", device="cpu")
    scores = evaluate_sts(sts_encoder.encode, [sample])[sample.name]
    print(f"{len(sample)} pairs, vocabulary of {sts_tokenizer.vocab_size} words: "
          f"Spearman {scores['spearman']:.2f}, Pearson {scores['pearson']:.2f}")

    # The same number, independently: torch's cosine, scipy's Spearman and numpy's Pearson.
    from scipy.stats import spearmanr
    e1 = torch.from_numpy(sts_encoder.encode(sample.sentences1)).double()  # (N, hidden)
    e2 = torch.from_numpy(sts_encoder.encode(sample.sentences2)).double()
    cos = F.cosine_similarity(e1, e2, dim=-1).numpy()  # (N,), in float64 as evaluate_sts does
    assert np.allclose(cos, cosine_scores(e1.numpy(), e2.numpy()), atol=1e-12)
    # (batched differently than inside evaluate_sts, so the embeddings may differ by rounding)
    assert abs(scores["spearman"] - 100 * spearmanr(cos, sample.scores).statistic) < 1e-3
    assert abs(scores["pearson"] - 100 * np.corrcoef(cos, sample.scores)[0, 1]) < 1e-3

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.scatter(sample.scores, cos, s=12)
    ax.set_xlabel("gold score (0-5)")
    ax.set_ylabel("cosine of the embeddings")
    ax.set_title(f"tiny random model: Spearman {scores['spearman']:.1f}", fontsize=10)
    fig.tight_layout()
    plt.show()
"""),
md(r"""
## 5. The real model (`LLM2VEC_MINI_REAL=1`)

SmolLM2-135M-Instruct ([Allal et al., 2025](https://arxiv.org/abs/2502.02737)) on the whole STS-B dev
set (1,500 pairs), mean pooling, with its attention causal (the decoder as trained) and bidirectional
(LLM2Vec's first step alone). The paper finds that switching to bidirectional attention without
training hurts most models: the decoder was never trained to read the future. Steps 2 and 3
(tutorials 06 and 07) are there to fix that. Each of the two cells encodes about 3,000 sentences: a
minute or two on a GPU or a laptop's CPU, and about 16 minutes each on a busy 2-core CPU, where our
run gave Spearman 54.2 (causal) and 28.5 (bidirectional).
"""),
code(r"""
from llm2vec_mini.hub import smollm2_path

real_scores = {}
if not REAL:
    print("skipped: set LLM2VEC_MINI_REAL=1 to run SmolLM2 on STS-B dev")
elif dev is None:
    print("skipped: no data folder holds stsbenchmark/sts-dev.csv")
else:
    import llm2vec_mini

    torch.set_num_threads(os.cpu_count() or 1)  # a real model: use every core
    real_model, real_tokenizer = llm2vec_mini.load_pretrained(smollm2_path())
    real = LLM2Vec(real_model, real_tokenizer, pooling="mean", bidirectional=False)  # CUDA if available
    result = evaluate_sts(lambda texts: real.encode(texts, batch_size=64), [dev])
    real_scores["causal"] = result[dev.name]["spearman"]
    print(f"SmolLM2, causal, mean pooling: STS-B dev Spearman {real_scores['causal']:.2f}")
"""),
code(r"""
if not real_scores:
    print("skipped: the causal run above did not run")
else:
    real.model.set_causal(False)  # LLM2Vec step 1, no training
    result = evaluate_sts(lambda texts: real.encode(texts, batch_size=64), [dev])
    real_scores["bidirectional"] = result[dev.name]["spearman"]
    print({k: round(v, 2) for k, v in real_scores.items()})

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, 1.6]})
    axes[0].bar(list(real_scores), list(real_scores.values()), color=["tab:gray", "tab:blue"])
    axes[0].set_ylabel("STS-B dev Spearman x 100")
    axes[0].set_title("SmolLM2-135M, mean pooling, no training", fontsize=10)
    real.model.set_causal(True)
    real_unit = real.encode(SENTENCES, normalize=True, convert_to="torch")
    real_cosines = real_unit @ real_unit.T
    fig.colorbar(heatmap(axes[1], real_cosines, SENTENCES, "SmolLM2, causal, mean pooling"), ax=axes[1])
    fig.tight_layout()
    plt.show()
    assert_close(real_cosines.diagonal(), torch.ones(len(SENTENCES)), atol=1e-5, rtol=0)
    assert real_scores["bidirectional"] < real_scores["causal"]  # the switch alone hurts SmolLM2 too
"""),
md(r"""
## What we have

An embedding is a weighted average of token states, the weights set by the pooling mode and two masks;
the instruction is read but not pooled; and STS scores an encoder by how well its cosines rank pairs
like people do. With the real decoder, simply opening the attention to both directions is not enough;
the next tutorials train the model to use it: LoRA adapters ([05](05_lora.ipynb)), masked next-token
prediction ([06](06_mntp.ipynb)) and SimCSE ([07](07_simcse.ipynb)).
"""),
]



# =================================================================================================
# 05: LoRA

LORA = [
md(r"""
# 05 · LoRA: training a few numbers beside each frozen weight

LLM2Vec ([BehnamGhader et al., 2024](https://arxiv.org/abs/2404.05961), training details in the
appendix) never updates the decoder's own weights. Both of its training steps, MNTP and SimCSE, train
LoRA adapters ([Hu et al., 2021](https://arxiv.org/abs/2106.09685)): beside each projection $W \in \mathbb{R}^{d_\text{out}
\times d_\text{in}}$ of the attention and the MLP sits a low-rank update,

$$
y = W x + \frac{\alpha}{r}\, B A\, \mathrm{dropout}(x), \qquad
A \in \mathbb{R}^{r \times d_\text{in}},\; B \in \mathbb{R}^{d_\text{out} \times r},\; B = 0 \text{ at the start},
$$

and only $A$ and $B$ are trained: $r\,(d_\text{in} + d_\text{out})$ numbers instead of
$d_\text{in} d_\text{out}$. LLM2Vec uses $r = 16$, $\alpha = 32$ and dropout 0.05 on all seven projections
(`q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`, `down_proj`). This notebook follows
`llm2vec_mini.lora` through the life of an adapter: add it, check that it starts as a no-op, merge it
into $W$ and back, train one, and save it in PEFT's format. Everything runs on a tiny model in seconds;
the last section puts adapters on the real SmolLM2-135M and runs only with **`LLM2VEC_MINI_REAL=1`**.
"""),
code(r"""
import copy
import json
import os
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from llm2vec_mini import LlamaConfig, LlamaForCausalLM
from llm2vec_mini.convert.peft import load_adapter, save_adapter
from llm2vec_mini.lora import LLM2VEC_TARGETS, LoRALinear, add_lora, lora_layers, merge_lora, unmerge_lora
from llm2vec_mini.ops import keep_mask

""" + REAL_GATE + r"""

torch.set_num_threads(1)  # tiny matrices: one thread is the fastest, and fair to a shared CPU
torch.manual_seed(0)
config = LlamaConfig.tiny()
base = LlamaForCausalLM(config).eval()  # stands for a pretrained decoder
ids = torch.randint(3, config.vocab_size, (4, 10))  # (B, T) a batch of token ids
print(config)
WORK = tempfile.TemporaryDirectory(prefix="llm2vec_mini_")  # for the adapters and logs we write
"""),
md(r"""
## 1. Adding adapters: what is trainable

`add_lora(model, r, alpha, dropout)` freezes every parameter, then replaces each target projection by
a `LoRALinear`, which keeps the frozen weight under the same name and adds `lora_A` and `lora_B`.
The names are PEFT's (`layers.0.self_attn.q_proj.lora_A.weight`), so adapters move between this
package, `peft` and the official `llm2vec` without renaming. We count the trainable parameters and
compare with $L \sum_{\text{targets}} r\,(d_\text{in} + d_\text{out})$, here and for SmolLM2-135M with LLM2Vec's
$r = 16$ (built on the `meta` device: shapes only, no memory).
"""),
code(r"""
def count(model):
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters()) - trainable


def lora_size_by_hand(cfg, r):
    h, m, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * cfg.head_dim, \
        cfg.num_key_value_heads * cfg.head_dim
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
              "gate_proj": (h, m), "up_proj": (h, m), "down_proj": (m, h)}  # (d_in, d_out)
    return cfg.num_hidden_layers * sum(r * (d_in + d_out) for d_in, d_out in shapes.values())


model = add_lora(copy.deepcopy(base), r=8, alpha=16.0, dropout=0.05)
trainable, frozen = count(model)
assert trainable == lora_size_by_hand(config, 8)
assert frozen == sum(p.numel() for p in base.parameters())  # the base is all there, all frozen
assert all(("lora_A" in n or "lora_B" in n) == p.requires_grad for n, p in model.named_parameters())
assert len(lora_layers(model)) == config.num_hidden_layers * len(LLM2VEC_TARGETS)
print(f"tiny model, r = 8:     {trainable:>10,} trainable, {frozen:>11,} frozen "
      f"({100 * trainable / (trainable + frozen):.1f} %)")

big_config = LlamaConfig.smollm2_135m()
with torch.device("meta"):
    big = add_lora(LlamaForCausalLM(big_config), r=16, alpha=32.0)
big_trainable, big_frozen = count(big)
assert big_trainable == lora_size_by_hand(big_config, 16)
print(f"SmolLM2-135M, r = 16: {big_trainable:>10,} trainable, {big_frozen:>11,} frozen "
      f"({100 * big_trainable / (big_trainable + big_frozen):.1f} %)")
print(model.model.layers[0].self_attn.q_proj)
"""),
md(r"""
## 2. A fresh adapter changes nothing

$A$ starts random (PEFT's Kaiming-uniform) and $B$ at zero, so $BA = 0$: before training, the model
with adapters computes exactly what the base model computes, in evaluation and in training mode
(where the LoRA dropout acts on a path that is multiplied by zero anyway). Training starts from the
pretrained model, not from a perturbed one.
"""),
code(r"""
with torch.no_grad():
    logits_base = base(ids)  # (B, T, vocab)
    logits_lora = model.eval()(ids)
    logits_train = model.train()(ids)
model.eval()
layer = model.model.layers[0].self_attn.q_proj
assert isinstance(layer, LoRALinear) and (layer.lora_B.weight == 0).all() and (layer.lora_A.weight != 0).any()
assert torch.equal(logits_lora, logits_base)  # bit for bit
assert torch.equal(logits_train, logits_base)
print("with B = 0 the adapted model's logits equal the base model's exactly")
"""),
md(r"""
## 2b. What the low-rank path sees in training: LoRA's dropout

In training mode the input of the low-rank path goes through dropout, $\mathrm{dropout}(x) = m \odot x / (1-p)$
with $m_{ij} \sim \mathrm{Bernoulli}(1-p)$ drawn anew for every projection and every step; the frozen
path $Wx$ always sees all of $x$. The package draws $m$ as bytes, 1 for kept (`llm2vec_mini.ops.keep_mask`, from 16 random bits per
entry), and keeps only those and $x$ for the backward pass. Below, one draw for a batch of 10 tokens, with the
recipe's $p = 0.05$ and with a large $p = 0.3$ to make the pattern visible: black cells are the
entries the low-rank path does not see.
"""),
code(r"""
torch.manual_seed(3)
fig, axes = plt.subplots(1, 2, figsize=(10, 2.4))
for ax, p in zip(axes, (0.05, 0.3)):
    m = keep_mask((10, config.hidden_size), p)  # (tokens, features) uint8, 1 = kept
    ax.imshow(m, cmap="gray", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    ax.set_title(f"keep mask m, p = {p}: {100 * (1 - m.float().mean()):.1f} % dropped", fontsize=10)
    ax.set_xlabel("feature of x")
    ax.set_ylabel("token")
fig.tight_layout()
plt.show()

torch.manual_seed(0)
big_draw = keep_mask((1000, 1000), 0.05)
assert abs(1 - big_draw.float().mean().item() - 0.05) < 0.001  # the rate over a million draws
"""),
md(r"""
## 3. Merging: $W' = W + \frac{\alpha}{r} BA$

After training, the update can be folded into the weight, so that inference costs nothing extra:
`merge_lora` adds $\frac{\alpha}{r} BA$ to every $W$ and `unmerge_lora` subtracts it again. Merging is
also how LLM2Vec stacks its adapters: the SimCSE adapter is trained on a model with the MNTP adapter
merged in. We give the adapters
random $B$ (as if trained), check the merged weight of one projection against the formula, check
that merging leaves the model's output unchanged, and that unmerging restores $W$ (up to float
rounding: $(W + \Delta) - \Delta$ is not always exactly $W$). The update has rank at most $r$, which the
singular values show.
"""),
code(r"""
with torch.no_grad():
    for m in lora_layers(model).values():
        m.lora_B.weight.normal_(std=0.05)  # as if trained
    before = model(ids)
W = layer.weight.detach().clone()  # (out, in) = (64, 64), frozen
A, Bm = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()  # (8, 64) and (64, 8)
W_merged_by_hand = W + (16.0 / 8) * Bm @ A  # alpha / r = 2

merge_lora(model)
assert layer.merged
assert_close(layer.weight.detach(), W_merged_by_hand)
with torch.no_grad():
    after = model(ids)
assert_close(after, before, atol=1e-5, rtol=1e-5)  # same function, one matmul per projection
unmerge_lora(model)
assert not layer.merged
assert_close(layer.weight.detach(), W, atol=1e-6, rtol=0)

delta = layer.delta_weight().detach()  # (64, 64)
singular = torch.linalg.svdvals(delta)
assert torch.linalg.matrix_rank(delta) == layer.r
fig, ax = plt.subplots(figsize=(6, 3))
ax.semilogy(range(1, len(singular) + 1), singular.clamp(min=1e-12), "o", ms=3)
ax.axvline(layer.r + 0.5, color="gray", ls="--")
ax.set_xlabel("index")
ax.set_ylabel("singular value")
ax.set_title(f"singular values of $(\\alpha/r)BA$ for q_proj: rank {layer.r} of {delta.shape[0]}",
             fontsize=10)
fig.tight_layout()
plt.show()
"""),
md(r"""
## 4. Training an adapter

A toy problem where the answer is known to be low-rank: a "teacher" is the base model with a hidden
rank-2 change added to every `q_proj` and `v_proj`. A student (the base model with rank-4 adapters on
those two projections only) learns to reproduce the teacher's final hidden states (mean squared
error) with AdamW. The frozen weights cannot move; the adapters alone must absorb the change. (The
real objectives, MNTP and SimCSE, go through the package's trainer in tutorials 06 and 07.)
"""),
code(r"""
torch.manual_seed(1)
teacher = copy.deepcopy(base)
with torch.no_grad():
    for block in teacher.model.layers:
        for proj in (block.self_attn.q_proj, block.self_attn.v_proj):
            d_out, d_in = proj.weight.shape
            proj.weight += 0.1 * torch.randn(d_out, 2) @ torch.randn(2, d_in) / d_in ** 0.5

student = add_lora(copy.deepcopy(base), r=4, alpha=8.0, dropout=0.0, targets=("q_proj", "v_proj"))
frozen_before = {n: p.clone() for n, p in student.named_parameters() if not p.requires_grad}
optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2,
                              weight_decay=0.0)
test_ids = torch.randint(3, config.vocab_size, (16, 12))  # held out
with torch.no_grad():
    test_target = teacher.model(test_ids)  # (16, 12, 64)

losses = []
for step in range(60):
    batch = torch.randint(3, config.vocab_size, (16, 12))  # fresh token ids every step
    with torch.no_grad():
        target = teacher.model(batch)  # (16, 12, 64)
    loss = F.mse_loss(student.model(batch), target)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    losses.append(loss.item())

with torch.no_grad():
    test_base = F.mse_loss(base.model(test_ids), test_target).item()
    test_student = F.mse_loss(student.model(test_ids), test_target).item()
print(f"training loss {losses[0]:.4f} -> {losses[-1]:.4f}; held out: base {test_base:.4f}, "
      f"student {test_student:.4f}")

fig, ax = plt.subplots(figsize=(6, 3))
ax.semilogy(range(1, len(losses) + 1), losses)
ax.axhline(test_base, color="gray", ls="--", label="base model (no adapter)")
ax.set_xlabel("step")
ax.set_ylabel("MSE to the teacher")
ax.legend()
fig.tight_layout()
plt.show()

assert losses[-1] < losses[0] / 10
assert test_student < test_base / 10  # on token ids it never saw
assert all(torch.equal(p, frozen_before[n]) for n, p in student.named_parameters() if not p.requires_grad)
"""),
md(r"""
## 5. Saving an adapter in PEFT's format

`save_adapter` writes what `peft`'s `save_pretrained` writes: `adapter_config.json` and
`adapter_model.safetensors` holding $A$ and $B$ under PEFT's key names. The test suite loads such a
folder into `peft` and into the official `llm2vec` (`tests/test_peft.py`, `tests/reference/`). Here
we read the tensors back with the `safetensors` library, and load the adapter into a fresh copy of the
base model with `load_adapter`: it must reproduce the student.
"""),
code(r"""
from safetensors.torch import load_file

out = save_adapter(student, Path(WORK.name) / "toy-adapter", base_model_name_or_path="tiny")
for f in sorted(out.iterdir()):
    print(f"{f.name:28s} {f.stat().st_size:>7,} bytes")
print((out / "adapter_config.json").read_text())

tensors = load_file(out / "adapter_model.safetensors")
expected = {f"base_model.model.layers.{i}.self_attn.{p}.lora_{x}.weight"
            for i in range(config.num_hidden_layers) for p in ("q_proj", "v_proj") for x in "AB"}
assert set(tensors) == expected
assert torch.equal(tensors["base_model.model.layers.1.self_attn.v_proj.lora_B.weight"],
                   student.model.layers[1].self_attn.v_proj.lora_B.weight)
saved = json.loads((out / "adapter_config.json").read_text())
assert (saved["r"], saved["lora_alpha"], saved["target_modules"]) == (4, 8.0, ["q_proj", "v_proj"])

reloaded = load_adapter(copy.deepcopy(base), out)
with torch.no_grad():
    assert_close(reloaded.model(test_ids), student.model(test_ids))
print("the reloaded adapter reproduces the student")
WORK.cleanup()  # remove the files written above
"""),
md(r"""
## 6. The real model (`LLM2VEC_MINI_REAL=1`)

LLM2Vec's adapters on SmolLM2-135M-Instruct: $r = 16$, $\alpha = 32$ on the seven projections of its 30
layers. We check the trainable count against the formula, that a fresh adapter leaves the logits
unchanged, and that one backward pass of a real batch (8 sentences of WikiText-2) puts gradients on
the adapters only. About half a minute on a 2-core CPU.
"""),
code(real_model_cell("WIKITEXT", "wikitext-2/valid.txt", "put LoRA adapters on SmolLM2") + r"""
    real, real_tokenizer = llm2vec_mini.load_pretrained(smollm2_path())
    texts = [line for line in read_lines(WIKITEXT) if len(line) > 80][:8]
    batch = torch.tensor([real_tokenizer.encode(t)[:48] for t in texts])  # (8, 48), none shorter
    with torch.no_grad():
        plain_logits = real(batch)
    add_lora(real, r=16, alpha=32.0, dropout=0.05)  # the decoder stays causal here
    real_trainable, real_frozen = count(real)
    assert real_trainable == lora_size_by_hand(real.config, 16) == 4_884_480
    with torch.no_grad():
        assert torch.equal(real.eval()(batch), plain_logits)  # B = 0: a no-op, bit for bit
    real.train()
    start = time.perf_counter()
    loss = F.cross_entropy(real(batch)[:, :-1].flatten(0, 1), batch[:, 1:].flatten())  # next-token loss
    loss.backward()
    print(f"{real_trainable:,} trainable of {real_trainable + real_frozen:,}; next-token loss {loss.item():.3f}; "
          f"forward + backward {time.perf_counter() - start:.1f} s")
    assert all((p.grad is not None) == p.requires_grad for p in real.parameters())
    assert all(p.grad.abs().sum() > 0 for n, p in real.named_parameters() if n.endswith("lora_B.weight"))
"""),
md(r"""
## What we have

LoRA trains $r(d_\text{in} + d_\text{out})$ numbers per projection (3.5 % of SmolLM2 at $r = 16$), starts
as an exact no-op, can be merged into the weights and taken out again, and is stored in the same files
as PEFT's. LLM2Vec trains one adapter for MNTP ([06](06_mntp.ipynb)), merges it, and trains a second
one for SimCSE ([07](07_simcse.ipynb)).
"""),
]



# =================================================================================================
# 06: MNTP

MNTP = [
md(r"""
# 06 · Masked next-token prediction: LLM2Vec's second step

After the first step (tutorial 02) every token can attend to every other token, but the decoder was
never trained to make use of what comes after it. LLM2Vec ([BehnamGhader et al., 2024](https://arxiv.org/abs/2404.05961),
Sec. 2) teaches it with **masked next-token prediction** (MNTP): corrupt a fraction of the input
tokens as BERT does ([Devlin et al., 2019](https://arxiv.org/abs/1810.04805), Sec. 3.1) and predict each
corrupted token $x_i$, not from position $i$ as BERT would, but from position $i-1$, where a decoder's
head already predicts the next token:

$$
\mathcal{L}_{\text{MNTP}} = -\frac{1}{|M|} \sum_{i \in M} \log \mathrm{softmax}\big(W_{\text{head}}\, h_{i-1}(\tilde{x})\big)_{x_i},
$$

with $M$ the chosen positions, $\tilde{x}$ the corrupted input and $h_{i-1}(\tilde x)$ the bidirectional
model's hidden state at position $i-1$, which sees all of $\tilde x$. In code this is the usual
shifted cross-entropy, `CE(logits[:, :-1], labels[:, 1:])`, with labels only at chosen positions.
The official recipe: 20 % of the tokens chosen, of which 80 % become the mask token `_`, 10 % a random
token and 10 % stay; LoRA with $r = 16$; 1,000 steps of batch 32 (the official `train_configs/mntp`).

This notebook draws a masked example, checks the collator's 80/10/10 statistics over many draws,
checks the package's cheap loss (projecting only the masked positions) against the textbook one,
and trains a tiny model with the package's trainer. The last cell measures the real SmolLM2-135M and
runs only with **`LLM2VEC_MINI_REAL=1`** (otherwise it prints that it was skipped).
"""),
code(r"""
import json
import math
import os
import random
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.colors import ListedColormap
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import models, normalizers, pre_tokenizers
from torch.testing import assert_close

from llm2vec_mini import LlamaConfig, LlamaForCausalLM
from llm2vec_mini.lora import add_lora
from llm2vec_mini.mntp import IGNORE, choose_mask_token, group_texts, mntp_loss, mntp_loss_full, mntp_task
from llm2vec_mini.tokenizer import Tokenizer
from llm2vec_mini.train import TrainConfig, train

""" + REAL_GATE + r"""
torch.set_num_threads(1)  # tiny matrices: one thread is the fastest, and fair to a shared CPU
WORK = tempfile.TemporaryDirectory(prefix="llm2vec_mini_")  # for the adapters and logs we write


""" + WORD_TOKENIZER + r"""
"""),
md(r"""
## 0. A toy language and a tiny "pretrained" decoder

A toy language where reading ahead pays: each sentence names two animals, then names them again in
the other order, so a masked animal in the first half can be read off the second half, but only by a
model that looks to the right. A real LLM2Vec run starts from a pretrained decoder; we make a stand-in
by training the tiny model briefly as an ordinary causal language model on this text (all weights,
next-token loss). Its loss ends far below chance, $\ln V$.
"""),
code(r"""
rng = random.Random(0)
ADJECTIVES, ANIMALS = "red blue green small big old".split(), "cat dog bird fox owl frog".split()
VERBS = "sees chases likes finds".split()


def toy_sentence():
    a, b = rng.sample(ANIMALS, 2)
    return (f"the {rng.choice(ADJECTIVES)} {a} {rng.choice(VERBS)} the {rng.choice(ADJECTIVES)} {b} , "
            f"so the {b} runs from the {a} .")


train_texts = [toy_sentence() for _ in range(300)]
test_texts = [toy_sentence() for _ in range(40)]  # held out
tokenizer = word_tokenizer(train_texts)
V = tokenizer.vocab_size
mask_token = tokenizer.id_to_token(choose_mask_token(tokenizer))
print(train_texts[0], f"\nvocabulary: {V} tokens; mask token {mask_token!r}")

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig.tiny(vocab_size=V))
blocks = group_texts(tokenizer.encode_batch(train_texts), block_size=32)  # (n_blocks, 32), BOS-separated
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
for step in range(100):  # causal language modelling: predict token t + 1 from tokens 0..t
    x = blocks[torch.randint(len(blocks), (16,))]  # (16, 32)
    loss = F.cross_entropy(model(x)[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
model.eval()
print(f"causal LM loss after 100 steps: {loss.item():.3f} (chance: ln V = {math.log(V):.3f})")
assert loss.item() < 0.5 * math.log(V)
"""),
md(r"""
## 1. A masked example

`mntp_task` tokenises the texts (BOS before each), concatenates them, cuts blocks of `block_size` tokens
(`group_texts`) and hands each batch to an `MNTPCollator`, which chooses positions with probability 0.2
(never BOS, EOS or padding) and corrupts them. Its output is the model's input and the labels: the
original token at chosen positions, $-100$ (ignored) elsewhere. The figure shows the start of one block,
and, on the bottom row, what each position is trained to predict: the chosen token to its **right**.
We take the first random seed whose draw shows all three kinds of corruption.
"""),
code(r"""
task = mntp_task(model, tokenizer, train_texts, block_size=32, mask_ratio=0.2)
collator, mask_id = task.collator, task.collator.mask_id
original = task.blocks[:1]  # (1, 32)
n = 20  # the positions drawn
for seed in range(100):
    inputs, labels = collator(original, generator=torch.Generator().manual_seed(seed))  # (1, 32) each
    chosen = labels[0] != IGNORE
    masked = chosen & (inputs[0] == mask_id)
    kept = chosen & (inputs[0] == original[0])
    randomised = chosen & ~masked & ~kept
    if masked[:n].any() and kept[:n].any() and randomised[:n].any():
        break

# What the collator promised: labels are the original tokens where chosen, the input is untouched elsewhere.
assert torch.equal(labels[0][chosen], original[0][chosen])
assert torch.equal(inputs[0][~chosen], original[0][~chosen])
assert not chosen[original[0] == tokenizer.bos_id].any()  # BOS is never chosen

kind = torch.zeros(n, dtype=torch.long)  # 0 untouched, 1 mask, 2 random, 3 kept
kind[masked[:n]], kind[randomised[:n]], kind[kept[:n]] = 1, 2, 3
target = [tokenizer.id_to_token(int(labels[0, i + 1])) if chosen[i + 1] else "" for i in range(n)]
assert all((target[i] != "") == bool(chosen[i + 1]) for i in range(n))  # position i predicts token i + 1

colours = ListedColormap(["#eeeeee", "#f4a261", "#e76f51", "#2a9d8f"])
fig, ax = plt.subplots(figsize=(15, 2.6))
grid = torch.stack([torch.zeros(n, dtype=torch.long), kind, torch.zeros(n, dtype=torch.long)])
ax.imshow(grid, cmap=colours, vmin=0, vmax=3, aspect="auto")
rows = ([tokenizer.id_to_token(int(t)) for t in original[0, :n]],
        [tokenizer.id_to_token(int(t)) for t in inputs[0, :n]], target)
for r, row in enumerate(rows):
    for i, name in enumerate(row):
        ax.text(i, r, name, ha="center", va="center", fontsize=8)
for i in range(n - 1):
    if chosen[i + 1]:
        ax.annotate("", xy=(i + 0.2, 1.75), xytext=(i + 0.8, 1.3),
                    arrowprops=dict(arrowstyle="->", color="black", lw=0.8))
ax.set_yticks([0, 1, 2], ["original", "input", "predicts"])
ax.set_xticks(range(n))
ax.set_xlabel("position")
for c, name in zip(colours.colors[1:], ("-> mask token", "-> random token", "kept")):
    ax.plot([], [], "s", color=c, label=name)
ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=3, fontsize=8, frameon=False)
fig.tight_layout()
plt.show()
"""),
md(r"""
## 2. The 80/10/10 rule, over many draws

Each non-special position is chosen with probability $p = 0.2$. A chosen position becomes the mask
token with probability 0.8, and a uniformly random token with probability 0.1 (the other 0.1 keeps
it). A random token can happen to be the mask token or the original token (each with probability
$1/V$), so among chosen positions we expect the input to be

$$
\text{mask: } 0.8 + \tfrac{0.1}{V}, \qquad \text{the original: } 0.1 + \tfrac{0.1}{V}, \qquad
\text{another token: } 0.1\,\big(1 - \tfrac{2}{V}\big).
$$

We mask every block 20 times (about 100,000 tokens) and compare, allowing five binomial standard
deviations.
"""),
code(r"""
many = task.blocks.repeat(20, 1)  # (20 * n_blocks, 32)
inputs, labels = collator(many, generator=torch.Generator().manual_seed(1))
special = many == tokenizer.bos_id
chosen = labels != IGNORE
assert not chosen[special].any()
n_candidates, n_chosen = int((~special).sum()), int(chosen.sum())
observed = {"chosen": n_chosen / n_candidates,
            "mask": float((inputs[chosen] == mask_id).float().mean()),
            "original": float((inputs[chosen] == many[chosen]).float().mean())}
observed["other"] = 1 - observed["mask"] - observed["original"]
expected = {"chosen": 0.2, "mask": 0.8 + 0.1 / V, "original": 0.1 + 0.1 / V, "other": 0.1 * (1 - 2 / V)}
for key, p in expected.items():
    count = n_candidates if key == "chosen" else n_chosen
    sigma = math.sqrt(p * (1 - p) / count)
    print(f"{key:9s} observed {observed[key]:.4f}, expected {p:.4f} (+- {sigma:.4f})")
    assert abs(observed[key] - p) < 5 * sigma, key

fig, ax = plt.subplots(figsize=(6, 3))
x = np.arange(len(expected))
ax.bar(x - 0.2, list(observed.values()), width=0.4, label="observed")
ax.bar(x + 0.2, list(expected.values()), width=0.4, label="expected")
ax.set_xticks(x, ["chosen\n(of all tokens)", "mask\n(of chosen)", "original\n(of chosen)",
                  "random\n(of chosen)"])
ax.legend()
fig.tight_layout()
plt.show()
"""),
md(r"""
## 3. The loss, computed cheaply

The textbook form projects every position onto the vocabulary, `lm_head(hidden)` of shape $(B, T, V)$,
and ignores 80 % of the result. `mntp_loss` projects only the positions $i-1$ whose right neighbour
$i$ has a label: with a vocabulary of 49,152 (SmolLM2) or 32,000 (Llama 2) tokens, the logits are the
largest tensor of a training step, and four fifths of it are never computed. Both must equal the
equation above, which we write as a loop over labelled positions. (A label at position 0 has no
position $-1$ to be predicted from; the shift drops it.)
"""),
code(r"""
inputs, labels = task.make_batch(list(range(8)), torch.Generator().manual_seed(2))  # (8, 32) each
model.set_causal(False)  # LLM2Vec step 1
with torch.no_grad():
    hidden = model.model(inputs)  # (8, 32, 64)
    cheap = mntp_loss(hidden, labels, model.lm_head)
    full = mntp_loss_full(model.lm_head(hidden), labels)  # (8, 32, V) logits
    terms = [-F.log_softmax(model.lm_head(hidden[b, i - 1]), dim=-1)[labels[b, i]]
             for b in range(labels.shape[0]) for i in range(1, labels.shape[1]) if labels[b, i] != IGNORE]
by_hand = torch.stack(terms).mean()
assert_close(cheap, by_hand)
assert_close(full, by_hand)
print(f"loss {float(cheap):.4f}: {len(terms)} positions projected instead of "
      f"{labels.shape[0] * (labels.shape[1] - 1)}")
"""),
md(r"""
## 4. Training with the package's trainer

Now the recipe: bidirectional attention, LoRA adapters ($r = 8$ here), and `train(task, TrainConfig)`,
which runs AdamW with a linear warm-up and decay, writes one line per step to `metrics.jsonl` and the
adapter at the end. We measure the MNTP loss on held-out sentences, always with the same masks, three
times: the decoder as pretrained (causal), the same weights made bidirectional (LLM2Vec step 1 alone),
and after MNTP. As the paper finds for S-LLaMA-1.3B and LLaMA-2-7B, opening the attention alone makes
things worse; MNTP then teaches the model to use the right-hand context, and it ends below the causal
model, which cannot see the repeated animal names.
"""),
code(r"""
held_out = mntp_task(model, tokenizer, test_texts, block_size=32)
test_inputs, test_labels = held_out.make_batch(list(range(len(held_out))), torch.Generator().manual_seed(3))


def held_out_loss():
    with torch.no_grad():
        return mntp_loss_full(model.eval()(test_inputs), test_labels).item()


results = {}
model.set_causal(True)
results["causal (pretrained)"] = held_out_loss()
model.set_causal(False)
results["bidirectional, before MNTP"] = held_out_loss()

add_lora(model, r=8, alpha=16.0, dropout=0.05)
config = TrainConfig(steps=80, batch_size=16, lr=3e-3, warmup_steps=5, seed=0, progress=False)
out = train(task, config, Path(WORK.name) / "mntp")
results["bidirectional, after MNTP"] = held_out_loss()

records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
assert [r["step"] for r in records] == list(range(1, config.steps + 1))
assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
for name, value in results.items():
    print(f"held-out MNTP loss, {name:27s} {value:.3f}")

fig, axes = plt.subplots(1, 2, figsize=(12, 3.5), gridspec_kw={"width_ratios": [1.6, 1]})
steps = [r["step"] for r in records]
axes[0].plot(steps, [r["loss"] for r in records], label="training loss (one batch)")
axes[0].axhline(math.log(V), color="gray", ls=":", label="chance, ln V")
axes[0].set_xlabel("step")
axes[0].set_ylabel("MNTP loss")
lr_axis = axes[0].twinx()
lr_axis.plot(steps, [r["lr"] for r in records], color="tab:orange", alpha=0.5)
lr_axis.set_ylabel("learning rate", color="tab:orange")
axes[0].legend(loc="upper right")
axes[1].barh(list(results), list(results.values()), color=["tab:gray", "tab:red", "tab:green"])
axes[1].set_xlabel("held-out MNTP loss")
axes[1].invert_yaxis()
fig.tight_layout()
plt.show()

assert results["bidirectional, before MNTP"] > results["causal (pretrained)"]
assert results["bidirectional, after MNTP"] < results["causal (pretrained)"]
WORK.cleanup()  # remove the adapter and the log written above
"""),
md(r"""
## 5. The real model (`LLM2VEC_MINI_REAL=1`)

The same before-training measurement on SmolLM2-135M-Instruct ([Allal et al., 2025](https://arxiv.org/abs/2502.02737)):
eight blocks of 128 tokens of WikiText-2 validation, masked as in the recipe, scored with causal and
with bidirectional attention (our run: 5.12 and 5.91; half a minute on a busy 2-core CPU). As on the
toy, the switch alone makes the untrained model worse. Training it is the CLI's job
(`python -m llm2vec_mini train-mntp`), best on a GPU.
"""),
code(real_model_cell("WIKITEXT", "wikitext-2/valid.txt", "measure SmolLM2's MNTP loss") + r"""
    real_model, real_tokenizer = llm2vec_mini.load_pretrained(smollm2_path())
    real_task = mntp_task(real_model, real_tokenizer, read_lines(WIKITEXT)[:200], block_size=128,
                          max_blocks=8)
    real_batch = real_task.make_batch(list(range(8)), torch.Generator().manual_seed(0))
    real_results = {}
    with torch.no_grad():
        for causal in (True, False):
            real_model.set_causal(causal)
            real_results["causal" if causal else "bidirectional"] = float(real_task(real_batch))
    print({k: round(v, 3) for k, v in real_results.items()})
    assert all(math.isfinite(v) for v in real_results.values())
    assert real_results["bidirectional"] > real_results["causal"]
"""),
md(r"""
## What we have

MNTP is BERT's masking with a decoder's shifted loss, so the pretrained head is reused as it is, and
only the masked positions need projecting. On the toy, bidirectional attention alone hurt, and a short
LoRA run on MNTP turned the model into one that uses context from both sides. LLM2Vec merges this
adapter into the weights and goes on to SimCSE ([07](07_simcse.ipynb)).
"""),
]



# =================================================================================================
# 07: SimCSE

SIMCSE = [
md(r"""
# 07 · SimCSE: LLM2Vec's third step

MNTP (tutorial 06) teaches the model to use both sides of each token; it does not teach it to put a
whole sentence into one vector. LLM2Vec's third step ([BehnamGhader et al., 2024](https://arxiv.org/abs/2404.05961),
Sec. 2) does, with unsupervised SimCSE ([Gao, Yao & Chen, 2021](https://arxiv.org/abs/2104.08821)):
pass a batch of $N$ sentences through the model **twice** in training mode. Dropout differs between the
passes, so sentence $i$ gets two slightly different embeddings $h_i$ and $h_i^+$. The pair is a
positive; every other sentence of the batch is a negative (SimCSE, Sec. 3):

$$
\ell_i = -\log \frac{e^{\cos(h_i,\, h_i^+)/\tau}}{\sum_{j=1}^{N} e^{\cos(h_i,\, h_j^+)/\tau}},
\qquad \mathcal{L} = \frac{1}{N} \sum_{i=1}^{N} \ell_i .
$$

That is a cross-entropy over the $N \times N$ matrix of scaled cosines $S_{ij} = \cos(h_i, h_j^+)/\tau$
with the diagonal as targets. LLM2Vec uses $1/\tau = 20$, attention dropout 0.3, a fresh LoRA adapter on
the MNTP model (merged), mean pooling, batch 128 and 1,000 steps on a million Wikipedia sentences
(the official `train_configs/simcse`). Here a tiny random model learns on a toy language in seconds; the
last section measures the real SmolLM2-135M and runs only with **`LLM2VEC_MINI_REAL=1`**.
"""),
code(r"""
import json
import os
import random
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import models, normalizers, pre_tokenizers
from torch.testing import assert_close

from llm2vec_mini import LlamaConfig, LlamaForCausalLM
from llm2vec_mini.lora import add_lora
from llm2vec_mini.ops import keep_mask
from llm2vec_mini.simcse import cosine_matrix, set_attention_dropout, simcse_task, unsup_simcse_loss
from llm2vec_mini.tokenizer import Tokenizer
from llm2vec_mini.train import TrainConfig, train

""" + REAL_GATE + r"""

torch.set_num_threads(1)  # tiny matrices: one thread is the fastest, and fair to a shared CPU
WORK = tempfile.TemporaryDirectory(prefix="llm2vec_mini_")  # for the adapters and logs we write


""" + WORD_TOKENIZER + r"""


rng = random.Random(0)
ADJECTIVES, ANIMALS = "red blue green small big old".split(), "cat dog bird fox owl frog".split()
VERBS = "sees chases likes finds".split()


def toy_sentence():
    a, b = rng.sample(ANIMALS, 2)
    return f"the {rng.choice(ADJECTIVES)} {a} {rng.choice(VERBS)} the {rng.choice(ADJECTIVES)} {b} ."


sentences = [toy_sentence() for _ in range(256)]
tokenizer = word_tokenizer(sentences)
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig.tiny(vocab_size=tokenizer.vocab_size)).set_causal(False)
set_attention_dropout(model, 0.3)  # the recipe's dropout on the attention probabilities
add_lora(model, r=8, alpha=16.0, dropout=0.05)
task = simcse_task(model, tokenizer, sentences, pooling="mean", scale=20.0)
print(len(task), "sentences, e.g.", sentences[:2])
"""),
md(r"""
## 1. Two views of one batch

`SimCSETask.embed` runs the bidirectional model on a left-padded batch and mean-pools it. In training
mode each call draws new dropout masks, so two calls disagree a little; in evaluation mode dropout is
off and they agree exactly. Each sentence's second view is still its nearest neighbour among the
batch's second views, and the other way round: that is the signal SimCSE learns from.
"""),
code(r"""
ids, mask = task.make_batch(list(range(8)), None)  # (8, T) token ids and attention mask
model.train()
with torch.no_grad():
    view1, view2 = task.embed(ids, mask), task.embed(ids, mask)  # (8, hidden) each
model.eval()
with torch.no_grad():
    eval1, eval2 = task.embed(ids, mask), task.embed(ids, mask)

assert not torch.allclose(view1, view2)  # dropout: two different views
assert torch.equal(eval1, eval2)  # no dropout: identical
cross = cosine_matrix(view1, view2)  # (8, 8): cos(h_i, h_j^+)
assert_close(cross.diagonal(), F.cosine_similarity(view1, view2, dim=-1))
off_diagonal = cross[~torch.eye(8, dtype=torch.bool)]
print(f"cos of the two views of a sentence: {cross.diagonal().mean():.3f} on average; "
      f"of two different sentences: {off_diagonal.mean():.3f}")
assert torch.equal(cross.argmax(1), torch.arange(8)) and torch.equal(cross.argmax(0), torch.arange(8))
"""),
md(r"""
## 1b. Where the two views come from: dropout on the attention probabilities

With attention dropout $p = 0.3$, each pass zeroes a fresh 30 % of the attention probabilities of
every head and scales the rest by $1/(1-p)$: $O = \frac{1}{1-p}(m \odot P)\,V$. Below, the probabilities
$P$ of one head of the first layer for the first sentence, and the two masked versions the two passes
use (black: dropped). Two different masks, two slightly different embeddings.
"""),
code(r"""
from llm2vec_mini.model import apply_rope, positions_from_mask, rope_cos_sin

layer0 = model.model.layers[0].self_attn
with torch.no_grad():
    x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids[:1]))  # (1, T, hidden)
    T = x.shape[1]
    q = layer0.q_proj(x).view(1, T, layer0.n_heads, -1).transpose(1, 2)  # (1, nh, T, d)
    k = layer0.k_proj(x).view(1, T, layer0.n_kv_heads, -1).transpose(1, 2)  # (1, nkv, T, d)
    cos, sin = rope_cos_sin(model.model.inv_freq, positions_from_mask(None, 1, T, x.device), x.dtype)
    q, k = apply_rope(q, k, cos, sin)
    P = torch.softmax(q[0, 0] @ k[0, 0].T / q.shape[-1] ** 0.5, dim=-1)  # (T, T), head 0
torch.manual_seed(1)
views = [P * keep_mask(P.shape, 0.3) / 0.7 for _ in range(2)]  # two passes, two masks
fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
for ax, matrix, title in zip(axes, [P] + views, ["P (no dropout)", "pass 1", "pass 2"]):
    ax.imshow(matrix, cmap="magma", vmin=0, vmax=float(max(v.max() for v in views)))
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("key position")
axes[0].set_ylabel("query position")
fig.tight_layout()
plt.show()
assert torch.allclose(P.sum(-1), torch.ones(T)) and not torch.equal(views[0], views[1])
dropped = [(v == 0).float().mean().item() for v in views]
print(f"dropped in pass 1: {dropped[0]:.0%}, in pass 2: {dropped[1]:.0%}")
"""),
md(r"""
## 2. The loss, by hand

`SimCSETask.forward` embeds the batch twice and calls `unsup_simcse_loss`. We draw the same dropout
masks again (same seed), and compute the equation in numpy: normalise, take the scaled cosine matrix,
and average $\log\sum_j e^{S_{ij}} - S_{ii}$ over the rows, with the maximum subtracted before `exp`.
"""),
code(r"""
model.train()
torch.manual_seed(7)
loss = task((ids, mask))  # the package: two passes, then the loss
torch.manual_seed(7)
with torch.no_grad():
    h, h_plus = task.embed(ids, mask).numpy(), task.embed(ids, mask).numpy()  # the same two views


def simcse_loss_numpy(h, h_plus, scale=20.0):
    a = h / np.linalg.norm(h, axis=1, keepdims=True)
    b = h_plus / np.linalg.norm(h_plus, axis=1, keepdims=True)
    S = scale * a @ b.T  # (N, N)
    top = S.max(axis=1, keepdims=True)
    log_sum_exp = top[:, 0] + np.log(np.exp(S - top).sum(axis=1))
    return float(np.mean(log_sum_exp - np.diag(S)))


by_hand = simcse_loss_numpy(h, h_plus)
print(f"package {loss.item():.6f}, numpy {by_hand:.6f}, chance ln N = {np.log(len(h)):.3f}")
assert abs(loss.item() - by_hand) < 1e-5
assert abs(unsup_simcse_loss(torch.from_numpy(h), torch.from_numpy(h_plus)).item() - by_hand) < 1e-5
"""),
md(r"""
## 3. Training, and what it does to the similarities

A random decoder maps all sentences to similar vectors (the mean of many token states points in a
common direction: embeddings are *anisotropic*). SimCSE pulls the two views of a sentence together
(*alignment*) and pushes everything else apart (*uniformity*, the two properties of
[Wang & Isola, 2020](https://arxiv.org/abs/2005.10242) that the SimCSE paper analyses). We watch eight sentences, four pairs that differ in one word, before and after
40 steps of `train`: other sentences move apart, near-duplicates stay close.
"""),
code(r"""
PAIRS = ["the red cat sees the old dog .", "the blue cat sees the old dog .",
         "the small fox chases the big owl .", "the small fox chases the big frog .",
         "the green bird likes the red frog .", "the green bird finds the red frog .",
         "the old dog finds the small cat .", "the old owl finds the small cat ."]
probe = simcse_task(model, tokenizer, PAIRS)  # the same model, only to pad and embed these eight
probe_batch = probe.make_batch(list(range(len(PAIRS))), None)
partner = torch.arange(len(PAIRS)) ^ 1  # 0 <-> 1, 2 <-> 3, ...
is_pair = partner[:, None] == torch.arange(len(PAIRS))[None, :]  # (8, 8)
others = ~is_pair & ~torch.eye(len(PAIRS), dtype=torch.bool)


def similarities():
    model.eval()
    with torch.no_grad():
        e = probe.embed(*probe_batch)  # (8, hidden)
    return cosine_matrix(e, e)


before = similarities()
config = TrainConfig(steps=40, batch_size=32, lr=1e-3, seed=0, progress=False)
out = train(task, config, Path(WORK.name) / "simcse")
after = similarities()
records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

fig, ax = plt.subplots(figsize=(6, 2.8))
ax.semilogy([r["step"] for r in records], [r["loss"] for r in records])
ax.set_xlabel("step")
ax.set_ylabel("SimCSE loss (batch of 32)")
fig.tight_layout()
plt.show()

fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True, layout="constrained")
for ax, matrix, title in ((axes[0], before, "before SimCSE"), (axes[1], after, "after 40 steps")):
    image = ax.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1)
    for i in range(len(PAIRS)):
        for j in range(len(PAIRS)):
            ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(PAIRS)))
    ax.set_title(f"cosine similarities, {title}", fontsize=10)
axes[0].set_yticks(range(len(PAIRS)), [f"{s}  {i}" for i, s in enumerate(PAIRS)], fontsize=8)
fig.colorbar(image, ax=axes, shrink=0.8)
plt.show()

print(f"near-duplicate pairs: {before[is_pair].mean():.2f} -> {after[is_pair].mean():.2f}; "
      f"other sentences: {before[others].mean():.2f} -> {after[others].mean():.2f}")
assert [r["step"] for r in records] == list(range(1, config.steps + 1))
assert np.mean([r["loss"] for r in records[-10:]]) < records[0]["loss"] / 3
assert after[others].mean() < before[others].mean() - 0.3  # pushed apart
assert after[is_pair].mean() - after[others].mean() > before[is_pair].mean() - before[others].mean()
WORK.cleanup()  # remove the adapter and the log written above
"""),
md(r"""
## 4. The real model (`LLM2VEC_MINI_REAL=1`)

SmolLM2-135M-Instruct, bidirectional, with LLM2Vec's attention dropout 0.3, on 32 sentences of the
wiki1m slice: before any training the two dropout views of a sentence are already far closer to each
other than to other sentences, and the loss starts well below chance ($\ln 32 \approx 3.47$), because a
pretrained model's embeddings already separate sentences. (`make demo` and
`python -m llm2vec_mini train-simcse` train it; about half a minute here.)
"""),
code(real_model_cell("WIKI1M", "wiki1m_slice/wiki1m_for_simcse.first11914.txt",
                     "measure SmolLM2's SimCSE loss") + r"""
    real, real_tokenizer = llm2vec_mini.load_pretrained(smollm2_path())
    real.set_causal(False)
    set_attention_dropout(real, 0.3)
    real_sentences = [s for s in read_lines(WIKI1M) if len(s) >= 15][:32]
    real_task = simcse_task(real, real_tokenizer, real_sentences, max_length=32)
    real_batch = real_task.make_batch(list(range(32)), None)
    real.train()
    torch.manual_seed(0)
    with torch.no_grad():
        r1, r2 = real_task.embed(*real_batch), real_task.embed(*real_batch)  # (32, 576) each
    real_cross = cosine_matrix(r1, r2)
    real_loss = unsup_simcse_loss(r1, r2, 20.0).item()
    real_off = real_cross[~torch.eye(32, dtype=torch.bool)]
    print(f"two views: cos {real_cross.diagonal().mean():.3f}; different sentences: {real_off.mean():.3f}; "
          f"loss {real_loss:.3f} (chance {np.log(32):.3f})")
    assert real_cross.diagonal().mean() > real_off.mean()
    assert real_loss < np.log(32)
"""),
md(r"""
## What we have

Unsupervised SimCSE needs no labels: dropout makes the positive pairs, the rest of the batch the
negatives, and the loss is a cross-entropy over a cosine matrix. With the three steps, bidirectional
attention ([02](02_bidirectional_attention.ipynb)), MNTP ([06](06_mntp.ipynb)) and SimCSE, a decoder becomes
LLM2Vec's encoder; `LLM2Vec.from_pretrained(base, adapters=[mntp_dir, simcse_dir])` loads the result, and
`python -m llm2vec_mini train-simcse` trains the real thing.
"""),
]


if __name__ == "__main__":
    for name, cells in (("04_pooling_and_encoding", POOLING), ("05_lora", LORA),
                        ("06_mntp", MNTP), ("07_simcse", SIMCSE)):
        print("wrote", write(name, cells).relative_to(Path(__file__).resolve().parents[1]))
