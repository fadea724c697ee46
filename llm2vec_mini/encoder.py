"""The LLM2Vec encoder: texts (optionally with an instruction) in, one vector per text out.

    embedding = pool( LlamaModel_bidirectional( [bos] + instruction + text ), over the text tokens )

The semantics are the official library's (llm2vec 0.2.3, `LLM2Vec.encode`), so that the same weights
give the same embeddings:
  * a text is a string, or an `[instruction, text]` pair; they are joined as
    `instruction.strip() + " " + text` and the model attends to all of it, but with
    `skip_instruction` only the text's tokens are pooled (the "embed mask"): the last n positions,
    n being the token count of the text tokenised alone;
  * the text is cut at word boundaries until it has at most `doc_max_length` tokens, and the whole
    input to at most `max_length` tokens;
  * pad = eos, padding on the left; `eos_token` pooling appends the eos token to the text.
Three deliberate differences: we batch sentences by token count, not character count (results do
not depend on batching; this only wastes less padding); an empty text is pooled over its whole input
(bos and instruction, or one eos token where there is neither), where the official library also
averages the batch's padding; and a single word longer than `doc_max_length` tokens keeps its first
`doc_max_length` tokens, where the official word-level cut leaves nothing.

References:
1) BehnamGhader et al., "LLM2Vec", 2024, https://arxiv.org/abs/2404.05961, Sec. 3.2 (instructions, pooling
   the text only) and Appendix C.2 (Table 10, the instructions)
2) The official implementation, https://github.com/McGill-NLP/llm2vec (`llm2vec/llm2vec.py`, v0.2.3)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch

from .convert.checks import check_tokenizer
from .convert.hf import load_pretrained, save_hf_dir
from .errors import ConfigError, DataError
from .ops import fuse_projections
from .pooling import POOLING_MODES, append_eos, pool
from .precision import DtypeLike, compute_dtype, set_compute_dtype
from .tokenizer import Tokenizer, check_text
from .util import decoder_of, is_int, left_pad, read_json, torch_device

SEPARATOR = "!@#$%^&*()"  # the official marker between instruction and text
# The settings files beside the weights or in an adapter folder. The official library passes every
# key of llm2vec_config.json to its constructor, so that file holds its four settings only; the
# attention direction, which the official library takes as an argument, goes in a file of our own.
CONFIG_FILE = "llm2vec_config.json"  # pooling_mode, max_length, doc_max_length, skip_instruction
ATTENTION_FILE = "llm2vec_mini_config.json"  # {"bidirectional": true or false}
DEFAULTS = {"pooling_mode": "mean", "max_length": 512, "doc_max_length": 400, "skip_instruction": True,
            "bidirectional": True}


class LLM2Vec:
    """A bidirectional (or causal) LlamaModel plus a tokenizer and a pooling rule.

    `LLM2Vec(model, tokenizer, ...)` takes the model over: it moves it to `device`, puts it in eval
    mode, sets its attention direction, and fuses its projections for speed (`ops.fuse_projections`:
    the parameters stay the same objects with the same values, so an optimizer holding them keeps
    working). Keep a copy (`copy.deepcopy(model)`) if you need the model as it was.

    dtype: the dtype of the matrix products. "auto" (the default) is bf16 where a short probe finds
    bf16 products faster than fp32 on `device`, else fp32 (`precision.compute_dtype`); with bf16
    the projections of the layers after the model's massive activations run in bf16 and everything
    else stays fp32 (`precision.set_compute_dtype`). torch.float32: the plain fp32 model.
    """

    def __init__(self, model, tokenizer, pooling: str = "mean", bidirectional: bool = True,
                 max_length: int = 512, doc_max_length: int = 400, skip_instruction: bool = True,
                 device=None, dtype: DtypeLike = "auto"):
        check_settings({"pooling_mode": pooling, "max_length": max_length, "doc_max_length": doc_max_length,
                        "skip_instruction": skip_instruction, "bidirectional": bidirectional})
        if not isinstance(tokenizer, Tokenizer):
            raise ConfigError(f"tokenizer must be an llm2vec_mini Tokenizer, got {type(tokenizer).__name__}")
        device = torch_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = compute_dtype(dtype, device)  # a bad dtype fails before the model is touched
        self.model = decoder_of(model)  # the LlamaModel; lm_head is not needed here
        self._full_model = model  # kept so that `save` writes an untied lm_head too
        self.tokenizer = tokenizer
        self.pooling, self.max_length, self.doc_max_length = pooling, max_length, doc_max_length
        self.skip_instruction = skip_instruction
        self.pad_id = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.pad_id
        if self.pad_id is None:
            raise ConfigError("the tokenizer has no eos (or pad) token to pad with", tokenizer.path)
        if pooling == "bos_token" and not (tokenizer.add_bos and tokenizer.bos_id is not None):
            raise ConfigError("pooling: 'bos_token' needs a tokenizer that puts a BOS token first; "
                              "this one does not (it would pool the first word instead)", tokenizer.path)
        if pooling == "eos_token" and tokenizer.eos_id is None:
            raise ConfigError("pooling: 'eos_token' needs a tokenizer with an eos token", tokenizer.path)
        check_tokenizer(tokenizer, self.model.config, tokenizer.path)  # every id has an embedding row
        self.device = device
        self.model.to(self.device).eval().set_causal(not bidirectional)
        fuse_projections(self.model)  # q/k/v and gate/up as one GEMM each when encoding; same values
        self.dtype = dtype
        # with bf16: the blocks up to where massive activations are born, and those that move them
        # later, stay fp32 (all of them with fp32)
        self.fp32_blocks = set_compute_dtype(self.model, self.dtype)

    @property
    def bidirectional(self) -> bool:
        return not self.model.causal

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @classmethod
    def from_pretrained(cls, path, adapters: Sequence = (), pooling: Optional[str] = None,
                        bidirectional: Optional[bool] = None, max_length: Optional[int] = None,
                        doc_max_length: Optional[int] = None, skip_instruction: Optional[bool] = None,
                        dtype: DtypeLike = "auto", device=None) -> "LLM2Vec":
        """Load an HF directory or a `.gguf` file, merge PEFT `adapters` in order (MNTP first).

        Settings left as None come from an `llm2vec_config.json` beside the weights or in the last
        adapter (what `save` writes), else the defaults: mean pooling, bidirectional, max_length 512,
        doc_max_length 400, skip_instruction True. `device=None` means CUDA when available.
        The weights load in fp32; `dtype` is the compute dtype of the matrix products (see LLM2Vec).
        """
        if isinstance(adapters, (str, os.PathLike)):  # one adapter folder
            adapters = [adapters]
        check_settings({k: v for k, v in {"pooling_mode": pooling, "bidirectional": bidirectional,
                                           "max_length": max_length, "doc_max_length": doc_max_length,
                                           "skip_instruction": skip_instruction}.items() if v is not None})
        device = torch_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = compute_dtype(dtype, device)  # a bad dtype fails before the weights load
        model, tokenizer = load_pretrained(path, adapters=adapters, dtype=torch.float32)
        settings = dict(DEFAULTS)
        for where in [Path(path)] + [Path(a) for a in adapters]:
            settings.update(read_settings(where))
        given = {"pooling_mode": pooling, "bidirectional": bidirectional, "max_length": max_length,
                 "doc_max_length": doc_max_length, "skip_instruction": skip_instruction}
        settings.update({k: v for k, v in given.items() if v is not None})
        return cls(model, tokenizer, pooling=settings["pooling_mode"],
                   bidirectional=settings["bidirectional"], max_length=settings["max_length"],
                   doc_max_length=settings["doc_max_length"],
                   skip_instruction=settings["skip_instruction"], device=device, dtype=dtype)

    def settings(self) -> dict:
        return {"pooling_mode": self.pooling, "max_length": self.max_length,
                "doc_max_length": self.doc_max_length, "skip_instruction": self.skip_instruction,
                "bidirectional": self.bidirectional}

    def save(self, out_dir) -> Path:
        """Write an HF directory (weights, config, tokenizer) plus the settings files, which both
        `LLM2Vec.from_pretrained` and the official library's read back."""
        out = save_hf_dir(self._full_model, self.tokenizer, out_dir)
        write_settings(out, self.settings())
        return out

    # ---------------------------------------------------------------------------------------------
    # Texts -> token ids and masks

    def _n_tokens(self, text: str) -> int:
        return min(len(self.tokenizer.encode(text, add_special_tokens=False)), self.max_length)

    def _truncate_words(self, text: str) -> str:
        """Drop words from the end until the text has at most doc_max_length tokens (official rule).

        Where that rule would keep no word at all (one word longer than the limit: a URL, a hash),
        the official library encodes an empty text; we keep the first doc_max_length tokens instead
        (decoded back to text, which re-tokenises to about as many).
        """
        n = self._n_tokens(text)
        while n > self.doc_max_length:
            words = text.split()
            keep = int(len(words) * self.doc_max_length / n)
            if keep == 0:
                ids = self.tokenizer.encode(text, add_special_tokens=False)[: self.doc_max_length]
                return self.tokenizer.decode(ids)
            text = " ".join(words[:keep])
            n = self._n_tokens(text)
        return text

    def _join(self, instruction: str, text: str) -> tuple[str, str]:
        """-> (what the model reads, the text part that is pooled)."""
        text = self._truncate_words(text)
        joined = f"{instruction.strip()} {SEPARATOR}{text}" if instruction else f"{SEPARATOR}{text}"
        if self.pooling == "eos_token":  # the eos token becomes the text's last token
            joined = append_eos(joined, self.tokenizer.id_to_token(self.tokenizer.eos_id))
        parts = joined.split(SEPARATOR)
        return "".join(parts), (parts[1] if len(parts) > 1 else "")

    def _tokenize(self, full: str, text: str) -> tuple[list[int], int]:
        """Token ids of the whole input (specials included, cut to max_length) and the pooled count."""
        tok = self.tokenizer
        content = tok.encode(full, add_special_tokens=False)
        room = self.max_length - int(tok.add_bos and tok.bos_id is not None) - int(
            tok.add_eos and tok.eos_id is not None)
        ids = tok._wrap(content[:max(room, 0)])
        if not ids:  # an empty text and no BOS (SmolLM2's tokenizer): read and pool one eos (= pad) token
            ids = [self.pad_id]
        return ids, min(self._n_tokens(text), len(ids))

    def prepare(self, sentences) -> list[tuple[list[int], int]]:
        """Validate inputs and tokenise: one (ids, n_pooled) per sentence."""
        pairs = []  # every item is checked before any is tokenised
        for i, item in enumerate(sentences):
            if isinstance(item, str):
                instruction, text = "", item
            elif (isinstance(item, (list, tuple)) and len(item) == 2
                  and all(isinstance(x, str) for x in item)):
                instruction, text = item
            else:
                raise ConfigError(f"sentences[{i}] must be a string or an [instruction, text] pair of "
                                  f"two strings, got {item!r:.80}")
            for part in (instruction, text):
                try:
                    check_text(part, f"sentences[{i}]")
                except DataError as e:
                    raise ConfigError(str(e)) from None
            pairs.append((instruction, text))
        return [self._tokenize(*self._join(instruction, text)) for instruction, text in pairs]

    def collate(self, items: list[tuple[list[int], int]]):
        """Left-pad a batch: input_ids, attention_mask, embed_mask, each (B, T)."""
        input_ids, attention = left_pad([ids for ids, _ in items], self.pad_id)  # (B, T) each
        T = input_ids.shape[1]
        embed = torch.zeros_like(attention)
        for b, (ids, n_text) in enumerate(items):
            # the text's tokens are the last ones; an empty text pools the whole input instead (the
            # official library then averages the padding too, which makes it depend on the batch)
            embed[b, T - (n_text or len(ids)):] = 1
        return input_ids, attention, embed

    # ---------------------------------------------------------------------------------------------

    def encode(self, sentences, batch_size: int = 32, normalize: bool = False,
               convert_to: str = "numpy", show_progress_bar: Optional[bool] = None,
               on_batch: Optional[Callable[[int], None]] = None) -> Union[np.ndarray, torch.Tensor]:
        """Embed strings or [instruction, text] pairs: returns (N, hidden) float32, in input order.

        `on_batch(n)`, if given, is called after each batch with its number of texts (a progress bar
        of one's own, as `corpus.encode_corpus` keeps).
        """
        if isinstance(sentences, str):
            sentences = [sentences]
        if isinstance(sentences, (bytes, dict, set, frozenset)) or not isinstance(sentences, Iterable):
            raise ConfigError(f"sentences must be a string or a list of strings and [instruction, text] "
                              f"pairs, got a {type(sentences).__name__}")
        if not is_int(batch_size) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        if convert_to not in ("numpy", "torch"):
            raise ConfigError(f"convert_to must be 'numpy' or 'torch', got {convert_to!r}")
        items = self.prepare(list(sentences))
        out = torch.zeros(len(items), self.hidden_size, dtype=torch.float32)
        order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))  # longest first
        batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
        if show_progress_bar is None:
            show_progress_bar = len(batches) > 4 and sys.stderr.isatty()
        if show_progress_bar:
            from tqdm.auto import tqdm
            batches = tqdm(batches, desc="encode", unit="batch")
        self.model.eval()
        for idx in batches:
            input_ids, attention, embed = (t.to(self.device) for t in self.collate([items[i] for i in idx]))
            # inference_mode: like no_grad, and also skips autograd's bookkeeping on every tensor;
            # `out` was made outside it, so what we return is an ordinary tensor
            with torch.inference_mode():
                hidden = self.model(input_ids, attention)  # (B, T, H)
                pooled_over = embed if self.skip_instruction else attention
                out[idx] = pool(hidden, attention, pooled_over, self.pooling).float().cpu()
            if on_batch is not None:
                on_batch(len(idx))
        if normalize:
            out = torch.nn.functional.normalize(out, dim=-1)
        return out.numpy() if convert_to == "numpy" else out


