"""Elo ratings from pairwise battles, as SACPO's evaluation computes them (`src/evaluate/compute_scores.py`).

Every model starts a trial at 1200; the battles are played in `epochs` shuffled passes, each battle moving the
two ratings by K = 32 times the surprise, score minus the expected score

    E_a = 1 / (1 + 10^((R_b - R_a) / 400)),

and after the trial the ratings are shifted so that the anchor model (the SFT / reference model) sits at 1000.
Over `trials` such trials, each with its own seeded permutations, a model's rating is the mean, and its spread
the sd (ddof=0, as SACPO's np.std), of its normalised ratings.

The normalisation is additive where SACPO's is multiplicative (ratings times 1000 / R_anchor). Elo's expected
score depends on rating differences only, so adding one constant to every rating of a trial keeps every
difference, and with it every win probability the ratings predict: a model 100 points above the anchor is
expected to beat it 64% of the time whatever the shift. Scaling by 1000 / R_anchor instead multiplies every
difference by that factor, so the same ratings would predict other win probabilities, by a factor that depends
on where the anchor happened to end the trial.

The trials are independent, so they run side by side: ratings are a (trials, models) array and each battle
position updates one rating pair in every trial at once (the battle differs per trial, fancy-indexed).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

K_FACTOR = 32.0
INITIAL_RATING = 1200.0
ANCHOR_RATING = 1000.0
ELO_SCALE = 400.0  # a rating difference of 400 points: 10-to-1 odds
TRIALS = 50
EPOCHS = 10
BATTLE_COLUMNS = ("a", "b", "score")


def expected_score(rating_a: np.ndarray | float, rating_b: np.ndarray | float) -> np.ndarray | float:
    """Elo's expected score of a against b: 1 / (1 + 10^((R_b - R_a) / 400)); any broadcastable shapes."""
    return 1.0 / (1.0 + 10.0 ** ((np.asarray(rating_b) - np.asarray(rating_a)) / ELO_SCALE))


def check_battles(battles: pd.DataFrame) -> pd.DataFrame:
    """The battles (columns a, b, score) with score as floats; ValueError for missing columns, no battles, a
    model battling itself, a missing model name or a score outside [0, 1]."""
    missing = [c for c in BATTLE_COLUMNS if c not in battles]
    if missing:
        raise ValueError(f"battles need the columns {', '.join(BATTLE_COLUMNS)}; missing: {', '.join(missing)}")
    if len(battles) == 0:
        raise ValueError("no battles: Elo ratings need at least one")
    if battles["a"].isna().any() or battles["b"].isna().any():
        raise ValueError("battles with a missing model name (a or b)")
    score = pd.to_numeric(battles["score"], errors="coerce").astype(float)
    bad = score.isna() | (score < 0) | (score > 1)
    if bad.any():
        raise ValueError(f"battle scores must be numbers in [0, 1] (1: a wins, 0.5: tie, 0: b wins); "
                         f"{int(bad.sum())} are not, e.g. {battles['score'][bad].iloc[0]!r}")
    same = battles["a"] == battles["b"]
    if same.any():
        raise ValueError(f"{int(same.sum())} battles of a model against itself, e.g. {battles['a'][same].iloc[0]!r}")
    return battles.assign(score=score)


def play(ratings: np.ndarray, a: np.ndarray, b: np.ndarray, score: np.ndarray, k: float = K_FACTOR
         ) -> np.ndarray:
    """The ratings after playing battles in order, every trial at once: ratings (T, M), a and b (P, T) model
    indices and score (P, T) a's scores; battle p of trial t is a[p, t] against b[p, t]. Returns a new (T, M)."""
    trials, models = ratings.shape
    flat = np.array(ratings, dtype=float).reshape(-1)
    offsets = np.arange(trials) * models
    fa, fb = np.ascontiguousarray(a + offsets), np.ascontiguousarray(b + offsets)  # (P, T) into flat
    surprise = np.empty(trials)
    for pa, pb, s in zip(fa, fb, np.asarray(score, dtype=float)):
        # K (s - E_a) with E_a = 1 / (1 + 10^((R_b - R_a) / 400)), in place: this loop is the cost of Elo
        np.subtract(flat[pb], flat[pa], out=surprise)
        surprise /= ELO_SCALE
        np.power(10.0, surprise, out=surprise)
        surprise += 1.0
        np.divide(k, surprise, out=surprise)
        np.subtract(k * s, surprise, out=surprise)
        flat[pa] += surprise
        flat[pb] -= surprise
    return flat.reshape(trials, models)


def battle_orders(n_battles: int, trials: int, epochs: int, seed: int) -> np.ndarray:
    """(epochs * n_battles, trials) battle indices: for each trial, `epochs` permutations of the battles one
    after another, every trial its own, all drawn from one generator seeded by `seed`."""
    rng = np.random.default_rng(seed)
    keys = rng.random((trials, epochs, n_battles))
    return np.argsort(keys, axis=-1).reshape(trials, epochs * n_battles).T


