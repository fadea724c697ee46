"""Encode speed: our `LLM2Vec.encode` vs the official llm2vec 0.2.3 vs transformers 5, fp32 and bf16.

All in one run, at two model sizes and on two kinds of text, each (size, texts) pair a row:

    smollm2-dev     SmolLM2-135M-Instruct (the cached GGUF, dequantised once to an fp32 HF
                    directory that every contender loads), STS-B dev sentences (both columns)
    smollm2-short   the same model, the shortest third of STS-B train (about 10 tokens each)
    sheared-dev     the Sheared-LLaMA-1.3B shape: its config.json as on the Hub, random N(0, 0.02)
                    weights in one fp32 pytorch_model.bin (5.4 GB), the Llama-2 tokenizer; 500 dev
                    sentences
    sheared-short   the same model, 1,000 of the shortest third of STS-B train

and in each row six contenders, batch 32, mean pooling, bidirectional, the same threads:

    ours fp32          LLM2Vec.from_pretrained(dtype=torch.float32)                       (.venv)
    ours auto          LLM2Vec.from_pretrained(dtype="auto"), the default: bf16 where the probe
                       finds it faster (precision.py), and which blocks stay fp32
    official fp32      llm2vec.LLM2Vec (torch_dtype float32, its default), sdpa     (.venv-ref)
    official bf16      the same with torch_dtype=torch.bfloat16: the whole model in bf16
    transformers fp32  transformers 5 LlamaModel with a hand-written bidirectional 4D mask, fed our
    transformers bf16  tokenisation and batches, pooled by hand; dtype float32 or bfloat16  (.venv)
    gemm               the matrix-multiply rates of this machine in fp32 and bf16 (below)

Each runs in its own child process; it warms up on one batch, then the whole `encode` call is timed
(tokenisation included, model loading excluded). Contenders take turns, `--repeats` rounds of
them; the best time of each counts.

FLOPs of the real tokens (padding does not count), for a sentence of L model-input tokens:
    2 * P * L  +  n_layers * 4 * n_heads * head_dim * L^2
P = the non-embedding parameters of the decoder (every projection and norm; no lm_head), the
second term the attention scores q k^T and their use on v, over the real tokens only.

Matrix-multiply rates, measured in the same run with the same threads, in fp32 and in bf16:
  * square: torch.mm of two 2048 x 2048 matrices (the machine's best case);
  * model shapes: the decoder's seven projections (x @ W^T) at the token counts M = B x T of our
    own batches, looping over all layers' weights; one batch in `--roofline-stride` is timed.
A contender's fraction = (real-token FLOPs / its seconds) / rate.

Embeddings: per sentence 1 - cos against the official fp32 ones (the parity bar for ours fp32:
<= 1e-5; for bf16 the bar of issue 15: <= 1e-3 of fp32).

    .venv/bin/python benchmarks/bench_encode.py [--rows smollm2-dev,smollm2-short,sheared-dev,sheared-short]
        [--n-dev 3000] [--n-short 0] [--n-dev-large 500] [--n-short-large 1000] [--batch-size 32]
        [--threads 2] [--repeats 1] [--only ours-fp32,ours-auto,...] [--sheared-dir DIR]

Targets (issue 15), on a CPU with bf16 instructions: ours auto >= 3x the official fp32 sentences/s at
both sizes. In fp32: ours >= 1.4x the official on short texts; >= 1.0x at the 1.3B shape with >= 90 %
of the same run's fp32 GEMM rate. (Issue 10: ours fp32 >= 1.25x the official on SmolLM2.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REF_PY = REPO / ".venv-ref" / "bin" / "python"
DATA = Path(os.environ.get("LLM2VEC_MINI_DATA", REPO.parent / "shared" / "data"))
CONTENDERS = ("ours-fp32", "ours-auto", "official-fp32", "official-bf16", "transformers-fp32",
              "transformers-bf16")
ROWS = ("smollm2-dev", "smollm2-short", "sheared-dev", "sheared-short")
# princeton-nlp/Sheared-LLaMA-1.3B's config.json as the Hub has it (transcribed)
SHEARED_CONFIG = {
    "_name_or_path": "princeton-nlp/Sheared-LLaMA-1.3B", "architectures": ["LlamaForCausalLM"],
    "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 5504, "max_position_embeddings": 4096,
    "model_type": "llama", "num_attention_heads": 16, "num_hidden_layers": 24, "num_key_value_heads": 16,
    "pad_token_id": 0, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.28.1",
    "use_cache": True, "vocab_size": 32000,
}


def _setup_threads(threads: int):
    import torch
    torch.set_num_threads(threads)
    return torch


def _warm_then_time(encode, sentences, batch_size):
    """Encode one batch (warm-up: allocator, MKL's and oneDNN's buffers), then time the whole list."""
    encode(sentences[:batch_size])
    start = time.perf_counter()
    emb = encode(sentences)
    return emb, time.perf_counter() - start


# ------------------------------------------------------------------------------------------------
# Children: each loads its stack, encodes, saves the embeddings and prints one JSON line.

def child_ours(work: Path, model_dir: Path, dtype: str, batch_size: int, threads: int) -> dict:
    torch = _setup_threads(threads)
    import numpy as np
    sys.path.insert(0, str(REPO))
    from llm2vec_mini.encoder import LLM2Vec

    sentences = json.loads((work / "sentences.json").read_text())
    l2v = LLM2Vec.from_pretrained(model_dir, pooling="mean", device="cpu",
                                  dtype=torch.float32 if dtype == "fp32" else "auto")
    emb, seconds = _warm_then_time(lambda s: l2v.encode(s, batch_size=batch_size), sentences, batch_size)
    np.save(work / f"ours-{dtype}.npy", emb)
    # what the FLOP count and the roofline need: real tokens per sentence, our batches' shapes
    items = l2v.prepare(sentences)
    lengths = [len(ids) for ids, _ in items]
    order = sorted(lengths, reverse=True)
    shapes = [(len(order[s:s + batch_size]), order[s]) for s in range(0, len(order), batch_size)]
    n_layers = l2v.model.config.num_hidden_layers
    bf16_blocks = 2 * n_layers - len(l2v.fp32_blocks)
    return {"seconds": seconds, "lengths": lengths, "batch_shapes": shapes, "torch": torch.__version__,
            "dtype": str(l2v.dtype).replace("torch.", ""), "bf16_blocks": bf16_blocks,
            "blocks": 2 * n_layers}


def child_official(work: Path, model_dir: Path, dtype: str, batch_size: int, threads: int) -> dict:
    """Runs under .venv-ref (transformers 4.44.2, peft 0.13.2, llm2vec 0.2.3)."""
    torch = _setup_threads(threads)
    import numpy as np
    import transformers
    from llm2vec import LLM2Vec

    sentences = json.loads((work / "sentences.json").read_text())
    l2v = LLM2Vec.from_pretrained(str(model_dir), enable_bidirectional=True, pooling_mode="mean",
                                  torch_dtype=torch.float32 if dtype == "fp32" else torch.bfloat16)
    # Our HF export names a generic PreTrainedTokenizerFast, whose default inputs include
    # token_type_ids, which LlamaModel.forward rejects; the Hub's tokenizers have none.
    l2v.tokenizer.model_input_names = ["input_ids", "attention_mask"]
    attn = l2v.model.config._attn_implementation
    emb, seconds = _warm_then_time(
        lambda s: l2v.encode(s, batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True,
                             device="cpu"), sentences, batch_size)
    np.save(work / f"official-{dtype}.npy", np.asarray(emb, dtype=np.float32))
    return {"seconds": seconds, "attn_implementation": attn, "transformers": transformers.__version__}


def child_transformers(work: Path, model_dir: Path, dtype: str, batch_size: int, threads: int) -> dict:
    """transformers 5's LlamaModel made bidirectional by the mask alone, on our tokenisation."""
    torch = _setup_threads(threads)
    import numpy as np
    import transformers

    torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    sentences = json.loads((work / "sentences.json").read_text())
    model = transformers.LlamaModel.from_pretrained(str(model_dir), dtype=torch_dtype,
                                                    attn_implementation="sdpa").eval()
    prep = _Preparer(model_dir)  # our tokenisation and batching rules, not our model

    @torch.inference_mode()
    def encode(texts):
        items = prep.prepare(texts)
        out = torch.zeros(len(items), model.config.hidden_size)
        order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            ids, am, em = prep.collate([items[i] for i in idx])  # each (B, T), left padded
            B, T = ids.shape
            mask = torch.zeros(B, 1, T, T, dtype=torch_dtype)  # every query sees every real key
            mask.masked_fill_(am[:, None, None, :] == 0, torch.finfo(torch_dtype).min)
            pos = (am.cumsum(-1) - 1).clamp(min=0)
            h = model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state.float()
            m = em.float()  # (B, T) mean over the text tokens
            out[idx] = torch.einsum("bth,bt->bh", h, m) / m.sum(-1, keepdim=True)
        return out.numpy()

    emb, seconds = _warm_then_time(encode, sentences, batch_size)
    np.save(work / f"transformers-{dtype}.npy", emb)
    return {"seconds": seconds, "transformers": transformers.__version__}


