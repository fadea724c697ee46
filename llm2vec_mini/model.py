"""A Llama decoder from scratch, with LLM2Vec's bidirectional switch.

The blocks, in the order a token meets them:
  embed_tokens -> N x [ RMSNorm -> attention (RoPE, GQA) -> residual ;
                        RMSNorm -> SwiGLU MLP -> residual ] -> RMSNorm -> lm_head
LLM2Vec step 1 (paper Sec. 2.1, "Enabling bidirectional attention") is one boolean: with
`set_causal(False)` the attention mask stops hiding future tokens, and nothing else changes.

This file is the textbook path. The speed tricks live in `ops.py`: hand-written backward passes
(attention dropout, SwiGLU, LoRA layers) and, for the encoder, q/k/v (and gate/up) as one matrix
product (`ops.fuse_projections`, which replaces the blocks' `project` methods); each is tested equal
to this plain code.

Parameter names mirror Hugging Face's Llama (`model.layers.{i}.self_attn.q_proj.weight`, ...), so an HF
state dict or a PEFT adapter loads with no renaming.

References:
1) Touvron et al., "LLaMA", 2023, https://arxiv.org/abs/2302.13971
2) Su et al., "RoFormer: rotary position embedding", 2021, https://arxiv.org/abs/2104.09864
3) Shazeer, "GLU variants improve transformer", 2020, https://arxiv.org/abs/2002.05202 (SwiGLU)
4) Ainslie et al., "GQA", 2023, https://arxiv.org/abs/2305.13245
5) BehnamGhader et al., "LLM2Vec", 2024, https://arxiv.org/abs/2404.05961
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import LlamaConfig
from .ops import attention, silu_mul


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32 and cast back (Zhang & Sennrich, 2019)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., dim) -> (..., dim)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


# -------------------------------------------------------------------------------------------------
# Rotary position embeddings (RoPE), in Hugging Face's "rotate half" layout: the pair rotated
# together is (x[i], x[i + head_dim/2]), not (x[2i], x[2i+1]) as in Meta's original code.

def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    """Frequencies theta_i = rope_theta^(-2i/d) for i < d/2, with the config's scaling. Shape (d/2,)."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":  # position interpolation: every position divided by factor
        return inv_freq / scaling["factor"]
    # Llama 3: keep high frequencies, divide low ones by `factor`, blend smoothly in between.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, blended, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos and sin of position * frequency. position_ids (B, T) -> two tensors (B, T, head_dim)."""
    freqs = position_ids[:, :, None].float() * inv_freq[None, None, :].float()  # (B, T, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, d): each frequency serves both halves
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate every head of x (B, n, T, d) by cos/sin (B, T, d): x * cos + rotate_half(x) * sin."""
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, d): the same angle for every head
    return torch.addcmul(x * cos, rotate_half(x), sin)  # addcmul: a + b * c in one pass


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate queries (B, n_heads, T, d) and keys (B, n_kv_heads, T, d) by cos/sin (B, T, d)."""
    return rope(q, cos, sin), rope(k, cos, sin)


# -------------------------------------------------------------------------------------------------
# The one mask builder. The only difference between a decoder and an LLM2Vec encoder lives here.

def build_attention_mask(attention_mask: Optional[torch.Tensor], seq_len: int, causal: bool,
                         dtype: torch.dtype, device=None) -> Optional[torch.Tensor]:
    """Additive attention mask (B or 1, 1, T, T): 0 where query i may see key j, finfo.min elsewhere.

    attention_mask: (B, T) with 1 for real tokens and 0 for padding (left or right), or None.
    causal: hide keys j > i. Padding keys are always hidden. Returns None when nothing is hidden
    (bidirectional, no padding), which lets SDPA take its fastest path.
    A query row that can see nothing (a left pad in causal mode) gets finfo.min everywhere, which
    softmax turns into a uniform row instead of NaN; those rows are padding and never used.
    """
    device = device if attention_mask is None else attention_mask.device
    visible = torch.ones(1, 1, seq_len, seq_len, dtype=torch.bool, device=device)  # (1, 1, T, T)
    if causal:
        visible = visible.tril()  # query i sees keys 0..i
    if attention_mask is not None:
        keys = attention_mask.to(torch.bool)[:, None, None, :]  # (B, 1, 1, T): which keys are real
        visible = visible & keys  # (B, 1, T, T)
    elif not causal:
        return None
    mask = torch.zeros(visible.shape, dtype=dtype, device=device)
    return mask.masked_fill(~visible, torch.finfo(dtype).min)


def positions_from_mask(attention_mask: Optional[torch.Tensor], batch: int, seq_len: int, device):
    """Position ids (B, T): 0, 1, 2, ... over the real tokens, so padding never shifts a position."""
    if attention_mask is None:
        return torch.arange(seq_len, device=device)[None].expand(batch, seq_len)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# -------------------------------------------------------------------------------------------------
