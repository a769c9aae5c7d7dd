"""Building a preference set from a model's own samples.

    python -m riskexp.data.build data=sentiment model=smollm2_135m data.build.k=4 seed=0

For each prompt, k completions are sampled and scored by the task's reward (and cost); `data.build.rows` turns
them into rows: `best_vs_worst` (score = reward - cost_weight * cost; the best becomes `chosen`, the worst
`rejected`; what `riskexp.data.preference.load_preference_file` reads) or `safety_rows` (two responses with
helpfulness and harmlessness labels in the PKU-SafeRLHF schema; what `riskexp.data.safety` reads). Prompts whose
samples all score alike carry no preference and are skipped. The samples come from the
base model of `model=`, or from an exported policy with `model.path=runs/<...>/policy`; on a GPU when there is one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from riskexp.cli import CONF_DIR, run_command
from riskexp.evaluation import sample_k_and_score
from riskexp.files import write_jsonl
from riskexp.models import build_policy_and_reference, inference_device
from riskexp.schema import ConfigError, validate

Scorer = Callable[[list[str], list[str]], torch.Tensor]


@dataclass
class ScoredSamples:
    """k sampled completions per prompt with their scores; sample j*k + i is prompt j's i-th completion."""

    prompts: list[str]
    k: int
    completions: list[str]
    rewards: torch.Tensor  # (N k,)
    costs: torch.Tensor | None  # (N k,) or None without a cost scorer
    finished: list[bool]  # ended with eos (not cut at max_new_tokens)

    def group(self, j: int) -> range:
        return range(j * self.k, (j + 1) * self.k)


def sample_and_score(
    model,
    tokenizer,
    prompts: Sequence[str],
    reward: Scorer,
    *,
    k: int = 4,
    cost: Scorer | None = None,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 32,
    seed: int = 0,
    prompt_format: str = "plain",
) -> ScoredSamples:
    """k samples per prompt, scored by `reward` (and `cost`); deterministic under `seed`."""
    if not isinstance(k, int) or k < 2:
        raise ValueError(f"k={k!r}: a pair needs at least 2 samples per prompt")
    prompts = list(prompts)
    _, samples, rewards, costs = sample_k_and_score(
        model, tokenizer, prompts, k, reward, cost, max_new_tokens=max_new_tokens, temperature=temperature,
        top_p=top_p, do_sample=True, batch_size=batch_size, seed=seed, prompt_format=prompt_format)
    return ScoredSamples(prompts, k, samples.texts, rewards, costs, list(samples.finished))


def best_vs_worst(samples: ScoredSamples, cost_weight: float = 0.0) -> list[dict]:
    """Preference records: per prompt, the best vs the worst sample under score = reward - cost_weight * cost.

    Records: `prompt, chosen, rejected, chosen_score, rejected_score, chosen_reward, rejected_reward`, plus
    `chosen_cost, rejected_cost` when there are costs. Prompts whose k scores are all equal are skipped.
    """
    if samples.costs is None and cost_weight:
        raise ValueError(f"cost_weight={cost_weight} but no cost scorer was given")
    rewards, costs = samples.rewards, samples.costs
    scores = rewards - cost_weight * costs if costs is not None else rewards
    records = []
    for j, prompt in enumerate(samples.prompts):
        group = samples.group(j)
        # argmax / argmin take the first of tied samples, so ties do not depend on anything but the seed
        best, worst = group[int(scores[group].argmax())], group[int(scores[group].argmin())]
        if scores[best] == scores[worst]:
            continue
        record = {
            "prompt": prompt,
            "chosen": samples.completions[best],
            "rejected": samples.completions[worst],
            "chosen_score": scores[best].item(),
            "rejected_score": scores[worst].item(),
            "chosen_reward": rewards[best].item(),
            "rejected_reward": rewards[worst].item(),
            # a completion cut at max_new_tokens gets no eos in training (riskexp.data.tokenize_pair)
            "chosen_finished": samples.finished[best],
            "rejected_finished": samples.finished[worst],
        }
        if costs is not None:
            record.update(chosen_cost=costs[best].item(), rejected_cost=costs[worst].item())
        records.append(record)
    return records


