"""The per-token mode of riskexp.logps: the terms `sequence_stats` sums, kept per token, chunked the same way."""

import pytest
import torch
import torch.nn.functional as F

from riskexp.logps import IGNORE_INDEX, sequence_stats, token_logps, token_stats
from riskexp.models import hidden_and_head, tiny_llama
from riskexp.risk import CVaR
from riskexp.rl import entropy_from_logits


def random_batch(seed=0, n=4, length=13, vocab=97, dtype=torch.float64):
    """Policy and reference logits (N, L, V) and labels with a prompt, padding and unequal lengths."""
    g = torch.Generator().manual_seed(seed)
    policy = (torch.randn(n, length, vocab, generator=g, dtype=dtype) * 2).requires_grad_()
    reference = torch.randn(n, length, vocab, generator=g, dtype=dtype) * 2
    labels = torch.randint(0, vocab, (n, length), generator=g)
    for i in range(n):
        labels[i, : 2 + i] = IGNORE_INDEX  # prompts of different lengths
        labels[i, length - i :] = IGNORE_INDEX  # right padding of different lengths
    return policy, reference, labels


def full_logps(logits, labels):
    """The naive (N, L) reference: the whole (N, L, V) log-softmax, shifted and gathered."""
    logp = F.log_softmax(logits.double(), -1)[:, :-1]
    target = labels[:, 1:]
    got = logp.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
    got = torch.where(target != IGNORE_INDEX, got, 0.0)
    return F.pad(got, (1, 0))


@pytest.mark.parametrize("vocab_terms", [False, True])
def test_per_token_sums_are_the_sequence_stats(vocab_terms):
    policy, reference, labels = random_batch(seed=1)
    risk = CVaR(0.3).over_vocab if vocab_terms else None
    seq = sequence_stats(policy, labels, reference, vocab_terms=vocab_terms, vocab_risk=risk, chunk_size=5)
    tok = token_stats(policy, labels, reference, vocab_terms=vocab_terms, vocab_risk=risk, chunk_size=5)
    assert tok.policy_logps.shape == labels.shape
    for name, per_token in (("policy_logps", tok.policy_logps), ("ref_logps", tok.ref_logps)):
        torch.testing.assert_close(per_token.sum(-1), getattr(seq, name), atol=1e-10, rtol=0)
    torch.testing.assert_close(tok.mask.sum(-1), seq.n_tokens)
    if vocab_terms:
        torch.testing.assert_close(tok.kl.sum(-1), seq.seq_kl, atol=1e-10, rtol=0)
        torch.testing.assert_close(tok.risk.sum(-1), seq.seq_risk, atol=1e-10, rtol=0)
    else:
        assert tok.kl is None and tok.risk is None and tok.entropy is None


def test_per_token_logps_and_entropy_equal_the_full_computation():
    policy, reference, labels = random_batch(seed=2)
    tok = token_stats(policy, labels, entropy=True, chunk_size=4)
    torch.testing.assert_close(tok.policy_logps, full_logps(policy, labels), atol=1e-10, rtol=0)
    assert tok.ref_logps is None
    entropy = F.pad(entropy_from_logits(policy[:, :-1].detach()), (1, 0))
    torch.testing.assert_close(tok.entropy.detach(), torch.where(tok.mask, entropy, 0.0), atol=1e-10, rtol=0)
    # the entropy column comes after the vocabulary terms too
    full = token_stats(policy, labels, reference, vocab_terms=True, entropy=True, chunk_size=4)
    torch.testing.assert_close(full.entropy, tok.entropy, atol=1e-10, rtol=0)
    torch.testing.assert_close(full.policy_logps, tok.policy_logps, atol=1e-10, rtol=0)


def test_masked_positions_and_the_first_column_are_zero():
    policy, reference, labels = random_batch(seed=3)
    labels[:, 0] = 5  # a real token in column 0: still nothing predicts it
    tok = token_stats(policy, labels, reference, vocab_terms=True, entropy=True)
    want = labels != IGNORE_INDEX
    want[:, 0] = False
    assert torch.equal(tok.mask, want)
    for t in (tok.policy_logps, tok.ref_logps, tok.kl, tok.risk, tok.entropy):
        assert torch.all(t[~tok.mask] == 0)
        assert torch.all(t[tok.mask] != 0)
    # a non-finite logit at an ignored position does not leak into the result
    policy = policy.detach().clone()
    policy[0, 0] = float("nan")  # position 0 predicts column 1, ignored in row 0
    assert torch.isfinite(token_logps(policy, labels)).all()


def test_chunk_size_does_not_change_the_values_or_the_gradient():
    policy, reference, labels = random_batch(seed=4)
    weights = torch.randn(labels.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    results = []
    for chunk_size in (1, 3, 64):
        tok = token_stats(policy, labels, reference, vocab_terms=True, entropy=True, chunk_size=chunk_size)
        grad = torch.autograd.grad((tok.policy_logps * weights).sum() + tok.entropy.sum(), policy)[0]
        results.append((tok, grad))
    for tok, grad in results[1:]:
        for name in ("policy_logps", "ref_logps", "kl", "risk", "entropy"):
            torch.testing.assert_close(getattr(tok, name), getattr(results[0][0], name), atol=1e-12, rtol=0)
        torch.testing.assert_close(grad, results[0][1], atol=1e-12, rtol=0)
    # the gradient through the checkpointed chunks is the full computation's
    want = torch.autograd.grad((full_logps(policy, labels) * weights).sum(), policy)[0]
    got = torch.autograd.grad((token_logps(policy, labels, chunk_size=3) * weights).sum(), policy)[0]
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_tiny_model_hidden_states_and_head_equal_its_full_logits():
    model, tok = tiny_llama()
    texts = ["The movie was great fun", "I", "A longer text about a film that goes on"]
    rows = [tok(t)["input_ids"] for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
        labels[i, 1 : len(r)] = torch.tensor(r[1:])
    batch = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        hidden, head = hidden_and_head(model, batch)
        assert head is not None  # the chunked-logits path
        got = token_logps(hidden, labels, head, chunk_size=3)
        logits = model(**batch).logits
    torch.testing.assert_close(got.double(), full_logps(logits, labels), atol=1e-5, rtol=0)
    assert got.dtype == torch.float32 and got.shape == ids.shape


def test_errors_name_the_bad_value():
    policy, reference, labels = random_batch()
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match=rf"chunk_size={bad!r}: accepted values are integers >= 1"):
            token_stats(policy, labels, chunk_size=bad)
    with pytest.raises(ValueError, match=r"labels has shape \(4, 1\): accepted is \(N, L\) with L >= 2"):
        token_logps(policy[:, :1], labels[:, :1])
    with pytest.raises(ValueError, match="token-level terms need the reference's distribution"):
        token_stats(policy, labels, vocab_terms=True)
