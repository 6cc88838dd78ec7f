"""Centred beta (centered_beta.py): the batch's geometric mean of beta is beta0, gradients reach the NN
and not the policy, single prompts centre on the running mean, save/load and exact resume."""

import json
import math

import pytest
import torch
from conftest import make_model, pairs
from safetensors.torch import load_file
from test_train import run_and_resume_from_step_2

from batching import collate
from beta_mode import BetaOut
from centered_beta import CenteredBeta


def centered_model(scale=1.5, momentum=0.9):
    model = make_model(learnable=False)
    mode = CenteredBeta(model.policy_model.config.hidden_size, "linear", scale, momentum)
    torch.manual_seed(3)
    for p in mode.nn.parameters():  # off the zero init, so z really depends on h
        torch.nn.init.normal_(p, std=0.5)
    model.mode = mode
    return model


def test_the_batch_mean_of_log_beta_is_log_beta0_and_beta_follows_the_formula():
    model = centered_model()
    batch = collate(pairs(), 0)
    loss, stats = model(**batch)
    beta = stats["beta"]
    assert beta.log().mean().item() == pytest.approx(math.log(0.1), abs=1e-6)  # centred: only redistributed
    assert beta.std() > 0  # and it does differ between prompts
    B = len(beta)
    ppl, h = model.prompt_stats(batch["input_ids"][:B], batch["prompt_mask"][:B])
    z = 1.5 * torch.tanh(model.mode.nn(h).squeeze(-1))
    assert torch.allclose(beta, 0.1 * torch.exp(z - z.mean()), rtol=1e-5)
    assert (beta <= 0.1 * math.exp(2 * 1.5) + 1e-9).all() and (beta >= 0.1 * math.exp(-2 * 1.5) - 1e-9).all()


def test_zero_init_gives_beta0_everywhere():
    model = make_model(learnable=False)
    model.mode = CenteredBeta(model.policy_model.config.hidden_size)
    _, stats = model(**collate(pairs(), 0))
    assert torch.allclose(stats["beta"], torch.full_like(stats["beta"], 0.1))


def test_gradients_reach_the_nn_and_not_the_policy_through_beta():
    model = centered_model()
    batch = collate(pairs(), 0)
    loss, _ = model(**batch)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.mode.nn.parameters())
    # the policy's gradient equals the one with the same beta as constants: h is detached
    g_centered = torch.cat([p.grad.flatten() for p in model.policy_model.parameters()])
    with torch.no_grad():
        beta = model(**batch)[1]["beta"]
    fixed = centered_model()
    fixed.mode.forward = lambda pairs: BetaOut(beta, beta)  # the same beta, as constants
    fixed.zero_grad()
    fixed(**batch)[0].backward()
    g_const = torch.cat([p.grad.flatten() for p in fixed.policy_model.parameters()])
    assert torch.allclose(g_centered, g_const, atol=1e-7)


def test_running_mean_and_single_prompts():
    model = centered_model(momentum=0.9)
    batch = collate(pairs(), 0)
    B = batch["input_ids"].shape[0] // 2
    _, h = model.prompt_stats(batch["input_ids"][:B], batch["prompt_mask"][:B])
    z = model.mode.z(h)
    model(**batch)  # training: updates the running mean once
    assert model.mode.running_z.item() == pytest.approx(0.1 * z.mean().item(), rel=1e-5)
    model.eval()
    with torch.no_grad():
        _, stats = model(**batch)  # evaluation: centred on the running mean, which does not move
    assert model.mode.running_z.item() == pytest.approx(0.1 * z.mean().item(), rel=1e-5)
    assert torch.allclose(stats["beta"], 0.1 * torch.exp(z - model.mode.running_z), rtol=1e-5)
    one = model.get_dynamic_beta(batch["input_ids"][:1], batch["prompt_mask"][:1])  # a prompt alone
    assert one.item() == pytest.approx(stats["beta"][0].item(), rel=1e-5)


def test_save_load_round_trip(tmp_path):
    model = centered_model()
    model(**collate(pairs(), 0))  # a running mean that is not 0
    model.mode.save_pretrained(str(tmp_path))
    loaded = CenteredBeta.from_pretrained(str(tmp_path), {"centered_momentum": 0.5})
    for k, v in model.mode.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert loaded.scale == 1.5 and loaded.momentum == 0.5  # the momentum is this run's flag
    with pytest.raises(FileNotFoundError, match="centered_beta.safetensors"):
        CenteredBeta.from_pretrained(str(tmp_path / "missing"))


@pytest.mark.slow
def test_centered_run_resumes_exactly(tiny_qwen2_dir, tmp_path):
    flags = ["--beta_mode", "centered", "--centered_head_lr", "1e-2", "--max_steps", "4", "--save_every_steps", "2",
             "--report_to", "none"]
    full, part = run_and_resume_from_step_2(tiny_qwen2_dir, tmp_path, flags)  # part: stopped at step 2, resumed
    a, b = (load_file(str(r / "final" / "centered_beta.safetensors")) for r in (full, part))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["nn.weight"].abs().sum() > 0 and a["running_z"].item() != 0  # it trained
    ea, eb = (json.load(open(r / "final" / "eval.json"))["metrics"] for r in (full, part))
    assert ea["loss"] == eb["loss"] and ea["beta/std"] > 0
