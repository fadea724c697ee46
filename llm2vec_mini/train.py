"""One small, generic trainer for LLM2Vec's two training steps: MNTP (step 2) and SimCSE (step 3).

It trains the LoRA parameters of `task.model` (and any other parameter left trainable, such as the
lm_head of `mntp.unfreeze_lm_head`) with AdamW, linear warm-up then linear decay, gradient
accumulation and clipping, and knows nothing of either objective. The defaults are the official
recipe's (transformers' Trainer: AdamW betas (0.9, 0.999), eps 1e-8, weight decay 0, clipping at 1.0,
linear decay, no warm-up), and tests/reference/test_official_training.py checks, step by step, that a
run here follows the path of one through transformers' Trainer with peft and the official classes.
A task (mntp.MNTPTask, simcse.SimCSETask) is a module with:

    task.model                           the LlamaForCausalLM with LoRA layers (lora.add_lora)
    len(task)                            the number of examples
    task.make_batch(indices, generator)  the global batch of those examples (tensors)
    task(batch)                          the loss of the global batch: the same value on every
                                         process, its gradient covering this process's examples

Every random choice (which examples, which tokens to mask, dropout) is drawn from generators seeded by
the tuple (seed, step, micro-batch), never from a running stream, so a run stopped after a checkpoint
and resumed with `resume=True` ends with the same adapter as an uninterrupted run, bit for bit on a CPU.

Several processes (`torchrun --nproc_per_node=N`): each takes its slice of the same global batch and
DistributedDataParallel averages the gradients; the trainer multiplies the loss by N before backward,
so that N processes with batch b take the same steps as one process with batch N·b.

References:
1) Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (AdamW), 2019, https://arxiv.org/abs/1711.05101
2) BehnamGhader et al., "LLM2Vec", 2024, https://arxiv.org/abs/2404.05961, Appendix D.1.1-D.1.2
   (steps, batch, LoRA; the optimizer settings are the official configs' and the Hugging Face
   Trainer's defaults)
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from .convert.peft import load_adapter, save_adapter
from .convert.safetensors import load_file, save_file
from .distributed import world
from .errors import CheckpointError, ConfigError, DataError, TrainingError
from .lora import lora_layers
from .precision import compute_dtype, set_compute_dtype
from .util import decoder_of, derive_seed, generator, is_int, read_json

DTYPES = ("float32", "bfloat16", "auto")


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps
    batch_size: int = 32  # examples per optimizer step, per process (before accumulation split)
    grad_accum: int = 1  # micro-batches per step; each has batch_size // grad_accum examples
    lr: float = 5e-5  # peak learning rate (SimCSE: 3e-5)
    warmup_steps: int = 0  # linear warm-up from 0 to lr
    # the step at which the linear decay reaches 0 (0: `steps`). The official scripts decay over 3
    # epochs and stop early (stop_after_n_steps), so their lr hardly decays: decay_steps > steps
    decay_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # clip the global gradient norm (0 disables)
    seed: int = 42
    checkpoint_every: int = 0  # save output_dir/checkpoint-{step} every N steps (0: only at the end)
    gradient_checkpointing: bool = False
    device: str = "cpu"
    # the matrix products' dtype: "float32", "bfloat16" (the projections in bf16, the rest fp32:
    # precision.py), or "auto" (bf16 where a probe finds it faster here; the paper trained in bf16)
    dtype: str = "float32"
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
        for name in ("warmup_steps", "checkpoint_every", "decay_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if 0 < self.decay_steps < self.steps:
            raise ConfigError(f"decay_steps ({self.decay_steps}) must be 0 (= steps) or at least steps "
                              f"({self.steps}): the lr would reach 0 before the run ends")
        if not self.max_grad_norm >= 0:
            raise ConfigError(f"max_grad_norm must be 0 (off) or positive, got {self.max_grad_norm}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


def batch_indices(n: int, size: int, k: int, seed: int) -> list[int]:
    """The k-th batch of `size` indices from an endless stream of seeded permutations of range(n)."""
    out, perms = [], {}
    for p in range(k * size, (k + 1) * size):
        epoch = p // n
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=generator("order", seed, epoch))
        out.append(int(perms[epoch][p % n]))
    return out


# -------------------------------------------------------------------------------------------------

EXTRA_FILE = "trainable.safetensors"  # a checkpoint's trainable parameters that are not LoRA's


def trainable_extras(model: nn.Module) -> dict:
    """Trainable parameters outside the LoRA layers (e.g. lm_head), by name: the adapter file does not
    hold them, so a checkpoint keeps them beside it."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad and ".lora_" not in name}


