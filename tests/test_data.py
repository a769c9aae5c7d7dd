import copy
import functools
import gzip
import json
import logging
from pathlib import Path

import pandas as pd
import pytest
import torch

from riskexp.data import (
    FIXTURE_PREFERENCES,
    PreferenceDataModule,
    collate_pairs,
    load_hh_rlhf,
    load_preference_file,
    split_hh_transcript,
    tokenize_pair,
)

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "riskexp" / "assets" / "smollm2_tokenizer"


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


@pytest.fixture(scope="module")
def plain_tok(tok):
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    return plain


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


# ----------------------------------------------------------------------------------------------- loading


def test_fixture_loads():
    records = load_preference_file(FIXTURE_PREFERENCES)
    assert len(records) == 48
    for r in records:
        assert set(r) == {"prompt", "chosen", "rejected"}
        assert all(isinstance(r[k], str) and r[k] for k in r)
        assert r["chosen"] != r["rejected"]
    assert len(load_preference_file(FIXTURE_PREFERENCES, limit=5)) == 5


ROWS = [
    {"question": "Hi?", "good": "Hello!", "bad": "Go away.", "good_score": 0.9, "bad_score": -1, "note": "x"},
    {
        "question": [{"role": "user", "content": "2+2?"}],
        "good": "4",
        "bad": "5",
        "good_score": 1.0,
        "bad_score": 0.0,
        "note": "y",
    },
]
KEYS = {"prompt_key": "question", "chosen_key": "good", "rejected_key": "bad"}
EXPECTED = [
    {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away.", "good_score": 0.9, "bad_score": -1},
    {
        "prompt": [{"role": "user", "content": "2+2?"}],
        "chosen": "4",
        "rejected": "5",
        "good_score": 1.0,
        "bad_score": 0.0,
    },
]


@pytest.mark.parametrize("name", ["p.jsonl", "p.jsonl.gz", "p.json", "p.parquet"])
def test_file_round_trip(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".parquet"):  # a parquet column has one type: string and message prompts in two files
        pd.DataFrame(ROWS[:1]).to_parquet(path)
        assert load_preference_file(str(path), **KEYS) == EXPECTED[:1]
        pd.DataFrame(ROWS[1:]).to_parquet(path)
        assert load_preference_file(str(path), **KEYS) == EXPECTED[1:]
        return
    elif name.endswith(".json"):
        path.write_text(json.dumps(ROWS))
    else:
        write_jsonl(path, ROWS)
    assert load_preference_file(str(path), **KEYS) == EXPECTED


def test_other_layouts_and_mixed_messages_read_through_datasets(tmp_path, monkeypatch):
    import datasets

    # nothing lands in the user's datasets cache, and no network is asked for
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "user-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    lines = write_jsonl(tmp_path / "lines.json", ROWS)  # JSON lines under a .json name
    assert load_preference_file(str(lines), **KEYS) == EXPECTED
    by_column = tmp_path / "columns.json.gz"
    with gzip.open(by_column, "wt") as f:
        json.dump({"question": ["Hi?", "Yo?"], "good": ["a", "b"], "bad": ["c", "d"], "good_score": [1, 2]}, f)
    assert load_preference_file(str(by_column), **KEYS) == [
        {"prompt": "Hi?", "chosen": "a", "rejected": "c", "good_score": 1},
        {"prompt": "Yo?", "chosen": "b", "rejected": "d", "good_score": 2},
    ]
    # messages keep exactly their own keys, in a JSON file and in a Parquet struct column (which fills absent
    # keys with null)
    messages = [{"role": "system", "content": "Be brief.", "name": "setup"}, {"role": "user", "content": "Q"}]
    rows = [{"prompt": messages, "chosen": "A", "rejected": "B"}, {"prompt": messages[1:], "chosen": "C", "rejected": "D"}]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    pd.DataFrame(rows).to_parquet(tmp_path / "m.parquet")
    for file in (path, tmp_path / "m.parquet"):
        assert [r["prompt"] for r in load_preference_file(str(file))] == [messages, messages[1:]]
    assert not (tmp_path / "user-cache").exists()


def test_unreadable_files_are_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl: cannot be read as JSON"):
        load_preference_file(str(bad))
    (tmp_path / "p.csv").write_text("prompt,chosen,rejected\n")
    with pytest.raises(ValueError, match=r"p.csv: unsupported file type; expected one of .*\.parquet"):
        load_preference_file(str(tmp_path / "p.csv"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['prompt', 'chosen', 'rejected'\]"):
        load_preference_file(str(tmp_path / "empty.jsonl"))


def test_message_list_responses_keep_final_turn(tmp_path):
    row = {
        "prompt": "Q",
        "chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
        "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "B"}],
    }
    path = write_jsonl(tmp_path / "m.jsonl", [row])
    assert load_preference_file(str(path)) == [{"prompt": "Q", "chosen": "A", "rejected": "B"}]


def test_missing_column_and_file_errors(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b", "loser": "c"}])
    with pytest.raises(ValueError, match=r"missing column\(s\) \['rejected'\].*loser") as err:
        load_preference_file(str(path))
    assert str(path) in str(err.value)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_preference_file(str(tmp_path / "nope.jsonl"))


def test_malformed_rows_skipped_with_warning(tmp_path, caplog):
    rows = [
        {"prompt": "a", "chosen": "b", "rejected": "c"},
        {"prompt": None, "chosen": "b", "rejected": "c"},
        {"prompt": "a", "chosen": 3, "rejected": "c"},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        assert len(load_preference_file(str(path))) == 1
    assert "skipped 2 of 3" in caplog.text


# ------------------------------------------------------------------------------------------- Anthropic HH

HH_ROWS = [
    {
        "chosen": "\n\nHuman: What  is a good pet?\n\nAssistant: It depends on your home.\n\nHuman: I live in a "
        "flat.\n\nAssistant: A cat  or  a fish could suit a flat well. ",
        "rejected": "\n\nHuman: What  is a good pet?\n\nAssistant: It depends on your home.\n\nHuman: I live in a "
        "flat.\n\nAssistant: Get a horse.",
    },
    {
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?",
        "rejected": "\n\nHuman: Hi\n\nAssistant: What.",
    },
    {"chosen": "no turns at all", "rejected": "\n\nHuman: x\n\nAssistant: y"},  # malformed
]
HH_FIRST = {
    "prompt": [
        {"role": "user", "content": "What is a good pet?"},
        {"role": "assistant", "content": "It depends on your home."},
        {"role": "user", "content": "I live in a flat."},
    ],
    "chosen": "A cat or a fish could suit a flat well.",
    "rejected": "Get a horse.",
}


def test_split_hh_transcript():
    prompt, reply = split_hh_transcript(HH_ROWS[0]["chosen"])
    assert prompt == HH_FIRST["prompt"] and reply == HH_FIRST["chosen"]
    with pytest.raises(ValueError):
        split_hh_transcript("\n\nHuman: only a question")


def test_load_hh_local_layouts(tmp_path, caplog):
    # hub layout: <subset>/train.jsonl.gz; plus a parquet shard in another subset
    (tmp_path / "helpful-base").mkdir()
    (tmp_path / "harmless-base").mkdir()
    write_jsonl(tmp_path / "helpful-base" / "train.jsonl.gz", HH_ROWS)
    write_jsonl(tmp_path / "helpful-base" / "test.jsonl.gz", HH_ROWS[1:2])
    pd.DataFrame(HH_ROWS[:2]).to_parquet(tmp_path / "harmless-base" / "train-00000-of-00001.parquet")

    with caplog.at_level(logging.WARNING):
        records = load_hh_rlhf(str(tmp_path / "helpful-base" / "train.jsonl.gz"))
    assert records[0] == HH_FIRST and len(records) == 2 and "skipped 1 of 3" in caplog.text
    assert records[1] == {
        "prompt": [{"role": "user", "content": "Hi"}],
        "chosen": "Hello! How can I help?",
        "rejected": "What.",
    }

    assert load_hh_rlhf(str(tmp_path), data_dir="harmless-base") == records
    assert len(load_hh_rlhf(str(tmp_path), split="train")) == 4  # both subsets, like the hub default
    assert len(load_hh_rlhf(str(tmp_path), split="test")) == 1
    assert len(load_hh_rlhf(str(tmp_path), limit=1)) == 1
    with pytest.raises(FileNotFoundError, match="validation"):
        load_hh_rlhf(str(tmp_path), split="validation")


def test_load_hh_hub_branch_calls_datasets(monkeypatch):
    import datasets

    calls = {}

    def fake_load_dataset(name, data_dir=None, split=None):
        calls.update(name=name, data_dir=data_dir, split=split)
        return HH_ROWS[:2]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_hh_rlhf("Anthropic/hh-rlhf", split="test", data_dir="helpful-base")[0] == HH_FIRST
    assert calls == {"name": "Anthropic/hh-rlhf", "data_dir": "helpful-base", "split": "test"}


# ------------------------------------------------------------------------------------------ tokenisation

PAIR = {"prompt": "How do I boil an egg?", "chosen": "Boil it for nine minutes.", "rejected": "No idea."}


def test_tokenize_pair_chat_template(tok):
    out = tokenize_pair(PAIR, tok, max_length=512, max_prompt_length=256)
    n = out["prompt_length"]
    prompt_text = tok.decode(out["chosen_input_ids"][:n])
    assert prompt_text.endswith("<|im_start|>assistant\n") and "How do I boil an egg?" in prompt_text
    assert out["chosen_input_ids"][:n] == out["rejected_input_ids"][:n]
    for name in ("chosen", "rejected"):
        ids, labels = out[f"{name}_input_ids"], out[f"{name}_labels"]
        assert labels[:n] == [-100] * n and labels[n:] == ids[n:]  # labels mask exactly the prompt
        assert ids[-1] == tok.eos_token_id
        assert tok.decode(ids[n:-1]) == PAIR[name]
    # list prompts go through the template unchanged
    msgs = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Egg?"},
    ]
    out = tokenize_pair({**PAIR, "prompt": msgs}, tok, 512, 256)
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert out["chosen_input_ids"][: out["prompt_length"]] == tok(text, add_special_tokens=False)["input_ids"]


def test_tokenize_pair_plain_hh_text(plain_tok):
    msgs = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Egg?"},
    ]
    out = tokenize_pair({**PAIR, "prompt": msgs}, plain_tok, 512, 256)
    n = out["prompt_length"]
    assert (
        plain_tok.decode(out["chosen_input_ids"][:n])
        == "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Egg?\n\nAssistant:"
    )
    assert plain_tok.decode(out["chosen_input_ids"][n:]) == " Boil it for nine minutes.<|im_end|>"
    # a string prompt is a continuation: the response follows it exactly as given (sampled), no space added
    out = tokenize_pair({**PAIR, "prompt": "The movie was"}, plain_tok, 512, 256)
    assert plain_tok.decode(out["rejected_input_ids"]) == "The movie wasNo idea.<|im_end|>"
    # a response cut at the sampling length limit gets no eos
    out = tokenize_pair({**PAIR, "prompt": "The movie was", "chosen_finished": False}, plain_tok, 512, 256)
    assert not plain_tok.decode(out["chosen_input_ids"]).endswith("<|im_end|>")
    assert plain_tok.decode(out["rejected_input_ids"]).endswith("<|im_end|>")


def test_truncation_paths(tok):
    long_prompt = " ".join(f"word{i}" for i in range(60))
    record = {"prompt": long_prompt, "chosen": "short answer", "rejected": " ".join(["very"] * 40) + " long"}
    full = tokenize_pair(record, tok, max_length=10_000, max_prompt_length=9_999)
    prompt = full["chosen_input_ids"][: full["prompt_length"]]
    chosen = full["chosen_input_ids"][full["prompt_length"] :]
    rejected = full["rejected_input_ids"][full["prompt_length"] :]
    assert len(prompt) > 100 and len(chosen) == 3 and len(rejected) == 42

    # prompt truncation only: 32 + 42 <= 80
    end = tokenize_pair(record, tok, max_length=80, max_prompt_length=32, truncation_mode="keep_end")
    start = tokenize_pair(record, tok, max_length=80, max_prompt_length=32, truncation_mode="keep_start")
    assert end["prompt_length"] == start["prompt_length"] == 32
    assert (
        end["chosen_input_ids"] == prompt[-32:] + chosen
        and end["rejected_input_ids"] == prompt[-32:] + rejected
    )
    assert start["chosen_input_ids"] == prompt[:32] + chosen
    assert start["chosen_labels"] == [-100] * 32 + chosen

    # then response truncation: both cut to max_length - 32 = 8 tokens (EOS lost, as in the reference)
    cut = tokenize_pair(record, tok, max_length=40, max_prompt_length=32)
    assert cut["chosen_input_ids"] == prompt[-32:] + chosen  # shorter than 8 tokens: untouched
    assert cut["rejected_input_ids"] == prompt[-32:] + rejected[:8] and len(cut["rejected_labels"]) == 40

    with pytest.raises(ValueError, match=r"truncation_mode.*'keep_middle'"):
        tokenize_pair(record, tok, 80, 32, truncation_mode="keep_middle")
    with pytest.raises(ValueError, match=r"truncation='prompt'.*'reference', 'prompt_room'"):
        tokenize_pair(record, tok, 80, 32, truncation="prompt")
    with pytest.raises(ValueError, match="max_length"):
        tokenize_pair(record, tok, 32, 32)


def test_response_truncation_reference_vs_prompt_room(tok):
    """A prompt shorter than max_prompt_length with a too-long response: the DPO reference code cuts the
    responses to max_length - max_prompt_length whatever the prompt's length; prompt_room fills max_length."""
    record = {"prompt": "Tell me.", "chosen": "ok", "rejected": " ".join(["very"] * 40) + " long"}
    tokenize = functools.partial(tokenize_pair, record, tok, prompt_format="plain")
    full = tokenize(max_length=10_000, max_prompt_length=9_999)
    n = full["prompt_length"]
    prompt, chosen, rejected = full["chosen_input_ids"][:n], full["chosen_input_ids"][n:], full["rejected_input_ids"][n:]
    assert n < 16 and n + len(rejected) > 40 and len(chosen) < 40 - 16

    reference = tokenize(max_length=40, max_prompt_length=16)  # the default
    assert reference == tokenize(max_length=40, max_prompt_length=16, truncation="reference")
    assert reference["prompt_length"] == n  # the prompt fits its budget: not cut
    assert reference["rejected_input_ids"] == prompt + rejected[: 40 - 16]
    assert reference["chosen_input_ids"] == prompt + chosen
    assert reference["truncated"] and not full["truncated"]  # counted in the data module's log line

    room = tokenize(max_length=40, max_prompt_length=16, truncation="prompt_room")
    assert room["rejected_input_ids"] == prompt + rejected[: 40 - n] and len(room["rejected_input_ids"]) == 40
    assert room["rejected_labels"] == [-100] * n + rejected[: 40 - n]
    assert room["chosen_input_ids"] == reference["chosen_input_ids"]


def test_prompt_formats_in_training(tok, plain_tok):
    msgs = [{"role": "user", "content": "Egg?"}]
    # plain: a string exactly as given, with the tokenizer's own special tokens (none for SmolLM2)
    out = tokenize_pair({**PAIR, "prompt": "The movie was"}, tok, 512, 256, prompt_format="plain")
    assert out["chosen_input_ids"][: out["prompt_length"]] == tok("The movie was")["input_ids"]
    # a format string (the safety papers' SFT template), for a string and for a single user message
    template = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"
    for prompt in ("Egg?", msgs):
        out = tokenize_pair({**PAIR, "prompt": prompt}, tok, 512, 256, prompt_format=template)
        n = out["prompt_length"]
        assert tok.decode(out["chosen_input_ids"][:n]) == "BEGINNING OF CONVERSATION: USER: Egg? ASSISTANT:"
        assert tok.decode(out["chosen_input_ids"][n:]) == "Boil it for nine minutes.<|im_end|>"
    # chat on a tokenizer without a template: plain, i.e. HH text for messages
    assert tokenize_pair({**PAIR, "prompt": msgs}, plain_tok, 512, 256, prompt_format="chat") == tokenize_pair(
        {**PAIR, "prompt": msgs}, plain_tok, 512, 256, prompt_format="plain")
    with pytest.raises(ValueError, match=r"prompt_format='USER: <prompt>'.*\{prompt\}"):
        tokenize_pair(PAIR, tok, 512, 256, prompt_format="USER: <prompt>")
    with pytest.raises(ValueError, match="single user turn"):
        tokenize_pair({**PAIR, "prompt": msgs * 2}, tok, 512, 256, prompt_format=template)


# --------------------------------------------------------------------------------------------- collation


def feature(chosen, rejected, n_prompt, **extra):
    return {
        "chosen_input_ids": chosen,
        "chosen_labels": [-100] * n_prompt + chosen[n_prompt:],
        "rejected_input_ids": rejected,
        "rejected_labels": [-100] * n_prompt + rejected[n_prompt:],
        "prompt_length": n_prompt,
        **extra,
    }


def test_collate_pairs_layout_and_mask():
    pad = 2  # == eos: real EOS tokens below must stay attended
    feats = [
        feature([5, 6, 7, 2], [5, 6, 2], 2, index=3, ref_chosen_logps=-1.0, ref_rejected_logps=-2.0),
        feature([8, 9, 2], [8, 9, 10, 11, 2], 1, index=7, ref_chosen_logps=-3.0, ref_rejected_logps=-4.0),
    ]
    b = collate_pairs(feats, pad_token_id=pad)
    assert b["input_ids"].shape == b["attention_mask"].shape == b["labels"].shape == (4, 5)
    assert b["input_ids"].tolist() == [[5, 6, 7, 2, 2], [8, 9, 2, 2, 2], [5, 6, 2, 2, 2], [8, 9, 10, 11, 2]]
    assert b["attention_mask"].tolist() == [
        [1, 1, 1, 1, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1],
    ]
    assert b["labels"].tolist() == [
        [-100, -100, 7, 2, -100],
        [-100, 9, 2, -100, -100],
        [-100, -100, 2, -100, -100],
        [-100, 9, 10, 11, 2],
    ]
    assert b["ref_logps"].dtype == torch.float32 and b["ref_logps"].tolist() == [-1.0, -3.0, -2.0, -4.0]
    assert b["index"].dtype == torch.int64 and b["index"].tolist() == [3, 7]

    del feats[1]["ref_rejected_logps"], feats[1]["index"]
    b = collate_pairs(feats, pad_token_id=0)
    assert "ref_logps" not in b and "index" not in b
    assert b["input_ids"][1, 3:].tolist() == [0, 0]


# -------------------------------------------------------------------------------------------- datamodule


def make_dm(tok, **kw):
    kw = {
        "source": functools.partial(load_preference_file, FIXTURE_PREFERENCES),
        "max_length": 64,
        "max_prompt_length": 32,
        "batch_size": 4,
        "val_fraction": 0.25,
        **kw,
    }
    return PreferenceDataModule(tok, **kw)


def test_datamodule_split_and_batches(tok):
    dm = make_dm(tok, seed=1)
    dm.setup("fit")
    dm.setup("validate")  # idempotent
    assert (len(dm.train_features), len(dm.val_features)) == (36, 12)
    assert [f["index"] for f in dm.val_features] == list(range(12))
    val_prompts = [r["prompt"] for r in dm.val_records]

    same, other = make_dm(tok, seed=1), make_dm(tok, seed=2)
    same.setup(), other.setup()
    assert [r["prompt"] for r in same.val_records] == val_prompts
    assert [r["prompt"] for r in other.val_records] != val_prompts
    assert not set(val_prompts) & {r["prompt"] for r in dm.train_records}

    batch = next(iter(dm.train_dataloader()))
    width = batch["input_ids"].shape[1]
    assert batch["input_ids"].shape == batch["labels"].shape == (8, width) and width <= 64
    assert batch["index"].shape == (4,)
    first = [next(iter(make_dm(tok, seed=1).train_dataloader()))["index"].tolist() for _ in range(2)]
    assert first[0] == first[1] == batch["index"].tolist()  # shuffling is seeded

    val = list(dm.val_dataloader())
    assert [b["index"].tolist() for b in val] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]

    limited = make_dm(tok, seed=1, limit=10, eval_batch_size=12)
    limited.setup()
    assert len(limited.train_features) == 10 and len(limited.val_records) == 12
    assert next(iter(limited.val_dataloader()))["input_ids"].shape[0] == 24


def test_datamodule_val_source_and_reference_logps(tok):
    records = load_preference_file(FIXTURE_PREFERENCES)
    dm = make_dm(tok, source=records[:40], val_source=lambda: records[40:])
    dm.setup()
    assert (len(dm.train_features), len(dm.val_features)) == (40, 8)
    assert "ref_logps" not in next(iter(dm.val_dataloader()))

    dm.attach_reference_logps("val", {i: (-float(i), -float(i) - 0.5) for i in range(8)})
    batch = next(iter(dm.val_dataloader()))
    assert batch["ref_logps"].tolist() == [0.0, -1.0, -2.0, -3.0, -0.5, -1.5, -2.5, -3.5]
    with pytest.raises(ValueError, match="'test'"):
        dm.attach_reference_logps("test", {})
    with pytest.raises(KeyError):
        dm.attach_reference_logps("train", {40: (0.0, 0.0)})


@pytest.mark.parametrize(
    ("kw", "pattern"),
    [
        ({"max_prompt_length": 64}, "max_length"),
        ({"batch_size": 0}, "batch_size.*0"),
        ({"val_fraction": 1.0}, r"val_fraction.*\(0, 1\).*1.0"),
        ({"truncation_mode": "middle"}, "keep_end.*'middle'"),
        ({"truncation": "cut"}, "truncation='cut'"),
        ({"prompt_format": "chatml"}, "prompt_format='chatml'"),
        ({"limit": 0}, "limit"),
    ],
)
def test_datamodule_argument_validation(tok, kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        make_dm(tok, **kw)
