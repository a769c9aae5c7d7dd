"""`python -m riskexp.eval`: generation-based evaluation of an exported policy against its reference.

    python -m riskexp.eval model=smollm2_135m data=sentiment model.path=runs/<...>/policy

Samples completions for the task's held-out prompts from both models, scores them, and writes reward mean,
VaR/CVaR, cost metrics, KL to the reference, distinct-n and perplexity to `results.json`.
"""

from __future__ import annotations

import time

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from riskexp.cli import CONF_DIR, run_command
from riskexp.results import provenance, write_results
from riskexp.run import (
    build_logger,
    evaluate_task,
    finish_wandb,
    output_dir,
    print_comparison,
    record_evaluation,
)
from riskexp.schema import ConfigError, validate


def evaluate(cfg: DictConfig, build_policy=None, record: dict | None = None) -> dict:
    """Evaluate a policy against its reference on the data's task and write results.json.

    The policy is `model.path` (or the base model) unless `build_policy(cfg) -> (policy, tokenizer)` makes it
    (`riskexp.stepwise.merge`); the reference is `model.ref_path`, else the base model. `record`: more keys for
    results.json."""
    validate(cfg)
    if not cfg.data.get("task"):
        raise ConfigError(f"data={cfg.data.name!r} has no generation task; accepted: data=sentiment, "
                          "data=toxicity, data=safety, or data/task=sentiment|toxicity|safety with any data")
    import lightning as L

    from riskexp.console import tidy_third_party_output
    from riskexp.models import build_policy_and_reference, inference_device

    tidy_third_party_output()

    started = time.time()
    L.seed_everything(cfg.seed)
    loader = instantiate(cfg.model.loader, _partial_=True)
    if build_policy is None:
        policy, reference, tokenizer = build_policy_and_reference(
            loader, cfg.model.path, cfg.model.ref_path, cfg.model.dtype, reference_is_base=True)
    else:
        policy, tokenizer = build_policy(cfg)
        # the base model itself is the reference (no copy of it) unless model.ref_path names another
        _, reference, _ = build_policy_and_reference(loader, None, cfg.model.ref_path, cfg.model.dtype,
                                                     reference_is_base=True)
    # sampling and scoring follow the models' device (riskexp.generation)
    device = inference_device()
    policy.to(device)
    reference.to(device)
    metrics, rows = evaluate_task(cfg, policy, reference, tokenizer)
    results = {
        "kind": "eval", "model": cfg.model.name, "policy": cfg.model.path or cfg.model.name,
        "reference": cfg.model.ref_path or cfg.model.name, "data": cfg.data.name, "seed": cfg.seed,
        **(record or {}), **provenance(cfg), "wall_time_s": round(time.time() - started, 2), **metrics,
    }
    logger = build_logger(cfg, output_dir())
    record_evaluation(output_dir(), logger, metrics, rows, cfg.eval.samples_logged)
    if build_policy is not None and cfg.save_policy:
        policy.save_pretrained(output_dir() / "policy")
        tokenizer.save_pretrained(output_dir() / "policy")
    write_results(output_dir(), results)
    return results


def main_with(cfg: DictConfig, task) -> None:
    """Run `task(cfg)` as a command (one-line configuration errors, failed.json), then print its table."""
    try:
        results = run_command(task, cfg)
    finally:
        finish_wandb()
    print_comparison(cfg, results, f"{results['policy']} against {results['reference']} on {cfg.data.name}")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    main_with(cfg, evaluate)


if __name__ == "__main__":
    main()
