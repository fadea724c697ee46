"""The hand-written backward passes of ops.py against plain autograd on the textbook formulas.

Each op is checked three ways: values and gradients equal autograd's on the same formula written as
ordinary tensor code (float64, and float32 at float32 tolerances); torch.autograd.gradcheck (finite
differences) in float64; and what it keeps for backward is smaller than what plain autograd keeps.
"""

import pytest
import torch
import torch.nn.functional as F

from llm2vec_mini.ops import dropout_rate, keep_mask, lora_linear, silu_mul


def plain_lora(x, w, a, b, keep, p, scaling):
    dropped = x if keep is None else x * keep.to(x.dtype) / (1 - dropout_rate(p))
    return x @ w.t() + (dropped @ a.t()) @ b.t() * scaling


def grads(fn, *tensors):
    """Value and the gradients of sum(value * fixed random weights) w.r.t. every tensor."""
    tensors = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*tensors)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    (out * weights).sum().backward()
    return out.detach(), [t.grad for t in tensors]


def assert_same(got, want, tol):
    (gv, gg), (wv, wg) = got, want
    torch.testing.assert_close(gv, wv, rtol=tol, atol=tol)
    for a, b in zip(gg, wg):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_silu_mul_matches_autograd(dtype, tol):
    g = torch.Generator().manual_seed(1)
    gate, up = (torch.randn(4, 7, 24, generator=g, dtype=dtype) * 4 for _ in range(2))
    assert_same(grads(silu_mul, gate, up), grads(lambda a, b: F.silu(a) * b, gate, up), tol)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_lora_linear_matches_autograd_with_the_same_mask(p, dtype, tol):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 9, 12, generator=g, dtype=dtype)
    w, a, b = (torch.randn(*s, generator=g, dtype=dtype) for s in ((10, 12), (4, 12), (10, 4)))
    torch.manual_seed(5)
    keep = keep_mask((18, 12), p).view(2, 9, 12) if p else None  # the mask lora_linear will draw

    def ours(x, a, b):
        torch.manual_seed(5)
        return lora_linear(x, w, a, b, p=p, scaling=2.0, training=True)

    want = grads(lambda x, a, b: plain_lora(x, w, a, b, keep, p, 2.0), x, a, b)
    assert_same(grads(ours, x, a, b), want, tol)
    # evaluation mode: no dropout, and no gradient needed gives the same values too
    with torch.no_grad():
        torch.testing.assert_close(lora_linear(x, w, a, b, p=p, scaling=2.0, training=False),
                                   plain_lora(x, w, a, b, None, 0.0, 2.0), rtol=tol, atol=tol)


def test_gradcheck_in_float64():
    g = torch.Generator().manual_seed(3)

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)

    assert torch.autograd.gradcheck(silu_mul, (t(2, 3, 5), t(2, 3, 5)))

    def lora(x, a, b):  # the same mask at every evaluation
        torch.manual_seed(11)
        return lora_linear(x, w, a, b, p=0.25, scaling=0.5, training=True)

    w = torch.randn(5, 6, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lora, (t(2, 3, 6), t(2, 6), t(5, 2)))


def test_keep_mask_has_the_right_rate_and_no_pattern():
    torch.manual_seed(0)
    for p in (0.05, 0.3):
        keep = keep_mask((1000, 1000), p).double()
        assert abs(keep.mean().item() - (1 - p)) < 5 * (p * (1 - p) / 1e6) ** 0.5
        # neighbours (the two halves of one 64-bit draw, and successive draws) are independent
        corr = torch.corrcoef(torch.stack([keep.flatten()[:-1], keep.flatten()[1:]]))[0, 1]
        assert abs(corr.item()) < 5e-3
    assert keep_mask((3, 5), 0.0).all()
    for p in (0.05, 0.1, 0.3, 0.5, 0.9):  # the rate drawn is p to 16 bits, and the tests above use it
        assert abs(dropout_rate(p) - p) <= 2 ** -17 and (dropout_rate(p) * 2 ** 16).is_integer()
    assert keep_mask((7,), 0.5).shape == (7,)  # an odd element count


def saved_bytes(fn):
    """Bytes of the distinct storages autograd keeps for backward while fn runs."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_they_keep_less_than_plain_autograd():
    x = torch.randn(64, 256, requires_grad=True)
    gate, up = torch.randn(64, 256, requires_grad=True), torch.randn(64, 256, requires_grad=True)
    assert saved_bytes(lambda: silu_mul(gate, up)) < saved_bytes(lambda: F.silu(gate) * up)
    # q, k and v read the same x: ours keeps x once plus three boolean masks; nn.Dropout-style
    # code keeps a float mask and dropout(x) for each of them
    W, A, B = torch.randn(256, 256), torch.randn(16, 256, requires_grad=True), torch.randn(256, 16)

    def ours():
        for _ in range(3):
            lora_linear(x, W, A, B, p=0.05, scaling=2.0, training=True)

    def plain():
        for _ in range(3):
            x @ W.t() + F.linear(F.linear(F.dropout(x, 0.05, True), A), B) * 2.0

    x_bytes = x.numel() * 4
    weights = (W.numel() + A.numel() + B.numel()) * 4
    assert saved_bytes(ours) <= x_bytes + 3 * x.numel() + 3 * 64 * 16 * 4 + weights
    assert saved_bytes(plain) > 3 * x_bytes


def plain_attention(q, k, v, mask, keep, p):
    """The textbook formula with Hugging Face's repeat_kv and the given keep mask."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1)
    return (probs * keep.to(q.dtype) / (1 - dropout_rate(p))) @ v


