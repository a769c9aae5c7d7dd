"""PPO's rollouts (riskexp.rl.rollout) on tiny random models: layout, masks, log-probs, seeds and values."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import OPENINGS

from riskexp.generation import sampling_config
from riskexp.models import tiny_llama
from riskexp.rl.rollout import position_ids, rollout

PROMPTS = [*OPENINGS, "What a"]


@pytest.fixture(scope="module")
def reference():
    return tiny_llama(init_seed=1)[0].eval()


@pytest.fixture(scope="module")
def eosy(tiny):
    """The tiny model with an output bias that puts about a quarter of each step's mass on the eos, so rows stop
    at their own, different lengths (a random-init model's logits are nearly flat over the 49k vocabulary)."""
    model, tok = tiny
    model = copy.deepcopy(model).eval()
    old = model.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    head.weight = old.weight
    with torch.no_grad():
        head.bias.zero_()
        head.bias[tok.eos_token_id] = math.log(len(tok) / 3)
    model.lm_head = head
    return model


def _rollout(model, reference, tok, prompts=PROMPTS, **kw):
    return rollout(model, reference, tok, prompts, **{"max_new_tokens": 12, "seed": 0, **kw})


def _prompt_ids(tok):
    return [tok(p)["input_ids"] for p in PROMPTS]


def test_layout_left_padding_and_rows_stopping_at_their_first_eos(tiny, eosy, reference):
    _, tok = tiny
    r = _rollout(eosy, reference, tok)
    eos = tok.eos_token_id
    prompts = _prompt_ids(tok)
    B, P = len(PROMPTS), max(len(p) for p in prompts)
    T = r.response_mask.shape[1]
    assert r.prompt_width == P and 1 <= T <= 12
    assert r.input_ids.shape == r.attention_mask.shape == (B, P + T) and r.input_ids.dtype == torch.long
    assert r.response_mask.dtype == torch.bool and r.finished.shape == (B,)
    for t in (r.policy_logps, r.ref_logps):
        assert t.shape == (B, T) and t.dtype == torch.float32
    assert r.values is None
    lengths = r.lengths.tolist()
    # rows stop at different lengths, some at an eos before the last column, so the masks are not trivial
    assert len(set(lengths)) > 2 and r.finished.any() and min(lengths) < T
    for i, prompt in enumerate(prompts):
        pad = P - len(prompt)
        assert r.attention_mask[i, :pad].eq(0).all() and r.input_ids[i, :pad].eq(tok.pad_token_id).all()
        assert r.input_ids[i, pad:P].tolist() == prompt and r.attention_mask[i, pad:P].eq(1).all()
        response, n = r.response_ids[i].tolist(), lengths[i]
        assert r.response_mask[i].tolist() == [True] * n + [False] * (T - n)
        assert r.attention_mask[i, P:].tolist() == [1] * n + [0] * (T - n)
        # no eos before the row's end; the row ends with its first eos exactly when it finished
        assert eos not in response[: n - 1] and (response[n - 1] == eos) == bool(r.finished[i])
        assert bool(r.finished[i]) or n == T == 12
        assert r.texts[i] == tok.decode(response[: n - bool(r.finished[i])], skip_special_tokens=True)
    for t in (r.policy_logps, r.ref_logps):
        assert t[~r.response_mask].eq(0).all() and t[r.response_mask].lt(0).all()


def _full_forward_logps(model, r):
    """(B, T) log-probs of each row's response tokens from a forward pass on the row alone, unpadded."""
    out = torch.zeros(r.response_mask.shape)
    P = r.prompt_width
    for i in range(r.input_ids.shape[0]):
        keep = r.attention_mask[i].bool()
        ids = r.input_ids[i][keep]
        start = int(keep[:P].sum())  # the row's own prompt length
        n = int(r.lengths[i])
        with torch.no_grad():
            logp = F.log_softmax(model(ids[None]).logits[0].float(), -1)
        out[i, :n] = logp[torch.arange(start - 1, start + n - 1), ids[start:]]
    return out


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.9, "top_k": 40000, "top_p": 0.9}])
def test_log_probs_equal_full_forward_passes_of_policy_and_reference(tiny, eosy, reference, sampling):
    _, tok = tiny
    r = _rollout(eosy, reference, tok, seed=3, **sampling)
    assert len(set(r.lengths.tolist())) > 1
    # the policy's from the generation's raw logits, whatever the sampling settings; the reference's from one
    # left-padded forward pass: both equal their models' plain forward passes on each row alone
    torch.testing.assert_close(r.policy_logps, _full_forward_logps(eosy, r), atol=1e-4, rtol=0)
    torch.testing.assert_close(r.ref_logps, _full_forward_logps(reference, r), atol=1e-4, rtol=0)
    # the reference may be the policy itself: then both agree
    same = _rollout(eosy, eosy, tok, seed=3, **sampling)
    torch.testing.assert_close(same.ref_logps, same.policy_logps, atol=1e-4, rtol=0)


