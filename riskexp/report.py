"""Summarise and plot the ``results.json`` files that training runs write.

    python -m riskexp.report RUN_OR_SWEEP_DIR [MORE_DIRS...] [--out DIR] [--metrics m1,m2] [--group-by k1,k2]

Runs are grouped by the keys every run records (model, data, algo, variant, risk, alpha, beta, ...) and by
every key overridden on the command line of any run (read from ``overrides`` in results.json, valued from its
``config``), except ``seed`` and keys that do not change results: two runs in one row differ only in the seed.

A key does not apply to a run whose training never reads its knob (results.json lists those knobs in
``inert``: DPO reads neither ``alpha`` nor ``risk``): it is left blank in that run's row, so DPO runs that
differ only in alpha are one row, and runs that repeat the training of another (same applicable keys, same
seed) are counted once, with a note on stderr. ``n`` counts seeds.

``report.md`` shows the keys that vary as columns (keys equal in all rows once above the table; blank columns
and recorded keys that repeat another column, such as ``risk_param`` = ``alpha``, left out), each metric under
a readable name (``reward CVaR@0.1``) as ``mean ± sd (n)`` over seeds, ``mean [lo, hi] (1)`` for a single
run with a bootstrap interval (``format_cell`` gives the rounding rule). ``report.csv`` has the same rows and
key columns with the numbers unrounded. The plots, ``reward_vs_kl.png``, ``cvar_vs_alpha.png`` and, for tasks
with a cost, ``cost_vs_kl.png``, show the reference model, error bars (sd over seeds, or one run's bootstrap
interval) and legends naming only the knobs that apply. Everything is written to the output directory
(default: the first directory given).
"""

from __future__ import annotations

import argparse
import json
import logging
import numbers
import os
import sys
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

# The object-oriented Figure API renders through Agg without pyplot, so no display is needed and the
# process-wide backend of whoever imports this module is left alone.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.text import Text
from matplotlib.transforms import Bbox

from riskexp.formatting import METRIC_LABELS, format_estimate
from riskexp.results import RESULTS_FILE, changes_results, override_key

log = logging.getLogger(__name__)

# the flat keys of every results.json that say which configuration a run had (override keys are added to them)
DEFAULT_GROUP_BY = ("model", "data", "algo", "variant", "kl_weight", "risk", "estimator", "risk_param", "alpha", "beta")
# what is averaged over: the only override allowed to differ within a row
AVERAGED_KEYS = ("seed",)
METRIC_PREFIXES = ("val/", "eval/", "ref_eval/")
INTERVAL_SUFFIXES = ("/lo", "/hi")  # K/lo, K/hi: the bootstrap interval of metric K
PLOT_METRICS = (
    "eval/reward_mean", "eval/kl", "eval/reward_cvar", "eval/cost_mean",
    "ref_eval/reward_mean", "ref_eval/kl", "ref_eval/reward_cvar", "ref_eval/cost_mean",
)  # fmt: skip
# flat keys that results.json records from the risk group: their knob is `risk` (that of any other key is its
# first dotted component: `alpha`, `risk.theta` -> risk, `optimizer.lr` -> optimizer)
RISK_KEYS = ("risk", "estimator", "risk_param", "split_vocab")
# Flat keys that restate a config key: a table leaves one out where, in every row it has a value, one of these
# columns shows the same value (risk_param is CVaR's alpha or the entropic theta).
RESTATES = {
    "risk_param": ("alpha", "risk.alpha", "risk.theta"),
    "estimator": ("risk.estimator",),
    "split_vocab": ("risk.split_vocab",),
    "kl_weight": ("algo.kl_weight",),
    "variant": ("algo.variant",),
}
# the keys whose values change the reference model or what it is evaluated on
REFERENCE_KNOBS = ("model", "data", "eval")

# how the prefix of a metric shows in its name
PREFIX_LABELS = (
    ("eval/delta/", "Δ {}"),  # paired change: policy minus reference
    ("ref_eval/", "reference {}"),
    ("eval/", "{}"),
    ("val/", "{} (val)"),
    ("train/", "{} (train)"),
    ("", "{}"),
)
# key names in legends and point labels
KEY_SYMBOLS = {"alpha": "α", "beta": "β", "risk.theta": "θ", "risk_param": "risk param"}
RISK_PARAMETERS = {"cvar": "α", "entropic": "θ"}  # what risk_param is for each risk measure


def collect(paths: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """One row per ``results.json`` found (recursively) under ``paths``, plus a ``run_dir`` column.

    Unreadable or non-object JSON files are skipped with a warning; raises FileNotFoundError when no
    readable file is found.
    """
    paths = [Path(paths)] if isinstance(paths, str | Path) else [Path(p) for p in paths]
    # Keyed by resolved path so that overlapping arguments (a sweep and one of its runs) count a run once.
    files: dict[Path, Path] = {}
    for root in paths:
        for file in [root] if root.is_file() else sorted(root.rglob(RESULTS_FILE)):
            files.setdefault(file.resolve(), file)

    rows = []
    for file in files.values():
        try:
            record = json.loads(file.read_text())
        except (OSError, ValueError) as err:  # ValueError covers bad JSON and bad UTF-8
            log.warning("skipping %s: %s", file, err)
            continue
        if not isinstance(record, dict):
            log.warning("skipping %s: expected a JSON object, got %s", file, type(record).__name__)
            continue
        rows.append({**record, "run_dir": str(file.parent)})
    if not rows:
        raise FileNotFoundError(f"no readable {RESULTS_FILE} found under {', '.join(map(str, paths))}")
    return pd.DataFrame(rows)


def numeric_columns(df: pd.DataFrame) -> list[str]:
    """Columns usable as metrics (numeric, not boolean), sorted."""
    return sorted(
        c
        for c in df.columns
        if pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])
    )


