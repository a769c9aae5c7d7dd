import json

import pandas as pd
import pytest

from riskexp import report
from riskexp.stepwise import report as stepwise

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PROMPTS, SAMPLES = 3, 2
CONFIG = {"eval.alpha": 0.1, "eval.confidence": 0.95, "eval.cost_threshold": 0.0}


def with_bounds(prefix, values):
    """`prefix + m` for each metric, with a bootstrap interval of ± 0.05 around it."""
    out = {}
    for name, value in values.items():
        out |= {f"{prefix}{name}": value, f"{prefix}{name}/lo": value - 0.05, f"{prefix}{name}/hi": value + 0.05}
    return out


REFERENCE = {"reward_mean": 0.0, "cost_mean": 0.5, "cost_cvar": 1.0, "cost_rate": 0.5, "harmful/cost_rate": 0.6,
             "kl": 0.0}  # fmt: skip
STEP1 = {"reward_mean": 1.0, "cost_mean": 0.8, "cost_cvar": 1.5, "cost_rate": 0.7, "harmful/cost_rate": 0.8,
         "kl": 2.0, "reward_win_rate": 0.70, "benign/reward_win_rate": 0.72, "cost_win_rate": 0.40,
         "harmful/cost_win_rate": 0.38}  # fmt: skip


def policy_metrics(lam, subsets=True):
    """A step-2 policy at lambda: less helpful, more harmless, as lambda grows."""
    metrics = {"reward_mean": 0.7 - 0.1 * lam, "cost_mean": 0.4 - 0.05 * lam, "cost_cvar": 1.2 - 0.1 * lam,
               "cost_rate": 0.4, "harmful/cost_rate": 0.5 - 0.1 * lam, "kl": 1.0 + lam,
               "reward_win_rate": 0.66 - 0.02 * lam, "benign/reward_win_rate": 0.70 - 0.02 * lam,
               "cost_win_rate": 0.52 + 0.04 * lam, "harmful/cost_win_rate": 0.50 + 0.05 * lam}  # fmt: skip
    return metrics if subsets else {k: v for k, v in metrics.items() if "/" not in k}


def step2_results(lam, seed, step1_dir, algo="sacpo", subsets=True, shift=0.0):
    policy = {k: v + shift for k, v in policy_metrics(lam, subsets).items()}
    return {
        "name": "pku_sacpo", "algo": algo, "alpha": 0.1, "beta": 0.1, "seed": seed, "model": "tiny",
        "data": "safety", "step": 2, "lam": lam, "step1_dir": step1_dir, "inert": ["alpha", "risk"],
        "overrides": [f"algo={algo}", f"lam={lam}", f"seed={seed}", "data=safety"],
        "config": CONFIG | {"seed": seed, "algo.lam": lam},
        "eval_prompts": PROMPTS, "eval_samples_per_prompt": SAMPLES, "eval_prompts/harmful": 2,
        "eval_prompts/benign": 1,
        **with_bounds("ref_eval/", REFERENCE), **with_bounds("step1_eval/", STEP1), **with_bounds("eval/", policy),
    }  # fmt: skip


def merge_results(q, seed=0):
    return {
        "name": "psacpo", "kind": "merge", "q": q, "merge_a": "runs/steps/helpful/policy",
        "merge_b": "runs/sweeps/sacpo/lam=4/policy", "model": "tiny", "data": "safety", "seed": seed,
        "overrides": ["data=safety", "merge.a=runs/steps/helpful/policy", "merge.b=runs/sweeps/sacpo/lam=4/policy",
                      f"merge.q={q}"],
        "config": CONFIG | {"seed": seed, "merge.q": q},
        "eval_prompts": PROMPTS, "eval_samples_per_prompt": SAMPLES, "eval_prompts/harmful": 2,
        "eval_prompts/benign": 1,
        **with_bounds("ref_eval/", REFERENCE), **with_bounds("eval/", policy_metrics(4 * q)),
    }  # fmt: skip


def sample_rows(scores):
    """samples.jsonl rows: model -> (reward, cost) of each of its completions."""
    return [{"model": model, "prompt_index": i, "sample": k, "prompt": f"prompt {i}", "completion": f"{model} {i}",
             "reward": reward, "cost": cost}
            for model, (reward, cost) in scores.items() for i in range(PROMPTS) for k in range(SAMPLES)]


def write_run(directory, results, samples=None):
    directory.mkdir(parents=True)
    (directory / "results.json").write_text(json.dumps(results))
    if samples is not None:
        (directory / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))
    return directory


