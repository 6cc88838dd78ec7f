"""Learnable beta and the model (beta_head.py): the beta formula and its range, fused = separate PPL and beta,
packed = padded forward, where gradients go, the clamp and its pull, beta bounds per mode."""

import math

import pytest
import torch
from conftest import make_model, pairs, small_qwen2

from beta_head import BetaHead, DynamicBetaDPOModel
from logprobs import can_pack, run_model
from losses import dpo_loss, summarize
from registry import beta_bounds
from batching import collate


def test_beta_head_formula():
    torch.manual_seed(0)
    head = BetaHead(8, "linear", epsilon=0.3, init_w=0.02)
    torch.nn.init.normal_(head.nn.weight)
    torch.nn.init.normal_(head.nn.bias)
    h, ppl = torch.randn(5, 8), torch.rand(5) * 50 + 1
    expected = 0.02 * ppl * (1 + 0.3 * torch.tanh(h @ head.nn.weight[0] + head.nn.bias[0]))
    assert torch.allclose(head(h, ppl), expected, rtol=1e-5)


@pytest.mark.parametrize("structure", ["linear", "mlp"])
def test_beta_head_positive_and_bounded(structure):
    torch.manual_seed(0)
    head = BetaHead(16, structure, epsilon=0.5, init_w=1e-3)
    for p in head.nn.parameters():
        torch.nn.init.normal_(p, std=10.0)  # saturate tanh both ways
    with torch.no_grad():
        head.log_w.fill_(-30.0)  # w = exp(-30): still positive, a raw w could have gone negative
    h, ppl = torch.randn(64, 16) * 10, torch.rand(64) * 1000 + 1
    beta = head(h, ppl)
    w = head.w
    assert (beta > 0).all()
    assert (beta >= w * ppl * 0.5 * (1 - 1e-6)).all() and (beta <= w * ppl * 1.5 * (1 + 1e-6)).all()
    assert (beta < w * ppl * 0.9).any() and (beta > w * ppl * 1.1).any()  # both ends reached


def test_beta_head_starts_at_w_times_ppl_and_rescales():
    head = BetaHead(8, "mlp", epsilon=0.1)
    h, ppl = torch.randn(4, 8), torch.tensor([2.0, 4.0, 8.0, 10.0])
    assert torch.allclose(head(h, ppl), ppl)  # f(h) = 1 at init, w = 1
    head.rescale_(h, ppl, 0.1)
    assert head(h, ppl).mean().item() == pytest.approx(0.1, rel=1e-5)


def test_log_ppl_transform_formula_and_round_trip(tmp_path):
    """The log-PPL stabiliser: beta = w * log(ppl) * f(h), kept through save/load."""
    torch.manual_seed(0)
    head = BetaHead(8, "linear", epsilon=0.3, init_w=0.05, ppl_transform="log")
    torch.nn.init.normal_(head.nn.weight)
    h, ppl = torch.randn(5, 8), torch.tensor([1.5, 5.0, 20.0, 80.0, 160.0])
    expected = 0.05 * ppl.log() * (1 + 0.3 * torch.tanh(h @ head.nn.weight[0] + head.nn.bias[0]))
    assert torch.allclose(head(h, ppl), expected, rtol=1e-5)
    head.save_pretrained(str(tmp_path))
    loaded = BetaHead.from_pretrained(str(tmp_path))
    assert loaded.ppl_transform == "log" and torch.equal(loaded(h, ppl), head(h, ppl))
    with pytest.raises(ValueError, match="ppl_transform"):
        BetaHead(8, ppl_transform="sqrt")


def test_beta_head_rejects_bad_config():
    with pytest.raises(ValueError, match="epsilon"):
        BetaHead(8, epsilon=1.0)
    with pytest.raises(ValueError, match="nn_structure"):
        BetaHead(8, nn_structure="transformer")


def test_beta_head_save_load_round_trip(tmp_path):
    head = BetaHead(8, "mlp", epsilon=0.2, mlp_hidden_size=4)
    torch.nn.init.normal_(head.nn[-1].weight)
    head.save_pretrained(str(tmp_path))
    loaded = BetaHead.from_pretrained(str(tmp_path))
    assert loaded.config() == head.config()
    h, ppl = torch.randn(3, 8), torch.rand(3) + 1
    assert torch.equal(loaded(h, ppl), head(h, ppl))


# --- with a model -------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("structure", ["linear", "mlp"])
def test_fused_beta_equals_prompt_alone(side, structure):
    model = make_model(structure=structure)
    exs = pairs()
    batch = collate(exs, pad_token_id=0, padding_side=side)
    with torch.no_grad():
        _, stats = model(**batch)
        for i, e in enumerate(exs):
            ids = torch.tensor([e["prompt_ids"]])
            ppl = model.compute_ppl(ids, torch.ones_like(ids))
            beta = model.get_dynamic_beta(ids, torch.ones_like(ids))
            assert torch.allclose(stats["ppl"][i], ppl[0], rtol=1e-5)
            assert torch.allclose(stats["beta"][i], beta[0], rtol=1e-5)
    assert stats["beta"].std() > 0  # the check is not trivially between constants


