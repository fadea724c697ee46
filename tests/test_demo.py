"""`python -m llm2vec_mini demo --tiny`: the whole pipeline end to end on a tiny model, in seconds."""

import json
import os
import socket
import subprocess
import sys

import pytest

from llm2vec_mini import hub
from llm2vec_mini.cli import main
from llm2vec_mini.convert.safetensors import load_file
from llm2vec_mini.demo import DEMO_DATA, PAPER_MTEB15, STAGES, demo_data_dir


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


def test_bad_budgets_are_clear_errors():
    for bad in ("0", "inf", "nan"):
        assert main(["demo", "--tiny", "--budget-minutes", bad]) == 2


@pytest.fixture
def no_data_around(tmp_path, monkeypatch):
    """No data folder anywhere: no $LLM2VEC_MINI_DATA, an empty cache, no ../shared/data."""
    monkeypatch.delenv("LLM2VEC_MINI_DATA", raising=False)
    monkeypatch.setenv("LLM2VEC_MINI_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hub, "__file__", str(tmp_path / "a" / "b" / "c" / "hub.py"))
    return tmp_path / "cache" / "data"


def test_without_data_the_demo_downloads_its_three_files(data_dir, no_data_around, monkeypatch, capsys):
    # data_dir first: it finds ../shared/data before no_data_around hides it
    monkeypatch.setenv("LLM2VEC_MINI_DATA_URL", data_dir.resolve().as_uri())
    assert demo_data_dir() == no_data_around
    fetched = sorted(str(p.relative_to(no_data_around)) for p in no_data_around.rglob("*") if p.is_file())
    groups = ("stsb", "wikitext2", "wiki1m")  # those holding DEMO_DATA, and no other
    assert fetched == sorted(f.path for f in hub.DATA_FILES if f.group in groups)
    assert set(DEMO_DATA) <= set(fetched)
    assert f"downloaded the demo's data into {no_data_around}" in capsys.readouterr().out
    assert demo_data_dir() == no_data_around  # found in the cache now: nothing printed, nothing fetched
    assert capsys.readouterr().out == ""


def test_offline_without_data_one_line_says_how_to_get_data(no_data_around, monkeypatch, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nobody listens there
    monkeypatch.setenv("LLM2VEC_MINI_DATA_URL", f"http://127.0.0.1:{port}")
    assert demo_data_dir() is None  # the smoke demo then
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 1
    assert "download failed" in printed[0] and "python -m llm2vec_mini download data" in printed[0]
    assert not no_data_around.exists() or not any(p.is_file() for p in no_data_around.rglob("*"))


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



@pytest.mark.slow
@pytest.mark.real_model
def test_a_fresh_clone_fetches_the_data_from_a_mirror_and_demos_on_sts_b(tmp_path, data_dir, smollm2_gguf):
    """`make demo` on a fresh clone with no ../shared beside it: its data step fetches the demo's data
    from $LLM2VEC_MINI_DATA_URL (a local HTTP server serving ../shared/data), and the demo then scores
    STS-B dev, not the smoke pairs. The clone's Python runs with this venv (no `make setup` there)."""
    import functools
    import http.server
    import threading
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    clone = tmp_path / "clone"  # tmp_path holds no shared/ folder
    subprocess.run(["git", "clone", "--quiet", "--no-checkout", str(repo), str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "checkout", "--quiet", head.stdout.strip()], check=True)
    makefile = (clone / "Makefile").read_text().splitlines()
    recipe = makefile[makefile.index("demo: setup model") + 1]
    assert recipe.strip() == "$(PY) -m llm2vec_mini demo"  # what `make demo` runs after setup and model

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / smollm2_gguf.name).symlink_to(smollm2_gguf)  # the model is there; the data is not
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(data_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {k: v for k, v in os.environ.items() if k != "LLM2VEC_MINI_DATA"}
    env.update(PYTHONPATH=str(clone), LLM2VEC_MINI_CACHE=str(cache),
               LLM2VEC_MINI_DATA_URL=f"http://127.0.0.1:{server.server_address[1]}")
    try:
        where = subprocess.run([sys.executable, "-c", "import llm2vec_mini; print(llm2vec_mini.__file__)"],
                               cwd=clone, env=env, capture_output=True, text=True, check=True)
        assert where.stdout.strip() == str(clone / "llm2vec_mini" / "__init__.py")
        done = subprocess.run([sys.executable, "-m", "llm2vec_mini", "demo", "--budget-minutes", "0.5",
                               "--out", str(tmp_path / "out")], cwd=clone, env=env, capture_output=True,
                              text=True, timeout=800)
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"downloaded the demo's data into {cache / 'data'}" in done.stdout
    assert "ours: STS-B dev" in done.stdout and "SMOKE" not in done.stdout
    assert "50 STS pairs" in done.stdout  # the first 50 pairs of STS-B dev at this budget
    assert json.loads((tmp_path / "out" / "results.json").read_text())["smoke"] is False
    for name in DEMO_DATA:
        assert (cache / "data" / name).read_bytes() == (data_dir / name).read_bytes()
