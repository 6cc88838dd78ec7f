"""The study's tables for its final phases: the headline comparison to fixed beta with every
source of noise, the family of comparisons under Holm's correction, beta-DPO's floor, beta against
the margin, and E3 (beta on marked prompts, the noise's cost, beta of the noisy training pairs)."""

from cells import fmt_ci, fmt_combined, fmt_detectable, spread
from measures import DRIFT_STEPS, drift, head_factor, head_terms, margins, pair_beta_windows, paired_diffs
from result_files import config_of, curve, held_out, save_figure, study_results
from stats import auc, combined_interval, holm, mean_ci, pair_bootstrap, partial_spearman, spearman


# the study's final phases: the headline comparison on the test split, E3, the runaway
TEST_KEYS = ("rewards/accuracies", "loss_beta0", "rewards_beta0/margins", "logratio/chosen", "logratio/rejected")


def final_rows(results: list[dict], modes: list[str], split: str) -> list[str]:
    """The headline table of a final phase (mean ± 95% t-interval over seeds on `split`), the
    differences to fixed paired by seed, and the smallest difference the design could detect."""
    cols = ("accuracy", "loss@β0", "margin@β0", "logratio chosen", "logratio rejected")
    rows = [f"| mode | seeds | {' | '.join(cols)} | training β, first → last {DRIFT_STEPS} steps | training prompt PPL, "
            f"first → last {DRIFT_STEPS} steps | validation accuracy | validation loss@β0 | minutes |",
            "|" + " --- |" * (len(cols) + 7)]
    for mode in modes:
        rs = [r for r in results if r["mode"] == mode]
        cells = [fmt_ci([r[split]["metrics"][k] for r in rs], digits=3 if k != "loss_beta0" else 4) for k in TEST_KEYS]
        beta, ppl = (" → ".join(f"{mean_ci(v)[0]:.{d}f}" for v in zip(*(drift(r, k) for r in rs)))
                     for k, d in (("beta/mean", 4), ("ppl/mean", 1)))
        rows.append(f"| {mode} | {len(rs)} | {' | '.join(cells)} | {beta} | {ppl} | "
                    f"{fmt_ci([r['eval']['rewards/accuracies'] for r in rs], digits=3)} | "
                    f"{fmt_ci([r['eval']['loss_beta0'] for r in rs], digits=4)} | "
                    f"{mean_ci([r['wall_s'] / 60 for r in rs])[0]:.1f} |")
    fixed = {r["seed"]: r for r in results if r["mode"] == "fixed"}
    if not fixed:
        return rows
    rows += ["", f"Difference to `fixed` on the {split} split and on validation, paired by seed: mean ± 95% t-interval "
             "over seeds (each seed's value; the test pairs held fixed), then [95% interval from resampling the test "
             "pairs] (the policies held fixed), then the **combined** 95% interval that holds both (stats.combined_interval: "
             "seed and pair variance added, Welch-Satterthwaite degrees of freedom) — the one the verdict reads. "
             "'detectable' is the smallest true difference detected with 80% power at α = 0.05 from the combined "
             "standard error, [its 95% range from the uncertainty of that standard error] (stats.detectable).", "",
             "| mode | seeds | Δ accuracy, seeds | [pairs] | combined | detectable | Δ loss@β0, seeds | [pairs] | combined | "
             "detectable | Δ validation loss@β0, seeds | combined |", "|" + " --- |" * 12]
    for mode in [m for m in modes if m != "fixed"]:
        rs = [r for r in results if r["mode"] == mode and r["seed"] in fixed]
        cells = []
        for k in ("rewards/accuracies", "loss_beta0"):
            d = [held_out(r, split)[0][k] - held_out(fixed[r["seed"]], split)[0][k] for r in rs]
            per = paired_diffs(rs, fixed, split, k)
            lo, hi = pair_bootstrap(per)
            c = combined_interval(per)
            cells += [fmt_ci(d, signed=True, per_seed=True), f"[{lo:+.4f}, {hi:+.4f}]", fmt_combined(c), fmt_detectable(c)]
        d = [r["eval"]["loss_beta0"] - fixed[r["seed"]]["eval"]["loss_beta0"] for r in rs]
        cells += [fmt_ci(d, signed=True, per_seed=True), fmt_combined(combined_interval(paired_diffs(rs, fixed, "eval", "loss_beta0")))]
        rows.append(f"| {mode} | {len(rs)} | " + " | ".join(cells) + " |")
    return rows


