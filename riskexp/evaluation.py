"""Evaluating a policy on prompts: reward and cost tails, KL to the reference, diversity, perplexity.

All metrics are flat `{prefix}/{name}` floats so they can be logged and written to results.json as they are.
Reward tails are lower tails (bad = low reward), cost tails upper tails (bad = high cost); `alpha` is the tail
mass, and the first configured alpha is the headline `*_cvar` / `*_var`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from riskexp.generation import completion_logps, generate, pad_token_id, perplexity
from riskexp.risk import check_alpha, cvar_lower, cvar_upper, var_lower, var_upper

Scorer = Callable[[list[str], list[str]], torch.Tensor]

_TAILS = {"lower": (var_lower, cvar_lower), "upper": (var_upper, cvar_upper)}

log = logging.getLogger(__name__)


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique n-grams / all n-grams over all texts (lowercased whitespace tokens); 0.0 if there are none."""
    grams = [
        tuple(words[i : i + n]) for words in (t.lower().split() for t in texts) for i in range(len(words) - n + 1)
    ]
    return len(set(grams)) / len(grams) if grams else 0.0


def tail_metrics(values: torch.Tensor, alphas: Sequence[float], prefix: str, tail: str) -> dict[str, float]:
    """`{prefix}_mean`, `{prefix}_var@{alpha}`, `{prefix}_cvar@{alpha}` per alpha, and the headline
    `{prefix}_var` / `{prefix}_cvar` at the first alpha. tail="lower" for rewards, "upper" for costs."""
    if tail not in _TAILS:
        raise ValueError(f"tail={tail!r} is not a tail; accepted: 'lower' (rewards), 'upper' (costs)")
    if not alphas:
        raise ValueError("tail_metrics needs at least one alpha")
    if values.numel() == 0:
        raise ValueError(f"{prefix}: no values to summarise")
    var, cvar = _TAILS[tail]
    x = values.detach().double().flatten().cpu()
    out = {f"{prefix}_mean": x.mean().item()}
    for i, alpha in enumerate(alphas):
        alpha = check_alpha(alpha)
        v, c = var(x, alpha).item(), cvar(x, alpha).item()
        if i == 0:
            out[f"{prefix}_var"], out[f"{prefix}_cvar"] = v, c
        out[f"{prefix}_var@{alpha:g}"], out[f"{prefix}_cvar@{alpha:g}"] = v, c
    return out


def score_with(scorer: Scorer, prompts: list[str], completions: list[str], what: str) -> torch.Tensor:
    """(N,) float32 scores on the CPU, checked to have one score per completion."""
    s = torch.as_tensor(scorer(prompts, completions)).detach().float().flatten().cpu()
    if s.numel() != len(completions):
        raise ValueError(f"{what} scorer returned {s.numel()} scores for {len(completions)} completions")
    return s


