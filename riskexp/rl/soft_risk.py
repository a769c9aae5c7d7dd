"""RA-RLHF's soft-risk schedule: the tail fraction alpha'(m) of iteration m, and the episodes it keeps.

m is the 0-based iteration (dataloader step), n the warm start, M the number of iterations (the caller
derives it from the data loader and epochs; the reference hard-codes it per script), B the batch size.

* "new" (RA-RLHF eqs. 8-10, the paper's runs, `--risk_scheduler="new"`):
      alpha'(m) = 1                                   m <= n
                = alpha                               m >= ceil(rho M)
                = max(alpha, 1 - K (m - n)),          K = (1 - alpha) / (ceil(rho M) - n), otherwise.
* "old" (CeSoR-style, Greenberg et al. 2022):  alpha'(m) = 1 for m <= n, else max(alpha, 1 - (1-alpha)(m-n)/(rho M)).

k = ceil(B alpha'(m)) episodes are kept, with math.ceil on the float64 expression in the reference's order
(`math.ceil(B * max(alpha, 1 - K * (m - n)))`), which reproduces its counts exactly.
"""

from __future__ import annotations

import math
from numbers import Integral

from riskexp.risk import check_alpha

SCHEDULES = ("new", "old")


def _count(key: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{key}={value!r}: accepted are integers >= {minimum}")
    return int(value)


def _check(schedule: str, alpha: float, n: int, rho: float, M: int, m: int) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is unknown; accepted: {', '.join(SCHEDULES)}")
    check_alpha(alpha)
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0.0 < rho <= 1.0:
        raise ValueError(f"rho={rho!r} is not a fraction of training: accepted values are in (0, 1]")
    _count("n", n, 0)
    _count("M", M, 1)
    _count("m", m, 0)


def soft_risk_level(m: int, alpha: float, n: int, rho: float, M: int, schedule: str = "new") -> float:
    """alpha'(m) in [alpha, 1], the fraction of the batch kept at iteration m (see the module docstring)."""
    _check(schedule, alpha, n, rho, M, m)
    if m <= n:
        return 1.0
    if schedule == "old":
        return max(alpha, 1 - (1 - alpha) * (m - n) / (rho * M))
    end = math.ceil(rho * M)
    if m >= end:
        return float(alpha)
    K = (1 - alpha) / (end - n)
    return max(alpha, 1 - K * (m - n))


def soft_risk_count(m: int, batch_size: int, alpha: float, n: int, rho: float, M: int, schedule: str = "new") -> int:
    """k = ceil(B alpha'(m)), the number of episodes kept at iteration m (the reference's `alpha_N_ceil`)."""
    _count("batch_size", batch_size, 1)
    return math.ceil(batch_size * soft_risk_level(m, alpha, n, rho, M, schedule))
