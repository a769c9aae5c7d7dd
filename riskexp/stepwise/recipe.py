"""SACPO and RSA: align for one preference, then align that model for the other (Wachi et al. 2024).

The optimum of reward r plus lambda times safety g under a KL penalty beta against pi_ref is the helpfulness
optimum pi_r tilted by exp(lambda g / beta), so safety alignment can start from pi_r at temperature beta/lam with
pi_r as the reference (rsa.md §1.1). Each step is an ordinary preference run of `conf/algo/<objective>.yaml`,
composed from the job's own command line:

- step 1 (`algo.order=helpful_first`): helpfulness pairs (`better_response_id`) at beta against the base/SFT
  model, in a directory of its own under `<runs>/steps/`, named by the step's command line. Every job of a sweep
  that needs the same step 1 uses that directory: the first trains it (under a file lock; the others wait), the
  others find its results.json and reuse its policy.
- step 2: harmlessness pairs (`safer_response_id`) at beta/lam, starting from and referenced to the frozen step-1
  policy, in the job's directory; its results.json is the job's (algo=sacpo or rsa, with `step: 2`, `lam`,
  `step1_dir` and `reference`).

`algo.order=safety_first` swaps the data of the steps (SACPO's pku_safety(dpo)_helpful scripts): safety at
beta/lam first, then helpfulness at beta. The temperature goes with the data, whatever the order.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from riskexp.files import file_lock
from riskexp.results import changes_results, override_key

log = logging.getLogger(__name__)

# which pairs each step trains on
STEP_ORDERS = {"helpful_first": ("helpfulness", "harmlessness"), "safety_first": ("harmlessness", "helpfulness")}
# job overrides a step does not take over: the stepwise algo and its lambda (the recipe sets the step's algo and
# beta), what names or routes the job, and evaluation settings for step 1 (which does not evaluate)
NOT_INHERITED = ("algo", "lam", "beta", "name", "rerun", "save_policy", "hydra")


def _conf_dir() -> Path:
    from riskexp.cli import CONF_DIR

    return Path(CONF_DIR)


@functools.cache
def preference_algos() -> tuple[str, ...]:
    """The options of `conf/algo/` a step can run: the preference family's (a Lightning module of their own and
    the default recipe; stepwise and RL algos have a recipe of theirs)."""
    return tuple(sorted(p.stem for p in (_conf_dir() / "algo").glob("*.yaml")
                        if "module" in (algo := OmegaConf.load(p)) and "recipe" not in algo))


def check_steps(algo: DictConfig) -> None:
    """ConfigError for a stepwise algo whose order or steps are not accepted."""
    from riskexp.schema import ConfigError

    if algo.order not in STEP_ORDERS:
        raise ConfigError(f"algo.order={algo.order!r} is not accepted: one of {', '.join(STEP_ORDERS)}")
    if sorted(algo.steps) != ["1", "2"]:
        raise ConfigError(f"algo.steps has keys {sorted(algo.steps)}; accepted: exactly the steps 1 and 2")
    for n, step in algo.steps.items():
        if step.objective not in preference_algos():
            raise ConfigError(f"algo.steps.{n}.objective={step.objective!r} is not accepted: one of "
                              f"{', '.join(preference_algos())}")


def _value(value) -> str:
    """An override's text for a config value (lists and dicts as Hydra reads them)."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, str):
        return value
    if value is None:
        return "null"
    if isinstance(value, list | dict):
        return str(value).replace("'", "")  # [a, b] and {k: v}: Hydra's unquoted forms
    return repr(value)


def step_overrides(job: DictConfig, job_overrides: Sequence[str], n: int, step1_dir: Path | None = None
                   ) -> list[str]:
    """The command line of step `n` (1 or 2) of a stepwise job: the job's overrides minus NOT_INHERITED (and,
    where the step uses no risk measure, its risk overrides), then the step's algo, settings, beta and pairs;
    step 1 exports its policy and does not evaluate, step 2 starts from and is referenced to `step1_dir`."""
    algo = job.algo
    step = algo.steps[str(n)]
    pairs = STEP_ORDERS[algo.order][n - 1]
    beta = algo.beta if pairs == "helpfulness" else algo.beta / algo.lam
    dropped = [*NOT_INHERITED, *(("risk",) if step.risk is None else ()),
               *(("eval", "logger") if n == 1 else ("model.path", "model.ref_path"))]
    kept = [o for o in job_overrides
            if not any(override_key(o) == k or override_key(o).startswith((k + ".", k + "/")) for k in dropped)]
    settings = OmegaConf.to_container(step.settings, resolve=True)
    out = [*kept, f"algo={step.objective}", *(f"algo.{k}={_value(v)}" for k, v in settings.items()),
           f"beta={beta!r}", f"data.source.pairs={pairs}"]
    if step.risk is None:
        out.append("risk=mean")
    if n == 1:
        return [*out, "save_policy=true", "eval.enabled=false", "logger=none"]
    policy = _quoted(str(Path(step1_dir) / "policy"))  # the directory name holds `=` and `,`
    return [*out, f"model.path={policy}", f"model.ref_path={policy}"]


