"""Our encoder and pooling against the official llm2vec 0.2.3 (`LLM2Vec.encode`, `get_pooling`).

The bar is the official embeddings themselves: 1 - cos <= 1e-5 for every sentence, on a tiny random
Llama with two random LoRA adapters (MNTP merged, SimCSE on top), for each pooling mode, with and
without instructions, truncation, causal attention and a model without the SimCSE adapter.
The official side also checks itself (the adapters and settings change its output, batching does
not), so a parity failure cannot hide behind a reference that ignores its inputs.
"""


import numpy as np
import pytest
import torch
from reference_tier import cosine_distance, official_encode, run_official

TOL = 1e-5  # 1 - cos per sentence

LONG = " ".join(f"Sentence number {i} talks about topic {i % 7}, which is fine." for i in range(12))
PLAIN = [
    "The cat sat on the mat.",
    "A man is playing a guitar.",
    "  leading and trailing spaces  ",
    "Unicode: café naïve 日本語 🙂",
    "multi\nline\ttext with  double  spaces",
    "ends with the end token </s>",
    "x",
    LONG,
]
PAIRS = [
    ["Retrieve semantically similar text: ", "The cat sat on the mat."],
    ["Given a question, retrieve passages that answer it:", "Who wrote the Odyssey?"],
    ["", "No instruction at all."],
    ["Classify the sentiment", "  I loved it!  "],
    ["Summarize:", LONG],
]


# 18 texts of 1 to about 150 tokens, with and without instructions (one call of the official encode
# takes either strings or pairs, so the plain texts come as pairs with an empty instruction)
MIXED = PAIRS + [["", t] for t in PLAIN + [p[1] for p in PAIRS]]


def parity_jobs(kind: str) -> dict:
    """name -> official encode job (any key the driver's `encode` takes)."""
    modes = ["mean", "weighted_mean", "eos_token", "last_token"]
    modes += ["bos_token"] if kind == "llama-spm" else []
    jobs = {f"plain-{m}": dict(texts=PLAIN, pooling_mode=m, batch_size=3) for m in modes}
    jobs.update({
        "pairs-mean": dict(texts=PAIRS, pooling_mode="mean", batch_size=2),
        "pairs-mean-keep-instruction": dict(texts=PAIRS, pooling_mode="mean", skip_instruction=False,
                                            batch_size=2),
        "pairs-weighted_mean": dict(texts=PAIRS, pooling_mode="weighted_mean", batch_size=2),
        "pairs-eos_token": dict(texts=PAIRS, pooling_mode="eos_token", batch_size=2),
        "truncated": dict(texts=PLAIN + [p[1] for p in PAIRS], pooling_mode="mean", max_length=24,
                          doc_max_length=10, batch_size=4),
        "causal": dict(texts=PLAIN, pooling_mode="mean", enable_bidirectional=False, batch_size=3),
        "merged-simcse": dict(texts=PLAIN, pooling_mode="mean", merge_peft=True, batch_size=3),
        "mntp-only": dict(texts=PLAIN, pooling_mode="mean", peft=None, batch_size=3),
        "empty-text": dict(texts=["", "A short one.", "and a somewhat longer second sentence"],
                           pooling_mode="mean", batch_size=3),
        # texts of mixed lengths (with and without instructions) one at a time and in uneven batches
        "mixed-batch1": dict(texts=MIXED, pooling_mode="mean", batch_size=1),
        "mixed-batch7": dict(texts=MIXED, pooling_mode="mean", batch_size=7),
        # official self-checks only
        "plain-mean-batch1": dict(texts=PLAIN, pooling_mode="mean", batch_size=1),
    })
    return jobs


@pytest.fixture(scope="session")
def official(tiny_llm2vec):
    """name -> (embeddings (N, H), info, job): every official job of one fixture, in one process."""
    jobs = parity_jobs(tiny_llm2vec["kind"])
    results = official_encode(tiny_llm2vec, list(jobs.values()), "parity")
    return {name: (emb, info, job) for (name, job), (emb, info) in zip(jobs.items(), results)}


