"""Risk measures: pure torch functions, and the small classes Hydra instantiates from `conf/risk/*.yaml`.

Convention everywhere in riskexp: `alpha` in (0, 1] is the *tail mass*; alpha = 1 is risk-neutral (the mean).

Two roles, one family of measures:

* **Over the vocabulary at each token** (Ra-DPO's sequential risk ratio; Zhang et al. 2025, Thm. 3.6):
  the random variable is d(z) = log p_ref(z) - log pi_theta(z) with z ~ p_ref. Large d is the bad outcome
  (the policy drops a token the reference likes), so the measure looks at the *upper* tail of d. Every
  function takes `d` and `ref_logp` (log p_ref) of shape (..., V) and reduces the last axis to (...,).
  Log-probabilities, not probabilities, come in so that p log p never meets 0 * (-inf).
* **Across samples** (rewards, returns, costs, evaluation tails): the *lower* tail of rewards and the
  *upper* tail of costs. These take a 1-D tensor (N,) and return a scalar; VaR and CVaR also reduce the
  last axis of a batch (..., N) -> (...), so bootstrap resamples are summarised in one call.
"""

from __future__ import annotations

import math
from enum import Enum

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------------------
# Per token, over the vocabulary
# ---------------------------------------------------------------------------------------------------------


def vocab_mean(d: Tensor, ref_logp: Tensor) -> Tensor:
    """E_{p_ref}[d], i.e. KL(p_ref || pi_theta) per position (TDPO's per-token term). (..., V) -> (...)."""
    return (ref_logp.exp() * d).sum(-1)


def vocab_weighted_cvar(d: Tensor, ref_logp: Tensor, alpha: float) -> Tensor:
    """Paper definition (Ra-DPO App. A.1, eq. 20-21, applied to the loss -d): p_ref-weighted upper-tail CVaR.

    Sort d in descending order; entry i carries mass p_(i), and takes w_i = clip(alpha - c_i, 0, p_(i)) where
    c_i is the mass before it (the boundary entry contributes a fractional atom). CVaR = sum_i w_i d_(i) / alpha.
    alpha = 1 gives E_{p_ref}[d] (the KL) exactly. (..., V) -> (...).
    """
    d_sorted, order = d.sort(dim=-1, descending=True)
    p_sorted = ref_logp.exp().gather(-1, order)
    mass_before = p_sorted.cumsum(-1) - p_sorted
    taken = torch.minimum((alpha - mass_before).clamp(min=0.0), p_sorted)
    return (taken * d_sorted).sum(-1) / alpha


def linear_quantile(values: Tensor, q: float) -> Tensor:
    """`torch.quantile(values, q, dim=-1, interpolation="linear")` without its input-size limit. (..., V) -> (...)."""
    n = values.shape[-1]
    sorted_values = values.sort(dim=-1).values
    position = q * (n - 1)
    lo = math.floor(position)
    hi = min(lo + 1, n - 1)
    frac = position - lo
    return sorted_values[..., lo] + frac * (sorted_values[..., hi] - sorted_values[..., lo])


def vocab_reference_cvar(d: Tensor, ref_logp: Tensor, alpha: float, split_vocab: bool = False) -> Tensor:
    """The public Ra-DPO code's estimator (`calculate_cvar` in zlj123-max/Ra-DPO), kept to reproduce its numbers.

    Keep vocabulary entries with d > Q_{1-alpha}(d), where the quantile is linear-interpolated and *unweighted*
    over vocabulary ids, and sum p_ref * d over them: no 1/alpha normalisation, strict threshold. alpha is the
    code's `confidence_level`. With `split_vocab` the two halves [0, V//2) and [V//2, V) get their own
    threshold (the code's default, which its comments call "chosen & rejected"). (..., V) -> (...).
    """
    if split_vocab:
        mid = d.shape[-1] // 2
        return vocab_reference_cvar(d[..., :mid], ref_logp[..., :mid], alpha) + vocab_reference_cvar(
            d[..., mid:], ref_logp[..., mid:], alpha
        )
    threshold = linear_quantile(d, 1.0 - alpha).unsqueeze(-1)
    return (ref_logp.exp() * d * (d > threshold)).sum(-1)


def vocab_entropic(d: Tensor, ref_logp: Tensor, theta: float) -> Tensor:
    """Entropic risk (1/theta) log E_{p_ref}[exp(theta d)] (Ra-DPO rebuttal's ERM); >= KL, -> KL as theta -> 0."""
    return torch.logsumexp(ref_logp + theta * d, dim=-1) / theta


