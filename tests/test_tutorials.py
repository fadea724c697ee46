"""Every tutorial notebook runs top to bottom: `tutorials/[0-9][0-9]_*.ipynb`, one test id each.

The notebooks check themselves: each step ends with an `assert` against an independent computation,
so executing them is the test. A failing cell fails the test with its source and traceback.

How a notebook is run:
- the kernel is `sys.executable -m ipykernel_launcher`, i.e. this very interpreter (the project's
  `.venv`), whatever `python3` kernelspec a user may have installed elsewhere;
- the working directory is `tutorials/`, the backend `MPLBACKEND=Agg` (figures are drawn, not shown),
  the repository root is first on PYTHONPATH (so the kernel imports this checkout of `llm2vec_mini`);
- each cell has `CELL_TIMEOUT_S` seconds. Heavy cells are gated inside the notebooks themselves.

Committed notebooks carry no outputs (they are produced here), which `test_committed_without_outputs`
checks, so a diff of a notebook shows only what a person wrote.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager  # noqa: E402  (after the skips)
from jupyter_client.manager import AsyncKernelManager  # noqa: E402
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TUTORIALS = REPO / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("[0-9][0-9]_*.ipynb"))
CELL_TIMEOUT_S = 600  # per cell; the whole-test limit is pytest-timeout's (pyproject.toml)
KERNEL_START_TIMEOUT_S = 120  # a cold start on a busy 2-core machine can take a while

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # colour codes in IPython tracebacks


class _ThisInterpreter(KernelSpecManager):
    """Every kernel name resolves to ipykernel on `sys.executable`, never to a spec found on disk."""

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        return KernelSpec(
            argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            display_name=f"Python ({sys.executable})", language="python", name=kernel_name,
            resource_dir=str(TUTORIALS))


def _kernel_env() -> dict:
    env = dict(os.environ)
    env["MPLBACKEND"] = "Agg"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # quiets a debugger warning on start
    return env


def _run(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    km = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=_ThisInterpreter())
    client = nbclient.NotebookClient(
        nb, km=km, timeout=CELL_TIMEOUT_S, startup_timeout=KERNEL_START_TIMEOUT_S,
        resources={"metadata": {"path": str(TUTORIALS)}})  # the kernel's working directory
    try:
        client.execute(env=_kernel_env())
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as err:
        pytest.fail(f"{path.name}: {_ANSI.sub('', str(err))}", pytrace=False)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path):
    _run(path)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_without_outputs(path: Path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
             and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not dirty, (f"{path.name}: cells {dirty} carry outputs or execution counts; "
                       f"clear them before committing (the test suite executes the notebook)")


def test_a_failing_cell_fails_with_its_source(tmp_path, monkeypatch):
    # The harness itself must be able to fail, and say where: run a two-cell notebook whose
    # second cell asserts something false, and check the failure names that cell's source.
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import os, sys\nx = 1"),
                nbformat.v4.new_code_cell(
                    "assert os.environ['MPLBACKEND'] == 'Agg'\n"
                    f"assert sys.executable == {sys.executable!r}\n"
                    f"assert os.getcwd() == {str(TUTORIALS)!r}\n"
                    "assert x == 2, 'x is not two'")]
    path = tmp_path / "99_broken.ipynb"
    nbformat.write(nb, path)
    with pytest.raises(pytest.fail.Exception) as info:
        _run(path)
    message = str(info.value)
    assert "assert x == 2, 'x is not two'" in message  # the cell's source
    assert "AssertionError" in message and "x is not two" in message  # the error
    assert "\x1b[" not in message  # readable, without colour codes
