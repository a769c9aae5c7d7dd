"""The RL family's recipe (`algo=ppo`, `algo=ra_rlhf`): policy, frozen reference and critic from `model.*`, the
task's training prompts from `data.rl`, PPO iterations under a Lightning trainer, then the task's evaluation of
the trained policy against the reference, written to `out/results.json`.

The initial policy and the reference are the same model (`model.path` and `model.ref_path` both name an SFT
run's exported policy to start from SFT, as RA-RLHF does). A run is as long as its data: M = (training prompts
// data.rl.batch_size) x trainer.max_epochs iterations (`trainer.limit_train_batches` caps them); it is
`trainer.max_steps`-free, since one iteration makes ppo_epochs x minibatches optimizer steps.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

# trainer keys riskexp's preference recipe reads or Lightning's automatic optimisation uses; PPO steps itself
NOT_FOR_RL = ("max_steps", "gradient_clip_val", "accumulate_grad_batches")


def rl_trainer_config(cfg: DictConfig) -> dict:
    from riskexp.schema import RISKEXP_TRAINER_KEYS

    ignored = {k: cfg.trainer[k] for k in NOT_FOR_RL if cfg.trainer.get(k) not in (None, -1, 1)}
    if ignored:
        log.info("RL runs step the optimizer themselves: trainer %s not used (algo.max_grad_norm clips; the "
                 "run's length is data.rl and trainer.max_epochs)", ignored)
    return {k: v for k, v in cfg.trainer.items() if k not in RISKEXP_TRAINER_KEYS + NOT_FOR_RL}


def _instantiate_unwrapped(node: DictConfig):
    """`instantiate`, raising the target's own error (a ValueError naming the bad value) rather than Hydra's."""
    from hydra.errors import InstantiationException

    try:
        return instantiate(node)
    except InstantiationException as error:
        raise (error.__cause__ or error) from None


def train_rl(cfg: DictConfig, out: Path, resume_from: Path | None) -> dict:
    import lightning as L

    from riskexp.console import tidy_third_party_output
    from riskexp.knobs import inert_knobs
    from riskexp.models import build_policy_and_reference
    from riskexp.results import provenance, write_results
    from riskexp.run import build_logger, describe, evaluate_task, record_evaluation, saves_policy

    tidy_third_party_output()
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")  # the frozen reference
    started = time.time()
    inert = inert_knobs(cfg)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = _instantiate_unwrapped(cfg.algo.data_module)  # before the models: a bad batch size takes seconds
    loader = instantiate(cfg.model.loader, _partial_=True)
    policy, reference, tokenizer = build_policy_and_reference(loader, cfg.model.path, cfg.model.ref_path,
                                                              cfg.model.dtype)
    module = instantiate(cfg.algo.module)(
        policy=policy, reference=reference, tokenizer=tokenizer, optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.scheduler else None,
    )
    logger = build_logger(cfg, out)
    flat = describe(cfg) | module.risk.describe()
    if logger:
        logger.log_hyperparams(flat | {"config": OmegaConf.to_container(cfg, resolve=True)})
    trainer = instantiate(rl_trainer_config(cfg), logger=logger, callbacks=[],  # the module logs its iterations
                          enable_checkpointing=False, default_root_dir=str(out), max_steps=-1)
    if resume_from:
        log.info("RL runs do not resume mid-run: %s is left in place and the run starts from the beginning",
                 resume_from)
    trainer.fit(module, datamodule=datamodule)
    module.to(trainer.strategy.root_device)
    train_metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
    results = flat | {
        "steps": trainer.global_step,
        "iterations": module.iteration,
        "status": "finished",
        **provenance(cfg),
        "inert": inert,
        **module.run_record(),
        "critic": cfg.algo.critic,
        "episodes_per_iteration": cfg.data.rl.batch_size,
        "world_size": trainer.world_size,
        **({"rank_weight_spread": module.rank_weight_spread} if module.rank_weight_spread is not None else {}),
        "output_dir": str(out),
        **train_metrics,
    }
    if cfg.eval.enabled and cfg.data.get("task") and trainer.is_global_zero:
        metrics, rows = evaluate_task(cfg, module.policy, module.reference, tokenizer,
                                      shaped_beta=module.kl_controller.value)
        results |= metrics
        record_evaluation(out, logger, metrics, rows, cfg.eval.samples_logged)
    if saves_policy(cfg) and trainer.is_global_zero:
        module.export(out, tokenizer)
    results["wall_time_s"] = round(time.time() - started, 2)
    if trainer.is_global_zero:
        write_results(out, results)
        log.info("results: %s", out / "results.json")
    return results
