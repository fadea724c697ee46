"""The checks: one function per exercise, `check_e01(impl)` ... `check_e12(impl)`.

Each takes the implementation under test (the student's module, or `reference`) as its argument, the
seam that Stanford CS336's `tests/adapters.py` puts between a course's tests and a student's code, and
raises `CheckFailed` (an AssertionError) at the first property it breaks, in words a student can act
on: which input, what was expected, what came back. Every expected value is computed here, from the
equation, in float64 where rounding matters; none comes from the code under test, nor from the package.
The inputs are what subtle bugs break: left and right padding, a row that is all padding, fewer
key/value heads than query heads, bfloat16 input, a batch with nothing masked, gradients.
Nothing here imports llm2vec_mini: the checks need torch and numpy only, and take seconds on a CPU.
An instructor's own checks (`kit grade --hidden DIR`) have the same form: see `run.py`.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile

import numpy as np
import torch
from torch import nn

IGNORE = -100  # the label cross-entropy skips (MNTP)
MODES = ("mean", "weighted_mean", "eos_token", "last_token", "bos_token")


class CheckFailed(AssertionError):
    """The implementation breaks a property; the message says which, on which input."""


class NotAttempted(Exception):
    """The exercise's function or class is not in the implementation."""


def need(impl, name: str):
    """The implementation's `name` (a function or a class), or NotAttempted when it has none."""
    value = getattr(impl, name, None)
    if value is None:
        raise NotAttempted(f"{name} is not defined")
    return value