class _Preparer:
    """Our encoder's text -> (ids, pooled count) and collate rules, without loading our model."""

    def __init__(self, hf_dir: Path):
        sys.path.insert(0, str(REPO))
        from llm2vec_mini.convert.hf import read_config
        from llm2vec_mini.convert.hf_tokenizer import load_hf_tokenizer
        from llm2vec_mini.encoder import LLM2Vec

        enc = LLM2Vec.__new__(LLM2Vec)  # only the text-side settings are needed
        enc.tokenizer = load_hf_tokenizer(hf_dir, read_config(hf_dir))
        enc.pooling, enc.max_length, enc.doc_max_length, enc.skip_instruction = "mean", 512, 400, True
        enc.pad_id = enc.tokenizer.eos_id
        self.prepare, self.collate = enc.prepare, enc.collate


def child_gemm(work: Path, model_dir: Path, batch_size: int, threads: int, stride: int) -> dict:
    """Matrix-multiply rates in fp32 and bf16: a square GEMM, and the model's projections at our
    batch shapes."""
    torch = _setup_threads(threads)
    import torch.nn.functional as F

    def rate(fn, flops, min_seconds=1.0):
        fn()  # warm-up
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < min_seconds:
            fn()
            reps += 1
        return flops * reps / (time.perf_counter() - start)

    cfg = json.loads((model_dir / "config.json").read_text())
    h, m, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    d = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    nq, nkv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    shapes = [(nq, h), (nkv, h), (nkv, h), (h, nq), (m, h), (m, h), (h, m)]  # q k v o gate up down
    batches = json.loads((work / "ours-fp32.json").read_text())["batch_shapes"][::stride]
    result = {"model_shapes_batches": len(batches)}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(2048, 2048).to(dtype), torch.randn(2048, 2048).to(dtype)
        result[f"square_{name}"] = rate(lambda: torch.mm(a, b), 2 * 2048 ** 3, 3.0)
        weights = [[(torch.randn(o, i) * 0.02).to(dtype) for o, i in shapes] for _ in range(L)]
        flops = seconds = 0.0
        for B, T in batches:
            xs = {i: torch.randn(B * T, i).to(dtype) for i in {i for _, i in shapes}}
            for w in weights[0]:
                F.linear(xs[w.shape[1]], w)  # warm-up at this M
            start = time.perf_counter()
            for layer in weights:
                for w in layer:
                    F.linear(xs[w.shape[1]], w)  # (M, in) @ (in, out)
            seconds += time.perf_counter() - start
            flops += 2 * B * T * L * sum(o * i for o, i in shapes)
        result[f"shapes_{name}"] = flops / seconds
        del weights
    return result


