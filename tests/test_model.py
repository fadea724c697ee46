"""The decoder, block by block, against trusted equivalents; then whole-model parity with transformers."""

import math

import pytest
import torch
from conftest import Reference

from llm2vec_mini import LlamaConfig, LlamaForCausalLM, LlamaModel
from llm2vec_mini.model import (
    LlamaAttention,
    RMSNorm,
    apply_rope,
    build_attention_mask,
    rope_cos_sin,
    rope_inv_freq,
)

transformers = Reference("transformers")
hf_llama = Reference("transformers.models.llama.modeling_llama")
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}


def hf_config(cfg: LlamaConfig) -> transformers.LlamaConfig:
    hc = transformers.LlamaConfig(**cfg.to_hf_config())
    hc._attn_implementation = "eager"  # the plainest reference path
    return hc


def padding_mask(B, T, pads, side):
    """(B, T) mask with pads[b] padding positions on the given side."""
    mask = torch.ones(B, T, dtype=torch.long)
    for b, p in enumerate(pads):
        if p:
            if side == "left":
                mask[b, :p] = 0
            else:
                mask[b, T - p:] = 0
    return mask


# ---------------------------------------------------------------------------------------------
# Blocks

def test_rmsnorm_matches_torch():
    torch.manual_seed(0)
    ours, ref = RMSNorm(48, eps=1e-5), torch.nn.RMSNorm(48, eps=1e-5)
    with torch.no_grad():
        ours.weight.normal_()
        ref.weight.copy_(ours.weight)
    x = torch.randn(3, 7, 48) * 5
    torch.testing.assert_close(ours(x), ref(x), atol=1e-6, rtol=1e-6)


def test_rmsnorm_computes_in_fp32_for_half_inputs():
    norm = RMSNorm(16)
    x = torch.randn(4, 16, dtype=torch.float64).to(torch.bfloat16) * 300
    ref = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    assert norm(x).dtype == torch.float32  # weight is fp32: promotes, as Hugging Face does
    torch.testing.assert_close(norm(x), ref.float(), atol=0, rtol=0)


@pytest.mark.parametrize("scaling", [None, LLAMA3, {"rope_type": "linear", "factor": 4.0}])
def test_rope_matches_transformers(scaling):
    cfg = LlamaConfig.tiny(rope_theta=5000.0, rope_scaling=scaling)
    hc = hf_config(cfg)
    rotary = hf_llama.LlamaRotaryEmbedding(hc)
    torch.testing.assert_close(rope_inv_freq(cfg), rotary.inv_freq, atol=0, rtol=1e-6)
    pos = torch.tensor([[0, 1, 2, 3, 50, 200], [5, 4, 3, 2, 1, 0]])
    x = torch.zeros(2, 6, cfg.head_dim)
    cos_ref, sin_ref = rotary(x, pos)
    cos, sin = rope_cos_sin(rope_inv_freq(cfg), pos, torch.float32)
    torch.testing.assert_close(cos, cos_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, sin_ref, atol=1e-6, rtol=0)
    q, k = torch.randn(2, 4, 6, cfg.head_dim), torch.randn(2, 2, 6, cfg.head_dim)
    q_ref, k_ref = hf_llama.apply_rotary_pos_emb(q, k, cos_ref, sin_ref)
    q_ours, k_ours = apply_rope(q, k, cos, sin)
    torch.testing.assert_close(q_ours, q_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(k_ours, k_ref, atol=1e-6, rtol=1e-6)


def test_rope_scores_depend_only_on_relative_position():
    cfg = LlamaConfig.tiny()
    inv = rope_inv_freq(cfg)
    q, k = torch.randn(1, 1, 1, cfg.head_dim), torch.randn(1, 1, 1, cfg.head_dim)

    def score(m, n):
        cq, sq = rope_cos_sin(inv, torch.tensor([[m]]), torch.float32)
        ck, sk = rope_cos_sin(inv, torch.tensor([[n]]), torch.float32)
        qr, _ = apply_rope(q, q, cq, sq)
        kr, _ = apply_rope(k, k, ck, sk)
        return float((qr * kr).sum())

    assert math.isclose(score(7, 3), score(24, 20), rel_tol=1e-5, abs_tol=1e-5)


def naive_attention(attn: LlamaAttention, x, cos, sin, visible):
    """softmax(q k^T / sqrt(d)) v with einsum, K/V heads repeated by hand, a boolean visibility mask."""
    B, T, _ = x.shape
    nh, nkv, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = (x @ attn.q_proj.weight.T).view(B, T, nh, d).transpose(1, 2)
    k = (x @ attn.k_proj.weight.T).view(B, T, nkv, d).transpose(1, 2)
    v = (x @ attn.v_proj.weight.T).view(B, T, nkv, d).transpose(1, 2)
    q, k = apply_rope(q, k, cos, sin)
    k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
    scores = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(d)
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    y = torch.einsum("bhij,bhjd->bhid", probs, v).transpose(1, 2).reshape(B, T, nh * d)
    return y @ attn.o_proj.weight.T


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("side", [None, "left", "right"])
def test_sdpa_attention_matches_naive_einsum(causal, side):
    torch.manual_seed(1)
    cfg = LlamaConfig.tiny()
    attn = LlamaAttention(cfg).eval()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.2)
    B, T = 3, 9
    x = torch.randn(B, T, cfg.hidden_size)
    am = None if side is None else padding_mask(B, T, [0, 3, 5], side)
    pos = torch.arange(T).expand(B, T)
    cos, sin = rope_cos_sin(rope_inv_freq(cfg), pos, torch.float32)
    mask = build_attention_mask(am, T, causal, torch.float32)
    out = attn(x, cos, sin, mask, is_causal=False)
    # visibility written independently: j <= i if causal, and j must be a real token
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    visible = (j <= i if causal else torch.ones(T, T, dtype=torch.bool)).expand(B, T, T).clone()
    if am is not None:
        visible &= am.bool()[:, None, :]
    ref = naive_attention(attn, x, cos, sin, visible)
    rows = torch.ones(B, T, dtype=torch.bool) if am is None else am.bool()
    torch.testing.assert_close(out[rows], ref[rows], atol=1e-5, rtol=1e-5)


