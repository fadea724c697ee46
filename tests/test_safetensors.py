"""Our safetensors reader/writer against the reference `safetensors` library, and against bad files."""

import json
import struct

import pytest
import torch
from conftest import Reference

from llm2vec_mini.convert.safetensors import SafetensorsFile, load_file, save_file
from llm2vec_mini.errors import CheckpointError

safetensors_torch = Reference("safetensors.torch")
safetensors = Reference("safetensors")

_INT_VIEW = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a tensor as integers, so NaN payloads and -0.0 compare exactly."""
    if t.dtype == torch.bool:
        return t.to(torch.uint8)
    return t.contiguous().reshape(-1).view(_INT_VIEW[t.element_size()])


def assert_bit_exact(ours: dict, ref: dict):
    assert sorted(ours) == sorted(ref)
    for name in ref:
        assert ours[name].dtype == ref[name].dtype, name
        assert ours[name].shape == ref[name].shape, name
        assert torch.equal(bits(ours[name]), bits(ref[name])), name


def all_dtype_tensors():
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-40])
    out = {}
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        name = str(dtype).split(".")[1]
        out[f"{name}.matrix"] = torch.randn(5, 3, generator=g).to(dtype)
        out[f"{name}.special"] = special.to(dtype)
        out[f"{name}.scalar"] = torch.tensor(2.5, dtype=dtype)
        out[f"{name}.empty"] = torch.empty(0, 4, dtype=dtype)
    for dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        info = torch.iinfo(dtype)
        name = str(dtype).split(".")[1]
        out[f"{name}.range"] = torch.tensor([info.min, -1 if info.min < 0 else 0, info.max], dtype=dtype)
        out[f"{name}.cube"] = torch.randint(0, 100, (2, 3, 4), generator=g).to(dtype)
        out[f"{name}.scalar"] = torch.tensor(7, dtype=dtype)
    out["bool.mask"] = torch.tensor([[True, False, True], [False, False, True]])
    out["bool.empty"] = torch.empty(0, dtype=torch.bool)
    out["odd.three_halves"] = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float16)  # 6 bytes
    return out


def test_reads_reference_files_bit_exact(tmp_path):
    tensors = all_dtype_tensors()
    path = tmp_path / "ref.safetensors"
    safetensors_torch.save_file(tensors, str(path), metadata={"format": "pt", "note": "ünïcode"})
    with SafetensorsFile(path) as f:
        assert f.metadata == {"format": "pt", "note": "ünïcode"}
        assert f.keys() == sorted(tensors)
        for name, t in tensors.items():
            assert f.shape(name) == tuple(t.shape)
            assert f.dtype(name) == t.dtype
        assert f.path == str(path)
    assert_bit_exact(load_file(path), safetensors_torch.load_file(str(path)))
    assert_bit_exact(load_file(path), tensors)


def test_reference_reads_our_files_bit_exact(tmp_path):
    tensors = all_dtype_tensors()
    tensors["strided"] = torch.arange(12.0).view(3, 4).t()  # non-contiguous input
    path = tmp_path / "ours.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    assert_bit_exact(safetensors_torch.load_file(str(path)), tensors)
    with safetensors.safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0, "header must be padded to 8 bytes"
    header = json.loads(raw[8:8 + n])
    assert list(header)[0] == "__metadata__"
    for name, info in header.items():  # our layout keeps every tensor aligned to its element size
        if name != "__metadata__":
            assert info["data_offsets"][0] % tensors[name].element_size() == 0, name


def test_empty_file_of_tensors_and_no_metadata(tmp_path):
    path = tmp_path / "empty.safetensors"
    save_file({}, path)
    assert safetensors_torch.load_file(str(path)) == {}
    assert load_file(path) == {}
    with SafetensorsFile(path) as f:
        assert f.metadata == {}


def test_tensors_view_the_file_and_never_write_it(tmp_path):
    path = tmp_path / "w.safetensors"
    safetensors_torch.save_file({"w": torch.ones(1000)}, str(path))
    before = path.read_bytes()
    with SafetensorsFile(path) as f:
        a, b = f.get_tensor("w"), f.get_tensor("w")
    assert a.data_ptr() == b.data_ptr(), "two reads should view the same mapped bytes, not copies"
    a.mul_(3.0)  # copy-on-write: the process sees it, the file does not
    assert torch.equal(b, torch.full((1000,), 3.0))
    assert path.read_bytes() == before
    assert torch.equal(load_file(path)["w"], torch.ones(1000))


def write_raw(path, header, data=b"", header_len=None):
    """A safetensors-like file from a header (dict, or raw bytes) and data bytes, no checks."""
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(hb) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + hb + data)
    return path


def test_misaligned_tensor_is_read_correctly(tmp_path):
    # Legal but unusual: an F32 starting at byte 6 of the data section (after three F16 values).
    half = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float16)
    full = torch.tensor([4.0, 5.0], dtype=torch.float32)
    data = half.numpy().tobytes() + full.numpy().tobytes()
    path = write_raw(tmp_path / "m.safetensors", {
        "h": {"dtype": "F16", "shape": [3], "data_offsets": [0, 6]},
        "f": {"dtype": "F32", "shape": [2], "data_offsets": [6, 14]}}, data)
    assert_bit_exact(load_file(path), safetensors_torch.load_file(str(path)))


GOOD = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
DATA = b"\x00" * 8

MALFORMED = {
    "header_len_past_end": dict(header={"t": GOOD}, data=DATA, header_len=10_000),
    "huge_header_len": dict(header={"t": GOOD}, data=DATA, header_len=2**62),
    "invalid_utf8": dict(header=b'{"t\xff": 1}'),
    "invalid_json": dict(header=b'{"t": {"dtype": '),
    "header_not_object": dict(header=[1, 2, 3]),
    "duplicate_key": dict(header=b'{"t": %s, "t": %s}' % ((json.dumps(GOOD).encode(),) * 2), data=DATA),
    "metadata_not_strings": dict(header={"__metadata__": {"a": 1}, "t": GOOD}, data=DATA),
    "entry_not_object": dict(header={"t": [1]}, data=DATA),
    "missing_dtype": dict(header={"t": {"shape": [2], "data_offsets": [0, 8]}}, data=DATA),
    "unknown_dtype": dict(header={"t": {**GOOD, "dtype": "F128"}}, data=DATA),
    "dtype_not_string": dict(header={"t": {**GOOD, "dtype": ["F32"]}}, data=DATA),
    "deeply_nested_json": dict(header=b"[" * 100_000 + b"]" * 100_000),
    "nan_is_not_json": dict(header=b'{"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": NaN}}',
                            data=DATA),
    "trailing_bytes": dict(header={"t": GOOD}, data=DATA + b"\x00"),
    "empty_but_too_large": dict(header={"t": GOOD, "e": {"dtype": "F32", "shape": [0, 2**64],
                                                          "data_offsets": [8, 8]}}, data=DATA),
    "lone_surrogate": dict(header=b'{"__metadata__": {"a": "\\ud800"}, "t": %s}' % json.dumps(GOOD).encode(),
                           data=DATA),
    "negative_shape": dict(header={"t": {**GOOD, "shape": [-2]}}, data=DATA),
    "shape_not_list": dict(header={"t": {**GOOD, "shape": "2"}}, data=DATA),
    "float_offset": dict(header={"t": {**GOOD, "data_offsets": [0.0, 8]}}, data=DATA),
    "offsets_out_of_range": dict(header={"t": {**GOOD, "data_offsets": [0, 8]}}, data=b"\x00" * 4),
    "offsets_reversed": dict(header={"t": {**GOOD, "shape": [0], "data_offsets": [8, 0]}}, data=DATA),
    "overlapping": dict(header={"t": GOOD, "u": {**GOOD, "data_offsets": [4, 12]}}, data=b"\x00" * 12),
    "byte_count_mismatch": dict(header={"t": {**GOOD, "shape": [3]}}, data=DATA),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_files_raise_checkpoint_error(tmp_path, case):
    path = write_raw(tmp_path / f"{case}.safetensors", **MALFORMED[case])
    with pytest.raises(CheckpointError) as err:
        load_file(path)
    assert str(path) in str(err.value)
    assert err.value.path == str(path)
    # The reference refuses these files too, so we are not stricter than the format; only a
    # duplicated key, which it resolves silently, we refuse on purpose.
    if case != "duplicate_key":
        with pytest.raises(Exception):
            safetensors_torch.load_file(str(path))


@pytest.mark.parametrize("case", ["unknown_dtype", "negative_shape", "offsets_out_of_range",
                                  "overlapping", "byte_count_mismatch"])
def test_errors_name_the_tensor(tmp_path, case):
    path = write_raw(tmp_path / "x.safetensors", **MALFORMED[case])
    with pytest.raises(CheckpointError, match="tensor 'u'" if case == "overlapping" else "tensor 't'"):
        SafetensorsFile(path)


@pytest.mark.parametrize("length", [0, 5, 8, 40])
def test_truncated_files(tmp_path, length):
    full = tmp_path / "full.safetensors"
    safetensors_torch.save_file({"t": torch.randn(16)}, str(full))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(full.read_bytes()[:length])
    with pytest.raises(CheckpointError, match=str(cut)):
        load_file(cut)
    # Data section cut short: the header is whole but the tensor's bytes are not.
    cut.write_bytes(full.read_bytes()[:-4])
    with pytest.raises(CheckpointError, match="outside the data section"):
        load_file(cut)


def test_missing_file_and_missing_tensor(tmp_path):
    with pytest.raises(CheckpointError, match="nope.safetensors"):
        SafetensorsFile(tmp_path / "nope.safetensors")
    path = tmp_path / "a.safetensors"
    save_file({"a": torch.zeros(2)}, path)
    with SafetensorsFile(path) as f, pytest.raises(CheckpointError, match="'b'"):
        f.get_tensor("b")


def test_save_file_rejects_bad_arguments(tmp_path):
    path = tmp_path / "bad.safetensors"
    with pytest.raises(CheckpointError, match="'c'.*complex64"):
        save_file({"c": torch.zeros(2, dtype=torch.complex64)}, path)
    with pytest.raises(CheckpointError, match="not a torch.Tensor"):
        save_file({"n": [1.0]}, path)
    with pytest.raises(CheckpointError, match="metadata"):
        save_file({"a": torch.zeros(1)}, path, metadata={"a": 1})


@pytest.mark.parametrize("shift", [-1, 1, -8])
def test_a_header_length_that_is_off_is_refused_as_the_library_does(tmp_path, shift):
    """Issue 16: the header ends in padding spaces, so a length one byte short still parses; every
    tensor was then read one byte early. The tensors must fill the data section exactly."""
    good = tmp_path / "good.safetensors"
    save_file({"a": torch.arange(6, dtype=torch.float32), "b": torch.ones(3, dtype=torch.float16)}, good)
    data = good.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert data[8 + n - 1:8 + n] == b" "  # the padding that makes the short header parse
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((n + shift).to_bytes(8, "little") + data[8:])
    with pytest.raises(Exception):
        safetensors_torch.load_file(str(bad))
    with pytest.raises(CheckpointError, match="bad.safetensors") as err:
        load_file(bad)
    assert "data section" in str(err.value) or "JSON" in str(err.value)


def test_gaps_between_tensors_are_refused_as_the_library_does(tmp_path):
    path = write_raw(tmp_path / "gap.safetensors", {"t": {**GOOD, "data_offsets": [4, 12]}}, b"\x00" * 12)
    with pytest.raises(Exception):
        safetensors_torch.load_file(str(path))
    with pytest.raises(CheckpointError, match="tensor 't' starts at byte 4.*gap"):
        load_file(path)


def test_fp8_and_unsigned_dtypes_read_bit_exact_both_ways(tmp_path):
    """Every dtype the library writes that torch has: FP8 checkpoints, unsigned 16/32/64-bit."""
    g = torch.Generator().manual_seed(0)
    tensors = {"e4m3": torch.randn(4, 8, generator=g).to(torch.float8_e4m3fn),
               "e5m2": torch.randn(3, generator=g).to(torch.float8_e5m2),
               "u16": torch.tensor([0, 1, 65535]).to(torch.uint16),
               "u32": torch.tensor([0, 2**32 - 1]).to(torch.uint32),
               "u64": torch.tensor([0, 2**63 - 1]).to(torch.uint64)}
    path = tmp_path / "ref.safetensors"
    safetensors_torch.save_file(tensors, str(path))
    ours = load_file(path)
    assert {k: v.dtype for k, v in ours.items()} == {k: v.dtype for k, v in tensors.items()}
    for name, t in ours.items():
        assert torch.equal(t.view(torch.uint8), tensors[name].view(torch.uint8)), name
    save_file(tensors, tmp_path / "ours.safetensors")
    back = safetensors_torch.load_file(str(tmp_path / "ours.safetensors"))
    assert all(torch.equal(back[k].view(torch.uint8), tensors[k].view(torch.uint8)) for k in tensors)
