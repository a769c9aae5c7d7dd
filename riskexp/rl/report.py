"""The RL part of ``riskexp report``: RA-RLHF's Table 2 and its reward-vs-prompt-quantile figure, for the runs
that evaluated a prompt tail (``eval/prompt_tail/reward_mean``: the task has a ``prompt_scorer`` and
``eval.prompt_tail_threshold`` is set; see ``riskexp.run.evaluate_task``).

- ``rl.md`` (and ``rl.csv``, unrounded): one row for the reference model (the SFT or base model the runs start
  from, ``ref_eval/*``, one evaluation per seed; one row per model and data where those vary), then one per
  trained configuration (the report's groups, ``riskexp.report.summarize``: seeds averaged), with the paper's
  columns, Reward (``eval/reward_mean``), Tail (``eval/prompt_tail/reward_mean``: the mean reward on the prompts
  whose own score is at or below the threshold) and Perplexity (``eval/perplexity``, on held-out human text),
  plus the KL to the reference and the reward CVaR, each as mean ± sd (n) over seeds.
- ``quantile_curve.png``: for each configuration the mean over seeds of its runs' policy curves (their
  ``quantile_curve.csv``: the mean reward over the worst q% of prompts by prompt score), shaded ± sd where n > 1,
  and the reference's curve.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from riskexp import report as base
from riskexp.evaluation import QUANTILE_CURVE_CSV, QUANTILE_CURVE_PNG

TABLE_FILE, CSV_FILE, FIGURE_FILE = "rl.md", "rl.csv", QUANTILE_CURVE_PNG
TAIL = "eval/prompt_tail/reward_mean"
# (column id, header, metric name under a model's prefix): Table 2's columns, then the KL and the reward CVaR
COLUMNS = (
    ("reward", "Reward ↑", "reward_mean"),
    ("tail", "Tail ↑", "prompt_tail/reward_mean"),
    ("perplexity", "Perplexity ↓", "perplexity"),
    ("kl", "KL to reference", "kl"),
    ("reward_cvar", "reward CVaR", "reward_cvar"),
)
REFERENCE_LABEL = "reference (SFT / base)"


def rl_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs among ``collect``'s rows that have a prompt-tail reward (``eval/prompt_tail/reward_mean``)."""
    return runs[base._num(runs, TAIL).notna()]


def _identity(values: Sequence) -> tuple[str, ...]:
    return tuple("" if base._missing(v) else base._fmt_key(v) for v in values)


def _members(runs: pd.DataFrame, summary: pd.DataFrame, group_by: Sequence[str]) -> list[pd.DataFrame]:
    """The runs behind each row of ``summarize(runs, group_by)``: the same repeats left out, the same keys."""
    kept = base.drop_repeats(runs, group_by, quiet=True)
    identities = [_identity(r.values()) for r in base.applicable_keys(kept, group_by).to_dict("records")]
    return [kept[[i == _identity([row[k] for k in group_by]) for i in identities]]
            for row in summary.to_dict("records")]


def _reference_groups(runs: pd.DataFrame) -> tuple[list[str], list[pd.DataFrame]]:
    """The keys that change the reference model or its evaluation and vary among the runs (model, data, eval.*),
    and the runs of each of their values, one per seed (the first by run_dir: a reference evaluated twice at one
    seed is one evaluation)."""
    ordered = runs.sort_values("run_dir", kind="stable") if "run_dir" in runs else runs
    keys = [k for k in base.group_keys(ordered) if base.knob(k) in base.REFERENCE_KNOBS]
    values = base.applicable_keys(ordered, keys)
    keys = [k for k in keys if len(base._values(values[k])) > 1]
    groups: dict[tuple, list] = {}
    seen = set()
    for index, row, seed in zip(ordered.index, values.to_dict("records"), base.key_column(ordered, "seed")):
        group = _identity([row[k] for k in keys])
        if (group, _identity([seed])) not in seen:
            seen.add((group, _identity([seed])))
            groups.setdefault(group, []).append(index)
    return keys, [ordered.loc[members] for members in groups.values()]


def _record(label: str, kind: str, row: dict, prefix: str) -> dict:
    """A table row from a ``summarize`` row: each column's mean, sd, lo, hi (a single run's interval), n."""
    record = {"model": label, "kind": kind, "n": int(row["n"])}
    for column_id, _, name in COLUMNS:
        metric = prefix + name
        count = base._count(row, metric) if f"{metric}_mean" in row else 0
        record |= {f"{column_id}_mean": row.get(f"{metric}_mean", np.nan),
                   f"{column_id}_sd": row.get(f"{metric}_sd", np.nan),
                   f"{column_id}_lo": row.get(f"{metric}/lo_mean", np.nan),
                   f"{column_id}_hi": row.get(f"{metric}/hi_mean", np.nan),
                   f"{column_id}_n": count}
    return record


