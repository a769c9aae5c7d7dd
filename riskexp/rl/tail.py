"""RA-RLHF's tail of a batch: rank the episodes, keep the k worst, and what the KL controller is fed.

Shapes: B episodes, T positions; per-token tensors (B, T) with a (B, T) response mask (riskexp.rl.gae).
Nothing here mutates its inputs: the reference code zeroes rows of the shared mask in place
(`find_alpha_return`), which silently turns its logged KL into the diluted sum over kept rows / B; here the
kept rows are a new (B,) bool tensor and the kept-token mask a new (B, T) one, and each KL statistic is
computed explicitly (`kl_controller_inputs`).

Ranking statistics (`ranking_statistic`), one value per episode, low = bad:
* "mc_shaped" (default; the paper's text, eq. 11, and its evaluation's R_bar): the Monte Carlo shaped return
  sum_t r_bar_t = score - beta sum_t (log pi - log pi_ref) over the response.
* "lambda_return_first_token" (the reference code's `returns[:, 63]`): the GAE lambda-return at each row's own
  first response position, never a fixed column; it depends on the critic.
* "env_score": the environment score alone (the superseded `soft_risk_ppo_auth1.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral

import torch
from torch import Tensor

from riskexp.risk import entropic_lower
from riskexp.rl.gae import bool_mask, check_same_shape, response_bounds

RANKING_STATISTICS = ("mc_shaped", "lambda_return_first_token", "env_score")
KL_INPUTS = ("reference", "kept_mean", "all")


def mc_shaped_return(shaped_rewards: Tensor, mask: Tensor) -> Tensor:
    """R_bar = sum of the shaped rewards over the response = score - beta sum_t kl_t (eq. 5 summed). -> (B,)."""
    check_same_shape(mask, shaped_rewards=shaped_rewards)
    m = bool_mask(mask)
    return torch.where(m, shaped_rewards, 0.0).sum(-1)


def lambda_return_first_token(returns: Tensor, mask: Tensor) -> Tensor:
    """The lambda-return at each row's own first response position (the reference's statistic). -> (B,)."""
    check_same_shape(mask, returns=returns)
    first, _ = response_bounds(mask)
    return returns.gather(1, first[:, None]).squeeze(1)


def ranking_statistic(
    statistic: str,
    scores: Tensor,
    mask: Tensor,
    shaped_rewards: Tensor | None = None,
    returns: Tensor | None = None,
) -> Tensor:
    """The per-episode value the tail is chosen by (see the module docstring). -> (B,), detached.

    scores: (B,); mask, shaped_rewards ("mc_shaped"), returns ("lambda_return_first_token"): (B, T)."""
    if statistic not in RANKING_STATISTICS:
        raise ValueError(f"statistic={statistic!r} is unknown; accepted: {', '.join(RANKING_STATISTICS)}")
    if scores.shape != mask.shape[:1]:
        raise ValueError(f"scores has shape {tuple(scores.shape)}: accepted is ({mask.shape[0]},), one per row")
    needed = {"mc_shaped": ("shaped_rewards", shaped_rewards), "lambda_return_first_token": ("returns", returns)}
    if statistic in needed and needed[statistic][1] is None:
        raise ValueError(f"statistic={statistic!r} needs {needed[statistic][0]}")
    if statistic == "mc_shaped":
        return mc_shaped_return(shaped_rewards.detach(), mask)
    if statistic == "lambda_return_first_token":
        return lambda_return_first_token(returns.detach(), mask)
    return scores.detach().clone()


@dataclass
class TailSelection:
    kept: Tensor  # (B,) bool, a new tensor: the episodes PPO trains on
    threshold: Tensor  # () the k-th smallest statistic, q_hat (the reference's `alpha_return`)
    tail_mean: Tensor  # () mean statistic over the kept episodes

    @property
    def count(self) -> int:
        return int(self.kept.sum())


def select_tail(statistic: Tensor, k: int, keep_ties: bool = False) -> TailSelection:
    """Keep the k episodes with the lowest statistic (RA-RLHF Algorithm 1, steps 4-5). (B,) -> TailSelection.

    q_hat = sort(statistic)[k - 1]. By default exactly k rows are kept, ties at q_hat broken by a stable sort
    (the lower index first), so the count follows the schedule. keep_ties=True keeps every row with
    statistic <= q_hat, as the reference's `find_alpha_return` does (then more than k rows may be kept)."""
    if statistic.dim() != 1:
        raise ValueError(f"statistic has shape {tuple(statistic.shape)}: accepted is (B,), one per episode")
    b = statistic.shape[0]
    if isinstance(k, bool) or not isinstance(k, Integral) or not 1 <= k <= b:
        raise ValueError(f"k={k!r} episodes cannot be kept from a batch of {b}: accepted are integers in [1, {b}]")
    k, x = int(k), statistic.detach()
    if torch.isnan(x).any():
        rows = torch.isnan(x).nonzero().flatten().tolist()
        raise ValueError(f"the ranking statistic is NaN at rows {rows}")
    order = torch.sort(x, stable=True).indices
    threshold = x[order[k - 1]]
    if keep_ties:
        kept = x <= threshold
    else:
        kept = torch.zeros(b, dtype=torch.bool, device=x.device)
        kept[order[:k]] = True
    return TailSelection(kept=kept, threshold=threshold, tail_mean=x[kept].mean())