# ---------------------------------------------------------------------------------------------------------
# Across samples (1-D batches of rewards / returns / costs)
# ---------------------------------------------------------------------------------------------------------


def _tail_count(alpha: float, n: int) -> int:
    # ceil(alpha * n) with a tolerance, so that 0.1 * 30 = 3.0000000000000004 counts 3, not 4
    return max(1, math.ceil(alpha * n - 1e-9))


def var_lower(x: Tensor, alpha: float) -> Tensor:
    """Lower-tail value at risk: x_(ceil(alpha N)) of the ascending order statistics of each row.
    (N,) -> (), or (..., N) -> (...) (e.g. bootstrap resamples)."""
    return x.sort(dim=-1).values[..., _tail_count(alpha, x.shape[-1]) - 1]


def cvar_lower(x: Tensor, alpha: float) -> Tensor:
    """Lower-tail CVaR: mean of the worst alpha-fraction of each row, fractional weight on the boundary atom.
    (N,) -> (), or (..., N) -> (...)."""
    n = x.shape[-1]
    x_sorted = x.sort(dim=-1).values
    rank = torch.arange(n, dtype=x.dtype, device=x.device)
    weight = (alpha * n - rank).clamp(0.0, 1.0)
    return (weight * x_sorted).sum(-1) / (alpha * n)


def var_upper(x: Tensor, alpha: float) -> Tensor:
    """Upper-tail value at risk (for costs and losses). (..., N) -> (...)."""
    return -var_lower(-x, alpha)


def cvar_upper(x: Tensor, alpha: float) -> Tensor:
    """Upper-tail CVaR: mean of the largest alpha-fraction (for costs and losses). (..., N) -> (...)."""
    return -cvar_lower(-x, alpha)


def entropic_lower(x: Tensor, theta: float) -> Tensor:
    """Entropic risk of rewards, -(1/theta) log mean exp(-theta x); -> mean as theta -> 0. (N,) -> ()."""
    return -(torch.logsumexp(-theta * x, dim=-1) - math.log(x.numel())) / theta


def entropic_upper(x: Tensor, theta: float) -> Tensor:
    """Entropic risk of costs, (1/theta) log mean exp(theta x). (N,) -> ()."""
    return -entropic_lower(-x, theta)


def tail_counts(x: Tensor, threshold: Tensor, tail: str = "lower") -> Tensor:
    """(samples strictly beyond the threshold, samples at it, all samples) of this part of a batch, as a float
    tensor of shape (3,), ready to be summed across micro-batches or all-reduced across ranks."""
    beyond = (x < threshold) if tail == "lower" else (x > threshold)
    return torch.stack([beyond.sum(), (x == threshold).sum(), torch.tensor(x.numel(), device=x.device)]).to(x.dtype)


def ru_cvar_terms(x: Tensor, threshold: Tensor, alpha: float, tail: str = "lower", counts: Tensor | None = None) -> Tensor:
    """Per-sample Rockafellar-Uryasev terms whose *mean* is the CVaR when `threshold` is the VaR. (N,) -> (N,).

    upper tail: eta + (x - eta)_+ / alpha;  lower tail: eta - (eta - x)_+ / alpha  (Rockafellar & Uryasev 2000).
    Written as eta + c_i (x_i - eta) with constant weights c_i: 1/alpha beyond the threshold, 0 inside it, and
    for samples exactly at it the share of the boundary atom, (alpha N - n_beyond) / (alpha n_at), so that the
    gradient is the CVaR's own (the weights sum to N). Because the CVaR is then a plain mean it is the same whole,
    in micro-batches (gradient accumulation) or in data-parallel shards, provided every part uses the threshold
    and `counts` (`tail_counts`, summed) of the whole batch, e.g. all-gathered. The threshold gets no gradient.
    """
    if tail not in ("lower", "upper"):
        raise ValueError(f"tail={tail!r} is not a tail; accepted: 'lower' (rewards), 'upper' (costs, losses)")
    eta = threshold.detach()
    n_beyond, n_at, n_total = (counts if counts is not None else tail_counts(x.detach(), eta, tail)).tolist()
    beyond = (x < eta) if tail == "lower" else (x > eta)
    at_weight = (alpha * n_total - n_beyond) / (alpha * n_at) if n_at else 0.0
    weight = torch.zeros_like(x, requires_grad=False)
    weight[beyond.detach()] = 1.0 / alpha
    weight[(x == eta).detach()] = at_weight
    return eta + weight * (x - eta)


