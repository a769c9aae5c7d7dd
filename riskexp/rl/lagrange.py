"""Safe RLHF's PPO-Lagrangian pieces (Dai et al. 2024, eq. 9-11; safe-rlhf `algorithms/ppo_lag`), and the
risk-constrained multiplier: pure torch functions and the multiplier's small state.

Shapes as in `riskexp.rl.gae`: B episodes over T response columns, (B, T) per-token tensors with a response mask.

    min_theta max_{lambda >= 0}  -J_R(theta) + lambda (rho(C) - d),

rho the risk group's measure of the episode cost C over a window of recent episodes (upper tail: high cost is
bad): mean (Safe RLHF), CVaR_alpha or entropic. The multiplier's gradient is rho(window) - d, and the actor's
cost advantage of episode i is weighted by w_i = N dρ/dC_i over the window's N costs: 1 for the mean, 1/alpha
on the window's upper alpha-tail (Rockafellar-Uryasev) and 0 elsewhere for CVaR, N softmax(theta C)_i for the
entropic risk; so at alpha = 1 CVaR is the mean and the update is plain PPO-Lagrangian.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from riskexp.risk import RiskMeasure
from riskexp.rl.gae import shaped_rewards

KL_SPLITS = ("both", "half")


def kl_coefficients(kl_split: str, beta: float) -> tuple[float, float]:
    """(beta on the reward, beta on the cost). `both`: the full KL term in both (the vendored safe-rlhf code;
    the actor's (A_r - lambda A_c) / (1 + lambda) then weighs the KL by exactly beta for every lambda); `half`:
    split evenly (the paper, safe-rlhf PR #173)."""
    if kl_split not in KL_SPLITS:
        raise ValueError(f"algo.kl_split={kl_split!r} is unknown; accepted: {', '.join(KL_SPLITS)}")
    return (beta, beta) if kl_split == "both" else (beta / 2, beta / 2)


def shaped_costs(logp: Tensor, ref_logp: Tensor, costs: Tensor, mask: Tensor, beta_kl: float) -> Tensor:
    """Per-token cost c_t = +beta_kl (log pi - log pi_ref), plus the episode's cost at its last token: the
    reward shaping with the signs flipped (a KL away from the reference costs). (B, T), (B,) -> (B, T)."""
    return -shaped_rewards(logp, ref_logp, -costs, mask, beta_kl)


def lagrangian_advantages(reward_advantages: Tensor, cost_advantages: Tensor, lam: float,
                          cost_weights: Tensor | None = None) -> Tensor:
    """The actor's advantage (A_r - lambda w A_c) / (1 + lambda) (safe-rlhf), w (B,) the episodes' cost
    weights (None: 1). (B, T) -> (B, T)."""
    if cost_weights is not None:
        cost_advantages = cost_advantages * cost_weights[:, None]
    return (reward_advantages - lam * cost_advantages) / (1.0 + lam)


def constraint_and_weights(risk: RiskMeasure, window: Tensor, n_latest: int) -> tuple[Tensor, Tensor]:
    """(rho(window), the cost weights of the window's last `n_latest` episodes): rho the risk's upper tail of
    the window's episode costs, w_i = N d rho / d C_i (see the module). (N,) -> ((), (n_latest,))."""
    costs = window.detach().double().requires_grad_(True)
    value = risk.upper_tail(costs)
    (grad,) = torch.autograd.grad(value, costs)
    return value.detach().float(), (grad[-n_latest:] * costs.numel()).float()


class LagrangeMultiplier:
    """lambda = exp(log_lambda), updated once per iteration by SGD on safe-rlhf's loss
    -(constraint - threshold) lambda, i.e. log_lambda += lr (constraint - threshold) lambda; lambda <= lambda_max
    (None: unbounded); the first `delay` iterations leave it at lambda_init."""

    def __init__(self, lambda_init: float = 1.0, lambda_lr: float = 0.1, lambda_max: float | None = 5.0,
                 delay: int = 0):
        for key, value in (("lambda_init", lambda_init), ("lambda_lr", lambda_lr)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"algo.{key}={value!r}: accepted values are > 0")
        if lambda_max is not None and not lambda_max >= lambda_init:
            raise ValueError(f"algo.lambda_max={lambda_max!r}: accepted are values >= lambda_init "
                             f"({lambda_init}), or null (unbounded)")
        if isinstance(delay, bool) or not isinstance(delay, int) or delay < 0:
            raise ValueError(f"algo.lambda_update_delay_steps={delay!r}: accepted are integers >= 0")
        self.log_lambda = torch.tensor(math.log(lambda_init), dtype=torch.float64, requires_grad=True)
        self.optimizer = torch.optim.SGD([self.log_lambda], lr=lambda_lr)
        self.log_max = None if lambda_max is None else math.log(lambda_max)
        self.delay, self.updates_seen = delay, 0

    @property
    def value(self) -> float:
        return float(self.log_lambda.detach().exp())

    def update(self, constraint: float, threshold: float) -> float:
        """One step toward satisfying constraint <= threshold; returns the new lambda."""
        self.updates_seen += 1
        if self.updates_seen <= self.delay:
            return self.value
        self.optimizer.zero_grad()
        loss = -(float(constraint) - threshold) * self.log_lambda.exp()
        loss.backward()
        self.optimizer.step()
        if self.log_max is not None:
            with torch.no_grad():
                self.log_lambda.clamp_(max=self.log_max)
        return self.value

    def state_dict(self) -> dict:
        return {"log_lambda": float(self.log_lambda.detach()), "updates_seen": self.updates_seen}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.log_lambda.fill_(state["log_lambda"])
        self.updates_seen = state["updates_seen"]


class CostWindow:
    """The last `size` episode costs (safe-rlhf's `episode_cost_window_size` deque), over all ranks."""

    def __init__(self, size: int = 128):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"algo.episode_cost_window_size={size!r}: accepted are integers >= 1")
        self.size = size
        self.costs = torch.zeros(0)

    def extend(self, costs: Tensor) -> Tensor:
        """Append a batch of episode costs (the newest last); returns the window."""
        self.costs = torch.cat([self.costs, costs.detach().float().cpu()])[-self.size :]
        return self.costs
