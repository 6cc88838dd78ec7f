"""
The experiments behind report.md: fixed vs learnable beta (and beta-DPO), on real preferences (E1)
and against a known gold reward (E2).

    python experiments.py data                    # E1 data sizes and token lengths -> results/e1_data.json
    python experiments.py run e1                  # every (mode, seed) of E1; finished runs are skipped
    python experiments.py run e1 --modes fixed learnable --seeds 0
    python experiments.py run e2                  # every (beta0, mode) of E2
    python experiments.py report e1               # tables, figures and report.md's blocks from results/ alone
    python experiments.py report e2
    python experiments.py run bf16 --seeds 0 1    # fixed and learnable in fp32 and bf16 (100 steps each)
    python experiments.py report bf16
    python experiments.py run fused --seeds 0 1   # the fused layers against Hugging Face's (50 steps each)
    python experiments.py report fused
    python experiments.py run study --phase P     # the study of issue #13 (configs/study.yaml), one phase
    python experiments.py run study --phase P --runs fixed-s1   # one run of it
    python experiments.py report study --phase P

`run` trains each configuration with train.py in its own process (resuming an interrupted run
with --resume_from auto; train.py evaluates the final policy into final/eval.json) and writes one
small JSON per run to results/<experiment>/ (the checkpoints stay under runs/ and are not
committed). `report` rebuilds results/<experiment>.md, results/figures/*.png and the matching
blocks of report.md from those JSON files.

E1: SmolLM2-135M-Instruct on HH-RLHF harmless-base pairs (the 2,000 in ../shared/data/..., or
pass --data with the same split downloaded from the hub): one fixed held-out split of 10%
(--split_seed 0, first 100 pairs used), 24 steps of 8 pairs over the first 192 training pairs,
the reference log-probs cached once and shared by all modes and seeds.

bf16: does bf16 autocast train like fp32? SmolLM2-135M-Instruct on the same HH-RLHF split, 100 steps of
4 pairs over the first 400 training pairs, held-out loss and accuracy every 20 steps, fixed and
learnable beta in each precision (PRECISION_MODES); report bf16 sets the precision difference at
one seed against the seed-to-seed difference.

E2: the DPO paper's controlled sentiment experiment. Prompts written in e2.py; 4 samples per training
prompt from the reference (--e2_model, default SmolLM2-135M-Instruct), scored by the VADER
sentiment lexicon; pairs = best vs worst; each mode trained for every beta0 in E2_BETAS; each
trained policy sampled on held-out prompts for its mean gold reward and a Monte-Carlo estimate of
KL(pi || pi_ref) = E_{y ~ pi}[log pi(y|x) - log pi_ref(y|x)] (responses cut at 40 tokens).

This file is the command line and the runner. The rest is library code: experiment_configs.py (the
configurations), study.py (the study's configuration and splits), e2.py (E2's prompts, gold reward
and sampling), result_files.py (the files written and read back), and the reports, report_e1.py,
report_e2.py, report_bf16.py, report_fused.py, report_study.py and report_study_tables.py (numbers from
measures.py, cells.py and stats.py).
"""

import argparse
import glob
import json
import os
import signal
import subprocess
import sys
import time

from data import load_splits
from tokenization import build_examples
from e2 import E2_BETAS, E2_TRAIN, e2_pairs, e2_score
from experiment_configs import EXPERIMENTS, FUSED_MODES, MODES, PRECISION_MODES, flags
from checkpoint import drop_resume_state, is_complete
from model_loader import load_policy, load_tokenizer
from report_bf16 import report_bf16
from report_fused import report_fused
from report_e1 import report
from report_e2 import report_e2
from report_study import report_study_final, report_study_tuning, study_cost_rows
from report_study_tables import family_rows
from result_files import shown_path, splice, write_json, write_text
from study import study_config, study_runs