def default_metrics(df: pd.DataFrame) -> list[str]:
    """The ``val/``, ``eval/`` and ``ref_eval/`` metrics (sorted), then ``steps``."""
    numeric = numeric_columns(df)
    return [c for c in numeric if c.startswith(METRIC_PREFIXES)] + (["steps"] if "steps" in numeric else [])


def override_keys(df: pd.DataFrame) -> list[str]:
    """Every key overridden on the command line of some run, sorted, minus `seed` and keys that do not
    change results (results.NON_RESULT_KEYS)."""
    overrides = df["overrides"] if "overrides" in df else pd.Series(dtype=object)
    keys = {override_key(o) for run in overrides if isinstance(run, list) for o in run}
    return sorted(k for k in keys if k not in AVERAGED_KEYS and changes_results(k))


def group_keys(df: pd.DataFrame) -> list[str]:
    """DEFAULT_GROUP_BY, then the override keys (override_keys) not among them."""
    return [*DEFAULT_GROUP_BY, *(k for k in override_keys(df) if k not in DEFAULT_GROUP_BY)]


def knob(key: str) -> str:
    """The knob a group key belongs to, as ``inert`` names it: ``risk`` for RISK_KEYS, else the key's first
    dotted component (``alpha`` -> alpha, ``risk.theta`` -> risk, ``optimizer.lr`` -> optimizer)."""
    return "risk" if key in RISK_KEYS else key.split(".", 1)[0]


def inert_column(df: pd.DataFrame) -> pd.Series:
    """The knobs each run's training does not read (results.json ``inert``; empty where a run lacks it)."""
    if "inert" not in df:
        return pd.Series([frozenset()] * len(df), index=df.index, dtype=object)
    return df["inert"].map(lambda v: frozenset(v) if isinstance(v, list | tuple) else frozenset())


def applicable_keys(df: pd.DataFrame, names: Sequence[str]) -> pd.DataFrame:
    """The values of group keys ``names`` in each run (``key_column``), None where a run lacks the key or
    its knob is one the run's training does not read (``inert_column``)."""
    inert = inert_column(df)
    columns = {}
    for name in names:
        name_knob = knob(name)
        off = inert.map(lambda knobs, k=name_knob: k in knobs)
        columns[name] = key_column(df, name).where(~off, None)
    return pd.DataFrame(columns, index=df.index, dtype=object)


def drop_repeats(df: pd.DataFrame, group_by: Sequence[str] = (), quiet: bool = False) -> pd.DataFrame:
    """The runs minus those that repeat the training of an earlier run (by ``run_dir``): the same seed and the
    same value of every applicable group key (``group_keys`` and ``group_by``), e.g. DPO at alpha 0.1 and 0.5.

    Unless ``quiet``, says once on stderr how many were left out and which knobs made them repeats.
    """
    if "run_dir" in df:
        df = df.iloc[sorted(range(len(df)), key=lambda i: str(df["run_dir"].iloc[i]))]
    names = list(dict.fromkeys([*group_keys(df), *group_by]))
    keys = applicable_keys(df, names)
    seeds = key_column(df, "seed")
    seen, repeat = set(), []
    for (_, values), seed in zip(keys.iterrows(), seeds):
        identity = tuple(None if _missing(v) else _fmt_key(v) for v in [*values, seed])
        repeat.append(identity in seen)
        seen.add(identity)
    repeat = pd.Series(repeat, index=df.index)
    if repeat.any() and not quiet:
        print(f"note: {_repeats_note(df[repeat], names)}", file=sys.stderr)
    return df[~repeat]


def _repeats_note(repeats: pd.DataFrame, names: Sequence[str]) -> str:
    """`2 runs repeat another run's training (alpha, risk do not apply to algo=dpo); each counted once`."""
    reasons = {}
    keys = applicable_keys(repeats, [k for k in ("algo", "risk") if k in names or k in repeats])
    for (_, where), knobs in zip(keys.iterrows(), inert_column(repeats)):
        off = sorted(k for k in knobs if any(knob(n) == k for n in names))
        context = ", ".join(f"{k}={_fmt_key(v)}" for k, v in where.items() if not _missing(v))
        if off:
            verb = "does" if len(off) == 1 else "do"
            reasons.setdefault(f"{', '.join(off)} {verb} not apply to {context or 'these runs'}", None)
        else:
            reasons.setdefault("same configuration and seed", None)
    count = len(repeats)
    runs = f"{count} run repeats" if count == 1 else f"{count} runs repeat"
    return f"{runs} another run's training ({'; '.join(reasons)}); each counted once"


