"""The KL coefficient beta of the shaped reward: fixed, or Ziegler et al.'s adaptive proportional controller.

Adaptive (Ziegler et al. 2019, Sec. 2.2; RA-RLHF eq. 12; trl's `AdaptiveKLController`):

    e = clip(KL / target - 1, -0.2, 0.2),    beta <- beta * (1 + e * n_steps / horizon),

with n_steps the episodes seen since the last update (trl: batch_size * num_processes), so K_beta =
n_steps / horizon = 128 / 10000 in the paper. What KL is fed in is the caller's choice (riskexp.rl.tail).
"""

from __future__ import annotations

from numbers import Integral

from torch import Tensor

ERROR_CLIP = 0.2


def adaptive_kl_update(beta: float, current_kl: float, target: float, horizon: float, n_steps: int) -> float:
    """One proportional update of beta (RA-RLHF eq. 12). Scalars in, the new beta out."""
    error = min(max(float(current_kl) / target - 1.0, -ERROR_CLIP), ERROR_CLIP)
    return beta * (1.0 + error * n_steps / horizon)


def _positive(key: str, value, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ValueError(f"kl.{key}={value!r}: accepted values are {'>= 0' if allow_zero else '> 0'}")
    return float(value)


def _steps(n_steps) -> int:
    if isinstance(n_steps, bool) or not isinstance(n_steps, Integral) or n_steps < 1:
        raise ValueError(f"n_steps={n_steps!r} is not a number of episodes: accepted are integers >= 1")
    return int(n_steps)


class FixedKLController:
    """beta stays at `init` (trl's `adap_kl_ctrl=False`)."""

    adaptive = False

    def __init__(self, init: float = 0.2):
        self.value = _positive("init", init, allow_zero=True)

    def update(self, current_kl: float | Tensor, n_steps: int) -> float:
        _steps(n_steps)
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """beta starts at `init` and follows `adaptive_kl_update` toward the KL `target` (paper: 0.2, 6, 10000)."""

    adaptive = True

    def __init__(self, init: float = 0.2, target: float = 6.0, horizon: float = 10000.0):
        self.value = _positive("init", init)
        self.target = _positive("target", target)
        self.horizon = _positive("horizon", horizon)

    def update(self, current_kl: float | Tensor, n_steps: int) -> float:
        """Feed the iteration's KL (a float or a () tensor) and the number of episodes; returns the new beta."""
        self.value = adaptive_kl_update(self.value, float(current_kl), self.target, self.horizon, _steps(n_steps))
        return self.value


def kl_controller(adaptive: bool = True, init: float = 0.2, target: float = 6.0, horizon: float = 10000.0):
    """The controller a config asks for: adaptive (trl's default, the paper's) or fixed at `init`."""
    if adaptive:
        return AdaptiveKLController(init, target, horizon)
    return FixedKLController(init)
