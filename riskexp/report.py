"""Summarise and plot the ``results.json`` files that training runs write.

    python -m riskexp.report RUN_OR_SWEEP_DIR [MORE_DIRS...] [--out DIR] [--metrics m1,m2] [--group-by k1,k2]

Runs are grouped by the keys every run records (model, data, algo, variant, risk, alpha, beta, ...) and by
every key overridden on the command line of any run (read from ``overrides`` in results.json, valued from its
``config``), except ``seed`` and keys that do not change results: two runs in one row differ only in the seed.
Every metric is reported as mean ± sd over the runs of a group (``mean [lo, hi]`` for a single run with a
bootstrap interval). ``report.md``, ``report.csv``, ``reward_vs_kl.png`` and ``cvar_vs_alpha.png`` are written to
the output directory (default: the first directory given).
"""

from __future__ import annotations

import argparse
import json
import logging
import numbers
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

# The object-oriented Figure API renders through Agg without pyplot, so no display is needed and the
# process-wide backend of whoever imports this module is left alone.
from matplotlib.figure import Figure

from riskexp.results import RESULTS_FILE, changes_results

log = logging.getLogger(__name__)

# the flat keys of every results.json that say which configuration a run had (override keys are added to them)
DEFAULT_GROUP_BY = ("model", "data", "algo", "variant", "kl_weight", "risk", "estimator", "risk_param", "alpha", "beta")
# what is averaged over: the only override allowed to differ within a row
AVERAGED_KEYS = ("seed",)
METRIC_PREFIXES = ("val/", "eval/", "ref_eval/")
INTERVAL_SUFFIXES = ("/lo", "/hi")  # K/lo, K/hi: the bootstrap interval of metric K
PLOT_METRICS = ("eval/reward_mean", "eval/kl", "eval/reward_cvar", "ref_eval/reward_mean", "ref_eval/kl")


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


def override_key(override: str) -> str:
    """The config key of a command-line override: `++optimizer.lr=1e-4` -> `optimizer.lr`."""
    return override.split("=", 1)[0].lstrip("+~")


def override_keys(df: pd.DataFrame) -> list[str]:
    """Every key overridden on the command line of some run, sorted, minus `seed` and keys that do not
    change results (results.NON_RESULT_KEYS)."""
    overrides = df["overrides"] if "overrides" in df else pd.Series(dtype=object)
    keys = {override_key(o) for run in overrides if isinstance(run, list) for o in run}
    return sorted(k for k in keys if k not in AVERAGED_KEYS and changes_results(k))


def group_keys(df: pd.DataFrame) -> list[str]:
    """DEFAULT_GROUP_BY, then the override keys (override_keys) not among them."""
    return [*DEFAULT_GROUP_BY, *(k for k in override_keys(df) if k not in DEFAULT_GROUP_BY)]


def summarize(
    df: pd.DataFrame, group_by: Sequence[str] | None = None, metrics: Sequence[str] | None = None
) -> pd.DataFrame:
    """Mean, sd (ddof=1, NaN for a single run) and run count of each metric per group.

    ``group_by`` defaults to ``group_keys(df)``. Columns: the group keys, ``n``, then ``<metric>_mean`` and
    ``<metric>_sd`` for each metric and for its interval bounds ``<metric>/lo``, ``<metric>/hi`` where runs
    have them; rows are sorted by the keys. A key missing from a run groups as "". Raises ValueError for
    unknown metrics.
    """
    group_by = group_keys(df) if group_by is None else list(group_by)
    available = numeric_columns(df)
    metrics = default_metrics(df) if metrics is None else list(metrics)
    unknown = [m for m in metrics if m not in available]
    if unknown:
        raise ValueError(f"unknown metric(s): {', '.join(unknown)}; available: {', '.join(available)}")
    bounds = [m + b for m in metrics for b in INTERVAL_SUFFIXES if m + b in available and m + b not in metrics]
    metrics += bounds

    # no keys at all: every run in one group
    keys = [key_column(df, g) for g in group_by] or [pd.Series(0, index=df.index, name=_ONE_GROUP)]
    grouped = df[metrics].groupby(keys, dropna=False, sort=False)
    stats = grouped.agg(["mean", "std"]) if metrics else pd.DataFrame(index=grouped.size().index)
    stats.columns = [f"{m}_{'sd' if stat == 'std' else stat}" for m, stat in stats.columns] if metrics else []
    summary = pd.concat([grouped.size().rename("n"), stats], axis=1).reset_index().drop(columns=_ONE_GROUP,
                                                                                         errors="ignore")
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


