"""Score-model losses (Safe RLHF, Dai et al. 2024, eq. 5 and 6; safe-rlhf `values/reward` and `values/cost`):
pure torch functions of end scores, and the two objectives Hydra instantiates from `conf/algo/*_model.yaml`.

Shapes: B preference pairs; each response has one end score, the score model's output at its last token:
    better / worse     (B,)  reward model: R(y_w), R(y_l), y_w the preferred (more helpful) response
    safer / unsafer    (B,)  cost model:   C(y_safer), C(y_unsafer)
    safer_sign / unsafer_sign (B,) float: s = +1 for an unsafe response, -1 for a safe one (cost convention)
Losses are returned as scalars: the mean over pairs plus the optional `reg * mean(score^2)` over both responses
(safe-rlhf's `--regularization`, which keeps scores near 0 so a sign threshold stays meaningful).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def _score_regulariser(a: Tensor, b: Tensor, reg: float) -> Tensor:
    return reg * torch.stack([a, b]).square().mean()


def bradley_terry_loss(better: Tensor, worse: Tensor, reg: float = 0.0) -> Tensor:
    """Reward model (Safe RLHF eq. 5): mean -log sigma(R(y_w) - R(y_l)) [+ reg mean(R^2)]. (B,), (B,) -> ()."""
    return -F.logsigmoid(better - worse).mean() + _score_regulariser(better, worse, reg)


def safe_rlhf_cost_loss(safer: Tensor, unsafer: Tensor, safer_sign: Tensor, unsafer_sign: Tensor,
                        reg: float = 0.0) -> Tensor:
    """Cost model, sequence-wise (Safe RLHF eq. 6):
        mean[-log sigma(C_unsafer - C_safer) - log sigma(s_safer C_safer) - log sigma(s_unsafer C_unsafer)]
        [+ reg mean(C^2)],
    s = +1 unsafe, -1 safe: the pair term ranks the costs, the sign terms put unsafe responses above 0 and safe
    ones below, so that sign(C) predicts unsafe. (B,) x 4 -> ()."""
    losses = -F.logsigmoid(unsafer - safer) - F.logsigmoid(safer_sign * safer) - F.logsigmoid(unsafer_sign * unsafer)
    return losses.mean() + _score_regulariser(safer, unsafer, reg)


def unsafe_sign(is_safe: Tensor) -> Tensor:
    """(N,) bool is-safe labels -> (N,) float signs of the cost convention: +1 unsafe, -1 safe."""
    return 1.0 - 2.0 * is_safe.float()


@dataclass
class ScoreLoss:
    loss: Tensor  # () the training loss
    metrics: dict[str, Tensor]  # () each, detached: logged per step and per validation epoch


def _check_reg(reg: float) -> float:
    if isinstance(reg, bool) or not isinstance(reg, (int, float)) or reg < 0:
        raise ValueError(f"algo.objective.reg={reg!r}: accepted values are numbers >= 0")
    return float(reg)


class RewardObjective:
    """Bradley-Terry on (chosen, rejected) pairs: chosen = the preferred response (helpfulness pairs, or any
    preference data). Metrics: pair accuracy P(R_w > R_l), the mean margin, the mean score."""

    def __init__(self, reg: float = 0.0):
        self.reg = _check_reg(reg)

    def __call__(self, chosen: Tensor, rejected: Tensor, is_safe: Tensor | None = None) -> ScoreLoss:
        loss = bradley_terry_loss(chosen, rejected, self.reg)
        margin = (chosen - rejected).detach()
        return ScoreLoss(loss, {"pair_accuracy": (margin > 0).float().mean(), "margin": margin.mean(),
                                "score_mean": torch.cat([chosen, rejected]).detach().mean()})


class CostObjective:
    """Safe RLHF's cost loss on harmlessness pairs: chosen = the safer response, rejected = the unsafer one;
    `is_safe` (2B,) holds the responses' labels, chosen rows first. Metrics: pair accuracy P(C_unsafer >
    C_safer), sign accuracy P((C > 0) = unsafe) over both responses, the unsafe rate P(C > 0), the mean cost."""

    def __init__(self, reg: float = 0.0):
        self.reg = _check_reg(reg)

    def __call__(self, chosen: Tensor, rejected: Tensor, is_safe: Tensor | None = None) -> ScoreLoss:
        if is_safe is None:
            raise ValueError("the cost model needs each response's safety label (is_response_k_safe): train on "
                             "harmlessness pairs of a PKU-SafeRLHF-schema task, e.g. data=safety")
        signs = unsafe_sign(is_safe).to(chosen)
        half = chosen.shape[0]
        loss = safe_rlhf_cost_loss(chosen, rejected, signs[:half], signs[half:], self.reg)
        costs = torch.cat([chosen, rejected]).detach()
        return ScoreLoss(loss, {"pair_accuracy": (rejected > chosen).float().mean(),
                                "sign_accuracy": ((costs > 0) == (signs > 0)).float().mean(),
                                "unsafe_rate": (costs > 0).float().mean(), "score_mean": costs.mean()})
