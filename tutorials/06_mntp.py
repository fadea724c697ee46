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
# # 06 · Masked next-token prediction: LLM2Vec's second step
#
# After the first step (tutorial 02) every token can attend to every other token, but the decoder was
# never trained to make use of what comes after it. LLM2Vec ([BehnamGhader et al., 2024](https://arxiv.org/abs/2404.05961),
# Sec. 2.1; its setup in Sec. 2.2 and App. D.1.1) teaches it with **masked next-token prediction** (MNTP): corrupt a fraction of the input
# tokens as BERT does ([Devlin et al., 2019](https://arxiv.org/abs/1810.04805), Sec. 3.1) and predict each
# corrupted token $x_i$, not from position $i$ as BERT would, but from position $i-1$, where a decoder's
# head already predicts the next token:
#
# $$
# \mathcal{L}_{\text{MNTP}} = -\frac{1}{|M|} \sum_{i \in M} \log \mathrm{softmax}\big(W_{\text{head}}\, h_{i-1}(\tilde{x})\big)_{x_i},
# $$
#
# with $M$ the chosen positions, $\tilde{x}$ the corrupted input and $h_{i-1}(\tilde x)$ the bidirectional
# model's hidden state at position $i-1$, which sees all of $\tilde x$. In code this is the usual
# shifted cross-entropy, `CE(logits[:, :-1], labels[:, 1:])`, with labels only at chosen positions.
# The official recipe: 20 % of the tokens chosen, of which 80 % become the mask token `_`, 10 % a random
# token and 10 % stay; LoRA with $r = 16$; 1,000 steps of batch 32 (the official `train_configs/mntp`).
#
# This notebook draws a masked example, checks the collator's 80/10/10 statistics over many draws,
# checks the package's cheap loss (projecting only the masked positions) against the textbook one,
# and trains a tiny model with the package's trainer. The last cell measures the real SmolLM2-135M and
# runs only with **`LLM2VEC_MINI_REAL=1`** (otherwise it prints that it was skipped).

# %% [markdown]
# **Assumes:** [tutorials 02](02_bidirectional_attention.ipynb) (bidirectional attention) and [05](05_lora.ipynb) (LoRA); cross-entropy.
#
# **Time:** about 30 minutes to read; about a minute to run, plus about a minute for the SmolLM2 cell (`LLM2VEC_MINI_REAL=1`).
#
# **The learning path:** 01 the decoder → 02 bidirectional attention → 04 pooling and encoding →
# 05 LoRA → 06 MNTP → 07 SimCSE → 08 end to end; 03 (file formats) is an optional deep dive.

# %%
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


print(word_tokenizer(["A cat sees the dog."]))

# %% [markdown]
# ## 0. A toy language and a tiny "pretrained" decoder
#
# A toy language where reading ahead pays: each sentence names two animals, then names them again in
# the other order, so a masked animal in the first half can be read off the second half, but only by a
# model that looks to the right. A real LLM2Vec run starts from a pretrained decoder; we make a stand-in
# by training the tiny model briefly as an ordinary causal language model on this text (all weights,
# next-token loss). Its loss ends far below chance, $\ln V$.

# %%
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

# %% [markdown]
# ## 1. A masked example
#
# `mntp_task` tokenises the texts (BOS before each), concatenates them, cuts blocks of `block_size` tokens
# (`group_texts`) and hands each batch to an `MNTPCollator`, which chooses positions with probability 0.2
# (never BOS, EOS or padding) and corrupts them. Its output is the model's input and the labels: the
# original token at chosen positions, $-100$ (ignored) elsewhere. The figure shows the start of one block,
# and, on the bottom row, what each position is trained to predict: the chosen token to its **right**.
# We take the first random seed whose draw shows all three kinds of corruption.

# %%
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

