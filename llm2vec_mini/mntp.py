"""Masked next-token prediction (MNTP), LLM2Vec step 2 (paper Sec. 2.1; its setup in Sec. 2.2).

With bidirectional attention a decoder can see the whole text, but was never trained to use its future
context. MNTP teaches it: mask a fraction of the tokens (BERT-style), and predict a masked token i from
the hidden state at position i - 1, the position a decoder already predicts the next token from:

    loss = CE( lm_head(h[:, :-1]), labels[:, 1:] ),   labels = -100 where nothing is masked

The official settings (train_configs/mntp/Sheared-Llama.json): blocks of 512 tokens, mask ratio 0.2,
"_" as the mask token, 80 % mask / 10 % random / 10 % kept, batch 32, 1000 steps, LoRA r = 16.

Everything MNTP lives here: the data (`group_texts`, `mntp_task`), the masking (`MNTPCollator`), the
loss (`mntp_loss`) and the task the generic trainer (train.py) runs (`MNTPTask`).

One quirk of the official run (experiments/run_mntp.py): peft wraps only the inner bidirectional
model, so the output head stays trainable and transformers' Trainer trains it along with the
adapter, then never saves it. Our recipe freezes it (LoRA only, as the paper describes);
`unfreeze_lm_head` reproduces the official run exactly, for models whose head is not tied to the
embeddings (Sheared-LLaMA; a tied head, as SmolLM2's, stays frozen in the official run too).

References:
1) BehnamGhader et al., "LLM2Vec", 2024, https://arxiv.org/abs/2404.05961, Sec. 2.1-2.2 and Appendix D.1.1
2) Devlin et al., "BERT", 2019, https://arxiv.org/abs/1810.04805, Sec. 3.1 (the 80/10/10 recipe)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import all_reduce_sum, sum_over_processes
from .errors import ConfigError

IGNORE = -100  # label value that cross-entropy skips


def choose_mask_token(tokenizer) -> int:
    """The mask token id: "_" as in the official recipe, for both vocabularies we load.

    Llama's SentencePiece vocabulary (Sheared-LLaMA) has "_" as one ordinary token (id 29918); so does
    GPT-2-style byte-level BPE (SmolLM2). An existing, ordinary token needs no new embedding row, which
    a frozen embedding matrix could not learn anyway. Vocabularies without it fall back to eos.
    """
    mask_id = tokenizer.token_to_id("_")
    if mask_id is None:
        mask_id = tokenizer.eos_id
    if mask_id is None:
        raise ConfigError("the tokenizer has neither a '_' token nor an eos token to mask with")
    return mask_id


def unfreeze_lm_head(model: nn.Module) -> nn.Module:
    """Make lm_head trainable, as the official MNTP run leaves it (see the module docstring).

    The trainer then updates it with the adapter (and keeps it in checkpoints); the saved adapter
    does not hold it, as the official one does not. A head tied to the embeddings is refused: the
    official run freezes it with them, so training it would reproduce nothing.
    """
    if model.lm_head.weight is model.model.embed_tokens.weight:
        raise ConfigError("lm_head is tied to the input embeddings (tie_word_embeddings): the official "
                          "MNTP run leaves a tied head frozen, so there is nothing to reproduce; "
                          "train without --train-lm-head")
    model.lm_head.weight.requires_grad_(True)
    return model


def group_texts(token_lists: Iterable[Sequence[int]], block_size: int) -> torch.Tensor:
    """Concatenate tokenised texts and cut them into blocks of `block_size` (the tail is dropped).

    Returns (n_blocks, block_size) int64, as Hugging Face's run_mlm `group_texts` does.
    """
    if block_size < 2:
        raise ConfigError(f"block_size must be at least 2, got {block_size}")
    flat = [t for ids in token_lists for t in ids]
    n = len(flat) // block_size
    if n == 0:
        raise ConfigError(f"the corpus has {len(flat)} tokens, fewer than one block of {block_size}")
    return torch.tensor(flat[: n * block_size], dtype=torch.long).view(n, block_size)


@dataclass
class MNTPCollator:
    """Masks a batch of token blocks BERT-style; returns (input_ids, labels), both (B, T).

    Each non-special position is chosen with probability `mask_ratio`; a chosen position becomes the
    mask token with probability 0.8, a random token with 0.1, and stays itself with 0.1 (`all_mask`:
    always the mask token). Labels hold the original token at chosen positions and -100 elsewhere.
    """

    mask_id: int
    vocab_size: int
    special_ids: Sequence[int] = ()
    mask_ratio: float = 0.2
    all_mask: bool = False

    def __post_init__(self):
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")

    def __call__(self, input_ids: torch.Tensor, generator: Optional[torch.Generator] = None):
        input_ids = input_ids.clone()  # (B, T)
        labels = input_ids.clone()
        prob = torch.full(input_ids.shape, self.mask_ratio)
        if len(self.special_ids):
            special = torch.isin(input_ids, torch.tensor(list(self.special_ids)))
            prob.masked_fill_(special, 0.0)  # never mask bos/eos/pad
        chosen = torch.bernoulli(prob, generator=generator).bool()
        labels[~chosen] = IGNORE
        if self.all_mask:
            input_ids[chosen] = self.mask_id
            return input_ids, labels
        to_mask = torch.bernoulli(torch.full(input_ids.shape, 0.8), generator=generator).bool() & chosen
        input_ids[to_mask] = self.mask_id
        # half of the remaining 20 %: a random token; the other half keeps the original
        to_random = (torch.bernoulli(torch.full(input_ids.shape, 0.5), generator=generator).bool()
                     & chosen & ~to_mask)
        random_ids = torch.randint(self.vocab_size, input_ids.shape, generator=generator)
        input_ids[to_random] = random_ids[to_random]
        return input_ids, labels


def mntp_loss(hidden: torch.Tensor, labels: torch.Tensor, lm_head: torch.nn.Module,
              n_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean CE of predicting labels[:, i + 1] from hidden[:, i], computed only where a label exists.

    hidden (B, T, H) from the (bidirectional) decoder; labels (B, T) with -100 where unmasked.
    Projecting only the ~20 % labelled positions onto the vocabulary gives the same loss as
    `CE(lm_head(hidden)[:, :-1], labels[:, 1:])` at a fraction of the cost (see `mntp_loss_full`).
    n_labels: the denominator of the mean, by default the labels here (the trainer passes the count
    over all processes, so that each process's share adds up to the global mean). A batch with
    nothing masked gives 0, still attached to the graph.
    """
    shifted = labels[:, 1:]  # (B, T-1): the token each position must predict
    where = shifted != IGNORE
    logits = lm_head(hidden[:, :-1][where])  # (n_labelled, vocab)
    total = F.cross_entropy(logits.float(), shifted[where], reduction="sum")
    n = where.sum() if n_labels is None else n_labels
    return total / n.clamp(min=1)


