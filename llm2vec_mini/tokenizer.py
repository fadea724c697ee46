"""Text <-> token ids: a thin wrapper over Hugging Face's `tokenizers` library, without transformers.

The subword model itself (BPE merges, byte fallback, the pre-tokenizer regex) is `tokenizers`' job.
What this module adds is the part a model checkpoint spreads over several files: which ids are
BOS/EOS/PAD and whether `encode` puts BOS in front or EOS behind. One rule decides that, for every
source, and it matches transformers' `AutoTokenizer`:

    ids = tokenizer.encode(text, add_special_tokens=False)       # the text alone
    ids = [bos_id] * add_bos + ids + [eos_id] * add_eos          # only if add_special_tokens

This module knows no file format. The readers fill in the special ids and the rule:
`convert/hf_tokenizer.py` from a Hugging Face folder (what `tokenizer.json`'s own post-processor adds,
as in transformers 5) and `convert/gguf_tokenizer.py` from GGUF metadata (`tokenizer.ggml.*`, with
llama.cpp's defaults).

References:
1) https://huggingface.co/docs/tokenizers (the pipeline: normalizer, pre-tokenizer, model,
   post-processor, decoder)
2) https://huggingface.co/docs/transformers/main_classes/tokenizer (special tokens)
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, List, Optional, Sequence, Tuple

import tokenizers
from tokenizers import processors

from .errors import CheckpointError, ConfigError, DataError, Llm2VecMiniError
from .util import PathLike, is_int


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special ids and the BOS/EOS rule of one model.

    Attributes:
        tokenizer: the wrapped `tokenizers.Tokenizer`.
        bos_id, eos_id, pad_id: special token ids, or None where the model has none.
        add_bos, add_eos: whether `encode(..., add_special_tokens=True)` adds BOS in front / EOS behind
            (add_bos defaults to "whenever there is a bos_id", Llama's rule).
        path: the file the tokenizer was read from (None if built in memory), named in errors.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, bos_id: Optional[int] = None,
                 eos_id: Optional[int] = None, pad_id: Optional[int] = None,
                 add_bos: Optional[bool] = None, add_eos: bool = False, path: Optional[PathLike] = None):
        if not isinstance(tokenizer, tokenizers.Tokenizer):
            raise TypeError(f"expected a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        self.tokenizer = tokenizer
        self.path = None if path is None else str(path)
        self._n_ids = (None, 0)  # (vocab_size, n_ids) when n_ids was last computed
        for name, value in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
            if value is not None and not (is_int(value) and 0 <= value < self.vocab_size):
                raise ConfigError(f"{name} must be None or a token id below {self.vocab_size}, got {value!r}",
                                  self.path)
        for name, value in (("add_bos", add_bos), ("add_eos", add_eos)):
            if value is not None and not isinstance(value, bool):
                raise ConfigError(f"{name} must be True or False, got {value!r}", self.path)
        if add_bos is None:  # Llama's rule: a model with a BOS token puts it first
            add_bos = bos_id is not None
        if add_bos and bos_id is None:
            raise ConfigError("add_bos is true, but bos_id is None", self.path)
        if add_eos and eos_id is None:
            raise ConfigError("add_eos is true, but eos_id is None", self.path)
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.add_bos, self.add_eos = bool(add_bos), bool(add_eos)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (the rows an embedding matrix needs at least)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def n_ids(self) -> int:
        """The largest id the tokenizer can produce, plus one: the rows an embedding really needs (a
        vocabulary may skip ids, so this can exceed `vocab_size`). Remembered while the size stays."""
        size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        if self._n_ids[0] != size:
            ids = self.tokenizer.get_vocab(with_added_tokens=True).values()  # ~40 ms for 50k tokens
            self._n_ids = (size, max(ids, default=-1) + 1)
        return self._n_ids[1]

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
                f"pad_id={self.pad_id}, add_bos={self.add_bos}, add_eos={self.add_eos})")

    # ----------------------------------------------------------------------------------------
    # Encoding and decoding

    def _wrap(self, ids: List[int]) -> List[int]:
        return ([self.bos_id] if self.add_bos else []) + ids + ([self.eos_id] if self.add_eos else [])

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        """One text -> its token ids (T,), with BOS/EOS as `add_bos`/`add_eos` say if add_special_tokens."""
        check_text(text, "encode: the text")
        with rust_errors("the tokenizer cannot encode this text", self.path):
            ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return self._wrap(ids) if add_special_tokens else ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> List[List[int]]:
        """B texts -> B lists of ids (ragged; padding is the collator's job). Runs in parallel in Rust."""
        if isinstance(texts, str):
            raise DataError("encode_batch expects a list of str, got one str (use encode)")
        texts = list(texts)
        for i, text in enumerate(texts):
            check_text(text, f"encode_batch: texts[{i}]")
        with rust_errors("the tokenizer cannot encode these texts", self.path):
            encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        return [self._wrap(e.ids) if add_special_tokens else e.ids for e in encodings]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Token ids (a list, or a 1-D tensor/array) -> text."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        for i, t in enumerate(ids):
            if not is_int(t) or not 0 <= t < self.vocab_size:
                raise DataError(f"decode: ids[{i}] = {t!r} is not a token id below {self.vocab_size}")
        ids = [int(t) for t in ids]
        with rust_errors("the tokenizer cannot decode these ids", self.path):
            return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.tokenizer.token_to_id(token)

    def id_to_token(self, i: int) -> Optional[str]:
        return self.tokenizer.id_to_token(i)


# --------------------------------------------------------------------------------------------
# Helpers, shared with convert/gguf_tokenizer.py and convert/hf_tokenizer.py


def check_text(text, what: str) -> None:
    """DataError naming `what` unless `text` is a str that UTF-8 can encode (Python strings may hold
    lone surrogates, "\\ud800", which no UTF-8 text has and `tokenizers` cannot take)."""
    if not isinstance(text, str):
        raise DataError(f"{what} must be a str, got {type(text).__name__}")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise DataError(f"{what} is not valid Unicode: {e.reason} at character {e.start} "
                            f"({text[e.start]!r})") from None


@contextmanager
def rust_errors(message: str, path: Optional[PathLike] = None):
    """Errors of the `tokenizers` library inside the block, its panics too, become CheckpointError
    naming the tokenizer's file and saying `message`: they come from what the file says (a template
    naming an unknown token, a broken regex). A Rust panic reaches Python as pyo3's `PanicException`,
    which derives from BaseException, not Exception, so a plain `except Exception` lets it through."""
    try:
        yield
    except Llm2VecMiniError:
        raise
    except Exception as e:
        raise CheckpointError(f"{message} ({type(e).__name__}: {e})", path) from None
    except BaseException as e:
        if type(e).__name__ != "PanicException":
            raise  # KeyboardInterrupt, SystemExit, ...
        raise CheckpointError(f"{message} (the tokenizers library panicked: {e})", path) from None


def added_by_post_processor(tok: tokenizers.Tokenizer, where: Optional[PathLike] = None
                            ) -> Tuple[List[int], List[int]]:
    """The ids a tokenizer's post-processor puts before and after a text: ([1], []) for "<s> $A"."""
    # fails e.g. for a WordLevel vocabulary without "a" and without an unknown token, or a template
    # naming a token the vocabulary lacks
    with rust_errors("the tokenizer cannot encode the probe text 'a'", where):
        plain = tok.encode("a", add_special_tokens=False).ids
        full = tok.encode("a", add_special_tokens=True).ids
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
        before = [f"{bos}:{type_id}"] if bos else []
        after = [f"{eos}:{type_id}"] if eos else []
        return before + [f"${name}:{type_id}"] + after

    specials = {t: i for t, i in ((bos, bos_id), (eos, eos_id)) if t is not None}
    return processors.TemplateProcessing(single=sequence("A", 0), pair=sequence("A", 0) + sequence("B", 1),
                                         special_tokens=list(specials.items()))
