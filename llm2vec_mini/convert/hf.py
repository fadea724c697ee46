"""Hugging Face model directories -> our `LlamaForCausalLM` (and its tokenizer), without transformers.

A directory saved by `save_pretrained` holds `config.json` and the weights in one of four layouts:

    model.safetensors                     one safetensors file
    model.safetensors.index.json          {"weight_map": {tensor name: shard file}} + the shards
    pytorch_model.bin                     one torch.save'd state dict (a zip of pickles)
    pytorch_model.bin.index.json          the same, sharded

Our parameter names are Hugging Face's (`model.layers.{i}.self_attn.q_proj.weight`, ...), so loading is
one loop with no renaming table. The model is built on the meta device (shapes only, no memory, no
random init) and each checkpoint tensor becomes its parameter in turn, cast alone: a same-dtype tensor
is used as is, still a view of the memory-mapped file, so a 5 GB checkpoint costs about 5 GB and no
copy. Every name and shape is checked against the config; errors name the file, the tensor, the
expected and the found shape.

References:
1) transformers' checkpoint layout: https://huggingface.co/docs/transformers/main_classes/model
2) PyTorch, "meta device", https://pytorch.org/docs/stable/meta.html
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from ..config import LlamaConfig
from ..errors import CheckpointError, ConfigError
from ..model import LlamaForCausalLM, rope_inv_freq
from ..util import PathLike, decoder_of, is_dir, is_file, read_json, torch_device
from .checks import Stored, check_fits, check_tokenizer
from .gguf import load_gguf
from .hf_tokenizer import load_hf_tokenizer, save_hf_tokenizer
from .peft import merge_adapter
from .safetensors import SafetensorsFile, save_file
from .torch_bin import load_torch_bin

# In the order transformers looks for them.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model.bin.index.json")

# Tensors some checkpoints carry that are not weights: older transformers saved RoPE's frequencies
# (we recompute them from the config).
HARMLESS_EXTRA = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def load_pretrained(path: PathLike, adapters: Iterable[PathLike] = (), dtype: torch.dtype = torch.float32,
                    device: Union[str, torch.device] = "cpu"):
    """A Hugging Face model directory or a `.gguf` file -> (LlamaForCausalLM in eval mode, Tokenizer).

    adapters: PEFT LoRA adapter directories, merged into the weights in the given order (LLM2Vec's
    MNTP adapter, then its SimCSE adapter on top).
    """
    if isinstance(adapters, (str, os.PathLike)):
        adapters = [adapters]
    elif isinstance(adapters, Iterable) and not isinstance(adapters, (bytes, dict, set)):
        adapters = list(adapters)
    if not (isinstance(adapters, list) and all(isinstance(a, (str, os.PathLike)) for a in adapters)):
        raise ConfigError(f"adapters must be a folder or a list of folders, got {adapters!r:.80}")
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"path must be a model folder or a .gguf file, got {path!r:.80}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ConfigError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    device = torch_device(device)
    path = Path(path)
    seen = []
    while is_adapter_folder(path):
        # an adapter folder given as the model (the Hub's LLM2Vec-*-mntp layout, which the official
        # library loads this way): its base model, with this adapter merged first
        if path.resolve() in seen:
            chain = " -> ".join(str(p) for p in seen + [path.resolve()])
            raise CheckpointError(f"adapter folders name each other as their base model: {chain}", path)
        seen.append(path.resolve())
        adapters.insert(0, path)
        path = adapter_base(path)
    if is_file(path) and path.suffix == ".gguf":
        model, tokenizer = load_gguf(path, dtype=dtype)
        model.to(device)
    elif is_dir(path):
        config = read_config(path)
        tokenizer = load_hf_tokenizer(path, config)  # before the weights: a bad tokenizer fails fast
        check_tokenizer(tokenizer, config, path / "tokenizer.json")
        model = load_hf_model(path, config, dtype=dtype, device=device)
    else:
        raise CheckpointError("neither a Hugging Face model directory nor a .gguf file", path)
    for adapter in adapters:
        merge_adapter(model, adapter)
    return model, tokenizer


def is_adapter_folder(path: Path) -> bool:
    """A folder with adapter_config.json and no model weights: an adapter, standing in for its base."""
    return is_dir(path) and is_file(path / "adapter_config.json") and \
        not any(is_file(path / f) for f in WEIGHT_FILES)


def adapter_base(adapter_dir: Path) -> Path:
    """The local base model an adapter folder names in adapter_config.json (base_model_name_or_path)."""
    config = read_json(adapter_dir / "adapter_config.json")
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    is_model = isinstance(base, str) and (is_dir(base) or (is_file(base) and base.endswith(".gguf")))
    if not is_model:
        raise CheckpointError(f"this adapter folder names its base model as {base!r:.200}, which is not a "
                              f"local path to a model folder or .gguf file; pass the base model as the "
                              f"path and this folder as the first adapter", adapter_dir)
    return Path(base)


def read_config(model_dir: PathLike) -> LlamaConfig:
    """`config.json` of a model directory -> LlamaConfig (CheckpointError if absent or not JSON)."""
    path = Path(model_dir) / "config.json"
    hf = read_json(path)
    try:
        return LlamaConfig.from_hf_config(hf)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


def load_hf_model(model_dir: PathLike, config: Optional[LlamaConfig] = None,
                  dtype: torch.dtype = torch.float32,
                  device: Union[str, torch.device] = "cpu") -> LlamaForCausalLM:
    """The weights of a Hugging Face directory in our LlamaForCausalLM (eval mode), tensor by tensor.

    Every shard's header is read first and checked against the config (`checks.check_fits`: layer
    count, names, shapes, bytes); only then is the model built, on the meta device, and each tensor
    made its parameter.
    """
    model_dir = Path(model_dir)
    config = read_config(model_dir) if config is None else config
    device = torch_device(device)
    weights, listing = find_weights(model_dir)

    shards = {shard: _Shard(shard) for shard in listing}  # headers (or mapped pickles) only
    stored: Dict[str, Stored] = {}
    for shard, tensors in shards.items():
        for name, (shape, nbytes, floating) in tensors.describe().items():
            if HARMLESS_EXTRA.fullmatch(name):
                continue  # not a weight we keep
            if name in stored:
                raise CheckpointError(f"tensor {name!r} is stored twice (also in {stored[name].file.name})",
                                      shard)
            if not floating:
                raise CheckpointError(f"tensor {name!r}: expected floating-point weights, found "
                                      f"{tensors.dtype(name)}", shard)
            stored[name] = Stored(shape, nbytes, shard)
        absent = sorted(set(listing[shard]) - set(tensors.describe()))
        if absent:
            raise CheckpointError(f"the index lists {len(absent)} tensors in {shard.name} that it "
                                  f"does not hold, e.g. {absent[0]!r}", weights)
    check_fits(config, stored, sum(t.data_bytes for t in shards.values()), weights)

    with torch.device("meta"):
        model = LlamaForCausalLM(config)  # shapes only: no memory, no random init
    tied = config.tie_word_embeddings
    for tensors in shards.values():
        for name in tensors.describe():
            if name in stored and not (tied and name == "lm_head.weight"):
                _set_parameter(model, name, tensors.pop(name).to(device=device, dtype=dtype))  # one at a time
    if tied:  # one Parameter under two names, as LlamaForCausalLM.__init__ ties them
        model.lm_head.weight = model.model.embed_tokens.weight
    # RoPE's frequencies are a buffer computed in __init__: on meta they are empty, so recompute.
    model.model.register_buffer("inv_freq", rope_inv_freq(config).to(device), persistent=False)
    return model.eval()


def find_weights(model_dir: Path) -> Tuple[Path, Dict[Path, List[str]]]:
    """The weights file (or index) of a directory and its shards -> names the index puts in each."""
    for filename in WEIGHT_FILES:
        path = model_dir / filename
        if path.is_file():
            break
    else:
        raise CheckpointError(f"no weights found (looked for {', '.join(WEIGHT_FILES)})", model_dir)
    if not filename.endswith(".index.json"):
        return path, {path: []}

    index = read_json(path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError("an index needs a non-empty object 'weight_map': {tensor: shard file}",
                              path)
    shards: Dict[Path, List[str]] = {}
    for name, shard_name in weight_map.items():
        # A shard is a plain file name beside the index: never a path that leaves the directory.
        if not isinstance(shard_name, str) or shard_name in ("", ".", "..") or \
                Path(shard_name).name != shard_name or "\\" in shard_name:
            raise CheckpointError(f"tensor {name!r}: invalid shard file name {shard_name!r}", path)
        shard = model_dir / shard_name
        if not is_file(shard):
            raise CheckpointError(f"tensor {name!r}: shard {shard_name!r} does not exist", path)
        shards.setdefault(shard, []).append(name)
    return path, shards


class _Shard:
    """One weights file, opened: its tensors' shapes and sizes without their data, then the tensors."""

    def __init__(self, path: Path):
        if path.name.endswith(".safetensors"):
            self._st, self._state = SafetensorsFile(path), None  # the header, checked; data mapped
            self.data_bytes = self._st.data_bytes
        else:
            self._st, self._state = None, load_torch_bin(path)  # memory-mapped when the file allows
            storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                        for t in self._state.values()}
            self.data_bytes = sum(storages.values())  # each storage once, however many views it has
        self._info = None

    def describe(self) -> Dict[str, Tuple[tuple, int, bool]]:
        """{name: (shape, bytes in the file, floating point?)}, in the file's order."""
        if self._info is None:
            if self._st is not None:
                f = self._st
                self._info = {n: (f.shape(n), f.nbytes(n), f.dtype(n).is_floating_point) for n in f.keys()}
            else:  # a view claims its own numel's bytes, however few its storage holds
                self._info = {n: (tuple(t.shape), t.numel() * t.element_size(), t.is_floating_point())
                              for n, t in self._state.items()}
        return self._info

    def dtype(self, name: str) -> torch.dtype:
        return self._st.dtype(name) if self._st is not None else self._state[name].dtype

    def pop(self, name: str) -> torch.Tensor:
        """The tensor `name`; our reference to it is dropped (a pickle's tensors are freed as we go)."""
        return self._st.get_tensor(name) if self._st is not None else self._state.pop(name)


