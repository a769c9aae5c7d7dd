"""Safe RLHF's PPO-Lagrangian (`algo=ppo_lag`), and with `risk=cvar` / `entropic` the risk-constrained variant:
`PPOModule` with a cost, a cost critic and a Lagrange multiplier (`riskexp.rl.lagrange`).

Each iteration (safe-rlhf `PPOLagTrainer.rl_step`):
1. roll out; score each episode's reward R and cost C (both clipped to +-clip_range_score); the reward critic's
   and the cost critic's values;
2. the batch's costs join the window of the last `episode_cost_window_size` episodes (over all ranks); the
   multiplier steps on rho(window) - threshold (rho: the risk group's upper tail; mean = Safe RLHF);
3. per-token rewards -beta_r KL (+R) and costs +beta_c KL (+C) (`kl_split`), GAE on each with its critic;
4. the actor's advantage (A_r - lambda w A_c) / (1 + lambda), w the episodes' weights in rho (1 for the mean);
5. PPO's epochs: the clipped policy loss, and both critics' clipped value losses (vf_coef each).
The episode tail of RA-RLHF is not used here: the risk measures the cost constraint, not the return.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from torch import Tensor, nn

from riskexp.risk import CVaR, Mean, RiskMeasure, cvar_upper
from riskexp.rl.gae import gae
from riskexp.rl.lagrange import (
    CostWindow,
    LagrangeMultiplier,
    constraint_and_weights,
    kl_coefficients,
    lagrangian_advantages,
    shaped_costs,
)
from riskexp.rl.module import PPOModule, ValueHead, critic_from_score_model
from riskexp.rl.ppo import PPOOutput, value_loss
from riskexp.rl.rollout import Rollout, rollout_values


class LagrangianPPOModule(PPOModule):
    """PPO-Lagrangian; `risk` constrains the episode cost (`PPOModule`'s own risk, the return tail, is the mean).
    `cost_critic_init`: a score model (e.g. a trained cost model's `score_model`) to start the cost critic from;
    otherwise it is a value head on the reward critic's kind of trunk (shared, or a copy of the policy's)."""

    def __init__(
        self,
        policy: nn.Module,
        reference: nn.Module,
        tokenizer,
        reward: Callable,
        optimizer: Callable,
        scheduler: Callable | None = None,
        risk: RiskMeasure | None = None,
        *,
        cost: Callable | None = None,
        threshold: float = 0.0,
        lambda_init: float = 1.0,
        lambda_lr: float = 0.1,
        lambda_max: float | None = 5.0,
        lambda_update_delay_steps: int = 0,
        episode_cost_window_size: int = 128,
        kl_split: str = "both",
        clip_range_score: float = 50.0,
        cost_critic_init: str | None = None,
        cost_alpha: float = 0.1,
        **ppo,
    ):
        if cost is None:
            raise ValueError("algo=ppo_lag needs the task's cost (data.task.cost is null): data=safety or "
                             "data=toxicity, or a scorer as data.task.cost")
        kl_coefficients(kl_split, 1.0)  # checks the name
        if not clip_range_score > 0:
            raise ValueError(f"algo.clip_range_score={clip_range_score!r}: accepted values are > 0")
        super().__init__(policy, reference, tokenizer, reward, optimizer, scheduler, Mean(), **ppo)
        self.cost, self.constraint_risk = cost, risk if risk is not None else Mean()
        self.threshold, self.kl_split, self.clip_range_score = float(threshold), kl_split, float(clip_range_score)
        self.cost_alpha = cost_alpha  # the level of the logged window CVaR (evaluation's headline 0.1)
        self.multiplier = LagrangeMultiplier(lambda_init, lambda_lr, lambda_max, lambda_update_delay_steps)
        self.window = CostWindow(episode_cost_window_size)
        dropout = self.value_head.dropout.p
        if cost_critic_init is not None:
            self.cost_critic_trunk, self.cost_value_head = critic_from_score_model(cost_critic_init, dropout, policy,
                                                                                   tokenizer)
        else:
            self.cost_critic_trunk = None if self.critic_trunk is None else copy.deepcopy(self.critic_trunk)
            self.cost_value_head = ValueHead(policy.config.hidden_size, dropout).to(next(policy.parameters()).dtype)

    def run_record(self) -> dict:
        return super().run_record() | {"kl_split": self.kl_split, "threshold": self.threshold,
                                       "final_lambda": self.multiplier.value}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["rl"] |= {"multiplier": self.multiplier.state_dict(), "cost_window": self.window.costs}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.multiplier.load_state_dict(checkpoint["rl"]["multiplier"])
        self.window.costs = checkpoint["rl"]["cost_window"]

    def cost_values(self, input_ids: Tensor, attention_mask: Tensor, hidden: Tensor | None = None) -> Tensor:
        """(B, L) the cost critic's V at every position."""
        return self.critic_values(self.cost_critic_trunk, self.cost_value_head, input_ids, attention_mask, hidden)

    def score_episodes(self, prompts: list, ro: Rollout) -> tuple[Tensor, dict[str, Tensor]]:
        scores, _ = super().score_episodes(prompts, ro)
        costs = self.cost(prompts, ro.texts).to(ro.policy_logps)
        c = self.clip_range_score
        value_fn = self.rollout_critic(self.cost_values, self.cost_value_head)
        cost_values = rollout_values(value_fn, ro.input_ids, ro.attention_mask, ro.response_mask)
        return scores.clamp(-c, c), {"costs": costs.clamp(-c, c), "cost_values": cost_values}

    def reward_kl_coef(self, beta: float) -> float:
        return kl_coefficients(self.kl_split, beta)[0]

    def actor_advantages(self, ro: Rollout, advantages: Tensor, kept_mask: Tensor, *, costs: Tensor,
                         cost_values: Tensor) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        mask = ro.response_mask
        everyone = self.gather_rows(costs)
        window = self.window.extend(everyone)
        if window.numel() < everyone.numel():
            raise ValueError(f"algo.episode_cost_window_size={self.window.size} is smaller than the batch of "
                             f"{everyone.numel()} episodes: accepted are sizes >= the batch")
        constraint, weights = constraint_and_weights(self.constraint_risk, window, everyone.numel())
        # the multiplier steps first and the actor uses the new lambda (safe-rlhf's order)
        multiplier = self.multiplier.update(float(constraint), self.threshold)
        beta_c = kl_coefficients(self.kl_split, self.kl_controller.value)[1]
        cost_advantages, cost_returns = gae(shaped_costs(ro.policy_logps, ro.ref_logps, costs, mask, beta_c),
                                            cost_values, mask, self.gamma, self.lam)
        actor = lagrangian_advantages(advantages, cost_advantages, multiplier,
                                      self.local_rows(weights).to(advantages))
        metrics = {
            "lambda": multiplier,
            "cost_mean": everyone.mean(),
            "window_cost_mean": window.mean(),
            f"window_cost_cvar@{self.cost_alpha:g}": cvar_upper(window, self.cost_alpha),
            "constraint": constraint,
            "constraint_violation": constraint - self.threshold,
            "window_size": window.numel(),
        }
        if isinstance(self.constraint_risk, CVaR):
            metrics["cost_weight_max"] = weights.max()
        return actor, {"old_cost_values": cost_values, "cost_returns": cost_returns}, metrics

    def add_critic_losses(self, out: PPOOutput, part: dict[str, Tensor], hidden: Tensor) -> PPOOutput:
        width = part["input_ids"].shape[1] - part["mask"].shape[1]
        values = self.cost_values(part["input_ids"], part["attention_mask"], hidden)[:, width - 1 : -1]
        cost_loss = value_loss(values, part["old_cost_values"], part["cost_returns"], part["mask"],
                               self.loss_settings["clip_range_value"])
        out.loss = out.loss + self.loss_settings["vf_coef"] * cost_loss
        out.stats["cost_value_loss"] = cost_loss.detach()
        return out
