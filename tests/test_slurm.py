"""A --multirun through the SLURM launcher on a real single-node SLURM cluster (shared/slurm/slurm_local.sh)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SLURM_LOCAL = REPO.parent / "shared" / "slurm" / "slurm_local.sh"


@pytest.fixture
def slurm_cluster(tmp_path):
    if not SLURM_LOCAL.exists() or os.geteuid() != 0:
        pytest.skip("needs root and shared/slurm/slurm_local.sh beside the checkout")
    state = tmp_path / "slurm"
    subprocess.run(["bash", str(SLURM_LOCAL), "start", str(state)], check=True, capture_output=True, timeout=300)
    try:
        yield {"SLURM_CONF": str(state / "slurm.conf")}
    finally:
        subprocess.run(["bash", str(SLURM_LOCAL), "stop", str(state)], capture_output=True, timeout=120)


@pytest.mark.slow
def test_sweep_runs_as_a_slurm_job_array(slurm_cluster, tmp_path):
    env = os.environ | slurm_cluster | {"RISKEXP_RUNS": str(tmp_path / "runs"), "RISKEXP_SLURM_PARTITION": "debug",
                                        "RISKEXP_SLURM_CPUS": "1", "RISKEXP_SLURM_MEM_GB": "3", "WANDB_MODE": "disabled"}
    result = subprocess.run(
        [sys.executable, "-m", "riskexp", "--multirun", "hydra/launcher=slurm", "hydra.launcher.timeout_min=10",
         "hydra.launcher.signal_delay_s=30", "experiment=smoke", "logger=none", "trainer.max_steps=1",
         "alpha=0.1,0.2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "runs" / "sweeps" / "smoke"
    assert len(list(sweep.rglob("results.json"))) == 2
    assert list(sweep.glob(".submitit/*")), "the jobs went through submitit"


@pytest.mark.slow
def test_job_past_its_time_limit_is_requeued_and_resumes(slurm_cluster, tmp_path):
    """A 1-minute SLURM time limit and a longer training: submitit's signal (USR2, `signal_delay_s` before the limit)
    makes the run checkpoint and requeue itself; the requeued job resumes from the checkpoint and finishes."""
    runs = tmp_path / "runs"
    env = os.environ | slurm_cluster | {"RISKEXP_RUNS": str(runs), "RISKEXP_SLURM_PARTITION": "debug",
                                        "RISKEXP_SLURM_CPUS": "1", "RISKEXP_SLURM_MEM_GB": "3", "WANDB_MODE": "disabled"}
    result = subprocess.run(
        [sys.executable, "-m", "riskexp", "--multirun", "hydra/launcher=slurm", "hydra.launcher.timeout_min=1",
         "hydra.launcher.signal_delay_s=25", "hydra.launcher.max_num_timeout=5", "experiment=smoke", "algo=dpo",
         "logger=none", "trainer.max_steps=120", "trainer.max_epochs=-1", "trainer.enable_progress_bar=false"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = [p.parent for p in (runs / "sweeps" / "smoke").rglob("results.json")]
    log = (run_dir / "riskexp.log").read_text()
    for step in ("handing SIGUSR2 over to the launcher", "Requeued job", "resuming from"):  # riskexp, submitit, riskexp
        assert step in log, log[-3000:]
    assert json.loads((run_dir / "results.json").read_text())["steps"] == 120


@pytest.mark.slow
def test_a_stepwise_sweep_on_slurm_trains_step_1_once(slurm_cluster, tmp_path):
    """Two lambdas as a 2-task job array running at once: one task trains step 1 under the lock, the other waits
    and reuses it."""
    runs = tmp_path / "runs"
    env = os.environ | slurm_cluster | {"RISKEXP_RUNS": str(runs), "RISKEXP_SLURM_PARTITION": "debug",
                                        "RISKEXP_SLURM_CPUS": "1", "RISKEXP_SLURM_MEM_GB": "3", "WANDB_MODE": "disabled"}
    result = subprocess.run(
        [sys.executable, "-m", "riskexp", "--multirun", "hydra/launcher=slurm", "hydra.launcher.timeout_min=10",
         "hydra.launcher.signal_delay_s=30", "experiment=smoke", "logger=none", "algo=sacpo", "lam=1,4"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = runs / "sweeps" / "smoke"
    records = [json.loads(p.read_text()) for p in sorted(sweep.rglob("results.json"))]
    assert [(r["step"], r["lam"]) for r in records] == [(2, 1.0), (2, 4.0)]
    (step1,) = [p.parent for p in (runs / "steps").glob("*/results.json")]
    assert {r["step1_dir"] for r in records} == {str(step1)}
    logs = "".join(p.read_text() for p in sweep.rglob("riskexp.log"))
    assert logs.count("step 1 (helpfulness): training in") == 1 and logs.count("step 1 (helpfulness): reusing") == 1