FAMILY_METRICS = (("test", "rewards/accuracies", "test accuracy"), ("test", "loss_beta0", "test loss@β0"),
                  ("eval", "loss_beta0", "validation loss@β0"))
OUT_OF_REGIME = {"beta_dpo": "β-DPO's statistics see 4 pairs (its authors': 32) and α was not tuned: outside its regime"}


def family_rows(results_dir: str) -> list[str]:
    """Every paired comparison the verdict reads, as one family: each mode against fixed beta in the
    headline and in E3, and E3's noise cost to fixed beta (E3's fixed against the headline's), on
    test accuracy, test loss@beta0 and validation loss@beta0. Per comparison the combined interval
    (seeds and test pairs), its p-value and Holm's adjusted p-value over the whole family: a
    difference is called real only where the adjusted p is below 0.05."""
    phases = {p: study_results(results_dir, p) for p in ("headline", "e3")}
    if not all(phases.values()):
        return []
    comps = []  # (what, metric label, combined interval)
    for phase, results in phases.items():
        fixed = {r["seed"]: r for r in results if r["mode"] == "fixed"}
        for mode in dict.fromkeys(r["mode"] for r in results if r["mode"] != "fixed"):
            rs = sorted((r for r in results if r["mode"] == mode and r["seed"] in fixed), key=lambda r: r["seed"])
            label = f"{phase}: {mode} − fixed" + (" (out of regime)" if mode in OUT_OF_REGIME else "")
            comps += [(label, name, combined_interval(paired_diffs(rs, fixed, split, key))) for split, key, name in FAMILY_METRICS]
    clean = {r["seed"]: r for r in phases["headline"] if r["mode"] == "fixed"}
    noisy = sorted((r for r in phases["e3"] if r["mode"] == "fixed" and r["seed"] in clean), key=lambda r: r["seed"])
    comps += [("noise cost: fixed, e3 − headline", name, combined_interval(paired_diffs(noisy, clean, split, key)))
              for split, key, name in FAMILY_METRICS]
    adjusted = holm([c["p"] for _, _, c in comps])
    rows = ["| comparison | metric | difference ± combined 95% | se seeds / se pairs | df | detectable [range] | p | "
            "Holm-adjusted p | real at family-wise 5%? |", "|" + " --- |" * 9]
    for (what, name, c), adj in zip(comps, adjusted):
        rows.append(f"| {what} | {name} | {fmt_combined(c)} | {c['se_seed']:.4f} / {c['se_pair']:.4f} | {c['df']:.1f} | "
                    f"{fmt_detectable(c)} | {c['p']:.3f} | {adj:.3f} | {'yes' if adj < 0.05 else 'no'} |")
    return rows + ["", f"{len(comps)} comparisons in the family; " + "; ".join(f"{m}: {why}" for m, why in OUT_OF_REGIME.items()) + "."]


def beta_dpo_rows(results: list[dict], after: int = DRIFT_STEPS) -> list[str]:
    """beta-DPO's batch-level beta over training, from the logged windows after step `after`: its mean,
    the share of pairs at the floor (beta/clamped_frac: the whole micro-batch shares one beta, so the
    share of micro-batches), the windows in which more than half sat at the floor (there the
    window's median beta IS the floor; at exactly half it lies between the floor and the next value),
    and the largest logged beta in units of beta0."""
    rows = [f"| run | mean β after step {after} | share at the floor (β = 1e-3) | logged windows with more than half at the "
            "floor (median β = the floor) | largest logged β | largest / β₀ |", "| --- | --- | --- | --- | --- | --- |"]
    for r in (r for r in results if r["mode"] == "beta_dpo"):
        tr = [m for m in curve(r, "train") if m["step"] > after]
        beta0 = config_of(r)["beta"]
        top = max(m["beta/max"] for m in tr)
        rows.append(f"| {r['name']} | {sum(m['beta/mean'] for m in tr) / len(tr):.4f} | "
                    f"{sum(m['beta/clamped_frac'] for m in tr) / len(tr):.2f} | "
                    f"{sum(m['beta/clamped_frac'] > 0.5 for m in tr)} of {len(tr)} | {top:.3f} | {top / beta0:.1f} |")
    return rows


