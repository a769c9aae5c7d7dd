"""KL-shaped rewards, GAE and masked whitening: the per-iteration targets of PPO (trl 0.7 semantics).

Shapes: B episodes, T positions. Every per-token tensor is (B, T) and comes with a (B, T) response mask (bool
or 0/1) that is true exactly on the episode's response tokens: prompt, left and right padding are all false,
and rows may have different lengths and offsets. Column t holds one token's quantities: logp[:, t] =
log pi(y_t | s_t), ref_logp likewise, values[:, t] = V(s_t) (trl's `logits[:, :-1]` / `input_ids[:, 1:]`
alignment), so a row's last true column is its last generated token, wherever it sits.

Shaped rewards, advantages and returns are the fixed targets of an iteration: they are returned detached.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def check_same_shape(mask: Tensor, **tensors: Tensor) -> None:
    """Raise a ValueError naming every tensor whose shape differs from the (B, T) response mask's."""
    if mask.dim() != 2:
        raise ValueError(f"mask has shape {tuple(mask.shape)}: accepted is a (B, T) response mask")
    bad = {name: tuple(t.shape) for name, t in tensors.items() if t.shape != mask.shape}
    if bad:
        listed = ", ".join(f"{name} {shape}" for name, shape in bad.items())
        raise ValueError(f"{listed} do not match the response mask's shape {tuple(mask.shape)}")


def bool_mask(mask: Tensor) -> Tensor:
    """The mask as bool: a bool mask as it is, a 0/1 one compared with 0."""
    return mask if mask.dtype == torch.bool else mask != 0


def response_bounds(mask: Tensor) -> tuple[Tensor, Tensor]:
    """(first, last): each row's first and last response column, read from the mask. (B, T) -> (B,), (B,).

    Raises if a row has no response token (it would have no place for its score)."""
    m = bool_mask(mask)
    columns = torch.arange(m.shape[-1], device=m.device).expand_as(m)
    empty = ~m.any(-1)
    if empty.any():
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(f"rows {rows} have no response token in the mask; every episode needs at least one")
    first = torch.where(m, columns, m.shape[-1]).amin(-1)
    last = torch.where(m, columns, -1).amax(-1)
    return first, last


AllReduce = Callable[[Tensor], Tensor]  # sums a tensor over the data-parallel ranks (identity on one process)


def _local(x: Tensor) -> Tensor:
    return x


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None, all_reduce: AllReduce = _local) -> Tensor:
    """Mean of x over the true entries of mask (trl's `masked_mean`); NaN where the mask is empty.

    (B, T) -> () or, with `dim`, the mean along it. Entries outside the mask never enter, not even as NaN.
    `all_reduce` (sum over ranks) makes the mean one over every rank's entries (with `dim=None` only)."""
    m = bool_mask(mask)
    total = torch.where(m, x, 0.0)
    if dim is None:
        return all_reduce(total.sum()) / all_reduce(m.sum())
    return total.sum(dim) / m.sum(dim)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True, all_reduce: AllReduce = _local) -> Tensor:
    """Variance of x over the true entries of mask; `unbiased` applies Bessel's n / (n - 1) as trl does.

    (B, T) -> (). Not finite when the mask holds fewer than two entries (one for the biased variance).
    `all_reduce` as in `masked_mean`: two passes over every rank's entries, as on one process."""
    m = bool_mask(mask)
    centered = torch.where(m, x - masked_mean(x, m, all_reduce=all_reduce), 0.0)
    variance = masked_mean(centered**2, m, all_reduce=all_reduce)
    if unbiased:
        n = all_reduce(m.sum())
        variance = variance * n / (n - 1)
    return variance


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  all_reduce: AllReduce = _local) -> Tensor:
    """trl's `masked_whiten` over the true entries of mask: (x - mu) / sqrt(var + eps), unbiased variance.

    With shift_mean=False the mean is added back (only the scale is normalised). The statistics come from the
    masked entries only, so RA-RLHF whitens over the kept tokens by passing the kept-token mask; entries
    outside the mask are returned as 0 (they never enter a loss). Under data parallelism `all_reduce` (a sum
    over ranks) takes the statistics over the global batch's tokens. (B, T) -> (B, T)."""
    check_same_shape(mask, x=x)
    m = bool_mask(mask)
    n = int(all_reduce(m.sum()))
    if n < 2:
        raise ValueError(f"the mask holds {n} token(s): whitening with the unbiased variance needs at least 2")
    mean, var = masked_mean(x, m, all_reduce=all_reduce), masked_var(x, m, unbiased=True, all_reduce=all_reduce)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(m, whitened, 0.0)


