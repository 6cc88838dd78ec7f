"""ε-DPO (epsilon_dpo.py): the perturbed policies, the monotonicity test, the instance-level beta and the
baseline update, checked against numbers computed by hand; the mode in the model."""

import math

import pytest
import torch

from epsilon_dpo import (epsilon_dpo_baseline, epsilon_dpo_beta, epsilon_dpo_steps, EpsilonDPO, mixed_logps,
                         mixed_token_logps)
from logprobs import token_logps
from losses import dpo_loss


# -----------------------------------------------------------------------------
# cDPO / label smoothing


# -----------------------------------------------------------------------------
# ε-DPO: the perturbed policies (Proposition 1, Eqs. (3) and (4))


def identity_head(V: int = 3) -> torch.nn.Linear:
    """lm_head = identity: the logits ARE the hidden states, so the tests choose logits directly."""
    head = torch.nn.Linear(V, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(V))
    return head


# two positions of one sequence, V = 3. input_ids [2, 0, 1]: position 0 predicts token 0, position 1 token 1.
F_POLICY = [[2.0, 0.0, 0.0], [0.0, 1.0, -1.0], [9.0, 9.0, 9.0]]  # the last position predicts nothing
F_REF = [[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [9.0, 9.0, 9.0]]
IDS = [[2, 0, 1]]
# by hand, with eps = 0.5 so that the mixes have round numbers, lam in (1.5, 1, 0.5):
#   position 0, target 0:
#     lam 1.5: 1.5 * [2, 0, 0] - 0.5 * [0, 1, 0] = [3, -0.5, 0]    -> 3 - log(e^3 + e^-0.5 + 1)   = -0.0769466
#     lam 1  :                                     [2, 0, 0]       -> 2 - log(e^2 + 2)            = -0.2395448
#     lam 0.5: 0.5 * [2, 0, 0] + 0.5 * [0, 1, 0] = [1, 0.5, 0]     -> 1 - log(e + e^0.5 + 1)      = -0.6802697
#   position 1, target 1 (reference logits all 0, so the mix is lam * f):
#     lam 1.5: [0, 1.5, -1.5] -> 1.5 - log(1 + e^1.5 + e^-1.5)  = -0.2413113
#     lam 1  : [0, 1, -1]     -> 1 - log(1 + e + e^-1)          = -0.4076060
#     lam 0.5: [0, 0.5, -0.5] -> 0.5 - log(1 + e^0.5 + e^-0.5)  = -0.6802697
#   (log p of the target rises with lam at both positions: the policy moved towards it from the reference)
E = math.exp
BY_HAND = [
    [3 - math.log(E(3) + E(-0.5) + 1), 1.5 - math.log(1 + E(1.5) + E(-1.5))],
    [2 - math.log(E(2) + 2), 1 - math.log(1 + E(1) + E(-1))],
    [1 - math.log(E(1) + E(0.5) + 1), 0.5 - math.log(1 + E(0.5) + E(-0.5))],
]


def test_by_hand_numbers():
    # the decimals quoted in the comments above
    assert [r[0] for r in BY_HAND] == pytest.approx([-0.0769466, -0.2395448, -0.6802697], abs=1e-7)
    assert [r[1] for r in BY_HAND] == pytest.approx([-0.2413113, -0.4076060, -0.6802697], abs=1e-7)


def test_mixed_logps_by_hand():
    f, g = torch.tensor(F_POLICY[:2]), torch.tensor(F_REF[:2])
    out = mixed_logps(f, g, torch.tensor([0, 1]), (1.5, 1.0, 0.5))
    assert out.shape == (3, 2) and out.dtype == torch.float32
    assert out.tolist() == [pytest.approx(row, abs=1e-6) for row in BY_HAND]


def test_mixed_token_logps_by_hand():
    head = identity_head()
    out = mixed_token_logps(torch.tensor([F_POLICY]), head, torch.tensor([F_REF]), head, torch.tensor(IDS),
                            torch.ones(1, 2, dtype=torch.bool), (1.5, 1.0, 0.5))
    assert out.shape == (3, 1, 2) and out.dtype == torch.float32
    assert out[:, 0].tolist() == [pytest.approx(row, abs=1e-6) for row in BY_HAND]
    # a position that is not needed stays 0, the others keep their values
    out = mixed_token_logps(torch.tensor([F_POLICY]), head, torch.tensor([F_REF]), head, torch.tensor(IDS),
                            torch.tensor([[False, True]]), (1.5, 1.0, 0.5))
    assert (out[:, 0, 0] == 0).all() and out[:, 0, 1].tolist() == pytest.approx([r[1] for r in BY_HAND], abs=1e-6)


@pytest.mark.parametrize("bias", [False, True])
def test_mixed_token_logps_chunked_equals_plain(monkeypatch, bias):
    """Chunks of 3 positions (some partial) against the materialised paper form."""
    import logprobs
    V = 50
    monkeypatch.setattr(logprobs, "CPU_LOGITS_BYTES", 5 * 4 * V * 3)  # n = 3 positions per chunk
    torch.manual_seed(0)
    policy_head, reference_head = torch.nn.Linear(8, V, bias=bias), torch.nn.Linear(8, V, bias=bias)
    hidden = torch.randn(2, 7, 8, requires_grad=True)  # as from a forward that trains
    ref_hidden = hidden.detach() + 0.3 * torch.randn(2, 7, 8)
    ids = torch.randint(0, V, (2, 7))
    needed = torch.tensor([[1, 1, 0, 1, 1, 1], [0, 1, 1, 1, 1, 0]], dtype=torch.bool)
    coefs = (1.01, 1.0, 0.99, 0.0)
    out = mixed_token_logps(hidden, policy_head, ref_hidden, reference_head, ids, needed, coefs)
    plain = mixed_logps(policy_head(hidden[:, :-1]), reference_head(ref_hidden[:, :-1]), ids[:, 1:], coefs) * needed
    assert out.shape == (4, 2, 6) and not out.requires_grad  # no graph: the log-probs are only compared
    assert torch.allclose(out, plain, atol=1e-5)
    assert (out[:, ~needed] == 0).all()
    # lam = 1 is the policy itself, lam = 0 the reference: the values token_logps gives the DPO loss
    assert torch.allclose(out[1], token_logps(hidden, policy_head, ids, needed), atol=1e-6)
    assert torch.allclose(out[3], token_logps(ref_hidden, reference_head, ids, needed), atol=1e-6)


def test_mixed_token_logps_is_exact_where_the_policy_is_the_reference():
    """At step 0 the policy is the reference: f_theta + (lam - 1)(f_theta - f_ref) is f_theta exactly, so all
    three rows are equal bit for bit and no pair's beta moves (the paper's form 1.01 f - 0.01 f is not)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50)
    hidden = torch.randn(4, 6, 8)
    ids = torch.randint(0, 50, (4, 6))
    needed = torch.ones(4, 5, dtype=torch.bool)
    out = mixed_token_logps(hidden, head, hidden.clone(), head, ids, needed, (1.01, 1.0, 0.99))
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    seq = out.sum(-1)  # (3, 4): rows [:2] chosen, [2:] rejected
    assert (epsilon_dpo_steps(seq[:, :2], seq[:, 2:]) == 0).all()


def test_mixed_token_logps_from_bf16_is_fp32():
    head = torch.nn.Linear(8, 50).to(torch.bfloat16)
    hidden = torch.randn(2, 5, 8).to(torch.bfloat16)
    out = mixed_token_logps(hidden, head, hidden + 0.5, head, torch.randint(0, 50, (2, 5)),
                            torch.ones(2, 4, dtype=torch.bool), (1.01, 1.0, 0.99))
    assert out.dtype == torch.float32 and (out <= 0).all() and torch.isfinite(out).all()


# -----------------------------------------------------------------------------
# ε-DPO: the monotonicity test and the instance-level beta (Eq. (5))


def logps_for(z: list[tuple[float, float, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, B) chosen and rejected log-probs whose log-ratios under (beta / (1 + eps), beta, beta / (1 - eps))
    are the given triples; the rejected values are arbitrary (only the difference counts)."""
    zt = torch.tensor(z).T  # (3, B)
    rejected = -5.0 - torch.arange(zt.numel(), dtype=torch.float32).view_as(zt)
    return zt + rejected, rejected


def test_steps_each_branch_by_hand():
    chosen, rejected = logps_for([
        (1.2, 1.0, 0.8),   # z falls as beta rises: a smaller beta separates better -> +1, beta / (1 + eps)
        (0.8, 1.0, 1.2),   # z rises with beta -> -1, beta / (1 - eps)
        (1.2, 1.0, 1.1),   # not monotone -> 0
        (0.9, 1.0, 0.95),  # not monotone -> 0
        (1.0, 1.0, 1.0),   # all tied -> 0
        (1.2, 1.0, 1.0),   # one tie: the inequalities are strict -> 0
    ])
    steps = epsilon_dpo_steps(chosen, rejected)
    assert steps.tolist() == [1, -1, 0, 0, 0, 0] and steps.dtype == torch.int64
    beta, s = epsilon_dpo_beta(chosen, rejected, 0.1, 0.01)
    assert torch.equal(s, steps) and beta.dtype == torch.float32 and not beta.requires_grad
    # 0.1 / 1.01 = 0.0990099, 0.1 / 0.99 = 0.1010101, else 0.1
    assert beta.tolist() == pytest.approx([0.0990099, 0.1010101, 0.1, 0.1, 0.1, 0.1], abs=1e-7)


def pair_batch_logps(coefs: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probs (K, 3) of three pairs of one-token responses (V = 3, identity lm_head):
      pair 0, a pair the policy already gets right: chosen token 0 with f = [2, 0, 0] (pushed up),
              rejected token 1 with f = [0, -1, 0] (pushed down), reference logits all 0. Under the mix
              lam * f, log p(chosen) = 2 lam - log(e^(2 lam) + 2) RISES with lam and log p(rejected) =
              -lam - log(2 + e^-lam) FALLS, so z rises with lam, i.e. falls as beta / lam rises: +1.
      pair 1, a confusing pair: the same logits with chosen and rejected swapped, so z falls with lam: -1.
      pair 2: policy logits = reference logits = [0.3, -0.2, 0.1]: every lam gives the same z: 0."""
    f = torch.tensor([[2.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.3, -0.2, 0.1],    # chosen rows
                      [0.0, -1.0, 0.0], [2.0, 0.0, 0.0], [0.3, -0.2, 0.1]])   # rejected rows
    g = torch.zeros(6, 3)
    g[2] = g[5] = torch.tensor([0.3, -0.2, 0.1])
    targets = torch.tensor([0, 1, 0, 1, 0, 2])
    head = identity_head()
    ids = torch.stack([torch.zeros(6, dtype=torch.long), targets], 1)  # (6, T = 2): one predicted position
    seq = mixed_token_logps(f[:, None].expand(6, 2, 3), head, g[:, None].expand(6, 2, 3), head, ids,
                            torch.ones(6, 1, dtype=torch.bool), coefs).sum(-1)
    return seq[:, :3], seq[:, 3:]


def test_instance_beta_from_logits_by_hand():
    eps, beta0 = 0.01, 0.1
    chosen, rejected = pair_batch_logps((1 + eps, 1.0, 1 - eps))
    # pair 0 by hand: z(lam) = [2 lam - log(e^(2 lam) + 2)] - [-lam - log(2 + e^-lam)]
    def z0(lam):
        return (2 * lam - math.log(E(2 * lam) + 2)) - (-lam - math.log(2 + E(-lam)))
    assert (chosen - rejected)[:, 0].tolist() == pytest.approx([z0(1.01), z0(1.0), z0(0.99)], abs=1e-5)
    assert z0(1.01) > z0(1.0) > z0(0.99)  # 1.63513 > 1.62245 > 1.60972: rises with lam, ~0.013 per 0.01
    beta, steps = epsilon_dpo_beta(chosen, rejected, beta0, eps)
    assert steps.tolist() == [1, -1, 0]
    expected = [beta0 / (1 + eps), beta0 / (1 - eps), beta0]
    assert beta.tolist() == pytest.approx(expected, rel=1e-6)

    # The same test with the sign of eps wrong would fail: perturbing the other way round (coefficients
    # 1 - eps, 1, 1 + eps, i.e. reading beta / (1 - eps) as beta / (1 + eps)) flips every decision...
    wrong_chosen, wrong_rejected = pair_batch_logps((1 - eps, 1.0, 1 + eps))
    wrong_beta, wrong_steps = epsilon_dpo_beta(wrong_chosen, wrong_rejected, beta0, eps)
    assert wrong_steps.tolist() == [-1, 1, 0] != steps.tolist()
    assert wrong_beta.tolist() != pytest.approx(expected, rel=1e-6)
    # ... and so does a wrong sign in the step beta / (1 + eps * s)
    flipped_step, _ = epsilon_dpo_beta(chosen, rejected, beta0, -eps)
    assert flipped_step.tolist() != pytest.approx(expected, rel=1e-6)
    assert flipped_step[0].item() == pytest.approx(beta0 / (1 - eps), rel=1e-6)


# -----------------------------------------------------------------------------
# ε-DPO: the baseline update (Algorithm 1, line 5) and the running state


def test_baseline_update_by_hand():
    beta, eps = 0.1, 0.01
    # 5 pairs: s = +1, +1, +1, -1, 0 (3 down, 1 up); beta~ = 0.1/1.01 (x3), 0.1/0.99, 0.1
    beta_tilde = [beta / 1.01] * 3 + [beta / 0.99, beta]
    # harmonic (the authors' code): beta / (1 + eps * mean(s)) = 0.1 / (1 + 0.01 * 2/5) = 0.1 / 1.004 = 0.09960159
    h = epsilon_dpo_baseline(beta, eps, 3, 1, 5)
    assert h == pytest.approx(0.09960159, abs=1e-8)
    assert h == pytest.approx(5 / sum(1 / b for b in beta_tilde), rel=1e-12)  # the harmonic mean of beta~
    # arithmetic (the paper's E[beta~]): 0.1 * (3/1.01 + 1/0.99 + 1) / 5 = 0.1 * 4.9803980 / 5 = 0.09960796
    a = epsilon_dpo_baseline(beta, eps, 3, 1, 5, mean="arithmetic")
    assert a == pytest.approx(0.09960796, abs=1e-8)
    assert a == pytest.approx(sum(beta_tilde) / 5, rel=1e-12)
    # decisions that cancel: harmonic keeps beta, arithmetic drifts up to beta / (1 - eps^2) = 0.10001000
    assert epsilon_dpo_baseline(beta, eps, 2, 2, 4) == pytest.approx(beta, rel=1e-15)
    assert epsilon_dpo_baseline(beta, eps, 2, 2, 4, mean="arithmetic") == pytest.approx(0.1 / (1 - 1e-4), rel=1e-12)
    # all down: beta / (1 + eps); nothing counted: unchanged
    assert epsilon_dpo_baseline(beta, eps, 4, 0, 4) == pytest.approx(beta / 1.01, rel=1e-12)
    assert epsilon_dpo_baseline(beta, eps, 0, 0, 0) == beta
    with pytest.raises(ValueError, match="mean must be"):
        epsilon_dpo_baseline(beta, eps, 1, 0, 1, mean="geometric")


def test_epsilon_dpo_state_over_micro_batches_and_round_trip(tmp_path):
    eps = EpsilonDPO(beta=0.1, epsilon=0.01)
    assert eps.coefs == (1.01, 1.0, 0.99)
    # step 1, micro-batch 1: s = +1, +1, 0
    beta, s = eps.pair_beta(*logps_for([(1.2, 1.0, 0.8), (1.2, 1.0, 0.8), (1.0, 1.0, 1.0)]), training=True)
    assert s.tolist() == [1, 1, 0] and beta.tolist() == pytest.approx([0.1 / 1.01, 0.1 / 1.01, 0.1], rel=1e-6)
    # an evaluation batch in between: beta~ from the current baseline, nothing counted
    eps.pair_beta(*logps_for([(0.8, 1.0, 1.2)] * 4), training=False)
    # micro-batch 2: s = +1, -1; the baseline has not moved within the step
    beta, s = eps.pair_beta(*logps_for([(1.2, 1.0, 0.8), (0.8, 1.0, 1.2)]), training=True)
    assert beta.tolist() == pytest.approx([0.1 / 1.01, 0.1 / 0.99], rel=1e-6)
    assert eps.pending.tolist() == [3, 1, 5]
    # the optimizer step: 3 down, 1 up of 5 -> 0.1 / (1 + 0.01 * 2/5) = 0.1 / 1.004
    assert eps.update_() == pytest.approx(0.1 / 1.004, rel=1e-12) and eps.pending is None and eps.updates == 1
    # step 2 uses the new baseline
    beta, _ = eps.pair_beta(*logps_for([(1.2, 1.0, 0.8)]), training=True)
    assert beta.item() == pytest.approx(0.1 / 1.004 / 1.01, rel=1e-6)
    # save / load keeps everything, the pending counts included
    eps.save_pretrained(str(tmp_path))
    loaded = EpsilonDPO.from_pretrained(str(tmp_path))
    assert loaded.state() == eps.state() and loaded.state()["pending"] == [1, 0, 1]
    assert loaded.update_() == eps.update_() == pytest.approx(0.1 / 1.004 / 1.01, rel=1e-12)
    # a skipped (non-finite) step: the decisions are dropped and beta stays
    eps.pair_beta(*logps_for([(0.8, 1.0, 1.2)]), training=True)
    eps.discard_()
    assert eps.update_() == pytest.approx(0.1 / 1.004 / 1.01, rel=1e-12) and eps.updates == 2
    with pytest.raises(FileNotFoundError, match="epsilon_dpo.json"):
        EpsilonDPO.from_pretrained(str(tmp_path / "missing"))


def test_epsilon_dpo_separate_step_size_and_arithmetic_mean():
    # the paper's Table 5 ablation: eps_c = 0.01 checks, eps_s = 0.02 steps
    eps = EpsilonDPO(beta=0.05, epsilon=0.01, step_epsilon=0.02, mean="arithmetic")
    assert eps.coefs == (1.01, 1.0, 0.99)
    beta, _ = eps.pair_beta(*logps_for([(1.2, 1.0, 0.8), (0.8, 1.0, 1.2)]), training=True)
    assert beta.tolist() == pytest.approx([0.05 / 1.02, 0.05 / 0.98], rel=1e-6)
    # arithmetic mean of beta~: (0.05/1.02 + 0.05/0.98) / 2 = 0.05 / (1 - 0.02^2) = 0.05002001
    assert eps.update_() == pytest.approx(0.05 / (1 - 0.0004), rel=1e-12)


@pytest.mark.parametrize("kwargs, match", [
    (dict(epsilon=0.0), "epsilon must be in"), (dict(epsilon=1.0), "epsilon must be in"),
    (dict(epsilon=-0.01), "epsilon must be in"), (dict(beta=0.0), "beta must be"),
    (dict(step_epsilon=1.5), "step_epsilon"), (dict(mean="geometric"), "mean must be"),
])
def test_epsilon_dpo_rejects_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EpsilonDPO(**kwargs)


# -----------------------------------------------------------------------------
# ε-DPO inside DynamicBetaDPOModel.forward


def test_epsilon_dpo_forward_matches_its_parts():
    """forward() in ε-DPO mode: the reference log-probs it computes equal the reference's own, the
    per-pair beta equals epsilon_dpo_beta on the perturbed sequence log-probs, and at step 0
    (policy = reference) no pair's beta moves."""
    from conftest import small_qwen2

    from beta_head import DynamicBetaDPOModel
    from logprobs import run_model, sequence_logps
    from batching import collate
    from model_loader import frozen_copy
    policy = small_qwen2()
    eps = EpsilonDPO(beta=0.1, epsilon=0.3)
    model = DynamicBetaDPOModel(policy, reference_model=frozen_copy(policy), beta=0.1, mode=eps,
                                label_smoothing=0.2)
    g = torch.Generator().manual_seed(0)
    rows = [dict(prompt_ids=torch.randint(0, 128, (5 + i,), generator=g).tolist(),
                 chosen_ids=torch.randint(0, 128, (4 + i,), generator=g).tolist(),
                 rejected_ids=torch.randint(0, 128, (6 - i,), generator=g).tolist()) for i in range(3)]
    batch = collate(rows, pad_token_id=0)
    loss, stats = model(**batch)
    assert torch.equal(stats["epsilon_steps"], torch.zeros(3)) and torch.equal(stats["beta"], torch.full((3,), 0.1))
    ref = sequence_logps(model.reference_model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    assert torch.allclose(torch.cat([stats["reference_chosen_logps"], stats["reference_rejected_logps"]]), ref, atol=1e-5)
    m = (stats["policy_chosen_logps"] - stats["reference_chosen_logps"]) - (
        stats["policy_rejected_logps"] - stats["reference_rejected_logps"])
    assert loss.item() == pytest.approx(dpo_loss(m, torch.zeros(3), torch.zeros(3), torch.zeros(3), 0.1,
                                                 label_smoothing=0.2)[0].mean().item(), rel=1e-5)
    assert eps.pending.tolist() == [0, 0, 3]  # counted in training: 3 pairs, none moved

    with torch.no_grad():  # move the policy away from the reference: now betas move, as the parts say
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    _, stats = model(**batch)
    hidden = run_model(policy, batch["input_ids"], batch["attention_mask"])
    ref_hidden = run_model(model.reference_model, batch["input_ids"], batch["attention_mask"])
    response = batch["loss_mask"][:, 1:].bool()
    seq = (mixed_token_logps(hidden, policy.lm_head, ref_hidden, model.reference_model.lm_head,
                             batch["input_ids"], response, eps.coefs) * response).sum(-1)
    beta, steps = epsilon_dpo_beta(seq[:, :3], seq[:, 3:], 0.1, 0.3)
    assert torch.equal(stats["epsilon_steps"], steps.float()) and torch.allclose(stats["beta"], beta)
    assert steps.abs().sum() > 0  # the check above is not vacuous
    with pytest.raises(ValueError, match="not cached reference log-probs"):
        model(**batch, reference_logps=ref)
