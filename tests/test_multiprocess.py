"""Two processes (torchrun, gloo on CPU) train like one process with the same global batch,
checkpoint from the main process only, and resume."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import fsdp
import train
from test_train import common

pytestmark = pytest.mark.slow  # torchrun with 2 processes

REPO = os.path.dirname(os.path.abspath(train.__file__))
ARGS = ["--beta_mode", "learnable", "--max_steps", "4", "--log_every_steps", "1", "--save_every_steps", "2",
        "--save_total_limit", "0", "--beta_head_lr", "1e-2", "--eval_batch_size", "2"]
WEIGHT_ATOL, MAX_OFF = 5e-4, 100  # 1 vs 2 processes: rounding that Adam amplifies, see the first test


def torchrun(args, nproc=2, script=("train.py",), expect_rc=0, timeout=600):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={port}", *script, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    out = res.stdout + res.stderr
    assert (res.returncode == 0) == (expect_rc == 0), out[-6000:]
    return out


def train_lines(run):
    return [json.loads(x) for x in open(run / "metrics.jsonl") if '"train"' in x]


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_two_processes_equal_one_and_resume(tiny_qwen2_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    train.main(common(tiny_qwen2_dir, one, *ARGS, "--batch_size", "2"))
    out = torchrun(common(tiny_qwen2_dir, two, *ARGS, "--batch_size", "1"))
    assert "x 2 process(es)" in out

    # the same loss curve: every logged train metric of every step, within float tolerance
    l1, l2 = train_lines(one), train_lines(two)
    assert [m["step"] for m in l1] == [m["step"] for m in l2] == [1, 2, 3, 4]
    for a, b in zip(l1, l2):
        for k in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "beta/mean", "beta_head/w",
                  "grad_norm", "examples_seen"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k)
    w1, w2 = load_file(str(one / "final" / "model.safetensors")), load_file(str(two / "final" / "model.safetensors"))
    # Adam divides by sqrt(v): an element whose gradient is ~0 moves by up to lr (1e-3) per step on
    # rounding alone, and one process packs 2 pairs per forward where two pack 1. Measured with the
    # 2025-01 DeepSeek template: one of 9.7M elements differed by 1.9e-5; with the current template
    # (responses open with the empty reasoning block) 51 lm_head elements differ by up to 2.1e-4, all
    # others by <= 1e-6. A real divergence (e.g. a missing gradient sync) moves millions by ~lr.
    assert all(torch.allclose(w1[k], w2[k], atol=WEIGHT_ATOL) for k in w1)
    assert sum(int(((w1[k] - w2[k]).abs() > 1e-6).sum()) for k in w1) <= MAX_OFF
    # only the main process wrote: one complete copy of each checkpoint (step 2, and the last step's
    # state that --keep_checkpoints keeps), no stray temporaries
    assert sorted(os.listdir(two / "checkpoints")) == ["step_2", "step_4"]

    # resume the 2-process run from its step-2 checkpoint: same final weights
    three = tmp_path / "three"
    os.makedirs(three / "checkpoints")
    shutil.copytree(two / "checkpoints" / "step_2", three / "checkpoints" / "step_2")
    torchrun(common(tiny_qwen2_dir, three, *ARGS, "--batch_size", "1", "--resume_from", "auto"))
    w3 = load_file(str(three / "final" / "model.safetensors"))
    assert all(torch.equal(w2[k], w3[k]) for k in w2)


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
@pytest.mark.parametrize("mode", ["full_shard", "shard_grad_op"])
def test_fsdp_two_processes_equal_one_and_resume(tiny_qwen2_dir, tmp_path, mode):
    """--fsdp: the policy sharded over 2 processes (FSDP2 on gloo) trains like 1 unsharded process
    with the same global batch, writes whole-tensor checkpoints that plain runs and evaluate.py
    load, and resumes bit-exactly."""
    import evaluate
    one, two, three = tmp_path / "one", tmp_path / "two", tmp_path / "three"
    train.main(common(tiny_qwen2_dir, one, *ARGS, "--batch_size", "2"))
    torchrun(common(tiny_qwen2_dir, two, *ARGS, "--batch_size", "1", "--fsdp", mode))
    l1, l2 = train_lines(one), train_lines(two)
    assert [m["step"] for m in l1] == [m["step"] for m in l2] == [1, 2, 3, 4]
    for a, b in zip(l1, l2):
        for k in ("loss", "rewards/margins", "logps/chosen", "beta/mean", "beta_head/w", "grad_norm", "examples_seen"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k)
    w1, w2 = load_file(str(one / "final" / "model.safetensors")), load_file(str(two / "final" / "model.safetensors"))
    assert set(w1) == set(w2) and all(w1[k].shape == w2[k].shape for k in w1)  # whole tensors, not shards
    assert all(torch.allclose(w1[k], w2[k], atol=WEIGHT_ATOL) for k in w1)  # tolerance: see the DDP test above
    assert sum(int(((w1[k] - w2[k]).abs() > 1e-6).sum()) for k in w1) <= MAX_OFF
    h1, h2 = (load_file(str(r / "final" / "beta_head.safetensors")) for r in (one, two))
    assert all(torch.allclose(h1[k], h2[k], atol=1e-6) for k in h1)
    assert sorted(os.listdir(two / "checkpoints")) == ["step_2", "step_4"]

    os.makedirs(three / "checkpoints")
    shutil.copytree(two / "checkpoints" / "step_2", three / "checkpoints" / "step_2")
    torchrun(common(tiny_qwen2_dir, three, *ARGS, "--batch_size", "1", "--fsdp", mode, "--resume_from", "auto"))
    w3 = load_file(str(three / "final" / "model.safetensors"))
    assert all(torch.equal(w2[k], w3[k]) for k in w2)
    metrics = evaluate.main(["--ckpt", str(two / "final"), "--batch_size", "4"])  # a plain, unsharded load
    assert metrics["pairs"] == 8


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_fsdp_accumulates_without_reducing_each_micro_batch(tiny_qwen2_dir, tmp_path, monkeypatch):
    """--fsdp with gradient accumulation: the sharded policy skips the reduce-scatter of every
    micro-batch but the last (set_requires_gradient_sync), and trains like one unsharded process
    with the same global batch."""
    args = [*ARGS, "--gradient_accumulation_steps", "2", "--save_every_steps", "0"]
    one, two = tmp_path / "one", tmp_path / "two"
    train.main(common(tiny_qwen2_dir, one, *args, "--batch_size", "2"))
    torchrun(common(tiny_qwen2_dir, two, *args, "--batch_size", "1", "--fsdp", "full_shard"))
    for a, b in zip(train_lines(one), train_lines(two)):
        for k in ("loss", "beta/mean", "beta_head/w", "grad_norm"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k)
    w1, w2 = load_file(str(one / "final" / "model.safetensors")), load_file(str(two / "final" / "model.safetensors"))
    assert all(torch.allclose(w1[k], w2[k], atol=WEIGHT_ATOL) for k in w1)


def test_fsdp_no_sync_turns_gradient_sync_off_until_the_last_micro_batch():
    """train.no_sync on a sharded policy: requires_gradient_sync is False inside, True after (accelerate's
    no_sync would do nothing for a module it did not wrap)."""
    calls = []

    class Policy:
        def set_requires_gradient_sync(self, flag):
            calls.append(flag)

    class Args:
        fsdp = "full_shard"
    run = type("R", (), dict(args=Args(), raw=type("M", (), dict(policy_model=Policy()))()))()
    with train.no_sync(run):
        assert calls == [False]
    assert calls == [False, True]


def test_fsdp_save_keeps_gathered_state_on_the_main_process_only():
    """Every process takes part in each gather (full(), a collective), but only the main one keeps the
    whole tensors: the others return None and hold nothing (~21 GB each for the 1.5B model)."""
    state = {"a": torch.arange(6.0), "b": torch.ones(2, 2)}
    kept = fsdp.gathered(state, keep=True)
    assert set(kept) == {"a", "b"} and all(torch.equal(kept[k], state[k]) for k in state)
    assert fsdp.gathered(state, keep=False) is None
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))])
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    opt.step()
    assert fsdp.gathered_optimizer_state(opt, keep=False) is None
    whole = fsdp.gathered_optimizer_state(opt, keep=True)
    assert torch.equal(whole["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_fsdp_gather_for_a_save_grows_only_the_main_process(tmp_path):
    """2 gloo processes gather a sharded 400 MB state as train.save does: the main process's peak RSS
    grows by the whole state, the other's by at most about two gathered tensors (100 MB each), which it drops
    at once: at 8 GPUs x the 1.5B model's ~21 GB that is the difference between one host copy and eight."""
    torchrun([str(tmp_path)], script=(os.path.join("tests", "fsdp_gather_rss.py"),))
    main, other = (json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1))
    assert main["growth_mb"] > 380, main  # it keeps all four tensors
    # measured 191 MB here (the gathered tensor and a transient copy of it): never the 400 MB state
    assert other["growth_mb"] < 260, other


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_beta_dpo_statistics_are_gathered_over_processes(tiny_qwen2_dir, tmp_path):
    """beta-DPO on 2 processes x 4 pairs sees the same 8 gaps as 1 process x 8 (gathered in rank
    order, drawn with the same generator): the same M0, sigma and beta. With rho < 1 the policies
    part after the first step (like the authors' code, each process averages over its own kept
    pairs), so the first step is compared; with rho = 1 every step is."""
    for rho, steps in (("0.5", 1), ("1.0", 3)):
        args = ["--beta_mode", "beta_dpo", "--beta_dpo_rho", rho, "--max_steps", str(steps), "--log_every_steps", "1",
                "--eval_batch_size", "2"]
        one, two = tmp_path / f"one{rho}", tmp_path / f"two{rho}"
        train.main(common(tiny_qwen2_dir, one, *args, "--batch_size", "8"))
        torchrun(common(tiny_qwen2_dir, two, *args, "--batch_size", "4"))
        s1, s2 = (json.load(open(r / "final" / "beta_dpo.json")) for r in (one, two))
        assert s1["calls"] == s2["calls"] == steps
        assert s2["m0"] == pytest.approx(s1["m0"], rel=1e-4) and s2["sigma"] == pytest.approx(s1["sigma"], rel=1e-4)
        for a, b in zip(train_lines(one), train_lines(two)):
            assert b["beta/mean"] == pytest.approx(a["beta/mean"], rel=1e-5), (rho, a["step"])
            assert b["beta/std"] < 1e-7  # both processes drew the same pairs, so they agree on beta


