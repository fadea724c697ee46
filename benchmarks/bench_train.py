"""Training-step speed and memory on SmolLM2-135M: ours vs the official stack, MNTP and SimCSE.

One run, the same weights (SmolLM2-135M-Instruct dequantised once to an fp32 HF directory), the same
batches (8 x 128 tokens of WikiText-2 validation, masked once by our MNTP collator: 20 %, "_" as
the mask token), LoRA r=16, alpha=32, dropout 0.05 on the 7 projections, AdamW (lr 5e-5), gradient
clipping at 1.0, fp32, no gradient checkpointing, the same thread count:

    ours      MNTP:   llm2vec_mini.mntp.MNTPTask + lora.add_lora (bidirectional; the vocabulary
                      projection only at the masked positions)
              SimCSE: simcse.SimCSETask (two dropout views, mean pooling, scale 20), attention
                      dropout 0.3, LoRA added after it
    official  MNTP:   llm2vec.models.LlamaBiForMNTP, peft LoRA on its LlamaBiModel, the model's own
                      shifted cross-entropy (logits for every position)            (.venv-ref)
              SimCSE: llm2vec.LLM2Vec (LlamaBiModel, attention_dropout 0.3, peft LoRA), called twice,
                      HardNegativeNLLLoss(scale=20), as experiments/run_simcse.py does

Each (side, task) runs in its own child process: load, `--warmup` optimizer steps, then `--steps`
timed ones (zero_grad, forward, backward, clip, AdamW step: what `train.train` does per step).
Memory: the child resets its peak RSS after loading (Linux: "5" into /proc/self/clear_refs) and
reads VmHWM after the steps, so the peak covers training, weights included, not the loading.
Contenders take turns (ours MNTP, official MNTP, ours SimCSE, official SimCSE), `--repeats` rounds.

    .venv/bin/python benchmarks/bench_train.py [--steps 4] [--warmup 1] [--threads 2] [--repeats 1]

Targets: MNTP at most 0.8x the official seconds per step and 0.7x its peak memory; SimCSE at most
0.9x the official seconds per step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REF_PY = REPO / ".venv-ref" / "bin" / "python"
DATA = Path(os.environ.get("LLM2VEC_MINI_DATA", REPO.parent / "shared" / "data"))
WIKITEXT = DATA / "wikitext-2" / "valid.txt"
LORA = dict(r=16, alpha=32.0, dropout=0.05)
LR, MAX_GRAD_NORM, SCALE, ATTENTION_DROPOUT = 5e-5, 1.0, 20.0, 0.3
BATCH, BLOCK = 8, 128


def _status_mib(key: str) -> float:
    """A memory line of /proc/self/status (VmRSS, VmHWM) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> bool:
    """Make VmHWM start again from the current RSS (Linux >= 4.0); False where that is refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _timed_steps(step, n_warmup: int, n_steps: int) -> dict:
    """Run step(i) n_warmup + n_steps times; seconds of the timed ones and the memory they used."""
    rss_before = _status_mib("VmRSS")
    reset = _reset_peak()
    losses, seconds = [], []
    for i in range(n_warmup + n_steps):
        start = time.perf_counter()
        losses.append(step(i))
        if i >= n_warmup:
            seconds.append(time.perf_counter() - start)
    return {"seconds": seconds, "losses": losses, "rss_before_mib": rss_before,
            "peak_mib": _status_mib("VmHWM"), "peak_reset": reset}


# ------------------------------------------------------------------------------------------------
# Children

def child_ours(task: str, work: Path, args) -> dict:
    import numpy as np
    import torch
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(REPO))
    from llm2vec_mini.convert.hf import load_pretrained
    from llm2vec_mini.lora import add_lora
    from llm2vec_mini.mntp import MNTPCollator, MNTPTask
    from llm2vec_mini.simcse import SimCSETask, set_attention_dropout

    data = np.load(work / "batches.npz")
    torch.manual_seed(0)
    model, tokenizer = load_pretrained(work / "hf", dtype=torch.float32)
    model.set_causal(False)
    if task == "simcse":
        set_attention_dropout(model, ATTENTION_DROPOUT)
    add_lora(model, r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"])
    if task == "mntp":  # the batches are masked already; the collator is not used
        runner = MNTPTask(model, torch.zeros(1, BLOCK, dtype=torch.long), MNTPCollator(0, 1))
        batches = [(torch.from_numpy(i), torch.from_numpy(lab))
                   for i, lab in zip(data["inputs"], data["labels"])]
    else:
        runner = SimCSETask(model, [], pad_id=tokenizer.eos_id, pooling="mean", scale=SCALE)
        batches = [(torch.from_numpy(b), torch.ones_like(torch.from_numpy(b))) for b in data["blocks"]]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    model.train()

    def step(i):  # what train.train does for one optimizer step without accumulation
        optimizer.zero_grad(set_to_none=True)
        loss = runner(batches[i % len(batches)])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        return loss.item()

    result = _timed_steps(step, args.warmup, args.steps)
    result["trainable"] = sum(p.numel() for p in params)
    return result


def child_official(task: str, work: Path, args) -> dict:
    """Runs under .venv-ref: transformers 4.44.2, peft 0.13.2, llm2vec 0.2.3."""
    import numpy as np
    import torch
    torch.set_num_threads(args.threads)
    from peft import LoraConfig, get_peft_model

    data = np.load(work / "batches.npz")
    torch.manual_seed(0)
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], bias="none",
                      task_type=None, target_modules=["q_proj", "v_proj", "k_proj", "o_proj",
                                                      "gate_proj", "up_proj", "down_proj"])
    if task == "mntp":
        from llm2vec.models import LlamaBiForMNTP
        model = LlamaBiForMNTP.from_pretrained(str(work / "hf"), torch_dtype=torch.float32)
        model.model = get_peft_model(model.model, lora)  # as run_mntp.py's initialize_peft
        batches = [(torch.from_numpy(i), torch.from_numpy(lab))
                   for i, lab in zip(data["inputs"], data["labels"])]

        def loss_of(batch):
            ids, labels = batch
            return model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
    else:
        from llm2vec import LLM2Vec
        from llm2vec.loss.utils import load_loss
        model = LLM2Vec.from_pretrained(str(work / "hf"), enable_bidirectional=True, pooling_mode="mean",
                                        torch_dtype=torch.float32, attention_dropout=ATTENTION_DROPOUT)
        model.model = get_peft_model(model.model, lora)
        loss_fn = load_loss("HardNegativeNLLLoss", scale=SCALE)
        batches = [torch.from_numpy(b) for b in data["blocks"]]

        def loss_of(ids):  # two views of the same batch, differing by dropout (run_simcse.py)
            def features():
                ones = torch.ones_like(ids)
                return {"input_ids": ids, "attention_mask": ones, "embed_mask": ones}
            return loss_fn(model(features()), model(features()))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    model.train()

    def step(i):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(batches[i % len(batches)])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        return loss.item()

    result = _timed_steps(step, args.warmup, args.steps)
    result["trainable"] = sum(p.numel() for p in params)
    return result


# ------------------------------------------------------------------------------------------------
# Parent

def make_batches(work: Path, n: int, seed: int = 0) -> dict:
    """n batches of 8 x 128 WikiText-2 tokens; MNTP's masked copies and labels; saved as .npz."""
    import numpy as np
    import torch
    sys.path.insert(0, str(REPO))
    from llm2vec_mini.convert.hf_tokenizer import load_hf_tokenizer
    from llm2vec_mini.data import read_lines
    from llm2vec_mini.mntp import MNTPCollator, choose_mask_token, group_texts

    tok = load_hf_tokenizer(work / "hf")
    lines = read_lines(WIKITEXT, strip=True, skip_empty=True)
    blocks = group_texts(tok.encode_batch(lines[:2000], add_special_tokens=True), BLOCK)[: n * BATCH]
    specials = [i for i in (tok.bos_id, tok.eos_id, tok.pad_id) if i is not None]
    collator = MNTPCollator(mask_id=choose_mask_token(tok), vocab_size=tok.vocab_size,
                            special_ids=specials, mask_ratio=0.2)
    inputs, labels = collator(blocks, generator=torch.Generator().manual_seed(seed))
    shape = (n, BATCH, BLOCK)
    arrays = {"blocks": blocks.view(shape).numpy(), "inputs": inputs.view(shape).numpy(),
              "labels": labels.view(shape).numpy()}
    np.savez(work / "batches.npz", **arrays)
    return {"masked_per_batch": float((labels != -100).sum()) / n}