def expect(condition, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def shape_of(t) -> str:
    return f"shape {tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"


def tensor(value, what: str) -> torch.Tensor:
    """A torch tensor from what the implementation returned (a tensor or a numpy array)."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    expect(isinstance(value, torch.Tensor), f"{what}: expected a tensor, got {type(value).__name__}")
    return value


def expect_close(got, want, what: str, atol: float, rtol: float, dtype=None) -> None:
    """got equals want within atol + rtol * |want|, elementwise, with the same shape (and dtype)."""
    got, want = tensor(got, what), torch.as_tensor(want)
    expect(tuple(got.shape) == tuple(want.shape),
           f"{what}: expected shape {tuple(want.shape)}, got {tuple(got.shape)}")
    if dtype is not None:
        expect(got.dtype == dtype, f"{what}: expected dtype {dtype}, got {got.dtype}")
    g, w = got.detach().to(torch.float64), want.detach().to(torch.float64)
    bad = ~torch.isclose(g, w, atol=atol, rtol=rtol)  # NaN is never close
    if bad.any():
        where = tuple(int(i) for i in bad.nonzero()[0])
        at = f"at index {list(where)} " if where else ""
        raise CheckFailed(f"{what}: {at}expected {float(w[where]):.6g}, got {float(g[where]):.6g} "
                          f"({int(bad.sum())} of {bad.numel()} values off by more than {atol:g} + "
                          f"{rtol:g} x |expected|)")


def expect_equal(got, want, what: str) -> None:
    """Exactly equal tensors (integers, booleans, or bits)."""
    got, want = tensor(got, what), torch.as_tensor(want)
    expect(tuple(got.shape) == tuple(want.shape),
           f"{what}: expected shape {tuple(want.shape)}, got {tuple(got.shape)}")
    bad = got != want
    if bad.any():
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise CheckFailed(f"{what}: at index {list(where)} expected {want[where].item()}, got "
                          f"{got[where].item()} ({int(bad.sum())} of {bad.numel()} values differ)")


# -------------------------------------------------------------------------------------------------
# e01 RMSNorm

def rms_by_hand(x, w, eps):
    """x / sqrt(mean(x^2) + eps) in float64, then cast to x's dtype, then times the weight."""
    x64 = x.double()
    normed = x64 / torch.sqrt((x64 * x64).sum(-1, keepdim=True) / x.shape[-1] + eps)
    return normed.to(x.dtype) * w


def check_e01(impl):
    rms_norm = need(impl, "rms_norm")
    g = torch.Generator().manual_seed(1)
    # float32, with a mean far from 0 (LayerNorm would subtract it) and a gain that is not 1
    x = torch.randn(2, 3, 5, 64, generator=g) * 3 + 1.5
    w = torch.randn(64, generator=g)
    expect_close(rms_norm(x, w, 1e-5), rms_by_hand(x, w, 1e-5),
                 f"rms_norm(x {shape_of(x)}, weight, eps=1e-5)", atol=1e-5, rtol=1e-5, dtype=torch.float32)
    # eps inside the square root: small x, where eps dominates the mean of squares
    small = torch.randn(4, 64, generator=g) * 1e-3
    expect_close(rms_norm(small, w, 1e-2), rms_by_hand(small, w, 1e-2),
                 f"rms_norm(x {shape_of(small)} of size ~1e-3, weight, eps=1e-2) (eps belongs inside the "
                 f"square root)", atol=1e-6, rtol=1e-5)
    # bfloat16: computed in float32 and cast back, each value is within one bfloat16 step of the exact
    # result; computed in bfloat16, about a fifth of them are off by two or three
    xb = (torch.randn(8, 16, 576, generator=g) * 4 + 1).bfloat16()
    wb = (torch.randn(576, generator=g) * 0.5 + 1).bfloat16()
    want = rms_by_hand(xb, wb, 1e-5).double()
    got = tensor(rms_norm(xb, wb, 1e-5), "rms_norm on bfloat16 input")
    what = f"rms_norm(x {shape_of(xb)}, weight bfloat16, eps=1e-5)"
    expect(got.dtype == torch.bfloat16, f"{what}: expected a bfloat16 result (x's dtype), got {got.dtype}")
    expect(tuple(got.shape) == tuple(xb.shape),
           f"{what}: expected shape {tuple(xb.shape)}, got {tuple(got.shape)}")
    step = torch.ldexp(torch.ones_like(want), torch.frexp(want)[1] - 8)  # bfloat16's spacing at |want|
    off = (got.double() - want).abs() > step
    if off.any():
        where = tuple(int(i) for i in off.nonzero()[0])
        raise CheckFailed(f"{what}: {int(off.sum())} of {off.numel()} values are more than one bfloat16 "
                          f"step from the exact result, e.g. at {list(where)} expected "
                          f"{float(want[where]):.6g}, got {float(got[where]):.6g}: compute in float32 "
                          f"(x.float()) and cast back")


# -------------------------------------------------------------------------------------------------
# e02 RoPE

def rope_by_hand(x, positions, base=10000.0):
    """Rotate (x_i, x_{i+d/2}) as the complex number x_i + i x_{i+d/2} by e^{i m theta_i}, in float64.

    x (B, n, T, d), positions (B, T)."""
    d = x.shape[-1]
    theta = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # (d/2,)
    angle = positions.double()[:, None, :, None] * theta  # (B, 1, T, d/2)
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2:].double())  # (B, n, T, d/2)
    z = z * torch.polar(torch.ones_like(angle), angle)  # times e^{i m theta}
    return torch.cat([z.real, z.imag], dim=-1)


def cos_sin(positions, d, base=10000.0):
    """cos and sin (B, T, d) of m theta_i, each frequency filling both halves (the exercise's input)."""
    theta = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = positions.double()[..., None] * theta  # (B, T, d/2)
    angle = torch.cat([angle, angle], dim=-1)  # (B, T, d)
    return angle.cos().float(), angle.sin().float()


def check_e02(impl):
    apply_rope = need(impl, "apply_rope")
    g = torch.Generator().manual_seed(2)
    # two rows: positions 0..6, and a left-padded row whose real tokens count from 0 after 3 pads
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 1, 2, 3]])
    cos, sin = cos_sin(positions, 16)
    for heads in (4, 2):  # queries, and keys with fewer heads
        x = torch.randn(2, heads, 7, 16, generator=g)
        before = x.clone()
        got = apply_rope(x, cos, sin)
        expect(torch.equal(x, before), "apply_rope changed its input x in place; return a new tensor")
        expect_close(got, rope_by_hand(x, positions), f"apply_rope(x {shape_of(x)}, cos, sin) at positions "
                     f"{positions.tolist()} (the pair rotated together is (i, i + d/2))",
                     atol=1e-5, rtol=1e-5)
    # far positions, where a wrong frequency shows at once
    far = torch.tensor([[1000, 2047, 5]])
    cos, sin = cos_sin(far, 8)
    x = torch.randn(1, 3, 3, 8, generator=g)
    expect_close(apply_rope(x, cos, sin), rope_by_hand(x, far), f"apply_rope(x {shape_of(x)}) at positions "
                 f"{far.tolist()}", atol=1e-4, rtol=1e-4)


