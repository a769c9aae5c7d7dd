"""`python -m riskexp ...` and the `riskexp` console script.

The task function lives in this importable module (not `__main__`), so submitit pickles it by reference;
the config directory is given as an absolute path, which Hydra resolves from any working directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from riskexp.schema import ConfigError

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    from riskexp.run import run

    try:
        results = run(cfg)
    except ConfigError as error:
        # a clean one-line message instead of a traceback: the value is wrong, not the code
        print(f"riskexp: configuration error: {error}", file=sys.stderr)
        sys.exit(2)
    return results.get("val/loss")


def console_main() -> None:
    """Entry point of the `riskexp` console script: `riskexp report DIR` or the training job."""
    if len(sys.argv) > 1 and sys.argv[1] == "report":
        from riskexp.report import main as report_main

        sys.exit(report_main(sys.argv[2:]))
    main()
