"""The stepwise part of ``riskexp report``: SACPO / RSA step-2 runs and P-SACPO merges against the SFT model.

A step-2 run (``step: 2`` in results.json) evaluates three models on the same held-out prompts: the SFT model
(the reference, ``ref_eval/*``), its step-1 helpfulness-only policy (``step1_eval/*``) and its own policy
(``eval/*``); a merge run (``kind: "merge"``) the reference and the merged policy. From the runs of a sweep:

- ``stepwise.md`` (and ``stepwise.csv``, unrounded): one row for the SFT model, one per helpfulness-only model
  (step-1 directories that differ only in the seed are one row), one per step-2 configuration (``λ=4``, ``rsa
  cvar λ=4``) or merge (``q=0.5``), averaged over seeds; columns: the win rates against SFT by the reward
  (helpfulness, on the benign prompts where the runs have them) and by the cost (harmlessness, on the harmful
  prompts), the Elo ratings by each (``riskexp.elo``, from every run's ``samples.jsonl``, pooled), reward and
  cost mean, cost CVaR, the unsafe rate (on the harmful prompts) and the KL to the reference.
- ``win_rates.png``: the papers' figure, harmlessness against helpfulness win rate vs SFT, SFT at (0.5, 0.5).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from riskexp import elo
from riskexp import report as base
from riskexp.files import read_jsonl
from riskexp.formatting import format_estimate
from riskexp.results import SAMPLES_FILE

TABLE_FILE, CSV_FILE, FIGURE_FILE = "stepwise.md", "stepwise.csv", "win_rates.png"
REFERENCE = "reference"  # the Elo name of the SFT model, and the anchor
# where each model of a run keeps its metrics, and how samples.jsonl names it
PREFIXES = {"reference": "ref_eval/", "step1": "step1_eval/", "policy": "eval/"}
# the keys a configuration is told apart by besides the report's group keys; override keys restating them
STEPWISE_KEYS = ("lam", "q", "kind", "merge_a", "merge_b")
RESTATED = ("algo.lam", "merge.q", "merge.a", "merge.b")
SYMBOLS = {**base.KEY_SYMBOLS, "lam": "λ", "merge_a": "a", "merge_b": "b"}


@dataclass(frozen=True)
class Column:
    """A metric of the table: its id (CSV), header, and the metric names under a model's prefix to read, the
    first that every run has winning (with the prompts it is on); ``reference`` is the SFT model's value where
    its runs do not record one (its win rate against itself, its KL to itself)."""

    id: str
    header: str
    candidates: tuple[tuple[str, str], ...]
    reference: float | None = None


COLUMNS = (
    Column("helpful_win_rate", "helpfulness win rate vs SFT",
           (("benign/reward_win_rate", "benign"), ("reward_win_rate", "all")), reference=0.5),
    Column("harmless_win_rate", "harmlessness win rate vs SFT",
           (("harmful/cost_win_rate", "harmful"), ("cost_win_rate", "all")), reference=0.5),
    Column("reward_mean", "reward mean", (("reward_mean", "all"),)),
    Column("cost_mean", "cost mean", (("harmful/cost_mean", "harmful"), ("cost_mean", "all"))),
    Column("cost_cvar", "cost CVaR", (("harmful/cost_cvar", "harmful"), ("cost_cvar", "all"))),
    Column("unsafe_rate", "unsafe rate", (("harmful/cost_rate", "harmful"), ("cost_rate", "all"))),
    Column("kl", "KL to reference", (("kl", "all"),), reference=0.0),
)
ELO_COLUMNS = (("helpful_elo", "helpfulness Elo", "reward"), ("harmless_elo", "harmlessness Elo", "cost"))
# the prompts each judge's battles are on where samples.jsonl names prompt subsets (SACPO: helpfulness prompts
# for the helpfulness judge, red-team prompts for the harmlessness judge), else all
ELO_PROMPTS = {"reward": "benign", "cost": "harmful"}
KIND_ORDER = ("reference", "step1", "step2", "merge")


@dataclass(frozen=True)
class Entry:
    """A row of the table: what it is (``kind``: reference, step1, step2 or merge), the runs whose metrics under
    ``prefix`` it averages (one per seed), the Elo names of its models, and for a configuration its family (the
    legend entry), its point label (``λ=4``) and x (lambda or q) along the family's line."""

    label: str
    kind: str
    runs: pd.DataFrame
    prefix: str
    elo_models: tuple[str, ...]
    family: str = ""
    point: str = ""
    x: float = math.nan


