"""The teaching kit (llm2vec_mini/kit): the checks, the stub, the swap, the grader, the exercise notebooks.

What must hold, each shown here: the package passes every exercise; a fresh stub is "not attempted"
everywhere with exit status 0; each known-wrong implementation fails its own exercise and passes all
the others; `kit grade` prints the expected table for the reference, a stub, two wrong submissions and
one that loops forever, allocates without bound and takes a forbidden shortcut; the swap runs a
student's code inside the model and puts everything back; the committed exercise notebooks are what
the generator writes now, and each stops at its first blank.
"""

from __future__ import annotations

import ast
import csv
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llm2vec_mini import lora, mntp, pooling, simcse
from llm2vec_mini import model as llama
from llm2vec_mini.convert import gguf, safetensors
from llm2vec_mini.errors import ConfigError
from llm2vec_mini.kit import FAILED, NOT_ATTEMPTED, PASSED, check, in_model, load_impl, notebooks, use
from llm2vec_mini.kit import grade as grading
from llm2vec_mini.kit.__main__ import main
from llm2vec_mini.kit.exercises import BY_ID, EXERCISES
from llm2vec_mini.kit.stub import stub_source, write_stub

REPO = Path(__file__).resolve().parents[1]
KIT = REPO / "llm2vec_mini" / "kit"
WRONG = sorted((KIT / "wrong").glob("e[0-9][0-9]_*.py"))
IDS = [e.id for e in EXERCISES]


def statuses(results) -> dict:
    return {r.exercise: r.status for r in results}


def cli(capsys, *argv) -> tuple:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


# -------------------------------------------------------------------------------------------------
# The three must-shows of `check`

def test_the_package_passes_every_exercise(capsys):
    assert statuses(check("reference")) == dict.fromkeys(IDS, PASSED)
    code, out, _ = cli(capsys, "check", "--impl", "reference", "--json")
    assert code == 0 and json.loads(out) == dict.fromkeys(IDS, PASSED)


def test_a_fresh_stub_is_not_attempted_anywhere(tmp_path, capsys):
    code, out, _ = cli(capsys, "new", str(tmp_path / "my_llm2vec.py"))
    assert code == 0 and "14 functions and classes" in out
    code, out, _ = cli(capsys, "check", "--impl", str(tmp_path / "my_llm2vec.py"), "--json")
    assert code == 0 and json.loads(out) == dict.fromkeys(IDS, NOT_ATTEMPTED)  # nothing else on stdout
    code, out, _ = cli(capsys, "check", "--impl", str(tmp_path / "my_llm2vec.py"))
    assert code == 0 and "failed:" not in out and out.count("not attempted: ") == 12
    assert "e03: write build_attention_mask (tutorials/02_bidirectional_attention, section 1)" in out


@pytest.mark.parametrize("path", WRONG, ids=[p.stem for p in WRONG])
def test_each_known_wrong_implementation_fails_its_own_exercise_only(path):
    own = path.stem[:3]
    got = statuses(check(path))
    assert got == {e: FAILED if e == own else PASSED for e in IDS}


def test_every_exercise_has_a_known_wrong_implementation():
    assert {p.stem[:3] for p in WRONG} == set(IDS)
    for path in WRONG:  # each is the reference plus one function (or class) of its own exercise
        tree = ast.parse(path.read_text(encoding="utf-8"))
        defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        assert defined <= set(BY_ID[path.stem[:3]].names), path.name


# -------------------------------------------------------------------------------------------------
# check: messages, exit status, what counts as not attempted

def test_a_failure_names_the_input_and_expected_against_got(capsys):
    wrong = str(KIT / "wrong" / "e04_repeat.py")
    code, out, _ = cli(capsys, "check", "--impl", wrong, "--exercise", "4", "5")
    assert code == 1
    row = next(line for line in out.splitlines() if line.startswith("e04"))
    assert "failed: attention(q shape (2, 6, 6, 8) float32, k and v shape (2, 2, 6, 8) float32" in row
    assert "expected" in row and "got" in row
    assert "e05  SwiGLU MLP" in out and out.count("\n") == 3  # only the exercises asked for
    code, out, _ = cli(capsys, "check", "--impl", wrong, "--json")
    assert code == 1 and json.loads(out)["e04"] == FAILED


