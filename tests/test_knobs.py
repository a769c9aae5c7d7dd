"""Which knobs training reads, and the warnings a sweep gets before it starts (riskexp.knobs)."""

import pytest
from helpers import compose_config
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict, read_write

from riskexp.knobs import inert_knobs, sweep_warnings, training_config, training_reads
from riskexp.run import saves_policy


def cfg_of(*overrides, output_dir="/tmp/riskexp-test-knobs"):
    return compose_config(["experiment=smoke", *overrides], output_dir)


@pytest.mark.parametrize("overrides, inert", [
    (["algo=dpo"], ["alpha", "lam", "risk"]),              # DPO has no risk measure (lam: the stepwise algos')
    (["algo=ipo", "risk=entropic"], ["alpha", "lam", "risk"]),
    (["algo=tdpo"], ["alpha", "lam", "risk"]),
    (["algo=kto"], ["alpha", "lam", "risk"]),
    (["algo=ra_dpo", "risk=cvar"], ["lam"]),               # alpha reaches the objective through risk.alpha
    (["algo=ra_dpo", "risk=entropic"], ["alpha", "lam"]),  # entropic risk has theta, not alpha
    (["algo=ra_dpo", "risk=mean"], ["alpha", "lam"]),
    (["algo=sft"], ["alpha", "beta", "lam", "risk"]),      # SFT has no KL temperature either
    (["algo=sacpo"], ["alpha", "risk"]),                   # its DPO steps read beta and lam
    (["algo=rsa"], []),
])  # fmt: skip
def test_inert_knobs_follow_the_interpolations_of_each_algorithm(overrides, inert):
    assert inert_knobs(cfg_of(*overrides)) == inert


def test_training_reads_roots_and_what_they_interpolate_but_not_the_evaluation_task():
    reads = training_reads(cfg_of("algo=ra_dpo"))
    assert {"algo", "model", "data", "optimizer", "scheduler", "trainer", "seed", "beta", "risk", "alpha"} <= reads
    assert not any(path.startswith(("eval", "data.task", "data.build")) for path in reads)


def test_training_config_is_equal_exactly_when_the_policy_is():
    assert training_config(cfg_of("algo=dpo", "alpha=0.1")) == training_config(cfg_of("algo=dpo", "alpha=0.5"))
    assert training_config(cfg_of("algo=dpo", "eval.alpha=0.25")) == training_config(cfg_of("algo=dpo"))
    assert training_config(cfg_of("algo=dpo", "logger=csv", "name=x")) == training_config(cfg_of("algo=dpo"))
    assert training_config(cfg_of("algo=ra_dpo", "alpha=0.1")) != training_config(cfg_of("algo=ra_dpo", "alpha=0.5"))
    assert training_config(cfg_of("algo=dpo", "beta=0.2")) != training_config(cfg_of("algo=dpo"))
    assert training_config(cfg_of("algo=dpo", "seed=1")) != training_config(cfg_of("algo=dpo"))


def sweep(**values):
    """Jobs of the grid over `values` (lists of strings), as ValidateSweep hands them to sweep_warnings."""
    jobs = [{}]
    for key, options in values.items():
        jobs = [{**job, key: option} for job in jobs for option in options]
    return [(job, cfg_of(*(f"{k}={v}" for k, v in job.items()))) for job in jobs]


def test_a_sweep_warns_once_per_inert_key_naming_where_and_the_identical_jobs():
    warnings = sweep_warnings(sweep(algo=["dpo", "ra_dpo"], risk=["cvar", "entropic"], alpha=["0.1", "0.5"]))
    assert warnings[0] == ("risk=cvar,entropic does not change training with algo=dpo: those jobs differ only "
                           "in what is evaluated or reported")
    assert warnings[1].startswith("alpha=0.1,0.5 does not change training with algo=dpo; or risk=entropic:")
    identical = warnings[2].splitlines()
    assert identical[0] == "6 of 8 jobs train the same policy as another job (one line per policy):"
    assert identical[1:] == [
        "  algo=dpo risk=cvar alpha=0.1 | algo=dpo risk=cvar alpha=0.5 | algo=dpo risk=entropic alpha=0.1 | "
        "algo=dpo risk=entropic alpha=0.5",
        "  algo=ra_dpo risk=entropic alpha=0.1 | algo=ra_dpo risk=entropic alpha=0.5",
    ]
    assert len(warnings) == 3


def test_a_sweep_whose_every_key_changes_training_gets_no_warning():
    assert sweep_warnings(sweep(algo=["ra_dpo"], alpha=["0.1", "0.5"], seed=["0", "1"])) == []
    assert sweep_warnings(sweep(algo=["dpo"], beta=["0.1", "0.5"])) == []


def test_an_evaluation_only_key_is_inert_in_every_job():
    warnings = sweep_warnings(sweep(**{"eval.alpha": ["0.05", "0.1"]}))
    assert warnings[0].startswith("eval.alpha=0.05,0.1 does not change training in any job")


def test_policies_are_exported_by_single_runs_and_not_by_sweep_jobs_unless_asked():
    cfg = cfg_of("save_policy=null")
    assert saves_policy(cfg)
    with read_write(cfg.hydra):
        cfg.hydra.mode = RunMode.MULTIRUN
    HydraConfig.instance().set_config(cfg)
    assert not saves_policy(cfg)
    with open_dict(cfg):
        cfg.save_policy = True
    assert saves_policy(cfg)