def _metrics(runs: pd.DataFrame, prefix: str) -> list[str]:
    present = base.numeric_columns(runs)
    return [prefix + name for _, _, name in COLUMNS if prefix + name in present]


def build(runs: pd.DataFrame) -> tuple[pd.DataFrame, dict] | None:
    """(the table's numbers, what the caption and figure need), or None where no run has a prompt tail.

    The numbers: one row per model, ``model`` (its label), ``kind`` (reference or policy), ``n``, the key columns
    that tell the configurations apart, then ``<column>_mean|sd|lo|hi|n`` for each of COLUMNS."""
    selected = rl_runs(runs)
    if selected.empty:
        return None
    records, curves = [], {}
    ref_keys, ref_groups = _reference_groups(selected)
    for group in ref_groups:
        metrics = _metrics(group, "ref_eval/")
        if not metrics:
            continue
        (row,) = base.summarize(group, [], metrics, quiet=True).to_dict("records")
        where = base._describe(group.iloc[0].to_dict(), ref_keys) if ref_keys else ""
        label = f"{REFERENCE_LABEL[:-1]}, {where})" if where else REFERENCE_LABEL
        records.append(_record(label, "reference", row, "ref_eval/"))
        curves[label] = _curves(group, "reference")

    group_by = base.group_keys(selected)
    summary = base.summarize(selected, group_by, _metrics(selected, "eval/"), quiet=True)
    varying, constant = base.table_keys(summary)
    if len(summary) == 1:  # every key has its one value: the row is named by its algo, the rest in the caption
        varying, constant = [k for k in varying if k == "algo"], [k for k in varying if k != "algo"]
    for row, members in zip(summary.to_dict("records"), _members(selected, summary, group_by)):
        label = base._describe(row, varying) or "policy"
        records.append(_record(label, "policy", row, "eval/") | {k: row[k] for k in varying})
        curves[label] = _curves(members, "policy")
    info = base.sweep_info(selected)
    context = {
        "info": info, "caption": base.caption(summary, constant),
        "keys": varying, "curves": curves,
        "threshold": base._shared(selected, "eval_prompt_tail_threshold", "eval.prompt_tail_threshold"),
        "tail_prompts": base._shared(selected, "eval_prompts/prompt_tail"),
        "heldout_texts": base._shared(selected, "eval_heldout_texts"),
    }
    return pd.DataFrame(records), context


def _curves(runs: pd.DataFrame, model: str) -> list[np.ndarray]:
    """The ``model`` curve (100 mean rewards, q = 1..100) of each run that wrote a quantile_curve.csv."""
    out = []
    for directory in runs.get("run_dir", pd.Series(dtype=object)):
        file = Path(directory) / QUANTILE_CURVE_CSV
        if not file.is_file():
            continue
        table = pd.read_csv(file)
        rows = table[table["model"] == model].sort_values("q")
        if len(rows):
            out.append(rows["mean_reward"].to_numpy(dtype=float))
    return out


def _headers(info: base.SweepInfo) -> dict[str, str]:
    headers = {column_id: header for column_id, header, _ in COLUMNS}
    label = base.metric_label("eval/reward_cvar", info.eval_alpha)
    headers["reward_cvar"] = label if label != "eval/reward_cvar" else headers["reward_cvar"]
    return headers


def _cell(row: dict, column_id: str, digits: int = 3) -> str:
    def value(key: str):
        v = row.get(f"{column_id}_{key}")
        return None if v is None or pd.isna(v) else float(v)

    return base.format_cell(value("mean"), value("sd"), int(row[f"{column_id}_n"]), value("lo"), value("hi"),
                            digits)


def _shown(table: pd.DataFrame) -> list[str]:
    """The columns some row has a value of."""
    return [c for c, _, _ in COLUMNS if base._num(table, f"{c}_mean").notna().any()]


def caption(context: dict) -> str:
    info = context["info"]
    level = f"{info.confidence:.0%} " if info.confidence else ""
    counts = (f"{info.eval_prompts} prompts × {info.samples_per_prompt} samples"
              if info.eval_prompts and info.samples_per_prompt else "")
    threshold = context["threshold"]
    tail = f"at or below {base._fmt_key(threshold)}" if threshold is not None else "at or below the threshold"
    tail_counts = (f"{context['tail_prompts']} prompts × {info.samples_per_prompt} samples"
                   if context["tail_prompts"] and info.samples_per_prompt else "")
    texts = f"{context['heldout_texts']} held-out texts" if context["heldout_texts"] else "held-out texts"
    lines = [
        f"{info.name + ': ' if info.name else ''}RA-RLHF's Table 2: the reference model and each trained "
        f"configuration{' (' + context['caption'] + ')' if context['caption'] else ''}.",
        f"Reward: mean completion reward (eval/reward_mean{', ' + counts if counts else ''}). Tail: mean reward "
        f"over the prompts whose own score is {tail} (eval/prompt_tail/reward_mean"
        f"{', ' + tail_counts if tail_counts else ''}). Perplexity: of {texts} (eval/perplexity). KL: "
        "KL(policy ‖ reference) on the policy's samples.",
        f"Cells: mean ± sd over seeds (n ≥ 2), else the run's value [{level}bootstrap interval]; (n): seeds.",
    ]
    return "\n".join(lines)


