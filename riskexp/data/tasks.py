"""Prompts and held-out texts of the generation tasks (`data=sentiment`, `data=toxicity`).

The embedded tasks read prompt files shipped in `riskexp/data/prompts/`; the loaders for the papers' datasets
(IMDb, RealToxicityPrompts) read the hub by name for users with a network, or local files (or directories of
`<split>*` files) of the same schema, through `riskexp.data.tables.read_split`.
"""

from __future__ import annotations

import re
from itertools import zip_longest

from riskexp.assets import load_prompt_file
from riskexp.data.tables import read_split

SPLITS = ("all", "train", "eval")


def _split_rows(rows: list, split: str, eval_every: int) -> list:
    # every `eval_every`-th row is held out: a fixed split that does not depend on the seed or the run
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is unknown; accepted: {', '.join(SPLITS)}")
    if split == "all":
        return rows
    held_out = split == "eval"
    return [row for i, row in enumerate(rows) if (i % eval_every == 0) == held_out]


def load_prompts(file: str | list[str], split: str = "all", eval_every: int = 5, key: str = "prompt",
                 limit: int | None = None) -> list[str]:
    """Prompts of shipped prompt files (`riskexp/data/prompts/<file>.jsonl`, one name or several, interleaved);
    `split=eval` is every `eval_every`-th prompt of each file, `split=train` the rest, so preference building
    and evaluation never share prompts."""
    files = [file] if isinstance(file, str) else list(file)
    per_file = [[row[key] for row in _split_rows(load_prompt_file(name), split, eval_every)] for name in files]
    # interleave, so a `limit` keeps every file's share
    mixed = [p for group in zip_longest(*per_file) for p in group if p is not None]
    return mixed[:limit]


def load_texts(file: str, key: str = "text", limit: int | None = None) -> list[str]:
    """Plain texts of a shipped file, e.g. held-out sentences for perplexity."""
    return [row[key] for row in load_prompt_file(file)][:limit]


def review_prefix(text: str, prefix_words: int) -> str:
    """The opening words of an IMDb review, HTML line breaks removed."""
    words = re.sub(r"<br\s*/?>", " ", text).split()
    return " ".join(words[:prefix_words])


def load_imdb_prefixes(name_or_path: str = "stanfordnlp/imdb", split: str = "test", prefix_words: int = 8,
                       limit: int | None = None) -> list[str]:
    """IMDb continuation prompts: the first `prefix_words` words of each review (`text`, `label` schema)."""
    rows, _ = read_split(name_or_path, split, columns=("text",))
    prompts = [review_prefix(row["text"], prefix_words) for row in rows]
    return [p for p in prompts if p][:limit]


def load_real_toxicity_prompts(name_or_path: str = "allenai/real-toxicity-prompts", split: str = "train",
                               challenging_only: bool = True, limit: int | None = None) -> list[str]:
    """RealToxicityPrompts (`prompt: {text, toxicity, ...}`, `challenging` schema); by default the challenging
    subset the papers evaluate on."""
    rows, _ = read_split(name_or_path, split, columns=("prompt",))
    prompts = [row["prompt"]["text"] for row in rows if row.get("challenging") or not challenging_only]
    return prompts[:limit]