def test_is_causal_fast_path_equals_explicit_mask():
    torch.manual_seed(2)
    cfg = LlamaConfig.tiny()
    attn = LlamaAttention(cfg).eval()
    x = torch.randn(2, 6, cfg.hidden_size)
    cos, sin = rope_cos_sin(rope_inv_freq(cfg), torch.arange(6).expand(2, 6), torch.float32)
    a = attn(x, cos, sin, None, is_causal=True)
    b = attn(x, cos, sin, build_attention_mask(None, 6, True, torch.float32), is_causal=False)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_gqa_equals_mha_with_repeated_kv_heads():
    torch.manual_seed(3)
    gqa_cfg = LlamaConfig.tiny(num_attention_heads=4, num_key_value_heads=2)
    mha_cfg = LlamaConfig.tiny(num_attention_heads=4, num_key_value_heads=4)
    gqa, mha = LlamaAttention(gqa_cfg).eval(), LlamaAttention(mha_cfg).eval()
    d, groups = gqa_cfg.head_dim, 2
    with torch.no_grad():
        for p in gqa.parameters():
            p.normal_(std=0.2)
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
        for name in ("k_proj", "v_proj"):
            w = getattr(gqa, name).weight.view(2, d, -1)  # (n_kv, d, hidden)
            getattr(mha, name).weight.copy_(w.repeat_interleave(groups, dim=0).reshape(4 * d, -1))
    x = torch.randn(2, 5, gqa_cfg.hidden_size)
    cos, sin = rope_cos_sin(rope_inv_freq(gqa_cfg), torch.arange(5).expand(2, 5), torch.float32)
    for causal in (True, False):
        mask = build_attention_mask(None, 5, causal, torch.float32)
        torch.testing.assert_close(gqa(x, cos, sin, mask), mha(x, cos, sin, mask), atol=1e-6, rtol=1e-6)


def test_mask_values_use_finfo_min_and_never_nan():
    am = padding_mask(2, 5, [2, 0], "left")
    mask = build_attention_mask(am, 5, True, torch.float32)
    assert mask.shape == (2, 1, 5, 5)
    assert set(mask.unique().tolist()) == {0.0, torch.finfo(torch.float32).min}
    assert build_attention_mask(None, 5, False, torch.float32) is None
    probs = torch.softmax(torch.zeros(2, 1, 5, 5) + mask, dim=-1)  # a pad row that sees nothing
    assert torch.isfinite(probs).all()


# ---------------------------------------------------------------------------------------------
# Properties of the whole model

def hidden(model, ids, am=None):
    with torch.no_grad():
        return model(ids, am)


@pytest.mark.parametrize("causal", [True, False])
def test_future_tokens_reach_the_past_only_when_bidirectional(causal):
    torch.manual_seed(4)
    model = LlamaModel(LlamaConfig.tiny()).eval().set_causal(causal)
    ids = torch.randint(3, 256, (1, 10))
    changed = ids.clone()
    changed[0, 6] = (ids[0, 6] + 1) % 256
    diff = (hidden(model, ids) - hidden(model, changed)).abs().amax(-1)[0]  # (T,)
    if causal:
        assert diff[:6].max() == 0  # positions 0..5 never see position 6
    else:
        assert (diff[:6] > 1e-4).all()  # every earlier position moves
    assert diff[6] > 1e-4


def test_causal_mask_never_lets_i_see_later_j():
    for side in ("left", "right"):
        am = padding_mask(3, 8, [0, 2, 4], side)
        visible = build_attention_mask(am, 8, True, torch.float32)[:, 0] == 0  # (B, T, T)
        assert not visible.triu(diagonal=1).any()
        bi = build_attention_mask(am, 8, False, torch.float32)[:, 0] == 0
        assert torch.equal(bi, am.bool()[:, None, :].expand(3, 8, 8))  # every real key, any order


