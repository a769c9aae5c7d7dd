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
from dataclasses import dataclass
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
# when several arrive before a step ends, the most consequential wins: a requeue, then a stop, then a save
URGENCY = {**dict.fromkeys(SAVING_SIGNALS, 0), **dict.fromkeys(STOPPING_SIGNALS, 1),
           **dict.fromkeys(HANDED_OVER_SIGNALS, 2)}


class RunInterrupted(SystemExit):
    """Raised at a step boundary after SIGINT / SIGTERM once the checkpoint is written. A SystemExit, so the process
    exits 128 + signal number without a traceback and the run is not marked failed."""

    def __init__(self, signum: int, step: int):
        super().__init__(128 + signum)
        self.signum, self.step = signum, step


def last_checkpoint(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / LAST_CHECKPOINT


def checkpoint_config(run_dir: Path) -> Path:
    """The resolved config the checkpoint belongs to, beside it."""
    return last_checkpoint(run_dir).with_name(CHECKPOINT_CONFIG)


def _is_rank_zero() -> bool:
    # under DDP every rank runs the command; only rank 0 writes the run directory's bookkeeping files
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def run_id(run_dir: Path) -> str | None:
    """The run's id, kept in `<run>/run_id` so a resumed run logs into the same W&B run. A fresh run directory (or
    one cleared by `rerun=true`) gets a new random id; ranks other than 0 (which log nothing) read it or get None."""
    path = Path(run_dir) / RUN_ID_FILE
    if path.exists():
        return path.read_text().strip()
    if not _is_rank_zero():
        return None
    value = secrets.token_hex(4)
    atomic_write_text(path, value + "\n")
    return value


def forget_checkpoint(run_dir: Path) -> None:
    """Drop a run directory's checkpoint and the config it belongs to (the run id stays)."""
    if _is_rank_zero():
        for path in (last_checkpoint(run_dir), checkpoint_config(run_dir)):
            path.unlink(missing_ok=True)
        folder = last_checkpoint(run_dir).parent
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def checkpoint_to_resume(run_dir: Path, config: dict, rerun: bool = False, from_scratch: bool = False) -> Path | None:
    """The checkpoint a run starts from, or None; records the config a new checkpoint will belong to.

    `from_scratch` (rerun=true of a finished run) drops the checkpoint and run id. A checkpoint of a different
    config (`riskexp.results.run_config`) is refused, naming the keys, so a changed command never continues
    another run's training; rerun=true drops it instead. A SLURM requeue relaunches the very command, so it
    resumes even with rerun=true on its command line."""
    from riskexp.results import config_differences, format_differences
    from riskexp.schema import ConfigError

    checkpoint, recorded = last_checkpoint(run_dir), checkpoint_config(run_dir)
    if from_scratch:
        forget_checkpoint(run_dir)
        if _is_rank_zero():
            (Path(run_dir) / RUN_ID_FILE).unlink(missing_ok=True)
    if checkpoint.exists() and recorded.exists():
        differences = config_differences(json.loads(recorded.read_text()), config)
        if differences and not (rerun or from_scratch):
            raise ConfigError(f"{checkpoint} belongs to a different config (checkpoint -> this command):\n"
                              f"{format_differences(differences)}\nrelaunch the same command to resume it, "
                              "or pass rerun=true to train from scratch")
        if differences:
            forget_checkpoint(run_dir)
    if checkpoint.exists():
        return checkpoint
    if _is_rank_zero():
        atomic_write_text(recorded, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return None


@dataclass
class LoaderProgress:
    """Where training stands in the epoch order. Shared by a ResumableLoader and the copy Lightning makes of it
    under DDP (built again from the same constructor arguments, with a distributed sampler)."""

    epoch: int = 0
    batches_done: int = 0  # batches training has finished in `epoch`, set by Checkpointing before each save
    skip: int = 0  # batches the next iteration skips: a restored batches_done

    def state(self) -> dict:
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def restore(self, state: dict) -> None:
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])
        self.skip = self.batches_done


