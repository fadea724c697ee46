"""util.py: the one JSON file reader (every failure a typed error naming the file) and device names."""

import json

import pytest
import torch

from llm2vec_mini.errors import CheckpointError, ConfigError
from llm2vec_mini.util import MAX_JSON_DEPTH, read_json, torch_device


@pytest.mark.parametrize("content, match", [
    (b"[" * 100_000 + b"]" * 100_000, "nested deeper"),  # Python's parser overflows its stack
    (b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), "nested deeper"),  # parses; too deep to use
    (json.dumps({"vocab_size": json.loads("[" * 200 + "]" * 200)}).encode(), "nested deeper"),
    (b"{", "not a valid JSON file"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b"[1]", "expected a JSON object, got list"),
])
def test_bad_json_is_a_typed_error_naming_the_file(tmp_path, content, match):
    path = tmp_path / "config.json"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match) as e:
        read_json(path, expect=dict)
    assert e.value.path == str(path)


def test_nesting_up_to_the_limit_reads_and_other_errors_and_defaults(tmp_path):
    deep = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    (tmp_path / "deep.json").write_text(deep)
    assert read_json(tmp_path / "deep.json") == json.loads(deep)
    with pytest.raises(ConfigError, match="file not found"):
        read_json(tmp_path / "absent.json", error=ConfigError)
    assert read_json(tmp_path / "absent.json", default={}) == {}


def test_a_folder_is_not_a_json_file(tmp_path):
    with pytest.raises(CheckpointError, match="cannot read") as e:
        read_json(tmp_path)
    assert str(tmp_path) in str(e.value)


@pytest.mark.parametrize("value", ["tpu9", "cuda:99", "xla", 3.5, [], "cpu:x"])
def test_devices_torch_or_this_machine_lacks_are_config_errors_naming_the_argument(value):
    with pytest.raises(ConfigError, match="--device"):
        torch_device(value, "--device")


def test_known_devices():
    assert torch_device("cpu") == torch.device("cpu")
    assert torch_device(torch.device("cpu")) == torch.device("cpu")
