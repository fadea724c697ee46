"""A `tokenizers.Tokenizer` rebuilt from the vocabulary a GGUF file carries.

A GGUF file has no `tokenizer.json`. llama.cpp stores the tokenizer as metadata instead:

    tokenizer.ggml.model        "llama" (SentencePiece BPE) or "gpt2" (byte-level BPE)
    tokenizer.ggml.pre          which regex splits the text before BPE ("gpt-2", "smollm", ...)
    tokenizer.ggml.tokens       the vocabulary, id -> string
    tokenizer.ggml.scores       one float per token ("llama": the higher, the earlier it merges)
    tokenizer.ggml.token_type   1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
    tokenizer.ggml.merges       "left right" pairs, best first ("gpt2" only)
    tokenizer.ggml.{bos,eos,padding,unknown}_token_id, add_bos_token, add_eos_token, add_space_prefix

Both families are byte-pair encoding (Sennrich et al.): start from characters (or bytes) and merge
the best adjacent pair again and again. They differ in where the merge order comes from.

* "gpt2" (GPT-2, SmolLM2) stores its merges. Text is split by a regex first, then every byte is
  spelled as one printable character (GPT-2's byte alphabet: a space is "Ġ"), so nothing is unknown.
* "llama" (Llama 2, Sheared-LLaMA) stores no merges, only a score per token. SentencePiece merges
  the adjacent pair whose concatenation is the token with the highest score (llama.cpp's
  `llm_tokenizer_spm`). Sorting every (left, right) split of every token by the score of the whole
  token gives a merge list that a plain BPE model replays. Spaces become "▁", a "▁" is prepended
  (add_space_prefix), and a character missing from the vocabulary falls back to its UTF-8 bytes,
  the tokens "<0x00>".."<0xFF>".

References:
1) Sennrich et al., "Neural machine translation of rare words with subword units", 2016,
   https://arxiv.org/abs/1508.07909 (BPE)
2) Kudo & Richardson, "SentencePiece", 2018, https://arxiv.org/abs/1808.06226
3) Radford et al., "Language models are unsupervised multitask learners", 2019 (GPT-2's byte-level BPE)
4) GGUF spec, https://github.com/ggml-org/ggml/blob/master/docs/gguf.md ("Tokenizer" keys), and
   llama.cpp src/llama-vocab.cpp (the SPM merge loop, the pre-tokenizer regexes, the defaults)
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from ..errors import CheckpointError
from ..tokenizer import bos_eos_template, rust_errors
from ..util import is_int, is_number

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# tokenizer.ggml.pre -> the regexes llama.cpp applies, in order, before GPT-2's own split (which
# `pre_tokenizers.ByteLevel(use_regex=True)` does). SmolLM2 and StarCoder first cut every digit off
# on its own, as their tokenizer.json's `Digits(individual_digits=True)` does.
_GPT2_PRE_SPLITS: Dict[str, List[str]] = {
    "gpt-2": [],
    "default": [],  # a file that names no pre-tokenizer gets GPT-2's, as in transformers
    "smollm": [r"\p{N}"],
    "starcoder": [r"\p{N}"],
}


def _get(metadata: dict, key: str, path, default: Any = ...) -> Any:
    if key in metadata:
        return metadata[key]
    if default is ...:
        raise CheckpointError(f"tokenizer metadata {key!r} is missing", path)
    return default


def _token_id(metadata: dict, key: str, n_tokens: int, path) -> Optional[int]:
    value = metadata.get(key)
    if value is None:
        return None
    if not is_int(value):  # ints, numpy ints; not floats, not bools
        raise CheckpointError(f"{key} must be an integer token id, got {value!r}", path)
    value = int(value)
    if not 0 <= value < n_tokens:
        raise CheckpointError(f"{key} = {value} is not a token id (the vocabulary has {n_tokens})", path)
    return value


def _flag(metadata: dict, key: str, default: bool, path) -> bool:
    value = metadata.get(key, default)
    if hasattr(value, "__len__") or value not in (True, False):  # numpy's bool_ and 0/1 pass too
        raise CheckpointError(f"{key} must be true or false, got {value!r:.80}", path)
    return bool(value)


def _array(metadata: dict, key: str, path, ok, what: str, default: Any = ...) -> list:
    """The array `key` as a list, each element passing `ok`, or CheckpointError naming the key and the
    first bad element (a string is no array here: list("abc") would be three tokens)."""
    value = _get(metadata, key, path, default)
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__len__"):
        raise CheckpointError(f"{key} must be an array of {what}, got {type(value).__name__}", path)
    value = value.tolist() if hasattr(value, "tolist") else list(value)  # numpy arrays too
    for i, element in enumerate(value):
        if not ok(element):
            raise CheckpointError(f"{key}[{i}] must be {what}, got {element!r:.80}", path)
    return value


# Characters compared while deriving SentencePiece merges: Llama 2's 32,000 tokens need about 0.2 M.
# Trying every split of every token costs the square of its length; splits are only tried where both
# halves have the length of some token, which makes one long token cheap, and this bound stops a
# vocabulary built to make even that quadratic (thousands of ever longer tokens).
MAX_MERGE_WORK = 50_000_000


def _spm_merges(tokens: List[str], scores: List[float], types: List[int], path=None) -> List[Tuple[str, str]]:
    """SentencePiece's merge order as a BPE merge list: every split (left, right) of every token whose
    halves are tokens too, best token first (highest score; ties by the lower id), then by split point.

    Control, unknown and byte tokens never take part: SentencePiece never builds them from pieces.
    """
    mergeable = {tok: i for i, (tok, t) in enumerate(zip(tokens, types)) if t not in (UNKNOWN, CONTROL, BYTE)}
    lengths = sorted({len(tok) for tok in mergeable})
    have = set(lengths)
    ranked, work = [], 0  # (sort key, left, right); characters sliced so far
    for tok, i in mergeable.items():
        n = len(tok)
        cuts = range(1, n) if n <= len(lengths) else lengths  # whichever is shorter to walk
        for cut in cuts:
            if not (0 < cut < n and n - cut in have):
                continue  # no token is as long as the left or the right half
            work += n
            if work > MAX_MERGE_WORK:
                raise CheckpointError(f"tokenizer.ggml.tokens: deriving the SentencePiece merges would "
                                      f"compare more than {MAX_MERGE_WORK:,} characters (the longest token "
                                      f"has {lengths[-1]:,}); not a SentencePiece vocabulary", path)
            left, right = tok[:cut], tok[cut:]
            if left in mergeable and right in mergeable:
                ranked.append(((-scores[i], i, cut), left, right))
    ranked.sort()
    return [(left, right) for _, left, right in ranked]


def _bpe(path, **options) -> models.BPE:
    """tokenizers' BPE model; what it refuses (a merge naming a token missing from the vocabulary)
    becomes a CheckpointError naming the file."""
    with rust_errors("the tokenizer in tokenizer.ggml.* is inconsistent", path):  # a plain Exception
        return models.BPE(**options)


def _llama_spm(tokens, scores, types, metadata, path) -> tokenizers.Tokenizer:
    """Llama 2's SentencePiece BPE: merges recovered from the scores, "▁" for spaces, byte fallback."""
    vocab = {tok: i for i, tok in enumerate(tokens)}
    missing_bytes = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in vocab]
    if missing_bytes:
        raise CheckpointError(f"tokenizer.ggml.tokens lacks the byte-fallback tokens "
                              f"{', '.join(missing_bytes[:4])}{' ...' if len(missing_bytes) > 4 else ''}",
                              path)
    unk_id = _token_id(metadata, "tokenizer.ggml.unknown_token_id", len(tokens), path)
    tok = tokenizers.Tokenizer(_bpe(path, vocab=vocab, merges=_spm_merges(tokens, scores, types, path),
                                    byte_fallback=True, fuse_unk=True,
                                    unk_token=None if unk_id is None else tokens[unk_id]))
    # llama.cpp: add_space_prefix defaults to true for SentencePiece. The "▁" is prepended to every
    # stretch of plain text, so " Hello" becomes "▁▁Hello", as SentencePiece itself does.
    steps = [normalizers.Replace(" ", "▁")]
    space_prefix = _flag(metadata, "tokenizer.ggml.add_space_prefix", True, path)
    if space_prefix:
        steps.insert(0, normalizers.Prepend("▁"))
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = None
    # Decoding undoes it: "▁" -> " ", "<0xE2><0x82><0xAC>" -> "€", and the prefix space goes.
    undo = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(undo + ([decoders.Strip(" ", 1, 0)] if space_prefix else []))
    return tok


