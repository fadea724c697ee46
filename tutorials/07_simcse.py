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
# # 07 · SimCSE: LLM2Vec's third step
#
# MNTP (tutorial 06) teaches the model to use both sides of each token; it does not teach it to put a
# whole sentence into one vector. LLM2Vec's third step ([BehnamGhader et al., 2024](https://arxiv.org/abs/2404.05961),
# Sec. 2.1; its setup in Sec. 2.2 and App. D.1.2) does, with unsupervised SimCSE ([Gao, Yao & Chen, 2021](https://arxiv.org/abs/2104.08821)):
# pass a batch of $N$ sentences through the model **twice** in training mode. Dropout differs between the
# passes, so sentence $i$ gets two slightly different embeddings $h_i$ and $h_i^+$. The pair is a
# positive; every other sentence of the batch is a negative (SimCSE, Sec. 3):
#
# $$
# \ell_i = -\log \frac{e^{\cos(h_i,\, h_i^+)/\tau}}{\sum_{j=1}^{N} e^{\cos(h_i,\, h_j^+)/\tau}},
# \qquad \mathcal{L} = \frac{1}{N} \sum_{i=1}^{N} \ell_i .
# $$
#
# That is a cross-entropy over the $N \times N$ matrix of scaled cosines $S_{ij} = \cos(h_i, h_j^+)/\tau$
# with the diagonal as targets. LLM2Vec uses $1/\tau = 20$, attention dropout 0.3, a fresh LoRA adapter on
# the MNTP model (merged), mean pooling, batch 128 and 1,000 steps on a million Wikipedia sentences
# (the official `train_configs/simcse`). Here a tiny random model learns on a toy language in seconds; the
# last section measures the real SmolLM2-135M and runs only with **`LLM2VEC_MINI_REAL=1`**.

# %% [markdown]
# **Assumes:** [tutorials 04](04_pooling_and_encoding.ipynb) (pooling, cosine similarity), [05](05_lora.ipynb) (LoRA) and [06](06_mntp.ipynb) (the trainer).
#
# **Time:** about 30 minutes to read; about 30 seconds to run, plus about a minute for the SmolLM2 cell (`LLM2VEC_MINI_REAL=1`).
#
# **The learning path:** 01 the decoder → 02 bidirectional attention → 04 pooling and encoding →
# 05 LoRA → 06 MNTP → 07 SimCSE → 08 end to end; 03 (file formats) is an optional deep dive.

# %%
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

REAL = os.environ.get("LLM2VEC_MINI_REAL") == "1"  # the one switch for the SmolLM2 cells

torch.set_num_threads(1)  # tiny matrices: one thread is the fastest, and fair to a shared CPU
WORK = tempfile.TemporaryDirectory(prefix="llm2vec_mini_")  # for the adapters and logs we write


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

# %% [markdown]
# ## 1. Two views of one batch
#
# `SimCSETask.embed` runs the bidirectional model on a left-padded batch and mean-pools it. In training
# mode each call draws new dropout masks, so two calls disagree a little; in evaluation mode dropout is
# off and they agree exactly. Each sentence's second view is still its nearest neighbour among the
# batch's second views, and the other way round: that is the signal SimCSE learns from.

# %%
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

# %% [markdown]
# ## 1b. Where the two views come from: dropout on the attention probabilities
#
# With attention dropout $p = 0.3$, each pass zeroes a fresh 30 % of the attention probabilities of
# every head and scales the rest by $1/(1-p)$: $O = \frac{1}{1-p}(m \odot P)\,V$. Below, the probabilities
# $P$ of one head of the first layer for the first sentence, and the two masked versions the two passes
# use (black: dropped). Two different masks, two slightly different embeddings.

# %%
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

# %% [markdown]
# ## 2. The loss, by hand
#
# `SimCSETask.forward` embeds the batch twice and calls `unsup_simcse_loss`. We draw the same dropout
# masks again (same seed), and compute the equation in numpy: normalise, take the scaled cosine matrix,
# and average $\log\sum_j e^{S_{ij}} - S_{ii}$ over the rows, with the maximum subtracted before `exp`.

# %%
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

# %% [markdown]
# ## 3. Training, and what it does to the similarities
#
# A random decoder maps all sentences to similar vectors (the mean of many token states points in a
# common direction: embeddings are *anisotropic*). SimCSE pulls the two views of a sentence together
# (*alignment*) and pushes everything else apart (*uniformity*, the two properties of
# [Wang & Isola, 2020](https://arxiv.org/abs/2005.10242) that the SimCSE paper analyses). We watch eight sentences, four pairs that differ in one word, before and after
# 40 steps of `train`: other sentences move apart, near-duplicates stay close.

# %%
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

# %% [markdown]
# ## 4. The real model (`LLM2VEC_MINI_REAL=1`)
#
# SmolLM2-135M-Instruct, bidirectional, with LLM2Vec's attention dropout 0.3, on 32 sentences of the
# wiki1m slice: before any training the two dropout views of a sentence are already far closer to each
# other than to other sentences, and the loss starts well below chance ($\ln 32 \approx 3.47$), because a
# pretrained model's embeddings already separate sentences. (`make demo` and
# `python -m llm2vec_mini train-simcse` train it; about half a minute here.)

# %%
from llm2vec_mini.data import read_lines
from llm2vec_mini.hub import find_data_dir, smollm2_path

DATA = find_data_dir(needs=["wiki1m_slice/wiki1m_for_simcse.first11914.txt"])  # $LLM2VEC_MINI_DATA, the download cache, ../shared/data
WIKI1M = DATA / "wiki1m_slice/wiki1m_for_simcse.first11914.txt" if DATA else None
if not REAL:
    print("skipped: set LLM2VEC_MINI_REAL=1 to measure SmolLM2's SimCSE loss")
elif WIKI1M is None:
    print("skipped: no data folder holds wiki1m_slice/wiki1m_for_simcse.first11914.txt (python -m llm2vec_mini download data)")
else:
    import llm2vec_mini

    torch.set_num_threads(os.cpu_count() or 1)  # a real model: use every core
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

# %% [markdown]
# ## What we have
#
# Unsupervised SimCSE needs no labels: dropout makes the positive pairs, the rest of the batch the
# negatives, and the loss is a cross-entropy over a cosine matrix. With the three steps, bidirectional
# attention ([02](02_bidirectional_attention.ipynb)), MNTP ([06](06_mntp.ipynb)) and SimCSE, a decoder becomes
# LLM2Vec's encoder; `LLM2Vec.from_pretrained(base, adapters=[mntp_dir, simcse_dir])` loads the result, and
# `python -m llm2vec_mini train-simcse` trains the real thing.

# %% [markdown]
# ## Try it yourself
#
# * Train with attention dropout 0 (no views): what happens to the loss, and why?
# * Change the scale (1/temperature) from 20 to 5 and to 50 and compare the curves.
# * Write the supervised loss with hard negatives by hand for a batch of 3 and check it against
#   `supervised_loss`.
#
# **Next:** [08 · End to end](08_end_to_end.ipynb): the whole recipe on one model, scored at each step.
