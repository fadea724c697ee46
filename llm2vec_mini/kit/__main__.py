"""`python -m llm2vec_mini.kit new | check | tutorial | grade | notebooks`: the teaching kit's commands.

    new FILE                   write a fresh stub (refuses to overwrite a file unless --force)
    check --impl FILE          run the checks: one row per exercise; exit status 1 if one attempted failed
    tutorial NN --impl FILE    run tutorial NN (from tutorials/) with the implementation swapped in
    grade SUBMISSION ...       grade a class, each submission in its own process (see grade.py)
    notebooks [--check]        write (or compare) the exercise notebooks in tutorials/exercises/
    worker                     (used by grade) run the checks in this process, reporting as JSON lines
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from pathlib import Path

from ..errors import Llm2VecMiniError
from . import grade as grading
from .exercises import select
from .run import FAILED, PASSED, Result, check, load_hidden, load_impl, table
from .stub import write_stub
from .swap import in_model


def _cmd_new(args) -> int:
    path = write_stub(args.file, force=args.force)
    print(f"wrote {path}: {sum(len(e.names) for e in select())} functions and classes to write, each raising "
          f"NotImplementedError for now\nnext: python -m llm2vec_mini.kit check --impl {path}")
    return 0


def _cmd_check(args) -> int:
    exercises = [e.id for e in select(args.exercise)]
    hidden = load_hidden(args.hidden) if args.hidden else None
    try:
        impl = load_impl(args.impl)
    except Llm2VecMiniError:
        raise  # no such file: said as an error
    except (Exception, SystemExit) as e:  # the file does not load: every exercise fails, with the reason
        impl = None
        why = f"could not load {args.impl}: {type(e).__name__}: {e}"
        results = [Result(x, FAILED, why) for x in exercises]
    if impl is not None:
        results = check(impl, exercises, hidden)
    failed = any(r.status == FAILED for r in results)
    if args.json:
        print(json.dumps({r.exercise: r.status for r in results}))
    else:
        print(table(results))
    if args.in_model:
        passed = [r.exercise for r in results if r.status == PASSED]
        report = sys.stderr if args.json else sys.stdout
        lines = in_model(impl, passed, real=args.real) if passed else []
        if not lines:
            print("in the model: nothing of yours to swap in (no passed exercise of your own)", file=report)
        for what, ok, detail in lines:
            print(f"in the model: {'ok    ' if ok else 'FAILED'} {what}: {detail}", file=report)
        failed = failed or not all(ok for _, ok, _ in lines)
    return 1 if failed else 0


def _cmd_tutorial(args) -> int:
    import jupytext  # the tutorials' own tools (requirements-dev.txt)
    import nbformat

    from .notebooks import TUTORIALS

    chosen = [p for p in sorted(TUTORIALS.glob("[0-9][0-9]_*.py")) if p.stem.startswith(args.name)]
    if len(chosen) != 1:
        print(f"no single tutorial starts with {args.name!r} in {TUTORIALS}", file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location("_kit_tutorial_runner", TUTORIALS / "execute.py")
    execute = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(execute)
    impl = args.impl if args.impl == "reference" else str(Path(args.impl).resolve())
    nb = jupytext.read(chosen[0])
    first_code = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
    nb.cells.insert(first_code, nbformat.v4.new_code_cell(
        "from llm2vec_mini import kit  # the teaching kit: this tutorial runs on your code\n"
        f"_swap = kit.use({impl!r}, {args.exercise!r})\n"
        "print('swapped in:', ', '.join(_swap.exercises) or 'nothing (none of your own passes its checks)')"))
    try:
        execute.run(nb, real=args.real)
    except Exception as e:  # nbclient's CellExecutionError holds the cell and its traceback
        print(re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(e)), file=sys.stderr)
        print(f"{chosen[0].name}: a cell failed on your code (above)", file=sys.stderr)
        return 1
    swapped = nb.cells[first_code].outputs[0].get("text", "").strip() if nb.cells[first_code].outputs else ""
    print(f"{chosen[0].name} ran to the end on your code ({swapped}): every assert held")
    return 0


def _cmd_grade(args) -> int:
    rows = grading.grade(args.submissions, args.exercise, args.hidden, args.timeout, args.memory, args.jobs,
                         progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(grading.table(rows, args.exercise))
    if args.csv:
        grading.write_csv(rows, args.csv, args.exercise)
        print(f"wrote {args.csv}")
    return 0


def _cmd_notebooks(args) -> int:
    from . import notebooks  # needs jupytext and nbformat, as the tutorials do

    if args.check:
        stale = notebooks.stale()
        for name in stale:
            print(f"tutorials/exercises/{name} is stale: run python -m llm2vec_mini.kit notebooks",
                  file=sys.stderr)
        return 1 if stale else 0
    for path in notebooks.write_all():
        print(f"wrote {path.relative_to(notebooks.TUTORIALS.parent)}")
    return 0


def _cmd_worker(args) -> int:
    return grading.worker(args.impl, args.exercise, args.hidden)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llm2vec_mini.kit", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("new", help="write a fresh stub file to start from")
    p.add_argument("file", help="the file to write, e.g. my_llm2vec.py")
    p.add_argument("--force", action="store_true", help="overwrite the file if it exists")
    p.set_defaults(run=_cmd_new)

    p = commands.add_parser("check", help="run the checks on an implementation")
    p.add_argument("--impl", required=True, help="a .py file, an importable module, or 'reference'")
    p.add_argument("--exercise", nargs="+", help="only these exercises (e03 or 3)")
    p.add_argument("--json", action="store_true",
                   help='print only {"e01": "passed" | "failed" | "not attempted", ...}')
    p.add_argument("--hidden", help="a folder of extra checks (check_e03(impl) functions)")
    p.add_argument("--in-model", action="store_true", help="also run the passed exercises inside the model")
    p.add_argument("--real", action="store_true", help="with --in-model: SmolLM2-135M from the cache too")
    p.set_defaults(run=_cmd_check)

    p = commands.add_parser("tutorial", help="run a tutorial notebook with your code swapped in")
    p.add_argument("name", help="the tutorial's number or name, e.g. 02")
    p.add_argument("--impl", required=True, help="a .py file, an importable module, or 'reference'")
    p.add_argument("--exercise", nargs="+", help="swap in these exercises even if they fail their checks "
                                                 "(default: those of yours that pass)")
    p.add_argument("--real", action="store_true", help="run its SmolLM2 cells too (LLM2VEC_MINI_REAL=1)")
    p.set_defaults(run=_cmd_tutorial)

    p = commands.add_parser("grade", help="grade submissions, each in its own process")
    p.add_argument("submissions", nargs="+", help=".py files (or 'reference')")
    p.add_argument("--exercise", nargs="+", help="only these exercises")
    p.add_argument("--hidden", help="a folder of the instructor's own checks (check_e03(impl) functions)")
    p.add_argument("--csv", help="also write the table to this CSV file")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per exercise (default 60)")
    p.add_argument("--memory", type=int, default=4096,
                   help="address-space limit per submission, MB (default 4096)")
    p.add_argument("--jobs", type=int, default=1, help="submissions graded at a time (default 1)")
    p.set_defaults(run=_cmd_grade)

    p = commands.add_parser("notebooks", help="write the exercise notebooks (tutorials/exercises/)")
    p.add_argument("--check", action="store_true", help="only compare: exit status 1 if one is stale")
    p.set_defaults(run=_cmd_notebooks)

    p = commands.add_parser("worker", help="(used by grade) check one submission, report JSON lines")
    p.add_argument("--impl", required=True)
    p.add_argument("--exercise", nargs="+")
    p.add_argument("--hidden")
    p.set_defaults(run=_cmd_worker)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except Llm2VecMiniError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

