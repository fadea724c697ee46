"""Encoding a corpus: a text file of any length in, one `.npy` of embeddings out, in input order.

`LLM2Vec.encode` takes a list and returns an array; a retrieval corpus of millions of lines fits
neither. Here the file is read lazily and cut into chunks of `chunk_size` lines. Each chunk is
encoded on its own (`encode` sorts its texts by length, so its batches stay dense) and written
straight into its rows of a memory-mapped `.npy`:

    OUT.npy.partial               (N, hidden) float32; rows [c * C, (c + 1) * C) <- encode(chunk c)
    OUT.npy.progress.<rank>.json  chunk c is recorded done only after its rows are flushed to disk
                                  (as runs of chunk ids, [[start, stop), ...]: a record stays small)
    every chunk done          ->  OUT.npy.partial renamed to OUT.npy, the records removed

Memory: one chunk of texts and embeddings at a time, plus a byte offset and a digest per chunk. Each
chunk's rows are mapped, written, flushed and unmapped, so neither the texts nor the embeddings of
the whole corpus are ever held (mapped pages that stay mapped would count as the process's memory).

Resume: the same call continues an interrupted run (Ctrl-C, a kill, a power cut); the chunks the
records name are not encoded again. A record carries the run's identity: the input (size, sha256,
format), the model (a digest of its weights and tokenizer), the settings (pooling, lengths,
instruction, normalisation) and the chunk size. A run that differs in any of them is refused, never
mixed in; `overwrite=True` starts over. Records are written to a temporary file and renamed into
place, and the output is named `.partial` until the last chunk is done, so a half-written output is
never taken for a finished one.

Several processes (`torchrun --nproc_per_node=N -m llm2vec_mini encode ...`): every process reads
the records, takes an N-th of the chunks not yet done (a contiguous block, so that its record stays a
few runs of ids) and writes their rows into the same file; rank 0 creates the file before, and
renames it after, each behind a barrier. Each process keeps a record of its own
(`.progress.<rank>.json`), so no file has two writers; at the start of a run rank 0 merges the
records into its own, whatever the number of processes that wrote them. The processes must share one
file system that maps files coherently (one machine).

Input formats: "lines" (one text per line, stripped of surrounding white space; an empty line is an
empty text) and "jsonl" (one JSON object per line with a "text" string and an optional
"instruction" string, which replaces the default instruction, even when empty; other keys are
ignored). "auto" reads a `.jsonl` file as JSON lines and anything else as lines. Lines end at "\\n"
only (a trailing "\\r" is dropped); a byte-order mark before the first line is dropped.

References:
1) numpy's `.npy` format and `open_memmap`, https://numpy.org/doc/stable/reference/generated/numpy.lib.format.html
2) JSON Lines, https://jsonlines.org/
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple, Union

import numpy as np
import torch
from numpy.lib.format import open_memmap
from tqdm.auto import tqdm

from .distributed import barrier, world
from .encoder import LLM2Vec
from .errors import ConfigError, DataError
from .util import PathLike, is_int, parse_json, read_json

FORMATS = ("auto", "lines", "jsonl")
RECORD_VERSION = 1
SAMPLES_PER_TENSOR = 4096  # evenly spaced values of each weight tensor go into the model's digest
_BOM = b"\xef\xbb\xbf"


# --------------------------------------------------------------------------- the input, read lazily

@dataclass
class Corpus:
    """A text file cut into chunks: where each starts, found by one streaming pass that keeps no text."""

    path: Path
    format: str  # "lines" or "jsonl"
    chunk_size: int
    n_texts: int
    n_bytes: int
    sha256: str  # of the whole file
    offsets: List[int]  # the byte at which chunk c starts
    digests: List[str]  # sha256 of chunk c's bytes: a file that changes during the run is caught

    @property
    def n_chunks(self) -> int:
        return len(self.offsets)

    def rows(self, c: int) -> Tuple[int, int]:
        """Chunk c's rows [start, stop) in the output, which are its line numbers minus one."""
        return c * self.chunk_size, min((c + 1) * self.chunk_size, self.n_texts)

    def size(self, c: int) -> int:
        """Chunk c's number of texts."""
        start, stop = self.rows(c)
        return stop - start


def _line_bytes(raw: bytes, lineno: int) -> bytes:
    """A line as read (with its "\\n") -> its content: no newline, no "\\r" before it, no BOM on line 1."""
    if lineno == 1:
        raw = raw.removeprefix(_BOM)
    raw = raw.removesuffix(b"\n")
    return raw.removesuffix(b"\r")


