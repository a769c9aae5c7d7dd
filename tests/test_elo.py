import time

import numpy as np
import pandas as pd
import pytest

from riskexp import elo


def battles(*rows):
    return pd.DataFrame(rows, columns=["a", "b", "score"])


def test_hand_computed_update_sequence():
    # all at 1200; A beats B, B ties C, C beats A, played in this order (one trial, one pass)
    index = {"A": 0, "B": 1, "C": 2}
    order = [("A", "B", 1.0), ("B", "C", 0.5), ("A", "C", 0.0)]
    a = np.array([[index[x]] for x, _, _ in order])
    b = np.array([[index[y]] for _, y, _ in order])
    s = np.array([[v] for _, _, v in order])
    ratings = elo.play(np.full((1, 3), 1200.0), a, b, s)
    # 1: expected 0.5, A +16, B -16. 2: B (1184) vs C (1200): E_B = 1 / (1 + 10^(16/400)) = 0.476985,
    # B + 32 (0.5 - E_B) = 1184.7363. 3: A (1216) vs C (1199.2637) loses: E_A = 1 / (1 + 10^(-16.7363/400)),
    # A - 32 E_A = 1199.2299, C = 1216.0338
    assert ratings[0] == pytest.approx([1199.229860, 1184.736307, 1216.033833], abs=1e-5)
    assert ratings.sum() == pytest.approx(3 * 1200)  # every update is zero-sum


def test_single_trial_single_epoch_through_the_public_api():
    # two identical battles: the order does not matter. 1: A 1216, B 1184; 2: E_A = 1 / (1 + 10^(-32/400))
    # = 0.545922, A + 32 (1 - E_A) = 1230.5305, B = 1169.4695; shifted so that B is at 1000
    per_trial = elo.elo_trials(battles(("A", "B", 1), ("A", "B", 1)), "B", trials=1, epochs=1, seed=3)
    assert list(per_trial.columns) == ["A", "B"]
    assert per_trial.iloc[0].tolist() == pytest.approx([1000 + 1230.530498 - 1169.469502, 1000.0])


def test_anchor_is_exactly_1000_and_a_winner_rates_above_a_loser():
    rng = np.random.default_rng(0)
    rows = [("sft", "good", 0.0), ("sft", "bad", 1.0), ("good", "bad", 1.0)] * 20
    rows += [("sft", "good", v) for v in rng.choice([0.0, 0.5, 1.0], 30)]
    ratings = elo.elo_ratings(battles(*rows), "sft", seed=1)
    assert list(ratings.index) == ["bad", "good", "sft"] and list(ratings.columns) == ["mean", "sd"]
    assert ratings.loc["sft", "mean"] == 1000.0 and ratings.loc["sft", "sd"] == 0.0
    assert ratings.loc["good", "mean"] > 1000 > ratings.loc["bad", "mean"]
    assert (ratings.loc[["good", "bad"], "sd"] > 0).all()  # the trials' orders differ


def test_symmetric_ties_keep_equal_ratings():
    rows = [("A", "B", 0.5), ("B", "C", 0.5), ("A", "C", 0.5)] * 5
    ratings = elo.elo_ratings(battles(*rows), "A", trials=4, epochs=3)
    assert ratings["mean"].tolist() == [1000.0] * 3 and ratings["sd"].tolist() == [0.0] * 3


def test_seeds_are_reproducible_and_differ():
    rows = [("A", "B", 1.0), ("B", "C", 0.0), ("A", "C", 0.5), ("C", "A", 1.0)] * 10
    first = elo.elo_trials(battles(*rows), "A", trials=5, epochs=2, seed=7)
    pd.testing.assert_frame_equal(first, elo.elo_trials(battles(*rows), "A", trials=5, epochs=2, seed=7))
    assert not first.equals(elo.elo_trials(battles(*rows), "A", trials=5, epochs=2, seed=8))
    assert not np.allclose(first.iloc[0], first.iloc[1])  # each trial its own permutations