def summarize(
    df: pd.DataFrame,
    group_by: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    *,
    quiet: bool = False,
) -> pd.DataFrame:
    """Mean, sd (ddof=1, NaN for a single run) and run count of each metric per group.

    ``group_by`` defaults to ``group_keys(df)``. A key that does not apply to a run (its knob in the run's
    ``inert``) or that the run lacks groups as ""; runs that repeat another's training are counted once
    (``drop_repeats``, noted on stderr unless ``quiet``), so ``n`` counts seeds. Columns: the group keys,
    ``n``, then ``<metric>_mean`` and ``<metric>_sd`` for each metric and for its interval bounds
    ``<metric>/lo``, ``<metric>/hi`` where runs have them, plus ``<metric>_n`` for a metric that some runs of
    a group lack; rows are sorted by the keys. Raises ValueError for unknown metrics.
    """
    group_by = group_keys(df) if group_by is None else list(group_by)
    available = numeric_columns(df)
    metrics = default_metrics(df) if metrics is None else list(metrics)
    unknown = [m for m in metrics if m not in available]
    if unknown:
        raise ValueError(f"unknown metric(s): {', '.join(unknown)}; available: {', '.join(available)}")
    bounds = [m + b for m in metrics for b in INTERVAL_SUFFIXES if m + b in available and m + b not in metrics]
    df = drop_repeats(df, group_by, quiet=quiet)

    # no keys at all: every run in one group
    keys = applicable_keys(df, group_by) if group_by else pd.DataFrame({_ONE_GROUP: 0}, index=df.index)
    grouped = df[metrics + bounds].groupby([keys[k] for k in keys], dropna=False, sort=False)
    size = grouped.size()
    columns = {"n": size}
    for m in metrics + bounds:
        stats = grouped[m].agg(["mean", "std", "count"])
        columns |= {f"{m}_mean": stats["mean"], f"{m}_sd": stats["std"]}
        if m in metrics and (stats["count"] != size).any():
            columns[f"{m}_n"] = stats["count"]
    summary = pd.DataFrame(columns).reset_index().drop(columns=_ONE_GROUP, errors="ignore")
    order = sorted(range(len(summary)), key=lambda i: _sort_key(summary.loc[i, group_by]))
    summary = summary.iloc[order].reset_index(drop=True)
    summary[group_by] = summary[group_by].astype(object).where(summary[group_by].notna(), "")
    return summary


_ONE_GROUP = "__all_runs__"


def key_column(df: pd.DataFrame, name: str) -> pd.Series:
    """The value of group key ``name`` in each run (None where a run lacks it).

    A flat results.json key (``algo``, ``alpha``) is read as is; any other key from the run's ``config``
    (``optimizer.lr``), else its config-group ``choices`` (``optimizer=rmsprop``), else the text of its override.
    """
    if name in df and name not in ("config", "choices", "overrides"):
        col = df[name]
        # pandas turns JSON ints into floats as soon as one run lacks the key; show variant 1, not 1.0.
        if pd.api.types.is_float_dtype(col) and (col.dropna() % 1 == 0).all():
            col = col.astype("Int64")
        return col.astype(object).where(col.notna(), None).rename(name)
    return pd.Series([_run_value(run, name) for run in df.to_dict("records")], index=df.index, name=name,
                     dtype=object)


def _run_value(run: dict, name: str):
    for section in ("config", "choices"):
        if isinstance(run.get(section), dict) and name in run[section]:
            value = run[section][name]
            # lists (eval.alphas) are not hashable group keys; their JSON text is, and reads the same
            return json.dumps(value) if isinstance(value, list | dict) else value
    overrides = run.get("overrides")
    texts = [o.split("=", 1)[1] for o in overrides or () if "=" in o and override_key(o) == name]
    return texts[-1] if texts else None


def _sort_key(key: Iterable) -> tuple:
    # Numbers sort numerically, strings alphabetically, missing last, without comparing across types.
    return tuple(
        (2, "") if _missing(v) else (0, v) if isinstance(v, numbers.Real) else (1, str(v)) for v in key
    )


def _missing(value) -> bool:
    return value is None or (isinstance(value, str) and value == "") or (
        not isinstance(value, str) and bool(pd.isna(value)))