needs_gloo = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


@needs_gloo
def test_failed_save_on_main_process_stops_every_process(tiny_qwen2_dir, tmp_path):
    """Rank 0's checkpoint write fails (disk full): both processes stop with the error instead of
    rank 1 waiting forever at the next collective; the earlier checkpoint survives."""
    out = tmp_path / "run"
    log = torchrun(common(tiny_qwen2_dir, out, *ARGS, "--batch_size", "1"),
                   script=("tests/fault_train.py", "disk_full_on_main"), expect_rc=1, timeout=300)
    assert "could not write checkpoint" in log and "No space left on device" in log
    assert "the main process could not write checkpoint" in log  # rank 1's own message
    assert [os.path.basename(c) for c in checkpoint.complete_checkpoints(str(out))] == ["step_2"]


@needs_gloo
def test_sigterm_on_one_process_checkpoints_all_and_resumes(tiny_qwen2_dir, tmp_path):
    """A SIGTERM that reaches only rank 1 stops both processes after the same step, with one
    complete checkpoint and exit 0; --resume_from auto then finishes with the weights of an
    uninterrupted run."""
    out, ref = tmp_path / "run", tmp_path / "ref"
    args = [*ARGS, "--batch_size", "1", "--save_every_steps", "0"]
    log = torchrun(common(tiny_qwen2_dir, out, *args), script=("tests/fault_train.py", "sigterm_rank1_at_step_2"))
    assert "stopped by signal at step" in log and "--resume_from auto" in log
    (ckpt,) = checkpoint.complete_checkpoints(str(out))
    assert not (out / "final").exists()
    stopped_at = int(os.path.basename(ckpt)[5:])
    assert 1 <= stopped_at < 4
    torchrun(common(tiny_qwen2_dir, out, *args, "--resume_from", "auto"))
    torchrun(common(tiny_qwen2_dir, ref, *args))
    w, w_ref = load_file(str(out / "final" / "model.safetensors")), load_file(str(ref / "final" / "model.safetensors"))
    assert all(torch.equal(w[k], w_ref[k]) for k in w_ref)