def parse_line(raw: bytes, format: str, where: str) -> Tuple[Optional[str], str]:
    """One line's content -> (its own instruction or None, its text); a DataError naming `where`."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text (byte {e.start} of the line)", where) from None
    if format == "lines":
        return None, line.strip()
    if not line.strip():
        raise DataError('an empty line; expected a JSON object with a "text" string', where)
    value = parse_json(line, where, DataError, what="valid JSON")
    if not isinstance(value, dict):
        raise DataError(f'expected a JSON object with a "text" string, got {type(value).__name__}', where)
    if "text" not in value:
        raise DataError('the object has no "text" field', where)
    for name in ("text", "instruction"):
        if name in value and not isinstance(value[name], str):
            raise DataError(f'"{name}" must be a string, got {type(value[name]).__name__}', where)
        try:
            value.get(name, "").encode("utf-8")
        except UnicodeEncodeError:  # "\ud800" is valid JSON but not text
            raise DataError(f'"{name}" holds a lone surrogate (not a character)', where) from None
    return value.get("instruction"), value["text"]


def scan_corpus(path: PathLike, format: str = "auto", chunk_size: int = 1024) -> Corpus:
    """One streaming pass over the file: count and check every line, note where each chunk starts,
    hash the content. A malformed line is a DataError naming the file and the line, before any
    encoding starts."""
    path = Path(path)
    if format not in FORMATS:
        raise ConfigError(f"format: unknown {format!r}; choose from {', '.join(FORMATS)}")
    if not is_int(chunk_size) or chunk_size < 1:
        raise ConfigError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if format == "auto":
        format = "jsonl" if path.suffix.lower() == ".jsonl" else "lines"
    whole, chunk = hashlib.sha256(), None
    offsets, digests, n, pos = [], [], 0, 0
    try:
        with open(path, "rb") as f:
            for raw in f:  # binary mode splits at b"\n" only
                if n % chunk_size == 0:
                    if chunk is not None:
                        digests.append(chunk.hexdigest())
                    offsets.append(pos)
                    chunk = hashlib.sha256()
                n += 1
                whole.update(raw)
                chunk.update(raw)
                pos += len(raw)
                parse_line(_line_bytes(raw, n), format, f"{path}, line {n}")
    except FileNotFoundError:
        raise DataError("file not found", path) from None
    except IsADirectoryError:
        raise DataError("a folder, not a text file", path) from None
    except OSError as e:
        raise DataError(f"cannot read ({e.strerror})", path) from None
    if n == 0:
        raise DataError("the file is empty: no text to encode", path)
    digests.append(chunk.hexdigest())
    return Corpus(path, format, chunk_size, n, pos, whole.hexdigest(), offsets, digests)


def read_chunk(corpus: Corpus, c: int, instruction: str = "") -> List[Union[str, List[str]]]:
    """Chunk c's texts, as `LLM2Vec.encode` takes them: a string, or an [instruction, text] pair."""
    start, stop = corpus.rows(c)
    digest, items = hashlib.sha256(), []
    with open(corpus.path, "rb") as f:
        f.seek(corpus.offsets[c])
        for lineno in range(start + 1, stop + 1):
            raw = f.readline()
            digest.update(raw)
            own, text = parse_line(_line_bytes(raw, lineno), corpus.format, f"{corpus.path}, line {lineno}")
            instr = instruction if own is None else own
            items.append([instr, text] if instr else text)
    if digest.hexdigest() != corpus.digests[c]:
        raise DataError(f"lines {start + 1}-{stop} changed while the corpus was being encoded", corpus.path)
    return items


# --------------------------------------------------------------------------- what a run is

def model_digest(encoder: LLM2Vec) -> dict:
    """The model's identity: sha256 of its config, of every weight's name, shape, dtype and
    SAMPLES_PER_TENSOR evenly spaced values (an adapter merge or a fine-tune moves them all), and of
    the tokenizer. Device-independent, and cheap for any model size."""
    weights = hashlib.sha256(repr(asdict(encoder.model.config)).encode())
    for name, p in encoder.model.named_parameters():
        flat = p.detach().reshape(-1)  # (numel,)
        k = min(flat.numel(), SAMPLES_PER_TENSOR)
        picks = torch.arange(k, dtype=torch.long) * flat.numel() // max(k, 1)  # (k,)
        weights.update(f"{name} {tuple(p.shape)} {p.dtype}".encode())
        weights.update(flat[picks.to(flat.device)].float().cpu().numpy().tobytes())
    tok = encoder.tokenizer
    tokenizer = hashlib.sha256(tok.tokenizer.to_str().encode())
    tokenizer.update(repr((tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos, tok.add_eos)).encode())
    return {"weights": weights.hexdigest(), "tokenizer": tokenizer.hexdigest(),
            "hidden_size": encoder.hidden_size}


def run_identity(corpus: Corpus, encoder: LLM2Vec, instruction: str, normalize: bool) -> dict:
    """Everything that decides the output's values; a record of another identity is not resumed."""
    return {"input": {"bytes": corpus.n_bytes, "sha256": corpus.sha256, "texts": corpus.n_texts,
                      "format": corpus.format},
            "model": model_digest(encoder),
            "settings": {**encoder.settings(), "instruction": instruction, "normalize": bool(normalize)},
            "chunk_size": corpus.chunk_size}


