"""RA-RLHF's soft-risk schedule and tail selection against the `schedule`, `selection` and `ppo_toy` golden values."""

import json
import math
from pathlib import Path

import pytest
import torch

from riskexp.rl.gae import gae, masked_whiten, shaped_rewards
from riskexp.rl.kl_control import AdaptiveKLController
from riskexp.rl.soft_risk import soft_risk_count, soft_risk_level
from riskexp.rl.tail import (
    choose_kl_input,
    entropic_episode_weights,
    kept_token_mask,
    kl_controller_inputs,
    lambda_return_first_token,
    mc_shaped_return,
    ranking_statistic,
    select_tail,
)

GOLDEN = json.loads((Path(__file__).parent / "golden" / "risk_and_rl.json").read_text())
TOY = GOLDEN["ppo_toy"]
RETURNS = torch.tensor(GOLDEN["returns"], dtype=torch.float64)
F64 = torch.float64


def toy(key):
    return torch.tensor(TOY[key], dtype=F64)


def close(actual, expected, atol=1e-6):
    expected = torch.as_tensor(expected, dtype=F64)
    assert torch.allclose(actual.detach().double(), expected, atol=atol, rtol=0), (actual, expected)


# ---------------------------------------------------------------------------------------------------------
# Soft-risk schedule
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", GOLDEN["schedule"], ids=lambda c: f"B{c['B']}-a{c['alpha']}-M{c['M']}")
def test_new_schedule_counts_golden(config):
    args = dict(batch_size=config["B"], alpha=config["alpha"], n=config["n"], rho=config["rho"], M=config["M"])
    got = {m: soft_risk_count(int(m), **args) for m in config["kept"]}
    assert got == config["kept"]


# the research brief's table (shared/research/ra_rlhf.md, section 5.1) for the CeSoR-style "old" scheduler
OLD_TABLE = {
    (0.4, 194): {0: 128, 30: 128, 31: 128, 50: 120, 100: 99, 150: 78, 184: 64, 185: 64, 193: 61},
    (0.2, 288): {0: 128, 30: 128, 31: 128, 50: 121, 100: 102, 200: 65, 273: 38, 274: 37, 287: 32},
}


@pytest.mark.parametrize("alpha, M", list(OLD_TABLE))
def test_old_schedule_counts_match_the_table(alpha, M):
    got = {m: soft_risk_count(m, 128, alpha, 30, 0.95, M, schedule="old") for m in OLD_TABLE[alpha, M]}
    assert got == OLD_TABLE[alpha, M]


@pytest.mark.parametrize("schedule", ["new", "old"])
def test_schedule_levels_fall_from_one_to_alpha(schedule):
    levels = [soft_risk_level(m, 0.2, 30, 0.95, 288, schedule) for m in range(400)]
    assert levels[:31] == [1.0] * 31 and all(0.2 <= x <= 1.0 for x in levels)
    assert all(a >= b for a, b in zip(levels, levels[1:]))
    assert levels[-1] == pytest.approx(0.2)
    assert soft_risk_level(274, 0.2, 30, 0.95, 288) == 0.2  # the new schedule reaches alpha at ceil(rho M)


def test_a_warm_start_past_rho_m_never_becomes_risk_averse():
    # the reference's exploratory n = 240 with M = 194: the whole batch at every iteration
    assert {soft_risk_count(m, 128, 0.2, 240, 0.9, 194) for m in range(194)} == {128}
    assert soft_risk_count(0, 128, 1.0, 0, 0.95, 194) == 128  # alpha = 1 is plain PPO


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(alpha=0.0), "alpha=0.0"),
        (dict(alpha=1.5), "alpha=1.5"),
        (dict(schedule="linear"), "schedule='linear' is unknown; accepted: new, old"),
        (dict(rho=0.0), "rho=0.0"),
        (dict(M=0), "M=0"),
        (dict(m=-1), "m=-1"),
        (dict(n=-2), "n=-2"),
        (dict(batch_size=0), "batch_size=0"),
        (dict(M=194.0), "M=194.0"),
    ],
)
def test_bad_schedule_arguments_are_named(kwargs, message):
    args = dict(m=40, batch_size=128, alpha=0.4, n=30, rho=0.95, M=194, schedule="new") | kwargs
    with pytest.raises(ValueError, match=message):
        soft_risk_count(**args)


