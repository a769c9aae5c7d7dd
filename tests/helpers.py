"""Helpers shared by the tests: compose the real config as `python -m riskexp` would."""

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

import riskexp.schema  # noqa: F401  (registers schemas and resolvers)
from riskexp.cli import CONF_DIR


def compose_config(overrides=(), output_dir=None):
    """The composed config for a command line, with hydra.runtime.output_dir pointed at `output_dir`."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(output_dir)
            cfg.hydra.job.override_dirname = "test"
        HydraConfig.instance().set_config(cfg)
    return cfg


# movie-review openings of different lengths, so a batch of them is padded
OPENINGS = [
    "The movie was",
    "A very long opening sentence about a film that goes on and on before it gets to the point, and then",
    "I",
    "This film is one of the",
    "Honestly, the acting",
]


def length_reward(prompts, completions):
    """A reward scorer for tests: the completion's length in characters."""
    import torch

    return torch.tensor([float(len(c)) for c in completions])


class ConstantCost:
    """A cost scorer that gives every episode the same cost (as a Hydra target: helpers.ConstantCost)."""

    def __init__(self, value: float):
        self.value = value

    def __call__(self, prompts, completions):
        import torch

        return torch.full((len(completions),), float(self.value))