def safety_rows(samples: ScoredSamples, unsafe_above: float = 0.5) -> list[dict]:
    """PKU-SafeRLHF rows (`riskexp.data.safety`): per prompt, response_0 = the most helpful sample (highest
    reward) and response_1 = the safest of the others (lowest cost; the least helpful when the most helpful is
    also the safest), labelled `better_response_id` by reward, `safer_response_id` by cost and
    `is_response_k_safe` = cost <= `unsafe_above`, with `reward_k`, `cost_k`, `finished_k`. Ties label 0. A
    prompt whose samples all score alike is skipped."""
    if samples.costs is None:
        raise ValueError("safety rows need a cost scorer (data.task.cost)")
    rewards, costs = samples.rewards, samples.costs
    rows = []
    for j, prompt in enumerate(samples.prompts):
        group = samples.group(j)
        helpful = group[int(rewards[group].argmax())]
        others = [i for i in group if i != helpful]
        safest = min(others, key=lambda i: (costs[i].item(), -rewards[i].item()))
        if costs[safest] >= costs[helpful]:  # the most helpful is the safest too: pair it with the least helpful
            safest = min(others, key=lambda i: rewards[i].item())
        pair = (helpful, safest)
        if rewards[helpful] == rewards[safest] and costs[helpful] == costs[safest]:
            continue
        row = {"prompt": prompt, **{f"response_{n}": samples.completions[i] for n, i in enumerate(pair)}}
        row |= {f"is_response_{n}_safe": bool(costs[i] <= unsafe_above) for n, i in enumerate(pair)}
        row |= {"better_response_id": int(rewards[pair[1]] > rewards[pair[0]]),
                "safer_response_id": int(costs[pair[1]] < costs[pair[0]])}
        for n, i in enumerate(pair):
            row |= {f"reward_{n}": rewards[i].item(), f"cost_{n}": costs[i].item(),
                    f"finished_{n}": samples.finished[i]}
        rows.append(row)
    return rows


def build_pairs(model, tokenizer, prompts: Sequence[str], reward: Scorer, *, cost_weight: float = 0.0,
                **sampling) -> list[dict]:
    """Best-vs-worst of k samples per prompt (`best_vs_worst` of `sample_and_score`), in the prompts' order."""
    return best_vs_worst(sample_and_score(model, tokenizer, prompts, reward, **sampling), cost_weight)


def build(cfg: DictConfig) -> Path:
    """`python -m riskexp.data.build` (`conf/build.yaml`): the data group's `build` section and its task's scorers."""
    validate(cfg)
    if not cfg.data.get("build"):
        raise ConfigError(f"data={cfg.data.name!r} has no build section; accepted: data=sentiment, data=toxicity")
    if cfg.model.get("ref_path"):
        raise ConfigError(f"model.ref_path={cfg.model.ref_path!r} is not used by riskexp.data.build, which "
                          "samples from model.path (or the base model); drop it")
    from riskexp.console import tidy_third_party_output

    tidy_third_party_output()  # no carriage-return bars in redirected output
    spec, task = cfg.data.build, cfg.data.task
    # the same model building as training: model.path=DIR samples from the exported policy in DIR
    model, _, tokenizer = build_policy_and_reference(
        instantiate(cfg.model.loader, _partial_=True), cfg.model.path, dtype=cfg.model.dtype, need_reference=False
    )
    model.to(inference_device())
    samples = sample_and_score(
        model, tokenizer, instantiate(spec.prompts), instantiate(task.reward), k=spec.k,
        cost=instantiate(task.cost) if task.get("cost") else None,
        max_new_tokens=spec.max_new_tokens, temperature=spec.temperature, top_p=spec.top_p,
        batch_size=spec.batch_size, seed=cfg.seed, prompt_format=cfg.data.prompt_format,
    )
    records = instantiate(spec.rows)(samples)  # best_vs_worst pairs, or PKU-SafeRLHF rows (safety_rows)
    path = write_jsonl(records, spec.out)
    print(f"{len(records)} rows from {cfg.model.path or cfg.model.name} on {cfg.data.name} -> {path}", flush=True)
    return path


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="build")
def main(cfg: DictConfig) -> None:
    run_command(build, cfg)


if __name__ == "__main__":
    main()
