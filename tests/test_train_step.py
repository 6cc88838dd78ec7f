"""train.py's pieces on their own, without a whole training run: one training step (finite and
not), the non-finite guards, and a checkpoint's save -> load round trip (model_loader)."""

import math
import random

import pytest
import torch

import beta_head
import fsdp
import train
from batching import collate
from data import load_rows
from tokenization import build_examples
from checkpoint import load_trainer_state, save_checkpoint
from model_loader import autocast_dtype, build_model, load_tokenizer, make_accelerator


def setup(tiny_qwen2_dir, tmp_path, *flags):
    """A Run as train.main makes it (flags -> model -> optimizer), and two micro-batches of demo pairs."""
    args = train.get_args(["--model_name_or_path", tiny_qwen2_dir, "--dataset", "demo", "--output_dir",
                           str(tmp_path / "run"), "--max_length", "64", "--max_prompt_length", "40",
                           "--policy_lr", "1e-3", "--max_steps", "3", "--precision", "fp32", *flags])
    (tmp_path / "run").mkdir()
    accelerator = make_accelerator(args.precision)
    tokenizer = load_tokenizer(tiny_qwen2_dir)
    torch.manual_seed(0)
    model = build_model(vars(args), accelerator.device, autocast_dtype(accelerator))
    run = train.make_run(args, accelerator, model, tokenizer, n_train=6)
    examples, _ = build_examples(load_rows("demo")[:4], tokenizer, args.max_length, args.max_prompt_length)
    batches = [collate(examples[i:i + 2], tokenizer.pad_token_id) for i in (0, 2)]
    return run, batches


