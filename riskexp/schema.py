"""Structured-config schemas (types, keys) and the one place that checks the composed config, `validate`.

Hydra checks types at composition (`alpha=abc` fails there, naming the key), unknown group options (`risk=foo`
lists the available ones) and keys a schema lacks (`algo=ipo algo.label_smoothing=0.1`: IPOConfig has none).
`validate` runs first thing in every command, before any model or data loads, and checks what composition
lets through: mandatory values left `???`, keys added with `+` (`+algo.kl_wieght=0.5`) or by presets in every
group, `_target_` groups against their target's signature, knobs cut from their top-level link
(`risk.alpha=0.1`), ranges and combinations. Importing this module imports no torch.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import os
import re
import sys
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
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
class ModelConfig:
    name: str = MISSING
    path: Optional[str] = None  # start the policy from an exported run, e.g. runs/<...>/policy
    ref_path: Optional[str] = None  # take the reference from an exported run; null = a copy of the initial policy
    dtype: str = "float32"
    loader: Any = MISSING
    # installed packages whose files the loader reads (never imported); checked before anything loads
    requires: list[str] = field(default_factory=list)


@dataclass
class EvalConfig:
    enabled: bool = True
    num_prompts: int = 30
    samples_per_prompt: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 32
    alpha: float = 0.1
    alphas: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.25])
    cost_threshold: float = 0.5
    bootstrap_samples: int = 1000
    confidence: float = 0.95
    num_heldout_texts: int = 64
    samples_logged: int = 16
    judges: dict[str, Any] = field(default_factory=dict)
    # RA-RLHF's prompt tail: eval/prompt_tail/* over the prompts whose prompt score (data.task.prompt_scorer)
    # is at or below it; None: no prompt tail and no quantile curve
    prompt_tail_threshold: Optional[float] = None


@dataclass
class MergeConfig:
    """`python -m riskexp.merge` (conf/merge.yaml): theta_q = (1 - q) theta_a + q theta_b."""

    a: str = MISSING
    b: str = MISSING
    q: float = 0.5


@dataclass
class RiskexpConfig:
    alpha: float = 0.95  # risk level = tail mass in (0, 1]; 1 = risk-neutral
    beta: float = 0.1  # KL temperature, > 0
    lam: float = 1.0  # lambda of the stepwise methods: the harmlessness step's temperature is beta/lam, > 0
    merge: Optional[MergeConfig] = None  # set by `python -m riskexp.merge` only
    seed: int = 0
    name: str = "default"  # names the run directory runs/<name>/... and the W&B group
    rerun: bool = False  # a finished run directory (with results.json) is skipped unless rerun=true
    # export the trained policy to <run>/policy (a later run's model.path); null: single runs only
    save_policy: Optional[bool] = None
    tags: list[str] = field(default_factory=list)
    algo: Any = MISSING  # typed by the option's own schema (conf/algo/*.yaml defaults), as risk
    risk: Any = MISSING
    model: ModelConfig = MISSING
    data: Any = MISSING  # `_target_` groups: keys checked against the target's signature by `validate`
    optimizer: Any = MISSING
    scheduler: Any = None
    trainer: Any = MISSING
    logger: Any = None
    eval: EvalConfig = field(default_factory=EvalConfig)


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


# One schema per algorithm, holding only the knobs it reads: a knob of another algorithm
# (`algo=ipo algo.label_smoothing=0.1`) is rejected, never silently ignored.


@dataclass
class AlgoConfig:
    """The keys every algorithm has."""

    name: str = MISSING
    chunk_size: int = 64  # positions per chunk of the token-level terms (bounds memory)
    objective: Any = None
    module: Any = MISSING


@dataclass
class SFTConfig(AlgoConfig):
    pass


@dataclass
class DPOConfig(AlgoConfig):
    label_smoothing: float = 0.0  # conservative DPO
    precompute_ref_logps: bool = False  # sequence-level objectives only


@dataclass
class IPOConfig(AlgoConfig):
    average_log_ratios: bool = False  # per-token means (TRL) instead of sums (IPO paper, DPO code)
    precompute_ref_logps: bool = False


@dataclass
class TDPOConfig(AlgoConfig):
    variant: int = 1  # 1 or 2
    kl_weight: float = 0.5  # weight on the KL (Ra-DPO: risk) term in variant 2


@dataclass
class RaDPOConfig(TDPOConfig):
    pass


@dataclass
class KTOConfig(AlgoConfig):
    """KTO on unpaired completions (needs data.unpaired=true, which conf/algo/kto.yaml sets)."""

    desirable_weight: float = 1.0  # w_d, >= 0
    # w_u >= 0, or auto: n_desirable / n_undesirable of the training split (SACPO's setting)
    undesirable_weight: Any = "auto"


@dataclass
class StepConfig:
    """One step of a stepwise algo: a preference run of `conf/algo/<objective>.yaml`."""

    objective: str = MISSING  # dpo, ipo, tdpo, ra_dpo, kto
    settings: dict[str, Any] = field(default_factory=dict)  # that algo's keys, e.g. {variant: 2}
    risk: Any = None  # the risk group for this step (${risk}), or null: risk=mean


@dataclass
class StepwiseConfig:
    """SACPO and RSA (riskexp.stepwise): step 1 aligns one preference, step 2 the other at beta/lam."""

    name: str = MISSING
    beta: float = MISSING  # ${beta}: the helpfulness step's temperature
    lam: float = MISSING  # ${lam}: the harmlessness step's temperature is beta/lam
    order: str = "helpful_first"  # helpful_first | safety_first
    steps: dict[str, StepConfig] = field(default_factory=dict)
    recipe: Any = MISSING


@dataclass
class RSAConfig(StepwiseConfig):
    variant: int = 1  # Ra-DPO1 or Ra-DPO2 in each step
    kl_weight: float = 0.5


@dataclass
class KLControlConfig:
    adaptive: bool = True  # Ziegler's proportional controller; false: beta fixed at init
    init: float = 0.2
    target: float = 6.0
    horizon: float = 10000.0


@dataclass
class SoftRiskConfig:
    schedule: str = "new"  # new | old
    warm_start: Any = 0.15  # n: integer iterations, or a float in [0, 1): a fraction of the run
    rho: float = 0.95


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


@dataclass
class PTXConfig:
    texts: Any = None  # a list of texts or a loader (`_target_`); null: no PTX
    coeff: float = 16.0
    batch_size: int = 4
    max_length: int = 128


@dataclass
class PPOConfig(AlgoConfig):
    """PPO-RLHF and RA-RLHF (riskexp.rl): the RL family's knobs; sizes of the batch and generations: data.rl."""

    critic: str = "shared"  # shared | separate
    critic_init: Optional[str] = None  # a score model's directory: the critic starts as its trunk and head
    value_head_dropout: float = 0.1
    ppo_epochs: int = 4
    mini_batch_size: Optional[int] = None  # null: the whole batch
    gamma: float = 1.0
    gae_lambda: float = 0.95  # GAE lambda (trl: lam; `lam` is the stepwise methods' top-level knob)
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    ratio_threshold: float = 10.0
    max_grad_norm: Optional[float] = None
    kl: KLControlConfig = field(default_factory=KLControlConfig)
    kl_input: str = "reference"  # reference | kept_mean | all
    soft_risk: SoftRiskConfig = field(default_factory=SoftRiskConfig)
    statistic: str = "mc_shaped"  # mc_shaped | lambda_return_first_token | env_score
    keep_ties: bool = False
    drop_unkept: bool = True
    whiten_advantages: bool = True
    ptx: PTXConfig = field(default_factory=PTXConfig)
    rollout: SamplingConfig = field(default_factory=SamplingConfig)  # lengths: data.rl
    data_module: Any = MISSING
    recipe: Any = MISSING


