"""The speed module: the decoder's operations done faster or leaner, each tested equal to the plain code.

1) Three operations with hand-written backward passes: the same values, less memory (below).
2) For inference, projections that read the same input (q, k, v; gate, up) as one matrix product:
   `fuse_projections`, an explicit step that the encoder takes (see the end of this file).


To run backward, autograd keeps ("saves") every tensor that a formula's derivative reads. Written
as plain tensor code, three of our operations keep more than their derivatives need, once per layer
and per token, which is most of the memory a LoRA training step takes:

    operation        y =                          autograd keeps        the derivative needs
    SwiGLU           silu(g) * u                  g, silu(g) and u      g and u
    LoRA layer       W x + s * B A dropout(x)     the dropout mask as   x once (q, k and v share it),
                                                  floats, dropout(x)    the mask as bytes
                                                  for each projection
    attention with   dropout(softmax(q k^T)) v    the probabilities,    q, k, v, the probabilities,
    dropout                                       the mask as floats,   the mask as bytes
                                                  their product

Each is a `torch.autograd.Function`: `forward` computes the formula and saves the smaller set,
`backward` is the derivative worked out by hand (written next to it). tests/test_ops.py checks values
and gradients against plain autograd on the textbook formulas, in float64.

The dropout masks come from `keep_mask`: 16 random bits per element, 64 at a time, three times as
fast on a CPU as `torch.bernoulli_`, at a rate within 7.7e-6 of p (`dropout_rate`).

References:
1) Shazeer, "GLU Variants Improve Transformer", 2020, https://arxiv.org/abs/2002.05202
2) Hu et al., "LoRA", 2021, https://arxiv.org/abs/2106.09685
3) PyTorch, "Extending torch.autograd", https://pytorch.org/docs/stable/notes/extending.html
"""

from __future__ import annotations

import math
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .util import decoder_of

# -------------------------------------------------------------------------------------------------
# SwiGLU's gate: y = silu(g) * u, silu(g) = g * sigmoid(g)
#   dL/du = grad * silu(g)
#   dL/dg = grad * u * sigmoid(g) * (1 + g * (1 - sigmoid(g)))

class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        # silu_backward(a, g) = a * silu'(g) = a * sigmoid(g) * (1 + g * (1 - sigmoid(g))), fused
        return torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, elementwise, any shape: the middle of Llama's SwiGLU MLP."""
    if _plain(gate, up):  # nothing to keep for a backward pass
        return F.silu(gate) * up
    return _SiluMul.apply(gate, up)


# -------------------------------------------------------------------------------------------------
# A LoRA layer: y = x W^T + (m * x) A^T B^T * k,   m the keep mask, k = scaling / (1 - p)
#   with v = k * (m * x) A^T, the r-dimensional middle (small, kept), so that y = x W^T + v B^T:
#   dL/dB = grad^T v        dv = k * grad B
#   dL/dA = dv^T (m * x)    dL/dx = grad W + m * (dv A)       (W is frozen: no dL/dW)
# The sums of two products are written as addmm (C + A B in one pass over C).

def dropout_rate(p: float) -> float:
    """The rate `keep_mask` draws: p rounded to a multiple of 2^-16, within 7.7e-6 of p."""
    return round(p * 2 ** 16) / 2 ** 16


def keep_mask(shape, p: float, device=None) -> torch.Tensor:
    """Dropout's keep mask: a uint8 tensor of `shape` holding 1 with probability 1 - dropout_rate(p).

    Each element compares 16 random bits with the rate: the bits come from full-range int64 draws of
    the global generator, viewed as four int16 each, a quarter of the draws (and here a third of the
    time) of `bernoulli_`; callers scale by 1 / (1 - dropout_rate(p)), so dropout(x) has mean x
    exactly. The mask takes one byte per element, the bytes of a boolean tensor read as uint8,
    because multiplying a float tensor by uint8 is the fastest way to apply it on a CPU.
    """
    n = math.prod(shape)
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2 ** 63, None)
    threshold = -2 ** 15 + round(p * 2 ** 16)  # P(bits >= threshold) = 1 - dropout_rate(p)
    return (bits.view(torch.int16)[:n] >= threshold).view(torch.uint8).view(shape)


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, p, scaling):
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        keep = keep_mask(x2.shape, p, x.device) if p > 0 else None
        dropped = x2 if keep is None else x2 * keep  # (N, in), not kept
        k = scaling / (1.0 - dropout_rate(p))
        v = (dropped @ lora_a.t()) * k  # (N, r)
        y = torch.addmm(x2 @ weight.t(), v, lora_b.t())  # x W^T + v B^T: (N, out)
        ctx.save_for_backward(x2, keep, weight, lora_a, lora_b, v)
        ctx.k = k
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, keep, weight, lora_a, lora_b, v = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        dv = (g @ lora_b) * ctx.k  # (N, r)
        grad_b = g.t() @ v  # (out, r)
        dropped = x2 if keep is None else x2 * keep  # recomputed
        grad_a = dv.t() @ dropped  # (r, in)
        grad_x = None
        if ctx.needs_input_grad[0]:
            through_lora = dv @ lora_a  # (N, in)
            if keep is not None:
                through_lora *= keep
            grad_x = torch.addmm(through_lora, g, weight).view(*grad.shape[:-1], x2.shape[-1])
        grad_w = g.t() @ x2 if ctx.needs_input_grad[1] else None  # only if W is trained too
        return grad_x, grad_w, grad_a, grad_b, None, None


