"""End-to-end training through `run(cfg)` and the PreferenceModule's contracts with its frozen reference."""

import json
import math

import pytest
import torch
from hydra.utils import instantiate

from riskexp.run import datamodule_config, run

FAST = ["trainer.max_steps=2", "data.max_length=32", "data.max_prompt_length=16", "save_policy=true"]


def parameters(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("algo", ["dpo", "ipo", "tdpo", "ra_dpo"])
def test_every_algo_trains_and_writes_results(smoke_cfg, tmp_path, algo):
    cfg = smoke_cfg(f"algo={algo}", "risk=cvar", "alpha=0.5", *FAST)
    results = run(cfg)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["train/loss"] == pytest.approx(results["train/loss"]) and saved["val/loss"] == pytest.approx(results["val/loss"])
    for key in ("algo", "variant", "risk", "alpha", "beta", "seed", "model", "data", "steps", "git_commit",
                "wall_time_s", "train/loss", "val/loss", "val/reward_accuracy", "val/kl_chosen", "val/margin_risk"):
        assert key in saved, key
    assert saved["algo"] == algo and saved["steps"] == 2 and saved["risk"] == "cvar" and saved["alpha"] == 0.5
    if algo == "ra_dpo":
        assert "val/risk_ratio_chosen" in saved
    # what training never read, recorded from the config as composed (instantiation resolves it in place)
    assert saved["inert"] == (["lam"] if algo == "ra_dpo" else ["alpha", "lam", "risk"])
    # the smoke preset evaluates on a few sentiment prompts, and says how many
    assert saved["eval_prompts"] == 6 and saved["eval_samples_per_prompt"] == 2 and saved["val_pairs"] == 8
    assert "eval/reward_cvar/lo" in saved and "eval/delta/length_mean" in saved
    # the exported policy differs from the initial (reference) weights: every parameter moved
    from riskexp.models import from_pretrained

    trained, _ = from_pretrained(str(tmp_path / "policy"))
    initial, _ = instantiate(cfg.model.loader)
    before = parameters(initial)
    for name, value in parameters(trained).items():
        assert not torch.equal(value, before[name]), f"{name} did not change"


def test_finished_run_is_skipped_and_rerun_archives(smoke_cfg, tmp_path):
    cfg = smoke_cfg("algo=dpo", *FAST[:-1])
    first = run(cfg)
    assert run(cfg) == json.loads((tmp_path / "results.json").read_text())  # skipped: same record back
    run(smoke_cfg("algo=dpo", "rerun=true", *FAST[:-1]))
    archived = list(tmp_path.glob("results.*.json"))
    assert len(archived) == 1, "the previous results.json is archived, not overwritten"
    assert json.loads(archived[0].read_text())["wall_time_s"] == first["wall_time_s"]
    assert (tmp_path / "results.json").exists()


def test_checkpoint_holds_policy_only_and_reference_stays_frozen(smoke_cfg, tmp_path):
    cfg = smoke_cfg("algo=ra_dpo", "algo.variant=2", *FAST)
    import lightning as L

    from riskexp.models import build_policy_and_reference

    loader = instantiate(cfg.model.loader, _partial_=True)
    policy, reference, tokenizer = build_policy_and_reference(loader)
    reference_before = parameters(reference)
    module = instantiate(cfg.algo.module)(
        policy=policy, reference=reference, objective=instantiate(cfg.algo.objective),
        risk=instantiate(cfg.risk), optimizer=instantiate(cfg.optimizer), scheduler=instantiate(cfg.scheduler),
    )
    datamodule = instantiate(datamodule_config(cfg), tokenizer=tokenizer)
    from lightning.pytorch.callbacks import ModelCheckpoint

    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
                        limit_val_batches=1, num_sanity_val_steps=0, gradient_clip_val=1.0)
    trainer.fit(module, datamodule=datamodule)
    assert not module.reference.training and module.policy.training
    assert all(not p.requires_grad and p.grad is None for p in module.reference.parameters())
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in module.reference.parameters()}
    for name, value in parameters(module.reference).items():
        assert torch.equal(value, reference_before[name])
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    keys = checkpoint["state_dict"].keys()
    assert keys and all(k.startswith("policy.") for k in keys)
    # and it loads back without asking for reference weights, but not without policy weights
    module.on_load_checkpoint(checkpoint)
    with pytest.raises(KeyError, match="lacks"):
        module.on_load_checkpoint({"state_dict": {k: v for k, v in checkpoint["state_dict"].items() if "layers.0" not in k}})


