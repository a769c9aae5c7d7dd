"""Objectives and per-sequence statistics against the golden vectors, plus the invariances between methods."""

import json
from pathlib import Path

import pytest
import torch

from riskexp.logps import sequence_stats
from riskexp.objectives import DPO, IPO, TDPO, RaDPO, dpo_loss, ipo_loss, token_level_loss
from riskexp.risk import CVaR, Entropic, Mean

GOLDEN = json.loads((Path(__file__).parent / "golden" / "preference_losses.json").read_text())
# IPO and cDPO on the same batch's log-ratios (shared/golden/ipo_cdpo.json)
IPO_CDPO = json.loads((Path(__file__).parent / "golden" / "ipo_cdpo.json").read_text())
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4}


def golden_inputs(dtype):
    policy = torch.tensor(GOLDEN["policy_logits"], dtype=dtype, requires_grad=True)
    reference = torch.tensor(GOLDEN["reference_logits"], dtype=dtype)
    labels = torch.tensor(GOLDEN["labels"])
    return policy, reference, labels


def stats_for(dtype, risk=None, chunk_size=64):
    policy, reference, labels = golden_inputs(dtype)
    vocab_risk = risk.over_vocab if risk is not None else None
    stats = sequence_stats(policy, labels, reference, vocab_terms=True, vocab_risk=vocab_risk, chunk_size=chunk_size)
    return policy, stats


def close(actual, expected, dtype):
    expected = torch.tensor(expected, dtype=torch.float64)
    assert torch.allclose(actual.detach().double(), expected, atol=TOLERANCE[dtype], rtol=0), (actual, expected)


def risk_from_case(case):
    if case["estimator"] == "entropic":
        return Entropic(theta=case["mu"])
    if case["estimator"] == "weighted_cvar":
        return CVaR(alpha=case["level"], estimator="weighted")
    return CVaR(alpha=case["level"], estimator="reference", split_vocab=case["split_vocab"])


DTYPES = [torch.float64, torch.float32]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_size", [1, 2, 64])
def test_per_sequence_statistics(dtype, chunk_size):
    _, stats = stats_for(dtype, chunk_size=chunk_size)
    expected = GOLDEN["per_sequence"]
    close(stats.logratios, expected["logps_margin"], dtype)
    close(stats.seq_kl, expected["seq_kl"], dtype)
    # the golden rB row differs from the brief's table in the last digits; the JSON is the reference
    close(stats.policy_logps, expected["policy_logps"], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dpo_golden(dtype):
    _, stats = stats_for(dtype)
    out = DPO(beta=GOLDEN["beta"])(stats)
    close(out.losses, GOLDEN["dpo"]["per_pair_loss"], dtype)
    close(out.losses.mean(), GOLDEN["dpo"]["mean_loss"], dtype)
    close(out.chosen_rewards, GOLDEN["dpo"]["chosen_rewards"], dtype)
    close(out.rejected_rewards, GOLDEN["dpo"]["rejected_rewards"], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.25])
