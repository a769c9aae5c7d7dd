"""Per-sequence and per-token statistics of a policy against a reference, computed in chunks of positions.

TDPO and Ra-DPO need both models' full next-token distributions at every response position. Materialising
(N, T, V) float32 log-softmaxes (several copies, plus what autograd saves) dominates memory for real
vocabularies (V ~ 50k). Here positions are processed `chunk_size` at a time, and each chunk runs under
activation checkpointing, so only one chunk's (N, chunk, V) tensors exist at any time, forward or backward.
If the caller passes hidden states and the output head, the logits themselves are also never whole.

Two modes share the one loop over chunks (`_masked_chunk_terms`): `sequence_stats` sums the terms over each
sequence's response tokens (the preference objectives); `token_stats` / `token_logps` keep them per token, (N, L)
aligned with the labels (PPO's log-probs and entropy, the reference's log-probs of a rollout).

Labels follow the usual causal convention: `labels[:, t]` is predicted from position t - 1, and -100 marks
prompt and padding tokens that do not count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from numbers import Integral

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100

VocabRisk = Callable[[Tensor, Tensor], Tensor]


@dataclass
class SequenceStats:
    """Masked sums over response tokens, one value per sequence. All tensors (N,)."""

    policy_logps: Tensor  # sum_t log pi_theta(y_t | s_t)
    ref_logps: Tensor | None  # sum_t log pi_ref(y_t | s_t)
    seq_kl: Tensor | None  # TDPO's D_SeqKL: sum_t KL(pi_ref(.|s_t) || pi_theta(.|s_t))
    seq_risk: Tensor | None  # Ra-DPO's D_SeqRR: sum_t Phi_{z ~ pi_ref}(log pi_ref(z|s_t) - log pi_theta(z|s_t))
    n_tokens: Tensor  # number of response tokens

    @property
    def logratios(self) -> Tensor:
        """sum_t log pi_theta / pi_ref over the response (the DPO implicit reward / beta). (N,)."""
        return self.policy_logps - self.ref_logps


@dataclass
class TokenStats:
    """Per-token terms aligned with the labels: column t belongs to the token labels[:, t], predicted from the
    positions before it. All tensors (N, L), float32 (or float64), exactly 0 where `mask` is False."""

    policy_logps: Tensor  # log pi_theta(y_t | s_t)
    ref_logps: Tensor | None  # log pi_ref(y_t | s_t)
    kl: Tensor | None  # KL(pi_ref(.|s_t) || pi_theta(.|s_t)), with vocab_terms
    risk: Tensor | None  # Phi_{z ~ pi_ref}(log pi_ref(z|s_t) - log pi_theta(z|s_t)), with vocab_terms
    entropy: Tensor | None  # H(pi_theta(.|s_t)) of the distribution y_t was drawn from, with entropy=True
    mask: Tensor  # (N, L) bool: labels != IGNORE_INDEX, and False in column 0, which no position predicts


def pad_rows(rows: list[list[int]], value: int, left: bool = False) -> tuple[Tensor, Tensor]:
    """(ids, attention_mask), both (N, L) int64, of token lists padded with `value` on the right (or left).

    The mask comes from the true lengths, never from the ids: pad may equal eos."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def _identity(x: Tensor) -> Tensor:
    return x


def _logits(head: Callable[[Tensor], Tensor], hidden: Tensor) -> Tensor:
    """(N, C, V) logits in float32 (or float64) whatever the model's dtype or the autocast around it.

    A linear head (every model `riskexp.models.trunk_and_head` splits) runs as a float32 matmul with autocast
    off: bf16 logits carry a relative error of ~4e-3, which lands in the tail of log p_ref - log pi that the
    sequential KL and the risk ratio sum over 50k vocabulary entries. Other heads are called as they are and
    upcast after."""
    if isinstance(head, nn.Linear):
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        bias = head.bias.to(dtype) if head.bias is not None else None
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return F.linear(hidden.to(dtype), head.weight.to(dtype), bias)
    logits = head(hidden)
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def _entropy(logp: Tensor) -> Tensor:
    """-sum_v p_v log p_v of (N, C, V) log-probs -> (N, C); an entry of probability 0 adds 0, not nan."""
    return -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)


