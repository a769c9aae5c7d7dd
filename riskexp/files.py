"""Small file helpers shared across riskexp: atomic writes and JSON-lines records."""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

_THREAD_LOCK = threading.RLock()


@contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An inter-process lock on `path` (`filelock`, a transformers dependency; works across the nodes of a
    shared filesystem with POSIX locks) plus an in-process lock, held for the `with` block."""
    from filelock import FileLock

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with _THREAD_LOCK, FileLock(str(path)):
        yield


def _new_file_mode() -> int:
    """The mode `open()` gives a new file: 0o666 less the umask (mkstemp's own 0o600 would hide results)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_text(path: Path, text: str) -> Path:
    """Write a file atomically (temporary file, fsync, rename): readers never see half of it. The file gets the
    mode a plain write would give it (an existing file's own mode, else 0o666 less the umask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, path.stat().st_mode & 0o7777 if path.exists() else _new_file_mode())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_jsonl(records: Iterable[dict], path: str | os.PathLike) -> Path:
    """One JSON object per line, written atomically: readers see the old file or the whole new one."""
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    return atomic_write_text(Path(path), text)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines file (blank lines ignored); a bad line is named by its number."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as error:
                    raise ValueError(f"{path}:{number}: invalid JSON: {error}") from error
    return rows
