"""Running the checks: load an implementation, run each exercise's check on it, say what happened.

An implementation is a Python file (a student's, written from `kit new`'s stub), an importable module
name, or "reference" (the package itself, through `reference.py`). Each exercise ends in one of three
states:

    passed          every property of the check holds (and of the instructor's hidden checks)
    failed          the first property that does not, in words: the input, expected against got
    not attempted   the function is missing, or raises NotImplementedError (as the stub's do)

Instructors' hidden checks (`kit grade --hidden DIR`, or `check --hidden DIR`) are Python files in DIR
that define functions `check_e03(impl)` and so on, with the built-in checks' contract: take the
implementation (a module: `impl.build_attention_mask`), raise AssertionError (or
`checks.CheckFailed`) with a message when a property fails. They run after the built-in check of the
same exercise; they may use the helpers of `kit.checks` (`need`, `expect`, `expect_close`).
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import os
import re
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError
from .checks import CHECKS, NotAttempted
from .exercises import BY_ID, select

PASSED, FAILED, NOT_ATTEMPTED = "passed", "failed", "not attempted"
_loaded = itertools.count()


@dataclass
class Result:
    exercise: str  # "e01"
    status: str  # PASSED, FAILED or NOT_ATTEMPTED
    message: str = ""  # why it failed, or what is missing


def load_impl(spec):
    """The implementation `spec` names: "reference", a path to a .py file, or a module name.

    A module object is returned as it is. A file is imported under a fresh module name, so two
    students' files never share one.
    """
    if not isinstance(spec, (str, os.PathLike)):
        return spec
    text = os.fspath(spec)
    if text == "reference":
        return importlib.import_module("llm2vec_mini.kit.reference")
    path = Path(text)
    if text.endswith(".py") or path.exists():
        if not path.is_file():
            raise ConfigError(f"no such implementation file: {text}")
        name = f"_kit_impl_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}_{next(_loaded)}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # dataclasses and pickling look a module up by name
        try:
            module_spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        return module
    return importlib.import_module(text)


def load_hidden(folder) -> dict:
    """{exercise id: [check functions]} from every .py file in an instructor's folder, in name order."""
    found = {}
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"--hidden: {folder} is not a folder")
    for path in sorted(folder.glob("*.py")):
        module = load_impl(path)
        for name in sorted(vars(module)):
            match = re.fullmatch(r"check_(e\d\d)", name)
            if match and callable(getattr(module, name)):
                if match.group(1) not in BY_ID:
                    raise ConfigError(f"{path}: {name} checks an exercise that does not exist "
                                      f"(the exercises are {', '.join(BY_ID)})")
                found.setdefault(match.group(1), []).append(getattr(module, name))
    return found


def _where(error: BaseException, impl) -> str:
    """' (my_llm2vec.py, line 12: `return x / rms`)' for the last line of the implementation's file
    in the traceback, or ''."""
    path = getattr(impl, "__file__", None)
    if not path:
        return ""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if os.path.abspath(f.filename) ==
              os.path.abspath(path)]
    if not frames:
        return ""
    frame = frames[-1]
    return f" ({Path(frame.filename).name}, line {frame.lineno}: `{frame.line}`)"


def _raised_by(error: BaseException, impl) -> bool:
    """True when the implementation's own code raised `error` (its innermost frame is in the file)."""
    path = getattr(impl, "__file__", None)
    frames = traceback.extract_tb(error.__traceback__)
    return bool(path and frames and os.path.abspath(frames[-1].filename) == os.path.abspath(path))


def run_check(impl, exercise: str, hidden: dict = None) -> Result:
    """Run exercise `exercise`'s check (then the hidden ones) on `impl`; never raises for the
    implementation's faults."""
    tutorial = BY_ID[exercise].tutorial
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is the fastest, and fair to a shared CPU
    try:
        CHECKS[exercise](impl)
        for check in (hidden or {}).get(exercise, []):
            check(impl)
    except NotAttempted as e:
        return Result(exercise, NOT_ATTEMPTED, f"{e} (see {tutorial})")
    except NotImplementedError as e:
        if _raised_by(e, impl):
            return Result(exercise, NOT_ATTEMPTED, str(e) or f"raises NotImplementedError (see {tutorial})")
        return Result(exercise, FAILED, f"NotImplementedError: {e}{_where(e, impl)}")
    except AssertionError as e:
        return Result(exercise, FAILED, (str(e) or "an assertion failed") + _where(e, impl))
    except MemoryError as e:
        return Result(exercise, FAILED, f"ran out of memory{_where(e, impl)}")
    except Exception as e:  # the implementation's own error, told as it is
        return Result(exercise, FAILED, f"raised {type(e).__name__}: {e}{_where(e, impl)}")
    finally:
        torch.set_num_threads(threads)
    return Result(exercise, PASSED)


def check(impl, exercises=None, hidden=None) -> list:
    """[Result] for each chosen exercise ("e03", ...; all by default), in course order."""
    impl = load_impl(impl)
    hidden = load_hidden(hidden) if isinstance(hidden, (str, os.PathLike)) else hidden
    return [run_check(impl, e.id, hidden) for e in select(exercises)]


def table(results) -> str:
    """One row per exercise: id, title, status, and the reason (for failed and not attempted)."""
    lines = []
    for r in results:
        e = BY_ID[r.exercise]
        row = f"{r.exercise}  {e.title:27s} {r.status}"
        lines.append(row + (f": {r.message}" if r.message else ""))
    counts = {s: sum(r.status == s for r in results) for s in (PASSED, FAILED, NOT_ATTEMPTED)}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines)
