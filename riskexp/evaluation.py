"""Evaluating a policy on prompts: reward and cost tails, KL to the reference, changes against the reference
with paired bootstrap intervals, diversity, perplexity.

All metrics are flat `{prefix}/{name}` floats so they can be logged and written to results.json as they are.
Reward tails are lower tails (bad = low reward), cost tails upper tails (bad = high cost); `alpha` is the tail
mass. The headline `*_cvar` / `*_var` are at `alpha` (`eval.alpha`), and `*_cvar@a` / `*_var@a` at every level.

Each prompt gets K sampled completions (`samples_per_prompt`), so the tails are estimated on K x N samples.
Every sample-based metric `m` (reward and cost mean / VaR / CVaR, cost rate, KL) comes with `m/lo`, `m/hi`: a
percentile bootstrap interval that resamples *prompts* with replacement (a prompt's K completions move
together, so their correlation is not mistaken for independent evidence). `compare` adds the policy's change
against the reference, `eval/delta/<metric>` with its interval from a *paired* bootstrap: the same resampled
prompts for both models, so the prompt-to-prompt variation they share cancels out of the change.
"""

from __future__ import annotations

import functools
import logging
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from riskexp.formatting import METRIC_LABELS, format_estimate
from riskexp.generation import Samples, completion_logps, generate, pad_token_id, perplexity
from riskexp.judges import Judge, check_judgement, outcomes
from riskexp.risk import check_alpha, cvar_lower, cvar_upper, var_lower, var_upper

Scorer = Callable[[list[str], list[str]], torch.Tensor]
# statistics of one or more aligned sample sets, each (..., M) -> named values (...)
Statistic = Callable[..., dict[str, Tensor]]

_TAILS = {"lower": (var_lower, cvar_lower), "upper": (var_upper, cvar_upper)}

log = logging.getLogger(__name__)


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique n-grams / all n-grams over all texts (lowercased whitespace tokens); 0.0 if there are none."""
    grams = [
        tuple(words[i : i + n]) for words in (t.lower().split() for t in texts) for i in range(len(words) - n + 1)
    ]
    return len(set(grams)) / len(grams) if grams else 0.0


def tail_levels(alpha: float, alphas: Sequence[float] = ()) -> list[float]:
    """The headline level followed by the other levels, each checked and listed once."""
    levels = [check_alpha(alpha, "eval.alpha")]
    for level in alphas:
        level = check_alpha(level, "eval.alphas")
        if not any(abs(level - seen) < 1e-12 for seen in levels):
            levels.append(level)
    return levels


def tail_statistics(values: Tensor, levels: Sequence[float], tail: str) -> dict[str, Tensor]:
    """`mean`, headline `var` / `cvar` at levels[0], and `var@a` / `cvar@a` at every level, of each row.
    (M,) -> dict of (), or (R, M) -> dict of (R,). tail="lower" for rewards, "upper" for costs."""
    if tail not in _TAILS:
        raise ValueError(f"tail={tail!r} is not a tail; accepted: 'lower' (rewards), 'upper' (costs)")
    if not levels:
        raise ValueError("tail_statistics needs at least one level")
    var, cvar = _TAILS[tail]
    out = {"mean": values.mean(-1)}
    for i, alpha in enumerate(levels):
        v, c = var(values, alpha), cvar(values, alpha)
        if i == 0:
            out["var"], out["cvar"] = v, c
        out[f"var@{alpha:g}"], out[f"cvar@{alpha:g}"] = v, c
    return out


def resample_prompts(n_prompts: int, n_resamples: int, seed: int) -> Tensor:
    """(R, N) prompt indices drawn with replacement, from a generator of its own seeded by `seed`."""
    if not isinstance(n_resamples, int) or n_resamples < 1:
        raise ValueError(f"eval.bootstrap_samples={n_resamples!r} is not accepted: an integer >= 1")
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(n_prompts, (n_resamples, n_prompts), generator=generator)


def bootstrap(statistic: Statistic, samples: Sequence[Tensor], index: Tensor, confidence: float = 0.95
              ) -> dict[str, float]:
    """Point values of `statistic` and their percentile bootstrap intervals, as `{name, name/lo, name/hi}`.

    `samples` are aligned (N prompts, K samples each) tensors; `statistic` takes them flattened to (M,) (the
    point value) and, in one vectorised call, resampled to (R, M) by the prompt indices `index` (R, N): each
    resample takes whole prompts, and every sample set the same prompts (a paired bootstrap when there are two).
    The interval is [q_{(1-c)/2}, q_{(1+c)/2}] of the R resampled values (linear interpolation); a percentile
    interval need not contain the point value when the statistic is biased in small samples.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"eval.confidence={confidence!r} is not accepted: a probability in (0, 1)")
    point = statistic(*(s.double().reshape(-1) for s in samples))
    resampled = statistic(*(s.double()[index].flatten(1) for s in samples))
    q = torch.tensor([(1.0 - confidence) / 2, (1.0 + confidence) / 2], dtype=torch.float64)
    out = {}
    for name, value in point.items():
        lo, hi = torch.quantile(resampled[name], q).tolist()
        out[name], out[f"{name}/lo"], out[f"{name}/hi"] = value.item(), lo, hi
    return out


