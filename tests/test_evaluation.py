import copy
import logging
from statistics import NormalDist

import pytest
import torch
from helpers import length_reward
from hydra.utils import instantiate

from riskexp.data.build import build_pairs
from riskexp.evaluation import (
    bootstrap,
    compare,
    distinct_n,
    evaluate_model,
    format_comparison,
    paired_change,
    resample_prompts,
    tail_levels,
    tail_statistics,
    win_rate,
)
from riskexp.files import read_jsonl, write_jsonl
from riskexp.risk import cvar_lower
from riskexp.run import evaluate_task

PROMPTS = ["The movie was", "I think that", "A long, long opening line about a film, and then", "Honestly,"]
GEN = {"max_new_tokens": 6, "batch_size": 4}


def e_cost(prompts, completions):
    return torch.tensor([c.count("e") / max(len(c), 1) for c in completions])


def test_distinct_n():
    assert distinct_n(["a b a b"], 1) == 0.5
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert distinct_n(["The cat", "the CAT"], 2) == 0.5
    assert distinct_n(["one", ""], 2) == 0.0 and distinct_n([], 1) == 0.0


# every sample-based metric carries a bootstrap interval
INTERVALLED = ("reward_mean", "reward_var", "reward_cvar", "cost_mean", "cost_var", "cost_cvar", "cost_rate", "kl")


def assert_intervals(metrics, prefix, names):
    for name in names:
        key = f"{prefix}/{name}"
        assert metrics[f"{key}/lo"] <= metrics[key] <= metrics[f"{key}/hi"], key


def test_tail_statistics_known_values():
    x = torch.arange(1, 11, dtype=torch.float64)
    low = tail_statistics(x, [0.2, 0.5], "lower")
    assert low["mean"] == pytest.approx(5.5)
    assert low["cvar@0.2"] == pytest.approx(1.5) and low["var@0.2"] == pytest.approx(2.0)
    assert low["cvar@0.5"] == pytest.approx(3.0)
    assert low["cvar"] == low["cvar@0.2"] and low["var"] == low["var@0.2"]  # headline = first level
    up = tail_statistics(x, [0.2], "upper")
    assert up["cvar"] == pytest.approx(9.5) and up["var"] == pytest.approx(9.0)
    # rows of a batch are summarised one by one
    batch = tail_statistics(torch.stack([x, x.flip(0), 2 * x]), [0.2], "lower")
    assert batch["cvar"].tolist() == pytest.approx([1.5, 1.5, 3.0])
    with pytest.raises(ValueError):
        tail_statistics(x, [0.2], "middle")


def test_tail_levels_put_the_headline_first_once():
    assert tail_levels(0.1, [0.05, 0.1, 0.25, 0.95]) == [0.1, 0.05, 0.25, 0.95]
    assert tail_levels(0.1, [0.05, 0.1, 0.25, 0.1]) == [0.1, 0.05, 0.25]
    with pytest.raises(ValueError, match="eval.alpha=1.5"):
        tail_levels(1.5)
    with pytest.raises(ValueError, match="eval.alphas=0"):
        tail_levels(0.1, [0])


