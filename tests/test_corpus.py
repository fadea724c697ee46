"""Encoding a corpus (corpus.py): streamed output equals `LLM2Vec.encode` of the same texts, an
interrupted or killed run resumes to the identical file, a changed run is refused, two torchrun
processes write what one does, and a malformed line is an error that names it.

The reference for every output is `LLM2Vec.encode` on a list of texts written out in the test,
never the corpus reader's own parse.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from llm2vec_mini.cli import main
from llm2vec_mini.corpus import encode_corpus, scan_corpus
from llm2vec_mini.encoder import LLM2Vec
from llm2vec_mini.errors import ConfigError, DataError

HERE = Path(__file__).resolve().parent
SENTENCES = ["A man is playing a guitar.", "A man plays the guitar.", "A dog runs in a field.",
             "The stock market fell today.", "A woman is cutting an onion.", "Someone chops an onion.",
             "It rained.", "Three children built a tall sandcastle on the beach near the old pier.",
             "", "Prices rose sharply in the last quarter, analysts said on Monday."]
TEXTS = [(f"{s} ({i})" if i % 3 else s).strip() for i, s in enumerate(SENTENCES * 2)]  # 20, one empty
CHUNK = 3  # 7 chunks for 20 texts


@pytest.fixture(scope="module")
def encoder(tiny_llama_dir):
    return LLM2Vec.from_pretrained(tiny_llama_dir, device="cpu")


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    return path


def chunks_counted(run):
    """Calls `run(on_chunk)`, returns the chunk ids it encoded."""
    seen = []
    run(seen.append)
    return seen


def recorded_chunks(record: Path) -> int:
    """How many chunks a progress record names (it holds runs of ids, [[start, stop), ...])."""
    return sum(stop - start for start, stop in json.loads(record.read_text())["done"])


def run_group(cmd, env, timeout=300):
    """(exit status, stdout, stderr) of a command in its own process group; on a time-out the whole
    group is killed (torchrun's workers too)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{' '.join(cmd)} timed out after {timeout} s")
    return proc.returncode, out, err


class Stop(Exception):
    pass


def stop_after(n):
    """An on_chunk hook that raises once n chunks are recorded: an interruption at a chunk boundary."""
    seen = []

    def hook(c):
        seen.append(c)
        if len(seen) == n:
            raise Stop
    return hook


# ------------------------------------------------------------------------------- streaming

@pytest.mark.parametrize("chunk_size", [len(TEXTS), CHUNK])
def test_streaming_output_equals_encode_of_the_same_texts(encoder, tmp_path, chunk_size, monkeypatch,
                                                          capsys):
    path = tmp_path / "texts.txt"  # a BOM, CRLF line ends and spaces around texts: all dropped
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(f"  {t} " for t in TEXTS).encode("utf-8") + b"\r\n")
    seen = []
    real = encoder.encode
    monkeypatch.setattr(encoder, "encode", lambda s, **kw: (seen.append(len(s)), real(s, **kw))[1])
    run = encode_corpus(encoder, path, tmp_path / "emb.npy", batch_size=4, chunk_size=chunk_size,
                        progress=True)
    monkeypatch.undo()
    assert "20/20" in capsys.readouterr().err  # the bar counted every text
    got = np.load(tmp_path / "emb.npy")
    expected = encoder.encode(TEXTS, batch_size=4)
    assert got.shape == expected.shape == (20, 64) and run.shape == (20, 64)
    assert max(seen) <= chunk_size and sum(seen) == 20  # never more than one chunk at a time
    if chunk_size == len(TEXTS):  # one chunk: the same batches, so the same numbers
        np.testing.assert_array_equal(got, expected)
    else:  # other batches: other padding, the same values up to float rounding
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
        assert run.n_chunks == 7 and run.encoded == 7 and run.earlier == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.npy", "texts.txt"]  # no leftovers


