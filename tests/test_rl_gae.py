"""KL-shaped rewards, GAE and masked whitening against the `ppo_toy` golden vectors and hand-computed cases."""

import json
from pathlib import Path

import pytest
import torch

from riskexp.rl.gae import gae, masked_mean, masked_var, masked_whiten, response_bounds, shaped_rewards

TOY = json.loads((Path(__file__).parent / "golden" / "risk_and_rl.json").read_text())["ppo_toy"]
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4}
DTYPES = [torch.float64, torch.float32]


def toy(key, dtype=torch.float64):
    return torch.tensor(TOY[key], dtype=dtype)


def close(actual, expected, dtype=torch.float64):
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert torch.allclose(actual.detach().double(), expected, atol=TOLERANCE[dtype], rtol=0), (actual, expected)


def toy_targets(dtype=torch.float64):
    mask = toy("masks", dtype)
    rewards = shaped_rewards(toy("logprobs", dtype), toy("ref_logprobs", dtype), toy("scores", dtype), mask, TOY["beta"])
    advantages, returns = gae(rewards, toy("values", dtype), mask, gamma=1.0, lam=0.95)
    return mask, rewards, advantages, returns


@pytest.mark.parametrize("dtype", DTYPES)
def test_shaped_rewards_advantages_and_returns_golden(dtype):
    _, rewards, advantages, returns = toy_targets(dtype)
    close(rewards, TOY["shaped_rewards"], dtype)
    close(advantages, TOY["advantages"], dtype)
    close(returns, TOY["returns"], dtype)


def scatter_rows(rows, offsets, width, fill):
    """Place each row's response values at its own offset in a (B, width) tensor filled with `fill`."""
    out = torch.full((len(rows), width), fill, dtype=torch.float64)
    for i, (row, start) in enumerate(zip(rows, offsets)):
        out[i, start : start + len(row)] = torch.tensor(row, dtype=torch.float64)
    return out


def test_left_padding_and_unequal_lengths_match_the_aligned_toy():
    """The toy's responses moved to other columns (left padding and prompts before, right padding after), with
    NaN everywhere outside the mask: the same rewards, advantages and returns, at the moved positions."""
    lengths = [int(sum(row)) for row in TOY["masks"]]  # [3, 3, 3, 2]
    offsets, width = [2, 0, 3, 1], 7
    cut = {k: [row[:n] for row, n in zip(TOY[k], lengths)] for k in ("logprobs", "ref_logprobs", "values")}
    mask = scatter_rows([[1.0] * n for n in lengths], offsets, width, 0.0).bool()
    logp, ref_logp, values = (scatter_rows(cut[k], offsets, width, float("nan")) for k in cut)
    rewards = shaped_rewards(logp, ref_logp, toy("scores"), mask, TOY["beta"])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    assert not torch.isnan(rewards).any() and not torch.isnan(advantages).any() and not torch.isnan(returns).any()
    for name, got in (("shaped_rewards", rewards), ("advantages", advantages), ("returns", returns)):
        expected = scatter_rows([row[:n] for row, n in zip(TOY[name], lengths)], offsets, width, 0.0)
        close(got, expected)
    first, last = response_bounds(mask)
    assert first.tolist() == offsets and last.tolist() == [o + n - 1 for o, n in zip(offsets, lengths)]


def test_the_score_lands_on_each_rows_own_last_response_token():
    mask = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 1, 0]])
    zeros = torch.zeros(3, 5, dtype=torch.float64)
    rewards = shaped_rewards(zeros, zeros, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), mask, 0.5)
    expected = torch.zeros(3, 5, dtype=torch.float64)
    expected[0, 2], expected[1, 4], expected[2, 3] = 1.0, 2.0, 3.0
    assert torch.equal(rewards, expected)


def test_gae_by_hand_with_discounting_and_a_gap_free_row():
    """One row, response at columns 1..2 of 4; gamma = 0.9, lam = 0.5:
    A_2 = r_2 - V_2 = 1 - 0.5 = 0.5;  A_1 = r_1 + 0.9 V_2 - V_1 + 0.45 A_2 = 0 + 0.45 - 0.2 + 0.225 = 0.475."""
    mask = torch.tensor([[0, 1, 1, 0]])
    rewards = torch.tensor([[7.0, 0.0, 1.0, 7.0]], dtype=torch.float64)
    values = torch.tensor([[5.0, 0.2, 0.5, 5.0]], dtype=torch.float64)
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    close(advantages, [[0.0, 0.475, 0.5, 0.0]])
    close(returns, [[0.0, 0.675, 1.0, 0.0]])


