"""Reading data files: every user-supplied table (preference pairs, HH-RLHF, task prompts) goes through `datasets`.

Local JSON, JSON-lines (optionally gzipped) and Parquet files are read with `datasets.load_dataset("json" |
"parquet", data_files=...)` into memory, with a throw-away cache directory: nothing is written to the user's
Hugging Face cache and no network is needed (`HF_DATASETS_OFFLINE=1` works). Names that are not local paths go
to the hub (`datasets.load_dataset(name)`, needs a network). The small JSON-lines files riskexp ships or writes
itself are read by `riskexp.files.read_jsonl`.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

SUFFIXES = (".jsonl.gz", ".json.gz", ".jsonl", ".json", ".parquet")


def suffix(path: Path) -> str | None:
    """The data-file suffix of `path` (one of SUFFIXES), or None."""
    name = path.name.lower()
    return next((s for s in SUFFIXES if name.endswith(s)), None)


@contextlib.contextmanager
def _quiet(datasets) -> Iterator[None]:
    # one "Generating train split" bar per small local file is noise; the caller's setting is restored
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _columns_layout(rows: list[dict]) -> list[dict]:
    """A .json file holding one object of equal-length lists, `{"prompt": [...], "chosen": [...]}`, is a table
    by columns: datasets reads it as a single row of lists."""
    if len(rows) != 1 or not rows[0]:
        return rows
    values = list(rows[0].values())
    if not all(isinstance(v, list) for v in values) or len({len(v) for v in values}) != 1:
        return rows
    return [dict(zip(rows[0], record)) for record in zip(*values)]


def read_rows(path: str | Path, columns: Iterable[str] = ()) -> tuple[list[dict], list[str]]:
    """Rows (plain Python values) and column names of one local .jsonl[.gz], .json[.gz] or .parquet file.

    A .json file may hold a list of objects, JSON lines, or one object of column lists. A column whose rows mix
    types (a string prompt here, a message list there) keeps each row's value as written; so do message lists
    whose messages have different keys. Raises FileNotFoundError, ValueError for an unsupported suffix or a
    file that does not parse, and ValueError naming the file when one of `columns` is missing.
    """
    import datasets

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    kind = suffix(path)
    if kind is None:
        raise ValueError(f"{path}: unsupported file type; expected one of {', '.join(SUFFIXES)}")
    builder = "parquet" if kind == ".parquet" else "json"
    options = {} if builder == "parquet" else {"parse_agent_traces": False}
    try:
        with tempfile.TemporaryDirectory(prefix="riskexp-datasets-") as cache, _quiet(datasets):
            table = datasets.load_dataset(builder, data_files=[str(path)], split="train", cache_dir=cache,
                                          keep_in_memory=True, **options)
            rows, names = table.to_list(), list(table.column_names)
    except StopIteration:  # an empty file: no first batch to infer a schema from
        rows, names = [], []
    except datasets.exceptions.DatasetGenerationError as error:
        raise ValueError(f"{path}: cannot be read as {builder.upper()}: {error.__cause__ or error}") from error
    if kind.startswith(".json") and not kind.startswith(".jsonl"):
        rows = _columns_layout(rows)
        names = list(rows[0]) if rows else names
    missing = [c for c in columns if c not in names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; columns found: {names}")
    return rows, names


def split_files(root: Path, split: str) -> list[Path]:
    """Data files of `split` under a directory laid out like a hub repo: `<subset>/<split>.jsonl.gz`, or
    `<split>-00000-of-00001.parquet` shards (searched recursively, sorted)."""
    files = {
        p
        for p in root.rglob("*")
        if p.is_file() and (s := suffix(p)) is not None and (p.name[: -len(s)] == split or p.name.startswith(f"{split}-"))
    }
    return sorted(files)


def read_split(name_or_path: str, split: str, data_dir: str | None = None,
               columns: Iterable[str] = ()) -> tuple[Any, str]:
    """(rows, source name) of `split` from a local file, a local directory (below `data_dir` if given, see
    `split_files`), or else the hub dataset `name_or_path`. Every local file must have `columns`."""
    local = Path(name_or_path)
    if not local.exists():
        import datasets

        return datasets.load_dataset(name_or_path, data_dir=data_dir, split=split), f"{name_or_path}[{split}]"
    root = local / data_dir if data_dir and local.is_dir() else local
    files = [root] if root.is_file() else split_files(root, split)
    if not files:
        raise FileNotFoundError(f"no '{split}' files ({', '.join(SUFFIXES)}) found under {root}")
    columns = list(columns)
    rows: list[dict] = []
    for file in files:
        rows.extend(read_rows(file, columns)[0])
    return rows, str(root)