# -------------------------------------------------------------------------------------------------
# e03 the attention mask

def visible_by_hand(real, T, causal):
    """(B, T, T) booleans from index comparisons: key j visible to query i."""
    rows = 1 if real is None else len(real)
    return torch.tensor([[[(real is None or bool(real[b][j])) and (not causal or j <= i) for j in range(T)]
                          for i in range(T)] for b in range(rows)])


def check_e03(impl):
    build = need(impl, "build_attention_mask")
    cases = [
        (None, 5, True, torch.float32),
        (None, 5, False, torch.float32),
        ([[1, 1, 1, 1, 0, 0]], 6, True, torch.float32),  # right padding
        ([[0, 0, 1, 1, 1, 1]], 6, True, torch.float32),  # left padding: two queries see nothing
        ([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [0, 0, 0, 0, 0]], 5, False, torch.float32),  # + a row of padding
        ([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], 5, True, torch.bfloat16),
        ([[1, 1, 1, 1]], 4, False, torch.bfloat16),
    ]
    for real, T, causal, dtype in cases:
        mask = None if real is None else torch.tensor(real)
        what = f"build_attention_mask(attention_mask={real}, seq_len={T}, causal={causal}, dtype={dtype})"
        want = visible_by_hand(real, T, causal)  # (B, T, T)
        got = build(mask, T, causal, dtype)
        if got is None:
            expect(bool(want.all()), f"{what}: returned None, but some keys must be hidden")
            continue
        got = tensor(got, what)
        B = 1 if real is None else len(real)
        expect(got.dtype == dtype, f"{what}: expected dtype {dtype}, got {got.dtype}")
        expect(tuple(got.shape) == (B, 1, T, T),
               f"{what}: expected shape {(B, 1, T, T)}, got {tuple(got.shape)}")
        low = torch.finfo(dtype).min
        other = (got != 0) & (got != low)
        if other.any():
            raise CheckFailed(f"{what}: the mask holds values other than 0 and finfo(dtype).min = {low:g}, "
                              f"e.g. {got[other][0].item():g} (-inf would make a fully hidden row NaN)")
        seen = got[:, 0] == 0
        bad = seen != want
        if bad.any():
            b, i, j = (int(v) for v in bad.nonzero()[0])
            raise CheckFailed(f"{what}: row {b}, query {i}, key {j}: expected "
                              f"{'visible (0)' if want[b, i, j] else 'hidden (finfo.min)'}, got "
                              f"{'visible (0)' if seen[b, i, j] else 'hidden (finfo.min)'}")


# -------------------------------------------------------------------------------------------------
# e04 grouped-query attention

def attention_by_hand(q, k, v, mask):
    """A loop over batch rows and query heads, in float64: head h reads key/value head h // g."""
    B, nh, T, d = q.shape
    g = nh // k.shape[1]
    out = torch.empty(B, nh, T, d, dtype=torch.float64)
    for b in range(B):
        for h in range(nh):
            scores = q[b, h].double() @ k[b, h // g].double().T / math.sqrt(d)  # (T, T)
            if mask is not None:
                scores = scores + mask[b if mask.shape[0] > 1 else 0, 0].double()
            out[b, h] = torch.softmax(scores, dim=-1) @ v[b, h // g].double()
    return out


def check_e04(impl):
    attention = need(impl, "attention")
    gen = torch.Generator().manual_seed(4)
    T, d = 6, 8
    low = torch.finfo(torch.float32).min
    causal = torch.zeros(1, 1, T, T).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), low)
    real = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]).bool()  # left padding in row 0
    seen = real[:, None, None, :] & torch.ones(T, T).tril().bool()  # (2, 1, T, T)
    padded = torch.zeros(2, 1, T, T).masked_fill(~seen, low)
    masks = {"no mask": None, "a causal mask (1, 1, T, T)": causal,
             "a causal mask with left padding (2, 1, T, T), two query rows fully hidden": padded}
    for nh, nkv in ((4, 4), (6, 2), (4, 1)):
        q = torch.randn(2, nh, T, d, generator=gen)
        k, v = torch.randn(2, nkv, T, d, generator=gen), torch.randn(2, nkv, T, d, generator=gen)
        for name, mask in masks.items():
            what = f"attention(q {shape_of(q)}, k and v {shape_of(k)}, {name})"
            expect_close(attention(q, k, v, mask), attention_by_hand(q, k, v, mask), what,
                         atol=1e-5, rtol=1e-4)


