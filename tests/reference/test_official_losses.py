"""The official training losses, run through the driver, against naive numpy computations.

These pin down the two facts our MNTP and SimCSE code must reproduce: the MNTP loss scores the
token at i from the output at i-1 (the causal-LM shift, kept in a bidirectional model), and
HardNegativeNLLLoss is cross-entropy over scaled cosine similarities with in-batch positives on the
diagonal (hard negatives appended as extra columns).
"""

import numpy as np
from reference_tier import run_official


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def naive_hard_negative_loss(q, d, neg, scale):
    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)
    docs = d if neg is None else np.concatenate([d, neg])
    scores = scale * unit(q) @ unit(docs).T  # (B, B or 2B)
    return -np.mean([log_softmax(scores[i])[i] for i in range(len(q))])


def test_official_hard_negative_loss(tmp_path):
    g = np.random.default_rng(0)
    q, d, neg = (g.standard_normal((4, 8)) for _ in range(3))
    np.savez(tmp_path / "pos.npz", q=q, d=d)
    np.savez(tmp_path / "neg.npz", q=q, d=d, neg=neg)
    jobs = [dict(inputs=str(tmp_path / "pos.npz"), scale=20.0, out=str(tmp_path / "pos-out.npz")),
            dict(inputs=str(tmp_path / "neg.npz"), scale=50.0, out=str(tmp_path / "neg-out.npz"))]
    run_official("loss", {"jobs": jobs}, tmp_path)
    pos, negative = np.load(jobs[0]["out"]), np.load(jobs[1]["out"])
    np.testing.assert_allclose(pos["loss"], naive_hard_negative_loss(q, d, None, 20.0), rtol=1e-10)
    np.testing.assert_allclose(negative["loss"], naive_hard_negative_loss(q, d, neg, 50.0), rtol=1e-10)
    assert pos["grad_q"].shape == q.shape and np.abs(pos["grad_d"]).sum() > 0
    assert negative["grad_neg"].shape == neg.shape


def test_official_mntp_loss_is_shifted(tiny_llm2vec, tmp_path):
    g = np.random.default_rng(1)
    vocab = tiny_llm2vec["config"]["vocab_size"]
    input_ids = g.integers(3, vocab, size=(2, 10))
    labels = np.full_like(input_ids, -100)
    labels[0, [0, 3, 7]] = input_ids[0, [0, 3, 7]]  # column 0 can never be scored
    labels[1, [1, 9]] = input_ids[1, [1, 9]]
    np.savez(tmp_path / "in.npz", input_ids=input_ids, attention_mask=np.ones_like(input_ids), labels=labels)
    jobs = [dict(base=tiny_llm2vec["base"], adapter=adapter, inputs=str(tmp_path / "in.npz"),
                 out=str(tmp_path / f"out{i}.npz"))
            for i, adapter in enumerate([None, tiny_llm2vec["mntp"]])]
    run_official("mntp-loss", {"jobs": jobs}, tmp_path)
    losses = []
    for job in jobs:
        out = np.load(job["out"])
        logp = log_softmax(out["logits"].astype(np.float64))  # (B, T, V)
        terms = [-logp[b, t - 1, labels[b, t]]
                 for b in range(2) for t in range(1, 10) if labels[b, t] != -100]
        np.testing.assert_allclose(out["loss"], np.mean(terms), rtol=1e-5)
        losses.append(float(out["loss"]))
    assert abs(losses[0] - losses[1]) > 1e-4  # the MNTP adapter is really applied
