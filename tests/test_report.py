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
from riskexp.results import override_key, run_config

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

    rows = table_rows(report.to_markdown(summary, info=report.SweepInfo(eval_alpha=0.1)))
    assert len(rows) == 4
    assert rows[0]["alpha"] == "0.05" and rows[0]["beta"] == "0.1"
    assert "n" not in rows[0]  # every cell says its n
    assert rows[0]["reward mean"] == "0.160 ± 0.014 (2)"
    assert rows[3]["reward mean"] == "0.610 ± 0.014 (2)"
    assert rows[3]["reward CVaR@0.1"] == "-0.0900 ± 0.0141 (2)"  # 3 significant digits
    assert rows[0]["loss (val)"] == "0.680 ± 0.000 (2)"  # the sd with the mean's decimals


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
    assert not (out / "cost_vs_kl.png").exists()  # the task has no cost


def test_single_run_dir_shows_plain_mean_and_no_missing_keys(tmp_path, capsys):
    results = run_results(0.1, 0.5, 0)
    del results["variant"]
    run = write_run(tmp_path / "run", **results)
    assert report.main([str(run)]) == 0  # outputs default to the run dir itself
    (row,) = table_rows(capsys.readouterr().out)
    assert "variant" not in row and "n" not in row  # a key blank in every row is left out
    assert row["algo"] == "ra_dpo" and row["reward mean"] == "0.600 (1)"
    assert "variant" not in pd.read_csv(run / "report.csv").columns
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
    assert list(rows[0]) == ["beta", "KL to reference", "wall time (s)"]
    assert out.startswith("algo=ra_dpo\n")  # a key constant over all rows is shown once, above the table
    assert rows[0]["wall time (s)"] == "1.50 ± 0.58 (4)"


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
    assert [row["reward mean"] for row in rows] == ["0.610 ± 0.014 (2)"] * 2


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
    assert override_key("++optimizer.lr=1e-4") == "optimizer.lr"
    assert override_key("+data.truncation=prompt_room") == "data.truncation"
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
    assert row["reward mean"] == "0.600 [0.500, 0.700] (1)"
    assert row["Δ reward mean"] == "0.200 [0.050, 0.350] (1)"
    assert row["reward CVaR@0.1"] == "-0.100 (1)"  # no interval recorded
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
    assert row["reward mean"] == "0.610 ± 0.014 (2)"


def test_no_group_keys_pools_every_run(sweep):
    summary = report.summarize(report.collect(sweep), group_by=[])
    assert list(summary["n"]) == [8] and summary.columns[0] == "n"


def knob_results(algo, risk, alpha, seed, inert, theta=1.0, beta=0.5, intervals=True):
    """A results.json as training writes it: `risk_param` (CVaR's alpha, the entropic theta), the knobs the
    run's training does not read (`inert`), the evaluation's counts and bootstrap intervals."""
    results = run_results(alpha, beta, seed) | {
        "algo": algo, "risk": risk, "risk_param": alpha if risk == "cvar" else theta, "inert": inert,
        "eval_prompts": 5, "eval_samples_per_prompt": 2,
    }  # fmt: skip
    results["overrides"] = [o for o in results["overrides"] if not o.startswith("algo=")] + [f"algo={algo}",
                                                                                             f"risk={risk}"]
    results["config"] = results["config"] | {"eval.alpha": 0.1, "eval.confidence": 0.95}
    results["choices"] = results["choices"] | {"algo": algo, "risk": risk}
    if algo == "dpo":
        results |= {"variant": None, "eval/kl": 0.3 + 0.02 * seed, "eval/reward_mean": 0.2 + 0.02 * seed,
                    "eval/reward_cvar": -0.1 + 0.02 * seed}
    if risk == "entropic":
        results |= {"eval/kl": 0.5 + 0.02 * seed, "eval/reward_cvar": -0.05 + 0.02 * seed}
    if intervals:
        results |= {f"{m}/{b}": results[m] + d for m in ("eval/reward_mean", "eval/reward_cvar", "eval/kl",
                                                         "ref_eval/reward_mean")
                    for b, d in (("lo", -0.05), ("hi", 0.04))}
        results |= {"ref_eval/reward_cvar": -0.2, "ref_eval/reward_cvar/lo": -0.3, "ref_eval/reward_cvar/hi": -0.1}
    return results


