"""KTO (SACPO's safety step, TRL's KTOTrainer): the loss against rsa.md's golden values, the KL anchor, the weights,
unpaired data and its mismatched rows, the Lightning module, a run through `riskexp.run`, and config errors."""

import functools
import json
from pathlib import Path

import pytest
import torch
from helpers import compose_config
from hydra.utils import instantiate

from riskexp.data.preference import (
    FIXTURE_PREFERENCES,
    PreferenceDataModule,
    collate_completions,
    is_unpaired,
    load_preference_file,
    load_unpaired_file,
    mismatch_shift,
    tokenize_completion,
    unpair_preference_records,
)
from riskexp.logps import IGNORE_INDEX, sequence_stats
from riskexp.objectives import KTO, kto_kl_anchor, kto_loss
from riskexp.schema import ConfigError, validate

GOLDEN = json.loads((Path(__file__).parent / "golden" / "stepwise_safety.json").read_text())
TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "riskexp" / "assets" / "smollm2_tokenizer"

# rsa.md §5: SACPO-KTO step 2 (beta/lambda = 0.025, reference pi_r, policy pi_theta, z0 = 0, w_d = 1, w_u = 3);
# the JSON has no KTO key. Safe completions in (pair, response) order, then the unsafe one.
SAFE_LOSSES = [0.496947, 0.502691, 0.498713]
UNSAFE_LOSSES = [1.489650]
MEAN_LOSS = 0.747000
# rsa.md §5, intermediate values of step 2: [pair 0, pair 1] log-ratios of the safer (response 1) and the less
# safe (response 0) response
SAFER_LOGRATIOS, LESS_SAFE_LOGRATIOS = [0.488505, 0.205937], [-0.551998, -0.430522]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def golden_logratios(dtype):
    """Step-2 log-ratios of the 4 completions in (pair, response) order, by riskexp's log-prob code, and labels.

    The JSON's logits at position t predict token t (no prompt); `sequence_stats` predicts labels[:, t + 1] from
    position t, so the labels get a leading -100 and the logits a trailing (unused) position."""
    tokens = torch.tensor(GOLDEN["tokens"]).reshape(4, 3)
    policy = torch.tensor(GOLDEN["pi_theta_logits"], dtype=dtype).reshape(4, 3, 4).requires_grad_()
    reference = torch.tensor(GOLDEN["pi_r_logits"], dtype=dtype).reshape(4, 3, 4)
    pad = torch.zeros(4, 1, 4, dtype=dtype)
    labels = torch.cat([torch.full((4, 1), IGNORE_INDEX), tokens], dim=1)
    stats = sequence_stats(torch.cat([policy, pad], 1), labels, torch.cat([reference, pad], 1))
    desirable = torch.tensor(GOLDEN["is_response_safe"]).reshape(4)
    return policy, stats.logratios, desirable


def beta_step2():
    return GOLDEN["beta"] / GOLDEN["lambda"]


# ------------------------------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-6), (torch.float32, 1e-4)])
def test_kto_golden(dtype, tolerance):
    _, logratios, desirable = golden_logratios(dtype)
    assert desirable.tolist() == [False, True, True, True]
    # the log-ratios are rsa.md's step-2 values: response 1 is the safer one of both pairs
    expected = torch.tensor([LESS_SAFE_LOGRATIOS[0], SAFER_LOGRATIOS[0], LESS_SAFE_LOGRATIOS[1], SAFER_LOGRATIOS[1]],
                            dtype=torch.float64)
    assert torch.allclose(logratios.detach().double(), expected, atol=tolerance, rtol=0)

    z0 = torch.zeros((), dtype=dtype)
    losses = kto_loss(logratios, desirable, z0, beta_step2(), desirable_weight=1.0, undesirable_weight=3.0)
    assert losses.dtype == dtype and losses.shape == (4,)
    close = dict(atol=tolerance, rtol=0)
    assert torch.allclose(losses[desirable].double(), torch.tensor(SAFE_LOSSES, dtype=torch.float64), **close)
    assert torch.allclose(losses[~desirable].double(), torch.tensor(UNSAFE_LOSSES, dtype=torch.float64), **close)
    assert losses.mean().item() == pytest.approx(MEAN_LOSS, abs=tolerance)

    # the objective with SACPO's auto weight: 3 safe / 1 unsafe -> w_u = 3
    objective = KTO(beta_step2(), desirable_weight=1.0, undesirable_weight="auto")
    objective.set_label_counts(int(desirable.sum()), int((~desirable).sum()))
    assert objective.undesirable_weight == 3.0
    out = objective(logratios, desirable, z0)
    assert torch.allclose(out.losses, losses, atol=0, rtol=0)
    assert torch.allclose(out.rewards, beta_step2() * logratios.detach())
    assert out.margins.tolist() == pytest.approx(torch.where(desirable, logratios, -logratios).tolist())


