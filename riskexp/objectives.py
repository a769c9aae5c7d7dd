"""Preference objectives: pure torch losses, and the small classes Hydra instantiates from `conf/algo/*.yaml`.

Shapes: B preference pairs. Inputs are per-pair sums over response tokens (see `riskexp.logps`):
    chosen_logratios / rejected_logratios  (B,)  sum_t log pi_theta(y_t|s_t) - log pi_ref(y_t|s_t)
    chosen_term / rejected_term            (B,)  TDPO: sequential KL D_SeqKL; Ra-DPO: sequential risk ratio D_SeqRR
Losses are returned per pair (B,); the training step averages them (the DPO/TDPO repos' reduction).
KTO is unpaired: N completions with (N,) log-ratios, (N,) bool labels (desirable) and a scalar KL anchor z0; its
losses are per completion (N,), averaged by the step (TRL's reduction).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from riskexp.logps import SequenceStats
from riskexp.risk import Mean, RiskMeasure

# ---------------------------------------------------------------------------------------------------------
# Pure losses
# ---------------------------------------------------------------------------------------------------------


def dpo_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """DPO (Rafailov et al. 2023, eq. 7): -log sigma(beta h), h = chosen - rejected log-ratio. (B,) -> (B,).

    label_smoothing eps > 0 is conservative DPO (cDPO): the label is flipped with probability eps,
    -(1 - eps) log sigma(beta h) - eps log sigma(-beta h).
    """
    h = chosen_logratios - rejected_logratios
    return -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing


def ipo_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float) -> Tensor:
    """IPO (Azar et al. 2024, sampled loss of Sec. 5): (h - 1/(2 beta))^2, beta playing the role of tau. (B,) -> (B,).

    The log-ratios are sums over response tokens, as in the IPO paper and the DPO reference code; TRL averages
    them per token first (`IPO(average_log_ratios=True)`)."""
    h = chosen_logratios - rejected_logratios
    return (h - 1 / (2 * beta)) ** 2


def token_level_loss(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    chosen_term: Tensor,
    rejected_term: Tensor,
    beta: float,
    variant: int = 1,
    kl_weight: float = 0.5,
) -> Tensor:
    """TDPO1/2 (Zeng et al. 2024) and Ra-DPO1/2 (Zhang et al. 2025, eq. 17 and 19). (B,) -> (B,).

    u = beta (l_w - l_l) and delta = beta T_l - beta T_w, with T the sequential KL (TDPO) or risk ratio (Ra-DPO):
        variant 1:  -log sigma(u - delta)                                   (Ra-DPO eq. 17)
        variant 2:  -log sigma(u - kl_weight (beta T_l - sg(beta T_w)))     (Ra-DPO eq. 19)
    The stop-gradient sg changes only the gradient, never the value: the chosen sequence's term is not pushed
    down, which the TDPO paper found to keep the KL on chosen responses from collapsing.
    """
    margin = chosen_logratios - rejected_logratios
    if variant == 1:
        z = margin - (rejected_term - chosen_term)
    elif variant == 2:
        z = margin - kl_weight * (rejected_term - chosen_term.detach())
    else:
        raise ValueError(f"algo.variant={variant!r} is not a variant; accepted: 1, 2")
    return -F.logsigmoid(beta * z)


# ---------------------------------------------------------------------------------------------------------
# Objectives: turn the concatenated batch's SequenceStats into per-pair losses, rewards and metrics
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ObjectiveOutput:
    losses: Tensor  # (B,) per-pair loss
    chosen_rewards: Tensor  # (B,) detached, the method's own reward (DPO: beta l; TDPO/Ra-DPO: beta (l + T))
    rejected_rewards: Tensor  # (B,)
    metrics: dict[str, Tensor] = field(default_factory=dict)  # extra (B,) or scalar metrics


def _split(x: Tensor) -> tuple[Tensor, Tensor]:
    """Rows are [chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}]."""
    half = x.shape[0] // 2
    return x[:half], x[half:]


def _check_beta(beta: float) -> float:
    if not isinstance(beta, (int, float)) or not beta > 0:
        raise ValueError(f"beta={beta!r} is not a KL temperature: accepted values are > 0")
    return float(beta)


class SequenceObjective:
    """Base for objectives that need only sequence log-probs (reference log-probs may be precomputed)."""

    uses_vocab_terms = False
    vocab_risk = None

    def __init__(self, beta: float):
        self.beta = _check_beta(beta)

    def losses(self, chosen_logratios: Tensor, rejected_logratios: Tensor) -> Tensor:
        raise NotImplementedError

    def logratios(self, stats: SequenceStats) -> Tensor:
        """(2B,) the per-sequence log-ratios the loss and rewards use: sums over response tokens."""
        return stats.logratios

    def __call__(self, stats: SequenceStats) -> ObjectiveOutput:
        chosen, rejected = _split(self.logratios(stats))
        return ObjectiveOutput(
            losses=self.losses(chosen, rejected),
            chosen_rewards=self.beta * chosen.detach(),
            rejected_rewards=self.beta * rejected.detach(),
        )


class DPO(SequenceObjective):
    def __init__(self, beta: float, label_smoothing: float = 0.0):
        super().__init__(beta)
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"algo.label_smoothing={label_smoothing!r}: accepted values are in [0, 0.5)")
        self.label_smoothing = float(label_smoothing)

    def losses(self, chosen_logratios: Tensor, rejected_logratios: Tensor) -> Tensor:
        return dpo_loss(chosen_logratios, rejected_logratios, self.beta, self.label_smoothing)


class IPO(SequenceObjective):
    """IPO on summed log-ratios; `average_log_ratios=True` divides each by its response's token count (TRL's
    IPO), which makes the target margin 1 / (2 beta) per token rather than per sequence."""

    def __init__(self, beta: float, average_log_ratios: bool = False):
        super().__init__(beta)
        self.average_log_ratios = bool(average_log_ratios)

    def logratios(self, stats: SequenceStats) -> Tensor:
        if not self.average_log_ratios:
            return stats.logratios
        return stats.logratios / stats.n_tokens.clamp(min=1)

    def losses(self, chosen_logratios: Tensor, rejected_logratios: Tensor) -> Tensor:
        return ipo_loss(chosen_logratios, rejected_logratios, self.beta)


class TDPO:
    """TDPO1/2: token-level DPO with the sequential KL. `RaDPO` swaps the KL for a risk ratio."""

    uses_vocab_terms = True

    def __init__(self, beta: float, variant: int = 1, kl_weight: float = 0.5):
        self.beta = _check_beta(beta)
        if variant not in (1, 2):
            raise ValueError(f"algo.variant={variant!r} is not a variant; accepted: 1, 2")
        if not kl_weight >= 0:
            raise ValueError(f"algo.kl_weight={kl_weight!r}: accepted values are >= 0")
        self.variant = int(variant)
        self.kl_weight = float(kl_weight)
        self.vocab_risk = None  # TDPO's term is the KL itself

    def term(self, stats: SequenceStats) -> Tensor:
        return stats.seq_kl

    def __call__(self, stats: SequenceStats) -> ObjectiveOutput:
        chosen, rejected = _split(stats.logratios)
        chosen_term, rejected_term = _split(self.term(stats))
        losses = token_level_loss(chosen, rejected, chosen_term, rejected_term, self.beta, self.variant, self.kl_weight)
        # the reference code's reward for these methods includes the term: beta (l + T)
        chosen_rewards = self.beta * (chosen + chosen_term).detach()
        rejected_rewards = self.beta * (rejected + rejected_term).detach()
        return ObjectiveOutput(losses, chosen_rewards, rejected_rewards)


class RaDPO(TDPO):
    """Ra-DPO1/2: TDPO with the sequential risk ratio of a risk measure over the vocabulary."""

    def __init__(self, beta: float, risk: RiskMeasure | None = None, variant: int = 1, kl_weight: float = 0.5):
        super().__init__(beta, variant, kl_weight)
        self.risk = risk if risk is not None else Mean()
        self.vocab_risk = self.risk.over_vocab

    def term(self, stats: SequenceStats) -> Tensor:
        return stats.seq_risk


def implicit_reward_accuracy(chosen_logratios: Tensor, rejected_logratios: Tensor) -> Tensor:
    """Fraction of pairs where the DPO implicit reward prefers the chosen response: comparable across methods,
    unlike each method's own reward (TDPO/Ra-DPO include their term in it). (B,) -> ()."""
    return (chosen_logratios > rejected_logratios).float().mean()