def to_markdown(table: pd.DataFrame, context: dict, digits: int = 3) -> str:
    """``rl.md``: the caption, then model | each column with a value as ``format_cell``."""
    headers = _headers(context["info"])
    records = table.to_dict("records")
    cells = {"model": [r["model"] for r in records]}
    cells |= {headers[c]: [_cell(r, c, digits) for r in records] for c in _shown(table)}
    frame = pd.DataFrame({k.replace("|", r"\|"): [c.replace("|", r"\|") for c in v] for k, v in cells.items()})
    return f"{caption(context)}\n\n{frame.to_markdown(index=False, disable_numparse=True)}\n"


def csv_table(table: pd.DataFrame, context: dict) -> pd.DataFrame:
    """``rl.csv``: model, kind, n, the configurations' key columns, each shown column's mean, sd, lo, hi, n."""
    keys = [k for k in context["keys"] if k in table]
    columns = ["model", "kind", "n", *keys, *(f"{c}_{s}" for c in _shown(table) for s in ("mean", "sd", "lo", "hi",
                                                                                          "n"))]
    return table[columns]


def quantile_figure(curves: dict[str, tuple], title: str = "", note: str = "") -> Figure:
    """Mean reward against the prompt quantile: ``curves`` is label -> (q (100,), mean reward (100,), sd (100,)
    or None), a line each, shaded ± sd where given; a label starting with "reference" is drawn black, dashed."""
    fig = Figure(figsize=(8, 5), dpi=150, layout="constrained")
    FigureCanvasAgg(fig)  # renders without pyplot
    ax = fig.add_subplot()
    drawn = 0
    for label, (q, mean, sd) in curves.items():
        q, mean = np.asarray(q, dtype=float), np.asarray(mean, dtype=float)
        reference = label.startswith("reference")
        colour = "black" if reference else f"C{drawn % 10}"
        drawn += not reference
        ax.plot(q, mean, color=colour, ls="--" if reference else "-", lw=1.5, label=label,
                zorder=3 if reference else 2)
        if sd is not None:
            sd = np.asarray(sd, dtype=float)
            ax.fill_between(q, mean - sd, mean + sd, color=colour, alpha=0.15, lw=0)
    ax.set(xlabel="prompt quantile q (%): the worst q% of prompts by prompt score",
           ylabel="mean completion reward", xlim=(0, 100))
    if title:
        fig.suptitle(textwrap.fill(title, 100), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, fontsize=8,
              title=note or None, title_fontsize=7, alignment="left")
    return fig


def report_figure(context: dict) -> Figure | None:
    """``quantile_curve.png``: each model's curve averaged over its runs (seeds), ± sd where several; None where
    no run wrote a quantile_curve.csv."""
    lines, several = {}, False
    for label, curves in context["curves"].items():
        if not curves or len({len(c) for c in curves}) != 1:
            continue
        stacked = np.vstack(curves)
        several |= len(curves) > 1
        lines[f"{label} (n={len(curves)})"] = (np.arange(1, stacked.shape[1] + 1), stacked.mean(0),
                                               stacked.std(0, ddof=1) if len(curves) > 1 else None)
    if not any(not label.startswith("reference") for label in lines):
        return None
    name = context["info"].name
    title = f"{name + ': ' if name else ''}mean reward over the worst q% of prompts (RA-RLHF's quantile curve)"
    return quantile_figure(lines, title, "shaded: ± sd over seeds" if several else "")


def write_rl(runs: pd.DataFrame, out: str | Path) -> list[Path]:
    """Write ``rl.md``, ``rl.csv`` and ``quantile_curve.png`` for the runs among ``collect``'s rows that have a
    prompt tail into ``out``; returns the paths written ([] where no run has one)."""
    built = build(runs)
    if built is None:
        return []
    table, context = built
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / TABLE_FILE).write_text(to_markdown(table, context))
    csv_table(table, context).to_csv(out / CSV_FILE, index=False)
    written = [out / TABLE_FILE, out / CSV_FILE]
    fig = report_figure(context)
    if fig is None:
        print(f"note: skipping {FIGURE_FILE}: no run has a policy curve in its {QUANTILE_CURVE_CSV}", file=sys.stderr)
    else:
        fig.savefig(out / FIGURE_FILE)
        written.append(out / FIGURE_FILE)
    return written