def write_mixed_sweep(root, seeds=(0, 1), alphas=(0.01, 0.25)):
    """DPO (alpha and risk inert) and Ra-DPO with CVaR at each alpha and with the entropic risk (alpha inert),
    at each seed: the DPO and entropic runs at different alphas train the same policy."""
    for seed in seeds:
        for alpha in alphas:
            write_run(root / f"algo=dpo,alpha={alpha},seed={seed}", **knob_results("dpo", "cvar", alpha, seed,
                                                                                   ["alpha", "risk"]))
            write_run(root / f"algo=ra_dpo,alpha={alpha},risk=cvar,seed={seed}",
                      **knob_results("ra_dpo", "cvar", alpha, seed, []))
            write_run(root / f"algo=ra_dpo,alpha={alpha},risk=entropic,seed={seed}",
                      **knob_results("ra_dpo", "entropic", alpha, seed, ["alpha"]))
    return root


@pytest.fixture
def mixed(tmp_path):
    return write_mixed_sweep(tmp_path / "mixed")


def test_inert_keys_are_blank_and_repeated_trainings_count_once(mixed, capsys):
    summary = report.summarize(report.collect(mixed))
    err = capsys.readouterr().err
    assert err.count("note:") == 1
    assert ("note: 4 runs repeat another run's training (alpha, risk do not apply to algo=dpo; alpha does not "
            "apply to algo=ra_dpo, risk=entropic); each counted once") in err
    rows = summary[["algo", "risk", "alpha", "risk_param", "n"]].to_dict("records")
    assert rows == [
        {"algo": "dpo", "risk": "", "alpha": "", "risk_param": "", "n": 2},  # one run per seed, not four
        {"algo": "ra_dpo", "risk": "cvar", "alpha": 0.01, "risk_param": 0.01, "n": 2},
        {"algo": "ra_dpo", "risk": "cvar", "alpha": 0.25, "risk_param": 0.25, "n": 2},
        {"algo": "ra_dpo", "risk": "entropic", "alpha": "", "risk_param": 1.0, "n": 2},
    ]
    assert summary["eval/reward_mean_mean"].iloc[0] == pytest.approx(0.21)  # seeds 0 and 1 once each
    # the run kept of each repeated training is the first by directory: DPO's at alpha=0.01
    assert "eval/reward_mean_n" not in summary  # no group lacks a metric

    table = table_rows(report.to_markdown(summary))
    assert [(r["algo"], r["risk"], r["alpha"]) for r in table] == [
        ("dpo", "", ""), ("ra_dpo", "cvar", "0.01"), ("ra_dpo", "cvar", "0.25"), ("ra_dpo", "entropic", "")]


def test_results_without_inert_group_every_key(sweep, capsys):
    summary = report.summarize(report.collect(sweep))
    assert len(summary) == 4 and "note" not in capsys.readouterr().err


def test_a_run_repeating_the_same_training_counts_once(tmp_path, capsys):
    write_run(tmp_path / "a", **run_results(0.1, 0.5, 0))
    write_run(tmp_path / "b", **run_results(0.1, 0.5, 0, extra_overrides=["trainer.checkpoint_every_n_steps=8"]))
    assert list(report.summarize(report.collect(tmp_path))["n"]) == [1]
    assert "1 run repeats another run's training (same configuration and seed)" in capsys.readouterr().err
    assert list(report.summarize(report.collect(tmp_path), quiet=True)["n"]) == [1]
    assert not capsys.readouterr().err