def test_kto_loss_by_hand():
    rho = torch.tensor([0.3, -0.2, 1.0, 0.5], dtype=torch.float64)
    desirable = torch.tensor([True, False, True, False])
    z0, beta = torch.tensor(0.4, dtype=torch.float64), 0.5
    losses = kto_loss(rho, desirable, z0, beta, desirable_weight=2.0, undesirable_weight=0.5)
    sigma = torch.sigmoid
    expected = [2.0 * (1 - sigma(beta * (rho[0] - z0))), 0.5 * (1 - sigma(beta * (z0 - rho[1]))),
                2.0 * (1 - sigma(beta * (rho[2] - z0))), 0.5 * (1 - sigma(beta * (z0 - rho[3])))]
    assert losses.tolist() == pytest.approx(torch.stack(expected).tolist(), abs=1e-12)


def test_weights_scale_only_their_own_completions():
    rho = torch.tensor([0.3, -0.2, 1.0, 0.5])
    desirable = torch.tensor([True, False, True, False])
    z0 = torch.tensor(0.1)
    base = kto_loss(rho, desirable, z0, 0.1)
    heavy_d = kto_loss(rho, desirable, z0, 0.1, desirable_weight=3.0)
    heavy_u = kto_loss(rho, desirable, z0, 0.1, undesirable_weight=2.0)
    assert torch.allclose(heavy_d[desirable], 3 * base[desirable]) and torch.equal(heavy_d[~desirable], base[~desirable])
    assert torch.allclose(heavy_u[~desirable], 2 * base[~desirable]) and torch.equal(heavy_u[desirable], base[desirable])
    assert torch.equal(kto_loss(rho, desirable, z0, 0.1, undesirable_weight=0.0)[~desirable], torch.zeros(2))


def test_auto_weight_is_resolved_from_label_counts_and_refused_before():
    objective = KTO(0.1, undesirable_weight="auto")
    assert objective.needs_label_counts and objective.undesirable_weight is None
    with pytest.raises(RuntimeError, match="set_label_counts"):
        objective(torch.zeros(2), torch.tensor([True, False]), torch.tensor(0.0))
    objective.set_label_counts(6, 4)
    assert objective.undesirable_weight == 1.5
    with pytest.raises(ValueError, match="42 desirable and 0 undesirable"):
        KTO(0.1, undesirable_weight="auto").set_label_counts(42, 0)
    fixed = KTO(0.1, undesirable_weight=2.0)
    fixed.set_label_counts(6, 4)  # a numeric weight stays what it is
    assert not fixed.needs_label_counts and fixed.undesirable_weight == 2.0


@pytest.mark.parametrize("kwargs, key", [
    ({"beta": 0.0}, "beta=0.0"), ({"beta": -1.0}, "beta=-1.0"),
    ({"beta": 0.1, "desirable_weight": -1.0}, "algo.desirable_weight=-1.0"),
    ({"beta": 0.1, "undesirable_weight": -0.5}, "algo.undesirable_weight=-0.5"),
    ({"beta": 0.1, "undesirable_weight": "half"}, "algo.undesirable_weight='half'"),
    ({"beta": 0.1, "desirable_weight": 0.0, "undesirable_weight": 0.0}, "both 0"),
])
def test_objective_arguments_are_checked(kwargs, key):
    with pytest.raises(ValueError) as error:
        KTO(**kwargs)
    assert key in str(error.value)


