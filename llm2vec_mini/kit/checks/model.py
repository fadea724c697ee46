"""The checks of the decoder's blocks: e01 RMSNorm, e02 RoPE, e03 the attention mask, e04 grouped-query
attention, e05 SwiGLU. Every expected value is computed here from the equation, in float64."""

from __future__ import annotations

import math

import torch
from torch import nn

from .expect import CheckFailed, expect, expect_close, need, shape_of, tensor

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
