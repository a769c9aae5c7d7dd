"""Pairwise preference data: loading, Anthropic-HH parsing, DPO-style tokenisation, batching.

A *record* is `{"prompt": str | list[{"role", "content"}], "chosen": str, "rejected": str}` (plus optional
numeric fields such as `chosen_score`). A *feature* is one tokenised record (see `tokenize_pair`). Batches
stack chosen rows first, then rejected rows, which is the layout the losses expect: rows [0, B) are y_w and
rows [B, 2B) are y_l of the same prompts.

Unpaired data (KTO): an *unpaired record* is `{"prompt", "completion": str, "label": bool}` (label True =
desirable); a preference record unpairs into two (`unpair_preference_records`: chosen -> desirable, rejected
-> undesirable, as TRL's `unpair_preference_dataset`). Its feature is one completion (`tokenize_completion`),
and `collate_completions` batches N of them with N mismatched rows (prompt_i, another row's completion) for
KTO's KL anchor.
"""

from __future__ import annotations

import functools
import logging
import math
import random
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from riskexp.data.tables import read_rows, read_split
from riskexp.generation import pad_token_id
from riskexp.logps import IGNORE_INDEX, pad_rows
from riskexp.prompts import (
    TRUNCATION_MODES,
    TRUNCATIONS,
    check_prompt_format,
    is_messages,
    prompt_token_ids,
    uses_chat_template,
)
from riskexp.resume import EpochShuffle, LoaderProgress, ResumableLoader

log = logging.getLogger(__name__)

FIXTURE_PREFERENCES = str(Path(__file__).parent / "fixtures" / "preferences.jsonl")

_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
_ASSISTANT_TAG = "\n\nAssistant: "


# ----------------------------------------------------------------------------------------------- reading


