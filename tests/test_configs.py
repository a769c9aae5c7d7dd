"""Every algo x risk composes and instantiates; top-level knobs flow into the groups; bad values fail clearly."""

import pytest
from helpers import compose_config
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from riskexp.objectives import DPO, IPO, TDPO, RaDPO
from riskexp.risk import CVaR, Entropic, Mean
from riskexp.schema import ConfigError, validate

ALGOS = {"dpo": DPO, "ipo": IPO, "tdpo": TDPO, "ra_dpo": RaDPO}
RISKS = {"mean": Mean, "cvar": CVaR, "entropic": Entropic}


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("risk", RISKS)
def test_every_algo_and_risk_composes(algo, risk):
    cfg = compose_config([f"algo={algo}", f"risk={risk}", "experiment=smoke"])
    validate(cfg)
    assert not OmegaConf.missing_keys(cfg.algo) and not OmegaConf.missing_keys(cfg.risk)
    objective = instantiate(cfg.algo.objective)
    assert isinstance(objective, ALGOS[algo])
    assert isinstance(instantiate(cfg.risk), RISKS[risk])
    if algo == "ra_dpo":
        assert isinstance(objective.risk, RISKS[risk])


def test_alpha_and_beta_flow_into_the_groups():
    cfg = compose_config(["algo=ra_dpo", "risk=cvar", "alpha=0.1", "beta=0.5", "algo.variant=2"])
    objective = instantiate(cfg.algo.objective)
    assert objective.risk.alpha == 0.1 and objective.beta == 0.5 and objective.variant == 2
    assert objective.kl_weight == 0.5  # TDPO's weight is its own knob, not the risk level
    assert cfg.data.seed == cfg.seed


def test_experiment_preset_overrides_primary_values():
    cfg = compose_config(["experiment=smoke"])
    assert cfg.name == "smoke" and cfg.trainer.max_steps > 0 and cfg.model.name == "tiny"


def test_reference_estimator_is_selectable():
    cfg = compose_config(["risk=cvar", "risk.estimator=reference", "risk.split_vocab=true"])
    risk = instantiate(cfg.risk)
    assert risk.estimator.value == "reference" and risk.split_vocab


@pytest.mark.parametrize(
    "override, message",
    [
        ("alpha=1.5", "alpha=1.5"),
        ("alpha=0", "alpha=0"),
        ("beta=-1", "beta=-1"),
        ("algo.variant=3", "algo.variant=3"),
        ("data.max_prompt_length=500", "data.max_prompt_length=500"),
        ("trainer.precision=bf16-mixed", "trainer.precision='bf16-mixed'"),
        ("risk=entropic risk.theta=-2", "risk.theta=-2"),
    ],
)
def test_bad_values_are_rejected_with_key_and_value(override, message):
    cfg = compose_config(override.split())
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    assert message in str(error.value) and "accepted" in str(error.value)


@pytest.mark.parametrize(
    "override, message",
    [("risk=foo", "risk"), ("algo=nope", "algo"), ("alpha=abc", "alpha"), ("risk.estimator=median", "estimator")],
)
def test_bad_names_and_types_fail_at_composition(override, message):
    with pytest.raises(ConfigCompositionException) as error:
        compose_config([override])
    text = str(error.value) + str(error.value.__cause__)
    assert message in text
