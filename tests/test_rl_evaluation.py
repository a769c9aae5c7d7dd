"""RA-RLHF's evaluation beside riskexp's: the prompt tail, the reward-vs-prompt-quantile curve, the shaped
return, and the report's rl.md / quantile_curve.png."""

import copy
import json
import logging

import pandas as pd
import pytest
import torch
from helpers import length_reward
from hydra.utils import instantiate

from riskexp import report
from riskexp.evaluation import (
    QUANTILE_CURVE_CSV,
    QUANTILE_CURVE_PNG,
    compare,
    format_comparison,
    prompt_quantile_curve,
    prompt_tail,
    quantile_curves,
)
from riskexp.rl.report import write_rl
from riskexp.run import evaluate_task, record_evaluation

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PROMPTS = ["The movie was", "I think that", "A long, long opening line about a film, and then", "Honestly,"]
GEN = {"max_new_tokens": 6, "batch_size": 4}


def prompt_length(prompts, completions):  # a prompt scorer: short prompts are the "bad" ones
    return torch.tensor([float(len(p)) for p in prompts])


def test_quantile_curve_on_a_hand_computed_toy():
    # by prompt score the prompts rank 3, 1, 2, 0, with mean rewards 6, 3, 1, 1
    scores = torch.tensor([3.0, 1.0, 2.0, 0.0])
    rewards = torch.tensor([[1.0, 1.0], [2.0, 4.0], [0.0, 2.0], [5.0, 7.0]])
    curve = prompt_quantile_curve(scores, rewards)
    assert curve.shape == (100,) and curve.dtype == torch.float64
    # q% of 4 prompts: ceil(4 q / 100) of them, 1 up to q = 25, 2 up to 50, 3 up to 75, then all 4
    expected = [6.0] * 25 + [4.5] * 25 + [20 / 6] * 25 + [2.75] * 25
    assert curve.tolist() == pytest.approx(expected)
    assert curve[-1].item() == pytest.approx(rewards.mean().item())  # q = 100: the mean reward
    # one completion per prompt, and q% of 3 prompts: q = 33 is still 1 prompt (0.99), q = 34 two
    one = prompt_quantile_curve([0.2, 0.1, 0.3], [3.0, 1.0, 2.0])
    assert one[32].item() == 1.0 and one[33].item() == 2.0 and one[66].item() == 2.0 and one[67].item() == 2.0
    # ties keep the prompts' order
    assert prompt_quantile_curve([0.0, 0.0], [1.0, 3.0])[0].item() == 1.0
    with pytest.raises(ValueError):
        prompt_quantile_curve([0.0, 1.0], torch.ones(3, 2))
    with pytest.raises(ValueError):
        prompt_quantile_curve([], [])


def test_prompt_tail_is_at_or_below_the_threshold():
    assert prompt_tail([0.5, -3.0, -2.5, 1.0], -2.5) == [1, 2]
    assert prompt_tail(torch.tensor([1.0, 2.0]), 0.0) == []


def test_quantile_curves_of_rows_per_model():
    rows = [{"model": m, "prompt_index": i, "sample": k, "reward": r + (m == "policy"), "prompt_score": s}
            for m in ("reference", "policy") for i, (s, r) in enumerate([(1.0, 0.0), (0.0, 2.0)]) for k in range(2)]
    curves = pd.DataFrame(quantile_curves(rows))
    assert list(curves.columns) == ["q", "model", "mean_reward"] and len(curves) == 200
    policy = curves[curves["model"] == "policy"].set_index("q")["mean_reward"]
    assert policy[1] == 3.0 and policy[50] == 3.0 and policy[51] == 2.0 and policy[100] == 2.0
    assert quantile_curves([{**r, "prompt_score": None} for r in rows]) == []
    with pytest.raises(ValueError, match="unequal"):
        quantile_curves(rows[:3])