def test_min_new_tokens_forbids_an_early_eos(tiny, eosy, reference):
    _, tok = tiny
    free = _rollout(eosy, reference, tok, seed=5)
    assert free.lengths.min() <= 5  # without the bound some row stops early: the check below is not vacuous
    bounded = _rollout(eosy, reference, tok, seed=5, min_new_tokens=5)
    assert bounded.lengths.min() >= 6 and bounded.finished.any()
    assert not bounded.response_ids[:, :5].eq(tok.eos_token_id).any()
    # the bound counts new tokens only, never the prompt (min_length), and the default top-k is off
    config = sampling_config(12, 1.0, 1.0, True, tok.pad_token_id, [tok.eos_token_id], min_new_tokens=5)
    assert (config.min_new_tokens, config.top_k, config.use_cache) == (5, 0, True) and not config.min_length
    default = sampling_config(12, 1.0, 1.0, True, tok.pad_token_id, [tok.eos_token_id])
    assert default.min_new_tokens is None and default.top_k == 0


def test_the_seed_decides_the_rollout_and_the_global_rng_is_untouched(tiny, reference):
    model, tok = tiny
    model.train()
    side = tok.padding_side
    rng = torch.get_rng_state()
    first = _rollout(model, reference, tok, seed=1)
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and not reference.training and tok.padding_side == side
    again = _rollout(model, reference, tok, seed=1)
    for name in ("input_ids", "attention_mask", "response_mask", "policy_logps", "ref_logps", "finished"):
        assert torch.equal(getattr(first, name), getattr(again, name)), name
    assert first.texts == again.texts
    # the caller advances the seed between iterations (seed + iteration): new samples
    other = _rollout(model, reference, tok, seed=2)
    assert not torch.equal(other.input_ids, first.input_ids)
    model.eval()


def test_value_fn_sees_the_rollouts_ids_and_its_values_are_the_states_before_each_token(tiny, eosy, reference):
    _, tok = tiny
    calls = []

    def value_fn(input_ids, attention_mask):
        calls.append((input_ids.clone(), attention_mask.clone(), torch.is_grad_enabled()))
        # a distinct value per (row, position): 100 * row + column
        rows, cols = torch.meshgrid(torch.arange(input_ids.shape[0]), torch.arange(input_ids.shape[1]),
                                    indexing="ij")
        return (100 * rows + cols).to(torch.float64)

    r = _rollout(eosy, reference, tok, value_fn=value_fn)
    assert len(calls) == 1
    ids, mask, grad = calls[0]
    assert torch.equal(ids, r.input_ids) and torch.equal(mask, r.attention_mask) and not grad
    P, (B, T) = r.prompt_width, r.response_mask.shape
    assert r.values.shape == (B, T) and r.values.dtype == torch.float32
    # V(s_t) for the response token in column P + t is the value at position P + t - 1
    want = 100 * torch.arange(B)[:, None] + (P - 1 + torch.arange(T))[None]
    assert torch.equal(r.values, torch.where(r.response_mask, want.float(), 0.0))

    with pytest.raises(ValueError, match=r"value_fn returned \(6, 3\): accepted is a tensor of the ids' shape"):
        _rollout(eosy, reference, tok, value_fn=lambda ids, m: torch.zeros(ids.shape[0], 3))


def test_position_ids_count_from_each_rows_first_token():
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    assert position_ids(mask).tolist() == [[0, 0, 0, 1, 2, 2], [0, 1, 2, 3, 4, 5]]


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"temperature": 0.0}, r"temperature=0.0: accepted values are > 0"),
        ({"top_p": 0.0}, r"top_p=0.0: accepted values are in \(0, 1\]"),
        ({"top_k": -1}, r"top_k=-1: accepted values are integers >= 0"),
        ({"max_new_tokens": 0}, r"max_new_tokens=0: accepted values are integers >= 1"),
        ({"min_new_tokens": 13}, r"min_new_tokens=13: accepted values are integers in \[0, max_new_tokens=12\]"),
    ],
)
def test_bad_sampling_arguments_are_named(tiny, reference, kw, message):
    model, tok = tiny
    with pytest.raises(ValueError, match=message):
        _rollout(model, reference, tok, **kw)


def test_no_prompt_is_an_error(tiny, reference):
    model, tok = tiny
    with pytest.raises(ValueError, match="at least one prompt"):
        rollout(model, reference, tok, [], max_new_tokens=4, seed=0)