def test_key_columns_leave_out_restated_blank_and_partly_blank_constant_keys(tmp_path):
    root = tmp_path / "cvar"
    for seed in (0, 1):
        for alpha in (0.05, 0.1):
            write_run(root / f"cvar,{alpha},{seed}", **knob_results("ra_dpo", "cvar", alpha, seed, []))
        write_run(root / f"dpo,{seed}", **knob_results("dpo", "cvar", 0.1, seed, ["alpha", "risk"]))
    summary = report.summarize(report.collect(root))
    assert list(summary["risk_param"]) == ["", 0.05, 0.1]  # the summary keeps every key
    columns, constant = report.table_keys(summary)
    assert columns == ["algo", "alpha"]  # risk_param restates alpha in every row it has a value
    # variant and risk have one value where they apply; kl_weight, never recorded here, is left out
    assert constant == ["model", "data", "variant", "risk", "beta", "experiment"]
    markdown = report.to_markdown(summary)
    assert markdown.startswith("model=tiny, data=fixture, beta=0.5, experiment=smoke; where they apply: variant=1, "
                               "risk=cvar\n")
    assert list(table_rows(markdown)[0])[:2] == ["algo", "alpha"]

    # with the entropic risk, risk_param is also its theta: then it says something alpha does not
    for seed in (0, 1):
        write_run(root / f"entropic,{seed}", **knob_results("ra_dpo", "entropic", 0.1, seed, ["alpha"], theta=2.0))
    summary = report.summarize(report.collect(root), quiet=True)
    assert report.table_keys(summary)[0] == ["algo", "risk", "risk_param", "alpha"]


def test_csv_has_the_numbers_and_the_table_columns(mixed, tmp_path):
    out = tmp_path / "out"
    assert report.main([str(mixed), "--out", str(out)]) == 0
    csv = pd.read_csv(out / "report.csv")
    summary = report.summarize(report.collect(mixed), quiet=True)
    assert "kl_weight" not in csv and "kl_weight" in summary  # blank in every row (not recorded here)
    assert {"model", "variant", "beta"} <= set(csv.columns)  # constant keys stay: the file has no caption
    assert {"n", "eval/reward_mean_mean", "eval/reward_mean_sd", "eval/reward_mean/lo_mean",
            "eval/reward_mean/hi_mean"} <= set(csv.columns)  # fmt: skip
    assert list(csv["n"]) == [2, 2, 2, 2]
    assert csv["eval/reward_mean_mean"].iloc[0] == pytest.approx(0.21)  # unrounded
    assert list(report.csv_table(summary).columns) == list(csv.columns)

    write_run(tmp_path / "cvar" / "a", **knob_results("ra_dpo", "cvar", 0.05, 0, []))
    write_run(tmp_path / "cvar" / "b", **knob_results("ra_dpo", "cvar", 0.1, 0, []))
    assert "risk_param" not in report.csv_table(report.summarize(report.collect(tmp_path / "cvar")))


@pytest.mark.parametrize("args, cell", [
    ((0.123, 0.0123, 3), "0.123 ± 0.012 (3)"),
    ((0.123, None, 1, 0.101, 0.145), "0.123 [0.101, 0.145] (1)"),
    ((0.123,), "0.123 (1)"),
    ((12.345, 0.5, 2), "12.3 ± 0.5 (2)"),  # the sd with the mean's decimals
    ((0.61, 0.000141, 2), "0.610 ± 0.000 (2)"),
    ((0.00123, 0.0456, 2), "0.0012 ± 0.0456 (2)"),  # near zero: as precise as the spread allows
    ((-0.012, None, 1, -0.276, 0.212), "-0.012 [-0.276, 0.212] (1)"),
    ((-0.00001, 0.02, 2), "0.0000 ± 0.0200 (2)"),  # no "-0"
    ((1234.4, 56.7, 2), "1234 ± 57 (2)"),  # no decimals from 100 on, the integer part never rounded
    ((1.234e-5, 4e-6, 2), "1.23e-05 ± 4.00e-06 (2)"),  # tiny: scientific
    ((20.0, 0.0, 2, None, None, 3, True), "20 ± 0 (2)"),  # a column of whole numbers
    ((float("nan"),), "-"),
])  # fmt: skip
def test_format_cell(args, cell):
    assert report.format_cell(*args) == cell


def test_steps_are_whole_numbers_in_the_table(sweep):
    (row, *_) = table_rows(report.to_markdown(report.summarize(report.collect(sweep)), ["steps"]))
    assert row["steps"] == "20 ± 0 (2)"


