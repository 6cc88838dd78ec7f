"""Faults: non-finite steps are skipped and counted, kill -9 at random moments never leaves a
checkpoint that resume would load half-written, a failed save leaves earlier checkpoints intact."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import beta_head
import checkpoint
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
    ckpt = checkpoint.complete_checkpoints(str(out))[-1]
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
    assert [os.path.basename(c) for c in checkpoint.complete_checkpoints(str(out))] == ["step_2"]
    assert sorted(os.listdir(out / "checkpoints")) == ["step_2"]


def test_auto_resume_ignores_incomplete_checkpoints(tmp_path):
    d = tmp_path / "checkpoints"
    for name, complete in [("step_2", True), ("step_10", True), ("step_12", False), ("step_14.tmp", True)]:
        os.makedirs(d / name)
        if complete:
            (d / name / "COMPLETED").write_text("")
    assert [os.path.basename(c) for c in checkpoint.complete_checkpoints(str(tmp_path))] == ["step_2", "step_10"]


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


def test_resume_auto_passes_over_a_damaged_newest_checkpoint_and_resumes_exactly(tiny_qwen2_dir, tmp_path, capsys):
    """A run whose newest checkpoint (step_3) was cut short resumes from step_2, says so, leaves the
    damaged one on disk, and ends bit for bit where an uninterrupted run ends."""
    args = ["--beta_mode", "learnable", "--max_steps", "4", "--beta_head_lr", "1e-2"]
    full, part = tmp_path / "full", tmp_path / "part"
    train.main(common(tiny_qwen2_dir, full, *args, "--save_every_steps", "1", "--save_total_limit", "0"))
    for step in (2, 3):
        shutil.copytree(full / "checkpoints" / f"step_{step}", part / "checkpoints" / f"step_{step}")
    weights = part / "checkpoints" / "step_3" / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) - 100)
    cut = open(weights, "rb").read()
    capsys.readouterr()
    # step_2 is the newest readable one; saving every 2 steps writes nothing over step_3
    train.main(common(tiny_qwen2_dir, part, *args, "--save_every_steps", "2", "--resume_from", "auto"))
    out = capsys.readouterr().out
    assert "warning: passing over checkpoint" in out and "step_3: model.safetensors is damaged" in out
    assert f"resumed from {part / 'checkpoints' / 'step_2'} at step 2" in out
    assert open(weights, "rb").read() == cut  # nothing deleted or rewritten
    for name in ("model.safetensors", "beta_head.safetensors"):
        a, b = load_file(str(full / "final" / name)), load_file(str(part / "final" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_evaluate_nonfinite_weights_only_when_asked(tiny_qwen2_dir, tmp_path):
    """--allow_nonfinite evaluates a diverged checkpoint anyway and says so in eval.json."""
    import evaluate
    from safetensors.torch import save_file
    out = tmp_path / "run"
    train.main(common(tiny_qwen2_dir, out, "--max_steps", "1", "--max_eval_examples", "2"))
    w = load_file(str(out / "final" / "model.safetensors"))
    name = sorted(w)[0]
    w[name][0] = float("nan")
    save_file(w, str(out / "final" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(DataError, match=f"1 of {len(w)} weight tensors hold NaN or inf \\(first: {name}\\)"):
        evaluate.main(["--ckpt", str(out / "final")])
    evaluate.main(["--ckpt", str(out / "final"), "--allow_nonfinite"])
    assert json.load(open(out / "final" / "eval.json"))["metrics"]["nonfinite_tensors"] == 1


def test_unwritable_or_full_output_disk_is_one_line_before_training(tiny_qwen2_dir, tmp_path, monkeypatch):
    from collections import namedtuple

    def no_write(*a, **k):
        raise PermissionError(13, "Permission denied")
    with monkeypatch.context() as m:
        m.setattr(train.os, "makedirs", no_write)
        with pytest.raises(DataError, match="cannot write there \\(Permission denied\\); choose another --output_dir"):
            train.main(common(tiny_qwen2_dir, tmp_path / "ro", "--max_steps", "1"))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(train.shutil, "disk_usage", lambda p: usage(10 ** 12, 10 ** 12 - 1000, 1000))
    steps = []
    monkeypatch.setattr(train, "train_step", lambda *a: steps.append(1))
    with pytest.raises(DataError, match="its disk has 0.00 GB free and one checkpoint of this run needs about"):
        train.main(common(tiny_qwen2_dir, tmp_path / "full", "--max_steps", "1"))
    assert steps == []  # refused before any training step
