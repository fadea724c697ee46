"""Training-step speed and memory: ours (fp32 and bf16) vs the official stack, MNTP and SimCSE, two sizes.

One run, the same weights, the same batches, LoRA r=16, alpha=32, dropout 0.05 on the 7 projections,
AdamW (lr 5e-5), gradient clipping at 1.0, no gradient checkpointing, the same thread count. Rows:

    smollm2     SmolLM2-135M-Instruct (the cached GGUF, dequantised once to an fp32 HF directory);
                batches of 8 x 128 tokens of WikiText-2 validation
    sheared     the Sheared-LLaMA-1.3B shape (its Hub config.json, random weights in one fp32
                pytorch_model.bin, the Llama-2 tokenizer; as bench_encode.py); batches of 4 x 128
                tokens, which keep the official SimCSE step (two graphs of 24 layers) under 24 GB

MNTP's batches are masked once by our MNTP collator (20 %, "_" as the mask token). Contenders:

    ours fp32   MNTP:   llm2vec_mini.mntp.MNTPTask + lora.add_lora (bidirectional; the vocabulary
                        projection only at the masked positions)
                SimCSE: simcse.SimCSETask (two dropout views, mean pooling, scale 20), attention
                        dropout 0.3, LoRA added after it
    ours auto   the same with dtype "auto" (what TrainConfig(dtype="auto") does: bf16 where the probe
                finds it faster; precision.set_compute_dtype after the LoRA layers are added)
    official    MNTP:   llm2vec.models.LlamaBiForMNTP, peft LoRA on its LlamaBiModel, the model's own
    fp32                shifted cross-entropy (logits for every position)            (.venv-ref)
                SimCSE: llm2vec.LLM2Vec (LlamaBiModel, attention_dropout 0.3, peft LoRA), called twice,
                        HardNegativeNLLLoss(scale=20), as experiments/run_simcse.py does
    official    the same with torch_dtype=torch.bfloat16 (not run by default: --only)
    bf16

Each (row, task, contender) runs in its own child process: load, `--warmup` optimizer steps, then
`--steps` timed ones (zero_grad, forward, backward, clip, AdamW step: what `train.train` does per
step). Memory: the child resets its peak RSS after loading (Linux: "5" into /proc/self/clear_refs)
and reads VmHWM after the steps, so the peak covers training, weights included, not the loading.

FLOPs of a step: the forward pass over the real tokens (2 * P * tokens + attention, and for MNTP
the vocabulary projection at the masked positions only) and the backward pass to the activations
(the same again: the base weights are frozen, the LoRA matrices' gradients are small), so
4 * P * tokens + 3 * attention + 2 * 2 * hidden * vocab * masked; SimCSE twice (two views).
Matrix-multiply rates (fp32 and bf16, torch.mm of two 2048 x 2048 matrices) are measured in the
same run with the same threads.

    .venv/bin/python benchmarks/bench_train.py [--rows smollm2,sheared] [--tasks mntp,simcse]
        [--steps 4] [--steps-large 2] [--warmup 1] [--threads 2] [--repeats 1] [--only ours-fp32,...]

Targets: our bf16 step at least 2x faster than our fp32 one (issue 15, on a CPU with bf16
instructions); ours fp32: MNTP at most 0.8x the official seconds per step and 0.7x its peak memory,
SimCSE at most 0.9x the official seconds per step (issue 10).
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
BATCH = {"smollm2": 8, "sheared": 4}  # sequences per batch
BLOCK = 128  # tokens per sequence
CONTENDERS = ("ours-fp32", "ours-auto", "official-fp32")  # and official-bf16 with --only


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

def child_ours(task: str, dtype: str, work: Path, model_dir: Path, args) -> dict:
    import numpy as np
    import torch
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(REPO))
    from llm2vec_mini.convert.hf import load_pretrained
    from llm2vec_mini.lora import add_lora
    from llm2vec_mini.mntp import MNTPCollator, MNTPTask
    from llm2vec_mini.precision import compute_dtype, set_compute_dtype
    from llm2vec_mini.simcse import SimCSETask, set_attention_dropout

    data = np.load(work / "batches.npz")
    torch.manual_seed(0)
    model, tokenizer = load_pretrained(model_dir, dtype=torch.float32)
    model.set_causal(False)
    if task == "simcse":
        set_attention_dropout(model, ATTENTION_DROPOUT)
    add_lora(model, r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"])
    chosen = compute_dtype("auto" if dtype == "auto" else torch.float32)
    # what train.train does with TrainConfig.dtype: every block in bf16 (no fp32 blocks in training)
    fp32_blocks = set_compute_dtype(model, chosen, keep_fp32=[])
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
    result["dtype"] = str(chosen).replace("torch.", "")
    result["bf16_blocks"] = 2 * model.config.num_hidden_layers - len(fp32_blocks)
    return result


def child_official(task: str, dtype: str, work: Path, model_dir: Path, args) -> dict:
    """Runs under .venv-ref: transformers 4.44.2, peft 0.13.2, llm2vec 0.2.3."""
    import numpy as np
    import torch
    torch.set_num_threads(args.threads)
    from peft import LoraConfig, get_peft_model

    data = np.load(work / "batches.npz")
    torch.manual_seed(0)
    torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], bias="none",
                      task_type=None, target_modules=["q_proj", "v_proj", "k_proj", "o_proj",
                                                      "gate_proj", "up_proj", "down_proj"])
    if task == "mntp":
        from llm2vec.models import LlamaBiForMNTP
        model = LlamaBiForMNTP.from_pretrained(str(model_dir), torch_dtype=torch_dtype)
        model.model = get_peft_model(model.model, lora)  # as run_mntp.py's initialize_peft
        batches = [(torch.from_numpy(i), torch.from_numpy(lab))
                   for i, lab in zip(data["inputs"], data["labels"])]

        def loss_of(batch):
            ids, labels = batch
            return model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
    else:
        from llm2vec import LLM2Vec
        from llm2vec.loss.utils import load_loss
        model = LLM2Vec.from_pretrained(str(model_dir), enable_bidirectional=True, pooling_mode="mean",
                                        torch_dtype=torch_dtype, attention_dropout=ATTENTION_DROPOUT)
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

def make_batches(work: Path, model_dir: Path, n: int, batch: int, seed: int = 0) -> dict:
    """n batches of `batch` x 128 WikiText-2 tokens; MNTP's masked copies and labels; saved as .npz."""
    import numpy as np
    import torch
    sys.path.insert(0, str(REPO))
    from llm2vec_mini.convert.hf import read_config
    from llm2vec_mini.convert.hf_tokenizer import load_hf_tokenizer
    from llm2vec_mini.data import read_lines
    from llm2vec_mini.mntp import MNTPCollator, choose_mask_token, group_texts

    tok = load_hf_tokenizer(model_dir, read_config(model_dir))
    lines = read_lines(WIKITEXT, strip=True, skip_empty=True)
    blocks = group_texts(tok.encode_batch(lines[:2000], add_special_tokens=True), BLOCK)[: n * batch]
    specials = [i for i in (tok.bos_id, tok.eos_id, tok.pad_id) if i is not None]
    collator = MNTPCollator(mask_id=choose_mask_token(tok), vocab_size=tok.vocab_size,
                            special_ids=specials, mask_ratio=0.2)
    inputs, labels = collator(blocks, generator=torch.Generator().manual_seed(seed))
    shape = (n, batch, BLOCK)
    arrays = {"blocks": blocks.view(shape).numpy(), "inputs": inputs.view(shape).numpy(),
              "labels": labels.view(shape).numpy()}
    np.savez(work / "batches.npz", **arrays)
    return {"masked_per_batch": float((labels != -100).sum()) / n}


