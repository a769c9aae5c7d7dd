"""The command line as a user runs it: fast failures on bad input, sweeps into one directory, W&B offline."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def riskexp(*args, runs_dir, env=None, timeout=600):
    environment = os.environ | {"RISKEXP_RUNS": str(runs_dir), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    environment.pop("WANDB_DISABLED", None)
    started = time.time()
    result = subprocess.run([sys.executable, "-m", "riskexp", *args], cwd=REPO, capture_output=True, text=True,
                            timeout=timeout, env=environment | (env or {}))
    return result, time.time() - started


@pytest.mark.parametrize(
    "args, expected",
    [
        (["alpha=1.5"], ["alpha=1.5", "(0, 1]"]),
        (["alpha=0"], ["alpha=0", "(0, 1]"]),
        (["beta=-1"], ["beta=-1", "> 0"]),
        (["risk=foo"], ["risk/foo", "cvar", "entropic", "mean"]),
        (["algo=nope"], ["algo/nope", "dpo", "ra_dpo"]),
        (["--multirun", "experiment=smoke", "alpha=0.1,1.5"], ["sweep job", "alpha=1.5", "(0, 1]"]),
    ],
)
def test_bad_configurations_fail_fast_with_a_clear_message(tmp_path, args, expected):
    result, seconds = riskexp(*args, runs_dir=tmp_path)
    assert result.returncode != 0
    for text in expected:
        assert text in result.stderr, result.stderr
    assert seconds < 20, f"took {seconds:.1f}s: validation must come before any model loads"
    assert not list(tmp_path.rglob("results.json"))


def results_under(directory):
    return sorted(directory.rglob("results.json"))


def test_multirun_writes_one_results_per_job_in_one_sweep_dir(tmp_path):
    result, _ = riskexp("--multirun", "experiment=smoke", "algo=dpo", "risk=cvar", "alpha=0.05,0.1",
                        "trainer.max_steps=1", runs_dir=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "sweeps" / "smoke"
    found = results_under(sweep)
    assert [p.parent.name for p in found] == ["algo=dpo,alpha=0.05,risk=cvar,trainer.max_steps=1",
                                              "algo=dpo,alpha=0.1,risk=cvar,trainer.max_steps=1"]
    assert [json.loads(p.read_text())["alpha"] for p in found] == [0.05, 0.1]
    # each job finished its own offline W&B run (an unfinished run would swallow the next job's logging)
    offline_runs = sorted(sweep.glob("*/wandb/offline-run-*"))
    assert len(offline_runs) == 2 and offline_runs[0].parent.parent != offline_runs[1].parent.parent
    # relaunching the same sweep skips the finished jobs
    again, _ = riskexp("--multirun", "experiment=smoke", "algo=dpo", "risk=cvar", "alpha=0.05,0.1",
                       "trainer.max_steps=1", runs_dir=tmp_path)
    assert again.returncode == 0 and "skipping" in again.stderr + again.stdout


@pytest.mark.slow
def test_issue_sweeps_algo_by_risk_and_alpha_by_beta(tmp_path):
    """The two acceptance sweeps: 4 algos x 3 risks (12 runs) and 2 alphas x 2 betas (4 runs in one dir)."""
    result, _ = riskexp("--multirun", "experiment=smoke", "algo=dpo,ipo,tdpo,ra_dpo", "risk=mean,cvar,entropic",
                        "alpha=0.1", "logger=none", runs_dir=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(results_under(tmp_path / "sweeps" / "smoke")) == 12
    result, _ = riskexp("--multirun", "experiment=smoke", "algo=ra_dpo", "risk=cvar", "alpha=0.05,0.1",
                        "beta=0.1,0.5", "name=alpha_beta", "logger=none", runs_dir=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(results_under(tmp_path / "sweeps" / "alpha_beta")) == 4
