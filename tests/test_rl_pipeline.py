"""The RL family end to end on the tiny model: `algo=ppo` / `algo=ra_rlhf` through the CLI and the compose API."""

import json

import pandas as pd
import pytest
import torch
from test_pipeline import module_cli

from riskexp.rl.module import PPOModule
from riskexp.rl.soft_risk import soft_risk_count
from riskexp.run import run

SMOKE_RL = ("experiment=smoke", "eval.num_prompts=4", "eval.samples_per_prompt=2", "eval.bootstrap_samples=50")


def test_smoke_sweep_of_ppo_and_ra_rlhf_writes_both_results_and_the_kept_count_follows_the_schedule(tmp_path):
    result = module_cli("riskexp", "--multirun", *SMOKE_RL, "algo=ppo,ra_rlhf", "risk=cvar", "alpha=0.25",
                        "logger=csv", runs_dir=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted((tmp_path / "sweeps" / "smoke").glob("*/results.json"))
    assert [p.parent.name.split(",")[0] for p in runs] == ["algo=ppo", "algo=ra_rlhf"]
    for path in runs:
        results = json.loads(path.read_text())
        assert results["status"] == "finished" and results["risk"] == "cvar" and results["alpha"] == 0.25
        assert results["iterations"] == 4 and results["steps"] == 4 * 4  # 4 iterations x 4 PPO epochs x 1 minibatch
        assert "eval/reward_mean" in results and "eval/shaped_return_mean" in results
        logged = pd.read_csv(path.parent / "csv" / "metrics.csv").dropna(subset=["train/kept"])
        # data=fixture: 16 prompts in batches of 4 -> M = 4; warm start 0.15 M -> n = 0; rho = 0.95
        expected = [soft_risk_count(m, 4, 0.25, 0, 0.95, 4) for m in range(4)]
        assert logged["train/kept"].astype(int).tolist() == expected == [4, 4, 3, 2]
        assert logged["train/iteration"].astype(int).tolist() == [0, 1, 2, 3]


def test_ra_rlhf_is_ppo_with_cvar_and_its_risk_group_can_be_overridden(smoke_cfg):
    ra_rlhf, ppo = smoke_cfg("algo=ra_rlhf"), smoke_cfg("algo=ppo", "risk=cvar", "alpha=0.4")
    assert ra_rlhf.risk._target_ == "riskexp.risk.CVaR" and ra_rlhf.alpha == 0.4 and ra_rlhf.algo.name == "ra_rlhf"
    strip = ("name",)
    assert {k: v for k, v in ra_rlhf.algo.items() if k not in strip} == {
        k: v for k, v in ppo.algo.items() if k not in strip}
    assert smoke_cfg("algo=ra_rlhf", "risk=mean").risk._target_ == "riskexp.risk.Mean"
    # algo=ppo alone is PPO-RLHF (the primary config's risk=cvar is Ra-DPO's default, not PPO's)
    assert smoke_cfg("algo=ppo").risk._target_ == "riskexp.risk.Mean"
    assert smoke_cfg("algo=ppo_lag").risk._target_ == "riskexp.risk.Mean"
    assert smoke_cfg("algo=ra_rlhf", "alpha=0.2").alpha == 0.2


@pytest.mark.parametrize("critic", ["shared", "separate"])
def test_every_policy_and_value_parameter_moves(smoke_cfg, monkeypatch, critic):
    snapshots = {}

    def on_train_start(self):
        snapshots["before"] = {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}

    def on_train_end(self):
        snapshots["after"] = {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}

    monkeypatch.setattr(PPOModule, "on_train_start", on_train_start, raising=False)
    monkeypatch.setattr(PPOModule, "on_train_end", on_train_end, raising=False)
    results = run(smoke_cfg("algo=ppo", "risk=mean", f"algo.critic={critic}", "eval.enabled=false"))
    before, after = snapshots["before"], snapshots["after"]
    assert any(n.startswith("value_head.") for n in before)
    assert any(n.startswith("critic_trunk.") for n in before) == (critic == "separate")
    unmoved = [n for n in before if torch.equal(before[n], after[n])]
    assert not unmoved and results["train/value_loss"] > 0
    assert results["critic"] == critic and results["kl_input"] == "reference"


def test_bad_rl_settings_are_refused_with_what_is_accepted(smoke_cfg):
    with pytest.raises(ValueError, match="algo.critic='both' is unknown; accepted: shared, separate"):
        run(smoke_cfg("algo=ppo", "algo.critic=both"))
    with pytest.raises(ValueError, match="data.rl.batch_size=64 but the task has 16 training prompts"):
        run(smoke_cfg("algo=ppo", "data.rl.batch_size=64"))


@pytest.mark.slow
def test_lightning_ddp_on_two_cpu_processes_trains_one_policy_over_the_global_batch(tmp_path):
    """`trainer=ddp` through `python -m riskexp`: Lightning re-launches the command as rank 1, each rank rolls out
    half of every batch, and the averaged updates leave both ranks with the same weights."""
    result = module_cli("riskexp", *SMOKE_RL, "algo=ra_rlhf", "alpha=0.25", "trainer=ddp", "trainer.accelerator=cpu",
                        "trainer.devices=2", "trainer.precision=32-true", "logger=csv", runs_dir=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    [path] = (tmp_path / "smoke").glob("*/results.json")
    results = json.loads(path.read_text())
    assert results["status"] == "finished" and results["world_size"] == 2
    # data=fixture: 16 prompts, a global batch of 4 (2 per rank) -> the same M = 4 iterations as one process
    assert results["iterations"] == 4 and results["episodes_per_iteration"] == 4
    assert results["rank_weight_spread"] < 1e-6
    logged = pd.read_csv(path.parent / "csv" / "metrics.csv").dropna(subset=["train/kept"])
    assert logged["train/kept"].astype(int).tolist() == [soft_risk_count(m, 4, 0.25, 0, 0.95, 4) for m in range(4)]
    assert "eval/reward_mean" in results