def snapshot(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_train_step_updates_and_returns_the_loss(tiny_qwen2_dir, tmp_path):
    run, batches = setup(tiny_qwen2_dir, tmp_path, "--beta_mode", "learnable", "--gradient_accumulation_steps", "2")
    with torch.no_grad():  # the loss the step will see, before it changes anything
        expected = sum(run.model(**b)[0].item() for b in batches) / 2
    before = snapshot(run.raw)
    result = train.train_step(run, batches)
    assert result.finite and result.loss == pytest.approx(expected, rel=1e-5)
    assert len(result.stats) == 2 and result.stats[0]["beta"].shape == (2,)
    assert result.tokens == sum(int(b["attention_mask"].sum()) for b in batches)
    assert math.isfinite(result.grad_norm) and result.grad_norm > 0
    w_grad, nn_grad = result.mode_metrics["beta_head/w_grad"], result.mode_metrics["beta_head/nn_grad_norm"]
    assert w_grad != 0 and nn_grad > 0  # the loss reached w and the NN
    after = snapshot(run.raw)
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert any(n.startswith("policy_model.") for n in changed) and "mode.head.log_w" in changed
    assert all(p.grad is None for p in run.params)  # gradients are cleared for the next step
    assert run.step == 0  # the loop, not the step, counts


def test_non_finite_step_changes_nothing(tiny_qwen2_dir, tmp_path, monkeypatch):
    run, batches = setup(tiny_qwen2_dir, tmp_path, "--beta_mode", "learnable")
    real = beta_head.dpo_loss
    monkeypatch.setattr(beta_head, "dpo_loss", lambda *a, **k: tuple(
        x * float("nan") if i == 0 else x for i, x in enumerate(real(*a, **k))))
    before = snapshot(run.raw)
    state_before = len(run.optimizer.state)
    result = train.train_step(run, batches[:1])
    assert not result.finite and math.isnan(result.loss)
    after = snapshot(run.raw)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert len(run.optimizer.state) == state_before == 0  # Adam took no step: no moments yet
    assert all(p.grad is None for p in run.params)
    # the loop's bookkeeping: counted; after --max_bad_steps in a row, the last good state is saved
    run.args.max_bad_steps = 2
    train.skip_bad_step(run, result)
    assert (run.bad_steps, run.skipped_steps) == (1, 1)
    with pytest.raises(SystemExit, match="2 non-finite steps in a row"):
        train.skip_bad_step(run, result)
    assert (tmp_path / "run" / "checkpoints" / "step_0" / "COMPLETED").exists()


def test_non_finite_weights_stop_the_run(tiny_qwen2_dir, tmp_path):
    run, _ = setup(tiny_qwen2_dir, tmp_path)
    train.check_weights(run)  # finite: nothing happens
    with torch.no_grad():
        run.params[0].view(-1)[3] = float("inf")
    with pytest.raises(SystemExit, match="the update made weights non-finite"):
        train.check_weights(run)


@pytest.mark.parametrize("mode", ["learnable", "beta_dpo", "epsilon_dpo", "lora"])
def test_checkpoint_round_trip(tiny_qwen2_dir, tmp_path, mode):
    flags = ("--beta_mode", "learnable", "--lora_r", "4") if mode == "lora" else ("--beta_mode", mode)
    run, batches = setup(tiny_qwen2_dir, tmp_path, *flags)
    train.train_step(run, batches)  # moves weights, Adam moments and (beta_dpo) the running statistics
    run.step = 1
    path = str(tmp_path / "ckpt")
    train.save(run, path)
    draws = (random.random(), torch.rand(3))  # what the RNGs give right after the save

    loaded = build_model(vars(run.args), run.accelerator.device, None, ckpt=path)
    saved_params = {n: p for n, p in run.raw.named_parameters()}
    loaded_params = dict(loaded.named_parameters())
    assert saved_params.keys() == loaded_params.keys()
    for n, p in saved_params.items():
        assert torch.equal(p, loaded_params[n]), n
        assert loaded_params[n].requires_grad == p.requires_grad, n  # LoRA: adapters trainable, base frozen
    if mode == "beta_dpo":
        assert loaded.mode.state() == run.raw.mode.state()
    if mode == "epsilon_dpo":  # the running beta comes back; epsilon, like a learning rate, is this run's flag
        assert loaded.mode.state() == run.raw.mode.state()
        again = build_model(dict(vars(run.args), epsilon_dpo_epsilon=0.05), run.accelerator.device, None, ckpt=path)
        assert again.mode.epsilon == 0.05 and again.mode.beta == run.raw.mode.beta
    # the reference is the starting model, not the checkpoint's policy
    ids = batches[0]["input_ids"][:1]
    ref = loaded.reference_logps(ids, torch.ones_like(ids), torch.ones_like(ids))
    assert torch.allclose(ref, run.raw.reference_logps(ids, torch.ones_like(ids), torch.ones_like(ids)))

    state = load_trainer_state(path)
    assert (state["step"], state["skipped_steps"], state["num_processes"]) == (1, 0, 1)
    again = (random.random(), torch.rand(3))  # the RNGs are back where they were at the save
    assert again[0] == draws[0] and torch.equal(again[1], draws[1])
    saved_opt = run.optimizer.state_dict()
    assert state["optimizer"]["param_groups"] == saved_opt["param_groups"]
    for i, s in saved_opt["state"].items():
        for k, v in s.items():
            assert torch.equal(state["optimizer"]["state"][i][k], v)


def test_save_checkpoint_is_atomic(tiny_qwen2_dir, tmp_path, monkeypatch):
    run, _ = setup(tiny_qwen2_dir, tmp_path)
    path = str(tmp_path / "ckpt")
    state = dict(optimizer=run.optimizer.state_dict(), step=0, skipped_steps=0, num_processes=1)
    save_checkpoint(path, run.raw, run.tokenizer, vars(run.args), state)
    first = (tmp_path / "ckpt" / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(run.raw.beta_head if run.raw.beta_head else run.tokenizer, "save_pretrained", boom)
    with pytest.raises(OSError):
        save_checkpoint(path, run.raw, run.tokenizer, vars(run.args), state)
    assert (tmp_path / "ckpt" / "COMPLETED").exists() and not (tmp_path / "ckpt.tmp").exists()
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == first  # the old checkpoint, untouched


def count_syncs(monkeypatch) -> list:
    """Count the calls that copy a device value to the host (item, int, float, bool of a tensor)."""
    calls = []
    for name in ("item", "__int__", "__float__", "__bool__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name):
            calls.append(_name)
            return _real(self, *a)
        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


def test_clip_syncs_once_not_once_per_parameter(monkeypatch):
    """The clip reads its coefficient once (one device sync), not once per gradient (~340 a step on
    the 1.5B model), and clips exactly as torch's own does."""
    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(50)]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, r in zip(params, ref):
        p.grad = torch.randn_like(p) * 10
        r.grad = p.grad.clone()
    want = float(torch.nn.utils.clip_grad_norm_(ref, 1.0))
    calls = count_syncs(monkeypatch)
    total = fsdp.clip_grad_norm_(params, 1.0)
    monkeypatch.undo()
    assert len(calls) <= 1, calls
    assert float(total) == pytest.approx(want, rel=1e-6)
    assert all(torch.allclose(p.grad, r.grad, rtol=1e-6) for p, r in zip(params, ref))


def test_train_step_syncs_per_step_not_per_micro_batch(tiny_qwen2_dir, tmp_path, monkeypatch):
    """Host copies in a training step do not grow with the number of micro-batches: the loss and token
    sums stay on the device until the step's end (the lm_head backward scatters instead of indexing
    with a boolean mask)."""
    run, batches = setup(tiny_qwen2_dir, tmp_path, "--beta_mode", "fixed")
    counts = []
    for n in (1, 4):
        calls = count_syncs(monkeypatch)
        train.train_step(run, [batches[i % 2] for i in range(n)])
        monkeypatch.undo()
        counts.append(len(calls))
    assert counts[0] == counts[1], counts


def test_a_learnable_step_syncs_no_more_than_a_fixed_one(tiny_qwen2_dir, tmp_path, monkeypatch):
    """The beta mode's own metrics (w, its gradient, the NN's norms) stay on the device until a step is
    logged: a learnable step reads the device back as often as a fixed-beta one."""
    counts = {}
    for mode in ("fixed", "learnable"):
        (tmp_path / mode).mkdir()
        run, batches = setup(tiny_qwen2_dir, tmp_path / mode, "--beta_mode", mode)
        calls = count_syncs(monkeypatch)
        train.train_step(run, batches[:1])
        monkeypatch.undo()
        counts[mode] = len(calls)
    assert counts["learnable"] == counts["fixed"], counts