def _check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be None or a positive integer, got {limit!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _response_text(value: Any) -> str:
    """A response is a string, or a message list whose last (assistant) message is the response."""
    if isinstance(value, str):
        return value
    if is_messages(value) and value[-1]["role"] == "assistant":
        return value[-1]["content"]
    raise ValueError(
        f"response must be a string or a message list ending in an assistant turn, got {value!r:.80}"
    )


def _warn_skipped(path: Any, skipped: int, total: int, first_error: str | None) -> None:
    if skipped:
        log.warning("%s: skipped %d of %d malformed rows (first: %s)", path, skipped, total, first_error)


def collect_records(rows: Iterable[dict], to_records: Callable[[dict], list[dict]], source: Any,
                    limit: int | None = None, errors: tuple[type[Exception], ...] = (ValueError,)) -> list[dict]:
    """The records `to_records(row)` gives for each row, in order. A row it rejects with one of `errors` is
    skipped, counted in one warning naming `source` and the first error; `limit` keeps the records of the first
    `limit` valid rows (checked by the caller before it reads anything: `_check_limit`)."""
    rows = list(rows)
    records, used, skipped, first_error = [], 0, 0, None
    for row in rows:
        try:
            records.extend(to_records(row))
        except errors as err:
            skipped += 1
            # a KeyError's text is only the key: name its type too
            first_error = first_error or (str(err) if isinstance(err, ValueError) else repr(err))
            continue
        used += 1
        if limit is not None and used >= limit:
            break
    _warn_skipped(source, skipped, len(rows), first_error)
    return records


def _with_extras(record: dict, row: dict, used: Iterable[str]) -> dict:
    """`record` plus the row's other scores and flags (e.g. `chosen_score`, `chosen_finished`)."""
    used = set(used)
    return record | {k: v for k, v in row.items()
                     if k not in used and k not in record and (_is_number(v) or isinstance(v, bool))}


def load_preference_file(
    path: str,
    prompt_key: str = "prompt",
    chosen_key: str = "chosen",
    rejected_key: str = "rejected",
    limit: int | None = None,
) -> list[dict]:
    """Read preference records from a local .jsonl[.gz], .json[.gz] or .parquet file (`riskexp.data.tables`).

    Columns `prompt_key`/`chosen_key`/`rejected_key` are renamed to prompt/chosen/rejected. The prompt may be a
    string or a chat message list; a response given as a message list keeps only its final assistant turn.
    Extra numeric fields (e.g. `chosen_score`) are kept. Rows with missing or ill-typed values are skipped with
    one counted warning. `limit` keeps the first `limit` valid records.
    """
    return _file_records(path, (prompt_key, chosen_key, rejected_key), limit, lambda row: {
        "prompt": _check_prompt(row.get(prompt_key)), "chosen": _response_text(row.get(chosen_key)),
        "rejected": _response_text(row.get(rejected_key))})


def _file_records(path: str, keys: Sequence[str], limit: int | None, record: Callable[[dict], dict]) -> list[dict]:
    """The records `record(row)` makes of a local file's rows (columns `keys` read), each with the row's other
    numeric and boolean fields; malformed rows skipped with one counted warning, `limit` valid rows kept."""
    _check_limit(limit)
    rows, _ = read_rows(path, keys)
    return collect_records(rows, lambda row: [_with_extras(record(row), row, keys)], path, limit)


def _check_prompt(prompt: Any) -> Any:
    if not (isinstance(prompt, str) or is_messages(prompt)):
        raise ValueError(f"prompt must be a string or a message list, got {prompt!r:.80}")
    if isinstance(prompt, list):  # a struct column gives absent message keys as null: drop them again
        prompt = [{k: v for k, v in m.items() if v is not None} for m in prompt]
    return prompt


def _label(value: Any) -> bool:
    """A desirability label: true/false (0/1 integers, as some tables store booleans, are accepted)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"label must be true or false, got {value!r:.40}")


def load_unpaired_file(
    path: str,
    prompt_key: str = "prompt",
    completion_key: str = "completion",
    label_key: str = "label",
    limit: int | None = None,
) -> list[dict]:
    """Read unpaired records `{"prompt", "completion", "label"}` (label True = desirable) from a local
    .jsonl[.gz], .json[.gz] or .parquet file, as `load_preference_file` reads pairs: the columns are renamed,
    a completion given as a message list keeps its final assistant turn, extra numeric and boolean fields are
    kept, malformed rows are skipped with one counted warning, `limit` keeps the first valid records."""
    return _file_records(path, (prompt_key, completion_key, label_key), limit, lambda row: {
        "prompt": _check_prompt(row.get(prompt_key)), "completion": _response_text(row.get(completion_key)),
        "label": _label(row.get(label_key))})


def is_unpaired(record: dict) -> bool:
    """Whether a record is unpaired (`prompt`, `completion`, `label`) rather than a preference pair."""
    return {"prompt", "completion", "label"} <= record.keys()


def unpair_preference_records(records: Iterable[dict]) -> list[dict]:
    """Preference records as unpaired ones, TRL's `unpair_preference_dataset`: each pair gives
    `{"prompt", "completion": chosen, "label": True}` then `{"prompt", "completion": rejected, "label": False}`;
    a response's own fields follow it renamed (`chosen_finished` -> `completion_finished` on the first,
    `rejected_score` -> `completion_score` on the second), shared fields go to both. Unpaired records pass as
    they are."""
    out = []
    for record in records:
        if is_unpaired(record):
            out.append(record)
            continue
        shared = {k: v for k, v in record.items()
                  if k not in ("chosen", "rejected") and not k.startswith(("chosen_", "rejected_"))}
        for name, label in (("chosen", True), ("rejected", False)):
            own = {f"completion_{k[len(name) + 1:]}": v for k, v in record.items() if k.startswith(name + "_")}
            out.append({**shared, "completion": record[name], "label": label, **own})
    return out


# ------------------------------------------------------------------------------------------- Anthropic HH


def _clean(text: str) -> str:
    return re.sub(r" {2,}", " ", text).strip()


def split_hh_transcript(text: str) -> tuple[list[dict], str]:
    """Split an HH transcript into (prompt messages, final assistant reply).

    "\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant: d" ->
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", ...}], "d").
    Raises ValueError when the text has no turns, text before the first turn, or does not end with an
    assistant turn preceded by at least one message.
    """
    if not isinstance(text, str):
        raise ValueError(f"HH transcript must be a string, got {type(text).__name__}")
    parts = _HH_TURN.split(text)  # [preamble, speaker, content, speaker, content, ...]
    if parts[0].strip():
        raise ValueError(f"HH transcript has text before the first turn: {parts[0]!r:.60}")
    turns = [{"role": _HH_ROLES[s], "content": _clean(c)} for s, c in zip(parts[1::2], parts[2::2])]
    if len(turns) < 2 or turns[-1]["role"] != "assistant":
        raise ValueError("HH transcript must end with an assistant turn that follows at least one message")
    return turns[:-1], turns[-1]["content"]


def _hh_record(row: dict) -> dict:
    prompt, chosen = split_hh_transcript(row["chosen"])
    rejected_text = row["rejected"]
    if not isinstance(rejected_text, str) or _ASSISTANT_TAG not in rejected_text:
        raise ValueError("rejected transcript has no assistant turn")
    # as in the reference loaders, the rejected reply is whatever follows the last assistant tag
    rejected = _clean(rejected_text[rejected_text.rfind(_ASSISTANT_TAG) + len(_ASSISTANT_TAG) :])
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def load_hh_rlhf(
    name_or_path: str = "Anthropic/hh-rlhf",
    split: str = "train",
    data_dir: str | None = None,
    limit: int | None = None,
) -> list[dict]:
    """Anthropic HH-RLHF as records `{"prompt": [messages], "chosen": str, "rejected": str}`.

    A local file, or a directory searched (recursively, below `data_dir` if given) for `<split>.jsonl[.gz]`,
    `<split>.json`, `<split>.parquet` or `<split>-*.parquet`, is read directly; anything else goes to
    `datasets.load_dataset(name_or_path, data_dir=data_dir, split=split)`. Malformed rows are skipped with a
    counted warning.
    """
    _check_limit(limit)
    rows, source = read_split(name_or_path, split, data_dir, columns=("chosen", "rejected"))
    return collect_records(rows, lambda row: [_hh_record(row)], source, limit, errors=(ValueError, KeyError, TypeError))


# ------------------------------------------------------------------------------------------ tokenisation


def _check_lengths(max_length: int, max_prompt_length: int, truncation_mode: str, truncation: str) -> None:
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {truncation_mode!r}")
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation={truncation!r} is not accepted: one of {TRUNCATIONS} ('reference': responses "
                         "cut to max_length - max_prompt_length, as the DPO reference code; 'prompt_room': to "
                         "max_length - the prompt's length)")
    if not (isinstance(max_prompt_length, int) and max_prompt_length >= 1):
        raise ValueError(f"max_prompt_length must be a positive integer, got {max_prompt_length!r}")
    if not (isinstance(max_length, int) and max_length > max_prompt_length):
        raise ValueError(
            f"max_length must be an integer greater than max_prompt_length ({max_prompt_length}), got {max_length!r}"
        )


def response_token_ids(tokenizer, prompt: Any, response: str, prompt_format: str, finished: bool = True) -> list[int]:
    """A response's token ids, ending with eos unless it was cut at a length limit when it was sampled
    (`*_finished: false`: it did not end)."""
    hh_text = isinstance(prompt, list) and prompt_format in ("chat", "plain")
    if hh_text and not uses_chat_template(tokenizer, prompt_format) and not response[:1].isspace():
        # HH text ends with "Assistant:"; the reference responses start with a space. (A string prompt is a
        # continuation: the response follows it exactly as it was sampled.)
        response = " " + response
    return tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] * bool(finished)


def truncate_to_length(
    prompt_ids: list[int],
    responses: list[list[int]],
    max_length: int,
    max_prompt_length: int,
    truncation_mode: str = "keep_end",
    truncation: str = "reference",
) -> tuple[list[int], list[list[int]], bool]:
    """The DPO reference code's truncation of a prompt and its responses (`tokenize_pair`'s rule, for one
    response or two): (prompt_ids, responses, truncated)."""
    longer = max(len(r) for r in responses)
    truncated = len(prompt_ids) + longer > max_length
    if truncated:
        keep_end = truncation_mode == "keep_end"
        prompt_ids = prompt_ids[-max_prompt_length:] if keep_end else prompt_ids[:max_prompt_length]
    if len(prompt_ids) + longer > max_length:
        room = max_length - (max_prompt_length if truncation == "reference" else len(prompt_ids))
        responses = [r[:room] for r in responses]
    return prompt_ids, responses, truncated


def tokenize_pair(
    record: dict,
    tokenizer,
    max_length: int,
    max_prompt_length: int,
    truncation_mode: str = "keep_end",
    prompt_format: str = "chat",
    truncation: str = "reference",
) -> dict:
    """Tokenise one preference record the way the DPO reference code (`tokenize_batch_element`) does.

    Returns `{"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels": list[int],
    "prompt_length": int, "truncated": bool}`, plus `chosen_safe` / `rejected_safe` where the record has those
    labels; input_ids = prompt + response + [eos] (before truncation), labels = input_ids with
    the prompt positions set to -100. The prompt is rendered by `riskexp.prompts.render_prompt(prompt_format)`.
    If prompt + the longer response exceeds `max_length`, the prompt is cut to `max_prompt_length` tokens
    (`truncation_mode=keep_end`: its last tokens; `keep_start`: its first); if the pair is still too long, both
    responses are cut to `max_length - max_prompt_length` tokens (`truncation=reference`, the reference code's
    rule, which leaves room unused when the prompt is shorter) or to `max_length - len(prompt)`
    (`truncation=prompt_room`). A cut response loses its eos, as in the reference code.
    """
    _check_lengths(max_length, max_prompt_length, truncation_mode, truncation)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos_token_id; responses must end with EOS")
    prompt = record["prompt"]
    prompt_ids = prompt_token_ids(tokenizer, prompt, prompt_format)
    chosen_ids = response_token_ids(tokenizer, prompt, record["chosen"], prompt_format,
                                    record.get("chosen_finished", True))
    rejected_ids = response_token_ids(tokenizer, prompt, record["rejected"], prompt_format,
                                      record.get("rejected_finished", True))
    prompt_ids, (chosen_ids, rejected_ids), truncated = truncate_to_length(
        prompt_ids, [chosen_ids, rejected_ids], max_length, max_prompt_length, truncation_mode, truncation)

    n = len(prompt_ids)
    out: dict[str, Any] = {"prompt_length": n, "truncated": truncated}
    for name, response in (("chosen", chosen_ids), ("rejected", rejected_ids)):
        out[f"{name}_input_ids"] = prompt_ids + response
        out[f"{name}_labels"] = [IGNORE_INDEX] * n + response
        if isinstance(record.get(f"{name}_safe"), bool):  # PKU-SafeRLHF labels, read by the cost model
            out[f"{name}_safe"] = record[f"{name}_safe"]
    return out


def collate_pairs(features: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Stack B tokenised pairs into one right-padded batch, chosen rows first.

    Returns input_ids (2B, L) padded with `pad_token_id`, attention_mask (2B, L) from the true lengths (pad may
    equal eos, so it is never derived from the ids), labels (2B, L) padded with -100; ref_logps (2B,) float32 if
    every feature carries `ref_chosen_logps`/`ref_rejected_logps`; index (B,) int64 if every feature has `index`;
    is_safe (2B,) bool if every feature has `chosen_safe`/`rejected_safe` (PKU-SafeRLHF labels).
    """
    if not features:
        raise ValueError("collate_pairs needs at least one feature")
    ids = [f["chosen_input_ids"] for f in features] + [f["rejected_input_ids"] for f in features]
    labels = [f["chosen_labels"] for f in features] + [f["rejected_labels"] for f in features]
    for row, (x, y) in enumerate(zip(ids, labels)):
        if len(x) != len(y):
            raise ValueError(f"input_ids and labels differ in length ({len(x)} vs {len(y)}) in row {row}")
    input_ids, attention_mask = pad_rows(ids, pad_token_id)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": pad_rows(labels, IGNORE_INDEX)[0]}
    if all(
        f.get("ref_chosen_logps") is not None and f.get("ref_rejected_logps") is not None for f in features
    ):
        ref = [f["ref_chosen_logps"] for f in features] + [f["ref_rejected_logps"] for f in features]
        batch["ref_logps"] = torch.tensor(ref, dtype=torch.float32)
    if all("index" in f for f in features):
        batch["index"] = torch.tensor([f["index"] for f in features], dtype=torch.long)
    if all("chosen_safe" in f and "rejected_safe" in f for f in features):
        batch["is_safe"] = torch.tensor([f["chosen_safe"] for f in features] + [f["rejected_safe"] for f in features])
    return batch


