"""beta-DPO (beta_dpo.py): the authors' formulas, the Gaussian draw, step 0, the filtered mean in the model."""

import math

import pytest
import torch
from conftest import make_model, pairs

from batching import collate
from beta_dpo import BetaDPO
from losses import summarize


def test_beta_dpo_matches_the_authors_formulas():
    """Hand-computed from the beta-DPO code (junkangwu/beta-DPO, trainers.py): statistics updated
    before use from zero, int(B * rho) pairs kept, beta from the mean of the KEPT raw gaps."""
    import statistics
    gaps = [0.0, 0.1, -0.1, 0.05, 10.0, 0.2, -0.3, 0.15]
    bd = BetaDPO(alpha=0.6, rho=0.8, momentum=0.9)
    beta, w = bd.batch_beta(torch.tensor(gaps), 0.1, training=True)
    m0 = 0.9 * 0.0 + 0.1 * (sum(gaps) / 8)                      # 0.12625
    sigma = 0.9 * 0.0 + 0.1 * statistics.stdev(gaps)            # unbiased std, as torch.std()
    assert (bd.m0, bd.sigma) == (pytest.approx(m0), pytest.approx(sigma))
    assert w.sum() == 6 and set(w.tolist()) <= {0.0, 1.0}        # int(8 * 0.8) = 6 of 8 kept
    assert w[4] == 0  # the outlier, ~28 sigma from M0, has probability ~exp(-400)
    kept = [g for g, k in zip(gaps, w.tolist()) if k]
    assert beta.item() == pytest.approx(0.1 * (1 + 0.6 * (sum(kept) / 6 - m0)), rel=1e-6)
    # a second batch: the EMA moves from the first batch's statistics
    beta2, _ = bd.batch_beta(torch.tensor([1.0, 2.0, 3.0, 4.0]), 0.1, training=True)
    assert bd.m0 == pytest.approx(0.9 * m0 + 0.1 * 2.5)
    assert bd.sigma == pytest.approx(0.9 * sigma + 0.1 * statistics.stdev([1.0, 2.0, 3.0, 4.0]))
    assert bd.calls == 2
    state = bd.state()
    beta3, w3 = bd.batch_beta(torch.tensor([0.5, 0.6]), 0.1, training=False)  # evaluation: no filter, no update
    assert w3 is None and bd.state() == state
    assert beta3.item() == pytest.approx(0.1 * (1 + 0.6 * (0.55 - bd.m0)))


def test_beta_dpo_draws_with_the_gaussian_weights():
    """P(keep i) is exp(-((A_i - M0) / sigma)^2 / 2) normalised: with M0 = 0, sigma = 1 frozen
    (momentum 1) and one pair kept of gaps 0, 1, 2, the frequencies are 0.574, 0.348, 0.078."""
    bd = BetaDPO(alpha=0.0, rho=0.34, momentum=1.0)
    bd.m0, bd.sigma = 0.0, 1.0
    counts = torch.zeros(3)
    for _ in range(4000):
        counts += bd.batch_beta(torch.tensor([0.0, 1.0, 2.0]), 0.1, training=True)[1]
    p = torch.tensor([1.0, math.exp(-0.5), math.exp(-2.0)])
    assert torch.allclose(counts / 4000, p / p.sum(), atol=0.03), counts / 4000
    # the draws depend only on (seed, call count): a restored state draws the same pairs
    a, b = BetaDPO(rho=0.5, seed=3), BetaDPO(rho=0.5, seed=3)
    gaps = torch.randn(8)
    a.batch_beta(gaps, 0.1, True)
    b.load_state(a.state())
    torch.manual_seed(0)
    wa = a.batch_beta(gaps, 0.1, True)[1]
    torch.manual_seed(1)  # the global RNG does not matter
    assert torch.equal(wa, b.batch_beta(gaps, 0.1, True)[1])


def test_beta_dpo_first_step_with_zero_gaps_keeps_a_uniform_draw():
    bd = BetaDPO()
    beta, w = bd.batch_beta(torch.zeros(8), 0.1, training=True)  # step 0: policy == reference, every gap 0
    assert w.sum() == 6 and beta.item() == pytest.approx(0.1)


def test_beta_dpo_model_loss_is_the_filtered_mean():
    model = make_model(learnable=False)
    model.mode = BetaDPO(alpha=0.5, rho=0.7)  # int(0.7 * 3) = 2 pairs kept
    loss, stats = model(**collate(pairs(), 0))
    assert torch.all(stats["beta"] == stats["beta"][0]) and not stats["beta"].requires_grad
    gaps = ((stats["policy_chosen_logps"] - stats["reference_chosen_logps"])
            - (stats["policy_rejected_logps"] - stats["reference_rejected_logps"]))
    assert model.mode.m0 == pytest.approx(0.1 * gaps.mean().item(), rel=1e-5)
    # 2 of 3 pairs kept: beta from their raw gaps, the loss the mean of their losses
    matches = [k for k in range(3) if torch.allclose(loss, (stats["losses"].sum() - stats["losses"][k]) / 2)]
    assert matches, "the loss is not the mean over a 2-subset"
    kept = torch.tensor([i != matches[0] for i in range(3)])
    expected = 0.1 * (1 + 0.5 * (gaps[kept].mean().item() - model.mode.m0))
    assert stats["beta"][0].item() == pytest.approx(max(expected, 0.0), rel=1e-5)
    # the clamped fraction is measured before the clamp (it was always 0)
    model.beta_min, model.beta_max = 0.5, 1.0  # above every beta-DPO beta here
    _, stats = model(**collate(pairs(), 0))
    assert (stats["beta"] == 0.5).all() and summarize(stats, 0.1, 0.5, 1.0)["beta/clamped_frac"] == 1.0
