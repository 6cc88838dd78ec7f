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

import train
from test_train import common

REPO = os.path.dirname(os.path.abspath(train.__file__))
ARGS = ["--beta_mode", "learnable", "--max_steps", "4", "--log_every_steps", "1", "--save_every_steps", "2",
        "--save_total_limit", "0", "--beta_head_lr", "1e-2", "--eval_batch_size", "2"]


def torchrun(args, nproc=2):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={port}", "train.py", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout + res.stderr


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
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1)
    # only the main process wrote: one complete copy of each checkpoint, no stray temporaries
    assert sorted(os.listdir(two / "checkpoints")) == ["step_2"]

    # resume the 2-process run from its step-2 checkpoint: same final weights
    three = tmp_path / "three"
    os.makedirs(three / "checkpoints")
    shutil.copytree(two / "checkpoints" / "step_2", three / "checkpoints" / "step_2")
    torchrun(common(tiny_qwen2_dir, three, *ARGS, "--batch_size", "1", "--resume_from", "auto"))
    w3 = load_file(str(three / "final" / "model.safetensors"))
    assert all(torch.equal(w2[k], w3[k]) for k in w2)
