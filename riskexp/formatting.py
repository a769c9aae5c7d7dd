"""How riskexp writes results: readable metric names and one rounding rule, for the end-of-run table and the
report's tables and plots."""

from __future__ import annotations

import math

# Readable metric names, for table headers and axis labels: the name below the prefix (`eval/`, ...); {level}
# is the evaluation's tail level (config eval.alpha, or the level a name ends with: reward_cvar@0.05).
METRIC_LABELS = {
    "reward_mean": "reward mean",
    "reward_cvar": "reward CVaR@{level}",
    "reward_var": "reward VaR@{level}",
    "cost_mean": "cost mean",
    "cost_cvar": "cost CVaR@{level}",
    "cost_var": "cost VaR@{level}",
    "cost_rate": "cost rate",
    "kl": "KL to reference",
    "shaped_return_mean": "shaped return",  # reward - beta * log(pi/pi_ref) of the completion (RLHF's R_bar)
    "reward_win_rate": "win rate by reward",   # against the reference, a tie counting 0.5 (SACPO)
    "cost_win_rate": "win rate by cost",
    "length_mean": "length (tokens)",
    "distinct_1": "distinct-1",
    "distinct_2": "distinct-2",
    "perplexity": "perplexity",
    "loss": "loss",
    "implicit_accuracy": "implicit accuracy",
    "reward_accuracy": "reward accuracy",
    "reward_margin": "reward margin",
    "kl_chosen": "KL on chosen",
    "kl_rejected": "KL on rejected",
    "risk_ratio_chosen": "risk ratio on chosen",
    "risk_ratio_rejected": "risk ratio on rejected",
    "steps": "steps",
    "wall_time_s": "wall time (s)",
}


def _missing(x: float | None) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _decimals(scale: float, digits: int) -> int:
    return max(0, digits - 1 - math.floor(math.log10(scale))) if scale > 0 else 0


def _fixed(x: float, decimals: int, sign: str) -> str:
    text = f"{x:{sign}.{decimals}f}"
    return text.lstrip("+-") if float(text) == 0 else text  # no "-0.00"


def format_estimate(value: float | None, *, sd: float | None = None, lo: float | None = None,
                    hi: float | None = None, digits: int = 3, integer: bool = False, sign: str = "") -> str:
    """`value ± sd`, `value [lo, hi]` or `value`; `-` where there is no value.

    Rounding: `digits` significant digits, counted on the larger of |value| and the spread (the sd, or the
    interval's half-width), and the sd and bounds with as many decimals as the value, so an estimate reads as
    one precision: `0.160 ± 0.014`, `-0.012 [-0.276, 0.212]`. Counting on the spread too keeps a value near
    zero from looking more precise than it is (`0.0012 ± 0.0456`, not `0.00123 ± 0.04560`). Magnitudes of 100
    and more show no decimals (`1234 ± 56`); below 0.001 or from 10^6 on, each number is written in scientific
    notation with `digits` significant digits (`1.23e-05 ± 4.00e-06`). `integer` (whole numbers, such as
    steps): no decimals. `sign="+"` writes the signs of changes (`+0.10 [+0.02, +0.18]`; the sd stays unsigned).
    """
    if _missing(value):
        return "-"
    spread = None if _missing(sd) else sd
    interval = spread is None and not _missing(lo) and not _missing(hi)
    half_width = (hi - lo) / 2 if interval else 0.0
    scale = max(abs(value), abs(spread or 0.0), abs(half_width))
    if integer:
        decimals = 0
    elif 0 < scale < 1e-3 or scale >= 1e6:
        decimals = None
    else:
        decimals = _decimals(scale, digits)

    def text(x: float, signed: str = sign) -> str:
        return f"{x:{signed}.{digits - 1}e}" if decimals is None else _fixed(x, decimals, signed)

    if spread is not None:
        return f"{text(value)} ± {text(spread, '')}"
    if interval:
        return f"{text(value)} [{text(lo)}, {text(hi)}]"
    return text(value)