def completion_row(
    prompt_ids: list[int],
    completion_ids: list[int],
    max_length: int,
    max_prompt_length: int,
    truncation_mode: str = "keep_end",
    truncation: str = "reference",
) -> tuple[list[int], list[int], bool]:
    """One prompt + completion row, truncated as `tokenize_pair` truncates a pair: (input_ids, labels with the
    prompt positions -100, truncated)."""
    prompt_ids, (completion_ids,), truncated = truncate_to_length(
        prompt_ids, [completion_ids], max_length, max_prompt_length, truncation_mode, truncation)
    return prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids, truncated


def tokenize_completion(
    record: dict,
    tokenizer,
    max_length: int,
    max_prompt_length: int,
    truncation_mode: str = "keep_end",
    prompt_format: str = "chat",
    truncation: str = "reference",
) -> dict:
    """Tokenise one unpaired record `{"prompt", "completion", "label"}` as `tokenize_pair` tokenises a pair
    (prompt rendering, eos unless `completion_finished` is false, truncation), the completion on its own.

    Returns `{"input_ids", "labels": list[int], "prompt_length": int, "truncated": bool, "desirable": bool,
    "prompt_ids", "completion_ids": list[int]}`, the last two untruncated: `collate_completions` pairs this
    prompt with another row's completion and truncates that row by the same rule."""
    _check_lengths(max_length, max_prompt_length, truncation_mode, truncation)
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos_token_id; completions must end with EOS")
    prompt = record["prompt"]
    prompt_ids = prompt_token_ids(tokenizer, prompt, prompt_format)
    completion_ids = response_token_ids(tokenizer, prompt, record["completion"], prompt_format,
                                        record.get("completion_finished", True))
    input_ids, labels, truncated = completion_row(prompt_ids, completion_ids, max_length, max_prompt_length,
                                                  truncation_mode, truncation)
    return {"input_ids": input_ids, "labels": labels, "prompt_length": labels.count(IGNORE_INDEX),
            "truncated": truncated, "desirable": bool(record["label"]), "prompt_ids": prompt_ids,
            "completion_ids": completion_ids}


