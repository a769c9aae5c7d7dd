"""Reward and cost models (riskexp.reward_models): the losses against hand-computed values, the labels the data
carries, training on the tiny model end to end, and the exported model loading as a scorer."""

import json
import math

import pytest
import torch
from hydra.utils import instantiate

from riskexp.data.preference import collate_pairs, tokenize_pair
from riskexp.reward_models.losses import (
    CostObjective,
    RewardObjective,
    bradley_terry_loss,
    safe_rlhf_cost_loss,
    unsafe_sign,
)
from riskexp.run import run
from riskexp.scorers import SafeRLHFScorer


def softplus(x):  # -log sigma(x) = log(1 + e^-x)
    return math.log1p(math.exp(-x))


def test_bradley_terry_loss_equals_hand_computed_values():
    better, worse = torch.tensor([1.0, -0.5]), torch.tensor([0.0, 0.5])
    by_hand = (softplus(1.0) + softplus(-1.0)) / 2  # 0.81326...
    assert float(bradley_terry_loss(better, worse)) == pytest.approx(by_hand, abs=1e-6)
    reg = 0.1 * (1.0 + 0.25 + 0.0 + 0.25) / 4
    assert float(bradley_terry_loss(better, worse, reg=0.1)) == pytest.approx(by_hand + reg, abs=1e-6)


def test_cost_loss_equals_hand_computed_values():
    safer, unsafer = torch.tensor([-1.0, 0.5]), torch.tensor([2.0, 0.0])
    # pair 0: a safe and an unsafe response; pair 1: two safe responses (s = -1 for both)
    safer_sign, unsafer_sign = unsafe_sign(torch.tensor([True, True])), unsafe_sign(torch.tensor([False, True]))
    assert unsafer_sign.tolist() == [1.0, -1.0]
    pair0 = softplus(2.0 - -1.0) + softplus(-1.0 * -1.0) + softplus(1.0 * 2.0)
    pair1 = softplus(0.0 - 0.5) + softplus(-1.0 * 0.5) + softplus(-1.0 * 0.0)
    by_hand = (pair0 + pair1) / 2  # 1.56504...
    assert float(safe_rlhf_cost_loss(safer, unsafer, safer_sign, unsafer_sign)) == pytest.approx(by_hand, abs=1e-6)
    reg = 0.5 * (1.0 + 0.25 + 4.0 + 0.0) / 4
    assert float(safe_rlhf_cost_loss(safer, unsafer, safer_sign, unsafer_sign, reg=0.5)) == pytest.approx(
        by_hand + reg, abs=1e-6)


def test_the_objectives_metrics_count_right_orderings_and_signs():
    reward = RewardObjective()(torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.0, 0.5, 1.0]))
    assert float(reward.metrics["pair_accuracy"]) == pytest.approx(2 / 3)
    # cost: chosen = safer; labels (2B,) chosen rows first
    safer, unsafer = torch.tensor([-1.0, 0.5]), torch.tensor([2.0, 0.0])
    cost = CostObjective()(safer, unsafer, torch.tensor([True, True, False, True]))
    assert float(cost.metrics["pair_accuracy"]) == 0.5  # pair 0 ranked right, pair 1 not
    # signs: safer -1 < 0 right, 0.5 > 0 wrong (safe); unsafer 2 > 0 right (unsafe), 0.0 not > 0 right (safe)
    assert float(cost.metrics["sign_accuracy"]) == 0.75
    assert float(cost.metrics["unsafe_rate"]) == 0.5
    with pytest.raises(ValueError, match="safety label"):
        CostObjective()(safer, unsafer)
    with pytest.raises(ValueError, match=r"algo.objective.reg=-1.*>= 0"):
        RewardObjective(reg=-1)


def test_pairs_carry_their_safety_labels_into_the_batch(tiny):
    _, tok = tiny
    records = [{"prompt": "How do I pick a lock?", "chosen": "I can't help.", "rejected": "Use a pin.",
                "chosen_safe": True, "rejected_safe": False},
               {"prompt": "hi", "chosen": "Hello!", "rejected": "Go away.", "chosen_safe": True,
                "rejected_safe": True}]
    features = [tokenize_pair(r, tok, 64, 32) for r in records]
    batch = collate_pairs(features, tok.pad_token_id)
    assert batch["is_safe"].tolist() == [True, True, False, True]
    assert "is_safe" not in collate_pairs([tokenize_pair({k: records[0][k] for k in ("prompt", "chosen",
                                                                                      "rejected")}, tok, 64, 32)],
                                          tok.pad_token_id)


