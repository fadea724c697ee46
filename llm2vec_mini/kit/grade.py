"""Grading a class: `python -m llm2vec_mini.kit grade alice.py bob.py ... --csv grades.csv`.

Each submission runs in its own process (`kit worker`), with an address-space limit (`--memory`, MB,
RLIMIT_AS) and a wall-clock limit per exercise (`--timeout`, s; RLIMIT_CPU backs it). The worker
reports each exercise as it finishes; when one loops forever or the process dies, that exercise is
graded failed and a fresh process goes on with the rest, so one bad function costs one exercise, and
one bad submission costs nobody else anything. An allocation past the limit fails in the worker
(MemoryError, or torch's "can't allocate memory") and fails that exercise only.

Before running, each file is read (never imported) for forbidden shortcuts: torch's ready-made
`F.rms_norm`/`torch.rms_norm`/`nn.RMSNorm` and `scaled_dot_product_attention`, and the libraries that
hold the answers: `llm2vec_mini`, `transformers`, `peft`, `safetensors`, `gguf`. A shortcut counts
against the exercise it is found in: in the exercise's function or class, in a helper of the file it
calls, or where it comes from (an exercise imported from llm2vec_mini is the package's, not the
student's). A flagged exercise scores 0 and the table says why. "reference" (the package) is graded
without this reading.

One point per exercise passed and not flagged. The table has a row per student and a column per
exercise (1 passed, 0 failed, - not attempted, F forbidden), then the reasons; `--csv` writes the same
rows (student, e01..e12, points, notes).
"""

from __future__ import annotations

import ast
import csv
import json
import os
import queue
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .exercises import select
from .run import FAILED, NOT_ATTEMPTED, PASSED, Result, load_hidden, load_impl, run_check

FORBIDDEN = "forbidden"
FORBIDDEN_MODULES = ("llm2vec_mini", "transformers", "peft", "safetensors", "gguf")
FORBIDDEN_CALLS = {"rms_norm": "torch's rms_norm", "RMSNorm": "torch's nn.RMSNorm",
                   "scaled_dot_product_attention": "torch's scaled_dot_product_attention"}
STARTUP_S = 180  # for the worker's interpreter and `import torch` on a busy machine, before any limit
LOAD_S = 60  # at least this long to import the submission (and the package, for "reference")
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # what holds llm2vec_mini/, for the worker's path


# -------------------------------------------------------------------------------------------------
# Forbidden shortcuts, found by reading the file

def _top(module: str) -> str:
    return (module or "").split(".")[0]


def forbidden(path) -> dict:
    """{exercise id: reason} for each exercise of the file at `path` that takes a forbidden shortcut."""
    source = Path(path).read_text(encoding="utf-8")
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return {}  # it will not load; the worker says why
    defined, bound, starred, toplevel = {}, {}, [], []  # name -> node; name -> (module, attr); modules
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined[node.name] = node
        elif isinstance(node, ast.Import):
            for alias in node.names:
                bound[alias.asname or alias.name.split(".")[0]] = (alias.name, None)
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if alias.name == "*":
                    starred.append(node.module)
                else:
                    bound[alias.asname or alias.name] = (node.module, alias.name)
        else:
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    for name in ast.walk(target):
                        if isinstance(name, ast.Name):
                            defined[name.id] = node
            toplevel.append(node)

    def name_reason(name: str, line: int):
        module, attr = bound.get(name, (None, None))
        if _top(module) in FORBIDDEN_MODULES:
            return f"uses {module}{'.' + attr if attr else ''} (line {line})"
        if attr in FORBIDDEN_CALLS and _top(module) == "torch":
            return f"uses {FORBIDDEN_CALLS[attr]} (line {line})"
        return None

    def reasons(node, seen: set) -> list:
        found = []
        for sub in ast.walk(node):
            if isinstance(sub, ast.Import):
                found += [f"imports {a.name} (line {sub.lineno})" for a in sub.names
                          if _top(a.name) in FORBIDDEN_MODULES]
            elif isinstance(sub, ast.ImportFrom):
                if _top(sub.module) in FORBIDDEN_MODULES:
                    found.append(f"imports from {sub.module} (line {sub.lineno})")
                elif _top(sub.module) == "torch":
                    found += [f"imports {FORBIDDEN_CALLS[a.name]} (line {sub.lineno})" for a in sub.names
                              if a.name in FORBIDDEN_CALLS]
            elif isinstance(sub, ast.Attribute) and sub.attr in FORBIDDEN_CALLS:
                root = sub
                while isinstance(root, ast.Attribute):
                    root = root.value
                if isinstance(root, ast.Name) and _top(bound.get(root.id, ("",))[0]) == "torch":
                    found.append(f"uses {FORBIDDEN_CALLS[sub.attr]} (line {sub.lineno})")
            elif isinstance(sub, ast.Name):
                why = name_reason(sub.id, sub.lineno)
                if why:
                    found.append(why)
                elif sub.id in defined and sub.id not in seen and defined[sub.id] is not node:
                    seen.add(sub.id)  # a helper of the file: what it does counts too
                    found += reasons(defined[sub.id], seen)
        return found

    # what runs at import touches every exercise; a definition (name = value) counts where it is used
    def definition(node):
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        return isinstance(node, (ast.Assign, ast.AnnAssign)) and all(isinstance(t, ast.Name) for t in targets)

    at_import = [r for node in toplevel if not definition(node) for r in reasons(node, set())]
    out = {}
    for exercise in select():
        found = list(at_import)
        for name in exercise.names:
            if name in defined:
                found += reasons(defined[name], {name})
            elif name in bound and _top(bound[name][0]) in FORBIDDEN_MODULES:
                found.append(f"{name} is imported from {bound[name][0]}, not written")
            else:
                found += [f"{name} comes from `from {m} import *`, not written" for m in starred
                          if _top(m) in FORBIDDEN_MODULES]
        if found:
            out[exercise.id] = "; ".join(dict.fromkeys(found))  # in order, each once
    return out


