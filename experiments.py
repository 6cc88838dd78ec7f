"""
The experiments behind report.md: fixed vs learnable beta (and beta-DPO) on real preferences.

    python experiments.py run e1                  # every (mode, seed) of E1; finished runs are skipped
    python experiments.py run e1 --modes fixed learnable --seeds 0
    python experiments.py report                  # tables and figures from results/ alone

`run` trains each configuration with train.py in its own process (resuming an interrupted run
with --resume_from auto), evaluates the final checkpoint with evaluate.py, and writes one small
JSON per run to results/<experiment>/<mode>-s<seed>.json (the checkpoints stay under runs/ and
are not committed). `report` rebuilds results/<experiment>.md and results/figures/*.png from
those JSON files.

E1: SmolLM2-135M-Instruct on HH-RLHF harmless-base pairs (the 2,000 in ../shared/data/..., or
pass --data with the same split downloaded from the hub): one fixed held-out split of 10%
(--split_seed 0), one epoch over 400 training pairs in 50 steps of 8, the reference log-probs
cached once and shared by all modes and seeds.
"""

import argparse
import glob
import json
import math
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
HH = os.path.join(os.path.dirname(HERE), "shared", "data", "hh-rlhf-harmless-base", "pairs-2000.jsonl.gz")

# every mode shares the base flags; a mode adds its own
MODES = {
    "fixed": ["--beta_mode", "fixed"],
    "learnable": ["--beta_mode", "learnable"],
    "learnable_reg": ["--beta_mode", "learnable", "--beta_reg", "1.0"],
    "beta_dpo": ["--beta_mode", "beta_dpo"],
}
EXPERIMENTS = {
    "e1": ["--model_name_or_path", "smollm2-135m-instruct", "--eval_fraction", "0.1", "--split_seed", "0",
           "--max_length", "160", "--max_prompt_length", "112", "--batch_size", "4", "--gradient_accumulation_steps", "2",
           "--max_steps", "50", "--max_train_examples", "400", "--policy_lr", "5e-6", "--beta", "0.1", "--warmup_ratio", "0.1",
           "--log_every_steps", "5", "--eval_every_steps", "25", "--save_every_steps", "25", "--save_total_limit", "1",
           "--eval_batch_size", "8", "--precompute_ref"],
}
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def run(exp: str, modes: list[str], seeds: list[int], data: str, extra: list[str], results_dir: str,
        runs_dir: str) -> None:
    os.makedirs(os.path.join(results_dir, exp), exist_ok=True)
    for seed in seeds:  # seed-major, so a partial run already compares modes
        for mode in modes:
            name = f"{mode}-s{seed}"
            result = os.path.join(results_dir, exp, name + ".json")
            if os.path.exists(result):
                print(f"[{exp}] {name}: done, skipped")
                continue
            run_dir = os.path.join(runs_dir, exp, name)
            flags = ["--dataset", data, *EXPERIMENTS[exp], *MODES[mode], *extra, "--seed", str(seed),
                     "--output_dir", run_dir, "--resume_from", "auto"]
            print(f"[{exp}] {name}: training ({run_dir}/train.log)", flush=True)
            os.makedirs(run_dir, exist_ok=True)
            t0 = time.time()
            with open(os.path.join(run_dir, "train.log"), "a") as log:
                subprocess.run([sys.executable, "train.py", *flags], cwd=HERE, stdout=log, stderr=log, check=True)
                subprocess.run([sys.executable, "evaluate.py", "--ckpt", os.path.join(run_dir, "final")],
                               cwd=HERE, stdout=log, stderr=log, check=True)
            lines = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
            with open(os.path.join(run_dir, "final", "eval.json")) as f:
                ev = json.load(f)
            out = dict(experiment=exp, mode=mode, seed=seed, flags=flags, wall_s=time.time() - t0,
                       eval=ev["metrics"], per_pair=ev["per_pair"], data_report=ev["data_report"],
                       curves=[{k: v for k, v in m.items() if not k.startswith("lr/")} for m in lines])
            with open(result + ".tmp", "w") as f:
                json.dump(out, f)
            os.replace(result + ".tmp", result)
            print(f"[{exp}] {name}: acc {out['eval']['rewards/accuracies']:.3f}, "
                  f"loss@beta0 {out['eval']['loss_beta0']:.4f}, {out['wall_s'] / 60:.1f} min", flush=True)


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% t-interval over seeds (nan for one seed)."""
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, float("nan")
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    return m, T95.get(n - 1, 1.96) * sd / math.sqrt(n)


def report(exp: str, results_dir: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(results_dir, exp, "*.json")))]
    if not results:
        sys.exit(f"no results in {results_dir}/{exp}/: run `python experiments.py run {exp}` first")
    modes = [m for m in MODES if any(r["mode"] == m for r in results)]
    keys = ["rewards/accuracies", "loss_beta0", "rewards_beta0/margins", "logratio/chosen", "logratio/rejected",
            "beta/mean", "beta/std", "beta/min", "beta/max", "beta/clamped_frac"]
    rows = ["| mode | seeds | " + " | ".join(keys) + " | minutes |", "|" + " --- |" * (len(keys) + 3)]
    for mode in modes:
        rs = [r for r in results if r["mode"] == mode]
        cells = []
        for k in keys + ["wall_s"]:
            vals = [r["wall_s"] / 60 if k == "wall_s" else r["eval"][k] for r in rs]
            m, ci = mean_ci(vals)
            cells.append(f"{m:.4g}" + ("" if math.isnan(ci) else f" ± {ci:.2g}"))
        rows.append(f"| {mode} | {len(rs)} | " + " | ".join(cells) + " |")
    fig_dir = os.path.join(results_dir, "figures")
    os.makedirs(fig_dir, exist_ok=True)

    # held-out loss at beta0 and mean beta over training, per mode (mean over seeds)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for mode in modes:
        rs = [r for r in results if r["mode"] == mode]
        for ax, split, key in ((axes[0], "eval", "loss_beta0"), (axes[1], "eval", "rewards/accuracies"),
                               (axes[2], "train", "beta/mean")):
            series = [{m["step"]: m[key] for m in r["curves"] if m["split"] == split} for r in rs]
            steps = sorted(set.intersection(*[set(s) for s in series]))
            ax.plot(steps, [sum(s[t] for s in series) / len(series) for t in steps], marker="o", label=mode)
            ax.set_title(f"{split} {key}")
            ax.set_xlabel("step")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(fig_dir, f"{exp}_curves.png"), dpi=110)

    # beta analysis of the learnable runs: beta against prompt PPL and against the margin at beta0
    learn = [r for r in results if r["mode"].startswith("learnable")]
    if learn:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for r in learn:
            p = r["per_pair"]
            margin = [(pc - rc) - (pr - rr) for pc, rc, pr, rr in zip(p["policy_chosen_logps"], p["reference_chosen_logps"],
                                                                      p["policy_rejected_logps"], p["reference_rejected_logps"])]
            label = f"{r['mode']} s{r['seed']}"
            axes[0].scatter(p["ppl"], p["beta"], s=6, alpha=0.5, label=label)
            axes[1].scatter(margin, p["beta"], s=6, alpha=0.5, label=label)
        axes[0].set(xscale="log", xlabel="prompt PPL (policy)", ylabel="beta", title="beta vs PPL(x), held-out")
        axes[1].set(xlabel="log-ratio margin", ylabel="beta", title="beta vs margin, held-out")
        axes[1].axvline(0, color="grey", lw=0.5)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(fig_dir, f"{exp}_beta.png"), dpi=110)

    table = "\n".join(rows) + "\n"
    with open(os.path.join(results_dir, f"{exp}.md"), "w") as f:
        f.write(f"# {exp}: held-out metrics, mean ± 95% CI over seeds\n\n{table}")
    print(table)
    print(f"wrote {results_dir}/{exp}.md and {fig_dir}/{exp}_*.png")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["run", "report"], help="run experiments, or rebuild tables and figures")
    p.add_argument("experiment", nargs="?", default="e1", choices=sorted(EXPERIMENTS), help="which experiment")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES), help="beta modes to run")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds")
    p.add_argument("--data", default=HH, help="preference pairs (default: the shared HH-RLHF harmless-base sample)")
    p.add_argument("--results_dir", default=os.path.join(HERE, "results"), help="where result JSON, tables and figures go")
    p.add_argument("--runs_dir", default=os.path.join(HERE, "runs", "exp"), help="where the runs' checkpoints go")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more train.py flags for every run (last)")
    args = p.parse_args()
    if args.command == "run":
        run(args.experiment, args.modes, args.seeds, args.data, args.extra, args.results_dir, args.runs_dir)
    else:
        report(args.experiment, args.results_dir)
