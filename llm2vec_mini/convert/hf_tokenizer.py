"""Hugging Face tokenizer folders <-> our `Tokenizer`: tokenizer.json, and the files naming special tokens.

A folder saved by transformers spreads one tokenizer over up to three files:

    tokenizer.json            the whole pipeline (normalizer, pre-tokenizer, BPE model, post-processor),
                              which the `tokenizers` library reads as it is
    tokenizer_config.json     "bos_token", "eos_token", "pad_token", "add_bos_token", ...
    special_tokens_map.json   the same token names again (it wins where both name one, as in transformers)

Whether `encode` puts BOS in front or EOS behind is what tokenizer.json's own post-processor adds
(Llama 2's `TemplateProcessing` "<s> $A" adds BOS; GPT-2/SmolLM2's `ByteLevel` adds nothing), as in
transformers 5, which ignores tokenizer_config.json's `add_bos_token` once a tokenizer.json exists.

One known difference: transformers 5 rebuilds a folder whose `tokenizer_class` is "LlamaTokenizer"
with a `Metaspace` pre-tokenizer instead of the file's normalizer, so a text that starts with a space
loses a "▁" there (" Hello" -> [15043], where SentencePiece, llama.cpp, transformers 4 and we give
[29871, 15043]).

References:
1) https://huggingface.co/docs/tokenizers (the tokenizer.json format)
2) https://huggingface.co/docs/transformers/main_classes/tokenizer (tokenizer_config.json,
   special_tokens_map.json)
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Dict, Optional

import tokenizers

from ..errors import CheckpointError, DataError
from ..tokenizer import Tokenizer, added_by_post_processor, bos_eos_template, check_text, rust_errors
from ..util import PathLike, is_int, read_json


def load_hf_tokenizer(path: PathLike, config: Any = None) -> Tokenizer:
    """A Hugging Face tokenizer folder -> Tokenizer.

    Reads tokenizer.json, and if present tokenizer_config.json and special_tokens_map.json. Ids the
    files do not name come from `config` (a `LlamaConfig`: bos/eos/pad_token_id).
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError("tokenizer folder not found", path)
    file = path / "tokenizer.json"
    if not file.is_file():
        hint = (" (it has a SentencePiece tokenizer.model, which llm2vec-mini does not read: convert it "
                "to tokenizer.json once with transformers, or load the model from GGUF)"
                if (path / "tokenizer.model").exists() else "")
        raise CheckpointError(f"no tokenizer.json{hint}", path)
    with rust_errors("not a valid tokenizer.json", file):  # a serde message, or a panic
        tok = tokenizers.Tokenizer.from_file(str(file))
    _no_padding_or_truncation(tok, file)

    settings: Dict[str, Any] = {}  # field -> (value, the file that says so)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        values = read_json(path / name, default={}, expect=dict)
        settings.update({k: (v, path / name) for k, v in values.items()})

    def token_id(field: str, config_field: str) -> Optional[int]:
        value, where = settings.get(field, (None, None))
        content = _token_content(value, field, where)
        if content is None:
            fallback = getattr(config, config_field, None) if config is not None else None
            return fallback if is_int(fallback) and 0 <= fallback < tok.get_vocab_size() else None
        i = tok.token_to_id(content)
        if i is None:
            raise CheckpointError(f"{field} {content!r} is not in the vocabulary of {file.name}", where)
        return i

    bos_id = token_id("bos_token", "bos_token_id")
    eos_id = token_id("eos_token", "eos_token_id")
    pad_id = token_id("pad_token", "pad_token_id")

    # The BOS/EOS rule is tokenizer.json's post-processor; we warn where tokenizer_config.json disagrees.
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
    return Tokenizer(tok, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, add_bos=add_bos, add_eos=add_eos,
                     path=file)


# Longer than any context a model reads; tokenizers allocates a padded length up front, so a length
# like 2**40 would abort the process (a failed allocation in Rust is no exception).
MAX_PAD_LENGTH = 1 << 20