def write_settings(folder, settings: dict) -> None:
    """The encoder settings into `folder`: the official four in llm2vec_config.json, the attention
    direction in llm2vec_mini_config.json."""
    folder = Path(folder)
    official = {k: settings[k] for k in ("pooling_mode", "max_length", "doc_max_length", "skip_instruction")}
    (folder / CONFIG_FILE).write_text(json.dumps(official, indent=2) + "\n")
    (folder / ATTENTION_FILE).write_text(json.dumps({"bidirectional": settings["bidirectional"]}) + "\n")


def read_settings(folder) -> dict:
    """Whatever settings files `folder` holds (ours or the official library's), as one dict, each
    field checked as `check_settings` does (ConfigError naming the file and the field)."""
    found = {}
    for name in (CONFIG_FILE, ATTENTION_FILE):
        file = Path(folder) / name
        if file.is_file():
            value = read_json(file, error=ConfigError, expect=dict)
            unknown = set(value) - set(DEFAULTS)
            if unknown:
                raise ConfigError(f"expected an object with some of {', '.join(DEFAULTS)}, got "
                                  f"{value!r:.120}", file)
            check_settings(value, file)
            found.update(value)
    return found


def check_settings(settings: dict, file=None) -> None:
    """ConfigError naming the field (and the file) for a setting of the wrong type or value. JSON's
    "false" is a string, and a string is true in Python: a flag must be true or false, not a word."""
    for name, value in settings.items():
        if name == "pooling_mode" and not (isinstance(value, str) and value in POOLING_MODES):
            raise ConfigError(f"pooling_mode: unknown mode {value!r:.80}; choose from "
                              f"{', '.join(POOLING_MODES)}", file)
        if name in ("max_length", "doc_max_length") and not (is_int(value) and value >= 1):
            raise ConfigError(f"{name} must be a positive integer, got {value!r:.80}", file)
        if name in ("skip_instruction", "bidirectional") and not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r:.80}", file)
