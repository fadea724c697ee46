"""The tutorials: each source `tutorials/0N_name.py` (jupytext percent format) is paired with its
notebook `tutorials/0N_name.ipynb`, which is committed executed; the suite runs every notebook again.

- `test_notebook_runs`: the notebooks check themselves (each step ends with an `assert` against an
  independent computation), so executing one is the test. A failing cell fails the test with its
  source and traceback. The kernel is this interpreter, run from `tutorials/` with the repository first
  on PYTHONPATH (`tutorials/execute.py`); the SmolLM2 cells stay skipped (no LLM2VEC_MINI_REAL).
- `test_source_and_notebook_agree`: the committed notebook holds exactly the source's cells.
- `test_committed_notebook_is_executed`: `make tutorials` ran it with the SmolLM2 cells, every code
  cell in order, each with an output, and the outputs are clean for diffs.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
jupytext = pytest.importorskip("jupytext")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError  # noqa: E402

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
sys.path.insert(0, str(TUTORIALS))
import execute  # noqa: E402  (tutorials/execute.py, the runner `make tutorials` uses)

SOURCES = execute.sources()
IDS = [s.stem for s in SOURCES]
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # colour codes in IPython tracebacks
# What a committed output must not contain: this machine's paths, memory addresses, progress bars,
# and the line a SmolLM2 cell prints when it was skipped.
DEBRIS = re.compile(r"/(?:work|root|home|tmp|Users)/|\bat 0x[0-9a-fA-F]{6,}|\r|it/s\]|"
                    r"skipped: set LLM2VEC_MINI_REAL=1|IProgress not found")


def _run(nb, name: str) -> None:
    try:
        execute.run(nb)
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as err:
        pytest.fail(f"{name}: {_ANSI.sub('', str(err))}", pytrace=False)


@pytest.mark.notebook
@pytest.mark.parametrize("source", SOURCES, ids=IDS)
def test_notebook_runs(source: Path):
    _run(jupytext.read(source), source.name)


def test_every_tutorial_has_a_source_and_a_notebook():
    assert len(SOURCES) == 8
    for source in SOURCES:
        assert source.with_suffix(".ipynb").is_file(), source.name
    assert sorted(p.stem for p in TUTORIALS.glob("[0-9][0-9]_*.ipynb")) == IDS


@pytest.mark.parametrize("source", SOURCES, ids=IDS)
def test_source_and_notebook_agree(source: Path):
    want = [(c.cell_type, c.source) for c in jupytext.read(source).cells]
    committed = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
    nbformat.validate(committed)
    have = [(c.cell_type, c.source) for c in committed.cells]
    assert len(have) == len(want), f"{source.name}: {len(want)} cells, the notebook has {len(have)}"
    for i, (h, w) in enumerate(zip(have, want)):
        assert h == w, f"{source.name}, cell {i}: the notebook differs from its source; run `make tutorials`"


@pytest.mark.parametrize("source", SOURCES, ids=IDS)
def test_committed_notebook_is_executed(source: Path):
    nb = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), \
        f"{source.name}: not executed top to bottom in one run; run `make tutorials`"
    images = 0
    for i, cell in enumerate(code):
        assert cell.outputs, f"{source.name}, code cell {i + 1}: no output"
        for output in cell.outputs:
            assert output.output_type != "error", f"{source.name}, code cell {i + 1} failed"
            texts = [output.get("text", "")] + [v for k, v in output.get("data", {}).items()
                                                 if k.startswith("text/") and isinstance(v, str)]
            for text in texts:
                found = DEBRIS.search(text)
                assert found is None, f"{source.name}, code cell {i + 1}: {found.group()!r} in {text[:200]!r}"
            images += "image/png" in output.get("data", {})
    drawn = source.read_text(encoding="utf-8").count("plt.show()")
    assert images >= drawn, f"{source.name}: {drawn} figures drawn, {images} in the outputs"


def test_the_tutorials_draw_their_figures():
    images = sum("image/png" in output.get("data", {})
                 for s in SOURCES for cell in nbformat.read(s.with_suffix(".ipynb"), as_version=4).cells
                 for output in cell.get("outputs", []))
    assert images >= 21


@pytest.mark.notebook
def test_a_failing_cell_fails_with_its_source(tmp_path):
    # The harness itself must be able to fail, and say where: run a two-cell notebook whose second cell
    # asserts something false, and check the failure names that cell's source.
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import os, sys\nx = 1"),
                nbformat.v4.new_code_cell(
                    "assert os.environ['MPLBACKEND'] == 'Agg'\n"
                    f"assert sys.executable == {sys.executable!r}\n"
                    f"assert os.getcwd() == {str(TUTORIALS)!r}\n"
                    "assert x == 2, 'x is not two'")]
    with pytest.raises(pytest.fail.Exception) as info:
        _run(nb, "99_broken")
    message = str(info.value)
    assert "assert x == 2, 'x is not two'" in message  # the cell's source
    assert "AssertionError" in message and "x is not two" in message  # the error
    assert "\x1b[" not in message  # readable, without colour codes