def trl_gae(rewards, values, mask, gamma, lam):
    """trl 0.7 `compute_advantages` for right-padded rows, transcribed (values and rewards masked first)."""
    values, rewards = values * mask, rewards * mask
    last, reversed_advantages, length = 0, [], rewards.shape[-1]
    for t in reversed(range(length)):
        next_values = values[:, t + 1] if t < length - 1 else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last = delta + gamma * lam * last
        reversed_advantages.append(last)
    advantages = torch.stack(reversed_advantages[::-1]).transpose(0, 1)
    return advantages, advantages + values


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0)])
def test_gae_equals_trl_on_right_padded_rows(gamma, lam):
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([1, 5, 3, 8, 6])
    mask = (torch.arange(8)[None, :] < lengths[:, None]).double()
    rewards = torch.randn(5, 8, dtype=torch.float64, generator=g) * mask
    values = torch.randn(5, 8, dtype=torch.float64, generator=g)
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    expected_a, expected_r = trl_gae(rewards, values, mask, gamma, lam)
    close(advantages, expected_a * mask)
    close(returns, expected_r * mask)


def test_lambda_one_gives_the_monte_carlo_return_to_go():
    _, rewards, _, _ = toy_targets()
    mask = toy("masks")
    _, returns = gae(rewards, toy("values"), mask, gamma=1.0, lam=1.0)
    to_go = rewards.flip(-1).cumsum(-1).flip(-1) * mask
    close(returns, to_go)
    close(returns[:, 0], TOY["mc_shaped_return"])


def test_targets_are_detached_and_inputs_untouched():
    mask = toy("masks")
    logp = toy("logprobs").requires_grad_(True)
    values = toy("values").requires_grad_(True)
    originals = [t.detach().clone() for t in (logp, values, mask)]
    rewards = shaped_rewards(logp, toy("ref_logprobs"), toy("scores"), mask, torch.tensor(0.2, requires_grad=True))
    advantages, returns = gae(rewards, values, mask)
    assert not rewards.requires_grad and not advantages.requires_grad and not returns.requires_grad
    for before, after in zip(originals, (logp, values, mask)):
        assert torch.equal(before, after.detach())


@pytest.mark.parametrize("dtype", DTYPES)
def test_whitening_over_a_mask_matches_trl(dtype):
    """trl's masked_whiten: mean and unbiased variance over the masked entries only, eps 1e-8."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, dtype=torch.float64, generator=g).to(dtype)
    mask = torch.rand(4, 6, generator=g) > 0.4
    picked = x[mask].double()
    expected = (x.double() - picked.mean()) / torch.sqrt(picked.var(unbiased=True) + 1e-8) * mask
    close(masked_whiten(x, mask), expected, dtype)
    unshifted = masked_whiten(x, mask.long(), shift_mean=False)
    close(unshifted, (expected + picked.mean()) * mask, dtype)
    whitened = masked_whiten(x, mask)[mask]
    assert whitened.mean().item() == pytest.approx(0.0, abs=TOLERANCE[dtype])
    assert whitened.double().var().item() == pytest.approx(1.0, abs=1e-3 if dtype == torch.float32 else 1e-6)


def test_whitening_ignores_what_lies_outside_the_mask():
    x = torch.tensor([[1.0, 2.0, float("nan")], [3.0, float("inf"), 5.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    picked = torch.tensor([1.0, 2.0, 3.0, 5.0], dtype=torch.float64)
    assert masked_mean(x, mask).item() == pytest.approx(picked.mean().item())
    assert masked_var(x, mask).item() == pytest.approx(picked.var(unbiased=True).item())
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(picked.var(unbiased=False).item())
    whitened = masked_whiten(x, mask)
    assert torch.isfinite(whitened).all() and whitened[0, 2] == 0 and whitened[1, 1] == 0
    assert torch.allclose(masked_mean(x, mask, dim=-1), torch.tensor([1.5, 4.0], dtype=torch.float64))


def test_bad_arguments_are_named():
    mask = toy("masks")
    logp, scores = toy("logprobs"), toy("scores")
    with pytest.raises(ValueError, match=r"ref_logp \(4, 2\) do not match"):
        shaped_rewards(logp, logp[:, :2], scores, mask, 0.2)
    with pytest.raises(ValueError, match=r"scores has shape \(3,\)"):
        shaped_rewards(logp, logp, scores[:3], mask, 0.2)
    with pytest.raises(ValueError, match="beta_kl=-0.1"):
        shaped_rewards(logp, logp, scores, mask, -0.1)
    empty = mask.clone()
    empty[2] = 0
    with pytest.raises(ValueError, match=r"rows \[2\] have no response token"):
        shaped_rewards(logp, logp, scores, empty, 0.2)
    with pytest.raises(ValueError, match="lam=1.5"):
        gae(logp, logp, mask, lam=1.5)
    with pytest.raises(ValueError, match="gamma=-1"):
        gae(logp, logp, mask, gamma=-1)
    with pytest.raises(ValueError, match=r"values \(4, 2\)"):
        gae(logp, logp[:, :2], mask)
    with pytest.raises(ValueError, match=r"mask has shape \(3,\)"):
        gae(logp[0], logp[0], mask[0])
    one = torch.zeros_like(mask)
    one[0, 0] = 1
    with pytest.raises(ValueError, match=r"holds 1 token\(s\)"):
        masked_whiten(logp, one)