def stepwise_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The step-2 runs (``step == 2``) and merge runs (``kind == "merge"``) of ``collect``'s rows, sorted by
    run_dir, runs that repeat another's training left out (``report.drop_repeats``, quietly)."""
    step = base._num(runs, "step")
    kind = runs["kind"] if "kind" in runs else pd.Series(None, index=runs.index, dtype=object)
    selected = runs[(step == 2) | (kind == "merge")]
    if selected.empty:
        return selected
    return base.drop_repeats(selected, configuration_keys(selected), quiet=True)


def configuration_keys(runs: pd.DataFrame) -> list[str]:
    """The report's group keys (minus override keys that restate a flat stepwise key) and STEPWISE_KEYS."""
    return list(dict.fromkeys([*(k for k in base.group_keys(runs) if k not in RESTATED), *STEPWISE_KEYS]))


def describe(row: dict, keys: Sequence[str]) -> str:
    """``rsa cvar λ=4``: string values as they are, numbers named (λ for lam), merge sources by their run."""
    parts = []
    for key in keys:
        value = row.get(key)
        if base._missing(value):
            continue
        if key in ("merge_a", "merge_b"):
            path = Path(str(value))
            parts.append(f"{SYMBOLS[key]}={path.parent.name if path.name == 'policy' else path.name}")
        elif isinstance(value, str):
            parts.append(value)
        else:
            name = base.RISK_PARAMETERS.get(row.get("risk"), key) if key == "risk_param" else SYMBOLS.get(key, key)
            parts.append(f"{name}={base._fmt_key(value)}")
    return " ".join(parts)


def configurations(runs: pd.DataFrame) -> pd.DataFrame:
    """Each stepwise run's configuration (rows as ``runs``): kind (step2 or merge), label (``sacpo λ=1``,
    ``q=0.5``; ``merge q=0.5`` among step-2 runs), family (what varies besides lambda or q; else the algo, or
    ``merge``), point (``λ=1``) and x (lambda or q)."""
    keys = configuration_keys(runs)
    values = base.applicable_keys(runs, keys)
    shown = values.astype(object).where(values.notna(), "").drop_duplicates().assign(n=1)
    # a single configuration has no key that varies (table_keys shows every key of a single row)
    varying = [k for k in base.table_keys(shown)[0] if k not in STEPWISE_KEYS[:3]] if len(shown) > 1 else []
    merge = (values["kind"] == "merge").to_numpy()
    both = merge.any() and not merge.all()
    rows = []
    for is_merge, row in zip(merge, values.to_dict("records")):
        family = describe(row, varying)
        point = describe(row, ["q"] if is_merge else ["lam"])
        prefix = "merge" if is_merge and both else ""
        rows.append({
            "kind": "merge" if is_merge else "step2",
            "label": " ".join(p for p in (prefix, family, point) if p) or "policy",
            "family": " ".join(p for p in (prefix or ("merge" if is_merge else ""), family) if p)
                      or (row.get("algo") or "step 2"),
            "point": point,
            "x": _number(row.get("q" if is_merge else "lam")),
        })  # fmt: skip
    return pd.DataFrame(rows, index=runs.index)


def _number(value) -> float:
    """A key's value as a float, NaN where it is missing or not a number."""
    try:
        return math.nan if base._missing(value) else float(value)
    except (TypeError, ValueError):
        return math.nan


def _one_per_seed(runs: pd.DataFrame) -> pd.DataFrame:
    """The first run (by run_dir) of each seed: evaluations of one model at one seed are one evaluation."""
    seeds = base.key_column(runs, "seed").map(lambda v: None if base._missing(v) else base._fmt_key(v))
    return runs[~seeds.duplicated()]


