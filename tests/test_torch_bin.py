"""`.bin` checkpoints: state dicts read back exactly, and pickles that would run code refused unrun."""

import pickle

import pytest
import torch

from llm2vec_mini.convert.torch_bin import load_torch_bin
from llm2vec_mini.errors import CheckpointError


def state_dict():
    g = torch.Generator().manual_seed(0)
    return {"model.embed_tokens.weight": torch.randn(10, 4, generator=g),
            "model.norm.weight": torch.randn(4, generator=g).to(torch.bfloat16),
            "step": torch.tensor(3, dtype=torch.int64)}


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_state_dict_round_trip(tmp_path, zip_format):
    sd = state_dict()
    path = tmp_path / "pytorch_model.bin"
    torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
    loaded = load_torch_bin(path)
    assert sorted(loaded) == sorted(sd)
    for name, t in sd.items():
        assert loaded[name].dtype == t.dtype and loaded[name].device.type == "cpu"
        torch.testing.assert_close(loaded[name], t, rtol=0, atol=0)


class _MakesAFile:
    """Unpickling this calls open(marker, "w"): what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_code_running_pickle_in_a_zip_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    torch.save({"w": torch.zeros(2), "evil": _MakesAFile(marker)}, path)
    with pytest.raises(CheckpointError, match=r"evil\.bin: refused.*GLOBAL [\w.]*open"):
        load_torch_bin(path)
    assert not marker.exists(), "loading ran code from the file"


def test_code_running_raw_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps({"w": _MakesAFile(marker)}, protocol=2))
    with pytest.raises(CheckpointError, match="evil.bin"):
        load_torch_bin(path)
    assert not marker.exists(), "loading ran code from the file"
    pickle.loads(path.read_bytes())  # the control: a plain unpickler does run the payload
    assert marker.exists()


class _RunsAShellCommand:
    """Unpickling this calls os.system(...): the classic malicious pickle."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zip_format", [True, False])
def test_a_shell_command_in_a_pickle_is_refused_with_its_reason(tmp_path, zip_format):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    if zip_format:
        torch.save({"w": _RunsAShellCommand(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"w": _RunsAShellCommand(marker)}, protocol=2))
    with pytest.raises(CheckpointError, match=r"evil\.bin: refused.*GLOBAL (posix|os)\.system") as e:
        load_torch_bin(path)
    assert "weights_only" not in str(e.value)  # not torch's advice to trust the file
    assert not marker.exists(), "loading ran code from the file"


@pytest.mark.parametrize("payload,match", [
    ([torch.zeros(2)], "found a list"),
    (torch.zeros(2), "found a Tensor"),
    ({"w": 1.5}, "tensor 'w'.*found a float"),
    ({"state_dict": {"w": torch.zeros(2)}}, "tensor 'state_dict'.*found a dict"),
    ({3: torch.zeros(2)}, "keys must be strings"),
])
def test_payload_must_be_a_flat_dict_of_tensors(tmp_path, payload, match):
    path = tmp_path / "odd.bin"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=match) as err:
        load_torch_bin(path)
    assert str(path) in str(err.value)


def test_truncated_garbage_and_missing_files(tmp_path):
    good = tmp_path / "good.bin"
    torch.save(state_dict(), good)
    cut = tmp_path / "cut.bin"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"this is not a checkpoint at all" * 10)
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    for path in (cut, garbage, empty, tmp_path / "missing.bin"):
        with pytest.raises(CheckpointError) as err:
            load_torch_bin(path)
        assert str(path) in str(err.value)


@pytest.mark.parametrize("tensor, kind", [
    (torch.empty(2, 3, device="meta"), "a meta tensor"),  # no data at all: failed untyped in the loader
    (torch.eye(3).to_sparse(), "a torch.sparse_coo tensor"),  # loaded, and broke encode() later
])
def test_tensors_that_are_no_plain_weights_are_refused(tmp_path, tensor, kind):
    """Issue 16, class 7."""
    path = tmp_path / "odd.bin"
    torch.save({"w": torch.zeros(2), "x": tensor}, path)
    with pytest.raises(CheckpointError, match=f"tensor 'x': {kind}; a weight must be a plain dense") as err:
        load_torch_bin(path)
    assert str(path) in str(err.value)


def test_a_compressed_record_is_refused_before_it_is_read(tmp_path):
    """torch.save stores its records as they are; a deflated one could expand to any size (a zip bomb)."""
    import zipfile
    good = tmp_path / "good.bin"
    torch.save(state_dict(), good)
    packed = tmp_path / "packed.bin"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    with pytest.raises(CheckpointError, match=r"packed\.bin: record .* is compressed"):
        load_torch_bin(packed)


def test_a_damaged_zip_end_record_is_a_checkpoint_error(tmp_path):
    """Two flipped bytes made Python's zipfile.is_zipfile itself raise ("zipfiles that span multiple
    disks are not supported"): the first fuzz find in a .bin."""
    import zipfile
    good = tmp_path / "good.bin"
    torch.save(state_dict(), good)
    data = bytearray(good.read_bytes())
    end = data.rindex(b"PK\x06\x07")  # the zip64 end-of-central-directory locator
    data[end + 4:end + 8] = (1).to_bytes(4, "little")  # "the central directory is on disk 1"
    bad = tmp_path / "bad.bin"
    bad.write_bytes(bytes(data))
    with pytest.raises(zipfile.BadZipFile):
        zipfile.is_zipfile(bad)
    with pytest.raises(CheckpointError, match=r"bad\.bin: a damaged zip archive"):
        load_torch_bin(bad)