def test_bootstrap_interval_covers_the_true_cvar_of_a_normal():
    # lower CVaR of N(0, 1) at alpha: -phi(z_alpha) / alpha
    alpha, n, draws = 0.1, 200, 200
    normal = NormalDist()
    true = -normal.pdf(normal.inv_cdf(alpha)) / alpha
    # 200 independent data sets of n samples in one vectorised call: column d of (n, draws) is data set d, so
    # the flattened (..., n * draws) samples unflatten to (..., n, draws); each gets its own CVaR and interval
    x = torch.randn(n, draws, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def cvar_of_each_data_set(values):
        cvar = cvar_lower(values.unflatten(-1, (n, draws)).transpose(-1, -2), alpha)
        return {str(d): cvar[..., d] for d in range(draws)}

    out = bootstrap(cvar_of_each_data_set, [x], resample_prompts(n, 500, seed=0))
    assert all(out[f"{d}/lo"] <= out[f"{d}/hi"] for d in range(draws))
    covered = sum(out[f"{d}/lo"] <= true <= out[f"{d}/hi"] for d in range(draws))
    assert 0.85 <= covered / draws <= 0.99


def test_bootstrap_resamples_whole_prompts_and_is_seeded():
    # two samples per prompt, equal within a prompt: resampling prompts keeps every pair together
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]])
    index = resample_prompts(3, 50, seed=1)
    assert index.shape == (50, 3) and torch.equal(index, resample_prompts(3, 50, seed=1))
    seen = []
    out = bootstrap(lambda v: seen.append(v) or {"mean": v.mean(-1)}, [x], index)
    resampled = seen[1]
    assert resampled.shape == (50, 6) and torch.equal(resampled[:, 0::2], resampled[:, 1::2])
    assert out["mean"] == pytest.approx(2.0) and 0.0 <= out["mean/lo"] <= out["mean/hi"] <= 5.0
    with pytest.raises(ValueError, match="eval.confidence=1.5"):
        bootstrap(lambda v: {"mean": v.mean(-1)}, [x], index, confidence=1.5)
    with pytest.raises(ValueError, match="eval.bootstrap_samples=0"):
        resample_prompts(3, 0, seed=1)


def test_paired_change_covers_a_shift_and_pairing_narrows_it():
    generator = torch.Generator().manual_seed(3)
    reference = torch.randn(200, 2, dtype=torch.float64, generator=generator)
    policy = reference + 0.3 + 0.2 * torch.randn(200, 2, dtype=torch.float64, generator=generator)
    index = resample_prompts(200, 1000, seed=0)
    stats = lambda v: tail_statistics(v, [0.1], "lower")  # noqa: E731
    change = bootstrap(paired_change(stats), [policy, reference], index)
    assert change["mean/lo"] < 0.3 < change["mean/hi"]
    assert change["mean"] == pytest.approx(policy.mean().item() - reference.mean().item())
    # unpaired, the prompts' shared variation would stay in the change: its interval is several times wider
    alone = bootstrap(stats, [policy], index), bootstrap(stats, [reference], index)
    unpaired = sum(a["mean/hi"] - a["mean/lo"] for a in alone)
    assert change["mean/hi"] - change["mean/lo"] < unpaired / 3
    # an exact shift moves every statistic, and every resample of it, by the shift
    shifted = bootstrap(paired_change(stats), [reference + 0.5, reference], index)
    for name in ("mean", "var", "cvar"):
        assert shifted[name] == pytest.approx(0.5) and shifted[f"{name}/lo"] == pytest.approx(0.5)
        assert shifted[f"{name}/hi"] == pytest.approx(0.5)


def test_evaluate_model_self_reference(tiny):
    model, tok = tiny
    metrics, rows = evaluate_model(
        model, model, tok, PROMPTS, reward=length_reward, cost=e_cost, alpha=0.25, alphas=(0.5,),
        heldout_texts=["The movie was great fun."], bootstrap_samples=200, **GEN,
    )
    for key in ("reward_mean", "reward_cvar", "reward_var", "reward_cvar@0.25", "reward_var@0.5", "cost_mean",
                "cost_cvar", "cost_rate", "kl", "distinct_1", "distinct_2", "perplexity", "length_mean"):
        assert f"eval/{key}" in metrics, key
    assert_intervals(metrics, "eval", [*INTERVALLED, "reward_cvar@0.5", "reward_var@0.25", "cost_cvar@0.5"])
    assert metrics["eval/reward_cvar"] == metrics["eval/reward_cvar@0.25"]  # the headline is `alpha`
    # the samples' own log-probs (cached generation) and the copy's (one forward pass) agree to float error
    for key in ("eval/kl", "eval/kl/lo", "eval/kl/hi"):
        assert metrics[key] == pytest.approx(0.0, abs=1e-4), key