def _quoted(text: str) -> str:
    """A string value quoted for Hydra's override grammar."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _compose(overrides: Sequence[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside `python -m riskexp`
        return compose("config", overrides=list(overrides), return_hydra_config=True)
    with initialize_config_dir(version_base="1.3", config_dir=str(_conf_dir())):  # called from Python
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def compose_step(overrides: Sequence[str]) -> tuple[list[str], DictConfig]:
    """A step's command line and its composed config, with its hydra node (its overrides and choices).

    An algo on unpaired data (KTO sets `data.unpaired`) takes the harmlessness step's safety labels as they are,
    `is_response_k_safe` (SACPO's safety KTO), rather than harmlessness pairs it would unpair."""
    cfg = _compose(overrides)
    if cfg.data.get("unpaired") and "data.source.pairs=harmlessness" in overrides:
        overrides = [o if o != "data.source.pairs=harmlessness" else "data.source.pairs=unpaired" for o in overrides]
        cfg = _compose(overrides)
    return list(overrides), cfg


def step1_directory(overrides: Sequence[str], inert: Sequence[str]) -> Path:
    """`<runs>/steps/<overrides>`: named by step 1's own command line, sorted, without the keys that change no
    result and the knobs its training does not read, so every job needing the same step 1 finds the same one."""
    from riskexp.schema import run_dirname

    kept = sorted(o for o in overrides if (changes_results(override_key(o)) or override_key(o) == "experiment")
                  and override_key(o) not in inert)
    return Path(os.environ.get("RISKEXP_RUNS", "runs")) / "steps" / run_dirname(",".join(kept))


def train_step1(job: DictConfig, job_overrides: Sequence[str]) -> tuple[Path, DictConfig]:
    """Step 1's directory and config, trained there unless a finished run of the same config already is."""
    from riskexp.knobs import inert_knobs
    from riskexp.run import finish_wandb, start, train_preference
    from riskexp.schema import validate

    overrides, cfg = compose_step(step_overrides(job, job_overrides, 1))
    validate(cfg)
    directory = step1_directory(overrides, inert_knobs(cfg))
    with file_lock(directory.with_name(directory.name + ".lock")):  # the other jobs of a sweep wait here
        done, resume_from = start(cfg, directory)
        if done is None:
            log.info("step 1 (%s): training in %s", STEP_ORDERS[job.algo.order][0], directory)
            try:
                train_preference(cfg, directory, resume_from, extra={"step": 1})
            finally:
                finish_wandb()
        else:
            log.info("step 1 (%s): reusing %s", STEP_ORDERS[job.algo.order][0], directory)
    return directory, cfg


def train_stepwise(cfg: DictConfig, out: Path, resume_from: Path | None) -> dict:
    """The stepwise family's recipe (`algo.recipe`): step 1 (trained once per config), then step 2 in `out`."""
    from hydra.core.hydra_config import HydraConfig

    from riskexp.knobs import inert_knobs
    from riskexp.run import train_preference
    from riskexp.schema import validate

    job_overrides = list((cfg.hydra if "hydra" in cfg else HydraConfig.get()).overrides.task)
    step1_dir, step1_cfg = train_step1(cfg, job_overrides)
    _, step2_cfg = compose_step(step_overrides(cfg, job_overrides, 2, step1_dir))
    validate(step2_cfg)
    # knobs neither step reads; lam is this recipe's own (step 2's temperature)
    inert = sorted(set(inert_knobs(step1_cfg)) & set(inert_knobs(step2_cfg)) - {"lam"})
    log.info("step 2 (%s, beta/lam=%g): training in %s from %s", STEP_ORDERS[cfg.algo.order][1],
             cfg.algo.beta / cfg.algo.lam, out, step1_dir)
    sft = cfg.model.ref_path or cfg.model.path  # step 1's reference: the SFT/base model
    extra = {"step": 2, "lam": cfg.algo.lam, "step1_dir": str(step1_dir), "reference": step2_cfg.model.ref_path,
             "eval_reference": sft or cfg.model.name, "inert": inert}
    return train_preference(step2_cfg, out, resume_from, record=cfg, extra=extra,
                            evaluation=functools.partial(evaluate_against_sft, sft_path=sft))


def evaluate_against_sft(cfg: DictConfig, policy, step1_policy, tokenizer, sft_path: str | None) -> tuple[dict, list]:
    """Step 2's evaluation as the papers report it: the step-2 policy and the step-1 (helpfulness-only) policy,
    its training reference, both against the SFT/base model that step 1 started from (`sft_path`, else the
    base model): the win rates and changes of both against the SFT model (`eval/...`, `step1_eval/...`) and
    step 2's change against step 1 (`eval/delta_step1/...`)."""
    from hydra.utils import instantiate

    from riskexp.models import build_policy_and_reference
    from riskexp.run import evaluate_task

    loader = instantiate(cfg.model.loader, _partial_=True)
    sft, _, _ = build_policy_and_reference(loader, sft_path, None, cfg.model.dtype, need_reference=False)
    sft.requires_grad_(False).eval().to(next(policy.parameters()).device)
    return evaluate_task(cfg, policy, sft, tokenizer, intermediates={"step1": step1_policy})
