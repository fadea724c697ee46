"""Pooling against a naive per-row Python computation (the official functions are compared in
tests/reference/test_official_parity.py, which runs the official library in its own venv)."""

import pytest
import torch

from llm2vec_mini.errors import ConfigError
from llm2vec_mini.pooling import POOLING_MODES, bos_token, eos_token, last_token, mean, pool, weighted_mean

ATOL = dict(rtol=1e-6, atol=1e-6)


def left_padded_batch(lengths, instr_lengths, T, H=5, seed=0):
    """Hidden (B, T, H) and masks for rows of `BOS + instruction + text`, padded on the left."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(len(lengths), T, H, generator=g, dtype=torch.float64)
    attn = torch.zeros(len(lengths), T, dtype=torch.long)
    embed = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, (n_text, n_instr) in enumerate(zip(lengths, instr_lengths)):
        n_real = 1 + n_instr + n_text  # BOS, instruction, text
        attn[i, T - n_real:] = 1
        if n_text:
            embed[i, T - n_text:] = 1
    return hidden, attn, embed


def naive(hidden, attn, embed, mode):
    """One row at a time with Python lists: the definition, written the slow obvious way."""
    out = []
    for i in range(hidden.shape[0]):
        rows = [hidden[i, t] for t in range(hidden.shape[1])]
        pooled = [t for t in range(hidden.shape[1]) if embed[i, t] == 1]
        real = [t for t in range(hidden.shape[1]) if attn[i, t] == 1]
        if mode == "mean":
            idx = pooled if pooled else list(range(hidden.shape[1]))  # official: empty -> whole row
            acc = sum(rows[t] for t in idx)
            out.append(acc / len(idx))
        elif mode == "weighted_mean":
            if not pooled:
                out.append(torch.zeros_like(rows[0]))
                continue
            total = sum(range(1, len(pooled) + 1))
            out.append(sum((k + 1) / total * rows[t] for k, t in enumerate(pooled)))
        elif mode in ("last_token", "eos_token"):
            out.append(rows[real[-1]])
        elif mode == "bos_token":
            out.append(rows[real[0]])
    return torch.stack(out)


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_left_padded_with_instructions_matches_naive(mode):
    hidden, attn, embed = left_padded_batch([3, 1, 6, 2], [0, 4, 1, 2], T=9)
    got = pool(hidden, attn, embed, mode)
    assert got.shape == (4, 5)
    torch.testing.assert_close(got, naive(hidden, attn, embed, mode), **ATOL)


def test_instruction_is_attended_but_not_pooled():
    hidden, attn, embed = left_padded_batch([2], [3], T=7)
    changed = hidden.clone()
    changed[0, 2:5] += 100.0  # the instruction columns (BOS is column 1, the text 5 and 6)
    for mode in ("mean", "weighted_mean"):
        torch.testing.assert_close(pool(changed, attn, embed, mode), pool(hidden, attn, embed, mode))
    assert not torch.allclose(pool(changed, attn, attn, "mean"), pool(hidden, attn, attn, "mean"))


def test_weighted_mean_weights_are_one_two_three():
    hidden = torch.zeros(1, 4, 1, dtype=torch.float64)
    hidden[0, :, 0] = torch.tensor([100.0, 1.0, 2.0, 3.0])  # a pad, then three text tokens
    embed = torch.tensor([[0, 1, 1, 1]])
    expected = (1 * 1.0 + 2 * 2.0 + 3 * 3.0) / 6
    assert weighted_mean(hidden, embed).item() == pytest.approx(expected, abs=1e-12)


def test_empty_embed_mask_rows_follow_the_official_library():
    hidden, attn, embed = left_padded_batch([0, 3], [2, 0], T=6)
    torch.testing.assert_close(mean(hidden, embed)[0], hidden[0].mean(0), **ATOL)  # all T, pads too
    torch.testing.assert_close(weighted_mean(hidden, embed)[0], torch.zeros(5, dtype=torch.float64))


def test_token_modes_also_right_padding():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 6, 4, generator=g)
    attn = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]])
    torch.testing.assert_close(last_token(hidden, attn), hidden[[0, 1, 2], [2, 5, 0]])
    torch.testing.assert_close(eos_token(hidden, attn), hidden[[0, 1, 2], [2, 5, 0]])
    torch.testing.assert_close(bos_token(hidden, attn), hidden[:, 0])
    torch.testing.assert_close(mean(hidden, attn), naive(hidden, attn, attn, "mean"), **ATOL)


def test_no_masks():
    hidden = torch.randn(2, 3, 4)
    torch.testing.assert_close(pool(hidden, None, None, "mean"), hidden.mean(1))
    torch.testing.assert_close(pool(hidden, None, None, "last_token"), hidden[:, -1])
    torch.testing.assert_close(pool(hidden, None, None, "bos_token"), hidden[:, 0])


def test_gradients_reach_only_pooled_tokens():
    hidden, attn, embed = left_padded_batch([2, 3], [1, 0], T=5)
    hidden.requires_grad_(True)
    pool(hidden, attn, embed, "mean").sum().backward()
    touched = hidden.grad.abs().sum(-1) > 0  # (B, T)
    assert torch.equal(touched, embed.bool())


def test_unknown_mode_names_it_and_lists_valid_ones():
    hidden, attn, embed = left_padded_batch([2], [0], T=3)
    with pytest.raises(ValueError) as e:
        pool(hidden, attn, embed, "max")
    assert isinstance(e.value, ConfigError)
    assert "'max'" in str(e.value)
    for m in POOLING_MODES:
        assert m in str(e.value)


def test_bad_shapes_raise():
    with pytest.raises(ConfigError, match="embed_mask"):
        mean(torch.zeros(2, 3, 4), torch.ones(2, 4))
    with pytest.raises(ConfigError, match=r"\(B, T, H\)"):
        pool(torch.zeros(3, 4), None, None, "mean")
