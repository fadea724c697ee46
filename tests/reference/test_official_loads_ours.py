"""What we write, the official llm2vec 0.2.3 reads: a directory saved by `LLM2Vec.save`, and the MNTP
and SimCSE adapters our trainers produce (`train-mntp`, `train-simcse`), loaded the Hub's way:
`LLM2Vec.from_pretrained(mntp_folder, peft_model_name_or_path=simcse_folder)`. The official
embeddings must equal ours under the tier's measure.
"""

import json

import numpy as np
import pytest
from reference_tier import cosine_distance, official_encode
from test_official_parity import MIXED, assert_parity

CORPUS = [
    "The cat sat on the mat while the dog slept by the door.",
    "A man is playing a guitar in the park on a sunny afternoon.",
    "Stock markets fell sharply after the announcement on Monday.",
    "She read the whole novel in one night and loved the ending.",
    "Rain is expected across the north of the country this weekend.",
    "The committee will meet again next month to discuss the budget.",
]


@pytest.fixture(scope="module")
def trained(tiny_llm2vec, tmp_path_factory):
    """Our MNTP and SimCSE adapters, trained for a few steps on the fixture's base model."""
    from llm2vec_mini.cli import main

    root = tmp_path_factory.mktemp(f"ours-{tiny_llm2vec['kind']}")
    text = root / "corpus.txt"
    text.write_text("\n".join(CORPUS * 6) + "\n")
    common = ["--steps", "3", "--batch-size", "4", "--lr", "1e-2", "--lora-r", "4", "--lora-alpha", "8",
              "--device", "cpu"]
    assert main(["train-mntp", "--model", tiny_llm2vec["base"], "--data", str(text), "--output",
                 str(root / "mntp"), "--block-size", "16", *common]) == 0
    assert main(["train-simcse", "--model", tiny_llm2vec["base"], "--adapter", str(root / "mntp"),
                 "--data", str(text), "--output", str(root / "simcse"), "--max-length", "24", *common]) == 0
    return root / "mntp", root / "simcse"


def test_official_loads_our_trained_adapters_the_hub_way(tiny_llm2vec, trained, tmp_path):
    from llm2vec_mini.encoder import LLM2Vec

    mntp, simcse = trained
    jobs = [dict(texts=MIXED, base=str(mntp), peft=str(simcse), batch_size=7),
            dict(texts=MIXED, base=str(mntp), peft=None, batch_size=7)]
    (ref, info), (ref_mntp_only, _) = official_encode(dict(tiny_llm2vec, work=tmp_path), jobs, "trained")
    assert info["pooling_mode"] == "mean"  # read from our SimCSE folder's llm2vec_config.json
    ours = LLM2Vec.from_pretrained(tiny_llm2vec["base"], adapters=[mntp, simcse], device="cpu",
                                   dtype="float32")  # fp32: the parity below is to 1e-5
    assert_parity("our adapters in the official library", ours.encode(MIXED, batch_size=7), ref)
    # the MNTP folder as a model, as there
    ours_mntp = LLM2Vec.from_pretrained(mntp, device="cpu", dtype="float32")
    assert_parity("our MNTP folder in the official library", ours_mntp.encode(MIXED, batch_size=7),
                  ref_mntp_only)
    assert cosine_distance(ref, ref_mntp_only).max() > 1e-6  # the SimCSE adapter did change something


def test_official_loads_a_directory_we_saved(tiny_llm2vec, trained, tmp_path):
    from llm2vec_mini.encoder import LLM2Vec

    mntp, simcse = trained
    ours = LLM2Vec.from_pretrained(tiny_llm2vec["base"], adapters=[mntp, simcse], pooling="weighted_mean",
                                   doc_max_length=12, device="cpu", dtype="float32")
    saved = ours.save(tmp_path / "saved")
    assert set(json.loads((saved / "llm2vec_config.json").read_text())) == {
        "pooling_mode", "max_length", "doc_max_length", "skip_instruction"}
    (ref, info), = official_encode(dict(tiny_llm2vec, work=tmp_path),
                                   [dict(texts=MIXED, base=str(saved), peft=None, batch_size=7)], "saved")
    assert (info["pooling_mode"], info["doc_max_length"]) == ("weighted_mean", 12)  # our settings file
    assert_parity("our saved directory in the official library", ours.encode(MIXED, batch_size=7), ref)
    assert np.isfinite(ref).all()