def _chunk_terms(
    policy_hidden: Tensor,
    ref_hidden: Tensor | None,
    targets: Tensor,
    policy_head: Callable[[Tensor], Tensor],
    ref_head: Callable[[Tensor], Tensor],
    vocab_terms: bool,
    vocab_risk: VocabRisk | None,
    entropy: bool = False,
) -> Tensor:
    """Per-position terms of one chunk, stacked on the last axis: (N, C, K) for K in {1, 2, 4}, plus the
    policy's entropy as one more, last, column with `entropy`."""
    logits = _logits(policy_head, policy_hidden)
    if not vocab_terms:
        # log-softmax at the target only: logit - logsumexp, no (N, C, V) log-prob copy (but for the entropy)
        terms = [logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)]
        if ref_hidden is not None:
            ref_logits = _logits(ref_head, ref_hidden)
            terms.append(ref_logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - ref_logits.logsumexp(-1))
        if entropy:
            terms.append(_entropy(F.log_softmax(logits, dim=-1)))
        return torch.stack(terms, dim=-1)

    logp = F.log_softmax(logits, dim=-1)
    # log_softmax for the reference too: softmax().log() underflows to -inf and 0 * -inf = nan
    ref_logp = F.log_softmax(_logits(ref_head, ref_hidden), dim=-1)
    token_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ref_token_logp = ref_logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    d = ref_logp - logp
    kl = (ref_logp.exp() * d).sum(-1)
    risk = vocab_risk(d, ref_logp) if vocab_risk is not None else kl
    terms = [token_logp, ref_token_logp, kl, risk]
    if entropy:
        terms.append(_entropy(logp))
    return torch.stack(terms, dim=-1)


