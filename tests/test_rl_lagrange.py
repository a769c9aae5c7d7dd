"""PPO-Lagrangian (riskexp.rl.lagrange, riskexp.rl.ppo_lag): the shaping, the actor's advantage, the risk-
constrained multiplier and its weights, and the multiplier's direction in real runs with a fixed cost."""

import copy
import functools
import json
import math

import pytest
import torch
from helpers import OPENINGS
from omegaconf import open_dict

from riskexp.models import tiny_llama
from riskexp.risk import CVaR, Entropic, Mean, ru_cvar_terms, var_upper
from riskexp.rl.gae import shaped_rewards
from riskexp.rl.lagrange import (
    CostWindow,
    LagrangeMultiplier,
    constraint_and_weights,
    kl_coefficients,
    lagrangian_advantages,
    shaped_costs,
)
from riskexp.rl.ppo_lag import LagrangianPPOModule
from riskexp.run import run


def test_costs_are_shaped_with_the_kl_added_and_the_kl_split_is_an_option():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -1.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    costs = torch.tensor([2.0, -1.0])
    c = shaped_costs(logp, ref, costs, mask, 0.1)
    kl = logp - ref
    expected = torch.where(mask, 0.1 * kl, 0.0)
    expected[0, 2] += 2.0
    expected[1, 1] += -1.0  # each row's own last token
    assert torch.allclose(c, expected)
    # the reward side is the usual shaping: together the KL enters both with opposite signs
    assert torch.allclose(shaped_rewards(logp, ref, torch.zeros(2), mask, 0.1), -shaped_costs(logp, ref,
                                                                                               torch.zeros(2), mask, 0.1))
    assert kl_coefficients("both", 0.2) == (0.2, 0.2) and kl_coefficients("half", 0.2) == (0.1, 0.1)
    with pytest.raises(ValueError, match=r"algo.kl_split='third' is unknown; accepted: both, half"):
        kl_coefficients("third", 0.2)


def test_the_actor_advantage_is_safe_rlhfs_and_weights_scale_the_cost_part():
    a_r, a_c = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, -1.0]])
    assert torch.allclose(lagrangian_advantages(a_r, a_c, 3.0), (a_r - 3.0 * a_c) / 4.0)
    assert torch.allclose(lagrangian_advantages(a_r, a_c, 3.0, torch.tensor([2.0])), (a_r - 6.0 * a_c) / 4.0)


def test_constraint_and_weights_per_risk():
    window = torch.tensor([0.1, 0.9, 0.3, 0.7, 0.5, 0.2, 0.8, 0.4])
    value, weights = constraint_and_weights(Mean(), window, 4)
    assert float(value) == pytest.approx(float(window.mean())) and torch.allclose(weights, torch.ones(4))
    # CVaR at alpha = 0.25 of 8 costs: the two largest (0.9, 0.8); weight 1/alpha on them, 0 elsewhere
    value, weights = constraint_and_weights(CVaR(0.25), window, 4)
    assert float(value) == pytest.approx(0.85)
    assert weights.tolist() == pytest.approx([0.0, 0.0, 4.0, 0.0])  # the newest 4: 0.5, 0.2, 0.8, 0.4
    # the Rockafellar-Uryasev form at its minimiser (the VaR) is the same constraint value
    ru = ru_cvar_terms(window, var_upper(window, 0.25), 0.25, tail="upper").mean()
    assert float(value) == pytest.approx(float(ru))
    # alpha = 1: CVaR is the mean, weights and all
    mean_value, mean_weights = constraint_and_weights(Mean(), window, 4)
    cvar1_value, cvar1_weights = constraint_and_weights(CVaR(1.0), window, 4)
    assert float(cvar1_value) == pytest.approx(float(mean_value)) and torch.allclose(cvar1_weights, mean_weights)
    # entropic: N softmax(theta C), the high costs weighted most
    value, weights = constraint_and_weights(Entropic(2.0), window, 8)
    assert float(value) == pytest.approx(math.log(torch.exp(2.0 * window).mean().item()) / 2.0, abs=1e-6)
    assert torch.allclose(weights, 8 * torch.softmax(2.0 * window, 0), atol=1e-6)


def test_the_multiplier_rises_above_the_threshold_falls_below_it_and_is_capped():
    up = LagrangeMultiplier(lambda_init=1.0, lambda_lr=0.1, lambda_max=5.0)
    assert up.update(constraint=2.0, threshold=0.5) == pytest.approx(math.exp(0.1 * 1.5 * 1.0))
    down = LagrangeMultiplier(lambda_init=1.0, lambda_lr=0.1)
    assert down.update(constraint=0.0, threshold=0.5) == pytest.approx(math.exp(-0.05))
    capped = LagrangeMultiplier(lambda_init=4.0, lambda_lr=1.0, lambda_max=5.0)
    assert capped.update(10.0, 0.0) == pytest.approx(5.0)
    delayed = LagrangeMultiplier(lambda_init=1.0, delay=2)
    assert [delayed.update(3.0, 0.0) for _ in range(3)][:2] == [1.0, 1.0] and delayed.value > 1.0
    with pytest.raises(ValueError, match=r"algo.lambda_max=0.5: accepted are values >= lambda_init"):
        LagrangeMultiplier(lambda_init=1.0, lambda_max=0.5)
    window = CostWindow(3)
    window.extend(torch.tensor([1.0, 2.0]))
    assert window.extend(torch.tensor([3.0, 4.0])).tolist() == [2.0, 3.0, 4.0]


