"""The two training recipes, from files to a PEFT adapter: what `train-mntp` and `train-simcse` run.

    MNTP:   base model -> bidirectional -> LoRA -> masked next-token prediction on text blocks
    SimCSE: base model + MNTP adapter (merged) -> bidirectional -> attention dropout -> new LoRA
            -> unsupervised SimCSE on sentences

Defaults are the paper's Sheared-LLaMA settings (train.TrainConfig and the CLI); `make reproduce`
scales them down for a CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from .convert.hf import load_pretrained, save_hf_metadata
from .data import read_lines
from .encoder import DEFAULTS, write_settings
from .errors import ConfigError, DataError
from .lora import add_lora, save_adapter
from .mntp import MNTPCollator, choose_mask_token, group_texts
from .train import MNTPTask, SimCSETask, TrainConfig, init_distributed, train, world


def _paragraphs(files: Sequence) -> list[str]:
    """Non-blank lines of text files (WikiText: one paragraph per line, headings included)."""
    lines = [line for f in files for line in read_lines(f, strip=True, skip_empty=True)]
    if not lines:
        raise DataError(f"no text in {', '.join(map(str, files))}")
    return lines


def mntp_task(model, tokenizer, texts: Sequence[str], block_size: int = 512, mask_ratio: float = 0.2,
              all_mask: bool = False, max_blocks: Optional[int] = None) -> MNTPTask:
    """Tokenise (with the tokenizer's own bos/eos), concatenate, cut into blocks, and mask."""
    blocks = group_texts(tokenizer.encode_batch(list(texts), add_special_tokens=True), block_size)
    if max_blocks is not None:
        if max_blocks < 1:
            raise ConfigError(f"max_blocks must be at least 1, got {max_blocks}")
        blocks = blocks[:max_blocks]
    specials = [i for i in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) if i is not None]
    collator = MNTPCollator(mask_id=choose_mask_token(tokenizer), vocab_size=model.config.vocab_size,
                            special_ids=specials, mask_ratio=mask_ratio, all_mask=all_mask)
    return MNTPTask(model, blocks, collator)


def simcse_task(model, tokenizer, sentences: Sequence[str], max_length: int = 128,
                pooling: str = "mean", scale: float = 20.0) -> SimCSETask:
    """Tokenise each sentence (cut to max_length tokens) as the encoder reads it: padded with eos,
    and for eos_token pooling with the eos token written after the text."""
    if max_length < 2:
        raise ConfigError(f"max_length must be at least 2, got {max_length}")
    if pooling == "eos_token":  # the eos token written after the text, as LLM2Vec.encode does
        if tokenizer.eos_id is None:
            raise ConfigError("pooling 'eos_token' needs a tokenizer with an eos token")
        eos = tokenizer.id_to_token(tokenizer.eos_id)
        sentences = [f"{s.strip()} {eos}" for s in sentences]
    ids = [s[:max_length] for s in tokenizer.encode_batch(list(sentences), add_special_tokens=True)]
    pad = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.pad_id
    bos = tokenizer.bos_id if tokenizer.add_bos else None
    return SimCSETask(model, ids, pad_id=pad, pooling=pooling, scale=scale, bos_id=bos)


def set_attention_dropout(model, p: float):
    """SimCSE's views differ by dropout: LLM2Vec uses 0.3 on the attention probabilities."""
    if not 0 <= p < 1:
        raise ConfigError(f"attention dropout must be in [0, 1), got {p!r}")
    for layer in getattr(model, "model", model).layers:
        layer.self_attn.dropout = p
    return model


def train_mntp(model_path, data_files: Sequence, out_dir, cfg: TrainConfig, lora=(16, 32.0, 0.05),
               resume: bool = False, max_blocks: Optional[int] = None) -> Path:
    init_distributed(cfg.device)
    model, tokenizer = load_pretrained(model_path, dtype=torch.float32)
    model.set_causal(False).to(cfg.device)
    torch.manual_seed(cfg.seed)  # the adapter's initial values: the same seed, the same adapter
    add_lora(model, r=lora[0], alpha=lora[1], dropout=lora[2])
    extra = cfg.extra
    task = mntp_task(model, tokenizer, _paragraphs(data_files), extra.get("block_size", 512),
                     extra.get("mask_ratio", 0.2), extra.get("all_mask", False), max_blocks)
    out = train(task, cfg, out_dir, resume=resume)
    if world()[0] == 0:
        # The Hub's LLM2Vec-*-mntp layout: the adapter, naming its base model, beside the base's
        # config.json and tokenizer, so that the official LLM2Vec.from_pretrained(out) loads it too
        save_adapter(model, out, base_model_name_or_path=str(Path(model_path).resolve()))
        save_hf_metadata(model.config, tokenizer, out)
    return out


def train_simcse(model_path, adapters: Sequence, data_file, out_dir, cfg: TrainConfig,
                 lora=(16, 32.0, 0.05), resume: bool = False, max_sentences: Optional[int] = None) -> Path:
    init_distributed(cfg.device)
    model, tokenizer = load_pretrained(model_path, adapters=adapters, dtype=torch.float32)
    model.set_causal(False).to(cfg.device)
    extra = cfg.extra
    set_attention_dropout(model, extra.get("attention_dropout", 0.3))
    torch.manual_seed(cfg.seed)  # the adapter's initial values
    add_lora(model, r=lora[0], alpha=lora[1], dropout=lora[2])
    sentences = [s for s in read_lines(data_file) if s]
    if max_sentences is not None:
        sentences = sentences[:max_sentences]
    if not sentences:
        raise DataError(f"no sentences to train on in {data_file}"
                        + (f" (--max-sentences {max_sentences})" if max_sentences is not None else ""))
    task = simcse_task(model, tokenizer, sentences, extra.get("max_length", 128),
                       extra.get("pooling", "mean"), extra.get("scale", 20.0))
    out = train(task, cfg, out_dir, resume=resume)
    if world()[0] == 0:  # the base model's name, and the pooling it was trained for (encoder settings)
        save_adapter(model, out, base_model_name_or_path=str(Path(model_path).resolve()))
        write_settings(out, dict(DEFAULTS, pooling_mode=extra.get("pooling", "mean")))
    return out