def test_cdpo_golden(dtype, label_smoothing):
    _, stats = stats_for(dtype)
    close(stats.logratios, IPO_CDPO["logratios_chosen"] + IPO_CDPO["logratios_rejected"], dtype)
    expected = IPO_CDPO[f"cdpo_label_smoothing_{label_smoothing}"]
    out = DPO(beta=IPO_CDPO["beta"], label_smoothing=label_smoothing)(stats)
    close(out.losses, expected["per_pair_loss"], dtype)
    close(out.losses.mean(), expected["mean_loss"], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_ipo_golden(dtype, beta):
    _, stats = stats_for(dtype)
    expected = IPO_CDPO[f"ipo_beta_{beta}"]
    out = IPO(beta=beta)(stats)
    close(out.losses, expected["per_pair_loss"], dtype)
    close(out.losses.mean(), expected["mean_loss"], dtype)
    h = torch.tensor(IPO_CDPO["h"], dtype=dtype)
    close(ipo_loss(h, torch.zeros_like(h), beta), expected["per_pair_loss"], dtype)


def test_ipo_averaged_per_token_is_trls_form():
    """average_log_ratios=True divides each sequence's log-ratio by its response length (TRL's IPO); the golden
    batch's responses have [3, 3] chosen and [3, 2] rejected tokens."""
    _, stats = stats_for(torch.float64)
    chosen = torch.tensor(IPO_CDPO["logratios_chosen"], dtype=torch.float64) / torch.tensor([3.0, 3.0])
    rejected = torch.tensor(IPO_CDPO["logratios_rejected"], dtype=torch.float64) / torch.tensor([3.0, 2.0])
    out = IPO(beta=0.1, average_log_ratios=True)(stats)
    close(out.losses, ((chosen - rejected - 5.0) ** 2).tolist(), torch.float64)
    close(out.chosen_rewards, (0.1 * chosen).tolist(), torch.float64)
    close(out.rejected_rewards, (0.1 * rejected).tolist(), torch.float64)
    summed = IPO(beta=0.1)(stats).losses
    assert not torch.allclose(out.losses, summed)
    # the config's knob reaches the objective; summed log-ratios are the default
    from helpers import compose_config
    from hydra.utils import instantiate

    assert not instantiate(compose_config(["algo=ipo"]).algo.objective).average_log_ratios
    assert instantiate(compose_config(["algo=ipo", "algo.average_log_ratios=true"]).algo.objective).average_log_ratios


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", [1, 2])
def test_tdpo_golden(dtype, variant):
    _, stats = stats_for(dtype)
    out = TDPO(beta=GOLDEN["beta"], variant=variant, kl_weight=GOLDEN["kl_weight"])(stats)
    expected = GOLDEN[f"tdpo{variant}"]
    close(out.losses, expected["per_pair_loss"], dtype)
    close(out.losses.mean(), expected["mean_loss"], dtype)
    close(out.chosen_rewards, expected["chosen_rewards"], dtype)
    close(out.rejected_rewards, expected["rejected_rewards"], dtype)


CASES = GOLDEN["ra_dpo"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=[f"{c['estimator']}-{c.get('level', c.get('mu'))}-{c.get('split_vocab', '')}" for c in CASES])
def test_ra_dpo_golden(dtype, case):
    risk = risk_from_case(case)
    _, stats = stats_for(dtype, risk)
    close(stats.seq_risk, case["seq_risk_ratio"], dtype)
    for variant in (1, 2):
        out = RaDPO(beta=GOLDEN["beta"], risk=risk, variant=variant, kl_weight=GOLDEN["kl_weight"])(stats)
        expected = case[f"ra_dpo{variant}"]
        close(out.losses, expected["per_pair_loss"], dtype)
        close(out.losses.mean(), expected["mean_loss"], dtype)
        close(out.chosen_rewards, expected["chosen_rewards"], dtype)
        close(out.rejected_rewards, expected["rejected_rewards"], dtype)


# Gradient norms per sequence [cA, cB, rA, rB] of the summed pair losses w.r.t. the policy logits (ra_dpo.md §6.2).
GRAD_NORMS = {
    ("tdpo", 1, 1.0): [0.110828, 0.075148, 0.115130, 0.049007],
    ("tdpo", 2, 1.0): [0.118035, 0.070857, 0.115130, 0.049007],
    ("ra_dpo", 1, 1.0): [0.114623, 0.074401, 0.112377, 0.048344],
    ("ra_dpo", 2, 1.0): [0.117179, 0.069638, 0.112377, 0.048344],
    ("tdpo", 2, 0.5): [0.116153, 0.075208, 0.099167, 0.053160],
    ("ra_dpo", 2, 0.5): [0.115719, 0.074584, 0.097638, 0.052802],
}


@pytest.mark.parametrize("key", list(GRAD_NORMS), ids=str)
def test_variant2_stop_gradient_on_gradients(key):
    """With kl_weight = 1 variant 2 has variant 1's value; only the chosen rows' gradients differ (the sg)."""
    algo, variant, kl_weight = key
    risk = CVaR(alpha=0.95, estimator="reference", split_vocab=True) if algo == "ra_dpo" else None
    objective = (RaDPO(0.1, risk, variant, kl_weight) if risk else TDPO(0.1, variant, kl_weight))
    policy, stats = stats_for(torch.float64, risk)
    objective(stats).losses.sum().backward()
    norms = policy.grad.flatten(1).norm(dim=1)
    assert torch.allclose(norms, torch.tensor(GRAD_NORMS[key], dtype=torch.float64), atol=2e-6), norms


def test_variant2_gradient_differs_only_on_chosen_rows():
    grads = {}
    for variant in (1, 2):
        policy, stats = stats_for(torch.float64, CVaR(0.95, "reference", True))
        loss = RaDPO(0.1, CVaR(0.95, "reference", True), variant, kl_weight=1.0)(stats).losses.sum()
        loss.backward()
        grads[variant] = (loss.item(), policy.grad.clone())
    assert grads[1][0] == pytest.approx(grads[2][0], abs=1e-12)
    assert torch.allclose(grads[1][1][2:], grads[2][1][2:], atol=1e-12)  # rejected rows
    assert not torch.allclose(grads[1][1][:2], grads[2][1][:2], atol=1e-6)  # chosen rows


# --- invariances, on realistic sizes -------------------------------------------------------------------


def random_batch(n_pairs=4, length=48, vocab=4096, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    policy = (torch.randn(2 * n_pairs, length, vocab, generator=g, dtype=dtype) * 2).requires_grad_(True)
    reference = torch.randn(2 * n_pairs, length, vocab, generator=g, dtype=dtype) * 2
    labels = torch.randint(0, vocab, (2 * n_pairs, length), generator=g)
    prompt_lengths = torch.randint(4, length // 2, (2 * n_pairs,), generator=g)
    pad_from = length - torch.randint(0, 8, (2 * n_pairs,), generator=g)
    positions = torch.arange(length)
    labels[(positions < prompt_lengths[:, None]) | (positions >= pad_from[:, None])] = -100
    return policy, reference, labels


@pytest.mark.parametrize("variant", [1, 2])
def test_ra_dpo_with_mean_equals_tdpo(variant):
    policy, reference, labels = random_batch()
    ra = sequence_stats(policy, labels, reference, vocab_terms=True, vocab_risk=Mean().over_vocab, chunk_size=16)
    td = sequence_stats(policy, labels, reference, vocab_terms=True, chunk_size=16)
    ra_loss = RaDPO(0.1, Mean(), variant)(ra).losses
    td_loss = TDPO(0.1, variant)(td).losses
    assert torch.allclose(ra_loss, td_loss, atol=1e-12)
    g_ra = torch.autograd.grad(ra_loss.sum(), policy)[0]
    g_td = torch.autograd.grad(td_loss.sum(), policy)[0]
    assert torch.allclose(g_ra, g_td, atol=1e-12)


def test_ra_dpo_with_cvar_at_alpha_one_equals_tdpo():
    policy, reference, labels = random_batch(seed=1)
    ra = sequence_stats(policy, labels, reference, vocab_terms=True, vocab_risk=CVaR(1.0).over_vocab)
    assert torch.allclose(ra.seq_risk, ra.seq_kl, atol=1e-9)


def test_entropic_tends_to_tdpo_as_theta_goes_to_zero():
    policy, reference, labels = random_batch(seed=2, vocab=512)
    gaps = []
    for theta in (1e-2, 1e-4, 1e-6):
        stats = sequence_stats(policy, labels, reference, vocab_terms=True, vocab_risk=Entropic(theta).over_vocab)
        gaps.append((stats.seq_risk - stats.seq_kl).abs().max().item())
    # the gap is about theta/2 * Var(d) per token: it shrinks linearly with theta
    assert gaps[0] > 50 * gaps[1] > 2500 * gaps[2] and gaps[2] < 1e-3


def test_chunking_does_not_change_values_or_gradients():
    policy, reference, labels = random_batch(seed=3, vocab=1024)
    results = []
    for chunk_size in (5, 64):
        stats = sequence_stats(policy, labels, reference, vocab_terms=True, vocab_risk=CVaR(0.3).over_vocab,
                               chunk_size=chunk_size)
        loss = RaDPO(0.1, CVaR(0.3), 2)(stats).losses.sum()
        results.append((loss.detach(), torch.autograd.grad(loss, policy)[0]))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-12)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-12)


def test_sequence_level_path_matches_token_level_logratios():
    policy, reference, labels = random_batch(seed=4, vocab=256)
    cheap = sequence_stats(policy, labels, reference, chunk_size=7)
    full = sequence_stats(policy, labels, reference, vocab_terms=True)
    assert torch.allclose(cheap.logratios, full.logratios, atol=1e-10)
    assert cheap.seq_kl is None


def test_precomputed_reference_logps_give_the_same_dpo_loss():
    policy, reference, labels = random_batch(seed=5, vocab=256)
    live = sequence_stats(policy, labels, reference)
    cached = sequence_stats(policy, labels, ref_logps=live.ref_logps.detach())
    assert torch.allclose(DPO(0.1)(live).losses, DPO(0.1)(cached).losses)


def test_output_head_runs_in_float32_under_bf16_autocast():
    """The head matmul of the token-level terms leaves autocast: under CPU bf16 autocast the chunked sums equal
    the float32 ones, where bf16 logits (what the head gives under autocast) move the KL and the risk ratio."""
    g = torch.Generator().manual_seed(7)
    n, length, width, vocab = 4, 24, 32, 3000
    heads = []
    for _ in range(2):
        head = torch.nn.Linear(width, vocab, bias=False)
        with torch.no_grad():
            head.weight.copy_(torch.randn(vocab, width, generator=g) * 0.6)
        heads.append(head)
    hidden, ref_hidden = (torch.randn(n, length, width, generator=g) for _ in range(2))
    labels = torch.randint(0, vocab, (n, length), generator=g)
    labels[:, :6] = -100
    risk = CVaR(0.5, "weighted").over_vocab
    kw = dict(vocab_terms=True, vocab_risk=risk, chunk_size=8)
    exact = sequence_stats(hidden, labels, ref_hidden, policy_head=heads[0], ref_head=heads[1], **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = sequence_stats(hidden, labels, ref_hidden, policy_head=heads[0], ref_head=heads[1], **kw)
        bf16_logits = heads[0](hidden), heads[1](ref_hidden)
    assert bf16_logits[0].dtype == torch.bfloat16
    naive = sequence_stats(bf16_logits[0], labels, bf16_logits[1], **kw)
    for name in ("logratios", "seq_kl", "seq_risk"):
        torch.testing.assert_close(getattr(autocast, name), getattr(exact, name), atol=1e-6, rtol=1e-6)
        assert (getattr(naive, name) - getattr(exact, name)).abs().max() > 1e-2, name


def test_pure_losses_by_hand():
    chosen, rejected = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.0])
    h = chosen - rejected
    assert torch.allclose(ipo_loss(chosen, rejected, 0.5), (h - 1.0) ** 2)
    smooth = dpo_loss(chosen, rejected, 0.1, label_smoothing=0.2)
    expected = -0.8 * torch.nn.functional.logsigmoid(0.1 * h) - 0.2 * torch.nn.functional.logsigmoid(-0.1 * h)
    assert torch.allclose(smooth, expected)
    # TDPO with zero terms is DPO
    zero = torch.zeros(2)
    assert torch.allclose(token_level_loss(chosen, rejected, zero, zero, 0.1, 1), dpo_loss(chosen, rejected, 0.1))
    assert IPO(0.5).losses(chosen, rejected).shape == (2,)


