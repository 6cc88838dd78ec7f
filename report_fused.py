"""The fused-layers check: does the step with fused_layers.py's MLPs and norms train like the one
with Hugging Face's? The per-step training loss of both at one seed, against the difference
between two seeds, as results/fused.md and results/figures/fused_curves.png."""

import glob
import json
import os
import sys

from experiment_configs import EXPERIMENTS, flags
from result_files import config_of, curve, save_report, shown_path


def report_fused(results_dir: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    results = {(r["mode"], r["seed"]): r for r in
               (json.load(open(f)) for f in sorted(glob.glob(os.path.join(results_dir, "fused", "*.json"))))}
    if not results:
        sys.exit(f"error: no results in {results_dir}/fused; run `python experiments.py run fused --seeds 0 1` first")
    loss = {k: [m["loss"] for m in curve(r, "train")] for k, r in results.items()}
    seeds = sorted({s for _, s in results})
    gap = lambda a, b: max(abs(x - y) for x, y in zip(loss[a], loss[b]))  # noqa: E731
    rows = ["# fused layers: fused_layers.py against Hugging Face's MLP and RMSNorm\n",
            f"Every run: `python train.py --dataset {shown_path(config_of(next(iter(results.values())))['dataset'])} "
            f"{' '.join(flags(EXPERIMENTS['fused']))} --beta_mode learnable --seed S`, and `--no_fused_layers` for "
            f"unfused; precision {config_of(next(iter(results.values()))).get('precision', 'auto')} as given, "
            "`auto` choosing what the CPU multiplies fast. The loss of each of the 50 steps (one batch each, "
            "the same batches at one seed); the layers train alike when the largest per-step difference between "
            "fused and unfused at one seed is far below that between two seeds.\n",
            "| comparison | largest per-step loss difference | mean per-step loss difference | final held-out loss@beta0 (a, b) |",
            "| --- | ---: | ---: | --- |"]
    pairs = [(f"fused − unfused, seed {s}", ("fused", s), ("unfused", s)) for s in seeds]
    if len(seeds) > 1:
        pairs += [(f"seed {seeds[1]} − seed {seeds[0]}, {m}", (m, seeds[1]), (m, seeds[0])) for m in ("unfused", "fused")]
    for label, a, b in pairs:
        if a in loss and b in loss:
            mean = sum(abs(x - y) for x, y in zip(loss[a], loss[b])) / len(loss[a])
            ev = f"{results[a]['eval']['loss_beta0']:.5f}, {results[b]['eval']['loss_beta0']:.5f}"
            rows.append(f"| {label} | {gap(a, b):.2e} | {mean:.2e} | {ev} |")
    minutes = {m: [r["wall_s"] / 60 for (mm, _), r in results.items() if mm == m] for m in ("fused", "unfused")}
    rows.append("\nMinutes per run (training and its final evaluation, other work possibly beside it): " + "; ".join(
        f"{m} {', '.join(f'{x:.1f}' for x in v)}" for m, v in minutes.items() if v) + ".")
    fig, (ax, dx) = plt.subplots(1, 2, figsize=(12, 4.2))
    for (mode, seed), ys in sorted(loss.items()):
        ax.plot(range(1, len(ys) + 1), ys, color="C0" if mode == "fused" else "C3", ls="-" if seed == seeds[0] else ":",
                alpha=0.9, label=f"{mode} seed {seed}")
    for label, a, b in pairs:
        if a in loss and b in loss:
            dx.semilogy(range(1, len(loss[a]) + 1), [abs(x - y) + 1e-12 for x, y in zip(loss[a], loss[b])], label=label)
    ax.set(xlabel="step", ylabel="training loss (the step's batch)", title="training loss")
    dx.set(xlabel="step", ylabel="|difference| (+1e-12)", title="per-step loss differences")
    ax.legend(fontsize=8)
    dx.legend(fontsize=8)
    fig.suptitle("fused layers vs Hugging Face's (SmolLM2-135M, HH-RLHF, learnable beta)")
    fig.tight_layout()
    save_report(results_dir, "fused", fig, rows)
