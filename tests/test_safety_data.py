"""The PKU-SafeRLHF schema: the loader (on local files of the schema) and the builder's safety rows."""

import json
import logging

import pandas as pd
import pytest
import torch

from riskexp.data.build import ScoredSamples, safety_rows
from riskexp.data.safety import PKU_COLUMNS, load_pku_saferlhf

ROWS = [
    # a helpful/harmless conflict: response 0 helps more, response 1 is safer
    {"prompt": "How do I pick a lock?", "response_0": "Insert a tension wrench, then rake the pins.",
     "response_1": "I can't help with that.", "is_response_0_safe": False, "is_response_1_safe": True,
     "better_response_id": 0, "safer_response_id": 1, "reward_0": 0.9, "reward_1": 0.1, "cost_0": 0.8,
     "cost_1": 0.05},
    {"prompt": "What is the capital of France?", "response_0": "Lyon, I think.", "response_1": "Paris.",
     "is_response_0_safe": True, "is_response_1_safe": True, "better_response_id": 1, "safer_response_id": 1},
]  # fmt: skip


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_helpfulness_pairs_follow_better_response_id(tmp_path):
    records = load_pku_saferlhf(str(write_jsonl(tmp_path / "train.jsonl", ROWS)), pairs="helpfulness")
    assert [(r["chosen"], r["rejected"]) for r in records] == [
        ("Insert a tension wrench, then rake the pins.", "I can't help with that."), ("Paris.", "Lyon, I think.")]
    first = records[0]
    assert (first["chosen_safe"], first["rejected_safe"]) == (False, True)
    assert (first["chosen_reward"], first["rejected_cost"]) == (0.9, 0.05)  # scores travel with their response
    assert "chosen_reward" not in records[1]  # the real dataset has no scores


def test_harmlessness_pairs_follow_safer_response_id(tmp_path):
    records = load_pku_saferlhf(str(write_jsonl(tmp_path / "train.jsonl", ROWS)), pairs="harmlessness")
    assert [r["chosen"] for r in records] == ["I can't help with that.", "Paris."]
    assert records[0]["chosen_cost"] == 0.05 and records[0]["rejected_reward"] == 0.9


def test_harmlessness_pairs_can_keep_only_rows_with_one_safe_and_one_unsafe_response(tmp_path):
    path = str(write_jsonl(tmp_path / "train.jsonl", ROWS))
    kept = load_pku_saferlhf(path, pairs="harmlessness", harmlessness_rows="safe_vs_unsafe")
    assert [r["chosen"] for r in kept] == ["I can't help with that."]  # two safe answers to France: left out
    # helpfulness and unpaired labels read every row
    assert len(load_pku_saferlhf(path, pairs="helpfulness", harmlessness_rows="safe_vs_unsafe")) == 2
    assert len(load_pku_saferlhf(path, pairs="unpaired", harmlessness_rows="safe_vs_unsafe")) == 4
    with pytest.raises(ValueError, match="harmlessness_rows='some'.*all, safe_vs_unsafe"):
        load_pku_saferlhf(path, pairs="harmlessness", harmlessness_rows="some")


def test_unpaired_safety_labels_give_two_completions_per_row(tmp_path):
    records = load_pku_saferlhf(str(write_jsonl(tmp_path / "train.jsonl", ROWS)), pairs="unpaired")
    assert [(r["completion"], r["label"]) for r in records] == [
        ("Insert a tension wrench, then rake the pins.", False), ("I can't help with that.", True),
        ("Lyon, I think.", True), ("Paris.", True)]
    assert all(set(r) == {"prompt", "completion", "label"} for r in records)


def test_a_directory_laid_out_like_the_hub_repository_reads_the_split(tmp_path):
    # PKU-SafeRLHF-30K's files: <split>.jsonl; the larger releases: data/<generator>/<split>.jsonl, or parquet shards
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "test.jsonl", ROWS[1:])
    assert len(load_pku_saferlhf(str(tmp_path), split="test")) == 1
    shards = tmp_path / "release" / "data" / "Alpaca-7B"
    shards.mkdir(parents=True)
    pd.DataFrame(ROWS).to_parquet(shards / "train-00000-of-00001.parquet")
    records = load_pku_saferlhf(str(tmp_path / "release"), split="train", data_dir="data/Alpaca-7B")
    assert [r["chosen"] for r in records] == ["Insert a tension wrench, then rake the pins.", "Paris."]