def _fmt_key(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _same(a, b) -> bool:
    """Whether two key values read the same (True is not 1)."""
    return not _missing(b) and isinstance(a, bool) == isinstance(b, bool) and _fmt_key(a) == _fmt_key(b)


def _group_columns(summary: pd.DataFrame) -> list[str]:
    return list(summary.columns[: summary.columns.get_loc("n")])


def table_keys(summary: pd.DataFrame) -> tuple[list[str], list[str]]:
    """The group keys a table shows: ``(columns, constant)``, the keys that take several values and those
    with one value in every row that has one, in a summary of several rows (shown once, above the table).

    Left out: a key blank in every row, and a key that restates another (RESTATES: ``risk_param`` where it
    equals ``alpha``, or ``risk.theta``, in each row it has a value).
    """
    keys = [k for k in _group_columns(summary) if not summary[k].map(_missing).all()]
    for key in [k for k in RESTATES if k in keys]:
        others = [o for o in RESTATES[key] if o in keys]
        rows = summary[[key, *others]].to_dict("records")
        if others and all(_missing(r[key]) or any(_same(r[key], r[o]) for o in others) for r in rows):
            keys.remove(key)
    constant = [k for k in keys if len(summary) > 1 and len(_values(summary[k])) == 1]
    return [k for k in keys if k not in constant], constant


def _values(column: pd.Series) -> list:
    """The distinct values of a key column, blanks left out."""
    return list({_fmt_key(v): v for v in column if not _missing(v)}.values())


def caption(summary: pd.DataFrame, keys: Sequence[str]) -> str:
    """``model=tiny, data=fixture; where they apply: risk=cvar``: keys with one value, those that some rows
    leave blank (DPO has no risk) after the others."""
    everywhere = [k for k in keys if not summary[k].map(_missing).any()]
    somewhere = [k for k in keys if k not in everywhere]

    def text(names: Sequence[str]) -> str:
        return ", ".join(f"{k}={_fmt_key(_values(summary[k])[0])}" for k in names)

    return "; ".join([*([text(everywhere)] if everywhere else []),
                      *([f"where they apply: {text(somewhere)}"] if somewhere else [])])


def metric_label(metric: str, level: float | None = None) -> str:
    """A readable name for a metric (METRIC_LABELS, PREFIX_LABELS): ``eval/reward_cvar`` -> ``reward
    CVaR@0.1`` at ``level`` 0.1, ``eval/delta/reward_mean`` -> ``Δ reward mean``, ``val/loss`` -> ``loss
    (val)``; the metric itself where it is unknown or needs a level that is not known."""
    pattern, name = next((p, metric[len(prefix):]) for prefix, p in PREFIX_LABELS if metric.startswith(prefix))
    name, at, own_level = name.partition("@")
    label = METRIC_LABELS.get(name)
    if label is None or (at and "{level}" not in label):
        return metric
    if at:
        level = own_level
    elif "{level}" in label and level is None:
        return metric
    return pattern.format(label.format(level=_fmt_key(level)))


def metric_labels(metrics: Sequence[str], level: float | None = None) -> dict[str, str]:
    """``metric_label`` of each metric; a metric whose label another one already has keeps its own name."""
    labels: dict[str, str] = {}
    for m in metrics:
        label = metric_label(m, level)
        labels[m] = m if label in labels.values() else label
    return labels


def format_cell(
    mean: float,
    sd: float | None = None,
    n: int = 1,
    lo: float | None = None,
    hi: float | None = None,
    digits: int = 3,
    integer: bool = False,
) -> str:
    """One metric of one row: ``mean ± sd (n)`` over n >= 2 seeds, ``mean [lo, hi] (1)`` for a single run
    with a bootstrap interval, ``mean (1)`` without, ``-`` where there is no value; rounded as
    ``riskexp.formatting.format_estimate`` says (``0.160 ± 0.014 (2)``, ``-0.012 [-0.276, 0.212] (1)``)."""
    if mean is None or pd.isna(mean):
        return "-"
    several = n >= 2 and sd is not None and pd.notna(sd)
    estimate = format_estimate(float(mean), sd=float(sd) if several else None,
                               lo=None if several or lo is None or pd.isna(lo) else float(lo),
                               hi=None if several or hi is None or pd.isna(hi) else float(hi),
                               digits=digits, integer=integer)
    return f"{estimate} ({n})"


def _count(row: dict, metric: str) -> int:
    count = row.get(f"{metric}_n", row["n"])
    return int(count) if pd.notna(count) else 0


def _cell(row: dict, metric: str, digits: int, integer: bool) -> str:
    return format_cell(row[f"{metric}_mean"], row[f"{metric}_sd"], _count(row, metric),
                       row.get(f"{metric}/lo_mean"), row.get(f"{metric}/hi_mean"), digits, integer)


def _whole_numbers(summary: pd.DataFrame, metric: str) -> bool:
    """Whether every number of a metric's cells is a whole number (steps, counts)."""
    columns = [c for c in (f"{metric}_mean", f"{metric}_sd", f"{metric}/lo_mean", f"{metric}/hi_mean")
               if c in summary]
    values = pd.concat([pd.to_numeric(summary[c], errors="coerce") for c in columns]).dropna()
    return len(values) > 0 and bool((values % 1 == 0).all())


def _is_bound(metric: str, metrics: Sequence[str]) -> bool:
    return metric.endswith(INTERVAL_SUFFIXES) and metric[:-3] in metrics


def summary_metrics(summary: pd.DataFrame) -> list[str]:
    """The metrics of a ``summarize`` result, without the interval bounds of another metric."""
    stems = [c.removesuffix("_mean") for c in summary.columns if c.endswith("_mean")]
    stems = [m for m in stems if f"{m}_sd" in summary.columns]
    return [m for m in stems if not _is_bound(m, stems)]


def to_markdown(
    summary: pd.DataFrame,
    metrics: Sequence[str] | None = None,
    digits: int = 3,
    info: SweepInfo | None = None,
) -> str:
    """Markdown table of a ``summarize`` result: the group keys of ``table_keys`` (those with one value in all
    rows once above the table), then one ``format_cell`` per metric under its ``metric_label`` (CVaR at the
    level of ``info``), then ``n`` unless every row shows its count in a cell.

    ``metrics`` defaults to every metric in the summary except interval bounds shown in their cell.
    """
    keys, constant = table_keys(summary)
    above = caption(summary, constant)
    metrics = summary_metrics(summary) if metrics is None else list(metrics)
    labels = metric_labels(metrics, (info or SweepInfo()).eval_alpha)
    rows = summary.to_dict("records")
    cells = {
        **{k: [_fmt_key(row[k]) for row in rows] for k in keys},
        **{labels[m]: [_cell(row, m, digits, _whole_numbers(summary, m)) for row in rows] for m in metrics},
    }
    # each cell says its n: the n column is only needed by a row whose metrics are all missing
    if not metrics or any(all(cells[labels[m]][i] == "-" for m in metrics) for i in range(len(rows))):
        cells["n"] = [str(int(row["n"])) for row in rows]
    # a "|" inside a cell would end it
    table = pd.DataFrame({k.replace("|", r"\|"): [c.replace("|", r"\|") for c in v] for k, v in cells.items()})
    return (f"{above}\n\n" if above else "") + table.to_markdown(index=False, disable_numparse=True) + "\n"


def csv_table(summary: pd.DataFrame) -> pd.DataFrame:
    """What ``report.csv`` holds: the summary, unrounded, with the key columns of ``table_keys`` (the constant
    ones included: the file has no caption)."""
    keys, constant = table_keys(summary)
    dropped = [k for k in _group_columns(summary) if k not in keys and k not in constant]
    return summary.drop(columns=dropped)


@dataclass(frozen=True)
class SweepInfo:
    """What a report says about a sweep besides its rows: its name (plot titles), the evaluation's tail level
    (CVaR labels), the prompts and samples per prompt the evaluation used, and its interval's confidence."""

    name: str = ""
    eval_alpha: float | None = None
    eval_prompts: int | None = None
    samples_per_prompt: int | None = None
    confidence: float | None = None


def sweep_info(runs: pd.DataFrame) -> SweepInfo:
    """The ``SweepInfo`` of per-run results (``collect``): each field where all runs agree on it, else None.

    The name is the runs' ``name`` (a sweep's directory name) or else the name of their common directory; the
    prompt count is the one recorded (``eval_prompts``: a task may have fewer than ``eval.num_prompts``).
    """
    name = _shared(runs, "name")
    if name is None and "run_dir" in runs:
        dirs = [str(d) for d in runs["run_dir"]]
        common = os.path.commonpath(dirs) if len(dirs) > 1 else str(Path(dirs[0]).parent)
        name = Path(common).name
    return SweepInfo(
        name=str(name or ""),
        eval_alpha=_shared(runs, "eval.alpha"),
        eval_prompts=_shared(runs, "eval_prompts", "eval.num_prompts"),
        samples_per_prompt=_shared(runs, "eval_samples_per_prompt", "eval.samples_per_prompt"),
        confidence=_shared(runs, "eval.confidence"),
    )


def _shared(runs: pd.DataFrame, *names: str):
    """The value all runs have for the first of ``names`` that some run has (flat key or config), or None."""
    for name in names:
        values = {_fmt_key(v): v for v in key_column(runs, name) if not _missing(v)}
        if values:
            return next(iter(values.values())) if len(values) == 1 else None
    return None




def plot(
    data: pd.DataFrame,
    out_dir: str | Path,
    group_by: Sequence[str] | None = None,
    info: SweepInfo | None = None,
) -> list[Path]:
    """Write the ``figures`` as PNG files; returns the paths written.

    ``data`` is either per-run (from ``collect``; summarised by ``group_by`` here, default ``group_keys``, and
    described by ``sweep_info`` unless ``info`` is given) or a ``summarize`` result.
    """
    if "n" in data.columns and "run_dir" not in data.columns:
        summary = data
    else:
        present = numeric_columns(data)
        summary = summarize(data, group_by, [m for m in PLOT_METRICS if m in present], quiet=True)
        info = info or sweep_info(data)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in figures(summary, info).items():
        fig.savefig(out_dir / name)
        written.append(out_dir / name)
    return written


def figures(summary: pd.DataFrame, info: SweepInfo | None = None) -> dict[str, Figure]:
    """The plots of a ``summarize`` result by file name: ``reward_vs_kl.png``, ``cvar_vs_alpha.png`` and
    ``cost_vs_kl.png``; a plot whose metrics are absent is left out with a note on stderr.

    Each has the sweep's name and constant keys as its title, the reference model drawn, error bars (sd over
    seeds, or a single run's bootstrap interval), one legend entry per algorithm and the risk measure where it
    applies, and the other keys that vary as labels next to the points.
    """
    info = info or SweepInfo()
    drawn = {}
    for name, draw in (("reward_vs_kl.png", _draw_reward_vs_kl), ("cvar_vs_alpha.png", _draw_cvar_vs_alpha),
                       ("cost_vs_kl.png", _draw_cost_vs_kl)):
        fig = Figure(figsize=(8, 5), dpi=150, layout="constrained")
        FigureCanvasAgg(fig)  # renders without pyplot, and measures text for _place_labels
        ax = fig.add_subplot()
        labels: list[tuple[float, float, str]] = []  # (x, y, text) of the points to label
        skip_reason = draw(ax, summary, info, labels)
        if skip_reason:
            print(f"note: skipping {name}: {skip_reason}", file=sys.stderr)
            continue
        _finish(fig, ax, summary, info)
        _place_labels(fig, ax, labels)
        drawn[name] = fig
    return drawn


def _finish(fig: Figure, ax, summary: pd.DataFrame, info: SweepInfo) -> None:
    """The title, grid and legend every plot has."""
    title = _title(summary, info)
    if title:
        fig.suptitle(title, fontsize=10)
    ax.grid(alpha=0.3)
    handles, texts = ax.get_legend_handles_labels()
    # the configurations drawn against alpha first, then those alpha does not reach, the reference last
    order = sorted(range(len(texts)), key=lambda i: (texts[i].startswith("reference"), "does not" in texts[i]))
    # outside the axes, where it hides no point and no label
    ax.legend([handles[i] for i in order], [textwrap.fill(texts[i], 40) for i in order], loc="upper left",
              bbox_to_anchor=(1.02, 1), borderaxespad=0, fontsize=8, title=_error_bar_note(summary, info),
              title_fontsize=7, alignment="left")


def _title(summary: pd.DataFrame, info: SweepInfo) -> str:
    """``smoke: model=tiny, data=fixture``: the sweep and the keys with one value in all rows, wrapped."""
    keys, constant = table_keys(summary)
    if len(summary) == 1:
        constant = keys
    constant = [k for k in constant if k not in RESTATES and not summary[k].map(_missing).any()]
    text = caption(summary, constant)
    text = f"{info.name}: {text}" if info.name and text else info.name or text
    return textwrap.fill(text, width=100)


def _error_bar_note(summary: pd.DataFrame, info: SweepInfo) -> str:
    """What the error bars are, for the legend's title."""
    level = f"{info.confidence:.0%} " if info.confidence else ""
    counts = sorted(set(int(n) for n in summary["n"]))
    if counts == [1]:
        note = f"error bars: {level}bootstrap interval\nover prompts (single runs)"
    elif min(counts) >= 2:
        note = f"error bars: ± sd over {f'{counts[0]} seeds' if len(counts) == 1 else 'seeds'}"
    else:
        note = f"error bars: ± sd over seeds,\nor {level}bootstrap interval (n=1)"
    reference = any(c.startswith("ref_eval/") and c.endswith("/lo_mean") for c in summary)
    return note + (f";\nreference: {level}bootstrap interval" if reference and counts != [1] else "")


def _num(summary: pd.DataFrame, col: str) -> pd.Series:
    if col not in summary:
        return pd.Series(float("nan"), index=summary.index)
    return pd.to_numeric(summary[col], errors="coerce")


def _errors(summary: pd.DataFrame, metric: str) -> np.ndarray:
    """Error bar lengths (2 x rows: below, above): the sd over seeds, a single run's bootstrap interval, or 0."""
    mean, sd = _num(summary, f"{metric}_mean"), _num(summary, f"{metric}_sd")
    lo, hi = _num(summary, f"{metric}/lo_mean"), _num(summary, f"{metric}/hi_mean")
    counts = pd.Series([_count(r, metric) for r in summary.to_dict("records")], index=summary.index)
    return bar_lengths(mean, sd, lo, hi, use_sd=counts >= 2)


def bar_lengths(mean: pd.Series, sd: pd.Series, lo: pd.Series, hi: pd.Series, use_sd: pd.Series) -> np.ndarray:
    """Error bar lengths (2 x rows: below, above): the sd where `use_sd`, else the interval [lo, hi] around the
    mean; 0 where the one it takes is missing."""
    below = sd.where(use_sd, mean - lo).fillna(0).clip(lower=0)
    above = sd.where(use_sd, hi - mean).fillna(0).clip(lower=0)
    return np.vstack([below.to_numpy(), above.to_numpy()])


def _describe(row: dict, keys: Sequence[str]) -> str:
    """Text such as "ra_dpo cvar β=0.5": string values speak for themselves, numbers get a name (a risk
    parameter that of its measure: θ for the entropic risk)."""
    def name(key: str) -> str:
        return RISK_PARAMETERS.get(row.get("risk"), key) if key == "risk_param" else KEY_SYMBOLS.get(key, key)

    return " ".join(
        _fmt_key(row[k]) if isinstance(row[k], str) else f"{name(k)}={_fmt_key(row[k])}"
        for k in keys
        if not _missing(row.get(k, ""))
    )


def _families(summary: pd.DataFrame) -> pd.Series:
    """The legend entry of each row: its algorithm and the risk measure where it applies (``dpo``,
    ``ra_dpo cvar``), or "all runs"."""
    keys = [k for k in ("algo", "risk") if k in summary]
    return pd.Series([_describe(r, keys) or "all runs" for r in summary.to_dict("records")], index=summary.index)


def _colours(families: pd.Series) -> dict[str, str]:
    """One colour per family, the same in every plot."""
    return {f: f"C{i % 10}" for i, f in enumerate(sorted(families.unique()))}


def _point_labels(summary: pd.DataFrame, exclude: Sequence[str]) -> pd.Series:
    """What tells apart the rows of one family: the keys that vary over the summary, minus ``exclude``, each
    where it applies to the family and does not restate another key there (``table_keys`` of its rows)."""
    varying = table_keys(summary)[0] if len(summary) > 1 else []
    families = _families(summary)
    labels = pd.Series("", index=summary.index)
    for family in families.unique():
        rows = summary[families == family]
        columns, constant = table_keys(rows)
        keys = [k for k in varying if k not in exclude and k in {*columns, *constant}]
        labels[rows.index] = [_describe(r, keys) for r in rows.to_dict("records")]
    return labels


def _reference(summary: pd.DataFrame, metric: str) -> list[tuple[str, float, float, float]]:
    """The reference model's ``ref_eval/<metric>``: (label, value, below, above) for each reference (one per
    model, data and evaluation setting among the rows), averaged over the rows, with its bootstrap interval
    (else the sd over seeds)."""
    name = metric.replace("eval/", "ref_eval/", 1)
    value = _num(summary, f"{name}_mean")
    rows = summary[value.notna()]
    if rows.empty:
        return []
    keys = [k for k in _group_columns(rows) if knob(k) in REFERENCE_KNOBS and len(_values(rows[k])) > 1]
    groups = rows.groupby(keys, dropna=False, sort=True) if keys else [((), rows)]
    references = []
    for _, group in groups:
        mean = float(_num(group, f"{name}_mean").mean())
        lo, hi = _num(group, f"{name}/lo_mean"), _num(group, f"{name}/hi_mean")
        if lo.notna().all() and hi.notna().all():
            below, above = max(mean - lo.mean(), 0.0), max(hi.mean() - mean, 0.0)
        else:
            below, above = _errors(group, name).mean(axis=1)
        label = "reference model" + (f" ({_describe(group.iloc[0].to_dict(), keys)})" if keys else "")
        references.append((label, mean, float(below), float(above)))
    return references


def _eval_label(metric: str, info: SweepInfo) -> str:
    """``reward mean (eval, 32 prompts × 4 samples)``."""
    counts = (f", {info.eval_prompts} prompts × {info.samples_per_prompt} samples"
              if info.eval_prompts and info.samples_per_prompt else "")
    return f"{metric_label(metric, info.eval_alpha)} (eval{counts})"


def _draw_reward_vs_kl(ax, s: pd.DataFrame, info: SweepInfo, labels: list, metric: str = "eval/reward_mean"):
    """Mean reward (or ``metric``) against the KL to the reference, with the reference at KL 0."""
    x, y = _num(s, "eval/kl_mean"), _num(s, f"{metric}_mean")
    ok = x.notna() & y.notna()
    if not ok.any():
        return f"no {metric} and eval/kl in the results"
    xerr, yerr = _errors(s, "eval/kl"), _errors(s, metric)
    families = _families(s)
    colours = _colours(families)
    for family in sorted(families[ok].unique()):
        sel = (ok & (families == family)).to_numpy()
        ax.errorbar(x[sel], y[sel], xerr=xerr[:, sel], yerr=yerr[:, sel], fmt="o", capsize=3, ms=5,
                    color=colours[family], label=family)
    # The legend cannot tell apart the points of one family, so label each with the other keys that vary.
    points = _point_labels(s, exclude=("algo", "risk"))
    labels += [(x[i], y[i], points[i]) for i in s.index[ok] if points[i]]
    for label, value, below, above in _reference(s, metric):
        # the reference policy has zero KL to itself
        ax.errorbar([0.0], [value], yerr=[[below], [above]], fmt="*", ms=13, capsize=3, color="black",
                    zorder=4, label=label)
        labels.append((0.0, value, ""))  # keeps point labels off the star
    ax.set(xlabel="KL(policy ‖ reference) on eval samples (nats)", ylabel=_eval_label(metric, info),
           title=f"{metric_label(metric, info.eval_alpha).capitalize()} vs KL to the reference")
    ax.set_title(ax.get_title(), fontsize=10)
    return None


def _draw_cost_vs_kl(ax, s: pd.DataFrame, info: SweepInfo, labels: list):
    """Mean cost against the KL to the reference, for tasks with a cost."""
    if _num(s, "eval/cost_mean_mean").isna().all():
        return "no eval/cost_mean in the results (the task has no cost)"
    return _draw_reward_vs_kl(ax, s, info, labels, metric="eval/cost_mean")


def _draw_cvar_vs_alpha(ax, s: pd.DataFrame, info: SweepInfo, labels: list):
    """Reward CVaR at the fixed evaluation level against the training alpha: a line per configuration whose
    training reads alpha, a dashed level (band: its spread) for each that does not, and the reference."""
    metric = "eval/reward_cvar"
    alpha, y = _num(s, "alpha"), _num(s, f"{metric}_mean")
    trained = alpha.notna() & y.notna()
    if not trained.any():
        return f"no {metric} of a run whose training reads alpha"
    err = _errors(s, metric)
    families = _families(s)
    colours = _colours(families)
    lines = families + (" " + _point_labels(s, exclude=("algo", "risk", "alpha"))).str.rstrip()
    flat = alpha.isna() & y.notna()  # alpha does not apply: the same at every alpha
    shades = _shades(families[trained | flat], lines[trained | flat], colours)
    for i, line in enumerate(sorted(lines[trained].unique())):
        idx = alpha[trained & (lines == line)].sort_values().index
        ax.errorbar(alpha[idx], y[idx], yerr=err[:, s.index.get_indexer(idx)], marker="osD^v<>"[i % 7], ms=5,
                    capsize=3, color=shades[line], label=line)
    dashes = ["--", "-.", ":", (0, (5, 2, 1, 2, 1, 2))]
    for k, i in enumerate(s.index[flat]):
        pos = s.index.get_loc(i)
        ax.axhline(y[i], color=shades[lines[i]], ls=dashes[k % len(dashes)], lw=1.3,
                   label=f"{lines[i]} (alpha does not apply)")
        ax.axhspan(y[i] - err[0, pos], y[i] + err[1, pos], color=shades[lines[i]], alpha=0.12, lw=0)
    for label, value, below, above in _reference(s, metric):
        ax.axhline(value, color="black", lw=1.5, label=label)
        ax.axhspan(value - below, value + above, color="0.5", alpha=0.15, lw=0, zorder=0)
    alphas = sorted(alpha[trained].unique())
    if alphas[-1] > 10 * alphas[0]:
        ax.set_xscale("log")
    if len(alphas) <= 8:
        ax.set_xticks(alphas, [_fmt_key(float(a)) for a in alphas])
        ax.minorticks_off()
    level = _fmt_key(info.eval_alpha) if info.eval_alpha is not None else "eval.alpha"
    ax.set(xlabel="training risk level alpha (CVaR tail mass)",
           ylabel=f"reward CVaR@{level} (eval, fixed level)",
           title=f"Reward CVaR at the fixed level {level} vs the training alpha")
    ax.set_title(ax.get_title(), fontsize=10)
    return None


def _shades(families: pd.Series, lines: pd.Series, colours: dict[str, str]) -> dict[str, tuple]:
    """A colour per line: its family's, darker or lighter for each further line of the family."""
    shades = {}
    for family in families.unique():
        members = sorted(lines[families == family].unique())
        base = np.array(to_rgb(colours[family]))
        for t, line in zip(np.linspace(-0.4, 0.4, len(members)) if len(members) > 1 else [0.0], members):
            shades[line] = tuple(base * (1 + t) if t < 0 else base + (1 - base) * t)
    return shades


# label positions tried around a point, in points: nearest first
_OFFSETS = [(r * dx, r * dy) for r in (5, 14, 26) for dx, dy in
            ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1))]


