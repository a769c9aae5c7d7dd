"""PPO's clipped losses, the minibatch statistics and the KL controller: hand-computed cases and the golden beta."""

import json
import math
from pathlib import Path

import pytest
import torch

from riskexp.rl.gae import masked_whiten
from riskexp.rl.kl_control import AdaptiveKLController, FixedKLController, adaptive_kl_update, kl_controller
from riskexp.rl.ppo import entropy_from_logits, explained_variance, policy_loss, ppo_loss, value_loss

TOY = json.loads((Path(__file__).parent / "golden" / "risk_and_rl.json").read_text())["ppo_toy"]
F64 = torch.float64
NAN = float("nan")

# one row, three response tokens and a padded fourth column holding garbage
MASK = torch.tensor([[1, 1, 1, 0]])
OLD_LOGP = torch.tensor([[-1.0, -1.0, -1.0, NAN]], dtype=F64)
LOGP = torch.tensor([[-0.5, -1.5, -0.9, NAN]], dtype=F64)  # log-ratios 0.5, -0.5, 0.1
ADVANTAGES = torch.tensor([[1.0, -1.0, 2.0, NAN]], dtype=F64)
OLD_VALUES = torch.tensor([[0.5, 0.5, 0.0, NAN]], dtype=F64)
VALUES = torch.tensor([[1.0, 0.4, -1.0, NAN]], dtype=F64)
RETURNS = torch.tensor([[2.0, 0.0, -0.5, NAN]], dtype=F64)


def leaf(x):
    return x.clone().requires_grad_(True)


def test_policy_loss_by_hand():
    """Token 0: A=1, ratio e^.5 > 1.2, clipped term -1.2; token 1: A=-1, ratio e^-.5 < .8, clipped term 0.8;
    token 2: A=2, ratio e^.1 inside the range, term -2 e^.1. Clipped tokens get no gradient."""
    logp, advantages, old_logp = leaf(LOGP), leaf(ADVANTAGES), leaf(OLD_LOGP)
    loss, ratio = policy_loss(logp, old_logp, advantages, MASK, clip_range=0.2)
    expected = (-1.2 + 0.8 - 2 * math.exp(0.1)) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert torch.allclose(ratio[0, :3], torch.tensor([math.exp(0.5), math.exp(-0.5), math.exp(0.1)], dtype=F64))
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[0.0, 0.0, -2 * math.exp(0.1) / 3, 0.0]], dtype=F64))
    assert advantages.grad is None and old_logp.grad is None  # rollout quantities are constants


def test_value_loss_by_hand():
    """Token 0: V=1 clipped to 0.7, max(1, 1.69) = 1.69 (no gradient at the clip); token 1: 0.16 both ways;
    token 2: V=-1 clipped to -0.2, max(0.25, 0.09) = 0.25. Loss 0.5 * 2.1 / 3 = 0.35."""
    values, old_values, returns = leaf(VALUES), leaf(OLD_VALUES), leaf(RETURNS)
    loss = value_loss(values, old_values, returns, MASK, clip_range_value=0.2)
    assert loss.item() == pytest.approx(0.35, abs=1e-12)
    loss.backward()
    assert torch.allclose(values.grad, torch.tensor([[0.0, 0.4 / 3, -0.5 / 3, 0.0]], dtype=F64))
    assert old_values.grad is None and returns.grad is None


def test_ppo_loss_total_and_statistics():
    logits = torch.zeros(1, 4, 5, dtype=F64)
    out = ppo_loss(leaf(LOGP), OLD_LOGP, ADVANTAGES, leaf(VALUES), OLD_VALUES, RETURNS, MASK,
                   clip_range=0.2, clip_range_value=0.2, vf_coef=0.1, logits=logits)
    assert out.loss.item() == pytest.approx(out.policy_loss.item() + 0.1 * 0.35, abs=1e-12)
    s = out.stats
    assert s["clip_fraction"].item() == pytest.approx(2 / 3)
    assert s["approx_kl"].item() == pytest.approx(0.5 * (0.25 + 0.25 + 0.01) / 3)
    assert s["policy_kl"].item() == pytest.approx(-0.1 / 3)
    assert s["mean_ratio"].item() == pytest.approx((math.exp(0.5) + math.exp(-0.5) + math.exp(0.1)) / 3)
    assert s["value_clip_fraction"].item() == pytest.approx(1 / 3)
    assert s["value_error"].item() == pytest.approx((1 + 0.16 + 0.25) / 3)
    assert s["entropy"].item() == pytest.approx(math.log(5))
    assert s["n_tokens"].item() == 3 and not out.skip
    assert s["value_loss"].item() == pytest.approx(0.35) and not any(v.requires_grad for v in s.values())
    assert all(torch.isfinite(v) for v in s.values())
    out.loss.backward()


