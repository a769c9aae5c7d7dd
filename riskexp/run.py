"""One run: validate the config, build everything from it, train, evaluate, write results.json.

`run(cfg)` needs only a composed config with `hydra.runtime.output_dir` set, so tests call it directly
through Hydra's compose API.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from riskexp.results import (
    SAMPLES_FILE,
    archive_results,
    check_same_config,
    provenance,
    read_results,
    run_config,
    write_results,
)
from riskexp.schema import RISKEXP_TRAINER_KEYS, validate

log = logging.getLogger(__name__)


def output_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


def describe(cfg: DictConfig) -> dict:
    """The flat keys every results.json and W&B run carries."""
    return {
        "name": cfg.name,
        "algo": cfg.algo.name,
        "variant": cfg.algo.get("variant"),
        "kl_weight": cfg.algo.get("kl_weight"),
        "alpha": cfg.alpha,
        "beta": cfg.beta,
        "seed": cfg.seed,
        "model": cfg.model.name,
        "data": cfg.data.name,
    }


def datamodule_config(cfg: DictConfig) -> dict:
    """The data group without its `task` (evaluation), `build` (preference building) and `rl` sections, resolved
    while still attached to the whole config (it interpolates top-level keys such as `seed`)."""
    return {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
            for k, v in cfg.data.items() if k not in ("task", "build", "rl")}


def _take(items: list, requested: int, key: str, what: str) -> list:
    """The first `requested` items, saying once when the task has fewer than requested."""
    if len(items) < requested:
        log.warning("%s=%d but the task has %d %s: evaluating on all %d", key, requested, len(items), what,
                    len(items))
    return items[:requested]


def evaluate_task(cfg: DictConfig, policy, reference, tokenizer, intermediates: dict | None = None,
                  shaped_beta: float | None = None) -> tuple[dict, list[dict]]:
    """Sample, score and compare the policy (and `intermediates`, name -> model, e.g. a stepwise run's step 1)
    with the reference on the task's held-out prompts: tails at the headline `eval.alpha` and at each of
    `eval.alphas` and the run's own `alpha`, with bootstrap intervals, and win rates by the reward, the cost and
    each of `eval.judges`. The metrics carry the counts they are over: `eval_prompts`,
    `eval_samples_per_prompt`, `eval_heldout_texts`.

    RA-RLHF's evaluation, where the task has a `prompt_scorer` and `eval.prompt_tail_threshold` is set: each
    prompt's own score (`prompt_score` in the rows) and the subset `prompt_tail` of the prompts scored at or
    below the threshold (`eval/prompt_tail/reward_mean`, ..., `eval_prompts/prompt_tail`,
    `eval_prompt_tail_threshold`). `shaped_beta` (an RL run's KL coefficient): each model's
    `<prefix>/shaped_return_mean`, reward - shaped_beta * log(pi/pi_ref) of the completion (`eval_shaped_beta`)."""
    from riskexp.evaluation import compare, prompt_tail, score_with

    task, settings = cfg.data.task, cfg.eval
    prompts = _take(instantiate(task.prompts), settings.num_prompts, "eval.num_prompts", "held-out prompts")
    heldout = _take(instantiate(task.heldout_texts), settings.num_heldout_texts, "eval.num_heldout_texts",
                    "held-out texts") if task.get("heldout_texts") else None
    counts = {"eval_prompts": len(prompts), "eval_samples_per_prompt": settings.samples_per_prompt,
              **({"eval_heldout_texts": len(heldout)} if heldout else {})}
    # prompt sets reported apart (the safety task's harmful and benign requests), by membership
    subsets = {}
    for name, loader in (task.get("subsets") or {}).items():
        members = set(instantiate(loader))
        subsets[name] = [i for i, prompt in enumerate(prompts) if prompt in members]
        counts[f"eval_prompts/{name}"] = len(subsets[name])
    threshold, prompt_scores = settings.get("prompt_tail_threshold"), None
    if task.get("prompt_scorer") and threshold is not None:  # RA-RLHF's Tail: the tail is by the prompt's score
        prompt_scores = score_with(instantiate(task.prompt_scorer), prompts, [""] * len(prompts), "prompt")
        subsets["prompt_tail"] = prompt_tail(prompt_scores, threshold)
        counts |= {"eval_prompts/prompt_tail": len(subsets["prompt_tail"]), "eval_prompt_tail_threshold": threshold}
        if not subsets["prompt_tail"]:
            log.warning("no evaluated prompt has a prompt score at or below eval.prompt_tail_threshold=%g (the "
                        "lowest is %.4g): no eval/prompt_tail metrics", threshold, prompt_scores.min().item())
    if shaped_beta is not None:
        counts["eval_shaped_beta"] = shaped_beta
    metrics, rows = compare(
        policy, reference, tokenizer, prompts,
        intermediates=intermediates,
        judges={name: instantiate(judge) for name, judge in settings.judges.items()},
        reward=instantiate(task.reward),
        cost=instantiate(task.cost) if task.get("cost") else None,
        alpha=settings.alpha,
        alphas=[*settings.alphas, cfg.alpha],
        samples_per_prompt=settings.samples_per_prompt,
        bootstrap_samples=settings.bootstrap_samples,
        confidence=settings.confidence,
        cost_threshold=settings.cost_threshold,
        heldout_texts=heldout,
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        batch_size=settings.batch_size,
        seed=cfg.seed,
        prompt_format=cfg.data.prompt_format,
        subsets=subsets,
        shaped_beta=shaped_beta,
    )
    for row in rows:  # which subsets each completion's prompt is in, for the report's Elo ratings
        row["subsets"] = [name for name, members in subsets.items() if row["prompt_index"] in members]
        if prompt_scores is not None:  # for the reward-vs-prompt-quantile curve
            row["prompt_score"] = prompt_scores[row["prompt_index"]].item()
    return metrics | counts, rows


def print_comparison(cfg: DictConfig, results: dict, title: str) -> None:
    """The end-of-run table of a run that evaluated, printed last (after the W&B summary)."""
    if "eval/reward_mean" not in results:
        return
    from riskexp.evaluation import format_comparison

    table = format_comparison(results, level=cfg.eval.alpha, confidence=cfg.eval.confidence)
    print(f"\n{title}\n{table}\n", flush=True)


def saves_policy(cfg: DictConfig) -> bool:
    """`save_policy`, where null means: single runs export the policy, sweep jobs do not (disk use)."""
    if cfg.save_policy is not None:
        return cfg.save_policy
    from hydra.types import RunMode

    return HydraConfig.get().mode != RunMode.MULTIRUN


def record_evaluation(out: Path, logger, metrics: dict, rows: list[dict], n_rows: int) -> None:
    """Every evaluated completion to `out/samples.jsonl` (one row per model, prompt and sample: what the report's
    Elo ratings are computed from), RA-RLHF's reward-vs-prompt-quantile curve of each model to
    `out/quantile_curve.csv` (q, model, mean_reward) and `out/quantile_curve.png` where the rows carry a
    `prompt_score`, and the metrics and a side-by-side table of the first `n_rows` samples (each model's
    completion, reward and cost) to the logger."""
    from riskexp.evaluation import QUANTILE_CURVE_CSV, QUANTILE_CURVE_PNG, quantile_curves
    from riskexp.files import write_jsonl

    if rows:  # score models are evaluated on held-out pairs, not on samples
        write_jsonl(rows, out / SAMPLES_FILE)
    curves = quantile_curves(rows)
    if curves:
        import pandas as pd

        from riskexp.rl.report import quantile_figure

        curves = pd.DataFrame(curves)
        curves.to_csv(out / QUANTILE_CURVE_CSV, index=False)
        lines = {model: (c["q"], c["mean_reward"], None) for model, c in curves.groupby("model", sort=False)}
        quantile_figure(lines, title=f"{out.name}: reward over the worst prompts").savefig(out / QUANTILE_CURVE_PNG)
    if not logger:
        return
    logger.log_metrics(metrics)
    if hasattr(logger, "log_table") and rows:
        import pandas as pd

        table = pd.DataFrame(rows).pivot(index=["prompt_index", "sample", "prompt"], columns="model",
                                         values=["completion", "reward", "cost"])
        models = list(dict.fromkeys(r["model"] for r in rows))
        table = table.reindex(columns=[(v, m) for m in models for v in ("completion", "reward", "cost")])
        table.columns = [f"{m} {v}" for v, m in table.columns]
        table = table.reset_index().drop(columns=["prompt_index", "sample"]).head(n_rows)
        logger.log_table("eval/samples", dataframe=table)


def build_logger(cfg: DictConfig, out: Path):
    """The experiment logger, or False. A logger config with an `id` key (W&B) gets the run directory's persistent
    id, so a resumed run continues the same logged run."""
    if not cfg.logger or cfg.logger.get("_target_") is None:
        return False
    from riskexp.resume import run_id

    return instantiate(cfg.logger, **({"id": run_id(out)} if "id" in cfg.logger else {}))


def finish_wandb() -> None:
    # WandbLogger reuses an open wandb.run: without this, job 2 of a multirun would log into job 1's run
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def start(cfg: DictConfig, out: Path) -> tuple[dict | None, Path | None]:
    """(results, None) for a directory that already holds this config's results.json (finished: skip it), else
    (None, the checkpoint to resume from or None). Refuses, in seconds, a directory or checkpoint of another
    config; `rerun=true` archives a finished run's results.json and trains from scratch."""
    done = read_results(out)
    config = run_config(cfg)
    if done is not None and not cfg.rerun:
        check_same_config(out, done, config)
        log.info("%s already holds results.json of this config (finished); skipping. "
                 "Pass rerun=true to train again.", out)
        return done, None
    if done is not None:
        log.info("rerun=true: previous results moved to %s", archive_results(out))
    from riskexp.resume import checkpoint_to_resume

    return None, checkpoint_to_resume(out, config, rerun=cfg.rerun, from_scratch=done is not None)


def run(cfg: DictConfig) -> dict:
    """Validate, skip a finished directory, then train with the algo's recipe (`algo.recipe`: the stepwise
    family's; preference training by default) and print the end-of-run table."""
    validate(cfg)
    out = output_dir()
    done, resume_from = start(cfg, out)  # before any model loads, so that a refusal takes seconds
    if done is not None:
        return done
    recipe = instantiate(cfg.algo.recipe) if cfg.algo.get("recipe") else train_preference
    try:
        results = recipe(cfg, out, resume_from)
    finally:
        finish_wandb()
    print_comparison(cfg, results, f"{cfg.algo.name} on {cfg.data.name}, {out}")
    return results


def train_preference(cfg: DictConfig, out: Path, resume_from: Path | None, record: DictConfig | None = None,
                     extra: dict | None = None, evaluation=None, need_reference: bool = True) -> dict:
    """The preference family's recipe: build the policy, reference, data and Lightning module from `cfg`, train,
    validate, evaluate on the task and write `out/results.json`. `record` is the config the record describes
    (default `cfg`; a stepwise job records its own, not its step's), `extra` more keys for it, `evaluation` what
    evaluates the trained model (default `evaluate_task(cfg, policy, reference, tokenizer)`, called with the
    module's `policy` and `reference`); `need_reference=False` builds no reference (score models)."""
    import lightning as L

    from riskexp.console import StepLines, tidy_third_party_output

    tidy_third_party_output()
    # the frozen reference is in eval mode on purpose
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
    # riskexp's training loader does resume mid-epoch, through the data module's state (riskexp.resume)
    warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")

    from riskexp.knobs import inert_knobs
    from riskexp.models import build_policy_and_reference
    from riskexp.resume import Checkpointing, forget_checkpoint

    started = time.time()
    record = cfg if record is None else record
    inert = inert_knobs(cfg)  # before anything is instantiated: instantiation resolves interpolations in place
    L.seed_everything(cfg.seed, workers=True)
    risk = instantiate(cfg.risk)
    objective = instantiate(cfg.algo.objective)
    loader = instantiate(cfg.model.loader, _partial_=True)
    policy, reference, tokenizer = build_policy_and_reference(
        loader, cfg.model.path, cfg.model.ref_path, cfg.model.dtype, need_reference=need_reference
    )
    datamodule = instantiate(datamodule_config(cfg), tokenizer=tokenizer)
    # SFT has no objective and no use for a risk measure
    objective_kwargs = {"objective": objective, "risk": risk} if objective is not None else {}
    module = instantiate(cfg.algo.module)(
        policy=policy,
        reference=reference,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.scheduler else None,
        **objective_kwargs,
    )

    if resume_from:
        log.info("resuming from %s", resume_from)
    logger = build_logger(cfg, out)
    flat = describe(record) | risk.describe()
    if logger:
        logger.log_hyperparams(flat | {"config": OmegaConf.to_container(record, resolve=True)})
    # riskexp's own checkpointing replaces Lightning's: one resumable last.ckpt, signals turned into checkpoints
    trainer_cfg = {k: v for k, v in cfg.trainer.items() if k not in RISKEXP_TRAINER_KEYS}
    checkpointing = Checkpointing(out, cfg.trainer.checkpoint_every_n_steps)
    trainer = instantiate(trainer_cfg, logger=logger, callbacks=[checkpointing, StepLines()], enable_checkpointing=False,
                          default_root_dir=str(out))
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    train_metrics = checkpointing.train_metrics  # the last step's, also when it ran before a resume
    if module.validated_at_step == trainer.global_step:
        val_metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    else:  # a last full pass over the validation set with the final weights
        val_metrics = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    # Lightning moves the module to the CPU when fit (and validate) end: evaluation runs where training ran
    module.to(trainer.strategy.root_device)

    results = flat | {
        "steps": trainer.global_step,
        "status": "finished",
        **provenance(record),  # overrides, choices, config, riskexp_version, git_commit
        "inert": inert,  # knobs this training never reads (alpha and risk for DPO)
        **(extra or {}),
        "val_pairs": len(datamodule.val_features),
        "wall_time_s": round(time.time() - started, 2),
        "output_dir": str(out),
        **{k: float(v) for k, v in train_metrics.items()},
        **{k: float(v) for k, v in val_metrics.items()},
    }
    if cfg.eval.enabled and cfg.data.get("task") and trainer.is_global_zero:
        metrics, rows = (evaluation or evaluate_task)(cfg, module.policy, module.reference, tokenizer)
        results |= metrics
        record_evaluation(out, logger, metrics, rows, cfg.eval.samples_logged)
    if saves_policy(cfg) and trainer.is_global_zero:
        module.export(out, tokenizer)
    if trainer.is_global_zero:
        write_results(out, results)
        log.info("results: %s", out / "results.json")
        if not cfg.trainer.keep_checkpoint:  # a finished run is never resumed; its checkpoint is only disk use
            forget_checkpoint(out)
    return results
