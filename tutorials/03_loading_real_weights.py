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
# # 03 · Loading real weights: safetensors, GGUF, and SmolLM2
#
# LLM2Vec ([BehnamGhader et al., 2024](https://arxiv.org/abs/2404.05961)) starts from a *pretrained*
# decoder, so before any training we must read someone else's weights into our `LlamaForCausalLM`.
# They come in two containers:
#
# * **safetensors**, Hugging Face's format: a JSON header and raw tensors, nothing else;
# * **GGUF**, llama.cpp's format: metadata, tensor descriptions and *quantised* tensors, where 32
#   weights share one scale and each weight takes 4 or 8 bits.
#
# `llm2vec_mini.convert` reads both without the `safetensors` or `gguf` packages. This notebook opens
# each container by hand, byte by byte, with `struct`, `json` and `numpy`, and checks that the package
# reads the same numbers. Then it explains the one trap of GGUF Llamas (llama.cpp reorders the rows of
# $W_q$ and $W_k$) and ends by loading SmolLM2-135M-Instruct
# ([Allal et al., 2025](https://arxiv.org/abs/2502.02737)) and letting it finish a sentence.
#
# The SmolLM2 cells need the model in the local cache (`python -m llm2vec_mini download smollm2`;
# `make test` does it). Without it they print that they were skipped, and Section 2 works on a block
# we quantise ourselves; with `LLM2VEC_MINI_REQUIRE_DATA=1` a missing model is an error instead.

# %% [markdown]
# **Assumes:** [tutorial 01](01_llama_from_scratch.ipynb) (parameter names, RoPE). An optional deep dive into file formats: the main path (01, 02, 04, 05, 06, 07, 08) does not need it.
#
# **Time:** about 40 minutes to read; about 15 seconds to run, plus about a minute for the SmolLM2 cells (the model in the cache: `python -m llm2vec_mini download smollm2`).
#
# **The learning path:** 01 the decoder → 02 bidirectional attention → 04 pooling and encoding →
# 05 LoRA → 06 MNTP → 07 SimCSE → 08 end to end; 03 (file formats) is an optional deep dive.

# %%
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch.testing import assert_close

import llm2vec_mini
from llm2vec_mini.convert.gguf import GGML_TYPES, dequantize, permute_qk, read_gguf, unpermute_qk
from llm2vec_mini.convert.safetensors import SafetensorsFile, save_file
from llm2vec_mini.hub import smollm2_path
from llm2vec_mini.model import apply_rope, rope_cos_sin

torch.manual_seed(0)
try:
    GGUF_PATH = smollm2_path()
    print("SmolLM2:", GGUF_PATH, f"({GGUF_PATH.stat().st_size / 2**20:.0f} MiB)")
except FileNotFoundError as err:
    if os.environ.get("LLM2VEC_MINI_REQUIRE_DATA") == "1":
        raise
    GGUF_PATH = None
    print("SmolLM2 is not cached: its cells will be skipped.", err)

# %% [markdown]
# ## 1. A safetensors file, read by hand
#
# A safetensors file ([format](https://github.com/huggingface/safetensors#format)) is three parts back
# to back:
#
# ```
#  0        8                      8 + N                                          end of file
#  +--------+----------------------+----------------------------------------------+
#  |   N    |  JSON header, N bytes|  data: every tensor's bytes, row-major, LE   |
#  | u64 LE |  (space-padded)      |  tensor k = data[begin_k : end_k]            |
#  +--------+----------------------+----------------------------------------------+
# ```
#
# The header maps each tensor name to `{"dtype": "F32", "shape": [3, 4], "data_offsets": [begin, end]}`,
# with offsets relative to the start of the data; an optional `"__metadata__"` entry holds strings.
# There is no code in the file, only JSON and numbers, so loading one can never run anything.
#
# We write a small file with the package's `save_file`, then read it back with nothing but `struct`,
# `json` and `numpy`: the length, the header, and one tensor's bytes found through its `data_offsets`.

