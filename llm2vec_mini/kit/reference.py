"""The reference solution of the teaching kit: every exercise's signature and docstring, answered by
the package itself.

This file is the exercises' one source of truth. `python -m llm2vec_mini.kit new` writes a student's
stub from it (each signature and docstring kept, each body replaced by a `raise NotImplementedError`
that names the tutorial section), and `python -m llm2vec_mini.kit check --impl reference` runs the
checks on it. Each body is a thin adapter from the exercise's signature to the package code the
exercise mirrors (`exercises.py` lists them), so the package is checked by the same checks as every
student.
"""

from __future__ import annotations

import types

import numpy as np
import torch
from torch import nn

from .. import lora, mntp, ops, pooling, simcse
from .. import model as llama
from ..convert import gguf, safetensors

__all__ = ["rms_norm", "apply_rope", "build_attention_mask", "attention", "swiglu", "mntp_mask", "mntp_loss",
           "LoRALinear", "contrastive_loss", "pool", "load_safetensors", "dequantize_q8_0", "dequantize_q4_1",
           "unpermute_qk"]

# The package's code, bound once, here: `kit.use` swaps a student's functions into the package's modules
# and classes, and the reference must go on calling the package's own (a submission may call it too).
_rms_norm = llama.RMSNorm.forward
_rope = llama.rope
_build_attention_mask = llama.build_attention_mask
_attention = ops.attention
_mntp_mask = mntp.MNTPCollator.__call__
_mntp_loss = mntp.mntp_loss
_contrastive_loss = simcse.contrastive_loss
_pool = pooling.pool
_load_file = safetensors.load_file
_q8_0, _q4_1 = gguf._DEQUANTISERS[8], gguf._DEQUANTISERS[3]  # the loader's block kernels (blocks, out)
_unpermute_qk = gguf.unpermute_qk


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension: y = x / sqrt(mean(x^2) + eps) * weight.

    x (..., d) in any float dtype; weight (d,) in the same dtype; returns (..., d) in x's dtype.
    Compute the normalisation in float32 and cast it back to x's dtype before multiplying by the
    weight: in bfloat16 the squares and their mean would lose their low bits. Nothing is subtracted
    (subtracting the mean would make it LayerNorm), and eps goes inside the square root.
    Taught in tutorials/01_llama_from_scratch, section 1.
    """
    return _rms_norm(types.SimpleNamespace(weight=weight, eps=eps), x)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (RoPE) in Hugging Face's rotate-half layout.

    x (B, n_heads, T, d): queries or keys; cos, sin (B, T, d): cos(m theta_i) and sin(m theta_i) for
    the token at position m, where coordinates j and j + d/2 share frequency i = j (each frequency
    fills both halves). Every head is rotated the same way. For i < d/2:

        x'[i]       = x[i] cos(m theta_i) - x[i + d/2] sin(m theta_i)
        x'[i + d/2] = x[i + d/2] cos(m theta_i) + x[i] sin(m theta_i)

    that is x * cos + rotate_half(x) * sin with rotate_half((x1, x2)) = (-x2, x1). The rotated pair
    is (i, i + d/2), not (2i, 2i + 1) as in Meta's original code. Returns (B, n_heads, T, d); x itself
    is left unchanged. Taught in tutorials/01_llama_from_scratch, section 2.
    """
    return _rope(x, cos, sin)