def _save_checkpoint(task, optimizer, step, out: Path, cfg: TrainConfig, metrics_path: Path):
    ckpt = out / f"checkpoint-{step}"
    tmp = out / f".checkpoint-{step}.tmp"
    save_adapter(task.model, tmp)
    extras = trainable_extras(task.model)
    if extras:
        save_file({k: p.detach().cpu().contiguous() for k, p in extras.items()}, tmp / EXTRA_FILE)
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


def _load_extras(model: nn.Module, ckpt: Path) -> None:
    """Put a checkpoint's non-LoRA trainable parameters back (see `trainable_extras`)."""
    extras = trainable_extras(model)
    saved = load_file(ckpt / EXTRA_FILE) if (ckpt / EXTRA_FILE).exists() else {}
    if set(saved) != set(extras):
        raise CheckpointError(f"the checkpoint holds the trainable parameters {sorted(saved)}, this run "
                              f"trains {sorted(extras)} besides LoRA (another --train-lm-head?)", ckpt)
    with torch.no_grad():
        for name, p in extras.items():
            if tuple(saved[name].shape) != tuple(p.shape):
                raise CheckpointError(f"{name}: saved shape {tuple(saved[name].shape)}, the model's "
                                      f"{tuple(p.shape)}", ckpt / EXTRA_FILE)
            p.copy_(saved[name])


def latest_checkpoint(out_dir) -> Optional[Path]:
    found = [(int(p.name.split("-")[1]), p) for p in Path(out_dir).glob("checkpoint-*")
             if p.name.split("-")[1].isdigit() and (p / "trainer_state.json").exists()]
    return max(found)[1] if found else None


# What a finished or interrupted run leaves in its output folder.
RUN_FILES = ("metrics.jsonl", "adapter_config.json", "adapter_model.safetensors")


def previous_run(out_dir) -> list[str]:
    """The files and checkpoints of an earlier run in `out_dir` (empty for a new or empty folder)."""
    out = Path(out_dir)
    found = [name for name in RUN_FILES if (out / name).exists()]
    return found + sorted(p.name for p in out.glob("checkpoint-*"))


