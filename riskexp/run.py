"""One run: validate the config, build everything from it, train, evaluate, write results.json.

`run(cfg)` needs only a composed config with `hydra.runtime.output_dir` set, so tests call it directly
through Hydra's compose API.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from riskexp.results import archive_results, git_commit, read_results, write_results
from riskexp.schema import validate

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


def build_logger(cfg: DictConfig):
    if not cfg.logger or cfg.logger.get("_target_") is None:
        return False
    return instantiate(cfg.logger)


def finish_wandb() -> None:
    # WandbLogger reuses an open wandb.run: without this, job 2 of a multirun would log into job 1's run
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def run(cfg: DictConfig) -> dict:
    validate(cfg)
    out = output_dir()
    done = read_results(out)
    if done is not None and not cfg.rerun:
        log.info("%s already holds results.json (finished); skipping. Pass rerun=true to train again.", out)
        return done
    if done is not None:
        log.info("rerun=true: previous results moved to %s", archive_results(out))
    try:
        return _train(cfg, out)
    finally:
        finish_wandb()


def _train(cfg: DictConfig, out: Path) -> dict:
    import warnings

    import lightning as L

    # the frozen reference is in eval mode on purpose
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")

    from riskexp.models import build_policy_and_reference

    started = time.time()
    L.seed_everything(cfg.seed, workers=True)
    risk = instantiate(cfg.risk)
    objective = instantiate(cfg.algo.objective)
    loader = instantiate(cfg.model.loader, _partial_=True)
    policy, reference, tokenizer = build_policy_and_reference(
        loader, cfg.model.path, cfg.model.ref_path, cfg.model.dtype
    )
    datamodule = instantiate(cfg.data, tokenizer=tokenizer)
    module = instantiate(cfg.algo.module)(
        policy=policy,
        reference=reference,
        objective=objective,
        risk=risk,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.scheduler else None,
    )

    logger = build_logger(cfg)
    flat = describe(cfg) | risk.describe()
    if logger:
        logger.log_hyperparams(flat | {"config": OmegaConf.to_container(cfg, resolve=True)})
    callbacks = []
    if cfg.trainer.get("enable_checkpointing"):
        from lightning.pytorch.callbacks import ModelCheckpoint

        callbacks.append(ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, save_top_k=0))
    trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks, default_root_dir=str(out))
    trainer.fit(module, datamodule=datamodule)
    train_metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
    # a last full pass over the validation set with the final weights
    val_metrics = trainer.validate(module, datamodule=datamodule, verbose=False)[0]

    results = flat | {
        "steps": trainer.global_step,
        "status": "finished",
        "git_commit": git_commit(),
        "wall_time_s": round(time.time() - started, 2),
        "output_dir": str(out),
        **{k: float(v) for k, v in train_metrics.items()},
        **{k: float(v) for k, v in val_metrics.items()},
    }
    if cfg.save_policy and trainer.is_global_zero:
        policy.save_pretrained(out / "policy")
        tokenizer.save_pretrained(out / "policy")
    if trainer.is_global_zero:
        write_results(out, results)
        log.info("results: %s", out / "results.json")
    return results
