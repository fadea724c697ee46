"""Text <-> token ids: a thin wrapper over Hugging Face's `tokenizers` library, without transformers.

The subword model itself (BPE merges, byte fallback, the pre-tokenizer regex) is `tokenizers`' job.
What this module adds is the part a model checkpoint spreads over several files: which ids are
BOS/EOS/PAD and whether `encode` puts BOS in front or EOS behind. One rule decides that, for every
source, and it matches transformers' `AutoTokenizer`:

    ids = tokenizer.encode(text, add_special_tokens=False)       # the text alone
    ids = [bos_id] * add_bos + ids + [eos_id] * add_eos          # only if add_special_tokens

From a Hugging Face folder, `add_bos`/`add_eos` are what `tokenizer.json`'s own post-processor adds
(Llama 2's `TemplateProcessing` "<s> $A" adds BOS; GPT-2/SmolLM2's `ByteLevel` adds nothing), as in
transformers 5, which ignores `tokenizer_config.json`'s `add_bos_token` once a tokenizer.json exists.
From a GGUF file they are `tokenizer.ggml.add_bos_token`/`add_eos_token`, with llama.cpp's defaults
(see `convert/gguf_tokenizer.py`).

The text pipeline is the file's own. One known difference: transformers 5 rebuilds a folder whose
`tokenizer_class` is "LlamaTokenizer" with a `Metaspace` pre-tokenizer instead of the file's
normalizer, so a text that starts with a space loses a "▁" there (" Hello" -> [15043], where
SentencePiece, llama.cpp, transformers 4 and we give [29871, 15043]).

References:
1) https://huggingface.co/docs/tokenizers (the pipeline: normalizer, pre-tokenizer, model,
   post-processor, decoder; and the tokenizer.json format)
2) https://huggingface.co/docs/transformers/main_classes/tokenizer (tokenizer_config.json,
   special_tokens_map.json)
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import tokenizers
from tokenizers import processors

from .errors import CheckpointError, ConfigError, DataError

PathLike = Union[str, os.PathLike]


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special ids and the BOS/EOS rule of one model.

    Attributes:
        tokenizer: the wrapped `tokenizers.Tokenizer`.
        bos_id, eos_id, pad_id: special token ids, or None where the model has none.
        add_bos, add_eos: whether `encode(..., add_special_tokens=True)` adds BOS in front / EOS behind
            (add_bos defaults to "whenever there is a bos_id", Llama's rule).
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, bos_id: Optional[int] = None,
                 eos_id: Optional[int] = None, pad_id: Optional[int] = None,
                 add_bos: Optional[bool] = None, add_eos: bool = False):
        if not isinstance(tokenizer, tokenizers.Tokenizer):
            raise TypeError(f"expected a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        self.tokenizer = tokenizer
        for name, value in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
            if value is not None and not (isinstance(value, int) and 0 <= value < self.vocab_size):
                raise ConfigError(f"{name} must be None or a token id below {self.vocab_size}, got {value!r}")
        if add_bos is None:  # Llama's rule: a model with a BOS token puts it first
            add_bos = bos_id is not None
        if add_bos and bos_id is None:
            raise ConfigError("add_bos is true, but bos_id is None")
        if add_eos and eos_id is None:
            raise ConfigError("add_eos is true, but eos_id is None")
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.add_bos, self.add_eos = bool(add_bos), bool(add_eos)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (the rows an embedding matrix needs at least)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
                f"pad_id={self.pad_id}, add_bos={self.add_bos}, add_eos={self.add_eos})")

    # ----------------------------------------------------------------------------------------
    # Encoding and decoding

    def _wrap(self, ids: List[int]) -> List[int]:
        return ([self.bos_id] if self.add_bos else []) + ids + ([self.eos_id] if self.add_eos else [])

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        """One text -> its token ids (T,), with BOS/EOS as `add_bos`/`add_eos` say if add_special_tokens."""
        if not isinstance(text, str):
            raise DataError(f"encode expects a str, got {type(text).__name__}")
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return self._wrap(ids) if add_special_tokens else ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> List[List[int]]:
        """B texts -> B lists of ids (ragged; padding is the collator's job). Runs in parallel in Rust."""
        if isinstance(texts, str):
            raise DataError("encode_batch expects a list of str, got one str (use encode)")
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise DataError(f"encode_batch: texts[{i}] is a {type(text).__name__}, not a str")
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        return [self._wrap(e.ids) if add_special_tokens else e.ids for e in encodings]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Token ids (a list, or a 1-D tensor/array) -> text."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not hasattr(t, "__index__") or not 0 <= t < self.vocab_size:
                raise DataError(f"decode: ids[{i}] = {t!r} is not a token id below {self.vocab_size}")
        ids = [int(t) for t in ids]
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.tokenizer.token_to_id(token)

    def id_to_token(self, i: int) -> Optional[str]:
        return self.tokenizer.id_to_token(i)

    # ----------------------------------------------------------------------------------------
    # Files

    @classmethod
    def from_gguf(cls, path_or_gguffile: Any) -> "Tokenizer":
        """The tokenizer of a GGUF file: a path, or a reader result with `.metadata` and `.path`."""
        from .convert.gguf_tokenizer import tokenizer_from_gguf
        if hasattr(path_or_gguffile, "metadata"):
            gguf = path_or_gguffile
        else:
            from .convert.gguf import read_gguf
            gguf = read_gguf(path_or_gguffile)
        tok, specials = tokenizer_from_gguf(gguf.metadata, path=getattr(gguf, "path", None))
        return cls(tok, **specials)

    @classmethod
    def from_dir(cls, path: PathLike, config: Any = None) -> "Tokenizer":
        """A Hugging Face tokenizer folder: tokenizer.json, and if present tokenizer_config.json and
        special_tokens_map.json (the latter wins where both name a token, as in transformers). Ids
        the files do not name come from `config` (a `LlamaConfig`: bos/eos/pad_token_id)."""
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError("tokenizer folder not found", path)
        file = path / "tokenizer.json"
        if not file.is_file():
            hint = (" (it has a SentencePiece tokenizer.model, which llm2vec-mini does not read: convert it "
                    "to tokenizer.json once with transformers, or load the model from GGUF)"
                    if (path / "tokenizer.model").exists() else "")
            raise CheckpointError(f"no tokenizer.json{hint}", path)
        try:
            tok = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises plain Exceptions with a serde message
            raise CheckpointError(f"not a valid tokenizer.json ({e})", file) from None

        settings: Dict[str, Any] = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            settings.update({k: (v, path / name) for k, v in _read_json(path / name).items()})

        def token_id(field: str, config_field: str) -> Optional[int]:
            value, where = settings.get(field, (None, None))
            content = _token_content(value, field, where)
            if content is None:
                fallback = getattr(config, config_field, None) if config is not None else None
                return fallback if isinstance(fallback, int) and 0 <= fallback < tok.get_vocab_size() else None
            i = tok.token_to_id(content)
            if i is None:
                raise CheckpointError(f"{field} {content!r} is not in the vocabulary of {file.name}", where)
            return i

        bos_id = token_id("bos_token", "bos_token_id")
        eos_id = token_id("eos_token", "eos_token_id")
        pad_id = token_id("pad_token", "pad_token_id")

        # The BOS/EOS rule is tokenizer.json's post-processor, as in transformers 5, which ignores
        # tokenizer_config's add_bos_token/add_eos_token once a tokenizer.json exists. We warn where
        # they disagree.
        prefix, suffix = added_by_post_processor(tok, file)
        if bos_id is None and len(prefix) == 1:
            bos_id = prefix[0]
        if eos_id is None and len(suffix) == 1:
            eos_id = suffix[0]
        for added, special, name in ((prefix, bos_id, "bos"), (suffix, eos_id, "eos")):
            if added and added != [special]:
                raise CheckpointError(f"the post-processor adds the ids {added} where only the {name}_token "
                                      f"({special}) is supported", file)
        add_bos, add_eos = bool(prefix), bool(suffix)
        for flag, value in (("add_bos_token", add_bos), ("add_eos_token", add_eos)):
            said, where = settings.get(flag, (None, None))
            if said is not None and not isinstance(said, bool):
                raise CheckpointError(f"{flag} must be true or false, got {said!r}", where)
            if said is not None and said != value:
                warnings.warn(f"{where}: {flag} is {said}, but the post-processor of tokenizer.json "
                              f"{'adds' if value else 'does not add'} that token; following tokenizer.json, "
                              f"as transformers does", stacklevel=2)
        return cls(tok, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, add_bos=add_bos, add_eos=add_eos)

    def save(self, path: PathLike) -> Path:
        """Write tokenizer.json and a tokenizer_config.json naming the special tokens and flags, so
        that `Tokenizer.from_dir` and transformers' `AutoTokenizer` both read it back the same."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tok = tokenizers.Tokenizer.from_str(self.tokenizer.to_str())  # a copy, to set its post-processor
        if added_by_post_processor(tok) != ([self.bos_id] * self.add_bos, [self.eos_id] * self.add_eos):
            tok.post_processor = bos_eos_template(tok, self.bos_id, self.eos_id, self.add_bos, self.add_eos)
        tok.save(str(path / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos,
            "add_eos_token": self.add_eos,
            "bos_token": None if self.bos_id is None else self.id_to_token(self.bos_id),
            "eos_token": None if self.eos_id is None else self.id_to_token(self.eos_id),
            "pad_token": None if self.pad_id is None else self.id_to_token(self.pad_id),
            "clean_up_tokenization_spaces": False,
            "model_input_names": ["input_ids", "attention_mask"],  # a decoder takes no token_type_ids
        }
        with open(path / "tokenizer_config.json", "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
        return path


# --------------------------------------------------------------------------------------------
# Helpers, shared with convert/gguf_tokenizer.py


def added_by_post_processor(tok: tokenizers.Tokenizer, where: Optional[PathLike] = None
                            ) -> Tuple[List[int], List[int]]:
    """The ids a tokenizer's post-processor puts before and after a text: ([1], []) for "<s> $A"."""
    try:
        plain = tok.encode("a", add_special_tokens=False).ids
        full = tok.encode("a", add_special_tokens=True).ids
    except Exception as e:  # e.g. a WordLevel vocabulary without "a" and without an unknown token
        raise CheckpointError(f"the tokenizer cannot encode the probe text 'a' ({e})", where) from None
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    return full, []  # the post-processor rewrote the text itself; report all of it as added


def bos_eos_template(tok: tokenizers.Tokenizer, bos_id: Optional[int] = None, eos_id: Optional[int] = None,
                     add_bos: bool = False, add_eos: bool = False) -> Optional[processors.TemplateProcessing]:
    """A post-processor writing `<bos> $A <eos>` as asked (None when it adds nothing), so that the bare
    `tokenizers.Tokenizer`, or its saved tokenizer.json, adds the same special tokens as `Tokenizer`."""
    if not (add_bos or add_eos):
        return None
    bos = tok.id_to_token(bos_id) if add_bos else None
    eos = tok.id_to_token(eos_id) if add_eos else None

    def sequence(name: str, type_id: int) -> List[str]:  # e.g. ["<s>:0", "$A:0"]
        return ([f"{bos}:{type_id}"] if bos else []) + [f"${name}:{type_id}"] + ([f"{eos}:{type_id}"] if eos else [])

    specials = {t: i for t, i in ((bos, bos_id), (eos, eos_id)) if t is not None}
    return processors.TemplateProcessing(single=sequence("A", 0), pair=sequence("A", 0) + sequence("B", 1),
                                         special_tokens=list(specials.items()))


def _read_json(file: Path) -> Dict[str, Any]:
    """An optional JSON object file: {} when absent, CheckpointError when unreadable or not an object."""
    if not file.exists():
        return {}
    try:
        with open(file, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read JSON ({e})", file) from None
    if not isinstance(value, dict):
        raise CheckpointError(f"expected a JSON object, got {type(value).__name__}", file)
    return value


def _token_content(value: Any, field: str, where: Optional[Path]) -> Optional[str]:
    """A special token as the files write it: "<s>", {"content": "<s>", ...} or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise CheckpointError(f"{field} must be a string or an object with a 'content' string, got {value!r}", where)
