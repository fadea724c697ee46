"""Runs the fuzz cases of tests/test_fuzz.py in a child process, under an address-space limit.

    python tests/fuzz_worker.py CASES.json BUDGET_BYTES SECONDS_PER_CASE

CASES.json is a list of cases, each {"id", "target", "path", "names", ...}. For each case the worker
prints {"start": id} before it runs it and {"end": id, "outcome": ...} after, one JSON line each and
flushed, so that the parent knows which case was running if the process dies (an abort inside Rust,
the memory limit) or stops answering (a hang). Outcomes:

    ok        the file loaded, and what was read is right (models encode, see `TARGETS`)
    error     one of our typed errors, naming the file (one of the case's `names`)
    unnamed   one of our typed errors that does not name the file
    wrong     it loaded, but what was read is wrong (e.g. differs from the safetensors library's)
    timeout   the case ran past SECONDS_PER_CASE (in Python code; a hang in C is the parent's to see)
    crash     any other exception: an untyped error, MemoryError, a panic, ... (with its traceback)
"""

import contextlib
import io
import json
import resource
import signal
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from llm2vec_mini import LlamaConfig, LlamaForCausalLM
from llm2vec_mini.cli import main as cli_main
from llm2vec_mini.convert.gguf import load_gguf_tokenizer
from llm2vec_mini.convert.hf_tokenizer import load_hf_tokenizer
from llm2vec_mini.convert.safetensors import load_file
from llm2vec_mini.convert.torch_bin import load_torch_bin
from llm2vec_mini.data import load_sts, read_conllu, read_lines
from llm2vec_mini.encoder import LLM2Vec
from llm2vec_mini.errors import Llm2VecMiniError
from llm2vec_mini.lora import add_lora
from llm2vec_mini.simcse import SimCSETask
from llm2vec_mini.train import TrainConfig, train

TEXTS = ["A man is playing a guitar.", ["Retrieve similar text:", "the cat sat"], "", "é ü ✓ 漢字 🙂"]


class CaseTimeout(BaseException):
    """Raised by the alarm inside a case that runs too long (a BaseException: no `except Exception`
    in the code under test can swallow it)."""


def _alarm(signum, frame):
    raise CaseTimeout()


def encode_model(case):
    """A model folder or .gguf (with adapters): loads, and encodes every kind of input to (N, hidden)."""
    enc = LLM2Vec.from_pretrained(case["path"], adapters=case.get("adapters", []), device="cpu")
    out = enc.encode(TEXTS, batch_size=3)
    if not (isinstance(out, np.ndarray) and out.dtype == np.float32
            and out.shape == (len(TEXTS), enc.hidden_size)):
        return f"encode returned {type(out).__name__} {getattr(out, 'shape', '')} {getattr(out, 'dtype', '')}"


def cli_encode(case):
    """`python -m llm2vec_mini encode` on the model: exit status 0 and the embeddings written, or 2 and
    one line naming the file (a traceback is a crash)."""
    out, err = Path(case["work"]) / "emb.npy", io.StringIO()
    texts = Path(case["work"]) / "texts.txt"
    texts.write_text("A man is playing a guitar.\nthe cat sat\n\n", encoding="utf-8")
    args = ["encode", "--model", case["path"], "--input", str(texts), "--output", str(out), "--device", "cpu"]
    with contextlib.redirect_stderr(err):
        status = cli_main(args + [a for adapter in case.get("adapters", []) for a in ("--adapter", adapter)])
    if status == 2:
        raise CliError(err.getvalue().strip())
    if status != 0 or np.load(out).shape[0] != 3:
        return f"exit status {status}, stderr {err.getvalue()[-300:]!r}"


class CliError(Llm2VecMiniError):
    """What the command line printed for a bad input (exit status 2), checked like our errors."""


def resume_model_and_task():
    """The tiny LoRA model and SimCSE task that the resume seed was trained with (the same each time)."""
    torch.manual_seed(0)
    model = add_lora(LlamaForCausalLM(LlamaConfig.tiny()).set_causal(False), r=2, alpha=4.0, dropout=0.0)
    gen = torch.Generator().manual_seed(1)
    sentences = [torch.randint(3, 256, (5,), generator=gen).tolist() for _ in range(8)]
    return model, SimCSETask(model, sentences, pad_id=2)


RESUME = dict(steps=2, batch_size=2, lr=1e-2, progress=False, checkpoint_every=1)


def resume(case):
    """Training resumed from a checkpoint (trainer_state.json, optimizer.pt, the adapter) to the end."""
    _, task = resume_model_and_task()
    out = train(task, TrainConfig(**RESUME), case["path"], resume=True)
    if not (Path(out) / "adapter_model.safetensors").is_file():
        return "no adapter written"


