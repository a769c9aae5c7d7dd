"""The helpful/harmless task in the PKU-SafeRLHF schema: one loader for the embedded set (`data=safety`) and for
`PKU-Alignment/PKU-SafeRLHF-30K` and the other PKU-SafeRLHF releases (hub name, or local files of the schema).

A row holds one prompt and two responses with their labels:
    prompt, response_0, response_1, is_response_0_safe, is_response_1_safe, better_response_id, safer_response_id
(the embedded set adds `reward_k`, `cost_k` scores). As in SACPO (`line/sacpo` src/util.py), a row gives a
helpfulness pair (chosen = the better response), a harmlessness pair (chosen = the safer response), or two
unpaired completions labelled safe / unsafe (KTO's interface).
"""

from __future__ import annotations

from typing import Any

from riskexp.data.preference import _check_limit, _is_number, collect_records
from riskexp.data.tables import read_split

PKU_COLUMNS = ("prompt", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe",
               "better_response_id", "safer_response_id")
# which preference a row gives: by `better_response_id`, by `safer_response_id`, or unpaired safety labels
PAIRINGS = {"helpfulness": "better_response_id", "harmlessness": "safer_response_id", "unpaired": None}
# which rows give harmlessness pairs: all (SACPO), or those whose two responses differ in their safety labels
HARMLESSNESS_ROWS = ("all", "safe_vs_unsafe")


def _response_id(row: dict, key: str) -> int:
    value = row.get(key)
    if isinstance(value, bool) or value not in (0, 1):
        raise ValueError(f"{key} must be 0 or 1, got {value!r}")
    return int(value)


def _is_safe(row: dict, k: int) -> bool:
    value = row.get(f"is_response_{k}_safe")
    if not isinstance(value, bool):
        raise ValueError(f"is_response_{k}_safe must be true or false, got {value!r}")
    return value


def _response(row: dict, k: int) -> str:
    value = row.get(f"response_{k}")
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"response_{k} must be a non-empty string, got {value!r:.80}")
    return value


def pku_records(row: dict, pairs: str) -> list[dict]:
    """The records one PKU-SafeRLHF row gives: one preference `{"prompt", "chosen", "rejected", ...}` for
    `pairs="helpfulness"` or `"harmlessness"` (with `chosen_safe` / `rejected_safe` and the scores the row has:
    `chosen_reward`, `rejected_cost`, ...), or two `{"prompt", "completion", "label"}` (label = is safe) for
    `"unpaired"`. Raises ValueError for a malformed row."""
    if pairs not in PAIRINGS:
        raise ValueError(f"pairs={pairs!r} is not a pairing; accepted: {', '.join(PAIRINGS)}")
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r:.80}")
    responses, safe = [_response(row, 0), _response(row, 1)], [_is_safe(row, 0), _is_safe(row, 1)]
    if PAIRINGS[pairs] is None:
        return [{"prompt": prompt, "completion": responses[k], "label": safe[k]} for k in (0, 1)]
    if responses[0] == responses[1]:
        raise ValueError("response_0 and response_1 are the same text: no preference")
    chosen = _response_id(row, PAIRINGS[pairs])
    order = {"chosen": chosen, "rejected": 1 - chosen}
    record: dict[str, Any] = {"prompt": prompt, **{side: responses[k] for side, k in order.items()}}
    record |= {f"{side}_safe": safe[k] for side, k in order.items()}
    for score in ("reward", "cost"):
        record |= {f"{side}_{score}": row[f"{score}_{k}"] for side, k in order.items()
                   if _is_number(row.get(f"{score}_{k}"))}
    return [record]


def load_pku_saferlhf(
    name_or_path: str = "PKU-Alignment/PKU-SafeRLHF-30K",
    split: str = "train",
    pairs: str = "helpfulness",
    data_dir: str | None = None,
    limit: int | None = None,
    harmlessness_rows: str = "all",
) -> list[dict]:
    """PKU-SafeRLHF rows as preference records (`pairs="helpfulness"`: chosen = `better_response_id`;
    `"harmlessness"`: chosen = `safer_response_id`) or unpaired safety-labelled completions (`"unpaired"`).

    `name_or_path`: a local JSONL / JSON / Parquet file (the embedded set), a directory of `<split>*` files
    laid out like the hub repository, or a hub dataset name (`PKU-Alignment/PKU-SafeRLHF-30K`,
    `PKU-Alignment/PKU-SafeRLHF` with `data_dir` for a subset such as `data/Alpaca-7B`). Malformed rows are
    skipped with one counted warning; `limit` keeps the records of the first `limit` valid rows.

    `harmlessness_rows="safe_vs_unsafe"` takes harmlessness pairs only from rows with one safe and one unsafe
    response (`is_response_k_safe` differ), leaving out rows where `safer_response_id` ranks two safe (or two
    unsafe) responses: in a set labelled by a cost scorer (the embedded one) that ranking is the scorer's
    noise between two refusals or two harmless answers; SACPO trains on all rows of the human-labelled set.
    """
    if pairs not in PAIRINGS:
        raise ValueError(f"data.source.pairs={pairs!r} is not a pairing; accepted: {', '.join(PAIRINGS)}")
    if harmlessness_rows not in HARMLESSNESS_ROWS:
        raise ValueError(f"data.source.harmlessness_rows={harmlessness_rows!r} is not accepted: one of "
                         f"{', '.join(HARMLESSNESS_ROWS)}")
    _check_limit(limit)
    rows, source = read_split(name_or_path, split, data_dir, columns=PKU_COLUMNS)
    if pairs == "harmlessness" and harmlessness_rows == "safe_vs_unsafe":
        rows = [row for row in rows if row.get("is_response_0_safe") != row.get("is_response_1_safe")]
    return collect_records(rows, lambda row: pku_records(row, pairs), source, limit,
                           errors=(ValueError, KeyError, TypeError))