def test_samples_per_prompt_multiply_the_samples(tiny):
    model, tok = tiny
    metrics, rows = evaluate_model(model, None, tok, PROMPTS[:2], reward=length_reward, samples_per_prompt=3,
                                   alpha=0.5, **GEN)
    assert [r["prompt"] for r in rows] == [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3
    rewards = sorted(float(len(r["completion"])) for r in rows)
    assert metrics["eval/reward_mean"] == pytest.approx(sum(rewards) / 6)
    assert metrics["eval/reward_cvar"] == pytest.approx(sum(rewards[:3]) / 3)  # half of the 6 samples
    with pytest.raises(ValueError, match="eval.samples_per_prompt=0"):
        evaluate_model(model, None, tok, PROMPTS, reward=length_reward, samples_per_prompt=0, **GEN)


def test_compare_and_format(tiny, other):
    ref, tok = tiny
    metrics, rows = compare(other, ref, tok, PROMPTS, reward=length_reward, cost=e_cost, seed=3,
                            bootstrap_samples=200, **GEN)
    assert metrics["ref_eval/kl"] == 0.0
    assert metrics["eval/kl"] != 0.0
    # the same metrics for both models, but the win rates: the policy's against the reference
    assert {k.split("/")[1] for k in metrics if k.startswith("ref_eval/")} == {
        k.split("/")[1] for k in metrics if k.startswith("eval/") and not k.startswith("eval/delta/")
    } - {"reward_win_rate", "cost_win_rate"}
    assert 0.0 <= metrics["eval/reward_win_rate/lo"] <= metrics["eval/reward_win_rate/hi"] <= 1.0
    for prefix in ("eval", "ref_eval"):
        assert_intervals(metrics, prefix, INTERVALLED)
    for name in ("reward_mean", "reward_cvar", "reward_var", "reward_cvar@0.1", "cost_mean", "cost_cvar", "cost_rate"):
        delta = metrics[f"eval/delta/{name}"]
        assert delta == pytest.approx(metrics[f"eval/{name}"] - metrics[f"ref_eval/{name}"]), name
        assert metrics[f"eval/delta/{name}/lo"] <= metrics[f"eval/delta/{name}/hi"], name
    assert "eval/delta/kl" not in metrics
    # every model's completions, the reference's first, each with its prompt and sample index
    assert [r["model"] for r in rows] == ["reference"] * 4 + ["policy"] * 4
    assert set(rows[0]) == {"model", "prompt_index", "sample", "prompt", "completion", "reward", "cost"}
    assert [(r["prompt_index"], r["sample"]) for r in rows[4:]] == [(i, 0) for i in range(4)]
    table = format_comparison({**metrics, "val/implicit_accuracy": 0.75})
    for text in ("metric", "reference", "trained", "reward mean", "reward CVaR", "cost rate", "KL", "distinct-2",
                 "implicit accuracy"):
        assert text in table
    assert not any(line.startswith("perplexity") for line in table.splitlines())  # no heldout texts given
    mean_row = next(line for line in table.splitlines() if line.startswith("reward mean"))
    assert mean_row.count("[") == 3  # reference, trained and the paired change each with an interval


def test_a_model_against_an_identical_copy_changes_nothing(tiny):
    model, tok = tiny
    metrics, _ = compare(model, copy.deepcopy(model), tok, PROMPTS[:2], reward=length_reward, cost=e_cost,
                         bootstrap_samples=100, **GEN)
    deltas = {k: v for k, v in metrics.items() if k.startswith("eval/delta/")}
    # reward and cost: mean, var, cvar, @0.1; cost rate; length, each with its interval
    assert len(deltas) == 3 * 2 * (1 + 2 * 2) + 3 + 3
    assert all(v == 0.0 for v in deltas.values()), deltas
    # the samples' own log-probs (cached generation) and the copy's (one forward pass) agree to float error
    for key in ("eval/kl", "eval/kl/lo", "eval/kl/hi"):
        assert metrics[key] == pytest.approx(0.0, abs=1e-4), key
    assert metrics["eval/reward_win_rate"] == metrics["eval/cost_win_rate"] == 0.5  # every sample a tie
    assert metrics["eval/reward_win_rate"] == metrics["eval/cost_win_rate"] == 0.5  # every sample a tie


def test_an_intermediate_model_is_compared_with_the_reference_and_the_policy_with_it(tiny, other):
    ref, tok = tiny
    metrics, rows = compare(other, ref, tok, PROMPTS[:3], intermediates={"step1": copy.deepcopy(ref)},
                            reward=length_reward, cost=e_cost, bootstrap_samples=50, samples_per_prompt=2,
                            subsets={"first": [0]}, **GEN)
    assert [r["model"] for r in rows[::6]] == ["reference", "step1", "policy"]
    # step 1 is a copy of the reference: the same samples, no change, every sample a tie, KL 0
    assert metrics["step1_eval/reward_mean"] == metrics["ref_eval/reward_mean"]
    assert metrics["step1_eval/delta/cost_mean"] == 0.0 and metrics["step1_eval/kl"] == pytest.approx(0.0, abs=1e-4)
    assert metrics["step1_eval/reward_win_rate"] == 0.5 and metrics["step1_eval/first/cost_win_rate"] == 0.5
    # the policy against step 1 equals the policy against the reference
    for name in ("reward_mean", "cost_cvar", "length_mean"):
        assert metrics[f"eval/delta_step1/{name}"] == metrics[f"eval/delta/{name}"], name
    assert metrics["eval/first/delta_step1/reward_mean"] == metrics["eval/first/delta/reward_mean"]
    table = format_comparison(metrics | {"eval_prompts": 3, "eval_samples_per_prompt": 2, "eval_prompts/first": 1})
    header = table.splitlines()[0].split()
    assert header[:4] == ["metric", "reference", "step1", "trained"] and header[-3:] == ["change", "vs", "step1"]
    kl_row = next(line for line in table.splitlines() if line.startswith("KL to reference"))
    assert kl_row.rstrip().endswith("-")  # two policies' KLs to the reference differ by no KL
    with pytest.raises(ValueError, match="'reference' or 'policy'"):
        compare(other, ref, tok, PROMPTS[:1], intermediates={"policy": ref}, reward=length_reward, **GEN)


def test_a_pairwise_judge_gives_a_win_rate_with_its_interval(tiny, other):
    ref, tok = tiny
    calls = []

    def longer(prompts, a, b):  # a judge preferring the longer response
        calls.append((list(prompts), list(a), list(b)))
        return torch.tensor([1.0 if len(x) > len(y) else 0.5 if len(x) == len(y) else 0.0 for x, y in zip(a, b)])

    metrics, rows = compare(other, ref, tok, PROMPTS, reward=length_reward, judges={"longer": longer},
                            bootstrap_samples=50, samples_per_prompt=2, **GEN)
    # judged on the texts, it agrees with the win rate by the length reward
    assert metrics["eval/longer_win_rate"] == metrics["eval/reward_win_rate"]
    assert metrics["eval/longer_win_rate/lo"] <= metrics["eval/longer_win_rate"] <= metrics["eval/longer_win_rate/hi"]
    (prompts, a, b), = calls
    assert a == [r["completion"] for r in rows if r["model"] == "policy"]
    assert b == [r["completion"] for r in rows if r["model"] == "reference"] and len(prompts) == 8
    assert "win rate by longer" in format_comparison(metrics)
    with pytest.raises(ValueError, match="bad"):
        compare(other, ref, tok, PROMPTS, reward=length_reward, judges={"bad": lambda p, a, b: torch.ones(3)}, **GEN)


def test_win_rate_counts_a_tie_half():
    new, old = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.0, 2.0, 5.0, 1.0])
    assert win_rate(new, old)["win_rate"].item() == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert win_rate(new, old, higher_is_better=False)["win_rate"].item() == pytest.approx((0 + 0.5 + 1 + 0) / 4)
    assert win_rate(new.repeat(3, 1), old.repeat(3, 1))["win_rate"].shape == (3,)  # resampled rows


