"""Shared fixtures: the real config, shrunk for tests; no network, no W&B."""

import os

import pytest
from helpers import compose_config
from hydra.core.global_hydra import GlobalHydra

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny():
    """The random-init tiny Llama and SmolLM2's tokenizer (the same weights in every test: a fixed init seed)."""
    from riskexp.models import tiny_llama

    return tiny_llama()


@pytest.fixture
def smoke_cfg(tmp_path):
    """Factory: the smoke experiment with extra overrides, writing into tmp_path."""

    def make(*overrides, output_dir=None):
        return compose_config(["experiment=smoke", "logger=none", *overrides], output_dir or tmp_path)

    yield make
    GlobalHydra.instance().clear()
