"""The score-model Lightning module: a causal LM's trunk with a new linear score head, trained on pairs.

Batches are `riskexp.data.collate_pairs`' rows [chosen..., rejected...]; the score model reads each row at its
last token (the response's eos), as safe-rlhf's `LlamaForScore` does, and the objective (`losses.py`) turns the
(B,) chosen and rejected end scores into a loss and its metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from riskexp.models import trunk_of
from riskexp.modules import PolicyModule
from riskexp.scorers import ScoreModel, save_score_model

SCORE_TYPES = ("reward", "cost")


def train_top_layers(trunk: nn.Module, n: int | None) -> None:
    """Freeze all of the trunk but its top `n` transformer blocks and its final norm (None: train all; 0: the
    score head alone, a linear probe of the frozen trunk)."""
    if n is None:
        return
    blocks = next((m for name in ("layers", "h", "blocks") if isinstance(m := getattr(trunk, name, None), nn.ModuleList)),
                  None)
    if blocks is None:
        raise ValueError(f"algo.train_layers={n}: {type(trunk).__name__} has no list of transformer blocks "
                         "(layers, h or blocks); accepted is null (train the whole trunk)")
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= len(blocks):
        raise ValueError(f"algo.train_layers={n!r}: accepted are null or integers in [0, {len(blocks)}]")
    trunk.requires_grad_(False)
    if n:
        for block in blocks[len(blocks) - n :]:
            block.requires_grad_(True)
        for name in ("norm", "ln_f", "final_layer_norm"):
            if isinstance(getattr(trunk, name, None), nn.Module):
                getattr(trunk, name).requires_grad_(True)


def score_model_from_lm(model: nn.Module, bias: bool = False, init_seed: int = 0) -> ScoreModel:
    """The LM's trunk (its weights, not a copy) and a new Linear(hidden, 1) head; the LM's own head is dropped."""
    trunk = trunk_of(model, "a score head")
    with torch.random.fork_rng():
        torch.manual_seed(init_seed)
        head = nn.Linear(model.config.hidden_size, 1, bias=bias)
        nn.init.normal_(head.weight, std=1 / (model.config.hidden_size + 1) ** 0.5)  # initial scores O(1)
        if bias:
            nn.init.zeros_(head.bias)
    return ScoreModel(trunk, head.to(next(trunk.parameters()).dtype))


class ScoreModelModule(PolicyModule):
    """A reward model (`objective=RewardObjective`) or a cost model (`CostObjective`). The trained weights are the
    "policy" of `PolicyModule` (optimised, checkpointed); there is no reference."""

    def __init__(self, policy: nn.Module, reference: nn.Module | None, objective: Callable, optimizer: Callable,
                 scheduler: Callable | None = None, risk=None, *, score_type: str = "reward", bias: bool = False,
                 tokenisation: dict | None = None, train_layers: int | None = None, init_seed: int = 0):
        if score_type not in SCORE_TYPES:
            raise ValueError(f"algo.score_type={score_type!r} is unknown; accepted: {', '.join(SCORE_TYPES)}")
        super().__init__(score_model_from_lm(policy, bias, init_seed), None, optimizer, scheduler)
        train_top_layers(self.policy.trunk, train_layers)
        self.objective, self.score_type = objective, score_type
        self.tokenisation = dict(tokenisation or {})

    def _step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        scores = self.policy(batch["input_ids"], batch["attention_mask"])
        half = scores.shape[0] // 2
        out = self.objective(scores[:half], scores[half:], batch.get("is_safe"))
        sync = stage != "train"
        self.log(f"{stage}/loss", out.loss.detach(), prog_bar=True, batch_size=half, sync_dist=sync)
        for key, value in out.metrics.items():
            self.log(f"{stage}/{key}", value, batch_size=half, sync_dist=sync)
        return out.loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def export(self, out: Path, tokenizer) -> Path:
        """`out/score_model`, loadable by `riskexp.scorers.SafeRLHFScorer` and `load_score_model`."""
        return save_score_model(self.policy, out / "score_model", tokenizer, self.score_type, self.tokenisation)
