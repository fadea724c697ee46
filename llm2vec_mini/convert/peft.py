"""PEFT LoRA adapters on disk: read, write, merge into a model, attach for training.

A LoRA adapter stores, for each adapted linear layer W (out, in), two matrices A (r, in) and B (out, r).
Merging folds the low-rank update into the weight (Hu et al., Eq. 3):

    W <- W + scale * B @ A,      scale = lora_alpha / r       (rsLoRA: lora_alpha / sqrt(r))

after which the model is a plain Llama again. LLM2Vec ships its MNTP and SimCSE stages as two such
adapters; the SimCSE one was trained on top of the merged MNTP model, so they are merged in order.

PEFT names each tensor after the module it adapts, inside the wrapped model:

    base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight    adapter on a LlamaForCausalLM
    base_model.model.layers.3.self_attn.q_proj.lora_B.weight          adapter on a bare LlamaModel (llm2vec)

We accept both and name modules inside the decoder (`layers.3.self_attn.q_proj`), as `lora.py` does;
we write the second (what llm2vec saves). `save_adapter` writes adapter_config.json +
adapter_model.safetensors; `load_adapter` attaches a saved adapter as trainable LoRA layers
(`lora.LoRALinear`) instead of merging it.
Options that change the math (DoRA, biases, fan_in_fan_out, extra trainable modules, ...) are refused
by name rather than silently merged wrong. `rank_pattern`/`alpha_pattern` (per-module r and alpha,
keyed by regexes matched against the end of the module name, as PEFT does) are supported.

References:
1) Hu et al., "LoRA", 2021, https://arxiv.org/abs/2106.09685
2) Kalajdzievski, "rsLoRA", 2023, https://arxiv.org/abs/2312.03732
3) PEFT's LoraConfig: https://huggingface.co/docs/peft/package_reference/lora
4) BehnamGhader et al., "LLM2Vec", 2024, https://arxiv.org/abs/2404.05961, Sec. 2.2 (the MNTP adapter merged
   before SimCSE) and Appendix D.1.1-D.1.2 (r and alpha)
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..lora import LoRALinear, lora_layers, lora_scale
from ..util import PathLike, decoder_of, is_int, is_number, read_json

try:  # the regex parser, to look at a pattern before matching with it (sre_parse before Python 3.11)
    from re import _parser as sre_parse
except ImportError:  # pragma: no cover
    import sre_parse
from .safetensors import load_file, save_file
from .torch_bin import load_torch_bin

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")

# base_model.model.<module>.lora_A.weight, where <module> may start with "model." (CausalLM base)
_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight")
# The decoder's own submodules: the first name of a key from an adapter saved on a bare LlamaModel.
_DECODER_ROOTS = ("layers.", "embed_tokens", "norm")

# Options that, when set, make "W + scale * B @ A" the wrong merge; each is refused by name.
_UNSUPPORTED = {
    "use_dora": "DoRA (a learned magnitude vector)",
    "lora_bias": "a bias on lora_B",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D-style transposed weights)",
    "use_qalora": "QA-LoRA",
    "modules_to_save": "fully trained extra modules (modules_to_save)",
    "trainable_token_indices": "trainable token embeddings",
    "target_parameters": "LoRA on bare parameters (target_parameters)",
    "layer_replication": "layer replication",
    "layers_to_transform": "layers_to_transform",
    "exclude_modules": "exclude_modules",
    "alora_invocation_tokens": "activated LoRA (cannot be merged)",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
}


def read_adapter(adapter_dir: PathLike) -> Tuple[dict, Dict[str, Tuple[torch.Tensor, torch.Tensor]]]:
    """A PEFT LoRA adapter directory -> (adapter_config dict, {module: (A (r, in), B (out, r))}).

    Module names are inside the decoder (`layers.{i}.self_attn.q_proj`) whichever base PEFT saved
    from. The config's extra key `_peft_base` records that base ("LlamaForCausalLM" or "LlamaModel"),
    which decides how `target_modules`/`rank_pattern` names are matched. Ranks are checked against
    `r` (or `rank_pattern`); everything unsupported raises CheckpointError naming the option or key.
    """
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise CheckpointError("adapter directory not found", adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    config = _check_config(read_json(config_path), config_path)

    weights_path = next((adapter_dir / f for f in ADAPTER_FILES if (adapter_dir / f).is_file()), None)
    if weights_path is None:
        raise CheckpointError(f"no adapter weights (looked for {', '.join(ADAPTER_FILES)})", adapter_dir)
    tensors = load_file(weights_path) if weights_path.suffix == ".safetensors" else \
        load_torch_bin(weights_path)

    halves: Dict[str, Dict[str, torch.Tensor]] = {}
    bases = set()
    for key, tensor in tensors.items():
        m = _KEY.fullmatch(key)
        if m is None:
            raise CheckpointError(f"unexpected key {key!r} (expected base_model.model.<module>"
                                  f".lora_A.weight / .lora_B.weight)", weights_path)
        module = m["module"]
        if module.startswith("model."):
            bases.add("LlamaForCausalLM")
            module = module[len("model."):]
        elif module.startswith(_DECODER_ROOTS):
            bases.add("LlamaModel")
        else:
            raise CheckpointError(f"key {key!r}: LoRA on {module!r} is not supported (only the "
                                  f"decoder's linear layers)", weights_path)
        if tensor.dim() != 2 or not tensor.is_floating_point():
            raise CheckpointError(f"key {key!r}: expected a 2-D floating-point matrix, found "
                                  f"{tensor.dtype} of shape {tuple(tensor.shape)}", weights_path)
        halves.setdefault(module, {})[m["which"]] = tensor
    if not halves:
        raise CheckpointError("the adapter holds no LoRA weights", weights_path)
    if len(bases) > 1:
        raise CheckpointError("keys mix a LlamaForCausalLM base (base_model.model.model.*) and a "
                              "LlamaModel base (base_model.model.layers.*)", weights_path)
    config["_peft_base"] = bases.pop()

    weights = {}
    for module, pair in sorted(halves.items()):
        for which in "AB":
            if which not in pair:
                raise CheckpointError(f"module {module!r} has lora_{'BA'[which == 'B']} but no "
                                      f"lora_{which}", weights_path)
        a, b = pair["A"], pair["B"]  # (r, in), (out, r)
        r, _ = _rank_and_alpha(config, peft_name(config, module), config_path)
        if a.shape[0] != r or b.shape[1] != r:
            raise CheckpointError(f"module {module!r}: rank mismatch: the config says r={r} but "
                                  f"lora_A is {tuple(a.shape)} and lora_B is {tuple(b.shape)}",
                                  weights_path)
        if not _targeted(config, peft_name(config, module)):
            raise CheckpointError(f"module {module!r} has weights but is not in target_modules "
                                  f"{config['target_modules']!r}", weights_path)
        weights[module] = (a, b)
    return config, weights


def peft_name(config: dict, module: str) -> str:
    """The name PEFT gave a decoder module: prefixed by "model." when the base was a CausalLM."""
    return f"model.{module}" if config.get("_peft_base") == "LlamaForCausalLM" else module


def module_scale(config: dict, module: str) -> float:
    """scale = alpha / r (alpha / sqrt(r) for rsLoRA), with rank_pattern/alpha_pattern applied."""
    r, alpha = _rank_and_alpha(config, peft_name(config, module))
    return lora_scale(r, alpha, bool(config.get("use_rslora", False)))


@torch.no_grad()
def merge_adapter(model: nn.Module, adapter_dir: PathLike) -> nn.Module:
    """W += scale * B @ A for every module of the adapter; returns the same model.

    model: a LlamaForCausalLM or LlamaModel. Every targeted linear layer of the decoder must have
    weights and every weight a targeted layer of the right shape; all is checked before any weight
    changes. The product is computed in fp32 and added in the weight's dtype.
    """
    config, weights = read_adapter(adapter_dir)
    where = Path(adapter_dir)
    decoder = decoder_of(model)  # the LlamaModel inside a LlamaForCausalLM
    linears = {name: m for name, m in decoder.named_modules()
               if isinstance(m, nn.Linear) and ".lora_" not in f".{name}"}
    expected = {name for name in linears if _targeted(config, peft_name(config, name))}
    missing, unknown = sorted(expected - set(weights)), sorted(set(weights) - set(linears))
    if unknown:
        raise CheckpointError(f"module {unknown[0]!r} of the adapter is not a linear layer of "
                              f"this model", where)
    if missing:
        raise CheckpointError(f"{len(missing)} targeted modules have no LoRA weights, e.g. "
                              f"{missing[0]!r}", where)
    for name, (a, b) in weights.items():
        out_features, in_features = linears[name].weight.shape
        if a.shape[1] != in_features or b.shape[0] != out_features:
            raise CheckpointError(f"module {name!r}: lora_B @ lora_A is ({b.shape[0]}, "
                                  f"{a.shape[1]}) but the weight is ({out_features}, "
                                  f"{in_features})", where)
    for name, (a, b) in weights.items():
        w = linears[name].weight  # (out, in)
        delta = (b.to(w.device, torch.float32) @ a.to(w.device, torch.float32)) * module_scale(config, name)
        w.add_(delta.to(w.dtype))  # (out, r) @ (r, in) -> (out, in)
    return model


# ---------------------------------------------------------------------------------------------
# Config checks and PEFT's name matching


def _check_config(config, path: Path) -> dict:
    if not isinstance(config, dict):
        raise CheckpointError("adapter_config.json must be a JSON object", path)
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"peft_type: only 'LORA' adapters are supported, got "
                              f"{config.get('peft_type')!r}", path)
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not (is_int(r) and r > 0):
        raise CheckpointError(f"r must be a positive integer, got {r!r}", path)
    if not (is_number(alpha) and 0 < alpha < math.inf):
        raise CheckpointError(f"lora_alpha must be a positive number, got {alpha!r}", path)
    dropout = config.get("lora_dropout") or 0.0
    if not (is_number(dropout) and 0 <= dropout < 1):
        raise CheckpointError(f"lora_dropout must be a number in [0, 1), got {config['lora_dropout']!r}",
                              path)
    config["lora_dropout"] = dropout
    if config.get("bias", "none") != "none":
        raise CheckpointError(f"bias: only 'none' is supported, got {config['bias']!r}", path)
    if not isinstance(config.get("use_rslora", False), bool):
        raise CheckpointError(f"use_rslora must be true or false, got {config['use_rslora']!r}", path)
    for option, what in _UNSUPPORTED.items():
        if config.get(option):
            raise CheckpointError(f"{option}: {what} is not supported (got {config[option]!r})", path)
    targets = config.get("target_modules")
    if not (isinstance(targets, str) or (isinstance(targets, list) and targets
                                         and all(isinstance(t, str) for t in targets))):
        raise CheckpointError(f"target_modules must be a list of names or a regex, got {targets!r}",
                              path)
    if isinstance(targets, str):
        _check_regex(targets, "target_modules", path)
    for field in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(field) or {}
        if not isinstance(pattern, dict) or not all(
                is_number(v) and 0 < v < math.inf for v in pattern.values()):
            raise CheckpointError(f"{field} must map module patterns to positive numbers", path)
        for key in pattern:
            _check_regex(key, field, path)
        config[field] = pattern
    return config


def _check_regex(pattern: str, field: str, path) -> None:
    """A regex from the file, compiled, with no quantifier or alternation inside a quantified group
    (`(a+)+`, `(a|aa)*`) and few unbounded quantifiers (`.*.*.*.*.*`): Python's backtracking matcher
    can take exponential (or high polynomial) time on those, so a hostile adapter_config.json could
    hang the loader."""
    try:
        parsed = sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise CheckpointError(f"{field}: {pattern!r:.80} is not a valid regex ({e})", path) from None
    unbounded, todo = 0, [(parsed, False)]
    while todo:  # (a parsed sequence, is it inside a repeat?)
        items, repeated = todo.pop()
        for op, arg in items:
            if op in (sre_parse.MAX_REPEAT, sre_parse.MIN_REPEAT):  # possessive ones never backtrack
                low, high, body = arg
                many = high is sre_parse.MAXREPEAT or high > 1
                if many and repeated:
                    raise CheckpointError(f"{field}: {pattern!r:.80} repeats a repeated group, which can "
                                          f"take exponential time to match", path)
                unbounded += high is sre_parse.MAXREPEAT
                todo.append((body, repeated or many))
            elif op is sre_parse.SUBPATTERN:
                todo.append((arg[-1], repeated))
            elif op is sre_parse.BRANCH:
                if repeated:  # (a|aa)*: two ways to match the same text, at every repetition
                    raise CheckpointError(f"{field}: {pattern!r:.80} repeats an alternation, which can "
                                          f"take exponential time to match", path)
                todo += [(branch, repeated) for branch in arg[1]]
            elif op in (sre_parse.ASSERT, sre_parse.ASSERT_NOT):
                todo.append((arg[1], repeated))
    if unbounded > 4:
        raise CheckpointError(f"{field}: {pattern!r:.80} has {unbounded} unbounded repeats (at most 4), "
                              f"which can take very long to match", path)


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rule: the first pattern p with re.match(r"(.*\\.)?(p)$", name) gives the value."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


def _rank_and_alpha(config: dict, name: str, path=None) -> Tuple[int, float]:
    r = _pattern_value(config.get("rank_pattern") or {}, name, config["r"])
    if not (is_int(r) and r > 0):
        raise CheckpointError(f"rank_pattern gives {name!r} a rank of {r!r}", path)
    return r, _pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"])


def _targeted(config: dict, name: str) -> bool:
    """Does PEFT's target_modules select the module named `name` (PEFT's naming)?"""
    targets = config["target_modules"]
    if targets == "all-linear":  # every linear layer but the output head
        return not name.endswith("lm_head")
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in targets)


# ---------------------------------------------------------------------------------------------
# Writing an adapter, and attaching a saved one for training


def lora_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The LoRA tensors under PEFT's key names for a LlamaModel base (what llm2vec saves)."""
    out = {}
    for name, m in lora_layers(model).items():
        out[f"base_model.model.{name}.lora_A.weight"] = m.lora_A.weight.detach().contiguous()
        out[f"base_model.model.{name}.lora_B.weight"] = m.lora_B.weight.detach().contiguous()
    return out