def _place_labels(fig: Figure, ax, points: Sequence[tuple[float, float, str]]) -> None:
    """Annotate each point with its text where the text overlaps no other label, marker or the axes' edge
    (the first free spot of _OFFSETS); a label with no free spot is left out."""
    if not any(text for _, _, text in points):
        return
    renderer = fig.canvas.get_renderer()
    fig.draw_without_rendering()  # lays out the figure, so positions on the canvas are final
    frame = ax.get_window_extent(renderer)
    pad = 4 * fig.dpi / 72
    taken = [Bbox.from_bounds(px - pad, py - pad, 2 * pad, 2 * pad)
             for px, py in ax.transData.transform([(x, y) for x, y, _ in points])]
    for x, y, text in points:
        if not text:
            continue
        for dx, dy in _OFFSETS:
            note = ax.annotate(
                text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=7,
                ha="left" if dx > 0 else "right" if dx < 0 else "center",
                va="bottom" if dy > 0 else "top" if dy < 0 else "center",
                arrowprops=dict(arrowstyle="-", lw=0.5, color="0.5", shrinkA=0, shrinkB=2),  # a leader line
                bbox=dict(boxstyle="square,pad=0.1", fc="white", ec="none", alpha=0.75),
            )
            note.set_in_layout(False)
            note.update_positions(renderer)
            box = Text.get_window_extent(note, renderer)  # the text alone, without its leader line
            inside = frame.containsx(box.x0) and frame.containsx(box.x1) and frame.containsy(box.y0) and (
                frame.containsy(box.y1))
            if inside and not any(box.overlaps(other) for other in taken):
                taken.append(box)
                break
            note.remove()


