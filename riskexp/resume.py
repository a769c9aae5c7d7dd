"""Checkpoints a run can resume from, and what a run does when it is told to stop.

A run keeps one checkpoint, `<run>/checkpoints/last.ckpt` (policy, optimizer, scheduler and loop state; never the
frozen reference), written atomically every `trainer.checkpoint_every_n_steps` optimizer steps and at the end of
training. A relaunch of the same command finds it and resumes from it, mid-epoch included: the training loader
(`ResumableLoader`) skips the batches the checkpoint has already trained on, in the same order.

Signals (caught only while training; elsewhere the defaults apply):
- SIGINT (Ctrl-C) and SIGTERM (`scancel`, SLURM at a time limit): checkpoint at the end of the current optimizer
  step, print one line, exit 128 + signal number, no results.json.
- SIGUSR1 (SLURM's warning before preemption or a time limit): checkpoint, keep training.
- SIGUSR2 (submitit's time-limit signal): checkpoint, then hand over to submitit's handler, which requeues the job;
  the requeued job resumes from the checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from riskexp.files import atomic_write_text

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
CHECKPOINT_CONFIG = "config.json"
RUN_ID_FILE = "run_id"

STOPPING_SIGNALS = (signal.SIGINT, signal.SIGTERM)
SAVING_SIGNALS = (signal.SIGUSR1,)
# submitit's own handler of this signal requeues the job: it runs after the checkpoint is written
HANDED_OVER_SIGNALS = (signal.SIGUSR2,)


class RunInterrupted(SystemExit):
    """Raised at a step boundary after SIGINT / SIGTERM once the checkpoint is written. A SystemExit, so the process
    exits 128 + signal number without a traceback and the run is not marked failed."""

    def __init__(self, signum: int, step: int):
        super().__init__(128 + signum)
        self.signum, self.step = signum, step


def last_checkpoint(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / LAST_CHECKPOINT


def run_id(run_dir: Path) -> str:
    """The run's id, kept in `<run>/run_id` so a resumed run logs into the same W&B run. A fresh run directory (or
    one cleared by `rerun=true`) gets a new random id."""
    path = Path(run_dir) / RUN_ID_FILE
    if path.exists():
        return path.read_text().strip()
    value = secrets.token_hex(4)
    atomic_write_text(path, value + "\n")
    return value


def forget_run(run_dir: Path) -> None:
    """Drop the checkpoint and run id of a run directory (before `rerun=true` trains it again from scratch)."""
    for path in (last_checkpoint(run_dir), last_checkpoint(run_dir).with_name(CHECKPOINT_CONFIG),
                 Path(run_dir) / RUN_ID_FILE):
        path.unlink(missing_ok=True)


class ResumableLoader(DataLoader):
    """A DataLoader that can continue mid-epoch after a restart: `progress()` is (epoch, batches training finished
    in it) and `resume(progress)` makes the next iteration start there, in the same order. The count is set by
    `Checkpointing` before each save (the loader cannot count: Lightning prefetches batches); the order must
    depend on the epoch alone (`EpochShuffle`).

    Lightning's own resumable-loader path is not used: it restores loader states only if the loader is built after
    the restore, and `trainer.estimated_stepping_batches` (the LR schedule's length) builds it before. The data
    module carries the progress instead, through its `state_dict`, which Lightning restores first."""

    batches_done = 0
    _skip = 0

    def progress(self) -> dict:
        return {"epoch": getattr(self.sampler, "epoch", 0), "batches_done": self.batches_done}

    def resume(self, progress: dict) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(int(progress["epoch"]))
        self._skip = self.batches_done = int(progress["batches_done"])

    def __iter__(self):
        iterator = super().__iter__()
        skip, self._skip = self._skip, 0
        for _ in range(skip):
            next(iterator)
        return iterator


class EpochShuffle(torch.utils.data.Sampler):
    """A random order of `range(n)` that depends only on (seed, epoch): the same after a restart as it was before.
    Lightning calls `set_epoch` at every epoch start."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + 1_000_003 * self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())


class Checkpointing(L.Callback):
    """Writes `last.ckpt` every `every_n_steps` optimizer steps (0: only at the end of training and on signals) and
    turns the signals above into a checkpoint at the next optimizer-step boundary."""

    def __init__(self, run_dir: Path, every_n_steps: int):
        self.path = last_checkpoint(run_dir)
        self.every_n_steps = every_n_steps
        self._signal: int | None = None
        self._previous_handlers: dict[int, object] = {}
        self._step_at_last_batch = -1
        self.train_metrics: dict[str, float] = {}  # the last train/* values, kept across a resume

    def state_dict(self) -> dict:
        return {"train_metrics": self.train_metrics}

    def load_state_dict(self, state: dict) -> None:
        self.train_metrics = dict(state.get("train_metrics", {}))

    # --- signals -------------------------------------------------------------------------------------------

    def _note_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self._signal == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C does not wait for the step to end
        self._signal = signum
        log.info("received %s; checkpointing at the end of this optimizer step", signal.Signals(signum).name)

    def on_train_start(self, trainer, pl_module) -> None:
        log.info("training from step %d", trainer.global_step)
        self._step_at_last_batch = trainer.global_step
        for signum in (*STOPPING_SIGNALS, *SAVING_SIGNALS, *HANDED_OVER_SIGNALS):
            self._previous_handlers[signum] = signal.signal(signum, self._note_signal)

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore_handlers()

    # --- saving --------------------------------------------------------------------------------------------

    def save(self, trainer) -> None:
        """Write last.ckpt atomically: a kill during the write leaves the previous checkpoint whole."""
        tmp = self.path.with_name(f".{LAST_CHECKPOINT}.tmp")
        trainer.save_checkpoint(tmp)
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
        trainer.strategy.barrier("riskexp_checkpoint")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loader = trainer.train_dataloader
        if isinstance(loader, ResumableLoader):
            # after the epoch's last batch a restart begins the next epoch (Lightning's loop state says so)
            loader.batches_done = batch_idx + 1 if batch_idx + 1 < trainer.num_training_batches else 0
        self.train_metrics |= {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        stepped = trainer.global_step != self._step_at_last_batch
        self._step_at_last_batch = trainer.global_step
        if not stepped:  # mid gradient-accumulation: a checkpoint here would lose the accumulated gradients
            return
        # every rank must take the same decision: a signal may reach only some of them
        signalled = trainer.strategy.reduce_boolean_decision(self._signal is not None, all=False)
        periodic = self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0
        if signalled or periodic:
            self.save(trainer)
        if not signalled:
            return
        signum = self._signal if self._signal is not None else signal.SIGTERM
        self._signal = None
        if signum in SAVING_SIGNALS:
            log.info("checkpoint written at step %d (%s); training goes on", trainer.global_step, self.path)
            return
        previous = self._previous_handlers.get(signum)
        self._restore_handlers()
        if signum in HANDED_OVER_SIGNALS and callable(previous):
            log.info("checkpoint written at step %d; handing %s over to the launcher", trainer.global_step,
                     signal.Signals(signum).name)
            # requeueing makes SLURM send SIGTERM to every process of the job, the `scontrol requeue` that
            # submitit runs included: ignored here (and so in scontrol, which inherits it), the requeue completes
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            previous(signum, None)  # submitit requeues the job and exits
        print(f"interrupted at step {trainer.global_step}; relaunch the same command to resume", file=sys.stderr,
              flush=True)
        raise RunInterrupted(signum, trainer.global_step)

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_handlers()
        # a crash during the evaluation that follows resumes here instead of training again
        self.save(trainer)


def check_checkpoint_config(run_dir: Path, config: dict, differences) -> None:
    """Record the config a checkpoint belongs to, or check that a resumed run has the same one.

    `differences(old, new)` lists (key, old, new) triples (riskexp.results.config_differences); a mismatch raises
    ConfigError naming them, so a changed command never continues someone else's training."""
    from riskexp.schema import ConfigError

    path = last_checkpoint(run_dir).with_name(CHECKPOINT_CONFIG)
    if not path.exists() or not last_checkpoint(run_dir).exists():  # nothing to resume: this config starts it
        atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        return
    changed = differences(json.loads(path.read_text()), config)
    if changed:
        listed = "; ".join(f"{key}: {old!r} in the checkpoint, {new!r} now" for key, old, new in changed)
        raise ConfigError(f"{run_dir} holds a checkpoint of a different config ({listed}); relaunch the same "
                          "command to resume it, or pass rerun=true to train from scratch")