def _fmt_num(x: float, digits: int) -> str:
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.{digits}f}"


def _fmt_cell(row: dict, metric: str, digits: int) -> str:
    mean, sd = row[f"{metric}_mean"], row[f"{metric}_sd"]
    if pd.isna(mean):
        return "-"
    lo, hi = row.get(f"{metric}/lo_mean"), row.get(f"{metric}/hi_mean")
    if row["n"] == 1 and lo is not None and hi is not None and pd.notna(lo) and pd.notna(hi):
        return f"{_fmt_num(mean, digits)} [{_fmt_num(lo, digits)}, {_fmt_num(hi, digits)}]"
    if pd.isna(sd):  # a single run has no spread
        return _fmt_num(mean, digits)
    return f"{_fmt_num(mean, digits)} ± {_fmt_num(sd, digits)}"


def _is_bound(metric: str, metrics: Sequence[str]) -> bool:
    return metric.endswith(INTERVAL_SUFFIXES) and metric[:-3] in metrics


def to_markdown(summary: pd.DataFrame, metrics: Sequence[str] | None = None, digits: int = 3) -> str:
    """Markdown table of a ``summarize`` result: group keys, ``mean ± sd`` per metric (``mean [lo, hi]``
    for a single run with an interval), then ``n``.

    The group keys are the columns before ``n``; keys with one value over all rows are shown once above the
    table. ``metrics`` defaults to every metric in the summary except interval bounds shown in their cell.
    """
    all_keys = list(summary.columns[: summary.columns.get_loc("n")])
    constant = [k for k in all_keys if len(summary) > 1 and summary[k].nunique(dropna=False) == 1]
    keys = [k for k in all_keys if k not in constant]
    caption = ", ".join(f"{k}={_fmt_key(summary[k].iloc[0])}" for k in constant if summary[k].iloc[0] != "")
    if metrics is None:
        stems = [c.removesuffix("_mean") for c in summary.columns if c.endswith("_mean")]
        stems = [m for m in stems if f"{m}_sd" in summary.columns]
        metrics = [m for m in stems if not _is_bound(m, stems)]
    rows = summary.to_dict("records")
    cells = {
        **{k: [_fmt_key(row[k]) for row in rows] for k in keys},
        **{m: [_fmt_cell(row, m, digits) for row in rows] for m in metrics},
        "n": [str(int(row["n"])) for row in rows],
    }
    # a "|" inside a cell would end it
    table = pd.DataFrame({k.replace("|", r"\|"): [c.replace("|", r"\|") for c in v] for k, v in cells.items()})
    return (f"{caption}\n\n" if caption else "") + table.to_markdown(index=False, disable_numparse=True) + "\n"


def plot(data: pd.DataFrame, out_dir: str | Path, group_by: Sequence[str] | None = None) -> list[Path]:
    """Write ``reward_vs_kl.png`` and ``cvar_vs_alpha.png``; returns the paths written.

    ``data`` is either per-run (from ``collect``; summarised by ``group_by`` here, default ``group_keys``) or
    a ``summarize`` result. A plot whose metrics are absent is skipped with a note on stderr.
    """
    if "n" in data.columns and "run_dir" not in data.columns:
        summary = data
    else:
        present = numeric_columns(data)
        summary = summarize(data, group_by, [m for m in PLOT_METRICS if m in present])

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in (("reward_vs_kl.png", _draw_reward_vs_kl), ("cvar_vs_alpha.png", _draw_cvar_vs_alpha)):
        fig = Figure(figsize=(7, 5), layout="constrained")
        skip_reason = draw(fig.add_subplot(), summary)
        if skip_reason:
            print(f"note: skipping {name}: {skip_reason}", file=sys.stderr)
            continue
        fig.savefig(out_dir / name, dpi=120)
        written.append(out_dir / name)
    return written