def _gpt2_bpe(tokens, types, metadata, path) -> tokenizers.Tokenizer:
    """GPT-2's byte-level BPE with the stored merges and the regex llama.cpp uses for this `pre`."""
    merges_raw = _array(metadata, "tokenizer.ggml.merges", path, lambda m: isinstance(m, str), "strings")
    merges = []
    for i, merge in enumerate(merges_raw):
        pair = merge.split(" ") if isinstance(merge, str) else None
        if pair is None or len(pair) != 2 or not all(pair):
            raise CheckpointError(f"tokenizer.ggml.merges[{i}] must be two tokens separated by one space, "
                                  f"got {merge!r}", path)
        merges.append((pair[0], pair[1]))
    pre = _get(metadata, "tokenizer.ggml.pre", path, "default")
    if not isinstance(pre, str) or pre not in _GPT2_PRE_SPLITS:
        raise CheckpointError(f"unsupported tokenizer.ggml.pre {pre!r} for a gpt2 tokenizer "
                              f"(supported: {', '.join(_GPT2_PRE_SPLITS)})", path)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = tokenizers.Tokenizer(_bpe(path, vocab=vocab, merges=merges))
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _GPT2_PRE_SPLITS[pre]]
    # ByteLevel applies GPT-2's regex ('s|'t|...| ?\p{L}+| ?\p{N}+|...) and then spells bytes.
    tok.pre_tokenizer = pre_tokenizers.Sequence(splits + [pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                   use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    return tok


def tokenizer_from_gguf(metadata: Dict[str, Any], path=None) -> Tuple[tokenizers.Tokenizer, Dict[str, Any]]:
    """Build the tokenizer a GGUF file describes.

    Args:
        metadata: the file's key/value metadata (strings as str, arrays as lists or numpy arrays).
        path: the file, only to name it in errors.
    Returns:
        (tokenizer, specials): a `tokenizers.Tokenizer` whose post-processor adds BOS/EOS as the file
        says, and `{"bos_id", "eos_id", "pad_id", "add_bos", "add_eos"}` (ids are int or None).
    Raises:
        CheckpointError naming the key that is missing or wrong, or the unsupported model.
    """
    model = _get(metadata, "tokenizer.ggml.model", path)
    if not isinstance(model, str) or model not in ("llama", "gpt2"):
        raise CheckpointError(f"unsupported tokenizer model tokenizer.ggml.model = {model!r:.80} "
                              f"(supported: 'llama', 'gpt2')", path)
    tokens = _array(metadata, "tokenizer.ggml.tokens", path, lambda t: isinstance(t, str), "strings")
    n = len(tokens)
    if n == 0:
        raise CheckpointError("tokenizer.ggml.tokens must be a non-empty list of strings", path)
    if len(set(tokens)) != n:
        raise CheckpointError("tokenizer.ggml.tokens holds the same token twice", path)
    types = _array(metadata, "tokenizer.ggml.token_type", path, is_int, "integers", [NORMAL] * n)
    if len(types) != n:
        raise CheckpointError(f"tokenizer.ggml.token_type has {len(types)} entries for {n} tokens", path)

    if model == "llama":
        scores = _array(metadata, "tokenizer.ggml.scores", path, is_number, "numbers")
        if len(scores) != n:
            raise CheckpointError(f"tokenizer.ggml.scores has {len(scores)} entries for {n} tokens", path)
        tok, default_bos = _llama_spm(tokens, scores, types, metadata, path), True
    else:
        tok, default_bos = _gpt2_bpe(tokens, types, metadata, path), False

    # Control tokens (<s>, <|endoftext|>, <|im_start|>) are matched whole in the text and never cut
    # into pieces; user-defined ones too, but they count as text when decoding with skip_special_tokens.
    with rust_errors("tokenizer.ggml.tokens: the control or user-defined tokens are refused", path):
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, kind in zip(tokens, types) if kind in (CONTROL, UNKNOWN)])
        tok.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, kind in zip(tokens, types) if kind == USER_DEFINED])

    specials = dict(
        bos_id=_token_id(metadata, "tokenizer.ggml.bos_token_id", n, path),
        eos_id=_token_id(metadata, "tokenizer.ggml.eos_token_id", n, path),
        pad_id=_token_id(metadata, "tokenizer.ggml.padding_token_id", n, path),
        # llama.cpp's defaults: SentencePiece vocabularies add BOS, GPT-2 style ones do not.
        add_bos=_flag(metadata, "tokenizer.ggml.add_bos_token", default_bos, path),
        add_eos=_flag(metadata, "tokenizer.ggml.add_eos_token", False, path),
    )
    for flag, key in (("add_bos", "bos_id"), ("add_eos", "eos_id")):
        if specials[flag] and specials[key] is None:
            raise CheckpointError(f"tokenizer.ggml.{flag}_token is true, but tokenizer.ggml."
                                  f"{key[:3]}_token_id is not set", path)
    with rust_errors("the bos/eos tokens do not make a post-processor", path):
        tok.post_processor = bos_eos_template(tok, specials["bos_id"], specials["eos_id"],
                                              specials["add_bos"], specials["add_eos"])
    return tok, specials

