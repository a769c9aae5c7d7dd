import copy

import pytest
import torch

from riskexp.data.build import build_pairs
from riskexp.evaluation import compare, distinct_n, evaluate_model, format_comparison, tail_metrics
from riskexp.files import read_jsonl, write_jsonl
from riskexp.models import tiny_llama

PROMPTS = ["The movie was", "I think that", "A long, long opening line about a film, and then", "Honestly,"]
GEN = {"max_new_tokens": 6, "batch_size": 4}


def length_reward(prompts, completions):
    return torch.tensor([float(len(c)) for c in completions])


def e_cost(prompts, completions):
    return torch.tensor([c.count("e") / max(len(c), 1) for c in completions])


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama()


@pytest.fixture(scope="module")
def other(tiny):
    # a perturbed copy, so that the KL to the reference is not trivially zero
    model = copy.deepcopy(tiny[0])
    with torch.no_grad():
        torch.manual_seed(0)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_distinct_n():
    assert distinct_n(["a b a b"], 1) == 0.5
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert distinct_n(["The cat", "the CAT"], 2) == 0.5
    assert distinct_n(["one", ""], 2) == 0.0 and distinct_n([], 1) == 0.0


def test_tail_metrics_known_values():
    x = torch.arange(1, 11, dtype=torch.float32)
    low = tail_metrics(x, [0.2, 0.5], "r", "lower")
    assert low["r_mean"] == pytest.approx(5.5)
    assert low["r_cvar@0.2"] == pytest.approx(1.5) and low["r_var@0.2"] == pytest.approx(2.0)
    assert low["r_cvar@0.5"] == pytest.approx(3.0)
    assert low["r_cvar"] == low["r_cvar@0.2"] and low["r_var"] == low["r_var@0.2"]  # headline = first alpha
    up = tail_metrics(x, [0.2], "c", "upper")
    assert up["c_cvar"] == pytest.approx(9.5) and up["c_var"] == pytest.approx(9.0)
    with pytest.raises(ValueError):
        tail_metrics(x, [0.2], "r", "middle")
    with pytest.raises(ValueError):
        tail_metrics(x, [1.5], "r", "lower")


def test_evaluate_model_self_reference(tiny):
    model, tok = tiny
    metrics, rows = evaluate_model(
        model, model, tok, PROMPTS, reward=length_reward, cost=e_cost, alphas=(0.25, 0.5),
        heldout_texts=["The movie was great fun."], **GEN,
    )
    for key in ("reward_mean", "reward_cvar", "reward_var", "reward_cvar@0.25", "reward_var@0.5", "cost_mean",
                "cost_cvar", "cost_rate", "kl", "distinct_1", "distinct_2", "perplexity", "length_mean"):
        assert f"eval/{key}" in metrics, key
    assert metrics["eval/kl"] == 0.0
    assert 0.0 <= metrics["eval/cost_rate"] <= 1.0
    assert 0.0 < metrics["eval/length_mean"] <= GEN["max_new_tokens"]
    assert [r["prompt"] for r in rows] == PROMPTS
    assert metrics["eval/reward_mean"] == pytest.approx(sum(len(r["completion"]) for r in rows) / len(rows))
    assert metrics["eval/reward_cvar"] <= metrics["eval/reward_var"] <= metrics["eval/reward_mean"]
    assert metrics["eval/cost_cvar"] >= metrics["eval/cost_mean"]
    # no cost scorer: no cost keys, cost None in the rows; reference None means KL 0
    metrics, rows = evaluate_model(model, None, tok, PROMPTS, reward=length_reward, **GEN)
    assert not any("cost" in k for k in metrics) and rows[0]["cost"] is None and metrics["eval/kl"] == 0.0


def test_compare_and_format(tiny, other):
    ref, tok = tiny
    metrics, rows = compare(other, ref, tok, PROMPTS, reward=length_reward, cost=e_cost, seed=3, **GEN)
    assert metrics["ref_eval/kl"] == 0.0
    assert metrics["eval/kl"] != 0.0
    assert {k.split("/")[1] for k in metrics if k.startswith("ref_eval/")} == {
        k.split("/")[1] for k in metrics if k.startswith("eval/")
    }
    assert set(rows[0]) >= {"prompt", "completion", "reward", "cost", "ref_completion", "ref_reward"}
    table = format_comparison({**metrics, "val/implicit_accuracy": 0.75})
    for text in ("metric", "reference", "trained", "reward mean", "reward CVaR", "cost rate", "KL", "distinct-2",
                 "implicit accuracy"):
        assert text in table
    assert "perplexity" not in table  # no heldout texts given


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
