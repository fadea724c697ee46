"""Peak memory of encoding a corpus: 10,000 vs 100,000 short lines, streamed vs all in memory.

    streamed   llm2vec_mini.corpus.encode_corpus (chunks of --chunk-size lines into a memory-mapped .npy)
    in memory  what `encode` did before: every line read into a list, one `LLM2Vec.encode` call,
               `np.save` at the end

The model: SmolLM2-135M's shape (hidden 576, its real tokenizer from the cached GGUF) cut to
`--layers` layers of random weights, so that 100,000 lines take minutes, not the hours the full
model would at about 40 texts/s on 2 cores; the output rows are as wide as the real model's. Each
(mode, lines) runs in a fresh child process; peak RSS is the child's `ru_maxrss` at the end, and
"after load" its RSS once the model is built (before the corpus is touched). Lines are short
sentences (about 10 tokens), built deterministically from line numbers.

    .venv/bin/python benchmarks/bench_corpus_memory.py [--lines 10000 100000] [--layers 1] [--threads 1]
                                                       [--modes streamed inmemory] [--chunk-size 1024]

Target: the streamed peak for 100,000 lines within 10 % of that for 10,000.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = ("red green small old quiet bright heavy cold new strange".split(),
         "dog river market teacher city song engine garden letter storm".split(),
         "crossed watched found lifted painted followed opened carried heard built".split())


def write_corpus(path: Path, n: int) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            a, b, c = WORDS[0][i % 10], WORDS[1][i // 10 % 10], WORDS[2][i // 100 % 10]
            f.write(f"The {a} {b} {c} the {WORDS[1][i // 1000 % 10]} near line {i}.\n")


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib / 1024


def child(mode: str, corpus: str, output: str, layers: int, threads: int, chunk_size: int) -> None:
    import numpy as np
    import torch

    from llm2vec_mini import LlamaConfig, LlamaModel
    from llm2vec_mini.convert.gguf import load_gguf_tokenizer
    from llm2vec_mini.corpus import encode_corpus
    from llm2vec_mini.data import read_lines
    from llm2vec_mini.encoder import LLM2Vec
    from llm2vec_mini.hub import smollm2_path

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = LlamaModel(LlamaConfig.smollm2_135m(num_hidden_layers=layers))
    encoder = LLM2Vec(model, load_gguf_tokenizer(smollm2_path()), device="cpu")
    after_load = rss_mib()
    t0 = time.perf_counter()
    if mode == "streamed":
        run = encode_corpus(encoder, corpus, output, batch_size=32, chunk_size=chunk_size, progress=False)
        n = run.shape[0]
    else:
        texts = read_lines(corpus, skip_empty=False)
        np.save(output, encoder.encode(texts, batch_size=32, show_progress_bar=False))
        n = len(texts)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"after_load_mib": after_load, "peak_mib": peak, "seconds": seconds, "texts": n}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--modes", nargs="+", default=["streamed", "inmemory"], choices=["streamed", "inmemory"])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child, args.layers, args.threads, args.chunk_size)
        return
    info = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "unknown")
    flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    simd = " ".join(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")))
    print(f"CPU: {cpu}, {os.cpu_count()} cores, flags: {simd}; load average {os.getloadavg()}")
    print(f"model: SmolLM2-135M shape, {args.layers} random layers; {args.threads} thread(s); "
          f"chunk size {args.chunk_size}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.lines:
            corpus = Path(tmp) / f"lines{n}.txt"
            write_corpus(corpus, n)
            for mode in args.modes:
                out = Path(tmp) / f"{mode}{n}.npy"
                env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(args.threads))
                proc = subprocess.run([sys.executable, __file__, "--child", mode, str(corpus), str(out),
                                       "--layers", str(args.layers), "--threads", str(args.threads),
                                       "--chunk-size", str(args.chunk_size)],
                                      env=env, capture_output=True, text=True)
                if proc.returncode:
                    sys.exit(proc.stderr)
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                results[mode, n] = r
                print(f"{mode:9s} {n:>8,d} lines: peak RSS {r['peak_mib']:8.1f} MiB (after load "
                      f"{r['after_load_mib']:7.1f} MiB), {r['seconds']:7.1f} s, "
                      f"{r['texts'] / r['seconds']:7.1f} texts/s", flush=True)
                out.unlink()
    if len(args.lines) >= 2:
        lo, hi = min(args.lines), max(args.lines)
        for mode in args.modes:
            ratio = results[mode, hi]["peak_mib"] / results[mode, lo]["peak_mib"]
            print(f"{mode}: peak at {hi:,d} lines / peak at {lo:,d} lines = {ratio:.3f}")


if __name__ == "__main__":
    main()