@pytest.mark.parametrize("n_kv", [3, 1, 6])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_dropout_attention_matches_autograd_with_the_same_mask(n_kv, masked, dtype, tol):
    from llm2vec_mini.ops import attention

    g = torch.Generator().manual_seed(4)
    B, nh, T, d, p = 2, 6, 5, 8, 0.3
    q = torch.randn(B, nh, T, d, generator=g, dtype=dtype)
    k, v = (torch.randn(B, n_kv, T, d, generator=g, dtype=dtype) for _ in range(2))
    mask = None
    if masked:  # left padding in the second row: its first two keys are hidden
        mask = torch.zeros(B, 1, T, T, dtype=dtype)
        mask[1, :, :, :2] = torch.finfo(dtype).min
    torch.manual_seed(9)
    keep = keep_mask((B, n_kv, nh // n_kv * T, T), p).view(B, nh, T, T)  # what attention will draw

    def ours(q, k, v):
        torch.manual_seed(9)
        return attention(q, k, v, mask, False, p)

    assert_same(grads(ours, q, k, v), grads(lambda q, k, v: plain_attention(q, k, v, mask, keep, p), q, k, v),
                tol)


@pytest.mark.slow
def test_causal_dropout_attention_hides_the_future_and_gradchecks():
    from llm2vec_mini.ops import attention

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
               for _ in range(3))

    def causal(q, k, v):
        torch.manual_seed(3)
        return attention(q, k, v, None, True, 0.25)

    assert torch.autograd.gradcheck(causal, (q, k, v))
    later = v.detach().clone()
    later[:, :, -1] += 10.0  # a change in the last token's value reaches only the last position
    changed = (causal(q, k, later) - causal(q, k, v)).abs().sum(-1)  # (1, heads, T)
    assert torch.all(changed[:, :, :-1] == 0) and changed[:, :, -1].sum() > 0  # (unless dropped)


def test_dropout_attention_keeps_less_than_torch():
    from llm2vec_mini.ops import attention

    q = torch.randn(2, 9, 64, 16, requires_grad=True)
    k, v = torch.randn(2, 3, 64, 16, requires_grad=True), torch.randn(2, 3, 64, 16, requires_grad=True)
    ours = saved_bytes(lambda: attention(q, k, v, None, False, 0.3))
    torch_sdpa = saved_bytes(lambda: F.scaled_dot_product_attention(q, k, v, dropout_p=0.3, enable_gqa=True))
    assert ours < 0.6 * torch_sdpa


@pytest.mark.parametrize("n_kv", [3, 1])
@pytest.mark.parametrize("case", ["none", "padding", "causal"])
def test_short_inference_attention_equals_torch_sdpa(n_kv, case):
    from llm2vec_mini.ops import attention

    g = torch.Generator().manual_seed(6)
    q = torch.randn(3, 6, 7, 16, generator=g)
    k, v = (torch.randn(3, n_kv, 7, 16, generator=g) for _ in range(2))
    mask = None
    if case == "padding":
        padding = torch.arange(7) < torch.tensor([[0], [2], [5]])[:, None, None]  # (3, 1, 7): left pads
        mask = torch.zeros(3, 1, 7, 7).masked_fill(padding, torch.finfo(torch.float32).min)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=case == "causal",
                                          enable_gqa=n_kv != 6)
    with torch.no_grad():
        got = attention(q, k, v, mask, case == "causal", 0.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_same_seed_draws_the_same_dropout_with_or_without_gradients():
    from llm2vec_mini.ops import attention

    g = torch.Generator().manual_seed(8)
    q = torch.randn(2, 4, 6, 8, generator=g, requires_grad=True)
    k, v = torch.randn(2, 2, 6, 8, generator=g), torch.randn(2, 2, 6, 8, generator=g)
    x = torch.randn(2, 6, 8, generator=g, requires_grad=True)
    w, a, b = torch.randn(5, 8, generator=g), torch.randn(2, 8, generator=g), torch.randn(5, 2, generator=g)
    for fn in (lambda: attention(q, k, v, None, False, 0.3),
               lambda: lora_linear(x, w, a, b, p=0.3, scaling=2.0, training=True)):
        torch.manual_seed(4)
        with_grad = fn()
        torch.manual_seed(4)
        with torch.no_grad():
            without = fn()
        assert with_grad.requires_grad and not without.requires_grad
        torch.testing.assert_close(with_grad.detach(), without, rtol=1e-6, atol=1e-6)
