"""One small trainer for LLM2Vec's two training steps: MNTP (step 2) and SimCSE (step 3).

Both train only LoRA adapters with AdamW, linear warm-up then linear decay, gradient accumulation and
clipping. Every random choice (which examples, which tokens to mask, dropout) is drawn from generators
seeded by (seed, step), never from a running stream, so a run stopped after a checkpoint and resumed
with `resume=True` ends with the same adapter as an uninterrupted run, bit for bit on a CPU.

Several processes (`torchrun --nproc_per_node=N`): each takes its slice of the same global batch, the
contrastive loss sees the all-gathered embeddings, and DistributedDataParallel averages gradients; the
losses are written as global means times the world size so that N processes with batch b take the
same steps as one process with batch N·b.

References:
1) Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (AdamW), 2019, https://arxiv.org/abs/1711.05101
2) BehnamGhader et al., "LLM2Vec", 2024, https://arxiv.org/abs/2404.05961, Appendix D (the settings)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from .errors import ConfigError, DataError, TrainingError
from .lora import lora_layers, load_adapter, save_adapter
from .mntp import IGNORE, MNTPCollator, mntp_loss
from .pooling import pool
from .simcse import unsup_simcse_loss


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps
    batch_size: int = 32  # examples per optimizer step, per process (before accumulation split)
    grad_accum: int = 1  # micro-batches per step; each has batch_size // grad_accum examples
    lr: float = 5e-5  # peak learning rate (SimCSE: 3e-5)
    warmup_steps: int = 0  # linear warm-up from 0 to lr
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # clip the global gradient norm (0 disables)
    seed: int = 42
    checkpoint_every: int = 0  # save output_dir/checkpoint-{step} every N steps (0: only at the end)
    gradient_checkpointing: bool = False
    device: str = "cpu"
    bf16: bool = False  # bf16 autocast (GPUs; the paper trained in bf16)
    progress: bool = True  # a tqdm bar with loss and speed
    extra: dict = field(default_factory=dict)  # task settings, saved with the checkpoint

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"batch_size ({self.batch_size}) must be divisible by grad_accum "
                              f"({self.grad_accum})")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        for name in ("warmup_steps", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if not self.max_grad_norm >= 0:
            raise ConfigError(f"max_grad_norm must be 0 (off) or positive, got {self.max_grad_norm}")
        if self.bf16 and not self.device.startswith("cuda"):
            raise ConfigError("bf16 autocast is for GPUs; on a CPU train in fp32 (bf16 matmul is far slower)")


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def batch_indices(n: int, size: int, k: int, seed: int) -> list[int]:
    """The k-th batch of `size` indices from an endless stream of seeded permutations of range(n)."""
    out, perms = [], {}
    for p in range(k * size, (k + 1) * size):
        epoch = p // n
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        out.append(int(perms[epoch][p % n]))
    return out


def _step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 1_009 + micro)


# -------------------------------------------------------------------------------------------------
# The two tasks: each turns global example indices into a batch, and a batch into a loss.

class MNTPTask(nn.Module):
    """Masked next-token prediction on token blocks (n_blocks, block_size)."""

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
        # the global mean over masked tokens: local sum / global count (counts differ by process)
        count = (labels[:, 1:] != IGNORE).sum().to(torch.float32)
        if world()[1] > 1:
            dist.all_reduce(count)
        return mntp_loss(hidden, labels, self.model.lm_head, n_labels=count) * world()[1]


class SimCSETask(nn.Module):
    """Unsupervised SimCSE on tokenised sentences: the same batch twice, dropout makes the views."""

    def __init__(self, model: nn.Module, sentences: list, pad_id: int, pooling: str = "mean",
                 scale: float = 20.0, bos_id: Optional[int] = None):
        super().__init__()
        self.model, self.sentences, self.pad_id = model, sentences, pad_id
        self.pooling, self.scale, self.bos_id = pooling, scale, bos_id

    def __len__(self):
        return len(self.sentences)

    def make_batch(self, indices, generator):
        seqs = [self.sentences[i] for i in indices]
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(seqs), T, dtype=torch.long)
        for b, s in enumerate(seqs):  # left padding, as LLM2Vec encodes
            ids[b, T - len(s):] = torch.tensor(s)
            mask[b, T - len(s):] = 1
        return ids, mask

    def embed(self, ids, mask):
        # pool the text's tokens, as LLM2Vec.encode does: not the padding, not a leading bos
        text = mask if self.bos_id is None else mask * (ids != self.bos_id)
        return pool(self.model.model(ids, mask), mask, text, self.pooling)  # (B, H)

    def forward(self, batch):
        ids, mask = batch
        e1, e2 = self.embed(ids, mask), self.embed(ids, mask)  # two dropout views
        return unsup_simcse_loss(e1, e2, self.scale) * world()[1]  # global mean, see module doc


# -------------------------------------------------------------------------------------------------

def _save_checkpoint(task, optimizer, step, out: Path, cfg: TrainConfig, metrics_path: Path):
    ckpt = out / f"checkpoint-{step}"
    tmp = out / f".checkpoint-{step}.tmp"
    save_adapter(task.model, tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    state = {"step": step, "config": asdict(cfg),
             "metrics_lines": sum(1 for _ in open(metrics_path)) if metrics_path.exists() else 0}
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
    if ckpt.exists():
        shutil.rmtree(ckpt)
    tmp.rename(ckpt)  # a checkpoint appears whole or not at all
    return ckpt


def _stop_unless_finite(value: torch.Tensor, what: str, step: int, out: Path) -> None:
    """TrainingError if `value` is NaN or infinite on any process (every process agrees, so none is
    left waiting in a collective); the last good checkpoint stays as it was."""
    finite = torch.isfinite(value).to(torch.float32).reshape(1)
    if world()[1] > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not bool(finite):
        raise TrainingError(f"the {what} became {value.item()} at step {step + 1}; the last good "
                            f"checkpoint is {latest_checkpoint(out)} (lower the lr?)")


def latest_checkpoint(out_dir) -> Optional[Path]:
    found = [(int(p.name.split("-")[1]), p) for p in Path(out_dir).glob("checkpoint-*")
             if p.name.split("-")[1].isdigit() and (p / "trainer_state.json").exists()]
    return max(found)[1] if found else None


def train(task: nn.Module, cfg: TrainConfig, output_dir, resume: bool = False,
          stop_after: Optional[int] = None, on_step: Optional[Callable[[dict], None]] = None) -> Path:
    """Train the LoRA parameters of `task.model`; write the adapter to `output_dir` and return it.

    stop_after: end (as if interrupted) after this step, leaving its checkpoint (for tests and budgets).
    """
    cfg.validate()
    rank, world_size = world()
    out = Path(output_dir)
    metrics_path = out / "metrics.jsonl"
    model = task.model
    if len(task) == 0:
        raise DataError("nothing to train on: the task has no examples")
    if not lora_layers(model):
        raise ConfigError("the model has no LoRA layers: call lora.add_lora(model, ...) first")
    model.model.gradient_checkpointing = cfg.gradient_checkpointing
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def lr_at(step):  # linear warm-up, then linear decay to 0 at cfg.steps
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        return max(0.0, (cfg.steps - step) / max(1, cfg.steps - cfg.warmup_steps))

    start = 0
    if resume and (ckpt := latest_checkpoint(out)) is not None:
        state = json.loads((ckpt / "trainer_state.json").read_text())
        load_adapter(model, ckpt)  # replaces the LoRA weights with the saved ones
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        start = state["step"]
        if rank == 0 and metrics_path.exists():  # drop log lines written after that checkpoint
            lines = metrics_path.read_text().splitlines(keepends=True)[: state["metrics_lines"]]
            metrics_path.write_text("".join(lines))
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if start == 0:  # a fresh run starts a fresh log, and no old checkpoint can be resumed into it
            metrics_path.unlink(missing_ok=True)
            for old in out.glob("checkpoint-*"):
                shutil.rmtree(old)

    runner = task
    if world_size > 1:
        runner = nn.parallel.DistributedDataParallel(task, device_ids=None if cfg.device == "cpu" else
                                                     [torch.device(cfg.device).index])
    model.train()
    micro = cfg.batch_size // cfg.grad_accum
    global_micro = micro * world_size
    bar = None
    if cfg.progress and rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, initial=start, desc=type(task).__name__.replace("Task", ""),
                   dynamic_ncols=True)
    last = stop_after if stop_after is not None else cfg.steps
    for step in range(start, min(cfg.steps, last)):
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_at(step)
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for m in range(cfg.grad_accum):
            gen = _step_generator(cfg.seed, step, m)
            idx = batch_indices(len(task), global_micro, step * cfg.grad_accum + m, cfg.seed)
            full = task.make_batch(idx, gen)  # the global batch, identical on every process
            batch = tuple(t[rank * micro:(rank + 1) * micro].to(cfg.device) for t in full)
            torch.manual_seed(cfg.seed * 7919 + step * 31 + m)  # dropout masks depend on the step only
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.bf16):
                loss = runner(batch) / cfg.grad_accum
            _stop_unless_finite(loss.detach(), "loss", step, out)  # before backward: no rank waits
            loss.backward()
            loss_sum += loss.item() / world_size
        # the gradient norm (clipped to max_grad_norm, or only measured): a finite loss can still
        # give infinite gradients (an overflow), which must not reach the weights or a checkpoint
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
        _stop_unless_finite(grad_norm, "gradient norm", step, out)
        optimizer.step()
        done = step + 1
        record = {"step": done, "loss": loss_sum, "lr": cfg.lr * lr_at(step),
                  "grad_norm": float(grad_norm), "seconds": time.perf_counter() - t0}
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if bar is not None:
                bar.set_postfix(loss=f"{loss_sum:.4f}", s_per_step=f"{record['seconds']:.2f}")
                bar.update(1)
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                _save_checkpoint(task, optimizer, done, out, cfg, metrics_path)
        if on_step is not None:
            on_step(record)
        if world_size > 1:
            dist.barrier()
    if bar is not None:
        bar.close()
    if rank == 0 and (stop_after is None or stop_after >= cfg.steps):
        save_adapter(model, out)
    elif rank == 0 and not (cfg.checkpoint_every and min(cfg.steps, last) % cfg.checkpoint_every == 0):
        _save_checkpoint(task, optimizer, min(cfg.steps, last), out, cfg, metrics_path)
    return out


def init_distributed(device: str = "cpu") -> bool:
    """Join the process group when launched by torchrun (gloo on CPU, NCCL on GPUs)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True
