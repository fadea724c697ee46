"""The main job behind `make demo`: LLM2Vec's three steps on a real model, measured, in minutes.

    1. Uni + mean        the decoder as it is (causal attention), mean pooling
    2. Bi + mean         the same weights with bidirectional attention (step 1, no training)
    3. Bi + MNTP         after masked next-token prediction (step 2, a LoRA adapter)
    4. Bi + MNTP + SimCSE  after unsupervised contrastive learning (step 3, a second adapter)

Each stage is scored on STS-B dev (Spearman x 100 of cosine similarity). The recipe is the paper's,
scaled down to a 2-core CPU (few steps, short sequences, a higher learning rate); the paper's
Sheared-LLaMA-1.3B figures are printed beside ours, labelled as such. Ctrl-C stops cleanly and keeps
what finished. The data comes from the folder `hub.find_data_dir` finds; when there is none, the
demo downloads its three files into the cache. Offline and without data it says in one line how to
get data and runs on a small built-in corpus: a smoke demo, not a benchmark, and the output says so.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .config import LlamaConfig
from .convert.hf import load_pretrained
from .data import STSSubset, load_sts, read_lines
from .encoder import LLM2Vec
from .errors import ConfigError, DownloadError
from .evaluate import evaluate_sts
from .hub import DATA_URL_ENV, download_data, download_smollm2, find_data_dir, groups_of
from .model import LlamaForCausalLM
from .precision import compute_dtype
from .recipes import LoRASettings, MNTPSettings, SimCSESettings, mntp_stage, simcse_stage
from .tokenizer import Tokenizer
from .train import TrainConfig

STAGES = ("Uni + mean", "Bi + mean", "Bi + MNTP", "Bi + MNTP + SimCSE")
# LLM2Vec paper, S-LLaMA-1.3B, mean pooling: average over its 15-task MTEB subset (Table 5). The
# paper gives STS-B alone only for the full model: 73.36 (Table 11).
PAPER_MTEB15 = {"Uni + mean": 33.03, "Bi + mean": 30.26, "Bi + MNTP": 42.10, "Bi + MNTP + SimCSE": 52.40}
PAPER_STSB_FULL = 73.36


@dataclass
class Recipe:
    """The scaled-down settings; `scaled(f)` stretches steps and evaluation pairs with the budget."""
    eval_pairs: int = 400  # STS-B dev pairs scored per stage (the first n)
    mntp_steps: int = 30
    mntp_batch: int = 4
    mntp_block: int = 64
    mntp_lr: float = 1e-3
    simcse_steps: int = 40
    simcse_batch: int = 16
    simcse_max_length: int = 32
    simcse_lr: float = 2e-3
    lora_r: int = 16
    lora_alpha: float = 32.0

    def mntp_config(self, seed: int, device: str, dtype: str = "float32") -> TrainConfig:
        """The trainer settings of the MNTP stage (what `train-mntp` takes as options)."""
        return TrainConfig(steps=self.mntp_steps, batch_size=self.mntp_batch, lr=self.mntp_lr,
                           warmup_steps=max(1, self.mntp_steps // 10), seed=seed, device=device,
                           dtype=dtype)

    def simcse_config(self, seed: int, device: str, dtype: str = "float32") -> TrainConfig:
        """The trainer settings of the SimCSE stage (what `train-simcse` takes as options)."""
        return TrainConfig(steps=self.simcse_steps, batch_size=self.simcse_batch, lr=self.simcse_lr,
                           warmup_steps=max(1, self.simcse_steps // 10), seed=seed, device=device,
                           dtype=dtype)

    def scaled(self, factor: float) -> "Recipe":
        return replace(self, eval_pairs=max(50, min(1500, int(self.eval_pairs * factor))),
                       mntp_steps=max(2, int(self.mntp_steps * factor)),
                       simcse_steps=max(2, int(self.simcse_steps * factor)))


# `make reproduce`: the same four stages with more training (each step within about 30 minutes on a
# 2-core CPU) and the whole STS-B dev set.
REPRODUCE = Recipe(eval_pairs=1500, mntp_steps=200, mntp_batch=8, mntp_block=64, mntp_lr=5e-4,
                   simcse_steps=150, simcse_batch=16, simcse_max_length=32, simcse_lr=2e-3)


# -------------------------------------------------------------------------------------------------
# Data: a data folder if there is one, else the download, else a small corpus of our own.

STS_DEV, MNTP_TEXT, SIMCSE_TEXT = DEMO_DATA = (
    "stsbenchmark/sts-dev.csv", "wikitext-2/valid.txt", "wiki1m_slice/wiki1m_for_simcse.first11914.txt")


def demo_data_dir(explicit=None):
    """The data folder (`hub.find_data_dir`'s order: --data-dir, $LLM2VEC_MINI_DATA, the download
    cache, ../shared/data). When none holds the demo's files, they are downloaded into the cache; if
    that fails, one line says how to get data and the result is None (the smoke demo)."""
    found = find_data_dir(explicit, needs=DEMO_DATA)
    if found is not None:
        return found
    try:
        folder = download_data(only=groups_of(DEMO_DATA))
    except DownloadError as e:  # one line: what failed, and how to get data
        print(f"No data found and the download failed ({e}); to get data, run `python -m llm2vec_mini "
              f"download data` with a network, or set $LLM2VEC_MINI_DATA to a data folder or "
              f"${DATA_URL_ENV} to a mirror.")
        return None
    print(f"No data folder found: downloaded the demo's data into {folder}")
    return folder


SMOKE_PAIRS = [  # (sentence 1, sentence 2, similarity 0-5), written for this demo
    ("A man is playing a guitar.", "A man plays the guitar.", 4.8),
    ("A man is playing a guitar.", "A woman is slicing an onion.", 0.2),
    ("A dog runs across the field.", "A dog is running through a meadow.", 4.2),
    ("The stock market fell sharply today.", "Shares dropped steeply on Monday.", 3.8),
    ("A child is reading a book.", "A kid reads a story book.", 4.4),
    ("A cat sleeps on the sofa.", "The economy grew last quarter.", 0.0),
    ("Two people are cooking dinner.", "Two people prepare a meal.", 4.5),
    ("The train arrived late.", "The train was delayed.", 4.0),
    ("A woman is swimming in a pool.", "A woman is riding a horse.", 1.0),
    ("The sun sets over the sea.", "The sunset over the ocean is bright.", 3.6),
    ("He bought a new car.", "She sold her old bicycle.", 1.2),
    ("It is raining in the city.", "Rain falls on the town.", 4.1),
]


def smoke_corpus() -> list[str]:
    return [s for a, b, _ in SMOKE_PAIRS for s in (a, b)] * 8


def load_demo_data(data_dir, recipe: Recipe):
    """-> (STS subset, MNTP paragraphs, SimCSE sentences, is_smoke)."""
    if data_dir is None:
        pairs = STSSubset("smoke", [a for a, _, _ in SMOKE_PAIRS], [b for _, b, _ in SMOKE_PAIRS],
                          [s for _, _, s in SMOKE_PAIRS])
        corpus = smoke_corpus()
        return pairs, corpus, corpus, True
    dev = load_sts(data_dir / STS_DEV)[0]
    n = recipe.eval_pairs
    name = "sts-dev" if n >= len(dev) else f"sts-dev[:{n}]"
    pairs = STSSubset(name, dev.sentences1[:n], dev.sentences2[:n], dev.scores[:n])
    wikitext = read_lines(data_dir / MNTP_TEXT)
    wiki1m = [s for s in read_lines(data_dir / SIMCSE_TEXT) if len(s) >= 15]  # drop titles and fragments
    return pairs, wikitext, wiki1m, False


# -------------------------------------------------------------------------------------------------

def tiny_model():
    """A tiny random Llama with a word-level tokenizer over the smoke corpus (for tests)."""
    import tokenizers
    from tokenizers import models, pre_tokenizers

    words = sorted({w for s in smoke_corpus() for w in s.replace(".", " .").split()})
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "_"] + words)}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig.tiny(vocab_size=len(vocab)))
    return model, Tokenizer(tok, bos_id=1, eos_id=2, add_bos=True)


def tiny_recipe(recipe: Recipe = Recipe()) -> Recipe:
    """The recipe of `demo --tiny`: a few steps on short blocks (a smoke run)."""
    return replace(recipe, mntp_block=16, mntp_steps=3, simcse_steps=3, eval_pairs=12)


def score(model, tokenizer, pairs, causal: bool, dtype: str = "float32") -> float:
    device = next(model.parameters()).device
    encoder = LLM2Vec(model, tokenizer, pooling="mean", bidirectional=not causal, device=device, dtype=dtype)
    result = evaluate_sts(lambda s: encoder.encode(s, batch_size=32, show_progress_bar=True), [pairs])
    model.model.set_causal(False)
    return result[pairs.name]["spearman"]


def write_outputs(out: Path, results: dict, recipe: Recipe, smoke: bool, model_name: str,
                  seed: int = 42, dtype: str = "float32") -> str:
    ours_label = "ours: smoke pairs (not STS-B)" if smoke else "ours: STS-B dev"
    rows = [("stage", ours_label, "paper: S-LLaMA-1.3B, MTEB-15 avg")]
    for stage in STAGES:
        ours = f"{results[stage]:.2f}" if stage in results else "(not run)"
        rows.append((stage, ours, f"{PAPER_MTEB15[stage]:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    note = [f"model: {model_name}; Spearman x 100 of cosine, mean pooling; seed {seed}; dtype {dtype}.",
            f"paper column: LLM2Vec (arXiv 2404.05961) Table 5, Sheared-LLaMA-1.3B, 15-task MTEB average"
            f" (its STS-B for the full model: {PAPER_STSB_FULL}, Table 11); a different model and data."]
    if smoke:
        note.insert(0, "SMOKE DEMO on a built-in corpus of 12 pairs: not a benchmark.")
    table = "\n".join(lines + [""] + note)
    (out / "table.txt").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"results": results, "recipe": recipe.__dict__,
                                                  "seed": seed, "dtype": dtype,
                                                  "smoke": smoke, "model": model_name,
                                                  "paper_mteb15": PAPER_MTEB15}, indent=2))
    if not _chart(out, results, smoke):
        table += "\n(no chart.png: matplotlib is not installed)"
    return table


def _chart(out: Path, results: dict, smoke: bool = False) -> bool:
    """Draw chart.png; False (and no file) without matplotlib, which only the dev set installs."""
    try:  # a Figure without pyplot: no backend switch, no effect on a notebook's own plots
        from matplotlib.figure import Figure
    except ImportError:  # the table and JSON say it all anyway
        return False
    fig = Figure(figsize=(7, 3.6))
    ax = fig.subplots()
    xs = range(len(STAGES))
    ran = [s for s in STAGES if s in results]  # an interrupted run draws only the stages it finished
    ax.bar([STAGES.index(s) - 0.2 for s in ran], [results[s] for s in ran], 0.4,
           label="ours (SMOKE: built-in pairs, not a benchmark)" if smoke else "ours (STS-B dev)")
    ax.bar([x + 0.2 for x in xs], [PAPER_MTEB15[s] for s in STAGES], 0.4, label="paper S-LLaMA (MTEB-15)")
    ax.set_xticks(list(xs), [s.replace(" + ", "\n+ ") for s in STAGES], fontsize=8)
    ax.set_ylabel("Spearman x 100")
    ax.set_title("LLM2Vec step by step")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "chart.png", dpi=120)
    return True


def run_demo(args) -> int:
    t0 = time.time()
    if not 0 < args.budget_minutes < 24 * 60:
        raise ConfigError(f"--budget-minutes must be positive and under a day, got {args.budget_minutes}")
    if getattr(args, "recipe", "demo") == "reproduce":
        recipe = REPRODUCE  # its own, fixed budget (about half an hour); --budget-minutes does not apply
    else:
        recipe = Recipe().scaled(args.budget_minutes / 15.0)
    out = Path(args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        model, tokenizer = tiny_model()
        model_name, data_dir = "tiny random Llama (smoke test)", None
        recipe = tiny_recipe(recipe)
    else:
        path = download_smollm2()
        model, tokenizer = load_pretrained(path)
        model_name, data_dir = "SmolLM2-135M-Instruct (Q4_1 GGUF, fp32)", demo_data_dir(args.data_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    dtype = getattr(args, "dtype", "float32")  # of the matrix products, in training and encoding
    if dtype == "auto":  # decided once, so that the run records what it used
        dtype = str(compute_dtype("auto", device)).removeprefix("torch.")
    pairs, paragraphs, sentences, smoke = load_demo_data(data_dir, recipe)
    print(f"llm2vec-mini demo: {model_name} on {device}, {dtype}; {len(pairs)} STS pairs; output in {out}")
    if smoke:
        print("No data folder found: SMOKE DEMO on a small built-in corpus, not a benchmark.")
    seed = getattr(args, "seed", 42)  # every random draw of the run: adapters, batches, masks, dropout
    results = {}
    try:
        print("\n[1/4] Uni + mean: the decoder as it is")
        results["Uni + mean"] = score(model, tokenizer, pairs, True, dtype)
        print(f"      Spearman {results['Uni + mean']:.2f}")
        print("[2/4] Bi + mean: bidirectional attention, no training")
        results["Bi + mean"] = score(model, tokenizer, pairs, False, dtype)
        print(f"      Spearman {results['Bi + mean']:.2f}")

        print(f"[3/4] MNTP: {recipe.mntp_steps} steps of {recipe.mntp_batch} x {recipe.mntp_block} tokens")
        lora = LoRASettings(r=recipe.lora_r, alpha=recipe.lora_alpha, dropout=0.05)
        mntp_stage(model, tokenizer, paragraphs, recipe.mntp_config(seed, device, dtype), out / "mntp",
                   MNTPSettings(block_size=recipe.mntp_block), lora, overwrite=True)
        results["Bi + MNTP"] = score(model, tokenizer, pairs, False, dtype)
        print(f"      Spearman {results['Bi + MNTP']:.2f}")

        print(f"[4/4] SimCSE: {recipe.simcse_steps} steps of {recipe.simcse_batch} sentences")
        # the MNTP adapter is merged into the weights first, as in LLM2Vec
        simcse_stage(model, tokenizer, sentences, recipe.simcse_config(seed, device, dtype), out / "simcse",
                     SimCSESettings(max_length=recipe.simcse_max_length), lora, overwrite=True)
        results["Bi + MNTP + SimCSE"] = score(model, tokenizer, pairs, False, dtype)
        print(f"      Spearman {results['Bi + MNTP + SimCSE']:.2f}")
    except KeyboardInterrupt:
        print("\nInterrupted: keeping what finished.")
        print(write_outputs(out, results, recipe, smoke, model_name, seed, dtype))
        return 130
    print("\n" + write_outputs(out, results, recipe, smoke, model_name, seed, dtype))
    chart = f"chart: {out / 'chart.png'}; " if (out / "chart.png").exists() else ""
    print(f"\nAdapters: {out / 'mntp'}, {out / 'simcse'}; {chart}{(time.time() - t0) / 60:.1f} minutes.")
    return 0
