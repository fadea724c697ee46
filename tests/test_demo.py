"""`python -m llm2vec_mini demo --tiny`: the whole pipeline end to end on a tiny model, in seconds."""

import json

import pytest

from llm2vec_mini.cli import main
from llm2vec_mini.convert.safetensors import load_file
from llm2vec_mini.demo import PAPER_MTEB15, STAGES


@pytest.mark.slow
def test_tiny_demo_writes_table_chart_and_adapters(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "demo"
    assert main(["demo", "--tiny", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "SMOKE DEMO" in printed
    assert "ours: smoke pairs (not STS-B)" in printed  # the column is not labelled STS-B either
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


@pytest.mark.slow
def test_ctrl_c_keeps_what_finished(tmp_path, capsys, monkeypatch):
    import llm2vec_mini.recipes as recipes

    real_train, calls = recipes.train, []

    def train_then_interrupt(*args, **kwargs):  # Ctrl-C during the second training stage (SimCSE)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    monkeypatch.setattr(recipes, "train", train_then_interrupt)
    out = tmp_path / "demo"
    assert main(["demo", "--tiny", "--out", str(out)]) == 130
    assert "Interrupted: keeping what finished" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())["results"]
    assert list(results) == ["Uni + mean", "Bi + mean", "Bi + MNTP"]
    assert "Bi + MNTP + SimCSE  (not run)" in (out / "table.txt").read_text()
    assert (out / "mntp" / "adapter_model.safetensors").exists()  # the finished stage's adapter


def test_data_folder_is_found_in_the_documented_order(tmp_path, monkeypatch):
    import llm2vec_mini.demo as demo

    def data_dir(path):
        (path / "stsbenchmark").mkdir(parents=True)
        (path / "stsbenchmark" / "sts-dev.csv").write_text("")
        return path

    flag, env = data_dir(tmp_path / "flag"), data_dir(tmp_path / "env")
    beside = data_dir(tmp_path / "shared" / "data")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # ../shared/data from here is `beside`
    monkeypatch.setattr(demo, "__file__", str(tmp_path / "a" / "b" / "c" / "demo.py"))
    monkeypatch.setenv("LLM2VEC_MINI_DATA", str(env))
    assert demo.find_data_dir(flag) == flag
    assert demo.find_data_dir() == env
    monkeypatch.delenv("LLM2VEC_MINI_DATA")
    assert demo.find_data_dir() == beside
    monkeypatch.chdir(tmp_path)
    assert demo.find_data_dir() is None  # the smoke demo's built-in corpus then
    with pytest.raises(FileNotFoundError, match="no stsbenchmark/sts-dev.csv"):
        demo.find_data_dir(tmp_path / "work")
    monkeypatch.setenv("LLM2VEC_MINI_DATA", str(tmp_path / "work"))  # named, but wrong: an error too
    with pytest.raises(FileNotFoundError, match="LLM2VEC_MINI_DATA"):
        demo.find_data_dir()
    for bad in ("0", "inf", "nan"):
        assert main(["demo", "--tiny", "--budget-minutes", bad]) == 2


@pytest.mark.slow
def test_the_demo_and_the_cli_train_the_same_adapters(tmp_path):
    """The demo's stages and `train-mntp` / `train-simcse` on the same model, data, seed and settings
    give the same two adapters (the demo once seeded its SimCSE adapter with seed + 1)."""
    import torch

    from llm2vec_mini.convert.hf import save_hf_dir
    from llm2vec_mini.demo import smoke_corpus, tiny_model, tiny_recipe

    seed = "5"
    assert main(["demo", "--tiny", "--out", str(tmp_path / "demo"), "--seed", seed]) == 0
    model, tokenizer = tiny_model()  # the demo's model and corpus, on disk for the CLI
    save_hf_dir(model, tokenizer, tmp_path / "tiny")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(smoke_corpus()) + "\n")
    r = tiny_recipe()
    common = ["--model", str(tmp_path / "tiny"), "--data", str(corpus), "--seed", seed, "--device", "cpu",
              "--lora-r", str(r.lora_r), "--lora-alpha", str(r.lora_alpha), "--lora-dropout", "0.05"]
    mntp = ["--output", str(tmp_path / "mntp"), "--steps", str(r.mntp_steps),
            "--batch-size", str(r.mntp_batch), "--lr", str(r.mntp_lr), "--block-size", str(r.mntp_block),
            "--warmup-steps", str(max(1, r.mntp_steps // 10))]
    simcse = ["--adapter", str(tmp_path / "mntp"), "--output", str(tmp_path / "simcse"),
              "--steps", str(r.simcse_steps), "--batch-size", str(r.simcse_batch), "--lr", str(r.simcse_lr),
              "--max-length", str(r.simcse_max_length), "--warmup-steps", str(max(1, r.simcse_steps // 10))]
    assert main(["train-mntp", *common, *mntp]) == 0
    assert main(["train-simcse", *common, *simcse]) == 0
    for stage in ("mntp", "simcse"):
        demo = load_file(tmp_path / "demo" / stage / "adapter_model.safetensors")
        cli = load_file(tmp_path / stage / "adapter_model.safetensors")
        assert sorted(demo) == sorted(cli)
        assert any(v.abs().max() > 0 for k, v in cli.items() if "lora_B" in k)
        for k in demo:
            torch.testing.assert_close(cli[k], demo[k], rtol=0, atol=1e-6, msg=f"{stage}: {k}")