def _no_padding_or_truncation(tok: tokenizers.Tokenizer, file: Path) -> None:
    """tokenizer.json may ask for padding or truncation on every encode. We pad and cut ourselves
    (the encoder, the collators), as transformers does unless a call asks, so both are switched off;
    settings that would crash `tokenizers` (a stride not below max_length, a padding length it
    cannot allocate) mark a broken file and are refused."""
    truncation, padding = tok.truncation, tok.padding
    if truncation is not None:
        length, stride = truncation.get("max_length"), truncation.get("stride", 0)
        if not (is_int(length) and is_int(stride) and 0 <= stride < length):
            raise CheckpointError(f"truncation: stride ({stride}) must be below max_length ({length})", file)
        tok.no_truncation()
    if padding is not None:
        for key in ("length", "pad_to_multiple_of"):
            value = padding.get(key)
            if value is not None and not (is_int(value) and 0 <= value <= MAX_PAD_LENGTH):
                raise CheckpointError(f"padding: {key} {value} is over {MAX_PAD_LENGTH} tokens", file)
        tok.no_padding()


def save_hf_tokenizer(tokenizer: Tokenizer, path: PathLike, legacy_merges: bool = False) -> Path:
    """Write tokenizer.json and a tokenizer_config.json naming the special tokens and flags, so that
    `load_hf_tokenizer` and transformers' `AutoTokenizer` both read it back the same.

    `legacy_merges` writes BPE merges as "a b" strings, the form older `tokenizers` (and so
    transformers 4.x, which the official llm2vec needs) can read, instead of ["a", "b"] pairs.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = tokenizers.Tokenizer.from_str(tokenizer.tokenizer.to_str())  # a copy, to set its post-processor
    wanted = ([tokenizer.bos_id] * tokenizer.add_bos, [tokenizer.eos_id] * tokenizer.add_eos)
    if added_by_post_processor(tok) != wanted:
        tok.post_processor = bos_eos_template(tok, tokenizer.bos_id, tokenizer.eos_id, tokenizer.add_bos,
                                              tokenizer.add_eos)
    tok.save(str(path / "tokenizer.json"))
    if legacy_merges:
        _write_legacy_merges(path / "tokenizer.json")
    name = tokenizer.id_to_token
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": tokenizer.add_bos,
        "add_eos_token": tokenizer.add_eos,
        "bos_token": None if tokenizer.bos_id is None else name(tokenizer.bos_id),
        "eos_token": None if tokenizer.eos_id is None else name(tokenizer.eos_id),
        "pad_token": None if tokenizer.pad_id is None else name(tokenizer.pad_id),
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],  # a decoder takes no token_type_ids
    }
    with open(path / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    return path


def _write_legacy_merges(file: Path) -> None:
    """Rewrite a tokenizer.json's BPE merges from ["a", "b"] pairs to "a b" strings."""
    data = read_json(file)
    merges = data.get("model", {}).get("merges")
    if merges and isinstance(merges[0], list):
        if any(" " in a or " " in b for a, b in merges):
            raise CheckpointError("a BPE merge contains a space; it cannot be written as 'a b'", file)
        data["model"]["merges"] = [f"{a} {b}" for a, b in merges]
        file.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def _token_content(value: Any, field: str, where: Optional[Path]) -> Optional[str]:
    """A special token as the files write it: "<s>", {"content": "<s>", ...} or null."""
    content = value["content"] if isinstance(value, dict) and isinstance(value.get("content"), str) else value
    if content is None:
        return None
    if isinstance(content, str):
        try:
            check_text(content, field)  # a lone surrogate (JSON may write "\ud800") is no token
        except DataError as e:
            raise CheckpointError(str(e), where) from None
        return content
    raise CheckpointError(f"{field} must be a string or an object with a 'content' string, got {value!r}",
                          where)
