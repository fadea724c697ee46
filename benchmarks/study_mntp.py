"""The MNTP recipe study: why Bi + MNTP stays below Uni on SmolLM2, measured (issue 14).

`make reproduce` trains MNTP for 200 steps of 8 x 64 tokens at lr 5e-4 and gets Bi + MNTP 45.83 on
STS-B dev, below Uni (54.15); the paper's S-LLaMA-1.3B gains from MNTP. The paper's MNTP recipe is
lr 5e-5, 512-token blocks, batch 32, 1,000 steps. This script trains MNTP at one token budget
(`--steps` x `--tokens-per-step`, the same for every row) for each learning rate and block size of
the grid, with our trainer and, as the yardstick, with the official llm2vec's own script
(experiments/run_mntp.py, transformers' Trainer, in the reference venv), and scores every adapter:

    STS-B dev     Spearman x 100 of cosine similarity, mean pooling (`python -m llm2vec_mini eval-sts`)
    POS probe     UPOS accuracy of a linear probe on the frozen last layer, first 250 sentences of
                  UD English-EWT dev (train) and test (score), a word read at its first sub-token and
                  at the position before it (`python -m llm2vec_mini eval-probe --mode first|next_token`)

plus the baselines (Uni: causal attention, Bi: bidirectional, no training), and SimCSE on top of the
best MNTP row (`--simcse`), to see whether the paper's ordering Uni < Bi + MNTP < Bi + MNTP + SimCSE
appears. Every row is a list of shell commands, recorded with its results in `OUT/study.json`;
`OUT/study.md` is the table and `OUT/study.png` the chart. Rows already in `OUT/study.json` are not
run again (an interrupted study resumes).

Both trainers get the same settings: no warm-up, lr decayed linearly to 0 at the last step, AdamW
(0.9, 0.999, eps 1e-8, weight decay 0), clipping at 1.0, LoRA r 16 / alpha 32 / dropout 0.05 on the
seven projections, mask ratio 0.2 with "_", seed 42, the same text file (WikiText-2 validation,
stripped, blank lines dropped). They differ where the official script does: its masks and batch order
are drawn by transformers, and its blocks are cut per 1,000 lines.

The official script is not part of this project: fetch it from McGill-NLP/llm2vec (at commit 312adcf)
and pass it with `--official-script`; it needs `datasets` and `evaluate` beside the reference venv's
transformers 4.44.2 (see benchmarks/README.md for the venv we used).

Usage (2 threads, as recorded in benchmarks/README.md):
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/study_mntp.py --out runs/study \\
        --official-script /tmp/run_mntp.py --official-python /tmp/venv-mntp/bin/python --simcse
    .venv/bin/python benchmarks/study_mntp.py --smoke --out /tmp/study-smoke   # minutes: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.machine import cpu_flags, cpu_line, cpu_model  # noqa: E402  (after the path)

PAPER = "paper (S-LLaMA-1.3B): MNTP lr 5e-5, 512-token blocks, batch 32, 1,000 steps"


class Study:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.state_path = self.out / "study.json"
        self.state = (json.loads(self.state_path.read_text()) if self.state_path.exists()
                      else {"rows": {}})
        self.env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
                        PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                        HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                        HF_DATASETS_CACHE=str(self.out / "hf-datasets-cache"))
        self.py = [sys.executable, "-m", "llm2vec_mini"]

    # -- plumbing --------------------------------------------------------------------------------

    def run(self, cmd: list, log: Path, cwd=None) -> tuple[str, float]:
        """Run one command (its output to `log`); -> (stdout, seconds). Fails loudly."""
        t0 = time.perf_counter()
        proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=self.env,
                              cwd=cwd or REPO)
        seconds = time.perf_counter() - t0
        log.write_text(f"$ {shlex.join(map(str, cmd))}\n\n{proc.stdout}\n--- stderr ---\n{proc.stderr}")
        if proc.returncode != 0:
            raise RuntimeError(f"command failed ({proc.returncode}), see {log}:\n{proc.stderr[-3000:]}")
        return proc.stdout, seconds

    def save(self):
        self.state.update(cpu=cpu_model(), cpu_flags=" ".join(cpu_flags()), threads=self.args.threads,
                          budget=self.budget())
        self.state_path.write_text(json.dumps(self.state, indent=2))

    def budget(self) -> dict:
        a = self.args
        return {"steps": a.steps, "tokens_per_step": a.tokens_per_step, "tokens": a.steps * a.tokens_per_step,
                "train_dtype_ours": a.train_dtype, "eval_dtype": "auto (the CLI's default)"}

    # -- data and model ----------------------------------------------------------------------------

    def prepare(self):
        """The model (GGUF for ours, a dequantised HF folder for the official script) and the text."""
        from llm2vec_mini.data import read_lines
        from llm2vec_mini.hub import smollm2_path
        a = self.args
        self.gguf = Path(a.model) if a.model else smollm2_path()
        self.data = Path(a.data_dir)
        self.text = self.out / "mntp_text.txt"
        if not self.text.exists():
            lines = read_lines(self.data / "wikitext-2" / "valid.txt")  # stripped, blank lines dropped
            self.text.write_text("\n".join(lines) + "\n", encoding="utf-8")
        self.sentences = self.out / "simcse_sentences.txt"  # what the demo trains SimCSE on
        if not self.sentences.exists():
            wiki1m = read_lines(self.data / "wiki1m_slice" / "wiki1m_for_simcse.first11914.txt")
            self.sentences.write_text("\n".join(s for s in wiki1m if len(s) >= 15) + "\n", encoding="utf-8")
        self.sts_file = self.data / "stsbenchmark" / "sts-dev.csv"
        if a.smoke:  # the first 60 pairs
            rows = self.sts_file.read_text(encoding="utf-8").splitlines()
            self.sts_file = self.out / "sts-dev-smoke.csv"
            self.sts_file.write_text("\n".join(rows[:60]) + "\n", encoding="utf-8")
        self.hf_dir = self.out / "smollm2-hf"
        if a.official_script and not (self.hf_dir / "model.safetensors").exists():
            from llm2vec_mini.convert.hf import load_pretrained, save_hf_dir
            model, tokenizer = load_pretrained(self.gguf)
            save_hf_dir(model, tokenizer, self.hf_dir)

    # -- the measurements of one adapter -------------------------------------------------------------

    def evaluate(self, folder: Path, adapters=(), causal=False) -> tuple[dict, list]:
        """STS-B dev (mean pooling) and the POS probe (first sub-token, next_token) -> (scores, commands)."""
        a = self.args
        model = ["--model", self.gguf, "--device", "cpu"]
        model += [x for adapter in adapters for x in ("--adapter", adapter)]
        causal_flag = ["--causal"] if causal else []
        sts_json = folder / "sts.json"
        sts = self.py + ["eval-sts", *model, *causal_flag, "--pooling", "mean", "--data", self.sts_file,
                         "--output", sts_json]
        self.run(sts, folder / "eval-sts.log")
        results = json.loads(sts_json.read_text())["results"]
        subset = next(k for k in results if k.startswith("sts-dev"))
        scores = {"sts_spearman": results[subset]["spearman"], "sts_pearson": results[subset]["pearson"]}
        commands = [sts]
        for mode in ("first", "next_token"):
            probe = self.py + ["eval-probe", *model, *causal_flag,
                               "--train", self.data / "ud_english_ewt" / "en_ewt-ud-dev.conllu",
                               "--test", self.data / "ud_english_ewt" / "en_ewt-ud-test.conllu",
                               "--max-sentences", 20 if a.smoke else 250, "--mode", mode]
            stdout, _ = self.run(probe, folder / f"eval-probe-{mode}.log")
            scores[f"pos_{mode}"] = 100.0 * json.loads(stdout)["accuracy"]
            commands.append(probe)
        return scores, commands

    def row(self, name: str, make) -> dict:
        """Run one row unless it is already in study.json; `make(folder)` -> row dict."""
        if name in self.state["rows"]:
            print(f"[done already] {name}")
            return self.state["rows"][name]
        folder = self.out / name
        folder.mkdir(parents=True, exist_ok=True)
        print(f"[running] {name}", flush=True)
        t0 = time.time()
        row = make(folder)
        row["minutes_total"] = round((time.time() - t0) / 60, 2)
        row["commands"] = [shlex.join(map(str, c)) for c in row["commands"]]
        self.state["rows"][name] = row
        self.save()
        print(f"  {json.dumps({k: v for k, v in row.items() if k != 'commands'})}", flush=True)
        return row

    # -- the rows --------------------------------------------------------------------------------

    def baseline(self, causal: bool):
        def make(folder):
            scores, commands = self.evaluate(folder, causal=causal)
            return dict(kind="baseline", stage="Uni" if causal else "Bi", **scores, commands=commands)
        return self.row("uni" if causal else "bi", make)

    def ours(self, lr: float, block: int, warmup: int = 0):
        a = self.args
        batch = a.tokens_per_step // block

        def make(folder):
            adapter = folder / "adapter"
            train = self.py + ["train-mntp", "--model", self.gguf, "--data", self.text, "--output", adapter,
                               "--steps", a.steps, "--batch-size", batch, "--block-size", block, "--lr", lr,
                               "--warmup-steps", warmup, "--seed", a.seed, "--device", "cpu", "--overwrite",
                               "--dtype", a.train_dtype]
            _, seconds = self.run(train, folder / "train.log")
            losses = [json.loads(x)["loss"] for x in (adapter / "metrics.jsonl").read_text().splitlines()]
            scores, commands = self.evaluate(folder, adapters=[adapter])
            return dict(kind="ours" if not warmup else "ours, warm-up", stage="Bi + MNTP", lr=lr,
                        block=block, batch=batch, warmup=warmup, train_minutes=round(seconds / 60, 2),
                        loss_first=_mean(losses[:10]), loss_last=_mean(losses[-20:]), adapter=str(adapter),
                        **scores, commands=[train] + commands)
        return self.row(f"ours-lr{lr:g}-block{block}" + (f"-warmup{warmup}" if warmup else ""), make)

    def official(self, lr: float, block: int):
        a = self.args
        batch = a.tokens_per_step // block

        def make(folder):
            adapter = folder / "adapter"
            config = {  # train_configs/mntp/Sheared-Llama.json's settings, at our budget, on a CPU
                "model_name_or_path": str(self.hf_dir), "train_file": str(self.text),
                "validation_file": str(self.text),  # so that no 5 % of the text is held out
                "max_seq_length": block, "per_device_train_batch_size": batch,
                "gradient_accumulation_steps": 1, "do_train": True, "do_eval": False,
                "mask_token_type": "blank", "data_collator_type": "default", "mlm_probability": 0.2,
                "lora_r": 16, "learning_rate": lr, "max_steps": a.steps, "stop_after_n_steps": a.steps,
                "seed": a.seed, "output_dir": str(adapter), "overwrite_output_dir": True,
                "torch_dtype": "float32", "attn_implementation": "sdpa", "use_cpu": True,
                "report_to": "none", "logging_steps": 1, "save_strategy": "no", "disable_tqdm": True,
            }
            config_path = folder / "run_mntp.json"
            config_path.write_text(json.dumps(config, indent=2))
            train = [a.official_python, a.official_script, config_path]
            _, seconds = self.run(train, folder / "train.log", cwd=folder)
            state = json.loads((adapter / "trainer_state.json").read_text()) \
                if (adapter / "trainer_state.json").exists() else None
            losses = [h["loss"] for h in state["log_history"] if "loss" in h] if state else []
            scores, commands = self.evaluate(folder, adapters=[adapter])
            return dict(kind="official", stage="Bi + MNTP", lr=lr, block=block, batch=batch,
                        train_minutes=round(seconds / 60, 2), loss_first=_mean(losses[:10]),
                        loss_last=_mean(losses[-20:]), adapter=str(adapter), **scores,
                        commands=[train] + commands)
        return self.row(f"official-lr{lr:g}-block{block}", make)

    def simcse(self, mntp_row: dict, name: str, all_positions: bool = False):
        a = self.args

        def make(folder):
            adapter = folder / "adapter"
            train = self.py + ["train-simcse", "--model", self.gguf, "--adapter", mntp_row["adapter"],
                               "--data", self.sentences,
                               "--output", adapter, "--steps", a.simcse_steps, "--batch-size", 16,
                               "--max-length", 32, "--lr", 2e-3,
                               "--warmup-steps", max(1, a.simcse_steps // 10),
                               "--seed", a.seed, "--device", "cpu", "--overwrite", "--dtype", a.train_dtype]
            train += ["--pool-all-positions"] if all_positions else []  # the official training's pooling
            _, seconds = self.run(train, folder / "train.log")
            scores, commands = self.evaluate(folder, adapters=[mntp_row["adapter"], adapter])
            return dict(kind="simcse" + (", all positions" if all_positions else ""),
                        stage="Bi + MNTP + SimCSE", on=mntp_row["adapter"],
                        on_lr=mntp_row["lr"], on_block=mntp_row["block"],
                        train_minutes=round(seconds / 60, 2), **scores, commands=[train] + commands)
        return self.row(name, make)


def _mean(xs):
    return round(sum(xs) / len(xs), 4) if xs else None


# -------------------------------------------------------------------------------------------------
# The report: a table and a chart

def table(state: dict) -> str:
    rows = state["rows"]
    head = ("| row | trainer | lr | block x batch | MNTP loss (first 10 / last 20 steps) "
            "| STS-B dev Spearman | POS first | POS next_token | train min |")
    lines = [head, "|" + "---|" * 9]
    for name, r in rows.items():
        loss = f"{r['loss_first']} / {r['loss_last']}" if r.get("loss_last") is not None else ""
        lines.append(f"| {name} | {r['kind']} | {r.get('lr', '')} | "
                     f"{str(r['block']) + ' x ' + str(r['batch']) if 'block' in r else ''} | {loss} | "
                     f"{r['sts_spearman']:.2f} | {r['pos_first']:.1f} | {r['pos_next_token']:.1f} | "
                     f"{r.get('train_minutes', '')} |")
    return "\n".join(lines)


def chart(state: dict, path: Path) -> bool:
    """Three panels (STS-B, POS first sub-token, POS next_token): each grid cell's Bi + MNTP, ours and
    official, against the untrained Uni and Bi (lines) and SimCSE on the best MNTP row (a star)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    rows = state["rows"]
    grid = [n for n in rows if rows[n]["kind"] in ("ours", "official")]
    configs = sorted({(rows[n]["lr"], rows[n]["block"]) for n in grid}, key=lambda c: (c[1], c[0]))
    fig = Figure(figsize=(13, 4.2))
    axes = fig.subplots(1, 3)
    panels = (("sts_spearman", "STS-B dev, Spearman x 100 (mean pooling)"),
              ("pos_first", "POS accuracy (%), first sub-token"),
              ("pos_next_token", "POS accuracy (%), next_token (position i - 1)"))
    for ax, (key, label) in zip(axes, panels):
        xs = range(len(configs))
        for offset, kind in ((-0.2, "ours"), (0.2, "official")):
            values = [rows.get(f"{kind}-lr{lr:g}-block{block}", {}).get(key) for lr, block in configs]
            ax.bar([x + offset for x, v in zip(xs, values) if v is not None],
                   [v for v in values if v is not None], 0.4, label=f"Bi + MNTP, {kind}")
        for base, style in (("uni", "--"), ("bi", ":")):
            if base in rows:
                ax.axhline(rows[base][key], linestyle=style, color="k",
                           label=f"{rows[base]['stage']} (no training)")
        for name, row in rows.items():
            if row["kind"] == "simcse":
                on = (row["on_lr"], row["on_block"])
                if on in configs:
                    ax.plot([configs.index(on) - 0.2], [row[key]], "*", color="crimson", markersize=12,
                            label="+ SimCSE on that MNTP adapter")
        ax.set_xticks(list(xs), [f"lr {lr:g}\nblock {block}" for lr, block in configs], fontsize=7)
        ax.set_title(label, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"MNTP on SmolLM2-135M-Instruct, {state['budget']['steps']} steps of "
                 f"{state['budget']['tokens_per_step']} tokens each", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/study")
    p.add_argument("--model", default=None, help="default: the cached SmolLM2-135M-Instruct GGUF")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--tokens-per-step", type=int, default=512, help="batch = this / block size")
    p.add_argument("--lrs", default="5e-5,1e-4,5e-4")
    p.add_argument("--blocks", default="64,256")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-dtype", default="float32", choices=["float32", "bfloat16", "auto"],
                   help="our trainer's matrix products (the official script trains in fp32 on a CPU)")
    p.add_argument("--official-script", default=None, help="experiments/run_mntp.py of McGill-NLP/llm2vec")
    p.add_argument("--official-python", default=str(REPO / ".venv-ref" / "bin" / "python"))
    p.add_argument("--official-rows", default="all", help="'all' or lr:block pairs, e.g. 5e-4:64,5e-5:256")
    p.add_argument("--reproduce-row", action="store_true",
                   help="also `make reproduce`'s MNTP as it stood (lr 5e-4, block 64, warm-up 20 steps)")
    p.add_argument("--simcse", action="store_true", help="SimCSE on the best MNTP row of ours")
    p.add_argument("--simcse-steps", type=int, default=150)
    p.add_argument("--simcse-all-positions", action="store_true",
                   help="with --simcse: also SimCSE pooled as the official training pools it")
    p.add_argument("--smoke", action="store_true",
                   help="a few steps and a small evaluation: checks the script")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.tokens_per_step, args.simcse_steps = 2, 256, 2
        args.blocks = ",".join(b for b in args.blocks.split(",") if int(b) <= 256)
    lrs = [float(x) for x in args.lrs.split(",")]
    blocks = [int(x) for x in args.blocks.split(",")]
    study = Study(args)
    study.prepare()
    print(f"{cpu_line()}; {args.threads} threads; budget {study.budget()}")
    study.baseline(causal=True)
    study.baseline(causal=False)
    for block in blocks:
        for lr in lrs:
            study.ours(lr, block)
    if args.reproduce_row:
        study.ours(5e-4, 64, warmup=max(1, args.steps // 10))
    if args.official_script:
        wanted = None if args.official_rows == "all" else {
            (float(x.split(":")[0]), int(x.split(":")[1])) for x in args.official_rows.split(",")}
        for block in blocks:
            for lr in lrs:
                if wanted is None or (lr, block) in wanted:
                    study.official(lr, block)
    if args.simcse:
        ours = {n: r for n, r in study.state["rows"].items() if r["kind"].startswith("ours")}
        best = max(ours, key=lambda n: ours[n]["sts_spearman"])
        study.simcse(ours[best], f"simcse-on-{best}")
        if args.simcse_all_positions:
            study.simcse(ours[best], f"simcse-all-positions-on-{best}", all_positions=True)
    study.save()
    report = table(study.state)
    (study.out / "study.md").write_text(
        f"{cpu_line()}; {args.threads} threads; budget: {args.steps} steps x "
        f"{args.tokens_per_step} tokens; our training in {args.train_dtype}, the official in float32; "
        f"evaluation with --dtype auto\n\n{report}\n")
    print(report)
    if chart(study.state, study.out / "study.png"):
        print(f"chart: {study.out / 'study.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
