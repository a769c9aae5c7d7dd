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
        # Hydra's own message: the schema of each algorithm lacks the other algorithms' knobs
        (["algo=ipo", "algo.label_smoothing=0.1"], ["label_smoothing", "IPOConfig"]),
        (["algo=dpo", "algo.variant=2"], ["variant", "DPOConfig"]),
        (["algo=ra_dpo", "algo.precompute_ref_logps=true"], ["precompute_ref_logps", "RaDPOConfig"]),
        # riskexp's: one line naming the key
        (["algo=ipo", "+algo.label_smoothing=0.1"], ["algo.label_smoothing is not a key of algo=ipo"]),
        (["+algo.kl_wieght=0.5"], ["algo.kl_wieght is not a key of algo=ra_dpo", "did you mean algo.kl_weight?"]),
        (["risk.alpha=0.1"], ["risk.alpha=0.1", "set alpha=0.1 instead"]),
        (["data=local"], ["data.source.path is missing", "data.source.path=VALUE"]),
        (["optimizer.lr=abc"], ["optimizer.lr='abc'", "a number"]),
        (["+trainer.max_step=5"], ["trainer.max_step is not a key of trainer=cpu", "did you mean trainer.max_steps?"]),
        (["--multirun", "experiment=smoke", "algo=dpo,ipo", "++algo.label_smoothing=0.1"],
         ["sweep job experiment=smoke algo=ipo", "algo.label_smoothing is not a key of algo=ipo"]),
    ],
)
def test_bad_configurations_fail_fast_with_a_clear_message(tmp_path, args, expected):
    result, seconds = riskexp(*args, runs_dir=tmp_path)
    assert result.returncode != 0
    for text in expected:
        assert text in result.stderr, result.stderr
    if result.returncode == 2:  # riskexp's ConfigError (Hydra's own errors exit 1): one line says it all
        assert any(all(text in line for text in expected) for line in result.stderr.splitlines()), result.stderr
    assert "Traceback" not in result.stderr
    assert seconds < 20, f"took {seconds:.1f}s: validation must come before any model loads"
    assert not list(tmp_path.rglob("results.json"))


@pytest.mark.parametrize("module, args", [("riskexp.eval", ["+eval.num_prompt=4"]),
                                          ("riskexp.data.build", ["data=sentiment", "+data.build.kk=2"])])
def test_every_command_reports_configuration_errors_the_same_way(tmp_path, module, args):
    environment = os.environ | {"RISKEXP_RUNS": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                            timeout=120, env=environment)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "riskexp: configuration error:" in result.stderr and args[-1].split("=")[0][1:] in result.stderr
    assert "Traceback" not in result.stderr
    failed = list(tmp_path.rglob("failed.json"))
    assert len(failed) == 1 and json.loads(failed[0].read_text())["error"] == "ConfigError"


def test_a_failing_run_leaves_its_traceback_and_a_failed_mark(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "Hi", "chosen": "Hello."}\n' * 8)  # no `rejected`: fails after the model loads
    args = ["experiment=smoke", "logger=none", "data=local", f"data.source.path={pairs}"]
    result, _ = riskexp(*args, runs_dir=tmp_path)
    assert result.returncode == 1
    run_dir = next(tmp_path.rglob("failed.json")).parent
    failed = json.loads((run_dir / "failed.json").read_text())
    assert failed["overrides"] == args and failed["error"] and failed["message"] and failed["time"]
    # one line on stderr names the error and where its traceback is: the run's own log
    lines = [line for line in result.stderr.splitlines() if line.startswith("riskexp: ")]
    assert lines and failed["message"] in lines[-1] and str(run_dir / "riskexp.log") in lines[-1], result.stderr
    assert "Traceback (most recent call last)" in (run_dir / "riskexp.log").read_text()
    assert not (run_dir / "results.json").exists()


def test_the_handler_marks_failures_and_a_later_success_clears_the_mark(tmp_path):
    from helpers import compose_config

    from riskexp.cli import RunFailed, run_command
    from riskexp.schema import ConfigError

    cfg = compose_config(["experiment=smoke"], output_dir=tmp_path)

    def fails_with(error):
        def command(cfg):
            raise error
        return command

    with pytest.raises(SystemExit) as stop:
        run_command(fails_with(ConfigError("alpha=2 is not accepted")), cfg)
    assert stop.value.code == 2
    assert json.loads((tmp_path / "failed.json").read_text())["error"] == "ConfigError"
    with pytest.raises(RunFailed, match="RuntimeError: out of memory"):
        run_command(fails_with(RuntimeError("out of memory")), cfg)
    failed = json.loads((tmp_path / "failed.json").read_text())
    assert failed["error"] == "RuntimeError" and "out of memory" in failed["traceback"]
    assert run_command(lambda cfg: {"val/loss": 0.5}, cfg) == {"val/loss": 0.5}
    assert not (tmp_path / "failed.json").exists()
    # a finished directory stays finished when a relaunch is refused (e.g. a changed config)
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(SystemExit):
        run_command(fails_with(ConfigError("a different config")), cfg)
    assert not (tmp_path / "failed.json").exists()


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
    # each Lightning line once (Hydra prints it; Lightning's own console handler is gone), no harmless notices
    output = result.stdout + result.stderr
    assert not [line for line in output.splitlines() if line.startswith("INFO: ")], output[-3000:]
    for noise in ("litlogger", "limit_val_batches", "val_check_interval", "LeafSpec", "anonymous setting",
                  "`srun` command is available", "`weights_only` was not set"):
        assert noise not in output, noise
    assert output.count("GPU available") == 2  # once per job
    # not a terminal: no carriage-return progress bars, a log line per step instead
    assert "\r" not in output and output.count("step 1/1  train/loss=") == 2, output[-3000:]
    # alpha does not change DPO's training: said once, before the first job starts, naming the identical jobs
    warning = "riskexp: warning: alpha=0.05,0.1 does not change training in any job"
    assert result.stderr.count(warning) == 1 and result.stderr.startswith(warning)  # the first thing said
    assert "2 of 2 jobs train the same policy as another job" in result.stderr
    assert "  alpha=0.05 | alpha=0.1" in result.stderr
    # the sweep ends with the command that tabulates it
    assert result.stderr.rstrip().endswith(f"tables and plots: riskexp report {sweep}")
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


@pytest.mark.parametrize("module, usage", [("riskexp", "python -m riskexp [group=option"),
                                           ("riskexp.eval", "python -m riskexp.eval data="),
                                           ("riskexp.data.build", "python -m riskexp.data.build data=")])
def test_help_opens_with_usage_and_lists_only_user_facing_groups(module, usage):
    result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("riskexp: ") and usage in result.stdout
    groups = result.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    assert ("algo: cost_model, dpo, ipo, kto, ppo, ppo_lag, ra_dpo, ra_rlhf, reward_model, rsa, sacpo, sft, tdpo" in groups
            and "risk: cvar, entropic, mean" in groups)
    assert "schema" not in groups