# %%
tmp = Path(tempfile.mkdtemp(prefix="llm2vec_mini_03_"))
path = tmp / "small.safetensors"
tensors = {
    "model.layers.0.self_attn.q_proj.weight": torch.randn(4, 6),  # F32
    "model.norm.weight": torch.linspace(0.5, 2.0, 6).half(),  # F16
    "model.embed_tokens.weight": torch.randn(5, 6).bfloat16(),  # BF16
    "step": torch.tensor([1000]),  # I64
}
save_file(tensors, path, metadata={"format": "pt"})

raw = path.read_bytes()
(n,) = struct.unpack("<Q", raw[:8])  # the header's length: an unsigned 64-bit little-endian integer
header = json.loads(raw[8:8 + n])
data = raw[8 + n:]  # the data section; data_offsets count from here
print(f"file: {len(raw)} bytes = 8 + header {n} + data {len(data)}")
for key, value in header.items():
    print(f"  {key!r}: {value}")

name = "model.layers.0.self_attn.q_proj.weight"
entry = header[name]
begin, end = entry["data_offsets"]
by_hand = np.frombuffer(data[begin:end], dtype="<f4").reshape(entry["shape"])  # F32 = little-endian float32

with SafetensorsFile(path) as f:
    assert f.keys() == sorted(k for k in header if k != "__metadata__")
    assert f.metadata == header["__metadata__"] == {"format": "pt"}
    assert np.array_equal(by_hand, f.get_tensor(name).numpy())
    assert np.array_equal(by_hand, tensors[name].numpy())  # and both equal what we saved
assert (8 + n) % 8 == 0 and raw[8:8 + n].rstrip(b" ").endswith(b"}")  # padded with spaces to 8 bytes
assert end - begin == 4 * 6 * 4  # shape (4, 6), 4 bytes per float32
print(f"{name}: bytes {begin}..{end} of the data section decode to the saved tensor")


# %% [markdown]
# Every dtype is a fixed-width little-endian number, so decoding is one `np.frombuffer` with the right
# type: `F16` is `<f2`, `I64` is `<i8`. NumPy has no `bfloat16`, but it needs none: a bfloat16 is the
# upper 16 bits of a float32 (same sign and 8-bit exponent, a 7-bit mantissa), so shifting it left by 16
# bits gives the float32 with the same value,
#
# $$
# \text{bf16 bits } b \;\mapsto\; \text{float32 bits } b \cdot 2^{16} .
# $$

