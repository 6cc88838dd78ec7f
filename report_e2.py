"""E2's report: gold reward against KL(pi || pi_ref) per mode and beta0, as results/e2.md, the
reward-KL frontier figure and report.md's e2 block, from the result files alone."""

import glob
import json
import os
import sys

from e2 import E2_SAMPLES, E2_TRAIN
from experiment_configs import MODES, flags
from result_files import curve, save_figure, splice


def report_e2(results_dir: str) -> None:
    """results/e2.md (reward and KL per mode and beta0) and the reward-KL frontier figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = os.path.join(results_dir, "e2")
    ref_path = os.path.join(out_dir, "reference.json")
    results = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(out_dir, "*-b*.json")))]
    if not results or not os.path.exists(ref_path):
        sys.exit(f"no results in {out_dir}/: run `python experiments.py run e2` first")
    ref = json.load(open(ref_path))
    pairs = [json.loads(x) for x in open(os.path.join(out_dir, "pairs.jsonl"))]
    gap = sum(p["chosen_reward"] - p["rejected_reward"] for p in pairs) / max(1, len(pairs))
    rows = ["# e2: gold reward (VADER compound, held-out prompts) against KL(pi || pi_ref)\n",
            f"{len(pairs)} training pairs (best vs worst of {E2_SAMPLES} reference samples; mean gold-reward gap "
            f"{gap:.3f}); each trained policy scored on {results[0]['samples']} samples of the held-out prompts. "
            f"Reference policy: reward {ref['reward']:.3f} ± {ref['reward_se']:.3f} (s.e., {ref['samples']} samples). "
            f"Every run: `python train.py --dataset results/e2/pairs.jsonl --model_name_or_path MODEL {' '.join(flags(E2_TRAIN))} "
            "--beta BETA0 --seed 0` plus the mode's flags (as in E1); the KL is estimated from the same samples "
            "as the reward, responses cut at 40 tokens; s.e. treats the samples as independent (4 per prompt).\n",
            "| mode | beta0 | reward ± s.e. | KL ± s.e. (nats) | reward gain / KL | train beta mean, first → last log | train prompt PPL mean, first → last | minutes |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    modes = [m for m in MODES if any(r["mode"] == m for r in results)]
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.errorbar([0], [ref["reward"]], yerr=[ref["reward_se"]], fmt="k*", ms=10, label="reference")
    for mode in modes:
        rs = sorted((r for r in results if r["mode"] == mode), key=lambda r: r["beta"])
        for r in rs:
            train = curve(r, "train")
            gain = (r["reward"] - ref["reward"]) / r["kl"] if r["kl"] > 0 else float("nan")
            rows.append(f"| {mode} | {r['beta']:g} | {r['reward']:.3f} ± {r['reward_se']:.3f} | {r['kl']:.2f} ± {r['kl_se']:.2f} "
                        f"| {gain:.3f} | {train[0]['beta/mean']:.3g} → {train[-1]['beta/mean']:.3g} "
                        f"| {train[0]['ppl/mean']:.1f} → {train[-1]['ppl/mean']:.1f} | {r['wall_s'] / 60:.1f} |")
        line = ax.errorbar([r["kl"] for r in rs], [r["reward"] for r in rs], xerr=[r["kl_se"] for r in rs],
                           yerr=[r["reward_se"] for r in rs], marker="o", capsize=2, label=mode)
        for r in rs:
            ax.annotate(f"{r['beta']:g}", (r["kl"], r["reward"]), fontsize=7, color=line[0].get_color(),
                        xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel="KL(pi || pi_ref), nats per response (sampled estimate)", ylabel="mean gold reward (VADER compound)",
           title="E2: reward vs KL frontier (labels: beta0)")
    ax.legend()
    fig.tight_layout()
    fig_dir = os.path.join(results_dir, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    save_figure(fig, os.path.join(fig_dir, "e2_frontier.png"))
    with open(os.path.join(results_dir, "e2.md"), "w") as f:
        f.write("\n".join(rows) + "\n")
    splice(results_dir, "e2", "\n".join(rows[1:]))
    print("\n".join(rows))
    print(f"wrote {results_dir}/e2.md and {fig_dir}/e2_frontier.png")
