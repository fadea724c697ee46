"""The command line end to end on the tiny Llama directory: encode, eval-sts, train-mntp, train-simcse.

The adapters the trainers write are also loaded by peft onto transformers' LlamaModel (as the official
llm2vec loads them) and must give the same hidden states as our merged model.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import Reference

from llm2vec_mini.cli import main
from llm2vec_mini.encoder import LLM2Vec
from llm2vec_mini.errors import CheckpointError

transformers = Reference("transformers")

SENTENCES = ["A man is playing a guitar.", "A man plays the guitar.", "A dog runs in a field.",
             "The stock market fell today.", "A woman is cutting an onion.", "Someone chops an onion."]


@pytest.fixture(scope="module")
def sts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sts") / "sts-dev.csv"
    rows = [("main-captions", "MSRvid", "2012test", f"{i:04d}", f"{score:.1f}", a, b)
            for i, (a, b, score) in enumerate([(SENTENCES[0], SENTENCES[1], 4.8),
                                               (SENTENCES[0], SENTENCES[2], 0.4),
                                               (SENTENCES[4], SENTENCES[5], 4.2),
                                               (SENTENCES[3], SENTENCES[5], 0.0)])]
    path.write_text("\n".join("\t".join(r) for r in rows) + "\n")
    return path


def test_encode_writes_the_embeddings_of_each_line(tiny_llama_dir, tmp_path, capsys):
    src = tmp_path / "texts.txt"
    src.write_text("\n".join(SENTENCES) + "\n")
    assert main(["encode", "--model", str(tiny_llama_dir), "--input", str(src), "--output",
                 str(tmp_path / "emb.npy"), "--device", "cpu", "--instruction", "Find similar text:"]) == 0
    got = np.load(tmp_path / "emb.npy")
    expected = LLM2Vec.from_pretrained(tiny_llama_dir, device="cpu").encode(
        [["Find similar text:", s] for s in SENTENCES])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    # --dtype: the matrix products' dtype (default auto); float32 is the plain model
    assert main(["encode", "--model", str(tiny_llama_dir), "--input", str(src), "--output",
                 str(tmp_path / "emb32.npy"), "--device", "cpu", "--dtype", "float32"]) == 0
    fp32 = LLM2Vec.from_pretrained(tiny_llama_dir, device="cpu", dtype=torch.float32).encode(SENTENCES)
    np.testing.assert_array_equal(np.load(tmp_path / "emb32.npy"), fp32)


def test_eval_sts_prints_a_table_and_writes_json(tiny_llama_dir, sts_file, tmp_path, capsys):
    out = tmp_path / "results.json"
    assert main(["eval-sts", "--model", str(tiny_llama_dir), "--data", str(sts_file), "--device", "cpu",
                 "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "sts-dev" in printed and "average" in printed.lower()
    data = json.loads(out.read_text())
    assert data["results"]["sts-dev"]["n"] == 4
    assert -100 <= data["results"]["sts-dev"]["spearman"] <= 100


def test_a_score_that_is_not_a_number_is_null_in_the_json(tiny_llama_dir, tmp_path):
    flat = tmp_path / "sts-flat.csv"  # every gold score the same: no correlation is defined
    flat.write_text("".join(f"g\tf\ty\t{i}\t2.5\t{SENTENCES[i]}\t{SENTENCES[i + 1]}\n" for i in range(3)))
    out = tmp_path / "results.json"
    assert main(["eval-sts", "--model", str(tiny_llama_dir), "--data", str(flat), "--device", "cpu",
                 "--output", str(out)]) == 0

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")
    data = json.loads(out.read_text(), parse_constant=refuse)
    assert data["results"]["sts-flat"]["spearman"] is None and data["results"]["sts-flat"]["n"] == 3


def test_bad_input_gives_a_clear_error_not_a_traceback(tiny_llama_dir, tmp_path, capsys):
    bad = tmp_path / "broken.csv"
    bad.write_text("just one column\n")
    assert main(["eval-sts", "--model", str(tiny_llama_dir), "--data", str(bad), "--device", "cpu"]) == 2
    assert "broken.csv" in capsys.readouterr().err


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    text = root / "wiki.txt"
    text.write_text("\n".join(SENTENCES * 8) + "\n")
    assert main(["train-mntp", "--model", str(tiny_llama_dir), "--data", str(text), "--output",
                 str(root / "mntp"), "--steps", "3", "--batch-size", "4", "--block-size", "16",
                 "--lr", "1e-2", "--lora-r", "4", "--lora-alpha", "8"]) == 0
    assert main(["train-simcse", "--model", str(tiny_llama_dir), "--adapter", str(root / "mntp"),
                 "--data", str(text), "--output", str(root / "simcse"), "--steps", "3",
                 "--batch-size", "4", "--lr", "1e-2", "--lora-r", "4", "--lora-alpha", "8"]) == 0
    return root / "mntp", root / "simcse"


def test_trained_adapters_load_in_peft_like_the_official_library(tiny_llama_dir, adapters):
    peft = pytest.importorskip("peft")
    mntp, simcse = adapters
    for a in adapters:
        cfg = json.loads((a / "adapter_config.json").read_text())
        assert cfg["r"] == 4 and cfg["peft_type"] == "LORA"
    # the official stack: LlamaModel, MNTP merged, then SimCSE merged
    ref = transformers.LlamaModel.from_pretrained(tiny_llama_dir).eval()
    ref = peft.PeftModel.from_pretrained(ref, mntp).merge_and_unload()
    ref = peft.PeftModel.from_pretrained(ref, simcse).merge_and_unload().eval()
    ours = LLM2Vec.from_pretrained(tiny_llama_dir, adapters=[mntp, simcse], device="cpu", dtype=torch.float32)
    ids = torch.tensor([[1, 319, 767, 338, 8743, 263, 1410, 3906, 29889]])
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=torch.zeros(1, 1, 9, 9)).last_hidden_state
        got = ours.model(ids)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    plain = LLM2Vec.from_pretrained(tiny_llama_dir, device="cpu", dtype=torch.float32)
    assert not torch.allclose(plain.model(ids), got, atol=1e-3)  # the adapters changed something


def test_mntp_folder_loads_as_a_model_like_the_hub_ones(tiny_llama_dir, adapters, tmp_path):
    mntp, simcse = adapters
    assert {"config.json", "tokenizer.json", "adapter_config.json"} <= {p.name for p in mntp.iterdir()}
    settings = json.loads((simcse / "llm2vec_config.json").read_text())
    assert settings == {"pooling_mode": "mean", "max_length": 512, "doc_max_length": 400,
                        "skip_instruction": True}
    texts = ["A man is playing a guitar.", "Stocks fell."]
    explicit = LLM2Vec.from_pretrained(tiny_llama_dir, adapters=[mntp, simcse], device="cpu").encode(texts)
    hub_style = LLM2Vec.from_pretrained(mntp, adapters=[simcse], device="cpu").encode(texts)
    np.testing.assert_array_equal(hub_style, explicit)
    moved = tmp_path / "mntp-elsewhere"  # a base that is not on this machine: a clear error
    shutil.copytree(mntp, moved)
    cfg = json.loads((moved / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "princeton-nlp/Sheared-LLaMA-1.3B"
    (moved / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError,
                       match=r"mntp-elsewhere.*'princeton-nlp/Sheared-LLaMA-1.3B'.*not a local path"):
        LLM2Vec.from_pretrained(moved, device="cpu")


def test_the_same_seed_trains_the_same_adapter(tiny_llama_dir, tmp_path):
    text = tmp_path / "wiki.txt"
    text.write_text("\n".join(SENTENCES * 8) + "\n")
    runs = []
    for name in ("a", "b"):
        assert main(["train-mntp", "--model", str(tiny_llama_dir), "--data", str(text), "--output",
                     str(tmp_path / name), "--steps", "2", "--batch-size", "2", "--block-size", "16",
                     "--lora-r", "4", "--seed", "7", "--device", "cpu"]) == 0
        runs.append((tmp_path / name / "adapter_model.safetensors").read_bytes())
    assert runs[0] == runs[1]  # the LoRA initial values come from --seed too


def test_the_official_training_options(tiny_llama_dir, tmp_path):
    """--train-lm-head and --decay-steps reach the trainer: the lr decays over 6 steps, the trained
    head is kept in checkpoints."""
    text = tmp_path / "wiki.txt"
    text.write_text("\n".join(SENTENCES * 8) + "\n")
    assert main(["train-mntp", "--model", str(tiny_llama_dir), "--data", str(text), "--output",
                 str(tmp_path / "a"), "--steps", "3", "--batch-size", "2", "--block-size", "16",
                 "--lr", "1e-2", "--lora-r", "4", "--decay-steps", "6", "--train-lm-head",
                 "--checkpoint-every", "2", "--device", "cpu"]) == 0
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([1e-2, 1e-2 * 5 / 6, 1e-2 * 4 / 6])
    assert (tmp_path / "a" / "checkpoint-2" / "trainable.safetensors").exists()  # the head, beside LoRA


@pytest.fixture(scope="module")
def files(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_args")
    text = root / "wiki.txt"
    text.write_text("\n".join(SENTENCES * 8) + "\n")
    (root / "empty.txt").write_text("\n\n")
    return root, text


SIMCSE_BAD = [
    (["--lora-dropout", "1.0"], "lora dropout"),
    (["--attention-dropout", "1.0"], "attention dropout"),
    (["--attention-dropout", "-0.5"], "attention dropout"),
    (["--max-length", "0"], "max_length"),
    (["--max-sentences", "0"], "no sentences"),
    (["--checkpoint-every", "-1"], "checkpoint_every"),
    (["--device", "foo"], "--device"),
    (["--device", "cuda:99"], "--device"),
    (["--pool-all-positions", "--pooling", "eos_token"], "mean"),
    (["--steps", "3", "--decay-steps", "2"], "decay_steps"),
]


@pytest.mark.parametrize("extra, match", SIMCSE_BAD, ids=[m for _, m in SIMCSE_BAD])
def test_bad_training_arguments_are_clear_errors(tiny_llama_dir, files, tmp_path, capsys, extra, match):
    root, text = files
    rc = main(["train-simcse", "--model", str(tiny_llama_dir), "--data", str(text), "--output",
               str(tmp_path / "out"), "--steps", "1", "--batch-size", "2", "--lora-r", "4", *extra])
    assert rc == 2 and match in capsys.readouterr().err


def test_an_empty_sentence_file_and_a_resume_with_another_rank_are_clear_errors(tiny_llama_dir, files,
                                                                               tmp_path, capsys):
    root, text = files
    simcse = ["train-simcse", "--model", str(tiny_llama_dir), "--batch-size", "2", "--device", "cpu"]
    assert main(simcse + ["--data", str(root / "empty.txt"), "--output", str(tmp_path / "e")]) == 2
    assert "empty.txt" in capsys.readouterr().err
    out = str(tmp_path / "r")
    assert main(simcse + ["--data", str(text), "--output", out, "--steps", "2", "--lora-r", "4",
                          "--checkpoint-every", "1"]) == 0
    assert main(simcse + ["--data", str(text), "--output", out, "--steps", "3", "--lora-r", "8",
                          "--resume"]) == 2
    assert "a different r?" in capsys.readouterr().err


def test_eval_probe_reads_ud_from_the_data_folder_or_says_how_to_get_it(tiny_llama_dir, data_dir, tmp_path,
                                                                        monkeypatch, capsys):
    import llm2vec_mini.hub as hub
    import llm2vec_mini.probe as probe

    seen = []
    monkeypatch.setattr(probe, "probe_main", lambda model, tok, train, test, *rest: seen.append((train, test))
                        or {"accuracy": 0.0})
    monkeypatch.setenv("LLM2VEC_MINI_DATA", str(data_dir))
    assert main(["eval-probe", "--model", str(tiny_llama_dir), "--device", "cpu"]) == 0
    assert seen == [(data_dir / "ud_english_ewt/en_ewt-ud-dev.conllu",
                     data_dir / "ud_english_ewt/en_ewt-ud-test.conllu")]
    mine = tmp_path / "mine.conllu"
    assert main(["eval-probe", "--model", str(tiny_llama_dir), "--device", "cpu", "--test", str(mine)]) == 0
    assert seen[1] == (data_dir / "ud_english_ewt/en_ewt-ud-dev.conllu", str(mine))

    monkeypatch.delenv("LLM2VEC_MINI_DATA")  # no data folder anywhere
    monkeypatch.setenv("LLM2VEC_MINI_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hub, "__file__", str(tmp_path / "a" / "b" / "c" / "hub.py"))
    capsys.readouterr()
    assert main(["eval-probe", "--model", str(tiny_llama_dir), "--device", "cpu"]) == 2
    assert "download data --only ud_ewt" in capsys.readouterr().err


def test_eval_mteb_without_mteb_says_how_to_install_it(tiny_llama_dir, monkeypatch, capsys):
    import sys
    monkeypatch.setitem(sys.modules, "mteb", None)  # `import mteb` now raises ImportError
    monkeypatch.delitem(sys.modules, "llm2vec_mini.mteb", raising=False)
    assert main(["eval-mteb", "--model", str(tiny_llama_dir), "--tasks", "STSBenchmark"]) == 2
    assert 'pip install "llm2vec-mini[mteb]"' in capsys.readouterr().err


# -------------------------------------------------------------------------------------------------
# Issue 16, class 13: every output path is checked before any work starts


@pytest.mark.parametrize("command, output, match", [
    (["encode", "--input", "{texts}"], "{folder}", "a folder, where a file is expected"),
    (["encode", "--input", "{texts}"], "{folder}/missing/emb.npy", "does not exist"),
    (["encode", "--input", "{texts}"], "{file}/emb.npy", "is a file, not a folder"),
    (["eval-sts", "--data", "{texts}"], "{folder}", "a folder, where a file is expected"),
    (["train-mntp", "--data", "{texts}"], "{file}", "an existing file, where a folder is expected"),
    (["train-simcse", "--data", "{texts}"], "{file}", "an existing file, where a folder is expected"),
    (["train-simcse", "--data", "{texts}"], "{file}/run", "is a file, not a folder"),
])
def test_an_output_of_the_wrong_kind_is_refused_before_any_work(tiny_llama_dir, tmp_path, capsys, monkeypatch,
                                                                command, output, match):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(SENTENCES) + "\n")
    a_file, folder = tmp_path / "existing.npy", tmp_path / "out"
    a_file.write_text("x")
    folder.mkdir()
    names = {"texts": str(texts), "file": str(a_file), "folder": str(folder)}
    from llm2vec_mini.convert import hf
    monkeypatch.setattr(hf, "load_hf_model", lambda *a, **k: pytest.fail("work started"))
    args = [part.format(**names) for part in command] + ["--model", str(tiny_llama_dir), "--device", "cpu"]
    flag = "--out" if command[0] == "demo" else "--output"
    assert main(args + [flag, output.format(**names)]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


def test_a_programming_error_keeps_its_traceback(tiny_llama_dir, tmp_path, monkeypatch):
    """Only our typed errors (and a missing file) are bad input; a bug must show where it is."""
    from llm2vec_mini import encoder
    monkeypatch.setattr(encoder.LLM2Vec, "from_pretrained", lambda *a, **k: int("a bug"))  # a ValueError
    texts = tmp_path / "texts.txt"
    texts.write_text("a text\n")
    with pytest.raises(ValueError, match="a bug"):
        main(["encode", "--model", str(tiny_llama_dir), "--input", str(texts), "--output",
              str(tmp_path / "e.npy"), "--device", "cpu"])