# --------------------------------------------------------------------------- progress records

def _record_path(output: Path, rank: int) -> Path:
    return output.with_name(f"{output.name}.progress.{rank}.json")


def _record_paths(output: Path, suffix: str = ".json") -> List[Path]:
    """Every process's record beside `output` (OUT.npy.progress.<rank>.json), or with suffix
    ".json.tmp" the temporary files a killed process may have left."""
    prefix = f"{output.name}.progress."
    if not output.parent.is_dir():
        return []
    return sorted(p for p in output.parent.iterdir()
                  if p.name.startswith(prefix) and p.name.endswith(suffix)
                  and p.name[len(prefix):-len(suffix)].isdigit())


def _runs(ids) -> List[List[int]]:
    """Chunk ids -> runs of consecutive ids, [[start, stop), ...] (what a record holds)."""
    runs = []
    for c in sorted(ids):
        _add(runs, c)
    return runs


def _add(runs: List[List[int]], c: int) -> None:
    """Record chunk c: extend the last run when c follows it, else start a new one."""
    if runs and runs[-1][1] == c:
        runs[-1][1] = c + 1
    else:
        runs.append([c, c + 1])


def _read_record(path: Path) -> dict:
    """A record, checked, with its runs expanded into the set of chunk ids `record["chunks"]`."""
    record = read_json(path, error=ConfigError, expect=dict)
    done = record.get("done")
    if (record.get("version") != RECORD_VERSION or not isinstance(record.get("run"), dict)
            or not isinstance(done, list)
            or not all(isinstance(r, list) and len(r) == 2 and all(is_int(x) for x in r) and 0 <= r[0] < r[1]
                       for r in done)):
        raise ConfigError("not a progress record of this version; pass --overwrite to start over", path)
    record["chunks"] = {c for start, stop in done for c in range(start, stop)}
    return record