@pytest.mark.parametrize("metric, label", [
    ("eval/reward_mean", "reward mean"),
    ("eval/reward_cvar", "reward CVaR@0.1"),
    ("eval/reward_cvar@0.05", "reward CVaR@0.05"),  # its own level
    ("ref_eval/reward_mean", "reference reward mean"),
    ("eval/delta/reward_cvar", "Δ reward CVaR@0.1"),
    ("eval/kl", "KL to reference"),
    ("val/implicit_accuracy", "implicit accuracy (val)"),
    ("train/loss", "loss (train)"),
    ("eval/something_new", "eval/something_new"),  # unknown: the key itself
])  # fmt: skip
def test_metric_labels(metric, label):
    assert report.metric_label(metric, level=0.1) == label


def test_metric_labels_without_a_level_or_clashing_keep_the_key():
    assert report.metric_label("eval/reward_cvar") == "eval/reward_cvar"  # runs evaluated at several levels
    assert report.metric_labels(["eval/reward_cvar", "eval/reward_cvar@0.1", "eval/kl"], level=0.1) == {
        "eval/reward_cvar": "reward CVaR@0.1", "eval/reward_cvar@0.1": "eval/reward_cvar@0.1",
        "eval/kl": "KL to reference"}  # fmt: skip


def test_table_headers_are_readable_at_the_runs_eval_level(mixed, capsys):
    assert report.main([str(mixed)]) == 0
    header = table_rows(capsys.readouterr().out)[0]
    assert {"reward mean", "reward CVaR@0.1", "KL to reference", "reference reward mean", "loss (val)"} <= set(header)
    assert not any("/" in column for column in header)


def test_sweep_info_reads_the_runs_name_and_evaluation(mixed):
    runs = report.collect(mixed)
    assert report.sweep_info(runs) == report.SweepInfo(name="mixed", eval_alpha=0.1, eval_prompts=5,
                                                       samples_per_prompt=2, confidence=0.95)
    runs["name"] = "smoke"  # the sweep's `name`, where the runs record it
    runs["eval_prompts"] = [3] * (len(runs) - 1) + [4]  # prompts differ: no count
    info = report.sweep_info(runs)
    assert info.name == "smoke" and info.eval_prompts is None