def mntp_loss_full(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The textbook form: CE(logits[:, :-1], labels[:, 1:]) over the full (B, T, vocab) logits."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=IGNORE)


# -------------------------------------------------------------------------------------------------
# The task the trainer runs: example indices -> a masked batch -> the loss

class MNTPTask(nn.Module):
    """Masked next-token prediction on token blocks (n_blocks, block_size) of a LlamaForCausalLM.

    The trainer's contract (train.py): `make_batch(indices, generator)` builds the global batch, and
    `forward(batch)` returns the loss of the global batch, the same value on every process, whose
    gradient covers this process's own examples.
    """

    def __init__(self, model: nn.Module, blocks: torch.Tensor, collator: MNTPCollator):
        super().__init__()
        self.model, self.blocks, self.collator = model, blocks, collator

    def __len__(self):
        return len(self.blocks)

    def make_batch(self, indices, generator):
        return self.collator(self.blocks[indices], generator=generator)  # (inputs, labels), (B, T)

    def forward(self, batch):
        inputs, labels = batch
        hidden = self.model.model(inputs)  # (B, T, H), bidirectional
        # the mean over the masked tokens of the global batch: the counts differ between processes,
        # so each divides its own sum by the global count, and the shares add up to the mean
        count = all_reduce_sum((labels[:, 1:] != IGNORE).sum().to(torch.float32))
        share = mntp_loss(hidden, labels, self.model.lm_head, n_labels=count)
        return sum_over_processes(share)


def mntp_task(model: nn.Module, tokenizer, texts: Sequence[str], block_size: int = 512,
              mask_ratio: float = 0.2, all_mask: bool = False, max_blocks: Optional[int] = None) -> MNTPTask:
    """Tokenise texts (with the tokenizer's own bos/eos), concatenate, cut into blocks, and mask.

    The special ids (bos, eos, pad) are never masked; the mask token is `choose_mask_token`'s.
    """
    blocks = group_texts(tokenizer.encode_batch(list(texts), add_special_tokens=True), block_size)
    if max_blocks is not None:
        if max_blocks < 1:
            raise ConfigError(f"max_blocks must be at least 1, got {max_blocks}")
        blocks = blocks[:max_blocks]
    specials = [i for i in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) if i is not None]
    collator = MNTPCollator(mask_id=choose_mask_token(tokenizer), vocab_size=model.config.vocab_size,
                            special_ids=specials, mask_ratio=mask_ratio, all_mask=all_mask)
    return MNTPTask(model, blocks, collator)
