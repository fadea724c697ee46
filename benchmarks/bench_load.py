"""Load SmolLM2-135M-Instruct (Q4_1 GGUF) into fp32: our loader vs transformers' GGUF loader.

Each loader runs in a fresh child process, so neither warms the other's caches or shares its heap.
The child reports the seconds spent in the load call (imports excluded), its resident memory before
the call and its peak resident memory (ru_maxrss) after it. The parent prints both and the ratios.

    .venv/bin/python benchmarks/bench_load.py [--repeats 3] [--path FILE.gguf]

Targets: our time at most 0.25x transformers', our peak memory at most transformers'.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(loader: str, path: str) -> None:
    """Runs in the child process: import, load once, print one JSON line."""
    sys.path.insert(0, str(REPO))
    import torch
    torch.set_num_threads(2)
    if loader == "ours":
        from llm2vec_mini.convert.gguf import load_gguf_model

        def load():
            return load_gguf_model(path, dtype=torch.float32)
    else:
        import transformers  # noqa: F401  (imported before the clock starts, like ours)
        from transformers import AutoModelForCausalLM

        def load():
            return AutoModelForCausalLM.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name,
                                                        dtype=torch.float32)
    before = _rss_mib()
    start = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - start
    n_params = sum(p.numel() for p in model.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"loader": loader, "seconds": seconds, "rss_before_mib": before,
                      "peak_rss_mib": peak, "n_params": n_params}))


def run_child(loader: str, path: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", loader, "--path", path],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{loader} child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default=None, help="the GGUF file (default: the cached SmolLM2)")
    parser.add_argument("--repeats", type=int, default=1, help="child runs per loader; the best time counts")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.path is None:
        sys.path.insert(0, str(REPO))
        from llm2vec_mini.hub import smollm2_path
        args.path = str(smollm2_path())
    if args.child:
        return child(args.child, args.path)

    results = {}
    for loader in ("ours", "transformers"):
        runs = [run_child(loader, args.path) for _ in range(args.repeats)]
        results[loader] = {"seconds": min(r["seconds"] for r in runs),
                           "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
                           "rss_before_mib": runs[0]["rss_before_mib"], "n_params": runs[0]["n_params"]}
    print(f"file: {args.path} ({os.path.getsize(args.path) / 2**20:.1f} MiB), fp32, "
          f"best of {args.repeats}, torch threads 2")
    print(f"{'loader':<14}{'load s':>9}{'peak RSS MiB':>14}{'RSS before':>12}{'params':>13}")
    for loader, r in results.items():
        print(f"{loader:<14}{r['seconds']:>9.2f}{r['peak_rss_mib']:>14.0f}{r['rss_before_mib']:>12.0f}"
              f"{r['n_params']:>13,}")
    ours, ref = results["ours"], results["transformers"]
    time_ratio = ours["seconds"] / ref["seconds"]
    mem_ratio = ours["peak_rss_mib"] / ref["peak_rss_mib"]
    print(f"time ratio ours/transformers: {time_ratio:.3f} (target <= 0.25)  "
          f"{'OK' if time_ratio <= 0.25 else 'MISSED'}")
    print(f"peak memory ratio ours/transformers: {mem_ratio:.3f} (target <= 1.0)  "
          f"{'OK' if mem_ratio <= 1.0 else 'MISSED'}")


if __name__ == "__main__":
    main()