def policy_scores(lam):
    # reward: step 1 > policy > reference; cost (lower wins): policy at lambda 4 < at lambda 1 < reference < step 1
    return {"reference": (0.0, 0.5), "step1": (1.0, 0.8), "policy": (0.7 - 0.1 * lam, 0.4 - 0.05 * lam)}


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "pku_sacpo"
    for lam in (1, 4):
        write_run(root / f"lam={lam}", step2_results(lam, 0, "runs/steps/helpful"), sample_rows(policy_scores(lam)))
    return root


def table_rows(markdown):
    lines = [line for line in markdown.strip().splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def test_table_has_a_row_per_model_and_the_headline_columns(sweep, capsys):
    rep = stepwise.build(report.collect(sweep))
    markdown = stepwise.to_markdown(rep)
    rows = table_rows(markdown)
    assert [r["model"] for r in rows] == ["SFT (reference)", "helpfulness only (step 1)", "λ=1", "λ=4"]
    assert list(rows[0]) == [
        "model", "n", "helpfulness win rate vs SFT", "harmlessness win rate vs SFT", "helpfulness Elo",
        "harmlessness Elo", "reward mean", "cost mean", "cost CVaR@0.1", "unsafe rate (harmful prompts)",
        "KL to reference"]  # fmt: skip
    reference, step1, lam1, lam4 = rows
    assert reference["helpfulness win rate vs SFT"] == "0.500" and reference["KL to reference"] == "0.0000 [-0.0500, 0.0500]"
    # the subsets the paper's figure uses: benign prompts for helpfulness, harmful for harmlessness
    assert step1["helpfulness win rate vs SFT"] == "0.720 [0.670, 0.770]"
    assert step1["harmlessness win rate vs SFT"] == "0.380 [0.330, 0.430]"
    assert lam1["helpfulness win rate vs SFT"] == "0.680 [0.630, 0.730]"
    assert lam4["harmlessness win rate vs SFT"] == "0.700 [0.650, 0.750]"
    assert lam4["unsafe rate (harmful prompts)"] == "0.100 [0.050, 0.150]"
    assert [r["n"] for r in rows] == ["1"] * 4
    assert "eval/benign/reward_win_rate: benign prompts, 1 × 2 samples" in markdown
    assert "eval/harmful/cost_win_rate: harmful prompts, 2 × 2 samples" in markdown

    # Elo over the pooled samples: the reference at exactly 1000; step 1 the most helpful, least harmless
    table = rep.table.set_index("model")
    assert table.loc["SFT (reference)", "helpful_elo_mean"] == 1000.0
    assert table.loc["SFT (reference)", "harmless_elo_sd"] == 0.0
    assert table.loc["helpfulness only (step 1)", "helpful_elo_mean"] > table.loc["λ=1", "helpful_elo_mean"] > (
        table.loc["λ=4", "helpful_elo_mean"]) > 1000  # fmt: skip
    assert table.loc["λ=4", "harmless_elo_mean"] > table.loc["λ=1", "harmless_elo_mean"] > 1000 > (
        table.loc["helpfulness only (step 1)", "harmless_elo_mean"])  # fmt: skip
    assert reference["helpfulness Elo"] == "1000 ± 0"
    assert not capsys.readouterr().err


def test_elo_pools_one_entry_per_distinct_model(sweep):
    runs = stepwise.stepwise_runs(report.collect(sweep))
    pooled = stepwise.pooled_samples(runs)
    assert sorted(pooled["model"].unique()) == sorted(
        ["reference", "step1:runs/steps/helpful", *(f"policy:{sweep / f'lam={lam}'}" for lam in (1, 4))])
    assert len(pooled) == 4 * PROMPTS * SAMPLES  # the shared reference and step 1 once each


def test_each_elo_judge_battles_on_its_own_prompts_where_the_samples_name_them():
    rows = pd.DataFrame(sample_rows({"reference": (0.0, 0.5), "policy:p": (1.0, 0.9)}))
    rows["subsets"] = [["benign"] if r.prompt_index == 0 else ["harmful"] for r in rows.itertuples()]
    assert set(stepwise.on_prompts(rows, "benign")["prompt_index"]) == {0}
    assert set(stepwise.on_prompts(rows, "harmful")["prompt_index"]) == set(range(1, PROMPTS))
    assert len(stepwise.on_prompts(rows.drop(columns="subsets"), "benign")) == len(rows)  # no subsets: all
    assert len(stepwise.on_prompts(rows, "toxic")) == len(rows)  # a subset no prompt is in: all
    ratings = stepwise.elo_by_judge(rows, trials=2, epochs=1)
    # the policy wins every helpfulness battle (benign prompts) and loses every harmlessness one (harmful)
    assert ratings["reward"].loc["policy:p", "mean"] > 1000 > ratings["cost"].loc["policy:p", "mean"]


def test_all_prompt_win_rates_where_the_runs_have_no_subsets(tmp_path):
    for lam in (1, 4):
        results = {k: v for k, v in step2_results(lam, 0, "s1", subsets=False).items()
                   if not k.startswith(("step1_eval/benign", "step1_eval/harmful"))}
        write_run(tmp_path / f"lam={lam}", results, sample_rows(policy_scores(lam)))
    rep = stepwise.build(report.collect(tmp_path))
    markdown = stepwise.to_markdown(rep)
    assert "eval/reward_win_rate: all prompts, 3 × 2 samples" in markdown
    rows = table_rows(markdown)
    assert "unsafe rate" in rows[0] and rows[2]["helpfulness win rate vs SFT"] == "0.640 [0.590, 0.690]"
    (ax,) = stepwise.win_rates_figure(rep).axes
    assert ax.get_xlabel() == "helpfulness win rate vs SFT (all prompts, 3 × 2 samples)"


def test_win_rate_figure(sweep):
    rep = stepwise.build(report.collect(sweep))
    fig = stepwise.win_rates_figure(rep)
    (ax,) = fig.axes
    assert ax.get_xlabel() == "helpfulness win rate vs SFT (benign prompts, 1 × 2 samples)"
    assert ax.get_ylabel() == "harmlessness win rate vs SFT (harmful prompts, 2 × 2 samples)"
    assert "pku_sacpo" in fig._suptitle.get_text()
    stars = [line for line in ax.get_lines() if line.get_marker() == "*"]
    assert len(stars) == 1 and list(stars[0].get_xdata()) == [0.5] and list(stars[0].get_ydata()) == [0.5]
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert sorted(tuple(line.get_xdata()) + tuple(line.get_ydata()) for line in dashed) == [
        (0, 1, 0.5, 0.5), (0.5, 0.5, 0, 1)]  # the 0.5 lines (axhline, axvline)
    family, step1 = ax.containers
    line = family.lines[0]  # the points, joined in the order of lambda
    assert list(line.get_xdata()) == pytest.approx([0.68, 0.62]) and list(line.get_ydata()) == pytest.approx(
        [0.55, 0.70])
    assert line.get_linestyle() == "-" and family.get_label() == "sacpo"
    (_, y_bars) = family.lines[2]
    assert y_bars.get_segments()[0][:, 1] == pytest.approx([0.50, 0.60])  # the bootstrap interval
    assert step1.lines[0].get_marker() == "s" and list(step1.lines[0].get_xdata()) == pytest.approx([0.72])
    assert sorted(t.get_text() for t in ax.texts) == ["λ=1", "λ=4"]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["sacpo", "helpfulness only (step 1)", "SFT (reference)"]


def test_seeds_are_averaged_and_step1_dirs_of_one_config_are_one_row(tmp_path):
    for seed, shift in ((0, 0.0), (1, 0.02)):
        for lam in (1, 4):
            write_run(tmp_path / f"lam={lam},seed={seed}",
                      step2_results(lam, seed, f"runs/steps/helpful,seed={seed}", shift=shift),
                      sample_rows(policy_scores(lam)))
    rep = stepwise.build(report.collect(tmp_path))
    rows = table_rows(stepwise.to_markdown(rep))
    assert [(r["model"], r["n"]) for r in rows] == [
        ("SFT (reference)", "2"), ("helpfulness only (step 1)", "2"), ("λ=1", "2"), ("λ=4", "2")]
    assert rows[2]["helpfulness win rate vs SFT"] == "0.690 ± 0.014"  # mean ± sd over the seeds
    # Elo: one entry per step-1 directory (a seed each) and per policy; a row of two averages their means
    pooled = stepwise.pooled_samples(stepwise.stepwise_runs(report.collect(tmp_path)))
    assert pooled["model"].nunique() == 1 + 2 + 4
    ratings = stepwise.elo_by_judge(pooled)["reward"]["mean"]
    step1 = ratings[[f"step1:runs/steps/helpful,seed={seed}" for seed in (0, 1)]]
    row = rep.table.set_index("model").loc["helpfulness only (step 1)"]
    assert row["helpful_elo_mean"] == pytest.approx(step1.mean())
    assert row["helpful_elo_sd"] == pytest.approx(step1.std(ddof=1))


def test_configurations_are_labelled_by_what_varies(tmp_path):
    for algo in ("sacpo", "rsa"):
        for lam in (1, 4):
            write_run(tmp_path / f"{algo},lam={lam}", step2_results(lam, 0, "s1", algo=algo),
                      sample_rows(policy_scores(lam)))
    rep = stepwise.build(report.collect(tmp_path))
    assert list(rep.table["model"]) == ["SFT (reference)", "helpfulness only (step 1)", "rsa λ=1", "rsa λ=4",
                                        "sacpo λ=1", "sacpo λ=4"]
    (ax,) = stepwise.win_rates_figure(rep).axes
    assert [t.get_text() for t in ax.get_legend().get_texts()][:2] == ["rsa", "sacpo"]


def test_step1_models_are_told_apart_by_what_their_configurations_share(tmp_path):
    for beta in (0.1, 0.5):
        for lam in (1, 4):
            write_run(tmp_path / f"beta={beta},lam={lam}", step2_results(lam, 0, f"s1,beta={beta}") | {"beta": beta},
                      sample_rows(policy_scores(lam)))
    rep = stepwise.build(report.collect(tmp_path))
    assert list(rep.table["model"]) == [
        "SFT (reference)", "helpfulness only (step 1, β=0.1)", "helpfulness only (step 1, β=0.5)", "β=0.1 λ=1",
        "β=0.1 λ=4", "β=0.5 λ=1", "β=0.5 λ=4"]  # fmt: skip
    (ax,) = stepwise.win_rates_figure(rep).axes
    assert len(ax.containers) == 4  # a line per beta, a square per step 1


def test_merge_sweep(tmp_path):
    root = tmp_path / "psacpo"
    for q in (0.25, 0.75):
        scores = {"reference": (0.0, 0.5), "policy": (0.7 - 0.4 * q, 0.4 - 0.2 * q)}
        write_run(root / f"q={q}", merge_results(q), sample_rows(scores))
    rep = stepwise.build(report.collect(root))
    rows = table_rows(stepwise.to_markdown(rep))
    assert [r["model"] for r in rows] == ["SFT (reference)", "q=0.25", "q=0.75"]  # no step 1
    assert rows[1]["harmlessness win rate vs SFT"] == "0.550 [0.500, 0.600]"
    assert rep.table.loc[0, "harmless_elo_mean"] == 1000.0
    fig = stepwise.win_rates_figure(rep)
    (ax,) = fig.axes
    (merges,) = ax.containers
    assert merges.lines[0].get_marker() == "D" and merges.get_label() == "merge"
    assert list(merges.lines[0].get_xdata()) == pytest.approx([0.68, 0.64])
    assert sorted(t.get_text() for t in ax.texts) == ["q=0.25", "q=0.75"]
    assert "psacpo" in fig._suptitle.get_text()

    # among step-2 runs, a merge says it is one
    write_run(root / "sacpo", step2_results(4, 0, "s1"), sample_rows(policy_scores(4)))
    labels = list(stepwise.build(report.collect(root)).table["model"])
    assert labels == ["SFT (reference)", "helpfulness only (step 1)", "λ=4", "merge q=0.25", "merge q=0.75"]


def test_runs_without_samples_leave_out_the_elo_columns(sweep, capsys):
    (sweep / "lam=1" / "samples.jsonl").unlink()
    rows = table_rows(stepwise.to_markdown(stepwise.build(report.collect(sweep))))
    assert "helpfulness Elo" not in rows[0] and "helpfulness win rate vs SFT" in rows[0]
    err = capsys.readouterr().err
    assert err.count("note:") == 1 and "1 of 2 stepwise runs have no samples.jsonl" in err


def test_cli_writes_the_stepwise_table_and_figure(sweep, capsys):
    assert report.main([str(sweep)]) == 0
    err = capsys.readouterr().err
    for name in ("stepwise.md", "stepwise.csv", "win_rates.png"):
        assert f"wrote {sweep / name}" in err
    assert (sweep / "win_rates.png").read_bytes().startswith(PNG_SIGNATURE)
    assert table_rows((sweep / "stepwise.md").read_text())[3]["model"] == "λ=4"
    csv = pd.read_csv(sweep / "stepwise.csv")
    assert list(csv["model"]) == ["SFT (reference)", "helpfulness only (step 1)", "λ=1", "λ=4"]
    assert csv.loc[2, "helpful_win_rate_mean"] == pytest.approx(0.68) and csv.loc[2, "helpful_win_rate_lo"] == (
        pytest.approx(0.63))  # fmt: skip
    assert csv.loc[0, "helpful_elo_mean"] == 1000.0
    assert (sweep / "report.md").exists()  # the plain report is written as before


def test_a_plain_sweep_writes_no_stepwise_files(tmp_path, capsys):
    for alpha in (0.1, 0.2):
        write_run(tmp_path / f"alpha={alpha}", {"algo": "ra_dpo", "alpha": alpha, "beta": 0.1, "seed": 0,
                                                "eval/reward_mean": alpha, "eval/kl": alpha,
                                                "ref_eval/reward_mean": 0.0})
    assert report.main([str(tmp_path)]) == 0
    assert not (tmp_path / "stepwise.md").exists() and not (tmp_path / "win_rates.png").exists()
    assert "stepwise" not in capsys.readouterr().err
    assert stepwise.build(report.collect(tmp_path)) is None