def tokenize(case):
    """A tokenizer folder or .gguf: encodes and decodes; every id is below its vocabulary size."""
    path = case["path"]
    tok = load_gguf_tokenizer(path) if path.endswith(".gguf") else load_hf_tokenizer(path)
    for ids in tok.encode_batch([t if isinstance(t, str) else " ".join(t) for t in TEXTS]):
        if not all(0 <= i < tok.vocab_size for i in ids):
            return f"ids {ids} outside the vocabulary of {tok.vocab_size}"
        tok.decode(ids)


def safetensors_file(case):
    """Our reader against the safetensors library: both refuse the file, or both read the same tensors.
    The one refusal that is ours alone, on purpose, is a key written twice (the library keeps one).
    Without the library (a student's runtime-only venv) ours must still read or refuse cleanly."""
    try:
        from safetensors.torch import load_file as reference
    except ModuleNotFoundError:
        load_file(case["path"])
        return None
    try:
        theirs = reference(case["path"])
    except Exception as e:
        theirs = e
    try:
        ours = load_file(case["path"])
    except Llm2VecMiniError as e:
        if isinstance(theirs, dict) and "duplicate key" not in str(e):
            return f"we refuse a file the safetensors library reads ({e})"
        raise
    if not isinstance(theirs, dict):
        return f"we read a file the safetensors library refuses ({theirs})"
    if set(ours) != set(theirs):
        return f"tensor names differ: {sorted(set(ours) ^ set(theirs))[:3]}"
    for name, tensor in ours.items():
        if tensor.dtype != theirs[name].dtype or tensor.shape != theirs[name].shape or \
                not torch.equal(tensor.view(torch.uint8) if tensor.numel() else tensor,
                                theirs[name].view(torch.uint8) if tensor.numel() else theirs[name]):
            return f"tensor {name!r} differs from the safetensors library's"


def torch_bin(case):
    load_torch_bin(case["path"])


def sts(case):
    for subset in load_sts(case["path"]):
        if not (len(subset.sentences1) == len(subset.sentences2) == len(subset.scores) > 0):
            return f"subset {subset.name}: ragged or empty"
        if not all(np.isfinite(subset.scores)):
            return f"subset {subset.name}: a score that is not finite"


def conllu(case):
    for words, tags in read_conllu(case["path"]):
        if len(words) != len(tags) or not words or not all(tags):
            return "a sentence with words and tags of different lengths, no words, or an empty tag"


def lines(case):
    if not all(isinstance(line, str) and line.strip() for line in read_lines(case["path"])):
        return "an empty line was kept"


TARGETS = {"model": encode_model, "cli": cli_encode, "tokenizer": tokenize, "safetensors": safetensors_file,
           "bin": torch_bin, "sts": sts, "conllu": conllu, "lines": lines, "resume": resume}


def run(case, seconds: float) -> dict:
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        problem = TARGETS[case["target"]](case)
        signal.setitimer(signal.ITIMER_REAL, 0)
        return {"outcome": "wrong", "detail": problem} if problem else {"outcome": "ok"}
    except Llm2VecMiniError as e:
        signal.setitimer(signal.ITIMER_REAL, 0)
        named = any(name in str(e) for name in case["names"])
        return {"outcome": "error" if named else "unnamed", "detail": f"{type(e).__name__}: {e}"[:500]}
    except CaseTimeout:
        return {"outcome": "timeout", "detail": f"over {seconds} s"}
    except BaseException as e:  # a panic is a BaseException too; KeyboardInterrupt stops the parent
        signal.setitimer(signal.ITIMER_REAL, 0)
        if isinstance(e, KeyboardInterrupt):
            raise
        return {"outcome": "crash", "detail": traceback.format_exc()[-3000:]}


def main(cases_file: str, budget: int, seconds: float) -> None:
    with open(cases_file) as f:
        cases = json.load(f)
    torch.set_num_threads(1)
    signal.signal(signal.SIGALRM, _alarm)
    # The limit counts from what the imports already mapped: `budget` more bytes of address space, so a
    # file that makes us allocate far more than it holds fails here (MemoryError, or a failed allocation
    # in C) instead of filling the machine.
    with open("/proc/self/status") as f:
        mapped = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (mapped + budget, resource.RLIM_INFINITY))
    protocol, sys.stdout = sys.stdout, sys.stderr  # what the code under test prints goes to stderr
    for case in cases:
        print(json.dumps({"start": case["id"]}), file=protocol, flush=True)
        start = time.perf_counter()
        outcome = run(case, seconds)
        outcome["seconds"] = round(time.perf_counter() - start, 3)
        print(json.dumps({"end": case["id"], **outcome}), file=protocol, flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
