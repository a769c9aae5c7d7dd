"""What a run prints: each log line once, and no known-harmless third-party notices.

Hydra's root handlers write every record to the console and to `<run>/riskexp.log`. Lightning adds a console
handler of its own to the `lightning` logger when imported, so each of its INFO lines would appear twice.
"""

from __future__ import annotations

import logging
import warnings

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
    import lightning  # noqa: F401  (its import adds the console handler removed here)

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


def wandb_logger(**kwargs):
    """Lightning's WandbLogger (`conf/logger/wandb.yaml`) without the `anonymous` setting it always passes to
    `wandb.init`, which W&B no longer takes and warns about on every run."""
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(**kwargs)
    logger._wandb_init.pop("anonymous", None)
    return logger
