"""The exercise notebooks: each tutorial with its hand derivations left blank for the student.

Every tutorial checks the package against an independent computation written in the notebook: a
function such as `rmsnorm_by_hand`, or a value such as `theta_by_hand`, then an `assert`. The exercise
version of a tutorial keeps everything but those derivations: each becomes a blank that raises
NotImplementedError, and the tutorial's own asserts become the student's self-check (nbgrader's
generated student version, karpathy's in-notebook `cmp`). `BLANKS` names them, tutorial by tutorial;
the tutorial sources stay as they are (no markers for a reader to step over), and a name that no
longer matches exactly one function or assignment of its tutorial is an error, so the table cannot
drift from the tutorials unnoticed.

    python -m llm2vec_mini.kit notebooks            writes tutorials/exercises/0N_name.ipynb
    python -m llm2vec_mini.kit notebooks --check    exit status 1 if a committed one is stale

The notebooks are written unexecuted (no outputs), with cell ids fixed, so that regenerating an
unchanged tutorial changes no byte; tests/test_kit.py fails when a committed one is stale.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

TUTORIALS = Path(__file__).resolve().parents[2] / "tutorials"
EXERCISES_DIR = TUTORIALS / "exercises"


@dataclass(frozen=True)
class Blank:
    name: str  # a function whose body, or a variable whose assignment, becomes the blank
    hint: str  # what to write, in a line
    contains: str = ""  # for an assignment: a piece of its source, when the name is assigned elsewhere too


BLANKS = {
    "01_llama_from_scratch": [
        Blank("rmsnorm_by_hand", "x / sqrt(mean of x^2 over the last axis + eps) * g"),
        Blank("theta_by_hand", "theta_by_hand = the (d/2,) frequencies rope_theta^(-2i/d), i = 0 .. d/2 - 1"),
        Blank("rope_by_hand", "rotate (v_i, v_{i+d/2}) by the angle position * theta_i (complex numbers "
                              "help)"),
        Blank("attention_by_hand", "project, rotate q and k, share each kv head among its query heads, "
                                   "softmax(q k^T / sqrt(d) + causal mask) v, then o_proj"),
        Blank("swiglu_by_hand", "down(silu(gate(x)) * up(x)), with silu(a) = a / (1 + exp(-a))"),
        Blank("layer_by_hand", "h = x + attention(norm1(x)); return h + mlp(norm2(h)), with your functions"),
        Blank("by_hand", "by_hand = the parameter count from the formula above", contains="3 * h * m"),
    ],
    "02_bidirectional_attention": [
        Blank("visible_by_hand", "(T, T) booleans: key j visible to query i, from i, j and real"),
    ],
    "03_loading_real_weights": [
        Blank("by_hand", "by_hand = the tensor's bytes data[begin:end] as little-endian float32, reshaped",
              contains="frombuffer"),
        Blank("decode", "bytes -> numpy for F32, F16, I64, and BF16 (the top half of a float32)"),
        Blank("q", "q = the 32 four-bit values of the block, in weight order", contains="qs & 0x0F"),
        Blank("w8_by_hand", "w8_by_hand = the 32 Q8_0 weights, d * q"),
        Blank("expected", "expected = which HF row sits at each position of the llama.cpp order",
              contains="head_dim // 2"),
    ],
    "04_pooling_and_encoding": [
        Blank("pool_by_hand", "one row, position by position: mean, weighted mean, eos/last, bos"),
    ],
    "05_lora": [
        Blank("lora_size_by_hand", "L * sum over the target projections of r * (d_in + d_out)"),
        Blank("W_merged_by_hand", "W_merged_by_hand = W + (alpha / r) B A, here alpha = 16, r = 8"),
    ],
    "06_mntp": [
        Blank("expected", "expected = the rates of chosen, mask, original and other (see the equation)",
              contains="0.8 + 0.1 / V"),
        Blank("terms", "terms = -log softmax(lm_head(hidden[b, i - 1]))[labels[b, i]] for each label",
              contains="log_softmax"),
    ],
    "07_simcse": [
        Blank("simcse_loss_numpy", "normalise, S = scale a b^T, mean of logsumexp(S_i) - S_ii (stable)"),
    ],
}


def _find(tree, blank: Blank, source: str) -> list:
    """The function definitions named blank.name, or assignments to it containing blank.contains."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == blank.name and not blank.contains:
            found.append(node)
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == blank.name
                                                  for t in node.targets):
            if blank.contains in (ast.get_source_segment(source, node) or ""):
                found.append(node)
    return found