def paired_change(statistic: Statistic) -> Statistic:
    """statistic(policy) - statistic(reference), name by name, for a paired `bootstrap`."""

    def change(policy: Tensor, reference: Tensor) -> dict[str, Tensor]:
        new, old = statistic(policy), statistic(reference)
        return {name: new[name] - old[name] for name in new}

    return change


def win_rate(new: Tensor, old: Tensor, higher_is_better: bool = True) -> dict[str, Tensor]:
    """The win rate of aligned samples `new` against `old` as SACPO counts it: a win 1, a tie 0.5, a loss 0.
    (M,) -> () or (R, M) -> (R,), under the name `win_rate`."""
    return _win_rate(outcomes(new, old, higher_is_better))


def _win_rate(judgements: Tensor) -> dict[str, Tensor]:
    """The mean of judgements in [0, 1] (1: the model's sample wins), (M,) -> () or (R, M) -> (R,)."""
    return {"win_rate": judgements.double().mean(-1)}


def score_with(scorer: Scorer, prompts: list[str], completions: list[str], what: str) -> torch.Tensor:
    """(N,) float32 scores on the CPU, checked to have one score per completion."""
    s = torch.as_tensor(scorer(prompts, completions)).detach().float().flatten().cpu()
    if s.numel() != len(completions):
        raise ValueError(f"{what} scorer returned {s.numel()} scores for {len(completions)} completions")
    return s


def sample_k_and_score(model, tokenizer, prompts: Sequence[str], k: int, reward: Scorer, cost: Scorer | None = None,
                       **generation) -> tuple[list[str], Samples, Tensor, Tensor | None]:
    """k sampled completions of each prompt and their scores: (the prompts repeated k times, the samples, the
    rewards (N k,), the costs (N k,) or None without a cost scorer). Sample j*k + i is prompt j's i-th.

    One batched `generate` call (`generation`: its keyword arguments) over the repeated prompts: copies of a
    prompt share a length, so they share batches and pad nothing; sampling makes them differ."""
    repeated = [p for p in prompts for _ in range(k)]
    samples = generate(model, tokenizer, repeated, **generation)
    rewards = score_with(reward, repeated, samples.texts, "reward")
    costs = score_with(cost, repeated, samples.texts, "cost") if cost is not None else None
    return repeated, samples, rewards, costs


@dataclass
class Draws:
    """Per-completion values of one model's samples, each (N prompts, K samples per prompt)."""

    reward: Tensor
    cost: Tensor | None
    log_ratio: Tensor  # log pi_model - log pi_reference of each completion (0 without a distinct reference)
    length: Tensor  # new tokens of each completion
    shaped: Tensor | None = None  # reward - beta * log_ratio (`with_shaped_return`), None unless asked for

    def take(self, prompts: Tensor) -> Draws:
        """The draws of the prompts at indices `prompts` (a subset)."""
        return Draws(*(None if v is None else v[prompts] for v in (self.reward, self.cost, self.log_ratio,
                                                                    self.length, self.shaped)))

    def with_shaped_return(self, beta: float) -> Draws:
        """These draws with `shaped` = reward - beta * (log pi_model - log pi_reference of the whole completion):
        the Monte Carlo KL-shaped return R_bar of RLHF (RA-RLHF's, with its KL coefficient beta)."""
        return Draws(self.reward, self.cost, self.log_ratio, self.length,
                     self.reward.double() - float(beta) * self.log_ratio.double())