def _masked_chunk_terms(
    policy_hidden: Tensor,
    labels: Tensor,
    ref_hidden: Tensor | None,
    policy_head: Callable[[Tensor], Tensor],
    ref_head: Callable[[Tensor], Tensor],
    vocab_terms: bool,
    vocab_risk: VocabRisk | None,
    entropy: bool,
    chunk_size: int,
) -> Iterator[Tensor]:
    """The one loop over positions: `_chunk_terms` of `chunk_size` predicted positions at a time, in order.

    Yields (N, C, K) tensors over the causally shifted positions (chunk c covers labels[:, 1 + c * chunk_size
    :][:, :chunk_size]), exactly 0 where the label is IGNORE_INDEX. Under grad each chunk is checkpointed."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r}: accepted values are integers >= 1")
    if labels.dim() != 2 or labels.shape[1] < 2:
        raise ValueError(f"labels has shape {tuple(labels.shape)}: accepted is (N, L) with L >= 2 (a token "
                         "and one predicted from it)")
    # causal shift: position t predicts labels[:, t + 1]
    policy_hidden = policy_hidden[:, :-1]
    ref_hidden = ref_hidden[:, :-1] if ref_hidden is not None else None
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    targets = labels.clamp(min=0)
    for start in range(0, labels.shape[1], chunk_size):
        stop = start + chunk_size
        args = (
            policy_hidden[:, start:stop],
            ref_hidden[:, start:stop] if ref_hidden is not None else None,
            targets[:, start:stop],
            policy_head,
            ref_head,
            vocab_terms,
            vocab_risk,
            entropy,
        )
        if torch.is_grad_enabled():
            terms = checkpoint(_chunk_terms, *args, use_reentrant=False)
        else:
            terms = _chunk_terms(*args)
        # where, not a product: a non-finite value at a padded position must not reach a sum
        yield torch.where(mask[:, start:stop, None], terms, 0.0)


def sequence_stats(
    policy_hidden: Tensor,
    labels: Tensor,
    ref_hidden: Tensor | None = None,
    *,
    policy_head: Callable[[Tensor], Tensor] | None = None,
    ref_head: Callable[[Tensor], Tensor] | None = None,
    vocab_terms: bool = False,
    vocab_risk: VocabRisk | None = None,
    ref_logps: Tensor | None = None,
    chunk_size: int = 64,
) -> SequenceStats:
    """Sums over response tokens of log-probs, sequential KL and sequential risk ratio.

    Args:
        policy_hidden: (N, L, H) final hidden states, or (N, L, V) logits when `policy_head` is None.
        labels: (N, L) token ids with IGNORE_INDEX on prompt and padding.
        ref_hidden: (N, L, H) or (N, L, V) for the reference; None when `ref_logps` are precomputed.
        policy_head / ref_head: map a (N, C, H) chunk to (N, C, V) logits (the models' output embeddings).
        vocab_terms: also compute the per-token KL and risk over the vocabulary (TDPO, Ra-DPO).
        vocab_risk: `RiskMeasure.over_vocab`; None leaves `seq_risk` equal to the KL.
        ref_logps: (N,) precomputed sequence log-probs of the reference (sequence-level objectives only).
        chunk_size: positions per chunk; bounds peak memory at O(N * chunk_size * V).
    """
    if vocab_terms and ref_hidden is None:
        raise ValueError("token-level terms need the reference's distribution: pass ref_hidden, not ref_logps")
    sums = None
    # summed chunk by chunk, never holding the (N, L, K) per-token terms
    for terms in _masked_chunk_terms(policy_hidden, labels, ref_hidden, policy_head or _identity,
                                     ref_head or _identity, vocab_terms, vocab_risk, False, chunk_size):
        chunk_sum = terms.sum(1)  # (N, K)
        sums = chunk_sum if sums is None else sums + chunk_sum

    has_ref = ref_hidden is not None
    return SequenceStats(
        policy_logps=sums[:, 0],
        ref_logps=sums[:, 1] if has_ref else ref_logps,
        seq_kl=sums[:, 2] if vocab_terms else None,
        seq_risk=sums[:, 3] if vocab_terms else None,
        n_tokens=(labels[:, 1:] != IGNORE_INDEX).sum(-1),
    )


def token_stats(
    policy_hidden: Tensor,
    labels: Tensor,
    ref_hidden: Tensor | None = None,
    *,
    policy_head: Callable[[Tensor], Tensor] | None = None,
    ref_head: Callable[[Tensor], Tensor] | None = None,
    vocab_terms: bool = False,
    vocab_risk: VocabRisk | None = None,
    entropy: bool = False,
    chunk_size: int = 64,
) -> TokenStats:
    """The per-token terms `sequence_stats` sums, kept per token: (N, L) tensors aligned with `labels`.

    Column t holds the terms of the token labels[:, t] (predicted from positions < t); columns where the label
    is IGNORE_INDEX, and column 0, are exactly 0, so `policy_logps.sum(-1)` is `sequence_stats`'s (up to the
    order of the float sums). Chunked over positions as `sequence_stats` is: only one chunk's (N, chunk, V)
    logits exist at a time, forward or backward; the (N, L, K) result is small.

    Args:
        policy_hidden: (N, L, H) final hidden states, or (N, L, V) logits when `policy_head` is None.
        labels: (N, L) token ids with IGNORE_INDEX where nothing is scored (prompt, padding), L >= 2.
        ref_hidden: (N, L, H) or (N, L, V) for the reference, or None for the policy's terms only.
        policy_head / ref_head: map a (N, C, H) chunk to (N, C, V) logits (the models' output embeddings).
        vocab_terms: also the per-token KL and risk over the vocabulary (needs `ref_hidden`).
        vocab_risk: `RiskMeasure.over_vocab`; None leaves `risk` equal to the KL.
        entropy: also the entropy of the policy's next-token distribution (PPO's logged entropy).
        chunk_size: positions per chunk; bounds peak memory at O(N * chunk_size * V).
    """
    if vocab_terms and ref_hidden is None:
        raise ValueError("token-level terms need the reference's distribution: pass ref_hidden")
    chunks = list(_masked_chunk_terms(policy_hidden, labels, ref_hidden, policy_head or _identity,
                                      ref_head or _identity, vocab_terms, vocab_risk, entropy, chunk_size))
    # (N, L - 1, K) -> (N, L, K): a zero column in front, so column t is the token labels[:, t]
    terms = F.pad(torch.cat(chunks, dim=1), (0, 0, 1, 0))
    has_ref = ref_hidden is not None
    mask = labels != IGNORE_INDEX
    mask[:, 0] = False
    return TokenStats(
        policy_logps=terms[..., 0],
        ref_logps=terms[..., 1] if has_ref else None,
        kl=terms[..., 2] if vocab_terms else None,
        risk=terms[..., 3] if vocab_terms else None,
        entropy=terms[..., -1] if entropy else None,
        mask=mask,
    )


def token_logps(
    hidden: Tensor, labels: Tensor, head: Callable[[Tensor], Tensor] | None = None, *, chunk_size: int = 64
) -> Tensor:
    """log pi(labels[:, t] | positions < t) of one model, (N, L) aligned with `labels`, 0 where the label is
    IGNORE_INDEX and in column 0. hidden: (N, L, H) with `head`, or (N, L, V) logits without. Chunked as
    `token_stats`; with gradient when `hidden` has one."""
    return token_stats(hidden, labels, policy_head=head, chunk_size=chunk_size).policy_logps
