"""Helpers of the reference tier: the bridge to the official llm2vec in .venv-ref, and fixtures' parts.

The official library (transformers 4.44.2, peft 0.13.2, llm2vec 0.2.3) cannot share a venv with ours,
so it is reached only through subprocesses that run `official_driver.py` with `.venv-ref/bin/python`;
`run_official` is that bridge and `official_encode` its most used call.

Fixtures are tiny random Llamas in the layout of the official Hub checkpoints (base model, MNTP
adapter beside a config.json, SimCSE adapter written by `LLM2Vec.save`), with two real vocabularies
from ../shared/data/tokenizers: Llama-2's SentencePiece BPE (Sheared-LLaMA's) and GPT-2's byte-level
BPE (the family of SmolLM2's), written as `tokenizer.json` files that tokenizers 0.19 can read.
"""


import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
REF_PY = REPO / ".venv-ref" / "bin" / "python"
DRIVER = Path(__file__).with_name("official_driver.py")

TOKENIZER_KINDS = ("llama-spm", "gpt2-bpe")

# A tiny Llama with GQA; vocabulary and special ids come from the tokenizer kind.
TINY_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
                   rope_theta=10000.0, tie_word_embeddings=False)
VOCAB = {"llama-spm": dict(vocab_size=32000, bos_token_id=1, eos_token_id=2),
         "gpt2-bpe": dict(vocab_size=50257, bos_token_id=50256, eos_token_id=50256)}


def _data_dir() -> Path:
    """The data folder (`hub.find_data_dir`'s order), with tests/conftest.py's rule: skip when absent,
    fail under REQUIRE_DATA=1."""
    from llm2vec_mini.hub import find_data_dir
    try:
        path, reason = find_data_dir(), "no data folder ($LLM2VEC_MINI_DATA, download cache, ../shared/data)"
    except FileNotFoundError as e:
        path, reason = None, str(e)
    if path is None:
        if os.environ.get("LLM2VEC_MINI_REQUIRE_DATA") == "1":
            pytest.fail(f"{reason} (LLM2VEC_MINI_REQUIRE_DATA=1)")
        pytest.skip(reason)
    return path


def run_official(command: str, request: dict, workdir: Path, timeout: float = 600) -> None:
    """Run `official_driver.py COMMAND` under .venv-ref on `request` (a dict, or {"jobs": [...]})."""
    if not REF_PY.exists():
        pytest.skip(f"{REF_PY} not found: run `make reference-setup`")
    workdir.mkdir(parents=True, exist_ok=True)
    req_path = workdir / f"{command}-request.json"
    req_path.write_text(json.dumps(request))
    env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([str(REF_PY), str(DRIVER), command, str(req_path)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=workdir)
    if proc.returncode != 0:
        raise AssertionError(f"official driver `{command}` failed ({proc.returncode}):\n"
                             f"{proc.stderr[-4000:]}")


def write_tokenizer(kind: str, out: Path) -> Path:
    """A tokenizer.json + tokenizer_config.json for `kind`, from llama.cpp's vocabulary GGUF files.

    transformers 5 converts the GGUF vocabulary; we then write it the way transformers 4.x's Hub
    checkpoints look: merges as "a b" strings (tokenizers 0.19 reads no other form) and, for
    Llama, the Prepend("▁") + Replace(" ", "▁") normaliser of Llama-2's tokenizer.json.
    """
    from transformers import AutoTokenizer

    gguf = {"llama-spm": "ggml-vocab-llama-spm.gguf", "gpt2-bpe": "ggml-vocab-gpt-2.gguf"}[kind]
    tokenizers_dir = _data_dir() / "tokenizers"
    if not (tokenizers_dir / gguf).exists():
        pytest.skip(f"{tokenizers_dir / gguf} not found")
    tok = AutoTokenizer.from_pretrained(str(tokenizers_dir), gguf_file=gguf)
    spec = json.loads(tok.backend_tokenizer.to_str())
    merges = spec["model"]["merges"]
    assert all(" " not in a + b for a, b in (m if isinstance(m, list) else m.split(" ") for m in merges))
    spec["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in merges]
    if kind == "llama-spm":
        spec["normalizer"] = {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
        spec["pre_tokenizer"] = None
        spec["model"]["unk_token"] = "<unk>"
        config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
                  "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
                  "legacy": True, "clean_up_tokenization_spaces": False, "model_max_length": 2048}
    else:
        spec["post_processor"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                                  "use_regex": True}
        config = {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False,
                  "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                  "unk_token": "<|endoftext|>", "clean_up_tokenization_spaces": False,
                  "model_max_length": 2048}
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))  # written last: "done"
    return out


def make_tiny_llm2vec(kind: str, work: Path, cache, init_std: float = 0.02) -> dict:
    """{kind, base, mntp, simcse, config, work}: a tiny random Llama (`TINY_CONFIG`, the vocabulary
    of `kind`, weights N(0, init_std)) written by transformers, with an MNTP and a SimCSE adapter in
    the Hub's layout."""
    # Converting a GGUF vocabulary takes seconds; the result is kept in pytest's cache folder.
    tok_dir = cache.mkdir(f"llm2vec-ref-tokenizer-{kind}")
    if not (tok_dir / "tokenizer_config.json").exists():
        write_tokenizer(kind, tok_dir)
    config = dict(TINY_CONFIG, **VOCAB[kind], initializer_range=init_std)
    run_official("make-fixture", {"out": str(work / "model"), "tokenizer_dir": str(tok_dir), "seed": 0,
                                  "config": config, "lora_r": 4, "lora_std": 0.05,
                                  "result": str(work / "fixture.json")}, work)
    dirs = json.loads((work / "fixture.json").read_text())
    return dict(dirs, kind=kind, config=config, work=work)


def official_encode(tiny: dict, jobs: list, name: str) -> list:
    """Run official `LLM2Vec.from_pretrained(...).encode(texts)` for each job dict in one process.

    A job holds `texts` and any of base, peft, merge_peft, enable_bidirectional, pooling_mode,
    max_length, doc_max_length, skip_instruction, batch_size (base defaults to the MNTP dir and
    peft to the SimCSE adapter, the Hub's usage). Returns, per job, (embeddings (N, H), info) where
    info has the official settings and the tokenised batches in the order encode() ran them.
    """
    work = tiny["work"] / name
    work.mkdir(parents=True, exist_ok=True)
    full = []
    for i, job in enumerate(jobs):
        job = dict({"base": tiny["mntp"], "peft": tiny["simcse"]}, **job)
        full.append(dict(job, out=str(work / f"emb{i}.npy"), result=str(work / f"info{i}.json")))
    run_official("encode", {"jobs": full}, work)
    return [(np.load(j["out"]), json.loads(Path(j["result"]).read_text())) for j in full]


def cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """1 - cos(a_i, b_i) per row, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return 1.0 - (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))

