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
    m = bool_mask(mask)
    if kept.shape != m.shape[:1] or kept.dtype != torch.bool:
        raise ValueError(f"kept has shape {tuple(kept.shape)} and dtype {kept.dtype}: accepted is ({m.shape[0]},) bool")
    kl = (logp - ref_logp).detach()
    row_kl = torch.where(m, kl, 0.0).sum(-1)
    return {
        "reference": torch.where(kept, row_kl, 0.0).sum() / m.shape[0],
        "kept_mean": row_kl[kept].mean(),
        "all": row_kl.mean(),
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