@dataclass
class PPOLagConfig(PPOConfig):
    """Safe RLHF's PPO-Lagrangian (riskexp.rl.ppo_lag): PPO with a cost critic and a Lagrange multiplier."""

    threshold: float = 0.0  # d: the constraint is rho(episode cost) <= d
    lambda_init: float = 1.0
    lambda_lr: float = 0.1
    lambda_max: Optional[float] = 5.0
    lambda_update_delay_steps: int = 0
    episode_cost_window_size: int = 128
    kl_split: str = "both"  # both (the vendored safe-rlhf code) | half (the paper, safe-rlhf PR #173)
    clip_range_score: float = 50.0
    cost_critic_init: Optional[str] = None  # a cost model's directory: the cost critic starts as it


@dataclass
class ScoreModelConfig(AlgoConfig):
    """Reward and cost models (riskexp.reward_models): a trunk with a score head trained on pairs."""

    score_type: str = "reward"  # reward | cost
    pairs: Optional[str] = None  # data.source.pairs to train on (PKU-SafeRLHF schema); null: the data's own
    bias: bool = False  # a bias in the score head (safe-rlhf's --bias)
    reg: float = 0.0  # reg * mean(score^2) (safe-rlhf's --regularization)
    train_layers: Optional[int] = None  # null: the whole trunk; n: its top n blocks; 0: the head alone
    recipe: Any = MISSING