# -------------------------------------------------------------------------------------------------
# e05 SwiGLU

def check_e05(impl):
    swiglu = need(impl, "swiglu")
    gen = torch.Generator().manual_seed(5)
    h, m = 16, 40
    wg, wu = torch.randn(m, h, generator=gen), torch.randn(m, h, generator=gen)
    wd = torch.randn(h, m, generator=gen)
    x = torch.randn(2, 3, h, generator=gen)
    a, u = x.double() @ wg.double().T, x.double() @ wu.double().T
    want = (a / (1 + torch.exp(-a)) * u) @ wd.double().T  # silu(a) = a sigmoid(a)
    linears = []
    for w in (wg, wu, wd):
        layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            layer.weight.copy_(w)
        linears.append(layer)
    expect_close(swiglu(x, *linears), want, f"swiglu(x {shape_of(x)}, gate_proj, up_proj, down_proj: "
                 f"nn.Linear {h} -> {m}, {h} -> {m}, {m} -> {h})", atol=1e-4, rtol=1e-4)
    # the projections are callables: in the model they can be LoRA layers
    funcs = [lambda t, w=w: t @ w.T for w in (wg, wu, wd)]
    expect_close(swiglu(x, *funcs), want, "swiglu(x, gate_proj, up_proj, down_proj) with the projections "
                 "given as plain functions (call them; do not read .weight)", atol=1e-4, rtol=1e-4)


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


# -------------------------------------------------------------------------------------------------
# e11 the safetensors reader

def write_safetensors(path, tensors: dict, metadata: dict) -> None:
    """A safetensors file from {name: (dtype name, shape, raw bytes)}, written from the format's
    definition: the data in reverse name order (the header lists names sorted), the header padded."""
    header, data = {"__metadata__": metadata}, b""
    for name in sorted(tensors, reverse=True):
        dtype, shape, raw = tensors[name]
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw + b"\0" * (-len(raw) % 8)  # the next tensor starts 8-byte aligned
    text = json.dumps(dict(sorted(header.items())), separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)


def bytes_of(t: torch.Tensor) -> bytes:
    """A tensor's raw bytes, row-major, as this (little-endian) machine holds them."""
    return t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


def check_e11(impl):
    load_safetensors = need(impl, "load_safetensors")
    rng = np.random.default_rng(11)
    bf16 = torch.randn(3, 4, generator=torch.Generator().manual_seed(11)).bfloat16()
    values = {  # name: (safetensors dtype, the torch tensor the reader must return)
        "model.embed_tokens.weight": ("BF16", bf16),
        "model.norm.weight": ("F16", torch.from_numpy(rng.normal(size=6).astype("<f2"))),
        "q_proj.weight": ("F32", torch.from_numpy(rng.normal(size=(2, 3)).astype("<f4"))),
        "f64": ("F64", torch.from_numpy(rng.normal(size=(2,)).astype("<f8"))),
        "step": ("I64", torch.tensor([1000, -2 ** 40])),
        "i32": ("I32", torch.tensor([[7, -8]], dtype=torch.int32)),
        "i16": ("I16", torch.tensor([300, -300, 5], dtype=torch.int16)),
        "i8": ("I8", torch.tensor([-128, 127], dtype=torch.int8)),
        "u8": ("U8", torch.tensor([0, 255, 3], dtype=torch.uint8)),
        "flags": ("BOOL", torch.tensor([True, False, True])),
        "scalar": ("F32", torch.tensor(2.5)),
        "empty": ("F32", torch.zeros(0, 3)),
    }
    raw = {name: (dtype, tuple(t.shape), bytes_of(t)) for name, (dtype, t) in values.items()}
    with tempfile.TemporaryDirectory(prefix="kit_e11_") as folder:
        path = os.path.join(folder, "model.safetensors")
        write_safetensors(path, raw, {"format": "pt"})
        got = load_safetensors(path)
        dtypes = ", ".join(sorted({d for d, _ in values.values()}))
        what = f"load_safetensors on a file with the dtypes {dtypes}"
        expect(isinstance(got, dict), f"{what}: expected a dict, got {type(got).__name__}")
        expect(set(got) == set(values), f"{what}: expected the names {sorted(values)}, got {sorted(got)}")
        for name, (dtype, want) in values.items():
            t = tensor(got[name], f"{what}: tensor {name!r}")
            expect(t.dtype == want.dtype, f"{what}: tensor {name!r} ({dtype}) should come back as "
                   f"{want.dtype}, got {t.dtype}")
            expect(tuple(t.shape) == tuple(want.shape), f"{what}: tensor {name!r} should have shape "
                   f"{tuple(want.shape)}, got {tuple(t.shape)}")
            if want.numel():
                expect(bytes_of(t) == bytes_of(want), f"{what}: tensor {name!r} ({dtype}): expected "
                       f"{want.flatten()[:4].tolist()}, got {t.flatten()[:4].tolist()}")