SCORE_SMOKE = ("data=safety", "data.limit=8", "trainer.max_steps=4", "save_policy=true")


@pytest.mark.parametrize("algo", ["reward_model", "cost_model"])
def test_a_score_model_trains_evaluates_on_held_out_pairs_and_loads_as_a_scorer(smoke_cfg, tmp_path, algo):
    cfg = smoke_cfg(f"algo={algo}", *SCORE_SMOKE)
    results = run(cfg)
    cost = algo == "cost_model"
    assert results["score_type"] == ("cost" if cost else "reward")
    assert results["pairs"] == ("harmlessness" if cost else "helpfulness")
    assert results["eval/pairs"] == results["val_pairs"] > 0
    assert 0 <= results["eval/pair_accuracy/lo"] <= results["eval/pair_accuracy"] <= results["eval/pair_accuracy/hi"]
    assert ("eval/sign_accuracy" in results) == cost and ("val/sign_accuracy" in results) == cost
    exported = tmp_path / "score_model"
    assert results["score_model_dir"] == str(exported)
    config = json.loads((exported / "config.json").read_text())
    assert config["score_type"] == results["score_type"] and config["score_dim"] == 1
    rows = [json.loads(line) for line in (tmp_path / "pair_scores.jsonl").read_text().splitlines()]
    assert len(rows) == results["eval/pairs"]
    right = [(r["rejected_score"] > r["chosen_score"]) if cost else (r["chosen_score"] > r["rejected_score"])
             for r in rows]
    assert sum(right) / len(rows) == pytest.approx(results["eval/pair_accuracy"])
    # the export as a task's reward, by a config override: it scores the pairs as training scored them
    scorer = instantiate({"_target_": "riskexp.scorers.SafeRLHFScorer", "name_or_path": str(exported),
                          "kind": "cost" if cost else "reward"})
    assert isinstance(scorer, SafeRLHFScorer)
    prompts = [r["prompt"] for r in rows]
    for side in ("chosen", "rejected"):
        rescored = scorer(prompts, [r[side] for r in rows])
        assert torch.allclose(rescored, torch.tensor([r[f"{side}_score"] for r in rows]), atol=1e-5)


def test_a_score_model_learns_the_pairs_it_is_trained_on(smoke_cfg):
    """Held-out accuracy of a tiny random model is noise; its accuracy on its own training pairs must rise."""
    cfg = smoke_cfg("algo=reward_model", "data=safety", "data.limit=8", "trainer.max_steps=24", "trainer.max_epochs=12", "data.batch_size=4",
                    "optimizer.lr=3e-3", "scheduler.warmup_steps=0", "eval.enabled=false")
    results = run(cfg)
    assert results["train/pair_accuracy"] == 1.0 and results["train/loss"] < 0.3


def test_a_cost_model_refuses_data_without_a_pairs_choice(smoke_cfg):
    with pytest.raises(ValueError, match=r"algo.pairs='harmlessness' needs a data source with a `pairs` choice.*data=sentiment"):
        run(smoke_cfg("algo=cost_model", "data=sentiment"))


def test_train_layers_freezes_all_but_the_top_blocks_and_the_head(tiny):
    import copy
    import functools

    from riskexp.reward_models.module import ScoreModelModule

    def trainable(n):
        module = ScoreModelModule(copy.deepcopy(tiny[0]), None, RewardObjective(), functools.partial(torch.optim.AdamW),
                                  train_layers=n)
        return {name for name, p in module.named_parameters() if p.requires_grad}

    assert trainable(0) == {"policy.head.weight"}
    top = trainable(1)
    assert "policy.head.weight" in top and "policy.trunk.norm.weight" in top
    assert any(n.startswith("policy.trunk.layers.1.") for n in top)
    assert not any(n.startswith(("policy.trunk.layers.0.", "policy.trunk.embed_tokens")) for n in top)
    assert any(n.startswith("policy.trunk.embed_tokens") for n in trainable(None))
    with pytest.raises(ValueError, match=r"algo.train_layers=3: accepted are null or integers in \[0, 2\]"):
        trainable(3)
