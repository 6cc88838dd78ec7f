"""The bf16 report: does bf16 autocast train like fp32? The precision difference at one seed set
against the seed-to-seed difference, as results/bf16.md, its figure and report.md's bf16 block."""

import glob
import json
import os
import sys

from experiment_configs import EXPERIMENTS, flags
from result_files import config_of, curve, save_report, shown_path, splice


def report_bf16(results_dir: str) -> None:
    """bf16 autocast against fp32: learning curves (figure) and final held-out metrics, with the
    precision difference (same seed, same data order) next to the seed-to-seed difference."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    results = [json.load(open(f)) for f in sorted(glob.glob(os.path.join(results_dir, "bf16", "*.json")))]
    if not results:
        sys.exit(f"error: no results in {results_dir}/bf16; run `python experiments.py run bf16` first")
    get = lambda mode, prec: sorted((r for r in results if r["mode"] == f"{mode}@{prec}"), key=lambda r: r["seed"])  # noqa: E731
    keys = ("loss_beta0", "rewards/accuracies", "rewards_beta0/margins")
    rows = ["# bf16: bf16 autocast against fp32\n",
            f"Every run: `python train.py --dataset {shown_path(config_of(results[0])['dataset'])} "
            f"{' '.join(flags(EXPERIMENTS['bf16']))}` plus `--beta_mode fixed|learnable`, `--precision fp32|bf16` and "
            "`--seed 0|1`. Final held-out metrics (100 pairs) per seed; 'precision Δ' is bf16 − fp32 at the same seed "
            "(same data order and init), 'seed Δ' is seed 1 − seed 0 at the same precision: bf16 trains like fp32 "
            "when the first is no larger than the second.\n",
            "| mode | metric | fp32 (seeds) | bf16 (seeds) | precision Δ (per seed) | seed Δ fp32 | seed Δ bf16 | minutes fp32 / bf16 |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for mode in ("fixed", "learnable"):
        a, b = get(mode, "fp32"), get(mode, "bf16")
        if not a or not b:
            continue
        for k in keys:
            va, vb = [r["eval"][k] for r in a], [r["eval"][k] for r in b]
            fmt = lambda xs: ", ".join(f"{x:.4f}" for x in xs)  # noqa: E731
            d_prec = [y - x for x, y in zip(va, vb)]
            d_seed = lambda xs: f"{xs[1] - xs[0]:+.4f}" if len(xs) > 1 else "–"  # noqa: E731
            minutes = f"{sum(r['wall_s'] for r in a) / len(a) / 60:.1f} / {sum(r['wall_s'] for r in b) / len(b) / 60:.1f}"
            rows.append(f"| {mode} | {k} | {fmt(va)} | {fmt(vb)} | {', '.join(f'{d:+.4f}' for d in d_prec)} | "
                        f"{d_seed(va)} | {d_seed(vb)} | {minutes} |")
        for prec, runs, color in (("fp32", a, "C0"), ("bf16", b, "C3")):
            for r in runs:
                style = dict(color=color, ls="-" if mode == "fixed" else "--", alpha=0.9 if r["seed"] == 0 else 0.5,
                             label=f"{mode} {prec}" if r["seed"] == 0 else None)
                tr, ev = curve(r, "train"), curve(r, "eval")
                axes[0].plot([m["step"] for m in tr], [m["loss"] for m in tr], **style)
                axes[1].plot([m["step"] for m in ev], [m["loss_beta0"] for m in ev], **style)
                axes[2].plot([m["step"] for m in ev], [m["rewards/accuracies"] for m in ev], **style)
    for ax, title in zip(axes, ("training loss (logged batches)", "held-out loss at beta0", "held-out reward accuracy")):
        ax.set(xlabel="step", title=title)
    axes[0].legend(fontsize=8)
    fig.suptitle("bf16 autocast vs fp32 (SmolLM2-135M, HH-RLHF; solid fixed, dashed learnable; faint: seed 1)")
    fig.tight_layout()
    save_report(results_dir, "bf16", fig, rows)
    splice(results_dir, "bf16", "\n".join(rows[1:]))