def run_child(side: str, task: str, work: Path, args) -> dict:
    python = REF_PY if side == "official" else Path(sys.executable)
    if not python.exists():
        raise SystemExit(f"{python} not found: run `make reference-setup`")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1",
               PYTHONWARNINGS="ignore")
    cmd = [str(python), __file__, "--child", f"{side}:{task}", "--work", str(work), "--threads",
           str(args.threads), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=work)
    if done.returncode != 0:
        raise SystemExit(f"{side} {task} child failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per child")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="rounds of the four children")
    parser.add_argument("--tasks", default="mntp,simcse")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        side, task = args.child.split(":")
        fn = child_ours if side == "ours" else child_official
        print(json.dumps(fn(task, Path(args.work), args)))
        return

    sys.path.insert(0, str(REPO))
    import torch

    from llm2vec_mini.convert.hf import load_pretrained, save_hf_dir
    from llm2vec_mini.hub import smollm2_path

    tasks = [t for t in args.tasks.split(",") if t]
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        work = Path(tmp)
        model, tokenizer = load_pretrained(smollm2_path(), dtype=torch.float32)
        save_hf_dir(model, tokenizer, work / "hf")
        del model
        info = make_batches(work, args.warmup + args.steps)
        load_before = os.getloadavg()
        runs = {(s, t): [] for t in tasks for s in ("ours", "official")}
        for _ in range(args.repeats):
            for t in tasks:
                for s in ("ours", "official"):
                    runs[s, t].append(run_child(s, t, work, args))
                    r = runs[s, t][-1]
                    print(f"  {s} {t}: {statistics.median(r['seconds']):.2f} s/step, "
                          f"peak {r['peak_mib']:.0f} MiB", file=sys.stderr)
        load_after = os.getloadavg()

    print(f"SmolLM2-135M-Instruct fp32, LoRA r={LORA['r']} alpha={LORA['alpha']:g} dropout "
          f"{LORA['dropout']}, batch {BATCH} x {BLOCK} tokens, AdamW, {args.threads} threads; "
          f"{args.warmup} warm-up + {args.steps} timed steps per child, {args.repeats} round(s); "
          f"MNTP masks {info['masked_per_batch']:.0f} tokens per batch")
    print(f"load average before {load_before[0]:.2f} / after {load_after[0]:.2f} (1 min; "
          f"{os.cpu_count()} cores)")
    print(f"{'':<18}{'s/step':>8}{'peak MiB':>10}{'RSS before':>12}{'trainable':>11}  "
          f"per-step seconds (all runs)   first losses")
    summary = {}
    for t in tasks:
        for s in ("ours", "official"):
            rs = runs[s, t]
            sec = min(statistics.median(r["seconds"]) for r in rs)  # best round's median
            peak = max(r["peak_mib"] for r in rs)
            summary[s, t] = (sec, peak)
            steps = " ".join(f"{x:.2f}" for r in rs for x in r["seconds"])
            print(f"{s + ' ' + t:<18}{sec:>8.2f}{peak:>10.0f}{rs[0]['rss_before_mib']:>12.0f}"
                  f"{rs[0]['trainable']:>11,}  {steps}   {rs[0]['losses'][0]:.3f}")
    targets = {"mntp": (0.8, 0.7), "simcse": (0.9, None)}
    for t in tasks:
        (so, po), (sr, pr) = summary["ours", t], summary["official", t]
        time_target, mem_target = targets[t]
        line = (f"{t}: time ours/official {so / sr:.2f} (target <= {time_target})  "
                f"{'OK' if so / sr <= time_target else 'MISSED'};  peak memory {po / pr:.2f}")
        if mem_target is not None:
            line += f" (target <= {mem_target})  {'OK' if po / pr <= mem_target else 'MISSED'}"
        print(line)
    if not all(r["peak_reset"] for rs in runs.values() for r in rs):
        print("note: the peak could not be reset after loading; it includes the loading")


if __name__ == "__main__":
    main()