def beta_analysis_rows(results: list[dict], modes: list[str], split: str) -> list[str]:
    """Beta against the margin on `split` in each learnable mode, with prompt length and truncation
    held fixed: raw and partial Spearman correlations (pairs of all seeds pooled), and per stratum."""
    rows = ["| mode | pairs | ρ(β, prompt tokens) | ρ(β, margin) | partial ρ(β, margin \\| tokens, truncated) | "
            "ρ(β, margin): intact prompts, short / long half | truncated prompts | mean β intact / truncated | "
            "f(h) per seed, mean [min, max] | w per seed, change first → last training log |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for mode in [m for m in modes if m.startswith("learnable")]:
        beta, marg, tokens, cut, f, w = [], [], [], [], [], []
        for r in (r for r in results if r["mode"] == mode):
            p = r[split]["per_pair"]
            f.append(head_factor(r, split))  # per seed: the NN can saturate at either end of its band
            tr = curve(r, "train")
            w.append(tr[-1]["beta_head/w"] / tr[0]["beta_head/w"] - 1)
            beta += p["beta"]
            marg += margins(p)
            tokens += p["prompt_tokens"]
            cut += [float(x) for x in p["prompt_truncated"]]
        intact = [i for i, c in enumerate(cut) if not c]
        med = sorted(tokens[i] for i in intact)[len(intact) // 2] if intact else 0
        strata = [[i for i in intact if tokens[i] < med], [i for i in intact if tokens[i] >= med],
                  [i for i, c in enumerate(cut) if c]]
        rho = lambda idx: f"{spearman([beta[i] for i in idx], [marg[i] for i in idx]):+.3f} (n={len(idx)})" if len(idx) > 2 else "–"  # noqa: E731
        mean = lambda idx: f"{sum(beta[i] for i in idx) / len(idx):.4g}" if idx else "–"  # noqa: E731
        rows.append(f"| {mode} | {len(beta)} | {spearman(beta, tokens):+.3f} | {spearman(beta, marg):+.3f} | "
                    f"{partial_spearman(beta, marg, [tokens, cut]):+.3f} | {rho(strata[0])} / {rho(strata[1])} | "
                    f"{rho(strata[2])} | {mean(intact)} / {mean(strata[2])} | "
                    + "; ".join(spread(x) for x in f) + " | "
                    + "; ".join(f"{x:+.1%}" for x in w) + " |")
    return rows


def e3_rows(results: list[dict], modes: list[str]) -> list[str]:
    """Does beta learn the noisy subset? The same validation prompts with and without E3's marker:
    mean beta on each, and the AUC P(beta marked < beta plain) (0.5 = beta ignores the marker).
    For learnable beta the paired ratio splits into its two factors (w is the same for both): the
    PPL term's, which the marker changes through the prompt's text, and f(h)'s, what the NN learned
    (1 at step 0: its last layer starts at zero)."""
    rows = ["| mode | seeds | mean β, plain validation prompts | marked | paired β ratio marked / plain | "
            "AUC P(β marked < β plain) | ratio of the PPL term | ratio of f(h) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for mode in modes:
        rs = [r for r in results if r["mode"] == mode]
        plain, marked, ratio, aucs, ppl_ratio, f_ratio = [], [], [], [], [], []
        for r in rs:
            a = dict(zip(r["per_pair"]["row"], r["per_pair"]["beta"]))
            b = dict(zip(r["validation_marked"]["per_pair"]["row"], r["validation_marked"]["per_pair"]["beta"]))
            common = sorted(set(a) & set(b))
            plain.append(sum(a[i] for i in common) / len(common))
            marked.append(sum(b[i] for i in common) / len(common))
            ratio.append(sum(b[i] / a[i] for i in common) / len(common))
            aucs.append(auc([b[i] for i in common], [a[i] for i in common]))
            if config_of(r)["beta_mode"] == "learnable":
                tp, tm = head_terms(r), head_terms(r, "validation_marked")
                both = sorted(set(tp) & set(tm))
                ppl_ratio.append(sum(tm[i][0] / tp[i][0] for i in both) / len(both))
                f_ratio.append(sum(tm[i][1] / tp[i][1] for i in both) / len(both))
        terms = f"{fmt_ci(ppl_ratio, per_seed=True)} | {fmt_ci(f_ratio, per_seed=True)}" if f_ratio else "– | –"
        rows.append(f"| {mode} | {len(rs)} | {fmt_ci(plain)} | {fmt_ci(marked)} | {fmt_ci(ratio, per_seed=True)} | "
                    f"{fmt_ci(aucs, digits=3, per_seed=True)} | {terms} |")
    return rows


def noise_cost_rows(results: list[dict], clean: list[dict], modes: list[str]) -> list[str]:
    """What the label noise cost: each E3 run against the headline run (clean training data) of the
    same seed and mode, or of fixed beta where the headline has no such mode; mean over seeds of
    clean -> noisy on the test and the validation pairs, then each seed's noisy - clean. Fixed beta's
    row is the room for a mode to resist the noise."""
    rows = ["| mode | seeds | clean run | test accuracy, clean → noisy | test loss@β0 | validation accuracy | "
            "validation loss@β0 |", "| --- | --- | --- | --- | --- | --- | --- |"]
    by_name = {(r["mode"], r["seed"]): r for r in clean}
    for mode in modes:
        rs = [r for r in results if r["mode"] == mode]
        base = mode if any((mode, r["seed"]) in by_name for r in rs) else "fixed"
        pairs = [(by_name[(base, r["seed"])], r) for r in rs if (base, r["seed"]) in by_name]
        if not pairs:
            continue
        cells = []
        for get in (lambda r: r["test"]["metrics"]["rewards/accuracies"], lambda r: r["test"]["metrics"]["loss_beta0"],
                    lambda r: r["eval"]["rewards/accuracies"], lambda r: r["eval"]["loss_beta0"]):
            per_seed = [f"{get(n) - get(c):+.3f}" for c, n in pairs]  # noisy - clean, in seed order
            cells.append(f"{mean_ci([get(c) for c, _ in pairs])[0]:.4f} → {mean_ci([get(n) for _, n in pairs])[0]:.4f}"
                         + (f" ({'; '.join(per_seed)})" if len(pairs) > 1 else ""))
        rows.append(f"| {mode} | {len(pairs)} | {base} | " + " | ".join(cells) + " |")
    return rows


def e3_training_rows(results: list[dict], modes: list[str], noisy: set[int], path: str) -> list[str]:
    """β of the noisy and clean training pairs during training, first and last window (mean ±
    95% t over seeds), and the figure of the ratio over training."""
    import matplotlib.pyplot as plt
    rows = [f"| mode | seeds | β noisy / clean, steps 1–{DRIFT_STEPS} | last {DRIFT_STEPS} steps | "
            f"AUC P(β noisy < β clean), steps 1–{DRIFT_STEPS} | last {DRIFT_STEPS} steps |", "| --- | --- | --- | --- | --- | --- |"]
    cell = lambda xs: fmt_ci(xs, digits=3, per_seed=True)  # noqa: E731
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for k, mode in enumerate(modes):
        runs = [r for r in results if r["mode"] == mode and "pair_beta" in r]
        ws = [pair_beta_windows(r, noisy) for r in runs]
        if not ws:
            continue
        ratio = [[w[1] / w[2] for w in run] for run in ws]
        rows.append(f"| {mode} | {len(ws)} | {cell([x[0] for x in ratio])} | {cell([x[-1] for x in ratio])} | "
                    f"{cell([run[0][3] for run in ws])} | {cell([run[-1][3] for run in ws])} |")
        for r, run, x in zip(runs, ws, ratio):  # each seed its own line: the seeds can disagree
            ax.plot([w[0] for w in run], x, color=f"C{k}", ls=["-", "--", ":", "-."][r["seed"] % 4], marker="o", ms=3,
                    label=f"{mode} s{r['seed']}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set(xlabel=f"step (windows of {DRIFT_STEPS})", ylabel="mean β noisy / mean β clean",
           title="E3: β of the noisy training pairs, per seed")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: no line hidden
    fig.tight_layout()
    save_figure(fig, path)
    return rows
