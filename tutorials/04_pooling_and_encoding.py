# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: -jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Pooling and encoding: from token states to one vector per text
#
# A decoder gives one hidden state per token; a text encoder must give one vector per text. LLM2Vec
# ([BehnamGhader et al., 2024](https://arxiv.org/abs/2404.05961)) compares three ways to pool the hidden
# states $h_1, \dots, h_T$ (EOS, mean and weighted mean: Sec. 3.2, Figure 3, and Table 5 in App. D.2.2),
# and its library offers two more (last token, BOS). It reads its inputs the way instruction-tuned
# embedders do: an instruction, then the text, with only the text pooled (Sec. 3.2; the instructions
# are listed in App. C.2, Table 10). This
# notebook covers what `llm2vec_mini.pooling` and `llm2vec_mini.encoder.LLM2Vec` do with a batch:
#
# 1. the five pooling modes, side by side on one padded batch;
# 2. an instruction + text input, with its attention mask and its embed mask drawn;
# 3. cosine similarities of a handful of sentences;
# 4. the STS-B benchmark: does the cosine of two embeddings follow the human similarity score?
#
# A tiny random model with a word-level tokenizer built here runs everything in seconds. The cells
# that use the real SmolLM2-135M run only with **`LLM2VEC_MINI_REAL=1`** in the environment (and the
# model in the cache: `python -m llm2vec_mini download smollm2`); otherwise they print that they were
# skipped. STS-B is read from the data folder (`$LLM2VEC_MINI_DATA`, the download cache of
# `python -m llm2vec_mini download data`, or `../../shared/data`), and skipped when there is none.

# %% [markdown]
# **Assumes:** [tutorials 01](01_llama_from_scratch.ipynb) and [02](02_bidirectional_attention.ipynb): hidden states, attention masks, left padding.
#
# **Time:** about 30 minutes to read; about 20 seconds to run, plus 3 to 4 minutes for the SmolLM2 cells (`LLM2VEC_MINI_REAL=1`: SmolLM2 on all of STS-B dev).
#
# **The learning path:** 01 the decoder → 02 bidirectional attention → 04 pooling and encoding →
# 05 LoRA → 06 MNTP → 07 SimCSE → 08 end to end; 03 (file formats) is an optional deep dive.

# %%
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

REAL = os.environ.get("LLM2VEC_MINI_REAL") == "1"  # the one switch for the SmolLM2 cells
torch.set_num_threads(1)  # tiny matrices: one thread is the fastest, and fair to a shared CPU
torch.manual_seed(0)


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

# %% [markdown]
# ## 1. Five ways to pool
#
# Write $S = \{t_1 < t_2 < \dots < t_n\}$ for the positions that are pooled (the *embed mask*: the
# text's tokens, without BOS or instruction) and $R$ for the real, non-padding positions (the
# *attention mask*). LLM2Vec's modes are
#
# $$
# e_{\text{mean}} = \frac{1}{n} \sum_{k=1}^{n} h_{t_k}, \qquad
# e_{\text{weighted}} = \sum_{k=1}^{n} \frac{k}{n(n+1)/2}\, h_{t_k}, \qquad
# e_{\text{eos}} = e_{\text{last}} = h_{\max R}, \qquad
# e_{\text{bos}} = h_{\min R}.
# $$
#
# The weighted mean, from SGPT ([Muennighoff, 2022](https://arxiv.org/abs/2202.08904)), trusts later
# tokens more: in a causal decoder only they have read the whole text. `eos_token` and `last_token`
# take the same position; they differ in the input, since the encoder appends an EOS token to the text
# for `eos_token`. The batch is padded on the **left**, as the official library does, so the last
# column is always a real token.
#
# Below: three rows, one per padding situation, checked against a per-row loop over the positions.

# %%
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

# %% [markdown]
# Every mode is linear in the hidden states: $e = \sum_t w_t h_t$ with weights $w_t$ that depend only on
# the masks. Feeding one-hot "hidden states" $h_t = \mathbf{1}_t$ makes a mode return its weights, which
# we can draw. Padding (hatched) never gets weight.

# %%
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

