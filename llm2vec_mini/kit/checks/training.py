"""The checks of the training objectives and pooling: e06 MNTP masking, e07 the MNTP loss, e08 the LoRA
layer, e09 the SimCSE losses, e10 pooling. Random draws are checked by their statistics and structure;
gradients against float64 autograd of a formula written here."""

from __future__ import annotations

import math

import torch
from torch import nn

from .expect import expect, expect_close, expect_equal, need, shape_of, tensor

IGNORE = -100  # the label cross-entropy skips (MNTP)
MODES = ("mean", "weighted_mean", "eos_token", "last_token", "bos_token")

# -------------------------------------------------------------------------------------------------
# e06 MNTP masking

def check_e06(impl):
    mntp_mask = need(impl, "mntp_mask")
    V, mask_id, specials = 500, 3, [0, 1, 2]
    gen = torch.Generator().manual_seed(6)
    ids = torch.randint(4, V, (64, 256), generator=gen)
    ids[:, ::32] = 1  # bos
    ids[:, 31::32] = 2  # eos
    ids[:8, -40:] = 0  # padding
    special = torch.isin(ids, torch.tensor(specials))
    for ratio in (0.2, 0.4):
        original = ids.clone()
        what = f"mntp_mask(input_ids {shape_of(ids)}, mask_id={mask_id}, vocab_size={V}, " \
               f"special_ids={specials}, mask_ratio={ratio})"
        out = mntp_mask(ids, mask_id, V, specials, ratio, torch.Generator().manual_seed(7))
        expect(isinstance(out, (tuple, list)) and len(out) == 2, f"{what}: expected (inputs, labels)")
        inputs, labels = (tensor(t, what) for t in out)
        expect(torch.equal(ids, original), f"{what}: changed input_ids in place; work on a copy")
        for name, t in (("inputs", inputs), ("labels", labels)):
            expect(tuple(t.shape) == tuple(ids.shape) and t.dtype == torch.int64,
                   f"{what}: {name} should be int64 of shape {tuple(ids.shape)}, got {shape_of(t)}")
        chosen = labels != IGNORE
        expect(not chosen[special].any(), f"{what}: {int(chosen[special].sum())} special tokens (ids "
               f"{specials}) were chosen; they must never be masked")
        expect_equal(labels[chosen], ids[chosen], f"{what}: labels at the chosen positions (the originals)")
        expect_equal(inputs[~chosen], ids[~chosen], f"{what}: inputs at the positions not chosen (unchanged)")
        n, k = int((~special).sum()), int(chosen.sum())
        _expect_rate(k / n, ratio, n, f"{what}: the fraction of ordinary tokens chosen")
        corrupted = inputs[chosen]
        kept, masked = corrupted == ids[chosen], corrupted == mask_id
        _expect_rate(float(masked.float().mean()), 0.8 + 0.1 / V, k, f"{what}: of the chosen, the fraction "
                     f"replaced by the mask token")
        _expect_rate(float(kept.float().mean()), 0.1 + 0.1 / V, k, f"{what}: of the chosen, the fraction "
                     f"left as they were")
        randoms = corrupted[~kept & ~masked]
        expect(bool(((randoms >= 0) & (randoms < V)).all()), f"{what}: a random token outside range({V})")
        expect(len(set(randoms.tolist())) > 0.5 * min(len(randoms), V / 2),
               f"{what}: the random replacements take only {len(set(randoms.tolist()))} distinct values "
               f"out of {len(randoms)}: draw them uniformly from range(vocab_size)")
    again = [mntp_mask(ids, mask_id, V, specials, 0.2, torch.Generator().manual_seed(8)) for _ in range(2)]
    expect(torch.equal(again[0][0], again[1][0]) and torch.equal(again[0][1], again[1][1]),
           "mntp_mask with two generators of the same seed gave different masks: draw every random number "
           "from `generator`")
    nothing = torch.tensor([[1, 0, 0, 2], [1, 2, 2, 2]])  # only special tokens: nothing can be chosen
    inputs, labels = mntp_mask(nothing, mask_id, V, specials, 0.2, torch.Generator().manual_seed(9))
    expect_equal(labels, torch.full_like(nothing, IGNORE), f"mntp_mask on {nothing.tolist()} (only special "
                 f"tokens): labels")
    expect_equal(inputs, nothing, f"mntp_mask on {nothing.tolist()} (only special tokens): inputs")


