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
# # 05 · LoRA: training a few numbers beside each frozen weight
#
# LLM2Vec ([BehnamGhader et al., 2024](https://arxiv.org/abs/2404.05961), training details in
# App. D.1.1 and D.1.2) never updates the decoder's own weights. Both of its training steps, MNTP and SimCSE, train
# LoRA adapters ([Hu et al., 2021](https://arxiv.org/abs/2106.09685)): beside each projection $W \in \mathbb{R}^{d_\text{out}
# \times d_\text{in}}$ of the attention and the MLP sits a low-rank update,
#
# $$
# y = W x + \frac{\alpha}{r}\, B A\, \mathrm{dropout}(x), \qquad
# A \in \mathbb{R}^{r \times d_\text{in}},\; B \in \mathbb{R}^{d_\text{out} \times r},\; B = 0 \text{ at the start},
# $$
#
# and only $A$ and $B$ are trained: $r\,(d_\text{in} + d_\text{out})$ numbers instead of
# $d_\text{in} d_\text{out}$. LLM2Vec uses $r = 16$, $\alpha = 32$ (App. D.1) and, in its code, dropout 0.05
# on all seven projections (`q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`, `down_proj`). This notebook follows
# `llm2vec_mini.lora` through the life of an adapter: add it, check that it starts as a no-op, merge it
# into $W$ and back, train one, and save it in PEFT's format. Everything runs on a tiny model in seconds;
# the last section puts adapters on the real SmolLM2-135M and runs only with **`LLM2VEC_MINI_REAL=1`**.

# %% [markdown]
# **Assumes:** [tutorial 01](01_llama_from_scratch.ipynb) (the projections) and the basics of training: gradients, an optimizer step.
#
# **Time:** about 30 minutes to read; about 20 seconds to run, plus about 30 seconds for the SmolLM2 cell (`LLM2VEC_MINI_REAL=1`).
#
# **The learning path:** 01 the decoder → 02 bidirectional attention → 04 pooling and encoding →
# 05 LoRA → 06 MNTP → 07 SimCSE → 08 end to end; 03 (file formats) is an optional deep dive.

# %%
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

REAL = os.environ.get("LLM2VEC_MINI_REAL") == "1"  # the one switch for the SmolLM2 cells

torch.set_num_threads(1)  # tiny matrices: one thread is the fastest, and fair to a shared CPU
torch.manual_seed(0)
config = LlamaConfig.tiny()
base = LlamaForCausalLM(config).eval()  # stands for a pretrained decoder
ids = torch.randint(3, config.vocab_size, (4, 10))  # (B, T) a batch of token ids
print(config)
WORK = tempfile.TemporaryDirectory(prefix="llm2vec_mini_")  # for the adapters and logs we write


# %% [markdown]
# ## 1. Adding adapters: what is trainable
#
# `add_lora(model, r, alpha, dropout)` freezes every parameter, then replaces each target projection by
# a `LoRALinear`, which keeps the frozen weight under the same name and adds `lora_A` and `lora_B`.
# The names are PEFT's (`layers.0.self_attn.q_proj.lora_A.weight`), so adapters move between this
# package, `peft` and the official `llm2vec` without renaming. We count the trainable parameters and
# compare with $L \sum_{\text{targets}} r\,(d_\text{in} + d_\text{out})$, here and for SmolLM2-135M with LLM2Vec's
# $r = 16$ (built on the `meta` device: shapes only, no memory).

# %%
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

# %% [markdown]
# ## 2. A fresh adapter changes nothing
#
# $A$ starts random (PEFT's Kaiming-uniform) and $B$ at zero, so $BA = 0$: before training, the model
# with adapters computes exactly what the base model computes, in evaluation and in training mode
# (where the LoRA dropout acts on a path that is multiplied by zero anyway). Training starts from the
# pretrained model, not from a perturbed one.

# %%
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

# %% [markdown]
# ## 2b. What the low-rank path sees in training: LoRA's dropout
#
# In training mode the input of the low-rank path goes through dropout, $\mathrm{dropout}(x) = m \odot x / (1-p)$
# with $m_{ij} \sim \mathrm{Bernoulli}(1-p)$ drawn anew for every projection and every step; the frozen
# path $Wx$ always sees all of $x$. The package draws $m$ as bytes, 1 for kept (`llm2vec_mini.ops.keep_mask`, from 16 random bits per
# entry), and keeps only those and $x$ for the backward pass. Below, one draw for a batch of 10 tokens, with the
# recipe's $p = 0.05$ and with a large $p = 0.3$ to make the pattern visible: black cells are the
# entries the low-rank path does not see.

