"""The run record: results.json says which run it was, a finished directory is finished only for its config,
and directory names stay valid path components whatever the overrides hold."""

import json
import time
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from helpers import compose_config
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from test_cli import riskexp

from riskexp.results import ABSENT, changes_results, config_differences, run_config
from riskexp.run import run
from riskexp.schema import ConfigError, run_dirname

FAST = ["algo=dpo", "trainer.max_steps=1", "data.max_length=32", "data.max_prompt_length=16"]


def test_run_config_is_the_flat_resolved_config_minus_what_does_not_change_results(smoke_cfg):
    overrides = ["algo=dpo", "optimizer.lr=1e-4", "algo.label_smoothing=0.1", "data.limit=8",
                 "model.path=/data/sft/policy", "alpha=0.25"]
    cfg = smoke_cfg(*overrides)
    config = run_config(cfg)
    assert config["optimizer.lr"] == 1e-4 and config["algo.label_smoothing"] == 0.1 and config["data.limit"] == 8
    assert config["model.path"] == "/data/sft/policy" and config["trainer.max_steps"] == 3  # the smoke preset
    assert config["trainer.devices"] == 1  # DDP over more devices changes the batch: it counts
    assert config["data.seed"] == 0 and config["risk.alpha"] == 0.25  # interpolations resolved
    assert config["eval.alphas"] == OmegaConf.to_container(cfg.eval.alphas, resolve=True)  # a list is one value
    assert config["risk.estimator"] == "weighted"  # an enum is recorded by its name
    assert json.loads(json.dumps(config)) == config
    for key in config:
        assert not key.startswith(("hydra.", "logger.", "data.build.")), key
    for key in ("name", "rerun", "save_policy", "tags", "eval.samples_logged", "trainer.enable_progress_bar",
                "trainer.log_every_n_steps"):
        assert key not in config, key
    unchanged = smoke_cfg(*overrides, "logger=csv", "name=elsewhere", "rerun=true", "save_policy=true",
                          "trainer.log_every_n_steps=7", "trainer.enable_progress_bar=false", "eval.samples_logged=2")
    assert run_config(unchanged) == config
    assert config_differences(config, run_config(smoke_cfg(*overrides, "trainer.devices=2"))) == [
        ("trainer.devices", 1, 2)]


def test_changes_results_matches_keys_and_groups():
    assert not changes_results("logger") and not changes_results("logger.offline")
    assert not changes_results("hydra/launcher") and not changes_results("hydra.launcher.timeout_min")
    assert changes_results("loggers") and changes_results("optimizer.lr") and changes_results("trainer.devices")


def test_config_differences_name_every_key_in_either():
    old = {"optimizer.lr": 1e-3, "data.limit": None, "gone": 1, "same": [0.1, 0.2]}
    new = {"optimizer.lr": 1e-4, "data.limit": 8, "added": "x", "same": [0.1, 0.2]}
    assert config_differences(old, new) == [
        ("added", ABSENT, "x"), ("data.limit", None, 8), ("gone", 1, ABSENT), ("optimizer.lr", 1e-3, 1e-4)]
    assert config_differences(new, new) == []


def test_finished_directory_is_skipped_for_its_config_and_refused_for_another(smoke_cfg, tmp_path, monkeypatch):
    overrides = [*FAST, "optimizer.lr=1e-3"]
    run(smoke_cfg(*overrides))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["overrides"] == ["experiment=smoke", "logger=none", *overrides]
    assert saved["config"] == run_config(smoke_cfg(*overrides), complete=True)
    assert saved["config"]["optimizer.lr"] == 1e-3 and saved["config"]["logger._target_"] is None  # whole config
    assert run_config(smoke_cfg(*overrides)).items() < saved["config"].items()
    assert saved["config"]["data.source.name_or_path"] == "${rx.package:data/fixtures/safety_preferences.jsonl}"  # portable
    assert saved["choices"]["algo"] == "dpo" and saved["choices"]["model"] == "tiny"
    assert not any(group.startswith(("hydra", "logger")) for group in saved["choices"])
    assert saved["riskexp_version"] == metadata.version("riskexp") and "git_commit" in saved

    def no_model(*args, **kwargs):
        raise AssertionError("a finished directory loaded a model")

    monkeypatch.setattr("riskexp.models.build_policy_and_reference", no_model)
    # keys that do not change results: the same run, skipped
    assert run(smoke_cfg(*overrides, "logger=csv", "name=renamed", "trainer.log_every_n_steps=3")) == saved
    started = time.time()
    with pytest.raises(ConfigError) as refused:
        run(smoke_cfg(*FAST, "optimizer.lr=1e-4", "algo.label_smoothing=0.2"))
    assert time.time() - started < 5
    message = str(refused.value)
    assert "algo.label_smoothing: 0.0 -> 0.2" in message and "optimizer.lr: 0.001 -> 0.0001" in message
    assert "rerun=true" in message and str(tmp_path / "results.json") in message
    assert "trainer.max_steps" not in message  # only the keys that differ

    monkeypatch.undo()
    run(smoke_cfg(*FAST, "optimizer.lr=1e-4", "rerun=true"))
    (archived,) = tmp_path.glob("results.*.json")
    assert json.loads(archived.read_text()) == saved
    assert json.loads((tmp_path / "results.json").read_text())["config"]["optimizer.lr"] == 1e-4


