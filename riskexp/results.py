"""results.json: the per-run record that tables and plots are built from (W&B only mirrors it)."""

from __future__ import annotations

import json
import math
import os
import subprocess
from enum import Enum
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from riskexp.files import atomic_write_text

RESULTS_FILE = "results.json"
SAMPLES_FILE = "samples.jsonl"  # every evaluated completion of a run (riskexp.run.record_evaluation)
PACKAGE_DIR = str(Path(__file__).resolve().parent)

# Config keys (and everything below them) that do not change a run's results: where things are written, what
# is logged or shown, what is exported. A finished run is not refused when only these differ, and the report
# never splits rows by them. Everything else counts, trainer.devices included (DDP changes the batch).
NON_RESULT_KEYS = (
    "hydra",                             # launcher, directories, job bookkeeping
    "name", "tags",                      # name the directory and the W&B group
    "rerun",                             # whether a finished directory is trained again
    "save_policy",                       # exports the trained policy; the metrics are the same
    "logger",                            # where metrics are mirrored: W&B, CSV or nowhere
    "eval.samples_logged",               # rows of the W&B table of sample completions
    "data.build",                        # read only by `python -m riskexp.data.build`, never by training
    "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.log_every_n_steps",
    # when and whether a checkpoint is saved: resuming from one is exact, so it does not change the result
    "trainer.checkpoint_every_n_steps", "trainer.keep_checkpoint",
)


def changes_results(key: str) -> bool:
    """False for a dotted config key (or a group such as `logger`, `hydra/launcher`) under NON_RESULT_KEYS."""
    key = key.replace("/", ".")
    return not any(key == k or key.startswith(k + ".") for k in NON_RESULT_KEYS)


def override_key(override: str) -> str:
    """The config key of a command-line override: `++optimizer.lr=1e-4` -> `optimizer.lr`, `~data/task` ->
    `data/task`."""
    return override.split("=", 1)[0].lstrip("+~")


def _portable(value: Any) -> Any:
    # files shipped in the package are recorded as the config writes them, so a finished run is recognised
    # from another checkout or node
    if isinstance(value, str) and value.startswith(PACKAGE_DIR + os.sep):
        return "${rx.package:" + value[len(PACKAGE_DIR) + 1:] + "}"
    return value


def run_config(cfg: DictConfig, complete: bool = False) -> dict[str, Any]:
    """The resolved config as flat dotted keys (`optimizer.lr`, `eval.alphas`), without `hydra`, and without
    NON_RESULT_KEYS unless `complete` (the record in results.json is complete; comparisons drop those keys).

    Values are JSON-native (lists stay whole values, enums become their names; paths inside the package stay
    `${rx.package:...}`), so a config read back from results.json compares equal to the one that wrote it.
    """
    flat: dict[str, Any] = {}

    def walk(node: DictConfig, prefix: str) -> None:
        for key in node:
            name = f"{prefix}{key}"
            if name == "hydra" or not (complete or changes_results(name)):
                continue
            if OmegaConf.is_missing(node, key):
                flat[name] = "???"
                continue
            value = node[key]  # resolves interpolations; only keys kept are resolved
            if isinstance(value, DictConfig) and len(value) > 0:
                walk(value, name + ".")
            elif isinstance(value, DictConfig | ListConfig):
                flat[name] = OmegaConf.to_container(value, resolve=True, enum_to_str=True)
            else:
                flat[name] = _portable(value.name if isinstance(value, Enum) else value)

    walk(cfg, "")
    return json.loads(json.dumps(flat, default=str))


class _Absent:
    def __repr__(self) -> str:
        return "<absent>"


ABSENT = _Absent()  # the value config_differences reports for a key one of the two configs lacks


def config_differences(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) for every key whose value differs or that only one side has, sorted."""
    return [(key, old.get(key, ABSENT), new.get(key, ABSENT))
            for key in sorted(old.keys() | new.keys())
            if old.get(key, ABSENT) != new.get(key, ABSENT)]


def format_differences(differences: list[tuple[str, Any, Any]]) -> str:
    """One line per difference: `optimizer.lr: 0.001 -> 0.0001` (old -> new)."""
    return "\n".join(f"  {key}: {old!r} -> {new!r}" for key, old, new in differences)


def check_same_config(directory: Path, recorded: dict, config: dict) -> None:
    """Raise ConfigError unless `recorded` (a results.json) was written by `config` (a run_config).

    A record without a config predates config recording and is refused too: skipping it would report its
    numbers under a config nobody checked, which is the mistake this check exists to prevent.
    """
    from riskexp.schema import ConfigError

    rerun = "pass rerun=true to train again (the old file is kept as results.<time>.json)"
    path = Path(directory) / RESULTS_FILE
    if not isinstance(recorded.get("config"), dict):
        raise ConfigError(f"{path} records no config (written before riskexp recorded one), so it cannot be "
                          f"told whether it was this run; {rerun}, or use a new directory (name=...)")
    recorded_config = {k: v for k, v in recorded["config"].items() if changes_results(k)}
    differences = config_differences(recorded_config, config)
    if differences:
        raise ConfigError(f"{path} was written by a different config (recorded -> this command):\n"
                          f"{format_differences(differences)}\n{rerun}")


def riskexp_version() -> str:
    try:
        return metadata.version("riskexp")
    except metadata.PackageNotFoundError:  # running from a checkout that was never pip-installed
        from riskexp import __version__

        return __version__


def git_commit(cwd: Path | None = None) -> str | None:
    """The commit of the riskexp checkout, with `-dirty` if it has uncommitted changes; None outside git."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=5)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def provenance(cfg: DictConfig) -> dict[str, Any]:
    """What results.json records beyond the metrics to say which run it was: the command-line overrides,
    the chosen config-group options, the whole resolved config, the riskexp version and commit. They are read
    from `cfg.hydra` where the config has one (composed with its hydra node), else from the running job."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = cfg.hydra if "hydra" in cfg else HydraConfig.get()
    return {
        "overrides": list(hydra_cfg.overrides.task),
        "choices": {group: option for group, option in hydra_cfg.runtime.choices.items()
                    if changes_results(group)},
        "config": run_config(cfg, complete=True),
        "riskexp_version": riskexp_version(),
        "git_commit": git_commit(),
    }


def _plain(value):
    """JSON-safe scalars: tensors and numpy numbers become floats, nan/inf become None."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_results(directory: Path, results: dict) -> Path:
    """Write results.json atomically: readers (the report, a relaunched sweep) never see half a file."""
    payload = json.dumps({k: _plain(v) for k, v in results.items()}, indent=2, sort_keys=True)
    return atomic_write_text(Path(directory) / RESULTS_FILE, payload + "\n")


def read_results(directory: Path) -> dict | None:
    path = Path(directory) / RESULTS_FILE
    return json.loads(path.read_text()) if path.exists() else None


def archive_results(directory: Path) -> Path | None:
    """Move an existing results.json aside (results.<mtime>.json) before a rerun, so nothing is lost."""
    path = Path(directory) / RESULTS_FILE
    if not path.exists():
        return None
    target = path.with_name(f"results.{int(path.stat().st_mtime)}.json")
    os.replace(path, target)
    return target
