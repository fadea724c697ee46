"""Load time and peak memory: our `load_hf_model` vs transformers' `from_pretrained`, same checkpoint.

Writes a Sheared-LLaMA-1.3B-shaped fp32 checkpoint (24 layers, hidden 2048, intermediate 5504, vocab
32000: 1.35 B parameters, 5.4 GB) to a temporary folder as one `pytorch_model.bin` (or, with
--safetensors, one `model.safetensors`), then loads it in fresh subprocesses, alternating ours and
transformers', `--repeats` times each. Each child loads the model and touches every page of every
weight (a strided sum, one float per 4 KiB), so lazily mapped weights are really brought into memory.
Reported per run: the load time measured inside the child, and the child's peak RSS from
`os.wait4` (the kernel's ru_maxrss of that child alone; the parent imports no torch and writes the
checkpoint in another child, because a child's ru_maxrss starts at its parent's RSS) with the
child's own VmHWM as a cross-check. The file is written first, so it sits in the
page cache and neither loader pays for the disk more than the other.

    .venv/bin/python benchmarks/bench_load_hf.py [--safetensors] [--repeats 2] [--dir DIR] [--keep]

Needs about 6 GB of free disk and, while transformers loads, up to twice the file size in memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHILD = r"""
import json, sys, time
import torch
kind, path = sys.argv[1], sys.argv[2]

def touch(model):  # read one float in every 4 KiB page of every weight
    total = 0.0
    for p in model.parameters():
        total += float(p.detach().reshape(-1)[::1024].sum())
    return total

t0 = time.perf_counter()
if kind == "ours":
    from llm2vec_mini.convert.hf import load_hf_model
    model = load_hf_model(path)
else:
    import transformers
    transformers.logging.set_verbosity_error()
    model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
t1 = time.perf_counter()
checksum = touch(model)
t2 = time.perf_counter()
hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"load_s": t1 - t0, "load_and_touch_s": t2 - t0, "checksum": checksum,
                  "vm_hwm_gb": hwm_kb * 1024 / 1e9}))
"""

WRITER = r"""
import sys
sys.path.insert(0, sys.argv[1])
from benchmarks.bench_load_hf import write_checkpoint
from pathlib import Path
print(write_checkpoint(Path(sys.argv[2]), sys.argv[3] == "1"))
"""


def write_checkpoint(d: Path, safetensors: bool) -> Path:
    import torch

    from llm2vec_mini import LlamaConfig, LlamaForCausalLM
    from llm2vec_mini.convert.safetensors import save_file

    config = LlamaConfig.sheared_llama_1_3b()
    (d / "config.json").write_text(json.dumps(config.to_hf_config(), indent=2))
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}  # 5.4 GB, once
    path = d / ("model.safetensors" if safetensors else "pytorch_model.bin")
    if safetensors:
        save_file(state, path, metadata={"format": "pt"})
    else:
        torch.save(state, path)
    return path


def run_child(kind: str, model_dir: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, kind, str(model_dir)], stdout=subprocess.PIPE,
                            env=env, cwd=str(REPO))
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} child failed with exit code {proc.returncode}")
    result = json.loads(out.decode().strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - t0  # includes starting Python and importing torch
    result["peak_rss_gb"] = usage.ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--safetensors", action="store_true", help="write model.safetensors instead of .bin")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each loader, alternating")
    parser.add_argument("--dir", type=Path, help="folder for the checkpoint (default: a temporary one); "
                                                  "a checkpoint already there is reused")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint folder")
    args = parser.parse_args()

    d = args.dir or Path(tempfile.mkdtemp(prefix="bench_load_hf_"))
    d.mkdir(parents=True, exist_ok=True)
    path = d / ("model.safetensors" if args.safetensors else "pytorch_model.bin")
    try:
        if path.is_file() and (d / "config.json").is_file():
            print(f"reusing {path}")
        else:
            t0 = time.perf_counter()
            # In a child: Linux starts a child's ru_maxrss at its parent's RSS, so the parent stays small.
            subprocess.run([sys.executable, "-c", WRITER, str(REPO), str(d), str(int(args.safetensors))],
                           check=True, stdout=subprocess.DEVNULL)
            print(f"wrote {path.name} in {time.perf_counter() - t0:.1f} s")
        size_gb = path.stat().st_size / 1e9
        print(f"{path.name}: {size_gb:.2f} GB")
        results = {"ours": [], "transformers": []}
        for i in range(args.repeats):
            for kind in results:
                r = run_child(kind, d)
                results[kind].append(r)
                print(f"run {i + 1} {kind:>12}: load {r['load_s']:6.2f} s, load+touch "
                      f"{r['load_and_touch_s']:6.2f} s, process {r['wall_s']:6.2f} s, peak RSS "
                      f"{r['peak_rss_gb']:5.2f} GB ({r['peak_rss_gb'] / size_gb:.2f}x file; VmHWM "
                      f"{r['vm_hwm_gb']:.2f} GB), checksum {r['checksum']:.6f}")
        best = {k: min(v, key=lambda r: r["load_and_touch_s"]) for k, v in results.items()}
        ours, theirs = best["ours"], best["transformers"]
        if abs(ours["checksum"] - theirs["checksum"]) > 1e-3 * max(1.0, abs(theirs["checksum"])):
            print("WARNING: the two loaders disagree on the weights' checksum")
        peak = {k: max(r["peak_rss_gb"] for r in v) for k, v in results.items()}
        t_ours, t_theirs = ours["load_and_touch_s"], theirs["load_and_touch_s"]
        print(f"\nbest of {args.repeats}: ours {t_ours:.2f} s, transformers {t_theirs:.2f} s "
              f"(ratio {t_ours / t_theirs:.2f})")
        print(f"peak RSS: ours {peak['ours']:.2f} GB = {peak['ours'] / size_gb:.2f}x file, transformers "
              f"{peak['transformers']:.2f} GB = {peak['transformers'] / size_gb:.2f}x file")
    finally:
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
