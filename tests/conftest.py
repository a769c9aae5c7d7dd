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


@pytest.fixture(scope="module")
def other(tiny):
    """The tiny model perturbed, so that its KL to the tiny model is not trivially zero."""
    import copy

    import torch

    model = copy.deepcopy(tiny[0])
    with torch.no_grad():
        torch.manual_seed(0)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture
def smoke_cfg(tmp_path):
    """Factory: the smoke experiment with extra overrides, writing into tmp_path."""

    def make(*overrides, output_dir=None):
        return compose_config(["experiment=smoke", "logger=none", *overrides], output_dir or tmp_path)

    yield make
    GlobalHydra.instance().clear()