def train(task: nn.Module, cfg: TrainConfig, output_dir, resume: bool = False, overwrite: bool = False,
          stop_after: Optional[int] = None, on_step: Optional[Callable[[dict], None]] = None,
          base_model_name_or_path: Optional[str] = None) -> Path:
    """Train the LoRA parameters of `task.model`; write the adapter to `output_dir` and return it.

    resume: continue from the latest checkpoint in output_dir. A folder that holds an earlier run is
    refused unless `resume` (with a checkpoint to resume from) or `overwrite` (start over: its
    checkpoints and log are deleted) says what to do with it.
    stop_after: end (as if interrupted) after this step, leaving its checkpoint (for tests and budgets).
    base_model_name_or_path: recorded in the adapter's adapter_config.json.
    """
    cfg.validate()
    rank, world_size = world()
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"the output folder {out} is a file")
    metrics_path = out / "metrics.jsonl"
    model = task.model
    if len(task) == 0:
        raise DataError("nothing to train on: the task has no examples")
    if not lora_layers(model):
        raise ConfigError("the model has no LoRA layers: call lora.add_lora(model, ...) first")
    ckpt = latest_checkpoint(out) if resume else None
    earlier = previous_run(out)
    if ckpt is None and earlier and not overwrite:
        what = "nothing to resume from (no complete checkpoint-N)" if resume else "it holds an earlier run"
        raise ConfigError(f"{out}: {what}: {', '.join(earlier[:4])}{', ...' if len(earlier) > 4 else ''}; "
                          f"pass --resume to continue that run or --overwrite to start over")
    decoder_of(model).gradient_checkpointing = cfg.gradient_checkpointing
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    horizon = cfg.decay_steps or cfg.steps

    def lr_at(step):  # linear warm-up, then linear decay to 0 at `horizon` (transformers' "linear")
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        return max(0.0, (horizon - step) / max(1, horizon - cfg.warmup_steps))

    start = 0
    if ckpt is not None:
        state = read_json(ckpt / "trainer_state.json", error=CheckpointError, expect=dict)
        for key in ("step", "metrics_lines"):
            if not (is_int(state.get(key)) and state[key] >= 0):
                raise CheckpointError(f"{key} must be a non-negative integer, got {state.get(key)!r:.80}",
                                      ckpt / "trainer_state.json")
        load_adapter(model, ckpt)  # replaces the LoRA weights with the saved ones
        _load_extras(model, ckpt)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        try:
            optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        except Exception as e:  # unpickling refused, a truncated file, states that do not fit the LoRA layers
            raise CheckpointError(f"cannot restore the optimizer ({type(e).__name__}: "
                                  f"{' '.join(str(e).split())[:200]})", ckpt / "optimizer.pt") from None
        start = state["step"]
        if rank == 0 and metrics_path.exists():  # drop log lines written after that checkpoint
            lines = metrics_path.read_text().splitlines(keepends=True)[: state["metrics_lines"]]
            metrics_path.write_text("".join(lines))
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if start == 0:  # a fresh run (overwrite): a fresh log, no old checkpoint to resume into it
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
    # with bf16, every block's projections in bf16 until the end of training, then the plain fp32
    # model again. Unlike the encoder, training keeps no block fp32 for the massive activations: on
    # SmolLM2 (demo recipe) the MNTP losses stay within 0.3 % of fp32's either way (precision.py)
    set_compute_dtype(model, compute_dtype(cfg.dtype, cfg.device), keep_fp32=[])
    try:
        for step in range(start, min(cfg.steps, last)):
            t0 = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * lr_at(step)
            optimizer.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for m in range(cfg.grad_accum):
                # every draw is seeded by the tuple (seed, step, m): which examples, which tokens to mask
                # (the generator), and dropout (the global seed); the same on every process
                idx = batch_indices(len(task), global_micro, step * cfg.grad_accum + m, cfg.seed)
                full = task.make_batch(idx, generator("batch", cfg.seed, step, m))  # the global batch
                batch = tuple(t[rank * micro:(rank + 1) * micro].to(cfg.device) for t in full)
                torch.manual_seed(derive_seed("dropout", cfg.seed, step, m))
                loss = runner(batch)  # the global batch's loss, the same on every process
                _stop_unless_finite(loss.detach(), "loss", step, out)  # before backward: no rank waits
                # DDP averages the gradients over processes, each of which covers its own examples: undo
                # the average (times world_size), and average over the micro-batches
                (loss * world_size / cfg.grad_accum).backward()
                loss_sum += (loss / cfg.grad_accum).item()
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
    finally:
        set_compute_dtype(model, torch.float32)
        if bar is not None:
            bar.close()
    if rank == 0 and (stop_after is None or stop_after >= cfg.steps):
        save_adapter(model, out, base_model_name_or_path=base_model_name_or_path)
    elif rank == 0 and not (cfg.checkpoint_every and min(cfg.steps, last) % cfg.checkpoint_every == 0):
        _save_checkpoint(task, optimizer, min(cfg.steps, last), out, cfg, metrics_path)
    return out