def entries(runs: pd.DataFrame) -> list[Entry]:
    """The table's rows for ``stepwise_runs``: the SFT model, each helpfulness-only model, each configuration
    (step 2 before merges, by family, then by lambda or q)."""
    configs = configurations(runs)
    rows = [Entry("SFT (reference)", "reference", _one_per_seed(runs), PREFIXES["reference"], (REFERENCE,))]
    rows += step1_entries(runs, configs)
    ordered = configs.assign(rank=configs["kind"].map(KIND_ORDER.index)).sort_values(
        ["rank", "family", "x", "label"], kind="stable")
    for label in dict.fromkeys(ordered["label"]):
        members = ordered[ordered["label"] == label]
        first = members.iloc[0]
        chosen = runs.loc[members.index]
        rows.append(Entry(label, first["kind"], chosen, PREFIXES["policy"],
                          tuple(f"policy:{d}" for d in chosen["run_dir"]), first["family"], first["point"],
                          float(first["x"])))
    return rows


def step1_entries(runs: pd.DataFrame, configs: pd.DataFrame) -> list[Entry]:
    """One row per helpfulness-only model: the step-1 directories of the step-2 runs (each evaluated by its
    first run), those used by the same configurations (the seeds of one step 1) in one row, labelled by what
    tells the rows apart (``helpfulness only (step 1, β=0.1)``)."""
    if "step1_dir" not in runs:
        return []
    step2 = runs[(configs["kind"] == "step2") & runs["step1_dir"].notna()]
    if step2.empty:
        return []
    users = configs.loc[step2.index].groupby(step2["step1_dir"].astype(str), sort=False)["label"].agg(
        lambda labels: frozenset(labels))
    groups: dict[frozenset, list[str]] = {}
    for directory, labels in users.items():
        groups.setdefault(labels, []).append(directory)
    keys = configuration_keys(runs)
    values = base.applicable_keys(step2, keys)
    texts = _telling_apart([values.loc[step2.index[step2["step1_dir"].astype(str).isin(dirs)]] for dirs in
                            groups.values()], [k for k in keys if k not in STEPWISE_KEYS])
    rows = []
    for i, (dirs, text) in enumerate(zip(groups.values(), texts)):
        if not text and len(groups) > 1:
            text = f"#{i + 1}"
        first = step2[~step2["step1_dir"].astype(str).duplicated() & step2["step1_dir"].astype(str).isin(dirs)]
        rows.append(Entry(f"helpfulness only (step 1{', ' + text if text else ''})", "step1", first,
                          PREFIXES["step1"], tuple(f"step1:{d}" for d in dirs)))
    return rows


def _telling_apart(groups: Sequence[pd.DataFrame], keys: Sequence[str]) -> list[str]:
    """For groups of runs' key values, the text of the keys each group has one value of and the groups differ
    in (``β=0.1``), one per group; empty where one group or nothing tells them apart."""
    if len(groups) < 2:
        return [""] * len(groups)
    single = [{k: g[k].iloc[0] for k in keys if g[k].map(base._fmt_key).nunique() == 1} for g in groups]
    telling = [k for k in keys if all(k in s for s in single)
               and len({base._fmt_key(s[k]) for s in single}) > 1]
    return [describe(s, telling) for s in single]


def choose_metric(runs: pd.DataFrame, column: Column) -> tuple[str, str] | None:
    """(metric name under a prefix, the prompts it is on) for a column: the first candidate every run has
    under ``eval/``, else the first some run has, else None."""
    for need_all in (True, False):
        for name, prompts in column.candidates:
            present = base._num(runs, f"eval/{name}").notna()
            if (present.all() if need_all else present.any()):
                return name, prompts
    return None


def estimate(rows: pd.DataFrame, key: str) -> dict[str, float]:
    """``mean``, ``sd`` (ddof=1, over rows: NaN for one), ``lo``, ``hi`` (one row's bootstrap bounds ``key/lo``,
    ``key/hi``) and ``n`` (rows with a value) of a metric over rows."""
    values = base._num(rows, key)
    present = values.dropna()
    if present.empty:
        return {"mean": math.nan, "sd": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}
    if len(present) >= 2:
        return {"mean": present.mean(), "sd": present.std(ddof=1), "lo": math.nan, "hi": math.nan,
                "n": len(present)}
    i = present.index[0]
    return {"mean": present[i], "sd": math.nan, "lo": base._num(rows, f"{key}/lo")[i],
            "hi": base._num(rows, f"{key}/hi")[i], "n": 1}