# -------------------------------------------------------------------------------------------------
# e12 GGUF: Q8_0 and Q4_1 blocks, and the Q/K row order

def check_e12(impl):
    rng = np.random.default_rng(12)
    n = 7  # blocks
    d = rng.uniform(0.001, 0.05, n).astype(np.float16)
    q8 = rng.integers(-128, 128, (n, 32)).astype(np.int8)
    blocks = b"".join(d[i].astype("<f2").tobytes() + q8[i].tobytes() for i in range(n))
    want = (d.astype(np.float32)[:, None] * q8.astype(np.float32)).reshape(-1)
    got = need(impl, "dequantize_q8_0")(np.frombuffer(blocks, dtype=np.uint8).copy())
    expect_close(got, torch.from_numpy(want), f"dequantize_q8_0 on {n} blocks (w = d q)", atol=0, rtol=1e-6,
                 dtype=torch.float32)
    m = rng.uniform(-0.5, 0, n).astype(np.float16)
    q4 = rng.integers(0, 16, (n, 32)).astype(np.uint8)
    packed = q4[:, :16] | (q4[:, 16:] << 4)  # weight j in the low nibble of byte j, j + 16 in the high one
    blocks = b"".join(d[i].astype("<f2").tobytes() + m[i].astype("<f2").tobytes() + packed[i].tobytes()
                      for i in range(n))
    want = (d.astype(np.float32)[:, None] * q4.astype(np.float32) + m.astype(np.float32)[:, None]).reshape(-1)
    got = need(impl, "dequantize_q4_1")(np.frombuffer(blocks, dtype=np.uint8).copy())
    expect_close(got, torch.from_numpy(want), f"dequantize_q4_1 on {n} blocks (w = d q + m; low nibbles "
                 f"are weights 0-15)", atol=1e-6, rtol=1e-6, dtype=torch.float32)
    unpermute_qk = need(impl, "unpermute_qk")
    for n_head, head_dim in ((1, 8), (3, 4), (2, 16)):
        hf = np.arange(n_head * head_dim * 3, dtype=np.float32).reshape(n_head * head_dim, 3)  # rows numbered
        stored = np.empty_like(hf)  # llama.cpp's order: row i and row i + d/2 of a head at 2i and 2i + 1
        for h in range(n_head):
            for i in range(head_dim // 2):
                for p in (0, 1):
                    stored[h * head_dim + 2 * i + p] = hf[h * head_dim + i + p * head_dim // 2]
        got = unpermute_qk(stored.copy(), n_head)
        expect_close(torch.from_numpy(np.asarray(got)), torch.from_numpy(hf),
                     f"unpermute_qk(w of shape {stored.shape}, n_head={n_head}) (head_dim {head_dim}; "
                     f"rows 2i and 2i + 1 of a head go back to i and i + head_dim/2)", atol=0, rtol=0)


CHECKS = {f"e{i:02d}": globals()[f"check_e{i:02d}"] for i in range(1, 13)}