def kept_token_mask(mask: Tensor, kept: Tensor) -> Tensor:
    """The response mask restricted to the kept rows, as a new (B, T) tensor of the mask's dtype."""
    if kept.shape != mask.shape[:1] or kept.dtype != torch.bool:
        raise ValueError(f"kept has shape {tuple(kept.shape)} and dtype {kept.dtype}: accepted is "
                         f"({mask.shape[0]},) bool")
    return mask * kept[:, None].to(mask.dtype) if mask.dtype != torch.bool else mask & kept[:, None]


def kl_controller_inputs(logp: Tensor, ref_logp: Tensor, mask: Tensor, kept: Tensor) -> dict[str, Tensor]:
    """The three candidate KL statistics for the beta controller, each () and detached (all three are logged).

    With KL_i = sum_t (log pi - log pi_ref) over row i's response and K the kept rows:
    * "reference": sum_{i in K} KL_i / B, what the reference feeds (its in-place mask dilutes by |K| / B);
    * "kept_mean": mean_{i in K} KL_i, what the paper's text describes (eq. 12);
    * "all": mean_i KL_i over the whole batch, vanilla RLHF's `objective/kl`."""
    check_same_shape(mask, logp=logp, ref_logp=ref_logp)
    return kl_statistics(row_kl(logp, ref_logp, mask), kept)


def row_kl(logp: Tensor, ref_logp: Tensor, mask: Tensor) -> Tensor:
    """KL_i = sum_t (log pi - log pi_ref) over each row's response tokens, detached. (B, T) -> (B,)."""
    check_same_shape(mask, logp=logp, ref_logp=ref_logp)
    return torch.where(bool_mask(mask), (logp - ref_logp).detach(), 0.0).sum(-1)


def kl_statistics(kl_per_row: Tensor, kept: Tensor) -> dict[str, Tensor]:
    """`kl_controller_inputs` from the rows' KL_i (B,) and the kept rows (B,) bool (under data parallelism:
    the gathered global batch's)."""
    if kept.shape != kl_per_row.shape or kept.dtype != torch.bool:
        raise ValueError(f"kept has shape {tuple(kept.shape)} and dtype {kept.dtype}: accepted is "
                         f"{tuple(kl_per_row.shape)} bool")
    return {
        "reference": torch.where(kept, kl_per_row, 0.0).sum() / kl_per_row.shape[0],
        "kept_mean": kl_per_row[kept].mean(),
        "all": kl_per_row.mean(),
    }


def choose_kl_input(which: str, inputs: dict[str, Tensor]) -> Tensor:
    """The statistic named by the config (`reference`, `kept_mean` or `all`) from `kl_controller_inputs`."""
    if which not in KL_INPUTS:
        raise ValueError(f"kl_input={which!r} is unknown; accepted: {', '.join(KL_INPUTS)}")
    return inputs[which]