def test_subsets_of_the_prompts_are_summarised_apart_from_the_same_samples(tiny):
    model, tok = tiny
    metrics, rows = compare(model, copy.deepcopy(model), tok, PROMPTS[:3], reward=length_reward, cost=e_cost,
                            bootstrap_samples=50, samples_per_prompt=2, subsets={"first": [0], "rest": [1, 2]}, **GEN)
    first = [r["reward"] for r in rows if r["prompt"] == PROMPTS[0] and r["model"] == "policy"]
    assert metrics["eval/first/reward_mean"] == pytest.approx(sum(first) / len(first))
    for key in ("ref_eval/rest/cost_cvar", "eval/rest/delta/reward_mean/hi", "eval/first/cost_win_rate/lo",
                "eval/rest/kl"):
        assert key in metrics, key
    table = format_comparison({**metrics, "eval_prompts": 3, "eval_samples_per_prompt": 2, "eval_prompts/first": 1,
                               "eval_prompts/rest": 2})
    assert "first: reward mean (n=1 prompts x 2)" in table and "rest: win rate by cost (n=2 prompts x 2)" in table
    assert "a tie counts 0.5" in table


def test_evaluate_task_headline_is_eval_alpha_and_the_run_alpha_is_a_level(smoke_cfg):
    cfg = smoke_cfg("data=sentiment", "alpha=0.95", "eval.alphas=[0.05,0.25]", "eval.num_prompts=3",
                    "eval.samples_per_prompt=2", "eval.max_new_tokens=4", "eval.num_heldout_texts=2",
                    "eval.bootstrap_samples=100")
    model, tok = instantiate(cfg.model.loader)
    metrics, rows = evaluate_task(cfg, model, model, tok)
    assert len(rows) == 2 * 3 * 2  # the reference's and the policy's
    assert metrics["eval/reward_cvar"] == metrics["eval/reward_cvar@0.1"]  # eval.alpha, not the run's 0.95
    for level in ("0.05", "0.25", "0.95"):
        assert f"eval/reward_cvar@{level}" in metrics and f"eval/delta/reward_cvar@{level}/hi" in metrics
    assert_intervals(metrics, "eval", ["reward_mean", "reward_cvar", "reward_cvar@0.95", "kl"])
    assert (metrics["eval_prompts"], metrics["eval_samples_per_prompt"], metrics["eval_heldout_texts"]) == (3, 2, 2)


