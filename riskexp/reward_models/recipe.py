"""The score-model family's recipe (`algo=reward_model`, `algo=cost_model`): preference training of a trunk
with a score head (`run.train_preference`, no reference), then the held-out pairs scored once more with the
final weights: pair accuracy (and for a cost model sign accuracy) with 95% bootstrap intervals over pairs,
`pair_scores.jsonl`, and the model exported to `out/score_model` in safe-rlhf's layout, a scorer's `path`:

    data.task.reward='{_target_: riskexp.scorers.SafeRLHFScorer, name_or_path: <run>/score_model, kind: reward}'
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)

PAIR_SCORES = "pair_scores.jsonl"  # every held-out pair with its two scores


def held_out_scores(model, datamodule) -> dict[str, torch.Tensor]:
    """(N,) end scores of the validation pairs' chosen and rejected responses, and where the pairs carry safety
    labels `unsafe` (2, N): the chosen responses' row, then the rejected ones'."""
    device = next(model.parameters()).device
    chosen, rejected, safe = [], [], []
    was = model.training
    model.eval()
    with torch.no_grad():
        for batch in datamodule.val_dataloader():
            scores = model(batch["input_ids"].to(device), batch["attention_mask"].to(device)).cpu()
            half = scores.shape[0] // 2
            chosen.append(scores[:half])
            rejected.append(scores[half:])
            if "is_safe" in batch:
                safe.append(batch["is_safe"].view(2, half))
    model.train(was)
    out = {"chosen": torch.cat(chosen), "rejected": torch.cat(rejected)}
    if safe:
        out["unsafe"] = ~torch.cat(safe, dim=1)
    return out


def evaluate_pairs(cfg: DictConfig, model, reference, tokenizer) -> tuple[dict, list]:
    """`eval/pair_accuracy` (and for a cost model `eval/sign_accuracy`, over both responses of each pair) of the
    trained score model on the held-out pairs, with bootstrap intervals over pairs; each pair's scores in
    `<run>/pair_scores.jsonl`. A cost model is right on a pair when it puts the unsafer (rejected) response
    above the safer (chosen) one."""
    from riskexp.evaluation import bootstrap, resample_prompts
    from riskexp.files import write_jsonl
    from riskexp.run import datamodule_config, output_dir

    datamodule = instantiate(datamodule_config(cfg), tokenizer=tokenizer)
    datamodule.setup("fit")
    scores = held_out_scores(model, datamodule)
    chosen, rejected = scores["chosen"], scores["rejected"]
    cost = cfg.algo.score_type == "cost"
    correct = {"pair_accuracy": rejected > chosen if cost else chosen > rejected}
    if cost and "unsafe" in scores:
        unsafe = scores["unsafe"]
        correct["sign_accuracy"] = 0.5 * (((chosen > 0) == unsafe[0]).double() + ((rejected > 0) == unsafe[1]))
    names = list(correct)

    def accuracies(*per_pair):
        return {name: values.mean(-1) for name, values in zip(names, per_pair)}

    index = resample_prompts(len(chosen), cfg.eval.bootstrap_samples, cfg.seed)
    estimates = bootstrap(accuracies, [correct[k].double() for k in names], index, cfg.eval.confidence)
    metrics = {f"eval/{k}": v for k, v in estimates.items()} | {"eval/pairs": len(chosen)}
    write_jsonl([{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"],
                  "chosen_score": float(c), "rejected_score": float(x)}
                 for r, c, x in zip(datamodule.val_records, chosen, rejected, strict=True)], output_dir() / PAIR_SCORES)
    log.info("held-out pairs: %s", {k: round(v, 3) for k, v in metrics.items()})
    return metrics, []


def train_score_model(cfg: DictConfig, out: Path, resume_from: Path | None) -> dict:
    from riskexp.run import saves_policy, train_preference

    pairs = cfg.algo.pairs
    if pairs is not None:
        if "pairs" not in (cfg.data.get("source") or {}):
            raise ValueError(f"algo.pairs={pairs!r} needs a data source with a `pairs` choice (PKU-SafeRLHF "
                             f"schema, e.g. data=safety); data={cfg.data.name} has none: set algo.pairs=null")
        with open_dict(cfg):
            cfg.data.source.pairs = pairs
    extra = {"score_type": cfg.algo.score_type, "pairs": cfg.data.get("source", {}).get("pairs")}
    if saves_policy(cfg):
        extra["score_model_dir"] = str(out / "score_model")
    return train_preference(cfg, out, resume_from, extra=extra, evaluation=evaluate_pairs, need_reference=False)