class ResumableLoader(DataLoader):
    """A DataLoader that continues mid-epoch after a restart: after `progress.restore(...)` its next iteration
    starts at the restored epoch's next batch, in the same order (the sampler's order must depend on the epoch
    alone: EpochShuffle, or Lightning's distributed sampler). The loader cannot count batches itself: Lightning
    prefetches.

    Lightning's own resumable-loader path is not used: it restores loader states only if the loader is built after
    the restore, and `trainer.estimated_stepping_batches` (the LR schedule's length) builds it before. The data
    module carries the progress instead, through its `state_dict`, which Lightning restores first."""

    def __init__(self, *args, progress: LoaderProgress | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.progress = progress if progress is not None else LoaderProgress()

    def __iter__(self):
        skip, self.progress.skip = self.progress.skip, 0
        if skip and hasattr(self.sampler, "set_epoch"):
            # the first iteration after a restore is built before Lightning sets the epoch
            self.sampler.set_epoch(self.progress.epoch)
        iterator = super().__iter__()
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
        self._saved_at_step = -1
        self.train_metrics: dict[str, float] = {}  # the last train/* values, kept across a resume

    def state_dict(self) -> dict:
        return {"train_metrics": self.train_metrics}

    def load_state_dict(self, state: dict) -> None:
        self.train_metrics = dict(state.get("train_metrics", {}))

    # --- signals -------------------------------------------------------------------------------------------

    def _note_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self._signal == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C does not wait for the step to end
        if self._signal is None or URGENCY[signum] >= URGENCY[self._signal]:
            self._signal = signum
        log.info("received %s; checkpointing at the end of this optimizer step", signal.Signals(signum).name)

    def on_train_start(self, trainer, pl_module) -> None:
        log.info("training from step %d", trainer.global_step)
        self._step_at_last_batch = self._saved_at_step = trainer.global_step  # a resume starts from a saved step
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
        if self._saved_at_step == trainer.global_step:  # e.g. the end of training on a periodic step
            return
        self._saved_at_step = trainer.global_step
        tmp = self.path.with_name(f".{LAST_CHECKPOINT}.tmp")
        trainer.save_checkpoint(tmp, weights_only=False)  # the whole state: optimizer, loops, loader progress
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
        trainer.strategy.barrier("riskexp_checkpoint")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loader = trainer.train_dataloader
        if isinstance(loader, ResumableLoader):
            # after the epoch's last batch a restart begins the next epoch (Lightning's loop state says so)
            end_of_epoch = batch_idx + 1 >= trainer.num_training_batches
            loader.progress.epoch = trainer.current_epoch + end_of_epoch
            loader.progress.batches_done = 0 if end_of_epoch else batch_idx + 1
        self.train_metrics |= {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        stepped = trainer.global_step != self._step_at_last_batch
        self._step_at_last_batch = trainer.global_step
        if not stepped:  # mid gradient-accumulation: a checkpoint here would lose the accumulated gradients
            return
        # every rank must take the same decision: a signal may reach only some of them
        signalled = trainer.strategy.reduce_boolean_decision(self._signal is not None, all=False)
        if signalled or (self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0):
            self.save(trainer)
        if signalled:
            self._obey_signal(trainer, training_goes_on=True)

    def on_train_end(self, trainer, pl_module) -> None:
        # a crash during the evaluation that follows resumes here instead of training again
        self.save(trainer)
        signalled = trainer.strategy.reduce_boolean_decision(self._signal is not None, all=False)
        if signalled:  # it came during the last step or the last validation: still no results.json
            self._obey_signal(trainer, training_goes_on=False)
        self._restore_handlers()

    def _obey_signal(self, trainer, training_goes_on: bool) -> None:
        """After the checkpoint is written: go on (SIGUSR1), hand over to the launcher (SIGUSR2) or stop."""
        signum = self._signal if self._signal is not None else signal.SIGTERM  # another rank's signal
        self._signal = None
        if signum in SAVING_SIGNALS:
            log.info("checkpoint written at step %d (%s)%s", trainer.global_step, self.path,
                     "; training goes on" if training_goes_on else "")
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