# ---------------------------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep_ties", [False, True])
@pytest.mark.parametrize("case", GOLDEN["selection"], ids=lambda c: f"k{c['k']}")
def test_selection_golden(case, keep_ties):
    before = RETURNS.clone()
    selection = select_tail(RETURNS, case["k"], keep_ties=keep_ties)
    assert selection.kept.nonzero().flatten().tolist() == case["kept_indices"]
    assert selection.threshold.item() == pytest.approx(case["threshold"], abs=1e-12)
    assert selection.tail_mean.item() == pytest.approx(case["tail_mean"], abs=1e-12)
    assert selection.count == case["k"] and torch.equal(RETURNS, before)


def test_the_toy_schedule_drives_the_selection():
    toy_config = GOLDEN["schedule"][0]
    ks = [soft_risk_count(m, 8, toy_config["alpha"], toy_config["n"], toy_config["rho"], toy_config["M"])
          for m in (2, 4, 6, 8)]
    assert ks == [case["k"] for case in GOLDEN["selection"]]


def test_ties_exactly_k_by_default_or_all_of_them_as_the_reference():
    statistic = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, -1.0])
    exact = select_tail(statistic, 3)
    assert exact.kept.tolist() == [False, True, True, False, False, True] and exact.count == 3
    ties = select_tail(statistic, 3, keep_ties=True)
    assert ties.kept.tolist() == [False, True, True, True, False, True] and ties.count == 4
    assert exact.threshold.item() == ties.threshold.item() == 0.0


def test_bad_selection_arguments_are_named():
    with pytest.raises(ValueError, match=r"k=0 episodes cannot be kept from a batch of 8"):
        select_tail(RETURNS, 0)
    with pytest.raises(ValueError, match=r"k=9 .* accepted are integers in \[1, 8\]"):
        select_tail(RETURNS, 9)
    with pytest.raises(ValueError, match=r"statistic has shape \(2, 4\)"):
        select_tail(RETURNS.reshape(2, 4), 2)
    with pytest.raises(ValueError, match=r"NaN at rows \[1\]"):
        select_tail(torch.tensor([0.0, float("nan"), 1.0]), 1)
    with pytest.raises(ValueError, match=r"kept has shape \(3,\)"):
        kept_token_mask(toy("masks"), torch.ones(3, dtype=torch.bool))


def test_kept_token_mask_is_new_and_keeps_the_dtype():
    mask = toy("masks")
    kept = torch.tensor([False, True, False, True])
    before = mask.clone()
    out = kept_token_mask(mask, kept)
    assert out.dtype == mask.dtype and torch.equal(out, mask * kept[:, None]) and torch.equal(mask, before)
    assert out.data_ptr() != mask.data_ptr()
    assert torch.equal(kept_token_mask(mask.bool(), kept), mask.bool() & kept[:, None])


# ---------------------------------------------------------------------------------------------------------
# Ranking statistics and the ppo_toy pipeline
# ---------------------------------------------------------------------------------------------------------


def toy_pipeline():
    mask = toy("masks")
    logp, ref_logp = toy("logprobs"), toy("ref_logprobs")
    rewards = shaped_rewards(logp, ref_logp, toy("scores"), mask, TOY["beta"])
    advantages, returns = gae(rewards, toy("values"), mask, gamma=1.0, lam=0.95)
    return mask, logp, ref_logp, rewards, advantages, returns


def test_ranking_statistics_golden():
    mask, _, _, rewards, _, returns = toy_pipeline()
    close(mc_shaped_return(rewards, mask), TOY["mc_shaped_return"])
    close(ranking_statistic("mc_shaped", toy("scores"), mask, shaped_rewards=rewards), TOY["mc_shaped_return"])
    # the reference's statistic, the lambda-return at the first response token (ra_rlhf.md section 5.1)
    expected = [row[0] for row in TOY["returns"]]
    close(ranking_statistic("lambda_return_first_token", toy("scores"), mask, returns=returns), expected)
    scores = toy("scores")
    env = ranking_statistic("env_score", scores, mask)
    assert torch.equal(env, scores) and env.data_ptr() != scores.data_ptr()


def test_lambda_return_is_read_at_each_rows_own_first_response_position():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [0, 1, 1, 1]])
    returns = torch.arange(12, dtype=F64).reshape(3, 4)
    assert lambda_return_first_token(returns, mask).tolist() == [2.0, 4.0, 9.0]