def entropic_episode_weights(returns: Tensor, theta: float) -> Tensor:
    """riskexp's own extension (`risk=entropic`), not in RA-RLHF: a soft tail instead of a hard one.

    The weights are B times the gradient of the entropic risk -(1/theta) log mean exp(-theta R)
    (`riskexp.risk.entropic_lower`) with respect to each return, i.e. B softmax(-theta R): low returns weigh
    more, the weights average 1, and theta -> 0 gives all ones (plain PPO). (B,) -> (B,), detached; pass
    them as `weights` to `riskexp.rl.ppo.policy_loss`."""
    if returns.dim() != 1:
        raise ValueError(f"returns has shape {tuple(returns.shape)}: accepted is (B,), one per episode")
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
        raise ValueError(f"theta={theta!r} is not a risk aversion: accepted values are > 0")
    x = returns.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(entropic_lower(x, float(theta)), x)
    return grad * returns.shape[0]


@dataclass
class EpisodeWeighting:
    """What the risk group makes of one batch: the episodes PPO trains on and how much each weighs."""

    kept: Tensor  # (B,) bool, new: the episodes whose tokens enter whitening, the losses and the critic
    weights: Tensor | None  # (B,) policy-loss weights (risk=entropic), None: all 1
    level: float  # alpha'(m): the fraction of the batch kept (1 for mean and entropic)
    threshold: Tensor | None  # q_hat of the hard tail (risk=cvar), else None


def warm_start_iterations(warm_start: int | float, iterations: int) -> int:
    """The schedule's n in iterations: an integer as it is (the paper's n = 30), a float in [0, 1) as that
    fraction of the run's M iterations (floor), so that a short run still has a risk-averse phase."""
    if isinstance(warm_start, bool) or not isinstance(warm_start, (Integral, float)):
        raise ValueError(f"warm_start={warm_start!r}: accepted are integers >= 0 (iterations) or floats in "
                         "[0, 1) (a fraction of the run)")
    if isinstance(warm_start, Integral):
        if warm_start < 0:
            raise ValueError(f"warm_start={warm_start!r}: accepted are integers >= 0 or floats in [0, 1)")
        return int(warm_start)
    if not 0.0 <= warm_start < 1.0:
        raise ValueError(f"warm_start={warm_start!r}: a fraction of the run must be in [0, 1); integers count "
                         "iterations")
    return int(warm_start * iterations)


def weigh_episodes(risk, statistic: Tensor, iteration: int, iterations: int, *, schedule: str = "new",
                   warm_start: int | float = 30, rho: float = 0.95, keep_ties: bool = False) -> EpisodeWeighting:
    """The risk group across a batch's episodes, ranked by `statistic` (B,) (low = bad; the global batch under
    data parallelism):

    * `riskexp.risk.CVaR` (RA-RLHF): keep the k = ceil(B alpha'(m)) lowest, alpha' on the soft-risk schedule
      from 1 down to the risk's alpha (`riskexp.rl.soft_risk`);
    * `riskexp.risk.Entropic` (riskexp's own extension): keep all, weights B softmax(-theta R);
    * `riskexp.risk.Mean` (PPO-RLHF): keep all, weight 1."""
    from riskexp.risk import CVaR, Entropic, Mean
    from riskexp.rl.soft_risk import soft_risk_count

    b = statistic.shape[0]
    everyone = torch.ones(b, dtype=torch.bool, device=statistic.device)
    if isinstance(risk, CVaR):
        n = warm_start_iterations(warm_start, iterations)
        k = soft_risk_count(iteration, b, risk.alpha, n, rho, iterations, schedule)
        tail = select_tail(statistic, k, keep_ties)
        return EpisodeWeighting(tail.kept, None, k / b, tail.threshold)
    if isinstance(risk, Entropic):
        return EpisodeWeighting(everyone, entropic_episode_weights(statistic, risk.theta), 1.0, None)
    if isinstance(risk, Mean):
        return EpisodeWeighting(everyone, None, 1.0, None)
    raise ValueError(f"risk {risk!r} has no episode weighting: accepted are riskexp.risk.Mean, CVaR, Entropic")
