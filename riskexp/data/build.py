"""Building a preference set from a model's own samples (best-of-k vs worst-of-k under a reward).

    python -m riskexp.data.build data=sentiment model=smollm2_135m data.build.k=4 seed=0

For each prompt, k completions are sampled and scored with score = reward - cost_weight * cost; the best
becomes `chosen` and the worst `rejected`. Prompts whose k scores are all equal carry no preference and are
skipped. The records are what `riskexp.data.preference.load_preference_file` reads. The samples come from the
base model of `model=`, or from an exported policy with `model.path=runs/<...>/policy`; on a GPU when there is one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from riskexp.cli import CONF_DIR, run_command
from riskexp.evaluation import score_with
from riskexp.files import write_jsonl
from riskexp.generation import generate
from riskexp.models import build_policy_and_reference, inference_device
from riskexp.schema import ConfigError, validate

Scorer = Callable[[list[str], list[str]], torch.Tensor]


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
    prompt_format: str = "plain",
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
    samples = generate(
        model, tokenizer, repeated, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        do_sample=True, batch_size=batch_size, seed=seed, prompt_format=prompt_format,
    )
    completions = samples.texts
    rewards = score_with(reward, repeated, completions, "reward")
    costs = score_with(cost, repeated, completions, "cost") if cost is not None else None
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
            # a completion cut at max_new_tokens gets no eos in training (riskexp.data.tokenize_pair)
            "chosen_finished": samples.finished[best],
            "rejected_finished": samples.finished[worst],
        }
        if costs is not None:
            record.update(chosen_cost=costs[best].item(), rejected_cost=costs[worst].item())
        records.append(record)
    return records


def build(cfg: DictConfig) -> Path:
    """`python -m riskexp.data.build` (`conf/build.yaml`): the data group's `build` section and its task's scorers."""
    validate(cfg)
    if not cfg.data.get("build"):
        raise ConfigError(f"data={cfg.data.name!r} has no build section; accepted: data=sentiment, data=toxicity")
    if cfg.model.get("ref_path"):
        raise ConfigError(f"model.ref_path={cfg.model.ref_path!r} is not used by riskexp.data.build, which "
                          "samples from model.path (or the base model); drop it")
    spec, task = cfg.data.build, cfg.data.task
    # the same model building as training: model.path=DIR samples from the exported policy in DIR
    model, _, tokenizer = build_policy_and_reference(
        instantiate(cfg.model.loader, _partial_=True), cfg.model.path, dtype=cfg.model.dtype, need_reference=False
    )
    model.to(inference_device())
    records = build_pairs(
        model, tokenizer, instantiate(spec.prompts), instantiate(task.reward), k=spec.k,
        cost=instantiate(task.cost) if task.get("cost") else None, cost_weight=spec.cost_weight,
        max_new_tokens=spec.max_new_tokens, temperature=spec.temperature, top_p=spec.top_p,
        batch_size=spec.batch_size, seed=cfg.seed, prompt_format=cfg.data.prompt_format,
    )
    path = write_jsonl(records, spec.out)
    print(f"{len(records)} pairs from {cfg.model.path or cfg.model.name} on {cfg.data.name} -> {path}", flush=True)
    return path


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="build")
def main(cfg: DictConfig) -> None:
    run_command(build, cfg)


if __name__ == "__main__":
    main()
