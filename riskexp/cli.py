"""`python -m riskexp ...` and the `riskexp` console script, and the one error handler of every command.

The task function lives in this importable module (not `__main__`), so submitit pickles it by reference;
the config directory is given as an absolute path, which Hydra resolves from any working directory.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import NoReturn, TypeVar

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig

from riskexp.files import atomic_write_text
from riskexp.results import RESULTS_FILE
from riskexp.schema import ConfigError

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
FAILED_FILE = "failed.json"

log = logging.getLogger("riskexp")
Result = TypeVar("Result")


class RunFailed(CompactHydraException):
    """A run's error once its traceback is in the run's log: Hydra prints only this one line (and a sweep's other
    jobs still run); HYDRA_FULL_ERROR=1 shows the traceback too."""


def exit_with_config_error(error: ConfigError, context: str = "") -> NoReturn:
    """The one way a configuration error ends a riskexp command: one line on stderr and exit code 2 (a wrong
    value, not a bug: no traceback)."""
    print(f"riskexp: configuration error{context}: {error}", file=sys.stderr, flush=True)
    sys.exit(2)


def mark_failed(out: Path, error: BaseException) -> Path | None:
    """Write <run>/failed.json (error type, message, time, overrides, traceback), so a sweep leaves no
    unexplained directory. A finished directory (with results.json) is left as it is: a refused relaunch does
    not make it a failed run."""
    if (out / RESULTS_FILE).exists() or not out.is_dir():
        return None
    record = {
        "error": type(error).__name__,
        "message": str(error),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "overrides": list(HydraConfig.get().overrides.task),
        "log": f"{HydraConfig.get().job.name}.log",
        "traceback": "".join(traceback.format_exception(error)),
    }
    return atomic_write_text(out / FAILED_FILE, json.dumps(record, indent=2) + "\n")


def run_command(command: Callable[[DictConfig], Result], cfg: DictConfig) -> Result:
    """Run a command's function (training, `riskexp.eval`, `riskexp.data.build`) under the one error handler.

    A ConfigError ends the command with exit code 2 and one line on stderr; any other error is logged with its
    traceback to the run directory's riskexp.log and ends it with one line (Hydra's exit code 1). Both mark the
    run directory failed (failed.json); a later success in the same directory removes the mark. An interrupted
    run (riskexp.resume.RunInterrupted, a SystemExit) is resumable, not failed, and passes through."""
    out = Path(HydraConfig.get().runtime.output_dir)
    try:
        result = command(cfg)
    except ConfigError as error:
        mark_failed(out, error)  # the reason is kept there: on the console the one line below says it
        if HydraConfig.get().mode == RunMode.MULTIRUN:  # an exit would end the sweep's remaining jobs too
            raise RunFailed(f"riskexp: configuration error: {error}") from error
        exit_with_config_error(error)
    except Exception as error:
        log.exception("failed: %s: %s", type(error).__name__, error)
        mark_failed(out, error)
        log_file = out / f"{HydraConfig.get().job.name}.log"
        raise RunFailed(f"riskexp: {type(error).__name__}: {error} (traceback in {log_file})") from error
    (out / FAILED_FILE).unlink(missing_ok=True)
    return result


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    from riskexp.run import run

    return run_command(run, cfg).get("val/loss")


def console_main() -> None:
    """Entry point of the `riskexp` console script: `riskexp report DIR` or the training job."""
    if len(sys.argv) > 1 and sys.argv[1] == "report":
        from riskexp.report import main as report_main

        sys.exit(report_main(sys.argv[2:]))
    main()
