"""llm2vec_mini/mteb.py: our encoder in mteb 2.x, offline.

mteb's own STS evaluation, on a task built here from the local STS-B dev file, must give the Spearman
that our `eval-sts` gives on the same file with the same instruction; the instruction table and which
side of a task gets an instruction are checked against the official library's rules.
"""

import json
import re

import pytest

mteb = pytest.importorskip("mteb")
datasets = pytest.importorskip("datasets")
from mteb.abstasks.sts import AbsTaskSTS  # noqa: E402  (after the skips)
from mteb.abstasks.task_metadata import TaskMetadata  # noqa: E402
from mteb.types import PromptType  # noqa: E402

from llm2vec_mini import LLM2Vec  # noqa: E402
from llm2vec_mini.cli import main  # noqa: E402
from llm2vec_mini.data import load_sts  # noqa: E402
from llm2vec_mini.demo import tiny_model  # noqa: E402
from llm2vec_mini.errors import ConfigError  # noqa: E402
from llm2vec_mini.evaluate import AVERAGE  # noqa: E402
from llm2vec_mini.mteb import INSTRUCTIONS, LLM2VecMTEB, as_llm2vec_instruction, evaluate  # noqa: E402

STS_PROMPT = "Retrieve semantically similar text."  # mteb's prompt for STS; LLM2Vec's ends with ":"


def local_stsb_task(path, prompt=STS_PROMPT):
    """An mteb STS task over a local STS-B file (split "dev"): no download."""
    (subset,) = load_sts(path)  # our reader; mteb reads the same columns, see test_data.py's csv check

    class LocalSTSBenchmarkDev(AbsTaskSTS):
        min_score, max_score = 0, 5
        metadata = TaskMetadata(
            name="LocalSTSBenchmarkDev", description="STS-B dev from a local file", type="STS",
            dataset={"path": "local/stsbenchmark", "revision": "59042a92e862db58bd01e47914345d2f52d2a4a3"},
            category="t2t", modalities=["text"], eval_splits=["dev"], eval_langs=["eng-Latn"],
            main_score="cosine_spearman", prompt=prompt)

        def load_data(self, num_proc=None, **kwargs):
            self.dataset = datasets.DatasetDict({"dev": datasets.Dataset.from_dict({
                "sentence1": subset.sentences1, "sentence2": subset.sentences2, "score": subset.scores})})
            self.data_loaded = True

    return LocalSTSBenchmarkDev()


class Recorder(LLM2Vec):
    """A tiny LLM2Vec that keeps what `encode` was given."""

    def encode(self, sentences, **kwargs):
        self.seen = list(sentences)
        return super().encode(sentences, **kwargs)


@pytest.fixture(scope="module")
def recorder():
    model, tokenizer = tiny_model()
    return LLM2VecMTEB(Recorder(model, tokenizer, device="cpu"))


def batches(texts, size=2):
    return [{"text": texts[i:i + size]} for i in range(0, len(texts), size)]


def test_it_is_an_mteb_encoder(recorder):
    assert isinstance(recorder, mteb.EncoderProtocol)
    meta = recorder.mteb_model_meta
    assert meta.name == "llm2vec-mini/model" and meta.similarity_fn_name == "cosine"
    assert meta.embed_dim == recorder.model.hidden_size


def test_the_official_instruction_table():
    """67 tasks (MTEB's 56 English ones, CQADupstack as 12), every instruction ending with ":", each
    task a name mteb knows; spot checks copied from McGill-NLP/llm2vec's task_to_instructions.json."""
    assert len(INSTRUCTIONS) == 67
    assert all(v.endswith(":") and v == v.strip() for v in INSTRUCTIONS.values())
    assert INSTRUCTIONS["STSBenchmark"] == INSTRUCTIONS["SICK-R"] == "Retrieve semantically similar text:"
    assert INSTRUCTIONS["Banking77Classification"] == ("Given a online banking query, find the corresponding "
                                                       "intents:")
    assert INSTRUCTIONS["ArguAna"] == "Given a claim, find documents that refute the claim:"
    assert INSTRUCTIONS["CQADupstackGisRetrieval"] == (
        "Given a question, retrieve detailed question descriptions from Stackexchange that are duplicates "
        "to the given question:")
    assert sum(name.startswith("CQADupstack") for name in INSTRUCTIONS) == 12
    for name in INSTRUCTIONS:
        assert mteb.get_task(name).metadata.name == name
    assert as_llm2vec_instruction(STS_PROMPT) == "Retrieve semantically similar text:"
    assert as_llm2vec_instruction("Already: ") == "Already:" and as_llm2vec_instruction("") == ""