@needs_gloo
def test_fsdp_trains_under_bf16_autocast(tiny_qwen2_dir, tmp_path):
    """--fsdp with --precision bf16: the sharded policy runs its forward under autocast like the
    unsharded one (fp32 master weights), so 2 sharded processes train like 1 process in bf16 — and
    measurably unlike 1 process in fp32, which shows the autocast is on."""
    bf16 = [a if a != "fp32" else "bf16" for a in common(tiny_qwen2_dir, "x", *ARGS)]
    one, fp32, two = tmp_path / "one", tmp_path / "fp32", tmp_path / "two"
    train.main(common(tiny_qwen2_dir, fp32, *ARGS, "--batch_size", "2"))
    with_out = lambda out, *extra: [*(str(out) if a == "x" else a for a in bf16), *extra]
    torchrun(with_out(one, "--batch_size", "2"), nproc=1)  # its own process: accelerate fixes one precision per process
    torchrun(with_out(two, "--batch_size", "1", "--fsdp", "full_shard"))
    assert json.load(open(two / "config.json"))["precision"] == "bf16"
    l1, l2, l32 = train_lines(one), train_lines(two), train_lines(fp32)
    assert [m["step"] for m in l1] == [m["step"] for m in l2] == [1, 2, 3, 4]
    for k in ("logps/chosen", "logps/rejected", "beta/mean"):  # step 1, before any update: the forward alone
        # measured: the bf16 runs agree to the last digit, fp32 differs by ~2.5e-6 relative (7.6e-4 nats)
        assert abs(l2[0][k] - l1[0][k]) <= 0.25 * abs(l2[0][k] - l32[0][k]), (k, l1[0][k], l2[0][k], l32[0][k])
    for a, b in zip(l1, l2):  # then rounding, which Adam amplifies (see the first test)
        for k, rel in (("loss", 1e-3), ("beta/mean", 1e-3), ("rewards/margins", 1e-2)):  # a margin: a difference
            assert b[k] == pytest.approx(a[k], rel=rel, abs=1e-4), (a["step"], k)
