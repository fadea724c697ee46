"""Shared test helpers: where the data lives, and how a missing data folder is treated.

Tests that need ../shared/data skip with a reason when it is absent, except under
LLM2VEC_MINI_REQUIRE_DATA=1 (CI), where absence is a failure.
"""

import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def require_data() -> bool:
    return os.environ.get("LLM2VEC_MINI_REQUIRE_DATA") == "1"


def missing(reason: str):
    """Skip, or fail when data is required (CI)."""
    if require_data():
        pytest.fail(f"{reason} (LLM2VEC_MINI_REQUIRE_DATA=1)")
    pytest.skip(reason)


def fast_tests() -> bool:
    """`make test-fast` (LLM2VEC_MINI_TEST_FAST=1): no data, no model, no notebooks, nothing slow."""
    return os.environ.get("LLM2VEC_MINI_TEST_FAST") == "1"


def shared_data_dir() -> Path:
    """The data folder in the package's one order (`hub.find_data_dir`: $LLM2VEC_MINI_DATA, the
    download cache, ../shared/data), holding every file of the data table; skip or fail without one."""
    from llm2vec_mini.hub import find_data_dir
    if fast_tests():
        pytest.skip("make test-fast runs without the data folder")
    try:
        path = find_data_dir()
    except FileNotFoundError as e:  # $LLM2VEC_MINI_DATA names a folder without the data
        missing(str(e))
    if path is None:
        missing("no data folder ($LLM2VEC_MINI_DATA, the download cache or ../shared/data): "
                "`python -m llm2vec_mini download data` fetches it")
    return path


DATA_FIXTURES = {"data_dir", "sts_dev_texts", "llama2_tokenizer", "tiny_llama_dir"}


def pytest_collection_modifyitems(config, items):
    """Mark what a test needs from its fixtures, so that `-m "not data"` or `-m "not real_model"` select."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & DATA_FIXTURES:
            item.add_marker(pytest.mark.data)
        if "smollm2_gguf" in names:
            item.add_marker(pytest.mark.real_model)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under LLM2VEC_MINI_REQUIRE_DATA=1 a missing reference library (pytest.importorskip) fails the
    test instead of skipping it: CI must compare against every reference, not quietly fewer."""
    outcome = yield
    report = outcome.get_result()
    if require_data() and report.skipped and call.excinfo is not None:
        reason = str(call.excinfo.value)
        if reason.startswith("could not import"):
            report.outcome = "failed"
            report.longrepr = f"{reason} (LLM2VEC_MINI_REQUIRE_DATA=1: the reference libraries are required)"


class Reference:
    """A reference library (transformers, peft, scipy, ...) imported on first use, so that only the tests
    that compare against it need it: such a test skips with a reason when the library is missing (and
    fails under LLM2VEC_MINI_REQUIRE_DATA=1, see below); every other test of the file still runs.

        transformers = Reference("transformers")   # at module level, instead of `import transformers`
    """

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr):
        return getattr(pytest.importorskip(self._name), attr)  # skips: "could not import ..."


@pytest.fixture
def data_dir() -> Path:
    return shared_data_dir()


# --- SmolLM2 GGUF from the local cache (owner: the GGUF/hub work) ---------------------------------

@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of the cached SmolLM2-135M-Instruct Q4_1 GGUF file; skip (or fail under
    LLM2VEC_MINI_REQUIRE_DATA=1) when `python -m llm2vec_mini download smollm2` has not been run."""
    from llm2vec_mini.hub import smollm2_path
    if fast_tests():
        pytest.skip("make test-fast runs without the model")
    try:
        return smollm2_path()
    except FileNotFoundError as e:
        missing(str(e))


# --- Tokenizer test texts (owner: the tokenizer work) --------------------------------------------

def ggml_vocab_cases(name: str):
    """[(text, expected ids without BOS)] from llama.cpp's `{name}.inp`/`.out` in shared/data/tokenizers.

    Texts are separated by lines `__ggml_vocab_test__`; the newline before each separator belongs to it.
    """
    folder = shared_data_dir() / "tokenizers"
    texts = (folder / f"{name}.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    assert texts[-1] == "", "the .inp file must end with a separator"
    lines = (folder / f"{name}.out").read_text(encoding="utf-8").split("\n")
    assert lines[-1] == ""
    ids = [[int(x) for x in line.split()] for line in lines[:-1]]
    assert len(ids) == len(texts) - 1
    return list(zip(texts[:-1], ids))


@pytest.fixture(scope="session")
def sts_dev_texts():
    """Both sentences of all 1,500 STS-B dev pairs (3,000 texts): tab-separated, no quoting, cols 6, 7."""
    rows = (shared_data_dir() / "stsbenchmark" / "sts-dev.csv").read_text(encoding="utf-8").splitlines()
    pairs = [row.split("\t")[5:7] for row in rows]
    assert len(pairs) == 1500 and all(len(p) == 2 for p in pairs)
    return [s for pair in pairs for s in pair]


# --- The reference tier (owner: the official-llm2vec work) --------------------------------------
# tests/reference compares against the official llm2vec in .venv-ref; `make test-reference` runs it
# with LLM2VEC_MINI_REFERENCE=1. Without that variable `pytest tests` does not collect it.
collect_ignore = [] if os.environ.get("LLM2VEC_MINI_REFERENCE") == "1" else ["reference"]


# --------------------------------------------------------------------------------------------
# A tiny Llama with the real Llama-2 vocabulary, as a Hugging Face directory written by transformers.

def write_tokenizer_dir(tokenizer, folder: Path) -> Path:
    """Our Tokenizer saved with BPE merges as "a b" strings, which transformers 4.x can also read."""
    from llm2vec_mini.convert.hf_tokenizer import save_hf_tokenizer
    return save_hf_tokenizer(tokenizer, folder, legacy_merges=True)


@pytest.fixture(scope="session")
def llama2_tokenizer():
    from llm2vec_mini.convert.gguf import load_gguf_tokenizer
    return load_gguf_tokenizer(shared_data_dir() / "tokenizers" / "ggml-vocab-llama-spm.gguf")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, llama2_tokenizer) -> Path:
    """transformers' LlamaForCausalLM (2 layers, GQA, random N(0, 0.1) weights), Llama-2 tokenizer."""
    import transformers

    from llm2vec_mini import LlamaConfig
    folder = tmp_path_factory.mktemp("tiny_llama")
    cfg = LlamaConfig.tiny(vocab_size=32000, pad_token_id=None)
    torch.manual_seed(1234)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf_config()))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.1)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0).add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    return write_tokenizer_dir(llama2_tokenizer, folder)


def run_group(cmd, env, timeout=300):
    """(exit status, stdout, stderr) of a command in its own process group; on a time-out the whole
    group is killed (torchrun's workers too) and the test fails."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{' '.join(cmd)} timed out after {timeout} s")
    return proc.returncode, out, err