def mismatch_shift(prompts: list[Any]) -> int:
    """The cyclic offset s of KTO's mismatched rows: row i takes the completion of row (i - s) mod N.

    TRL's offset is 1 (`_get_kl_dataset`: completions [c_{N-1}, c_0, ..., c_{N-2}]). Where that would give some
    row a completion written for its own prompt (the two completions of one preference pair side by side), the
    smallest offset that gives none is taken, or the one that gives the fewest. A cyclic offset keeps the
    mismatched completions the same set as the batch's own. N = 1: 0, the row's own completion (TRL refuses
    batches of one for this reason)."""
    n = len(prompts)
    if n < 2:
        return 0
    clashes = [sum(prompts[i] == prompts[(i - s) % n] for i in range(n)) for s in range(1, n)]
    return 1 + clashes.index(min(clashes))


def collate_completions(
    features: list[dict],
    pad_token_id: int,
    max_length: int,
    max_prompt_length: int,
    truncation_mode: str = "keep_end",
    truncation: str = "reference",
) -> dict[str, torch.Tensor]:
    """Stack N tokenised completions (`tokenize_completion`) into one right-padded batch, with KTO's mismatched
    rows for the KL anchor.

    Returns input_ids / attention_mask / labels (N, L) as `collate_pairs` pads them; kl_input_ids /
    kl_attention_mask / kl_labels (N, L'): prompt i with the completion of row kl_source[i] (`mismatch_shift`),
    tokenised and truncated like a real row (prompt positions -100); kl_source (N,) int64; desirable (N,)
    bool; index (N,) int64 if every feature has `index`.
    """
    if not features:
        raise ValueError("collate_completions needs at least one feature")
    for row, f in enumerate(features):
        if len(f["input_ids"]) != len(f["labels"]):
            raise ValueError(f"input_ids and labels differ in length ({len(f['input_ids'])} vs {len(f['labels'])}) "
                             f"in row {row}")
    n = len(features)
    shift = mismatch_shift([f["prompt_ids"] for f in features])
    source = [(i - shift) % n for i in range(n)]
    kl_rows = [completion_row(f["prompt_ids"], features[j]["completion_ids"], max_length, max_prompt_length,
                              truncation_mode, truncation)[:2] for f, j in zip(features, source)]
    input_ids, attention_mask = pad_rows([f["input_ids"] for f in features], pad_token_id)
    kl_input_ids, kl_attention_mask = pad_rows([ids for ids, _ in kl_rows], pad_token_id)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": pad_rows([f["labels"] for f in features], IGNORE_INDEX)[0],
        "kl_input_ids": kl_input_ids,
        "kl_attention_mask": kl_attention_mask,
        "kl_labels": pad_rows([labels for _, labels in kl_rows], IGNORE_INDEX)[0],
        "kl_source": torch.tensor(source, dtype=torch.long),
        "desirable": torch.tensor([f["desirable"] for f in features], dtype=torch.bool),
    }
    if all("index" in f for f in features):
        batch["index"] = torch.tensor([f["index"] for f in features], dtype=torch.long)
    return batch