def test_ratio_guard_and_empty_minibatch():
    far = ppo_loss(LOGP + 3.0, OLD_LOGP, ADVANTAGES, VALUES, OLD_VALUES, RETURNS, MASK, ratio_threshold=10.0)
    assert far.stats["mean_ratio"].item() > 10 and far.skip
    assert not ppo_loss(LOGP + 3.0, OLD_LOGP, ADVANTAGES, VALUES, OLD_VALUES, RETURNS, MASK, ratio_threshold=30.0).skip
    # a minibatch that holds only dropped episodes: loss 0, finite zero gradients, skipped
    logp, values = leaf(LOGP), leaf(VALUES)
    empty = ppo_loss(logp, OLD_LOGP, ADVANTAGES, values, OLD_VALUES, RETURNS, torch.zeros_like(MASK))
    assert empty.loss.item() == 0.0 and empty.skip
    empty.loss.backward()
    assert torch.equal(logp.grad, torch.zeros_like(logp)) and torch.equal(values.grad, torch.zeros_like(values))


def test_entropy_and_explained_variance():
    logits = torch.tensor([[0.0, 0.0, -torch.inf, -torch.inf], [10.0, -10.0, 0.0, 0.0]], dtype=F64)
    entropy = entropy_from_logits(logits)
    p = torch.softmax(logits[1], -1)
    assert entropy[0].item() == pytest.approx(math.log(2)) and entropy[1].item() == pytest.approx(-(p * p.log()).sum().item())
    assert entropy_from_logits(logits.float()).dtype == torch.float32
    returns, mask = torch.tensor([[1.0, 2.0, 4.0, NAN]], dtype=F64), MASK
    assert explained_variance(returns + 3.0, returns, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.zeros_like(returns), returns, mask).item() == pytest.approx(0.0)
    assert math.isnan(explained_variance(returns, torch.ones_like(returns), mask).item())


def test_dropping_the_unkept_rows_after_whitening_changes_nothing():
    """With mini_batch_size == B, training on the kept rows alone equals masking the dropped ones (same loss, same
    gradient on the kept rows, none on the dropped ones): the trainer may remove them physically."""
    g = torch.Generator().manual_seed(0)
    B, T = 6, 5
    mask = (torch.arange(T)[None, :] < torch.tensor([5, 3, 4, 2, 5, 1])[:, None]).long()
    kept = torch.tensor([True, False, True, True, False, False])
    kept_mask = mask * kept[:, None]
    raw = torch.randn(B, T, dtype=F64, generator=g)
    advantages = masked_whiten(raw, kept_mask)
    old_logp, old_values, returns = (torch.randn(B, T, dtype=F64, generator=g) for _ in range(3))
    logp_full = leaf(old_logp + 0.3 * torch.randn(B, T, dtype=F64, generator=g))
    values_full = leaf(old_values + 0.3 * torch.randn(B, T, dtype=F64, generator=g))
    full = ppo_loss(logp_full, old_logp, advantages, values_full, old_values, returns, kept_mask)
    full.loss.backward()
    logp_kept, values_kept = leaf(logp_full.detach()[kept]), leaf(values_full.detach()[kept])
    part = ppo_loss(logp_kept, old_logp[kept], advantages[kept], values_kept, old_values[kept], returns[kept],
                    mask[kept])
    part.loss.backward()
    assert part.loss.item() == pytest.approx(full.loss.item(), abs=1e-12)
    for key in ("clip_fraction", "approx_kl", "explained_variance", "mean_ratio"):
        assert part.stats[key].item() == pytest.approx(full.stats[key].item(), abs=1e-12), key
    assert torch.allclose(logp_full.grad[kept], logp_kept.grad) and (logp_full.grad[~kept] == 0).all()
    assert torch.allclose(values_full.grad[kept], values_kept.grad) and (values_full.grad[~kept] == 0).all()


