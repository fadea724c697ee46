"""The Llama configuration: every number that shapes the decoder, in one typed dataclass.

`LlamaConfig.from_hf_config` reads a Hugging Face `config.json` in both layouts seen in the wild
(the classic one with top-level `rope_theta`/`rope_scaling`, and the `rope_parameters` block that
transformers 5 writes). Named presets give the tiny test model and the two real models of the project.

References:
1) Touvron et al., "Llama 2", 2023, https://arxiv.org/abs/2307.09288 (the architecture)
2) BehnamGhader et al., "LLM2Vec", 2024, https://arxiv.org/abs/2404.05961 (the `causal` switch, Sec. 2.1)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from .errors import ConfigError
from .util import is_int, is_number

# Rope scalings we implement: none at all, linear position interpolation, and Llama-3's.
# No dimension of a real Llama comes near 2^31 (torch indexes with 32 bits in places); a number above
# it in a config file is garbage, refused before anything is sized by it.
MAX_SIZE = 2**31 - 1

_ROPE_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


@dataclass
class LlamaConfig:
    vocab_size: int = 32000  # number of token ids (rows of the embedding and of lm_head)
    hidden_size: int = 4096  # width of the residual stream, d_model
    intermediate_size: int = 11008  # width of the SwiGLU MLP's hidden layer
    num_hidden_layers: int = 32  # number of decoder layers
    num_attention_heads: int = 32  # query heads per layer
    num_key_value_heads: Optional[int] = None  # key/value heads (GQA); None means one per query head
    head_dim: Optional[int] = None  # width of one head; None means hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6  # epsilon inside RMSNorm's square root
    rope_theta: float = 10000.0  # base of the rotary frequencies
    rope_scaling: Optional[dict] = None  # None, {"rope_type": "linear", "factor"}, or Llama 3's (llama3)
    max_position_embeddings: int = 2048  # longest context the model was trained for
    tie_word_embeddings: bool = False  # lm_head shares its weight with embed_tokens
    attention_dropout: float = 0.0  # dropout on attention probabilities, training mode only (SimCSE uses 0.3)
    initializer_range: float = 0.02  # std of the normal init of fresh (untrained) weights
    causal: bool = True  # True: a token sees only the past (a decoder); False: every token (LLM2Vec step 1)
    bos_token_id: Optional[int] = 1  # beginning-of-sequence id
    eos_token_id: Optional[int] = 2  # end-of-sequence id (LLM2Vec also pads with it)
    pad_token_id: Optional[int] = None  # padding id, if the checkpoint names one

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.rope_scaling is not None:
            self.rope_scaling = _normalise_rope_scaling(self.rope_scaling)
        self.validate()
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        """Raise `ConfigError`, naming the field, if the numbers cannot make a Llama."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not is_int(value) or not 0 < value <= MAX_SIZE:
                raise ConfigError(f"{name} must be a positive integer below 2**31, got {value!r}")
        head_dim = self.head_dim
        if head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(f"hidden_size ({self.hidden_size}) is not divisible by "
                                  f"num_attention_heads ({self.num_attention_heads})")
            head_dim = self.hidden_size // self.num_attention_heads
        if not is_int(head_dim) or not 0 < head_dim <= MAX_SIZE or head_dim % 2:
            raise ConfigError(f"head_dim must be a positive even integer (rotary embeddings rotate "
                              f"pairs), got {head_dim!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads ({self.num_attention_heads}) is not divisible by "
                              f"num_key_value_heads ({self.num_key_value_heads})")
        if not (is_number(self.rope_theta) and self.rope_theta > 0):
            raise ConfigError(f"rope_theta must be positive, got {self.rope_theta!r}")
        if not (is_number(self.rms_norm_eps) and self.rms_norm_eps > 0):
            raise ConfigError(f"rms_norm_eps must be positive, got {self.rms_norm_eps!r}")
        if not (is_number(self.attention_dropout) and 0.0 <= self.attention_dropout < 1.0):
            raise ConfigError(f"attention_dropout must be in [0, 1), got {self.attention_dropout!r}")
        for name in ("causal", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not (is_int(value) and 0 <= value < self.vocab_size):
                raise ConfigError(f"{name} must be None or a token id below vocab_size "
                                  f"({self.vocab_size}), got {value!r}")

    # ----------------------------------------------------------------------------------------
    # Hugging Face config.json

    @classmethod
    def from_hf_config(cls, hf: dict) -> "LlamaConfig":
        """Build a config from a Hugging Face `config.json` dict (classic or transformers-5 layout)."""
        if not isinstance(hf, dict):
            raise ConfigError(f"a Hugging Face config must be a JSON object, got {type(hf).__name__}")
        model_type = hf.get("model_type", "llama")
        if model_type != "llama":
            raise ConfigError(f"model_type: only 'llama' is supported, got {model_type!r}")
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act: only 'silu' is supported, got {hf['hidden_act']!r}")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise ConfigError(f"{flag}: biases in the projections are not supported")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads"):
            if name not in hf:
                raise ConfigError(f"{name} is missing from the config")

        # Rope: transformers 5 nests theta and scaling in `rope_parameters`; older files keep them
        # at the top level, and Sheared-LLaMA's omits rope_theta altogether (10000).
        rope = hf.get("rope_parameters")
        if rope is not None:
            if not isinstance(rope, dict):
                raise ConfigError(f"rope_parameters must be an object, got {rope!r}")
            theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
            scaling = None if rope.get("rope_type", "default") == "default" else dict(rope)
            if scaling is not None:
                scaling.pop("rope_theta", None)
        else:
            theta = hf.get("rope_theta", 10000.0)
            scaling = hf.get("rope_scaling")

        def number(name, value):  # a float field, or ConfigError naming it
            if not is_number(value):
                raise ConfigError(f"{name} must be a number, got {value!r}")
            return float(value)

        def flag(name, value):
            if not isinstance(value, bool):
                raise ConfigError(f"{name} must be true or false, got {value!r}")
            return value

        def token_id(name):
            value = hf.get(name)
            if isinstance(value, list):  # Llama-3 lists several eos ids; the first is the main one
                value = value[0] if value else None
            if is_int(value) and value < 0:  # some files say -1 for "none"
                value = None
            return value

        fields = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            num_key_value_heads=hf.get("num_key_value_heads"),
            head_dim=hf.get("head_dim"),
            rms_norm_eps=number("rms_norm_eps", hf.get("rms_norm_eps", 1e-6)),
            rope_theta=number("rope_theta", theta),
            rope_scaling=scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=flag("tie_word_embeddings", hf.get("tie_word_embeddings", False)),
            attention_dropout=number("attention_dropout", hf.get("attention_dropout", 0.0)),
            initializer_range=number("initializer_range", hf.get("initializer_range", 0.02)),
            bos_token_id=token_id("bos_token_id"),
            eos_token_id=token_id("eos_token_id"),
            pad_token_id=token_id("pad_token_id"),
        )
        return cls(**fields)

    def to_hf_config(self) -> dict:
        """The classic `config.json` layout, readable by transformers 4.x and 5.x alike."""
        out = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling is None else dict(self.rope_scaling),
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_dropout": self.attention_dropout,
            "attention_bias": False,
            "mlp_bias": False,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
        }
        return out

    def replace(self, **changes: Any) -> "LlamaConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------------------------------
    # Presets

    @classmethod
    def tiny(cls, **overrides: Any) -> "LlamaConfig":
        """A two-layer GQA model with a 256-token vocabulary: for tests and notebooks on a CPU."""
        fields = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                      max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def smollm2_135m(cls, **overrides: Any) -> "LlamaConfig":
        """HuggingFaceTB/SmolLM2-135M(-Instruct): 30 layers, GQA 9/3, tied embeddings."""
        fields = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
                      rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def sheared_llama_1_3b(cls, **overrides: Any) -> "LlamaConfig":
        """princeton-nlp/Sheared-LLaMA-1.3B: 24 layers of width 2048, Llama-2 vocabulary, untied."""
        fields = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5504, num_hidden_layers=24,
                      num_attention_heads=16, num_key_value_heads=16, rms_norm_eps=1e-5,
                      rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
        fields.update(overrides)
        return cls(**fields)


def _normalise_rope_scaling(scaling: Any) -> Optional[dict]:
    """Check a rope-scaling dict and return it with `rope_type` set (None for no scaling)."""
    if not isinstance(scaling, dict):
        raise ConfigError(f"rope_scaling must be None or an object, got {scaling!r}")
    scaling = dict(scaling)
    rope_type = scaling.get("rope_type", scaling.get("type"))  # old files call it "type"
    scaling.pop("type", None)
    if rope_type in (None, "default"):
        return None
    if rope_type not in _ROPE_KEYS:
        raise ConfigError(f"rope_scaling.rope_type {rope_type!r} is not supported "
                          f"(supported: default, {', '.join(_ROPE_KEYS)})")
    scaling["rope_type"] = rope_type
    for key in _ROPE_KEYS[rope_type]:
        value = scaling.get(key)
        if not is_number(value) or value <= 0:
            raise ConfigError(f"rope_scaling.{key} must be a positive number, got {value!r}")
    if rope_type == "llama3" and not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise ConfigError("rope_scaling.high_freq_factor must be greater than low_freq_factor")
    return scaling
