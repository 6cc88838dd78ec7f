"""Faults: non-finite steps are skipped and counted, kill -9 at random moments never leaves a
checkpoint that resume would load half-written, a failed save leaves earlier checkpoints intact."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import beta_head
import train
from data import DataError
from test_train import common

pytestmark = pytest.mark.slow  # whole trainings, killed and resumed

REPO = os.path.dirname(os.path.abspath(train.__file__))


def nan_on_calls(monkeypatch, bad_calls):
    """Make dpo_loss return NaN losses on the given (0-based) training calls."""
    real, calls = beta_head.dpo_loss, [0]

    def fake(*args, **kwargs):
        losses, cr, rr = real(*args, **kwargs)
        calls[0] += 1
        return (losses * float("nan") if calls[0] - 1 in bad_calls else losses), cr, rr
    monkeypatch.setattr(beta_head, "dpo_loss", fake)


def test_non_finite_steps_are_skipped_and_counted(tiny_qwen2_dir, tmp_path, monkeypatch):
    # calls: 0 = calibration forward is not a dpo_loss call; training steps 1..4 are calls 0..3
    nan_on_calls(monkeypatch, {1})
    out = tmp_path / "run"
    train.main(common(tiny_qwen2_dir, out, "--beta_mode", "learnable", "--max_steps", "4", "--log_every_steps", "1",
                      "--max_eval_examples", "2", "--eval_every_steps", "0"))
    lines = [json.loads(x) for x in open(out / "metrics.jsonl") if '"train"' in x]
    assert [m["skipped_steps"] for m in lines] == [0, 1, 1, 1]
    state = torch.load(out / "checkpoints" / "step_4" / "trainer_state.pt", weights_only=True)
    assert state["skipped_steps"] == 1 and state["step"] == 4
    head = load_file(str(out / "final" / "beta_head.safetensors"))
    assert all(torch.isfinite(v).all() for v in head.values())


def test_too_many_bad_steps_stop_with_last_good_state(tiny_qwen2_dir, tmp_path, monkeypatch):
    nan_on_calls(monkeypatch, set(range(1, 100)))
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="3 non-finite steps in a row"):
        train.main(common(tiny_qwen2_dir, out, "--max_steps", "10", "--max_bad_steps", "3"))
    ckpt = train.complete_checkpoints(str(out))[-1]
    weights = load_file(os.path.join(ckpt, "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=True)["skipped_steps"] == 3


def test_failed_save_keeps_previous_checkpoint(tiny_qwen2_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real, saves = train.save_checkpoint, [0]

    def disk_full_on_second(path, *a, **k):
        saves[0] += 1
        if saves[0] == 2:  # fail inside the write, after some files exist
            model = a[0]
            orig = model.policy_model.save_pretrained

            def boom(d, **kw):
                orig(d, **kw)
                raise OSError(28, "No space left on device")
            monkeypatch.setattr(model.policy_model, "save_pretrained", boom)
        return real(path, *a, **k)
    monkeypatch.setattr(train, "save_checkpoint", disk_full_on_second)
    with pytest.raises(DataError, match="No space left on device.*untouched"):
        train.main(common(tiny_qwen2_dir, out, "--max_steps", "4", "--save_every_steps", "2"))
    # the step-2 checkpoint is complete and nothing half-written is left behind
    assert [os.path.basename(c) for c in train.complete_checkpoints(str(out))] == ["step_2"]
    assert sorted(os.listdir(out / "checkpoints")) == ["step_2"]


def test_auto_resume_ignores_incomplete_checkpoints(tmp_path):
    d = tmp_path / "checkpoints"
    for name, complete in [("step_2", True), ("step_10", True), ("step_12", False), ("step_14.tmp", True)]:
        os.makedirs(d / name)
        if complete:
            (d / name / "COMPLETED").write_text("")
    assert [os.path.basename(c) for c in train.complete_checkpoints(str(tmp_path))] == ["step_2", "step_10"]


def test_kill_9_at_random_moments_then_resume_exactly(tiny_qwen2_dir, tmp_path):
    """SIGKILL at random times (often mid-checkpoint: one is written every step), resume with
    --resume_from auto each time; the final weights equal an uninterrupted run's, bit for bit."""
    args = ["--beta_mode", "learnable", "--max_steps", "6", "--save_every_steps", "1",
            "--save_total_limit", "2", "--beta_head_lr", "1e-2", "--max_eval_examples", "2"]
    ref = tmp_path / "ref"
    train.main(common(tiny_qwen2_dir, ref, *args))

    out = tmp_path / "killed"
    cmd = [sys.executable, "train.py", *common(tiny_qwen2_dir, out, *args, "--log_every_steps", "1",
                                               "--resume_from", "auto")]
    metrics = out / "metrics.jsonl"
    size = lambda: metrics.stat().st_size if metrics.exists() else 0  # noqa: E731
    rng, kills = random.Random(0), 0
    for attempt in range(12):
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if attempt < 8:  # later attempts run to completion
            start, deadline = size(), time.time() + 120
            while proc.poll() is None and size() == start and time.time() < deadline:
                time.sleep(0.05)  # until this process has trained a step
            time.sleep(rng.uniform(0.0, 1.0))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
        proc.wait(timeout=300)
        if (out / "final" / "COMPLETED").exists():
            break
    print(f"KILLS {kills} kill -9 at random moments, {attempt + 1} launches")  # for the record (pytest -s)
    assert kills >= 3, "the test did not kill often enough to mean anything"
    assert (out / "final" / "COMPLETED").exists()
    for name in ("model.safetensors", "beta_head.safetensors"):
        a, b = load_file(str(ref / "final" / name)), load_file(str(out / "final" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
