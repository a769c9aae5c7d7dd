import functools
import json
import logging
import math

import pandas as pd
import pytest
from helpers import compose_config
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig

from riskexp import report
from riskexp.results import run_config

ALPHAS = (0.05, 0.1)
BETAS = (0.1, 0.5)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(directory, **results):
    directory.mkdir(parents=True)
    (directory / "results.json").write_text(json.dumps(results))
    return directory


@functools.cache
def smoke_record():
    """The `config` and `choices` a results.json of `experiment=smoke algo=ra_dpo` holds."""
    cfg = compose_config(["experiment=smoke", "algo=ra_dpo"])
    HydraConfig.instance().set_config(cfg)
    record = run_config(cfg), dict(HydraConfig.get().runtime.choices)
    GlobalHydra.instance().clear()
    return record


def override_text(value):
    return "null" if value is None else str(value)


def run_results(alpha, beta, seed, extra_overrides=(), **config):
    """A results.json of `experiment=smoke algo=ra_dpo alpha=... beta=... seed=...` plus `config` overrides
    (dotted keys as keyword arguments, e.g. **{"optimizer.lr": 1e-4}) and `extra_overrides` that leave the
    config alone. Seed 1 adds 0.02 to every eval number: per group mean = seed-0 value + 0.01, sd = 0.02 / sqrt(2).
    """
    base_config, choices = smoke_record()
    overrides = {"alpha": alpha, "beta": beta, "seed": seed, **config}
    return {
        "algo": "ra_dpo", "variant": 1, "risk": "cvar", "alpha": alpha, "beta": beta, "seed": seed,
        "model": "tiny", "steps": 20, "status": "finished", "wall_time_s": 1.0 + seed,
        "train/loss": 0.7, "val/loss": 0.68, "val/reward_accuracy": 0.5,
        "eval/reward_mean": alpha + beta + 0.02 * seed, "eval/kl": 10 * alpha * beta + 0.02 * seed,
        "eval/reward_cvar": -alpha + 0.02 * seed,
        "ref_eval/reward_mean": 0.1, "ref_eval/kl": 0.0,
        "overrides": ["experiment=smoke", "algo=ra_dpo", *(f"{k}={override_text(v)}" for k, v in overrides.items()),
                      *extra_overrides],
        "config": base_config | {"risk.alpha": alpha, "algo.objective.beta": beta, "data.seed": seed} | overrides,
        "choices": choices,
    }  # fmt: skip


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    for alpha in ALPHAS:
        for beta in BETAS:
            for seed in (0, 1):
                write_run(root / f"alpha={alpha},beta={beta},seed={seed}", **run_results(alpha, beta, seed))
    return root


