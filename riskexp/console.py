"""What a run prints: each log line once, and no known-harmless third-party notices.

Hydra's root handlers write every record to the console and to `<run>/riskexp.log`. Lightning adds a console
handler of its own to the `lightning` logger when imported, so each of its INFO lines would appear twice.
"""

from __future__ import annotations

import logging
import sys
import warnings

import lightning as L

log = logging.getLogger("riskexp")

# Lightning's notices that say nothing about this run: an advert, and the echo of settings riskexp chose itself
LIGHTNING_NOTICES = (
    "Tip: For seamless cloud logging",
    "was configured so 100% of the batches will be used",
    "was configured so validation will run",
)
WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\).*",  # Lightning's own use of a deprecated torch API
    r"The `srun` command is available on your system but is not used",  # riskexp's launcher uses srun itself
)


class _DropNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(notice in message for notice in LIGHTNING_NOTICES)


def tidy_third_party_output() -> None:
    """Call after importing lightning: one copy of each Lightning line, and its notices above silenced."""
    if logging.getLogger().handlers:  # Hydra (or the caller) already prints every record
        lightning_logger = logging.getLogger("lightning")
        for handler in list(lightning_logger.handlers):
            if type(handler) is logging.StreamHandler:
                lightning_logger.removeHandler(handler)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        source = logging.getLogger(name)
        if not any(isinstance(f, _DropNotices) for f in source.filters):
            source.addFilter(_DropNotices())
    for message in WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    if not sys.stderr.isatty():  # carriage-return bars would fill log files and redirected output with junk
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


class StepLines(L.Callback):
    """Without a progress bar (output that is not a terminal), one log line every `log_every_n_steps` optimizer
    steps: `step 12/24  train/loss=0.6931`."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.progress_bar_callback is not None or trainer.global_step == self._logged_at:
            return
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            self._logged_at = trainer.global_step
            total = trainer.max_steps if trainer.max_steps > 0 else int(trainer.estimated_stepping_batches)
            loss = trainer.callback_metrics.get("train/loss")
            log.info("step %d/%d%s", trainer.global_step, total, f"  train/loss={float(loss):.4f}" if loss is not None else "")

    _logged_at = -1


def wandb_logger(**kwargs):
    """Lightning's WandbLogger (`conf/logger/wandb.yaml`) without the `anonymous` setting it always passes to
    `wandb.init`, which W&B no longer takes and warns about on every run."""
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(**kwargs)
    logger._wandb_init.pop("anonymous", None)
    return logger
