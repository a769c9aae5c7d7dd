"""Summarise and plot the ``results.json`` files that training runs write.

    python -m riskexp.report RUN_OR_SWEEP_DIR [MORE_DIRS...] [--out DIR] [--metrics m1,m2] [--group-by k1,k2]

Runs are grouped by (algo, variant, risk, alpha, beta) and every metric is reported as mean ± sd over
the runs (seeds) of a group. ``report.md``, ``report.csv``, ``reward_vs_kl.png`` and ``cvar_vs_alpha.png``
are written to the output directory (default: the first directory given).
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

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
# every key that changes a run's configuration, so that only seeds are averaged; constant keys are shown once
# above the table rather than in every row
DEFAULT_GROUP_BY = ("model", "data", "algo", "variant", "kl_weight", "risk", "estimator", "risk_param", "alpha", "beta")
METRIC_PREFIXES = ("val/", "eval/", "ref_eval/")
PLOT_METRICS = ("eval/reward_mean", "eval/kl", "eval/reward_cvar", "ref_eval/reward_mean", "ref_eval/kl")
# A line of the CVaR plot is one configuration with only alpha varying.
LINE_KEYS = ("algo", "variant", "risk", "beta")


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


def summarize(
    df: pd.DataFrame, group_by: Sequence[str] = DEFAULT_GROUP_BY, metrics: Sequence[str] | None = None
) -> pd.DataFrame:
    """Mean, sd (ddof=1, NaN for a single run) and run count of each metric per group.

    Columns: the group keys, ``n``, then ``<metric>_mean`` and ``<metric>_sd`` for each metric; rows are
    sorted by the keys. A key missing from a run groups as "". Raises ValueError for unknown metrics.
    """
    group_by = list(group_by)
    available = numeric_columns(df)
    metrics = default_metrics(df) if metrics is None else list(metrics)
    unknown = [m for m in metrics if m not in available]
    if unknown:
        raise ValueError(f"unknown metric(s): {', '.join(unknown)}; available: {', '.join(available)}")

    keys = pd.DataFrame({g: _key_column(df, g) for g in group_by}, index=df.index)
    groups: dict[tuple, list] = {}
    for idx, key in zip(df.index, keys.itertuples(index=False, name=None)):
        groups.setdefault(key, []).append(idx)

    rows = []
    for key in sorted(groups, key=_sort_key):
        part = df.loc[groups[key], metrics]
        row = {**dict(zip(group_by, key)), "n": len(part)}
        for m in metrics:
            row[f"{m}_mean"] = part[m].mean()
            row[f"{m}_sd"] = part[m].std(ddof=1)
        rows.append(row)
    columns = [*group_by, "n", *(f"{m}_{stat}" for m in metrics for stat in ("mean", "sd"))]
    return pd.DataFrame(rows, columns=columns)


def _key_column(df: pd.DataFrame, name: str) -> pd.Series:
    if name not in df:
        return pd.Series("", index=df.index, dtype=object)
    col = df[name]
    # pandas turns JSON ints into floats as soon as one run lacks the key; show variant 1, not 1.0.
    if pd.api.types.is_float_dtype(col) and (col.dropna() % 1 == 0).all():
        col = col.astype("Int64")
    return col.astype(object).where(col.notna(), "")


def _sort_key(key: tuple) -> tuple:
    # Numbers sort numerically, strings alphabetically, missing ("") last, without comparing across types.
    return tuple((2, "") if v == "" else (0, v) if isinstance(v, numbers.Real) else (1, str(v)) for v in key)


def _fmt_key(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _fmt_num(x: float, digits: int) -> str:
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.{digits}f}"


def _fmt_cell(mean: float, sd: float, digits: int) -> str:
    if pd.isna(mean):
        return "-"
    if pd.isna(sd):  # a single run has no spread
        return _fmt_num(mean, digits)
    return f"{_fmt_num(mean, digits)} ± {_fmt_num(sd, digits)}"


def to_markdown(summary: pd.DataFrame, metrics: Sequence[str] | None = None, digits: int = 3) -> str:
    """Markdown table of a ``summarize`` result: group keys, ``mean ± sd`` per metric, then ``n``.

    The group keys are the columns before ``n``; ``metrics`` defaults to every metric in the summary.
    """
    all_keys = list(summary.columns[: summary.columns.get_loc("n")])
    constant = [k for k in all_keys if len(summary) > 1 and summary[k].nunique(dropna=False) == 1]
    keys = [k for k in all_keys if k not in constant]
    caption = ", ".join(f"{k}={_fmt_key(summary[k].iloc[0])}" for k in constant if summary[k].iloc[0] != "")
    if metrics is None:
        stems = [c.removesuffix("_mean") for c in summary.columns if c.endswith("_mean")]
        metrics = [m for m in stems if f"{m}_sd" in summary.columns]
    header = [*keys, *metrics, "n"]
    body = [
        [
            *(_fmt_key(row[k]) for k in keys),
            *(_fmt_cell(row[f"{m}_mean"], row[f"{m}_sd"], digits) for m in metrics),
            str(int(row["n"])),
        ]
        for row in summary.to_dict("records")
    ]
    table = [[cell.replace("|", r"\|") for cell in line] for line in [header, *body]]
    widths = [max(3, *(len(line[i]) for line in table)) for i in range(len(header))]

    def fmt(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    lines = [fmt(table[0]), fmt(["-" * w for w in widths]), *map(fmt, table[1:])]
    return (f"{caption}\n\n" if caption else "") + "\n".join(lines) + "\n"


def plot(data: pd.DataFrame, out_dir: str | Path, group_by: Sequence[str] = DEFAULT_GROUP_BY) -> list[Path]:
    """Write ``reward_vs_kl.png`` and ``cvar_vs_alpha.png``; returns the paths written.

    ``data`` is either per-run (from ``collect``; summarised by ``group_by`` here) or a ``summarize``
    result. A plot whose metrics are absent is skipped with a note on stderr.
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
    # The legend cannot tell apart the points of one algo+risk, so label each with its alpha and beta.
    points = _labels(s, ("alpha", "beta"))
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
    labels = _labels(s, LINE_KEYS, default="all runs")
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
        default=list(DEFAULT_GROUP_BY),
        help=f"comma-separated group keys (default: {','.join(DEFAULT_GROUP_BY)})",
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