# ---------------------------------------------------------------------------------------------------------
# Hydra targets (`conf/risk/*.yaml`): one object serves both roles
# ---------------------------------------------------------------------------------------------------------


def check_alpha(alpha: float, key: str = "alpha") -> float:
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0.0 < alpha <= 1.0:
        raise ValueError(f"{key}={alpha!r} is not a risk level: accepted values are in (0, 1] (1 = risk-neutral)")
    return float(alpha)


class CVaREstimator(str, Enum):
    """How the per-token CVaR over the vocabulary is estimated (see README, "Risk measures")."""

    weighted = "weighted"  # paper definition: p_ref-weighted, fractional atom, normalised by alpha (default)
    reference = "reference"  # public Ra-DPO code: unweighted vocabulary quantile, strict threshold, no 1/alpha


class RiskMeasure:
    """A risk functional usable over the vocabulary (per token) and across samples."""

    name: str = "risk"

    def over_vocab(self, d: Tensor, ref_logp: Tensor) -> Tensor:
        """Risk of d = log p_ref - log pi_theta (bad = high) under z ~ p_ref. (..., V) -> (...)."""
        raise NotImplementedError

    def lower_tail(self, x: Tensor) -> Tensor:
        """Risk-adjusted value of rewards (bad = low). (N,) -> ()."""
        raise NotImplementedError

    def upper_tail(self, x: Tensor) -> Tensor:
        """Risk-adjusted value of costs or losses (bad = high). (N,) -> ()."""
        return -self.lower_tail(-x)

    def describe(self) -> dict:
        """Flat description for results.json and the W&B config."""
        return {"risk": self.name}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.describe().items() if k != "risk")
        return f"{type(self).__name__}({args})"


class Mean(RiskMeasure):
    """Risk-neutral: the expectation. Over the vocabulary this is the KL, so Ra-DPO with it is TDPO."""

    name = "mean"

    def over_vocab(self, d: Tensor, ref_logp: Tensor) -> Tensor:
        return vocab_mean(d, ref_logp)

    def lower_tail(self, x: Tensor) -> Tensor:
        return x.mean()


class CVaR(RiskMeasure):
    """Conditional value at risk at tail mass `alpha` (alpha = 1 is the mean)."""

    name = "cvar"

    def __init__(self, alpha: float, estimator: str = "weighted", split_vocab: bool = False):
        self.alpha = check_alpha(alpha)
        try:
            self.estimator = CVaREstimator(getattr(estimator, "value", estimator))
        except ValueError:
            accepted = ", ".join(e.value for e in CVaREstimator)
            raise ValueError(f"risk.estimator={estimator!r} is unknown; accepted: {accepted}") from None
        if split_vocab and self.estimator is not CVaREstimator.reference:
            raise ValueError("risk.split_vocab=true reproduces the public code's quirk and needs risk.estimator=reference")
        self.split_vocab = bool(split_vocab)

    def over_vocab(self, d: Tensor, ref_logp: Tensor) -> Tensor:
        if self.estimator is CVaREstimator.reference:
            return vocab_reference_cvar(d, ref_logp, self.alpha, self.split_vocab)
        return vocab_weighted_cvar(d, ref_logp, self.alpha)

    def lower_tail(self, x: Tensor) -> Tensor:
        return cvar_lower(x, self.alpha)

    def describe(self) -> dict:
        return {"risk": self.name, "risk_param": self.alpha, "estimator": self.estimator.value,
                "split_vocab": self.split_vocab}


class Entropic(RiskMeasure):
    """Entropic risk with risk aversion `theta` > 0 (theta -> 0 is the mean)."""

    name = "entropic"

    def __init__(self, theta: float = 1.0):
        if not isinstance(theta, (int, float)) or not theta > 0:
            raise ValueError(f"risk.theta={theta!r} is not a risk aversion: accepted values are > 0")
        self.theta = float(theta)

    def over_vocab(self, d: Tensor, ref_logp: Tensor) -> Tensor:
        return vocab_entropic(d, ref_logp, self.theta)

    def lower_tail(self, x: Tensor) -> Tensor:
        return entropic_lower(x, self.theta)

    def describe(self) -> dict:
        return {"risk": self.name, "risk_param": self.theta}