def lora_linear(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                p: float = 0.0, scaling: float = 1.0, training: bool = False) -> torch.Tensor:
    """x W^T + scaling * B A dropout_p(x): (..., in), W (out, in), A (r, in), B (out, r) -> (..., out).

    Dropout applies in training only, like nn.Dropout. Without a gradient to compute, the same
    formula in plain tensor code.
    """
    p = p if training else 0.0
    if _plain(x, weight, lora_a, lora_b):
        dropped = x if p == 0 else x * keep_mask(x.shape, p, x.device) / (1.0 - dropout_rate(p))
        return F.linear(x, weight) + F.linear(F.linear(dropped, lora_a), lora_b) * scaling
    return _LoRALinear.apply(x, weight, lora_a, lora_b, p, scaling)


def _plain(*tensors) -> bool:
    """True where the hand-written backward has nothing to do or should not run: no gradient is
    needed, or autocast is on (bf16 on a GPU), whose casts only plain tensor code receives."""
    return (not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors)
            or torch.is_autocast_enabled(tensors[0].device.type))


# -------------------------------------------------------------------------------------------------
# Attention with dropout on the probabilities (SimCSE trains with p = 0.3), for one group of query
# heads sharing a key/value head: S = scale * q k^T + mask, P = softmax(S), m the keep mask,
# c = 1 / (1 - p), O = c * (m * P) v. Kept: q, k, v, P, and m as bytes (torch's own math path keeps
# P, a float mask and their product).
#   dL/dv = c * (m * P)^T dO          dP = c * m * (dO v^T)
#   dS = P * (dP - rowsum(dP * P))    (softmax's derivative)
#   dL/dq = scale * dS k              dL/dk = scale * dS^T q
# On a GPU torch's own scaled_dot_product_attention kernels do all of this (see `attention`).