def test_bad_ranking_arguments_are_named():
    mask = toy("masks")
    with pytest.raises(ValueError, match="statistic='median' is unknown; accepted: mc_shaped, "
                                         "lambda_return_first_token, env_score"):
        ranking_statistic("median", toy("scores"), mask)
    with pytest.raises(ValueError, match="needs returns"):
        ranking_statistic("lambda_return_first_token", toy("scores"), mask)
    with pytest.raises(ValueError, match="needs shaped_rewards"):
        ranking_statistic("mc_shaped", toy("scores"), mask)
    with pytest.raises(ValueError, match=r"scores has shape \(2,\)"):
        ranking_statistic("env_score", toy("scores")[:2], mask)


@pytest.mark.parametrize("statistic", ["lambda_return_first_token", "mc_shaped"])
def test_ppo_toy_tail_whitening_and_kl_golden(statistic):
    """k = 2 keeps rows {1, 3} by either statistic; advantages whitened over the kept tokens; the controller
    inputs; beta after one update fed the reference's diluted statistic. Nothing shared is mutated."""
    mask, logp, ref_logp, rewards, advantages, returns = toy_pipeline()
    before = [t.clone() for t in (mask, logp, ref_logp, rewards, advantages, returns)]
    stat = ranking_statistic(statistic, toy("scores"), mask, shaped_rewards=rewards, returns=returns)
    selection = select_tail(stat, 2)
    assert selection.kept.long().tolist() == TOY["kept"]
    kept_mask = kept_token_mask(mask, selection.kept)
    close(masked_whiten(advantages, kept_mask), TOY["whitened_advantages"])
    inputs = kl_controller_inputs(logp, ref_logp, mask, selection.kept)
    assert inputs["reference"].item() == pytest.approx(TOY["kl_stat_reference"], abs=1e-12)
    assert inputs["kept_mean"].item() == pytest.approx(TOY["kl_stat_kept_mean"], abs=1e-12)
    assert inputs["all"].item() == pytest.approx((0.4 - 0.2 + 0.1 - 0.3) / 4, abs=1e-12)
    controller = AdaptiveKLController(TOY["beta"], target=6.0, horizon=10000)
    assert controller.update(choose_kl_input("reference", inputs), 128) == pytest.approx(TOY["beta_after_update"])
    for old, new in zip(before, (mask, logp, ref_logp, rewards, advantages, returns)):
        assert torch.equal(old, new)


def test_kl_input_arguments_are_checked():
    mask, logp, ref_logp, *_ = toy_pipeline()
    with pytest.raises(ValueError, match="kl_input='tail' is unknown; accepted: reference, kept_mean, all"):
        choose_kl_input("tail", kl_controller_inputs(logp, ref_logp, mask, torch.ones(4, dtype=torch.bool)))
    with pytest.raises(ValueError, match=r"kept has shape \(4,\) and dtype torch.int64"):
        kl_controller_inputs(logp, ref_logp, mask, torch.ones(4, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------------
# risk=entropic: soft episode weights (riskexp's extension)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("theta", [0.5, 1.0, 10.0])
def test_entropic_weights_are_the_scaled_gradient_of_the_entropic_risk(theta):
    before = RETURNS.clone()
    weights = entropic_episode_weights(RETURNS, theta)
    close(weights, 8 * torch.softmax(-theta * RETURNS, 0), atol=1e-12)
    assert weights.mean().item() == pytest.approx(1.0) and not weights.requires_grad
    order = RETURNS.argsort()
    assert (weights[order].diff() <= 0).all()  # the lower the return, the larger the weight
    assert torch.equal(RETURNS, before)


def test_entropic_weights_tend_to_plain_ppo_and_reject_bad_arguments():
    close(entropic_episode_weights(RETURNS, 1e-9), torch.ones(8), atol=1e-6)
    assert math.isclose(entropic_episode_weights(RETURNS, 50.0)[5].item(), 8.0, abs_tol=1e-6)  # -> the minimum
    with pytest.raises(ValueError, match="theta=0"):
        entropic_episode_weights(RETURNS, 0)
    with pytest.raises(ValueError, match=r"returns has shape \(2, 4\)"):
        entropic_episode_weights(RETURNS.reshape(2, 4), 1.0)
