"""The experiment runner: runs, skips finished runs, and rebuilds tables and figures from results."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_run_skip_and_report(tiny_qwen2_dir, tmp_path):
    res, runs = str(tmp_path / "results"), str(tmp_path / "runs")
    cmd = [sys.executable, "experiments.py", "run", "e1", "--modes", "fixed", "learnable", "--seeds", "0", "--data", "demo",
           "--results_dir", res, "--runs_dir", runs, "--extra", "--model_name_or_path", tiny_qwen2_dir, "--max_steps", "2",
           "--max_train_examples", "16", "--max_eval_examples", "8", "--max_length", "64", "--max_prompt_length", "40",
           "--eval_every_steps", "1", "--save_every_steps", "1", "--log_every_steps", "1",
           "--ref_cache_dir", str(tmp_path / "cache")]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    r = json.load(open(os.path.join(res, "e1", "learnable-s0.json")))
    assert r["mode"] == "learnable" and len(r["per_pair"]["beta"]) == 8
    assert {m["split"] for m in r["curves"]} == {"train", "eval"}
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.stdout.count("done, skipped") == 2
    rep = subprocess.run([sys.executable, "experiments.py", "report", "e1", "--results_dir", res], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr
    table = open(os.path.join(res, "e1.md")).read()
    assert "| fixed | 1 |" in table and "| learnable | 1 |" in table
    assert os.path.getsize(os.path.join(res, "figures", "e1_curves.png")) > 10_000
    assert os.path.exists(os.path.join(res, "figures", "e1_beta.png"))