def test_the_prompt_tail_is_a_subset_of_compare_with_intervals_and_paired_changes(tiny, other):
    ref, tok = tiny
    scores = prompt_length(PROMPTS, [""] * len(PROMPTS))
    tail = prompt_tail(scores, 12.0)  # "I think that" (12) and "Honestly," (9)
    assert tail == [1, 3]
    metrics, rows = compare(other, ref, tok, PROMPTS, reward=length_reward, subsets={"prompt_tail": tail},
                            samples_per_prompt=2, bootstrap_samples=50, seed=1, **GEN)
    for prefix in ("ref_eval", "eval"):
        model = {"ref_eval": "reference", "eval": "policy"}[prefix]
        on_tail = [r["reward"] for r in rows if r["model"] == model and r["prompt_index"] in tail]
        assert len(on_tail) == 4
        assert metrics[f"{prefix}/prompt_tail/reward_mean"] == pytest.approx(sum(on_tail) / 4)
        key = f"{prefix}/prompt_tail/reward_mean"
        assert metrics[f"{key}/lo"] <= metrics[key] <= metrics[f"{key}/hi"]
    change = metrics["eval/prompt_tail/delta/reward_mean"]
    assert change == pytest.approx(metrics["eval/prompt_tail/reward_mean"] - metrics["ref_eval/prompt_tail/reward_mean"])
    assert "eval/prompt_tail/delta/reward_mean/lo" in metrics
    assert "eval/shaped_return_mean" not in metrics  # only with shaped_beta
    table = format_comparison({**metrics, "eval_prompts": 4, "eval_samples_per_prompt": 2,
                               "eval_prompts/prompt_tail": 2, "eval_prompt_tail_threshold": 12.0})
    assert "prompt tail: reward mean (n=2 prompts x 2)" in table
    assert "at or below 12 (RA-RLHF's Tail)" in table


def test_the_shaped_return_is_the_reward_minus_beta_times_the_kl_for_every_model(tiny, other):
    ref, tok = tiny
    beta = 0.2
    metrics, _ = compare(other, ref, tok, PROMPTS[:3], intermediates={"step1": copy.deepcopy(other)},
                         reward=length_reward, shaped_beta=beta, samples_per_prompt=2, bootstrap_samples=50,
                         seed=2, subsets={"prompt_tail": [0]}, **GEN)
    for prefix in ("ref_eval", "step1_eval", "eval"):
        assert metrics[f"{prefix}/shaped_return_mean"] == pytest.approx(
            metrics[f"{prefix}/reward_mean"] - beta * metrics[f"{prefix}/kl"], abs=1e-9)
        key = f"{prefix}/shaped_return_mean"
        assert metrics[f"{key}/lo"] <= metrics[key] <= metrics[f"{key}/hi"]
        assert f"{prefix}/prompt_tail/shaped_return_mean" in metrics
    assert metrics["ref_eval/kl"] == 0.0 and metrics["eval/kl"] != 0.0
    assert metrics["eval/delta/shaped_return_mean"] == pytest.approx(
        metrics["eval/shaped_return_mean"] - metrics["ref_eval/shaped_return_mean"])
    assert "eval/delta/shaped_return_mean/hi" in metrics and "eval/delta_step1/shaped_return_mean" in metrics
    table = format_comparison({**metrics, "eval_prompts": 3, "eval_samples_per_prompt": 2, "eval_shaped_beta": beta})
    (row,) = [line for line in table.splitlines() if line.startswith("shaped return (n=3 prompts x 2)")]
    assert row.count("[") == 5  # reference, step 1, trained, change, change vs step1
    assert "beta=0.2 (RLHF's R_bar)" in table