def table_rows(markdown):
    # keys constant over all rows are printed once above the table; the rows start with "|"
    lines = [line for line in markdown.strip().splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def test_collect_finds_every_run_once(sweep):
    df = report.collect([sweep, next(sweep.iterdir())])  # overlapping paths must not duplicate a run
    assert len(df) == 8
    assert set(df["run_dir"]) == {str(d) for d in sweep.iterdir()}


def test_summary_mean_sd_and_markdown(sweep):
    summary = report.summarize(report.collect(sweep))
    assert len(summary) == 4
    assert list(summary["n"]) == [2, 2, 2, 2]
    assert list(zip(summary["alpha"], summary["beta"])) == [(a, b) for a in ALPHAS for b in BETAS]
    first = summary.iloc[0]
    assert first["eval/reward_mean_mean"] == pytest.approx(0.16)
    assert first["eval/reward_mean_sd"] == pytest.approx(0.02 / math.sqrt(2))

    rows = table_rows(report.to_markdown(summary))
    assert len(rows) == 4
    assert rows[0]["alpha"] == "0.05" and rows[0]["beta"] == "0.1" and rows[0]["n"] == "2"
    assert rows[0]["eval/reward_mean"] == "0.160 ± 0.014"
    assert rows[3]["eval/reward_mean"] == "0.610 ± 0.014"
    assert rows[3]["eval/reward_cvar"] == "-0.090 ± 0.014"
    assert rows[0]["val/loss"] == "0.680 ± 0"


def test_default_metrics_are_prefixed_keys_and_steps(sweep):
    metrics = report.default_metrics(report.collect(sweep))
    assert metrics == [
        "eval/kl", "eval/reward_cvar", "eval/reward_mean", "ref_eval/kl", "ref_eval/reward_mean",
        "val/loss", "val/reward_accuracy", "steps",
    ]  # fmt: skip


def test_cli_writes_table_csv_and_plots(sweep, tmp_path, capsys):
    out = tmp_path / "out"
    assert report.main([str(sweep), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert stdout == (out / "report.md").read_text()
    assert len(table_rows(stdout)) == 4

    csv = pd.read_csv(out / "report.csv")
    assert len(csv) == 4
    assert {"algo", "variant", "risk", "alpha", "beta", "n", "eval/reward_mean_mean", "eval/reward_mean_sd",
            "steps_mean", "steps_sd"} <= set(csv.columns)  # fmt: skip
    assert "train/loss_mean" not in csv.columns
    assert csv["eval/kl_mean"].iloc[0] == pytest.approx(0.06)

    for name in ("reward_vs_kl.png", "cvar_vs_alpha.png"):
        assert (out / name).read_bytes().startswith(PNG_SIGNATURE)


def test_single_run_dir_shows_plain_mean_and_empty_missing_keys(tmp_path, capsys):
    results = run_results(0.1, 0.5, 0)
    del results["variant"]
    run = write_run(tmp_path / "run", **results)
    assert report.main([str(run)]) == 0  # outputs default to the run dir itself
    (row,) = table_rows(capsys.readouterr().out)
    assert row["variant"] == "" and row["n"] == "1"
    assert row["eval/reward_mean"] == "0.600"
    assert (run / "report.csv").exists() and (run / "reward_vs_kl.png").exists()


def test_plots_are_skipped_without_generation_eval(tmp_path, capsys):
    results = {k: v for k, v in run_results(0.1, 0.5, 0).items() if not k.startswith(("eval/", "ref_eval/"))}
    run = write_run(tmp_path / "run", **results)
    assert report.main([str(run)]) == 0
    assert "note: skipping reward_vs_kl.png" in capsys.readouterr().err
    assert report.plot(report.collect(run), tmp_path / "plots") == []
    assert not list(tmp_path.rglob("*.png"))


def test_plot_accepts_a_summary(sweep, tmp_path):
    summary = report.summarize(report.collect(sweep))
    assert [p.name for p in report.plot(summary, tmp_path)] == ["reward_vs_kl.png", "cvar_vs_alpha.png"]


def test_empty_dir_exits_with_status_2(tmp_path, capsys):
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    assert report.main([str(empty)]) == 2
    assert str(empty) in capsys.readouterr().err


def test_unreadable_results_are_skipped_with_a_warning(sweep, caplog):
    bad = sweep / "broken" / "results.json"
    bad.parent.mkdir()
    bad.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="riskexp.report"):
        df = report.collect(sweep)
    assert len(df) == 8
    assert str(bad) in caplog.text


def test_explicit_metrics(sweep, capsys):
    assert report.main([str(sweep), "--metrics", "eval/kl,wall_time_s", "--group-by", "algo,beta"]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert len(rows) == 2  # grouped by beta only: both alphas and seeds pooled
    assert list(rows[0]) == ["beta", "eval/kl", "wall_time_s", "n"]
    assert out.startswith("algo=ra_dpo\n")  # a key constant over all rows is shown once, above the table
    assert rows[0]["n"] == "4" and rows[0]["wall_time_s"] == "1.500 ± 0.577"


def test_unknown_metric_is_an_error_listing_available(sweep, capsys):
    assert report.main([str(sweep), "--metrics", "eval/kl,eval/nope"]) == 2
    err = capsys.readouterr().err
    assert "eval/nope" in err and "available" in err and "eval/reward_cvar" in err
    with pytest.raises(ValueError, match="unknown metric"):
        report.summarize(report.collect(sweep), metrics=["status"])  # not numeric


KNOBS = [  # key, two values, how the table shows them
    ("optimizer.lr", 1e-4, 1e-3, ["0.0001", "0.001"]),
    ("algo.label_smoothing", 0.0, 0.1, ["0", "0.1"]),
    ("data.limit", 8, 16, ["8", "16"]),
    ("trainer.max_steps", 1, 2, ["1", "2"]),
    ("model.path", "runs/sft/a/policy", "runs/sft/b/policy", ["runs/sft/a/policy", "runs/sft/b/policy"]),
]


@pytest.mark.parametrize("key, first, second, shown", KNOBS)
def test_runs_differing_in_one_knob_are_two_rows_each_averaged_over_seeds(tmp_path, capsys, key, first, second,
                                                                          shown):
    for value in (first, second):
        for seed in (0, 1):
            write_run(tmp_path / f"{key}={value},seed={seed}".replace("/", "_"),
                      **run_results(0.1, 0.5, seed, **{key: value}))
    summary = report.summarize(report.collect(tmp_path))
    assert list(summary[key]) == [first, second] and list(summary["n"]) == [2, 2]
    assert list(summary["eval/reward_mean_mean"]) == pytest.approx([0.61, 0.61])
    assert list(summary["eval/reward_mean_sd"]) == pytest.approx([0.02 / math.sqrt(2)] * 2)
    assert "seed" not in summary.columns
    assert report.main([str(tmp_path)]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert [row[key] for row in rows] == shown
    assert [row["eval/reward_mean"] for row in rows] == ["0.610 ± 0.014"] * 2 and [row["n"] for row in rows] == ["2"] * 2


def test_a_knob_overridden_in_some_runs_only_is_valued_from_each_config(tmp_path):
    write_run(tmp_path / "default", **run_results(0.1, 0.5, 0))
    write_run(tmp_path / "lr", **run_results(0.1, 0.5, 0, **{"optimizer.lr": 1e-5}))
    summary = report.summarize(report.collect(tmp_path))
    assert list(summary["optimizer.lr"]) == [1e-5, smoke_record()[0]["optimizer.lr"]]


def test_a_config_group_choice_is_a_group_key(tmp_path):
    write_run(tmp_path / "adamw", **run_results(0.1, 0.5, 0))
    rmsprop = run_results(0.1, 0.5, 0, extra_overrides=["optimizer=rmsprop"])
    rmsprop["choices"] = rmsprop["choices"] | {"optimizer": "rmsprop"}
    write_run(tmp_path / "rmsprop", **rmsprop)
    assert list(report.summarize(report.collect(tmp_path))["optimizer"]) == ["adamw", "rmsprop"]


def test_overrides_that_do_not_change_results_do_not_split_rows(tmp_path):
    write_run(tmp_path / "a", **run_results(0.1, 0.5, 0, extra_overrides=["logger=csv", "name=a", "rerun=true"]))
    write_run(tmp_path / "b", **run_results(0.1, 0.5, 1, extra_overrides=["logger=none", "++logger.offline=false",
                                                                          "trainer.log_every_n_steps=5"]))
    summary = report.summarize(report.collect(tmp_path))
    assert list(summary["n"]) == [2]
    assert not {"logger", "logger.offline", "name", "rerun", "seed", "trainer.log_every_n_steps"} & set(summary)


def test_override_keys_drop_prefixes_seed_and_non_result_keys():
    assert report.override_key("++optimizer.lr=1e-4") == "optimizer.lr"
    assert report.override_key("+data.truncation=prompt_room") == "data.truncation"
    runs = pd.DataFrame({"overrides": [["++optimizer.lr=1e-4", "seed=1", "logger=csv"], ["hydra/launcher=slurm"],
                                       None]})
    assert report.override_keys(runs) == ["optimizer.lr"]
    assert report.group_keys(runs) == [*report.DEFAULT_GROUP_BY, "optimizer.lr"]


def test_a_run_without_config_takes_the_override_text(tmp_path):
    old = {k: v for k, v in run_results(0.1, 0.5, 0, **{"optimizer.lr": 1e-4}).items() if k != "config"}
    write_run(tmp_path / "old", **old)
    assert list(report.summarize(report.collect(tmp_path))["optimizer.lr"]) == ["0.0001"]


def test_intervals_are_shown_for_a_single_run_and_kept_in_the_csv(tmp_path, capsys):
    intervals = {"eval/reward_mean/lo": 0.5, "eval/reward_mean/hi": 0.7, "eval/delta/reward_mean": 0.2,
                 "eval/delta/reward_mean/lo": 0.05, "eval/delta/reward_mean/hi": 0.35}
    run = write_run(tmp_path / "sweep" / "seed=0", **run_results(0.1, 0.5, 0) | intervals)
    assert report.main([str(run)]) == 0
    (row,) = table_rows(capsys.readouterr().out)
    assert row["eval/reward_mean"] == "0.600 [0.500, 0.700]"
    assert row["eval/delta/reward_mean"] == "0.200 [0.050, 0.350]"
    assert row["eval/reward_cvar"] == "-0.100"  # no interval recorded
    assert not any(column.endswith(("/lo", "/hi")) for column in row)
    csv = pd.read_csv(run / "report.csv")
    assert csv["eval/reward_mean/lo_mean"].iloc[0] == 0.5 and csv["eval/delta/reward_mean/hi_mean"].iloc[0] == 0.35
    # the bounds come along with an explicitly chosen metric
    summary = report.summarize(report.collect(run), metrics=["eval/reward_mean"])
    assert {"eval/reward_mean/lo_mean", "eval/reward_mean/hi_sd"} <= set(summary.columns)
    # over seeds the table shows the spread of the seeds, not one run's interval
    write_run(tmp_path / "sweep" / "seed=1", **run_results(0.1, 0.5, 1) | intervals)
    assert report.main([str(tmp_path / "sweep")]) == 0
    (row,) = table_rows(capsys.readouterr().out)
    assert row["eval/reward_mean"] == "0.610 ± 0.014" and row["n"] == "2"


def test_no_group_keys_pools_every_run(sweep):
    summary = report.summarize(report.collect(sweep), group_by=[])
    assert list(summary["n"]) == [8] and summary.columns[0] == "n"