def test_precomputed_reference_logps_match_the_live_reference(smoke_cfg):
    cfg = smoke_cfg("algo=dpo", *FAST)
    from riskexp.models import build_policy_and_reference

    policy, reference, tokenizer = build_policy_and_reference(instantiate(cfg.model.loader, _partial_=True))
    module = instantiate(cfg.algo.module)(policy=policy, reference=reference, objective=instantiate(cfg.algo.objective),
                                          optimizer=instantiate(cfg.optimizer), precompute_ref_logps=True)
    datamodule = instantiate(datamodule_config(cfg), tokenizer=tokenizer)
    datamodule.setup("fit")
    module.attach_reference_logps(datamodule)
    batch = next(iter(datamodule.train_dataloader()))
    assert "ref_logps" in batch
    cached = module.sequence_stats(batch, vocab_terms=False)
    live = module.sequence_stats({k: v for k, v in batch.items() if k != "ref_logps"}, vocab_terms=False)
    assert torch.allclose(cached.ref_logps, live.ref_logps, atol=1e-4)
    assert torch.allclose(module.objective(cached).losses, module.objective(live).losses, atol=1e-5)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_precomputed_reference_gives_dpo_log2_at_the_first_step(smoke_cfg, precision):
    """Policy == reference: the precomputed reference log-probs are made under the training step's precision
    context, so every log-ratio of the first step is exactly 0 and the DPO loss is log 2, in both precisions.
    (The trainer is built here: the config refuses bf16 on accelerator=cpu, where it is slow but correct.)"""
    import lightning as L

    from riskexp.models import build_policy_and_reference

    cfg = smoke_cfg("algo=dpo", "algo.precompute_ref_logps=true", *FAST[1:3])
    policy, reference, tokenizer = build_policy_and_reference(instantiate(cfg.model.loader, _partial_=True))
    module = instantiate(cfg.algo.module)(policy=policy, reference=reference, objective=instantiate(cfg.algo.objective),
                                          optimizer=instantiate(cfg.optimizer))
    assert module.precompute_ref_logps
    seen, losses = [], []
    live = module.sequence_stats

    def recorded(batch, vocab_terms):
        stats = live(batch, vocab_terms)
        seen.append(("ref_logps" in batch, stats.logratios.detach().clone()))
        return stats

    module.sequence_stats = recorded

    class FirstLoss(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(outputs["loss"].item())

    trainer = L.Trainer(max_steps=1, accelerator="cpu", precision=precision, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[FirstLoss()])
    trainer.fit(module, datamodule=instantiate(datamodule_config(cfg), tokenizer=tokenizer))
    (cached, logratios), = seen
    assert cached, "the training batch carries the precomputed reference log-probs"
    assert torch.equal(logratios, torch.zeros_like(logratios)), logratios
    assert losses[0] == pytest.approx(math.log(2), abs=1e-7)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_evaluation_after_training_runs_on_the_training_device(smoke_cfg, monkeypatch):
    """Lightning moves the module to the CPU when fit ends; the evaluation that follows must run on the GPU."""
    import riskexp.run

    devices = []

    def record(cfg, policy, reference, tokenizer):
        devices.append({next(policy.parameters()).device.type, next(reference.parameters()).device.type})
        return {}, []

    monkeypatch.setattr(riskexp.run, "evaluate_task", record)
    run(smoke_cfg("trainer=gpu", "data=sentiment", "trainer.max_steps=1", "eval.num_prompts=2"))
    assert devices == [{"cuda"}]