def _expect_rate(observed, p, n, what):
    sigma = math.sqrt(p * (1 - p) / n)  # binomial standard deviation of a rate over n draws
    expect(abs(observed - p) < 5 * sigma,
           f"{what}: expected {p:.3f} (+- {5 * sigma:.3f}), got {observed:.3f}")


# -------------------------------------------------------------------------------------------------
# e07 the MNTP loss

def mntp_by_hand(logits, labels):
    terms = [-torch.log_softmax(logits[b, i - 1].double(), dim=-1)[labels[b, i]]
             for b in range(labels.shape[0]) for i in range(1, labels.shape[1]) if labels[b, i] != IGNORE]
    return torch.stack(terms).mean() if terms else logits.sum().double() * 0


def check_e07(impl):
    mntp_loss = need(impl, "mntp_loss")
    gen = torch.Generator().manual_seed(7)
    logits = (torch.randn(3, 6, 11, generator=gen) * 2).requires_grad_(True)
    labels = torch.full((3, 6), IGNORE)
    labels[0, 0], labels[0, 2], labels[0, 5] = 4, 7, 1  # position 0 has no i - 1: it must not count
    labels[1, 1], labels[1, 3] = 10, 0
    what = f"mntp_loss(logits {shape_of(logits)}, labels {labels.tolist()})"
    loss = tensor(mntp_loss(logits, labels), what)
    expect(loss.dim() == 0, f"{what}: expected a scalar, got {shape_of(loss)}")
    expect_close(loss, mntp_by_hand(logits.detach(), labels),
                 f"{what} (label i is predicted from position i - 1)", atol=1e-5, rtol=1e-5)
    expect(loss.requires_grad, f"{what}: the loss is detached from the logits; no gradient could flow")
    (grad,) = torch.autograd.grad(loss, logits)
    exact = logits.detach().double().requires_grad_(True)
    (want,) = torch.autograd.grad(mntp_by_hand(exact, labels), exact)
    expect_close(grad, want, f"the gradient of {what} with respect to the logits", atol=1e-6, rtol=1e-4)
    for unlabelled in (torch.full((3, 6), IGNORE), torch.tensor([[5] + [IGNORE] * 5] * 3)):
        what = f"mntp_loss(logits {shape_of(logits)}, labels {unlabelled.tolist()}) (nothing to predict)"
        loss = tensor(mntp_loss(logits, unlabelled), what)
        expect_close(loss, torch.tensor(0.0), what, atol=0, rtol=0)
        expect(loss.requires_grad, f"{what}: the loss should still be attached to the graph (0 * something)")
        (grad,) = torch.autograd.grad(loss, logits)
        expect_close(grad, torch.zeros_like(logits), f"the gradient of {what}", atol=0, rtol=0)


# -------------------------------------------------------------------------------------------------
# e08 the LoRA layer