def test_left_and_right_padding_give_same_loss():
    model = make_model()
    exs = pairs()
    with torch.no_grad():
        lr, sr = model(**collate(exs, 0, "right"))
        ll, sl = model(**collate(exs, 0, "left"))
    assert torch.allclose(lr, ll, atol=1e-6)
    assert torch.allclose(sr["policy_chosen_logps"], sl["policy_chosen_logps"], atol=1e-4)


def test_masked_positions_are_ignored():
    model = make_model()
    batch = collate(pairs(), pad_token_id=0)
    other = dict(batch, input_ids=torch.where(batch["attention_mask"] == 1, batch["input_ids"], 77))
    assert not torch.equal(other["input_ids"], batch["input_ids"])
    with torch.no_grad():
        a, sa = model(**batch)
        b, sb = model(**other)
    assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(sa["ppl"], sb["ppl"], rtol=1e-5)


# --- the shared-prompt packed forward ----------------------------------------------------------


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("learnable", [True, False])
def test_shared_prompt_equals_padded_forward_values_and_gradients(impl, side, learnable):
    """share_prompt runs each prompt once in a packed layout; the loss, every per-example stat and
    every gradient equal those of the padded (2B, T) forward that runs each prompt twice."""
    model = make_model(learnable=learnable)
    for m in (model.policy_model, model.reference_model):
        m.config._attn_implementation = impl
    batch = collate(pairs(), 0, side)
    results = []
    for share in (False, True):
        model.share_prompt = share
        model.zero_grad()
        loss, stats = model(**batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), stats, grads))
    (la, sa, ga), (lb, sb, gb) = results
    assert torch.allclose(la, lb, atol=1e-6)
    for k in sa:
        assert torch.allclose(sa[k], sb[k], rtol=1e-5, atol=1e-5), k
    assert set(ga) == set(gb) and len(ga) > 10
    for n in ga:
        assert torch.allclose(ga[n], gb[n], rtol=1e-4, atol=1e-7), n
    assert max(g.abs().max() for g in ga.values()) > 1e-3  # the gradients compared are not all zero


def test_no_packing_where_a_custom_mask_would_be_wrong():
    """Flash-attention kernels take no 4D mask and a sliding window would be replaced by ours:
    those models run the padded forward, with the same values."""
    model = DynamicBetaDPOModel(small_qwen2(), beta=0.1)
    policy = model.policy_model
    assert can_pack(policy)
    batch = collate(pairs(), 0)
    args = (batch["input_ids"], batch["attention_mask"])
    assert model.pair_layout(*args, batch["prompt_mask"]) is not None
    with torch.no_grad():
        padded = run_model(policy, *args)
        policy.config.sliding_window = 4
        assert not can_pack(policy)
        layout = model.pair_layout(*args, batch["prompt_mask"])
        assert layout is None
        real = batch["attention_mask"].bool()
        assert torch.equal(run_model(policy, *args, layout)[real], padded[real])
    policy.config.sliding_window = None
    policy.config._attn_implementation = "flash_attention_2"
    assert not can_pack(policy) and model.pair_layout(*args, batch["prompt_mask"]) is None


@pytest.mark.parametrize("structure", ["linear", "mlp"])
def test_gradients_reach_w_and_nn(structure):
    model = make_model(structure=structure)
    loss, _ = model(**collate(pairs(), 0))
    loss.backward()
    head = model.beta_head
    assert head.log_w.grad is not None and head.log_w.grad.abs() > 0
    for name, p in head.nn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def _policy_grads(model, batch):
    model.zero_grad()
    loss, _ = model(**batch)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.policy_model.parameters()])


def test_beta_is_detached_from_policy_by_default():
    batch = collate(pairs(), 0)
    model = make_model()
    with torch.no_grad():
        beta = model(**batch)[1]["beta"]
    g_learn = _policy_grads(model, batch)
    # same loss with the same beta values as constants: identical policy gradients
    fixed = make_model()
    fixed.mode.prompt_beta = lambda ppl, h, *bounds: (beta, beta)
    g_const = _policy_grads(fixed, batch)
    assert torch.allclose(g_learn, g_const, atol=1e-7)
    # with --beta_grad_to_policy the policy also gets gradient through PPL and h
    g_flow = _policy_grads(make_model(grad_to_policy=True), batch)
    assert not torch.allclose(g_flow, g_const, atol=1e-6)