# %% [markdown]
# ## 2. Instruction + text: what the model reads and what is pooled
#
# `LLM2Vec.encode` takes a string, or an `[instruction, text]` pair. Following the official library it
# joins them as `instruction + " " + SEPARATOR + text`, where `SEPARATOR` (in `llm2vec_mini.encoder`) is
# the marker `!@#$%^&*()`: it is removed before tokenising, and only tells where the text begins. Then
#
# * the **attention mask** marks every real token: BOS, instruction and text all take part in attention
#   (in both directions, after LLM2Vec's first step);
# * the **embed mask** marks the last $n$ tokens, $n$ being the token count of the text tokenised
#   alone: only they are pooled (`skip_instruction=True`).
#
# `prepare` tokenises, `collate` pads on the left with the EOS id. The figure draws both masks over the
# tokens of a batch of three.

# %%
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

# %% [markdown]
# `encode` is then the model's bidirectional forward pass followed by the pooling. We redo it by hand:
# run the `LlamaModel` on the padded batch and average the hidden states over the embed mask. The
# instruction is never pooled, yet it changes the embedding: the text's tokens attend to it.

# %%
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

# %% [markdown]
# ## 3. Cosine similarity
#
# Embeddings are compared by the cosine of their angle,
# $\cos(u, v) = \frac{u^\top v}{\lVert u \rVert\, \lVert v \rVert}$; with `normalize=True` the encoder
# returns unit vectors, and the cosine matrix is a plain product $E E^\top$. The tiny model is random,
# so its similarities reflect only the words that sentences share (and their positions).

# %%
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

# %% [markdown]
# ## 4. STS-B: Spearman correlation with human scores
#
# The STS Benchmark ([Cer et al., 2017](https://aclanthology.org/S17-2001)) pairs sentences with a human
# similarity score from 0 to 5. An encoder is scored, as in LLM2Vec (through MTEB), by the Spearman
# correlation between the cosines $c_i$ of the pairs and the gold scores $g_i$: the Pearson correlation
# of their ranks,
#
# $$
# \rho = \frac{\sum_i \big(\mathrm{rk}(c)_i - \overline{\mathrm{rk}(c)}\big)\big(\mathrm{rk}(g)_i - \overline{\mathrm{rk}(g)}\big)}
# {\sqrt{\sum_i \big(\mathrm{rk}(c)_i - \overline{\mathrm{rk}(c)}\big)^2}\sqrt{\sum_i \big(\mathrm{rk}(g)_i - \overline{\mathrm{rk}(g)}\big)^2}},
# $$
#
# reported $\times 100$. Only the order of the cosines matters. In the test suite we score 100 pairs of the
# dev set (every 15th) with a tiny random model whose vocabulary holds their words: it measures little
# more than word overlap. `evaluate_sts` is checked against `scipy.stats.spearmanr`.

# %%
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

# %% [markdown]
# ## 5. The real model (`LLM2VEC_MINI_REAL=1`)
#
# SmolLM2-135M-Instruct ([Allal et al., 2025](https://arxiv.org/abs/2502.02737)) on the whole STS-B dev
# set (1,500 pairs), mean pooling, with its attention causal (the decoder as trained) and bidirectional
# (LLM2Vec's first step alone). The paper finds that switching to bidirectional attention without
# training hurts most models: the decoder was never trained to read the future. Steps 2 and 3
# (tutorials 06 and 07) are there to fix that. Each of the two cells encodes about 3,000 sentences: a
# minute or two on a laptop's CPU (about 100 s each on one core of this project's machine, with bf16:
# `dtype="auto"`), seconds on a GPU; our run gave Spearman 54.2 (causal) and 28.5 (bidirectional).

# %%
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

# %%
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

# %% [markdown]
# ## What we have
#
# An embedding is a weighted average of token states, the weights set by the pooling mode and two masks;
# the instruction is read but not pooled; and STS scores an encoder by how well its cosines rank pairs
# like people do. With the real decoder, simply opening the attention to both directions is not enough;
# the next tutorials train the model to use it: LoRA adapters ([05](05_lora.ipynb)), masked next-token
# prediction ([06](06_mntp.ipynb)) and SimCSE ([07](07_simcse.ipynb)).

# %% [markdown]
# ## Try it yourself
#
# * Pool the same batch with right padding instead of left: which modes give the same vectors, and which
#   must use the attention mask to stay correct?
# * Encode a sentence with two different instructions: how far apart are the two embeddings, and why is
#   the instruction still read although it is not pooled?
# * Score STS-B dev with `weighted_mean` and with `last_token` pooling on SmolLM2 (`LLM2VEC_MINI_REAL=1`).
#
# **Next:** [05 · LoRA](05_lora.ipynb): the adapters both training steps train.
