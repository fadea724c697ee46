"""Before a model is built: does its config fit the tensors the file actually holds?

A config (config.json, or a GGUF file's `llama.*` metadata) is a few numbers; the weights are
gigabytes. Building the model from the numbers first and checking the weights afterwards lets one
bad number do harm before any check runs: `hidden_size` 2^40 asks for a petabyte, `num_hidden_layers`
100,000 loops for minutes. So every weights reader (safetensors, `.bin`, sharded, GGUF) first reads
the name, shape and size of each tensor from the file's headers, without loading any data, and hands
them here with the config. Only when they agree is a model built, and then its size is the file's:

  1. layers:  num_hidden_layers is the number of layers the file holds tensors for (checked first,
              before anything loops over the layers);
  2. names:   exactly the parameters of a Llama with this config (a tied lm_head may be stored too;
              it is then only checked);
  3. shapes:  each tensor's shape is the one the config gives, so no dimension is larger than the
              file's own tensors;
  4. bytes:   together the tensors claim no more bytes than the file holds (no two share them, so
              no tensor is conjured out of another's bytes).

`check_tokenizer` is the same idea for the vocabulary: every id the tokenizer can produce must be a
row of the embedding.

References:
1) the parameter names are Hugging Face's `LlamaForCausalLM` (see `model.py`)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

from ..config import LlamaConfig
from ..errors import CheckpointError
from ..tokenizer import Tokenizer

_LAYER = re.compile(r"model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Stored:
    """One tensor as a weights file describes it, read from its header without loading it."""

    shape: tuple  # in PyTorch order
    nbytes: int  # the bytes it takes in the file
    file: Path  # the file (or shard) that holds it, named in errors


def llama_shapes(config: LlamaConfig) -> Dict[str, tuple]:
    """Every parameter of `LlamaForCausalLM(config)` -> its shape, computed without building it
    (lm_head.weight included, also when it is tied to the embedding). Loops over the layers: call it
    only once the layer count is known to be the file's."""
    c = config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    h, i = c.hidden_size, c.intermediate_size
    per_layer = {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (i, h),
        "mlp.up_proj.weight": (i, h),
        "mlp.down_proj.weight": (h, i),
    }
    shapes = {"model.embed_tokens.weight": (c.vocab_size, h)}
    for layer in range(c.num_hidden_layers):
        shapes.update({f"model.layers.{layer}.{name}": shape for name, shape in per_layer.items()})
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (c.vocab_size, h)
    return shapes


def check_fits(config: LlamaConfig, stored: Dict[str, Stored], data_bytes: int, path,
               source: str = "config.json", file_name: Callable[[str], str] = str) -> None:
    """Raise CheckpointError unless the tensors of a file are exactly the parameters of
    `LlamaForCausalLM(config)`: the checks 1-4 above, in that order.

    stored: {our parameter name: Stored} for every tensor the file holds (a tensor our name table
        does not know is keyed by its own name and is reported as unexpected).
    data_bytes: the bytes the file holds for tensor data (all its shards together).
    path: the weights file (or index) named in errors about the file as a whole.
    source: where the config came from, named in errors ("config.json", "the llama.* metadata").
    file_name: our name -> the file's name for that tensor (GGUF's 'blk.0.attn_q.weight'), for errors.
    """
    layers = {int(m[1]) for name in stored if (m := _LAYER.match(name))}
    if len(layers) != config.num_hidden_layers:
        raise CheckpointError(f"{source} says the model has {config.num_hidden_layers} layers, but the file "
                              f"holds tensors for {len(layers)}", path)
    expected = llama_shapes(config)
    head_shape = expected.pop("lm_head.weight") if config.tie_word_embeddings else None
    claimed = 0
    for name, s in stored.items():
        if name == "lm_head.weight" and head_shape is not None:  # tied: a stored copy is only checked
            want = head_shape
        elif name in expected:
            want = expected[name]
            claimed += s.nbytes
        else:
            raise CheckpointError(f"unexpected tensor {file_name(name)!r} (not a parameter of a Llama "
                                  f"with this config)", s.file)
        if tuple(s.shape) != want:
            raise CheckpointError(f"tensor {file_name(name)!r}: expected shape {want}, found "
                                  f"{tuple(s.shape)} (the shape {source} gives and the file's disagree)",
                                  s.file)
    missing = [name for name in expected if name not in stored]
    if missing:
        shapes = ", ".join(f"{file_name(n)!r} {expected[n]}" for n in missing[:3])
        more = ", ..." if len(missing) > 3 else ""
        raise CheckpointError(f"{len(missing)} tensors missing: {shapes}{more}", path)
    if claimed > data_bytes:
        raise CheckpointError(f"the tensors claim {claimed} bytes, but the file holds {data_bytes} bytes "
                              f"of tensor data: some share their bytes", path)


def check_tokenizer(tokenizer: Tokenizer, config: LlamaConfig, path: Optional[Path] = None) -> None:
    """CheckpointError unless every id the tokenizer can produce is below the model's vocab_size (a
    tokenizer may have fewer ids than the embedding has rows, as padded vocabularies do, never more)."""
    n_ids = tokenizer.n_ids
    if n_ids > config.vocab_size:
        biggest = tokenizer.id_to_token(n_ids - 1)
        raise CheckpointError(f"the tokenizer has ids up to {n_ids - 1} ({biggest!r}), but the model's "
                              f"vocabulary has {config.vocab_size} rows (vocab_size): such ids have no "
                              f"embedding", path)