def test_fixed_mode_uses_constant_beta_and_no_head_params():
    model = make_model(learnable=False)
    loss, stats = model(**collate(pairs(), 0))
    assert torch.all(stats["beta"] == 0.1)
    assert all("beta_head" not in n for n, _ in model.named_parameters())
    assert all("reference" not in n for n in model.state_dict())  # reference not a submodule
    # fixed-beta loss equals dpo_loss on the same log-probs (the hand-checked function)
    expected = dpo_loss(stats["policy_chosen_logps"], stats["policy_rejected_logps"],
                        stats["reference_chosen_logps"], stats["reference_rejected_logps"], 0.1)[0].mean()
    assert torch.allclose(loss, expected)


def test_clamp_and_regulariser():
    model = make_model()
    batch = collate(pairs(), 0)
    with torch.no_grad():
        _, free = model(**batch)
    lo, hi = free["raw_beta"].min().item(), free["raw_beta"].max().item()
    mid = (lo + hi) / 2
    model.beta_min, model.beta_max = mid, mid * 1.0001
    loss, stats = model(**batch)
    assert stats["beta"].min() >= mid and stats["beta"].max() <= mid * 1.0001
    m = summarize(stats, 0.1, model.beta_min, model.beta_max)
    assert m["beta/clamped_frac"] > 0
    model.mode.beta_reg = 1.0
    loss_reg, _ = model(**batch)
    reg = (stats["raw_beta"].log() - math.log(0.1)).pow(2).mean()
    assert loss_reg.item() == pytest.approx(loss.item() + reg.item(), rel=1e-5)


def test_a_head_clamped_everywhere_still_learns_back_into_bounds():
    """Every raw beta above beta_max: the DPO term gives the head no gradient (the clamp is flat
    there), the pull gives one that lowers w; inside the bounds the pull is exactly zero."""
    model = make_model()
    batch = collate(pairs(), 0)
    with torch.no_grad():
        _, free = model(**batch)
    unclamped_loss = free["losses"].mean()
    model.beta_min, model.beta_max = 1e-9, 1e9  # far outside: nothing binds, no pull
    loss, _ = model(**batch)
    assert loss.item() == pytest.approx(unclamped_loss.item(), rel=1e-6)

    bound = free["raw_beta"].min().item() / 2  # every raw beta is above it
    model.beta_min, model.beta_max = bound / 10, bound
    loss, stats = model(**batch)
    assert (stats["beta"] == bound).all() and summarize(stats, 0.1, bound / 10, bound)["beta/clamped_frac"] == 1.0
    model.beta_head.zero_grad()
    loss.backward()
    pull = (stats["raw_beta"].log() - math.log(bound)).pow(2).mean()
    assert loss.item() == pytest.approx(stats["losses"].mean().item() + pull.item(), rel=1e-5)
    # all of w's gradient is the pull's (the DPO term gives none through the clamp):
    # d pull / d log_w = 2 * mean(log raw - log bound) > 0, so gradient descent lowers w back into range
    assert model.beta_head.log_w.grad.item() == pytest.approx(
        2 * (stats["raw_beta"].log() - math.log(bound)).mean().item(), rel=1e-4)
    assert sum(p.grad.abs().sum() for p in model.beta_head.nn.parameters()) > 0


def test_calibration_targets_the_clamped_beta_that_training_uses():
    head = BetaHead(8, "linear")
    h, ppl = torch.randn(6, 8), torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1000.0])  # one heavy-tailed prompt
    head.rescale_(h, ppl, 0.1)
    assert head(h, ppl).mean().item() == pytest.approx(0.1, rel=1e-5)
    assert head(h, ppl).clamp(0.01, 0.3).mean().item() < 0.06  # the clamp would cut the mean by 40%
    head.rescale_(h, ppl, 0.1, beta_min=0.01, beta_max=0.3)
    assert head(h, ppl).clamp(0.01, 0.3).mean().item() == pytest.approx(0.1, rel=1e-4)


def test_beta_bounds_defaults_per_mode_and_overrides():
    assert beta_bounds("learnable", 0.03) == pytest.approx((0.003, 0.3))
    assert beta_bounds("beta_dpo", 0.1) == (1e-3, math.inf)  # the authors' floor, no ceiling
    assert beta_bounds("beta_dpo", 0.005) == pytest.approx((0.0005, math.inf))  # a floor below a small beta
    assert beta_bounds("fixed", 0.1) == beta_bounds("epsilon_dpo", 0.1) == (0.0, math.inf)
    assert beta_bounds("learnable", 0.03, 0.0, math.inf) == (0.0, math.inf)  # given bounds win
    assert beta_bounds("learnable", 0.03, beta_max=1.0) == pytest.approx((0.003, 1.0))