class _DropoutAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, p):
        B, n_heads, T, d = q.shape
        n_kv = k.shape[1]
        scale = 1.0 / math.sqrt(d)
        qg = q.reshape(B, n_kv, n_heads // n_kv * T, d)  # (B, nkv, g*T, d): heads of one group stacked
        probs = _probs(qg, k, mask, scale)  # (B, nkv, g*T, T)
        keep = keep_mask(probs.shape, p, q.device)
        c = 1.0 / (1.0 - dropout_rate(p))
        out = ((probs * keep) @ v) * c  # (B, nkv, g*T, d)
        ctx.save_for_backward(qg, k, v, probs, keep)
        ctx.c, ctx.scale = c, scale
        return out.view(B, n_heads, T, d)

    @staticmethod
    def backward(ctx, grad_out):
        qg, k, v, probs, keep = ctx.saved_tensors
        g = grad_out.reshape(qg.shape) * ctx.c  # c * dO: (B, nkv, g*T, d)
        grad_v = (probs * keep).transpose(-1, -2) @ g  # (B, nkv, T, d)
        dp = (g @ v.transpose(-1, -2)) * keep  # (B, nkv, g*T, T)
        ds = probs * (dp - (dp * probs).sum(-1, keepdim=True))
        ds = ds * ctx.scale
        grad_q = (ds @ k).view(grad_out.shape)
        grad_k = ds.transpose(-1, -2) @ qg  # (B, nkv, T, d)
        return grad_q, grad_k, grad_v, None, None


def _probs(qg, k, mask, scale):
    """softmax(scale * q k^T + mask) for grouped queries (B, nkv, g*T, d) and keys (B, nkv, T, d)."""
    scores = (qg @ k.transpose(-1, -2)) * scale  # (B, nkv, g*T, T)
    if mask is not None:  # (B or 1, 1, T, T), the same for every head
        B, n_kv, gT, T = scores.shape
        scores = (scores.view(B, n_kv, gT // T, T, T) + mask[:, :, None]).view(B, n_kv, gT, T)
    return torch.softmax(scores, dim=-1)


# Inference on a CPU: for short texts (sentences, most of what encode sees) two plain batched
# products beat the fused kernel of scaled_dot_product_attention, which pays a fixed cost per head.
SHORT = 128  # tokens


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
              is_causal: bool, dropout_p: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v with dropout on the probabilities, grouped-query.

    q (B, nh, T, d), k and v (B, nkv, T, d), mask additive (B or 1, 1, T, T) or None -> (B, nh, T, d).
    Query head h reads key/value head h // (nh / nkv), as in Hugging Face's `repeat_kv`.
    Dropout on a CPU takes `_DropoutAttention`; inference on a CPU, for up to SHORT tokens, the same
    formula without dropout; everything else torch's scaled_dot_product_attention.
    """
    B, n_heads, T, d = q.shape
    on_cpu = q.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
    # with dropout on a CPU always the same masks (keep_mask), whether or not gradients are needed
    lean = dropout_p > 0 and on_cpu
    short = dropout_p == 0 and on_cpu and T <= SHORT and not (torch.is_grad_enabled() and q.requires_grad)
    if lean or short:  # the grouped formula, which takes the causal mask as a tensor
        if is_causal:
            mask = torch.full((T, T), torch.finfo(q.dtype).min, dtype=q.dtype, device=q.device).triu(1)
            mask = mask[None, None]  # (1, 1, T, T)
        if lean:
            return _DropoutAttention.apply(q, k, v, mask, dropout_p)
        qg = q.reshape(B, k.shape[1], -1, d)  # (B, nkv, g*T, d)
        return (_probs(qg, k, mask, 1.0 / math.sqrt(d)) @ v).view(B, n_heads, T, d)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p,
                                          enable_gqa=k.shape[1] != q.shape[1])


# -------------------------------------------------------------------------------------------------
# Inference: projections that read the same input (q, k, v; gate, up) as one matrix product, a
# larger and so faster GEMM on a CPU than one per projection. The values are the same.

def project(x: torch.Tensor, *linears: nn.Module) -> list[torch.Tensor]:
    """Several projections of the same x: (..., in) -> [(..., out_1), (..., out_2), ...].

    When their weights lie back to back in one matrix (see `fuse_projections`) and no gradient is
    needed, that is one GEMM, split afterwards. Otherwise (training, LoRA layers) each layer runs on
    its own.
    """
    weight = None if torch.is_grad_enabled() else stacked_weight(linears)
    if weight is None:
        return [linear(x) for linear in linears]
    return list(F.linear(x, weight).split([linear.out_features for linear in linears], dim=-1))


def stacked_weight(linears) -> Optional[torch.Tensor]:
    """The plain nn.Linear weights (out_i, in) as one (sum of out_i, in) matrix, if they already are
    consecutive row blocks of one storage; None otherwise. A view of that storage: nothing is copied."""
    first = linears[0].weight
    end = first.data_ptr()
    for linear in linears:
        w = linear.weight
        if (type(linear) is not nn.Linear or not w.is_contiguous() or w.data_ptr() != end
                or w.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                or w.shape[1] != first.shape[1] or w.dtype != first.dtype):
            return None
        end += w.numel() * w.element_size()  # the next block must start where this one ends
    rows = sum(linear.weight.shape[0] for linear in linears)
    return first.as_strided((rows, first.shape[1]), (first.shape[1], 1))


def _project_by_name(block: nn.Module, names: tuple, x: torch.Tensor) -> list[torch.Tensor]:
    return project(x, *(getattr(block, name) for name in names))  # looked up now: LoRA may wrap them later


FUSED = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))


@torch.no_grad()
def fuse_projections(model: nn.Module) -> nn.Module:
    """Store each layer's q/k/v weights, and its gate/up weights, as row blocks of one matrix, and
    give the attention and MLP blocks a `project` that runs them as one GEMM at inference.

    The parameters stay the same objects, with the same names, shapes and values (their `.data`
    becomes a view of the stacked matrix), so checkpoints, adapters and optimizers that hold them see
    no difference. With gradients, or once LoRA wraps a projection, `project` runs each layer on its
    own. Moving the model (`.to(...)`) makes separate copies again, which only loses the speed-up.
    Returns the same model.
    """
    for layer in decoder_of(model).layers:
        for block_name, names in FUSED:
            block = getattr(layer, block_name)
            linears = [getattr(block, name) for name in names]
            if all(type(linear) is nn.Linear for linear in linears) and stacked_weight(linears) is None:
                stacked = torch.cat([linear.weight for linear in linears])  # (sum of out, in)
                start = 0
                for linear in linears:
                    rows = linear.weight.shape[0]
                    linear.weight.data = stacked[start:start + rows]  # the same Parameter, new storage
                    start += rows
            block.project = partial(_project_by_name, block, names)  # shadows the class's plain method
    return model