def pooled_samples(runs: pd.DataFrame) -> pd.DataFrame | None:
    """Every distinct model's completions from the runs' samples.jsonl, ``model`` renamed to its Elo name:
    ``reference`` once (from the first run), ``step1:<step1_dir>`` once per step-1 directory, ``policy:<run_dir>``
    for each run. None, with one note on stderr, where some run has no samples.jsonl. ValueError for a row of
    a model samples.jsonl does not name (PREFIXES), or step-1 rows in a run without ``step1_dir``."""
    files = [Path(d) / SAMPLES_FILE for d in runs["run_dir"]]
    missing = [f for f in files if not f.is_file()]
    if missing:
        print(f"note: {len(missing)} of {len(files)} stepwise runs have no {SAMPLES_FILE} (e.g. {missing[0]}): "
              "the Elo columns are left out", file=sys.stderr)
        return None
    frames, seen = [], set()
    for file, run in zip(files, runs.to_dict("records")):
        rows = pd.DataFrame(read_jsonl(file))
        if rows.empty:
            continue
        step1 = run.get("step1_dir")
        names = {"reference": REFERENCE, "policy": f"policy:{run['run_dir']}",
                 **({"step1": f"step1:{step1}"} if not base._missing(step1) else {})}
        unknown = sorted(set(rows["model"]) - set(names), key=str)
        if unknown:
            raise ValueError(f"{file}: rows of model(s) {', '.join(map(repr, unknown))}; expected "
                             f"{', '.join(names)}")
        rows = rows.assign(model=rows["model"].map(names))
        rows = rows[~rows["model"].isin(seen)]
        seen.update(rows["model"])
        frames.append(rows)
    return pd.concat(frames, ignore_index=True) if frames else None


def on_prompts(samples: pd.DataFrame, subset: str) -> pd.DataFrame:
    """The samples whose prompt is in `subset` (their `subsets` lists), or all where none is."""
    if "subsets" not in samples:
        return samples
    inside = samples["subsets"].map(lambda names: isinstance(names, list) and subset in names)
    return samples[inside] if inside.any() else samples


def elo_by_judge(samples: pd.DataFrame, **options) -> dict[str, pd.DataFrame]:
    """The Elo ratings (``elo.elo_ratings``: index model, columns mean and sd over trials), anchored at the
    reference, by each judge of ELO_COLUMNS that has battles; a judge without (no cost) is left out with a note."""
    ratings = {}
    for _, header, judge in ELO_COLUMNS:
        battles = elo.battles_from_samples(on_prompts(samples, ELO_PROMPTS[judge]), judge)
        if battles.empty or REFERENCE not in {*battles["a"], *battles["b"]}:
            print(f"note: no {header} column: no completions of the reference and another model judged by "
                  f"{judge}", file=sys.stderr)
            continue
        ratings[judge] = elo.elo_ratings(battles, REFERENCE, **options)
    return ratings


def elo_estimate(ratings: pd.DataFrame, models: Sequence[str]) -> dict[str, float]:
    """An entry's Elo: one model's mean and sd over trials, or over several (seeds) the mean of their means and
    its sd (ddof=1) over them."""
    means = ratings["mean"].reindex(list(models)).dropna()
    if means.empty:
        return {"mean": math.nan, "sd": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}
    sd = ratings.loc[means.index[0], "sd"] if len(means) == 1 else means.std(ddof=1)
    return {"mean": means.mean(), "sd": sd, "lo": math.nan, "hi": math.nan, "n": len(means)}