# -------------------------------------------------------------------------------------------------
# One submission, in worker processes

def worker(impl: str, exercises, hidden=None) -> int:
    """`kit worker`: run the checks and write one JSON line per event to the original stdout.

    Events: ready (interpreter up), loaded or load_error, then start and result per exercise. The
    submission's own prints go to stderr, so they cannot be mistaken for events.
    """
    events = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(**event):
        events.write(json.dumps(event) + "\n")
        events.flush()

    send(event="ready")
    try:
        module = load_impl(impl)
        hidden_checks = load_hidden(hidden) if hidden else {}
    except BaseException as e:  # a syntax error, an import of something missing, exit() at import
        send(event="load_error", message=f"{type(e).__name__}: {e}")
        return 1
    send(event="loaded")
    for exercise in select(exercises):
        send(event="start", exercise=exercise.id)
        result = run_check(module, exercise.id, hidden_checks)
        send(event="result", exercise=exercise.id, status=result.status, message=result.message,
             peak_mb=_peak_mb())
    return 0


def _peak_mb():
    """The most address space this process has held so far, in MB (VmPeak; Linux), or None."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next((int(line.split()[1]) // 1024 for line in f if line.startswith("VmPeak:")), None)
    except OSError:
        return None


def _limits(memory_mb: int, cpu_s: int):
    def apply():  # in the child, before it runs anything
        limit = memory_mb * 2 ** 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 5))
    return apply


def _ended(code: int) -> str:
    if code < 0:
        name = signal.Signals(-code).name
        why = {"SIGXCPU": ": over its CPU time", "SIGKILL": "", "SIGSEGV": ": a crash"}.get(name, "")
        return f"killed by {name}{why}"
    return f"exit status {code}"


def run_submission(impl: str, exercises=None, hidden=None, timeout: float = 60,
                   memory_mb: int = 4096) -> dict:
    """{exercise id: Result} for one submission, each exercise checked in a worker process."""
    pending = [e.id for e in select(exercises)]
    results = {}
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")) if p))
    impl = impl if impl == "reference" else str(Path(impl).resolve())
    while pending:
        command = [sys.executable, "-m", "llm2vec_mini.kit", "worker", "--impl", impl, "--exercise", *pending]
        if hidden:
            command += ["--hidden", str(Path(hidden).resolve())]
        cpu = int(timeout * len(pending) + STARTUP_S)
        with tempfile.TemporaryDirectory(prefix="kit_grade_") as folder, \
                open(Path(folder) / "stderr", "w+b") as stderr:
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, cwd=folder, env=env,
                                       preexec_fn=_limits(memory_mb, cpu), start_new_session=True)
            lines = queue.Queue()
            def read():  # each line as it comes, then None at the end
                for line in process.stdout:
                    lines.put(line)
                lines.put(None)

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            try:
                _follow(process, lines, pending, results, timeout, memory_mb, stderr)
            finally:
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                reader.join(timeout=10)
    return results


def _follow(process, lines, pending, results, timeout, memory_mb, stderr) -> None:
    """Read the worker's events until it ends or overruns; record results; drop them from pending."""
    state, current, deadline = "starting", None, time.monotonic() + STARTUP_S
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            os.killpg(process.pid, signal.SIGKILL)
            if current is not None:
                results[current] = Result(current, FAILED, f"stopped after {timeout:g} s, still running (an "
                                                           f"endless loop, or far too slow)")
                pending.remove(current)
            else:
                why = "the worker did not start" if state == "starting" else \
                    f"loading the file took more than {max(timeout, LOAD_S):g} s (code at module level " \
                    f"that does not end?)"
                _fail_all(pending, results, why)
            return
        if line is None:  # the worker ended
            code = process.wait()
            if current is not None:
                results[current] = Result(current, FAILED,
                                          f"the process ended while checking it ({_ended(code)})")
                pending.remove(current)
            elif pending:
                stderr.seek(0)
                tail = stderr.read().decode("utf-8", "replace").strip().splitlines()[-1:]
                _fail_all(pending, results, f"the worker ended ({_ended(code)}) {' '.join(tail)}")
            return
        event = json.loads(line)
        kind = event["event"]
        if kind == "ready":
            state, deadline = "loading", time.monotonic() + max(timeout, LOAD_S)
        elif kind == "load_error":
            _fail_all(pending, results, f"could not load the file: {event['message']}")
        elif kind == "loaded":
            state = "loaded"
        elif kind == "start":
            current, deadline = event["exercise"], time.monotonic() + timeout
        elif kind == "result":
            message = event["message"]
            if message.startswith("ran out of memory") or "can't allocate memory" in message:
                peak = event.get("peak_mb")
                held = f"; it held {peak} MB at most" if peak is not None else ""
                message = f"ran out of memory (the limit is {memory_mb} MB{held}): {message}"
            results[current] = Result(current, event["status"], message)
            pending.remove(current)
            current, deadline = None, time.monotonic() + timeout