def build_attention_mask(attention_mask, seq_len: int, causal: bool, dtype: torch.dtype):
    """The additive attention mask: 0 where query i may see key j, torch.finfo(dtype).min where not.

    attention_mask: (B, T) with 1 for real tokens and 0 for padding, on the left or on the right, or
    None (no padding). seq_len: T. causal: True hides every key j > i (a decoder); False is LLM2Vec's
    bidirectional attention. Padding keys are always hidden. A query that can see nothing (a left pad
    in causal mode, or a row that is all padding) gets finfo.min in every column, which softmax turns
    into a uniform row rather than NaN (never -inf).
    Returns a tensor of `dtype`, (B, 1, T, T), or (1, 1, T, T) when attention_mask is None; when
    nothing at all is hidden (bidirectional, no padding) you may return None instead.
    Taught in tutorials/02_bidirectional_attention, section 1 (and tutorial 01, section 3).
    """
    return _build_attention_mask(attention_mask, seq_len, causal, dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """Grouped-query attention: softmax(q k^T / sqrt(d) + mask) v for every query head.

    q (B, n_heads, T, d); k, v (B, n_kv_heads, T, d), where n_heads is a multiple g of n_kv_heads;
    mask: additive, (B or 1, 1, T, T) (0 visible, finfo.min hidden), the same for every head, or None.
    Query head h reads key/value head h // g: heads 0 .. g-1 share key/value head 0, and so on
    (Hugging Face's repeat_kv, which is repeat_interleave, not repeat). Returns (B, n_heads, T, d).
    Write it with matrix products and softmax, not torch's scaled_dot_product_attention.
    Taught in tutorials/01_llama_from_scratch, section 3.
    """
    return _attention(q, k, v, mask, is_causal=False, dropout_p=0.0)


def swiglu(x: torch.Tensor, gate_proj, up_proj, down_proj) -> torch.Tensor:
    """Llama's SwiGLU MLP: down_proj(silu(gate_proj(x)) * up_proj(x)), with silu(z) = z * sigmoid(z).

    x (..., hidden). gate_proj and up_proj map (..., hidden) to (..., m), down_proj maps (..., m) back
    to (..., hidden); they are callables (nn.Linear in the plain model, LoRA layers once adapters are
    on): call them, do not read their weights. Returns (..., hidden).
    Taught in tutorials/01_llama_from_scratch, section 4.
    """
    return down_proj(ops.silu_mul(gate_proj(x), up_proj(x)))


def mntp_mask(input_ids: torch.Tensor, mask_id: int, vocab_size: int, special_ids, mask_ratio: float,
              generator=None):
    """BERT-style masking for masked next-token prediction (MNTP).

    input_ids (B, T) int64: blocks of token ids. Every position whose token is not in special_ids is
    chosen, independently, with probability mask_ratio. A chosen position's input becomes mask_id
    with probability 0.8, a token drawn uniformly from range(vocab_size) with probability 0.1, and
    stays as it is with probability 0.1. Returns (inputs, labels), both (B, T) int64: inputs the
    corrupted copy (input_ids itself is not changed), labels the original token at the chosen
    positions and -100 everywhere else. Draw every random number from `generator` (a
    torch.Generator; None means torch's global one), so that a seed gives the same masks.
    Taught in tutorials/06_mntp, sections 1 and 2.
    """
    collator = mntp.MNTPCollator(mask_id=mask_id, vocab_size=vocab_size, special_ids=list(special_ids),
                                 mask_ratio=mask_ratio)
    return _mntp_mask(collator, input_ids, generator=generator)


def mntp_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The MNTP loss: mean cross-entropy of predicting each masked token i from position i - 1.

    logits (B, T, V); labels (B, T): the original token at masked positions, -100 elsewhere.
    loss = mean over the labelled (b, i) with i >= 1 of -log softmax(logits[b, i - 1])[labels[b, i]]
    (a label at position 0 has no position -1 and does not count). Compute it in float32. A batch
    with no label gives 0 (a tensor still attached to the graph, whose gradient is zero), not NaN.
    Returns a scalar tensor. Taught in tutorials/06_mntp, section 3.
    """
    return _mntp_loss(logits, labels, nn.Identity())  # the cheap form, with logits as the states


class LoRALinear(lora.LoRALinear):
    """A frozen linear layer plus a trainable low-rank update: y = x W^T + (alpha / r) x A^T B^T.

    Keep the frozen W (out, in) as the Parameter `weight` (requires_grad False), and the update as
    PEFT names and shapes it: `lora_A = nn.Linear(in, r, bias=False)`, so A = lora_A.weight (r, in),
    random (nn.Linear's default init), and `lora_B = nn.Linear(r, out, bias=False)`, so
    B = lora_B.weight (out, r), zeros: a fresh layer computes exactly x W^T. Keep r, alpha and a
    flag `merged` (False at first) as attributes. Only A and B are trained. No dropout here.
    Taught in tutorials/05_lora, sections 1 to 3.
    """

    def __init__(self, weight: torch.Tensor, r: int, alpha: float):
        """weight (out, in): the frozen W; r: the rank; alpha: the scale numerator (scale = alpha / r)."""
        super().__init__(weight, r, alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out): x W^T + (alpha / r) x A^T B^T; once merged, just x W^T."""
        return super().forward(x)

    def merge(self) -> None:
        """W <- W + (alpha / r) B A, and merged = True. Merging a merged layer changes nothing."""
        super().merge()

    def unmerge(self) -> None:
        """W <- W - (alpha / r) B A, and merged = False. Unmerging an unmerged layer changes nothing."""
        super().unmerge()


def contrastive_loss(queries: torch.Tensor, positives: torch.Tensor, negatives=None,
                     scale: float = 20.0) -> torch.Tensor:
    """SimCSE's loss: cross-entropy of each query against all candidates, its own positive the target.

    queries, positives (N, H): row i of each is a pair (unsupervised SimCSE: the two dropout views of
    sentence i). negatives (N, H) or None: one hard negative per query (supervised SimCSE). The
    candidates are the N positives, then the N negatives if given. With s_ij = scale * cos(queries_i,
    candidate_j), the cosine of the two vectors (each divided by its length):

        loss = mean over i of  -log( exp(s_ii) / sum_j exp(s_ij) )

    Compute it in float32. Returns a scalar tensor; gradients reach queries, positives and negatives.
    Taught in tutorials/07_simcse, section 2 (the supervised loss: its "Try it yourself").
    """
    return _contrastive_loss(queries, positives, negatives, scale)


def pool(hidden: torch.Tensor, attention_mask, embed_mask, mode: str) -> torch.Tensor:
    """Pool token states (B, T, H) into one vector per text (B, H).

    attention_mask (B, T): 1 for real tokens, 0 for padding (left or right). embed_mask (B, T): 1 for
    the tokens to average (the text, without the instruction or BOS), each row with at least one;
    None means every real token. mode:
      "mean":          the average of the embed-mask tokens
      "weighted_mean": the k-th embed-mask token of a row weighs k / (1 + 2 + ... + n)
      "eos_token", "last_token": the state of the row's last real token
      "bos_token":     the state of the row's first real token
    Padding never counts. Taught in tutorials/04_pooling_and_encoding, section 1.
    """
    return _pool(hidden, attention_mask, embed_mask, mode)


def load_safetensors(path) -> dict:
    """Every tensor of a safetensors file, by name: {name: torch.Tensor}.

    The file: 8 bytes N (an unsigned little-endian 64-bit integer), N bytes of UTF-8 JSON (the header,
    maybe padded with spaces), then the data section. The header maps each tensor name to
    {"dtype": "F32", "shape": [3, 4], "data_offsets": [begin, end]}, byte offsets counted from the
    start of the data section; an entry "__metadata__" is not a tensor. dtypes: F64, F32, F16, BF16,
    I64, I32, I16, I8, U8, BOOL, each little-endian, in row-major order. Return each tensor with the
    file's dtype, shape and exact bits. Taught in tutorials/03_loading_real_weights, section 1.
    """
    return _load_file(path)


def dequantize_q8_0(raw: np.ndarray) -> np.ndarray:
    """GGUF's Q8_0 blocks to float32 weights.

    raw: uint8 array (n_blocks * 34,): blocks of 34 bytes, a float16 scale d (little-endian), then 32
    signed bytes q_0 .. q_31. Weight j of a block is d * q_j, computed in float32.
    Returns float32 (n_blocks * 32,). Taught in tutorials/03_loading_real_weights, section 2.
    """
    return _blocks(raw, 34, _q8_0)


def dequantize_q4_1(raw: np.ndarray) -> np.ndarray:
    """GGUF's Q4_1 blocks to float32 weights.

    raw: uint8 array (n_blocks * 20,): blocks of 20 bytes, a float16 scale d, a float16 minimum m, then
    16 bytes qs: the low 4 bits of qs[j] are q_j, the high 4 bits q_(j+16), for j < 16. Weight j of a
    block is d * q_j + m, computed in float32. Returns float32 (n_blocks * 32,).
    Taught in tutorials/03_loading_real_weights, section 2.
    """
    return _blocks(raw, 20, _q4_1)


def _blocks(raw: np.ndarray, nbytes: int, kernel) -> np.ndarray:
    """Run one of the GGUF loader's block kernels on every block: (n * nbytes,) uint8 -> (n * 32,)."""
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, nbytes)  # (n, bytes per block)
    out = np.empty((blocks.shape[0], 32), dtype=np.float32)
    kernel(blocks, out)
    return out.reshape(-1)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """GGUF's order of the rows of W_q or W_k back to Hugging Face's.

    w: (n_head * head_dim, ...) array, head after head. Within each head llama.cpp's converter stored
    Hugging Face's rows i and i + head_dim/2 (the pair that rotate-half RoPE rotates together) as rows
    2i and 2i + 1. Return the rows in Hugging Face's order: (n_head * head_dim, ...), the same shape.
    For W_k, n_head is the number of key/value heads. Taught in tutorials/03_loading_real_weights,
    section 3.
    """
    return _unpermute_qk(w, n_head)


# The reference solution by name: `kit.use` leaves a submission's copy of these in place (they are the
# package's own code already).
SOLUTION = {name: globals()[name] for name in __all__}
