"""bench.py's GPU script, checked on CPU before device time is spent on it: gpu_bench.sh with a tiny
architecture runs every config (ours with the reference, with cached reference log-probs, with
LoRA; TRL's defaults when trl is installed) and writes finite timings, then trains the architecture
with train.py and scores it with evaluate.py."""

import json
import math
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # the benchmark scripts end to end

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_bench_script_runs_on_cpu_with_a_tiny_architecture(tiny_qwen2_dir, deepseek_tokenizer_dir, tmp_path):
    env = dict(os.environ, ARCH=tiny_qwen2_dir, TOKENIZER=deepseek_tokenizer_dir, DEVICE="cpu", MAX_LENGTH="48",
               BATCH="2", STEPS="1", OUT=str(tmp_path),
               TRAIN_STEPS="2", TRAIN_LENGTH="64", DATA="demo", PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    res = subprocess.run(["bash", "gpu_bench.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = json.load(open(tmp_path / "bench_gpu.json"))
    names = [row["config"].split("@")[0] for row in out["summary"]]
    expected = ["ours-learnable", "ours-learnable+cache", "ours-lora"]
    try:
        import datasets, trl  # noqa: F401, E401
        expected += ["trl-default", "trl-default+cache"]
    except ImportError:
        pass
    assert names == expected
    for row in out["summary"]:
        assert math.isfinite(row["step_s"]) and row["step_s"] > 0 and 0 < row["mfu"] < 1, row
        assert row["peak_memory_gb"] > 0
    assert "| ours-lora |" in open(tmp_path / "bench_gpu.log").read()
    # the training stage: train.py's steps were logged, evaluate.py scored the final checkpoint
    steps = [json.loads(line) for line in open(tmp_path / "train_gpu_metrics.jsonl")]
    assert [m["step"] for m in steps if m["split"] == "train"][-1] == 2
    metrics = json.load(open(tmp_path / "eval_gpu.json"))["metrics"]
    assert metrics["pairs"] > 0 and math.isfinite(metrics["loss"]) and metrics["beta/mean"] > 0