# ------------------------------------------------------------------------------------------------
# Parent: the models, the texts, the children in turn, the table

def write_smollm2(folder: Path) -> Path:
    import torch

    from llm2vec_mini.convert.hf import load_pretrained, save_hf_dir
    from llm2vec_mini.hub import smollm2_path
    model, tokenizer = load_pretrained(smollm2_path(), dtype=torch.float32)
    save_hf_dir(model, tokenizer, folder)
    return folder


def write_sheared(folder: Path) -> Path:
    """The Sheared-LLaMA-1.3B shape: its Hub config.json, random fp32 weights in one
    pytorch_model.bin (bench_load_hf's writer, in a child), the Llama-2 tokenizer."""
    sys.path.insert(0, str(REPO))
    from llm2vec_mini.convert.gguf import load_gguf_tokenizer
    from llm2vec_mini.convert.hf_tokenizer import save_hf_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    writer = ("import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; "
              "from benchmarks.bench_load_hf import write_checkpoint; "
              "write_checkpoint(Path(sys.argv[2]), False)")
    subprocess.run([sys.executable, "-c", writer, str(REPO), str(folder)], check=True)
    (folder / "config.json").write_text(json.dumps(SHEARED_CONFIG, indent=2) + "\n")
    tokenizer = load_gguf_tokenizer(DATA / "tokenizers" / "ggml-vocab-llama-spm.gguf")
    save_hf_tokenizer(tokenizer, folder, legacy_merges=True)  # transformers 4.x reads this form
    return folder


