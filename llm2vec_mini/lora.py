"""LoRA: train a low-rank update B·A beside each frozen weight (LLM2Vec trains both MNTP and SimCSE this way).

    y = W x + (alpha / r) · B A dropout(x)        A: (r, in), B: (out, r), B = 0 at the start

so a fresh adapter changes nothing, and training moves only r·(in + out) numbers per matrix.
The layout is PEFT's, key for key (`...q_proj.lora_A.weight`, `...q_proj.lora_B.weight`), so an adapter
saved here loads in peft and in the official llm2vec, and theirs load here (`convert/peft.py`).
LLM2Vec's settings (paper Appendix D.1): r = 16, alpha = 32, dropout 0.05 on every attention and MLP
projection; lm_head stays frozen.

References:
1) Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021, https://arxiv.org/abs/2106.09685
2) Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA" (rsLoRA), 2023,
   https://arxiv.org/abs/2312.03732
3) PEFT's adapter format: https://huggingface.co/docs/peft
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError, ConfigError
from .ops import lora_linear

LLM2VEC_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_scale(r: int, alpha: float, use_rslora: bool = False) -> float:
    """alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoRALinear(nn.Linear):
    """A frozen nn.Linear (same `weight` name) plus a trainable low-rank path `lora_B(lora_A(dropout(x)))`."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        if not (isinstance(r, int) and r > 0):
            raise ConfigError(f"lora r must be a positive integer, got {r!r}")
        if not 0 <= dropout < 1:
            raise ConfigError(f"lora dropout must be in [0, 1), got {dropout!r}")
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = lora_scale(r, alpha, use_rslora)
        self.lora_dropout = nn.Dropout(dropout)
        # nn.Linear's default init is kaiming-uniform(a=sqrt(5)), exactly what PEFT gives lora_A.
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=dtype)  # weight (r, in)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=dtype)  # weight (out, r)
        nn.init.zeros_(self.lora_B.weight)
        self.merged = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                    use_rslora: bool = False) -> "LoRALinear":
        """Wrap an existing bias-free linear layer, sharing (not copying) its frozen weight."""
        if linear.bias is not None:
            raise ConfigError("LoRA here wraps bias-free projections only (Llama has no biases)")
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, r, alpha, dropout, use_rslora,
                    device=w.device, dtype=w.dtype)
        layer.weight = w
        layer.weight.requires_grad_(False)
        return layer

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


def _decoder(model: nn.Module) -> nn.Module:
    """The LlamaModel inside a LlamaForCausalLM, or the model itself."""
    return getattr(model, "model", model)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear, by its name inside the LlamaModel (`layers.0.self_attn.q_proj`, ...)."""
    return {name: m for name, m in _decoder(model).named_modules() if isinstance(m, LoRALinear)}


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
    for layer in _decoder(model).layers:
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
    for layer in _decoder(model).layers:
        for block in (layer.self_attn, layer.mlp):
            for name, child in list(block.named_children()):
                if isinstance(child, LoRALinear):
                    child.merge()
                    plain = nn.Linear(child.in_features, child.out_features, bias=False,
                                      device=child.weight.device, dtype=child.weight.dtype)
                    plain.weight = child.weight
                    setattr(block, name, plain)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's key names for a LlamaModel base (what llm2vec saves)."""
    out = {}
    for name, m in lora_layers(model).items():
        out[f"base_model.model.{name}.lora_A.weight"] = m.lora_A.weight.detach().contiguous()
        out[f"base_model.model.{name}.lora_B.weight"] = m.lora_B.weight.detach().contiguous()
    return out


def save_adapter(model: nn.Module, out_dir, base_model_name_or_path: str | None = None) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` in PEFT's format; returns the folder."""
    from .convert.safetensors import save_file

    layers = lora_layers(model)
    if not layers:
        raise ConfigError("the model has no LoRA layers to save (call add_lora first)")
    first = next(iter(layers.values()))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": first.lora_dropout.p,
        "use_rslora": first.use_rslora,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in layers}),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(lora_state_dict(model), out_dir / "adapter_model.safetensors",
              metadata={"format": "pt"})
    return out_dir


def load_adapter(model: nn.Module, adapter_dir, trainable: bool = True) -> nn.Module:
    """Attach a saved PEFT adapter as LoRA layers (not merged), e.g. to continue training it."""
    from .convert.peft import read_adapter

    config, weights = read_adapter(adapter_dir)
    add_lora(model, r=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0),
             targets={name.rsplit(".", 1)[-1] for name in weights},
             use_rslora=config.get("use_rslora", False))
    layers = lora_layers(model)
    with torch.no_grad():
        for name, (a, b) in weights.items():
            have = (tuple(layers[name].lora_A.weight.shape), tuple(layers[name].lora_B.weight.shape))
            if have != (tuple(a.shape), tuple(b.shape)):  # LoRA layers already there, of another r
                raise CheckpointError(f"{name}: the adapter's lora_A/lora_B are {tuple(a.shape)} and "
                                      f"{tuple(b.shape)}, the model's LoRA layer has {have[0]} and "
                                      f"{have[1]} (a different r?)", adapter_dir)
            layers[name].lora_A.weight.copy_(a)
            layers[name].lora_B.weight.copy_(b)
    for m in layers.values():
        m.lora_A.weight.requires_grad_(trainable)
        m.lora_B.weight.requires_grad_(trainable)
    return model