def test_evaluate_task_says_once_when_fewer_prompts_exist_than_requested(smoke_cfg, caplog):
    cfg = smoke_cfg("data=sentiment", "eval.num_prompts=10000", "eval.samples_per_prompt=1", "eval.max_new_tokens=2",
                    "eval.num_heldout_texts=2", "eval.bootstrap_samples=10")
    model, tok = instantiate(cfg.model.loader)
    n_prompts = len(instantiate(cfg.data.task.prompts))
    with caplog.at_level(logging.WARNING, logger="riskexp.run"):
        metrics, _ = evaluate_task(cfg, model, model, tok)
    assert metrics["eval_prompts"] == n_prompts < 10000
    said = [r.getMessage() for r in caplog.records if "eval.num_prompts" in r.getMessage()]
    assert said == [f"eval.num_prompts=10000 but the task has {n_prompts} held-out prompts: evaluating on all "
                    f"{n_prompts}"]


def test_the_end_of_run_table_names_levels_counts_and_intervals_and_explains_the_accuracies():
    point = {"eval/reward_mean": 0.3, "ref_eval/reward_mean": 0.2, "eval/reward_cvar": -0.4,
             "ref_eval/reward_cvar": -0.5, "eval/kl": 1.5, "ref_eval/kl": 0.0, "eval/distinct_2": 0.6,
             "ref_eval/distinct_2": 0.7, "val/implicit_accuracy": 0.75, "val/reward_accuracy": 0.5}
    intervals = {f"{k}/{b}": v + (0.1 if b == "hi" else -0.1) for k, v in point.items() if "distinct" not in k
                 and not k.startswith("val/") for b in ("lo", "hi")}
    deltas = {"eval/delta/reward_mean": 0.1, "eval/delta/reward_mean/lo": 0.02, "eval/delta/reward_mean/hi": 0.18}
    counts = {"eval_prompts": 30, "eval_samples_per_prompt": 4, "val_pairs": 15}
    table = format_comparison(point | intervals | deltas | counts, level=0.1, confidence=0.95).splitlines()
    rows = {line.split("  ")[0]: line for line in table[2:] if "  " in line}
    assert rows.keys() >= {"reward mean (n=30 prompts x 4)", "reward CVaR@0.1 (n=30 prompts x 4)",
                           "KL to reference (n=30 prompts x 4)", "implicit accuracy (n=15 val pairs)",
                           "reward accuracy (n=15 val pairs)"}
    assert rows["reward mean (n=30 prompts x 4)"].count("[") == 3  # reference, trained, paired change
    assert rows["KL to reference (n=30 prompts x 4)"].endswith("+1.50 [+1.40, +1.60]")  # the reference's is 0
    text = "\n".join(table)
    assert "95% bootstrap interval over prompts" in text and "implicit reward beta*log(pi/pi_ref)" in text
    legend = table[len(rows) + 2:]
    assert len(legend) >= 3 and max(map(len, legend)) <= max(100, len(table[0]))  # wrapped to the table's width


