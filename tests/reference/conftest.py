"""The reference tier: our code against the official llm2vec 0.2.3, which runs in its own venv.

`make test-reference` builds `.venv-ref` and runs these tests under `.venv` with
LLM2VEC_MINI_REFERENCE=1 (without it, tests/conftest.py keeps this folder out of `pytest tests`).
The bridge to the official library and the fixture builders live in reference_tier.py.
"""

import pytest
from reference_tier import TOKENIZER_KINDS, make_tiny_llm2vec


@pytest.fixture(scope="session", params=TOKENIZER_KINDS)
def tiny_llm2vec(request, tmp_path_factory):
    """{kind, base, mntp, simcse, config, work}: a tiny random LLM2Vec checkpoint set, built once."""
    return make_tiny_llm2vec(request.param, tmp_path_factory.mktemp(f"tiny-{request.param}"),
                             request.config.cache)


@pytest.fixture(scope="session")
def tiny_llama2(tmp_path_factory, request):
    """The same with the Llama-2 vocabulary (Sheared-LLaMA's) and weights N(0, 0.1), large enough for
    gradients that clipping at 1.0 acts on: for the training and Hub tests."""
    return make_tiny_llm2vec("llama-spm", tmp_path_factory.mktemp("tiny-llama2"), request.config.cache,
                             init_std=0.1)