def test_json_lines_with_instructions_equal_encode_of_pairs(encoder, tmp_path):
    rows = [{"text": TEXTS[0], "instruction": "Retrieve a similar sentence:"},
            {"text": TEXTS[1], "id": 7},  # no instruction of its own: the default; other keys ignored
            {"instruction": "", "text": TEXTS[2]},  # an explicit empty one replaces the default
            {"text": TEXTS[3], "instruction": "Find the topic:"}, {"text": "  spaced  "}]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    encode_corpus(encoder, path, tmp_path / "emb.npy", instruction="Default:", chunk_size=2)
    expected = encoder.encode([["Retrieve a similar sentence:", TEXTS[0]], ["Default:", TEXTS[1]], TEXTS[2],
                               ["Find the topic:", TEXTS[3]], ["Default:", "  spaced  "]])
    np.testing.assert_allclose(np.load(tmp_path / "emb.npy"), expected, rtol=1e-5, atol=1e-5)
    # the same file read as plain lines: each JSON line is the text
    encode_corpus(encoder, path, tmp_path / "raw.npy", format="lines", chunk_size=5)
    np.testing.assert_array_equal(np.load(tmp_path / "raw.npy"),
                                  encoder.encode([json.dumps(r) for r in rows]))


BAD_LINES = [
    ('{"text": "fine"}\n{"text": "ok"}\n{"text": "unclosed\n', "jsonl", "not valid JSON"),
    ('{"text": "fine"}\n{"text": "ok"}\n{"instruction": "no text"}\n', "jsonl", 'no "text" field'),
    ('{"text": "fine"}\n{"text": "ok"}\n{"text": 5}\n', "jsonl", '"text" must be a string, got int'),
    ('{"text": "fine"}\n{"text": "ok"}\n{"text": "a", "instruction": null}\n', "jsonl",
     '"instruction" must be a string'),
    ('{"text": "fine"}\n{"text": "ok"}\n["a list"]\n', "jsonl", "expected a JSON object"),
    ('{"text": "fine"}\n{"text": "ok"}\n\n{"text": "after"}\n', "jsonl", "an empty line"),
    ('{"text": "fine"}\n{"text": "ok"}\n{"text": "\\ud800"}\n', "jsonl", "lone surrogate"),
    ('{"text": "fine"}\n{"text": "ok"}\n' + "[" * 100000 + "\n", "jsonl", "nested deeper than"),
    (b"fine\nok\n\xff\xfe broken\n", "lines", "not UTF-8"),
]


@pytest.mark.parametrize("content, format, match", BAD_LINES, ids=[m for _, _, m in BAD_LINES])
def test_a_malformed_line_is_an_error_naming_its_line(encoder, tmp_path, content, format, match):
    path = tmp_path / "bad.txt"
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    with pytest.raises(DataError, match=rf"bad\.txt, line 3: .*{match}"):
        encode_corpus(encoder, path, tmp_path / "emb.npy", format=format)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.txt"]  # refused before any output


