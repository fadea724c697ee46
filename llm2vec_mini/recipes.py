"""LLM2Vec's two training stages as functions: what the CLI, the demo and tutorial 08 all call.

    MNTP (step 2):   model -> bidirectional -> a fresh LoRA adapter -> masked next-token prediction
    SimCSE (step 3): model with the MNTP adapter merged into its weights -> bidirectional ->
                     attention dropout -> a fresh LoRA adapter -> unsupervised SimCSE

`mntp_stage` and `simcse_stage` work on a model in memory (the demo runs them back to back on one
model); `train_mntp` and `train_simcse` load the model from files first and write the folders the
official library loads too (`train-mntp` and `train-simcse`). Each stage draws the adapter's initial
values from the training seed, so the same seed and settings give the same adapter on every path.
Defaults are the official Sheared-LLaMA configs (`train_configs/{mntp,simcse}/Sheared-Llama.json`): the
paper gives the steps (1,000), the MNTP batch (32), the mask ratio and LoRA's r and alpha (Sec. 2.2,
Appendix D.1.1-D.1.2); the learning rates, block sizes, SimCSE's scale and batch (128, where the paper
says 32 for S-LLaMA) come from the configs. `make demo` and `make reproduce` scale them down for a CPU
(demo.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .convert.hf import load_pretrained, save_hf_metadata
from .data import read_lines
from .distributed import init_distributed, world
from .encoder import DEFAULTS, write_settings
from .errors import DataError
from .lora import add_lora, merge_and_unload
from .mntp import mntp_task, unfreeze_lm_head
from .simcse import set_attention_dropout, simcse_task
from .train import TrainConfig, train


@dataclass
class LoRASettings:
    r: int = 16  # rank of each adapter
    alpha: float = 32.0  # scale = alpha / r
    dropout: float = 0.05  # dropout on the adapter's input


@dataclass
class MNTPSettings:
    block_size: int = 512  # tokens per training block
    mask_ratio: float = 0.2  # share of the tokens chosen for prediction
    all_mask: bool = False  # always the mask token (no 80/10/10)
    max_blocks: Optional[int] = None  # use at most this many blocks
    train_lm_head: bool = False  # also train lm_head, as the official run does (mntp.unfreeze_lm_head)


@dataclass
class SimCSESettings:
    max_length: int = 128  # tokens per sentence
    pooling: str = "mean"  # the pooling the adapter is trained (and later encoded) with
    scale: float = 20.0  # 1 / temperature
    attention_dropout: float = 0.3  # what makes the two views differ
    pool_all_positions: bool = False  # pool the padded row, as the official training does (simcse.py)


def mntp_stage(model: nn.Module, tokenizer, texts: Sequence[str], cfg: TrainConfig, out_dir,
               mntp: MNTPSettings = MNTPSettings(), lora: LoRASettings = LoRASettings(),
               resume: bool = False, overwrite: bool = False,
               base_model_name_or_path: Optional[str] = None,
               on_step: Optional[Callable[[dict], None]] = None) -> Path:
    """LLM2Vec step 2 on `model` (a LlamaForCausalLM) in memory; writes the adapter to `out_dir`.

    The model becomes bidirectional and gets LoRA layers (initial values drawn from `cfg.seed`),
    which stay attached and trained afterwards.
    """
    model.set_causal(False).to(cfg.device)
    torch.manual_seed(cfg.seed)  # the adapter's initial values: the same seed, the same adapter
    add_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout)
    if mntp.train_lm_head:
        unfreeze_lm_head(model)
    task = mntp_task(model, tokenizer, texts, mntp.block_size, mntp.mask_ratio, mntp.all_mask,
                     mntp.max_blocks)
    cfg = replace(cfg, extra={"mntp": asdict(mntp), "lora": asdict(lora)})  # recorded in checkpoints
    return train(task, cfg, out_dir, resume=resume, overwrite=overwrite, on_step=on_step,
                 base_model_name_or_path=base_model_name_or_path)


def simcse_stage(model: nn.Module, tokenizer, sentences: Sequence[str], cfg: TrainConfig, out_dir,
                 simcse: SimCSESettings = SimCSESettings(), lora: LoRASettings = LoRASettings(),
                 resume: bool = False, overwrite: bool = False,
                 base_model_name_or_path: Optional[str] = None,
                 on_step: Optional[Callable[[dict], None]] = None) -> Path:
    """LLM2Vec step 3 on `model` in memory; writes the adapter to `out_dir`.

    LoRA layers already attached (the MNTP stage's) are merged into the weights first, as LLM2Vec
    trains SimCSE on the MNTP-merged model; then a fresh adapter (initial values drawn from
    `cfg.seed`) is trained with attention dropout on, and stays attached.
    """
    merge_and_unload(model)
    model.set_causal(False).to(cfg.device)
    set_attention_dropout(model, simcse.attention_dropout)
    torch.manual_seed(cfg.seed)  # the adapter's initial values
    add_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout)
    task = simcse_task(model, tokenizer, sentences, simcse.max_length, simcse.pooling, simcse.scale,
                       simcse.pool_all_positions)
    cfg = replace(cfg, extra={"simcse": asdict(simcse), "lora": asdict(lora)})
    out = train(task, cfg, out_dir, resume=resume, overwrite=overwrite, on_step=on_step,
                base_model_name_or_path=base_model_name_or_path)
    set_attention_dropout(model, 0.0)  # dropout was for training; the model encodes without it
    return out


# -------------------------------------------------------------------------------------------------
# From files to adapter folders: `train-mntp` and `train-simcse`

def _paragraphs(files: Sequence) -> list[str]:
    """Non-blank lines of text files (WikiText: one paragraph per line, headings included)."""
    lines = [line for f in files for line in read_lines(f, strip=True, skip_empty=True)]
    if not lines:
        raise DataError(f"no text in {', '.join(map(str, files))}")
    return lines


def train_mntp(model_path, data_files: Sequence, out_dir, cfg: TrainConfig,
               mntp: MNTPSettings = MNTPSettings(), lora: LoRASettings = LoRASettings(),
               resume: bool = False, overwrite: bool = False) -> Path:
    """MNTP on a model file (HF folder or GGUF) and text files; the output folder is laid out as the
    Hub's LLM2Vec-*-mntp repositories: the adapter, naming its base model, beside the base's
    config.json and tokenizer, so that the official `LLM2Vec.from_pretrained(out)` loads it too."""
    init_distributed(cfg.device)
    model, tokenizer = load_pretrained(model_path, dtype=torch.float32)
    base = str(Path(model_path).resolve())
    out = mntp_stage(model, tokenizer, _paragraphs(data_files), cfg, out_dir, mntp, lora, resume,
                     overwrite, base_model_name_or_path=base)
    if world()[0] == 0:
        save_hf_metadata(model.config, tokenizer, out)
    return out


def train_simcse(model_path, adapters: Sequence, data_file, out_dir, cfg: TrainConfig,
                 simcse: SimCSESettings = SimCSESettings(), lora: LoRASettings = LoRASettings(),
                 resume: bool = False, overwrite: bool = False, max_sentences: Optional[int] = None) -> Path:
    """SimCSE on a model file with its MNTP adapter(s) merged, and a file of sentences (one per line).
    The output folder holds the adapter and the encoder settings it was trained for."""
    init_distributed(cfg.device)
    model, tokenizer = load_pretrained(model_path, adapters=adapters, dtype=torch.float32)
    sentences = [s for s in read_lines(data_file) if s]
    if max_sentences is not None:
        sentences = sentences[:max_sentences]
    if not sentences:
        raise DataError(f"no sentences to train on in {data_file}"
                        + (f" (--max-sentences {max_sentences})" if max_sentences is not None else ""))
    out = simcse_stage(model, tokenizer, sentences, cfg, out_dir, simcse, lora, resume, overwrite,
                       base_model_name_or_path=str(Path(model_path).resolve()))
    if world()[0] == 0:  # the pooling it was trained for, as encoder settings
        write_settings(out, dict(DEFAULTS, pooling_mode=simcse.pooling))
    return out