def _csv_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


# what report.md shows by default: the papers' headline numbers (report.csv keeps every metric)
HEADLINE_METRICS = (
    "eval/reward_mean", "eval/reward_cvar", "eval/cost_mean", "eval/cost_cvar", "eval/cost_rate", "eval/kl",
    "ref_eval/reward_mean", "ref_eval/reward_cvar", "ref_eval/cost_cvar",
    "eval/delta/reward_mean", "eval/delta/reward_cvar",  # paired policy-minus-reference changes
    "val/loss", "val/implicit_accuracy", "val/reward_accuracy", "val/kl_chosen", "val/risk_ratio_chosen",
)


def headline_metrics(summary: pd.DataFrame) -> list[str] | None:
    """The headline metrics present in a summary, or None (all of them) when it has none."""
    present = [m for m in HEADLINE_METRICS if f"{m}_mean" in summary.columns]
    return present or None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m riskexp.report", description="Tabulate and plot the results.json files of runs."
    )
    parser.add_argument("paths", nargs="+", type=Path, help="run or sweep directories, searched recursively")
    parser.add_argument("--out", type=Path, help="output directory (default: the first path)")
    parser.add_argument(
        "--metrics",
        type=_csv_list,
        help="comma-separated metrics (default: val/*, eval/*, ref_eval/*, steps in report.csv; "
        "the headline ones of these in report.md)",
    )
    parser.add_argument(
        "--group-by",
        type=_csv_list,
        help=f"comma-separated group keys (default: {','.join(DEFAULT_GROUP_BY)} and every key overridden on "
        "the command line of some run, except seed and keys that do not change results)",
    )
    args = parser.parse_args(argv)

    try:
        runs = collect(args.paths)
        summary = summarize(runs, args.group_by, args.metrics)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    first = args.paths[0]
    out = args.out or (first if first.is_dir() else first.parent)
    out.mkdir(parents=True, exist_ok=True)
    info = sweep_info(runs)
    table = to_markdown(summary, args.metrics or headline_metrics(summary), info=info)
    (out / "report.md").write_text(table)
    csv_table(summary).to_csv(out / "report.csv", index=False)
    print(table, end="")
    # SACPO / RSA step-2 and P-SACPO merge runs also get stepwise.md, stepwise.csv and win_rates.png (imported
    # here: riskexp.stepwise.report builds on this module)
    # RL runs with a prompt tail (RA-RLHF's evaluation) also get rl.md, rl.csv and quantile_curve.png
    from riskexp.rl.report import write_rl
    from riskexp.stepwise.report import write_stepwise

    written = [out / "report.md", out / "report.csv", *plot(runs, out, args.group_by, info)]
    try:
        written += write_stepwise(runs, out)
        written += write_rl(runs, out)
    except ValueError as err:  # a malformed samples.jsonl: the files above are written all the same
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        for path in written:
            print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