def test_the_cli_names_the_bad_line_and_refuses_bad_arguments(tiny_llama_dir, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"  # .jsonl: read as JSON lines without --format
    path.write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    cli = ["encode", "--model", str(tiny_llama_dir), "--device", "cpu", "--input", str(path)]
    assert main(cli + ["--output", str(tmp_path / "emb.npy")]) == 2
    assert 'bad.jsonl, line 2: the object has no "text" field' in capsys.readouterr().err
    path.write_text('{"text": "fine"}\n')
    (tmp_path / "folder.npy").mkdir()
    for output, match in [(tmp_path / "emb", "must be a .npy file name"),
                          (tmp_path / "folder.npy", "a folder, where a file is expected")]:
        assert main(cli + ["--output", str(output)]) == 2
        assert match in capsys.readouterr().err
    assert main(cli + ["--output", str(tmp_path / "e.npy"), "--chunk-size", "0"]) == 2
    assert "chunk_size must be a positive integer" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("")
    assert main(cli[:-1] + [str(tmp_path / "empty.txt"), "--output", str(tmp_path / "e.npy")]) == 2
    assert "empty.txt: the file is empty" in capsys.readouterr().err


def test_chunks_start_where_the_scan_says(tmp_path):
    """The chunk offsets and counts, against the file's bytes."""
    path = tmp_path / "t.txt"
    path.write_bytes(b"a\nbb\n\nccc\r\ndddd")  # no newline after the last line
    corpus = scan_corpus(path, chunk_size=2)
    assert (corpus.n_texts, corpus.n_chunks, corpus.format) == (5, 3, "lines")
    assert corpus.offsets == [0, 5, 11] and corpus.n_bytes == 15
    assert [corpus.rows(c) for c in range(3)] == [(0, 2), (2, 4), (4, 5)]


# ------------------------------------------------------------------------------- resume

def test_an_interrupted_run_resumes_to_the_identical_file(encoder, corpus, tmp_path, capsys):
    full = tmp_path / "full.npy"
    assert len(chunks_counted(lambda hook: encode_corpus(encoder, corpus, full, chunk_size=CHUNK,
                                                         on_chunk=hook))) == 7
    out = tmp_path / "out.npy"
    with pytest.raises(Stop):
        encode_corpus(encoder, corpus, out, chunk_size=CHUNK, on_chunk=stop_after(3))
    # a partly written output is never the output
    assert not out.exists() and (tmp_path / "out.npy.partial").is_file()
    record = json.loads((tmp_path / "out.npy.progress.0.json").read_text())
    assert record["done"] == [[0, 3]] and record["run"]["chunk_size"] == CHUNK  # chunks 0, 1, 2
    runs = []
    encoded = chunks_counted(lambda hook: runs.append(encode_corpus(encoder, corpus, out, chunk_size=CHUNK,
                                                                    on_chunk=hook)))
    assert encoded == [3, 4, 5, 6] and (runs[0].encoded, runs[0].earlier) == (4, 3)
    assert out.read_bytes() == full.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full.npy", "out.npy", "texts.txt"]


def test_ctrl_c_says_how_to_continue(encoder, corpus, tmp_path, capsys):
    def interrupt(c):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        encode_corpus(encoder, corpus, tmp_path / "out.npy", chunk_size=CHUNK, on_chunk=interrupt)
    assert "1 of 7 chunks are saved in" in capsys.readouterr().err


def test_a_killed_process_resumes_to_the_identical_file(tiny_llama_dir, encoder, corpus, tmp_path):
    """SIGKILL at a moment the test does not choose (after at least two chunks), then the same call."""
    full = tmp_path / "full.npy"
    encode_corpus(encoder, corpus, full, chunk_size=CHUNK, batch_size=2)
    out, record = tmp_path / "out.npy", tmp_path / "out.npy.progress.0.json"
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    proc = subprocess.Popen([sys.executable, str(HERE / "corpus_worker.py"), str(tiny_llama_dir), str(corpus),
                             str(out), str(CHUNK), str(torch.get_num_threads()), "0.3"], env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (record.exists() and recorded_chunks(record) >= 2):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the worker recorded no 2 chunks in 120 s"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    recorded = recorded_chunks(record)
    assert 2 <= recorded < 7 and not out.exists()
    encoded = chunks_counted(lambda hook: encode_corpus(encoder, corpus, out, chunk_size=CHUNK, batch_size=2,
                                                        on_chunk=hook))
    assert len(encoded) == 7 - recorded
    assert out.read_bytes() == full.read_bytes()


def test_a_changed_input_model_or_setting_is_refused_not_mixed_in(tiny_llama_dir, encoder, corpus, tmp_path):
    out = tmp_path / "out.npy"
    with pytest.raises(Stop):
        encode_corpus(encoder, corpus, out, chunk_size=CHUNK, on_chunk=stop_after(2))
    partial = (tmp_path / "out.npy.partial").read_bytes()
    changed = tmp_path / "changed.txt"  # one character of the last line
    changed.write_text("\n".join(TEXTS[:-1] + [TEXTS[-1] + "!"]) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"progress\.0\.json: holds an unfinished run that differs from "
                                          r"this one in its input "):
        encode_corpus(encoder, changed, out, chunk_size=CHUNK)
    with pytest.raises(ConfigError, match="differs from this one in its settings "):
        encode_corpus(encoder, corpus, out, chunk_size=CHUNK, normalize=True)
    with pytest.raises(ConfigError, match="differs from this one in its settings "):
        encode_corpus(encoder, corpus, out, chunk_size=CHUNK, instruction="Represent:")
    with pytest.raises(ConfigError, match="differs from this one in its chunk_size "):
        encode_corpus(encoder, corpus, out, chunk_size=CHUNK + 1)
    other = LLM2Vec.from_pretrained(tiny_llama_dir, device="cpu")
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight.mul_(1.01)  # a fine-tune in miniature
    with pytest.raises(ConfigError, match="differs from this one in its model "):
        encode_corpus(other, corpus, out, chunk_size=CHUNK)
    assert (tmp_path / "out.npy.partial").read_bytes() == partial  # nothing was touched
    # --overwrite starts over with the new input
    run = encode_corpus(encoder, changed, out, chunk_size=CHUNK, overwrite=True)
    assert (run.encoded, run.earlier) == (7, 0)
    expected = encoder.encode(TEXTS[:-1] + [TEXTS[-1] + "!"])
    np.testing.assert_allclose(np.load(out), expected, rtol=1e-5, atol=1e-5)
    # a finished output is not replaced without --overwrite
    with pytest.raises(ConfigError, match="exists already"):
        encode_corpus(encoder, corpus, out, chunk_size=CHUNK)
    encode_corpus(encoder, corpus, out, chunk_size=CHUNK, overwrite=True)
    np.testing.assert_allclose(np.load(out), encoder.encode(TEXTS), rtol=1e-5, atol=1e-5)


def test_a_file_changed_during_the_run_is_caught(encoder, corpus, tmp_path):
    def edit(c):
        if c == 0:
            corpus.write_text("\n".join(["Edited."] + TEXTS[1:]) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="changed while the corpus was being encoded"):
        encode_corpus(encoder, corpus, tmp_path / "out.npy", chunk_size=CHUNK, on_chunk=edit)


# ------------------------------------------------------------------------------- several processes

def test_two_torchrun_processes_write_what_one_process_writes(tiny_llama_dir, corpus, tmp_path):
    """The command line, 1 thread each: one process, then two that continue a run one process began."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
    args = ["-m", "llm2vec_mini", "encode", "--model", str(tiny_llama_dir), "--device", "cpu", "--input",
            str(corpus), "--chunk-size", str(CHUNK), "--batch-size", "2", "--output"]
    rc, _, err = run_group([sys.executable, *args, str(tmp_path / "one.npy")], env)
    assert rc == 0, err[-3000:]
    # an earlier run by one process stops after 2 chunks; two processes finish it
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(Stop):
            encode_corpus(LLM2Vec.from_pretrained(tiny_llama_dir, device="cpu"), corpus, tmp_path / "two.npy",
                          chunk_size=CHUNK, batch_size=2, on_chunk=stop_after(2))
    finally:
        torch.set_num_threads(threads)
    rc, out, err = run_group([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                              "--standalone", *args, str(tmp_path / "two.npy")], env)
    assert rc == 0, err[-3000:]
    # each rank prints one line, but two processes' prints may interleave on the shared stdout
    said = re.findall(r"rank (\d) of 2: 20 texts -> \S+ \(20, 64\); chunks: 7, encoded here (\d), by an "
                      r"earlier run (\d)", out)
    # chunks 2-6 were left: rank 0 takes 2 and 3, rank 1 takes 4, 5 and 6
    assert sorted(said) == [("0", "2", "2"), ("1", "3", "2")], out
    one, two = np.load(tmp_path / "one.npy"), np.load(tmp_path / "two.npy")
    assert one.shape == (20, 64) and np.abs(one).max() > 0
    np.testing.assert_array_equal(two, one)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.npy", "texts.txt", "two.npy"]
