"""LoRA: train a low-rank update B·A beside each frozen weight (LLM2Vec trains both MNTP and SimCSE this way).

    y = W x + (alpha / r) · B A dropout(x)        A: (r, in), B: (out, r), B = 0 at the start

so a fresh adapter changes nothing, and training moves only r·(in + out) numbers per matrix.
The module names are PEFT's (`...q_proj.lora_A`, `...q_proj.lora_B`), so an adapter saved by
`convert/peft.py` loads in peft and in the official llm2vec, and theirs load here. This module is the
maths only: the layer, attaching it, merging and unmerging; the file format lives in `convert/peft.py`.
LLM2Vec's settings: r = 16, alpha = 32 (paper Appendix D.1.1-D.1.2), and in the official code dropout
0.05 on every attention and MLP projection; lm_head stays frozen here.

References:
1) Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021, https://arxiv.org/abs/2106.09685
2) Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA" (rsLoRA), 2023,
   https://arxiv.org/abs/2312.03732
3) PEFT's adapter format: https://huggingface.co/docs/peft
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .ops import lora_linear
from .util import decoder_of, is_int

LLM2VEC_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_scale(r: int, alpha: float, use_rslora: bool = False) -> float:
    """alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoRALinear(nn.Linear):
    """A frozen linear layer (same `weight` name) plus a trainable low-rank path `lora_B(lora_A(dropout(x)))`.

    It is built around an existing weight (out, in), which it shares and freezes: the base matrix is
    never allocated or initialised a second time (for Sheared-LLaMA that would be 1.2 billion random
    draws thrown away). Only A (r, in) and B (out, r) are new.
    """

    def __init__(self, weight: torch.Tensor, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False):
        nn.Module.__init__(self)  # not nn.Linear.__init__, which would allocate and init a weight
        if not (is_int(r) and r > 0):
            raise ConfigError(f"lora r must be a positive integer, got {r!r}")
        if not 0 <= dropout < 1:
            raise ConfigError(f"lora dropout must be in [0, 1), got {dropout!r}")
        self.out_features, self.in_features = weight.shape
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        self.weight.requires_grad_(False)
        self.register_parameter("bias", None)
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = lora_scale(r, alpha, use_rslora)
        self.lora_dropout = nn.Dropout(dropout)
        w = self.weight
        # nn.Linear's default init is kaiming-uniform(a=sqrt(5)), exactly what PEFT gives lora_A.
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=w.device, dtype=w.dtype)  # (r, in)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=w.device, dtype=w.dtype)  # (out, r)
        nn.init.zeros_(self.lora_B.weight)
        self.merged = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                    use_rslora: bool = False) -> "LoRALinear":
        """Wrap an existing bias-free linear layer, sharing (not copying) its frozen weight."""
        if linear.bias is not None:
            raise ConfigError("LoRA here wraps bias-free projections only (Llama has no biases)")
        return cls(linear.weight, r, alpha, dropout, use_rslora)

    def delta_weight(self) -> torch.Tensor:
        """scale · B @ A, the update LoRA adds to W. Shape (out, in)."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        if self.merged:
            return F.linear(x, self.weight)  # the update already lives in W
        # W x + scaling * lora_B(lora_A(dropout(x))), with a backward that keeps less (ops.py)
        return lora_linear(x, self.weight, self.lora_A.weight, self.lora_B.weight, self.lora_dropout.p,
                           self.scaling, self.training)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight += self.delta_weight().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight -= self.delta_weight().to(self.weight.dtype)
            self.merged = False


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear, by its name inside the LlamaModel (`layers.0.self_attn.q_proj`, ...)."""
    return {name: m for name, m in decoder_of(model).named_modules() if isinstance(m, LoRALinear)}


def add_lora(model: nn.Module, r: int = 16, alpha: float = 32.0, dropout: float = 0.05,
             targets: Iterable[str] = LLM2VEC_TARGETS, use_rslora: bool = False) -> nn.Module:
    """Wrap each target projection of the decoder layers in a LoRALinear; freeze everything else.

    `targets` are module names as in PEFT's `target_modules` (q_proj, ..., down_proj). lm_head and the
    embeddings are never wrapped. Returns the same model, modified in place.
    """
    targets = set(targets)
    unknown = targets - set(LLM2VEC_TARGETS)
    if unknown:
        raise ConfigError(f"lora targets {sorted(unknown)} are not projections of a Llama layer "
                          f"(choose from {', '.join(LLM2VEC_TARGETS)})")
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in decoder_of(model).layers:
        for block in (layer.self_attn, layer.mlp):
            for name, child in list(block.named_children()):
                if name in targets and type(child) is nn.Linear:
                    setattr(block, name, LoRALinear.from_linear(child, r, alpha, dropout, use_rslora))
    for m in lora_layers(model).values():
        m.lora_A.weight.requires_grad_(True)
        m.lora_B.weight.requires_grad_(True)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """W <- W + scale · B A in every LoRA layer (inference then costs nothing extra)."""
    for m in lora_layers(model).values():
        m.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo `merge_lora`: W <- W - scale · B A."""
    for m in lora_layers(model).values():
        m.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter into its weight and put plain nn.Linear layers back (PEFT's name for it).

    Afterwards the model has no LoRA layers, so `add_lora` can attach a fresh adapter on top (LLM2Vec
    trains SimCSE on the MNTP-merged model this way).
    """
    for layer in decoder_of(model).layers:
        for block in (layer.self_attn, layer.mlp):
            for name, child in list(block.named_children()):
                if isinstance(child, LoRALinear):
                    child.merge()
                    plain = nn.Linear(child.in_features, child.out_features, bias=False,
                                      device="meta")  # shapes only: no throw-away weight
                    plain.weight = child.weight  # the merged weight itself, not a copy
                    setattr(block, name, plain)
    return model
