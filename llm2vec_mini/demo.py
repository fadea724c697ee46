"""The main job behind `make demo`: watch a decoder's attention switch from causal to bidirectional.

Step 1 of LLM2Vec (paper Sec. 2.1) on a tiny random Llama: change one later token and see which
earlier positions notice. With causal attention none do; with the switch off, all of them do.
"""

from __future__ import annotations

import torch

from .config import LlamaConfig
from .model import LlamaModel, build_attention_mask


def _mask_picture(causal: bool, padding: list[int]) -> str:
    mask = build_attention_mask(torch.tensor([padding]), len(padding), causal, torch.float32)
    visible = (mask[0, 0] == 0) if mask is not None else torch.ones(len(padding), len(padding), dtype=torch.bool)
    rows = ["".join("#" if v else "." for v in row.tolist()) for row in visible]
    return "\n".join(f"    query {i}: {r}" for i, r in enumerate(rows))


def show_bidirectional_switch(seed: int = 0, length: int = 8, changed: int = 5) -> dict:
    """Change token `changed` and report, per position, how far each hidden state moves."""
    torch.manual_seed(seed)
    model = LlamaModel(LlamaConfig.tiny()).eval()
    ids = torch.randint(3, model.config.vocab_size, (1, length))
    other = ids.clone()
    other[0, changed] = (ids[0, changed] + 1) % model.config.vocab_size
    moves = {}
    for causal in (True, False):
        model.set_causal(causal)
        with torch.no_grad():
            moves[causal] = (model(ids) - model(other)).norm(dim=-1)[0].tolist()  # (T,)
    return {"changed": changed, "causal": moves[True], "bidirectional": moves[False]}


def run_demo(args) -> int:
    print("llm2vec-mini demo: step 1 of LLM2Vec, the bidirectional switch, on a tiny random Llama\n")
    padding = [0, 0, 1, 1, 1, 1]
    print("Which keys (#) each query sees, two left pads then four tokens:")
    print("  causal (a decoder):")
    print(_mask_picture(True, padding))
    print("  bidirectional (LLM2Vec):")
    print(_mask_picture(False, padding))
    result = show_bidirectional_switch()
    k = result["changed"]
    print(f"\nChange token {k}; how far does each position's hidden state move (L2)?")
    print(f"  {'position':>8} {'causal':>10} {'bidirectional':>14}")
    for t, (c, b) in enumerate(zip(result["causal"], result["bidirectional"])):
        note = "  <- changed" if t == k else ""
        print(f"  {t:>8} {c:>10.4f} {b:>14.4f}{note}")
    before = result["causal"][:k]
    assert max(before) == 0.0 and min(result["bidirectional"][:k]) > 0.0
    print(f"\nCausal: positions 0..{k - 1} never see token {k}. Bidirectional: every position does.")
    return 0
