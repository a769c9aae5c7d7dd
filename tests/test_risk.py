"""Risk measures across samples against the golden vectors, analytic properties, and shard invariance."""

import json
from pathlib import Path

import pytest
import torch

from riskexp.risk import (
    CVaR,
    Entropic,
    Mean,
    cvar_lower,
    cvar_upper,
    entropic_lower,
    linear_quantile,
    ru_cvar_terms,
    tail_counts,
    var_lower,
    var_upper,
    vocab_weighted_cvar,
)

GOLDEN = json.loads((Path(__file__).parent / "golden" / "risk_and_rl.json").read_text())
RETURNS = torch.tensor(GOLDEN["returns"], dtype=torch.float64)


@pytest.mark.parametrize("alpha", list(GOLDEN["var"]))
def test_var_golden(alpha):
    assert var_lower(RETURNS, float(alpha)).item() == pytest.approx(GOLDEN["var"][alpha], abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("alpha", list(GOLDEN["cvar"]))
def test_cvar_golden(alpha, dtype):
    value = cvar_lower(RETURNS.to(dtype), float(alpha)).item()
    assert value == pytest.approx(GOLDEN["cvar"][alpha], abs=1e-6 if dtype == torch.float64 else 1e-4)
    assert CVaR(float(alpha)).lower_tail(RETURNS.to(dtype)).item() == pytest.approx(value)


@pytest.mark.parametrize("theta", list(GOLDEN["entropic"]))
def test_entropic_golden(theta):
    assert entropic_lower(RETURNS, float(theta)).item() == pytest.approx(GOLDEN["entropic"][theta], abs=1e-9)


def test_cvar_at_one_is_the_mean_and_monotone_in_alpha():
    x = torch.randn(257, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert cvar_lower(x, 1.0).item() == pytest.approx(x.mean().item(), abs=1e-12)
    assert CVaR(1.0).upper_tail(x).item() == pytest.approx(x.mean().item(), abs=1e-12)
    values = [cvar_lower(x, a).item() for a in (0.01, 0.05, 0.1, 0.3, 0.7, 1.0)]
    assert values == sorted(values)
    uppers = [cvar_upper(x, a).item() for a in (0.01, 0.05, 0.1, 0.3, 0.7, 1.0)]
    assert uppers == sorted(uppers, reverse=True)
    assert var_upper(x, 0.1) == -var_lower(-x, 0.1)


def test_entropic_tends_to_the_mean():
    x = torch.randn(64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert entropic_lower(x, 1e-6).item() == pytest.approx(x.mean().item(), abs=1e-5)
    assert Entropic(2.0).lower_tail(x) < x.mean() < Entropic(2.0).upper_tail(x)
    assert Mean().lower_tail(x) == x.mean()


def test_cvar_gradient_flows_only_to_the_tail():
    x = torch.tensor([3.0, -1.0, 0.5, -2.0, 1.0], requires_grad=True)
    cvar_lower(x, 0.4).backward()
    assert torch.equal(x.grad != 0, torch.tensor([False, True, False, True, False]))


@pytest.mark.parametrize("tail", ["lower", "upper"])
@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.3, 1.0])
def test_ru_cvar_is_invariant_to_micro_batches_and_shards(tail, alpha):
    """Same value and gradient whole, over 4 data-parallel shards, or 16 accumulation micro-batches, and both
    equal to the exact CVaR's, fractional boundary atom included (64 * alpha is fractional for 0.05, 0.1, 0.3)."""
    x = torch.randn(64, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 3
    exact_leaf = x.clone().requires_grad_(True)
    exact = cvar_lower(exact_leaf, alpha) if tail == "lower" else cvar_upper(exact_leaf, alpha)
    exact.backward()

    def run(n_parts):
        leaf = x.clone().requires_grad_(True)
        # threshold and counts of the gathered batch (all_gather across ranks / the whole accumulation step)
        threshold = var_lower(leaf.detach(), alpha) if tail == "lower" else var_upper(leaf.detach(), alpha)
        counts = sum(tail_counts(part.detach(), threshold, tail) for part in leaf.detach().chunk(n_parts))
        total = 0.0
        for part in leaf.chunk(n_parts):
            part_value = ru_cvar_terms(part, threshold, alpha, tail, counts).mean() * part.numel() / leaf.numel()
            part_value.backward()  # as each micro-batch / rank would
            total += part_value.item()
        return total, leaf.grad

    for n_parts in (1, 4, 16):
        value, grad = run(n_parts)
        assert value == pytest.approx(exact.item(), abs=1e-12)
        assert torch.allclose(grad, exact_leaf.grad, atol=1e-12), n_parts


def test_ru_cvar_boundary_atom_gradient():
    """x = [3, -1, .5, -2, 1], alpha = 0.3: the worst sample has weight 1/1.5, the boundary atom 0.5/1.5."""
    x = torch.tensor([3.0, -1.0, 0.5, -2.0, 1.0], dtype=torch.float64, requires_grad=True)
    ru_cvar_terms(x, var_lower(x.detach(), 0.3), 0.3).mean().backward()
    assert torch.allclose(x.grad, torch.tensor([0, 1 / 3, 0, 2 / 3, 0], dtype=torch.float64))
    assert x.grad.sum().item() == pytest.approx(1.0)  # translation equivariance


def test_ru_rejects_unknown_tail():
    with pytest.raises(ValueError, match="tail='middle'"):
        ru_cvar_terms(torch.zeros(3), torch.tensor(0.0), 0.1, "middle")


def test_linear_quantile_matches_torch_quantile():
    x = torch.randn(3, 5, 101, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for q in (0.0, 0.05, 0.3, 0.5, 0.97, 1.0):
        assert torch.allclose(linear_quantile(x, q), torch.quantile(x, q, dim=-1))


def test_weighted_vocab_cvar_properties():
    g = torch.Generator().manual_seed(4)
    d = torch.randn(6, 50, dtype=torch.float64, generator=g)
    ref_logp = torch.log_softmax(torch.randn(6, 50, dtype=torch.float64, generator=g), -1)
    kl_like = (ref_logp.exp() * d).sum(-1)
    assert torch.allclose(vocab_weighted_cvar(d, ref_logp, 1.0), kl_like)
    # a smaller tail mass looks further into the upper tail
    assert (vocab_weighted_cvar(d, ref_logp, 0.1) >= vocab_weighted_cvar(d, ref_logp, 0.5) - 1e-12).all()
    # it is a p_ref-weighted quantity: padding the vocabulary with zero-probability entries changes nothing
    padded_d = torch.cat([d, torch.randn(6, 30, dtype=torch.float64, generator=g)], -1)
    padded_logp = torch.cat([ref_logp, torch.full((6, 30), -torch.inf, dtype=torch.float64)], -1)
    assert torch.allclose(vocab_weighted_cvar(padded_d, padded_logp, 0.3), vocab_weighted_cvar(d, ref_logp, 0.3))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(alpha=1.5), "alpha=1.5"),
        (dict(alpha=0.0), "alpha=0.0"),
        (dict(alpha=0.1, estimator="median"), "estimator='median'"),
        (dict(alpha=0.1, split_vocab=True), "split_vocab"),
    ],
)
def test_bad_risk_arguments_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        CVaR(**kwargs)
    with pytest.raises(ValueError, match="theta=0"):
        Entropic(0)


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.3, 1.0])
def test_batched_var_and_cvar_equal_the_one_dimensional_ones_row_by_row(alpha):
    # the bootstrap summarises (R, M) resamples in one call; ties and a fractional boundary atom included
    x = torch.randn(7, 3, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).round(decimals=1)
    for fn in (var_lower, cvar_lower, var_upper, cvar_upper):
        batched = fn(x, alpha)
        assert batched.shape == (7, 3)
        rows = torch.stack([fn(row, alpha) for row in x.reshape(-1, 30)]).reshape(7, 3)
        assert torch.equal(batched, rows), fn.__name__
