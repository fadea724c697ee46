"""Encode speed on SmolLM2-135M: our `LLM2Vec.encode` vs the official llm2vec 0.2.3 vs transformers 5.

All in one run, with the same weights (SmolLM2-135M-Instruct, dequantised once to an fp32 HF
directory that every contender loads), the same STS-B dev sentences, batch 32, fp32, mean pooling,
and the same number of threads:

    ours          llm2vec_mini.LLM2Vec.encode                               (.venv)
    official      llm2vec.LLM2Vec.encode, transformers 4.44.2, sdpa         (.venv-ref, subprocess)
    transformers  transformers 5 LlamaModel with a hand-written bidirectional 4D mask, fed our
                  tokenisation and batches (sorted by token count), pooled by hand   (.venv)
    gemm          the matmul roofline of this machine (below)

Each runs in its own child process (fresh heap, its own thread setting); it warms up on one batch,
then the whole `encode` call is timed (tokenisation included, model loading excluded). Contenders
take turns, `--repeats` rounds of them; the best time of each counts.

FLOPs of the real tokens (padding does not count), for a sentence of L model-input tokens:
    2 * P * L  +  n_layers * 4 * n_heads * head_dim * L^2
P = the non-embedding parameters of the decoder (every projection and norm; no lm_head), the
second term the attention scores q k^T and their use on v, over the real tokens only.

GEMM roofline, measured in the same run with the same thread count, reported two ways:
  * square: torch.mm of two 2048 x 2048 fp32 matrices (the machine's best case);
  * model shapes: the decoder's seven projections (x @ W^T, W of shape (out, in)) at the token
    counts M = B x T of our own batches, looping over all layers' weights so they stream from
    memory as in the model; one batch in `--roofline-stride` is timed.
Our fraction of the roofline = (real-token FLOPs / our seconds) / roofline FLOP/s.

Parity, checked on the embeddings computed here: per sentence 1 - cos(ours, official) <= 1e-5 and
max |ours - official| <= 2e-4 max |official|.

    .venv/bin/python benchmarks/bench_encode.py [--n 3000] [--batch-size 32] [--threads 2] [--repeats 1]

Targets: ours >= 1.25x the official sentences/s; ours >= 85 % of the matmul roofline.
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
STS_DEV = DATA / "stsbenchmark" / "sts-dev.csv"
CONTENDERS = ("ours", "official", "transformers")


def _setup_threads(threads: int):
    import torch
    torch.set_num_threads(threads)
    return torch


def _warm_then_time(encode, sentences, batch_size):
    """Encode one batch (warm-up: allocator, MKL's buffers), then time the whole list."""
    encode(sentences[:batch_size])
    start = time.perf_counter()
    emb = encode(sentences)
    return emb, time.perf_counter() - start


# ------------------------------------------------------------------------------------------------
# Children: each loads its stack, encodes, saves the embeddings and prints one JSON line.

def child_ours(work: Path, batch_size: int, threads: int) -> dict:
    torch = _setup_threads(threads)
    import numpy as np
    sys.path.insert(0, str(REPO))
    from llm2vec_mini.encoder import LLM2Vec

    sentences = json.loads((work / "sentences.json").read_text())
    l2v = LLM2Vec.from_pretrained(work / "hf", pooling="mean", device="cpu")
    emb, seconds = _warm_then_time(lambda s: l2v.encode(s, batch_size=batch_size), sentences, batch_size)
    np.save(work / "ours.npy", emb)
    # what the FLOP count and the roofline need: real tokens per sentence, our batches' shapes
    items = l2v.prepare(sentences)
    lengths = [len(ids) for ids, _ in items]
    order = sorted(lengths, reverse=True)
    shapes = [(len(order[s:s + batch_size]), order[s]) for s in range(0, len(order), batch_size)]
    return {"seconds": seconds, "lengths": lengths, "batch_shapes": shapes, "torch": torch.__version__}


def child_official(work: Path, batch_size: int, threads: int) -> dict:
    """Runs under .venv-ref (transformers 4.44.2, peft 0.13.2, llm2vec 0.2.3)."""
    torch = _setup_threads(threads)
    import numpy as np
    import transformers
    from llm2vec import LLM2Vec

    sentences = json.loads((work / "sentences.json").read_text())
    l2v = LLM2Vec.from_pretrained(str(work / "hf"), enable_bidirectional=True, pooling_mode="mean",
                                  torch_dtype=torch.float32)
    # Our HF export names a generic PreTrainedTokenizerFast, whose default inputs include
    # token_type_ids, which LlamaModel.forward rejects; the Hub's SmolLM2 (GPT2Tokenizer) has none.
    l2v.tokenizer.model_input_names = ["input_ids", "attention_mask"]
    attn = l2v.model.config._attn_implementation
    emb, seconds = _warm_then_time(
        lambda s: l2v.encode(s, batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True,
                             device="cpu"), sentences, batch_size)
    np.save(work / "official.npy", np.asarray(emb, dtype=np.float32))
    return {"seconds": seconds, "attn_implementation": attn, "transformers": transformers.__version__}


def child_transformers(work: Path, batch_size: int, threads: int) -> dict:
    """transformers 5's LlamaModel made bidirectional by the mask alone, on our tokenisation."""
    torch = _setup_threads(threads)
    import numpy as np
    import transformers

    sentences = json.loads((work / "sentences.json").read_text())
    model = transformers.LlamaModel.from_pretrained(str(work / "hf"), dtype=torch.float32,
                                                    attn_implementation="sdpa").eval()
    prep = _Preparer(work / "hf")  # our tokenisation and batching rules, not our model

    @torch.inference_mode()
    def encode(texts):
        items = prep.prepare(texts)
        out = torch.zeros(len(items), model.config.hidden_size)
        order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            ids, am, em = prep.collate([items[i] for i in idx])  # each (B, T), left padded
            B, T = ids.shape
            mask = torch.zeros(B, 1, T, T)  # every query sees every real key: bidirectional
            mask.masked_fill_(am[:, None, None, :] == 0, torch.finfo(torch.float32).min)
            pos = (am.cumsum(-1) - 1).clamp(min=0)
            h = model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
            m = em.float()  # (B, T) mean over the text tokens
            out[idx] = torch.einsum("bth,bt->bh", h, m) / m.sum(-1, keepdim=True)
        return out.numpy()

    emb, seconds = _warm_then_time(encode, sentences, batch_size)
    np.save(work / "transformers.npy", emb)
    return {"seconds": seconds, "transformers": transformers.__version__}


class _Preparer:
    """Our encoder's text -> (ids, pooled count) and collate rules, without loading our model."""

    def __init__(self, hf_dir: Path):
        sys.path.insert(0, str(REPO))
        from llm2vec_mini.convert.hf_tokenizer import load_hf_tokenizer
        from llm2vec_mini.encoder import LLM2Vec

        enc = LLM2Vec.__new__(LLM2Vec)  # only the text-side settings are needed
        enc.tokenizer = load_hf_tokenizer(hf_dir)
        enc.pooling, enc.max_length, enc.doc_max_length, enc.skip_instruction = "mean", 512, 400, True
        enc.pad_id = enc.tokenizer.eos_id
        self.prepare, self.collate = enc.prepare, enc.collate


def child_gemm(work: Path, batch_size: int, threads: int, stride: int) -> dict:
    """fp32 matmul throughput: a square GEMM, and the model's projections at our batch shapes."""
    torch = _setup_threads(threads)
    import torch.nn.functional as F

    def rate(fn, flops, min_seconds=1.0):
        fn()  # warm-up
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < min_seconds:
            fn()
            reps += 1
        return flops * reps / (time.perf_counter() - start)

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    square = rate(lambda: torch.mm(a, b), 2 * 2048 ** 3, 3.0)

    cfg = json.loads((work / "hf" / "config.json").read_text())
    h, m, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    d = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    nq, nkv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    shapes = [(nq, h), (nkv, h), (nkv, h), (h, nq), (m, h), (m, h), (h, m)]  # q k v o gate up down
    weights = [[torch.randn(o, i) * 0.02 for o, i in shapes] for _ in range(L)]
    batches = json.loads((work / "ours.json").read_text())["batch_shapes"][::stride]
    flops = seconds = 0.0
    for B, T in batches:
        xs = {i: torch.randn(B * T, i) for i in {i for _, i in shapes}}
        for w in weights[0]:
            F.linear(xs[w.shape[1]], w)  # warm-up at this M
        start = time.perf_counter()
        for layer in weights:
            for w in layer:
                F.linear(xs[w.shape[1]], w)  # (M, in) @ (in, out)
        seconds += time.perf_counter() - start
        flops += 2 * B * T * L * sum(o * i for o, i in shapes)
    return {"square_flops": square, "model_shapes_flops": flops / seconds,
            "model_shapes_batches": len(batches)}


# ------------------------------------------------------------------------------------------------
# Parent

def run_child(name: str, work: Path, args) -> dict:
    python = REF_PY if name == "official" else Path(sys.executable)
    if not python.exists():
        raise SystemExit(f"{python} not found: run `make reference-setup`")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1",
               PYTHONWARNINGS="ignore")
    cmd = [str(python), __file__, "--child", name, "--work", str(work), "--batch-size",
           str(args.batch_size), "--threads", str(args.threads), "--roofline-stride",
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


def parity(ours, ref) -> tuple[float, float, bool]:
    import numpy as np
    a, b = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    one_minus_cos = float((1 - cos).max())
    rel = float(np.abs(a - b).max() / np.abs(b).max())
    return one_minus_cos, rel, one_minus_cos <= 1e-5 and rel <= 2e-4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000, help="sentences (STS-B dev: both columns)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="rounds of all contenders; best counts")
    parser.add_argument("--roofline-stride", type=int, default=4, help="time every k-th batch shape")
    parser.add_argument("--only", default=",".join(CONTENDERS), help="comma-separated contenders")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        work = Path(args.work)
        fn = {"ours": child_ours, "official": child_official, "transformers": child_transformers}
        if args.child == "gemm":
            result = child_gemm(work, args.batch_size, args.threads, args.roofline_stride)
        else:
            result = fn[args.child](work, args.batch_size, args.threads)
        print(json.dumps(result))
        return

    sys.path.insert(0, str(REPO))
    import numpy as np
    import torch

    from llm2vec_mini.convert.hf import load_pretrained, save_hf_dir
    from llm2vec_mini.data import load_sts
    from llm2vec_mini.hub import smollm2_path

    dev = load_sts(STS_DEV)[0]
    sentences = (list(dev.sentences1) + list(dev.sentences2))[: args.n]
    contenders = [c for c in args.only.split(",") if c]
    with tempfile.TemporaryDirectory(prefix="bench_encode_") as tmp:
        work = Path(tmp)
        (work / "sentences.json").write_text(json.dumps(sentences))
        model, tokenizer = load_pretrained(smollm2_path(), dtype=torch.float32)
        save_hf_dir(model, tokenizer, work / "hf")
        del model
        cfg = json.loads((work / "hf" / "config.json").read_text())
        load_before = os.getloadavg()
        runs = {c: [] for c in contenders + ["gemm"]}
        for _ in range(args.repeats):
            for name in contenders:
                runs[name].append(run_child(name, work, args))
                print(f"  {name}: {runs[name][-1]['seconds']:.2f} s", file=sys.stderr)
            if "ours" in contenders:
                runs["gemm"].append(run_child("gemm", work, args))
        load_after = os.getloadavg()
        emb = {c: np.load(work / f"{c}.npy") for c in contenders}

    best = {c: min(r["seconds"] for r in runs[c]) for c in contenders}
    n = len(sentences)
    print(f"SmolLM2-135M-Instruct fp32, {n} STS-B dev sentences, batch {args.batch_size}, "
          f"{args.threads} threads, best of {args.repeats}; torch {torch.__version__}")
    print(f"load average before {load_before[0]:.2f} / after {load_after[0]:.2f} "
          f"(1 min; {os.cpu_count()} cores)")
    print(f"{'':<14}{'seconds':>9}{'sent/s':>9}  all runs")
    for c in contenders:
        times = " ".join(f"{r['seconds']:.2f}" for r in runs[c])
        print(f"{c:<14}{best[c]:>9.2f}{n / best[c]:>9.1f}  " + times)
    if "official" in contenders:
        print(f"official: transformers {runs['official'][0]['transformers']}, "
              f"attention {runs['official'][0]['attn_implementation']}")
    if "ours" in contenders and "official" in contenders:
        speedup = best["official"] / best["ours"]
        print(f"ours / official sentences/s: {speedup:.2f}x (target >= 1.25)  "
              f"{'OK' if speedup >= 1.25 else 'MISSED'}")
    if "ours" in contenders and "transformers" in contenders:
        print(f"ours / transformers sentences/s: {best['transformers'] / best['ours']:.2f}x")
    if "official" in contenders:
        for c in contenders:
            if c != "official":
                omc, rel, ok = parity(emb[c], emb["official"])
                print(f"parity {c} vs official: max 1-cos {omc:.2e} (<= 1e-5), max|diff|/max|official| "
                      f"{rel:.2e} (<= 2e-4)  {'OK' if ok else 'FAILED'}")
    if "ours" in contenders:
        lengths = runs["ours"][0]["lengths"]
        shapes = runs["ours"][0]["batch_shapes"]
        flops = real_token_flops(lengths, cfg)
        padded = sum(B * T for B, T in shapes)
        achieved = flops / best["ours"]
        square = max(r["square_flops"] for r in runs["gemm"])
        shaped = max(r["model_shapes_flops"] for r in runs["gemm"])
        print(f"real tokens {sum(lengths)} (padded {padded}, {padded / sum(lengths) - 1:.1%} padding), "
              f"{flops / 1e12:.3f} TFLOP (2*P*L + attention)")
        print(f"ours: {achieved / 1e9:.1f} GFLOP/s on real tokens")
        n_shaped = runs["gemm"][0]["model_shapes_batches"]
        roofs = (("square 2048 GEMM", square), (f"model-shape GEMMs ({n_shaped} batches)", shaped))
        for label, roof in roofs:
            frac = achieved / roof
            print(f"roofline {label}: {roof / 1e9:.1f} GFLOP/s -> ours at {frac:.1%} (target >= 85 %)  "
                  f"{'OK' if frac >= 0.85 else 'MISSED'}")


if __name__ == "__main__":
    main()
