"""LLM2Vec on MTEB, the paper's benchmark: our encoder as an mteb 2.x model, with the official instructions.

mteb runs a task by handing the model batches of texts, each call marked as queries, documents, or
neither (`prompt_type`), and scores the vectors that come back. LLM2Vec evaluates with one
instruction per task (Sec. 3.2, the list in App. C.2, Table 10), as its official MTEB wrapper does:

    a query, and every text of a symmetric task (STS, classification, clustering, pair
    classification, summarisation)   ->  [instruction, text]: the model reads both, pools the text
    a document (the corpus of a retrieval or reranking task)  ->  the text alone

    model = LLM2VecMTEB.from_pretrained("sheared-llama", adapters=["mntp", "simcse"])
    scores = evaluate(model, ["STSBenchmark", "SciFact"], "runs/mteb")   # {task: main score}

mteb is an optional dependency (`pip install "llm2vec-mini[mteb]"`). Only this module imports it, and
nothing in the package imports this module except the `eval-mteb` command, when it runs.

References:
1) BehnamGhader et al., "LLM2Vec", 2024, https://arxiv.org/abs/2404.05961, Sec. 3.2 and App. C.2
2) Muennighoff et al., "MTEB", 2023, https://arxiv.org/abs/2210.07316 (mteb 2.x: `EncoderProtocol`)
3) the instruction table: https://github.com/McGill-NLP/llm2vec, test_configs/mteb/task_to_instructions.json
   at commit 312adcf; documents without instruction: the maintainers in its issue #104
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

try:
    import mteb
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.models.model_meta import ModelMeta, ScoringFunction
    from mteb.types import PromptType
except ImportError as e:
    raise ImportError(f'llm2vec_mini.mteb needs mteb 2.x: pip install "llm2vec-mini[mteb]" ({e})') from e

from .encoder import LLM2Vec
from .errors import ConfigError

# The official table, task -> instruction (67 tasks: MTEB's 56 English ones, CQADupstack as its 12
# parts). Each ends with ":"; the paper's Table 10 prints the same sentences ending with ".".
_CQADUPSTACK = ("Given a question, retrieve detailed question descriptions from Stackexchange that are "
                "duplicates to the given question:")
_STS = "Retrieve semantically similar text:"
INSTRUCTIONS = {
    # retrieval: the query gets the instruction, the documents none
    "ArguAna": "Given a claim, find documents that refute the claim:",
    "ClimateFEVER": "Given a claim about climate change, retrieve documents that support or refute the "
                    "claim:",
    "DBPedia": "Given a query, retrieve relevant entity descriptions from DBPedia:",
    "FEVER": "Given a claim, retrieve documents that support or refute the claim:",
    "FiQA2018": "Given a financial question, retrieve user replies that best answer the question:",
    "HotpotQA": "Given a multi-hop question, retrieve documents that can help answer the question:",
    "MSMARCO": "Given a web search query, retrieve relevant passages that answer the query:",
    "NFCorpus": "Given a question, retrieve relevant documents that best answer the question:",
    "NQ": "Given a question, retrieve Wikipedia passages that answer the question:",
    "QuoraRetrieval": "Given a question, retrieve questions that are semantically equivalent to the given "
                      "question:",
    "SCIDOCS": "Given a scientific paper title, retrieve paper abstracts that are cited by the given paper:",
    "SciFact": "Given a scientific claim, retrieve documents that support or refute the claim:",
    "Touche2020": "Given a question, retrieve detailed and persuasive arguments that answer the question:",
    "TRECCOVID": "Given a query on COVID-19, retrieve documents that answer the query:",
    **{f"CQADupstack{forum}Retrieval": _CQADUPSTACK for forum in (
        "Android", "English", "Gaming", "Gis", "Mathematica", "Physics", "Programmers", "Stats", "Tex",
        "Unix", "Webmasters", "Wordpress")},
    # reranking: the query gets the instruction, the candidates none
    "AskUbuntuDupQuestions": "Retrieve duplicate questions from AskUbuntu forum:",
    "MindSmallReranking": "Retrieve relevant news articles based on user browsing history:",
    "SciDocsRR": "Given a title of a scientific paper, retrieve the titles of other relevant papers:",
    "StackOverflowDupQuestions": "Retrieve duplicate questions from StackOverflow forum:",
    # classification: every text
    "AmazonCounterfactualClassification": "Classify a given Amazon customer review text as either "
                                          "counterfactual or notcounterfactual:",
    "AmazonPolarityClassification": "Classify Amazon reviews into positive or negative sentiment:",
    "AmazonReviewsClassification": "Classify the given Amazon review into its appropriate rating category:",
    "Banking77Classification": "Given a online banking query, find the corresponding intents:",
    "EmotionClassification": "Classify the emotion expressed in the given Twitter message into one of the "
                             "six emotions: anger, fear, joy, love, sadness, and surprise:",
    "ImdbClassification": "Classify the sentiment expressed in the given movie review text from the IMDB "
                          "dataset:",
    "MassiveIntentClassification": "Given a user utterance as query, find the user intents:",
    "MassiveScenarioClassification": "Given a user utterance as query, find the user scenarios:",
    "MTOPDomainClassification": "Classify the intent domain of the given utterance in task-oriented "
                                "conversation:",
    "MTOPIntentClassification": "Classify the intent of the given utterance in task-oriented conversation:",
    "ToxicConversationsClassification": "Classify the given comments as either toxic or not toxic:",
    "TweetSentimentExtractionClassification": "Classify the sentiment of a given tweet as either positive, "
                                              "negative, or neutral:",
    # clustering: every text
    "ArxivClusteringP2P": "Identify the main and secondary category of Arxiv papers based on the titles "
                          "and abstracts:",
    "ArxivClusteringS2S": "Identify the main and secondary category of Arxiv papers based on the titles:",
    "BiorxivClusteringP2P": "Identify the main category of Biorxiv papers based on the titles and abstracts:",
    "BiorxivClusteringS2S": "Identify the main category of Biorxiv papers based on the titles:",
    "MedrxivClusteringP2P": "Identify the main category of Medrxiv papers based on the titles and abstracts:",
    "MedrxivClusteringS2S": "Identify the main category of Medrxiv papers based on the titles:",
    "RedditClustering": "Identify the topic or theme of Reddit posts based on the titles:",
    "RedditClusteringP2P": "Identify the topic or theme of Reddit posts based on the titles and posts:",
    "StackExchangeClustering": "Identify the topic or theme of StackExchange posts based on the titles:",
    "StackExchangeClusteringP2P": "Identify the topic or theme of StackExchange posts based on the given "
                                  "paragraphs:",
    "TwentyNewsgroupsClustering": "Identify the topic or theme of the given news articles:",
    # pair classification, STS, summarisation: both texts of a pair
    "SprintDuplicateQuestions": "Retrieve duplicate questions from Sprint forum:",
    "TwitterSemEval2015": "Retrieve tweets that are semantically similar to the given tweet:",
    "TwitterURLCorpus": "Retrieve tweets that are semantically similar to the given tweet:",
    **{task: _STS for task in ("STS12", "STS13", "STS14", "STS15", "STS16", "STS17", "STS22", "BIOSSES",
                               "SICK-R", "STSBenchmark")},
    "SummEval": "Given a news summary, retrieve other semantically similar summaries:",
}


def as_llm2vec_instruction(prompt: str) -> str:
    """mteb's own task prompts end with "." and LLM2Vec's with ":": "Retrieve ... text." -> "... text:"."""
    prompt = prompt.strip()
    return prompt.rstrip(".") + ":" if prompt and not prompt.endswith(":") else prompt


class LLM2VecMTEB(AbsEncoder):
    """An `LLM2Vec` encoder as an mteb model (`mteb.EncoderProtocol`): `encode` takes mteb's batches of
    texts and returns an (N, hidden) float32 array; mteb compares vectors by cosine similarity."""

    def __init__(self, encoder: LLM2Vec, name: str = "llm2vec-mini/model", revision: str = "local",
                 instructions: Optional[dict] = None):
        self.model = encoder
        self.instructions = dict(INSTRUCTIONS if instructions is None else instructions)
        self.mteb_model_meta = ModelMeta.create_empty(overwrites=dict(
            name=name, revision=revision, similarity_fn_name=ScoringFunction.COSINE, framework=["PyTorch"],
            embed_dim=encoder.hidden_size, max_tokens=encoder.max_length, use_instructions=True))

    @classmethod
    def from_pretrained(cls, path, adapters: Sequence = (), instructions: Optional[dict] = None,
                        **options) -> "LLM2VecMTEB":
        """`LLM2Vec.from_pretrained(path, adapters, **options)` wrapped. mteb files the results under
        the name "llm2vec-mini/<model>+<adapter>..." and a revision that digests the paths and settings."""
        adapters = [adapters] if isinstance(adapters, (str, os.PathLike)) else list(adapters)
        encoder = LLM2Vec.from_pretrained(path, adapters=adapters, **options)
        parts = [Path(p).expanduser().resolve() for p in [path, *adapters]]
        name = "llm2vec-mini/" + "+".join(p.name for p in parts)
        what = json.dumps({"paths": [str(p) for p in parts], **encoder.settings()}, sort_keys=True)
        return cls(encoder, name, hashlib.sha256(what.encode()).hexdigest()[:12], instructions)

    def instruction(self, task_metadata, prompt_type: Optional[PromptType]) -> str:
        """The text put before every input of this call: none for documents; else the official table's
        entry for the task, or mteb's own prompt for it (ending with ":" instead of ".")."""
        if prompt_type == PromptType.document:
            return ""
        if task_metadata.name in self.instructions:
            return self.instructions[task_metadata.name]
        try:
            return as_llm2vec_instruction(self.get_instruction(task_metadata, prompt_type) or "")
        except KeyError:  # a task that mteb does not know by name (a local one) and that has no prompt
            return ""

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str,
               prompt_type: Optional[PromptType] = None, **kwargs) -> np.ndarray:
        """mteb's batches ({"text": [str, ...], ...}) -> (N, hidden) float32, in input order."""
        texts = [text for batch in inputs for text in batch["text"]]
        instruction = self.instruction(task_metadata, prompt_type)
        items = [[instruction, text] for text in texts] if instruction else texts
        return self.model.encode(items, batch_size=kwargs.get("batch_size") or 32,
                                 show_progress_bar=kwargs.get("show_progress_bar"))