def _fsync_dir(folder: Path) -> None:
    """Make a new or renamed file in `folder` survive a power cut (POSIX; skipped where a folder
    cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_record(path: Path, identity: dict, runs: List[List[int]], source: Path) -> None:
    """Atomically: a temporary file, flushed to disk, then renamed over the old record."""
    tmp = path.with_name(path.name + ".tmp")
    record = {"version": RECORD_VERSION, "run": identity, "input_path": str(source), "done": runs}
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _earlier_chunks(output: Path, partial: Path, identity: dict, n_chunks: int, shape) -> set:
    """The chunks an earlier run of the same identity finished (read only: every process calls it)."""
    if output.exists():
        raise ConfigError("exists already (a finished output); pass --overwrite to encode again", output)
    paths = _record_paths(output)
    if not paths or not partial.is_file():
        return set()  # nothing finished, or nothing left to resume into: start over
    done = set()
    for path in paths:
        record = _read_record(path)
        if not record["chunks"]:
            continue
        differ = [k for k in identity if record["run"].get(k) != identity[k]]
        if differ:
            raise ConfigError(f"holds an unfinished run that differs from this one in its "
                              f"{' and '.join(differ)} (it read {record.get('input_path')}); rerun it as it "
                              f"was to continue, or pass --overwrite to start over", path)
        if max(record["chunks"]) >= n_chunks:
            raise ConfigError(f"names chunk {max(record['chunks'])} of {n_chunks}; pass --overwrite to "
                              f"start over", path)
        done.update(record["chunks"])
    try:
        rows = open_memmap(partial, mode="r")
    except (OSError, ValueError) as e:
        raise ConfigError(f"not a readable .npy file ({e}); pass --overwrite to start over",
                          partial) from None
    if rows.shape != shape or rows.dtype != np.float32:
        raise ConfigError(f"holds a {rows.dtype} array of shape {rows.shape}, expected float32 {shape}; "
                          f"pass --overwrite to start over", partial)
    del rows
    return done


def _prepare(output: Path, partial: Path, shape, done: set, identity: dict, source: Path) -> None:
    """Rank 0, before any chunk: a fresh zero-filled .partial, or the records merged into its own."""
    if not done:
        output.unlink(missing_ok=True)  # only there with overwrite (refused otherwise)
        for path in _record_paths(output) + _record_paths(output, ".json.tmp"):
            path.unlink()
        output.parent.mkdir(parents=True, exist_ok=True)
        rows = open_memmap(partial, mode="w+", dtype=np.float32, shape=shape)  # a sparse file: no pages
        del rows
        with open(partial, "rb+") as f:
            os.fsync(f.fileno())
        _fsync_dir(partial.parent)
        return
    mine = _record_path(output, 0)
    _write_record(mine, identity, _runs(done), source)  # first the union, then drop the parts
    for path in _record_paths(output):
        if path != mine:
            path.unlink()


def _finish(output: Path, partial: Path, n_chunks: int) -> None:
    """Rank 0, after every process: check that every chunk is recorded, then rename into place."""
    done = set()
    for path in _record_paths(output):
        done.update(_read_record(path)["chunks"])
    if len(done & set(range(n_chunks))) != n_chunks:
        raise ConfigError(f"{n_chunks - len(done)} chunks are not recorded done; run again to encode them",
                          partial)
    with open(partial, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(partial, output)  # now, and only now, the output exists
    _fsync_dir(output.parent)
    for path in _record_paths(output) + _record_paths(output, ".json.tmp"):
        path.unlink()


# --------------------------------------------------------------------------- the run

@dataclass
class CorpusRun:
    """What `encode_corpus` did, seen from one process."""

    output: Path  # the finished .npy
    shape: Tuple[int, int]  # (texts, hidden)
    n_chunks: int  # chunks in the corpus
    encoded: int  # chunks this process encoded in this call
    earlier: int  # chunks an earlier, interrupted run had finished


def encode_corpus(encoder: LLM2Vec, input: PathLike, output: PathLike, instruction: str = "",
                  format: str = "auto", batch_size: int = 32, chunk_size: int = 1024,
                  normalize: bool = False, overwrite: bool = False, progress: Optional[bool] = None,
                  on_chunk: Optional[Callable[[int], None]] = None) -> CorpusRun:
    """Embed every line of `input` into `output` (a .npy of (lines, hidden) float32, in input order).

    Resumes an interrupted run of the same input, model and settings; refuses one of another
    (ConfigError) unless `overwrite`, which also replaces a finished `output`. Under torchrun every
    process takes its share of the chunks. `progress`: a bar with texts/s and the time left (default:
    when stderr is a terminal; rank 0 only). `on_chunk(c)` is called after chunk c is recorded done.
    """
    rank, world_size = world()
    output = Path(output)
    if output.suffix != ".npy":
        raise ConfigError(f"the output must be a .npy file name, got {str(output)!r}")
    if output.is_dir():
        raise ConfigError("is a folder; expected a .npy file name", output)
    if not is_int(batch_size) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    corpus = scan_corpus(input, format, chunk_size)
    identity = run_identity(corpus, encoder, instruction, normalize)
    partial = output.with_name(output.name + ".partial")
    shape = (corpus.n_texts, encoder.hidden_size)

    # 1. every process reads the state alike, before anything changes it (an error stops them all)
    done = set() if overwrite else _earlier_chunks(output, partial, identity, corpus.n_chunks, shape)
    barrier()
    # 2. rank 0 makes the files ready
    if rank == 0:
        _prepare(output, partial, shape, done, identity, corpus.path)
    barrier()
    # 3. each process encodes its block of the chunks left and records them in its own record
    left = [c for c in range(corpus.n_chunks) if c not in done]
    todo = left[rank * len(left) // world_size:(rank + 1) * len(left) // world_size]
    mine = _runs(done) if rank == 0 else []  # rank 0's record holds the merged earlier ones
    bar = None
    if rank == 0 and (sys.stderr.isatty() if progress is None else progress):
        before = sum(corpus.size(c) for c in done) if world_size == 1 else 0
        bar = tqdm(total=before + sum(corpus.size(c) for c in todo), initial=before, unit="text",
                   smoothing=0.1, desc="encode" if world_size == 1 else f"encode (rank 0 of {world_size})")
    encoded = 0
    try:
        for c in todo:
            start, stop = corpus.rows(c)
            emb = encoder.encode(read_chunk(corpus, c, instruction), batch_size=batch_size,
                                 normalize=normalize, show_progress_bar=False,
                                 on_batch=None if bar is None else bar.update)  # (stop - start, hidden)
            rows = open_memmap(partial, mode="r+")  # maps the file; only the pages written get loaded
            rows[start:stop] = emb
            rows.flush()  # on disk before the record says so
            del rows  # unmapped: the written pages leave this process's memory
            _add(mine, c)
            encoded += 1
            _write_record(_record_path(output, rank), identity, mine, corpus.path)
            if on_chunk is not None:
                on_chunk(c)
    except KeyboardInterrupt:
        if rank == 0:
            print(f"\n{len(done) + encoded} of {corpus.n_chunks} chunks are saved in {partial}; "
                  f"the same command continues from there", file=sys.stderr)
        raise
    finally:
        if bar is not None:
            bar.close()
    # 4. rank 0 renames the output into place once every process is done
    barrier()
    if rank == 0:
        _finish(output, partial, corpus.n_chunks)
    barrier()
    return CorpusRun(output, shape, corpus.n_chunks, encoded, len(done))
