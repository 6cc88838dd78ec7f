"""E1's report: held-out metrics per mode and paired differences to fixed beta, how beta moved in
the learnable modes, and the data and training paragraphs: results/<exp>.md, its figures and
report.md's blocks, from the result files alone."""

import glob
import json
import math
import os
import sys

from cells import spread
from experiment_configs import EXPERIMENTS, MODES, flags
from measures import head_factor, margins
from result_files import config_of, curve, save_figure, shown_path, splice
from stats import mean_ci


def report(exp: str, results_dir: str) -> None:
    """results/<exp>.md, its figures and report.md's blocks, from the result files alone."""
    import matplotlib
    matplotlib.use("Agg")

    results = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(results_dir, exp, "*.json")))]
    if not results:
        sys.exit(f"no results in {results_dir}/{exp}/: run `python experiments.py run {exp}` first")
    modes = [m for m in MODES if any(r["mode"] == m for r in results)]
    fig_dir = os.path.join(results_dir, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    plot_curves(results, modes, os.path.join(fig_dir, f"{exp}_curves.png"))
    rows = summary_rows(results, modes) + paired_difference_rows(results, modes)
    if any(m.startswith("learnable") for m in modes):
        plot_beta_scatter([r for r in results if r["mode"].startswith("learnable")], os.path.join(fig_dir, f"{exp}_beta.png"))
        rows += beta_rows(results, modes, os.path.join(fig_dir, f"{exp}_beta_training.png"))
    table = "\n".join(rows) + "\n"
    with open(os.path.join(results_dir, f"{exp}.md"), "w") as f:
        f.write(f"# {exp}: held-out metrics, mean ± 95% CI over seeds\n\n{table}")
    splice(results_dir, exp, table)
    data_path = os.path.join(results_dir, f"{exp}_data.json")
    if os.path.exists(data_path):  # written by `experiments.py data`
        splice(results_dir, f"{exp}_data", data_block(json.load(open(data_path))))
    splice(results_dir, "training", training_block(exp, results, modes))
    print(table)
    print(f"wrote {results_dir}/{exp}.md and {fig_dir}/{exp}_*.png")


def summary_rows(results: list[dict], modes: list[str]) -> list[str]:
    """The held-out metrics table: mean ± 95% CI over seeds per mode."""
    keys = ["rewards/accuracies", "loss_beta0", "rewards_beta0/margins", "logratio/chosen", "logratio/rejected",
            "beta/mean", "beta/std", "beta/min", "beta/max", "beta/clamped_frac"]
    rows = ["| mode | seeds | " + " | ".join(keys) + " | minutes |", "|" + " --- |" * (len(keys) + 3)]
    for mode in modes:
        rs = [r for r in results if r["mode"] == mode]
        cells = []
        for k in keys + ["wall_s"]:
            vals = [r["wall_s"] / 60 if k == "wall_s" else r["eval"][k] for r in rs]
            m, ci = mean_ci(vals)
            m = 0.0 if abs(m) < 1e-6 else m  # a constant's float std, not a spread
            cells.append(f"{m:.4g}" + ("" if math.isnan(ci) else f" ± {ci:.2g}"))
        rows.append(f"| {mode} | {len(rs)} | " + " | ".join(cells) + " |")
    return rows


def paired_difference_rows(results: list[dict], modes: list[str]) -> list[str]:
    """Differences to fixed beta, paired by seed (same data order and split)."""
    fixed = {r["seed"]: r for r in results if r["mode"] == "fixed"}
    if not fixed:
        return []
    rows = ["", "Difference to `fixed`, paired by seed (mean ± 95% CI; an interval containing 0 is no evidence of a difference):", "",
            "| mode | seeds | Δ rewards/accuracies | Δ loss_beta0 | Δ rewards_beta0/margins |", "| --- | --- | --- | --- | --- |"]
    for mode in modes[1:] if modes[0] == "fixed" else []:
        rs = [r for r in results if r["mode"] == mode and r["seed"] in fixed]
        cells = []
        for k in ("rewards/accuracies", "loss_beta0", "rewards_beta0/margins"):
            m, ci = mean_ci([r["eval"][k] - fixed[r["seed"]]["eval"][k] for r in rs])
            cells.append(f"{m:+.4f}" + ("" if math.isnan(ci) else f" ± {ci:.4f}"))
        rows.append(f"| {mode} | {len(rs)} | " + " | ".join(cells) + " |")
    return rows


def plot_curves(results: list[dict], modes: list[str], path: str) -> None:
    """Training curves per mode (mean over seeds; each point is the batches since the last log)."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for mode in modes:
        rs = [r for r in results if r["mode"] == mode]
        for ax, key in ((axes[0], "loss_beta0"), (axes[1], "rewards_beta0/margins"), (axes[2], "beta/mean")):
            series = [{m["step"]: m[key] for m in curve(r, "train")} for r in rs]
            steps = sorted(set.intersection(*[set(s) for s in series]))
            ax.plot(steps, [sum(s[t] for s in series) / len(series) for t in steps], marker="o", label=mode)
            ax.set_title(f"train {key} (mean over seeds)")
            ax.set_xlabel("step")
    axes[0].legend()
    fig.tight_layout()
    save_figure(fig, path)


def plot_beta_scatter(learn: list[dict], path: str) -> None:
    """Held-out beta of the learnable runs against prompt PPL and against the margin."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in learn:
        p = r["per_pair"]
        label = f"{r['mode']} s{r['seed']}"
        axes[0].scatter(p["ppl"], p["beta"], s=6, alpha=0.5, label=label)
        axes[1].scatter(margins(p), p["beta"], s=6, alpha=0.5, label=label)
    axes[0].set(xscale="log", xlabel="prompt PPL (policy)", ylabel="beta", title="beta vs PPL(x), held-out")
    axes[1].set(xlabel="log-ratio margin", ylabel="beta", title="beta vs margin, held-out")
    axes[1].axvline(0, color="grey", lw=0.5)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def beta_rows(results: list[dict], modes: list[str], path: str) -> list[str]:
    """How beta, w and the NN moved in training, and beta by the sign of the held-out margin (table
    rows), with the training curves of beta, w, the NN norm and PPL as a figure at path."""
    import matplotlib.pyplot as plt
    rows = ["", "Beta in the learnable modes (mean over seeds): training batches at the first, middle and last "
            "logged step (mean [min, max]); held-out pairs split by the sign of the log-ratio margin; w and the "
            "NN's weight norm at the start and end.", "",
            "| mode | beta start | beta middle | beta end | held-out beta, margin > 0 | margin < 0 | w start → end | NN norm end | held-out f(h) mean [min, max] |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    fig, axes = plt.subplots(1, 4, figsize=(19, 4))
    for mode in [m for m in modes if m.startswith("learnable")]:
        rs = [r for r in results if r["mode"] == mode]
        train = [curve(r, "train") for r in rs]
        avg = lambda i, k: sum(t[i][k] for t in train) / len(train)  # noqa: E731
        at = lambda i: f"{avg(i, 'beta/mean'):.3g} [{avg(i, 'beta/min'):.3g}, {avg(i, 'beta/max'):.3g}]"  # noqa: E731
        n = min(len(t) for t in train)
        pos, neg = [], []
        for r in rs:
            for b, m in zip(r["per_pair"]["beta"], margins(r["per_pair"])):
                (pos if m > 0 else neg).append(b)
        mean = lambda xs: f"{sum(xs) / len(xs):.3g} (n={len(xs)})" if xs else "-"  # noqa: E731
        f = [x for r in rs for x in head_factor(r)]
        rows.append(f"| {mode} | {at(0)} | {at(n // 2)} | {at(n - 1)} | {mean(pos)} | {mean(neg)} | "
                    f"{avg(0, 'beta_head/w'):.4g} → {avg(n - 1, 'beta_head/w'):.4g} | {avg(n - 1, 'beta_head/nn_weight_norm'):.3g} | "
                    f"{spread(f, 4)} |")
        steps = [t["step"] for t in train[0][:n]]
        for ax, key in ((axes[0], "beta/mean"), (axes[2], "beta_head/nn_weight_norm"), (axes[3], "ppl/mean")):
            ax.plot(steps, [avg(i, key) for i in range(n)], marker="o", label=mode)
            ax.set(title=f"train {key} (mean over seeds)", xlabel="step")
        axes[1].plot(steps, [avg(i, "beta_head/w") / avg(0, "beta_head/w") for i in range(n)], marker="o", label=mode)
        axes[1].set(title="w / w at the first logged step (mean over seeds)", xlabel="step")
        axes[0].fill_between(steps, [avg(i, "beta/min") for i in range(n)], [avg(i, "beta/max") for i in range(n)], alpha=0.15)
    axes[0].legend()
    fig.tight_layout()
    save_figure(fig, path)
    return rows


def data_block(d: dict) -> str:
    """report.md's data table, from `experiments.py data`'s file."""
    q = lambda x: "{p10} / {median} / {p90} / {max}".format(**x)  # noqa: E731
    lines = [f"Source: `{d['source']}`, {d['rows']} pairs; the held-out split is a fixed 10% (`--split_seed 0`), "
             "the same for every mode and seed. Token counts with SmolLM2's chat template, before truncation "
             "(p10 / median / p90 / max):", "",
             "| split | rows used | kept | skipped | prompt tokens | chosen tokens | rejected tokens | truncated by the length limits |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in ("train", "eval"):
        x = d[name]
        lines.append(f"| {name} | {x['rows']} | {x['kept']} | {x['skipped'] or 0} | {q(x['prompt_tokens'])} | "
                     f"{q(x['chosen_tokens'])} | {q(x['rejected_tokens'])} | {x['truncation']} |")
    return "\n".join(lines)


def training_block(exp: str, results: list[dict], modes: list[str]) -> str:
    """report.md's training paragraph: the exact command of every run, and minutes per mode."""
    data = config_of(results[0])["dataset"]
    data = shown_path(data)
    lines = [f"Every {exp} run: `python train.py --dataset {data} {' '.join(flags(EXPERIMENTS[exp]))}` plus the mode's flags ("
             + "; ".join(f"`{m}`: `{' '.join(flags(MODES[m]))}`" for m in MODES) + ") and `--seed 0|1|2`; train.py evaluates "
             "the final policy on the held-out pairs (final/eval.json). AdamW (0.9, 0.999, eps 1e-8), no weight decay, "
             "gradient clipping at 1.0, cosine decay after 10% warmup, fp32, 1 process. The first run of the study "
             "(`fixed` seed 0) also built the reference log-prob cache that every other run reuses.", "",
             "| mode | minutes per run (mean over seeds, train + eval) |", "| --- | --- |"]
    for mode in modes:
        lines.append(f"| {mode} | {mean_ci([r['wall_s'] / 60 for r in results if r['mode'] == mode])[0]:.1f} |")
    return "\n".join(lines)
