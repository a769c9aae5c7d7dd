"""PPO's rollouts: one prompt batch sampled from the policy, with everything an iteration needs, as tensors.

Layout. The B prompts are left-padded to a common width P and the response of every row starts at column P of
`input_ids` (B, L = P + T), T being the most new tokens any row drew (<= max_new_tokens). Every per-token tensor
of the rollout is (B, T) over those response columns, in the alignment of `riskexp.rl.gae` (trl's):

    column t  <->  the response token input_ids[:, P + t]
    policy_logps[:, t] = log pi(y_t | s_t),  ref_logps[:, t] = log pi_ref(y_t | s_t),
    values[:, t] = V(s_t) = value_fn(input_ids, attention_mask)[:, P + t - 1]   (the state before y_t),

and `response_mask` (B, T) is true on each row's tokens up to and including its first eos (a row without one
runs to max_new_tokens). Off the response mask every per-token tensor is exactly 0. `attention_mask` (B, L) is
1 on the prompt tokens and on the masked response tokens, 0 on the left padding and after a row's eos.

Sampling goes through the pieces of `riskexp.generation.generate` (`sampling_session`, `sampling_config`,
`sample_batch`, `until_first_eos`): the KV cache, a GenerationConfig built from the arguments alone (top_k=0
by default, `min_new_tokens`, never `min_length`), eval mode, and torch RNGs forked and seeded with `seed`, so
the global random state is untouched. The same seed gives the same rollout: a training loop passes
`seed + iteration` so that each iteration draws new samples and a rerun draws the same ones.

The policy's log-probs come from the raw logits of the generation steps (temperature 1, no top-k / top-p, no
min_new_tokens), i.e. they are log pi of the sampled tokens, what PPO's ratio compares against; the reference's
come from one forward pass over the rollout's tokens, chunked over positions (`riskexp.logps.token_logps`). No
text is decoded and re-encoded for either; `texts` (the responses decoded, eos dropped) are for text scorers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from riskexp.generation import (
    encode_prompts,
    eos_token_ids,
    eval_mode,
    pad_token_id,
    sample_batch,
    sampling_config,
    sampling_session,
    until_first_eos,
)
from riskexp.logps import IGNORE_INDEX, pad_rows, token_logps
from riskexp.models import hidden_and_head

ValueFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class Rollout:
    """One prompt batch of B episodes, P prompt columns (left-padded), T response columns; see the module."""

    input_ids: Tensor  # (B, P + T) int64: left pad, prompt, response (pad after each row's eos)
    attention_mask: Tensor  # (B, P + T) int64: 1 on prompt tokens and masked response tokens
    response_mask: Tensor  # (B, T) bool: response tokens up to and including each row's first eos
    policy_logps: Tensor  # (B, T) float32: log pi(y_t | s_t) of the sampling policy, 0 off the mask
    ref_logps: Tensor  # (B, T) float32: log pi_ref(y_t | s_t), 0 off the mask
    values: Tensor | None  # (B, T) float32: V(s_t) from value_fn, 0 off the mask; None without value_fn
    finished: Tensor  # (B,) bool: the row ended with an eos (False: cut at max_new_tokens)
    texts: list[str]  # the decoded responses, eos and special tokens dropped, for text scorers

    @property
    def prompt_width(self) -> int:
        """P: the column of input_ids where every response starts."""
        return self.input_ids.shape[1] - self.response_mask.shape[1]

    @property
    def response_ids(self) -> Tensor:
        """(B, T) the sampled tokens (pad after each row's eos)."""
        return self.input_ids[:, self.prompt_width :]

    @property
    def lengths(self) -> Tensor:
        """(B,) int64 response tokens per row, the eos included."""
        return self.response_mask.sum(-1)


def _check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: accepted values are integers >= 1")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r}: accepted values are > 0")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r}: accepted values are in (0, 1]")


def position_ids(attention_mask: Tensor) -> Tensor:
    """(B, L) positions of a left-padded batch counted from each row's first real token, as `model.generate`
    counts them (0 on the padding): the same logits in a forward pass as in sampling, also for models with
    absolute position embeddings (GPT-2)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_labels(input_ids: Tensor, response_mask: Tensor) -> Tensor:
    """(B, P + T) labels of the response tokens: their ids under the (B, T) response mask, IGNORE_INDEX on the
    prompt, the padding and after each row's eos (the labels `riskexp.logps` scores)."""
    width = input_ids.shape[1] - response_mask.shape[1]
    scored = torch.cat([torch.zeros_like(input_ids[:, :width], dtype=torch.bool), response_mask.bool()], 1)
    return torch.where(scored, input_ids, IGNORE_INDEX)


