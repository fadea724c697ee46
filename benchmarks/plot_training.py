"""Loss curves and scores of demo runs side by side (fp32 against bf16): a table and one figure.

Each run is a folder `python -m llm2vec_mini demo --out RUN --dtype ...` wrote: `mntp/metrics.jsonl`,
`simcse/metrics.jsonl` (one line per optimizer step: loss, seconds) and `results.json` (the four
stages' Spearman x 100 on STS-B dev, the dtype).

    .venv/bin/python benchmarks/plot_training.py runs/demo-fp32 runs/demo-bf16 [--out docs/bf16_training.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def read_run(folder: Path) -> dict:
    run = json.loads((folder / "results.json").read_text())
    for stage in ("mntp", "simcse"):
        lines = (folder / stage / "metrics.jsonl").read_text().splitlines()
        run[stage] = [json.loads(line) for line in lines]
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "bf16_training.png")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from benchmarks.machine import cpu_line

    runs = {str(r): read_run(r) for r in args.runs}
    print(cpu_line())
    stages = list(next(iter(runs.values()))["results"])
    print(f"{'run':<28}{'dtype':<10}" + "".join(f"{s:>20}" for s in stages)
          + f"{'MNTP s/step':>13}{'SimCSE s/step':>15}")
    for name, run in runs.items():
        mntp_s = sum(r["seconds"] for r in run["mntp"]) / len(run["mntp"])
        simcse_s = sum(r["seconds"] for r in run["simcse"]) / len(run["simcse"])
        print(f"{Path(name).name:<28}{run.get('dtype', 'float32'):<10}"
              + "".join(f"{run['results'].get(s, float('nan')):>20.2f}" for s in stages)
              + f"{mntp_s:>13.2f}{simcse_s:>15.2f}")
    names = list(runs)
    for stage in ("mntp", "simcse"):
        a, b = runs[names[0]][stage], runs[names[-1]][stage]
        gaps = [abs(x["loss"] - y["loss"]) / abs(x["loss"]) for x, y in zip(a, b)]
        print(f"{stage}: loss of the last run against the first: largest relative gap {max(gaps):.2%}, "
              f"final {a[-1]['loss']:.4f} vs {b[-1]['loss']:.4f}")
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("(no figure: matplotlib is not installed)")
        return
    fig = Figure(figsize=(9, 3.4))
    axes = fig.subplots(1, 2)
    for ax, stage, title in zip(axes, ("mntp", "simcse"), ("MNTP (step 2)", "SimCSE (step 3)")):
        for name, run in runs.items():
            ax.plot([r["step"] for r in run[stage]], [r["loss"] for r in run[stage]],
                    label=f"{run.get('dtype', 'float32')}", linewidth=1.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M, the demo's recipe: the same seed in fp32 and in bf16", fontsize=10)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