def evaluate_model(
    model,
    reference,
    tokenizer,
    prompts: Sequence[str],
    *,
    reward: Scorer,
    cost: Scorer | None = None,
    alphas: Sequence[float] = (0.1,),
    cost_threshold: float = 0.5,
    heldout_texts: Sequence[str] | None = None,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 32,
    seed: int = 0,
    chat: bool = False,
    prefix: str = "eval",
) -> tuple[dict[str, float], list[dict]]:
    """Sample one completion per prompt from `model` and summarise it.

    Returns (metrics, rows): metrics `{prefix}/reward_mean|var|cvar|var@a|cvar@a`, the same for `cost` plus
    `{prefix}/cost_rate` (share of costs > cost_threshold) when a cost scorer is given, `{prefix}/kl` (mean of
    log pi_model - log pi_reference over the model's own samples; 0 when the reference is None or the model
    itself), `{prefix}/distinct_1|2`, `{prefix}/length_mean` (new tokens), `{prefix}/perplexity` on
    `heldout_texts` when given; rows `{"prompt", "completion", "reward", "cost"}` (cost None without a scorer).
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("evaluate_model needs at least one prompt")
    samples = generate(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        batch_size=batch_size, seed=seed, chat=chat,
    )
    completions = samples.texts
    rewards = score_with(reward, prompts, completions, "reward")
    metrics = tail_metrics(rewards, alphas, f"{prefix}/reward", "lower")
    costs = None
    if cost is not None:
        costs = score_with(cost, prompts, completions, "cost")
        metrics.update(tail_metrics(costs, alphas, f"{prefix}/cost", "upper"))
        metrics[f"{prefix}/cost_rate"] = (costs > cost_threshold).float().mean().item()

    if reference is None or reference is model:
        metrics[f"{prefix}/kl"] = 0.0
    else:
        if temperature != 1.0 or top_p != 1.0:
            log.warning("eval/kl is estimated on samples at temperature=%s, top_p=%s: it is then not the KL of "
                        "the policy itself, which needs temperature=1 and top_p=1", temperature, top_p)
        scored = {"pad_id": pad_token_id(tokenizer), "batch_size": batch_size}
        logp = completion_logps(model, samples.prompt_ids, samples.token_ids, **scored)
        ref_logp = completion_logps(reference, samples.prompt_ids, samples.token_ids, **scored)
        metrics[f"{prefix}/kl"] = (logp - ref_logp).double().mean().item()

    metrics[f"{prefix}/distinct_1"] = distinct_n(completions, 1)
    metrics[f"{prefix}/distinct_2"] = distinct_n(completions, 2)
    metrics[f"{prefix}/length_mean"] = sum(samples.lengths) / len(prompts)
    if heldout_texts:
        metrics[f"{prefix}/perplexity"] = perplexity(model, tokenizer, heldout_texts, batch_size=batch_size)

    rows = [
        {"prompt": p, "completion": c, "reward": rewards[i].item(), "cost": None if costs is None else costs[i].item()}
        for i, (p, c) in enumerate(zip(prompts, completions))
    ]
    return metrics, rows


def compare(policy, reference, tokenizer, prompts: Sequence[str], **kwargs) -> tuple[dict[str, float], list[dict]]:
    """`evaluate_model` of the reference (prefix `ref_eval`, KL 0) and of the policy (prefix `eval`, KL to the
    reference) on the same prompts and seed. Returns the merged metrics and the policy's rows, each with the
    reference's completion side by side (`ref_completion`, `ref_reward`, `ref_cost`)."""
    if reference is None:
        raise ValueError("compare needs a reference model")
    kwargs.pop("prefix", None)
    ref_metrics, ref_rows = evaluate_model(reference, reference, tokenizer, prompts, prefix="ref_eval", **kwargs)
    metrics, rows = evaluate_model(policy, reference, tokenizer, prompts, prefix="eval", **kwargs)
    for row, ref in zip(rows, ref_rows):
        row.update({"ref_completion": ref["completion"], "ref_reward": ref["reward"], "ref_cost": ref["cost"]})
    return {**ref_metrics, **metrics}, rows


# (label, metric name under ref_eval/ and eval/)
_TABLE = [
    ("reward mean", "reward_mean"),
    ("reward CVaR", "reward_cvar"),
    ("reward VaR", "reward_var"),
    ("cost mean", "cost_mean"),
    ("cost CVaR", "cost_cvar"),
    ("cost rate", "cost_rate"),
    ("KL to reference", "kl"),
    ("distinct-2", "distinct_2"),
    ("perplexity", "perplexity"),
    ("length (tokens)", "length_mean"),
]
# preference accuracies on the validation pairs: only the trained policy has one
_ACCURACIES = [("implicit accuracy", "val/implicit_accuracy"), ("reward accuracy", "val/reward_accuracy")]


def _fmt(value) -> str:
    if value is None:
        return "-"
    value = float(value)
    return f"{value:.1f}" if abs(value) >= 1000 else f"{value:.4f}"


def format_comparison(metrics: dict) -> str:
    """A plain-text table: metric | reference | trained | change, for the metrics present in `metrics`."""
    rows = []
    for label, name in _TABLE:
        ref, new = metrics.get(f"ref_eval/{name}"), metrics.get(f"eval/{name}")
        if ref is None and new is None:
            continue
        change = f"{float(new) - float(ref):+.4f}" if ref is not None and new is not None else "-"
        rows.append((label, _fmt(ref), _fmt(new), change))
    for label, key in _ACCURACIES:
        if key in metrics:
            rows.append((label, "-", _fmt(metrics[key]), "-"))
    header = ("metric", "reference", "trained", "change")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]

    def line(cells) -> str:  # metric names left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])
