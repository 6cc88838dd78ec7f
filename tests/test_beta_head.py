"""The math: loss values, the beta formula, masked PPL, fused = separate, where gradients go."""

import math

import pytest
import torch
from conftest import small_qwen2

from beta_head import BetaHead, DynamicBetaDPOModel
from logprobs import can_pack, masked_ppl, pack_pairs, run_model, token_logps
from losses import dpo_loss, summarize
from registry import beta_bounds
from batching import collate
from model_loader import frozen_copy


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


def test_masked_ppl_by_hand():
    logps = torch.log(torch.tensor([[0.5, 0.25, 0.1], [0.5, 0.5, 0.5]]))
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    # row 0 counts tokens 1,2 (p = .5, .25); row 1 counts tokens 2,3 (p = .5, .5)
    ppl = masked_ppl(logps, mask)
    assert ppl.tolist() == pytest.approx([math.exp(-(math.log(.5) + math.log(.25)) / 2), 2.0])


# --- with a model -------------------------------------------------------------------------------


def make_model(learnable=True, structure="linear", grad_to_policy=False, seed=0):
    policy = small_qwen2(seed=seed)
    head = None
    if learnable:
        torch.manual_seed(seed + 1)
        head = BetaHead(policy.config.hidden_size, structure, epsilon=0.5, mlp_hidden_size=16)
        for p in head.nn.parameters():  # off zero-init, so f(h) really depends on h
            torch.nn.init.normal_(p, std=0.5)
        with torch.no_grad():
            head.log_w.fill_(math.log(1e-3))
    reference = frozen_copy(policy)
    with torch.no_grad():  # policy != reference, so margins (and dL/dbeta) are not all zero
        g = torch.Generator().manual_seed(seed + 2)
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return DynamicBetaDPOModel(policy, head, reference, beta=0.1, beta_grad_to_policy=grad_to_policy)


def pairs(seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.randint(3, 128, (n,), generator=g).tolist()  # noqa: E731
    return [dict(prompt_ids=rand(5), chosen_ids=rand(4), rejected_ids=rand(7)),
            dict(prompt_ids=rand(9), chosen_ids=rand(3), rejected_ids=rand(2)),
            dict(prompt_ids=rand(2), chosen_ids=rand(6), rejected_ids=rand(5))]


def test_ppl_unchanged_by_extra_padding():
    model = make_model(learnable=False)
    ids = torch.randint(3, 128, (1, 7))
    alone = model.compute_ppl(ids, torch.ones_like(ids))
    for side in ("right", "left"):
        padded = torch.zeros(1, 12, dtype=torch.long)
        mask = torch.zeros(1, 12, dtype=torch.long)
        sl = slice(0, 7) if side == "right" else slice(5, 12)
        padded[0, sl], mask[0, sl] = ids[0], 1
        assert torch.allclose(model.compute_ppl(padded, mask), alone, rtol=1e-5), side


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


def test_pack_pairs_layout_by_hand():
    """Two pairs: prompt 3 / chosen 2 / rejected 1 and prompt 1 / chosen 1 / rejected 3 tokens."""
    exs = [dict(prompt_ids=[11, 12, 13], chosen_ids=[21, 22], rejected_ids=[31]),
           dict(prompt_ids=[14], chosen_ids=[23], rejected_ids=[32, 33, 34])]
    b = collate(exs, pad_token_id=0)
    pack = pack_pairs(b["input_ids"], b["attention_mask"], b["prompt_mask"])
    # units of 6 and 5 tokens: the longest sets the row length, the second unit gets its own row
    assert pack["input_ids"].shape == (2, 6)
    assert pack["input_ids"][0].tolist() == [11, 12, 13, 21, 22, 31]
    assert pack["input_ids"][1, :5].tolist() == [14, 23, 32, 33, 34]
    assert pack["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 3]      # rejected continues the prompt, not chosen
    assert pack["position_ids"][1, :5].tolist() == [0, 1, 1, 2, 3]
    m = pack["attention_mask"][0, 0]
    assert m[5].tolist() == [True, True, True, False, False, True]      # rejected sees the prompt and itself only
    assert m[4].tolist() == [True, True, True, True, True, False]       # chosen sees the prompt and earlier chosen
    assert m[2].tolist() == [True, True, True, False, False, False]     # the prompt sees no response
    assert pack["attention_mask"][1, 0, 5].tolist() == [False] * 5 + [True]  # padding attends only to itself
    # every padded position with a token maps to the packed slot holding the same token
    flat_ids = pack["input_ids"].flatten()[pack["unpack"]].view(b["input_ids"].shape)
    real = b["attention_mask"].bool()
    assert torch.equal(flat_ids[real], b["input_ids"][real])


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


def test_collate_plans_the_packing_and_the_device_side_never_copies_back(monkeypatch):
    """collate plans the shared-prompt layout on the CPU (small index tensors that move with the
    batch); pack_pairs then forms the inputs and the (R, 1, L, L) mask where the batch is, with no
    copy to the host and no read of a device value (each would stall a GPU on every micro-batch),
    and gives exactly the layout it computes from the batch alone."""
    b = collate(pairs(), 0)
    assert b["pack_plan"].dtype == torch.long and b["pack_plan"].shape[0] == 4
    assert b["pack_unpack"].shape == (b["input_ids"].numel(),)
    expected = pack_pairs(b["input_ids"], b["attention_mask"], b["prompt_mask"])  # plans from the batch
    for name in ("cpu", "item", "tolist", "nonzero", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        def refuse(*a, _name=name, **k):
            raise AssertionError(f"pack_pairs called Tensor.{_name}")
        monkeypatch.setattr(torch.Tensor, name, refuse)
    got = pack_pairs(b["input_ids"], b["attention_mask"], b["prompt_mask"], b["pack_plan"], b["pack_unpack"])
    monkeypatch.undo()
    assert set(got) == set(expected)
    for k in got:
        assert torch.equal(got[k], expected[k]), k


def test_pack_pairs_refuses_pairs_with_different_prompts():
    b = collate(pairs(), 0)
    b["input_ids"][4, 0] += 1  # the rejected row of pair 1 now has another prompt
    with pytest.raises(ValueError, match="different prompts"):
        pack_pairs(b["input_ids"], b["attention_mask"], b["prompt_mask"])


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


def test_sequence_logps_by_hand():
    model = make_model(learnable=False)
    exs = pairs()[:1]
    batch = collate(exs, 0)
    with torch.no_grad():
        _, stats = model(**batch)
        e = exs[0]
        ids = torch.tensor([e["prompt_ids"] + e["chosen_ids"]])
        logp = model.policy_model(ids).logits.float().log_softmax(-1)[0]
        P = len(e["prompt_ids"])
        by_hand = sum(logp[t - 1, ids[0, t]] for t in range(P, ids.shape[1]))
    assert stats["policy_chosen_logps"][0].item() == pytest.approx(by_hand.item(), abs=1e-4)
    ref_logp = model.reference_model(ids).logits.float().log_softmax(-1)[0]
    ref_by_hand = sum(ref_logp[t - 1, ids[0, t]] for t in range(P, ids.shape[1]))
    assert stats["chosen_rewards"][0].item() == pytest.approx(0.1 * (by_hand - ref_by_hand).item(), abs=1e-5)


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


@pytest.mark.parametrize("bias", [False, True])
def test_chunked_logps_equal_plain_values_and_gradients(monkeypatch, bias):
    """Forward in chunks of 3 positions, backward in vocabulary slices of 21, 21 and 8 tokens."""
    import logprobs
    monkeypatch.setattr(logprobs, "CPU_LOGITS_BYTES", 3 * 4 * 50)  # several chunks, some partial
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=bias)
    hidden = torch.randn(2, 6, 8, requires_grad=True)
    ids = torch.randint(0, 50, (2, 6))
    needed = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0]], dtype=torch.bool)
    lp = token_logps(hidden, head, ids, needed)
    plain = head(hidden[:, :-1]).float().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1) * needed
    assert lp.dtype == torch.float32 and lp.shape == (2, 5)
    assert torch.allclose(lp, plain, atol=1e-6)
    assert (lp[~needed] == 0).all()
    w = torch.randn(2, 5)
    params = (hidden, head.weight) + ((head.bias,) if bias else ())
    g_chunked = torch.autograd.grad((lp * w).sum(), params)
    g_plain = torch.autograd.grad((plain * w).sum(), params)
    for a, b in zip(g_chunked, g_plain):
        assert torch.allclose(a, b, atol=1e-6)


