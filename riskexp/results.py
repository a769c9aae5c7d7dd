"""results.json: the per-run record that tables and plots are built from (W&B only mirrors it)."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

from riskexp.files import atomic_write_text

RESULTS_FILE = "results.json"


def git_commit(cwd: Path | None = None) -> str | None:
    """The commit of the riskexp checkout, with `-dirty` if it has uncommitted changes; None outside git."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=5)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def _plain(value):
    """JSON-safe scalars: tensors and numpy numbers become floats, nan/inf become None."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_results(directory: Path, results: dict) -> Path:
    """Write results.json atomically: readers (the report, a relaunched sweep) never see half a file."""
    payload = json.dumps({k: _plain(v) for k, v in results.items()}, indent=2, sort_keys=True)
    return atomic_write_text(Path(directory) / RESULTS_FILE, payload + "\n")


def read_results(directory: Path) -> dict | None:
    path = Path(directory) / RESULTS_FILE
    return json.loads(path.read_text()) if path.exists() else None


def archive_results(directory: Path) -> Path | None:
    """Move an existing results.json aside (results.<mtime>.json) before a rerun, so nothing is lost."""
    path = Path(directory) / RESULTS_FILE
    if not path.exists():
        return None
    target = path.with_name(f"results.{int(path.stat().st_mtime)}.json")
    os.replace(path, target)
    return target