# ------------------------------------------------------------------------------------------------ the anchor


def test_kl_anchor_is_detached_and_gives_the_gradients_of_a_constant():
    policy, logratios, desirable = golden_logratios(torch.float64)
    # a z0 that depends on the policy: the golden rows read as mismatched ones, shifted up to be positive
    z0 = kto_kl_anchor(logratios + 1.0)
    assert not z0.requires_grad
    (grad_computed,) = torch.autograd.grad(kto_loss(logratios, desirable, z0, 0.5, 1.0, 3.0).mean(), policy,
                                           retain_graph=True)
    constant = torch.tensor(z0.item(), dtype=torch.float64)
    (grad_constant,) = torch.autograd.grad(kto_loss(logratios, desirable, constant, 0.5, 1.0, 3.0).mean(), policy,
                                           retain_graph=True)
    assert torch.equal(grad_computed, grad_constant)
    # the pure loss detaches z0 itself: a z0 carrying a graph receives no gradient
    z0_graph = (logratios + 1.0).mean()
    leaf = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    loss = kto_loss(logratios, desirable, z0_graph * leaf, 0.5).mean()
    (grad_leaf,) = torch.autograd.grad(loss, leaf, allow_unused=True)
    assert grad_leaf is None


def test_kl_anchor_is_the_clamped_mean_over_rows_and_ranks():
    assert kto_kl_anchor(torch.tensor([-1.0, -2.0])).item() == 0.0
    assert kto_kl_anchor(torch.tensor([0.5, 1.5])).item() == pytest.approx(1.0)
    assert kto_kl_anchor(torch.tensor([-3.0, 4.0])).item() == pytest.approx(0.5)  # rows' mean first, then clamp
    # ranks' means averaged before the clamp (TRL: gather(kl).mean().clamp(min=0)): -1 here, 3 on another rank
    other_rank = torch.tensor(3.0)
    assert kto_kl_anchor(torch.tensor([-1.0, -1.0]), lambda z: torch.stack([z, other_rank])).item() == 1.0
    assert kto_kl_anchor(torch.tensor([-1.0]), lambda z: torch.stack([z, torch.tensor(-2.0)])).item() == 0.0


# --------------------------------------------------------------------------------------------- unpaired data


def test_unpair_preference_records_is_trls_unpairing():
    records = [{"prompt": "p", "chosen": "good", "rejected": "bad", "chosen_finished": False, "rejected_score": -1.0,
                "source_id": 7},
               {"prompt": "q", "completion": "as is", "label": False}]
    out = unpair_preference_records(records)
    assert out == [
        {"prompt": "p", "completion": "good", "label": True, "completion_finished": False, "source_id": 7},
        {"prompt": "p", "completion": "bad", "label": False, "completion_score": -1.0, "source_id": 7},
        {"prompt": "q", "completion": "as is", "label": False},
    ]
    assert all(is_unpaired(r) for r in out) and not is_unpaired(records[0])