# %%
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

# %% [markdown]
# ## 3. Merging: $W' = W + \frac{\alpha}{r} BA$
#
# After training, the update can be folded into the weight, so that inference costs nothing extra:
# `merge_lora` adds $\frac{\alpha}{r} BA$ to every $W$ and `unmerge_lora` subtracts it again. Merging is
# also how LLM2Vec stacks its adapters: the SimCSE adapter is trained on a model with the MNTP adapter
# merged in. We give the adapters
# random $B$ (as if trained), check the merged weight of one projection against the formula, check
# that merging leaves the model's output unchanged, and that unmerging restores $W$ (up to float
# rounding: $(W + \Delta) - \Delta$ is not always exactly $W$). The update has rank at most $r$, which the
# singular values show.

# %%
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

# %% [markdown]
# ## 4. Training an adapter
#
# A toy problem where the answer is known to be low-rank: a "teacher" is the base model with a hidden
# rank-2 change added to every `q_proj` and `v_proj`. A student (the base model with rank-4 adapters on
# those two projections only) learns to reproduce the teacher's final hidden states (mean squared
# error) with AdamW. The frozen weights cannot move; the adapters alone must absorb the change. (The
# real objectives, MNTP and SimCSE, go through the package's trainer in tutorials 06 and 07.)

# %%
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

# %% [markdown]
# ## 5. Saving an adapter in PEFT's format
#
# `save_adapter` writes what `peft`'s `save_pretrained` writes: `adapter_config.json` and
# `adapter_model.safetensors` holding $A$ and $B$ under PEFT's key names. The test suite loads such a
# folder into `peft` and into the official `llm2vec` (`tests/test_peft.py`, `tests/reference/`). Here
# we read the tensors back with the `safetensors` library, and load the adapter into a fresh copy of the
# base model with `load_adapter`: it must reproduce the student.

# %%
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

# %% [markdown]
# ## 6. The real model (`LLM2VEC_MINI_REAL=1`)
#
# LLM2Vec's adapters on SmolLM2-135M-Instruct: $r = 16$, $\alpha = 32$ on the seven projections of its 30
# layers. We check the trainable count against the formula, that a fresh adapter leaves the logits
# unchanged, and that one backward pass of a real batch (8 sentences of WikiText-2) puts gradients on
# the adapters only. About half a minute on a 2-core CPU.

# %%
from llm2vec_mini.data import read_lines
from llm2vec_mini.hub import find_data_dir, smollm2_path

DATA = find_data_dir(needs=["wikitext-2/valid.txt"])  # $LLM2VEC_MINI_DATA, the download cache, ../shared/data
WIKITEXT = DATA / "wikitext-2/valid.txt" if DATA else None
if not REAL:
    print("skipped: set LLM2VEC_MINI_REAL=1 to put LoRA adapters on SmolLM2")
elif WIKITEXT is None:
    print("skipped: no data folder holds wikitext-2/valid.txt (python -m llm2vec_mini download data)")
else:
    import llm2vec_mini

    torch.set_num_threads(os.cpu_count() or 1)  # a real model: use every core
    real, real_tokenizer = llm2vec_mini.load_pretrained(smollm2_path())
    long_enough = (ids for ids in map(real_tokenizer.encode, read_lines(WIKITEXT)) if len(ids) >= 48)
    batch = torch.tensor([ids[:48] for _, ids in zip(range(8), long_enough)])  # (8, 48): 8 paragraphs
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

# %% [markdown]
# ## What we have
#
# LoRA trains $r(d_\text{in} + d_\text{out})$ numbers per projection (3.5 % of SmolLM2 at $r = 16$), starts
# as an exact no-op, can be merged into the weights and taken out again, and is stored in the same files
# as PEFT's. LLM2Vec trains one adapter for MNTP ([06](06_mntp.ipynb)), merges it, and trains a second
# one for SimCSE ([07](07_simcse.ipynb)).

# %% [markdown]
# ## Try it yourself
#
# * Train the toy with $r = 1$ and with $r = 16$: how many parameters, and how low does the loss go?
# * Use rank-stabilised scaling ($\alpha/\sqrt{r}$, `use_rslora=True`) and compare the updates' norms.
# * Put LoRA only on `q_proj` and `v_proj` (the original LoRA paper's choice): what fraction of the
#   parameters trains now?
#
# **Next:** [06 · Masked next-token prediction](06_mntp.ipynb): LLM2Vec's second step.
