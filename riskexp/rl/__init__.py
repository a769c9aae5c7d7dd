"""RL from feedback: the pure pieces of PPO-RLHF and RA-RLHF (shaped rewards, GAE, losses, KL control, tail)."""

from riskexp.rl.gae import gae, masked_mean, masked_var, masked_whiten, response_bounds, shaped_rewards
from riskexp.rl.kl_control import AdaptiveKLController, FixedKLController, adaptive_kl_update, kl_controller
from riskexp.rl.ppo import (
    PPOOutput,
    entropy_from_logits,
    explained_variance,
    policy_loss,
    ppo_loss,
    value_loss,
)
from riskexp.rl.soft_risk import SCHEDULES, soft_risk_count, soft_risk_level
from riskexp.rl.tail import (
    KL_INPUTS,
    RANKING_STATISTICS,
    TailSelection,
    choose_kl_input,
    entropic_episode_weights,
    kept_token_mask,
    kl_controller_inputs,
    lambda_return_first_token,
    mc_shaped_return,
    ranking_statistic,
    select_tail,
)

__all__ = [
    "KL_INPUTS",
    "RANKING_STATISTICS",
    "SCHEDULES",
    "AdaptiveKLController",
    "FixedKLController",
    "PPOOutput",
    "TailSelection",
    "adaptive_kl_update",
    "choose_kl_input",
    "entropic_episode_weights",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "kept_token_mask",
    "kl_controller",
    "kl_controller_inputs",
    "lambda_return_first_token",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "mc_shaped_return",
    "policy_loss",
    "ppo_loss",
    "ranking_statistic",
    "response_bounds",
    "select_tail",
    "shaped_rewards",
    "soft_risk_count",
    "soft_risk_level",
    "value_loss",
]