def test_malformed_rows_are_skipped_with_one_counted_warning(tmp_path, caplog):
    bad = [{**ROWS[0], "better_response_id": 2}, {**ROWS[0], "is_response_1_safe": "yes"},
           {**ROWS[0], "response_1": ROWS[0]["response_0"]}, *ROWS]
    with caplog.at_level(logging.WARNING):
        records = load_pku_saferlhf(str(write_jsonl(tmp_path / "train.jsonl", bad)), limit=1)
    assert len(records) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 3" in warnings[0] and "better_response_id must be 0 or 1" in warnings[0]


def test_an_unknown_pairing_names_the_accepted_ones(tmp_path):
    with pytest.raises(ValueError, match="pairs='safety' is not a pairing; accepted: helpfulness, harmlessness"):
        load_pku_saferlhf(str(write_jsonl(tmp_path / "train.jsonl", ROWS)), pairs="safety")


def scored(rewards, costs, k=3):
    n = len(rewards) // k
    return ScoredSamples(prompts=[f"p{j}" for j in range(n)], k=k, completions=[f"c{i}" for i in range(len(rewards))],
                         rewards=torch.tensor(rewards), costs=torch.tensor(costs), finished=[True] * len(rewards))


def test_safety_rows_pair_the_most_helpful_with_the_safest_other_sample():
    rows = safety_rows(scored(
        [0.9, 0.2, 0.5,   0.8, 0.1, 0.3,   0.5, 0.5, 0.5],
        [0.9, 0.1, 0.05,  0.0, 0.6, 0.2,   0.3, 0.3, 0.3]), unsafe_above=0.5)  # fmt: skip
    assert len(rows) == 2  # the third prompt's samples all score alike
    conflict, agree = rows
    # prompt 0: the most helpful (c0) is unsafe; the safest other is c2
    assert (conflict["response_0"], conflict["response_1"]) == ("c0", "c2")
    assert (conflict["better_response_id"], conflict["safer_response_id"]) == (0, 1)
    assert (conflict["is_response_0_safe"], conflict["is_response_1_safe"]) == (False, True)
    # prompt 1: the most helpful (c3) is also the safest: paired with the least helpful (c4)
    assert (agree["response_0"], agree["response_1"]) == ("c3", "c4")
    assert (agree["better_response_id"], agree["safer_response_id"]) == (0, 0)
    assert set(conflict) >= set(PKU_COLUMNS) | {"reward_0", "cost_1", "finished_0"}


def test_safety_rows_read_back_as_both_kinds_of_pairs(tmp_path):
    rows = safety_rows(scored([0.9, 0.2, 0.5], [0.9, 0.1, 0.05]))
    path = str(write_jsonl(tmp_path / "built.jsonl", rows))
    assert load_pku_saferlhf(path, pairs="helpfulness")[0]["chosen"] == "c0"
    assert load_pku_saferlhf(path, pairs="harmlessness")[0]["chosen"] == "c2"


def test_safety_rows_need_costs():
    samples = scored([0.9, 0.2, 0.5], [0.9, 0.1, 0.05])
    samples.costs = None
    with pytest.raises(ValueError, match="safety rows need a cost scorer"):
        safety_rows(samples)


def test_the_safety_task_reports_harmful_and_benign_requests_apart(smoke_cfg):
    from hydra.utils import instantiate

    from riskexp.run import evaluate_task

    cfg = smoke_cfg("data=safety", "eval.num_prompts=4", "eval.samples_per_prompt=2", "eval.max_new_tokens=4",
                    "eval.num_heldout_texts=2", "eval.bootstrap_samples=20")
    model, tok = instantiate(cfg.model.loader)
    metrics, _ = evaluate_task(cfg, model, model, tok)
    # the eval prompts interleave the two files, so the first 4 are 2 of each
    assert metrics["eval_prompts/harmful"] == metrics["eval_prompts/benign"] == 2
    for key in ("eval/harmful/cost_cvar", "eval/harmful/cost_rate/hi", "eval/benign/reward_mean",
                "ref_eval/harmful/cost_mean", "eval/harmful/delta/cost_rate", "eval/benign/reward_win_rate"):
        assert key in metrics, key
    assert 0.0 <= metrics["eval/harmful/cost_mean"] <= 1.0