PROMPTS = [*OPENINGS, "What a", "The plot", "I never", "Every scene"][:8]


def _module(risk, cost=None):
    policy, tok = tiny_llama()
    module = LagrangianPPOModule(policy, copy.deepcopy(policy), tok, reward=None, cost=cost or (lambda p, c: None),
                                 optimizer=functools.partial(torch.optim.AdamW, lr=1e-3), risk=risk,
                                 sampling={"max_new_tokens": 6}, episode_cost_window_size=16)
    module.total_iterations = 4
    return module


def test_at_alpha_1_the_risk_constrained_update_is_plain_ppo_lagrangian():
    torch.manual_seed(0)
    mean, cvar1 = _module(Mean()), _module(CVaR(1.0))
    ro = mean.rollout(PROMPTS)
    scores, costs = torch.randn(8), torch.rand(8)
    for step in range(3):  # the window fills over iterations
        extras = {"costs": costs + step, "cost_values": ro.values * 0.5}
        a, b = mean.targets(ro, scores, **extras), cvar1.targets(ro, scores, **extras)
        assert a.metrics["lambda"] == pytest.approx(b.metrics["lambda"])
        assert torch.allclose(a.batch["advantages"], b.batch["advantages"])
    # below alpha = 1 the tail episodes' cost advantages weigh more
    cvar = _module(CVaR(0.25))
    extras = {"costs": costs, "cost_values": ro.values * 0.5}
    assert not torch.allclose(cvar.targets(ro, scores, **extras).batch["advantages"],
                              _module(Mean()).targets(ro, scores, **extras).batch["advantages"])


def test_a_cost_without_a_scorer_is_refused():
    policy, tok = tiny_llama()
    with pytest.raises(ValueError, match=r"algo=ppo_lag needs the task's cost"):
        LagrangianPPOModule(policy, policy, tok, reward=None, optimizer=torch.optim.AdamW)


@pytest.mark.parametrize(("cost", "threshold", "direction"), [(1.0, 0.0, "up"), (-1.0, 0.0, "down")])
def test_lambda_moves_toward_the_constraint_with_a_fixed_cost(smoke_cfg, cost, threshold, direction):
    cfg = smoke_cfg("algo=ppo_lag", "risk=cvar", "alpha=0.25", f"algo.threshold={threshold}", "eval.enabled=false")
    with open_dict(cfg):
        cfg.data.task.cost = {"_target_": "helpers.ConstantCost", "value": cost}
    results = run(cfg)
    final = results["train/lambda"]
    # 4 iterations of log-lambda steps of lr * (C - d) * lambda from lambda_init = 1
    assert (final > 1.0) if direction == "up" else (final < 1.0)
    expected = 1.0
    for _ in range(4):
        expected = math.exp(math.log(expected) + 0.1 * (cost - threshold) * expected)
    assert final == pytest.approx(expected, rel=1e-5)
    assert results["train/constraint"] == pytest.approx(cost)


def test_smoke_sweep_of_ppo_lag_with_mean_and_cvar_writes_both_results(tmp_path):
    from test_pipeline import module_cli

    result = module_cli("riskexp", "--multirun", "experiment=smoke", "algo=ppo_lag", "risk=mean,cvar", "alpha=0.25",
                        "eval.num_prompts=4", "eval.samples_per_prompt=2", runs_dir=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted((tmp_path / "sweeps" / "smoke").glob("*/results.json"))
    assert len(runs) == 2
    for path in runs:
        results = json.loads(path.read_text())
        assert results["status"] == "finished" and results["algo"] == "ppo_lag"
        assert results["kl_split"] == "both" and "train/lambda" in results and "eval/cost_mean" in results


def test_ptx_adds_an_sft_step_on_its_texts_after_each_ppo_step(smoke_cfg):
    texts = ["The film was a delight from start to finish.", "A warm, funny and clever story."]
    cfg = smoke_cfg("algo=ppo_lag", "eval.enabled=false", "algo.ptx.coeff=2.0", "algo.ptx.batch_size=2")
    with open_dict(cfg):
        cfg.algo.ptx.texts = texts
    results = run(cfg)
    assert results["ptx_texts"] == 2 and results["ptx_coeff"] == 2.0 and results["train/ptx_loss"] > 0


def test_the_ptx_loss_is_the_mean_nll_per_token_of_its_texts():
    module = _module(Mean())
    text = "A warm, funny and clever story."
    ids = torch.tensor([module.tokenizer(text)["input_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(module.policy(ids).logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        assert float(module.ptx_loss([text])) == pytest.approx(float(-logp.mean()), abs=1e-5)