def _set_parameter(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Make `tensor` the parameter `name` (replacing the meta placeholder; no copy)."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[leaf] = nn.Parameter(tensor, requires_grad=module._parameters[leaf].requires_grad)


def save_hf_dir(model: nn.Module, tokenizer, out_dir: PathLike, legacy_merges: bool = True) -> Path:
    """Write a Hugging Face directory: config.json, model.safetensors, tokenizer files.

    `model` is a LlamaForCausalLM or a bare LlamaModel (saved under `model.` names, with a tied
    lm_head, so transformers loads it as a LlamaForCausalLM). `legacy_merges` writes BPE merges as
    "a b" strings, the form older `tokenizers` (and so transformers 4.x) can read.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    decoder = decoder_of(model)
    config = decoder.config
    state = {f"model.{k}": v for k, v in decoder.state_dict().items()}
    lm_head = getattr(model, "lm_head", None)
    if lm_head is None or lm_head.weight is decoder.embed_tokens.weight:
        config = config.replace(tie_word_embeddings=True)  # transformers re-ties on load
    else:
        state["lm_head.weight"] = lm_head.weight
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    dtype = str(next(iter(state.values())).dtype).replace("torch.", "")
    return save_hf_metadata(config, tokenizer, out, legacy_merges, dtype)


def save_hf_metadata(config: LlamaConfig, tokenizer, out_dir: PathLike, legacy_merges: bool = True,
                     dtype: str = "float32") -> Path:
    """The config.json and tokenizer files of a Hugging Face directory, without weights.

    `save_hf_dir` writes them beside the weights; an MNTP adapter folder carries them too, as the
    McGill-NLP `LLM2Vec-*-mntp` repositories do, so that the official library loads it as a model.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_config = config.replace(causal=True).to_hf_config()
    hf_config["torch_dtype"] = dtype
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    save_hf_tokenizer(tokenizer, out, legacy_merges=legacy_merges)
    return out
