"""Task prompt loaders: shipped prompt files, and the papers' datasets read from local files of their schema."""

import gzip
import json

import pandas as pd
import pytest

from riskexp.data.tasks import (
    load_imdb_prefixes,
    load_prompts,
    load_real_toxicity_prompts,
    load_texts,
    review_prefix,
)


def test_shipped_prompt_splits_are_disjoint_and_fixed():
    train, held_out = load_prompts("movie_openings", "train"), load_prompts("movie_openings", "eval")
    assert len(train) + len(held_out) == len(load_prompts("movie_openings")) == 150
    assert not set(train) & set(held_out) and len(held_out) == 30
    assert held_out == load_prompts("movie_openings", "eval")


def test_several_files_are_interleaved_and_limited():
    mixed = load_prompts(["rtp_challenging", "benign_prompts"], split="train", limit=10)
    benign = set(load_prompts("benign_prompts"))
    assert len(mixed) == 10 and sum(p in benign for p in mixed) == 5
    assert len(load_texts("sentiment_labelled")) == 80


def test_bad_split_is_rejected():
    with pytest.raises(ValueError, match="split='test'"):
        load_prompts("movie_openings", "test")


def test_imdb_prefixes_from_a_local_file_of_the_hub_schema(tmp_path):
    rows = [{"text": "This movie was<br /><br />a total delight from start to finish, really.", "label": 1},
            {"text": "Worst. Film. Ever. I want my two hours back.", "label": 0}]
    pd.DataFrame(rows).to_parquet(tmp_path / "test-00000-of-00001.parquet")
    assert load_imdb_prefixes(str(tmp_path), split="test", prefix_words=4) == [
        "This movie was a", "Worst. Film. Ever. I"]
    assert review_prefix("a<br/>b c", 2) == "a b"


def test_real_toxicity_prompts_from_a_local_file_of_the_hub_schema(tmp_path):
    rows = [{"prompt": {"text": "So I told him", "toxicity": 0.1}, "continuation": {"text": "x"}, "challenging": False},
            {"prompt": {"text": "You absolute", "toxicity": 0.8}, "continuation": {"text": "y"}, "challenging": True}]
    path = tmp_path / "prompts.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    assert load_real_toxicity_prompts(str(path)) == ["You absolute"]
    assert load_real_toxicity_prompts(str(path), challenging_only=False) == ["So I told him", "You absolute"]
