"""PPO-RLHF and RA-RLHF as a Lightning module with manual optimisation: one prompt batch, one iteration.

Each `training_step` (RA-RLHF Algorithm 1, trl 0.7's `PPOTrainer.step`):

1. roll out the batch (`riskexp.rl.rollout`): sampled tokens, the policy's and the reference's per-token
   log-probs and the critic's values, as tensors; score prompt and response with the task's reward;
2. shaped rewards r_t = -beta (log pi - log pi_ref) + score at each row's last token, GAE and lambda-returns;
3. the risk group across the episodes (`riskexp.rl.tail.weigh_episodes`): all of them (risk=mean), the k worst
   by the ranking statistic on the soft-risk schedule (risk=cvar: RA-RLHF), or entropic weights;
4. advantages whitened once over the kept tokens; with `mini_batch_size` equal to the batch the dropped
   episodes are then removed from the tensors (the same losses, less compute);
5. `ppo_epochs` passes over shuffled minibatches: clipped policy and value losses, the ratio guard, optional
   gradient clipping, the optimizer and the schedule stepped per minibatch;
6. the KL coefficient updated from the KL statistic `kl_input` names (all three logged).

Under data parallelism every rank rolls out its share of the batch; the ranking statistic, the rows' KL and the
whitening statistics are taken over the global batch, and each minibatch's loss is the mean over the global
minibatch's tokens (each rank's gradient is scaled by its share of the tokens, then gradients are averaged), so
the kept set and the update are those of one process holding the whole batch.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from riskexp.generation import pad_token_id
from riskexp.logps import IGNORE_INDEX, pad_rows, sequence_stats, token_stats
from riskexp.models import hidden_and_head, trunk_of
from riskexp.modules import PolicyModule
from riskexp.risk import Mean, RiskMeasure
from riskexp.rl.gae import gae, masked_mean, masked_whiten, shaped_rewards
from riskexp.rl.kl_control import kl_controller
from riskexp.rl.ppo import PPOOutput, ppo_loss
from riskexp.rl.rollout import Rollout, position_ids, response_labels, rollout
from riskexp.rl.tail import (
    KL_INPUTS,
    choose_kl_input,
    kept_token_mask,
    kl_statistics,
    ranking_statistic,
    row_kl,
    weigh_episodes,
)

CRITICS = ("shared", "separate")

log = logging.getLogger(__name__)


class ValueHead(nn.Module):
    """trl's value head: Dropout(p) -> Linear(hidden, 1) on a trunk's final hidden states. (..., H) -> (...)."""

    def __init__(self, hidden_size: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.summary = nn.Linear(hidden_size, 1)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.summary(self.dropout(hidden.to(self.summary.weight.dtype))).squeeze(-1)


def critic_from_score_model(path: str, dropout: float, policy: nn.Module, tokenizer) -> tuple[nn.Module, ValueHead]:
    """(trunk, value head) of a critic started from a safe-rlhf-layout score model (`riskexp.scorers`), trainable,
    in the policy's dtype and on its device; its scores are read unnormalised (safe-rlhf's critics are
    loaded with do_normalize off). The score model must share the policy's tokenizer: it reads its ids."""
    from riskexp.scorers import load_score_model

    param = next(policy.parameters())
    model, own_tokenizer = load_score_model(path, dtype=str(param.dtype).removeprefix("torch."), device=param.device)
    if own_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"the critic's score model {path} has another vocabulary than the policy: a critic reads the "
                         "policy's token ids, so it must share its tokenizer")
    head = ValueHead(model.config.hidden_size, dropout).to(device=param.device, dtype=param.dtype)
    with torch.no_grad():
        head.summary.weight.copy_(model.head.weight)
        if model.head.bias is not None:
            head.summary.bias.copy_(model.head.bias)
        else:
            head.summary.bias.zero_()
    return model.trunk.requires_grad_(True).train(), head


