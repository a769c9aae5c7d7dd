"""Resume after a crash: checkpoints, signals, and a killed run that ends as an uninterrupted one would."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from riskexp.resume import EpochShuffle, LoaderProgress, ResumableLoader

REPO = Path(__file__).resolve().parents[1]
# DPO on the tiny model: fast steps (no vocabulary terms in training); 21 batches per epoch, so 45 steps cross two
# epoch boundaries and a kill lands mid-epoch
TRAINING = ["experiment=smoke", "algo=dpo", "trainer.deterministic=true", "trainer.enable_progress_bar=false"]


def launch(runs_dir: Path, *overrides: str, logger: str = "none") -> subprocess.Popen:
    env = os.environ | {"RISKEXP_RUNS": str(runs_dir), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "riskexp", *TRAINING, f"logger={logger}", *overrides], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _, stderr = process.communicate(timeout=timeout)
    return process.returncode, stderr


def wait_for(condition, process: subprocess.Popen, timeout: float = 180, what: str = "") -> None:
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended (rc {process.returncode}) before {what}: {process.stderr.read()[-3000:]}")
        if time.time() > deadline:
            process.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def run_dir(runs_dir: Path) -> Path:
    dirs = [p.parent for p in runs_dir.glob("smoke/*/riskexp.log")]
    assert len(dirs) == 1, dirs
    return dirs[0]


def metrics(results: dict) -> dict:
    return {k: v for k, v in results.items() if k.startswith(("train/", "val/", "eval/")) or k == "steps"}


def test_loader_resumes_mid_epoch_in_the_same_order():
    features = list(range(10))

    def batches(loader):
        return [b.tolist() for b in loader]

    def make(progress=None):
        return ResumableLoader(features, batch_size=3, sampler=EpochShuffle(len(features), seed=4), progress=progress)

    loader = make()
    loader.sampler.set_epoch(2)
    epoch_two = batches(loader)
    assert sorted(sum(epoch_two, [])) == features
    loader.sampler.set_epoch(1)
    assert batches(loader) != epoch_two, "each epoch has its own order"

    progress = LoaderProgress()  # a fresh process: the order depends on (seed, epoch) only
    progress.restore({"epoch": 2, "batches_done": 2})
    restarted = make(progress)
    assert batches(restarted) == epoch_two[2:]
    restarted.sampler.set_epoch(2)
    assert batches(restarted) == epoch_two, "the skip applies to the first iteration after a restore only"
    assert progress.state() == {"epoch": 2, "batches_done": 2}
    assert isinstance(epoch_two[0][0], int) and torch.is_tensor(next(iter(make())))


@pytest.mark.slow
def test_run_killed_with_sigkill_resumes_to_the_metrics_of_an_uninterrupted_run(tmp_path):
    overrides = ("trainer.max_steps=45", "trainer.max_epochs=5", "trainer.checkpoint_every_n_steps=4")
    code, stderr = finish(launch(tmp_path / "whole", *overrides))
    assert code == 0, stderr[-3000:]
    uninterrupted = json.loads((run_dir(tmp_path / "whole") / "results.json").read_text())

    runs = tmp_path / "killed"
    first = launch(runs, *overrides, logger="wandb")
    wait_for(lambda: list(runs.glob("smoke/*/checkpoints/last.ckpt")), first, what="the first checkpoint")
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    directory = run_dir(runs)
    assert not (directory / "results.json").exists(), "killed before the end"
    killed_at = torch.load(directory / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert 0 < killed_at < 45

    code, stderr = finish(launch(runs, *overrides, logger="wandb"))
    assert code == 0, stderr[-3000:]
    assert f"resuming from {directory / 'checkpoints' / 'last.ckpt'}" in (directory / "riskexp.log").read_text()
    resumed = json.loads((directory / "results.json").read_text())
    assert resumed["steps"] == uninterrupted["steps"] == 45
    assert metrics(resumed).keys() == metrics(uninterrupted).keys()
    for key, value in metrics(uninterrupted).items():
        assert resumed[key] == pytest.approx(value, abs=1e-6, rel=1e-6), key
    # the relaunch continued the same W&B run, and the finished run dropped its checkpoint
    run_id = (directory / "run_id").read_text().strip()
    offline_runs = sorted(directory.glob("wandb/offline-run-*"))
    assert len(offline_runs) == 2 and all(p.name.endswith(f"-{run_id}") for p in offline_runs)
    assert not (directory / "checkpoints" / "last.ckpt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_checkpoint_and_exit_nonzero(tmp_path, signum):
    process = launch(tmp_path, "trainer.max_steps=100000", "trainer.max_epochs=-1")
    log_file = lambda: next(tmp_path.glob("smoke/*/riskexp.log"), None)  # noqa: E731
    wait_for(lambda: log_file() and "training from step" in log_file().read_text(), process, what="training")
    directory = run_dir(tmp_path)
    checkpoint = directory / "checkpoints" / "last.ckpt"
    if signum == signal.SIGTERM:  # SIGUSR1 first: a checkpoint, and training goes on
        process.send_signal(signal.SIGUSR1)
        wait_for(checkpoint.exists, process, what="the SIGUSR1 checkpoint")
        time.sleep(0.5)
        assert process.poll() is None, "SIGUSR1 does not stop training"
    process.send_signal(signum)
    code, stderr = finish(process, timeout=120)
    assert code == 128 + signum, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("interrupted at step")]
    assert len(lines) == 1 and lines[0].endswith("relaunch the same command to resume"), stderr[-3000:]
    step = int(lines[0].split()[3].rstrip(";"))
    assert torch.load(checkpoint, weights_only=False)["global_step"] == step > 0
    assert not (directory / "results.json").exists()
