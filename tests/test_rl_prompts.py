"""The RL prompt sets: review_openings.jsonl (negative openings as RA-RLHF's tail prompts), the tasks' prompt
scorers and tail thresholds, and the data groups' `rl` section (read by the RL recipe, not by the preference
data module)."""

import pytest
from helpers import compose_config
from hydra.utils import instantiate

from riskexp.assets import load_prompt_file
from riskexp.data.tasks import _split_rows, load_prompts
from riskexp.run import datamodule_config
from riskexp.schema import validate
from riskexp.scorers import VaderSentiment

FILES = ["movie_openings", "review_openings"]


def test_review_openings_are_distinct_labelled_and_mostly_negative_in_both_splits():
    rows = load_prompt_file("review_openings")
    assert 200 <= len(rows) <= 280 and len({r["prompt"] for r in rows}) == len(rows)
    assert all(set(r) == {"prompt", "sentiment"} and r["prompt"].strip() for r in rows)
    assert {r["sentiment"] for r in rows} == {"negative", "neutral", "positive"}
    for split in ("all", "train", "eval"):
        part = _split_rows(rows, split, 5)
        share = {s: sum(r["sentiment"] == s for r in part) / len(part) for s in ("negative", "positive")}
        assert share["negative"] >= 0.45, (split, share)
        assert 0.15 <= share["positive"] <= 0.25, (split, share)
    # openings stop mid-sentence, for a model to continue
    assert not any(r["prompt"].rstrip().endswith((".", "!", "?")) for r in rows)


def task(name):
    return compose_config([f"data={name}"]).data.task


def test_sentiment_tail_threshold_takes_the_negative_openings_and_no_neutral_one():
    rows = load_prompt_file("review_openings")
    threshold = task("sentiment").prompt_tail_threshold
    scores = VaderSentiment(scored="prompt+completion")([r["prompt"] for r in rows], [""] * len(rows)).tolist()
    by = {s: [x for r, x in zip(rows, scores) if r["sentiment"] == s] for s in ("negative", "neutral", "positive")}
    assert sum(x <= threshold for x in by["negative"]) >= 0.9 * len(by["negative"])
    assert all(x > threshold for x in by["neutral"] + by["positive"])


@pytest.mark.parametrize("name", ["sentiment", "toxicity"])
def test_the_prompt_scorer_scores_the_prompt_text(name):
    t = task(name)
    scorer, prompts = instantiate(t.prompt_scorer), instantiate(t.prompts)
    scores = scorer(prompts, [""] * len(prompts))
    assert scores.shape == (len(prompts),) and scores.std() > 0  # not the empty string's one score
    tail = int((scores <= t.prompt_tail_threshold).sum())
    assert 0 < tail < len(prompts)
    if name == "sentiment":  # the held-out negative review openings
        negatives = [r for r in _split_rows(load_prompt_file("review_openings"), "eval", 5)
                     if r["sentiment"] == "negative"]
        assert tail == len(negatives)
    else:  # the prompts the profanity model finds toxic: P(offensive) >= 0.5
        assert t.prompt_tail_threshold == -0.5 and tail >= 0.2 * len(prompts)


def test_train_and_eval_prompts_of_both_files_are_disjoint_and_interleaved():
    train, held_out = load_prompts(FILES, "train"), load_prompts(FILES, "eval")
    assert not set(train) & set(held_out)
    assert len(train) + len(held_out) == len(load_prompts(FILES)) == 150 + len(load_prompt_file("review_openings"))
    movies = {r["prompt"] for r in load_prompt_file("movie_openings")}
    assert [p in movies for p in held_out[:6]] == [True, False] * 3
    assert set(held_out) == set(instantiate(task("sentiment").prompts))


@pytest.mark.parametrize("name, files", [
    ("sentiment", FILES), ("toxicity", ["rtp_challenging", "benign_prompts"]), ("fixture", FILES),
])  # fmt: skip
def test_data_rl_holds_the_rl_training_prompts_and_never_reaches_the_datamodule(name, files, tmp_path):
    cfg = compose_config([f"data={name}", "algo=dpo"], tmp_path)
    validate(cfg)
    prompts = instantiate(cfg.data.rl.prompts)
    assert 1 <= cfg.data.rl.batch_size <= len(prompts) and cfg.data.rl.max_new_tokens >= 1
    assert prompts and all(isinstance(p, str) and p for p in prompts)
    assert prompts == load_prompts(files, "train")[: len(prompts)]  # the train rows (rtp_challenging repeats
    if name != "toxicity":                                          # some texts, so only rows are disjoint)
        assert not set(prompts) & set(load_prompts(files, "eval"))
    config = datamodule_config(cfg)
    assert "rl" not in config and "task" not in config and "build" not in config
    assert config["_target_"] == "riskexp.data.PreferenceDataModule"
