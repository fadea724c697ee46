"""Run the tutorials: `make tutorials` executes every notebook and writes its outputs into the .ipynb.

Each tutorial is a jupytext percent-format source, `tutorials/0N_name.py` (real Python, linted with the
package), paired with `tutorials/0N_name.ipynb`, which is committed *executed* so that a reader on the
web sees every figure, table and number. This script rebuilds each notebook from its source, runs it
top to bottom in a fresh kernel of this interpreter, and writes it back with outputs that stay clean
for diffs: no timing metadata, no absolute paths, no memory addresses, no progress-bar debris.

    .venv/bin/python tutorials/execute.py [--real] [NAME ...]     (make tutorials passes --real)

`--real` sets LLM2VEC_MINI_REAL=1, so the cells on SmolLM2-135M run too (the model must be in the
cache: `python -m llm2vec_mini download smollm2`). tests/test_tutorials.py uses `run` from here to
execute every notebook in the suite (without --real), and checks that each committed notebook's code
equals its source and that every code cell was executed, in order.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import jupytext
import nbformat
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from jupyter_core.utils import run_sync
from nbclient import NotebookClient

TUTORIALS = Path(__file__).resolve().parent
REPO = TUTORIALS.parent
CELL_TIMEOUT_S = 3600  # per cell (a busy machine runs the SmolLM2 cells slowly)
KERNEL_START_TIMEOUT_S = 120  # a cold start on a busy 2-core machine can take a while


def sources() -> list[Path]:
    """The tutorials' sources, in order: tutorials/0N_name.py."""
    return sorted(TUTORIALS.glob("[0-9][0-9]_*.py"))


class ThisInterpreter(KernelSpecManager):
    """Every kernel name resolves to ipykernel on `sys.executable`, never to a spec found on disk."""

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        return KernelSpec(
            argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            display_name=f"Python ({sys.executable})", language="python", name=kernel_name,
            resource_dir=str(TUTORIALS))


def kernel_env(real: bool, backend: str) -> dict:
    """The kernel's environment: this checkout first on PYTHONPATH, no progress bars, the plot backend."""
    env = dict(os.environ)
    env["MPLBACKEND"] = backend
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["TQDM_DISABLE"] = "1"  # progress bars write carriage returns into the outputs
    env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # quiets a debugger warning on start
    if real:
        env["LLM2VEC_MINI_REAL"] = "1"
    else:
        env.pop("LLM2VEC_MINI_REAL", None)
    return env


def run(nb: nbformat.NotebookNode, real: bool = False, backend: str = "Agg") -> nbformat.NotebookNode:
    """Execute `nb` in place in a fresh kernel of this interpreter, from tutorials/; returns it.

    Raises nbclient's CellExecutionError (with the cell's source) on a failing cell.
    backend "Agg" draws figures without showing them (the test suite); the inline backend puts each
    figure into the outputs as a PNG (`make tutorials`).
    """
    km = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=ThisInterpreter())
    client = NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S, startup_timeout=KERNEL_START_TIMEOUT_S,
                            record_timing=False, resources={"metadata": {"path": str(TUTORIALS)}})
    try:
        client.execute(env=kernel_env(real, backend))
    finally:  # nbclient shuts down only the kernels it made itself: this one is ours to stop
        if km.has_kernel:
            run_sync(km.shutdown_kernel)(now=True)
    return nb


# What must never reach a committed output: paths of this machine, memory addresses, carriage returns.
_PATHS = [(re.escape(str(REPO)), "<repo>"), (re.escape(str(Path.home())), "~"),
          (r"/tmp/[\w./-]+", "<tmp>")]
_ADDRESS = re.compile(r"\bat 0x[0-9a-fA-F]{6,}")


def clean_text(text: str) -> str:
    for pattern, replacement in _PATHS:
        text = re.sub(pattern, replacement, text)
    text = _ADDRESS.sub("at 0x…", text)
    return text.split("\r")[-1] if "\r" in text and "\n" not in text else text.replace("\r\n", "\n")


# tqdm.auto's warning in a kernel without ipywidgets (the bars themselves are off: TQDM_DISABLE)
_TQDM_WARNING = re.compile(r"^.*TqdmWarning: IProgress not found.*\n(  from \.autonotebook import.*\n)?", re.M)


def clean(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Outputs fit for a diff: no execution metadata, no machine paths or addresses in any text, no
    warnings about the notebook machinery itself."""
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if "outputs" in cell:
            for output in cell.outputs:
                if output.output_type == "stream" and output.name == "stderr":
                    output["text"] = _TQDM_WARNING.sub("", output["text"])
            cell.outputs = [o for o in cell.outputs if o.output_type != "stream" or o["text"]]
        for output in cell.get("outputs", []):
            if "text" in output:
                output["text"] = clean_text(output["text"])
            for mime, value in output.get("data", {}).items():
                if mime.startswith("text/") and isinstance(value, str):
                    output["data"][mime] = clean_text(value)
            output.get("metadata", {}).pop("execution", None)
    return nb


def build(source: Path, real: bool) -> float:
    """Source -> executed, cleaned notebook beside it; returns the seconds it took to run."""
    nb = jupytext.read(source)
    start = time.perf_counter()
    run(nb, real=real, backend="module://matplotlib_inline.backend_inline")
    seconds = time.perf_counter() - start
    for i, cell in enumerate(nb.cells):  # fixed ids: rebuilding an unchanged tutorial changes no byte
        cell.id = f"{source.stem[:2]}-{i:02d}"
    jupytext.write(clean(nb), source.with_suffix(".ipynb"))
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="tutorial names or numbers (default: all)")
    parser.add_argument("--real", action="store_true", help="run the SmolLM2 cells too (LLM2VEC_MINI_REAL=1)")
    args = parser.parse_args(argv)
    chosen = [s for s in sources() if not args.names or any(s.stem.startswith(n) for n in args.names)]
    for source in chosen:
        seconds = build(source, args.real)
        print(f"{source.with_suffix('.ipynb').relative_to(REPO)}: executed in {seconds:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
