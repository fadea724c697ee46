"""e08, wrong: the LoRA update scaled by alpha instead of alpha / r."""

import torch
from torch import nn

from llm2vec_mini.kit.reference import *  # noqa: F403  (every other exercise: the reference)


class LoRALinear(nn.Module):
    def __init__(self, weight, r, alpha):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.lora_A = nn.Linear(weight.shape[1], r, bias=False)
        self.lora_B = nn.Linear(r, weight.shape[0], bias=False)
        nn.init.zeros_(self.lora_B.weight)
        self.r, self.alpha, self.merged = r, alpha, False

    def forward(self, x):
        if self.merged:
            return x @ self.weight.T
        return x @ self.weight.T + self.alpha * self.lora_B(self.lora_A(x))  # the bug: alpha, not alpha / r

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.weight += self.alpha * self.lora_B.weight @ self.lora_A.weight
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight -= self.alpha * self.lora_B.weight @ self.lora_A.weight
            self.merged = False