def numbers(rows: Sequence[Entry], metrics: dict[str, str], ratings: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The table's numbers, one row per entry: model (its label), kind, family, point, x, n (evaluations
    averaged), then ``<id>_mean``, ``_sd``, ``_lo``, ``_hi`` per column (``metrics``: column id -> metric name
    under a model's prefix) and per Elo column with ``ratings``."""
    by_id = {c.id: c for c in COLUMNS}
    table = []
    for entry in rows:
        record = {"model": entry.label, "kind": entry.kind, "family": entry.family, "point": entry.point,
                  "x": entry.x, "n": len(entry.runs)}
        for column_id, name in metrics.items():
            cell = estimate(entry.runs, entry.prefix + name)
            if cell["n"] == 0 and entry.kind == "reference" and by_id[column_id].reference is not None:
                cell = {"mean": by_id[column_id].reference, "sd": math.nan, "lo": math.nan, "hi": math.nan,
                        "n": len(entry.runs)}  # by definition
            record |= {f"{column_id}_{k}": v for k, v in cell.items() if k != "n"}
        for column_id, _, judge in ELO_COLUMNS:
            if judge in ratings:
                cell = elo_estimate(ratings[judge], entry.elo_models)
                record |= {f"{column_id}_{k}": v for k, v in cell.items() if k != "n"}
        table.append(record)
    return pd.DataFrame(table)


@dataclass(frozen=True)
class StepwiseReport:
    """What the files are made of: the numbers (``numbers``), which metric each column reads (id -> (name,
    prompts)), the column headers, and the sweep's counts and name."""

    table: pd.DataFrame
    metrics: dict[str, tuple[str, str]]
    headers: dict[str, str]
    info: base.SweepInfo
    prompts: dict[str, int | None]  # prompts -> how many (all, benign, harmful)
    elo_trials: int = elo.TRIALS
    elo_epochs: int = elo.EPOCHS
    cost_threshold: float | None = None


def build(runs: pd.DataFrame, with_elo: bool = True) -> StepwiseReport | None:
    """The stepwise report of ``collect``'s rows, or None where they hold no step-2 or merge run."""
    selected = stepwise_runs(runs)
    if selected.empty:
        return None
    info = base.sweep_info(selected)
    metrics = {c.id: chosen for c in COLUMNS if (chosen := choose_metric(selected, c)) is not None}
    samples = pooled_samples(selected) if with_elo else None
    ratings = elo_by_judge(samples) if samples is not None else {}
    table = numbers(entries(selected), {k: name for k, (name, _) in metrics.items()}, ratings)
    headers = {}
    for column in COLUMNS:
        if column.id in metrics:
            header = column.header
            if column.id == "cost_cvar":
                label = base.metric_label("eval/cost_cvar", info.eval_alpha)
                header = label if label != "eval/cost_cvar" else header
            if column.id == "unsafe_rate" and metrics[column.id][1] != "all":
                header += f" ({metrics[column.id][1]} prompts)"
            headers[column.id] = header
    headers |= {i: h for i, h, judge in ELO_COLUMNS if judge in ratings}
    order = ["helpful_win_rate", "harmless_win_rate", "helpful_elo", "harmless_elo", "reward_mean", "cost_mean",
             "cost_cvar", "unsafe_rate", "kl"]
    headers = {i: headers[i] for i in order if i in headers}
    prompts = {"all": info.eval_prompts,
               **{p: base._shared(selected, f"eval_prompts/{p}") for p in ("benign", "harmful")}}
    return StepwiseReport(table, metrics, headers, info, prompts,
                          cost_threshold=base._shared(selected, "eval.cost_threshold"))


def _counts(rep: StepwiseReport, prompts: str) -> str:
    """``15 × 4 samples`` for the prompts a metric is on, or "" where the runs do not agree on them."""
    n, k = rep.prompts.get(prompts), rep.info.samples_per_prompt
    return f"{n} × {k} samples" if n and k else ""


def _on(rep: StepwiseReport, column_id: str) -> str:
    """``benign prompts, 15 × 4 samples``: what a column's metric is computed on."""
    _, prompts = rep.metrics[column_id]
    return ", ".join(p for p in (f"{prompts} prompts", _counts(rep, prompts)) if p)


def caption(rep: StepwiseReport) -> str:
    """What the table's cells are, above it."""
    level = f"{rep.info.confidence:.0%} " if rep.info.confidence else ""
    lines = [f"{rep.info.name + ': ' if rep.info.name else ''}helpfulness and harmlessness against the SFT model "
             "(the reference of every run)."]
    wins = [f"{what} ({'eval/' + rep.metrics[i][0]}: {_on(rep, i)})" for i, what in
            (("helpful_win_rate", "helpfulness by the reward"), ("harmless_win_rate", "harmlessness by the cost"))
            if i in rep.metrics]
    if wins:
        lines.append(f"Win rates vs SFT (a win 1, a tie 0.5): {'; '.join(wins)}.")
    if "unsafe_rate" in rep.metrics:
        threshold = (f" > {base._fmt_key(rep.cost_threshold)}" if rep.cost_threshold is not None
                     else " above the threshold")
        lines.append(f"Unsafe rate: the share of completions with cost{threshold} "
                     f"(eval/{rep.metrics['unsafe_rate'][0]}: {_on(rep, 'unsafe_rate')}).")
    on = [f"{rep.headers[i]} on {rep.metrics[i][1]} prompts" for i in ("cost_mean", "cost_cvar", "reward_mean", "kl")
          if i in rep.metrics]
    if on:
        lines.append(f"{'; '.join(on)}.")
    if any(i in rep.headers for i, _, _ in ELO_COLUMNS):
        lines.append(f"Elo: SACPO's protocol (K={elo.K_FACTOR:g}, start {elo.INITIAL_RATING:g}, {rep.elo_trials} "
                     f"trials × {rep.elo_epochs} shuffled epochs, each trial shifted so that SFT is at "
                     f"{elo.ANCHOR_RATING:g}) over the battles of every pair of models on every completion, pooled "
                     "over the sweep's samples.jsonl, judged by the reward (helpfulness, on the "
                     f"{ELO_PROMPTS['reward']} prompts where the samples name them) and the cost (harmlessness, on "
                     f"the {ELO_PROMPTS['cost']} prompts); mean ± sd over trials (over seeds where a row has several "
                     "models).")
    lines.append(f"Other cells: mean ± sd over seeds (n ≥ 2), else the run's value [{level}bootstrap interval]; "
                 "n: the evaluations (seeds) a row averages.")
    return "\n".join(lines)


def to_markdown(rep: StepwiseReport, digits: int = 3) -> str:
    """``stepwise.md``: the caption, then the table: model, n, then each column as ``format_estimate``."""
    cells = {"model": rep.table["model"].tolist(), "n": [str(int(n)) for n in rep.table["n"]]}
    for column_id, header in rep.headers.items():
        cells[header] = [_format(row, column_id, digits) for row in rep.table.to_dict("records")]
    table = pd.DataFrame({k.replace("|", r"\|"): [c.replace("|", r"\|") for c in v] for k, v in cells.items()})
    return f"{caption(rep)}\n\n{table.to_markdown(index=False, disable_numparse=True)}\n"


def _format(row: dict, column_id: str, digits: int) -> str:
    def value(key: str) -> float | None:
        v = row.get(f"{column_id}_{key}")
        return None if v is None or pd.isna(v) else float(v)

    return format_estimate(value("mean"), sd=value("sd"), lo=value("lo"), hi=value("hi"), digits=digits)


def csv_table(rep: StepwiseReport) -> pd.DataFrame:
    """``stepwise.csv``: model, kind, n and every column's mean, sd, lo, hi, unrounded."""
    columns = ["model", "kind", "n", *(f"{i}_{k}" for i in rep.headers for k in ("mean", "sd", "lo", "hi"))]
    return rep.table[columns]


def _bars(table: pd.DataFrame, column_id: str) -> np.ndarray:
    """Error bar lengths (2 x rows: below, above): the sd over seeds, else a run's bootstrap interval, else 0."""
    mean, sd = base._num(table, f"{column_id}_mean"), base._num(table, f"{column_id}_sd")
    lo, hi = base._num(table, f"{column_id}_lo"), base._num(table, f"{column_id}_hi")
    return base.bar_lengths(mean, sd, lo, hi, use_sd=sd.notna())


def win_rates_figure(rep: StepwiseReport) -> Figure | None:
    """The papers' figure: harmlessness against helpfulness win rate vs SFT, a point with error bars per
    configuration (a line through each family, by lambda or q), the helpfulness-only models as squares, SFT as
    a star at (0.5, 0.5), dashed lines at 0.5; None without both win rates."""
    if not {"helpful_win_rate", "harmless_win_rate"} <= set(rep.metrics):
        return None
    table = rep.table
    x, y = base._num(table, "helpful_win_rate_mean"), base._num(table, "harmless_win_rate_mean")
    xerr, yerr = _bars(table, "helpful_win_rate"), _bars(table, "harmless_win_rate")
    fig = Figure(figsize=(8, 5.5), dpi=150, layout="constrained")
    FigureCanvasAgg(fig)  # renders without pyplot, and measures text for _place_labels
    ax = fig.add_subplot()
    ax.axvline(0.5, color="0.5", ls="--", lw=1, zorder=1)
    ax.axhline(0.5, color="0.5", ls="--", lw=1, zorder=1)
    labels: list[tuple[float, float, str]] = [(0.5, 0.5, "")]  # keeps point labels off the star
    configs = table[table["kind"].isin(["step2", "merge"]) & x.notna() & y.notna()]
    for i, family in enumerate(dict.fromkeys(configs["family"])):
        rows = configs[configs["family"] == family].sort_values("x", kind="stable").index
        pos = table.index.get_indexer(rows)
        ax.errorbar(x[rows], y[rows], xerr=xerr[:, pos], yerr=yerr[:, pos], fmt="D-" if (
            table.loc[rows, "kind"] == "merge").all() else "o-", ms=5, lw=1, capsize=3, color=f"C{i % 10}",
            label=family, zorder=3)
        labels += [(x[r], y[r], table.loc[r, "point"]) for r in rows]
    step1 = table[(table["kind"] == "step1") & x.notna() & y.notna()]
    for r in step1.index:
        pos = [table.index.get_loc(r)]
        ax.errorbar([x[r]], [y[r]], xerr=xerr[:, pos], yerr=yerr[:, pos], fmt="s", ms=7, capsize=3,
                    color="0.35", mfc="white", mew=1.5, label=table.loc[r, "model"], zorder=3)
        labels.append((x[r], y[r], ""))
    ax.plot([0.5], [0.5], marker="*", ms=15, ls="none", color="black", label="SFT (reference)", zorder=4)
    ax.set(xlabel=f"helpfulness win rate vs SFT ({_on(rep, 'helpful_win_rate')})",
           ylabel=f"harmlessness win rate vs SFT ({_on(rep, 'harmless_win_rate')})")
    name = f"{rep.info.name}: " if rep.info.name else ""
    fig.suptitle(f"{name}harmlessness vs helpfulness win rate against the SFT model", fontsize=10)
    ax.grid(alpha=0.3)
    ax.margins(0.08)
    level = f"{rep.info.confidence:.0%} " if rep.info.confidence else ""
    handles, texts = ax.get_legend_handles_labels()
    order = sorted(range(len(texts)), key=lambda i: texts[i] == "SFT (reference)")  # the star last
    ax.legend([handles[i] for i in order], [texts[i] for i in order], loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, fontsize=8, title_fontsize=7,
              title=f"error bars: ± sd over seeds,\nor {level}bootstrap interval (n=1)", alignment="left")
    base._place_labels(fig, ax, labels)
    return fig


def write_stepwise(runs: pd.DataFrame, out: str | Path) -> list[Path]:
    """Write ``stepwise.md``, ``stepwise.csv`` and ``win_rates.png`` for the step-2 and merge runs among
    ``collect``'s rows into ``out``; returns the paths written ([] where there are none such runs)."""
    rep = build(runs)
    if rep is None:
        return []
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / TABLE_FILE).write_text(to_markdown(rep))
    csv_table(rep).to_csv(out / CSV_FILE, index=False)
    written = [out / TABLE_FILE, out / CSV_FILE]
    fig = win_rates_figure(rep)
    if fig is None:
        print(f"note: skipping {FIGURE_FILE}: no helpfulness and harmlessness win rates in the results",
              file=sys.stderr)
    else:
        fig.savefig(out / FIGURE_FILE)
        written.append(out / FIGURE_FILE)
    return written
