"""Learning-rate schedules, counted in optimizer steps (`conf/scheduler/*.yaml`).

Each is a factory `(optimizer, total_steps) -> LambdaLR`; Hydra partially applies the remaining arguments.
The warm-up lasts `warmup_steps` (the reference code's 150) but at most `max_warmup_fraction` of the run, so a
short run still reaches its peak learning rate.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_length(total_steps: int, warmup_steps: int, max_warmup_fraction: float) -> int:
    return min(warmup_steps, int(max_warmup_fraction * total_steps))


def _warmup(step: int, warmup_steps: int) -> float:
    # linear from 1/(warmup+1) to 1, as in the DPO/TDPO reference code's LambdaLR
    return min(1.0, (step + 1) / (warmup_steps + 1))


def warmup_constant(optimizer: Optimizer, total_steps: int, warmup_steps: int = 150,
                    max_warmup_fraction: float = 0.1) -> LambdaLR:
    """Linear warm-up then constant (DPO and TDPO reference code)."""
    warmup = warmup_length(total_steps, warmup_steps, max_warmup_fraction)
    return LambdaLR(optimizer, lambda step: _warmup(step, warmup))


def warmup_cosine(optimizer: Optimizer, total_steps: int, warmup_steps: int = 150, max_warmup_fraction: float = 0.1,
                  min_lr_ratio: float = 0.0) -> LambdaLR:
    """Linear warm-up then cosine decay to `min_lr_ratio` x peak at `total_steps` (Ra-DPO reference code)."""
    warmup = warmup_length(total_steps, warmup_steps, max_warmup_fraction)

    def factor(step: int) -> float:
        if step < warmup:
            return _warmup(step, warmup)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