def reference_logps(reference, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor, *,
                    chunk_size: int = 64) -> Tensor:
    """(B, T) log pi_ref of the rollout's response tokens from one forward pass of `reference` (eval mode, no
    grad), chunked over positions; 0 off the response mask. Returned on the device of `input_ids`."""
    device = next(reference.parameters()).device
    labels = response_labels(input_ids, response_mask).to(device)
    with eval_mode(reference), torch.no_grad():
        mask = attention_mask.to(device)
        batch = {"input_ids": input_ids.to(device), "attention_mask": mask, "position_ids": position_ids(mask)}
        hidden, head = hidden_and_head(reference, batch)
        logps = token_logps(hidden, labels, head, chunk_size=chunk_size)
    return logps[:, input_ids.shape[1] - response_mask.shape[1] :].to(input_ids.device)


def rollout_values(value_fn: ValueFn, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor) -> Tensor:
    """(B, T) float32 V(s_t) of the response tokens: `value_fn(input_ids, attention_mask)` (B, P + T), one value
    per position, called under no grad, read at columns P - 1 .. P + T - 2 (the state before each response
    token, trl's `values[:, :-1]`); 0 off the response mask."""
    with torch.no_grad():
        out = value_fn(input_ids, attention_mask)
    if not isinstance(out, Tensor) or out.shape != input_ids.shape:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"value_fn returned {shape}: accepted is a tensor of the ids' shape "
                         f"{tuple(input_ids.shape)}, one value per position")
    width = input_ids.shape[1] - response_mask.shape[1]
    values = out[:, width - 1 : -1].float().to(response_mask.device)
    return torch.where(response_mask, values, 0.0)


def rollout(
    policy,
    reference,
    tokenizer,
    prompts: Sequence[str | list[dict]],
    *,
    max_new_tokens: int,
    seed: int,
    min_new_tokens: int = 0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    value_fn: ValueFn | None = None,
    prompt_format: str = "plain",
    chunk_size: int = 64,
) -> Rollout:
    """Sample one response per prompt from `policy` and score it under `reference` (and `value_fn`).

    Args:
        policy / reference: causal LMs (the reference may be the policy object itself); both are used in eval
            mode and returned to their previous mode. Tensors come back on the policy's device.
        prompts: B texts or chat message lists, rendered by `prompt_format` (`riskexp.prompts.render_prompt`),
            kept in their order as one left-padded generation batch.
        max_new_tokens / min_new_tokens: the response length bounds, in new tokens (no eos before
            min_new_tokens); each row stops at its first eos.
        temperature, top_k (0: off), top_p (1: off): how tokens are drawn; the log-probs are the policy's own.
        seed: seeds the sampler for this call only; pass `seed + iteration` to draw new samples every iteration.
        value_fn: (input_ids, attention_mask) (B, P + T) -> (B, P + T) values per position, e.g. a value head;
            called once under no grad; None: `values` is None.
        chunk_size: positions per chunk of the reference's log-softmax (see `riskexp.logps`).
    """
    _check_sampling(max_new_tokens, temperature, top_p)
    if not prompts:
        raise ValueError("rollout needs at least one prompt")
    ids = encode_prompts(tokenizer, prompts, prompt_format)
    pad_id, eos_ids = pad_token_id(tokenizer), eos_token_ids(policy, tokenizer)
    config = sampling_config(max_new_tokens, temperature, top_p, True, pad_id, eos_ids, top_k=top_k,
                             min_new_tokens=min_new_tokens)
    device = next(policy.parameters()).device
    # left padding is done here, not through tokenizer.padding_side: a shared tokenizer is never mutated
    prompt_ids, prompt_mask = pad_rows(ids, pad_id, left=True)
    with sampling_session(policy, seed):
        new, logps = sample_batch(policy, prompt_ids, prompt_mask, config)
    response_mask, finished = until_first_eos(new, eos_ids)
    input_ids = torch.cat([prompt_ids.to(device), new], 1)
    attention_mask = torch.cat([prompt_mask.to(device), response_mask.long()], 1)
    policy_logps = torch.where(response_mask, logps, 0.0)
    ref_logps = reference_logps(reference, input_ids, attention_mask, response_mask, chunk_size=chunk_size)
    values = None if value_fn is None else rollout_values(value_fn, input_ids, attention_mask, response_mask)
    lengths = response_mask.sum(-1).tolist()
    texts = [tokenizer.decode(row[: n - bool(done)], skip_special_tokens=True)
             for row, n, done in zip(new.tolist(), lengths, finished.tolist())]
    return Rollout(input_ids=input_ids, attention_mask=attention_mask, response_mask=response_mask,
                   policy_logps=policy_logps, ref_logps=ref_logps, values=values, finished=finished, texts=texts)