def legend_texts(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def inside(inner, outer):
    return (inner.x0 >= outer.x0 - 1 and inner.y0 >= outer.y0 - 1 and inner.x1 <= outer.x1 + 1
            and inner.y1 <= outer.y1 + 1)


def check_layout(fig):
    """Title, axis labels and legend inside the figure; point labels inside the axes, none overlapping."""
    renderer = fig.canvas.get_renderer()
    fig.draw_without_rendering()
    (ax,) = fig.axes
    for artist in (fig._suptitle, ax.title, ax.xaxis.label, ax.yaxis.label, ax.get_legend()):
        assert inside(artist.get_window_extent(renderer), fig.bbox), artist
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    assert all(inside(box, ax.get_window_extent(renderer)) for box in boxes)
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_reward_vs_kl_figure(mixed):
    runs = report.collect(mixed)
    figs = report.figures(report.summarize(runs, quiet=True), report.sweep_info(runs))
    assert list(figs) == ["reward_vs_kl.png", "cvar_vs_alpha.png"]
    fig = figs["reward_vs_kl.png"]
    (ax,) = fig.axes
    assert ax.get_xlabel() == "KL(policy ‖ reference) on eval samples (nats)"
    assert ax.get_ylabel() == "reward mean (eval, 5 prompts × 2 samples)"
    assert fig._suptitle.get_text() == "mixed: model=tiny, data=fixture, beta=0.5, experiment=smoke"
    assert legend_texts(ax) == ["dpo", "ra_dpo cvar", "ra_dpo entropic", "reference model"]  # dpo: no risk
    stars = [line for line in ax.get_lines() if line.get_marker() == "*"]
    assert len(stars) == 1 and list(stars[0].get_xdata()) == [0.0]  # the reference, at KL 0
    assert stars[0].get_ydata()[0] == pytest.approx(0.1)
    assert len(ax.containers) == 4  # error bars: three families and the reference
    dpo = ax.containers[0]
    (_, y_bars) = dpo.lines[2]
    assert y_bars.get_segments()[0][:, 1] == pytest.approx([0.21 - 0.02 / math.sqrt(2), 0.21 + 0.02 / math.sqrt(2)])
    # the CVaR points are told apart by their alpha (not also by risk_param, which restates it there), the
    # entropic one says its theta, DPO has neither
    assert sorted(t.get_text() for t in ax.texts) == ["α=0.01", "α=0.25", "θ=1"]
    check_layout(fig)


def test_cvar_vs_alpha_figure(mixed):
    runs = report.collect(mixed)
    fig = report.figures(report.summarize(runs, quiet=True), report.sweep_info(runs))["cvar_vs_alpha.png"]
    (ax,) = fig.axes
    assert "alpha" in ax.get_xlabel()
    assert ax.get_ylabel() == "reward CVaR@0.1 (eval, fixed level)"
    assert ax.get_xscale() == "log"  # alphas over more than a decade
    assert legend_texts(ax) == ["ra_dpo cvar", "dpo (alpha does not apply)",
                                "ra_dpo entropic θ=1 (alpha does not\napply)", "reference model"]
    (line,) = ax.containers  # one line, with error bars, for the configuration that reads alpha
    assert list(line.lines[0].get_xdata()) == [0.01, 0.25]
    flat = {line.get_label(): line for line in ax.get_lines() if "does not apply" in line.get_label()}
    assert set(flat) == {"dpo (alpha does not apply)", "ra_dpo entropic θ=1 (alpha does not apply)"}
    assert flat["dpo (alpha does not apply)"].get_ydata()[0] == pytest.approx(-0.09)
    reference = [line for line in ax.get_lines() if line.get_label() == "reference model"]
    assert len(reference) == 1 and reference[0].get_ydata()[0] == pytest.approx(-0.2)
    assert {line.get_linestyle() for line in flat.values()} <= {"--", "-."}  # dashed
    assert len(ax.patches) == 3  # bands: the spread of each flat line and the reference's interval
    check_layout(fig)


def test_single_runs_draw_their_bootstrap_intervals(tmp_path):
    for alpha in (0.05, 0.1):
        write_run(tmp_path / f"alpha={alpha}", **knob_results("ra_dpo", "cvar", alpha, 0, []))
    runs = report.collect(tmp_path)
    figs = report.figures(report.summarize(runs), report.sweep_info(runs))
    (ax,) = figs["reward_vs_kl.png"].axes
    (_, y_bars) = ax.containers[0].lines[2]
    mean = 0.05 + 0.5
    assert y_bars.get_segments()[0][:, 1] == pytest.approx([mean - 0.05, mean + 0.04])  # asymmetric
    assert "bootstrap interval" in ax.get_legend().get_title().get_text()
    assert "θ" not in " ".join(legend_texts(ax)) and ax.get_xscale() == "linear"


def test_cvar_plot_needs_a_run_that_reads_alpha(tmp_path, capsys):
    for alpha in (0.05, 0.1):
        write_run(tmp_path / f"dpo,{alpha}", **knob_results("dpo", "cvar", alpha, 0, ["alpha", "risk"]))
    figs = report.figures(report.summarize(report.collect(tmp_path), quiet=True))
    assert list(figs) == ["reward_vs_kl.png"]
    assert "note: skipping cvar_vs_alpha.png: no eval/reward_cvar of a run whose training reads alpha" in (
        capsys.readouterr().err)


def test_cost_plot_when_the_task_has_a_cost(tmp_path):
    for seed in (0, 1):
        for alpha in (0.05, 0.1):
            write_run(tmp_path / f"{alpha},{seed}", **knob_results("ra_dpo", "cvar", alpha, seed, []) | {
                "eval/cost_mean": 0.3 - alpha, "ref_eval/cost_mean": 0.35})
    runs = report.collect(tmp_path)
    assert [p.name for p in report.plot(runs, tmp_path / "out")] == [
        "reward_vs_kl.png", "cvar_vs_alpha.png", "cost_vs_kl.png"]
    (ax,) = report.figures(report.summarize(runs), report.sweep_info(runs))["cost_vs_kl.png"].axes
    assert ax.get_ylabel() == "cost mean (eval, 5 prompts × 2 samples)" and "reference model" in legend_texts(ax)
