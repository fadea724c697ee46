"""Pooling: from one hidden state per token to one vector per text (LLM2Vec, Sec. 3.2 and Figure 3).

A decoder gives a matrix of hidden states (B, T, H); an embedding is one row (B, H). The paper compares
three ways to get it (EOS, mean, weighted mean: Figure 3, and Table 5 in Appendix D.2.2); the official
library offers two more (last token, BOS). All five:

    mean           average of the text's token states                      e = (1/n) sum_t h_t
    weighted_mean  later tokens weigh more (Muennighoff's SGPT)             e = sum_t (t / sum_s s) h_t
    eos_token      the state of the end-of-sequence token appended to the text
    last_token     the state of the last token of the text
    bos_token      the state of the beginning-of-sequence token

Two masks take part, both (B, T) with 1 or 0 per token:

* `attention_mask`: real tokens (1) versus padding (0). Batches are padded on the LEFT, as the
  official library does, so the last column is always a real token.
* `embed_mask`: the tokens that are pooled. An encoder input is `instruction + text`; the model
  attends to the instruction but only the text is pooled ("skip instruction"). The BOS token and
  the instruction are 0 here. Without an instruction it is simply the text tokens.

`mean` and `weighted_mean` pool over `embed_mask`; t counts 1, 2, ..., n over its tokens. The
token modes pick one position from `attention_mask`: the last real token (which is the EOS token
for `eos_token`, because the encoder appends it to the text) or the first real one (BOS).

A row whose `embed_mask` is empty (an empty text, or a text given without the official library's
instruction separator, as its SimCSE training does) is pooled as the official library pools it:
`mean` averages all T positions of the row, padding included, and `weighted_mean` gives zeros.

References:
1) BehnamGhader et al., "LLM2Vec", 2024, https://arxiv.org/abs/2404.05961, Sec. 3.2 and Figure 3 (the pooling
   ablation; Table 5 in Appendix D.2.2)
2) Muennighoff, "SGPT", 2022, https://arxiv.org/abs/2202.08904 (position-weighted mean pooling)
3) The official implementation, https://github.com/McGill-NLP/llm2vec (`LLM2Vec.get_pooling`, v0.2.3)
"""

from __future__ import annotations

from typing import Optional

import torch

from .errors import ConfigError

POOLING_MODES = ("mean", "weighted_mean", "eos_token", "last_token", "bos_token")


def append_eos(text: str, eos_token: str) -> str:
    """The text `eos_token` pooling reads: the eos token written after it, as the official library does.

    Both the encoder and SimCSE training apply this one rule, so they pool the same token.
    """
    return f"{text.strip()} {eos_token}"


def _check(hidden: torch.Tensor, mask: Optional[torch.Tensor], name: str) -> None:
    if hidden.dim() != 3:
        raise ConfigError(f"hidden states must be (B, T, H), got shape {tuple(hidden.shape)}")
    if mask is not None and tuple(mask.shape) != tuple(hidden.shape[:2]):
        raise ConfigError(f"{name} must be (B, T) = {tuple(hidden.shape[:2])}, "
                          f"got shape {tuple(mask.shape)}")


def mean(hidden: torch.Tensor, embed_mask: torch.Tensor) -> torch.Tensor:
    """Average of the pooled tokens: (B, T, H), (B, T) -> (B, H).

    A row with no pooled token averages all T positions (the official library's behaviour).
    """
    _check(hidden, embed_mask, "embed_mask")
    m = embed_mask.to(hidden.dtype)  # (B, T)
    m = torch.where(m.sum(-1, keepdim=True) > 0, m, torch.ones_like(m))  # empty row -> every position
    total = torch.einsum("bth,bt->bh", hidden, m)  # (B, H)
    return total / m.sum(-1, keepdim=True)  # (B, H)


def weighted_mean(hidden: torch.Tensor, embed_mask: torch.Tensor) -> torch.Tensor:
    """Position-weighted average: the k-th pooled token weighs k / (1 + 2 + ... + n).

    (B, T, H), (B, T) -> (B, H). A row with no pooled token gives zeros.
    """
    _check(hidden, embed_mask, "embed_mask")
    m = embed_mask.to(hidden.dtype)  # (B, T)
    w = m.cumsum(-1) * m  # (B, T): 1, 2, ..., n on the pooled tokens, 0 elsewhere
    w = w / w.sum(-1, keepdim=True).clamp(min=1e-9)  # (B, T), each non-empty row sums to 1
    return torch.einsum("bth,bt->bh", hidden, w)  # (B, H)


def last_token(hidden: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """State of the last real token: (B, T, H), (B, T) -> (B, H).

    With left padding that is column T-1; the mask also makes right padding correct.
    """
    _check(hidden, attention_mask, "attention_mask")
    B, T, _ = hidden.shape
    if attention_mask is None:
        return hidden[:, -1]
    real = attention_mask.to(torch.bool)  # (B, T)
    # index of the last True: T-1 minus the position of the first True in the reversed row
    last = (T - 1) - real.flip(-1).to(torch.int64).argmax(-1)  # (B,)
    return hidden[torch.arange(B, device=hidden.device), last]  # (B, H)


def eos_token(hidden: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """State of the EOS token, which the encoder appends as the text's last token: (B, T, H) -> (B, H)."""
    return last_token(hidden, attention_mask)


def bos_token(hidden: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """State of the first real token, the BOS token the tokenizer puts first: (B, T, H) -> (B, H)."""
    _check(hidden, attention_mask, "attention_mask")
    B = hidden.shape[0]
    if attention_mask is None:
        return hidden[:, 0]
    first = attention_mask.to(torch.bool).to(torch.int64).argmax(-1)  # (B,) first real column
    return hidden[torch.arange(B, device=hidden.device), first]  # (B, H)


def pool(hidden: torch.Tensor, attention_mask: Optional[torch.Tensor],
         embed_mask: Optional[torch.Tensor], mode: str) -> torch.Tensor:
    """Pool hidden states (B, T, H) into embeddings (B, H) with one of `POOLING_MODES`.

    attention_mask (B, T): real tokens; embed_mask (B, T): the tokens `mean`/`weighted_mean`
    average (the text without instruction or BOS). When embed_mask is None they pool every real
    token. Raises `ConfigError` (a ValueError) naming an unknown mode.
    """
    if mode not in POOLING_MODES:
        raise ConfigError(f"unknown pooling mode {mode!r}; valid modes: {', '.join(POOLING_MODES)}")
    if mode in ("mean", "weighted_mean"):
        if embed_mask is None:
            embed_mask = (attention_mask if attention_mask is not None
                          else torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device))
        return mean(hidden, embed_mask) if mode == "mean" else weighted_mean(hidden, embed_mask)
    if mode == "bos_token":
        return bos_token(hidden, attention_mask)
    return last_token(hidden, attention_mask)  # eos_token and last_token
