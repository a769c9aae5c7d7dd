"""End-to-end training through `run(cfg)` and the PreferenceModule's contracts with its frozen reference."""

import json

import pytest
import torch
from hydra.utils import instantiate

from riskexp.run import run

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
    cfg = smoke_cfg("algo=ra_dpo", "algo.variant=2", "trainer.enable_checkpointing=true", *FAST)
    import lightning as L

    from riskexp.models import build_policy_and_reference

    loader = instantiate(cfg.model.loader, _partial_=True)
    policy, reference, tokenizer = build_policy_and_reference(loader)
    reference_before = parameters(reference)
    module = instantiate(cfg.algo.module)(
        policy=policy, reference=reference, objective=instantiate(cfg.algo.objective),
        risk=instantiate(cfg.risk), optimizer=instantiate(cfg.optimizer), scheduler=instantiate(cfg.scheduler),
    )
    datamodule = instantiate(cfg.data, tokenizer=tokenizer)
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
    datamodule = instantiate(cfg.data, tokenizer=tokenizer)
    datamodule.setup("fit")
    module.attach_reference_logps(datamodule)
    batch = next(iter(datamodule.train_dataloader()))
    assert "ref_logps" in batch
    cached = module.sequence_stats(batch, vocab_terms=False)
    live = module.sequence_stats({k: v for k, v in batch.items() if k != "ref_logps"}, vocab_terms=False)
    assert torch.allclose(cached.ref_logps, live.ref_logps, atol=1e-4)
    assert torch.allclose(module.objective(cached).losses, module.objective(live).losses, atol=1e-5)