@pytest.mark.parametrize("causal", [True, False])
def test_real_token_states_do_not_depend_on_padding(causal):
    torch.manual_seed(5)
    model = LlamaModel(LlamaConfig.tiny()).eval().set_causal(causal)
    ids = torch.randint(3, 256, (1, 6))
    alone = hidden(model, ids)[0]
    pad = torch.full((1, 4), 2)
    left = hidden(model, torch.cat([pad, ids], 1), torch.cat([torch.zeros(1, 4), torch.ones(1, 6)], 1))
    right = hidden(model, torch.cat([ids, pad], 1), torch.cat([torch.ones(1, 6), torch.zeros(1, 4)], 1))
    torch.testing.assert_close(left[0, 4:], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(right[0, :6], alone, atol=1e-5, rtol=0)


def test_attention_dropout_only_in_training():
    torch.manual_seed(6)
    model = LlamaModel(LlamaConfig.tiny(attention_dropout=0.3))
    ids = torch.randint(3, 256, (2, 8))
    model.eval()
    torch.testing.assert_close(hidden(model, ids), hidden(model, ids), atol=0, rtol=0)
    model.train()
    assert not torch.allclose(hidden(model, ids), hidden(model, ids))


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(7)
    model = LlamaForCausalLM(LlamaConfig.tiny()).train()
    ids = torch.randint(3, 256, (2, 8))
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.model.gradient_checkpointing = flag
        model(ids).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_set_causal_rejects_non_bool_and_does_not_touch_the_config():
    cfg = LlamaConfig.tiny()
    model = LlamaForCausalLM(cfg)
    model.set_causal(False)
    assert model.causal is False and model.model.causal is False and cfg.causal is True
    with pytest.raises(TypeError):
        model.set_causal("no")


# ---------------------------------------------------------------------------------------------
# Parity with transformers

CONFIGS = [
    dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),  # GQA, untied
    dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),  # MHA, tied
    dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True, rope_scaling=LLAMA3),
    dict(num_attention_heads=2, num_key_value_heads=1, head_dim=48, rope_theta=100000.0,
         rope_scaling={"rope_type": "linear", "factor": 2.0}),
]


def pair(overrides, seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig.tiny(**overrides)
    ref = transformers.LlamaForCausalLM(hf_config(cfg)).eval()
    with torch.no_grad():  # larger-than-init weights so differences would show
        for p in ref.parameters():
            p.normal_(std=0.1)
    ours = LlamaForCausalLM(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return cfg, ref, ours


@pytest.mark.parametrize("i", range(len(CONFIGS)))
@pytest.mark.parametrize("side", ["left", "right"])
def test_causal_logits_match_transformers(i, side):
    cfg, ref, ours = pair(CONFIGS[i], seed=10 + i)
    B, T = 3, 12
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    am = padding_mask(B, T, [0, 3, 7], side)
    pos = (am.cumsum(-1) - 1).clamp(min=0)  # positions over real tokens, as generate() passes them
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=am, position_ids=pos).logits
        got = ours(ids, am)
    real = am.bool()
    assert (got[real] - expected[real]).abs().max() <= 1e-5
    if side == "right":  # with right padding, transformers' default positions are ours too
        with torch.no_grad():
            default = ref(input_ids=ids, attention_mask=am).logits
        assert (got[real] - default[real]).abs().max() <= 1e-5


@pytest.mark.parametrize("i", range(len(CONFIGS)))
def test_bidirectional_hidden_states_match_transformers_with_a_4d_mask(i):
    cfg, ref, ours = pair(CONFIGS[i], seed=20 + i)
    ours.set_causal(False)
    B, T = 3, 10
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    am = padding_mask(B, T, [0, 2, 6], "left")
    # all-visible additive mask, padding keys hidden; built here, independently of our builder
    mask4d = torch.zeros(B, 1, T, T)
    mask4d.masked_fill_(am[:, None, None, :] == 0, torch.finfo(torch.float32).min)
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = ref.model(input_ids=ids, attention_mask=mask4d, position_ids=pos).last_hidden_state
        got = ours.model(ids, am)
    real = am.bool()
    assert (got[real] - expected[real]).abs().max() <= 1e-5


def test_greedy_generate_matches_transformers():
    cfg, ref, ours = pair(CONFIGS[0], seed=30)
    ids = torch.randint(3, cfg.vocab_size, (2, 5))
    expected = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                            do_sample=False, eos_token_id=None, pad_token_id=0)
    got = ours.set_causal(False).generate(ids, max_new_tokens=6)
    assert torch.equal(got, expected)
    assert ours.causal is False  # generate restores the switch


@pytest.mark.parametrize("preset", ["smollm2_135m", "sheared_llama_1_3b"])
def test_parameter_counts_equal_transformers_on_meta(preset):
    cfg = getattr(LlamaConfig, preset)()
    with torch.device("meta"):
        ours = LlamaForCausalLM(cfg)
        ref = transformers.LlamaForCausalLM(hf_config(cfg))

    def count(m):  # parameters() counts a tied one once
        return sum(p.numel() for p in m.parameters())
    assert count(ours) == count(ref)
    assert set(ours.state_dict()) == set(ref.state_dict())