def test_logps_from_bf16_hidden_are_fp32():
    head = torch.nn.Linear(8, 50).to(torch.bfloat16)
    hidden = torch.randn(2, 5, 8).to(torch.bfloat16)
    lp = token_logps(hidden, head, torch.randint(0, 50, (2, 5)), torch.ones(2, 4, dtype=torch.bool))
    assert lp.dtype == torch.float32 and (lp <= 0).all()


def test_beta_dpo_matches_the_authors_formulas():
    """Hand-computed from the beta-DPO code (junkangwu/beta-DPO, trainers.py): statistics updated
    before use from zero, int(B * rho) pairs kept, beta from the mean of the KEPT raw gaps."""
    import statistics
    from beta_dpo import BetaDPO
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
    from beta_dpo import BetaDPO
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
    from beta_dpo import BetaDPO
    bd = BetaDPO()
    beta, w = bd.batch_beta(torch.zeros(8), 0.1, training=True)  # step 0: policy == reference, every gap 0
    assert w.sum() == 6 and beta.item() == pytest.approx(0.1)


def test_beta_dpo_model_loss_is_the_filtered_mean():
    from beta_dpo import BetaDPO
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


def test_beta_bounds_defaults_per_mode_and_overrides():
    assert beta_bounds("learnable", 0.03) == pytest.approx((0.003, 0.3))
    assert beta_bounds("beta_dpo", 0.1) == (1e-3, math.inf)  # the authors' floor, no ceiling
    assert beta_bounds("beta_dpo", 0.005) == pytest.approx((0.0005, math.inf))  # a floor below a small beta
    assert beta_bounds("fixed", 0.1) == beta_bounds("epsilon_dpo", 0.1) == (0.0, math.inf)
    assert beta_bounds("learnable", 0.03, 0.0, math.inf) == (0.0, math.inf)  # given bounds win
    assert beta_bounds("learnable", 0.03, beta_max=1.0) == pytest.approx((0.003, 1.0))
