"""Lightning modules: one per algorithm family.

`PolicyModule` holds what every family shares: a trainable policy, an optional frozen reference that is
never optimised, never checkpointed and always in eval mode, and the optimizer/schedule wiring.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn

from riskexp.logps import SequenceStats, sequence_stats
from riskexp.models import hidden_and_head
from riskexp.objectives import implicit_reward_accuracy, kto_kl_anchor
from riskexp.risk import Mean, RiskMeasure

REFERENCE_PREFIX = "reference."


def disable_dropout(model: nn.Module) -> None:
    # the DPO/TDPO reference code trains without dropout: it would make the policy/reference ratio noisy
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


# Learning-rate schedules (conf/scheduler/*.yaml), counted in optimizer steps: transformers' schedules, their
# warm-up `warmup_steps` long (the reference code's 150) but at most `max_warmup_fraction` of the run, so a short
# run still reaches its peak learning rate. Hydra partially applies all but (optimizer, total_steps).


def warmup_length(total_steps: int, warmup_steps: int, max_warmup_fraction: float) -> int:
    return min(warmup_steps, int(max_warmup_fraction * total_steps))


def warmup_constant(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 150,
                    max_warmup_fraction: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then constant (DPO and TDPO reference code)."""
    from transformers import get_constant_schedule_with_warmup

    return get_constant_schedule_with_warmup(optimizer, warmup_length(total_steps, warmup_steps, max_warmup_fraction))


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 150,
                  max_warmup_fraction: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay to 0 at `total_steps` (Ra-DPO reference code)."""
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(
        optimizer, warmup_length(total_steps, warmup_steps, max_warmup_fraction), total_steps
    )


class PolicyModule(L.LightningModule):
    def __init__(self, policy: nn.Module, reference: nn.Module | None, optimizer: Callable, scheduler: Callable | None):
        super().__init__()
        self.policy = policy
        self.reference = reference
        disable_dropout(policy)
        if reference is not None:
            disable_dropout(reference)
            reference.requires_grad_(False).eval()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        # checkpoints hold the policy only; loading one must not demand reference weights
        self.strict_loading = False
        self.validated_at_step: int | None = None

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        return type(state)((k, v) for k, v in state.items() if not k.startswith(REFERENCE_PREFIX))

    def on_validation_epoch_end(self) -> None:
        # lets the run skip a final validation pass when the last one already saw the final weights
        if not self.trainer.sanity_checking:
            self.validated_at_step = self.global_step

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # loading is not strict because the reference is left out; the policy's weights must all be there
        missing = [k for k in self.state_dict() if k not in checkpoint["state_dict"]]
        if missing:
            raise KeyError(f"the checkpoint lacks {len(missing)} policy weights, e.g. {missing[:3]}")

    def train(self, mode: bool = True):
        # Lightning calls .train() on the whole module at every epoch start; the reference stays in eval
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()
        return self

    def export(self, out: Path, tokenizer) -> Path:
        """`out/policy`: the trained policy and its tokenizer, the next run's `model.path`."""
        directory = out / "policy"
        self.policy.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        return directory

    def configure_optimizers(self):
        optimizer = self.optimizer_factory([p for p in self.policy.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, total_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class PreferenceModule(PolicyModule):
    """DPO, IPO, TDPO1/2, Ra-DPO1/2 (and the stepwise methods built from them) with automatic optimisation.

    Batches are the concatenated rows [chosen..., rejected...] of `riskexp.data.collate_pairs`; the policy
    runs once over them, the reference once under no_grad (or not at all when a sequence-level objective
    uses precomputed reference log-probs).
    """

    def __init__(
        self,
        policy: nn.Module,
        reference: nn.Module,
        objective,
        optimizer: Callable,
        scheduler: Callable | None = None,
        risk: RiskMeasure | None = None,
        chunk_size: int = 64,
        precompute_ref_logps: bool = False,
    ):
        super().__init__(policy, reference, optimizer, scheduler)
        if reference is None:
            raise ValueError("preference objectives need a reference model")
        self.objective = objective
        self.risk = risk if risk is not None else Mean()  # the across-samples role: tail of validation margins
        self.chunk_size = chunk_size
        self.precompute_ref_logps = precompute_ref_logps and not objective.uses_vocab_terms
        self._val_margins: list[Tensor] = []

    def sequence_stats(self, batch: dict[str, Tensor], vocab_terms: bool) -> SequenceStats:
        policy_hidden, policy_head = hidden_and_head(self.policy, batch)
        ref_logps = None if vocab_terms else batch.get("ref_logps")
        ref_hidden = ref_head = None
        if ref_logps is None:
            with torch.no_grad():
                ref_hidden, ref_head = hidden_and_head(self.reference, batch)
        return sequence_stats(
            policy_hidden,
            batch["labels"],
            ref_hidden,
            policy_head=policy_head,
            ref_head=ref_head,
            vocab_terms=vocab_terms,
            vocab_risk=self.objective.vocab_risk if vocab_terms else None,
            ref_logps=ref_logps,
            chunk_size=self.chunk_size,
        )

    def _step(self, batch: dict[str, Tensor], stage: str, vocab_terms: bool) -> tuple[Tensor, Tensor]:
        stats = self.sequence_stats(batch, vocab_terms)
        out = self.objective(stats)
        loss = out.losses.mean()
        half = out.losses.shape[0]
        logratios = stats.logratios.detach()
        metrics = {
            "reward_chosen": out.chosen_rewards.mean(),
            "reward_rejected": out.rejected_rewards.mean(),
            "reward_margin": (out.chosen_rewards - out.rejected_rewards).mean(),
            "reward_accuracy": (out.chosen_rewards > out.rejected_rewards).float().mean(),
            "implicit_accuracy": implicit_reward_accuracy(logratios[:half], logratios[half:]),
            "logp_chosen": stats.policy_logps[:half].detach().mean(),
            "logp_rejected": stats.policy_logps[half:].detach().mean(),
        }
        if stats.seq_kl is not None:
            metrics |= {"kl_chosen": stats.seq_kl[:half].mean(), "kl_rejected": stats.seq_kl[half:].mean()}
        if stats.seq_kl is not None and self.objective.vocab_risk is not None:
            metrics |= {"risk_ratio_chosen": stats.seq_risk[:half].mean(),
                        "risk_ratio_rejected": stats.seq_risk[half:].mean()}
        self.log_dict({f"{stage}/{k}": v.detach().float() for k, v in metrics.items()},
                      prog_bar=False, batch_size=half, sync_dist=stage != "train")
        self.log(f"{stage}/loss", loss.detach(), prog_bar=True, batch_size=half, sync_dist=stage != "train")
        return loss, logratios[:half] - logratios[half:]

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, _ = self._step(batch, "train", vocab_terms=self.objective.uses_vocab_terms)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        # the sequential KL is computed for every method in validation, so curves are comparable
        _, margins = self._step(batch, "val", vocab_terms=True)
        self._val_margins.append(margins.float())

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if not self._val_margins:
            return
        # the tail over the *whole* validation set (gathered across ranks), never an average of batch tails
        margins = self.all_gather(torch.cat(self._val_margins)).flatten()
        self._val_margins.clear()
        self.log("val/margin_risk", self.risk.lower_tail(margins), sync_dist=False, rank_zero_only=True)

    def on_fit_start(self) -> None:
        if self.precompute_ref_logps:
            self.attach_reference_logps(self.trainer.datamodule)

    @torch.no_grad()
    def attach_reference_logps(self, datamodule) -> None:
        """Reference sequence log-probs, computed once per fit and reused every epoch (DPO, IPO).

        They are computed under the trainer's precision context of a training step (autocast for `bf16-mixed`),
        so with the policy equal to the reference every log-ratio is 0 and the DPO loss log 2, as with the
        reference run live in the step."""
        # a module used without a trainer (tests, notebooks) computes in its own dtype
        step_context = self._trainer.precision_plugin.train_step_context if self._trainer else contextlib.nullcontext
        for split, features in (("train", datamodule.train_features), ("val", datamodule.val_features)):
            values = {}
            for batch in datamodule.loader(features, datamodule.eval_batch_size, shuffle=False):
                batch = {k: v.to(self.device) for k, v in batch.items()}
                with step_context():
                    hidden, head = hidden_and_head(self.reference, batch)
                    stats = sequence_stats(hidden, batch["labels"], policy_head=head, chunk_size=self.chunk_size)
                ref_logps = stats.policy_logps
                half = ref_logps.shape[0] // 2
                for i, index in enumerate(batch["index"].tolist()):
                    values[index] = (ref_logps[i].item(), ref_logps[half + i].item())
            datamodule.attach_reference_logps(split, values)


class KTOModule(PolicyModule):
    """KTO (`riskexp.objectives.KTO`) on unpaired batches (`riskexp.data.collate_completions`, `data.unpaired`),
    with automatic optimisation, as TRL's `KTOTrainer` runs it (SACPO's safety step).

    Each step runs the policy with gradients and the reference under no_grad on the N real rows, and both under
    no_grad on the N mismatched rows (prompt_i, another row's completion), whose mean log-ratio, averaged over
    ranks and clamped at 0, is the KL anchor z0 (`kto_kl_anchor`). The loss is the mean of the N
    per-completion losses. `undesirable_weight=auto` is resolved in `setup` from the data module's
    `label_counts()` (the training split), before the first step and again, identically, on a resume.
    `risk` (the across-samples role) gives `val/margin_risk`, the lower tail of the validation margins
    rho - z0 (desirable) and z0 - rho (undesirable).
    """

    def __init__(
        self,
        policy: nn.Module,
        reference: nn.Module,
        objective,
        optimizer: Callable,
        scheduler: Callable | None = None,
        risk: RiskMeasure | None = None,
        chunk_size: int = 64,
    ):
        super().__init__(policy, reference, optimizer, scheduler)
        if reference is None:
            raise ValueError("KTO needs a reference model")
        self.objective = objective
        self.risk = risk if risk is not None else Mean()
        self.chunk_size = chunk_size
        self._val_margins: list[Tensor] = []

    def setup(self, stage: str) -> None:
        if not self.objective.needs_label_counts:
            return
        datamodule = self.trainer.datamodule
        if datamodule is None or not getattr(datamodule, "unpaired", False):
            raise ValueError("algo.undesirable_weight=auto counts the training split's labels: it needs an "
                             "unpaired data module (data.unpaired=true)")
        self.objective.set_label_counts(*datamodule.label_counts())

    def _logratios(self, batch: dict[str, Tensor], prefix: str = "") -> tuple[Tensor, SequenceStats]:
        rows = {"input_ids": batch[f"{prefix}input_ids"], "attention_mask": batch[f"{prefix}attention_mask"]}
        policy_hidden, policy_head = hidden_and_head(self.policy, rows)
        with torch.no_grad():
            ref_hidden, ref_head = hidden_and_head(self.reference, rows)
        stats = sequence_stats(policy_hidden, batch[f"{prefix}labels"], ref_hidden, policy_head=policy_head,
                               ref_head=ref_head, chunk_size=self.chunk_size)
        return stats.logratios, stats

    def _gather(self, value: Tensor) -> Tensor:
        # every rank's z0 (TRL: accelerator.gather); one process has only its own
        if self._trainer is None or self.trainer.world_size == 1:
            return value
        return self.all_gather(value)

    def kl_anchor(self, batch: dict[str, Tensor]) -> Tensor:
        """z0 from the batch's mismatched rows, under no_grad (TRL computes them so): ()."""
        with torch.no_grad():
            kl_logratios, _ = self._logratios(batch, prefix="kl_")
        return kto_kl_anchor(kl_logratios, self._gather)

    def _step(self, batch: dict[str, Tensor], stage: str) -> tuple[Tensor, Tensor]:
        z0 = self.kl_anchor(batch)
        logratios, stats = self._logratios(batch)
        desirable = batch["desirable"]
        out = self.objective(logratios, desirable, z0)
        loss = out.losses.mean()
        n = desirable.shape[0]
        sync = stage != "train"
        metrics = {"kl_anchor": (z0, n), "label_accuracy": ((out.margins > 0).float().mean(), n)}
        if stage == "train":
            # the resolved weight (auto: n_desirable / n_undesirable) reaches results.json as train/undesirable_weight
            metrics["undesirable_weight"] = (z0.new_tensor(float(self.objective.undesirable_weight)), n)
        policy_logps = stats.policy_logps.detach()
        for name, rows in (("desirable", desirable), ("undesirable", ~desirable)):
            count = int(rows.sum())
            if count:  # a batch may hold one kind only: its mean is left out, not logged as nan
                metrics[f"reward_{name}"] = (out.rewards[rows].mean(), count)
                metrics[f"logp_{name}"] = (policy_logps[rows].mean(), count)
        for key, (value, count) in metrics.items():
            self.log(f"{stage}/{key}", value.detach().float(), batch_size=count, sync_dist=sync)
        self.log(f"{stage}/loss", loss.detach(), prog_bar=True, batch_size=n, sync_dist=sync)
        return loss, out.margins

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, _ = self._step(batch, "train")
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        _, margins = self._step(batch, "val")
        self._val_margins.append(margins.float())

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if not self._val_margins:
            return
        margins = self.all_gather(torch.cat(self._val_margins)).flatten()
        self._val_margins.clear()
        self.log("val/margin_risk", self.risk.lower_tail(margins), sync_dist=False, rank_zero_only=True)


class SFTModule(PolicyModule):
    """Supervised fine-tuning on the preferred responses (the chosen half of a preference batch): the step
    that builds the reference every preference paper starts from. Loss: mean NLL per response token."""

    def __init__(self, policy: nn.Module, reference: nn.Module | None, optimizer: Callable,
                 scheduler: Callable | None = None, chunk_size: int = 64):
        # `reference` is kept (frozen) only so evaluation can compare against the starting model
        super().__init__(policy, reference, optimizer, scheduler)
        self.chunk_size = chunk_size

    def _step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        half = batch["input_ids"].shape[0] // 2
        chosen = {k: batch[k][:half] for k in ("input_ids", "attention_mask", "labels")}
        hidden, head = hidden_and_head(self.policy, chosen)
        stats = sequence_stats(hidden, chosen["labels"], policy_head=head, chunk_size=self.chunk_size)
        loss = -stats.policy_logps.sum() / stats.n_tokens.sum().clamp(min=1)
        sync = stage != "train"
        self.log(f"{stage}/loss", loss.detach(), prog_bar=True, batch_size=half, sync_dist=sync)
        self.log(f"{stage}/logp_chosen", stats.policy_logps.detach().mean(), batch_size=half, sync_dist=sync)
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")