def register_schemas() -> None:
    cs = ConfigStore.instance()
    cs.store(name="riskexp_schema", node=RiskexpConfig)
    # root-level names, not a group: `--help` lists only the groups a user chooses from
    cs.store(name="risk_mean_schema", node=MeanRiskConfig)
    cs.store(name="risk_cvar_schema", node=CVaRRiskConfig)
    cs.store(name="risk_entropic_schema", node=EntropicRiskConfig)
    for name, node in (("sft", SFTConfig), ("dpo", DPOConfig), ("ipo", IPOConfig), ("tdpo", TDPOConfig),
                       ("ra_dpo", RaDPOConfig), ("sacpo", StepwiseConfig), ("rsa", RSAConfig)):
        cs.store(name=f"algo_{name}_schema", node=node)
    cs.store(name="algo_kto_schema", node=KTOConfig)
    cs.store(name="algo_ppo_schema", node=PPOConfig)
    cs.store(name="algo_score_model_schema", node=ScoreModelConfig)
    cs.store(name="algo_ppo_lag_schema", node=PPOLagConfig)


# --- resolvers used in conf/ -----------------------------------------------------------------------------


def run_dirname(override_dirname: str) -> str:
    """A readable directory name from the command-line overrides, e.g. `algo=ra_dpo,alpha=0.1`.

    Always one valid path component, whatever the overrides hold: `/` and `\\` become `_`, quotes around a
    value are dropped, and the name has at most 255 bytes (UTF-8). A value over 48 bytes keeps its first and
    last 16 characters around the first 8 hex digits of its SHA-1 (`model.path=_tmp_pytest-of-~1a2b3c4d~ep3_policy`);
    a name still over 255 bytes keeps its first 200 bytes and the hash of the whole. The full overrides stay in
    `.hydra/overrides.yaml` and results.json.
    """
    import hashlib

    max_value_bytes, kept_chars, max_name_bytes, kept_name_bytes = 48, 16, 255, 200

    def digest(text: str) -> str:
        return hashlib.sha1(text.encode()).hexdigest()[:8]  # stable across processes, unlike hash()

    def shorten(value: str) -> str:
        if len(value.encode()) <= max_value_bytes:
            return value
        return f"{value[:kept_chars]}~{digest(value)}~{value[-kept_chars:]}"

    def items(text: str, sep: str = ",") -> list[str]:
        # Hydra joins the overrides with ","; a list value such as `eval.alphas=[0.1,0.2]` keeps its commas
        parts, depth, quote, start = [], 0, None, 0
        for i, char in enumerate(text):
            if quote:
                quote = None if char == quote else quote
            elif char in "'\"":
                quote = char
            elif char in "[{(":
                depth += 1
            elif char in "]})":
                depth -= 1
            elif char == sep and depth == 0:
                parts.append(text[start:i])
                start = i + 1
        return [*parts, text[start:]]

    if not override_dirname:
        return "default"
    shortened = []
    for item in items(override_dirname):
        key, equals, value = item.partition("=")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]  # Hydra's quoting of a value holding "=" or "," (a run directory) is not the value
        shortened.append(key + equals + shorten(value) if equals else shorten(item))
    name = re.sub(r"[/\\]", "_", ",".join(shortened))
    if len(name.encode()) > max_name_bytes:
        name = name.encode()[:kept_name_bytes].decode(errors="ignore") + "~" + digest(override_dirname)
    return name