def _num(summary: pd.DataFrame, col: str) -> pd.Series:
    if col not in summary:
        return pd.Series(float("nan"), index=summary.index)
    return pd.to_numeric(summary[col], errors="coerce")


def _describe(row: dict, keys: Sequence[str]) -> str:
    """Legend text such as "ra_dpo cvar beta=0.5": string values speak for themselves, numbers get a name."""
    parts = [
        _fmt_key(row[k]) if isinstance(row[k], str) else f"{k}={_fmt_key(row[k])}"
        for k in keys
        if row.get(k, "") != ""
    ]
    return " ".join(parts)


def _varying_keys(summary: pd.DataFrame, exclude: Sequence[str] = ()) -> list[str]:
    """The group keys (columns before ``n``) that take more than one value, minus ``exclude``."""
    keys = summary.columns[: summary.columns.get_loc("n")]
    return [k for k in keys if k not in exclude and summary[k].nunique(dropna=False) > 1]


def _labels(summary: pd.DataFrame, keys: Sequence[str], default: str = "") -> pd.Series:
    return pd.Series([_describe(r, keys) or default for r in summary.to_dict("records")], index=summary.index)


def _draw_reward_vs_kl(ax, s: pd.DataFrame) -> str | None:
    x, y = _num(s, "eval/kl_mean"), _num(s, "eval/reward_mean_mean")
    ok = x.notna() & y.notna()
    if not ok.any():
        return "no eval/reward_mean and eval/kl in the results"
    xerr, yerr = _num(s, "eval/kl_sd").fillna(0), _num(s, "eval/reward_mean_sd").fillna(0)
    labels = _labels(s, ("algo", "risk"), default="all runs")
    for label in labels[ok].unique():  # one colour (and legend entry) per algo+risk
        sel = ok & (labels == label)
        ax.errorbar(x[sel], y[sel], xerr=xerr[sel], yerr=yerr[sel], fmt="o", capsize=3, label=label)
    # The legend cannot tell apart the points of one algo+risk, so label each with the other keys that vary.
    points = _labels(s, _varying_keys(s, exclude=("algo", "risk")))
    for i in s.index[ok]:
        ax.annotate(points[i], (x[i], y[i]), xytext=(4, 4), textcoords="offset points", fontsize=7)

    ref_y = _num(s, "ref_eval/reward_mean_mean")
    ref = ref_y.notna()
    if ref.any():
        # The reference policy has zero KL to itself, so a missing ref_eval/kl means 0.
        ref_x = _num(s, "ref_eval/kl_mean").fillna(0.0)
        ax.scatter(
            ref_x[ref], ref_y[ref], marker="*", s=160, color="black", zorder=3, label="reference model"
        )
    ax.set(xlabel="eval/kl", ylabel="eval/reward_mean", title="Reward vs KL to the reference")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return None


def _draw_cvar_vs_alpha(ax, s: pd.DataFrame) -> str | None:
    alpha, y = _num(s, "alpha"), _num(s, "eval/reward_cvar_mean")
    ok = alpha.notna() & y.notna()
    if not ok.any():
        return "no eval/reward_cvar with a numeric alpha in the results"
    yerr = _num(s, "eval/reward_cvar_sd").fillna(0)
    # a line is one configuration with only alpha varying
    labels = _labels(s, _varying_keys(s, exclude=("alpha",)), default="all runs")
    for label in labels[ok].unique():
        idx = alpha[ok & (labels == label)].sort_values().index
        ax.errorbar(alpha[idx], y[idx], yerr=yerr[idx], marker="o", capsize=3, label=label)
    ax.set(xlabel="alpha", ylabel="eval/reward_cvar", title="Reward CVaR vs alpha")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return None


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
    table = to_markdown(summary, args.metrics or headline_metrics(summary))
    (out / "report.md").write_text(table)
    summary.to_csv(out / "report.csv", index=False)
    print(table, end="")
    for path in [out / "report.md", out / "report.csv", *plot(runs, out, args.group_by)]:
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
