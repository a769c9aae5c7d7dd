"""Which knobs a run's training reads: the papers' top-level knobs (`alpha`, `beta`) and groups (`risk`) reach
an algorithm only by interpolation (`beta: ${beta}` in its objective, `risk: ${risk}` in Ra-DPO's), so DPO
never reads `alpha` or `risk` and SFT not even `beta`.

Training reads the TRAINING_ROOTS (minus what only evaluation and the preference builder read) and whatever
they interpolate, followed transitively. `inert_knobs` names the others: results.json records them (the report
leaves them out of DPO's rows and legends), and a sweep warns before it starts when a swept key is one of them,
naming the jobs that will train the same policy (`sweep_warnings`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from riskexp.results import changes_results, run_config

# what `riskexp.run` builds the trained policy from
TRAINING_ROOTS = ("algo", "model", "data", "optimizer", "scheduler", "trainer", "seed")
# ... except these, read only by the evaluation after training and by `python -m riskexp.data.build`
NOT_TRAINING = ("data.task", "data.build", "data.rl")
# top-level keys that change results without being knobs of the trained algorithm (evaluation settings, and
# the merged policies of `python -m riskexp.merge`)
NOT_KNOBS = ("eval", "merge")

# `${beta}`, `${algo.variant}`; relative (`${..dtype}`) and resolver (`${rx.package:...}`) interpolations
# stay inside their node or read no config
_NODE_INTERPOLATION = re.compile(r"\$\{([A-Za-z_]\w*(?:\.\w+)*)\}")


def _under(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _is_read(key: str, reads: set[str]) -> bool:
    """Whether training reads config path `key` (a leaf, a node or a group) given `training_reads`: it lies
    below a path read (but not in NOT_TRAINING below a root), or a path read lies below it."""
    return any(
        (_under(key, [path]) and (not _under(key, NOT_TRAINING) or _under(path, NOT_TRAINING)))
        or _under(path, [key])
        for path in reads
    )


def _interpolations(node: Any, path: str, skip: Sequence[str]) -> set[str]:
    """The absolute node interpolations written anywhere in the (unresolved) value at `path`."""
    if _under(path, skip):
        return set()
    if isinstance(node, dict):
        return set().union(*(_interpolations(v, f"{path}.{k}", skip) for k, v in node.items()))
    if isinstance(node, list):
        return set().union(*(_interpolations(v, path, skip) for v in node))
    return set(_NODE_INTERPOLATION.findall(node)) if isinstance(node, str) else set()


def training_reads(cfg: DictConfig) -> set[str]:
    """The config paths training reads: the TRAINING_ROOTS (without NOT_TRAINING) and every node they
    interpolate, transitively."""
    reached: set[str] = set()
    frontier = [(root, NOT_TRAINING) for root in TRAINING_ROOTS]
    while frontier:
        path, skip = frontier.pop()
        if path in reached:
            continue
        reached.add(path)
        node = OmegaConf.select(cfg, path, throw_on_missing=False)
        value = OmegaConf.to_container(node, resolve=False) if isinstance(node, DictConfig | ListConfig) else (
            _raw(cfg, path))
        # a node named by an interpolation is read whole, also where a root would skip it (RL's task reward)
        frontier += [(ref, ()) for ref in _interpolations(value, path, skip) if ref not in reached]
    return reached


def _raw(cfg: DictConfig, path: str) -> Any:
    """The unresolved value of a leaf (`${alpha}` rather than 0.1), or None where there is none."""
    parent, _, key = path.rpartition(".")
    node = OmegaConf.select(cfg, parent, throw_on_missing=False) if parent else cfg
    if not isinstance(node, DictConfig) or key not in node:
        return None
    return node._get_node(key)._value()


def knobs(cfg: DictConfig) -> list[str]:
    """The top-level keys and groups that could change what is trained: everything outside TRAINING_ROOTS that
    changes results (`alpha`, `beta`, `risk`, ...), without `eval` and `hydra`."""
    return sorted(k for k in cfg if k not in TRAINING_ROOTS and k not in NOT_KNOBS and changes_results(str(k)))


def inert_knobs(cfg: DictConfig) -> list[str]:
    """The knobs the training of `cfg` never reads: `["alpha", "risk"]` for DPO, `["alpha"]` for Ra-DPO with
    the entropic risk (it has theta), `[]` for Ra-DPO with CVaR."""
    reads = training_reads(cfg)
    return [k for k in knobs(cfg) if not _is_read(k, reads)]


def training_config(cfg: DictConfig) -> str:
    """What the trained policy is a function of, as canonical JSON: the resolved config keys under the paths
    training reads, without the keys that change nothing (NON_RESULT_KEYS). Equal strings: equal policies."""
    reads = training_reads(cfg)
    return json.dumps({k: v for k, v in run_config(cfg).items() if _is_read(k, reads)}, sort_keys=True)


# --- sweeps ------------------------------------------------------------------------------------------------


def _job_text(job: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in job.items())


def _contexts(jobs: list[dict[str, str]], inert: list[bool], key: str) -> list[str]:
    """The shortest descriptions by the other swept keys of the jobs where `key` is inert, e.g. `algo=dpo`: a
    key is left out of a job's description while the jobs matching the rest of it are all inert anyway."""

    def all_inert(description: dict[str, str]) -> bool:
        return all(off for job, off in zip(jobs, inert) if all(job[k] == v for k, v in description.items()))

    described = set()
    for job, off in zip(jobs, inert):
        if not off:
            continue
        description = {k: v for k, v in job.items() if k != key}
        for other in list(description):
            shorter = {k: v for k, v in description.items() if k != other}
            if all_inert(shorter):
                description = shorter
        described.add(_job_text(description))
    return sorted(described)


def sweep_warnings(jobs: Sequence[tuple[dict[str, str], DictConfig]]) -> list[str]:
    """Warnings for a sweep before it starts, from each job's swept values (`{"alpha": "0.1", ...}`) and config:
    one per swept key that does not change training in some jobs (naming where), then the groups of jobs that
    will train identical policies."""
    if len(jobs) < 2:
        return []
    values = [values for values, _ in jobs]
    reads = [training_reads(cfg) for _, cfg in jobs]
    warnings = []
    for key in values[0]:
        if not changes_results(key):
            continue
        inert = [not _is_read(key.replace("/", "."), r) for r in reads]
        if not any(inert):
            continue
        swept = ",".join(dict.fromkeys(v[key] for v in values))
        where = "in any job" if all(inert) else "with " + "; or ".join(_contexts(values, inert, key))
        warnings.append(f"{key}={swept} does not change training {where}: those jobs differ only in what is "
                        f"evaluated or reported")
    groups: dict[str, list[str]] = {}
    for job, cfg in jobs:
        groups.setdefault(training_config(cfg), []).append(_job_text(job))
    identical = [same for same in groups.values() if len(same) > 1]
    if identical:
        warnings.append(f"{sum(map(len, identical))} of {len(jobs)} jobs train the same policy as another job "
                        "(one line per policy):\n" + "\n".join("  " + " | ".join(same) for same in identical))
    return warnings