HERE = os.path.dirname(os.path.abspath(__file__))
HH = os.path.join(os.path.dirname(HERE), "shared", "data", "hh-rlhf-harmless-base", "pairs-2000.jsonl.gz")


def train_run(run_dir: str, flags: list[str]) -> tuple[list[dict], float]:
    """Train one configuration into run_dir (resuming; skipped when final/ is complete) -> (its
    curves, the wall seconds of every attempt at it). SIGTERM or Ctrl-C is passed on to train.py,
    which checkpoints at the end of its step and stops (a second one kills it; the last checkpoint
    stays); the attempt's seconds then go to run_dir/attempts.json and the runner exits, so a
    resumed run's time counts every attempt that was stopped."""
    os.makedirs(run_dir, exist_ok=True)
    t0, earlier = time.time(), earlier_attempts_s(run_dir)
    with open(os.path.join(run_dir, "train.log"), "a") as log:
        if not is_complete(os.path.join(run_dir, "final")):
            proc, stops = None, []

            def forward(signum, frame):
                stops.append(signum)
                if proc is not None:
                    proc.kill() if len(stops) > 1 else proc.send_signal(signal.SIGTERM)
            previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
            try:
                proc = subprocess.Popen([sys.executable, "train.py", *flags, "--output_dir", run_dir,
                                         "--resume_from", "auto"], cwd=HERE, stdout=log, stderr=log)
                if stops:  # a signal came before train.py started
                    proc.send_signal(signal.SIGTERM)
                rc = proc.wait()
            finally:
                for s, h in previous.items():
                    signal.signal(s, h)
            if stops:
                write_json(os.path.join(run_dir, "attempts.json"), earlier + [time.time() - t0])
                sys.exit(f"{run_dir}: stopped by a signal; the same command resumes it")
            if rc:
                raise subprocess.CalledProcessError(rc, proc.args)
        if not os.path.exists(os.path.join(run_dir, "final", "eval.json")):  # train.py writes it at the end
            subprocess.run([sys.executable, "evaluate.py", "--ckpt", os.path.join(run_dir, "final")],
                           cwd=HERE, stdout=log, stderr=log, check=True)
    lines = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [{k: v for k, v in m.items() if not k.startswith("lr/")} for m in lines], sum(earlier) + time.time() - t0


def earlier_attempts_s(run_dir: str) -> list[float]:
    """The wall seconds of a run's interrupted attempts (train_run writes them)."""
    path = os.path.join(run_dir, "attempts.json")
    return json.load(open(path)) if os.path.exists(path) else []


def run(exp: str, modes: list[str], seeds: list[int], data: str, extra: list[str], results_dir: str,
        runs_dir: str, keep: bool = False) -> None:
    """Every (mode, seed) of an experiment of EXPERIMENTS, seed-major (so a partial run already
    compares modes)."""
    configs = {f"{mode}-s{seed}": dict(dataset=data, **EXPERIMENTS[exp], **{**MODES, **PRECISION_MODES, **FUSED_MODES}[mode],
                                       seed=seed)
               for seed in seeds for mode in modes}
    run_configs(exp, configs, extra, results_dir, runs_dir, keep)


