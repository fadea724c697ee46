"""Trains a tiny LoRA model for a few steps; run alone or under torchrun (see test_train.py)."""

import sys

import torch

from llm2vec_mini import LlamaConfig, LlamaForCausalLM
from llm2vec_mini.distributed import init_distributed, world
from llm2vec_mini.lora import add_lora
from llm2vec_mini.mntp import MNTPCollator, MNTPTask
from llm2vec_mini.simcse import SimCSETask
from llm2vec_mini.train import TrainConfig, train


def main(task_name: str, batch_size: int, out: str) -> None:
    init_distributed("cpu")
    torch.manual_seed(0)
    model = add_lora(LlamaForCausalLM(LlamaConfig.tiny()).set_causal(False), r=4, alpha=8, dropout=0.0)
    gen = torch.Generator().manual_seed(1)
    if task_name == "mntp":
        blocks = torch.randint(3, 256, (64, 16), generator=gen)
        task = MNTPTask(model, blocks, MNTPCollator(mask_id=5, vocab_size=256, special_ids=[0, 1, 2]))
    else:
        lengths = torch.randint(3, 12, (64,), generator=gen).tolist()
        sentences = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in lengths]
        task = SimCSETask(model, sentences, pad_id=2)
    cfg = TrainConfig(steps=4, batch_size=batch_size, lr=1e-2, warmup_steps=1, progress=False, seed=3)
    train(task, cfg, out)
    if world()[0] == 0:
        print("done")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