def shaped_rewards(logp: Tensor, ref_logp: Tensor, scores: Tensor, mask: Tensor, beta_kl: float | Tensor) -> Tensor:
    """KL-shaped per-token reward (RA-RLHF eq. 5, trl's `compute_rewards` with kl_penalty="kl"). -> (B, T).

        r_t = -beta_kl * (log pi(y_t|s_t) - log pi_ref(y_t|s_t))   on response tokens, 0 elsewhere,
        r_t += score                                              at the row's own last response token.

    logp, ref_logp, mask: (B, T); scores: (B,) environment rewards; beta_kl >= 0 the current KL coefficient.
    """
    check_same_shape(mask, logp=logp, ref_logp=ref_logp)
    if scores.shape != mask.shape[:1]:
        raise ValueError(f"scores has shape {tuple(scores.shape)}: accepted is ({mask.shape[0]},), one per row")
    beta = beta_kl.detach() if isinstance(beta_kl, Tensor) else float(beta_kl)
    if not float(beta) >= 0:
        raise ValueError(f"beta_kl={float(beta)!r} is not a KL coefficient: accepted values are >= 0")
    m = bool_mask(mask)
    _, last = response_bounds(m)
    kl = (logp - ref_logp).detach()
    rewards = torch.where(m, -beta * kl, 0.0)
    rows = torch.arange(m.shape[0], device=m.device)
    return rewards.index_put((rows, last), scores.detach().to(rewards.dtype), accumulate=True)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over each row's response tokens (trl's `compute_advantages`).

        delta_t = r_t + gamma * V_{t'} - V_t,   A_t = delta_t + gamma * lam * A_{t'},   returns_t = A_t + V_t,

    where t' is the row's next response position (V_{t'} = A_{t'} = 0 after its last token). Positions outside
    the mask are skipped, so left padding, right padding and unequal lengths are all handled by the mask;
    for a contiguous response this is trl's recursion exactly. returns_t is the lambda-return; at lam = 1 it
    is the Monte Carlo return-to-go. rewards, values, mask: (B, T) -> (advantages, returns), both (B, T),
    0 outside the mask, detached.
    """
    check_same_shape(mask, rewards=rewards, values=values)
    for key, value in (("gamma", gamma), ("lam", lam)):
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{key}={value!r} is not a discount: accepted values are in [0, 1]")
    m = bool_mask(mask)
    dtype = torch.promote_types(rewards.dtype, values.dtype)
    r, v = rewards.detach().to(dtype), values.detach().to(dtype)
    advantages = torch.zeros_like(r)
    next_value = torch.zeros(r.shape[0], dtype=dtype, device=r.device)
    next_advantage = torch.zeros_like(next_value)
    for t in reversed(range(r.shape[1])):
        valid = m[:, t]
        delta = torch.where(valid, r[:, t], 0.0) + gamma * next_value - torch.where(valid, v[:, t], 0.0)
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = torch.where(valid, advantage, 0.0)
        next_advantage = torch.where(valid, advantage, next_advantage)
        next_value = torch.where(valid, v[:, t], next_value)
    returns = torch.where(m, advantages + v, 0.0)
    return advantages, returns