# ---------------------------------------------------------------------------------------------- datamodule

RecordSource = Callable[[], Iterable[dict]] | Iterable[dict]


class PreferenceDataModule(L.LightningDataModule):
    """Tokenised preference pairs for DPO-family training.

    `source` / `val_source` are zero-argument callables returning records (e.g. a `functools.partial` of a
    loader) or record lists. Without `val_source`, `val_fraction` of the records (at least one) is held out,
    chosen by `random.Random(seed)`; `limit` then caps the training records. Batches come from `collate_pairs`.
    `prompt_format`, `truncation_mode` and `truncation` are `tokenize_pair`'s.

    `unpaired=True` (KTO; `conf/algo/kto.yaml` sets `data.unpaired`) makes every split a list of unpaired
    completions: sources may give unpaired records `{"prompt", "completion", "label"}`, preference records, or
    both. Records are split and limited as above, except that unpaired records sharing a prompt are held out
    together (a pair is one record already, so a pair source holds out the same prompts as for DPO); then each
    split is unpaired (`unpair_preference_records`: a pair gives its chosen completion, desirable, then its
    rejected one), tokenised by `tokenize_completion` and batched by `collate_completions`, which adds the
    mismatched rows of KTO's KL anchor. `limit` counts source records (a pair: two completions).
    `label_counts()` gives the training split's (desirable, undesirable) counts (`undesirable_weight=auto`).
    """

    def __init__(
        self,
        tokenizer,
        source: RecordSource,
        name: str = "preferences",
        val_source: RecordSource | None = None,
        max_length: int = 512,
        max_prompt_length: int = 256,
        truncation_mode: str = "keep_end",
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.1,
        limit: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        prompt_format: str = "chat",
        truncation: str = "reference",
        unpaired: bool = False,
    ):
        super().__init__()
        _check_lengths(max_length, max_prompt_length, truncation_mode, truncation)
        check_prompt_format(prompt_format)
        eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
        for key, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if not (isinstance(val_fraction, (int, float)) and 0 < val_fraction < 1):
            raise ValueError(f"val_fraction must be in the open interval (0, 1), got {val_fraction!r}")
        _check_limit(limit)
        if not (isinstance(num_workers, int) and num_workers >= 0):
            raise ValueError(f"num_workers must be a non-negative integer, got {num_workers!r}")
        for key, value in (("source", source), ("val_source", val_source)):
            if value is not None and (
                isinstance(value, (str, bytes)) or not (callable(value) or isinstance(value, Iterable))
            ):
                raise TypeError(
                    f"{key} must be a zero-argument callable or a list of records, got {type(value).__name__}"
                )
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer has no eos_token_id")
        if not isinstance(unpaired, bool):
            raise ValueError(f"unpaired must be true or false, got {unpaired!r}")
        if unpaired and min(batch_size, eval_batch_size) < 2:
            key = "batch_size" if batch_size < 2 else "eval_batch_size"
            raise ValueError(f"{key}={min(batch_size, eval_batch_size)} with unpaired data: KTO's KL anchor pairs "
                             "each prompt with another row's completion, so batches need at least 2 rows")

        self.tokenizer = tokenizer
        self.unpaired = unpaired
        self.source, self.val_source, self.name = source, val_source, name
        self.max_length, self.max_prompt_length, self.truncation_mode = (
            max_length,
            max_prompt_length,
            truncation_mode,
        )
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_fraction, self.limit, self.seed, self.num_workers = val_fraction, limit, seed, num_workers
        self.prompt_format, self.truncation = prompt_format, truncation
        self.pad_token_id: int = pad_token_id(tokenizer)
        self.train_records: list[dict] | None = None
        self.val_records: list[dict] | None = None
        self.train_features: list[dict] | None = None
        self.val_features: list[dict] | None = None
        self.train_progress = LoaderProgress()  # where the training loader stands: saved and restored with checkpoints

    def _load(self, source: RecordSource, key: str) -> list[dict]:
        records = list(source() if callable(source) else source)
        for i, r in enumerate(records):
            if self.unpaired and isinstance(r, dict) and is_unpaired(r):
                if not isinstance(r["completion"], str) or not isinstance(r["label"], bool):
                    raise ValueError(f"{key} record {i}: an unpaired record's completion is a string and its label "
                                     f"true or false, got {r!r:.120}")
                continue
            if isinstance(r, dict) and not self.unpaired and is_unpaired(r):
                raise ValueError(f"{key} record {i} is unpaired (prompt/completion/label): unpaired data needs "
                                 "data.unpaired=true and an unpaired algorithm (algo=kto)")
            if not isinstance(r, dict) or not {"prompt", "chosen", "rejected"} <= r.keys():
                also = " or prompt/completion/label" if self.unpaired else ""
                raise ValueError(
                    f"{key} record {i} must be a dict with prompt/chosen/rejected{also}, got {r!r:.120}"
                )
        return records

    def _split(self, records: list[dict]) -> tuple[list[dict], list[dict]]:
        n_val = max(1, round(self.val_fraction * len(records)))
        if n_val >= len(records):
            raise ValueError(
                f"{self.name}: cannot hold out {n_val} of {len(records)} records for validation; "
                "provide more records, a smaller val_fraction, or val_source"
            )
        order = list(range(len(records)))
        random.Random(self.seed).shuffle(order)
        val_ids = set(order[:n_val])
        # keep the source order inside each split so `limit` takes a stable prefix
        train = [r for i, r in enumerate(records) if i not in val_ids]
        val = [r for i, r in enumerate(records) if i in val_ids]
        return train, val

    def _split_unpaired(self, records: list[dict]) -> tuple[list[dict], list[dict]]:
        """`_split` over units: unpaired records sharing a prompt are one unit, any other record its own, so a
        prompt's completions never straddle the splits (with one record per unit this is `_split` exactly)."""
        unit_of, units = [], {}
        for i, r in enumerate(records):
            key = ("prompt", repr(r["prompt"])) if is_unpaired(r) else ("record", i)
            unit_of.append(units.setdefault(key, len(units)))
        grouped = [[r for r, u in zip(records, unit_of) if u == unit] for unit in range(len(units))]
        if len(grouped) == len(records):
            return self._split(records)
        train_units, val_units = self._split(grouped)
        return [r for unit in train_units for r in unit], [r for unit in val_units for r in unit]

    def _tokenize(self, records: list[dict]) -> list[dict]:
        tok = functools.partial(
            tokenize_completion if self.unpaired else tokenize_pair,
            tokenizer=self.tokenizer,
            max_length=self.max_length,
            max_prompt_length=self.max_prompt_length,
            truncation_mode=self.truncation_mode,
            prompt_format=self.prompt_format,
            truncation=self.truncation,
        )
        return [{**tok(r), "index": i} for i, r in enumerate(records)]

    def setup(self, stage: str | None = None) -> None:
        """Load, split and tokenise once; later calls are no-ops."""
        if self.train_features is not None:
            return
        records = self._load(self.source, "source")
        if self.val_source is None:
            train, val = self._split_unpaired(records) if self.unpaired else self._split(records)
        else:
            train, val = records, self._load(self.val_source, "val_source")
        if self.limit is not None:
            train = train[: self.limit]
        if not train or not val:
            raise ValueError(f"{self.name}: empty split ({len(train)} train / {len(val)} val records)")
        if self.unpaired:
            train, val = unpair_preference_records(train), unpair_preference_records(val)
        self.train_records, self.val_records = train, val
        self.train_features, self.val_features = self._tokenize(train), self._tokenize(val)
        n_cut = sum(f["truncated"] for f in self.train_features)
        if self.unpaired:
            (n_desirable, n_undesirable), n_val = self.label_counts(), len(val)
            log.info("%s: %d train completions (%d desirable, %d undesirable) / %d val completions (%d train "
                     "completions truncated to max_length=%d)", self.name, len(train), n_desirable, n_undesirable,
                     n_val, n_cut, self.max_length)
            return
        log.info(
            "%s: %d train / %d val pairs (%d train pairs truncated to max_length=%d)",
            self.name,
            len(train),
            len(val),
            n_cut,
            self.max_length,
        )

    def label_counts(self) -> tuple[int, int]:
        """(desirable, undesirable) completions of the training split (unpaired data)."""
        if not self.unpaired:
            raise RuntimeError(f"{self.name}: label counts are for unpaired data (data.unpaired=true)")
        self.setup()
        n_desirable = sum(f["desirable"] for f in self.train_features)
        return n_desirable, len(self.train_features) - n_desirable

    def collate_fn(self) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
        if not self.unpaired:
            return functools.partial(collate_pairs, pad_token_id=self.pad_token_id)
        return functools.partial(collate_completions, pad_token_id=self.pad_token_id, max_length=self.max_length,
                                 max_prompt_length=self.max_prompt_length, truncation_mode=self.truncation_mode,
                                 truncation=self.truncation)

    def loader(self, features: list[dict], batch_size: int, shuffle: bool) -> DataLoader:
        # shuffled (training) batches can be resumed mid-epoch from a checkpoint in the same order
        common = dict(batch_size=batch_size, num_workers=self.num_workers, collate_fn=self.collate_fn())
        if not shuffle:
            return DataLoader(features, **common)
        return ResumableLoader(features, sampler=EpochShuffle(len(features), self.seed),
                               progress=self.train_progress, **common)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self.loader(self.train_features, self.batch_size, shuffle=True)

    # Lightning saves these in checkpoints and restores them before the loaders are built (riskexp.resume)
    def state_dict(self) -> dict:
        return {"train_loader": self.train_progress.state()}

    def load_state_dict(self, state: dict) -> None:
        if "train_loader" in state:  # continue mid-epoch
            self.train_progress.restore(state["train_loader"])

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self.loader(self.val_features, self.eval_batch_size, shuffle=False)

    def attach_reference_logps(self, split: str, values: dict[int, tuple[float, float]]) -> None:
        """Store precomputed reference log-probs `{index: (chosen, rejected)}` on the `split` features, so
        batches carry `ref_logps` and the reference model need not run again (DPO/IPO)."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if self.unpaired:
            raise RuntimeError(f"{self.name}: precomputed reference log-probs are for preference pairs, not "
                               "unpaired data")
        features = self.train_features if split == "train" else self.val_features
        if features is None:
            raise RuntimeError("call setup() before attach_reference_logps()")
        for index, (chosen, rejected) in values.items():
            index = int(index)
            if not 0 <= index < len(features):
                raise KeyError(f"{split} index {index} out of range [0, {len(features)})")
            features[index]["ref_chosen_logps"] = float(chosen)
            features[index]["ref_rejected_logps"] = float(rejected)