def test_record_without_a_config_is_refused(smoke_cfg, tmp_path):
    # written before riskexp recorded configs: nothing says it was this run, so it is not silently reused
    (tmp_path / "results.json").write_text(json.dumps({"status": "finished", "val/loss": 0.69}))
    with pytest.raises(ConfigError, match="records no config.*rerun=true"):
        run(smoke_cfg(*FAST))


def test_cli_refuses_a_changed_config_with_exit_2_in_seconds(tmp_path):
    overrides = ["experiment=smoke", "logger=none", "trainer.max_steps=1"]
    recorded = run_config(compose_config(overrides)) | {"optimizer.lr": 0.5}
    GlobalHydra.instance().clear()
    run_dir = tmp_path / "smoke" / "trainer.max_steps=1"
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text(json.dumps({"status": "finished", "config": recorded}))
    result, seconds = riskexp(*overrides, runs_dir=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "optimizer.lr: 0.5 -> 0.001" in result.stderr and "rerun=true" in result.stderr
    # one line per differing key, and only lr differs: the CLI resolves the config as compose does
    assert [line for line in result.stderr.splitlines() if line.startswith("  ")] == ["  optimizer.lr: 0.5 -> 0.001"]
    assert seconds < 20 and not list(run_dir.glob("results.*.json"))


@pytest.mark.parametrize("name", ["algo=dpo,alpha=0.05,risk=cvar,trainer.max_steps=1",
                                  "eval.alphas=[0.05,0.1],seed=1", "model.path=runs_smoke_policy"])
def test_normal_override_names_are_kept_as_they_are(name):
    assert run_dirname(name) == name


def valid_component(name):
    return "/" not in name and "\\" not in name and 0 < len(name.encode()) <= 255


def test_long_values_are_shortened_with_a_stable_hash():
    path = "/" + "x" * 250 + "/epoch_3/policy"
    name = run_dirname(f"algo=dpo,model.path={path}")
    assert valid_component(name) and name.startswith("algo=dpo,model.path=_xxx") and name.endswith("3_policy")
    assert run_dirname(f"algo=dpo,model.path={path}") == name  # stable
    assert run_dirname(f"algo=dpo,model.path={path[:-1]}Y") != name  # and different values stay apart
    # many long values, multi-byte characters: the joined name is shortened as a whole
    crowded = ",".join(f"k{i}=" + "é" * 40 for i in range(12))
    assert valid_component(run_dirname(crowded)) and run_dirname(crowded) != run_dirname(crowded[:-1])
    assert run_dirname("") == "default"


def test_quotes_around_a_value_are_not_part_of_the_name():
    assert run_dirname("algo=ppo,model.path='runs_a=b,c_policy'") == "algo=ppo,model.path=runs_a=b,c_policy"
    assert run_dirname('model.path="p"') == "model.path=p"


def test_a_300_character_model_path_gives_a_valid_run_and_sweep_directory():
    path = "/" + "p" * 299
    cfg = compose_config(["experiment=smoke", f"model.path={path}", "seed=1"])
    HydraConfig.instance().set_config(cfg)
    for component in (Path(cfg.hydra.run.dir).name, cfg.hydra.sweep.subdir):
        assert valid_component(component) and component.startswith("model.path=_ppp"), component
        assert component.endswith(",seed=1")
    GlobalHydra.instance().clear()


@pytest.mark.slow
def test_training_from_a_300_character_model_path(tmp_path):
    from riskexp.models import tiny_llama

    policy_dir = tmp_path / "exported" / ("p" * 200)
    policy_dir = policy_dir / ("q" * (299 - len(str(policy_dir))))
    assert len(str(policy_dir)) == 300
    model, tokenizer = tiny_llama()
    model.save_pretrained(policy_dir)
    tokenizer.save_pretrained(policy_dir)
    result, _ = riskexp("experiment=smoke", "logger=none", "trainer.max_steps=1", f"model.path={policy_dir}",
                        runs_dir=tmp_path / "runs")
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs" / "smoke").iterdir()
    assert valid_component(run_dir.name)
    saved = json.loads((run_dir / "results.json").read_text())
    assert f"model.path={policy_dir}" in saved["overrides"] and saved["config"]["model.path"] == str(policy_dir)
    assert f"model.path={policy_dir}" in yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())


def test_atomic_writes_give_files_the_mode_a_plain_write_would(tmp_path):
    import os

    from riskexp.files import write_jsonl

    umask = os.umask(0o022)
    try:
        fresh = write_jsonl([{"a": 1}], tmp_path / "fresh.jsonl")
        assert fresh.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0o600
        kept = tmp_path / "kept.jsonl"
        kept.write_text("")
        kept.chmod(0o640)
        write_jsonl([{"a": 2}], kept)
        assert kept.stat().st_mode & 0o777 == 0o640 and kept.read_text() == '{"a": 2}\n'
    finally:
        os.umask(umask)