def test_additive_normalisation_keeps_every_difference():
    rows = [("A", "B", 1.0), ("B", "C", 1.0), ("A", "C", 0.5), ("C", "B", 0.0)] * 10
    raw = elo.elo_trials(battles(*rows), None, trials=6, seed=2)
    shifted = elo.elo_trials(battles(*rows), "B", trials=6, seed=2)
    assert not np.allclose(raw["B"], 1000.0) and np.allclose(shifted["B"], 1000.0)
    for x, y in (("A", "B"), ("A", "C"), ("C", "B")):
        np.testing.assert_allclose(shifted[x] - shifted[y], raw[x] - raw[y], rtol=0, atol=1e-9)
        # so are the win probabilities the ratings predict
        np.testing.assert_allclose(elo.expected_score(shifted[x], shifted[y]), elo.expected_score(raw[x], raw[y]))


@pytest.mark.parametrize("rows, anchor, message", [
    ([("A", "B", 1.0)], "Z", "anchor 'Z' is in no battle"),
    ([], "A", "no battles"),
    ([("A", "B", 1.5)], "A", r"in \[0, 1\]"),
    ([("A", "B", -0.1)], "A", r"in \[0, 1\]"),
    ([("A", "B", None)], "A", r"in \[0, 1\]"),
    ([("A", "A", 0.5)], "A", "against itself"),
])  # fmt: skip
def test_input_errors(rows, anchor, message):
    with pytest.raises(ValueError, match=message):
        elo.elo_ratings(battles(*rows), anchor)


def test_other_input_errors():
    with pytest.raises(ValueError, match="missing: score"):
        elo.elo_ratings(pd.DataFrame({"a": ["A"], "b": ["B"]}), "A")
    with pytest.raises(ValueError, match="trials=0"):
        elo.elo_ratings(battles(("A", "B", 1.0)), "A", trials=0)


def test_speed_of_the_protocol():
    rng = np.random.default_rng(0)
    names = np.array(["m0", "m1", "m2", "m3", "m4"])
    a = rng.integers(0, 5, 2000)
    b = (a + rng.integers(1, 5, 2000)) % 5
    rows = pd.DataFrame({"a": names[a], "b": names[b], "score": rng.choice([0.0, 0.5, 1.0], 2000)})
    started = time.perf_counter()
    ratings = elo.elo_ratings(rows, "m0")  # 50 trials x 10 epochs x 2,000 battles
    assert time.perf_counter() - started < 2.0  # ~0.3 s; the bound leaves room for a slow machine
    assert len(ratings) == 5


def samples(*rows):
    return pd.DataFrame(rows, columns=["model", "prompt_index", "sample", "prompt", "reward", "cost"])


def test_battles_from_samples_by_reward_and_by_cost():
    rows = samples(
        ("reference", 0, 0, "p0", 1.0, 0.5), ("policy", 0, 0, "p0", 2.0, 0.5), ("step1", 0, 0, "p0", 1.0, 0.9),
        ("reference", 0, 1, "p0", 3.0, 0.1), ("policy", 0, 1, "p0", 0.0, 0.2),  # step1 lacks this sample
        ("reference", 1, 0, "p1", 1.0, None), ("policy", 1, 0, "other text", 0.0, 0.0),  # prompts differ
    )  # fmt: skip
    by_reward = elo.battles_from_samples(rows, "reward")
    assert by_reward[["a", "b", "score", "prompt_index", "sample"]].values.tolist() == [
        ["policy", "reference", 1.0, 0, 0], ["policy", "reference", 0.0, 0, 1],
        ["policy", "step1", 1.0, 0, 0], ["reference", "step1", 0.5, 0, 0]]  # fmt: skip
    by_cost = elo.battles_from_samples(rows, "cost")  # the lower cost wins
    assert by_cost[["a", "b", "score"]].values.tolist() == [
        ["policy", "reference", 0.5], ["policy", "reference", 0.0], ["policy", "step1", 1.0],
        ["reference", "step1", 1.0]]  # fmt: skip
    assert elo.battles_from_samples(rows.assign(cost=None), "cost").empty  # a task without a cost


def test_battles_from_samples_errors():
    rows = samples(("reference", 0, 0, "p0", 1.0, 0.5), ("reference", 0, 0, "p0", 2.0, 0.5))
    with pytest.raises(ValueError, match="several rows for one completion"):
        elo.battles_from_samples(rows, "reward")
    with pytest.raises(ValueError, match="judge_by='length'"):
        elo.battles_from_samples(rows, "length")
    with pytest.raises(ValueError, match="missing: reward"):
        elo.battles_from_samples(rows.drop(columns="reward"), "reward")