def _blanked(source: str, node, blank: Blank) -> str:
    """The cell's source with the node's solution lines replaced by the blank."""
    lines = source.splitlines()
    if isinstance(node, ast.FunctionDef):
        body = node.body[1:] if ast.get_docstring(node) and len(node.body) > 1 else node.body  # keep a doc
        first, last, indent = body[0].lineno, body[-1].end_lineno, " " * body[0].col_offset
        what = f"write {blank.name}"
    else:
        first, last, indent = node.lineno, node.end_lineno, " " * node.col_offset
        what = f"compute {blank.name}"
    replacement = [f"{indent}# EXERCISE: {blank.hint}",
                   f"{indent}raise NotImplementedError({f'exercise: {what} (see the text above)'!r})"]
    return "\n".join(lines[:first - 1] + replacement + lines[last:])


def exercise_notebook(stem: str):
    """The exercise version of tutorials/{stem}.py, unexecuted (an nbformat notebook)."""
    import jupytext  # the tutorials' own tools (requirements-dev.txt), needed only here
    import nbformat

    tutorial = jupytext.read(TUTORIALS / f"{stem}.py")
    code = [c.source for c in tutorial.cells if c.cell_type == "code"]
    for blank in BLANKS[stem]:  # each must name exactly one place in the tutorial
        count = sum(len(_find(ast.parse(source), blank, source)) for source in code)
        if count != 1:
            raise ConfigError(f"tutorials/{stem}.py: the blank {blank.name!r} matches {count} functions or "
                              f"assignments, not one; update BLANKS in llm2vec_mini/kit/notebooks.py")
    cells = [nbformat.v4.new_markdown_cell(_header(stem, tutorial))]
    for cell in tutorial.cells:
        source = cell.source
        if cell.cell_type == "code":
            for blank in BLANKS[stem]:
                nodes = _find(ast.parse(source), blank, source)
                if nodes:
                    source = _blanked(source, nodes[0], blank)
            source = source.replace('"../../shared/data"', '"../../../shared/data"')  # one folder deeper
            cells.append(nbformat.v4.new_code_cell(source))
        else:
            source = re.sub(r"\]\((0\d_\w+\.ipynb)\)", r"](../\1)", source)  # links to the tutorials
            cells.append(nbformat.v4.new_markdown_cell(source))
    for i, cell in enumerate(cells):
        cell.id = f"ex{stem[:2]}-{i:02d}"
    metadata = {k: v for k, v in tutorial.metadata.items() if k != "jupytext"}  # not paired with a .py
    return nbformat.v4.new_notebook(cells=cells, metadata=metadata)


def _header(stem: str, tutorial) -> str:
    title = next(c.source for c in tutorial.cells if c.cell_type == "markdown").splitlines()[0].lstrip("# ")
    items = "\n".join(f"* `{b.name}`: {b.hint}" for b in BLANKS[stem])
    return (f"# Exercise: {title}\n\n"
            f"This is [tutorial {stem[:2]}](../{stem}.ipynb) with its hand derivations left blank. "
            f"Each blank is marked `# EXERCISE` and raises `NotImplementedError`: replace it with your "
            f"code, and run the notebook top to bottom. The tutorial's own `assert`s check your answers "
            f"against the package; a cell that runs without an error is a derivation you got right."
            f"\n\n{items}\n\n"
            f"Stuck? The tutorial holds every answer. This file is generated by "
            f"`python -m llm2vec_mini.kit notebooks`: work in a copy.")


def text(stem: str) -> str:
    import nbformat

    return nbformat.writes(exercise_notebook(stem)) + "\n"


def write_all() -> list:
    """Write every exercise notebook; returns their paths."""
    EXERCISES_DIR.mkdir(exist_ok=True)
    paths = []
    for stem in BLANKS:
        path = EXERCISES_DIR / f"{stem}.ipynb"
        path.write_text(text(stem), encoding="utf-8")
        paths.append(path)
    return paths


def stale() -> list:
    """The exercise notebooks missing or different from what `write_all` would write now."""
    return [f"{stem}.ipynb" for stem in BLANKS if not (EXERCISES_DIR / f"{stem}.ipynb").is_file()
            or (EXERCISES_DIR / f"{stem}.ipynb").read_text(encoding="utf-8") != text(stem)]
