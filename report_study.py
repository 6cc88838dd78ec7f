"""The study's report: a phase's results/study/<phase>.md, its figures and report.md's block, from
its result files alone (a tuning phase's validation curves and choice table; a final phase's
comparison, E3 and the runaway), and the study's measured cost."""

import json
import math
import os
import sys

from registry import beta_bounds
from cells import spread
from measures import f_tokens, head_factor, margins, paired_diffs
from report_study_tables import (OUT_OF_REGIME, beta_analysis_rows, beta_dpo_rows, e3_rows, e3_training_rows, final_rows,
                                 noise_cost_rows)
from result_files import config_of, curve, save_figure, splice, study_results, write_text
from stats import combined_interval, spearman
from study import study_config

E3_CLEAN = "headline"  # the phase whose runs are E3's with clean training data


def report_study_tuning(phase: str, results_dir: str) -> None:
    """A tuning phase of the study: validation curves (figure) and the table they are chosen from."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    results = study_results(results_dir, phase)
    if not results:
        sys.exit(f"error: no results in {results_dir}/study/{phase}; run `python experiments.py run study --phase {phase}` first")
    rows = [f"# study, {phase}: validation ({results[0]['eval']['pairs']} pairs) during training\n",
            "| run | step | loss@beta0 | reward accuracy | margin@beta0 | logratio chosen | logratio rejected |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for r in results:
        ev = curve(r, "eval")
        for m in ev:
            rows.append(f"| {r['name']} | {m['step']} | {m['loss_beta0']:.4f} | {m['rewards/accuracies']:.3f} | "
                        f"{m['rewards_beta0/margins']:.4f} | {m['logratio/chosen']:.3f} | {m['logratio/rejected']:.3f} |")
        tr = curve(r, "train")
        axes[0].plot([m["step"] for m in tr], [m["loss_beta0"] for m in tr], label=r["name"])
        axes[1].plot([m["step"] for m in ev], [m["loss_beta0"] for m in ev], marker="o", label=r["name"])
        axes[2].plot([m["step"] for m in ev], [m["rewards/accuracies"] for m in ev], marker="o", label=r["name"])
    for ax, title in zip(axes, ("training loss at beta0 (logged batches)", "validation loss at beta0",
                                "validation reward accuracy")):
        ax.set(xlabel="step", title=title)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig_dir = os.path.join(results_dir, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    save_figure(fig, os.path.join(fig_dir, f"study_{phase}.png"))
    rows += ["", "The choice is made on the mean of the last three evaluations (one evaluation's binomial s.e. is "
             f"about {math.sqrt(0.66 * 0.34 / results[0]['eval']['pairs']):.3f} in accuracy):", "",
             "| run | validation accuracy, mean of the last 3 evaluations | validation loss@beta0, mean of the last 3 | minutes |",
             "| --- | --- | --- | --- |"]
    for r in results:
        last = curve(r, "eval")[-3:]
        rows.append(f"| {r['name']} | {sum(m['rewards/accuracies'] for m in last) / len(last):.3f} | "
                    f"{sum(m['loss_beta0'] for m in last) / len(last):.4f} | {r['wall_s'] / 60:.1f} |")
    learn = [r for r in results if r["config"]["beta_mode"] == "learnable" and "prompt_tokens" in r["per_pair"]]
    if learn:
        rows += ["", "What drives β in the learnable runs: the final policy's β on the validation pairs, its Spearman "
                 "correlation with the prompt's PPL and its length in tokens, and β on intact and on truncated prompts:", "",
                 "| run | β mean [min, max] | ρ(β, PPL) | ρ(β, prompt tokens) | median β, intact / truncated prompts (n) | "
                 "w, first → last log | f(h) = β / (w · PPL term), mean [min, max] | f(h) s.d. over prompts | "
                 "ρ(f(h), prompt tokens) | NN weight norm, first → last log |",
                 "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in learn:
            p, tr = r["per_pair"], curve(r, "train")
            med = lambda xs: f"{sorted(xs)[len(xs) // 2]:.4f}" if xs else "–"  # noqa: E731
            intact = [b for b, c in zip(p["beta"], p["prompt_truncated"]) if not c]
            cut = [b for b, c in zip(p["beta"], p["prompt_truncated"]) if c]
            f = head_factor(r)
            rows.append(f"| {r['name']} | {spread(p['beta'], 4)} | "
                        f"{spearman(p['beta'], p['ppl']):+.3f} | {spearman(p['beta'], p['prompt_tokens']):+.3f} | "
                        f"{med(intact)} / {med(cut)} ({len(intact)} / {len(cut)}) | "
                        f"{tr[0]['beta_head/w']:.4g} → {tr[-1]['beta_head/w']:.4g} | "
                        f"{spread(f)} | {math.sqrt(sum((x - sum(f) / len(f)) ** 2 for x in f) / len(f)):.4f} | "
                        f"{f_tokens(r):+.3f} | "
                        f"{tr[0]['beta_head/nn_weight_norm']:.4f} → {tr[-1]['beta_head/nn_weight_norm']:.4f} |")
    if phase == "tune_noise":
        rows += ["", "E4's noise level: fixed beta's cost against the clean run with the same flags and seed "
                 "(headline), paired over the validation pairs, and for E3's 30% over its 3 seeds:", ""]
        rows += noise_level_rows(results, results_dir)
    write_text(os.path.join(results_dir, "study", f"{phase}.md"), "\n".join(rows) + "\n")
    splice(results_dir, f"study_{phase}", "\n".join(rows[1:]))
    print("\n".join(rows))


def noise_level_rows(noisy: list[dict], results_dir: str) -> list[str]:
    """E4's noise level (report.md, "E4", step 1): for each noise rate, fixed beta's cost (noisy minus
    clean run of the same seed) in validation loss@beta0 and accuracy, paired over pairs: the mean, its
    s.e. and mean / s.e. at one seed (the pre-registered rule), and, for every rate with several seeds
    (E3's 30%: also on the test split), the combined interval (stats.combined_interval): the amended
    rule reads that one over 3 seeds."""
    clean = {r["seed"]: r for r in study_results(results_dir, "headline") if r["mode"] == "fixed"}
    e3 = [r for r in study_results(results_dir, "e3") if r["mode"] == "fixed" and not config_of(r).get("label_smoothing")]
    rows = ["| noise (flipped, marked rows) | runs | split | cost in loss@β0 (s.e.; mean / s.e.) | cost in accuracy (s.e.; mean / s.e.) |",
            "| --- | --- | --- | --- | --- |"]

    def cell(diffs: list[list[float]]) -> str:
        c = combined_interval(diffs)
        return f"{c['mean']:+.4f} ({c['se']:.4f}; {c['mean'] / c['se']:+.1f})"
    level = lambda r: f"{100 * float(config_of(r)['dataset'].split('noisy')[-1].split('_')[0]):.0f}%"  # noqa: E731
    levels = {}
    for r in noisy:
        levels.setdefault(level(r), []).append(r)
    for label, runs, splits in ([("30% (E3)", [r for r in e3 if r["seed"] == 0], ["eval"]),
                                 ("30% (E3)", e3, ["eval", "test"])] +
                                [(level(r), [r], ["eval"]) for r in noisy] +  # each seed, then the seeds combined
                                [(name, runs, ["eval"]) for name, runs in levels.items() if len(runs) > 1]):
        for split in splits:
            loss = cell(paired_diffs(runs, clean, split, "loss_beta0"))
            acc = cell([[-x for x in d] for d in paired_diffs(runs, clean, split, "rewards/accuracies")])
            rows.append(f"| {label} | {', '.join(r['name'] for r in runs)} | {'validation' if split == 'eval' else split} | "
                        f"{loss} | {acc} |")
    return rows


def plot_final(results: list[dict], modes: list[str], path: str) -> None:
    """Validation loss at beta0 and accuracy during training, and training loss at beta0, per mode
    (mean over seeds)."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for mode in modes:
        rs = [r for r in results if r["mode"] == mode]
        for ax, split, key in ((axes[0], "train", "loss_beta0"), (axes[1], "eval", "loss_beta0"),
                               (axes[2], "eval", "rewards/accuracies")):
            series = [{m["step"]: m[key] for m in curve(r, split)} for r in rs]
            steps = sorted(set.intersection(*[set(x) for x in series]))
            ax.plot(steps, [sum(x[t] for x in series) / len(series) for t in steps], marker="o" if split == "eval" else None,
                    ms=3, label=f"{mode} ({len(rs)} seeds)")
    for ax, title in zip(axes, ("training loss at β0 (logged batches)", "validation loss at β0", "validation reward accuracy")):
        ax.set(xlabel="step", title=title + ", mean over seeds")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def plot_study_beta(results: list[dict], modes: list[str], split: str, path: str) -> None:
    """The learnable modes' beta on `split` against prompt length (x: truncated prompts) and
    against the margin (seed 0), and mean beta over training (mean over seeds)."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for mode in [m for m in modes if m.startswith("learnable")]:
        rs = sorted((r for r in results if r["mode"] == mode), key=lambda r: r["seed"])
        p = rs[0][split]["per_pair"]
        dots = axes[0].scatter(p["prompt_tokens"], p["beta"], s=6, alpha=0.5, label=f"{mode} s{rs[0]['seed']}")
        cut = [i for i, c in enumerate(p["prompt_truncated"]) if c]
        axes[0].scatter([p["prompt_tokens"][i] for i in cut], [p["beta"][i] for i in cut], s=14, marker="x",
                        color=dots.get_facecolor()[0])
        axes[1].scatter(margins(p), p["beta"], s=6, alpha=0.5, label=f"{mode} s{rs[0]['seed']}")
        series = [{m["step"]: m["beta/mean"] for m in curve(r, "train")} for r in rs]
        steps = sorted(set.intersection(*[set(x) for x in series]))
        axes[2].plot(steps, [sum(x[t] for x in series) / len(series) for t in steps], label=mode)
    axes[0].set(xlabel="prompt tokens (x: cut to the last max_prompt_length)", ylabel="β", yscale="log",
                title=f"β vs prompt length, {split} pairs")
    axes[1].set(xlabel="log-ratio margin", ylabel="β", yscale="log", title=f"β vs margin, {split} pairs")
    axes[1].axvline(0, color="grey", lw=0.5)
    axes[2].set(xlabel="step", ylabel="mean β of the logged batches", title="β during training, mean over seeds")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def plot_runaway(results: list[dict], path: str) -> None:
    """w, mean beta, and the smallest and largest beta of the logged training batches against the
    learnable mode's default clamp [beta0 / 10, 10 beta0], over training steps, one colour per run."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for i, r in enumerate(results):
        tr, style = curve(r, "train"), dict(color=f"C{i}", ls=("-", "--", ":")[i % 3])
        steps = [m["step"] for m in tr]
        axes[0].plot(steps, [m["beta_head/w"] for m in tr], label=r["name"], **style)
        axes[1].plot(steps, [m["beta/mean"] for m in tr], **style)
        axes[2].plot(steps, [m["beta/max"] for m in tr], **style)
        axes[2].plot(steps, [m["beta/min"] for m in tr], alpha=0.6, **style)
    for bound in beta_bounds("learnable", config_of(results[0])["beta"]):  # the runaway's runs share beta0
        axes[2].axhline(bound, color="k", lw=0.8, ls="-.")
    for ax, title in zip(axes, ("w", "mean β of the logged batches", "largest and smallest β (dash-dot: default clamp)")):
        ax.set(xlabel="step", title=title)
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def study_cost_rows(results_dir: str) -> list[str]:
    """The study's measured cost per phase: the training wall time (`wall_s`: training with its
    validation evaluations, not the test evaluation) of every committed run, each run once (a run
    reused from another phase is counted there)."""
    rows = ["| phase | runs trained | minutes per run, mean [min, max] | minutes in all |", "| --- | --- | --- | --- |"]
    every = []
    for phase in study_config()["phases"]:
        minutes = [r["wall_s"] / 60 for r in study_results(results_dir, phase) if not r.get("reused_from")]
        if minutes:
            every += minutes
            rows.append(f"| {phase} | {len(minutes)} | {spread(minutes, 1)} | {sum(minutes):.1f} |")
    return rows + [f"| all | {len(every)} | {spread(every, 1)} | {sum(every):.1f} ({sum(every) / 60:.2f} h) |"]


def report_study_final(phase: str, results_dir: str) -> None:
    """A final phase of the study: results/study/<phase>.md, its figures and report.md's
    study_<phase> block, from the result files alone."""
    import matplotlib
    matplotlib.use("Agg")
    results = study_results(results_dir, phase)
    results.sort(key=lambda r: r["seed"])  # the per-seed lists below in seed order (files by name within a seed)
    if not results:
        sys.exit(f"error: no results in {results_dir}/study/{phase}; run `python experiments.py run study --phase {phase}` first")
    modes = list(dict.fromkeys(name.rsplit("-s", 1)[0] for name in study_config()["phases"][phase]))
    modes = [m for m in modes if any(r["mode"] == m for r in results)]
    fig_dir = os.path.join(results_dir, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    n_test = results[0]["test"]["metrics"]["pairs"]
    rows = [f"# study, {phase}: the final policies on the test split ({n_test} pairs, evaluated once)\n"]
    if phase.startswith("runaway"):
        plot_runaway(results, os.path.join(fig_dir, f"study_{phase}.png"))
        rows += ["| run | w first → last log (lowest, highest) | mean β first → last log | largest logged β | max clamped "
                 "fraction | test β mean, geometric mean [min, max] | test f(h), mean [min, max] | validation loss@β0 | "
                 "test accuracy | test loss@β0 |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in results:
            tr, t, f = curve(r, "train"), r["test"]["metrics"], head_factor(r, "test")
            f_text = spread(f) if f else "– (every pair clamped)"
            c = config_of(r)
            unclamped = beta_bounds(c["beta_mode"], c["beta"], c.get("beta_min"), c.get("beta_max")) == (0.0, math.inf)
            clamped = "– (no clamp)" if unclamped else f"{max(m['beta/clamped_frac'] for m in tr):.3f}"
            w, beta = [m["beta_head/w"] for m in tr], r["test"]["per_pair"]["beta"]
            geo = math.exp(sum(math.log(b) for b in beta) / len(beta))
            rows.append(f"| {r['name']} | {w[0]:.4g} → {w[-1]:.4g} ({min(w):.4g}, {max(w):.4g}) | "
                        f"{tr[0]['beta/mean']:.4g} → {tr[-1]['beta/mean']:.4g} | {max(m['beta/max'] for m in tr):.3f} | {clamped} | "
                        f"{t['beta/mean']:.4g}, {geo:.4g} [{t['beta/min']:.4g}, {t['beta/max']:.4g}] | {f_text} | "
                        f"{r['eval']['loss_beta0']:.4f} | {t['rewards/accuracies']:.3f} | {t['loss_beta0']:.4f} |")
    else:
        plot_final(results, modes, os.path.join(fig_dir, f"study_{phase}.png"))
        rows += final_rows(results, modes, "test")
        if "beta_dpo" in modes:
            rows += ["", f"β-DPO's β during training ({OUT_OF_REGIME['beta_dpo']}): its floor 1e-3 binds often, so the "
                     "mean overstates the typical β:", ""] + beta_dpo_rows(results)
        if any(m.startswith("learnable") for m in modes):
            plot_study_beta(results, modes, "test", os.path.join(fig_dir, f"study_{phase}_beta.png"))
            rows += ["", "β against the margin on the test pairs (Spearman ρ; all seeds pooled), prompt length and "
                     "truncation held fixed:", ""] + beta_analysis_rows(results, modes, "test")
        if phase.startswith("e3"):
            rows += ["", f"β on the {results[0]['eval']['pairs']} validation prompts with and without the noisy subset's "
                     "marker (labels unchanged): mean ± 95% t-interval over seeds (each seed's value):", ""] + e3_rows(results, modes)
            clean = study_results(results_dir, E3_CLEAN)
            if clean:
                rows += ["", f"What the noise cost: each E3 run against the {E3_CLEAN} run of its seed and mode (clean training "
                         "data, the same flags), or of fixed β where that phase has no such mode (the 'clean run' column); "
                         "mean over seeds, then each seed's noisy − clean:", ""] + noise_cost_rows(results, clean, modes)
            if any("pair_beta" in r for r in results):
                noisy = set(json.load(open(os.path.join(results_dir, "study", "splits.json")))["e3_train"]["noisy_rows"])
                rows += ["", "β of the training pairs during training (`--log_pair_beta`): the noisy (marked and swapped) "
                         "rows against the clean ones, per window of steps; mean ± 95% t-interval over seeds (each seed's value):", ""]
                rows += e3_training_rows(results, modes, noisy, os.path.join(fig_dir, f"study_{phase}_pair_beta.png"))
    write_text(os.path.join(results_dir, "study", f"{phase}.md"), "\n".join(rows) + "\n")
    splice(results_dir, f"study_{phase}", "\n".join(rows[1:]))
    print("\n".join(rows))