def run_configs(exp: str, configs: dict[str, dict], extra: list[str], results_dir: str, runs_dir: str,
                keep: bool = False, test_data: dict[str, str] | None = None) -> None:
    """Train each named configuration (train.py evaluates it on its held-out split), and evaluate
    its final policy on each of test_data {name: pairs} too (result key = name); one result JSON per
    run in results_dir/exp/. Finished runs (their JSON exists) are skipped; interrupted ones resume;
    a configuration already trained by another study phase is reused (same_run)."""
    os.makedirs(os.path.join(results_dir, exp), exist_ok=True)
    for name, config in configs.items():
        result = os.path.join(results_dir, exp, name + ".json")
        if os.path.exists(result):
            print(f"[{exp}] {name}: done, skipped")
            continue
        argv = flags(config) + extra + (["--keep_checkpoints"] if keep else [])
        earlier = same_run(config, argv, results_dir, runs_dir, exp)
        if earlier:  # the same configuration trained in an earlier phase: its policy, not a re-run
            out, run_dir = earlier
            print(f"[{exp}] {name}: the same run as {out['experiment']}/{out['name']}, reused", flush=True)
            out.update(reused_from=f"{out['experiment']}/{out['name']}", experiment=exp, name=name)
        else:
            run_dir = os.path.join(runs_dir, exp, name)
            print(f"[{exp}] {name}: training ({run_dir}/train.log)", flush=True)
            curves, wall_s = train_run(run_dir, argv)
            with open(os.path.join(run_dir, "final", "eval.json")) as f:
                ev = json.load(f)
            with open(os.path.join(run_dir, "data_report.json")) as f:
                train_report = json.load(f)["train"]
            out = dict(experiment=exp, name=name, seed=config.get("seed", 0),
                       config=config, flags=argv, wall_s=wall_s, eval=ev["metrics"], per_pair=ev["per_pair"],
                       data_report=ev["data_report"], train_data_report=train_report, curves=curves)
            if os.path.exists(os.path.join(run_dir, "pair_beta.jsonl")):  # --log_pair_beta
                out["pair_beta"] = [json.loads(x) for x in open(os.path.join(run_dir, "pair_beta.jsonl"))]
        out["mode"] = name.rsplit("-s", 1)[0]
        for split, data in (test_data or {}).items():  # extra held-out sets (the test split: the final policy, once)
            out[split] = evaluate_on(run_dir, data, f"eval_{split}")
        write_json(result, out)
        if not keep:
            drop_resume_state(run_dir)
        print(f"[{exp}] {name}: held-out acc {out['eval']['rewards/accuracies']:.3f}, "
              f"loss@beta0 {out['eval']['loss_beta0']:.4f}, {out['wall_s'] / 60:.1f} min", flush=True)


def portable(argv: list[str]) -> list[str]:
    """A command line with its absolute paths cut to their file names (results move between checkouts)."""
    return [os.path.basename(a) if os.path.isabs(a) else a for a in argv]


def same_run(config: dict, argv: list[str], results_dir: str, runs_dir: str, exp: str) -> tuple[dict, str] | None:
    """(result, run directory) of a run of another study phase with exactly this command line whose
    final policy is still on disk, else None: a study's phases share runs instead of repeating them
    (a tuning run at the chosen setting is seed 0 of the headline comparison)."""
    if not exp.startswith("study/"):
        return None
    for path in sorted(glob.glob(os.path.join(results_dir, "study", "*", "*.json"))):
        other = json.load(open(path))
        if other.get("experiment") == exp or other.get("reused_from") or portable(other["flags"]) != portable(argv):
            continue
        run_dir = os.path.join(runs_dir, other["experiment"], other["name"])
        if is_complete(os.path.join(run_dir, "final")):
            return {k: v for k, v in other.items() if k not in ("test", "validation_marked")}, run_dir
    return None


def evaluate_on(run_dir: str, data: str, out_name: str) -> dict:
    """evaluate.py on a run's final policy with other pairs -> {metrics, per_pair} (also written to
    final/<out_name>.json)."""
    final = os.path.join(run_dir, "final")
    with open(os.path.join(run_dir, "train.log"), "a") as log:
        subprocess.run([sys.executable, "evaluate.py", "--ckpt", final, "--dataset", data, "--out_name", out_name],
                       cwd=HERE, stdout=log, stderr=log, check=True)
    with open(os.path.join(final, out_name + ".json")) as f:
        ev = json.load(f)
    return dict(metrics=ev["metrics"], per_pair=ev["per_pair"], data_report=ev["data_report"])


