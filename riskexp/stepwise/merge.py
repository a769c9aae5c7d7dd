"""P-SACPO (Wachi et al. 2024): a policy between two exported policies by linear weight interpolation, evaluated.

    python -m riskexp.merge --multirun data=safety merge.a=<helpful run>/policy merge.b=<sacpo run>/policy \\
        merge.q=0.25,0.5,0.75

theta_q = (1 - q) theta_a + q theta_b, tensor by tensor (mergekit's `linear`, which SACPO's merge configs use):
a cheap stand-in for sweeping lambda between the two models a and b were trained at. Each merged policy is
evaluated against `model.ref_path` (else the base model) like `riskexp.eval`; results.json records `q` and both
sources; `save_policy=true` also writes the merged policy to `<run>/policy`.
"""

from __future__ import annotations

import hydra
import torch
from omegaconf import DictConfig
from torch import Tensor

from riskexp.cli import CONF_DIR
from riskexp.eval import evaluate, main_with
from riskexp.schema import ConfigError, validate


def merge_weights(a: dict[str, Tensor], b: dict[str, Tensor], q: float) -> dict[str, Tensor]:
    """(1 - q) a + q b for every tensor of two state dicts of one architecture, in a's dtype."""
    if a.keys() != b.keys():
        raise ValueError(f"the policies differ in their tensors: {sorted(a.keys() ^ b.keys())[:3]} ...")
    merged = {}
    for name, x in a.items():
        if x.shape != b[name].shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)} in merge.a and {tuple(b[name].shape)} in merge.b")
        # integer buffers (position ids) are not weights: they must agree, and are kept
        merged[name] = torch.lerp(x.double(), b[name].double(), q).to(x.dtype) if x.is_floating_point() else x
    return merged


def merged_policy(cfg: DictConfig):
    """The policy at `merge.q` between `merge.a` and `merge.b`, and merge.a's tokenizer."""
    from riskexp.models import from_pretrained

    policy, tokenizer = from_pretrained(cfg.merge.a, dtype=cfg.model.dtype)
    other, _ = from_pretrained(cfg.merge.b, dtype=cfg.model.dtype)
    policy.load_state_dict(merge_weights(policy.state_dict(), other.state_dict(), cfg.merge.q))
    return policy, tokenizer


def merge(cfg: DictConfig) -> dict:
    import os

    validate(cfg)  # first: unset merge.a / merge.b are named in one line
    q = cfg.merge.q
    if not (isinstance(q, int | float) and 0.0 <= q <= 1.0):
        raise ConfigError(f"merge.q={q!r} is not accepted: an interpolation weight in [0, 1]")
    for key in ("a", "b"):
        path = cfg.merge[key]
        if not (isinstance(path, str) and os.path.isdir(path)):
            raise ConfigError(f"merge.{key}={path!r} is not accepted: an exported policy directory, e.g. "
                              "runs/<run>/policy")
    record = {"kind": "merge", "q": q, "merge_a": cfg.merge.a, "merge_b": cfg.merge.b,
              "policy": f"(1 - {q:g}) {cfg.merge.a} + {q:g} {cfg.merge.b}"}
    return evaluate(cfg, build_policy=merged_policy, record=record)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="merge")
def main(cfg: DictConfig) -> None:
    main_with(cfg, merge)


if __name__ == "__main__":
    main()