# %%
def decode(entry, data):
    begin, end = entry["data_offsets"]
    chunk = data[begin:end]
    if entry["dtype"] == "BF16":  # the top half of a float32
        as_f32 = (np.frombuffer(chunk, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        return as_f32.reshape(entry["shape"])
    numpy_type = {"F32": "<f4", "F16": "<f2", "I64": "<i8"}[entry["dtype"]]
    return np.frombuffer(chunk, dtype=numpy_type).reshape(entry["shape"])


with SafetensorsFile(path) as f:
    for name in f.keys():
        ours = f.get_tensor(name)
        mine = decode(header[name], data)
        print(f"{name:40s} {header[name]['dtype']:5s} {str(header[name]['shape']):8s} "
              f"bytes {header[name]['data_offsets']}")
        assert ours.dtype == tensors[name].dtype and tuple(ours.shape) == tuple(mine.shape)
        assert np.array_equal(mine, ours.float().numpy() if ours.dtype == torch.bfloat16 else ours.numpy())
        assert torch.equal(ours, tensors[name])  # bit for bit what was saved
shutil.rmtree(tmp)

# %% [markdown]
# Notice the data layout `save_file` chose: tensors sorted by element size, largest first, so every
# tensor starts at a multiple of its own element size and the reader can *view* the bytes as floats
# without copying. `SafetensorsFile` maps the file into memory and hands out such views: opening a
# multi-gigabyte checkpoint costs nothing until a tensor is touched.
#
# ## 2. A GGUF file and a quantised block, read by hand
#
# GGUF ([specification](https://github.com/ggml-org/ggml/blob/master/docs/gguf.md)) is llama.cpp's
# single-file format. Everything is little-endian; a string is a `u64` length and UTF-8 bytes:
#
# ```
#  "GGUF" | version u32 | n_tensors u64 | n_kv u64                     <- 24 bytes
#  n_kv      x  key: string | value type: u32 | value                  <- metadata: config, vocabulary
#  n_tensors x  name: string | n_dims: u32 | ne: n_dims x u64 | ggml type: u32 | offset: u64
#  padding up to a multiple of general.alignment (32 by default)
#  tensor data; each tensor at data start + offset (a multiple of the alignment)
# ```
#
# `ne` lists the dimensions fastest-varying first, so a PyTorch `(out, in)` weight appears as
# `ne = (in, out)`. Metadata values are typed: 4 is `u32`, 6 `f32`, 8 a string, 9 an array, and so on.
# We read the fixed part and the first key/value pair ourselves and compare with `read_gguf`.

# %%
if GGUF_PATH is None:
    print("skipped: SmolLM2 is not cached")
else:
    with open(GGUF_PATH, "rb") as f:
        head = f.read(1 << 16)  # the first 64 KiB are plenty for the fixed part and the first key
    magic, version, n_tensors, n_kv = struct.unpack_from("<4sIQQ", head, 0)
    pos = 24
    (key_len,) = struct.unpack_from("<Q", head, pos)
    key = head[pos + 8:pos + 8 + key_len].decode("utf-8")
    pos += 8 + key_len
    (value_type,) = struct.unpack_from("<I", head, pos)
    (value_len,) = struct.unpack_from("<Q", head, pos + 4)
    value = head[pos + 12:pos + 12 + value_len].decode("utf-8")
    print(f"magic {magic}, version {version}, {n_tensors} tensors, {n_kv} metadata entries")
    print(f"first entry: {key!r} (type {value_type}, a string) = {value!r}")

    gguf = read_gguf(GGUF_PATH)
    print(gguf)
    assert magic == b"GGUF" and version == gguf.version == 3
    assert n_tensors == len(gguf.tensors) and n_kv == len(gguf.metadata)
    assert value_type == 8 and gguf.metadata[key] == value == "llama"  # general.architecture

    counts = {}
    for info in gguf.tensors.values():
        counts[info.type_name] = counts.get(info.type_name, 0) + 1
    print("tensor types:", counts)
    for info in list(gguf.tensors.values())[:5]:
        print(f"  {info.name:26s} {info.type_name:5s} shape {str(info.shape):12s} at byte {info.offset}")
    # Every tensor starts on the alignment, and its size follows from its type's block size.
    first = min(info.offset for info in gguf.tensors.values())
    for info in gguf.tensors.values():
        assert (info.offset - first) % gguf.alignment == 0
        _, per_block, block_bytes = GGML_TYPES[info.ggml_type]
        assert info.nbytes == np.prod(info.shape) // per_block * block_bytes

# %% [markdown]
# ### Q4_1 and Q8_0
#
# Most of SmolLM2's matrices are stored as **Q4_1**. A row is cut into blocks of 32 weights; each block
# is 20 bytes, 5 bits per weight instead of 32:
#
# ```
#  byte  0   2   4                                   20
#        | d | m | qs[0] qs[1] ... qs[15]             |     d, m: float16
#                  low nibble of qs[j]  = q_j          (weights 0..15)
#                  high nibble of qs[j] = q_{j+16}     (weights 16..31)
# ```
#
# $$
# w_j = d \cdot q_j + m, \qquad q_j \in \{0, 1, \dots, 15\},
# $$
#
# so the block's weights sit on a grid of 16 evenly spaced levels from $m$ to $m + 15d$ (ggml's
# `dequantize_row_q4_1`). The embedding matrix is **Q8_0**: 34-byte blocks of one float16 scale $d$
# and 32 signed bytes, $w_j = d \cdot q_j$ with $q_j \in \{-128, \dots, 127\}$.
#
# We take the first block of layer 0's $W_q$ straight from the file (`gguf.raw(name)` is the tensor's
# bytes, not yet decoded) and decode it in four lines. Without SmolLM2 we quantise 32 random weights
# ourselves into the same 20 bytes.

# %%
if GGUF_PATH is not None:
    q_name = "blk.0.attn_q.weight"
    assert gguf.tensors[q_name].type_name == "Q4_1"
    block = np.asarray(gguf.raw(q_name)[:20])  # (20,) uint8: the first block of row 0
    source = f"the first block of {q_name}"
else:  # quantise 32 weights ourselves: m = min, d = (max - min) / 15, q = round((w - m) / d)
    w = np.random.default_rng(0).normal(0, 0.05, 32).astype(np.float32)
    d16, m16 = np.float16((w.max() - w.min()) / 15), np.float16(w.min())
    q = np.clip(np.round((w - np.float32(m16)) / np.float32(d16)), 0, 15).astype(np.uint8)
    block = np.frombuffer(d16.tobytes() + m16.tobytes() + (q[:16] | (q[16:] << 4)).tobytes(), np.uint8)
    source = "a block we quantised ourselves"

# Decode by hand: two float16, then sixteen bytes of two nibbles each.
d = block[0:2].view("<f2").astype(np.float32)[0]
m = block[2:4].view("<f2").astype(np.float32)[0]
qs = block[4:20]
q = np.concatenate([qs & 0x0F, qs >> 4])  # (32,): low nibbles are weights 0..15, high ones 16..31
w_by_hand = d * q.astype(np.float32) + m

w_package = dequantize(block, 3, (32,))  # ggml type 3 = Q4_1
assert np.array_equal(w_by_hand, w_package)  # bit for bit
if GGUF_PATH is not None:  # and it is the start of row 0 of the whole dequantised matrix
    assert np.array_equal(w_by_hand, gguf.tensor(q_name)[0, :32])
print(f"{source}: d = {d:.6f}, m = {m:.6f}, q = {q.tolist()}")

fig, ax = plt.subplots(figsize=(8, 3.2))
for level in range(16):
    ax.axhline(d * level + m, color="0.85", lw=0.8, zorder=0)
ax.scatter(np.arange(32), w_by_hand, zorder=1)
ax.set_xlabel("weight j in the block")
ax.set_ylabel("w = d q + m")
ax.set_title(f"Q4_1: 32 weights on 16 levels ({source})")
fig.tight_layout()
plt.show()

# %%
if GGUF_PATH is not None:
    assert gguf.tensors["token_embd.weight"].type_name == "Q8_0"
    block8 = np.asarray(gguf.raw("token_embd.weight")[:34])  # (34,): the first block of token 0
else:  # d = max |w| / 127, q = round(w / d)
    w = np.random.default_rng(1).normal(0, 0.05, 32).astype(np.float32)
    d16 = np.float16(np.abs(w).max() / 127)
    q8 = np.round(w / np.float32(d16)).astype(np.int8)
    block8 = np.frombuffer(d16.tobytes() + q8.tobytes(), np.uint8)

d8 = block8[0:2].view("<f2").astype(np.float32)[0]
q8 = block8[2:34].view(np.int8)  # (32,) signed bytes
w8_by_hand = d8 * q8.astype(np.float32)
assert np.array_equal(w8_by_hand, dequantize(block8, 8, (32,)))  # ggml type 8 = Q8_0
print(f"Q8_0 block: d = {d8:.6f}, q[:8] = {q8[:8].tolist()}, w[:4] = {w8_by_hand[:4]}")

# %% [markdown]
# ## 3. Why $W_q$ and $W_k$ come out permuted
#
# RoPE rotates pairs of coordinates of every query and key head by the angle $p\,\theta_i$ at position
# $p$ (tutorial 01, Section 2). *Which* coordinates form pair $i$ is a convention:
#
# * Hugging Face ("rotate half"): $(x_i,\; x_{i+d/2})$;
# * Meta's original code and llama.cpp (interleaved): $(x_{2i},\; x_{2i+1})$.
#
# Hugging Face checkpoints were converted from Meta's by reordering the rows of $W_q$ and $W_k$ within
# each head, and llama.cpp's converter (`convert_hf_to_gguf.py`, `LlamaModel.permute`) undoes that:
# row $i$ and row $i + d/2$ of a head become rows $2i$ and $2i+1$. Since $q = W_q x$, permuting the rows
# of $W_q$ permutes the coordinates of $q$ the same way, so with
#
# $$
# P:\ (0, 1, \dots, d-1) \mapsto (0,\ \tfrac d2,\ 1,\ \tfrac d2 + 1,\ \dots,\ \tfrac d2 - 1,\ d-1),
# \qquad
# \mathrm{RoPE}_{\text{interleaved}}(P q) = P\, \mathrm{RoPE}_{\text{half}}(q),
# $$
#
# and the attention scores $\langle P q', P k' \rangle = \langle q', k' \rangle$ are the same. Both
# conventions compute the same model; the file and the code must just agree. Our model uses rotate-half,
# so the loader applies `unpermute_qk` to every GGUF $W_q$ and $W_k$. The picture shows the row order for
# 2 heads of width 8, the colour marking the rotation frequency $\theta_i$ each row belongs to.

# %%
n_head, head_dim = 2, 8
rows = torch.arange(n_head * head_dim)  # row r of an HF weight, for 2 heads of width 8
W = rows[:, None].float() * torch.ones(1, 3)  # (16, 3): every row holds its own number
W_gguf = permute_qk(W, n_head)
order = W_gguf[:, 0].long()  # which HF row now sits at each position

# By hand: within head h, position 2i holds HF row i and position 2i+1 holds HF row i + d/2.
expected = torch.tensor([h * head_dim + j // 2 + (j % 2) * head_dim // 2
                         for h in range(n_head) for j in range(head_dim)])
assert torch.equal(order, expected)
assert torch.equal(unpermute_qk(W_gguf, n_head), W)  # the round trip
big = torch.randn(9 * 64, 576)  # SmolLM2's W_q shape: 9 heads of 64
assert torch.equal(unpermute_qk(permute_qk(big, 9), 9), big)
print("llama.cpp row order:", order.tolist())


def frequency_of(row):  # pair index i of an HF row: rows i and i + d/2 rotate together
    return (row % head_dim) % (head_dim // 2)


fig, axes = plt.subplots(1, 2, figsize=(7, 5))
for ax, (title, layout) in zip(axes, [("Hugging Face (rotate half)", rows), ("GGUF (interleaved)", order)]):
    ax.imshow(frequency_of(layout)[:, None].numpy(), cmap="tab10", vmin=0, vmax=9, aspect=0.35)
    for position, row in enumerate(layout.tolist()):
        ax.text(0, position, f"HF row {row}", ha="center", va="center", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks(range(len(rows)))
    ax.set_ylabel("row position in the stored matrix")
fig.suptitle("Rows of W_q for 2 heads of width 8 (colour: rotation frequency i)")
fig.tight_layout()
plt.show()

# %% [markdown]
# Now the numeric check of the equation above. The interleaved rotation is written the way Meta's code
# writes it: view each head vector as $d/2$ complex numbers $x_{2i} + \mathrm{i}\,x_{2i+1}$ and multiply by
# $e^{\mathrm{i} p \theta_i}$. The rotate-half rotation is the package's `apply_rope`.

# %%
T, d, base = 5, 8, 10000.0
theta = base ** (-torch.arange(0, d, 2).double() / d)  # (d/2,): theta_i = base^(-2i/d)
positions = torch.arange(T)


def rope_interleaved(x):
    # x (heads, T, d): pairs (x_2i, x_2i+1) as complex numbers, rotated by e^{i p theta_i}
    z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], d // 2, 2).contiguous())  # (heads, T, d/2)
    angle = positions.double()[:, None] * theta[None, :]  # (T, d/2)
    return torch.view_as_real(z * torch.polar(torch.ones_like(angle), angle)).reshape(x.shape).float()


q = torch.randn(1, n_head, T, d)  # (B, heads, T, d): queries in the Hugging Face layout
k = torch.randn(1, n_head, T, d)
cos, sin = rope_cos_sin(theta.float(), positions[None], torch.float32)  # (1, T, d)
q_half, k_half = apply_rope(q, k, cos, sin)  # rotate-half RoPE, the package's


def P(x):  # the GGUF coordinate order of each head vector: permute_qk acting on the last axis
    return permute_qk(x.movedim(-1, 0), 1).movedim(0, -1)


assert_close(rope_interleaved(P(q)[0]), P(q_half)[0])  # RoPE_interleaved(P q) = P RoPE_half(q)
scores_half = q_half[0] @ k_half[0].transpose(-1, -2)  # (heads, T, T)
scores_interleaved = rope_interleaved(P(q)[0]) @ rope_interleaved(P(k)[0]).transpose(-1, -2)
assert_close(scores_interleaved, scores_half, atol=1e-5, rtol=1e-5)  # the same attention scores
# Mixing conventions is wrong: interleaved RoPE on the unpermuted (HF) rows gives other scores.
scores_mixed = rope_interleaved(q[0]) @ rope_interleaved(k[0]).transpose(-1, -2)
assert not torch.allclose(scores_mixed, scores_half, atol=1e-2)
print("max |scores| difference, matched conventions:", (scores_interleaved - scores_half).abs().max().item())
print("max |scores| difference, mixed conventions:  ", (scores_mixed - scores_half).abs().max().item())

# %% [markdown]
# ## 4. SmolLM2-135M-Instruct, loaded and talking
#
# `llm2vec_mini.load_pretrained` takes a Hugging Face model directory or a `.gguf` file and returns our
# `LlamaForCausalLM` and its tokenizer. For a GGUF file it reads the `llama.*` metadata into a
# `LlamaConfig`, builds the tokenizer from the `tokenizer.ggml.*` metadata, and for every tensor
# dequantises it, applies `unpermute_qk` to $W_q$ and $W_k$, checks its shape, and renames it through a
# small table (`blk.{i}.attn_q.weight` becomes `model.layers.{i}.self_attn.q_proj.weight`). The weights
# are then plain float32: the 4-bit rounding stays, but nothing else of GGUF does.
#
# This is the slowest part of the notebook: loading takes a few seconds,
# and `generate` runs the whole model once per new token, without a key/value cache.

# %%
if GGUF_PATH is None:
    model = None
    print("skipped: SmolLM2 is not cached")
else:
    model, tok = llm2vec_mini.load_pretrained(GGUF_PATH)
    config = model.config
    print(config)
    print(tok)
    meta = gguf.metadata
    assert config.num_hidden_layers == meta["llama.block_count"] == 30
    assert config.hidden_size == meta["llama.embedding_length"] == 576
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)  # grouped-query attention
    assert config.vocab_size == len(meta["tokenizer.ggml.tokens"]) == tok.vocab_size

    n_params = sum(p.numel() for p in model.parameters())  # the tied lm_head is counted once
    in_file = sum(int(np.prod(info.shape)) for info in gguf.tensors.values())
    size = GGUF_PATH.stat().st_size
    print(f"{n_params:,} parameters ({n_params / 1e6:.1f}M); the file holds {in_file:,} weights "
          f"in {size / 2**20:.0f} MiB, {8 * size / in_file:.2f} bits each")
    assert n_params == in_file  # every weight in the file became a parameter, and nothing else did
    assert model.lm_head.weight is model.model.embed_tokens.weight  # no output.weight: tied
    # The loader's W_q is the file's, dequantised and unpermuted (the block of Section 2 included).
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight,
                       torch.from_numpy(unpermute_qk(gguf.tensor("blk.0.attn_q.weight"), 9)))

# %% [markdown]
# A model that loaded wrong still produces numbers, so the real test is whether it knows things.
# Greedy decoding picks the most likely next token, appends it, and repeats:
# $x_{t+1} = \arg\max_v\, p(v \mid x_{\le t})$.

# %%
if model is None:
    print("skipped: SmolLM2 is not cached")
else:
    prompt = "The capital of France is"
    ids = torch.tensor([tok.encode(prompt)])  # (1, T); SmolLM2 adds no BOS token
    out = model.generate(ids, max_new_tokens=6)  # (1, T + 6)
    continuation = tok.decode(out[0, ids.shape[1]:])
    print(repr(prompt), "->", repr(continuation))
    assert continuation.startswith(" Paris")
    assert tok.decode(out[0]) == prompt + continuation

# %% [markdown]
# Finally, what Section 3 protects us from. We put the rows of every $W_q$ and $W_k$ back into llama.cpp's
# interleaved order, as a loader that forgot `unpermute_qk` would leave them. The bug is sly: $q$ and $k$
# are permuted alike, so $\langle q, k \rangle$ without RoPE is unchanged and the model still recognises
# *what* the words are; only the rotations now pair the wrong coordinates, so it loses track of *where*
# they are. A five-token prompt may well still end in Paris. A paragraph shows the damage: we compare the
# next-token loss $-\log p(x_{t+1} \mid x_{\le t})$ at every position, with the rows right and wrong.

# %%
if model is None:
    print("skipped: SmolLM2 is not cached")
else:
    text = ("Paris is the capital and largest city of France. With an estimated population of over two "
            "million residents, it is the centre of the Ile-de-France region. The city is a major railway, "
            "highway and air-transport hub served by two international airports.")
    ids = torch.tensor([tok.encode(text)])  # (1, T)

    def token_losses(model):  # (T - 1,): -log p(x_{t+1} | x_<=t), by hand from the logits
        with torch.no_grad():
            log_p = model(ids)[0, :-1].log_softmax(-1)  # (T - 1, vocab)
        return -log_p.gather(-1, ids[0, 1:, None])[:, 0]

    right = token_losses(model)
    attn_layers = [layer.self_attn for layer in model.model.layers]
    saved = [(a.q_proj.weight.clone(), a.k_proj.weight.clone()) for a in attn_layers]
    with torch.no_grad():
        for a in attn_layers:  # forget to unpermute
            a.q_proj.weight.copy_(permute_qk(a.q_proj.weight, config.num_attention_heads))
            a.k_proj.weight.copy_(permute_qk(a.k_proj.weight, config.num_key_value_heads))
    wrong = token_losses(model)
    with torch.no_grad():
        for a in attn_layers:  # and put them back
            a.q_proj.weight.copy_(unpermute_qk(a.q_proj.weight, config.num_attention_heads))
            a.k_proj.weight.copy_(unpermute_qk(a.k_proj.weight, config.num_key_value_heads))
    assert all(torch.equal(a.q_proj.weight, q) and torch.equal(a.k_proj.weight, k)
               for a, (q, k) in zip(attn_layers, saved))  # the round trip restored every bit

    print(f"{ids.shape[1]} tokens, mean loss per token:")
    print(f"  rows unpermuted:     {right.mean():.2f} nats (perplexity {right.mean().exp():.1f})")
    print(f"  llama.cpp's order:   {wrong.mean():.2f} nats (perplexity {wrong.mean().exp():.1f})")
    assert wrong.mean() > right.mean() + 1.0  # more than one nat per token worse

    fig, ax = plt.subplots(figsize=(9, 3))
    ax.plot(right, label="rows unpermuted (correct)")
    ax.plot(wrong, label="llama.cpp's row order left in place")
    ax.set_xlabel("position t")
    ax.set_ylabel(r"$-\log p(x_{t+1} \mid x_{\leq t})$")
    ax.set_title("SmolLM2 on a paragraph about Paris")
    ax.legend()
    fig.tight_layout()
    plt.show()

# %% [markdown]
# ## What we have
#
# Both containers are simple once drawn: safetensors is a length, a JSON header and raw bytes; GGUF is a
# typed header and blocks of small integers with a float16 scale (and a minimum, for Q4_1). The package
# reads both bit for bit as the cells above do by hand, undoes llama.cpp's Q/K row order, and turns
# SmolLM2's 4-bit file into a float32 `LlamaForCausalLM` that knows the capital of France, and that
# follows a paragraph far better than the same weights with their rows in the wrong order.
#
# That decoder is the starting point of LLM2Vec; [tutorial 02](02_bidirectional_attention.ipynb)
# showed the switch that makes its attention bidirectional.

# %% [markdown]
# ## Try it yourself
#
# * Write a safetensors file with two tensors that share bytes (overlapping offsets) and see how
#   `SafetensorsFile` refuses it.
# * Quantise a block of 32 numbers to Q8_0 by hand (one fp16 scale, 32 int8) and dequantise it: what is the
#   largest error, and how does it compare with Q4_1's?
# * Load SmolLM2 with its Q/K rows left in llama.cpp's order (skip `unpermute_qk`) and compare the
#   continuation of a prompt with the correct model's.
#
# **Next:** [04 · Pooling and encoding](04_pooling_and_encoding.ipynb), back on the main path.
