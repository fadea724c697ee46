"""SmolLM2-135M, a real model: our encoder against the official llm2vec on 200 STS-B dev sentences.

SmolLM2 comes as a Q4_1 GGUF file, which transformers 4.44 cannot read, so we dequantise it once and
write an HF directory (fp32 safetensors, config.json, tokenizer.json with "a b" merges) that both
stacks load. Mean pooling, with and without an instruction, batch size 32.
"""

import pytest
from reference_tier import _data_dir, cosine_distance, official_encode
from test_official_parity import assert_parity

INSTRUCTION = "Retrieve semantically similar text:"


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    import os

    from llm2vec_mini.convert.hf import load_pretrained, save_hf_dir
    from llm2vec_mini.hub import smollm2_path
    try:
        gguf = smollm2_path()
    except FileNotFoundError as e:
        if os.environ.get("LLM2VEC_MINI_REQUIRE_DATA") == "1":
            pytest.fail(str(e))
        pytest.skip(str(e))
    model, tokenizer = load_pretrained(gguf)
    return save_hf_dir(model, tokenizer, tmp_path_factory.mktemp("smollm2") / "hf")


@pytest.fixture(scope="module")
def sentences():
    from llm2vec_mini.data import load_sts
    dev = load_sts(_data_dir() / "stsbenchmark" / "sts-dev.csv")[0]
    return list(dev.sentences1[:100]) + list(dev.sentences2[:100])


def test_smollm2_mean_embeddings_match_official(smollm2_dir, sentences, tmp_path):
    from llm2vec_mini.encoder import LLM2Vec

    pairs = [[INSTRUCTION, s] for s in sentences]
    jobs = [dict(texts=sentences, pooling_mode="mean", batch_size=32),
            dict(texts=pairs, pooling_mode="mean", batch_size=32)]
    fixture = {"work": tmp_path, "mntp": str(smollm2_dir), "simcse": None}
    (plain_ref, info), (pairs_ref, _) = official_encode(fixture, jobs, "smollm2")
    assert info["padding_side"] == "left"
    ours = LLM2Vec.from_pretrained(smollm2_dir, pooling="mean", device="cpu", dtype="float32")
    plain = ours.encode(sentences, batch_size=32)
    with_instruction = ours.encode(pairs, batch_size=32)
    assert_parity("smollm2", plain, plain_ref)
    assert_parity("smollm2-instruction", with_instruction, pairs_ref)
    # the instruction matters (a test that could not tell the two apart would prove little)
    assert cosine_distance(plain_ref, pairs_ref).mean() > 1e-3
    print(f"max 1-cos: {cosine_distance(plain, plain_ref).max():.2e} (plain), "
          f"{cosine_distance(with_instruction, pairs_ref).max():.2e} (instruction)")