def child_gemm(threads: int) -> dict:
    """torch.mm of two 2048 x 2048 matrices, fp32 and bf16: FLOP/s."""
    import torch
    torch.set_num_threads(threads)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(2048, 2048).to(dtype), torch.randn(2048, 2048).to(dtype)
        torch.mm(a, b)
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < 3.0:
            torch.mm(a, b)
            reps += 1
        out[name] = 2 * 2048 ** 3 * reps / (time.perf_counter() - start)
    return out


def step_flops(cfg: dict, task: str, batch: int, masked: float) -> float:
    """A LoRA step's FLOPs: forward plus the backward pass to the activations (see module doc)."""
    h, m, L, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    nh = cfg["num_attention_heads"]
    d = cfg.get("head_dim") or h // nh
    nkv = cfg["num_key_value_heads"]
    P = L * (h * nh * d * 2 + h * nkv * d * 2 + 3 * h * m)  # the projections
    tokens = batch * BLOCK
    attention = L * 4 * nh * d * BLOCK * BLOCK * batch
    if task == "mntp":
        return 4 * P * tokens + 3 * attention + 4 * h * V * masked
    return 2 * (4 * P * tokens + 3 * attention)  # two views


def run_child(name: str, task: str, work: Path, model_dir: Path, steps: int, args) -> dict:
    side = name.split("-")[0]
    python = REF_PY if side == "official" else Path(sys.executable)
    if not python.exists():
        raise SystemExit(f"{python} not found: run `make reference-setup`")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1",
               PYTHONWARNINGS="ignore")
    cmd = [str(python), __file__, "--child", f"{name}:{task}", "--work", str(work), "--model-dir",
           str(model_dir), "--threads", str(args.threads), "--steps", str(steps), "--warmup",
           str(args.warmup)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=work)
    if done.returncode != 0:
        raise SystemExit(f"{name} {task} child failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_row(row: str, model_dir: Path, args, tasks, contenders) -> None:
    cfg = json.loads((model_dir / "config.json").read_text())
    batch = BATCH[row]
    steps = args.steps if row == "smollm2" else args.steps_large
    with tempfile.TemporaryDirectory(prefix=f"bench_train_{row}_") as tmp:
        work = Path(tmp)
        info = make_batches(work, model_dir, args.warmup + steps, batch)
        load_before = os.getloadavg()
        runs = {(c, t): [] for t in tasks for c in contenders}
        gemm = []
        for _ in range(args.repeats):
            for t in tasks:
                for c in contenders:
                    runs[c, t].append(run_child(c, t, work, model_dir, steps, args))
                    r = runs[c, t][-1]
                    print(f"  {row} {c} {t}: {statistics.median(r['seconds']):.2f} s/step, "
                          f"peak {r['peak_mib']:.0f} MiB", file=sys.stderr, flush=True)
            gemm.append(child_gemm(args.threads))
        load_after = os.getloadavg()
    rate = {k: max(g[k] for g in gemm) for k in ("fp32", "bf16")}
    name = "SmolLM2-135M-Instruct" if row == "smollm2" else "Sheared-LLaMA-1.3B shape (random weights)"
    print(f"\n== {row}: {name}, LoRA r={LORA['r']} alpha={LORA['alpha']:g} dropout {LORA['dropout']}, "
          f"batch {batch} x {BLOCK} tokens, AdamW, {args.threads} threads; {args.warmup} warm-up + {steps} "
          f"timed steps per child, {args.repeats} round(s); MNTP masks {info['masked_per_batch']:.0f} "
          f"tokens per batch")
    print(f"load average before {load_before[0]:.2f} / after {load_after[0]:.2f} (1 min; "
          f"{os.cpu_count()} cores); square GEMM rates: fp32 {rate['fp32'] / 1e9:.1f}, bf16 "
          f"{rate['bf16'] / 1e9:.1f} GFLOP/s")
    print(f"{'':<22}{'s/step':>8}{'peak MiB':>10}{'RSS before':>12}{'GFLOP/s':>9}{'% fp32':>8}{'% bf16':>8}"
          f"  per-step seconds (all runs)   first loss")
    summary = {}
    for t in tasks:
        flops = step_flops(cfg, t, batch, info["masked_per_batch"])
        for c in contenders:
            rs = runs[c, t]
            sec = min(statistics.median(r["seconds"]) for r in rs)  # best round's median
            peak = max(r["peak_mib"] for r in rs)
            summary[c, t] = (sec, peak)
            steps_s = " ".join(f"{x:.2f}" for r in rs for x in r["seconds"])
            achieved = flops / sec
            print(f"{c + ' ' + t:<22}{sec:>8.2f}{peak:>10.0f}{rs[0]['rss_before_mib']:>12.0f}"
                  f"{achieved / 1e9:>9.1f}{achieved / rate['fp32']:>8.1%}{achieved / rate['bf16']:>8.1%}"
                  f"  {steps_s}   {rs[0]['losses'][0]:.3f}")
        if ("ours-auto", t) in runs:
            r = runs["ours-auto", t][0]
            print(f"  ours auto chose {r['dtype']}: {r['bf16_blocks']} of "
                  f"{2 * cfg['num_hidden_layers']} blocks in bf16")
    for t in tasks:
        if ("ours-auto", t) in summary and ("ours-fp32", t) in summary:
            speedup = summary["ours-fp32", t][0] / summary["ours-auto", t][0]
            print(f"{t}: ours auto {speedup:.2f}x faster than ours fp32 (target >= 2 with bf16 "
                  f"instructions)  {'OK' if speedup >= 2 else 'MISSED'}; peak memory "
                  f"{summary['ours-auto', t][1] / summary['ours-fp32', t][1]:.2f}x")
        if ("ours-fp32", t) in summary and ("official-fp32", t) in summary:
            (so, po), (sr, pr) = summary["ours-fp32", t], summary["official-fp32", t]
            time_target, mem_target = {"mntp": (0.8, 0.7), "simcse": (0.9, None)}[t]
            line = (f"{t}: ours fp32 / official fp32: time {so / sr:.2f} (target <= {time_target})  "
                    f"{'OK' if so / sr <= time_target else 'MISSED'};  peak memory {po / pr:.2f}")
            if mem_target is not None:
                line += f" (target <= {mem_target})  {'OK' if po / pr <= mem_target else 'MISSED'}"
            print(line)
        if ("ours-auto", t) in summary and ("official-fp32", t) in summary:
            print(f"{t}: ours auto / official fp32: time "
                  f"{summary['ours-auto', t][0] / summary['official-fp32', t][0]:.2f}")
    if not all(r["peak_reset"] for rs in runs.values() for r in rs):
        print("note: the peak could not be reset after loading; it includes the loading")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="smollm2,sheared")
    parser.add_argument("--tasks", default="mntp,simcse")
    parser.add_argument("--steps", type=int, default=4, help="SmolLM2: timed optimizer steps per child")
    parser.add_argument("--steps-large", type=int, default=2, help="1.3B shape: timed steps per child")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="rounds of all children")
    parser.add_argument("--only", default=",".join(CONTENDERS), help="comma-separated contenders")
    parser.add_argument("--sheared-dir", type=Path, default=None,
                        help="reuse (or keep) the 1.3B-shaped checkpoint in this folder")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, task = args.child.split(":")
        side, dtype = name.split("-")
        fn = child_ours if side == "ours" else child_official
        print(json.dumps(fn(task, dtype, Path(args.work), Path(args.model_dir), args)))
        return

    sys.path.insert(0, str(REPO))
    import torch

    from benchmarks.bench_encode import write_sheared, write_smollm2
    from benchmarks.machine import cpu_line
    from llm2vec_mini.precision import bf16_speedup

    torch.set_num_threads(args.threads)
    print(cpu_line())
    print(f"torch {torch.__version__}; the probe of dtype='auto' here: bf16 F.linear {bf16_speedup():.2f}x "
          f"fp32's speed ({time.strftime('%Y-%m-%d')})")
    tasks = [t for t in args.tasks.split(",") if t]
    contenders = [c for c in args.only.split(",") if c]
    with tempfile.TemporaryDirectory(prefix="bench_train_models_") as tmp:
        for row in [r for r in args.rows.split(",") if r]:
            if row == "smollm2":
                model_dir = write_smollm2(Path(tmp) / "smollm2")
            else:
                folder = args.sheared_dir or Path(tmp) / "sheared"
                ready = (folder / "pytorch_model.bin").is_file() and (folder / "tokenizer.json").is_file()
                model_dir = folder if ready else write_sheared(folder)
            run_row(row, model_dir, args, tasks, contenders)


if __name__ == "__main__":
    main()
