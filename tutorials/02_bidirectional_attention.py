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
# # 02 · Bidirectional attention: LLM2Vec's first step
#
# LLM2Vec ([BehnamGhader et al., 2024](https://arxiv.org/abs/2404.05961)) turns a decoder into an encoder
# in three steps: 1) enable bidirectional attention, 2) masked next-token prediction (MNTP),
# 3) unsupervised contrastive learning (SimCSE). Section 2.1 describes the first step: replace the
# causal attention mask of the decoder with an all-ones matrix, so that every token can see every
# other token. Nothing else changes: no weights are added or altered.
#
# In `llm2vec_mini` the step is one boolean, `model.set_causal(False)`, and all its consequences live
# in one function, `build_attention_mask`. This notebook
#
# 1. draws the masks, causal and bidirectional, with left and right padding;
# 2. shows that a later token changes earlier hidden states only when the mask is bidirectional;
# 3. shows that the hidden states of real tokens do not depend on which side the padding is on.

# %% [markdown]
# **Assumes:** [tutorial 01](01_llama_from_scratch.ipynb): the decoder's blocks and its attention mask.
#
# **Time:** about 15 minutes to read; about 20 seconds to run.
#
# **The learning path:** 01 the decoder → 02 bidirectional attention → 04 pooling and encoding →
# 05 LoRA → 06 MNTP → 07 SimCSE → 08 end to end; 03 (file formats) is an optional deep dive.

# %%
import matplotlib.pyplot as plt
import torch
from torch.testing import assert_close

from llm2vec_mini import LlamaConfig
from llm2vec_mini.model import LlamaModel, build_attention_mask, positions_from_mask

torch.manual_seed(0)
config = LlamaConfig.tiny()
print(f"a tiny Llama: {config.num_hidden_layers} layers, hidden size {config.hidden_size}, "
      f"{config.num_attention_heads} query heads over {config.num_key_value_heads} key/value heads")

# %% [markdown]
# ## 1. The masks
#
# With an additive mask $M$, attention is $\mathrm{softmax}(QK^\top/\sqrt{d} + M)\,V$; $M_{ij} = 0$
# lets query $i$ see key $j$ and $M_{ij} = \texttt{finfo.min}$ (in effect $-\infty$) hides it.
# For a sequence with real tokens marked by $r_j \in \{0, 1\}$ (the `attention_mask` of a padded batch):
#
# $$
# \text{causal:}\quad \text{visible}_{ij} = [\,j \le i\,] \wedge r_j ,
# \qquad\qquad
# \text{bidirectional (LLM2Vec):}\quad \text{visible}_{ij} = r_j .
# $$
#
# Padding keys are always hidden. Below, a 4-token sentence in a batch padded to 6 tokens, padded on the
# right (`1 1 1 1 0 0`) or on the left (`0 0 1 1 1 1`). White cells are visible.

# %%
T = 6
paddings = {
    "no padding": None,
    "right padding": torch.tensor([[1, 1, 1, 1, 0, 0]]),
    "left padding": torch.tensor([[0, 0, 1, 1, 1, 1]]),
}


def visible_by_hand(real, causal):
    # the equations above, from index comparisons: (T, T) booleans, row = query i, column = key j
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    seen = torch.ones(T, T, dtype=torch.bool) if real is None else real[0].bool()[None, :].expand(T, T)
    return seen & (j <= i) if causal else seen


fig, axes = plt.subplots(2, 3, figsize=(10, 6.8))
for row, causal in enumerate([True, False]):
    for col, (name, real) in enumerate(paddings.items()):
        mask = build_attention_mask(real, T, causal=causal, dtype=torch.float32)
        if mask is None:  # bidirectional without padding: nothing to hide, SDPA needs no mask
            assert not causal and real is None
            visible = torch.ones(T, T, dtype=torch.bool)
        else:
            assert mask.shape == (1, 1, T, T)
            assert set(mask.unique().tolist()) <= {0.0, torch.finfo(torch.float32).min}
            visible = mask[0, 0] == 0
        assert torch.equal(visible, visible_by_hand(real, causal)), (name, causal)
        ax = axes[row, col]
        ax.imshow(visible, cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"{'causal' if causal else 'bidirectional'}, {name}"
                     + (" (mask is None)" if mask is None else ""), fontsize=10)
        ax.set_xlabel("key j")
        ax.set_ylabel("query i")
        ax.set_xticks(range(T))
        ax.set_yticks(range(T))
fig.suptitle("Which keys each query may attend to (white = visible)")
fig.tight_layout()
plt.show()

# %% [markdown]
# Things to notice:
#
# * **Causal, left padding**: the first two rows are all black. Those queries are padding and can see
#   nothing at all; the package fills such rows with `finfo.min` everywhere, which softmax turns into a
#   uniform row instead of NaN. Their outputs are never used.
# * **Bidirectional**: every query, real or padding, sees every real key. With no padding at all
#   `build_attention_mask` returns `None`, and PyTorch's attention takes its unmasked fast path.
# * The real tokens' block (rows and columns with $r = 1$) is the same picture whichever side the
#   padding is on: the lower triangle for a decoder, a full square for LLM2Vec.