def evaluate(model: LLM2VecMTEB, tasks: Sequence, output, batch_size: int = 32) -> dict:
    """Run MTEB tasks (names, or mteb task objects) with `model`; mteb writes its result files under
    `output`/results/<model name>/<revision>/<task>.json (every run anew). -> {task name: main score},
    the scores as mteb reports them (fractions, not x 100)."""
    names = [t for t in tasks if isinstance(t, str)]
    try:
        found = list(mteb.get_tasks(tasks=names)) if names else []
    except KeyError as e:
        raise ConfigError(f"--tasks: {e.args[0] if e.args else e}") from None
    missing = set(names) - {t.metadata.name for t in found}
    if missing:
        raise ConfigError(f"--tasks: mteb has no task named {', '.join(sorted(missing))}")
    result = mteb.evaluate(model, found + [t for t in tasks if not isinstance(t, str)],
                           cache=mteb.ResultCache(cache_path=str(output)), overwrite_strategy="always",
                           encode_kwargs={"batch_size": batch_size})
    return {r.task_name: r.get_score() for r in result.task_results}


def result_folder(model: LLM2VecMTEB, output) -> Path:
    """Where `evaluate` had mteb write this model's result files."""
    meta = model.mteb_model_meta
    return mteb.ResultCache(cache_path=str(output)).get_task_result_path("_", meta).parent
