"""Structured-config schemas (types) and range checks for the composed config.

Hydra checks types at composition (`alpha=abc` fails there, naming the key) and unknown group options
(`risk=foo` lists the available ones). Ranges are checked by `validate`, first thing in every run, before any
model or data loads. Nothing here imports torch, so a bad command line fails in about a second.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra.experimental.callback import Callback
from omegaconf import MISSING, DictConfig, OmegaConf

PACKAGE_DIR = Path(__file__).resolve().parent


class ConfigError(ValueError):
    """A configuration value outside what is accepted; the message names the key, the value and the range."""


# --- schemas ---------------------------------------------------------------------------------------------


class CVaREstimatorName(str, Enum):
    weighted = "weighted"
    reference = "reference"


@dataclass
class RiskexpConfig:
    alpha: float = 0.95  # risk level = tail mass in (0, 1]; 1 = risk-neutral
    beta: float = 0.1  # KL temperature, > 0
    seed: int = 0
    name: str = "default"  # names the run directory runs/<name>/... and the W&B group
    rerun: bool = False  # a finished run directory (with results.json) is skipped unless rerun=true
    save_policy: bool = True  # export the trained policy to <run>/policy (a later run's model.path)
    tags: list[str] = field(default_factory=list)
    algo: Any = MISSING
    risk: Any = MISSING
    model: Any = MISSING
    data: Any = MISSING
    optimizer: Any = MISSING
    scheduler: Any = None
    trainer: Any = MISSING
    logger: Any = None
    eval: Any = None


@dataclass
class MeanRiskConfig:
    _target_: str = "riskexp.risk.Mean"


@dataclass
class CVaRRiskConfig:
    _target_: str = "riskexp.risk.CVaR"
    alpha: float = MISSING
    estimator: CVaREstimatorName = CVaREstimatorName.weighted
    split_vocab: bool = False


@dataclass
class EntropicRiskConfig:
    _target_: str = "riskexp.risk.Entropic"
    theta: float = 1.0


@dataclass
class AlgoConfig:
    name: str = MISSING
    variant: Optional[int] = None  # 1 or 2 for TDPO / Ra-DPO
    kl_weight: Optional[float] = None  # weight on the KL / risk term in variant 2
    label_smoothing: float = 0.0
    chunk_size: int = 64  # positions per chunk of the token-level terms (bounds memory)
    precompute_ref_logps: bool = False  # sequence-level objectives only
    objective: Any = None
    module: Any = MISSING


def register_schemas() -> None:
    cs = ConfigStore.instance()
    cs.store(name="riskexp_schema", node=RiskexpConfig)
    cs.store(group="schema/risk", name="mean", node=MeanRiskConfig)
    cs.store(group="schema/risk", name="cvar", node=CVaRRiskConfig)
    cs.store(group="schema/risk", name="entropic", node=EntropicRiskConfig)
    cs.store(group="schema/algo", name="preference", node=AlgoConfig)


# --- resolvers used in conf/ -----------------------------------------------------------------------------


def run_dirname(override_dirname: str) -> str:
    """A readable directory name from the command-line overrides, e.g. `algo=ra_dpo,alpha=0.1`."""
    if not override_dirname:
        return "default"
    return re.sub(r"[/\\]", "_", override_dirname)


def gpus_per_task(accelerator: str, devices: int) -> int:
    """GPUs to ask SLURM for: the trainer's devices on a GPU trainer, none on a CPU one."""
    return int(devices) if accelerator in ("gpu", "cuda") else 0


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("rx.dirname"):
        OmegaConf.register_new_resolver("rx.dirname", run_dirname)
    if not OmegaConf.has_resolver("rx.gpus"):
        OmegaConf.register_new_resolver("rx.gpus", gpus_per_task)
    if not OmegaConf.has_resolver("rx.package"):
        OmegaConf.register_new_resolver("rx.package", lambda rel: str(PACKAGE_DIR / rel))


register_schemas()
register_resolvers()


# --- range checks ----------------------------------------------------------------------------------------


def _check(ok: bool, key: str, value: Any, accepted: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not accepted: {accepted}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate(cfg: DictConfig) -> None:
    """Check ranges and combinations that types cannot express. Raises ConfigError."""
    _check(_number(cfg.alpha) and 0 < cfg.alpha <= 1, "alpha", cfg.alpha,
           "the risk level (tail mass) must be in (0, 1]; 1 is risk-neutral")
    _check(_number(cfg.beta) and cfg.beta > 0, "beta", cfg.beta, "the KL temperature must be > 0")
    _check(cfg.seed >= 0, "seed", cfg.seed, "seeds are integers >= 0")

    risk = cfg.risk
    if "alpha" in risk:
        _check(0 < risk.alpha <= 1, "risk.alpha", risk.alpha, "must be in (0, 1]")
    if "theta" in risk:
        _check(risk.theta > 0, "risk.theta", risk.theta, "the entropic risk aversion must be > 0")
    if risk.get("split_vocab"):
        _check(str(getattr(risk.estimator, "value", risk.estimator)) == "reference", "risk.split_vocab", True,
               "only with risk.estimator=reference (it reproduces the public code's vocabulary-half quirk)")

    algo = cfg.algo
    if algo.get("variant") is not None:
        _check(algo.variant in (1, 2), "algo.variant", algo.variant, "1 or 2")
    if algo.get("kl_weight") is not None:
        _check(algo.kl_weight >= 0, "algo.kl_weight", algo.kl_weight, "must be >= 0")
    _check(0 <= algo.get("label_smoothing", 0.0) < 0.5, "algo.label_smoothing", algo.get("label_smoothing"),
           "must be in [0, 0.5)")
    _check(algo.get("chunk_size", 1) >= 1, "algo.chunk_size", algo.get("chunk_size"), "must be >= 1")

    data = cfg.data
    for key in ("batch_size", "max_length", "max_prompt_length"):
        if key in data:
            _check(data[key] >= 1, f"data.{key}", data[key], "must be >= 1")
    if "max_length" in data and "max_prompt_length" in data:
        _check(data.max_prompt_length < data.max_length, "data.max_prompt_length", data.max_prompt_length,
               f"must be smaller than data.max_length={data.max_length}")

    _check(cfg.model.get("dtype", "float32") in ("float32", "bfloat16", "float16"), "model.dtype",
           cfg.model.get("dtype"), "float32, bfloat16 or float16")
    trainer = cfg.trainer
    if trainer.get("accelerator") == "cpu":
        _check("16" not in str(trainer.get("precision", "32")), "trainer.precision", trainer.get("precision"),
               "32-true on accelerator=cpu (bf16/fp16 run ~30x slower than fp32 on CPUs); use trainer=gpu for bf16")
    for key in ("path", "ref_path"):
        path = cfg.model.get(key)
        if path:
            _check(os.path.isdir(path), f"model.{key}", path, "an existing directory, e.g. runs/<...>/policy")


# --- sweeps: every job's config is checked before the first one starts -----------------------------------


class ValidateSweep(Callback):
    """Hydra callback (`hydra.callbacks` in conf/config.yaml): at the start of a --multirun, compose and
    `validate` the config of every job, so `alpha=0.1,1.5` fails in seconds, not after the first job trained."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        import sys

        from hydra import compose
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
        for batch in BasicSweeper.split_arguments(overrides, None):
            for job in batch:
                try:
                    validate(compose(config.hydra.job.config_name, overrides=job))
                except ConfigError as error:
                    print(f"riskexp: configuration error in sweep job {' '.join(job)}: {error}", file=sys.stderr)
                    sys.exit(2)
