"""`python -m llm2vec_mini demo --tiny`: the whole pipeline end to end on a tiny model, in seconds."""

import json

import pytest

from llm2vec_mini.cli import main
from llm2vec_mini.convert.safetensors import load_file
from llm2vec_mini.demo import PAPER_MTEB15, STAGES


def test_tiny_demo_writes_table_chart_and_adapters(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "demo"
    assert main(["demo", "--tiny", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "SMOKE DEMO" in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results["results"]) == set(STAGES)
    assert all(-100 <= v <= 100 for v in results["results"].values())
    table = (out / "table.txt").read_text()
    for stage in STAGES:
        assert stage in table and f"{PAPER_MTEB15[stage]:.2f}" in table
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("mntp", "simcse"):
        cfg = json.loads((out / name / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["r"] == 16
        tensors = load_file(out / name / "adapter_model.safetensors")
        assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in tensors.items())
