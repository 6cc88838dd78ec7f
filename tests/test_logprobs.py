"""Log-probs (logprobs.py): masked PPL, the packed shared-prompt layout, the chunked lm-head log-probs
against plain values and gradients, fp32 out of bf16, sequence log-probs by hand."""

import math

import pytest
import torch
from conftest import make_model, pairs

from batching import collate
from logprobs import masked_ppl, pack_pairs, token_logps


def test_masked_ppl_by_hand():
    logps = torch.log(torch.tensor([[0.5, 0.25, 0.1], [0.5, 0.5, 0.5]]))
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    # row 0 counts tokens 1,2 (p = .5, .25); row 1 counts tokens 2,3 (p = .5, .5)
    ppl = masked_ppl(logps, mask)
    assert ppl.tolist() == pytest.approx([math.exp(-(math.log(.5) + math.log(.25)) / 2), 2.0])


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
