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
# # 01 · A Llama decoder from scratch
#
# LLM2Vec ([BehnamGhader et al., 2024](https://arxiv.org/abs/2404.05961)) starts from an ordinary
# decoder-only language model and turns it into a text encoder. Before changing anything we need the
# decoder itself. This notebook takes `llm2vec_mini.model` apart block by block, in the order a token
# meets them:
#
# ```
# token ids -> embed_tokens -> N x [ RMSNorm -> attention (RoPE, GQA) -> + residual
#                                    RMSNorm -> SwiGLU MLP           -> + residual ] -> RMSNorm -> lm_head
# ```
#
# For each block we write its equation, run the package's code, and `assert` that it agrees with an
# independent computation written in the cell from the equation alone. Everything runs on
# `LlamaConfig.tiny()`, a two-layer model with 64-wide hidden states, in a few seconds on a CPU.
#
# References: LLaMA ([Touvron et al., 2023](https://arxiv.org/abs/2302.13971)),
# RMSNorm ([Zhang & Sennrich, 2019](https://arxiv.org/abs/1910.07467)),
# RoPE ([Su et al., 2021](https://arxiv.org/abs/2104.09864)),
# SwiGLU ([Shazeer, 2020](https://arxiv.org/abs/2002.05202)),
# GQA ([Ainslie et al., 2023](https://arxiv.org/abs/2305.13245)).

# %% [markdown]
# **Assumes:** Python, PyTorch tensors and `nn.Module`, matrix products and softmax. Nothing about LLM2Vec yet.
#
# **Time:** about 30 minutes to read; about 15 seconds to run on a 2-core CPU (no download, no data).
#
# **The learning path:** 01 the decoder → 02 bidirectional attention → 04 pooling and encoding →
# 05 LoRA → 06 MNTP → 07 SimCSE → 08 end to end; 03 (file formats) is an optional deep dive.

# %%
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

# %% [markdown]
# ## 1. RMSNorm
#
# Llama normalises each hidden vector $x \in \mathbb{R}^d$ by its root mean square, with no mean
# subtraction and no bias, then scales it by a learned gain $g$
# ([Zhang & Sennrich, 2019](https://arxiv.org/abs/1910.07467), Eq. 4):
#
# $$
# \mathrm{RMSNorm}(x) = \frac{x}{\sqrt{\frac{1}{d}\sum_{i=1}^{d} x_i^2 + \epsilon}} \odot g
# $$
#
# The package computes it in fp32 and casts back, so it is also safe in half precision.

# %%
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

# %% [markdown]
# ## 2. Rotary position embeddings (RoPE)
#
# Attention by itself does not know where a token is. RoPE
# ([Su et al., 2021](https://arxiv.org/abs/2104.09864), Sec. 3.2) rotates every query and key, pair of
# coordinates by pair of coordinates, by an angle proportional to the token's position $m$:
#
# $$
# \theta_i = \text{base}^{-2i/d}, \qquad
# \begin{pmatrix} q'_{i} \\ q'_{i+d/2} \end{pmatrix} =
# \begin{pmatrix} \cos m\theta_i & -\sin m\theta_i \\ \sin m\theta_i & \cos m\theta_i \end{pmatrix}
# \begin{pmatrix} q_{i} \\ q_{i+d/2} \end{pmatrix}, \qquad i = 0, \dots, d/2 - 1 .
# $$
#
# We use Hugging Face's "rotate half" layout: coordinate $i$ is paired with $i + d/2$ (Meta's original
# code pairs $2i$ with $2i+1$; the two differ by a fixed permutation of the weights). In code the
# rotation is `q * cos + rotate_half(q) * sin`, with `rotate_half(x1, x2) = (-x2, x1)`.
#
# Written with complex numbers $z_i = q_i + \mathrm{i}\, q_{i+d/2}$, the rotation is a product,
# $z'_i = z_i\, e^{\mathrm{i} m \theta_i}$. That gives the property RoPE is built for: the score
# between a query at position $m$ and a key at position $n$,
#
# $$
# \langle R_m q, R_n k \rangle = \mathrm{Re} \sum_i z^{q}_i\, \overline{z^{k}_i}\, e^{\mathrm{i}(m-n)\theta_i},
# $$
#
# depends on the positions only through $m - n$. Below we rebuild the rotation with complex numbers
# in float64 and check it against the package, then check both properties: a rotation preserves
# lengths, and shifting both positions by the same amount leaves every score unchanged.

# %%
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

# %% [markdown]
# ## 3. Causal self-attention with grouped-query heads
#
# Each head computes scaled dot-product attention ([Vaswani et al., 2017](https://arxiv.org/abs/1706.03762),
# Eq. 1) on the rotated queries and keys, with an additive mask $M$:
#
# $$
# \mathrm{Attention}(Q, K, V) = \mathrm{softmax}\!\left(\frac{QK^\top}{\sqrt{d}} + M\right) V,
# \qquad M_{ij} = \begin{cases} 0 & \text{key } j \text{ visible to query } i \\
# -\infty & \text{otherwise.} \end{cases}
# $$
#
# In a decoder, query $i$ sees keys $j \le i$ (the causal mask; LLM2Vec's first step removes it, see
# tutorial 02). The package writes the largest negative float, `torch.finfo(dtype).min`, instead of
# $-\infty$ so that a fully hidden row gives no NaN.
#
# Grouped-query attention ([Ainslie et al., 2023](https://arxiv.org/abs/2305.13245)) uses fewer key/value
# heads than query heads: here 4 query heads share 2 key/value heads, query heads $2g$ and $2g+1$
# reading key/value head $g$. Finally the heads are concatenated and mixed by $W_O$ (`o_proj`).