@pytest.mark.parametrize("task, prompt_type, instruction", [
    ("STSBenchmark", None, "Retrieve semantically similar text:"),  # symmetric: both sides
    ("Banking77Classification", None, "Given a online banking query, find the corresponding intents:"),
    ("ArguAna", PromptType.query, "Given a claim, find documents that refute the claim:"),
    ("ArguAna", PromptType.document, None),  # documents: no instruction
    ("SciDocsRR", PromptType.document, None),
])
def test_queries_and_symmetric_texts_get_the_instruction_documents_none(recorder, task, prompt_type,
                                                                          instruction):
    texts = ["A man is playing a guitar.", "A dog runs across the field.", "The train was delayed."]
    emb = recorder.encode(batches(texts), task_metadata=mteb.get_task(task).metadata, hf_split="test",
                          hf_subset="default", prompt_type=prompt_type, batch_size=2)
    expected = texts if instruction is None else [[instruction, t] for t in texts]
    assert recorder.model.seen == expected
    assert emb.shape == (3, recorder.model.hidden_size)
    direct = recorder.model.encode(expected, batch_size=2)  # mteb's batch size reached the encoder
    assert abs(emb - direct).max() == 0


def test_a_task_outside_the_table_gets_mtebs_prompt_the_llm2vec_way(recorder, data_dir):
    task = local_stsb_task(data_dir / "stsbenchmark" / "sts-dev.csv")
    assert recorder.instruction(task.metadata, None) == "Retrieve semantically similar text:"
    bare = task.metadata.model_copy(update={"name": "NoTaskOfThisName", "prompt": None})
    assert recorder.instruction(bare, None) == ""  # unknown to mteb and no prompt: none


def first_pairs(data_dir, tmp_path, n: int):
    """The first n lines of STS-B dev as a file of their own."""
    lines = (data_dir / "stsbenchmark" / "sts-dev.csv").read_text(encoding="utf-8").splitlines(True)
    path = tmp_path / f"sts-dev-{n}.csv"
    path.write_text("".join(lines[:n]), encoding="utf-8")
    return path


def test_the_instruction_moves_the_score(tiny_llama_dir, data_dir, tmp_path):
    """Without this, the next test could not tell an instruction dropped on the way."""
    head = first_pairs(data_dir, tmp_path, 200)
    scores = []
    for extra in ([], ["--instruction", "Retrieve semantically similar text:"]):
        out = tmp_path / f"{len(extra)}.json"
        assert main(["eval-sts", "--model", str(tiny_llama_dir), "--device", "cpu", "--data", str(head),
                     "--output", str(out), *extra]) == 0
        scores.append(json.loads(out.read_text())["results"][AVERAGE]["spearman"])
    assert abs(scores[0] - scores[1]) > 0.5, scores


@pytest.mark.slow
def test_mtebs_sts_evaluation_equals_eval_sts(tiny_llama_dir, data_dir, tmp_path, monkeypatch, capsys):
    """`eval-mteb` on all of STS-B dev (a local mteb task) and `eval-sts` with the same instruction on
    the same file: the same Spearman x 100 within 0.01 points, and mteb's result file on disk."""
    dev = data_dir / "stsbenchmark" / "sts-dev.csv"
    task = local_stsb_task(dev)
    real_get_tasks = mteb.get_tasks
    monkeypatch.setattr(mteb, "get_tasks", lambda tasks, **kw: [task] if tasks == [task.metadata.name]
                        else real_get_tasks(tasks=tasks, **kw))
    out = tmp_path / "mteb"
    assert main(["eval-mteb", "--model", str(tiny_llama_dir), "--device", "cpu", "--tasks",
                 "LocalSTSBenchmarkDev", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    (result_file,) = out.glob("results/llm2vec-mini__*/*/LocalSTSBenchmarkDev.json")
    assert f"results: {result_file.parent}" in printed
    mteb_spearman = 100 * json.loads(result_file.read_text())["scores"]["dev"][0]["cosine_spearman"]
    shown = float(re.search(r"^LocalSTSBenchmarkDev: (-?[\d.]+)$", printed, re.M).group(1))
    assert abs(shown - mteb_spearman) <= 0.0051  # printed x 100 with two decimals

    ours = tmp_path / "ours.json"
    assert main(["eval-sts", "--model", str(tiny_llama_dir), "--device", "cpu", "--data", str(dev),
                 "--instruction", "Retrieve semantically similar text:", "--output", str(ours)]) == 0
    (scores,) = [v for k, v in json.loads(ours.read_text())["results"].items() if k != AVERAGE]
    assert abs(scores["spearman"] - mteb_spearman) < 0.01, (scores["spearman"], mteb_spearman)


def test_the_python_api_and_unknown_task_names(tiny_llama_dir, data_dir, tmp_path):
    model = LLM2VecMTEB.from_pretrained(tiny_llama_dir, pooling="mean", device="cpu")
    assert model.mteb_model_meta.name == f"llm2vec-mini/{tiny_llama_dir.name}"
    again = LLM2VecMTEB.from_pretrained(tiny_llama_dir, pooling="mean", device="cpu")
    other = LLM2VecMTEB.from_pretrained(tiny_llama_dir, pooling="eos_token", device="cpu")
    assert model.mteb_model_meta.revision == again.mteb_model_meta.revision != other.mteb_model_meta.revision
    task = local_stsb_task(first_pairs(data_dir, tmp_path, 100))
    scores = evaluate(model, [task], tmp_path)
    assert set(scores) == {"LocalSTSBenchmarkDev"} and -1 <= scores["LocalSTSBenchmarkDev"] <= 1
    with pytest.raises(ConfigError, match="--tasks: .*NoSuchTask"):
        evaluate(model, ["NoSuchTask"], tmp_path)