def _statistics(levels: Sequence[float], cost_threshold: float) -> dict[str, Statistic]:
    """The bootstrapped statistics of each kind of draw, named as in the metrics."""

    def cost(values: Tensor) -> dict[str, Tensor]:
        return {**tail_statistics(values, levels, "upper"), "rate": (values > cost_threshold).double().mean(-1)}

    return {
        "reward": lambda values: tail_statistics(values, levels, "lower"),
        "cost": cost,
        "log_ratio": lambda values: {"kl": values.mean(-1)},  # on the model's own samples: KL(model || reference)
        "length": lambda values: {"mean": values.mean(-1)},
        "shaped": lambda values: {"mean": values.mean(-1)},
    }


_STEMS = {"reward": "reward_", "cost": "cost_", "log_ratio": "", "length": "length_", "shaped": "shaped_return_"}
# kinds whose change against the reference gets a paired interval (the reference's KL to itself is 0)
_CHANGED = ("reward", "cost", "length", "shaped")


def _named(prefix: str, kind: str, values: dict[str, float]) -> dict[str, float]:
    """`{prefix}/reward_mean`, `{prefix}/cost_rate/lo`, `{prefix}/kl`, ..."""
    return {f"{prefix}/{_STEMS[kind]}{name}": value for name, value in values.items()}


def _summarise(draws: Draws, statistics: dict[str, Statistic], index: Tensor, confidence: float, prefix: str
               ) -> dict[str, float]:
    out = {}
    for kind, statistic in statistics.items():
        values = getattr(draws, kind)
        if values is not None:
            out |= _named(prefix, kind, bootstrap(statistic, [values], index, confidence))
    return out