def test_evaluate_task_scores_the_prompts_once_and_records_the_tail(smoke_cfg, caplog, tmp_path):
    common = ("data=sentiment", "eval.num_prompts=4", "eval.samples_per_prompt=2", "eval.max_new_tokens=3",
              "eval.num_heldout_texts=2", "eval.bootstrap_samples=20",
              "++data.task.prompt_scorer._target_=riskexp.scorers.VaderSentiment")
    cfg = smoke_cfg(*common, "++data.task.prompt_tail_threshold=0.0")
    assert cfg.eval.prompt_tail_threshold == 0.0  # follows the task's
    model, tok = instantiate(cfg.model.loader)
    metrics, rows = evaluate_task(cfg, model, model, tok, shaped_beta=0.1)
    prompts = instantiate(cfg.data.task.prompts)[:4]
    scores = instantiate(cfg.data.task.prompt_scorer)(prompts, [""] * 4)
    tail = [i for i, s in enumerate(scores.tolist()) if s <= 0.0]
    assert metrics["eval_prompts/prompt_tail"] == len(tail) and metrics["eval_prompt_tail_threshold"] == 0.0
    assert all(r["prompt_score"] == pytest.approx(scores[r["prompt_index"]].item()) for r in rows)
    assert all(("prompt_tail" in r["subsets"]) == (r["prompt_index"] in tail) for r in rows)
    assert ("eval/prompt_tail/reward_mean" in metrics) == bool(tail)
    assert metrics["eval/shaped_return_mean"] == pytest.approx(metrics["eval/reward_mean"])  # the model is its ref

    record_evaluation(tmp_path, False, metrics, rows, 0)
    curves = pd.read_csv(tmp_path / QUANTILE_CURVE_CSV)
    assert list(curves.columns) == ["q", "model", "mean_reward"] and len(curves) == 200
    assert set(curves["model"]) == {"reference", "policy"}
    assert (tmp_path / QUANTILE_CURVE_PNG).read_bytes().startswith(PNG_SIGNATURE)

    # a threshold below every prompt: a warning, no tail metrics, no crash
    cfg = smoke_cfg(*common, "++data.task.prompt_tail_threshold=-5.0")
    with caplog.at_level(logging.WARNING, logger="riskexp.run"):
        metrics, rows = evaluate_task(cfg, model, model, tok)
    assert metrics["eval_prompts/prompt_tail"] == 0 and "eval/prompt_tail/reward_mean" not in metrics
    assert any("prompt_tail_threshold=-5" in r.getMessage() and "lowest" in r.getMessage() for r in caplog.records)
    assert "prompt_score" in rows[0]

    # no threshold: no prompt scores, no curve
    cfg = smoke_cfg("data=sentiment", "eval.num_prompts=2", "eval.samples_per_prompt=1", "eval.max_new_tokens=2",
                    "eval.num_heldout_texts=2", "eval.bootstrap_samples=10", "eval.prompt_tail_threshold=null",
                    output_dir=tmp_path / "plain")
    metrics, rows = evaluate_task(cfg, model, model, tok)
    assert "eval_prompts/prompt_tail" not in metrics and "prompt_score" not in rows[0]
    record_evaluation(tmp_path / "plain", False, metrics, rows, 0)
    assert not (tmp_path / "plain" / QUANTILE_CURVE_CSV).exists()


# ---------------------------------------------------------------------------- the report: rl.md, quantile_curve.png

REFERENCE = {"reward_mean": 0.1, "prompt_tail/reward_mean": -2.7, "perplexity": 40.0, "kl": 0.0,
             "reward_cvar": -2.0}  # fmt: skip


def rl_results(algo, seed, run_dir):
    shift = 0.5 if algo == "ra_rlhf" else 0.0
    policy = {"reward_mean": 1.2 + shift + 0.02 * seed, "prompt_tail/reward_mean": -2.0 + shift + 0.1 * seed,
              "perplexity": 44.0 + seed, "kl": 5.0 + seed, "reward_cvar": -1.0 + shift}
    results = {"name": "ra_rlhf_imdb", "algo": algo, "alpha": 0.4, "beta": 0.2, "seed": seed, "model": "tiny",
               "data": "sentiment", "inert": ["alpha", "risk"] if algo == "ppo" else [],
               "overrides": [f"algo={algo}", f"seed={seed}"],
               "config": {"eval.alpha": 0.1, "eval.confidence": 0.95, "eval.prompt_tail_threshold": -2.5,
                          "seed": seed},
               "eval_prompts": 30, "eval_samples_per_prompt": 4, "eval_prompts/prompt_tail": 6,
               "eval_prompt_tail_threshold": -2.5, "eval_heldout_texts": 64, "output_dir": str(run_dir)}
    for prefix, values in (("ref_eval/", {**REFERENCE, "reward_mean": 0.1 + 0.01 * seed}), ("eval/", policy)):
        for name, value in values.items():
            results |= {f"{prefix}{name}": value, f"{prefix}{name}/lo": value - 0.1, f"{prefix}{name}/hi": value + 0.1}
    return results