def test_build_pairs(tiny, tmp_path):
    model, tok = tiny
    records = build_pairs(model, tok, PROMPTS, length_reward, k=3, seed=5, cost=e_cost, cost_weight=2.0, **GEN)
    assert records and len(records) <= len(PROMPTS)
    for r in records:
        assert r["chosen_score"] > r["rejected_score"]
        assert r["chosen_score"] == pytest.approx(r["chosen_reward"] - 2.0 * r["chosen_cost"])
        assert r["prompt"] in PROMPTS
    assert build_pairs(model, tok, PROMPTS, length_reward, k=3, seed=5, cost=e_cost, cost_weight=2.0, **GEN) == records
    # a constant reward never separates the samples: every prompt is skipped
    assert build_pairs(model, tok, PROMPTS, lambda p, c: torch.zeros(len(c)), k=2, **GEN) == []
    with pytest.raises(ValueError):
        build_pairs(model, tok, PROMPTS, length_reward, k=1)

    path = write_jsonl(records, tmp_path / "sub" / "pairs.jsonl")
    assert read_jsonl(path) == records
    write_jsonl(records[:1], path)  # overwrite in place
    assert read_jsonl(path) == records[:1] and [p.name for p in path.parent.iterdir()] == ["pairs.jsonl"]


def test_vader_reward_if_available(tiny):
    scorers = pytest.importorskip("riskexp.scorers")
    try:
        reward = scorers.VaderSentiment()
        reward(["x"], ["I love it"])
    except Exception as err:  # the optional dependency may be missing
        pytest.skip(f"VaderSentiment unavailable: {err}")
    model, tok = tiny
    metrics, _ = evaluate_model(model, model, tok, PROMPTS, reward=reward, **GEN)
    assert -1.0 <= metrics["eval/reward_cvar"] <= metrics["eval/reward_mean"] <= 1.0
