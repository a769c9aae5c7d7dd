"""The stepwise family: SACPO and RSA (riskexp.stepwise.recipe)."""

from riskexp.stepwise.recipe import STEP_ORDERS, check_steps, step_overrides, train_stepwise

__all__ = ["STEP_ORDERS", "check_steps", "step_overrides", "train_stepwise"]