def test_load_unpaired_file(tmp_path):
    path = tmp_path / "unpaired.jsonl"
    rows = [{"q": "Hi?", "a": "Hello!", "ok": True, "score": 0.5}, {"q": "Hey", "a": "Go away.", "ok": 0},
            {"q": "Bad", "a": "x", "ok": "yes"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = load_unpaired_file(str(path), prompt_key="q", completion_key="a", label_key="ok")
    assert records == [{"prompt": "Hi?", "completion": "Hello!", "label": True, "score": 0.5},
                       {"prompt": "Hey", "completion": "Go away.", "label": False}]


def test_tokenize_completion_matches_tokenize_pairs_rows(tok):
    from riskexp.data.preference import tokenize_pair

    record = {"prompt": "Review the film.", "chosen": "Lovely.", "rejected": "Awful and long " * 20}
    pair = tokenize_pair(record, tok, max_length=64, max_prompt_length=16)
    chosen = tokenize_completion({"prompt": record["prompt"], "completion": record["chosen"], "label": True}, tok,
                                 max_length=64, max_prompt_length=16)
    # alone, the short completion is not cut for its long partner's sake (TRL's KTO tokenises each on its own)
    assert pair["truncated"] and not chosen["truncated"]
    assert chosen["input_ids"] == chosen["prompt_ids"] + chosen["completion_ids"]
    assert chosen["completion_ids"] == pair["chosen_input_ids"][pair["prompt_length"]:]
    assert chosen["completion_ids"][-1] == tok.eos_token_id
    assert chosen["desirable"] is True
    assert chosen["labels"] == [IGNORE_INDEX] * len(chosen["prompt_ids"]) + chosen["completion_ids"]
    rejected = tokenize_completion({"prompt": record["prompt"], "completion": record["rejected"], "label": False}, tok,
                                   max_length=64, max_prompt_length=16)
    assert rejected["truncated"] and len(rejected["input_ids"]) == 64
    assert rejected["input_ids"] == pair["rejected_input_ids"]


def features(tok, prompts, completions, **lengths):
    lengths = {"max_length": 40, "max_prompt_length": 16} | lengths
    return [{**tokenize_completion({"prompt": p, "completion": c, "label": i % 2 == 0}, tok, **lengths), "index": i}
            for i, (p, c) in enumerate(zip(prompts, completions))]


def test_collate_builds_mismatched_rows(tok):
    prompts = ["A first, longer prompt " * 6, "Second prompt here.", "Third.", "Fourth prompt."]
    completions = ["one", "two two", "three", "a long completion " * 12]
    feats = features(tok, prompts, completions)
    batch = collate_completions(feats, pad_token_id=tok.pad_token_id, max_length=40, max_prompt_length=16)
    n = len(feats)
    assert batch["input_ids"].shape[0] == batch["kl_input_ids"].shape[0] == n
    assert batch["kl_input_ids"].shape == batch["kl_attention_mask"].shape == batch["kl_labels"].shape
    assert batch["kl_input_ids"].shape[1] <= 40
    assert batch["desirable"].dtype == torch.bool and batch["desirable"].tolist() == [True, False, True, False]
    assert batch["index"].tolist() == list(range(n))
    # TRL's offset: row i takes the completion of row i - 1 (the first row the last one's); never its own
    source = batch["kl_source"].tolist()
    assert source == [3, 0, 1, 2]
    for i, f in enumerate(feats):
        length = int(batch["attention_mask"][i].sum())
        assert batch["input_ids"][i, :length].tolist() == f["input_ids"]
        assert batch["labels"][i, :length].tolist() == f["labels"]
    for i, j in enumerate(source):
        assert j != i
        length = int(batch["kl_attention_mask"][i].sum())
        ids, labels = batch["kl_input_ids"][i, :length].tolist(), batch["kl_labels"][i, :length].tolist()
        n_prompt = labels.count(IGNORE_INDEX)
        assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt and IGNORE_INDEX not in labels[n_prompt:]
        assert (batch["kl_labels"][i, length:] == IGNORE_INDEX).all()
        assert labels[n_prompt:] == ids[n_prompt:]
        # prompt i with row j's completion, cut as tokenize_pair cuts a too long row: the prompt to its last
        # max_prompt_length tokens (keep_end), then the completion to max_length - max_prompt_length
        prompt, completion = feats[i]["prompt_ids"], feats[j]["completion_ids"]
        cut_prompt = prompt[-16:] if len(prompt) + len(completion) > 40 else prompt
        cut_completion = completion[:40 - 16] if len(cut_prompt) + len(completion) > 40 else completion
        assert ids == cut_prompt + cut_completion
    # the long prompt with the long completion (row 0 takes row 3's): both cut, to max_length
    assert len(feats[0]["prompt_ids"]) > 16 and len(feats[3]["completion_ids"]) > 24
    assert int(batch["kl_attention_mask"][0].sum()) == 40


def test_mismatched_rows_avoid_a_completion_of_their_own_prompt(tok):
    # a preference pair unpaired gives two completions of one prompt side by side: offset 1 would pair them
    prompts = ["p0", "p0", "p1", "p1", "p2", "p2"]
    feats = features(tok, prompts, [f"c{i}" for i in range(6)])
    assert mismatch_shift([f["prompt_ids"] for f in feats]) == 2
    batch = collate_completions(feats, pad_token_id=tok.pad_token_id, max_length=40, max_prompt_length=16)
    source = batch["kl_source"].tolist()
    assert sorted(source) == list(range(6)), "the mismatched completions are the batch's own, permuted"
    assert all(prompts[i] != prompts[j] for i, j in enumerate(source))
    # one prompt only: another of its completions (the fewest clashes possible), never the row's own
    assert mismatch_shift([[1], [1], [1]]) == 1 and mismatch_shift([[1], [2]]) == 1
    assert mismatch_shift([[1]]) == 0  # a batch of one has only its own completion


def unpaired_records(n_prompts=8, desirable_per_prompt=3):
    return [{"prompt": f"Prompt number {p}.", "completion": f"Answer {k} to {p}.", "label": k < desirable_per_prompt}
            for p in range(n_prompts) for k in range(desirable_per_prompt + 1)]


def test_datamodule_unpairs_preference_data_with_dpos_split(tok):
    common = dict(tokenizer=tok, source=functools.partial(load_preference_file, FIXTURE_PREFERENCES),
                  max_length=48, max_prompt_length=24, batch_size=4, eval_batch_size=6, val_fraction=0.25, seed=3)
    paired, unpaired = PreferenceDataModule(**common), PreferenceDataModule(**common, unpaired=True)
    paired.setup(), unpaired.setup()
    n_train = len(paired.train_features)
    assert len(unpaired.train_features) == 2 * n_train
    assert len(unpaired.val_features) == 2 * len(paired.val_features)
    # the same held-out prompts as DPO's split, each with its chosen (desirable) then rejected completion
    assert [r["prompt"] for r in unpaired.val_records][::2] == [r["prompt"] for r in paired.val_records]
    assert [r["label"] for r in unpaired.val_records[:4]] == [True, False, True, False]
    assert unpaired.label_counts() == (n_train, n_train)
    batch = next(iter(unpaired.train_dataloader()))
    assert {"input_ids", "attention_mask", "labels", "kl_input_ids", "kl_attention_mask", "kl_labels", "kl_source",
            "desirable", "index"} <= batch.keys() and batch["input_ids"].shape[0] == 4
    # resumable like the paired loader: the data module's state carries the loader progress
    assert unpaired.state_dict() == {"train_loader": {"epoch": 0, "batches_done": 0}}
    limited = PreferenceDataModule(**(common | {"limit": 5}), unpaired=True)
    limited.setup()
    assert len(limited.train_features) == 10, "limit counts source records: 5 pairs, 10 completions"
    with pytest.raises(RuntimeError, match="unpaired"):
        unpaired.attach_reference_logps("train", {})


def test_datamodule_holds_out_a_prompts_completions_together(tok):
    dm = PreferenceDataModule(tok, unpaired_records(), max_length=48, max_prompt_length=24, batch_size=2,
                              val_fraction=0.25, unpaired=True)
    dm.setup()
    train_prompts, val_prompts = {r["prompt"] for r in dm.train_records}, {r["prompt"] for r in dm.val_records}
    assert len(val_prompts) == 2 and not train_prompts & val_prompts
    assert dm.label_counts() == (18, 6)


def test_datamodule_unpaired_records_and_batch_sizes_are_checked(tok):
    with pytest.raises(ValueError, match="data.unpaired=true"):
        PreferenceDataModule(tok, unpaired_records(), max_length=48, max_prompt_length=24).setup()
    with pytest.raises(ValueError, match="batch_size=1 with unpaired data"):
        PreferenceDataModule(tok, unpaired_records(), max_length=48, max_prompt_length=24, batch_size=1, unpaired=True)
    with pytest.raises(ValueError, match="label true or false"):
        PreferenceDataModule(tok, [{"prompt": "p", "completion": "c", "label": "yes"}] * 4, max_length=48,
                             max_prompt_length=24, unpaired=True).setup()


def test_datamodule_reads_chat_message_prompts(tok):
    records = [{"prompt": [{"role": "user", "content": f"Question {i}?"}], "chosen": "Yes.", "rejected": "No."}
               for i in range(8)]
    dm = PreferenceDataModule(tok, records, max_length=64, max_prompt_length=32, batch_size=2, unpaired=True)
    dm.setup()
    feature = dm.train_features[0]
    assert feature["input_ids"][:feature["prompt_length"]] == feature["prompt_ids"]
    assert tok.decode(feature["input_ids"][feature["prompt_length"]:]).startswith("Yes.")


# --------------------------------------------------------------------------------------- module and training


def tiny_parts(cfg):
    from riskexp.models import build_policy_and_reference

    loader = instantiate(cfg.model.loader, _partial_=True)
    policy, reference, tokenizer = build_policy_and_reference(loader)
    module = instantiate(cfg.algo.module)(policy=policy, reference=reference,
                                          objective=instantiate(cfg.algo.objective), risk=instantiate(cfg.risk),
                                          optimizer=instantiate(cfg.optimizer), scheduler=instantiate(cfg.scheduler))
    return module, tokenizer


def test_module_gradients_do_not_flow_through_the_anchor(smoke_cfg):
    cfg = smoke_cfg("algo=kto", "algo.undesirable_weight=1.0")
    module, tokenizer = tiny_parts(cfg)
    from riskexp.run import datamodule_config

    datamodule = instantiate(datamodule_config(cfg), tokenizer=tokenizer)
    batch = next(iter(datamodule.val_dataloader()))

    def grads(z0):
        module.policy.zero_grad()
        logratios, _ = module._logratios(batch)
        module.objective(logratios, batch["desirable"], z0).losses.mean().backward()
        return [p.grad.clone() for p in module.policy.parameters() if p.grad is not None]

    z0 = module.kl_anchor(batch)
    assert not z0.requires_grad and z0.item() >= 0
    computed, constant = grads(z0), grads(torch.tensor(z0.item()))
    assert computed and all(torch.equal(a, b) for a, b in zip(computed, constant))


def test_auto_weight_reaches_the_objective_at_setup(smoke_cfg):
    import lightning as L

    cfg = smoke_cfg("algo=kto")
    assert cfg.algo.undesirable_weight == "auto"
    module, tokenizer = tiny_parts(cfg)
    datamodule = PreferenceDataModule(tokenizer, unpaired_records(), max_length=48, max_prompt_length=24,
                                      batch_size=2, eval_batch_size=4, val_fraction=0.25, unpaired=True)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=1)
    metrics = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    assert module.objective.undesirable_weight == 3.0  # 18 desirable / 6 undesirable training completions
    for key in ("val/loss", "val/kl_anchor", "val/label_accuracy", "val/reward_desirable", "val/logp_desirable",
                "val/margin_risk"):
        assert key in metrics, key


def test_training_resumes_to_the_losses_of_an_uninterrupted_run(smoke_cfg, tmp_path):
    import lightning as L

    from riskexp.resume import Checkpointing
    from riskexp.run import datamodule_config

    cfg = smoke_cfg("algo=kto")

    class Record(L.Callback):
        def __init__(self, stop_at=None):
            self.losses, self.stop_at = {}, stop_at

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses[trainer.global_step] = outputs["loss"].item()
            if trainer.global_step == self.stop_at:
                raise RuntimeError("interrupted")

    def fit(run_dir, record, ckpt_path=None, every=0):
        L.seed_everything(0)
        module, tokenizer = tiny_parts(cfg)
        datamodule = instantiate(datamodule_config(cfg), tokenizer=tokenizer)
        trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                            num_sanity_val_steps=0, callbacks=[Checkpointing(run_dir, every), record])
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)

    whole = Record()
    fit(tmp_path / "whole", whole)
    first = Record(stop_at=2)
    with pytest.raises(RuntimeError, match="interrupted"):
        fit(tmp_path / "cut", first, every=2)
    resumed = Record()
    fit(tmp_path / "resumed", resumed, ckpt_path=tmp_path / "cut" / "checkpoints" / "last.ckpt")
    assert list(resumed.losses) == [3, 4]
    for step in (1, 2):
        assert first.losses[step] == pytest.approx(whole.losses[step], abs=1e-6)
    for step in (3, 4):
        assert resumed.losses[step] == pytest.approx(whole.losses[step], abs=1e-6)