@dataclass
class Targets:
    """One iteration's fixed targets (`PPOModule.targets`)."""

    batch: dict[str, Tensor]  # this rank's minibatch tensors: ids, masks (kept tokens), old logp/values, A, R
    minibatch_rows: int  # rows of this rank per minibatch
    kept: Tensor  # (B_global,) bool: the episodes kept, over the global batch
    kl_inputs: dict[str, Tensor]  # the controller's candidate KL statistics (riskexp.rl.tail.kl_statistics)
    metrics: dict  # what the iteration logs about its rollout


class PPOModule(PolicyModule):
    """PPO with a value head on the policy's trunk (`critic=shared`, trl's) or on a copy of it (`separate`).
    The frozen reference is handled as in every family (`PolicyModule`): never optimised or checkpointed, always
    in eval mode; dropout is off in the policy (trl's forward passes run it in eval mode), on in the value head."""

    def __init__(
        self,
        policy: nn.Module,
        reference: nn.Module,
        tokenizer,
        reward: Callable[[list, list[str]], Tensor],
        optimizer: Callable,
        scheduler: Callable | None = None,
        risk: RiskMeasure | None = None,
        *,
        critic: str = "shared",
        critic_init: str | None = None,
        value_head_dropout: float = 0.1,
        ppo_epochs: int = 4,
        mini_batch_size: int | None = None,
        gamma: float = 1.0,
        lam: float = 0.95,
        clip_range: float = 0.2,
        clip_range_value: float = 0.2,
        vf_coef: float = 0.1,
        ratio_threshold: float = 10.0,
        max_grad_norm: float | None = None,
        kl: dict | None = None,
        kl_input: str = "reference",
        soft_risk: dict | None = None,
        statistic: str = "mc_shaped",
        keep_ties: bool = False,
        drop_unkept: bool = True,
        whiten_advantages: bool = True,
        ptx: dict | None = None,
        sampling: dict | None = None,
        prompt_format: str = "plain",
        chunk_size: int = 64,
        seed: int = 0,
    ):
        if critic not in CRITICS:
            raise ValueError(f"algo.critic={critic!r} is unknown; accepted: {', '.join(CRITICS)}")
        if kl_input not in KL_INPUTS:
            raise ValueError(f"algo.kl_input={kl_input!r} is unknown; accepted: {', '.join(KL_INPUTS)}")
        if isinstance(ppo_epochs, bool) or not isinstance(ppo_epochs, int) or ppo_epochs < 1:
            raise ValueError(f"algo.ppo_epochs={ppo_epochs!r}: accepted are integers >= 1")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"algo.max_grad_norm={max_grad_norm!r}: accepted are values > 0, or null (no clipping)")
        super().__init__(policy, reference, optimizer, scheduler)
        self.automatic_optimization = False
        self.tokenizer, self.reward = tokenizer, reward
        if critic_init is not None:  # the critic is a score model's trunk and head, e.g. a trained reward model
            self.critic_trunk, self.value_head = critic_from_score_model(critic_init, value_head_dropout, policy,
                                                                          tokenizer)
        else:
            trunk = trunk_of(policy, "a value head")
            self.critic_trunk = copy.deepcopy(trunk) if critic == "separate" else None
            self.value_head = ValueHead(policy.config.hidden_size, value_head_dropout)
            self.value_head.to(next(policy.parameters()).dtype)
        self.risk = risk if risk is not None else Mean()
        self.ppo_epochs, self.mini_batch_size = ppo_epochs, mini_batch_size
        self.gamma, self.lam = gamma, lam
        self.loss_settings = dict(clip_range=clip_range, clip_range_value=clip_range_value, vf_coef=vf_coef,
                                  ratio_threshold=ratio_threshold)
        self.max_grad_norm = max_grad_norm
        self.kl_controller = kl_controller(**(kl or {}))
        self.kl_input = kl_input
        self.soft_risk = dict(soft_risk or {})
        self.statistic, self.keep_ties, self.drop_unkept = statistic, keep_ties, drop_unkept
        self.whiten_advantages = whiten_advantages  # trl's; safe-rlhf's PPO-Lagrangian does not
        self.ptx = {"coeff": 16.0, "batch_size": 4, "max_length": 128} | dict(ptx or {})
        self.ptx_texts = list(self.ptx.get("texts") or [])
        if self.ptx_texts and not self.ptx.get("coeff", 0) > 0:
            raise ValueError(f"algo.ptx.coeff={self.ptx.get('coeff')!r}: accepted values are > 0 with ptx texts")
        self.ptx_generator: torch.Generator | None = None  # seeded per rank at the first PTX step
        self.sampling = dict(sampling or {"max_new_tokens": 32})
        self.prompt_format, self.chunk_size, self.seed = prompt_format, chunk_size, seed
        self.iteration = 0  # iterations done, checkpointed with the controller's beta
        self.total_iterations: int | None = None
        self.rank_weight_spread: float | None = None  # set at the end of a data-parallel fit

    def run_record(self) -> dict:
        """The settings results.json records for this kind of run."""
        return {"kl_input": self.kl_input, "whiten_advantages": self.whiten_advantages,
                "ptx_texts": len(self.ptx_texts), **({"ptx_coeff": self.ptx["coeff"]} if self.ptx_texts else {})}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rl"] = {"iteration": self.iteration, "kl_controller": self.kl_controller.state_dict()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.iteration = checkpoint["rl"]["iteration"]
        self.kl_controller.load_state_dict(checkpoint["rl"]["kl_controller"])

    # --- sizes ---
    @property
    def world_size(self) -> int:
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    @property
    def rank(self) -> int:
        return dist.get_rank() if self.world_size > 1 else 0

    @property
    def iterations(self) -> int:
        """M: the iterations of the run, from the data loader and the epochs (never hard-coded); a module used
        without a trainer is given it (`total_iterations`)."""
        if self.total_iterations is not None:
            return self.total_iterations
        return max(1, int(self.trainer.estimated_stepping_batches))

    def steps_per_iteration(self, batch_size: int) -> int:
        mini = self.mini_batch_size or batch_size
        return self.ppo_epochs * math.ceil(batch_size / mini)

    def configure_optimizers(self):
        # the policy and every critic (the frozen reference has no trainable parameter)
        optimizer = self.optimizer_factory([p for p in self.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return optimizer
        batch = self.trainer.datamodule.batch_size
        total = self.iterations * self.steps_per_iteration(batch)
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer, total_steps=total)}

    # --- data parallel helpers: identities on one process ---
    def all_reduce(self, x: Tensor) -> Tensor:
        if self.world_size == 1:
            return x
        x = x.clone()
        dist.all_reduce(x)
        return x

    def gather_rows(self, x: Tensor) -> Tensor:
        """(B_local, ...) -> (B_global, ...) in rank order (every rank holds the same number of rows)."""
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def local_rows(self, x: Tensor) -> Tensor:
        b = x.shape[0] // self.world_size
        return x[self.rank * b : (self.rank + 1) * b]

    # --- the critic ---
    def critic_values(self, trunk: nn.Module | None, head: ValueHead, input_ids: Tensor, attention_mask: Tensor,
                      hidden: Tensor | None = None) -> Tensor:
        """(B, L) a critic's V at every position: `head` on the policy's hidden states (`trunk` None: the shared
        trunk; computed here when `hidden` is not given) or on the critic's own trunk."""
        if trunk is not None or hidden is None:
            trunk = trunk if trunk is not None else trunk_of(self.policy, "a value head")
            hidden = trunk(input_ids=input_ids, attention_mask=attention_mask,
                           position_ids=position_ids(attention_mask), use_cache=False).last_hidden_state
        return head(hidden).float()

    def values(self, input_ids: Tensor, attention_mask: Tensor, hidden: Tensor | None = None) -> Tensor:
        """(B, L) the reward critic's V at every position."""
        return self.critic_values(self.critic_trunk, self.value_head, input_ids, attention_mask, hidden)

    @staticmethod
    def rollout_critic(values: Callable[[Tensor, Tensor], Tensor], head: ValueHead) -> Callable[[Tensor, Tensor], Tensor]:
        """`values` as the rollout's value function: the head's dropout off while the rollout's values are taken."""

        def value_fn(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
            was = head.training
            head.eval()
            try:
                return values(input_ids, attention_mask)
            finally:
                head.train(was)

        return value_fn

    # --- one iteration ---
    def rollout(self, prompts: list) -> Rollout:
        rank = self.rank
        return rollout(self.policy, self.reference, self.tokenizer, prompts,
                       value_fn=self.rollout_critic(self.values, self.value_head),
                       seed=self.seed * 1_000_003 + rank * 7919 + self.iteration, prompt_format=self.prompt_format,
                       chunk_size=self.chunk_size, **self.sampling)

    def score_episodes(self, prompts: list, ro: Rollout) -> tuple[Tensor, dict[str, Tensor]]:
        """(B,) the task's scores of the episodes, and what else `targets` needs of them (PPO: nothing)."""
        return self.reward(prompts, ro.texts).to(ro.policy_logps), {}

    def training_step(self, prompts: list, batch_idx: int) -> None:
        ro = self.rollout(prompts)
        scores, extras = self.score_episodes(prompts, ro)
        metrics = self.ppo_step(ro, scores, **extras)
        self.log_dict({f"train/{k}": v for k, v in metrics.items()}, batch_size=len(prompts), rank_zero_only=True)
        if self.rank == 0:
            log.info("iteration %d/%d  score=%.4f  kl=%.4f  kl_coef=%.4f  kept=%d  policy_loss=%.4f  value_loss=%.4f",
                     self.iteration, self.iterations, metrics["score_mean"], metrics["kl"], metrics["kl_coef"],
                     metrics["kept"], metrics["policy_loss"], metrics["value_loss"])

    def ppo_step(self, ro: Rollout, scores: Tensor, **extras: Tensor) -> dict[str, float]:
        """One iteration on a rollout: its targets and tail, `ppo_epochs` passes of updates, the KL controller."""
        targets = self.targets(ro, scores, **extras)
        update = self.update(targets.batch, targets.minibatch_rows)
        new_beta = self.kl_controller.update(choose_kl_input(self.kl_input, targets.kl_inputs),
                                             ro.response_mask.shape[0] * self.world_size)
        self.iteration += 1
        metrics = targets.metrics | {"kl_coef_next": new_beta} | update
        return {k: float(v) for k, v in metrics.items()}

    def reward_kl_coef(self, beta: float) -> float:
        """The KL coefficient of the shaped reward (PPO: the controller's beta)."""
        return beta

    def actor_advantages(self, ro: Rollout, advantages: Tensor, kept_mask: Tensor, **extras: Tensor
                         ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """The actor's advantages from the reward's (PPO: those), with more minibatch tensors and metrics."""
        return advantages, {}, {}

    def targets(self, ro: Rollout, scores: Tensor, **extras: Tensor) -> Targets:
        """Shaped rewards, GAE, the tail over the global batch, advantages whitened over its kept tokens, the KL
        controller's inputs, and the minibatch tensors (the dropped rows removed where that changes nothing)."""
        mask = ro.response_mask
        beta = self.kl_controller.value
        rewards = shaped_rewards(ro.policy_logps, ro.ref_logps, scores, mask, self.reward_kl_coef(beta))
        advantages, returns = gae(rewards, ro.values, mask, self.gamma, self.lam)
        statistic = ranking_statistic(self.statistic, scores, mask, rewards, returns)
        everyone = self.gather_rows(statistic)
        weighting = weigh_episodes(self.risk, everyone, self.iteration, self.iterations, keep_ties=self.keep_ties,
                                   **self.soft_risk)
        kept = self.local_rows(weighting.kept)
        weights = None if weighting.weights is None else self.local_rows(weighting.weights)
        kept_mask = kept_token_mask(mask, kept)
        advantages, more_batch, more_metrics = self.actor_advantages(ro, advantages, kept_mask, **extras)
        if self.whiten_advantages:
            advantages = masked_whiten(advantages, kept_mask, all_reduce=self.all_reduce)
        kl_inputs = kl_statistics(self.gather_rows(row_kl(ro.policy_logps, ro.ref_logps, mask)), weighting.kept)
        batch = {"input_ids": ro.input_ids, "attention_mask": ro.attention_mask, "mask": kept_mask,
                 "old_logp": ro.policy_logps, "old_values": ro.values, "advantages": advantages, "returns": returns,
                 **({"weights": weights} if weights is not None else {}), **more_batch}
        local_b = mask.shape[0]
        mini = (self.mini_batch_size or local_b * self.world_size) // self.world_size
        if mini < 1:
            raise ValueError(f"algo.mini_batch_size={self.mini_batch_size} is smaller than the {self.world_size} "
                             "processes: accepted are multiples of the number of processes")
        if self.drop_unkept and mini >= local_b and bool(kept.any()) and not bool(kept.all()):
            # one minibatch of the whole batch: the dropped rows only ever add zeros, so take them out
            batch = {k: v[kept] for k, v in batch.items()}
        metrics = {
            "score_mean": self.gather_rows(scores).mean(),
            "shaped_return_mean": self.gather_rows(rewards.sum(-1)).mean(),
            "kl": kl_inputs["all"],
            "kl_reference": kl_inputs["reference"],
            "kl_kept_mean": kl_inputs["kept_mean"],
            "kl_coef": beta,
            "kept": weighting.kept.sum(),
            "kept_fraction": weighting.level,
            "tail_statistic_mean": everyone[weighting.kept].mean(),
            "response_length": self.gather_rows(mask.sum(-1).float()).mean(),
            "iteration": self.iteration,
            **({"tail_threshold": weighting.threshold} if weighting.threshold is not None else {}),
            **more_metrics,
        }
        return Targets(batch=batch, minibatch_rows=mini, kept=weighting.kept, kl_inputs=kl_inputs, metrics=metrics)

    def forward_minibatch(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(logp, values, entropy), each (b, T), of the minibatch's response tokens under the current weights,
        and the policy's (b, L, H) final hidden states (for more heads on the shared trunk)."""
        ids, attention = batch["input_ids"], batch["attention_mask"]
        width = ids.shape[1] - batch["mask"].shape[1]
        inputs = {"input_ids": ids, "attention_mask": attention, "position_ids": position_ids(attention)}
        hidden, head = hidden_and_head(self.policy, inputs)
        stats = token_stats(hidden, response_labels(ids, batch["mask"]), policy_head=head, entropy=True,
                            chunk_size=self.chunk_size)
        values = self.values(ids, attention, hidden if self.critic_trunk is None else None)
        return stats.policy_logps[:, width:], values[:, width - 1 : -1], stats.entropy[:, width:], hidden

    def minibatch_loss(self, part: dict[str, Tensor]) -> PPOOutput:
        """The clipped policy and value losses of one minibatch under the current weights, with its entropy."""
        logp, values, entropy, hidden = self.forward_minibatch(part)
        out = ppo_loss(logp, part["old_logp"], part["advantages"], values, part["old_values"], part["returns"],
                       part["mask"], weights=part.get("weights"), **self.loss_settings)
        out.stats["entropy"] = masked_mean(entropy.detach(), part["mask"])
        return self.add_critic_losses(out, part, hidden)

    def add_critic_losses(self, out: PPOOutput, part: dict[str, Tensor], hidden: Tensor) -> PPOOutput:
        """More critics' losses on the minibatch, `hidden` the policy's hidden states (PPO: none)."""
        return out

    def update(self, batch: dict[str, Tensor], mini: int) -> dict[str, Tensor]:
        """`ppo_epochs` passes over shuffled minibatches of `mini` local rows; the statistics averaged over them."""
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        rows = batch["input_ids"].shape[0]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.iteration)
        collected: dict[str, list[Tensor]] = {}
        skipped = 0
        params = [p for group in optimizer.optimizer.param_groups for p in group["params"]]
        for _ in range(self.ppo_epochs):
            order = torch.randperm(rows, generator=generator).to(batch["input_ids"].device)
            for start in range(0, rows, mini):
                part = {k: v[order[start : start + mini]] for k, v in batch.items()}
                out = self.minibatch_loss(part)
                # the loss is the mean over the global minibatch's tokens: scale by this rank's share
                n_local = out.stats["n_tokens"]
                n_global = self.all_reduce(n_local)
                share = n_local * self.world_size / n_global.clamp(min=1)
                mean_ratio = self.all_reduce(out.stats["mean_ratio"].nan_to_num() * n_local) / n_global.clamp(min=1)
                skip = bool(n_global == 0) or bool(mean_ratio > self.loss_settings["ratio_threshold"])
                optimizer.zero_grad()
                if not skip:
                    self.manual_backward(out.loss * share)
                    self.average_gradients(params)
                    if self.max_grad_norm is not None:
                        self.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm,
                                            gradient_clip_algorithm="norm")
                    optimizer.step()
                    if scheduler is not None:
                        scheduler.step()
                    if self.ptx_texts:
                        out.stats["ptx_loss"] = self.ptx_step(optimizer, params)
                else:
                    skipped += 1
                for k, v in out.stats.items():
                    collected.setdefault(k, []).append(v.detach().float())
        summary = {k: torch.stack(v).nanmean() for k, v in collected.items()}
        summary["skipped_minibatches"] = torch.tensor(float(skipped))
        return summary

    def ptx_loss(self, texts: list[str]) -> Tensor:
        """Mean NLL per token of `texts` under the policy (the SFT loss of PPO-ptx)."""
        rows = [ids[: self.ptx["max_length"]] for ids in self.tokenizer(texts)["input_ids"]]
        ids, attention = (t.to(self.device) for t in pad_rows(rows, pad_token_id(self.tokenizer)))
        hidden, head = hidden_and_head(self.policy, {"input_ids": ids, "attention_mask": attention})
        stats = sequence_stats(hidden, ids.masked_fill(attention == 0, IGNORE_INDEX), policy_head=head,
                               chunk_size=self.chunk_size)
        return -stats.policy_logps.sum() / stats.n_tokens.sum().clamp(min=1)

    def ptx_step(self, optimizer, params: list[nn.Parameter]) -> Tensor:
        """One more optimizer step on `ptx.coeff` x the SFT loss of `ptx.batch_size` texts drawn at random
        (safe-rlhf's PTX step after each RL step; the schedule steps with the RL steps only)."""
        if self.ptx_generator is None:
            self.ptx_generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank * 7919 + 1)
        draw = torch.randint(len(self.ptx_texts), (self.ptx["batch_size"],), generator=self.ptx_generator)
        loss = self.ptx_loss([self.ptx_texts[i] for i in draw.tolist()])
        optimizer.zero_grad()
        self.manual_backward(self.ptx["coeff"] * loss)
        self.average_gradients(params)
        if self.max_grad_norm is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
        optimizer.step()
        return loss.detach()

    def average_gradients(self, params: list[nn.Parameter]) -> None:
        """Gradients averaged over the ranks (plain all-reduce: DDP's own reducer is switched off, since one
        training step makes several backward passes)."""
        if self.world_size == 1:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        flat = torch._utils._flatten_dense_tensors(grads)  # one collective, not one per parameter
        dist.all_reduce(flat)
        flat /= self.world_size
        for grad, averaged in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
            grad.copy_(averaged)

    def on_fit_start(self) -> None:
        wrapped = self.trainer.strategy.model
        if hasattr(wrapped, "require_backward_grad_sync"):
            wrapped.require_backward_grad_sync = False  # gradients are averaged by `average_gradients`

    def on_train_end(self) -> None:
        """Under data parallelism, how far the ranks' weights drifted apart: the largest spread over the ranks of
        a trainable tensor's sum (relative, for sums above 1). 0 up to float error when every update was
        averaged; a warning otherwise."""
        if self.world_size == 1:
            return
        sums = torch.stack([p.detach().double().sum() for p in self.parameters() if p.requires_grad])
        high, low = sums.clone(), sums.clone()
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        self.rank_weight_spread = float(((high - low) / high.abs().clamp(min=1)).max())
        if self.rank_weight_spread > 1e-4:
            log.warning("the ranks' weights differ after training (relative spread %.2e): their updates were not "
                        "all averaged", self.rank_weight_spread)