# %% [markdown]
# ## 2. The 80/10/10 rule, over many draws
#
# Each non-special position is chosen with probability $p = 0.2$. A chosen position becomes the mask
# token with probability 0.8, and a uniformly random token with probability 0.1 (the other 0.1 keeps
# it). A random token can happen to be the mask token or the original token (each with probability
# $1/V$), so among chosen positions we expect the input to be
#
# $$
# \text{mask: } 0.8 + \tfrac{0.1}{V}, \qquad \text{the original: } 0.1 + \tfrac{0.1}{V}, \qquad
# \text{another token: } 0.1\,\big(1 - \tfrac{2}{V}\big).
# $$
#
# We mask every block 20 times (about 100,000 tokens) and compare, allowing five binomial standard
# deviations.

# %%
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

# %% [markdown]
# ## 3. The loss, computed cheaply
#
# The textbook form projects every position onto the vocabulary, `lm_head(hidden)` of shape $(B, T, V)$,
# and ignores 80 % of the result. `mntp_loss` projects only the positions $i-1$ whose right neighbour
# $i$ has a label: with a vocabulary of 49,152 (SmolLM2) or 32,000 (Llama 2) tokens, the logits are the
# largest tensor of a training step, and four fifths of it are never computed. Both must equal the
# equation above, which we write as a loop over labelled positions. (A label at position 0 has no
# position $-1$ to be predicted from; the shift drops it.)

# %%
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

# %% [markdown]
# ## 4. Training with the package's trainer
#
# Now the recipe: bidirectional attention, LoRA adapters ($r = 8$ here), and `train(task, TrainConfig)`,
# which runs AdamW with a linear warm-up and decay, writes one line per step to `metrics.jsonl` and the
# adapter at the end. We measure the MNTP loss on held-out sentences, always with the same masks, three
# times: the decoder as pretrained (causal), the same weights made bidirectional (LLM2Vec step 1 alone),
# and after MNTP. As the paper finds for S-LLaMA-1.3B and LLaMA-2-7B, opening the attention alone makes
# things worse; MNTP then teaches the model to use the right-hand context, and it ends below the causal
# model, which cannot see the repeated animal names.

# %%
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

# %% [markdown]
# ## 5. The real model (`LLM2VEC_MINI_REAL=1`)
#
# The same before-training measurement on SmolLM2-135M-Instruct ([Allal et al., 2025](https://arxiv.org/abs/2502.02737)):
# eight blocks of 128 tokens of WikiText-2 validation, masked as in the recipe, scored with causal and
# with bidirectional attention (our run: 5.12 and 5.91; half a minute on a busy 2-core CPU). As on the
# toy, the switch alone makes the untrained model worse. Training it is the CLI's job
# (`python -m llm2vec_mini train-mntp`), best on a GPU.

# %%
from llm2vec_mini.data import read_lines
from llm2vec_mini.hub import find_data_dir, smollm2_path

DATA = find_data_dir(needs=["wikitext-2/valid.txt"])  # $LLM2VEC_MINI_DATA, the download cache, ../shared/data
WIKITEXT = DATA / "wikitext-2/valid.txt" if DATA else None
if not REAL:
    print("skipped: set LLM2VEC_MINI_REAL=1 to measure SmolLM2's MNTP loss")
elif WIKITEXT is None:
    print("skipped: no data folder holds wikitext-2/valid.txt (python -m llm2vec_mini download data)")
else:
    import llm2vec_mini

    torch.set_num_threads(os.cpu_count() or 1)  # a real model: use every core
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

# %% [markdown]
# ## What we have
#
# MNTP is BERT's masking with a decoder's shifted loss, so the pretrained head is reused as it is, and
# only the masked positions need projecting. On the toy, bidirectional attention alone hurt, and a short
# LoRA run on MNTP turned the model into one that uses context from both sides. LLM2Vec merges this
# adapter into the weights and goes on to SimCSE ([07](07_simcse.ipynb)).

# %% [markdown]
# ## Try it yourself
#
# * Train with `all_mask=True` (every chosen token becomes `_`): does the loss on the 80/10/10 batches go
#   up or down?
# * Compute the loss *without* the shift (predict token $i$ from position $i$, as BERT does) and compare it
#   with MNTP's at the start of training: why is the shifted one so much lower?
# * Vary the mask ratio (0.1, 0.2, 0.4) in the toy run and watch the held-out loss.
#
# **Next:** [07 · SimCSE](07_simcse.ipynb): LLM2Vec's third step.