# --- the official library, end to end, and its own consistency ------------------------------------

def test_official_driver_encodes_end_to_end(official, tiny_llm2vec):
    emb, info, _ = official["plain-mean"]
    assert emb.shape == (len(PLAIN), tiny_llm2vec["config"]["hidden_size"]) and emb.dtype == np.float32
    assert np.isfinite(emb).all()
    assert info["model_class"] == "PeftModel"  # SimCSE adapter on top, not merged (merge_peft=False)
    assert info["attn_implementation"] == "sdpa"
    assert info["padding_side"] == "left" and info["pad_token_id"] == tiny_llm2vec["config"]["eos_token_id"]
    assert (info["pooling_mode"], info["max_length"], info["doc_max_length"], info["skip_instruction"]) == \
        ("mean", 512, 400, True)
    seen = []
    for batch in info["batches"]:
        for ids, attn, embed, text in zip(batch["input_ids"], batch["attention_mask"], batch["embed_mask"],
                                          batch["texts"]):
            n_pad = attn.index(1)
            assert attn == [0] * n_pad + [1] * (len(attn) - n_pad)  # left padding
            assert all(e <= a for e, a in zip(embed, attn))  # pooled tokens are real tokens
            assert ids[:n_pad] == [tiny_llm2vec["config"]["eos_token_id"]] * n_pad  # pad = eos
            if tiny_llm2vec["kind"] == "llama-spm":
                assert ids[n_pad] == 1 and embed[n_pad] == 0  # BOS first, attended, never pooled
            assert text.startswith("!@#$%^&*()")  # no instruction: the separator opens the text
            seen.append(text)
    # longest (in characters) first, as encode() sorts before batching
    assert [len(t) for t in seen] == sorted((len(t) for t in seen), reverse=True)


def test_official_output_depends_on_adapters_and_attention_not_on_batching(official):
    ref = official["plain-mean"][0]
    assert cosine_distance(ref, official["plain-mean-batch1"][0]).max() <= TOL
    assert cosine_distance(ref, official["merged-simcse"][0]).max() <= TOL
    for other in ("mntp-only", "causal"):  # every row changes but "x", which may be one token
        assert (cosine_distance(ref, official[other][0]) > 1e-4).sum() >= len(PLAIN) - 1, other
    assert cosine_distance(ref, official["plain-weighted_mean"][0]).max() > 1e-3  # "x": one token, equal
    assert cosine_distance(official["pairs-mean"][0], official["pairs-mean-keep-instruction"][0]).max() > 1e-4


def test_official_eos_pooling_appends_the_eos_text(official, tiny_llm2vec):
    _, info, _ = official["plain-eos_token"]
    for batch in info["batches"]:
        for text, ids in zip(batch["texts"], batch["input_ids"]):
            assert text.endswith(" </s>")  # LlamaConfig: " </s>" is appended whatever the vocabulary
            if tiny_llm2vec["kind"] == "llama-spm" and text.count("</s>") == 1:
                assert ids[-2:] == [29871, 2]  # a lone "▁" then </s>: Llama's legacy tokenisation


# --- official pooling functions against ours -------------------------------------------------------