@pytest.mark.parametrize("bad", [dict(variant=3), dict(kl_weight=-1.0), dict(beta=-1.0)])
def test_objective_arguments_are_checked(bad):
    kwargs = dict(beta=0.1, variant=1, kl_weight=0.5) | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        TDPO(**kwargs)


def transcribed_reference_terms(policy, reference, labels, level):
    """The public Ra-DPO code's `get_batch_logps` + `calculate_cvar` (split vocabulary), transcribed in float64
    with torch.quantile and unchunked: an independent check of the chunked float32 path at realistic sizes."""
    labels = labels[:, 1:].clone()
    policy, reference = policy[:, :-1].double(), reference[:, :-1].double()
    mask = labels != -100
    labels[~mask] = 0
    logp = policy.log_softmax(-1)
    ref_p = reference.softmax(-1)
    ref_logp = ref_p.log()
    d = ref_logp - logp
    kl = (ref_p * d).sum(-1)
    mid = d.shape[-1] // 2
    risk = 0
    for half in (slice(0, mid), slice(mid, None)):
        var = torch.quantile(d[..., half], 1 - level, dim=-1, keepdim=True)
        risk = risk + (ref_p[..., half] * d[..., half] * (d[..., half] > var)).sum(-1)
    margin = logp.gather(-1, labels[..., None])[..., 0] - ref_logp.gather(-1, labels[..., None])[..., 0]
    return [(t * mask).sum(-1) for t in (margin, kl, risk)]


@pytest.mark.slow
def test_realistic_size_float32_chunked_matches_float64_transcription():
    """2 pairs x 64 tokens over SmolLM2's 49152-token vocabulary: values agree to float32 precision."""
    policy, reference, labels = random_batch(n_pairs=2, length=64, vocab=49152, seed=6, dtype=torch.float32)
    risk = CVaR(0.95, "reference", split_vocab=True)
    stats = sequence_stats(policy, labels, reference, vocab_terms=True, vocab_risk=risk.over_vocab, chunk_size=16)
    margin, kl, ratio = transcribed_reference_terms(policy.detach(), reference, labels, 0.95)
    assert torch.allclose(stats.logratios.double(), margin, rtol=1e-4, atol=1e-3)
    assert torch.allclose(stats.seq_kl.double(), kl, rtol=1e-4, atol=1e-3)
    assert torch.allclose(stats.seq_risk.double(), ratio, rtol=1e-4, atol=1e-3)
    for variant in (1, 2):
        ours = RaDPO(0.1, risk, variant)(stats).losses.double()
        theirs = token_level_loss(margin[:2], margin[2:], ratio[:2], ratio[2:], 0.1, variant)
        assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5)