# ---------------------------------------------------------------------------------------------------------
# Unpaired objectives: N completions, each desirable or undesirable, and a KL anchor
# ---------------------------------------------------------------------------------------------------------


def kto_loss(
    logratios: Tensor,
    desirable: Tensor,
    z0: Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> Tensor:
    """KTO (Ethayarajh et al. 2024, eq. 8; TRL's `KTOTrainer.kto_loss`). (N,), (N,) bool, () -> (N,).

    rho = logratios, the summed log pi_theta - log pi_ref over each completion's tokens; z0 the KL anchor:
        desirable y:    w_d (1 - sigma(beta (rho - z0)))
        undesirable y:  w_u (1 - sigma(beta (z0 - rho)))
    z0 is a reference point, not a term to optimise: it is detached here (the paper back-propagates through
    rho only), so a z0 computed from the policy gives the gradients of the same value supplied as a constant.
    """
    sign = desirable.to(logratios.dtype) * 2 - 1  # +1 desirable, -1 undesirable
    weights = logratios.new_full(logratios.shape, undesirable_weight).masked_fill(desirable, desirable_weight)
    # 1 - sigma(x) = sigma(-x), exact in floating point where 1 - sigma(x) cancels
    return weights * torch.sigmoid(-beta * sign * (logratios - z0.detach()))


def kto_kl_anchor(kl_logratios: Tensor, gather: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """KTO's KL anchor z0 from the log-ratios of mismatched (prompt_i, completion_j) rows. (M,) -> ().

    The batch mean, detached, averaged over ranks by `gather` (a function returning every rank's value, e.g.
    `LightningModule.all_gather`; None on one process), then clamped at 0: TRL's
    `gather(mean(policy_KL_logps - reference_KL_logps)).mean().clamp(min=0)`. A KL is never negative; the
    estimate from a few mismatched rows can be."""
    z0 = kl_logratios.detach().mean()
    if gather is not None:
        z0 = gather(z0).mean()
    return z0.clamp(min=0)


@dataclass
class UnpairedOutput:
    losses: Tensor  # (N,) per-completion loss
    rewards: Tensor  # (N,) detached, beta rho
    margins: Tensor  # (N,) detached, rho - z0 for desirable and z0 - rho for undesirable: what the loss raises


AUTO = "auto"


def _check_weight(key: str, value, allow_auto: bool = False):
    if allow_auto and value == AUTO:
        return AUTO
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
        accepted = "a number >= 0" + (" or auto (n_desirable / n_undesirable of the training split)" if allow_auto
                                      else "")
        raise ValueError(f"algo.{key}={value!r} is not accepted: {accepted}")
    return float(value)


class KTO:
    """KTO on unpaired completions, as SACPO's safety step runs it (TRL `KTOTrainer`).

    `undesirable_weight="auto"` is SACPO's `n_desirable / n_undesirable` (`src/train/safety_kto.py`), counted on
    the training split: `KTOModule.setup` passes the data module's `label_counts()` to `set_label_counts`
    before the first step, and the objective refuses to run until then."""

    uses_vocab_terms = False
    vocab_risk = None

    def __init__(self, beta: float, desirable_weight: float = 1.0, undesirable_weight: float | str = 1.0):
        self.beta = _check_beta(beta)
        self.desirable_weight = _check_weight("desirable_weight", desirable_weight)
        self.undesirable_weight_setting = _check_weight("undesirable_weight", undesirable_weight, allow_auto=True)
        self.undesirable_weight: float | None = (
            None if self.undesirable_weight_setting == AUTO else self.undesirable_weight_setting)
        if self.desirable_weight == 0 and self.undesirable_weight == 0:
            raise ValueError("algo.desirable_weight and algo.undesirable_weight are both 0: the loss would be 0")

    @property
    def needs_label_counts(self) -> bool:
        return self.undesirable_weight_setting == AUTO

    def set_label_counts(self, n_desirable: int, n_undesirable: int) -> None:
        """Resolve `undesirable_weight=auto` to n_desirable / n_undesirable (the training split's counts); a
        no-op for a numeric weight."""
        if not self.needs_label_counts:
            return
        if n_desirable < 1 or n_undesirable < 1:
            raise ValueError(f"algo.undesirable_weight=auto needs desirable and undesirable training completions; "
                             f"the training split has {n_desirable} desirable and {n_undesirable} undesirable")
        self.undesirable_weight = n_desirable / n_undesirable

    def __call__(self, logratios: Tensor, desirable: Tensor, z0: Tensor) -> UnpairedOutput:
        """(N,) log-ratios rho, (N,) bool labels and the () anchor z0 -> per-completion losses and metrics."""
        if self.undesirable_weight is None:
            raise RuntimeError("algo.undesirable_weight=auto is resolved from the training split's label counts: "
                               "call KTO.set_label_counts(n_desirable, n_undesirable) first (KTOModule.setup does)")
        losses = kto_loss(logratios, desirable, z0, self.beta, self.desirable_weight, self.undesirable_weight)
        rho = logratios.detach()
        margins = torch.where(desirable, rho - z0.detach(), z0.detach() - rho)
        return UnpairedOutput(losses=losses, rewards=self.beta * rho, margins=margins)