def gpus_per_task(accelerator: str, devices: int) -> int:
    """GPUs to ask SLURM for: the trainer's devices on a GPU trainer, none on a CPU one."""
    return int(devices) if accelerator in ("gpu", "cuda") else 0


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("rx.dirname"):
        OmegaConf.register_new_resolver("rx.dirname", run_dirname)
    if not OmegaConf.has_resolver("rx.gpus"):
        OmegaConf.register_new_resolver("rx.gpus", gpus_per_task)
    if not OmegaConf.has_resolver("rx.terminal"):  # progress bars only where carriage returns draw one
        OmegaConf.register_new_resolver("rx.terminal", lambda: sys.stderr.isatty())
    if not OmegaConf.has_resolver("rx.package"):
        OmegaConf.register_new_resolver("rx.package", lambda rel: str(PACKAGE_DIR / rel))


register_schemas()
register_resolvers()


# --- checks of the composed config: one place, `validate` ---------------------------------------------------

# Hydra's instantiation keys, accepted beside a `_target_`'s arguments
INSTANTIATE_KEYS = frozenset({"_target_", "_partial_", "_recursive_", "_convert_", "_args_"})

# lightning.Trainer's arguments, stored so that a misspelt trainer key fails without importing Lightning (which
# takes seconds); tests/test_configs.py checks this list against the installed Lightning
TRAINER_ARGUMENTS = frozenset({
    "accelerator", "strategy", "devices", "num_nodes", "precision", "logger", "callbacks", "fast_dev_run",
    "max_epochs", "min_epochs", "max_steps", "min_steps", "max_time", "limit_train_batches", "limit_val_batches",
    "limit_test_batches", "limit_predict_batches", "overfit_batches", "val_check_interval",
    "check_val_every_n_epoch", "num_sanity_val_steps", "log_every_n_steps", "enable_checkpointing",
    "enable_progress_bar", "enable_model_summary", "accumulate_grad_batches", "gradient_clip_val",
    "gradient_clip_algorithm", "deterministic", "benchmark", "inference_mode", "use_distributed_sampler",
    "profiler", "detect_anomaly", "barebones", "plugins", "sync_batchnorm", "reload_dataloaders_every_n_epochs",
    "default_root_dir", "enable_autolog_hparams", "model_registry",
})
STORED_ARGUMENTS = {"lightning.Trainer": TRAINER_ARGUMENTS, "lightning.pytorch.Trainer": TRAINER_ARGUMENTS}

# trainer-group keys riskexp reads itself (its checkpointing); the other keys are lightning.Trainer arguments
RISKEXP_TRAINER_KEYS = ("checkpoint_every_n_steps", "keep_checkpoint")

# `_target_` groups: keys riskexp reads itself beside the target's arguments, and arguments riskexp passes
# itself (run.py, modules.py), so a config must not set them
OWN_KEYS = {"data": ("task", "build", "rl"), "trainer": RISKEXP_TRAINER_KEYS}
PASSED_BY_RISKEXP = {
    "data": ("tokenizer",),
    "optimizer": ("params",),
    "scheduler": ("optimizer", "total_steps"),
    "trainer": ("logger", "callbacks", "default_root_dir", "enable_checkpointing"),
}

