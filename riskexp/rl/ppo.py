"""PPO's clipped losses and the per-minibatch statistics the trainer logs (trl 0.7 `PPOTrainer.loss`).

Shapes: a minibatch of B episodes over T positions; every per-token tensor is (B, T) with a (B, T) response
mask (bool or 0/1; RA-RLHF passes the kept-token mask). Means are over the mask's tokens, all rows together
(trl's `masked_mean`). `old_logp`, `old_values`, `advantages` and `returns` come from the rollout and are
constants of the update: the losses detach them, so gradient reaches the policy only through `logp` and the
critic only through `values`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from riskexp.rl.gae import bool_mask, check_same_shape, masked_mean, masked_var


def _check_positive(key: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{key}={value!r}: accepted values are > 0")
    return float(value)


def _loss_mean(x: Tensor, mask: Tensor) -> Tensor:
    """masked_mean for losses: 0, with a zero gradient, when the minibatch holds no token (never NaN)."""
    m = bool_mask(mask)
    return torch.where(m, x, 0.0).sum() / m.sum().clamp(min=1)


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_range: float = 0.2,
    weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Clipped surrogate (Schulman et al. 2017, eq. 7; trl `PPOTrainer.loss`), negated. -> ((), (B, T)).

        ratio_t = exp(logp_t - old_logp_t),
        loss = masked_mean(max(-A_t ratio_t, -A_t clip(ratio_t, 1 - clip_range, 1 + clip_range))).

    `weights` (B,) or (B, T), >= 0, optional: multiplies each token's term before the mean over the mask's
    tokens (for `risk=entropic` episode weights averaging 1; the count of tokens stays the normaliser, so
    weights are not renormalised within a minibatch). Returns the loss and the (B, T) ratio (with gradient; 1 off the mask).
    """
    check_same_shape(mask, logp=logp, old_logp=old_logp, advantages=advantages)
    clip_range = _check_positive("clip_range", clip_range)
    m = bool_mask(mask)
    ratio = torch.exp(torch.where(m, logp - old_logp.detach(), 0.0))  # 1 off the mask: no NaN reaches a gradient
    a = torch.where(m, advantages.detach(), 0.0)
    terms = torch.maximum(-a * ratio, -a * ratio.clamp(1.0 - clip_range, 1.0 + clip_range))
    if weights is not None:
        w = weights.detach()
        w = w[:, None] if w.dim() == 1 else w
        if w.shape not in ((mask.shape[0], 1), tuple(mask.shape)):
            raise ValueError(f"weights has shape {tuple(weights.shape)}: accepted are ({mask.shape[0]},) or "
                             f"{tuple(mask.shape)}")
        terms = terms * w
    return _loss_mean(terms, m), ratio


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range_value: float = 0.2) -> Tensor:
    """trl's clipped value loss: 0.5 * masked_mean(max((V - R)^2, (clip(V, V_old -+ c) - R)^2)). -> ().

    values: the critic's current predictions (with gradient); old_values: the rollout's; returns: GAE's
    lambda-returns; all (B, T). The critic regresses on the masked tokens only (RA-RLHF eq. 13)."""
    check_same_shape(mask, values=values, old_values=old_values, returns=returns)
    c = _check_positive("clip_range_value", clip_range_value)
    m = bool_mask(mask)
    values = torch.where(m, values, 0.0)
    old, target = torch.where(m, old_values.detach(), 0.0), torch.where(m, returns.detach(), 0.0)
    clipped = torch.maximum(torch.minimum(values, old + c), old - c)
    return 0.5 * _loss_mean(torch.maximum((values - target) ** 2, (clipped - target) ** 2), m)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last axis, in float32 or wider. (..., V) -> (...)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    log_p = torch.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p.nan_to_num(neginf=0.0)).sum(-1)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var[returns - values] / Var[returns] over the masked tokens; NaN when the returns do not vary. -> ()."""
    var_returns = masked_var(returns, mask)
    ratio = masked_var(returns - values, mask) / var_returns
    return torch.where(var_returns > 0, 1 - ratio, torch.nan)


@dataclass
class PPOOutput:
    loss: Tensor  # () policy_loss + vf_coef * value_loss, with gradient
    policy_loss: Tensor  # () with gradient
    value_loss: Tensor  # () with gradient
    skip: Tensor  # () bool: mean ratio above ratio_threshold, or no token in the minibatch: skip the step
    stats: dict[str, Tensor] = field(default_factory=dict)  # () detached statistics for the logger


def ppo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_range: float = 0.2,
    clip_range_value: float = 0.2,
    vf_coef: float = 0.1,
    ratio_threshold: float = 10.0,
    logits: Tensor | None = None,
    weights: Tensor | None = None,
) -> PPOOutput:
    """One PPO minibatch: L = L_clip + vf_coef * L_V (trl 0.7 defaults: clip 0.2, value clip 0.2, vf_coef 0.1).

    The ratio guard is trl's: a minibatch whose masked mean ratio exceeds `ratio_threshold` is not stepped
    (`skip`); the losses are still returned as computed. `logits` (B, T, V), optional, aligned with `logp`,
    adds the masked mean entropy to the statistics. Statistics (all () tensors, detached):
    clip_fraction (tokens where the clipped branch is active), approx_kl = 0.5 mean (logp - old)^2,
    policy_kl = mean (old - logp), mean_ratio, value_clip_fraction, value_error = mean (V - R)^2,
    explained_variance (V vs R), advantage_mean, return_mean, value_mean, n_tokens, entropy (with logits).
    """
    if isinstance(vf_coef, bool) or not isinstance(vf_coef, (int, float)) or not vf_coef >= 0:
        raise ValueError(f"vf_coef={vf_coef!r}: accepted values are >= 0")
    ratio_threshold = _check_positive("ratio_threshold", ratio_threshold)
    pg_loss, ratio = policy_loss(logp, old_logp, advantages, mask, clip_range, weights)
    vf_loss = value_loss(values, old_values, returns, mask, clip_range_value)
    m = bool_mask(mask)
    with torch.no_grad():
        a, old_v, target = advantages.detach(), old_values.detach(), returns.detach()
        r, v, log_ratio = ratio.detach(), values.detach(), (logp - old_logp).detach()
        unclipped = -a * r
        clipped = -a * r.clamp(1.0 - clip_range, 1.0 + clip_range)
        v_clipped = torch.maximum(torch.minimum(v, old_v + clip_range_value), old_v - clip_range_value)
        n_tokens = m.sum()
        mean_ratio = masked_mean(r, m)
        stats = {
            "clip_fraction": masked_mean((clipped > unclipped).to(r.dtype), m),
            "approx_kl": 0.5 * masked_mean(log_ratio**2, m),
            "policy_kl": masked_mean(-log_ratio, m),
            "mean_ratio": mean_ratio,
            "value_clip_fraction": masked_mean(((v_clipped - target) ** 2 > (v - target) ** 2).to(v.dtype), m),
            "value_error": masked_mean((v - target) ** 2, m),
            "explained_variance": explained_variance(v, target, m),
            "advantage_mean": masked_mean(a, m),
            "return_mean": masked_mean(target, m),
            "value_mean": masked_mean(v, m),
            "n_tokens": n_tokens.to(r.dtype),
        }
        if logits is not None:
            if logits.shape[:2] != mask.shape:
                raise ValueError(f"logits has shape {tuple(logits.shape)}: accepted is {tuple(mask.shape)} + (V,)")
            stats["entropy"] = masked_mean(entropy_from_logits(logits.detach()), m)
        skip = (n_tokens == 0) | (mean_ratio > ratio_threshold)
    loss = pg_loss + vf_coef * vf_loss
    stats.update(loss=loss.detach(), policy_loss=pg_loss.detach(), value_loss=vf_loss.detach())
    return PPOOutput(loss=loss, policy_loss=pg_loss, value_loss=vf_loss, skip=skip, stats=stats)
