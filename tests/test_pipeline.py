"""The embedded-task pipeline on the tiny model: build pairs, SFT, train with evaluation, evaluate alone, report."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate

from riskexp.run import run

REPO = Path(__file__).resolve().parents[1]
TINY_EVAL = ["eval.num_prompts=4", "eval.max_new_tokens=6", "eval.num_heldout_texts=4", "eval.batch_size=4"]
SHORT = ["trainer.max_steps=2", "data.max_length=40", "data.max_prompt_length=16"]


def module_cli(module, *args, runs_dir):
    env = os.environ | {"RISKEXP_RUNS": str(runs_dir), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=env)


def test_build_command_writes_scored_pairs_sampled_from_model_path(smoke_cfg, tmp_path):
    from riskexp.data.build import build_pairs
    from riskexp.models import from_pretrained, tiny_llama

    # an exported policy whose weights differ from the base tiny model's
    exported = tmp_path / "policy"
    model, tokenizer = tiny_llama(init_seed=1)
    model.save_pretrained(exported)
    tokenizer.save_pretrained(exported)
    out = tmp_path / "pairs.jsonl"
    build = ["data=sentiment", "model=tiny", "data.build.prompts.limit=6", "data.build.k=3",
             "data.build.max_new_tokens=6"]
    result = module_cli("riskexp.data.build", *build, f"model.path={exported}", f"data.build.out={out}",
                        runs_dir=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert 1 <= len(records) <= 6
    for record in records:
        assert {"prompt", "chosen", "rejected", "chosen_score", "rejected_score"} <= record.keys()
        assert record["chosen_score"] > record["rejected_score"]

    # the same pairs as sampling from the model in model.path, not from the base model
    cfg = smoke_cfg(*build)
    spec = cfg.data.build
    settings = dict(k=spec.k, max_new_tokens=spec.max_new_tokens, batch_size=spec.batch_size, seed=cfg.seed,
                    prompt_format=cfg.data.prompt_format)
    prompts, reward = instantiate(spec.prompts), instantiate(cfg.data.task.reward)
    assert build_pairs(from_pretrained(str(exported))[0], tokenizer, prompts, reward, **settings) == records
    assert build_pairs(tiny_llama()[0], tokenizer, prompts, reward, **settings) != records


def test_sft_then_preference_training_with_generation_eval(smoke_cfg, tmp_path):
    sft_dir = tmp_path / "sft"
    sft = run(smoke_cfg("algo=sft", "data=sentiment", "save_policy=true", "eval.enabled=false", *SHORT,
                        output_dir=sft_dir))
    assert sft["algo"] == "sft" and "val/loss" in sft and (sft_dir / "policy" / "config.json").exists()

    # the SFT policy is the next run's initial policy and reference (the papers' pipeline)
    policy = str(sft_dir / "policy")
    cfg = smoke_cfg("algo=ra_dpo", "risk=cvar", "alpha=0.25", "data=sentiment", f"model.path={policy}",
                    f"model.ref_path={policy}", *SHORT, *TINY_EVAL, output_dir=tmp_path / "ra_dpo")
    results = run(cfg)
    saved = json.loads((tmp_path / "ra_dpo" / "results.json").read_text())
    for prefix in ("eval", "ref_eval"):
        for metric in ("reward_mean", "reward_cvar", "reward_var", "kl", "distinct_1", "distinct_2", "perplexity"):
            assert f"{prefix}/{metric}" in saved, f"{prefix}/{metric}"
        for metric in ("reward_mean", "reward_cvar", "reward_var", "kl"):
            assert saved[f"{prefix}/{metric}/lo"] <= saved[f"{prefix}/{metric}/hi"], f"{prefix}/{metric}"
    for metric in ("reward_mean", "reward_cvar", "reward_cvar@0.25"):  # the run's alpha is one of the levels
        assert saved[f"eval/delta/{metric}/lo"] <= saved[f"eval/delta/{metric}/hi"], metric
    assert saved["ref_eval/kl"] == 0.0 and saved["eval/kl"] != 0.0
    assert saved["eval/reward_cvar"] <= saved["eval/reward_mean"] + 1e-9
    assert results["data"] == "sentiment"


def test_toxicity_task_reports_cost_tails(smoke_cfg, tmp_path):
    cfg = smoke_cfg("algo=dpo", "data=toxicity", *SHORT, *TINY_EVAL)
    results = run(cfg)
    for key in ("eval/cost_mean", "eval/cost_cvar", "eval/cost_rate", "ref_eval/cost_cvar", "eval/reward_cvar"):
        assert key in results, key
    assert 0.0 <= results["eval/cost_rate"] <= 1.0
    assert results["eval/cost_cvar"] >= results["eval/cost_mean"] - 1e-9
    tasks = instantiate(cfg.data.task.reward), instantiate(cfg.data.task.cost)
    assert tasks[0](["x"], ["you idiot"]) < tasks[0](["x"], ["have a nice day"])


def test_eval_command_on_an_exported_policy(tmp_path):
    result = module_cli("riskexp.eval", "model=tiny", "data=sentiment", *TINY_EVAL, runs_dir=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    found = list((tmp_path / "eval").rglob("results.json"))
    assert len(found) == 1
    saved = json.loads(found[0].read_text())
    assert saved["kind"] == "eval" and "eval/reward_cvar" in saved and "ref_eval/reward_cvar" in saved
    assert "eval/reward_cvar/lo" in saved and "eval/delta/reward_mean/hi" in saved
    assert "reward mean" in result.stdout
    bad = module_cli("riskexp.eval", "model=tiny", "data=fixture", "~data/task", runs_dir=tmp_path)
    assert bad.returncode == 2 and "data='fixture' has no generation task" in bad.stderr


@pytest.mark.slow
def test_sweep_then_report_gives_four_rows_and_plots(tmp_path):
    result = module_cli("riskexp", "--multirun", "experiment=smoke", "data=sentiment", "algo=ra_dpo", "risk=cvar",
                        "alpha=0.1,0.25", "beta=0.1,0.5", "logger=none", "name=report2x2", *SHORT, *TINY_EVAL,
                        runs_dir=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "sweeps" / "report2x2"
    report = module_cli("riskexp.report", str(sweep), runs_dir=tmp_path)
    assert report.returncode == 0, report.stderr
    table = [line for line in (sweep / "report.md").read_text().splitlines() if line.startswith("|")]
    assert len(table) == 2 + 4  # header, rule, four (alpha, beta) rows
    assert (sweep / "reward_vs_kl.png").exists() and (sweep / "cvar_vs_alpha.png").exists()