def test_missing_or_unwritten_is_not_attempted_but_a_library_error_is_a_failure(tmp_path):
    helper = tmp_path / "kit_test_helpers.py"
    helper.write_text("def unfinished(x):\n    raise NotImplementedError('somebody else did not finish')\n")
    mine = tmp_path / "partial.py"
    mine.write_text(textwrap.dedent("""\
        import torch
        from kit_test_helpers import unfinished

        def rms_norm(x, weight, eps):
            x32 = x.float()
            return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight

        def apply_rope(x, cos, sin):
            return unfinished(x)

        def attention(q, k, v, mask):
            raise NotImplementedError("e04: later")
        """))
    sys.path.insert(0, str(tmp_path))
    try:
        results = {r.exercise: r for r in check(mine)}
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("kit_test_helpers", None)
    assert results["e01"].status == PASSED
    assert results["e02"].status == FAILED and "somebody else did not finish" in results["e02"].message
    assert results["e04"].status == NOT_ATTEMPTED and results["e04"].message == "e04: later"
    assert results["e05"].status == NOT_ATTEMPTED and "swiglu is not defined" in results["e05"].message


def test_a_file_that_does_not_load_fails_every_exercise(tmp_path, capsys):
    broken = tmp_path / "broken.py"
    broken.write_text("def rms_norm(x, weight, eps)\n    return x\n")
    code, out, _ = cli(capsys, "check", "--impl", str(broken), "--json")
    assert code == 1 and json.loads(out) == dict.fromkeys(IDS, FAILED)
    code, _, err = cli(capsys, "check", "--impl", str(tmp_path / "absent.py"))
    assert code == 2 and "no such implementation file" in err


def test_new_keeps_an_existing_file(tmp_path, capsys):
    path = tmp_path / "mine.py"
    path.write_text("# my work\n")
    code, _, err = cli(capsys, "new", str(path))
    assert code == 2 and "--force" in err and path.read_text() == "# my work\n"
    assert cli(capsys, "new", str(path), "--force")[0] == 0 and "def rms_norm" in path.read_text()
    with pytest.raises(ConfigError):
        write_stub(tmp_path / "mine.txt")


