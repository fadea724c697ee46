"""The reference tier: our code against the official llm2vec 0.2.3, which runs in its own venv.

`make test-reference` builds `.venv-ref` and runs these tests under `.venv` with
LLM2VEC_MINI_REFERENCE=1 (without it, tests/conftest.py keeps this folder out of `pytest tests`).
The bridge to the official library and the fixture builders live in reference_tier.py.
"""

import json

import pytest
from reference_tier import TINY_CONFIG, TOKENIZER_KINDS, VOCAB, run_official, write_tokenizer


@pytest.fixture(scope="session", params=TOKENIZER_KINDS)
def tiny_llm2vec(request, tmp_path_factory):
    """{kind, base, mntp, simcse, config, work}: a tiny random LLM2Vec checkpoint set, built once."""
    kind = request.param
    work = tmp_path_factory.mktemp(f"tiny-{kind}")
    # Converting a GGUF vocabulary takes seconds; the result is kept in pytest's cache folder.
    tok_dir = request.config.cache.mkdir(f"llm2vec-ref-tokenizer-{kind}")
    if not (tok_dir / "tokenizer_config.json").exists():
        write_tokenizer(kind, tok_dir)
    config = dict(TINY_CONFIG, **VOCAB[kind])
    run_official("make-fixture", {"out": str(work / "model"), "tokenizer_dir": str(tok_dir), "seed": 0,
                                  "config": config, "lora_r": 4, "lora_std": 0.05,
                                  "result": str(work / "fixture.json")}, work)
    dirs = json.loads((work / "fixture.json").read_text())
    return dict(dirs, kind=kind, config=config, work=work)
