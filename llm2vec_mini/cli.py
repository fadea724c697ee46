"""The command line: `python -m llm2vec_mini COMMAND ...`.

Each subcommand is a thin layer over the package's Python API; `--help` on any of them lists its options.
"""

from __future__ import annotations

import argparse
import sys


def _cmd_download(args) -> int:
    from . import hub
    if args.name != "smollm2":
        raise SystemExit(f"unknown model {args.name!r}; available: smollm2")
    print(hub.download_smollm2(cache_dir=args.cache_dir))
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo
    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llm2vec_mini",
                                     description="LLM2Vec from scratch: a decoder turned text encoder.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("download", help="fetch a model into the local cache and print its path")
    p.add_argument("name", choices=["smollm2"])
    p.add_argument("--cache-dir", default=None, help="default: $LLM2VEC_MINI_CACHE or ~/.cache/llm2vec_mini")
    p.set_defaults(func=_cmd_download)

    p = sub.add_parser("demo", help="the main job: causal vs bidirectional on a model, step by step")
    p.add_argument("--budget-minutes", type=float, default=15.0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--tiny", action="store_true", help="use a tiny random model (a smoke run)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