def run_study(phase: str, data: str, extra: list[str], results_dir: str, runs_dir: str, keep: bool = False,
              only: list[str] | None = None) -> None:
    """One phase of the study (configs/study.yaml): its runs and extra held-out sets (study_runs),
    trained and evaluated by run_configs. only: these runs of the phase."""
    configs, held_out = study_runs(phase, data, runs_dir, results_dir, only)
    run_configs(f"study/{phase}", configs, extra, results_dir, runs_dir, keep, held_out)


def run_e2(modes: list[str], betas: list[float], extra: list[str], results_dir: str, runs_dir: str,
           model: str = "smollm2-135m-instruct", keep: bool = False) -> None:
    """E2 with `model` as the reference: it writes the pairs, starts every policy and anchors the KL
    (a results_dir holds the pairs of one model)."""
    out_dir = os.path.join(results_dir, "e2")
    os.makedirs(out_dir, exist_ok=True)
    pairs = os.path.join(out_dir, "pairs.jsonl")
    if not os.path.exists(pairs):
        e2_pairs(pairs, model)
    tokenizer = load_tokenizer(model)
    reference = load_policy(model).eval()
    ref_result = os.path.join(out_dir, "reference.json")
    if not os.path.exists(ref_result):  # the starting point of every curve: KL 0
        write_json(ref_result, dict(mode="reference", beta=0.0, **e2_score(reference, reference, tokenizer, seed=1)))
    for beta in betas:
        for mode in modes:
            name = f"{mode}-b{beta:g}"
            result = os.path.join(out_dir, name + ".json")
            if os.path.exists(result):
                print(f"[e2] {name}: done, skipped")
                continue
            run_dir = os.path.join(runs_dir, "e2", name)
            config = dict(dataset=pairs, model_name_or_path=model, **E2_TRAIN, beta=beta, **MODES[mode], seed=0)
            argv = flags(config) + extra + (["--keep_checkpoints"] if keep else [])
            print(f"[e2] {name}: training ({run_dir}/train.log)", flush=True)
            curves, train_s = train_run(run_dir, argv)
            t0 = time.time()
            policy = load_policy(os.path.join(run_dir, "final")).eval()
            score = e2_score(policy, reference, tokenizer, seed=1)
            wall_s = train_s + time.time() - t0
            write_json(result, dict(experiment="e2", mode=mode, beta=beta, config=config, flags=argv,
                                    wall_s=wall_s, **score, curves=curves))
            if not keep:
                drop_resume_state(run_dir)
            print(f"[e2] {name}: reward {score['reward']:.3f}, KL {score['kl']:.2f}, {wall_s / 60:.1f} min", flush=True)


def data_stats(data: str, results_dir: str) -> None:
    """Sizes and token-length statistics of E1's data (untruncated, and what E1's limits cut)
    -> results/e1_data.json. Reads the data and the tokenizer only."""
    e1 = EXPERIMENTS["e1"]
    tokenizer = load_tokenizer(e1["model_name_or_path"])
    train, held = load_splits(data, "train", None, e1["eval_fraction"], e1["split_seed"])
    out = dict(source=shown_path(data), rows=len(train) + len(held))
    for name, rows in (("train", train[:e1["max_train_examples"]]), ("eval", held[:e1["max_eval_examples"]])):
        full, _ = build_examples(rows, tokenizer, 10 ** 6, 10 ** 6 - 1, name=name)
        _, cut = build_examples(rows, tokenizer, e1["max_length"], e1["max_prompt_length"], name=name)
        q = lambda xs: dict(zip(("p10", "median", "p90", "max"), [sorted(xs)[int(f * (len(xs) - 1))] for f in (0.1, 0.5, 0.9, 1.0)]))
        out[name] = dict(rows=len(rows), kept=cut["kept"], skipped=cut["skipped"], truncation=cut["truncation"],
                         prompt_tokens=q([len(e["prompt_ids"]) for e in full]),
                         chosen_tokens=q([len(e["chosen_ids"]) for e in full]),
                         rejected_tokens=q([len(e["rejected_ids"]) for e in full]))
    write_json(os.path.join(results_dir, "e1_data.json"), out)
    print(json.dumps(out, indent=1))