# %% [markdown]
# ## 2. The future now reaches the past
#
# In a decoder the hidden state at position $t$ is a function of tokens $0..t$ only. After
# `set_causal(False)` it is a function of the whole sequence: that is what makes the last layer a
# useful representation of every token in context, the point of LLM2Vec. We change only the **last**
# token of a sequence and measure how much each position's final hidden state moves.

# %%
model = LlamaModel(config).eval()
weights_before = {k: v.clone() for k, v in model.state_dict().items()}
ids = torch.randint(3, config.vocab_size, (1, 8))  # (1, 8)
changed = ids.clone()
changed[0, -1] = (ids[0, -1] + 1) % config.vocab_size  # only the last token differs

shift = {}
with torch.no_grad():
    for causal in (True, False):
        model.set_causal(causal)
        h, h_changed = model(ids), model(changed)  # (1, 8, hidden) each
        shift[causal] = (h - h_changed).norm(dim=-1)[0]  # (8,): how far each position moved
        if causal:
            assert_close(h_changed[:, :-1], h[:, :-1])  # positions 0..6 cannot see token 7
        else:
            assert (shift[causal][:-1] > 1e-3).all()  # every earlier position sees token 7
        assert shift[causal][-1] > 1e-3  # the changed position itself always moves

# The switch changes the mask and nothing else: same parameters, same values.
assert all(torch.equal(v, weights_before[k]) for k, v in model.state_dict().items())

fig, ax = plt.subplots(figsize=(7, 3))
positions = torch.arange(ids.shape[1])
ax.bar(positions - 0.2, shift[True], width=0.4, label="causal (decoder)")
ax.bar(positions + 0.2, shift[False], width=0.4, label="bidirectional (LLM2Vec)")
ax.set_xlabel("position")
ax.set_ylabel("|change of hidden state|")
ax.set_title("Changing the last token (position 7)")
ax.legend()
fig.tight_layout()
plt.show()
print("causal:       ", shift[True])
print("bidirectional:", shift[False])

# %% [markdown]
# ## 3. Padding side does not matter
#
# Batches of sentences of different lengths must be padded. Two things could make a real token's hidden
# state depend on the padding:
#
# * attending to padding keys, which the mask prevents (Section 1), and
# * shifted positions: with left padding, the 4-token sentence below starts at index 3. Counting
#   positions by index would rotate it as position 3 instead of 0. For RoPE that shift is harmless in
#   exact arithmetic, since every score depends only on the distance $m - n$ (tutorial 01, Section 2),
#   and every real token shifts by the same amount; it would only change the rounding, more so with
#   the amount of padding. `LlamaModel` therefore counts positions over real tokens only
#   (`positions_from_mask`), so a sentence gets the same positions $0, 1, 2, \dots$ wherever it sits.
#
# We check it against the most independent reference there is: each sentence run alone, with no
# padding and no mask at all, in both attention modes.

# %%
pad = config.eos_token_id  # LLM2Vec pads with the end-of-sequence token
lengths = [7, 4, 2]
sentences = [torch.randint(3, config.vocab_size, (n,)) for n in lengths]
width = max(lengths)


def batch(side):
    ids = torch.full((len(lengths), width), pad)
    real = torch.zeros(len(lengths), width, dtype=torch.long)
    for b, s in enumerate(sentences):
        where = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[b, where], real[b, where] = s, 1
    return ids, real


for side in ("right", "left"):  # every real token is numbered from 0 within its own sentence
    ids, real = batch(side)
    pos = positions_from_mask(real, *ids.shape, ids.device)  # (3, 7)
    for b, s in enumerate(sentences):
        assert torch.equal(pos[b][real[b].bool()], torch.arange(len(s))), (side, b)

with torch.no_grad():
    for causal in (True, False):
        model.set_causal(causal)
        hidden = {side: model(*batch(side)) for side in ("right", "left")}  # (3, 7, hidden) each
        for b, s in enumerate(sentences):
            alone = model(s[None])[0]  # (len, hidden): no padding, no mask
            right = hidden["right"][b, :len(s)]
            left = hidden["left"][b, width - len(s):]
            assert_close(right, alone, atol=1e-5, rtol=1e-4)
            assert_close(left, alone, atol=1e-5, rtol=1e-4)
        print(f"causal={causal}: real-token hidden states agree with and without padding, either side")

# %% [markdown]
# ## What we have
#
# One boolean separates a decoder from LLM2Vec's bidirectional encoder, and the pictures above are its
# whole effect. Switching it on does not make a good encoder by itself: the model was never trained to
# look at the future. The paper (Sec. 3.1 and 3.2) finds that the switch alone hurts S-LLaMA-1.3B and
# LLaMA-2-7B, while Mistral-7B is a surprising exception (Sec. 4.2 looks into why). Step 2, masked next-token prediction, teaches
# the model to use its new view; that is the next step of the recipe.

# %% [markdown]
# ## Try it yourself
#
# * Draw the causal mask for a batch padded on the *left*: which query rows see nothing at all, and why
#   is that harmless?
# * Change a token in the *middle* of a sequence: which positions move under the causal mask, which under
#   the bidirectional one?
# * Give `positions_from_mask` a mask with padding on both sides and check the positions it returns.
#
# **Next:** [04 · Pooling and encoding](04_pooling_and_encoding.ipynb) (or first the optional [03 · Loading real weights](03_loading_real_weights.ipynb)).