def test_the_stub_is_generated_from_the_reference():
    source = stub_source()
    tree = ast.parse(source)  # a valid Python file
    reference = ast.parse((KIT / "reference.py").read_text(encoding="utf-8"))
    ours = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    theirs = {n.name: n for n in reference.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert list(ours) == [name for e in EXERCISES for name in e.names]
    for name, node in ours.items():  # the same signature and docstring, a body that raises
        assert ast.get_docstring(node) == ast.get_docstring(theirs[name])
        if isinstance(node, ast.FunctionDef):
            assert ast.dump(node.args) == ast.dump(theirs[name].args)
            assert isinstance(node.body[-1], ast.Raise) and len(node.body) == 2
    imports = {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    imports |= {n.module for n in tree.body if isinstance(n, ast.ImportFrom)}
    assert imports == {"math", "numpy", "torch", "torch.nn.functional"}


def test_hidden_checks_add_to_an_exercise(tmp_path, capsys):
    (tmp_path / "extra.py").write_text(textwrap.dedent("""\
        import torch

        def check_e03(impl):
            mask = impl.build_attention_mask(None, 3, True, torch.float32)
            assert mask is None, "hidden: the instructor wants None for a causal mask without padding"
        """))
    results = {r.exercise: r for r in check("reference", ["e03", "e04"], hidden=tmp_path)}
    assert results["e03"].status == FAILED and results["e03"].message.startswith("hidden: the instructor")
    assert results["e04"].status == PASSED
    (tmp_path / "typo.py").write_text("def check_e99(impl):\n    pass\n")
    with pytest.raises(ConfigError, match="check_e99"):
        check("reference", ["e03"], hidden=tmp_path)


def imported(path: Path) -> set:
    """Every module a file imports, anywhere in it ('.kit' for a relative one)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            stem = "." * node.level + (node.module or "")
            found |= {stem} | {f"{stem}.{a.name}".replace("..", ".") for a in node.names}
    return found


def test_the_kit_is_a_runner_and_its_checks_import_nothing_of_the_package():
    for path in (REPO / "llm2vec_mini").rglob("*.py"):  # the top layer: nothing else imports it
        if KIT not in path.parents:
            assert not {m for m in imported(path) if m.startswith("llm2vec_mini.kit") or ".kit" in m}, path
    for path in KIT.rglob("*.py"):  # never the reference libraries
        assert not {m.split(".")[0] for m in imported(path)} & {"transformers", "peft", "safetensors", "gguf"}
    for path in (KIT / "checks").glob("*.py"):  # torch, numpy, the standard library, each other
        assert {m.split(".")[0] for m in imported(path)} <= {
            "__future__", "json", "math", "os", "struct", "tempfile", "numpy", "torch", ""}, path
        tree = ast.parse(path.read_text(encoding="utf-8"))
        assert all(n.level <= 1 for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)), path


# -------------------------------------------------------------------------------------------------
# The swap: a student's code inside the model

def own_copy(tmp_path) -> Path:
    """A correct submission whose every function is its own object (so the swap replaces the package's):
    each calls the reference; its LoRA layer is the e08 wrong one with the scale put right."""
    lines = ["from llm2vec_mini.kit import reference as _reference", ""]
    for e in EXERCISES:
        for name in e.names:
            if name != "LoRALinear":
                lines += [f"def {name}(*args, **kwargs):",
                          f"    return _reference.{name}(*args, **kwargs)", ""]
    wrong_lora = (KIT / "wrong" / "e08_alpha_not_over_r.py").read_text(encoding="utf-8")
    fixed = wrong_lora.replace("self.alpha *", "self.alpha / self.r *").replace(
        "from llm2vec_mini.kit.reference import *  # noqa: F403  (every other exercise: the reference)", "")
    path = tmp_path / "own.py"
    path.write_text("\n".join(lines) + "\n" + fixed, encoding="utf-8")
    return path


def patched_places():
    return (llama.RMSNorm.forward, llama.apply_rope, llama.build_attention_mask, llama.attention,
            llama.LlamaMLP.forward, mntp.MNTPCollator.__call__, mntp.mntp_loss, mntp.mntp_loss_full,
            lora.LoRALinear.forward, lora.LoRALinear.merge, lora.LoRALinear.unmerge, simcse.contrastive_loss,
            pooling.pool, simcse.pool, safetensors.load_file, gguf.unpermute_qk, dict(gguf._DEQUANTISERS))


def test_use_swaps_a_students_code_into_the_model_and_restores_the_package(tmp_path):
    before = patched_places()
    own = load_impl(own_copy(tmp_path))
    assert statuses(check(own)) == dict.fromkeys(IDS, PASSED)
    with use(own) as swap:
        assert swap.exercises == IDS  # all twelve are its own objects
        assert llama.RMSNorm.forward is not before[0] and gguf._DEQUANTISERS[3] is not before[-1][3]
    assert patched_places() == before
    results = in_model(own)
    assert len(results) == 13 and all(ok for _, ok, _ in results), [r for r in results if not r[1]]
    assert patched_places() == before
    assert in_model("reference") == []  # the reference's code is the package: nothing to swap


@pytest.mark.parametrize("wrong, broken", [
    ("e04_repeat", "tiny Llama logits, causal, no padding (e04)"),
    ("e03_padding_ignored", "tiny Llama logits, causal, left padding (e03)"),
    ("e08_alpha_not_over_r", "tiny Llama with LoRA adapters (e08)"),
    ("e07_unshifted", "the MNTP loss of a masked batch (e07)"),
])
def test_a_wrong_exercise_forced_into_the_model_changes_what_it_computes(wrong, broken):
    before = patched_places()
    results = {what: ok for what, ok, _ in in_model(KIT / "wrong" / f"{wrong}.py", [wrong[:3]])}
    assert results[broken] is False
    assert patched_places() == before


def test_use_restores_the_package_when_the_block_fails(tmp_path):
    before = patched_places()
    with pytest.raises(RuntimeError, match="inside"):
        with use(own_copy(tmp_path), ["e01", "e10"]):
            assert pooling.pool is not before[12]
            raise RuntimeError("inside")
    assert patched_places() == before


def test_check_in_model_reports_each_comparison(tmp_path, capsys):
    own = str(own_copy(tmp_path))
    code, out, _ = cli(capsys, "check", "--impl", own, "--exercise", "1", "10", "--in-model")
    assert code == 0
    lines = [line for line in out.splitlines() if line.startswith("in the model:")]
    assert len(lines) == 13 and all(line.startswith("in the model: ok") for line in lines)
    assert "tiny Llama logits, bidirectional, left padding (e01 e10)" in out


@pytest.mark.slow
def test_in_model_with_smollm2_loads_and_encodes_through_the_swap(tmp_path, smollm2_gguf):
    what, ok, detail = in_model(own_copy(tmp_path), ["e01", "e04", "e10", "e12"], real=True)[-1]
    assert what.startswith("SmolLM2-135M loaded and encoded through the swap (e01 e04 e10 e12)")
    assert ok, detail


# -------------------------------------------------------------------------------------------------
# The grader

def test_forbidden_shortcuts_are_found_in_the_exercise_that_takes_them(tmp_path):
    source = tmp_path / "sneaky.py"
    source.write_text(textwrap.dedent("""\
        import math
        import peft  # imported, never used: nothing to flag
        import torch
        import torch.nn.functional as F
        from torch.nn.functional import scaled_dot_product_attention as sdpa

        def rms_norm(x, weight, eps):
            return torch.nn.functional.rms_norm(x, x.shape[-1:], weight, eps)

        def _attend(q, k, v, mask):
            return sdpa(q, k, v, attn_mask=mask, enable_gqa=True)

        def attention(q, k, v, mask):
            return _attend(q, k, v, mask)

        def swiglu(x, gate_proj, up_proj, down_proj):
            import transformers
            return down_proj(F.silu(gate_proj(x)) * up_proj(x))

        def pool(hidden, attention_mask, embed_mask, mode):
            return hidden.mean(1) * math.pi / math.pi  # nothing forbidden, and self.rms_norm is not torch's

        class LoRALinear(torch.nn.Module):
            def forward(self, x):
                return self.rms_norm(x)
        """))
    found = grading.forbidden(source)
    assert set(found) == {"e01", "e04", "e05"}
    assert found["e01"] == "uses torch's rms_norm (line 8)"
    assert found["e04"] == "uses torch's scaled_dot_product_attention (line 11)"  # in its helper
    assert found["e05"] == "imports transformers (line 17)"
    wrong = grading.forbidden(KIT / "wrong" / "e04_repeat.py")  # every exercise but its own is the package's
    assert set(wrong) == set(IDS) - {"e04"} and "from llm2vec_mini.kit.reference import *" in wrong["e01"]
    at_import = tmp_path / "at_import.py"
    at_import.write_text("import llm2vec_mini.model\nllm2vec_mini.model.RMSNorm.forward = None\n\n"
                         "def rms_norm(x, w, eps):\n    return x\n")
    assert set(grading.forbidden(at_import)) == set(IDS)  # code run at import touches everything


def spliced(stub: str, wrong: str) -> str:
    """A submission as a student hands it in: the stub, with one exercise written (wrongly)."""
    text = (KIT / "wrong" / f"{wrong}.py").read_text(encoding="utf-8")
    return stub + "\n\n# mine\n" + text.replace("from llm2vec_mini.kit.reference import *", "# (stub above)")


@pytest.mark.slow
def test_grade_prints_the_expected_table_and_stops_what_runs_away(tmp_path, capsys):
    stub = stub_source()
    (tmp_path / "stub.py").write_text(stub)
    (tmp_path / "wrong_e01.py").write_text(spliced(stub, "e01_layernorm"))
    (tmp_path / "wrong_e04.py").write_text(spliced(stub, "e04_repeat"))
    (tmp_path / "bad.py").write_text(stub + textwrap.dedent("""\

        def rms_norm(x, weight, eps):  # a shortcut
            return F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype) * weight

        def apply_rope(x, cos, sin):  # an endless loop
            while True:
                pass

        def build_attention_mask(attention_mask, seq_len, causal, dtype):  # an allocation without bound
            hoard = []
            while True:
                hoard.append(torch.empty(2 ** 26))  # 256 MB of address space each, never touched

        def swiglu(x, gate_proj, up_proj, down_proj):  # right
            return down_proj(F.silu(gate_proj(x)) * up_proj(x))
        """))
    names = ("stub", "wrong_e01", "wrong_e04", "bad")
    submissions = ["reference"] + [str(tmp_path / f"{n}.py") for n in names]
    code, out, _ = cli(capsys, "grade", *submissions, "--timeout", "10", "--memory", "2048", "--jobs", "2",
                       "--csv", str(tmp_path / "grades.csv"))
    assert code == 0
    lines = out.splitlines()
    assert lines[:7] == [
        "student    e01 e02 e03 e04 e05 e06 e07 e08 e09 e10 e11 e12  points",
        "reference    1   1   1   1   1   1   1   1   1   1   1   1  12/12",
        "stub         -   -   -   -   -   -   -   -   -   -   -   -   0/12",
        "wrong_e01    0   -   -   -   -   -   -   -   -   -   -   -   0/12",
        "wrong_e04    -   -   -   0   -   -   -   -   -   -   -   -   0/12",
        "bad          F   0   0   -   1   -   -   -   -   -   -   -   1/12",
        "1 passed, 0 failed, - not attempted, F forbidden (scores 0)",
    ]
    why = "\n".join(lines[8:13])
    assert lines[7] == "why:" and lines[13:] == [f"wrote {tmp_path / 'grades.csv'}"]
    assert "wrong_e01 e01: failed: rms_norm(x shape (2, 3, 5, 64) float32, weight, eps=1e-5): at index" in why
    assert "wrong_e04 e04: failed: attention(q shape (2, 6, 6, 8) float32" in why
    assert "bad e01: forbidden: uses torch's rms_norm (line" in why and "(its check: passed)" in why
    assert "bad e02: failed: stopped after 10 s, still running (an endless loop, or far too slow)" in why
    held = re.search(r"bad e03: failed: ran out of memory \(the limit is 2048 MB; it held (\d+) MB at most",
                     why)
    assert held and int(held.group(1)) <= 2048  # stopped by the limit (not by the kernel's map count)
    with open(tmp_path / "grades.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["student"] + IDS + ["points", "notes"]
    assert [r[:1] + r[13:14] for r in rows[1:]] == [["reference", "12"], ["stub", "0"], ["wrong_e01", "0"],
                                                     ["wrong_e04", "0"], ["bad", "1"]]
    assert rows[5][1:6] == ["0", "0", "0", "0", "1"] and "endless loop" in rows[5][14]


@pytest.mark.slow
def test_the_worker_reports_json_lines_and_keeps_prints_off_them(tmp_path):
    chatty = tmp_path / "chatty.py"
    chatty.write_text("print('hello from the module')\n\ndef rms_norm(x, weight, eps):\n"
                      "    print('hello from rms_norm')\n    return x\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "llm2vec_mini.kit", "worker", "--impl", str(chatty),
               "--exercise", "e01", "e02"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert [e["event"] for e in events] == ["ready", "loaded", "start", "result", "start", "result"]
    assert events[3]["status"] == FAILED and events[5]["status"] == NOT_ATTEMPTED
    assert "hello from the module" in done.stderr and "hello from rms_norm" in done.stderr


# -------------------------------------------------------------------------------------------------
# pytest, for a student

@pytest.mark.slow
def test_the_checks_run_under_plain_pytest_for_a_students_file():
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
               LLM2VEC_MINI_KIT_IMPL=str(KIT / "wrong" / "e04_repeat.py"))
    command = [sys.executable, "-m", "pytest", "--pyargs", "llm2vec_mini.kit.test_exercises", "-q",
               "-p", "no:cacheprovider", "-m", "e04 or e05"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert done.returncode == 1, done.stdout
    assert "1 failed, 1 passed, 10 deselected" in done.stdout
    assert "test_exercise[e04]" in done.stdout and "expected" in done.stdout


# -------------------------------------------------------------------------------------------------
# The exercise notebooks

def test_the_committed_exercise_notebooks_are_what_the_generator_writes():
    pytest.importorskip("jupytext")
    assert notebooks.stale() == [], "run `python -m llm2vec_mini.kit notebooks` (or make exercises)"
    assert sorted(p.stem for p in notebooks.EXERCISES_DIR.glob("*.ipynb")) == sorted(notebooks.BLANKS)


@pytest.mark.parametrize("stem", sorted(notebooks.BLANKS))
def test_each_exercise_notebook_blanks_its_derivations(stem):
    nb = json.loads((notebooks.EXERCISES_DIR / f"{stem}.ipynb").read_text(encoding="utf-8"))
    code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None
               for c in nb["cells"] if c["cell_type"] == "code")  # committed unexecuted
    blanks = [line for source in code for line in source.splitlines()
              if "raise NotImplementedError('exercise:" in line]
    assert len(blanks) == len(notebooks.BLANKS[stem])
    for source in code:
        ast.parse(source)  # every cell is still Python
    tutorial = (notebooks.TUTORIALS / f"{stem}.py").read_text(encoding="utf-8")
    solutions = {"01_llama_from_scratch": "k.repeat_interleave(nh // nkv, dim=1)",
                 "02_bidirectional_attention": "return seen & (j <= i) if causal else seen",
                 "03_loading_real_weights": "q = np.concatenate([qs & 0x0F, qs >> 4])",
                 "04_pooling_and_encoding": "sum(k * h[t] for k, t in enumerate(S, start=1))",
                 "05_lora": "W_merged_by_hand = W + (16.0 / 8) * Bm @ A",
                 "06_mntp": '"mask": 0.8 + 0.1 / V',
                 "07_simcse": "log_sum_exp = top[:, 0] + np.log(np.exp(S - top).sum(axis=1))"}[stem]
    assert solutions in tutorial and not any(solutions in source for source in code)


def test_a_blank_that_names_nothing_or_two_places_is_an_error(monkeypatch):
    pytest.importorskip("jupytext")
    monkeypatch.setitem(notebooks.BLANKS, "02_bidirectional_attention",
                        [notebooks.Blank("gone_by_hand", "x")])
    with pytest.raises(ConfigError, match="'gone_by_hand' matches 0"):
        notebooks.exercise_notebook("02_bidirectional_attention")
    monkeypatch.setitem(notebooks.BLANKS, "04_pooling_and_encoding", [notebooks.Blank("by_hand", "x")])
    with pytest.raises(ConfigError, match="'by_hand' matches 2"):
        notebooks.exercise_notebook("04_pooling_and_encoding")


RUN_CELLS = """
import contextlib, io, json, sys
for path in sys.argv[1:]:
    nb, env, outcome = json.load(open(path)), {"__name__": "__main__"}, [path, None, None, None]
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the cells' own prints
                exec(compile("".join(cell["source"]), path + f" cell {i}", "exec"), env)
        except Exception as e:
            outcome = [path, i, type(e).__name__, str(e)]
            break
    print(json.dumps(outcome))
"""


@pytest.mark.notebook
def test_an_exercise_notebook_stops_at_its_first_blank():
    stems = ["01_llama_from_scratch", "02_bidirectional_attention"]
    paths = [str(notebooks.EXERCISES_DIR / f"{s}.ipynb") for s in stems]
    env = dict(os.environ, PYTHONPATH=str(REPO), MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", RUN_CELLS, *paths], capture_output=True, text=True,
                          cwd=notebooks.EXERCISES_DIR, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    for path, line in zip(paths, done.stdout.splitlines()):
        _, cell, error, message = json.loads(line)
        nb = json.loads(Path(path).read_text(encoding="utf-8"))
        first = next(i for i, c in enumerate(nb["cells"])
                     if c["cell_type"] == "code" and "# EXERCISE" in "".join(c["source"]))
        assert (cell, error) == (first, "NotImplementedError"), (path, cell, error, message)
        assert message.startswith("exercise: ")


@pytest.mark.notebook
def test_a_tutorial_runs_on_the_students_code(tmp_path, capsys):
    pytest.importorskip("nbclient")
    own = own_copy(tmp_path)
    code, out, err = cli(capsys, "tutorial", "02", "--impl", str(own))
    assert code == 0, err
    assert "02_bidirectional_attention.py ran to the end on your code (swapped in: e01, e02, e03, e04, " \
           "e05, e06, e07, e08, e09, e10, e11, e12): every assert held" in out
    wrong = str(KIT / "wrong" / "e03_diagonal_hidden.py")
    code, _, err = cli(capsys, "tutorial", "02", "--impl", wrong, "--exercise", "e03")
    assert code == 1 and "assert torch.equal(visible, visible_by_hand(real, causal))" in err