def rebuild(experiment: str, phase: str, results_dir: str) -> None:
    """`experiments.py report EXPERIMENT [--phase PHASE]`: its tables, figures and report.md blocks
    from the result files alone (a study phase also the study's cost table)."""
    if experiment == "study":
        if phase.startswith("tune"):
            report_study_tuning(phase, results_dir)
        else:
            report_study_final(phase, results_dir)
        splice(results_dir, "study_cost", "\n".join(study_cost_rows(results_dir)))
        family = family_rows(results_dir)
        if family:
            write_text(os.path.join(results_dir, "study", "family.md"), "# study: every paired comparison the verdict "
                       "reads, with Holm's correction over the family\n\n" + "\n".join(family) + "\n")
            splice(results_dir, "study_family", "\n".join(family))
    elif experiment == "e2":
        report_e2(results_dir)
    elif experiment == "bf16":
        report_bf16(results_dir)
    elif experiment == "fused":
        report_fused(results_dir)
    else:
        report(experiment, results_dir)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["run", "report", "data"],
                   help="run experiments, rebuild tables and figures, or write E1's data statistics")
    p.add_argument("experiment", nargs="?", default="e1", choices=["e1", "e2", "bf16", "fused", "study"],
                   help="which experiment")
    p.add_argument("--phase", default="tune_lr", choices=list(study_config()["phases"]), help="which phase of the study (study)")
    p.add_argument("--runs", nargs="+", default=None, help="only these runs of the study's phase (default: all)")
    p.add_argument("--modes", nargs="+", default=None, choices=list(MODES) + list(PRECISION_MODES) + list(FUSED_MODES),
                   help="beta modes to run (default: all of the experiment's: MODES, PRECISION_MODES for bf16, "
                        "FUSED_MODES for fused)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (e1)")
    p.add_argument("--betas", nargs="+", type=float, default=E2_BETAS, help="beta0 sweep (e2)")
    p.add_argument("--e2_model", default="smollm2-135m-instruct",
                   help="e2's reference model (samples the pairs, starts every policy); give each model its own --results_dir")
    p.add_argument("--data", default=HH, help="preference pairs (default: the shared HH-RLHF harmless-base sample)")
    p.add_argument("--results_dir", default=os.path.join(HERE, "results"), help="where result JSON, tables and figures go")
    p.add_argument("--runs_dir", default=os.path.join(HERE, "runs", "exp"), help="where the runs' checkpoints go")
    p.add_argument("--keep_checkpoints", action="store_true",
                   help="keep every run's step checkpoints (train.py --keep_checkpoints; default: a finished run keeps "
                        "final/ only, ~0.5 GB for SmolLM2)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more train.py flags for every run (last)")
    args = p.parse_args()
    valid = {"bf16": PRECISION_MODES, "fused": FUSED_MODES}.get(args.experiment, MODES)
    args.modes = args.modes or list(valid)
    if any(m not in valid for m in args.modes):
        p.error(f"--modes of {args.experiment}: choose from {list(valid)}")
    if args.command == "data":
        data_stats(args.data, args.results_dir)
    elif args.command == "run" and args.experiment == "study":
        run_study(args.phase, args.data, args.extra, args.results_dir, args.runs_dir, args.keep_checkpoints, args.runs)
    elif args.command == "run" and args.experiment == "e2":
        run_e2(args.modes, args.betas, args.extra, args.results_dir, args.runs_dir, args.e2_model, args.keep_checkpoints)
    elif args.command == "run":
        run(args.experiment, args.modes, args.seeds, args.data, args.extra, args.results_dir, args.runs_dir,
            args.keep_checkpoints)
    else:
        rebuild(args.experiment, args.phase, args.results_dir)