@pytest.mark.parametrize("skip_instruction", [True, False])
def test_official_get_pooling_matches_ours(tmp_path, skip_instruction):
    from llm2vec_mini.pooling import POOLING_MODES, pool

    g = np.random.default_rng(0)
    B, T, H = 5, 9, 6
    hidden = g.standard_normal((B, T, H)).astype(np.float32)
    attention_mask = np.zeros((B, T), np.int64)
    embed_mask = np.zeros((B, T), np.int64)
    input_ids = np.full((B, T), 2, np.int64)  # pads are EOS
    for i, (n_instr, n_text) in enumerate([(0, 3), (2, 4), (3, 0), (0, 8), (1, 1)]):
        n_real = 1 + n_instr + n_text
        attention_mask[i, T - n_real:] = 1
        embed_mask[i, T - n_text:] = 1 if n_text else 0
        input_ids[i, T - n_real] = 1  # BOS
        input_ids[i, T - n_real + 1:] = g.integers(3, 100, n_real - 1)
    np.savez(tmp_path / "inputs.npz", hidden=hidden, attention_mask=attention_mask,
             embed_mask=embed_mask, input_ids=input_ids)
    jobs = [dict(mode=m, skip_instruction=skip_instruction, inputs=str(tmp_path / "inputs.npz"),
                 out=str(tmp_path / f"{m}.npy"), bos_token_id=1) for m in POOLING_MODES]
    run_official("pool", {"jobs": jobs}, tmp_path)
    pooled_mask = embed_mask if skip_instruction else attention_mask
    for job in jobs:
        ours = pool(torch.from_numpy(hidden), torch.from_numpy(attention_mask),
                    torch.from_numpy(pooled_mask), job["mode"])
        torch.testing.assert_close(ours, torch.from_numpy(np.load(job["out"])), rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{job['mode']}: {m}")


# --- our encoder against the official one ---------------------------------------------------------

def our_encode(tiny: dict, job: dict) -> np.ndarray:
    """Our encoder on one official job: base weights plus the adapters in order (MNTP, then SimCSE)."""
    encoder = pytest.importorskip("llm2vec_mini.encoder", reason="llm2vec_mini.encoder not written yet")
    adapters = [tiny["mntp"]] + ([job.get("peft", tiny["simcse"])] if job.get("peft", tiny["simcse"]) else [])
    model = encoder.LLM2Vec.from_pretrained(
        tiny["base"], adapters=adapters, pooling=job.get("pooling_mode"),
        bidirectional=job.get("enable_bidirectional", True), max_length=job.get("max_length"),
        doc_max_length=job.get("doc_max_length"), skip_instruction=job.get("skip_instruction"),
        device="cpu", dtype="float32")
    return np.asarray(model.encode(job["texts"], batch_size=job.get("batch_size", 32)), np.float32)


# llm2vec_mini.encoder documents this one difference on purpose: an empty text is pooled over its
# own tokens, where the official mean averages the whole padded row (so it depends on the batch).
DELIBERATE = {"empty-text": "empty text: official mean averages the batch's padding too (see encoder.py)"}
# For any LlamaConfig the official eos_token mode appends the literal text " </s>", which is the eos
# token only in Llama-2's vocabulary; we append the tokenizer's own eos token (see encoder.py).
EOS_TEXT = "eos_token with a non-Llama-2 vocabulary: official appends the text ' </s>', we the eos token"


def assert_parity(name, ours, ref):
    """The issue's measure: 1 - cos <= 1e-5 and max |ours - official| <= 2e-4 * max |official|."""
    assert ours.shape == ref.shape
    dist = cosine_distance(ours, ref)
    assert dist.max() <= TOL, f"{name}: 1 - cos per sentence = {np.array2string(dist, precision=2)}"
    assert np.abs(ours - ref).max() <= 2e-4 * np.abs(ref).max(), name


@pytest.mark.parametrize("name", [n for n in parity_jobs("llama-spm") if n != "plain-mean-batch1"])
def test_our_encoder_matches_official(official, tiny_llm2vec, name):
    if name not in official:
        pytest.skip(f"{name} does not apply to {tiny_llm2vec['kind']} (no BOS token)")
    ref, _, job = official[name]
    ours = our_encode(tiny_llm2vec, job)
    if name in DELIBERATE:
        dist = cosine_distance(ours, ref)
        assert dist[1:].max() <= TOL  # the non-empty texts of that batch still match
        pytest.xfail(DELIBERATE[name])
    if "eos_token" in name and tiny_llm2vec["kind"] != "llama-spm":
        assert cosine_distance(ours, ref).max() > TOL  # the difference is real, and documented
        pytest.xfail(EOS_TEXT)
    assert_parity(name, ours, ref)
