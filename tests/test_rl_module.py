"""PPOModule (riskexp.rl.module) on the tiny random model: targets, the tail, dropped episodes, data parallelism."""

import copy
import dataclasses
import functools
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import OPENINGS

from riskexp.models import tiny_llama
from riskexp.risk import CVaR, Entropic, Mean
from riskexp.rl.module import PPOModule
from riskexp.rl.soft_risk import soft_risk_count

PROMPTS = [*OPENINGS, "What a", "The plot", "I never", "Every scene"][:8]
SOFT_RISK = {"schedule": "new", "warm_start": 1, "rho": 0.8}


def _module(risk, **kw):
    policy, tok = tiny_llama()
    module = PPOModule(policy, copy.deepcopy(policy), tok, reward=None,
                       optimizer=functools.partial(torch.optim.AdamW, lr=1e-3), risk=risk,
                       sampling={"max_new_tokens": 6}, soft_risk=SOFT_RISK, **kw)
    module.total_iterations = 4
    return module


def _rollout_and_scores(module):
    torch.manual_seed(0)
    ro = module.rollout(PROMPTS)
    return ro, torch.randn(len(PROMPTS))


@pytest.fixture(scope="module")
def cvar_module():
    return _module(CVaR(0.25))


def test_the_kept_count_follows_the_schedule_and_the_worst_episodes_are_kept(cvar_module):
    ro, scores = _rollout_and_scores(cvar_module)
    for m in range(4):
        cvar_module.iteration = m
        targets = cvar_module.targets(ro, scores)
        k = soft_risk_count(m, len(PROMPTS), 0.25, 1, 0.8, 4)
        assert int(targets.kept.sum()) == targets.metrics["kept"] == k
        # mc_shaped: score - beta * KL summed; the kept rows are the k lowest
        shaped = scores - cvar_module.kl_controller.value * (ro.policy_logps - ro.ref_logps).sum(-1)
        assert set(targets.kept.nonzero().flatten().tolist()) == set(shaped.argsort()[:k].tolist())
        kept_tokens = targets.batch["mask"].bool()
        assert kept_tokens.shape[0] == (k if k < len(PROMPTS) else len(PROMPTS))  # dropped rows removed
        a = targets.batch["advantages"][kept_tokens]
        assert abs(float(a.mean())) < 1e-5 and abs(float(a.std()) - 1) < 1e-4  # whitened over the kept tokens
    cvar_module.iteration = 0


def test_mean_keeps_every_episode_and_entropic_weights_the_low_returns_more():
    mean, entropic = _module(Mean()), _module(Entropic(theta=2.0))
    ro, scores = _rollout_and_scores(mean)
    assert bool(mean.targets(ro, scores).kept.all())
    targets = entropic.targets(ro, scores)
    weights = targets.batch["weights"]
    assert bool(targets.kept.all()) and weights.mean().item() == pytest.approx(1.0, abs=1e-5)
    shaped = scores - 0.2 * (ro.policy_logps - ro.ref_logps).sum(-1)
    assert weights.argmax() == shaped.argmin() and weights.argmin() == shaped.argmax()


def _loss_and_grads(module, batch):
    module.zero_grad(set_to_none=True)
    out = module.minibatch_loss(batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads


def test_dropping_the_unkept_episodes_changes_no_loss_and_no_gradient(cvar_module):
    ro, scores = _rollout_and_scores(cvar_module)
    cvar_module.iteration = 3  # k = 4 of 8
    cvar_module.value_head.eval()  # no dropout: the two forward passes must be comparable
    dropped = cvar_module.targets(ro, scores)
    cvar_module.drop_unkept = False
    kept_all = cvar_module.targets(ro, scores)
    cvar_module.drop_unkept, cvar_module.iteration = True, 0
    assert dropped.batch["input_ids"].shape[0] == 4 and kept_all.batch["input_ids"].shape[0] == 8
    loss_dropped, grads_dropped = _loss_and_grads(cvar_module, dropped.batch)
    loss_all, grads_all = _loss_and_grads(cvar_module, kept_all.batch)
    assert torch.allclose(loss_dropped, loss_all, atol=1e-6)
    assert grads_dropped.keys() == grads_all.keys() and len(grads_all) > 10
    for name in grads_all:
        assert torch.allclose(grads_dropped[name], grads_all[name], atol=1e-6, rtol=1e-4), name


# --- data parallelism: 2 CPU processes (gloo) hold half of the batch each -------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(ro, rows: slice):
    return dataclasses.replace(ro, **{f.name: getattr(ro, f.name)[rows] for f in dataclasses.fields(ro)})


def _rank_targets(rank: int, port: int, path: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        module = _module(CVaR(0.25))
        module.iteration = 3
        ro, scores = torch.load(path, weights_only=False)
        half = slice(rank * 4, (rank + 1) * 4)
        targets = module.targets(_rows(ro, half), scores[half])
        module.drop_unkept = False
        full = module.targets(_rows(ro, half), scores[half])  # every local row, for comparison by position
        torch.save({"kept": targets.kept, "advantages": full.batch["advantages"], "kl": full.kl_inputs,
                    "metrics": full.metrics}, f"{path}.{rank}")
    finally:
        dist.destroy_process_group()


def test_under_data_parallelism_the_tail_is_chosen_over_the_global_batch(tmp_path, cvar_module):
    ro, scores = _rollout_and_scores(cvar_module)
    # ranking ties and scores chosen so that each half alone would keep other rows than the global tail does
    scores = torch.tensor([-3.0, -2.0, -1.0, -0.5, 2.0, 3.0, 4.0, 5.0])
    cvar_module.iteration, cvar_module.drop_unkept = 3, False
    single = cvar_module.targets(ro, scores)
    cvar_module.iteration, cvar_module.drop_unkept = 0, True
    path = str(tmp_path / "rollout.pt")
    torch.save((ro, scores), path)
    mp.start_processes(_rank_targets, args=(_free_port(), path), nprocs=2, start_method="spawn")
    ranks = [torch.load(f"{path}.{r}", weights_only=False) for r in range(2)]
    assert torch.equal(ranks[0]["kept"], single.kept) and torch.equal(ranks[1]["kept"], single.kept)
    assert single.kept.tolist() == [True] * 4 + [False] * 4  # the whole tail lies in rank 0's half
    advantages = torch.cat([r["advantages"] for r in ranks])
    assert torch.allclose(advantages, single.batch["advantages"], atol=1e-5)
    for key in ("reference", "kept_mean", "all"):
        assert torch.allclose(ranks[0]["kl"][key], single.kl_inputs[key], atol=1e-6), key
    assert ranks[1]["metrics"]["score_mean"] == pytest.approx(float(single.metrics["score_mean"]), abs=1e-6)


@pytest.fixture(autouse=True)
def _no_cuda(monkeypatch):
    monkeypatch.setitem(os.environ, "CUDA_VISIBLE_DEVICES", "")