def save_adapter(model: nn.Module, out_dir: PathLike, base_model_name_or_path: Optional[str] = None) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` in PEFT's format; returns the folder.

    Every LoRA layer of the model must share r, alpha, dropout and use_rslora (as `add_lora` makes them).
    """
    layers = lora_layers(model)
    if not layers:
        raise ConfigError("the model has no LoRA layers to save (call add_lora first)")
    first = next(iter(layers.values()))
    settings = {(m.r, m.alpha, m.lora_dropout.p, m.use_rslora) for m in layers.values()}
    if len(settings) > 1:
        raise ConfigError(f"the LoRA layers differ in (r, alpha, dropout, use_rslora): {sorted(settings)}; "
                          f"save_adapter writes one setting for all")
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
    save_file(lora_state_dict(model), out_dir / "adapter_model.safetensors", metadata={"format": "pt"})
    return out_dir


def load_adapter(model: nn.Module, adapter_dir: PathLike, trainable: bool = True) -> nn.Module:
    """Attach a saved PEFT adapter as LoRA layers (not merged), e.g. to continue training it.

    Each module gets its own r and alpha where `rank_pattern`/`alpha_pattern` say so. Layers that are
    already LoRA layers (a resumed run) get the saved values, if their r matches. Everything else in the
    model is frozen, as `add_lora` leaves it.
    """
    config, weights = read_adapter(adapter_dir)
    decoder = decoder_of(model)
    modules = dict(decoder.named_modules())
    unknown = sorted(set(weights) - set(modules))
    if unknown:
        raise CheckpointError(f"module {unknown[0]!r} of the adapter is not a layer of this model",
                              adapter_dir)
    if not lora_layers(model):  # a fresh attach freezes the base, as add_lora does
        for p in model.parameters():
            p.requires_grad_(False)
    dropout = config["lora_dropout"]
    rslora = bool(config.get("use_rslora", False))
    with torch.no_grad():
        for name, (a, b) in weights.items():
            r, alpha = _rank_and_alpha(config, peft_name(config, name), adapter_dir)
            layer = modules[name]
            if not isinstance(layer, LoRALinear):
                if type(layer) is not nn.Linear or tuple(layer.weight.shape) != (b.shape[0], a.shape[1]):
                    raise CheckpointError(f"module {name!r}: lora_B @ lora_A is ({b.shape[0]}, "
                                          f"{a.shape[1]}), which does not fit {layer}", adapter_dir)
                parent_name, _, child = name.rpartition(".")
                layer = LoRALinear.from_linear(layer, r, alpha, dropout, rslora)
                setattr(decoder.get_submodule(parent_name), child, layer)
            have = (tuple(layer.lora_A.weight.shape), tuple(layer.lora_B.weight.shape))
            if have != (tuple(a.shape), tuple(b.shape)):  # LoRA layers already there, of another r
                raise CheckpointError(f"{name}: the adapter's lora_A/lora_B are {tuple(a.shape)} and "
                                      f"{tuple(b.shape)}, the model's LoRA layer has {have[0]} and "
                                      f"{have[1]} (a different r?)", adapter_dir)
            layer.lora_A.weight.copy_(a)
            layer.lora_B.weight.copy_(b)
            layer.lora_A.weight.requires_grad_(trainable)
            layer.lora_B.weight.requires_grad_(trainable)
    return model
