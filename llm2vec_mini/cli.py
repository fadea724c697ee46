"""The command line: `python -m llm2vec_mini COMMAND ...`; `--help` on any command lists its options.

    download smollm2      fetch the real model into the local cache, print its path
    download data         fetch the data (STS-B, WikiText-2, wiki1m, UD, vocabularies) into the cache
    encode                a corpus (text or JSON lines) -> embeddings (.npy); resumes, runs under torchrun
    eval-sts              STS-B / SemEval / SICK: Spearman and Pearson x 100 on cosine similarity
    eval-probe            a linear UPOS probe on frozen token states (word-level quality)
    eval-mteb             MTEB tasks by name, with the official instructions (needs mteb and a network)
    train-mntp            LLM2Vec step 2: a LoRA adapter trained with masked next-token prediction
    train-simcse          LLM2Vec step 3: a LoRA adapter trained with unsupervised SimCSE
    demo                  the main job (`make demo`)

Each command is a thin layer over the Python API of the module that does the work.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import ConfigError, Llm2VecMiniError
from .hub import DATA_GROUPS
from .pooling import POOLING_MODES


def _encoder(args):
    from .encoder import LLM2Vec
    # options left out (None) fall back to the settings saved with the model or adapter, then defaults
    return LLM2Vec.from_pretrained(args.model, adapters=args.adapter, pooling=args.pooling,
                                   bidirectional=False if args.causal else None, device=_device(args),
                                   dtype=args.dtype)


def _device(args) -> str:
    """--device, checked: a name torch knows, and CUDA only where there is a GPU; default CUDA if any."""
    import torch

    from .util import torch_device
    if args.device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    torch_device(args.device, "--device")
    return args.device


def _check_output(path, flag: str, folder: bool) -> None:
    """Before any work: `path` can be written as a file (folder=False) or a folder (folder=True).

    A directory where a file is expected, a file where a folder is expected, or a file on the way
    to either, is a ConfigError naming the option, not a traceback after minutes of work.
    """
    from .util import is_dir, is_file
    path = Path(path)
    if folder and is_file(path):
        raise ConfigError(f"{flag} {path}: an existing file, where a folder is expected")
    if not folder and is_dir(path):
        raise ConfigError(f"{flag} {path}: a folder, where a file is expected")
    parent = next((p for p in path.parents if is_dir(p) or is_file(p)), None)  # the nearest that exists
    if parent is not None and is_file(parent):
        raise ConfigError(f"{flag} {path}: {parent} is a file, not a folder")
    if not folder and not is_dir(path.parent):
        raise ConfigError(f"{flag} {path}: its folder {path.parent} does not exist")


def _with_instruction(texts, instruction):
    return [[instruction, t] for t in texts] if instruction else texts


def _cmd_download(args) -> int:
    from . import hub
    if args.name == "data":
        print(hub.download_data(only=args.only, base_url=args.base_url, cache_dir=args.cache_dir))
    else:
        print(hub.download_smollm2(cache_dir=args.cache_dir))
    return 0


def _cmd_encode(args) -> int:
    from .corpus import encode_corpus
    from .distributed import init_distributed, world
    _check_output(args.output, "--output", folder=False)
    init_distributed(_device(args))  # under torchrun: join the group before the model picks its GPU
    run = encode_corpus(_encoder(args), args.input, args.output, instruction=args.instruction,
                        format=args.format, batch_size=args.batch_size, chunk_size=args.chunk_size,
                        normalize=args.normalize, overwrite=args.overwrite)
    rank, size = world()
    print(f"{f'rank {rank} of {size}: ' if size > 1 else ''}{run.shape[0]} texts -> {run.output} "
          f"{run.shape}; chunks: {run.n_chunks}, encoded here {run.encoded}, by an earlier run {run.earlier}")
    return 0


def _cmd_eval_sts(args) -> int:
    from .data import load_sts
    from .evaluate import evaluate_sts, format_table
    if args.output:
        _check_output(args.output, "--output", folder=False)
    subsets = load_sts(args.data, format=args.format)
    enc = _encoder(args)
    results = evaluate_sts(lambda s: enc.encode(_with_instruction(s, args.instruction),
                                                batch_size=args.batch_size), subsets)
    print(format_table(results))
    if args.output:
        settings = {"model": str(args.model), "adapters": [str(a) for a in args.adapter],
                    "data": str(args.data), **enc.settings(), "instruction": args.instruction}
        report = {"settings": settings, "results": _nan_as_null(results)}
        Path(args.output).write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    return 0


def _nan_as_null(value):
    """A score that is not a number (constant similarities or gold scores) as JSON's null, since
    NaN is not JSON and strict readers refuse it."""
    if isinstance(value, dict):
        return {k: _nan_as_null(v) for k, v in value.items()}
    return None if isinstance(value, float) and value != value else value


def _cmd_eval_probe(args) -> int:
    from .convert.hf import load_pretrained
    from .hub import find_data_dir
    from .probe import probe_main
    if args.train is None or args.test is None:  # UD English-EWT dev and test from the data folder
        ud = ("ud_english_ewt/en_ewt-ud-dev.conllu", "ud_english_ewt/en_ewt-ud-test.conllu")
        folder = find_data_dir(needs=ud)
        if folder is None:
            raise FileNotFoundError("no data folder with UD English-EWT: give --train and --test, or run "
                                    "`python -m llm2vec_mini download data --only ud_ewt`")
        args.train, args.test = args.train or folder / ud[0], args.test or folder / ud[1]
    model, tokenizer = load_pretrained(args.model, adapters=args.adapter, device=_device(args))
    model.set_causal(args.causal)
    result = probe_main(model, tokenizer, args.train, args.test, args.mode, args.max_sentences)
    print(json.dumps(result, indent=2))
    return 0


def _cmd_eval_mteb(args) -> int:
    try:
        from .mteb import LLM2VecMTEB, evaluate, result_folder
    except ImportError as e:
        raise ConfigError(f"eval-mteb: {e}") from None
    model = LLM2VecMTEB.from_pretrained(args.model, adapters=args.adapter, pooling=args.pooling,
                                        bidirectional=False if args.causal else None, device=_device(args))
    scores = evaluate(model, args.tasks, args.output, batch_size=args.batch_size)
    for task, score in scores.items():
        print(f"{task}: {100 * score:.2f}")  # mteb's main score, x 100 as in the paper's tables
    print(f"results: {result_folder(model, args.output)}")
    return 0


def _train_config(args):
    from .train import TrainConfig
    return TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                       lr=args.lr, warmup_steps=args.warmup_steps, decay_steps=args.decay_steps,
                       seed=args.seed,
                       checkpoint_every=args.checkpoint_every,
                       gradient_checkpointing=args.gradient_checkpointing, device=_device(args),
                       dtype="bfloat16" if args.bf16 else args.dtype)


def _lora_settings(args):
    from .recipes import LoRASettings
    return LoRASettings(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout)


def _cmd_train_mntp(args) -> int:
    from .recipes import MNTPSettings, train_mntp
    _check_output(args.output, "--output", folder=True)
    mntp = MNTPSettings(block_size=args.block_size, mask_ratio=args.mask_ratio, all_mask=args.all_mask,
                        max_blocks=args.max_blocks, train_lm_head=args.train_lm_head)
    out = train_mntp(args.model, args.data, args.output, _train_config(args), mntp, _lora_settings(args),
                     resume=args.resume, overwrite=args.overwrite)
    print(out)
    return 0


def _cmd_train_simcse(args) -> int:
    from .recipes import SimCSESettings, train_simcse
    _check_output(args.output, "--output", folder=True)
    simcse = SimCSESettings(max_length=args.max_length, pooling=args.pooling, scale=args.scale,
                            attention_dropout=args.attention_dropout,
                            pool_all_positions=args.pool_all_positions)
    out = train_simcse(args.model, args.adapter, args.data, args.output, _train_config(args), simcse,
                       _lora_settings(args), resume=args.resume, overwrite=args.overwrite,
                       max_sentences=args.max_sentences)
    print(out)
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo
    if args.out:
        _check_output(args.out, "--out", folder=True)
    return run_demo(args)


def _model_args(p, pooling=True):
    p.add_argument("--model", required=True, help="a Hugging Face directory or a .gguf file")
    p.add_argument("--adapter", action="append", default=[], help="a PEFT adapter dir (repeat; in order)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    if pooling:
        p.add_argument("--pooling", default=None, choices=POOLING_MODES,
                       help="default: the model's or adapter's saved setting, else mean")
        p.add_argument("--causal", action="store_true",
                       help="keep causal attention (the paper's Uni); default: the saved setting, "
                            "else bidirectional")
        p.add_argument("--instruction", default="", help="an instruction put before every text")
        p.add_argument("--batch-size", type=int, default=32)
        p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                       help="the matrix products' dtype; auto: bf16 where a probe finds it faster here "
                            "(the layers after the model's massive activations; the rest stays fp32)")


def _train_args(p, steps, batch, lr):
    p.add_argument("--output", required=True, help="the adapter directory to write")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=batch)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--decay-steps", type=int, default=0,
                   help="the step where the linear decay reaches 0 (default: --steps; the official "
                        "scripts decay over 3 epochs and stop early)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an --output holding an earlier run (deletes its checkpoints, log)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "auto"],
                   help="the matrix products' dtype; auto: bf16 where a probe finds it faster here")
    p.add_argument("--bf16", action="store_true", help="the same as --dtype bfloat16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llm2vec_mini",
                                     description="LLM2Vec from scratch: a decoder turned text encoder.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("download", help="fetch the model or the data into the local cache, print its path")
    p.add_argument("name", choices=["smollm2", "data"])
    p.add_argument("--cache-dir", default=None, help="default: $LLM2VEC_MINI_CACHE or ~/.cache/llm2vec_mini")
    p.add_argument("--only", action="append", default=None, choices=DATA_GROUPS,
                   help="data: fetch only this group (repeat for more)")
    p.add_argument("--base-url", default=None,
                   help="data: a mirror holding each file at its relative path "
                        "(http://, https://, file://; default $LLM2VEC_MINI_DATA_URL)")
    p.set_defaults(func=_cmd_download)

    p = sub.add_parser("encode", help="embed the lines of a text file into a .npy array")
    _model_args(p)
    p.add_argument("--input", required=True,
                   help="a UTF-8 file: one text per line, or JSON lines with \"text\" and an optional "
                        "\"instruction\" (which replaces --instruction)")
    p.add_argument("--format", default="auto", choices=["auto", "lines", "jsonl"],
                   help="auto (default): jsonl for a .jsonl file, else lines")
    p.add_argument("--output", required=True,
                   help="the (N, hidden) float32 .npy to write; OUT.partial and OUT.progress.*.json "
                        "beside it until it is done")
    p.add_argument("--chunk-size", type=int, default=1024,
                   help="lines encoded, written and recorded together (sorted by length inside)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over: replace a finished --output or an unfinished run of other input, "
                        "model or settings (the same command otherwise resumes an interrupted run)")
    p.add_argument("--normalize", action="store_true")
    p.set_defaults(func=_cmd_encode)

    p = sub.add_parser("eval-sts", help="score STS data: Spearman/Pearson x 100 on cosine similarity")
    _model_args(p)
    p.add_argument("--data", required=True, help="an STS-B csv, a SemEval STS folder or a SICK file")
    p.add_argument("--format", default="auto", choices=["auto", "stsb", "semeval", "sick"])
    p.add_argument("--output", default=None, help="write the results as JSON here")
    p.set_defaults(func=_cmd_eval_sts)

    p = sub.add_parser("eval-probe", help="a linear UPOS probe on frozen token representations")
    _model_args(p, pooling=False)
    p.add_argument("--causal", action="store_true", help="keep causal attention (the paper's Uni)")
    p.add_argument("--train", default=None, help="CoNLL-U file to train the probe on "
                                                  "(default: UD English-EWT dev from the data folder)")
    p.add_argument("--test", default=None, help="CoNLL-U file to score it on (default: UD English-EWT test)")
    p.add_argument("--mode", default="first", choices=["first", "next_token"],
                   help="a word's first sub-token, or the position before it (official next_token)")
    p.add_argument("--max-sentences", type=int, default=None)
    p.set_defaults(func=_cmd_eval_probe)

    p = sub.add_parser("eval-mteb", help="run MTEB tasks by name (pip install 'llm2vec-mini[mteb]')")
    _model_args(p, pooling=False)
    p.add_argument("--pooling", default=None, choices=POOLING_MODES,
                   help="default: the saved setting, else mean")
    p.add_argument("--causal", action="store_true", help="keep causal attention (default: the saved setting)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--tasks", nargs="+", required=True, help="MTEB task names: STSBenchmark SciFact ...")
    p.add_argument("--output", default="runs/mteb", help="mteb writes its result files under DIR/results/")
    p.set_defaults(func=_cmd_eval_mteb)

    p = sub.add_parser("train-mntp", help="LLM2Vec step 2: masked next-token prediction (LoRA)")
    _model_args(p, pooling=False)
    p.add_argument("--data", required=True, nargs="+", help="text files (one paragraph per line)")
    _train_args(p, steps=1000, batch=32, lr=5e-5)
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--mask-ratio", type=float, default=0.2)
    p.add_argument("--all-mask", action="store_true", help="always the mask token (no 80/10/10)")
    p.add_argument("--max-blocks", type=int, default=None, help="use at most this many blocks")
    p.add_argument("--train-lm-head", action="store_true",
                   help="also train lm_head (not saved), as the official run does for untied heads")
    p.set_defaults(func=_cmd_train_mntp)

    p = sub.add_parser("train-simcse", help="LLM2Vec step 3: unsupervised SimCSE (LoRA)")
    p.add_argument("--model", required=True, help="a Hugging Face directory or a .gguf file")
    p.add_argument("--adapter", action="append", default=[], help="the MNTP adapter (merged first)")
    p.add_argument("--device", default=None)
    p.add_argument("--data", required=True, help="sentences, one per line (e.g. wiki1m)")
    _train_args(p, steps=1000, batch=128, lr=3e-5)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--attention-dropout", type=float, default=0.3)
    p.add_argument("--scale", type=float, default=20.0, help="1 / temperature")
    p.add_argument("--pooling", default="mean", choices=POOLING_MODES)
    p.add_argument("--pool-all-positions", action="store_true",
                   help="mean over the whole padded row, as the official training pools (not encode)")
    p.add_argument("--max-sentences", type=int, default=None)
    p.set_defaults(func=_cmd_train_simcse)

    p = sub.add_parser("demo", help="the main job: LLM2Vec's three steps on SmolLM2, measured")
    p.add_argument("--budget-minutes", type=float, default=15.0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--seed", type=int, default=42, help="one run is one draw: other seeds show the spread")
    p.add_argument("--tiny", action="store_true", help="a tiny random model (a smoke run, for tests)")
    p.add_argument("--recipe", default="demo", choices=["demo", "reproduce"],
                   help="demo: minutes, 400 STS-B dev pairs; reproduce: about half an hour, all 1,500")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "auto"],
                   help="the matrix products' dtype in training and encoding (default float32: the "
                        "same numbers on every machine); auto: bf16 where a probe finds it faster")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (Llm2VecMiniError, FileNotFoundError) as e:  # bad input; anything else is a bug: its traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
