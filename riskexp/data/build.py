"""Building a preference set from a model's own samples (best-of-k vs worst-of-k under a reward).

For each prompt, k completions are sampled and scored with score = reward - cost_weight * cost; the best
becomes `chosen` and the worst `rejected`. Prompts whose k scores are all equal carry no preference and are
skipped. The records are what `riskexp.data.preference.load_preference_file` reads.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from riskexp.generation import generate

Scorer = Callable[[list[str], list[str]], torch.Tensor]


def _scores(scorer: Scorer, prompts: list[str], completions: list[str], what: str) -> torch.Tensor:
    s = torch.as_tensor(scorer(prompts, completions)).detach().double().flatten().cpu()
    if s.numel() != len(completions):
        raise ValueError(f"{what} scorer returned {s.numel()} scores for {len(completions)} completions")
    return s


def build_pairs(
    model,
    tokenizer,
    prompts: Sequence[str],
    reward: Scorer,
    *,
    k: int = 4,
    cost: Scorer | None = None,
    cost_weight: float = 0.0,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 32,
    seed: int = 0,
    chat: bool = False,
) -> list[dict]:
    """Best-vs-worst of k samples per prompt, as preference records in the prompts' order.

    Records: `prompt, chosen, rejected, chosen_score, rejected_score, chosen_reward, rejected_reward`, plus
    `chosen_cost, rejected_cost` when a cost scorer is given. Deterministic under `seed`.
    """
    if not isinstance(k, int) or k < 2:
        raise ValueError(f"k={k!r}: a pair needs at least 2 samples per prompt")
    if cost is None and cost_weight:
        raise ValueError(f"cost_weight={cost_weight} but no cost scorer was given")
    prompts = list(prompts)
    # one batched call over the prompts repeated k times: copies of a prompt share a length, so they share
    # batches and pad nothing; sampling makes the copies differ
    repeated = [p for p in prompts for _ in range(k)]
    completions = generate(
        model, tokenizer, repeated, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        do_sample=True, batch_size=batch_size, seed=seed, chat=chat,
    )
    rewards = _scores(reward, repeated, completions, "reward")
    costs = _scores(cost, repeated, completions, "cost") if cost is not None else None
    scores = rewards - cost_weight * costs if costs is not None else rewards

    records = []
    for j, prompt in enumerate(prompts):
        span = slice(j * k, (j + 1) * k)
        group = scores[span]
        # argmax / argmin take the first of tied samples, so ties do not depend on anything but the seed
        best, worst = j * k + int(group.argmax()), j * k + int(group.argmin())
        if scores[best] == scores[worst]:
            continue
        record = {
            "prompt": prompt,
            "chosen": completions[best],
            "rejected": completions[worst],
            "chosen_score": scores[best].item(),
            "rejected_score": scores[worst].item(),
            "chosen_reward": rewards[best].item(),
            "rejected_reward": rewards[worst].item(),
        }
        if costs is not None:
            record.update(chosen_cost=costs[best].item(), rejected_cost=costs[worst].item())
        records.append(record)
    return records


def write_jsonl(records: Iterable[dict], path: str | os.PathLike) -> Path:
    """Write one JSON object per line, atomically: readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; the data set is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines file (blank lines ignored)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