# sections of the data group that riskexp reads itself (run.evaluate_task, riskexp.data.build, riskexp.rl)
DATA_SECTION_KEYS = {
    "task": ("prompts", "reward", "cost", "heldout_texts", "subsets", "cost_threshold", "prompt_scorer",
             "prompt_tail_threshold"),
    "build": ("prompts", "k", "rows", "max_new_tokens", "temperature", "top_p", "batch_size", "out"),
    "rl": ("prompts", "batch_size", "max_new_tokens", "min_new_tokens"),
}

# keys that follow a top-level knob by interpolation: set directly, they would silently part from the knob
# that results.json and the directory name report
LINKED_KEYS = {"risk.alpha": "alpha", "algo.objective.beta": "beta", "data.seed": "seed", "algo.beta": "beta",
               "algo.lam": "lam"}


def _check(ok: bool, key: str, value: Any, accepted: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not accepted: {accepted}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@functools.cache
def target_arguments(target: str) -> dict[str, Any] | None:
    """A `_target_`'s keyword arguments and their defaults (`inspect.Parameter.empty` when none or unknown);
    None when it takes **kwargs, so any key goes."""
    if target in STORED_ARGUMENTS:
        return dict.fromkeys(STORED_ARGUMENTS[target], inspect.Parameter.empty)
    from hydra._internal.utils import _locate  # hydra.utils.get_object, without its log line on failure

    parameters = inspect.signature(_locate(target)).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    return {p.name: p.default for p in parameters if p.kind is not p.VAR_POSITIONAL}


def _choice(cfg: DictConfig, group: str) -> str:
    """How the command line names a group's option, e.g. `algo=ipo`, for messages."""
    if "hydra" in cfg:
        choices = cfg.hydra.runtime.choices
    elif HydraConfig.initialized():
        choices = HydraConfig.get().runtime.choices
    else:
        return group
    return f"{group}={choices[group]}" if choices.get(group) else group


def _unknown_keys(keys: Any, accepted: Any, prefix: str, where: str) -> None:
    unknown = sorted(set(keys) - set(accepted))
    if unknown:
        close = difflib.get_close_matches(unknown[0], accepted, n=1)
        hint = f"; did you mean {prefix}{close[0]}?" if close else "."
        raise ConfigError(f"{prefix}{unknown[0]} is not a key of {where}{hint} Accepted keys: "
                          f"{', '.join(sorted(set(accepted) - INSTANTIATE_KEYS))}")


def check_missing(cfg: DictConfig) -> None:
    """Mandatory values (`???`) left unset, e.g. data=local without data.source.path."""
    def walk(value: Any, key: str):  # the unresolved container: interpolations need not resolve here
        if isinstance(value, dict):
            for k, v in value.items():
                yield from walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                yield from walk(v, f"{key}[{i}]")
        elif value == "???":
            yield key

    missing = sorted(walk({k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items() if k != "hydra"}, ""))
    if missing:
        raise ConfigError(f"{missing[0]} is missing (???): pass it on the command line, {missing[0]}=VALUE"
                          + (f"; also missing: {', '.join(missing[1:])}" if missing[1:] else ""))


def check_schema_keys(cfg: DictConfig) -> None:
    """Keys of the top level, of the groups with a structured schema (algo, risk, model, eval) and of the data
    group's task and build sections. Hydra rejects `algo.x=1` for a key the schema lacks, but `+algo.x=1` and
    presets add keys even to typed nodes."""
    _unknown_keys([k for k in cfg if k != "hydra"], [f.name for f in fields(RiskexpConfig)], "",
                  "the top-level config (riskexp.schema.RiskexpConfig)")
    for group in ("algo", "risk", "model", "eval"):
        node = cfg.get(group)
        schema = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
        if schema is not None and is_dataclass(schema):
            _unknown_keys(node, [f.name for f in fields(schema)], f"{group}.",
                          f"{_choice(cfg, group)} (riskexp.schema.{schema.__name__})")
    for section, keys in DATA_SECTION_KEYS.items():
        if isinstance(cfg.data.get(section), DictConfig):
            _unknown_keys(cfg.data[section], keys, f"data.{section}.", f"{_choice(cfg, 'data')}'s {section} section")


def check_target_keys(cfg: DictConfig, group: str) -> None:
    """Keys of a `_target_` group: the target's arguments (or any key, if it takes **kwargs), Hydra's keys and
    riskexp's own; a value whose argument defaults to a number (or a bool) must be one."""
    node = cfg.get(group)
    if not isinstance(node, DictConfig) or node.get("_target_") is None:
        return
    target = node._target_
    try:
        arguments = target_arguments(target)
    except (ImportError, AttributeError, ValueError) as error:  # what instantiate would fail with, later
        reason = " ".join(str(error).split())
        raise ConfigError(f"{group}._target_={target!r} is not accepted: it cannot be imported ({reason})") from None
    if arguments is None:
        return
    passed = PASSED_BY_RISKEXP.get(group, ())
    clash = sorted(set(node) & set(passed))
    if clash:
        raise ConfigError(f"{group}.{clash[0]} is not accepted: riskexp passes {target} its {clash[0]} itself")
    accepted = (set(arguments) - set(passed)) | INSTANTIATE_KEYS | set(OWN_KEYS.get(group, ()))
    where = f"{_choice(cfg, group)} (the arguments of {target}" + (
        f" but {', '.join(passed)}, which riskexp passes itself" if passed else "") + (
        f", and riskexp's {', '.join(OWN_KEYS[group])}" if group in OWN_KEYS else "") + ")"
    _unknown_keys(node, accepted, f"{group}.", where)
    for key, default in arguments.items():
        if key not in node or not (isinstance(default, bool) or _number(default)):
            continue
        value = node[key]
        if isinstance(default, bool):
            _check(isinstance(value, bool), f"{group}.{key}", value, f"true or false ({target}'s {key})")
        elif value is not None:  # an Optional argument with a numeric default may take null
            _check(_number(value), f"{group}.{key}", value, f"a number ({target}'s {key}, default {default})")


def check_required_packages(cfg: DictConfig) -> None:
    """The packages a model's files come from (`model.requires`), found without importing them: a missing one
    fails in a second with its install command, not after the imports and the model build."""
    import importlib.util

    from riskexp.assets import PIP_HINTS

    for package in cfg.model.requires:
        if importlib.util.find_spec(package) is None:
            install = PIP_HINTS.get(package, f"pip install {package.replace('_', '-')}")
            raise ConfigError(f"{_choice(cfg, 'model')} needs the package {package!r}, which is not installed: "
                              f"{install}")


def check_links(cfg: DictConfig) -> None:
    """Keys set apart from the knob they follow (`risk.alpha=0.1` instead of `alpha=0.1`)."""
    for key, knob in LINKED_KEYS.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and value != cfg[knob]:
            raise ConfigError(f"{key}={value!r} is not accepted: {key} follows the top-level {knob} "
                              f"({knob}={cfg[knob]!r}, which results.json reports); set {knob}={value!r} instead")
    algo = cfg.algo
    for part in ("objective", "module"):  # algo.objective.variant=2 would bypass algo.variant, likewise
        node = algo.get(part)
        for key in node if isinstance(node, DictConfig) else ():
            if key in algo and node[key] != algo[key]:
                raise ConfigError(f"algo.{part}.{key}={node[key]!r} is not accepted: it follows algo.{key}; "
                                  f"set algo.{key}={node[key]!r} instead")


def validate(cfg: DictConfig, import_targets: bool = True) -> None:
    """Check the composed config before anything loads: mandatory values, unknown keys in every group, knobs
    cut from their top-level link, types of `_target_` arguments, ranges and combinations that types cannot
    express. Raises ConfigError naming the key. The checks that import a group's target (Lightning for data,
    scheduler and logger: seconds) come last, so most bad commands fail in about a second; with
    `import_targets=False` they are left to `check_imported_targets`."""
    check_missing(cfg)
    check_schema_keys(cfg)
    check_links(cfg)
    _check(_number(cfg.alpha) and 0 < cfg.alpha <= 1, "alpha", cfg.alpha,
           "the risk level (tail mass) must be in (0, 1]; 1 is risk-neutral")
    _check(_number(cfg.beta) and cfg.beta > 0, "beta", cfg.beta, "the KL temperature must be > 0")
    _check(_number(cfg.lam) and cfg.lam > 0, "lam", cfg.lam, "the stepwise lambda must be > 0 (step 2 runs at "
           "temperature beta/lam)")
    _check(cfg.seed >= 0, "seed", cfg.seed, "seeds are integers >= 0")

    risk = cfg.risk
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
    if "desirable_weight" in algo:
        _check(_number(algo.desirable_weight) and algo.desirable_weight >= 0, "algo.desirable_weight",
               algo.desirable_weight, "a weight >= 0")
    if "undesirable_weight" in algo:
        _check(algo.undesirable_weight == "auto" or (_number(algo.undesirable_weight) and algo.undesirable_weight >= 0),
               "algo.undesirable_weight", algo.undesirable_weight,
               "a weight >= 0, or auto (n_desirable / n_undesirable of the training split, as SACPO sets it)")
    if "steps" in algo:
        from riskexp.stepwise import check_steps

        check_steps(algo)

    for group in ("trainer", "optimizer"):  # before data: types of the lengths below
        check_target_keys(cfg, group)
    data = cfg.data
    for key in ("batch_size", "max_length", "max_prompt_length"):
        if key in data:
            _check(_number(data[key]) and data[key] >= 1, f"data.{key}", data[key], "must be >= 1")
    # an unpaired algorithm (KTO) trains on unpaired completions, the others on preference pairs
    schema = OmegaConf.get_type(algo)
    unpaired_algo = isinstance(schema, type) and issubclass(schema, KTOConfig)
    unpaired = data.get("unpaired", False)
    if unpaired_algo:
        _check(unpaired is True, "data.unpaired", unpaired,
               f"true with {_choice(cfg, 'algo')}: it trains on unpaired completions")
        for key in ("batch_size", "eval_batch_size"):
            if _number(data.get(key)):
                _check(data[key] >= 2, f"data.{key}", data[key], f"must be >= 2 with {_choice(cfg, 'algo')}: "
                       "its KL anchor pairs each prompt with another row's completion")
    else:
        _check(unpaired in (False, None), "data.unpaired", unpaired,
               f"false with {_choice(cfg, 'algo')}: it trains on preference pairs (unpaired data is for algo=kto)")
    if "max_length" in data and "max_prompt_length" in data:
        _check(data.max_prompt_length < data.max_length, "data.max_prompt_length", data.max_prompt_length,
               f"must be smaller than data.max_length={data.max_length}")
    from riskexp.prompts import TRUNCATION_MODES, TRUNCATIONS, check_prompt_format

    if "prompt_format" in data:
        try:
            check_prompt_format(data.prompt_format)
        except ValueError as error:
            raise ConfigError(f"data.{error}") from None
    for key, accepted in (("truncation", TRUNCATIONS), ("truncation_mode", TRUNCATION_MODES)):
        if key in data:
            _check(data[key] in accepted, f"data.{key}", data[key], f"one of {', '.join(accepted)}")

    _check(cfg.model.dtype in ("float32", "bfloat16", "float16"), "model.dtype", cfg.model.dtype,
           "float32, bfloat16 or float16")
    trainer = cfg.trainer
    if trainer.get("accelerator") == "cpu":
        _check("16" not in str(trainer.get("precision", "32")), "trainer.precision", trainer.get("precision"),
               "32-true on accelerator=cpu (bf16/fp16 run ~30x slower than fp32 on CPUs); use trainer=gpu for bf16")
    every = trainer.get("checkpoint_every_n_steps", 0)
    _check(isinstance(every, int) and not isinstance(every, bool) and every >= 0, "trainer.checkpoint_every_n_steps",
           every, "an integer >= 0 (0: a checkpoint only at the end and on signals)")
    _check(isinstance(trainer.get("keep_checkpoint", False), bool), "trainer.keep_checkpoint",
           trainer.get("keep_checkpoint"), "true or false")

    # evaluation runs after training: a bad value found there would cost the whole run
    evaluation = cfg.eval
    for key in ("num_prompts", "samples_per_prompt", "max_new_tokens", "batch_size", "bootstrap_samples"):
        _check(evaluation[key] >= 1, f"eval.{key}", evaluation[key], "an integer >= 1")
    for key, level in [("eval.alpha", evaluation.alpha)] + [(f"eval.alphas[{i}]", a) for i, a in
                                                             enumerate(evaluation.alphas)]:
        _check(0 < level <= 1, key, level, "a tail level in (0, 1]")
    _check(0 < evaluation.confidence < 1, "eval.confidence", evaluation.confidence, "a probability in (0, 1)")
    _check(evaluation.temperature > 0, "eval.temperature", evaluation.temperature, "must be > 0")
    _check(0 < evaluation.top_p <= 1, "eval.top_p", evaluation.top_p, "must be in (0, 1]")
    check_required_packages(cfg)
    for key in ("path", "ref_path"):
        path = cfg.model.get(key)
        if path:
            _check(os.path.isdir(path), f"model.{key}", path, "an existing directory, e.g. runs/<...>/policy")
    for key in ("source", "val_source"):  # preference files (data=local, fixture, the prebuilt tasks)
        path = OmegaConf.select(data, f"{key}.path", default=None)
        if isinstance(path, str):
            _check(os.path.exists(path), f"data.{key}.path", path, "an existing file (JSONL, JSON or Parquet)")
    if import_targets:
        check_imported_targets(cfg)


def check_imported_targets(cfg: DictConfig) -> None:
    """The keys of the groups whose target takes seconds to import (Lightning)."""
    for group in ("scheduler", "logger", "data"):
        check_target_keys(cfg, group)


# --- sweeps: every job's config is checked before the first one starts -----------------------------------


class ValidateSweep(Callback):
    """Hydra callback (`hydra.callbacks` in conf/config.yaml): at the start of a --multirun, compose and
    `validate` the config of every job, so `alpha=0.1,1.5` fails in seconds, not after the first job trained;
    warn about swept keys the training never reads (`riskexp.knobs.sweep_warnings`); at the end, print the
    command that tabulates the sweep."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra import compose
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        from riskexp.cli import exit_with_config_error

        overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
        # with the hydra node: its runtime.choices name the job's options in messages
        jobs = [(job, compose(config.hydra.job.config_name, overrides=job, return_hydra_config=True))
                for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]
        # every job's fast checks first, so a bad job fails in seconds however many jobs come before it
        for check in (functools.partial(validate, import_targets=False), check_imported_targets):
            for job, cfg in jobs:
                try:
                    check(cfg)
                except ConfigError as error:
                    exit_with_config_error(error, f" in sweep job {' '.join(job)}")
        from riskexp.knobs import sweep_warnings

        swept = [o.key_or_group for o in overrides if o.is_sweep_override()]
        values = [{key: value for key, _, value in (o.partition("=") for o in job) if key.lstrip("+~") in swept}
                  for job, _ in jobs]
        for warning in sweep_warnings([(v, cfg) for v, (_, cfg) in zip(values, jobs)]):
            print(f"riskexp: warning: {warning}", file=sys.stderr, flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = config.hydra.sweep.dir
        print(f"riskexp: sweep done; tables and plots: riskexp report {sweep_dir}", file=sys.stderr, flush=True)