def _fail_all(pending, results, why):
    for exercise in list(pending):
        results[exercise] = Result(exercise, FAILED, why)
    pending.clear()


# -------------------------------------------------------------------------------------------------
# A class

def student_name(submission: str, taken: set) -> str:
    name = submission if submission == "reference" else Path(submission).stem
    if name in taken:
        name = f"{Path(submission).parent.name}/{name}"
    taken.add(name)
    return name


def grade(submissions, exercises=None, hidden=None, timeout: float = 60, memory_mb: int = 4096,
          jobs: int = 1, progress=None) -> list:
    """[(student, {exercise id: Result with status passed/failed/not attempted/forbidden}, points)],
    in the order given; `jobs` submissions are graded at a time."""
    if hidden:
        load_hidden(hidden)  # an instructor's mistake shows here, not as every student failing
    taken = set()
    names = [student_name(s, taken) for s in submissions]

    def one(name, submission):
        if progress:
            progress(f"grading {name} ...")
        flagged = {} if submission == "reference" else forbidden(submission)
        results = run_submission(submission, exercises, hidden, timeout, memory_mb)
        for exercise, reason in flagged.items():
            if exercise in results and results[exercise].status != NOT_ATTEMPTED:
                checked = results[exercise].status
                results[exercise] = Result(exercise, FORBIDDEN, f"{reason} (its check: {checked})")
        return name, results, sum(r.status == PASSED for r in results.values())

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:  # each submission is its own process
        return list(pool.map(one, names, submissions))


SYMBOL = {PASSED: "1", FAILED: "0", NOT_ATTEMPTED: "-", FORBIDDEN: "F"}


def table(rows, exercises=None) -> str:
    """Students by exercises (1 passed, 0 failed, - not attempted, F forbidden), points, then why."""
    ids = [e.id for e in select(exercises)]
    width = max([len("student")] + [len(name) for name, _, _ in rows])
    lines = [f"{'student':{width}s}  " + " ".join(ids) + "  points"]
    for name, results, points in rows:
        cells = " ".join(f"{SYMBOL[results[e].status]:>3s}" for e in ids)
        lines.append(f"{name:{width}s}  {cells}  {points:>2d}/{len(ids)}")
    lines.append("1 passed, 0 failed, - not attempted, F forbidden (scores 0)")
    notes = [f"  {name} {e}: {results[e].status}: {results[e].message}"
             for name, results, _ in rows for e in ids if results[e].status in (FAILED, FORBIDDEN)]
    if notes:
        lines += ["why:"] + notes
    return "\n".join(lines)


def write_csv(rows, path, exercises=None) -> None:
    """One row per student: points per exercise, the total, and the reasons for each 0."""
    ids = [e.id for e in select(exercises)]
    with open(path, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["student"] + ids + ["points", "notes"])
        for name, results, points in rows:
            notes = "; ".join(f"{e} {results[e].status}: {results[e].message}" for e in ids
                              if results[e].status in (FAILED, FORBIDDEN))
            out.writerow([name] + [int(results[e].status == PASSED) for e in ids] + [points, notes])
