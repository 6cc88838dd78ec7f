"""The DPO loss (losses.py): hand-computed values, per-pair beta, detached rewards, and cDPO's label smoothing."""

import math

import pytest
import torch
import torch.nn.functional as F

from losses import dpo_loss


def test_dpo_loss_matches_hand_computed_value():
    # pi_logratio = -1 - (-2) = 1, ref_logratio = -1.5 - (-1.5) = 0, so beta * logits = 0.1
    losses, cr, rr = dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]),
                              torch.tensor([-1.5]), 0.1)
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-0.1)), abs=1e-7)  # 0.6443966...
    assert cr.item() == pytest.approx(0.1 * 0.5) and rr.item() == pytest.approx(0.1 * -0.5)


def test_dpo_loss_per_example_beta_and_detached_rewards():
    pc = torch.tensor([-1.0, -3.0], requires_grad=True)
    beta = torch.tensor([0.5, 2.0], requires_grad=True)
    losses, cr, rr = dpo_loss(pc, torch.tensor([-2.0, -1.0]), torch.zeros(2), torch.zeros(2), beta)
    expected = [math.log(1 + math.exp(-0.5 * 1.0)), math.log(1 + math.exp(-2.0 * -2.0))]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert not cr.requires_grad and not rr.requires_grad
    losses.sum().backward()
    # dL/dbeta = -sigmoid(-beta*m) * m: negative (beta pushed up) for m > 0, positive for m < 0
    assert beta.grad[0] < 0 < beta.grad[1]
    # a preferred chosen response (positive margin) has lower loss than the reverse
    assert losses[0] < dpo_loss(torch.tensor([-2.0]), torch.tensor([-1.0]), torch.zeros(1), torch.zeros(1), 0.5)[0][0]


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_label_smoothing_zero_is_bitwise_the_plain_loss():
    torch.manual_seed(0)
    pc, pr, rc, rr = (torch.randn(16) * 5 for _ in range(4))
    for beta in (0.1, torch.rand(16) + 0.01):
        plain = -F.logsigmoid(beta * ((pc - pr) - (rc - rr)))  # the expression dpo_loss computed before
        for out in (dpo_loss(pc, pr, rc, rr, beta), dpo_loss(pc, pr, rc, rr, beta, label_smoothing=0.0)):
            assert torch.equal(out[0], plain)
            assert torch.equal(out[1], beta * (pc - rc)) and torch.equal(out[2], beta * (pr - rr))


def test_label_smoothing_by_hand():
    # -(1 - ls) log sig(x) - ls log sig(-x) = (1 - ls) softplus(-x) + ls softplus(x) = softplus(-x) + ls x,
    # since softplus(x) = softplus(-x) + x.
    # pair 0: margin m = (-1 - -2) - (-1.5 - -1.5) = 1, beta 0.1, x = 0.1, ls = 0.1:
    #   softplus(-0.1) + 0.1 * 0.1 = 0.6443967 + 0.01 = 0.6543967
    # pair 1: m = (-3 - -1) - (0 - 0) = -2, beta 0.5, x = -1:
    #   softplus(1) + 0.1 * -1 = 1.3132617 - 0.1 = 1.2132617
    pc, pr = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0])
    rc, rr = torch.tensor([-1.5, 0.0]), torch.tensor([-1.5, 0.0])
    beta = torch.tensor([0.1, 0.5])
    losses, cr, rw = dpo_loss(pc, pr, rc, rr, beta, label_smoothing=0.1)
    assert losses.tolist() == pytest.approx([0.6543967, 1.2132617], abs=1e-6)
    assert losses.tolist() == pytest.approx([softplus(-0.1) + 0.01, softplus(1.0) - 0.1], abs=1e-6)
    # rewards do not depend on ls: beta * (policy - reference)
    assert cr.tolist() == pytest.approx([0.1 * 0.5, 0.5 * -3.0]) and rw.tolist() == pytest.approx([0.1 * -0.5, 0.5 * -1.0])
    # the same pair with ls = 0 is plain DPO: softplus(-0.1) = 0.6443967
    assert dpo_loss(pc, pr, rc, rr, beta)[0][0].item() == pytest.approx(0.6443967, abs=1e-6)


def test_label_smoothing_gradients_and_its_finite_optimum():
    # d/dbeta [softplus(-beta m) + ls beta m] = -m sig(-beta m) + ls m; m = 1, beta = 0.1, ls = 0.1:
    #   -sig(-0.1) + 0.1 = -0.4750208 + 0.1 = -0.3750208 (beta still pushed up, less than by plain DPO)
    beta = torch.tensor([0.1], requires_grad=True)
    pc = torch.tensor([-1.0], requires_grad=True)
    losses, _, _ = dpo_loss(pc, torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5]), beta,
                            label_smoothing=0.1)
    losses.sum().backward()
    assert beta.grad.item() == pytest.approx(-0.3750208, abs=1e-6)
    # d/dpc = beta (-sig(-beta m) + ls) = 0.1 * -0.3750208
    assert pc.grad.item() == pytest.approx(-0.03750208, abs=1e-7)
    # the margin is no longer pushed to +inf: the gradient vanishes where sig(beta m) = 1 - ls,
    # beta m = log((1 - ls) / ls) = log 9 = 2.1972246; here with beta = 1
    m = torch.tensor([math.log(9.0)], requires_grad=True)
    loss = dpo_loss(m, torch.zeros(1), torch.zeros(1), torch.zeros(1), 1.0, label_smoothing=0.1)[0]
    loss.sum().backward()
    assert abs(m.grad.item()) < 1e-6


@pytest.mark.parametrize("ls", [-0.1, 0.5, 0.7, float("nan")])
def test_label_smoothing_out_of_range_is_refused(ls):
    z = torch.zeros(2)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\)"):
        dpo_loss(z, z, z, z, 0.1, label_smoothing=ls)
