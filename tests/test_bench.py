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


def bench_env(tiny_qwen2_dir, deepseek_tokenizer_dir, tmp_path, **extra) -> dict:
    """gpu_bench.sh's environment on this CPU with a tiny architecture, and no tensorboard importable:
    the device image has none (a sitecustomize on PYTHONPATH hides it from every python3 it starts)."""
    hide = tmp_path / "no_tensorboard"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['tensorboard'] = None  # as if not installed\n")
    return dict(os.environ, ARCH=tiny_qwen2_dir, TOKENIZER=deepseek_tokenizer_dir, DEVICE="cpu", MAX_LENGTH="48",
                BATCH="2", STEPS="1", ROUNDS="1", OUT=str(tmp_path), TRAIN_STEPS="2", TRAIN_LENGTH="64", DATA="demo",
                PYTHONPATH=str(hide) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]) | extra


def test_gpu_bench_script_runs_on_cpu_with_a_tiny_architecture(tiny_qwen2_dir, deepseek_tokenizer_dir, tmp_path):
    env = bench_env(tiny_qwen2_dir, deepseek_tokenizer_dir, tmp_path)
    check = subprocess.run([sys.executable, "-c", "import importlib.util; print(importlib.util.find_spec('tensorboard'))"],
                           env=env, capture_output=True, text=True)
    assert check.stdout.strip() == "None"  # the stages below run without tensorboard, as on the device
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


def test_gpu_bench_prints_at_once_and_keeps_a_killed_stages_lines(tiny_qwen2_dir, deepseek_tokenizer_dir, tmp_path):
    """The first line comes within 60 s; a stage past its limit is killed and the script goes on (the
    benchmark stage, given 2 s here, which also keeps this test short); killed in the middle of its
    training stage, the script has already written that stage's lines to its log (nothing waits in a
    pipe's buffer), and the training stage wrote no checkpoint."""
    import signal
    import time
    env = bench_env(tiny_qwen2_dir, deepseek_tokenizer_dir, tmp_path, TRAIN_STEPS="100000", TRAIN_TIMEOUT="600",
                    BENCH_TIMEOUT="2")
    start = time.time()
    proc = subprocess.Popen(["bash", "gpu_bench.sh"], cwd=ROOT, env=env, stdout=open(tmp_path / "stdout", "w"),
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        while not (tmp_path / "stdout").read_text():
            assert time.time() - start < 60, "no first line within 60 s"
            time.sleep(0.2)
        first = (tmp_path / "stdout").read_text().splitlines()[0]
        assert first.startswith("gpu_bench: ") and time.time() - start < 60, (first, time.time() - start)
        log = tmp_path / "train_gpu.log"
        deadline = time.time() + 400
        while not (log.exists() and "training 100000 steps" in log.read_text()):
            assert time.time() < deadline and proc.poll() is None, "the training stage never logged its start"
            time.sleep(1)
        time.sleep(3)  # some steps run
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    text = (tmp_path / "train_gpu.log").read_text()
    assert "data: " in text and "training 100000 steps" in text  # written while the stage ran
    assert "the benchmark failed or ran past 2 s" in (tmp_path / "stdout").read_text()  # killed at its limit, and on
    assert not list(tmp_path.glob("**/checkpoints/step_*"))


def test_the_parent_hands_its_cuda_peak_test_memory_back(monkeypatch):
    """bench.peaks on CUDA empties the caching allocator after its 8192^2 matmuls, so the parent does not
    sit on ~1 GB of the card while each config's child process trains (no GPU here: the matmul is a stub)."""
    import torch

    import bench
    calls = []
    monkeypatch.setattr(bench, "matmul_gflops", lambda threads, dtype=None, n=0, device="cpu": calls.append((n, device)) or 1.0)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    assert bench.peaks(1, "cuda") == {"fp32": 1.0, "bf16": 1.0}
    assert calls == [(8192, "cuda"), (8192, "cuda"), "empty_cache"]
    calls.clear()
    bench.peaks(1, "cpu")
    assert "empty_cache" not in calls