def parameters(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_kto_trains_through_run_and_writes_results(smoke_cfg, tmp_path):
    from riskexp.knobs import inert_knobs
    from riskexp.models import from_pretrained
    from riskexp.run import run

    inert_dpo = inert_knobs(compose_config(["experiment=smoke", "algo=dpo", "logger=none"]))
    cfg = smoke_cfg("algo=kto", "trainer.max_steps=2", "data.max_length=32", "data.max_prompt_length=16",
                    "save_policy=true")
    held_out_pairs = max(1, round(cfg.data.val_fraction * len(instantiate(cfg.data.source)())))
    results = run(cfg)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["train/loss"] == pytest.approx(results["train/loss"])
    assert saved["algo"] == "kto" and saved["steps"] == 2 and saved["data"] == "fixture"
    for key in ("train/loss", "train/kl_anchor", "train/label_accuracy", "val/loss", "val/kl_anchor",
                "val/label_accuracy", "val/reward_desirable", "val/reward_undesirable", "val/logp_desirable",
                "val/logp_undesirable", "val/margin_risk", "eval/reward_mean"):
        assert key in saved, key
    assert saved["train/undesirable_weight"] == 1.0, "auto on the fixture's unpaired pairs: as many of each"
    assert saved["val/kl_anchor"] >= 0 and 0 <= saved["val/label_accuracy"] <= 1
    assert saved["val_pairs"] == 2 * held_out_pairs  # the held-out pairs' completions
    # KTO reads beta but neither alpha nor the risk measure: the same inert knobs as DPO
    assert "alpha" in saved["inert"] and "risk" in saved["inert"] and "beta" not in saved["inert"]
    assert saved["inert"] == inert_dpo
    trained, _ = from_pretrained(str(tmp_path / "policy"))
    initial, _ = instantiate(cfg.model.loader)
    before = parameters(initial)
    for name, value in parameters(trained).items():
        assert not torch.equal(value, before[name]), f"{name} did not change"


# -------------------------------------------------------------------------------------------------- config


def test_kto_composes_with_every_preference_data_option():
    for data in ("fixture", "sentiment", "toxicity", "hh_rlhf", "local"):
        cfg = compose_config(["algo=kto", f"data={data}", "model=tiny"])
        assert cfg.data.unpaired is True and cfg.data._target_ == "riskexp.data.PreferenceDataModule"
        assert cfg.algo.name == "kto" and cfg.algo.module._target_ == "riskexp.modules.KTOModule"
    validate(compose_config(["algo=kto", "experiment=smoke"]))
    validate(compose_config(["algo=kto", "experiment=smoke", "algo.undesirable_weight=2.5"]))


@pytest.mark.parametrize("overrides, message", [
    (["beta=0"], "beta=0.0 is not accepted: the KL temperature must be > 0"),
    (["beta=-1"], "beta=-1.0 is not accepted"),
    (["algo.desirable_weight=-1"], "algo.desirable_weight=-1.0 is not accepted: a weight >= 0"),
    (["algo.undesirable_weight=-0.5"], "algo.undesirable_weight=-0.5 is not accepted: a weight >= 0, or auto"),
    (["algo.undesirable_weight=lots"], "algo.undesirable_weight='lots' is not accepted"),
    (["data.unpaired=false"], "data.unpaired=False is not accepted: true with algo=kto"),
    (["data.batch_size=1"], "data.batch_size=1 is not accepted: must be >= 2 with algo=kto"),
    (["+algo.label_smoothing=0.1"], "algo.label_smoothing is not a key of algo=kto (riskexp.schema.KTOConfig)"),
])
def test_bad_kto_values_fail_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as error:
        validate(compose_config(["algo=kto", "experiment=smoke", *overrides], output_dir=None))
    assert message in str(error.value)


def test_pair_algorithms_refuse_unpaired_data():
    with pytest.raises(ConfigError, match="data.unpaired=True is not accepted: false with algo=dpo"):
        validate(compose_config(["algo=dpo", "experiment=smoke", "+data.unpaired=true"]))