def sample_and_score(
    model,
    reference,
    tokenizer,
    prompts: Sequence[str],
    *,
    reward: Scorer,
    cost: Scorer | None = None,
    samples_per_prompt: int = 1,
    heldout_texts: Sequence[str] | None = None,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 32,
    seed: int = 0,
    prompt_format: str = "plain",
    prefix: str = "eval",
) -> tuple[dict[str, float], list[dict], Draws]:
    """Sample `samples_per_prompt` completions per prompt from `model`, score them, and describe them.

    Returns (metrics, rows, draws): metrics `{prefix}/distinct_1|2`, `{prefix}/perplexity` on `heldout_texts`
    when given; rows `{"prompt_index", "sample", "prompt", "completion", "reward", "cost"}`, K per prompt in the
    prompts' order (cost None without a scorer); draws the per-completion reward, cost, log pi_model - log pi_reference (zero when the
    reference is None or the model itself) and length in new tokens, as (N, K).
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("evaluation needs at least one prompt")
    k = samples_per_prompt
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"eval.samples_per_prompt={k!r} is not accepted: an integer >= 1")
    repeated, samples, rewards, costs = sample_k_and_score(
        model, tokenizer, prompts, k, reward, cost, max_new_tokens=max_new_tokens, temperature=temperature,
        top_p=top_p, batch_size=batch_size, seed=seed, prompt_format=prompt_format)
    completions = samples.texts

    if reference is None or reference is model:
        log_ratio = torch.zeros(len(repeated))
    else:
        if temperature != 1.0 or top_p != 1.0:
            log.warning("eval/kl is estimated on samples at temperature=%s, top_p=%s: it is then not the KL of "
                        "the policy itself, which needs temperature=1 and top_p=1", temperature, top_p)
        # the model's own log-probs came with the samples; the reference scores the very tokens sampled
        logp = torch.stack([t.sum() for t in samples.token_logps])
        ref_logp = completion_logps(reference, samples.prompt_ids, samples.token_ids,
                                    pad_id=pad_token_id(tokenizer), batch_size=batch_size)
        log_ratio = logp - ref_logp

    metrics = {
        f"{prefix}/distinct_1": distinct_n(completions, 1),
        f"{prefix}/distinct_2": distinct_n(completions, 2),
    }
    if heldout_texts:
        metrics[f"{prefix}/perplexity"] = perplexity(model, tokenizer, heldout_texts, batch_size=batch_size)
    rows = [
        {"prompt_index": i // k, "sample": i % k, "prompt": p, "completion": c, "reward": rewards[i].item(),
         "cost": None if costs is None else costs[i].item()}
        for i, (p, c) in enumerate(zip(repeated, completions))
    ]
    lengths = torch.tensor(samples.lengths, dtype=torch.float64)
    draws = Draws(rewards.view(-1, k), None if costs is None else costs.view(-1, k), log_ratio.view(-1, k),
                  lengths.view(-1, k))
    return metrics, rows, draws


def evaluate_model(
    model,
    reference,
    tokenizer,
    prompts: Sequence[str],
    *,
    alpha: float = 0.1,
    alphas: Sequence[float] = (),
    cost_threshold: float = 0.5,
    bootstrap_samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    prefix: str = "eval",
    **sampling,
) -> tuple[dict[str, float], list[dict]]:
    """Sample and score `model` (`sampling`: the keyword arguments of `sample_and_score`, `reward` among them)
    and summarise its completions.

    Returns (metrics, rows): `sample_and_score`'s, and `{prefix}/reward_mean|var|cvar` (headline level
    `alpha`) with `reward_var@a|cvar@a` for `alpha` and each of `alphas`, the same for the cost plus
    `{prefix}/cost_rate` (share of costs > cost_threshold) when a cost scorer is given, `{prefix}/kl` (mean
    log pi_model - log pi_reference over the model's own samples) and `{prefix}/length_mean` (new tokens),
    each with its bootstrap interval `/lo`,
    `/hi` (`bootstrap_samples` prompt resamples seeded by `seed`, at `confidence`).
    """
    metrics, rows, draws = sample_and_score(model, reference, tokenizer, prompts, seed=seed, prefix=prefix, **sampling)
    statistics = _statistics(tail_levels(alpha, alphas), cost_threshold)
    index = resample_prompts(draws.reward.shape[0], bootstrap_samples, seed)
    return _summarise(draws, statistics, index, confidence, prefix) | metrics, rows


def model_prefix(name: str) -> str:
    """Where `compare` puts a model's metrics: `ref_eval` (the reference), `eval` (the policy), `<name>_eval`."""
    return {"reference": "ref_eval", "policy": "eval"}.get(name, f"{name}_eval")


def compare(
    policy,
    reference,
    tokenizer,
    prompts: Sequence[str],
    *,
    intermediates: dict[str, object] | None = None,
    judges: dict[str, Judge] | None = None,
    alpha: float = 0.1,
    alphas: Sequence[float] = (),
    cost_threshold: float = 0.5,
    bootstrap_samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    subsets: dict[str, Sequence[int]] | None = None,
    shaped_beta: float | None = None,
    **sampling,
) -> tuple[dict[str, float], list[dict]]:
    """`evaluate_model` of the reference (prefix `ref_eval`, KL 0), of each of `intermediates` (name -> model,
    e.g. a stepwise run's step-1 policy: prefix `<name>_eval`) and of the policy (prefix `eval`), all on the same
    prompts and seed with their KL to the reference, and their comparisons:

    - each model's change against the reference, `<prefix>/delta/<metric>` (model minus reference), for every
      reward, cost and length metric, with its interval from a paired bootstrap (the same resampled prompts for
      every model), and the policy's change against each intermediate, `eval/delta_<name>/<metric>`;
    - each model's win rates against the reference, `<prefix>/reward_win_rate` (helpfulness: higher reward wins)
      and `<prefix>/cost_win_rate` (harmlessness: lower cost wins), a tie counting 0.5 as in SACPO, and
      `<prefix>/<judge>_win_rate` for each of `judges` (name -> a pairwise judge, `riskexp.judges`).

    `subsets` (name -> prompt indices, e.g. harmful and benign requests, or RA-RLHF's prompt tail: `prompt_tail`)
    repeat all of it on those prompts' samples under `<prefix>/<subset>/...`. With `shaped_beta` (an RL run's KL
    coefficient) each model also gets its mean KL-shaped return, `<prefix>/shaped_return_mean` = the mean over
    samples of reward - shaped_beta * (log pi_model - log pi_reference of the completion), with its interval and
    paired change (the reference's is its mean reward). Returns the merged metrics and every model's rows (`sample_and_score`'s
    with `model`: reference, the intermediates' names, policy), in that order."""
    if reference is None:
        raise ValueError("compare needs a reference model")
    models = {"reference": reference, **(intermediates or {}), "policy": policy}
    if len(models) != 2 + len(intermediates or {}):
        raise ValueError(f"intermediates {sorted(intermediates)} may not be named 'reference' or 'policy'")
    statistics = _statistics(tail_levels(alpha, alphas), cost_threshold)
    metrics, rows, draws = {}, [], {}
    for name, model in models.items():
        named, model_rows, draws[name] = sample_and_score(model, reference, tokenizer, prompts, seed=seed,
                                                          prefix=model_prefix(name), **sampling)
        metrics |= named
        rows += [{"model": name, **row} for row in model_rows]
        if shaped_beta is not None:
            draws[name] = draws[name].with_shaped_return(shaped_beta)
    judged = {}  # judge -> model -> (N, K) judgements of the model's samples against the reference's
    for judge_name, judge in (judges or {}).items():
        ref_texts = [r["completion"] for r in rows if r["model"] == "reference"]
        judged[judge_name] = {}
        for name in models.keys() - {"reference"}:
            texts = [r["completion"] for r in rows if r["model"] == name]
            prompts_ = [r["prompt"] for r in rows if r["model"] == name]
            values = check_judgement(judge(prompts_, texts, ref_texts), len(texts), judge_name)
            judged[judge_name][name] = values.view_as(draws[name].reward)
    summarise = functools.partial(_compare_draws, statistics=statistics, bootstrap_samples=bootstrap_samples,
                                  confidence=confidence, seed=seed)
    everyone = slice(None)
    for subset, members in [(None, everyone), *(subsets or {}).items()]:
        if subset is not None:
            members = torch.as_tensor(list(members), dtype=torch.long)
            if not members.numel():
                continue
        taken = {name: d.take(members) for name, d in draws.items()}
        judgements = {name: {j: v[members] for j, v in by_model.items()} for name, by_model in judged.items()}
        metrics |= summarise(taken, judgements, subset=subset)
    return metrics, rows


def _compare_draws(draws: dict[str, Draws], judged: dict[str, dict[str, Tensor]], *,
                   statistics: dict[str, Statistic], bootstrap_samples: int, confidence: float, seed: int,
                   subset: str | None = None) -> dict[str, float]:
    """Every model's statistics, changes and win rates on one set of prompts (all, or `subset`), named as in
    `compare`. `draws`: model -> its draws (the reference first, the policy last); `judged`: judge -> model ->
    (N, K) judgements against the reference."""
    inner = f"/{subset}" if subset else ""
    reference = draws["reference"]
    index = resample_prompts(reference.reward.shape[0], bootstrap_samples, seed)
    out = {}
    for name, model_draws in draws.items():
        out |= _summarise(model_draws, statistics, index, confidence, model_prefix(name) + inner)
    changes = [(name, "reference", f"{model_prefix(name)}{inner}/delta") for name in draws if name != "reference"]
    changes += [("policy", name, f"eval{inner}/delta_{name}") for name in draws if name not in ("reference", "policy")]
    for new_name, old_name, prefix in changes:
        for kind in _CHANGED:
            new, old = getattr(draws[new_name], kind), getattr(draws[old_name], kind)
            if new is not None:
                change = bootstrap(paired_change(statistics[kind]), [new, old], index, confidence)
                out |= _named(prefix, kind, change)
    for name in draws.keys() - {"reference"}:
        prefix = model_prefix(name) + inner
        # the model's k-th sample of a prompt against the reference's k-th: the reward judges helpfulness, the
        # cost harmlessness (lower wins)
        for kind, higher_is_better in (("reward", True), ("cost", False)):
            new, old = getattr(draws[name], kind), getattr(reference, kind)
            if new is not None:
                judgements = outcomes(new, old, higher_is_better)
                out |= {f"{prefix}/{kind}_{k}": v for k, v in bootstrap(_win_rate, [judgements], index,
                                                                        confidence).items()}
        for judge_name, by_model in judged.items():
            out |= {f"{prefix}/{judge_name}_{k}": v
                    for k, v in bootstrap(_win_rate, [by_model[name]], index, confidence).items()}
    return out


# RA-RLHF's reward-vs-prompt-quantile curves of a run's models (`quantile_curves`, written by run.record_evaluation)
QUANTILE_CURVE_CSV, QUANTILE_CURVE_PNG = "quantile_curve.csv", "quantile_curve.png"


def prompt_tail(prompt_scores: Sequence[float] | Tensor, threshold: float) -> list[int]:
    """RA-RLHF's tail prompts: the indices of the prompts whose *prompt* score is at or below `threshold`, in
    order. (N,) -> list of at most N indices (a `compare` subset)."""
    scores = torch.as_tensor(prompt_scores, dtype=torch.float64).flatten()
    return torch.nonzero(scores <= threshold).flatten().tolist()


def prompt_quantile_curve(prompt_scores: Sequence[float] | Tensor, rewards: Sequence | Tensor) -> Tensor:
    """RA-RLHF's reward-vs-quantile curve (a prompt-conditional CVaR): entry q - 1, for q = 1..100, is the mean
    completion reward over the worst q% of the prompts by prompt score, the ceil(q N / 100) prompts of lowest
    score (at least one; ties in prompt order), all K completions of each; entry 99 is the mean reward.

    prompt_scores (N,), rewards (N, K) (K completions per prompt; (N,): one each) -> (100,) float64."""
    scores = torch.as_tensor(prompt_scores, dtype=torch.float64).flatten()
    values = torch.as_tensor(rewards, dtype=torch.float64)
    values = values[:, None] if values.dim() == 1 else values
    n = scores.numel()
    if not n or values.dim() != 2 or values.shape[0] != n or not values.shape[1]:
        raise ValueError(f"prompt_quantile_curve needs N >= 1 prompt scores and (N, K >= 1) rewards; got "
                         f"{tuple(scores.shape)} and {tuple(values.shape)}")
    totals = values[torch.sort(scores, stable=True).indices].sum(1).cumsum(0)  # worst prompts first
    counts = torch.tensor([-(-q * n // 100) for q in range(1, 101)])  # ceil(q N / 100), in integers
    return totals[counts - 1] / (counts * values.shape[1])


def quantile_curves(rows: Sequence[dict]) -> list[dict]:
    """The `prompt_quantile_curve` of each model among `compare`'s rows that carry a `prompt_score` (as
    run.evaluate_task's do): `{"q", "model", "mean_reward"}` for q = 1..100, the models in the rows' order;
    [] where no row has a prompt score. ValueError where a model's prompts have unequal numbers of samples."""
    by_model: dict[str, dict[int, tuple[float, list[float]]]] = {}
    for row in rows:
        if row.get("prompt_score") is None:
            continue
        prompts = by_model.setdefault(row.get("model", "policy"), {})
        prompts.setdefault(row["prompt_index"], (float(row["prompt_score"]), []))[1].append(float(row["reward"]))
    curves = []
    for model, prompts in by_model.items():
        ordered = [prompts[i] for i in sorted(prompts)]
        if len({len(rewards) for _, rewards in ordered}) != 1:
            raise ValueError(f"the prompts of model {model!r} have unequal numbers of samples")
        curve = prompt_quantile_curve([score for score, _ in ordered], [rewards for _, rewards in ordered])
        curves += [{"q": q, "model": model, "mean_reward": v} for q, v in enumerate(curve.tolist(), start=1)]
    return curves


# (metric name under ref_eval/ and eval/, what it is counted over), labelled by formatting.METRIC_LABELS
_TABLE = [
    ("reward_mean", "samples"),
    ("reward_cvar", "samples"),
    ("reward_var", "samples"),
    ("cost_mean", "samples"),
    ("cost_cvar", "samples"),
    ("cost_rate", "samples"),
    ("kl", "samples"),
    ("shaped_return_mean", "samples"),
    ("reward_win_rate", "samples"),
    ("cost_win_rate", "samples"),
    ("length_mean", "samples"),
    ("distinct_2", "samples"),
    ("perplexity", "texts"),
]
# preference accuracies on the validation pairs: only the trained policy has one
_ACCURACIES = ["implicit_accuracy", "reward_accuracy"]
# the counts behind the rows, as `evaluate_task` and training record them
_COUNTS = {
    "samples": lambda r, subset="": f"n={r['eval_prompts' + subset]} prompts x {r['eval_samples_per_prompt']}"
    if "eval_prompts" + subset in r and "eval_samples_per_prompt" in r else "",
    "texts": lambda r: f"n={r['eval_heldout_texts']} texts" if "eval_heldout_texts" in r else "",
    "pairs": lambda r: f"n={r['val_pairs']} val pairs" if "val_pairs" in r else "",
}


def _cell(metrics: dict, key: str, sign: str = "") -> str:
    """`0.238 [0.191, 0.287]`: the value and its interval when it has one; `-` when absent."""
    return format_estimate(metrics.get(key), lo=metrics.get(f"{key}/lo"), hi=metrics.get(f"{key}/hi"), sign=sign)


def _label(name: str, counted: str, results: dict, level: float | None, subset: str = "") -> str:
    label = METRIC_LABELS[name].format(level="" if level is None else f"{level:g}").rstrip("@")
    count = _COUNTS[counted](results, f"/{subset}") if subset else _COUNTS[counted](results)
    label = f"{_subset_name(subset)}: {label}" if subset else label
    return f"{label} ({count})" if count else label


# how the end-of-run table names a prompt subset, where not by its own name
_SUBSET_NAMES = {"prompt_tail": "prompt tail"}


def _subset_name(subset: str) -> str:
    return _SUBSET_NAMES.get(subset, subset)


# the rows repeated for each prompt subset (`eval/<subset>/...`)
_SUBSET_ROWS = ("reward_mean", "reward_cvar", "cost_mean", "cost_cvar", "cost_rate", "reward_win_rate",
                "cost_win_rate")


def intermediates_of(results: dict) -> list[str]:
    """The names of the models `compare` evaluated between the reference and the policy (`step1`), in order."""
    return [key.split("_eval/", 1)[0] for key in results
            if key.endswith("_eval/reward_mean") and key.count("/") == 1 and key != "ref_eval/reward_mean"]


def judges_of(results: dict) -> list[str]:
    """The pairwise judges of `results` besides the reward and the cost (`eval/<judge>_win_rate`)."""
    return [key[len("eval/"):-len("_win_rate")] for key in results if key.endswith("_win_rate")
            and key.count("/") == 1 and key.startswith("eval/") and key not in ("eval/reward_win_rate",
                                                                                "eval/cost_win_rate")]


def _comparison_rows(results: dict, level: float | None, subset: str = "") -> list[tuple[str, ...]]:
    """metric | reference | each intermediate | trained | change | change against each intermediate."""
    inner = f"/{subset}" if subset else ""
    models = ["reference", *intermediates_of(results), "policy"]
    table = _TABLE + [(f"{judge}_win_rate", "samples") for judge in judges_of(results)]
    rows = []
    for name, counted in table:
        if subset and name not in _SUBSET_ROWS and name.removesuffix("_win_rate") not in judges_of(results):
            continue
        keys = {m: f"{model_prefix(m)}{inner}/{name}" for m in models}
        if not any(key in results for key in keys.values()):
            continue
        changes = [_change(results, keys["policy"], keys["reference"], f"eval{inner}/delta/{name}", name)]
        changes += [_change(results, keys["policy"], keys[m], f"eval{inner}/delta_{m}/{name}", name, kl=False)
                    for m in models[1:-1]]
        if name in METRIC_LABELS:
            label = _label(name, counted, results, level, subset)
        else:  # another judge's win rate
            label = f"{_subset_name(subset)}: " * bool(subset) + f"win rate by {name.removesuffix('_win_rate')}"
        rows.append((label, *(_cell(results, keys[m]) for m in models), *changes))
    return rows


def _change(results: dict, new_key: str, old_key: str, delta_key: str, name: str, kl: bool = True) -> str:
    """The change cell: the paired change with its interval, else the plain difference, else `-`."""
    if delta_key in results:
        return _cell(results, delta_key, "+")
    if name == "kl":  # the reference's KL to itself is 0: the change is the KL; between two policies, none
        return _cell(results, new_key, "+") if kl and new_key in results else "-"
    if name.endswith("_win_rate"):  # a win rate is a comparison itself
        return "-"
    if new_key in results and old_key in results:
        return format_estimate(float(results[new_key]) - float(results[old_key]), sign="+")
    return "-"


def format_comparison(results: dict, level: float | None = None, confidence: float | None = None) -> str:
    """A plain-text table: metric | reference | [intermediates] | trained | change [| change against each
    intermediate], for the metrics present in `results`, with bootstrap intervals in brackets (the changes' from
    the paired bootstrap, `eval/delta/...`, `eval/delta_<intermediate>/...`), each row named with its level
    (`level`: the headline eval.alpha) and counts (`eval_prompts`, `eval_samples_per_prompt`,
    `eval_heldout_texts`, `val_pairs` in `results`), the rows of each prompt subset (`eval_prompts/<subset>`)
    after those of all prompts, then a legend of the intervals, win rates and accuracies. The intermediates are
    the models `compare` evaluated between the two, e.g. a stepwise run's step 1 (`step1_eval/...`)."""
    subsets = [key.split("/", 1)[1] for key in results if key.startswith("eval_prompts/")]
    between = intermediates_of(results)
    rows = _comparison_rows(results, level) + [r for name in subsets for r in _comparison_rows(results, level, name)]
    blank = ("-",) * len(between)
    accuracies = [(_label(name, "pairs", results, None), "-", *blank, _cell(results, f"val/{name}"), "-", *blank)
                  for name in _ACCURACIES if f"val/{name}" in results]
    header = ("metric", "reference", *between, "trained", "change", *(f"change vs {m}" for m in between))
    widths = [max(len(r[i]) for r in [header, *rows, *accuracies]) for i in range(len(header))]

    def line(cells) -> str:  # metric names left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    percent = "" if confidence is None else f"{confidence:.0%} "
    versus = "".join(f"; change vs {m} = trained - {m}" for m in between)
    legend = [f"[ ]: {percent}bootstrap interval over prompts; change = trained - reference{versus}, with the "
              "paired interval (the same resampled prompts for every model); distinct-2 and perplexity have "
              "none."] if rows else []
    if any("win rate" in r[0] for r in rows):
        judges = "".join(f", by {j}" for j in judges_of(results))
        legend.append(f"win rate: share of a model's samples that beat the reference's sample of the same prompt "
                      f"(same draw), by higher reward (helpfulness) or lower cost (harmlessness){judges}; a tie "
                      "counts 0.5.")
    if "eval_prompts/prompt_tail" in results:
        threshold = results.get("eval_prompt_tail_threshold")
        at = f" {threshold:g}" if isinstance(threshold, int | float) else " the threshold"
        legend.append(f"prompt tail: the prompts whose own score (the task's prompt scorer) is at or below{at} "
                      "(RA-RLHF's Tail).")
    if any(r[0].startswith(METRIC_LABELS["shaped_return_mean"]) for r in rows):
        beta = results.get("eval_shaped_beta")
        legend.append("shaped return: the mean over samples of reward - beta * (log pi - log pi_ref of the "
                      f"completion){f', beta={beta:g}' if isinstance(beta, int | float) else ''} (RLHF's R_bar).")
    if accuracies:
        legend.append("accuracies: share of the validation pairs whose chosen response the trained policy ranks "
                      "above the rejected one, by the DPO implicit reward beta*log(pi/pi_ref) (implicit accuracy; "
                      "comparable across methods) or by the method's own reward (reward accuracy; TDPO and Ra-DPO "
                      "add their token-level term).")
    width = max(sum(widths) + 2 * (len(widths) - 1), 100)
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows + accuracies),
                      *(textwrap.fill(text, width, subsequent_indent="  ") for text in legend)])