def test_episode_weights_scale_each_rows_policy_term():
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(3, 4, dtype=torch.long)
    logp, old_logp, advantages = (torch.randn(3, 4, dtype=F64, generator=g) * 0.1 for _ in range(3))
    plain, _ = policy_loss(logp, old_logp, advantages, mask)
    ones, _ = policy_loss(logp, old_logp, advantages, mask, weights=torch.ones(3, dtype=F64))
    assert ones.item() == pytest.approx(plain.item(), abs=1e-15)
    weighted, _ = policy_loss(logp, old_logp, advantages, mask, weights=torch.tensor([3.0, 0.0, 0.0], dtype=F64))
    first_row, _ = policy_loss(logp[:1], old_logp[:1], advantages[:1], mask[:1])
    assert weighted.item() == pytest.approx(first_row.item(), abs=1e-12)  # 3 * (row-0 sum) / 12 tokens
    with pytest.raises(ValueError, match=r"weights has shape \(2,\)"):
        policy_loss(logp, old_logp, advantages, mask, weights=torch.ones(2))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(clip_range=0.0), "clip_range=0.0"),
        (dict(clip_range_value=-0.2), "clip_range_value=-0.2"),
        (dict(vf_coef=-1), "vf_coef=-1"),
        (dict(ratio_threshold=0), "ratio_threshold=0"),
        (dict(logits=torch.zeros(1, 3, 5)), r"logits has shape \(1, 3, 5\)"),
    ],
)
def test_bad_ppo_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ppo_loss(LOGP, OLD_LOGP, ADVANTAGES, VALUES, OLD_VALUES, RETURNS, MASK, **kwargs)


def test_mismatched_shapes_are_named():
    with pytest.raises(ValueError, match=r"advantages \(1, 3\) do not match the response mask's shape \(1, 4\)"):
        policy_loss(LOGP, OLD_LOGP, ADVANTAGES[:, :3], MASK)
    with pytest.raises(ValueError, match=r"returns \(1, 3\)"):
        value_loss(VALUES, OLD_VALUES, RETURNS[:, :3], MASK)


def test_adaptive_kl_controller_golden():
    """Fed the reference statistic (-0.125): the error clips at -0.2, beta 0.2 -> 0.2 (1 - 0.2 * 128 / 1e4)."""
    controller = AdaptiveKLController(init=TOY["beta"], target=6.0, horizon=10000)
    assert controller.update(torch.tensor(TOY["kl_stat_reference"]), 128) == pytest.approx(TOY["beta_after_update"],
                                                                                            abs=1e-12)
    assert adaptive_kl_update(0.2, 100.0, 6.0, 10000, 128) == pytest.approx(0.2 * (1 + 0.2 * 0.0128))
    assert adaptive_kl_update(0.2, 6.6, 6.0, 10000, 128) == pytest.approx(0.2 * (1 + 0.1 * 0.0128))
    restored = kl_controller(adaptive=True)
    restored.load_state_dict(controller.state_dict())
    assert restored.value == controller.value


def test_fixed_kl_controller_and_bad_arguments():
    fixed = kl_controller(adaptive=False, init=0.05)
    assert isinstance(fixed, FixedKLController) and not fixed.adaptive
    assert fixed.update(50.0, 128) == 0.05 and fixed.value == 0.05
    assert kl_controller(adaptive=False, init=0.0).value == 0.0
    with pytest.raises(ValueError, match="kl.init=0"):
        AdaptiveKLController(init=0)
    with pytest.raises(ValueError, match="kl.target=-6"):
        AdaptiveKLController(target=-6)
    with pytest.raises(ValueError, match="kl.horizon=0"):
        AdaptiveKLController(horizon=0)
    with pytest.raises(ValueError, match="n_steps=0"):
        AdaptiveKLController().update(1.0, 0)