# %%
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

# %% [markdown]
# ## 4. The SwiGLU MLP
#
# Llama's feed-forward block is a gated linear unit with the SiLU (swish) activation
# ([Shazeer, 2020](https://arxiv.org/abs/2002.05202), Eq. 6; SiLU is $z\,\sigma(z)$):
#
# $$
# \mathrm{MLP}(x) = W_{\text{down}}\big(\mathrm{SiLU}(W_{\text{gate}}\, x) \odot W_{\text{up}}\, x\big),
# \qquad \mathrm{SiLU}(z) = \frac{z}{1 + e^{-z}} .
# $$
#
# `gate_proj` and `up_proj` widen $d$ = 64 to `intermediate_size` = 128; `down_proj` brings it back.

# %%
mlp = LlamaMLP(config)
x = torch.randn(B, T, config.hidden_size)


def swiglu_by_hand(x, mlp):
    a = x @ mlp.gate_proj.weight.T  # (B, T, intermediate)
    silu = a / (1 + torch.exp(-a))
    return (silu * (x @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T  # (B, T, hidden)


assert_close(mlp(x), swiglu_by_hand(x, mlp))
assert mlp.gate_proj.weight.shape == (config.intermediate_size, config.hidden_size)
print("SwiGLU matches the equation")

# %% [markdown]
# ## 5. One decoder layer
#
# Llama is a pre-norm transformer: each sub-block reads a normalised copy of the residual stream and
# adds its result back to it.
#
# $$
# h = x + \mathrm{Attention}(\mathrm{RMSNorm}_1(x)), \qquad
# \mathrm{out} = h + \mathrm{MLP}(\mathrm{RMSNorm}_2(h)).
# $$
#
# The check composes the three hand-written functions above with the layer's weights, so it tests the
# wiring (which norm feeds which block, where the residuals go) on top of the blocks.

# %%
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

# %% [markdown]
# ## 6. The whole model
#
# `LlamaModel` embeds the token ids (a table lookup), applies the layers, and normalises once more;
# `LlamaForCausalLM` adds the vocabulary head, so that position $t$ holds the logits of token $t+1$:
#
# $$
# x^{(0)} = E[\text{ids}], \qquad x^{(\ell)} = \mathrm{Layer}_\ell(x^{(\ell-1)}), \qquad
# \text{logits} = \mathrm{RMSNorm}(x^{(L)})\, W_{\text{head}}^\top .
# $$
#
# We rebuild the forward pass from the embedding table and the hand-written layer, then check the
# defining property of a decoder: the logits at position $t$ do not change when a later token does.

# %%
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

# %% [markdown]
# ## 7. Counting parameters: SmolLM2-135M
#
# The real model of this project is SmolLM2-135M (30 layers, hidden size 576, 9 query heads over 3
# key/value heads of width 64, MLP width 1536, a 49152-token vocabulary, and an `lm_head` tied to the
# embedding). Building it on PyTorch's `meta` device creates every tensor's shape and no data, so we
# can count its parameters instantly and without memory. By hand, with $V$ the vocabulary, $h$ the
# hidden size, $n_h, n_{kv}$ the head counts, $d$ the head width, $m$ the MLP width and $L$ the layers:
#
# $$
# N = \underbrace{V h}_{\text{embedding (= head)}} + L\,\big(\underbrace{2 h n_h d + 2 h n_{kv} d}_{q,o,k,v}
# + \underbrace{3 h m}_{\text{MLP}} + \underbrace{2h}_{\text{norms}}\big) + \underbrace{h}_{\text{final norm}}
# $$

# %%
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

# %% [markdown]
# ## What we have
#
# Every block of the decoder agrees with its equation, and so does the whole forward pass. The model
# is causal: position $t$ is blind to tokens after $t$. That blindness is exactly what LLM2Vec's first
# step removes; [tutorial 02](02_bidirectional_attention.ipynb) flips the switch and looks at the masks.

# %% [markdown]
# ## Try it yourself
#
# * Change `LlamaConfig.tiny(num_key_value_heads=...)` to 1 and to 4: which shapes in section 4 change, and
#   does the grouped-query check still pass?
# * Replace `rotate_half` by the interleaved layout (pairs $(x_{2i}, x_{2i+1})$) in a copy of the RoPE cell:
#   which assert fails, and why does a checkpoint trained with one layout break under the other?
# * Count the parameters of `LlamaConfig.sheared_llama_1_3b()` by hand as in section 7 (its `lm_head` is
#   *not* tied) and check your formula against the meta-device model.
#
# **Next:** [02 · Bidirectional attention](02_bidirectional_attention.ipynb): one boolean turns this decoder into an encoder.