# The blocks

class LlamaAttention(nn.Module):
    """Grouped-query attention: n_heads query heads share n_kv_heads key/value heads."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        h, d = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=False)

    def project(self, x):
        """The three projections of the same input: x (B, T, hidden) -> q (B, T, nh * d), k and v
        (B, T, nkv * d). `ops.fuse_projections` swaps in one matrix product for inference."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x, cos, sin, mask, is_causal=False):
        B, T, _ = x.shape
        q, k, v = self.project(x)  # (B, T, nh * d), (B, T, nkv * d), (B, T, nkv * d)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, d)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, d)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, d)
        q, k = apply_rope(q, k, cos, sin)
        # softmax(q k^T / sqrt(d) + mask) v on every head: torch's scaled_dot_product_attention,
        # or, when training with attention dropout on a CPU, ops.py's leaner version of it
        y = attention(q, k, v, mask, is_causal, self.dropout if self.training else 0.0)  # (B, nh, T, d)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, nh * d)
        return self.o_proj(y)


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        h, m = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, m, bias=False)
        self.up_proj = nn.Linear(h, m, bias=False)
        self.down_proj = nn.Linear(m, h, bias=False)

    def project(self, x):
        """gate(x) and up(x): (B, T, hidden) -> two (B, T, m). `ops.fuse_projections` fuses them."""
        return self.gate_proj(x), self.up_proj(x)

    def forward(self, x):  # (B, T, hidden) -> (B, T, hidden)
        gate, up = self.project(x)  # (B, T, m) each
        return self.down_proj(silu_mul(gate, up))  # silu(gate) * up (ops.py)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x, cos, sin, mask, is_causal=False):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """The decoder stack without the vocabulary head: token ids (B, T) -> hidden states (B, T, hidden)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        # _weight skips nn.Embedding's own init: _init_weights below does it (and skips meta tensors)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Not a parameter and not saved: it is a function of the config.
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.causal = config.causal  # the LLM2Vec switch; see set_causal
        self.gradient_checkpointing = False  # recompute each layer in backward to save memory
        self.apply(lambda m: _init_weights(m, config.initializer_range))

    def set_causal(self, flag: bool) -> "LlamaModel":
        """True: decoder attention (past only). False: LLM2Vec's bidirectional attention."""
        if not isinstance(flag, bool):
            raise TypeError(f"set_causal expects True or False, got {flag!r}")
        self.causal = flag
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids (B, T); attention_mask (B, T) 1 = token, 0 = padding; returns (B, T, hidden).

        Positions count real tokens only (see `positions_from_mask`), so a sequence's hidden states
        do not depend on how much padding surrounds it, left or right.
        """
        B, T = input_ids.shape
        x = self.embed_tokens(input_ids)  # (B, T, hidden)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, B, T, input_ids.device)
        cos, sin = rope_cos_sin(self.inv_freq, position_ids, x.dtype)  # (B, T, head_dim) each
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # nothing to hide: let SDPA skip the mask
        # Causal without padding needs no mask tensor: SDPA's is_causal does it.
        is_causal = self.causal and attention_mask is None
        mask = None if is_causal else build_attention_mask(attention_mask, T, self.causal, x.dtype,
                                                           x.device)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, is_causal, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, is_causal)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """`LlamaModel` plus the vocabulary head: token ids (B, T) -> next-token logits (B, T, vocab)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        _init_weights(self.lm_head, config.initializer_range)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight  # one tensor, two names

    @property
    def causal(self) -> bool:
        return self.model.causal

    def set_causal(self, flag: bool) -> "LlamaForCausalLM":
        """True: decoder attention (past only). False: LLM2Vec's bidirectional attention."""
        self.model.set_causal(flag)
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.lm_head(self.model(input_ids, attention_mask, position_ids))  # (B, T, vocab)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding, causally, without a KV cache (a sanity check, not a chat server).

        input_ids (B, T) without padding -> (B, T + max_new_tokens).
        """
        was_causal, was_training = self.causal, self.training
        self.set_causal(True).eval()
        try:
            for _ in range(max_new_tokens):
                next_id = self(input_ids)[:, -1].argmax(-1, keepdim=True)  # (B, 1)
                input_ids = torch.cat([input_ids, next_id], dim=1)
        finally:
            self.set_causal(was_causal).train(was_training)
        return input_ids


def _init_weights(module: nn.Module, std: float) -> None:
    """Fresh weights as Hugging Face initialises Llama: N(0, std) for linears and embeddings."""
    if isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.device.type != "meta":
        nn.init.normal_(module.weight, mean=0.0, std=std)
