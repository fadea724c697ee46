"""Writes tutorials 01 and 02 as clean notebooks (no outputs): `.venv/bin/python tutorials/_build.py`.

The cells live here as plain strings, so that a review of a tutorial reads like a script and a diff
shows only prose and code. Edit the text here, run this file, commit both. The test suite
(`tests/test_tutorials.py`) executes the notebooks; nothing is executed here.

Cell ids are fixed (`01-07`, ...) so that rebuilding an unchanged tutorial changes no byte.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent


def md(text: str):
    return new_markdown_cell(textwrap.dedent(text).strip("\n"))


def code(text: str):
    return new_code_cell(textwrap.dedent(text).strip("\n"))


def write(name: str, cells: list) -> Path:
    nb = new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
    })
    prefix = name.split("_", 1)[0]
    for i, cell in enumerate(nb.cells):
        cell.id = f"{prefix}-{i:02d}"
    nbformat.validate(nb)
    path = HERE / f"{name}.ipynb"
    path.write_text(nbformat.writes(nb) + "\n", encoding="utf-8")
    return path


# =================================================================================================
# 01: a Llama decoder from scratch

LLAMA = [
md(r"""
# 01 · A Llama decoder from scratch

LLM2Vec ([BehnamGhader et al., 2024](https://arxiv.org/abs/2404.05961)) starts from an ordinary
decoder-only language model and turns it into a text encoder. Before changing anything we need the
decoder itself. This notebook takes `llm2vec_mini.model` apart block by block, in the order a token
meets them:

```
token ids -> embed_tokens -> N x [ RMSNorm -> attention (RoPE, GQA) -> + residual
                                   RMSNorm -> SwiGLU MLP           -> + residual ] -> RMSNorm -> lm_head
```

For each block we write its equation, run the package's code, and `assert` that it agrees with an
independent computation written in the cell from the equation alone. Everything runs on
`LlamaConfig.tiny()`, a two-layer model with 64-wide hidden states, in a few seconds on a CPU.

References: LLaMA ([Touvron et al., 2023](https://arxiv.org/abs/2302.13971)),
RMSNorm ([Zhang & Sennrich, 2019](https://arxiv.org/abs/1910.07467)),
RoPE ([Su et al., 2021](https://arxiv.org/abs/2104.09864)),
SwiGLU ([Shazeer, 2020](https://arxiv.org/abs/2002.05202)),
GQA ([Ainslie et al., 2023](https://arxiv.org/abs/2305.13245)).
"""),
code(r"""
import math

import torch
from torch.testing import assert_close

from llm2vec_mini import LlamaConfig, LlamaForCausalLM
from llm2vec_mini.model import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaMLP,
    RMSNorm,
    apply_rope,
    build_attention_mask,
    rope_cos_sin,
    rope_inv_freq,
    rotate_half,
)

torch.manual_seed(0)
config = LlamaConfig.tiny()
B, T = 2, 7  # a batch of two sequences of seven tokens
print(config)
print("head_dim =", config.head_dim, "| query heads =", config.num_attention_heads,
      "| key/value heads =", config.num_key_value_heads)
"""),
md(r"""
## 1. RMSNorm

Llama normalises each hidden vector $x \in \mathbb{R}^d$ by its root mean square, with no mean
subtraction and no bias, then scales it by a learned gain $g$
([Zhang & Sennrich, 2019](https://arxiv.org/abs/1910.07467), Eq. 4):

$$
\mathrm{RMSNorm}(x) = \frac{x}{\sqrt{\frac{1}{d}\sum_{i=1}^{d} x_i^2 + \epsilon}} \odot g
$$

The package computes it in fp32 and casts back, so it is also safe in half precision.
"""),
code(r"""
norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
with torch.no_grad():
    norm.weight.normal_()  # a gain that is not all ones, so the test sees it
x = 3.0 * torch.randn(B, T, config.hidden_size)  # (B, T, d)
y = norm(x)


def rmsnorm_by_hand(x, g, eps):
    # the equation, one element at a time along the last axis
    rms = torch.sqrt((x * x).sum(-1, keepdim=True) / x.shape[-1] + eps)
    return x / rms * g


assert_close(y, rmsnorm_by_hand(x, norm.weight, config.rms_norm_eps))
# With a gain of ones, every output vector has root mean square 1 (up to eps).
unit = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)(x)
assert_close(unit.pow(2).mean(-1).sqrt(), torch.ones(B, T), atol=1e-5, rtol=0)
print("RMSNorm matches the equation; output RMS with unit gain:",
      unit.detach().pow(2).mean(-1).sqrt()[0, :3])
"""),
md(r"""
## 2. Rotary position embeddings (RoPE)

Attention by itself does not know where a token is. RoPE
([Su et al., 2021](https://arxiv.org/abs/2104.09864), Sec. 3.2) rotates every query and key, pair of
coordinates by pair of coordinates, by an angle proportional to the token's position $m$:

$$
\theta_i = \text{base}^{-2i/d}, \qquad
\begin{pmatrix} q'_{i} \\ q'_{i+d/2} \end{pmatrix} =
\begin{pmatrix} \cos m\theta_i & -\sin m\theta_i \\ \sin m\theta_i & \cos m\theta_i \end{pmatrix}
\begin{pmatrix} q_{i} \\ q_{i+d/2} \end{pmatrix}, \qquad i = 0, \dots, d/2 - 1 .
$$

We use Hugging Face's "rotate half" layout: coordinate $i$ is paired with $i + d/2$ (Meta's original
code pairs $2i$ with $2i+1$; the two differ by a fixed permutation of the weights). In code the
rotation is `q * cos + rotate_half(q) * sin`, with `rotate_half(x1, x2) = (-x2, x1)`.

Written with complex numbers $z_i = q_i + \mathrm{i}\, q_{i+d/2}$, the rotation is a product,
$z'_i = z_i\, e^{\mathrm{i} m \theta_i}$. That gives the property RoPE is built for: the score
between a query at position $m$ and a key at position $n$,

$$
\langle R_m q, R_n k \rangle = \mathrm{Re} \sum_i z^{q}_i\, \overline{z^{k}_i}\, e^{\mathrm{i}(m-n)\theta_i},
$$

depends on the positions only through $m - n$. Below we rebuild the rotation with complex numbers
in float64 and check it against the package, then check both properties: a rotation preserves
lengths, and shifting both positions by the same amount leaves every score unchanged.
"""),
code(r"""
d = config.head_dim
inv_freq = rope_inv_freq(config)  # (d/2,)
theta_by_hand = torch.tensor([config.rope_theta ** (-2 * i / d) for i in range(d // 2)])
assert_close(inv_freq, theta_by_hand.float())


def rope_by_hand(v, positions, theta):
    # v (..., T, d), positions (T,): rotate (v_i, v_{i+d/2}) as the complex number v_i + i v_{i+d/2}
    half = v.shape[-1] // 2
    z = torch.complex(v[..., :half].double(), v[..., half:].double())  # (..., T, d/2)
    angle = positions.double()[:, None] * theta.double()[None, :]  # (T, d/2)
    z = z * torch.polar(torch.ones_like(angle), angle)  # multiply by e^{i m theta}
    return torch.cat([z.real, z.imag], dim=-1).float()


positions = torch.arange(T)
cos, sin = rope_cos_sin(inv_freq, positions[None].expand(B, T), torch.float32)  # (B, T, d) each
q = torch.randn(B, config.num_attention_heads, T, d)  # (B, nh, T, d)
k = torch.randn(B, config.num_key_value_heads, T, d)  # (B, nkv, T, d)
q_rot, k_rot = apply_rope(q, k, cos, sin)
assert_close(q_rot, rope_by_hand(q, positions, theta_by_hand))
assert_close(k_rot, rope_by_hand(k, positions, theta_by_hand))
assert_close(rotate_half(torch.tensor([1.0, 2.0, 3.0, 4.0])), torch.tensor([-3.0, -4.0, 1.0, 2.0]))

# 1) A rotation preserves the length of every head vector.
assert_close(q_rot.norm(dim=-1), q.norm(dim=-1))

# 2) The score of one query and one key depends only on the distance between their positions.
qv, kv = torch.randn(d), torch.randn(d)


def score(m, n):
    cos_, sin_ = rope_cos_sin(inv_freq, torch.tensor([[m, n]]), torch.float32)  # (1, 2, d)
    q2, k2 = apply_rope(qv.expand(1, 1, 2, d), kv.expand(1, 1, 2, d), cos_, sin_)
    return q2[0, 0, 0] @ k2[0, 0, 1]


scores = torch.stack([score(m, m - 3) for m in (3, 10, 50, 200)])  # always 3 apart
print("q.k for (m, n) = (3, 0), (10, 7), (50, 47), (200, 197):", scores)
assert_close(scores, scores[0].expand(4), atol=1e-4, rtol=1e-4)
assert not torch.isclose(score(10, 7), score(10, 3), atol=1e-3)  # another distance, another score
"""),
md(r"""
## 3. Causal self-attention with grouped-query heads

Each head computes scaled dot-product attention ([Vaswani et al., 2017](https://arxiv.org/abs/1706.03762),
Eq. 1) on the rotated queries and keys, with an additive mask $M$:

$$
\mathrm{Attention}(Q, K, V) = \mathrm{softmax}\!\left(\frac{QK^\top}{\sqrt{d}} + M\right) V,
\qquad M_{ij} = \begin{cases} 0 & \text{key } j \text{ visible to query } i \\
-\infty & \text{otherwise.} \end{cases}
$$

In a decoder, query $i$ sees keys $j \le i$ (the causal mask; LLM2Vec's first step removes it, see
tutorial 02). The package writes the largest negative float, `torch.finfo(dtype).min`, instead of
$-\infty$ so that a fully hidden row gives no NaN.

Grouped-query attention ([Ainslie et al., 2023](https://arxiv.org/abs/2305.13245)) uses fewer key/value
heads than query heads: here 4 query heads share 2 key/value heads, query heads $2g$ and $2g+1$
reading key/value head $g$. Finally the heads are concatenated and mixed by $W_O$ (`o_proj`).
"""),
code(r"""
attn = LlamaAttention(config)
with torch.no_grad():
    for p in attn.parameters():
        p.normal_(std=0.2)  # larger than the init, so that attention is far from uniform
x = torch.randn(B, T, config.hidden_size)
mask = build_attention_mask(None, T, causal=True, dtype=torch.float32)  # (1, 1, T, T)
y = attn(x, cos, sin, mask)  # (B, T, hidden)


def attention_by_hand(x, attn, positions, causal=True):
    nh, nkv, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
    Bx, Tx, _ = x.shape
    q = (x @ attn.q_proj.weight.T).view(Bx, Tx, nh, d).transpose(1, 2)  # (B, nh, T, d)
    k = (x @ attn.k_proj.weight.T).view(Bx, Tx, nkv, d).transpose(1, 2)  # (B, nkv, T, d)
    v = (x @ attn.v_proj.weight.T).view(Bx, Tx, nkv, d).transpose(1, 2)  # (B, nkv, T, d)
    q, k = rope_by_hand(q, positions, theta_by_hand), rope_by_hand(k, positions, theta_by_hand)
    k = k.repeat_interleave(nh // nkv, dim=1)  # (B, nh, T, d): query head h reads kv head h // 2
    v = v.repeat_interleave(nh // nkv, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # (B, nh, T, T)
    if causal:
        future = torch.ones(Tx, Tx, dtype=torch.bool).triu(diagonal=1)  # key j > query i
        scores = scores.masked_fill(future, float("-inf"))
    out = scores.softmax(dim=-1) @ v  # (B, nh, T, d)
    out = out.transpose(1, 2).reshape(Bx, Tx, nh * d)  # (B, T, nh * d): heads side by side
    return out @ attn.o_proj.weight.T


assert_close(y, attention_by_hand(x, attn, positions), atol=1e-5, rtol=1e-4)
# SDPA's built-in causal flag (used when there is no padding) agrees with the explicit mask.
assert_close(attn(x, cos, sin, None, is_causal=True), y, atol=1e-5, rtol=1e-4)
# Without the mask the result is different: the first token now sees the whole sequence.
y_bidir = attn(x, cos, sin, None)
assert_close(y_bidir, attention_by_hand(x, attn, positions, causal=False), atol=1e-5, rtol=1e-4)
assert not torch.allclose(y_bidir[:, 0], y[:, 0], atol=1e-3)
print("attention matches softmax(QK^T/sqrt(d) + M) V with", config.num_attention_heads,
      "query heads over", config.num_key_value_heads, "key/value heads")
"""),
md(r"""
## 4. The SwiGLU MLP

Llama's feed-forward block is a gated linear unit with the SiLU (swish) activation
([Shazeer, 2020](https://arxiv.org/abs/2002.05202), Eq. 6; SiLU is $z\,\sigma(z)$):

$$
\mathrm{MLP}(x) = W_{\text{down}}\big(\mathrm{SiLU}(W_{\text{gate}}\, x) \odot W_{\text{up}}\, x\big),
\qquad \mathrm{SiLU}(z) = \frac{z}{1 + e^{-z}} .
$$

`gate_proj` and `up_proj` widen $d$ = 64 to `intermediate_size` = 128; `down_proj` brings it back.
"""),
code(r"""
mlp = LlamaMLP(config)
x = torch.randn(B, T, config.hidden_size)


def swiglu_by_hand(x, mlp):
    a = x @ mlp.gate_proj.weight.T  # (B, T, intermediate)
    silu = a / (1 + torch.exp(-a))
    return (silu * (x @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T  # (B, T, hidden)


assert_close(mlp(x), swiglu_by_hand(x, mlp))
assert mlp.gate_proj.weight.shape == (config.intermediate_size, config.hidden_size)
print("SwiGLU matches the equation")
"""),
md(r"""
## 5. One decoder layer

Llama is a pre-norm transformer: each sub-block reads a normalised copy of the residual stream and
adds its result back to it.

$$
h = x + \mathrm{Attention}(\mathrm{RMSNorm}_1(x)), \qquad
\mathrm{out} = h + \mathrm{MLP}(\mathrm{RMSNorm}_2(h)).
$$

The check composes the three hand-written functions above with the layer's weights, so it tests the
wiring (which norm feeds which block, where the residuals go) on top of the blocks.
"""),
code(r"""
layer = LlamaDecoderLayer(config)
with torch.no_grad():
    for p in layer.parameters():
        p.add_(0.1 * torch.randn_like(p))  # move the norm gains off 1 as well
x = torch.randn(B, T, config.hidden_size)
out = layer(x, cos, sin, mask)


def layer_by_hand(x, layer, positions):
    eps = config.rms_norm_eps
    h = x + attention_by_hand(rmsnorm_by_hand(x, layer.input_layernorm.weight, eps),
                              layer.self_attn, positions)
    return h + swiglu_by_hand(rmsnorm_by_hand(h, layer.post_attention_layernorm.weight, eps),
                              layer.mlp)


assert_close(out, layer_by_hand(x, layer, positions), atol=1e-5, rtol=1e-4)
print("the decoder layer matches x + attn(norm(x)), then h + mlp(norm(h))")
"""),
md(r"""
## 6. The whole model

`LlamaModel` embeds the token ids (a table lookup), applies the layers, and normalises once more;
`LlamaForCausalLM` adds the vocabulary head, so that position $t$ holds the logits of token $t+1$:

$$
x^{(0)} = E[\text{ids}], \qquad x^{(\ell)} = \mathrm{Layer}_\ell(x^{(\ell-1)}), \qquad
\text{logits} = \mathrm{RMSNorm}(x^{(L)})\, W_{\text{head}}^\top .
$$

We rebuild the forward pass from the embedding table and the hand-written layer, then check the
defining property of a decoder: the logits at position $t$ do not change when a later token does.
"""),
code(r"""
model = LlamaForCausalLM(config).eval()
ids = torch.randint(3, config.vocab_size, (B, T))  # (B, T) token ids
logits = model(ids)  # (B, T, vocab)


def model_by_hand(ids, model):
    x = model.model.embed_tokens.weight[ids]  # (B, T, hidden): row ids[b, t] of the table
    for layer in model.model.layers:
        x = layer_by_hand(x, layer, torch.arange(ids.shape[1]))
    x = rmsnorm_by_hand(x, model.model.norm.weight, config.rms_norm_eps)
    return x @ model.lm_head.weight.T  # (B, T, vocab)


assert logits.shape == (B, T, config.vocab_size)
assert_close(logits, model_by_hand(ids, model), atol=1e-5, rtol=1e-4)

changed = ids.clone()
changed[:, -1] = (ids[:, -1] + 1) % config.vocab_size  # a different last token
logits_changed = model(changed)
assert_close(logits_changed[:, :-1], logits[:, :-1])  # the past does not see the future
assert not torch.allclose(logits_changed[:, -1], logits[:, -1])  # the last position does
print("model logits match the hand-built forward pass; earlier positions ignore later tokens")
"""),
md(r"""
## 7. Counting parameters: SmolLM2-135M

The real model of this project is SmolLM2-135M (30 layers, hidden size 576, 9 query heads over 3
key/value heads of width 64, MLP width 1536, a 49152-token vocabulary, and an `lm_head` tied to the
embedding). Building it on PyTorch's `meta` device creates every tensor's shape and no data, so we
can count its parameters instantly and without memory. By hand, with $V$ the vocabulary, $h$ the
hidden size, $n_h, n_{kv}$ the head counts, $d$ the head width, $m$ the MLP width and $L$ the layers:

$$
N = \underbrace{V h}_{\text{embedding (= head)}} + L\,\big(\underbrace{2 h n_h d + 2 h n_{kv} d}_{q,o,k,v}
+ \underbrace{3 h m}_{\text{MLP}} + \underbrace{2h}_{\text{norms}}\big) + \underbrace{h}_{\text{final norm}}
$$
"""),
code(r"""
big_config = LlamaConfig.smollm2_135m()
with torch.device("meta"):
    big = LlamaForCausalLM(big_config)
n_params = sum(p.numel() for p in big.parameters())  # a shared tensor is counted once

V, h, L = big_config.vocab_size, big_config.hidden_size, big_config.num_hidden_layers
nh, nkv, d, m = (big_config.num_attention_heads, big_config.num_key_value_heads,
                 big_config.head_dim, big_config.intermediate_size)
by_hand = V * h + L * (2 * h * nh * d + 2 * h * nkv * d + 3 * h * m + 2 * h) + h
print(f"SmolLM2-135M: {n_params:,} parameters ({n_params / 1e6:.1f}M); by hand {by_hand:,}")
assert n_params == by_hand
assert round(n_params / 1e6, 1) == 134.5
assert big.lm_head.weight is big.model.embed_tokens.weight  # tied: one tensor, two names
assert all(p.device.type == "meta" for p in big.parameters())  # no memory was allocated
"""),
md(r"""
## What we have

Every block of the decoder agrees with its equation, and so does the whole forward pass. The model
is causal: position $t$ is blind to tokens after $t$. That blindness is exactly what LLM2Vec's first
step removes; [tutorial 02](02_bidirectional_attention.ipynb) flips the switch and looks at the masks.
"""),
]


# =================================================================================================
# 02: bidirectional attention (LLM2Vec step 1)

BIDIR = [
md(r"""
# 02 · Bidirectional attention: LLM2Vec's first step

LLM2Vec ([BehnamGhader et al., 2024](https://arxiv.org/abs/2404.05961)) turns a decoder into an encoder
in three steps: 1) enable bidirectional attention, 2) masked next-token prediction (MNTP),
3) unsupervised contrastive learning (SimCSE). Section 2.1 describes the first step: replace the
causal attention mask of the decoder with an all-ones matrix, so that every token can see every
other token. Nothing else changes: no weights are added or altered.

In `llm2vec_mini` the step is one boolean, `model.set_causal(False)`, and all its consequences live
in one function, `build_attention_mask`. This notebook

1. draws the masks, causal and bidirectional, with left and right padding;
2. shows that a later token changes earlier hidden states only when the mask is bidirectional;
3. shows that the hidden states of real tokens do not depend on which side the padding is on.
"""),
code(r"""
import matplotlib.pyplot as plt
import torch
from torch.testing import assert_close

from llm2vec_mini import LlamaConfig
from llm2vec_mini.model import LlamaModel, build_attention_mask, positions_from_mask

torch.manual_seed(0)
config = LlamaConfig.tiny()
"""),
md(r"""
## 1. The masks

With an additive mask $M$, attention is $\mathrm{softmax}(QK^\top/\sqrt{d} + M)\,V$; $M_{ij} = 0$
lets query $i$ see key $j$ and $M_{ij} = \texttt{finfo.min}$ (in effect $-\infty$) hides it.
For a sequence with real tokens marked by $r_j \in \{0, 1\}$ (the `attention_mask` of a padded batch):

$$
\text{causal:}\quad \text{visible}_{ij} = [\,j \le i\,] \wedge r_j ,
\qquad\qquad
\text{bidirectional (LLM2Vec):}\quad \text{visible}_{ij} = r_j .
$$

Padding keys are always hidden. Below, a 4-token sentence in a batch padded to 6 tokens, padded on the
right (`1 1 1 1 0 0`) or on the left (`0 0 1 1 1 1`). White cells are visible.
"""),
code(r"""
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
"""),
md(r"""
Things to notice:

* **Causal, left padding**: the first two rows are all black. Those queries are padding and can see
  nothing at all; the package fills such rows with `finfo.min` everywhere, which softmax turns into a
  uniform row instead of NaN. Their outputs are never used.
* **Bidirectional**: every query, real or padding, sees every real key. With no padding at all
  `build_attention_mask` returns `None`, and PyTorch's attention takes its unmasked fast path.
* The real tokens' block (rows and columns with $r = 1$) is the same picture whichever side the
  padding is on: the lower triangle for a decoder, a full square for LLM2Vec.
"""),
md(r"""
## 2. The future now reaches the past

In a decoder the hidden state at position $t$ is a function of tokens $0..t$ only. After
`set_causal(False)` it is a function of the whole sequence: that is what makes the last layer a
useful representation of every token in context, the point of LLM2Vec. We change only the **last**
token of a sequence and measure how much each position's final hidden state moves.
"""),
code(r"""
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
"""),
md(r"""
## 3. Padding side does not matter

Batches of sentences of different lengths must be padded. Two things could make a real token's hidden
state depend on the padding:

* attending to padding keys, which the mask prevents (Section 1), and
* shifted positions: with left padding, the 4-token sentence below starts at index 3. Counting
  positions by index would rotate it as position 3 instead of 0. For RoPE that shift is harmless in
  exact arithmetic, since every score depends only on the distance $m - n$ (tutorial 01, Section 2),
  and every real token shifts by the same amount; it would only change the rounding, more so with
  the amount of padding. `LlamaModel` therefore counts positions over real tokens only
  (`positions_from_mask`), so a sentence gets the same positions $0, 1, 2, \dots$ wherever it sits.

We check it against the most independent reference there is: each sentence run alone, with no
padding and no mask at all, in both attention modes.
"""),
code(r"""
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
"""),
md(r"""
## What we have

One boolean separates a decoder from LLM2Vec's bidirectional encoder, and the pictures above are its
whole effect. Switching it on does not make a good encoder by itself: the model was never trained to
look at the future. The paper (Sec. 3) finds that the switch alone hurts S-LLaMA-1.3B and
LLaMA-2-7B, while Mistral-7B is a surprising exception. Step 2, masked next-token prediction, teaches
the model to use its new view; that is the next step of the recipe.
"""),
]


if __name__ == "__main__":
    for name, cells in (("01_llama_from_scratch", LLAMA), ("02_bidirectional_attention", BIDIR)):
        print("wrote", write(name, cells).relative_to(HERE.parent))
