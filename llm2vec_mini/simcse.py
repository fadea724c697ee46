"""SimCSE, LLM2Vec step 3 (paper Sec. 2.1; its setup in Sec. 2.2): one vector per sentence, contrastively.

Unsupervised: pass the same batch through the model twice in training mode. Dropout differs between
the passes, so each sentence gets two slightly different embeddings e1_i, e2_i; the pair (e1_i, e2_i)
is the positive and every (e1_i, e2_j), j != i, a negative:

    s_ij = scale · cos(e1_i, e2_j)          loss = mean_i  -log softmax_j(s_ij)[j = i]

scale = 1 / temperature = 20 in LLM2Vec's unsupervised recipe (attention dropout 0.3).
Supervised (LLM2Vec's E5 runs): each query q_i has a positive p_i and a hard negative n_i; the
candidates for q_i are every p_j and every n_j of the batch (the official HardNegativeNLLLoss, scale 50).
With several processes the candidates are all-gathered, so every process sees the global batch.

Everything SimCSE lives here: the losses, the data (`simcse_task`), attention dropout
(`set_attention_dropout`) and the task the generic trainer (train.py) runs (`SimCSETask`).

We pool a training sentence as `LLM2Vec.encode` pools it later: over its text tokens. The official
training (experiments/run_simcse.py) does not: its wiki1m texts lack the instruction separator, so
its embed mask is empty and the mean runs over every position of the padded row, the left padding
and BOS included (the padding at positions 0, 1, ... as transformers numbers them, attending to the
text through SDPA). `pool_all_positions=True` reproduces that, for mean pooling.

References:
1) Gao, Yao, Chen, "SimCSE", 2021, https://arxiv.org/abs/2104.08821, Sec. 3 (unsupervised) and 4
   (supervised)
2) BehnamGhader et al., "LLM2Vec", 2024, https://arxiv.org/abs/2404.05961, Sec. 2.1-2.2 and Appendix D.1.2;
   the supervised loss: Sec. 5.1 and Appendix G
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .pooling import append_eos, pool
from .util import decoder_of, left_pad


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarity: a (N, H), b (M, H) -> (N, M)."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate (N, H) from every process along dim 0, keeping the gradient of the local rows.

    Under one process this is the identity. Rows may differ in count between processes.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.cat([x, x.new_zeros(longest - x.shape[0], *x.shape[1:])]) if x.shape[0] < longest else x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    parts = [p[: int(s.item())] for p, s in zip(parts, sizes)]
    parts[dist.get_rank()] = x  # the local rows carry the gradient
    return torch.cat(parts)


def contrastive_loss(queries: torch.Tensor, positives: torch.Tensor,
                     negatives: Optional[torch.Tensor] = None, scale: float = 50.0) -> torch.Tensor:
    """Cross-entropy of each query against all positives (and hard negatives) of the global batch.

    queries, positives: (B, H), row i of each is a pair; negatives: (B, H) or None.
    Target of query i is positive i. Returns a scalar: the mean over the global batch, the same on
    every process. Each process's gradient covers only its own rows (the trainer's contract, train.py).
    """
    queries = gather_with_grad(queries)  # (B_global, H)
    candidates = gather_with_grad(positives)  # (B_global, H)
    if negatives is not None:
        candidates = torch.cat([candidates, gather_with_grad(negatives)])  # (2 B_global, H)
    scores = cosine_matrix(queries, candidates) * scale  # (B_global, n_candidates)
    targets = torch.arange(queries.shape[0], device=queries.device)
    return F.cross_entropy(scores, targets)


def unsup_simcse_loss(e1: torch.Tensor, e2: torch.Tensor, scale: float = 20.0) -> torch.Tensor:
    """Unsupervised SimCSE: e1, e2 (B, H) are two dropout views of the same sentences."""
    return contrastive_loss(e1, e2, None, scale)


def supervised_loss(queries: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
                    scale: float = 50.0) -> torch.Tensor:
    """Supervised contrastive loss with hard negatives (the official HardNegativeNLLLoss)."""
    return contrastive_loss(queries, positives, negatives, scale)


# -------------------------------------------------------------------------------------------------
# The task the trainer runs: example indices -> a padded batch -> the loss of two dropout views

class SimCSETask(nn.Module):
    """Unsupervised SimCSE on tokenised sentences: the same batch twice, dropout makes the views.

    The trainer's contract (train.py): `make_batch(indices, generator)` builds the global batch, and
    `forward(batch)` returns the loss of the global batch, the same value on every process, whose
    gradient covers this process's own examples (`contrastive_loss` all-gathers the embeddings).
    """

    def __init__(self, model: nn.Module, sentences: list, pad_id: int, pooling: str = "mean",
                 scale: float = 20.0, bos_id: Optional[int] = None, pool_all_positions: bool = False):
        super().__init__()
        if pool_all_positions and pooling != "mean":
            raise ConfigError(f"pool_all_positions (the official SimCSE training's mean over the padded "
                              f"row) is a form of mean pooling, not of {pooling!r}")
        self.model, self.sentences, self.pad_id = model, sentences, pad_id
        self.pooling, self.scale, self.bos_id = pooling, scale, bos_id
        self.pool_all_positions = pool_all_positions

    def __len__(self):
        return len(self.sentences)

    def make_batch(self, indices, generator):
        return left_pad([self.sentences[i] for i in indices], self.pad_id)  # (ids, mask), (B, T): as encoded

    def embed(self, ids, mask):
        if self.pool_all_positions:  # the official training: every position, numbered 0..T-1
            B, T = ids.shape
            positions = torch.arange(T, device=ids.device)[None].expand(B, T)  # (B, T), pads counted
            hidden = self.model.model(ids, mask, positions)  # (B, T, H)
            return pool(hidden, mask, torch.ones_like(mask), "mean")  # (B, H)
        # pool the text's tokens, as LLM2Vec.encode does: not the padding, not a leading bos
        text = mask if self.bos_id is None else mask * (ids != self.bos_id)
        return pool(self.model.model(ids, mask), mask, text, self.pooling)  # (B, H)

    def forward(self, batch):
        ids, mask = batch
        e1, e2 = self.embed(ids, mask), self.embed(ids, mask)  # two dropout views
        return unsup_simcse_loss(e1, e2, self.scale)


def simcse_task(model: nn.Module, tokenizer, sentences: Sequence[str], max_length: int = 128,
                pooling: str = "mean", scale: float = 20.0, pool_all_positions: bool = False) -> SimCSETask:
    """Tokenise each sentence (cut to max_length tokens) as the encoder reads it: padded with eos,
    and for eos_token pooling with the eos token written after the text (`pooling.append_eos`).
    pool_all_positions: pool as the official training does (see the module docstring)."""
    if max_length < 2:
        raise ConfigError(f"max_length must be at least 2, got {max_length}")
    if pooling == "eos_token":
        if tokenizer.eos_id is None:
            raise ConfigError("pooling 'eos_token' needs a tokenizer with an eos token")
        eos = tokenizer.id_to_token(tokenizer.eos_id)
        sentences = [append_eos(s, eos) for s in sentences]
    ids = [s[:max_length] for s in tokenizer.encode_batch(list(sentences), add_special_tokens=True)]
    pad = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.pad_id
    bos = tokenizer.bos_id if tokenizer.add_bos else None
    return SimCSETask(model, ids, pad_id=pad, pooling=pooling, scale=scale, bos_id=bos,
                      pool_all_positions=pool_all_positions)


def set_attention_dropout(model: nn.Module, p: float) -> nn.Module:
    """SimCSE's views differ by dropout: LLM2Vec uses 0.3 on the attention probabilities."""
    if not 0 <= p < 1:
        raise ConfigError(f"attention dropout must be in [0, 1), got {p!r}")
    for layer in decoder_of(model).layers:
        layer.self_attn.dropout = p
    return model