def write_curve(run_dir, algo, seed):
    q = range(1, 101)
    level = {"ppo": 1.0, "ra_rlhf": 1.5}[algo] + 0.1 * seed
    rows = [{"q": i, "model": "reference", "mean_reward": -3.0 + 0.03 * i} for i in q]
    rows += [{"q": i, "model": "policy", "mean_reward": level - 2.0 + 0.02 * i} for i in q]
    pd.DataFrame(rows).to_csv(run_dir / QUANTILE_CURVE_CSV, index=False)


@pytest.fixture
def rl_sweep(tmp_path):
    root = tmp_path / "sweep"
    for algo in ("ppo", "ra_rlhf"):
        for seed in (0, 1):
            run = root / f"algo={algo},seed={seed}"
            run.mkdir(parents=True)
            (run / "results.json").write_text(json.dumps(rl_results(algo, seed, run)))
            write_curve(run, algo, seed)
    return root


def table_rows(markdown):
    lines = [line for line in markdown.strip().splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def test_write_rl_tabulates_table_2_with_mean_sd_and_draws_the_quantile_curves(rl_sweep, tmp_path):
    out = tmp_path / "out"
    written = write_rl(report.collect(rl_sweep), out)
    assert written == [out / "rl.md", out / "rl.csv", out / "quantile_curve.png"]
    markdown = (out / "rl.md").read_text()
    rows = {r["model"]: r for r in table_rows(markdown)}
    assert list(rows) == ["reference (SFT / base)", "ppo", "ra_rlhf"]
    assert rows["reference (SFT / base)"]["Reward ↑"] == "0.105 ± 0.007 (2)"  # one evaluation per seed
    assert rows["reference (SFT / base)"]["Tail ↑"] == "-2.70 ± 0.00 (2)"
    assert rows["ppo"]["Reward ↑"] == "1.21 ± 0.01 (2)"
    assert rows["ra_rlhf"]["Tail ↑"] == "-1.45 ± 0.07 (2)"
    assert rows["ppo"]["Perplexity ↓"] == "44.5 ± 0.7 (2)"
    assert rows["ra_rlhf"]["KL to reference"] == "5.50 ± 0.71 (2)"
    assert rows["ra_rlhf"]["reward CVaR@0.1"] == "-0.500 ± 0.000 (2)"
    assert "at or below -2.5" in markdown and "6 prompts × 4 samples" in markdown

    csv = pd.read_csv(out / "rl.csv")
    assert list(csv["model"]) == ["reference (SFT / base)", "ppo", "ra_rlhf"]
    assert list(csv["kind"]) == ["reference", "policy", "policy"]
    assert csv.loc[2, "tail_mean"] == pytest.approx(-1.45) and csv.loc[2, "tail_n"] == 2
    assert (out / "quantile_curve.png").read_bytes().startswith(PNG_SIGNATURE)


def test_write_rl_skips_runs_without_a_prompt_tail(rl_sweep, tmp_path):
    runs = report.collect(rl_sweep).drop(columns=["eval/prompt_tail/reward_mean"])
    assert write_rl(runs, tmp_path / "none") == [] and not (tmp_path / "none").exists()


def test_a_single_run_is_named_by_its_algo_and_the_report_cli_writes_rl_md(rl_sweep, tmp_path, capsys):
    run = rl_sweep / "algo=ra_rlhf,seed=0"
    (run / QUANTILE_CURVE_CSV).unlink()
    out = tmp_path / "single"
    assert write_rl(report.collect(run), out) == [out / "rl.md", out / "rl.csv"]  # no curve: no figure
    rows = table_rows((out / "rl.md").read_text())
    assert [r["model"] for r in rows] == ["reference (SFT / base)", "ra_rlhf"]
    assert rows[1]["Reward ↑"] == "1.70 [1.60, 1.80] (1)"

    assert report.main([str(rl_sweep), "--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "rl.md").exists() and (tmp_path / "cli" / "quantile_curve.png").exists()
    assert "rl.md" in capsys.readouterr().err