def elo_trials(
    battles: pd.DataFrame,
    anchor: str | None,
    *,
    trials: int = TRIALS,
    epochs: int = EPOCHS,
    k: float = K_FACTOR,
    initial: float = INITIAL_RATING,
    anchor_rating: float = ANCHOR_RATING,
    seed: int = 0,
) -> pd.DataFrame:
    """Each trial's ratings, (trials rows, one column per model, sorted by name): `epochs` shuffled passes over
    the battles (columns a, b, score in [0, 1]: 1 a wins, 0.5 a tie, 0 b wins) from `initial`, then shifted so
    that `anchor` is at `anchor_rating` (`anchor=None`: not shifted). ValueError for bad battles
    (``check_battles``), an anchor that is in no battle, or trials / epochs below 1."""
    battles = check_battles(battles)
    for name, value in (("trials", trials), ("epochs", epochs)):
        if not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name}={value!r}: an integer >= 1")
    models = sorted(set(battles["a"]) | set(battles["b"]), key=str)
    if anchor is not None and anchor not in models:
        raise ValueError(f"anchor {anchor!r} is in no battle; the models are {', '.join(map(str, models))}")
    index = {m: i for i, m in enumerate(models)}
    a = battles["a"].map(index).to_numpy()
    b = battles["b"].map(index).to_numpy()
    score = battles["score"].to_numpy()
    order = battle_orders(len(battles), trials, epochs, seed)  # (P, T)
    ratings = play(np.full((trials, len(models)), float(initial)), a[order], b[order], score[order], k)
    if anchor is not None:
        ratings += anchor_rating - ratings[:, [index[anchor]]]  # additive: every difference is kept
    return pd.DataFrame(ratings, columns=pd.Index(models, name="model"))


def elo_ratings(battles: pd.DataFrame, anchor: str, **options) -> pd.DataFrame:
    """Elo ratings as SACPO's protocol computes them: one row per model (index `model`, sorted), columns
    `mean` and `sd` (ddof=0) over the trials of ``elo_trials`` (its keyword `options`: trials=50, epochs=10,
    k=32, initial=1200, anchor_rating=1000, seed=0). The anchor's rating is exactly `anchor_rating`, sd 0."""
    per_trial = elo_trials(battles, anchor, **options)
    return pd.DataFrame({"mean": per_trial.mean(axis=0), "sd": per_trial.std(axis=0, ddof=0)})


JUDGES = {"reward": False, "cost": True}  # judge_by -> whether the lower value wins


def battles_from_samples(samples: pd.DataFrame, judge_by: str = "reward",
                         keys: Sequence[str] = ("prompt_index", "sample", "prompt")) -> pd.DataFrame:
    """Battles (columns a, b, score, plus `keys`) between every pair of models of `samples` (columns model,
    `keys` and `judge_by`: one row per model and completion) on every completion both have at the same `keys`
    (prompt, sample and the prompt's text): score 1 where a's completion has the higher reward (`judge_by=
    "reward"`, helpfulness) or the lower cost (`"cost"`, harmlessness), 0.5 for a tie, 0 otherwise. Each
    unordered pair battles once per completion, a before b by name (the judge is symmetric: SACPO's judging
    both orders would play each battle twice). Completions without a value (a task without a cost) are left
    out. ValueError for an unknown judge, missing columns, or a model with two rows for one completion."""
    if judge_by not in JUDGES:
        raise ValueError(f"judge_by={judge_by!r} is not accepted: one of {', '.join(JUDGES)}")
    missing = [c for c in ("model", *keys, judge_by) if c not in samples]
    if missing:
        raise ValueError(f"samples need the columns model, {', '.join(keys)}, {judge_by}; missing: "
                         f"{', '.join(missing)}")
    rows = samples[["model", *keys, judge_by]].copy()
    rows[judge_by] = pd.to_numeric(rows[judge_by], errors="coerce")
    rows = rows[rows[judge_by].notna()]
    repeated = rows.duplicated(["model", *keys])
    if repeated.any():
        first = rows[repeated].iloc[0]
        raise ValueError(f"model {first['model']!r} has several rows for one completion "
                         f"({', '.join(f'{k}={first[k]!r}' for k in keys)})")
    pairs = rows.merge(rows, on=list(keys), suffixes=("_a", "_b"))
    pairs = pairs[pairs["model_a"].astype(str) < pairs["model_b"].astype(str)]
    margin = np.sign(pairs[f"{judge_by}_a"] - pairs[f"{judge_by}_b"]) * (-1 if JUDGES[judge_by] else 1)
    battles = pd.DataFrame({"a": pairs["model_a"], "b": pairs["model_b"], "score": (margin + 1) / 2,
                            **{k: pairs[k] for k in keys}})
    return battles.sort_values(["a", "b", *keys[:2]], kind="stable").reset_index(drop=True)
