"""bf16 against fp32 on SmolLM2-135M: every STS-B dev sentence, several ways of using bf16.

Not a speed measurement: it prints, for each way, how far its embeddings are from fp32's
(1 - cos per sentence: median, 99th percentile, worst) and the Spearman x 100 on STS-B dev
(1,500 pairs, mean pooling, bidirectional), so that the choice in `llm2vec_mini/precision.py` can be
checked on any machine (bf16 is slow where the CPU has no bf16 instructions: it then takes long).

    fp32             LLM2Vec(dtype=torch.float32), the reference
    ours             LLM2Vec(dtype=torch.bfloat16): the blocks `precision.fp32_blocks` names stay fp32
    prefix only      only the layers up to the birth of the massive activations in fp32
    projections      every projection in bf16 (norms, attention, residual stream, pooling fp32)
    whole model      the model's weights and activations in bf16 (`model.to(torch.bfloat16)`)
    autocast         the fp32 model under torch.autocast("cpu", dtype=torch.bfloat16)

    .venv/bin/python benchmarks/quality_bf16.py [--n 3000] [--threads 2] [--only ours,projections]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("LLM2VEC_MINI_DATA", REPO.parent / "shared" / "data"))
WAYS = ("ours", "prefix only", "projections", "whole model", "autocast")


def describe(blocks: list[str]) -> str:
    """["layers.0.self_attn", "layers.0.mlp", ..., "layers.27.mlp"] -> "layers 0-11; mlp of 27"."""
    layers = sorted({int(b.split(".")[1]) for b in blocks})
    whole = [i for i in layers if f"layers.{i}.self_attn" in blocks and f"layers.{i}.mlp" in blocks]
    parts = [f"layers {whole[0]}-{whole[-1]}" if len(whole) > 1 else f"layer {whole[0]}"] if whole else []
    for kind in ("self_attn", "mlp"):
        alone = [i for i in layers if i not in whole and f"layers.{i}.{kind}" in blocks]
        if alone:
            parts.append(f"{kind} of {', '.join(map(str, alone))}")
    return "; ".join(parts) or "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000, help="sentences (both columns of STS-B dev)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default=",".join(WAYS))
    args = parser.parse_args()

    import numpy as np
    import torch

    from benchmarks.machine import cpu_line
    from llm2vec_mini.convert.gguf import load_gguf
    from llm2vec_mini.data import load_sts
    from llm2vec_mini.encoder import LLM2Vec
    from llm2vec_mini.evaluate import cosine_scores, spearman
    from llm2vec_mini.hub import smollm2_path
    from llm2vec_mini.precision import bf16_speedup, fp32_blocks, set_compute_dtype

    torch.set_num_threads(args.threads)
    print(cpu_line())
    print(f"torch {torch.__version__}, {args.threads} threads; bf16 F.linear speed-up here: "
          f"{bf16_speedup('cpu'):.2f}x (the probe of dtype='auto')")
    dev = load_sts(DATA / "stsbenchmark" / "sts-dev.csv")[0]
    texts = (list(dev.sentences1) + list(dev.sentences2))[: args.n]
    n_pairs = len(dev) if len(texts) == 2 * len(dev) else 0  # Spearman only on the whole set
    model, tok = load_gguf(smollm2_path())

    def encode(way: str):
        m = copy.deepcopy(model)
        if way == "fp32":
            return LLM2Vec(m, tok, device="cpu", dtype=torch.float32).encode(texts)
        if way == "ours":
            enc = LLM2Vec(m, tok, device="cpu", dtype=torch.bfloat16)
            print(f"  ours keeps fp32: {describe(enc.fp32_blocks)}")
            return enc.encode(texts)
        if way == "whole model":
            return LLM2Vec(m.to(torch.bfloat16), tok, device="cpu", dtype=torch.float32).encode(texts)
        enc = LLM2Vec(m, tok, device="cpu", dtype=torch.float32)
        if way == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return enc.encode(texts)
        keep = []
        if way == "prefix only":  # the whole layers from layer 0 on that ours keeps, no later block
            plan, i = fp32_blocks(m), 0
            while f"layers.{i}.self_attn" in plan and f"layers.{i}.mlp" in plan:
                i += 1
            keep = [block for block in plan if int(block.split(".")[1]) < i]
        set_compute_dtype(enc.model, torch.bfloat16, keep_fp32=keep)
        return enc.encode(texts)

    def rho(e):
        if not n_pairs:
            return float("nan")
        return 100 * spearman(cosine_scores(e[:len(dev)], e[len(dev):]), dev.scores)

    start = time.perf_counter()
    ref = encode("fp32")
    print(f"fp32: {time.perf_counter() - start:.0f} s, Spearman {rho(ref):.2f}")
    print(f"{'way':<16}{'median 1-cos':>14}{'p99':>10}{'worst':>10}{'> 1e-3':>8}{'Spearman':>10}{'diff':>7}"
          f"  worst sentence")
    for way in [w for w in args.only.split(",") if w]:
        start = time.perf_counter()
        got = encode(way)
        a, b = np.asarray(got, np.float64), np.asarray(ref, np.float64)
        d = 1 - (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
        worst = int(d.argmax())
        print(f"{way:<16}{np.median(d):>14.2e}{np.quantile(d, 0.99):>10.2e}{d.max():>10.2e}"
              f"{int((d > 1e-3).sum()):>8}{rho(got):>10.2f}{rho(got) - rho(ref):>+7.2f}  "
              f"#{worst} {texts[worst]!r:.50} ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
