"""The stepwise family (SACPO, RSA): both steps' losses against the golden vectors, the steps' command lines,
and step 1 trained once per sweep."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import compose_config

from riskexp.logps import IGNORE_INDEX, sequence_stats
from riskexp.objectives import DPO, RaDPO
from riskexp.risk import CVaR
from riskexp.schema import ConfigError, validate
from riskexp.stepwise import step_overrides
from riskexp.stepwise.recipe import step1_directory

GOLDEN = json.loads((Path(__file__).parent / "golden" / "stepwise_safety.json").read_text())
REPO = Path(__file__).resolve().parents[1]


def step_stats(policy_key, reference_key, preferred_key, vocab_risk=None):
    """SequenceStats of the golden pairs, chosen rows first: position t of the JSON's logits predicts token t, so
    each row gets a leading ignored label and a trailing unused position (logps.py shifts by one)."""
    tokens, policy, reference = (torch.tensor(GOLDEN[k], dtype=torch.float64) if k != "tokens"
                                 else torch.tensor(GOLDEN[k]) for k in ("tokens", policy_key, reference_key))
    preferred = torch.tensor(GOLDEN[preferred_key])
    pairs = torch.arange(tokens.shape[0])
    order = [(pairs, preferred), (pairs, 1 - preferred)]  # chosen, then rejected

    def rows(x):
        return torch.cat([x[p, r] for p, r in order])

    labels = torch.cat([torch.full((2 * len(pairs), 1), IGNORE_INDEX), rows(tokens)], dim=1)

    def extended(logits):
        return torch.cat([rows(logits), torch.zeros_like(rows(logits)[:, :1])], dim=1)

    return sequence_stats(extended(policy), labels, extended(reference), vocab_terms=True, vocab_risk=vocab_risk)


BETA, LAM = GOLDEN["beta"], GOLDEN["lambda"]
# (step, policy logits, reference logits, pairs by, temperature)
STEPS = {1: ("pi_r_logits", "sft_logits", "better_response_id", BETA),
         2: ("pi_theta_logits", "pi_r_logits", "safer_response_id", BETA / LAM)}


@pytest.mark.parametrize("step", [1, 2])
def test_sacpo_dpo_steps_match_the_golden_losses(step):
    policy, reference, preferred, beta = STEPS[step]
    losses = DPO(beta=beta)(step_stats(policy, reference, preferred)).losses
    assert losses.mean().item() == pytest.approx(GOLDEN["sacpo_dpo"][f"step{step}_mean_loss"], abs=1e-6)


@pytest.mark.parametrize("split_vocab, key", [(False, "rsa"), (True, "rsa_split_vocab")])
@pytest.mark.parametrize("variant", [1, 2])
@pytest.mark.parametrize("step", [1, 2])
def test_rsa_steps_match_the_golden_losses(step, variant, split_vocab, key):
    policy, reference, preferred, beta = STEPS[step]
    risk = CVaR(alpha=GOLDEN["level"], estimator="reference", split_vocab=split_vocab)
    objective = RaDPO(beta=beta, risk=risk, variant=variant, kl_weight=GOLDEN["kl_weight"])
    losses = objective(step_stats(policy, reference, preferred, risk.over_vocab)).losses
    assert losses.mean().item() == pytest.approx(GOLDEN[key][f"step{step}_variant{variant}_mean_loss"], abs=1e-6)


def test_rsa2_step_has_no_gradient_through_the_chosen_risk_term():
    policy, reference, preferred, beta = STEPS[2]
    risk = CVaR(alpha=GOLDEN["level"], estimator="reference")
    stats = step_stats(policy, reference, preferred, risk.over_vocab)
    chosen_term = stats.seq_risk[:2].detach().requires_grad_(True)
    stats.seq_risk = torch.cat([chosen_term, stats.seq_risk[2:]])
    RaDPO(beta=beta, risk=risk, variant=2)(stats).losses.sum().backward()
    assert chosen_term.grad is None or torch.count_nonzero(chosen_term.grad) == 0


def job(*overrides):
    return compose_config(["experiment=smoke", *overrides], "/tmp/riskexp-test-stepwise")


def test_step_command_lines_carry_the_job_and_set_each_steps_algo_beta_and_pairs():
    cfg = job("algo=rsa", "lam=4", "risk=cvar", "alpha=0.1", "algo.variant=2", "eval.num_prompts=3")
    overrides = ["experiment=smoke", "algo=rsa", "lam=4", "risk=cvar", "alpha=0.1", "algo.variant=2",
                 "eval.num_prompts=3"]
    step1 = step_overrides(cfg, overrides, 1)
    assert step1 == ["experiment=smoke", "risk=cvar", "alpha=0.1", "algo=ra_dpo", "algo.variant=2",
                     "algo.kl_weight=0.5", "beta=0.1", "data.source.pairs=helpfulness", "save_policy=true",
                     "eval.enabled=false", "logger=none"]
    step2 = step_overrides(cfg, overrides, 2, Path("/runs/steps/a=b,c"))
    assert step2 == ["experiment=smoke", "risk=cvar", "alpha=0.1", "eval.num_prompts=3", "algo=ra_dpo",
                     "algo.variant=2", "algo.kl_weight=0.5", "beta=0.025", "data.source.pairs=harmlessness",
                     "model.path='/runs/steps/a=b,c/policy'", "model.ref_path='/runs/steps/a=b,c/policy'"]
    composed = compose_config(step2)
    assert composed.algo.objective.beta == 0.025 and composed.model.path == "/runs/steps/a=b,c/policy"


def test_safety_first_swaps_the_data_and_the_temperature_goes_with_it():
    cfg = job("algo=sacpo", "lam=10", "algo.order=safety_first")
    overrides = ["algo=sacpo", "lam=10", "algo.order=safety_first"]
    assert {"beta=0.01", "data.source.pairs=harmlessness"} <= set(step_overrides(cfg, overrides, 1))
    assert {"beta=0.1", "data.source.pairs=helpfulness"} <= set(step_overrides(cfg, overrides, 2, Path("/s")))


def test_a_step_without_a_risk_measure_runs_with_risk_mean():
    cfg = job("algo=rsa", "algo.steps.1.risk=null", "risk=cvar", "risk.estimator=reference")
    overrides = ["algo=rsa", "algo.steps.1.risk=null", "risk=cvar", "risk.estimator=reference"]
    step1 = step_overrides(cfg, overrides, 1)
    assert "risk=mean" in step1 and not any(o.startswith("risk=cvar") or o.startswith("risk.") for o in step1)
    assert "risk.estimator=reference" in step_overrides(cfg, overrides, 2, Path("/s"))


def test_step1_directory_ignores_knobs_its_training_does_not_read(monkeypatch):
    monkeypatch.setenv("RISKEXP_RUNS", "/r")
    first = step1_directory(["algo=dpo", "alpha=0.1", "beta=0.1", "logger=none"], inert=["alpha", "risk"])
    assert first == step1_directory(["beta=0.1", "algo=dpo", "alpha=0.5"], inert=["alpha", "risk"])
    assert first == Path("/r/steps/algo=dpo,beta=0.1")


@pytest.mark.parametrize("override, message", [
    ("algo.steps.2.objective=ppo", "algo.steps.2.objective='ppo' is not accepted: one of dpo, ipo"),
    ("algo.order=random", "algo.order='random' is not accepted: one of helpful_first, safety_first"),
    ("lam=0", "lam=0.0 is not accepted: the stepwise lambda must be > 0"),
])  # fmt: skip
def test_bad_stepwise_settings_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        validate(job("algo=sacpo", override))


def launch(runs, *overrides):
    return subprocess.Popen([sys.executable, "-m", "riskexp", "experiment=smoke", "logger=none", *overrides],
                            cwd=REPO, env={**os.environ, "RISKEXP_RUNS": str(runs)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_jobs_started_at_once_train_step_1_once(tmp_path):
    jobs = [launch(tmp_path, "algo=sacpo", f"lam={lam}") for lam in (1, 4)]
    outputs = [j.communicate(timeout=600)[0] for j in jobs]
    assert [j.returncode for j in jobs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    log = "".join(outputs)
    assert log.count("step 1 (helpfulness): training in") == 1 and log.count("step 1 (helpfulness): reusing") == 1
    steps = [p for p in (tmp_path / "steps").iterdir() if p.is_dir()]
    assert len(steps) == 1 and json.loads((steps[0] / "results.json").read_text())["step"] == 1
    for lam in (1, 4):
        record = json.loads((tmp_path / "smoke" / f"algo=sacpo,lam={lam}" / "results.json").read_text())
        assert (record["algo"], record["step"], record["lam"]) == ("sacpo", 2, lam)
        assert record["step1_dir"] == str(steps[0]) and record["reference"] == str(steps[0] / "policy")
        assert record["inert"] == ["alpha", "risk"] and record["overrides"][:2] == ["experiment=smoke", "logger=none"]


@pytest.mark.slow
def test_the_smoke_sweep_over_both_algos_and_two_lambdas(tmp_path):
    """The issue's check: 4 step-2 results and 2 step-1 runs."""
    result = subprocess.run([sys.executable, "-m", "riskexp", "--multirun", "algo=sacpo,rsa", "experiment=smoke",
                             "lam=1,4", "logger=none"], cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "RISKEXP_RUNS": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((tmp_path / "sweeps" / "smoke").glob("*/results.json"))) == 4
    assert len(list((tmp_path / "steps").glob("*/results.json"))) == 2
    assert (result.stdout + result.stderr).count(": training in") == 2 + 4  # each step 1 once, each step 2