def texts_for(row: str, args) -> list[str]:
    from llm2vec_mini.data import load_sts
    model, kind = row.split("-")
    if kind == "dev":
        dev = load_sts(DATA / "stsbenchmark" / "sts-dev.csv")[0]
        return (list(dev.sentences1) + list(dev.sentences2))[: args.n_dev if model == "smollm2" else
                                                             args.n_dev_large]
    train = load_sts(DATA / "stsbenchmark" / "sts-train.csv")[0]
    every = list(train.sentences1) + list(train.sentences2)
    shortest = sorted(every, key=len)[: len(every) // 3]  # by characters: the same for both tokenizers
    n = args.n_short_large if model == "sheared" else args.n_short or len(shortest)
    step = max(1, len(shortest) // n)  # every k-th of them: the lengths spread as in the whole third
    return shortest[::step][:n]


def run_child(name: str, work: Path, model_dir: Path, args) -> dict:
    side, dtype = name.split("-")
    python = REF_PY if side == "official" else Path(sys.executable)
    if not python.exists():
        raise SystemExit(f"{python} not found: run `make reference-setup`")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1",
               PYTHONWARNINGS="ignore")
    cmd = [str(python), __file__, "--child", name, "--work", str(work), "--model-dir", str(model_dir),
           "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--roofline-stride",
           str(args.roofline_stride)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=work)
    if done.returncode != 0:
        raise SystemExit(f"{name} child failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    (work / f"{name}.json").write_text(json.dumps(result))
    return result


def real_token_flops(lengths, cfg) -> float:
    """2 * P * L + n_layers * 4 * n_heads * head_dim * L^2, summed over sentences (see module doc)."""
    h, m, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    nh = cfg["num_attention_heads"]
    d = cfg.get("head_dim") or cfg["hidden_size"] // nh
    nkv = cfg["num_key_value_heads"]
    per_layer = h * nh * d * 2 + h * nkv * d * 2 + 3 * h * m + 2 * h  # q,o + k,v + mlp + 2 norms
    P = L * per_layer + h  # + the final norm
    return sum(2 * P * n + L * 4 * nh * d * n * n for n in lengths)


def one_minus_cos(ours, ref):
    import numpy as np
    a, b = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return 1 - (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def run_row(row: str, model_dir: Path, args, contenders) -> dict:
    import numpy as np
    sentences = texts_for(row, args)
    with tempfile.TemporaryDirectory(prefix=f"bench_encode_{row}_") as tmp:
        work = Path(tmp)
        (work / "sentences.json").write_text(json.dumps(sentences))
        runs = {c: [] for c in contenders + ["gemm"]}
        load = [os.getloadavg()[0]]
        for _ in range(args.repeats):
            for name in contenders:
                runs[name].append(run_child(name, work, model_dir, args))
                print(f"  {row} {name}: {runs[name][-1]['seconds']:.2f} s", file=sys.stderr, flush=True)
            if "ours-fp32" in contenders:
                runs["gemm"].append(run_child("gemm-both", work, model_dir, args))
        load.append(os.getloadavg()[0])
        emb = {c: np.load(work / f"{c}.npy") for c in contenders}
    return {"sentences": sentences, "runs": runs, "emb": emb, "load": load}


def report(row: str, result: dict, cfg: dict, args, contenders) -> None:
    import numpy as np
    runs, emb, n = result["runs"], result["emb"], len(result["sentences"])
    best = {c: min(r["seconds"] for r in runs[c]) for c in contenders}
    model = "SmolLM2-135M-Instruct" if row.startswith("smollm2") else "Sheared-LLaMA-1.3B shape (random)"
    texts = "STS-B dev" if row.endswith("dev") else "shortest third of STS-B train"
    print(f"\n== {row}: {model}, {n} sentences ({texts}), batch {args.batch_size}, {args.threads} threads, "
          f"best of {args.repeats}; load average {result['load'][0]:.2f} -> {result['load'][1]:.2f}")
    ours = runs.get("ours-fp32", [{}])[0]
    flops = real_token_flops(ours["lengths"], cfg) if "lengths" in ours else None
    gemm = {k: max(r[k] for r in runs["gemm"]) for k in runs["gemm"][0]} if runs["gemm"] else {}
    if flops:
        padded = sum(B * T for B, T in ours["batch_shapes"])
        print(f"real tokens {sum(ours['lengths'])} (padded {padded}: "
              f"{padded / sum(ours['lengths']) - 1:.1%} padding), {flops / 1e12:.3f} TFLOP")
    if gemm:
        print(f"matrix-multiply rates (GFLOP/s): fp32 square {gemm['square_fp32'] / 1e9:.1f}, at our shapes "
              f"{gemm['shapes_fp32'] / 1e9:.1f}; bf16 square {gemm['square_bf16'] / 1e9:.1f}, at our shapes "
              f"{gemm['shapes_bf16'] / 1e9:.1f} ({gemm['model_shapes_batches']} batches)")
    ref = "official-fp32" if "official-fp32" in contenders else None
    head = f"{'':<19}{'seconds':>8}{'sent/s':>8}"
    head += f"{'x off.fp32':>11}{'x off.bf16':>11}" if ref else ""
    head += f"{'1-cos max':>10}{'median':>9}" if ref else ""
    head += f"{'GFLOP/s':>9}{'%fp32 sq':>9}{'%bf16 sq':>9}{'%fp32 sh':>9}{'%bf16 sh':>9}" if gemm else ""
    print(head + "  all runs")
    for c in contenders:
        line = f"{c:<19}{best[c]:>8.2f}{n / best[c]:>8.1f}"
        if ref:
            line += f"{best[ref] / best[c]:>11.2f}"
            line += f"{best['official-bf16'] / best[c]:>11.2f}" if "official-bf16" in best else f"{'':>11}"
            d = one_minus_cos(emb[c], emb[ref])
            line += f"{d.max():>10.1e}{np.median(d):>9.1e}"
        if gemm and flops:
            rate = flops / best[c]
            rates = ("square_fp32", "square_bf16", "shapes_fp32", "shapes_bf16")
            line += f"{rate / 1e9:>9.1f}" + "".join(f"{rate / gemm[k]:>9.1%}" for k in rates)
        print(line + "  " + " ".join(f"{r['seconds']:.2f}" for r in runs[c]))
    if "ours-auto" in runs:
        r = runs["ours-auto"][0]
        print(f"ours auto chose {r['dtype']}: {r['bf16_blocks']} of {r['blocks']} blocks in bf16 "
              f"(the rest fp32: precision.fp32_blocks)")
    if "official-fp32" in runs:
        print(f"official: transformers {runs['official-fp32'][0]['transformers']}, attention "
              f"{runs['official-fp32'][0]['attn_implementation']}")
    checks = []
    if ref and "ours-auto" in best and row.endswith("dev"):
        checks.append(("ours auto >= 3x official fp32", best[ref] / best["ours-auto"], 3.0))
    if ref and "ours-fp32" in best:
        speedup = best[ref] / best["ours-fp32"]
        if row.endswith("short"):
            checks.append(("ours fp32 >= 1.4x official fp32 on short texts", speedup, 1.4))
        if row == "sheared-dev":
            checks.append(("ours fp32 >= 1.0x official fp32 at 1.3B", speedup, 1.0))
        if row == "smollm2-dev":
            checks.append(("ours fp32 >= 1.25x official fp32 (issue 10)", speedup, 1.25))
    if gemm and flops and "ours-fp32" in best and row == "sheared-dev":
        checks.append(("ours fp32 >= 90 % of the fp32 square GEMM rate",
                       flops / best["ours-fp32"] / gemm["square_fp32"], 0.9))
    for text, value, target in checks:
        print(f"target: {text}: {value:.2f}  {'OK' if value >= target else 'MISSED'}")
    if ref:
        for c in ("ours-fp32", "ours-auto", "official-bf16", "transformers-bf16"):
            if c in emb:
                bar = 1e-5 if c == "ours-fp32" else 1e-3
                worst = one_minus_cos(emb[c], emb[ref]).max()
                print(f"embeddings {c} vs official fp32: max 1-cos {worst:.2e} (bar {bar:g})  "
                      f"{'OK' if worst <= bar else 'OVER'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--n-dev", type=int, default=3000, help="SmolLM2: STS-B dev sentences")
    parser.add_argument("--n-dev-large", type=int, default=500, help="1.3B shape: STS-B dev sentences")
    parser.add_argument("--n-short", type=int, default=0, help="SmolLM2: short sentences (0: all of them)")
    parser.add_argument("--n-short-large", type=int, default=1000, help="1.3B shape: short sentences")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="rounds of all contenders; best counts")
    parser.add_argument("--roofline-stride", type=int, default=4, help="time every k-th batch shape")
    parser.add_argument("--only", default=",".join(CONTENDERS), help="comma-separated contenders")
    parser.add_argument("--sheared-dir", type=Path, default=None,
                        help="reuse (or keep) the 1.3B-shaped checkpoint in this folder")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        work, model_dir = Path(args.work), Path(args.model_dir)
        side, dtype = args.child.split("-")
        if side == "gemm":
            result = child_gemm(work, model_dir, args.batch_size, args.threads, args.roofline_stride)
        else:
            fn = {"ours": child_ours, "official": child_official, "transformers": child_transformers}[side]
            result = fn(work, model_dir, dtype, args.batch_size, args.threads)
        print(json.dumps(result))
        return

    sys.path.insert(0, str(REPO))
    import torch

    from benchmarks.machine import cpu_line
    from llm2vec_mini.precision import bf16_speedup

    contenders = [c for c in args.only.split(",") if c]
    rows = [r for r in args.rows.split(",") if r]
    torch.set_num_threads(args.threads)
    print(cpu_line())
    print(f"torch {torch.__version__}; the probe of dtype='auto' here: bf16 F.linear {bf16_speedup():.2f}x "
          f"fp32's speed ({time.strftime('%Y-%m-%d')})")
    with tempfile.TemporaryDirectory(prefix="bench_encode_models_") as tmp:
        models = {}
        for row in rows:
            key = row.split("-")[0]
            if key in models:
                continue
            if key == "smollm2":
                models[key] = write_smollm2(Path(tmp) / "smollm2")
            else:
                folder = args.sheared_dir or Path(tmp) / "sheared"
                ready = (folder / "pytorch_model.bin").is_file() and (folder / "tokenizer.json").is_file()
                models[key] = folder if ready else write_sheared(folder)
        for row in rows:
            model_dir = models[row.split("-")[0]]
            cfg = json.loads((model_dir / "config.json").read_text())
            report(row, run_row(row, model_dir, args, contenders), cfg, args, contenders)


if __name__ == "__main__":
    main()