def check_e08(impl):
    LoRALinear = need(impl, "LoRALinear")
    gen = torch.Generator().manual_seed(8)
    W = torch.randn(6, 5, generator=gen)
    torch.manual_seed(8)  # for A's random initial values
    layer = LoRALinear(W.clone(), 2, 8.0)
    what = "LoRALinear(weight (6, 5), r=2, alpha=8.0)"
    expect(isinstance(layer, nn.Module), f"{what}: expected an nn.Module")
    for name in ("weight", "lora_A", "lora_B", "merged"):
        expect(hasattr(layer, name), f"{what}: has no attribute {name!r}")
    A, B = layer.lora_A.weight, layer.lora_B.weight
    expect(tuple(layer.weight.shape) == (6, 5),
           f"{what}: weight has shape {tuple(layer.weight.shape)}, not (6, 5)")
    expect(tuple(A.shape) == (2, 5) and tuple(B.shape) == (6, 2),
           f"{what}: lora_A.weight should be (r, in) = (2, 5) and lora_B.weight (out, r) = (6, 2), got "
           f"{tuple(A.shape)} and {tuple(B.shape)}")
    expect(not layer.weight.requires_grad, f"{what}: weight must be frozen (requires_grad False)")
    expect(bool((B == 0).all()) and bool((A != 0).any()), f"{what}: a fresh layer needs B = 0 and a random A")
    expect(not layer.merged, f"{what}: merged should be False at first")
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    expect(trainable == {"lora_A.weight", "lora_B.weight"},
           f"{what}: the trainable parameters should be lora_A.weight and lora_B.weight, got "
           f"{sorted(trainable)}")
    x = torch.randn(3, 4, 5, generator=gen)
    expect_close(layer(x), x.double() @ W.double().T,
                 f"a fresh {what} on x {shape_of(x)} (B = 0: just x W^T)", atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # as if trained
        A.copy_(torch.randn(2, 5, generator=gen))
        B.copy_(torch.randn(6, 2, generator=gen))
    a, b = A.detach().double().requires_grad_(True), B.detach().double().requires_grad_(True)
    x64 = x.double().requires_grad_(True)
    want = x64 @ W.double().T + (8.0 / 2) * (x64 @ a.T) @ b.T  # scale alpha / r = 4
    xg = x.clone().requires_grad_(True)
    y = layer(xg)
    expect_close(y, want, f"{what} with A and B trained, on x {shape_of(x)}: x W^T + (alpha / r) x A^T B^T",
                 atol=1e-4, rtol=1e-4)
    seed = torch.randn(want.shape, generator=gen)  # gradients of sum(y * seed)
    (y.double() * seed).sum().backward()
    grads = torch.autograd.grad((want * seed).sum(), (a, b, x64))
    for name, got, expected in (("lora_A.weight", A.grad, grads[0]), ("lora_B.weight", B.grad, grads[1]),
                                ("the input x", xg.grad, grads[2])):
        expect(got is not None, f"{what}: no gradient reached {name}")
        expect_close(got, expected, f"{what}: the gradient with respect to {name}", atol=1e-4, rtol=1e-4)
    expect(layer.weight.grad is None, f"{what}: a gradient reached the frozen weight")
    layer.merge()
    merged = W.double() + 4.0 * B.detach().double() @ A.detach().double()
    expect(layer.merged, f"{what}: merged should be True after merge()")
    expect_close(layer.weight, merged, f"{what}: the weight after merge(), W + (alpha / r) B A",
                 atol=1e-5, rtol=1e-5)
    expect_close(layer(x), want, f"{what} after merge(): the same outputs as before", atol=1e-4, rtol=1e-4)
    layer.merge()
    expect_close(layer.weight, merged, f"{what}: the weight after merge() twice (the second changes nothing)",
                 atol=1e-5, rtol=1e-5)
    layer.unmerge()
    expect(not layer.merged, f"{what}: merged should be False after unmerge()")
    expect_close(layer.weight, W, f"{what}: the weight after merge() then unmerge(), W again",
                 atol=1e-5, rtol=1e-5)
    layer.unmerge()
    expect_close(layer.weight, W, f"{what}: the weight after unmerge() twice (the second changes nothing)",
                 atol=1e-5, rtol=1e-5)
    expect_close(layer(x), want, f"{what} after merge() and unmerge()", atol=1e-4, rtol=1e-4)


# -------------------------------------------------------------------------------------------------
# e09 the SimCSE losses

def contrastive_by_hand(queries, positives, negatives, scale):
    """mean_i (logsumexp_j s_ij - s_ii), s = scale * cos, in float64."""
    unit = lambda t: t / torch.sqrt((t * t).sum(-1, keepdim=True))  # noqa: E731
    candidates = positives if negatives is None else torch.cat([positives, negatives])
    s = scale * unit(queries) @ unit(candidates).T  # (N, n_candidates)
    return (torch.logsumexp(s, dim=-1) - s.diagonal()).mean()


def check_e09(impl):
    contrastive_loss = need(impl, "contrastive_loss")
    gen = torch.Generator().manual_seed(9)
    lengths = torch.tensor([0.1, 1.0, 10.0, 3.0, 0.5])[:, None]  # rows of very different lengths
    for scale, hard in ((20.0, False), (50.0, True), (5.0, False)):
        tensors = [torch.randn(5, 8, generator=gen) * lengths for _ in range(3 if hard else 2)]
        tensors[1] = tensors[1] + tensors[0] * 0.5  # positives somewhat close to their queries
        leaves = [t.clone().requires_grad_(True) for t in tensors]
        exact = [t.double().requires_grad_(True) for t in tensors]
        names = ["queries", "positives"] + (["negatives"] if hard else [])
        what = f"contrastive_loss({', '.join(f'{n} (5, 8)' for n in names)}, scale={scale})"
        loss = tensor(contrastive_loss(*leaves[:2], leaves[2] if hard else None, scale), what)
        want = contrastive_by_hand(*exact[:2], exact[2] if hard else None, scale)
        expect(loss.dim() == 0, f"{what}: expected a scalar, got {shape_of(loss)}")
        expect_close(loss, want, f"{what} (cosines: divide each vector by its length)", atol=1e-4, rtol=1e-4)
        expect(loss.requires_grad, f"{what}: the loss is detached; no gradient could flow")
        grads = torch.autograd.grad(loss, leaves)
        wants = torch.autograd.grad(want, exact)
        for name, got, expected in zip(names, grads, wants):
            expect_close(got, expected, f"the gradient of {what} with respect to the {name}",
                         atol=1e-4, rtol=1e-3)


# -------------------------------------------------------------------------------------------------
# e10 pooling

def pool_by_hand(h, real, pooled, mode):
    """One row: h (T, H), real and pooled lists of 0/1; the definitions, position by position."""
    R = [t for t in range(len(real)) if real[t]]
    S = [t for t in range(len(pooled)) if pooled[t]]
    if mode == "mean":
        return sum(h[t].double() for t in S) / len(S)
    if mode == "weighted_mean":
        return sum(k * h[t].double() for k, t in enumerate(S, start=1)) / (len(S) * (len(S) + 1) / 2)
    if mode in ("eos_token", "last_token"):
        return h[max(R)].double()
    return h[min(R)].double()  # bos_token


def check_e10(impl):
    pool = need(impl, "pool")
    gen = torch.Generator().manual_seed(10)
    real = [[0, 0, 1, 1, 1, 1, 1],  # left padding: BOS, a 2-token instruction, then the text
            [1, 1, 1, 1, 1, 1, 1],  # no padding
            [1, 1, 1, 1, 0, 0, 0],  # right padding
            [0, 0, 0, 0, 0, 0, 1]]  # one token
    embed = [[0, 0, 0, 0, 0, 1, 1],
             [0, 1, 1, 1, 1, 1, 1],
             [0, 1, 1, 1, 0, 0, 0],
             [0, 0, 0, 0, 0, 0, 1]]
    hidden = torch.randn(4, 7, 3, generator=gen)
    for embed_mask in (embed, None):
        pooled = real if embed_mask is None else embed_mask
        for mode in MODES:
            what = f"pool(hidden {shape_of(hidden)}, attention_mask={real}, embed_mask={embed_mask}, " \
                   f"mode={mode!r})"
            want = torch.stack([pool_by_hand(hidden[b], real[b], pooled[b], mode) for b in range(4)])
            given = None if embed_mask is None else torch.tensor(embed_mask)
            got = pool(hidden, torch.tensor(real), given, mode)
            expect_close(got, want, what, atol=1e-5, rtol=1e-5)
