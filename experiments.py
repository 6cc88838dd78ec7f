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

E2: the DPO paper's controlled sentiment experiment. Prompts written here; 4 samples per training
prompt from the reference (--e2_model, default SmolLM2-135M-Instruct), scored by the VADER
sentiment lexicon; pairs = best vs worst; each mode trained for every beta0 in E2_BETAS; each
trained policy sampled on held-out prompts for its mean gold reward and a Monte-Carlo estimate of
KL(pi || pi_ref) = E_{y ~ pi}[log pi(y|x) - log pi_ref(y|x)] (responses cut at 40 tokens).
"""

import argparse
import glob
import json
import math
import os
import signal
import subprocess
import sys
import time

import torch
from tqdm import tqdm

from beta_head import beta_bounds, ppl_scale, sequence_logps
from data import BadRow, build_examples, collate, load_rows, load_splits, normalize_row
from model_loader import drop_resume_state, is_complete, load_policy, load_tokenizer
from stats import auc, combined_interval, detectable, holm, mean_ci, pair_bootstrap, partial_spearman, spearman

HERE = os.path.dirname(os.path.abspath(__file__))
HH = os.path.join(os.path.dirname(HERE), "shared", "data", "hh-rlhf-harmless-base", "pairs-2000.jsonl.gz")


def shown_path(path: str) -> str:
    """How reports write a data path: a file under a folder named shared (the innermost one) as
    ../shared/..., wherever the checkout that ran it lived (result files record absolute paths), so
    that reports rebuild the same in any clone; other paths relative to the repo."""
    if not os.path.isabs(path):
        return path
    parts = path.split(os.sep)
    if "shared" in parts:
        return "/".join([".."] + parts[len(parts) - 1 - parts[::-1].index("shared"):])
    return os.path.relpath(path, HERE)


# configurations are data: train.py flags as dicts (flag name -> value; True is a bare switch), turned
# into a command line by flags(). Every mode shares its experiment's flags and adds its own.
MODES = {
    "fixed": dict(beta_mode="fixed"),
    "learnable": dict(beta_mode="learnable"),
    "learnable_logppl": dict(beta_mode="learnable", ppl_transform="log"),  # the stabiliser, see report.md
    "beta_dpo": dict(beta_mode="beta_dpo"),
}
EXPERIMENTS = {
    "e1": dict(model_name_or_path="smollm2-135m-instruct", eval_fraction=0.1, split_seed=0, max_length=128,
               max_prompt_length=96, batch_size=4, gradient_accumulation_steps=2, max_steps=24,
               max_train_examples=192, max_eval_examples=100, policy_lr=1e-5, beta=0.1, warmup_ratio=0.1,
               log_every_steps=2, eval_every_steps=0, save_every_steps=12, save_total_limit=1, eval_batch_size=8,
               precompute_ref=True, precision="fp32"),
    # bf16 against fp32: does autocast train like fp32? 100 steps of 4 pairs, held-out eval every 20
    "bf16": dict(model_name_or_path="smollm2-135m-instruct", eval_fraction=0.1, split_seed=0, max_length=128,
                 max_prompt_length=96, batch_size=4, max_steps=100, max_train_examples=400, max_eval_examples=100,
                 policy_lr=3e-5, beta=0.1, warmup_ratio=0.1, log_every_steps=5, eval_every_steps=20,
                 save_every_steps=50, save_total_limit=1, eval_batch_size=8, precompute_ref=True),
}
# the bf16 experiment's modes: fixed and learnable, each in both precisions
PRECISION_MODES = {f"{m}@{p}": dict(MODES[m], precision=p) for m in ("fixed", "learnable") for p in ("fp32", "bf16")}


def flags(config: dict) -> list[str]:
    """train.py's command line for a configuration: --name value, True as a bare --name, False and
    None left out."""
    out = []
    for name, value in config.items():
        if value is True:
            out.append(f"--{name}")
        elif value is not False and value is not None:
            out += [f"--{name}", str(value)]
    return out


def config_of(result: dict) -> dict:
    """The train.py configuration a result was run with (results from before configurations were
    stored as dicts hold only the command line: parsed here)."""
    if "config" in result:
        return result["config"]
    config, argv = {}, result["flags"]
    for i, a in enumerate(argv):
        if a.startswith("--"):
            has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            config[a[2:]] = argv[i + 1] if has_value else True
    return config


# E2: a controlled gold reward (the DPO paper's sentiment experiment, with the vaderSentiment
# lexicon as the reward). Prompts are written here: each subject under each framing; the last
# E2_HELDOUT subjects are never trained on and are the prompts the trained policies are scored on.
E2_SUBJECTS = ["a rainy Monday", "the city bus", "the neighbour's dog", "a long flight delay", "homework",
               "a job interview", "cold coffee", "a visit to the dentist", "a traffic jam", "a new phone",
               "winter", "a power outage", "the office printer", "a crowded train", "moving house",
               "a birthday party", "a broken umbrella", "tax season", "a camping trip", "the gym",
               "a missed deadline", "grocery shopping", "a hospital waiting room", "the evening news",
               "an old car", "a school lunch", "a lost wallet", "a first date", "a noisy hotel room",
               "a long queue at the bank"]
E2_FRAMINGS = ["Write one sentence about {}.", "Describe {} in one sentence.", "Tell a friend about {} in one sentence.",
               "Give your honest opinion of {} in one sentence.", "Write a short diary line about {}.",
               "Write a one-sentence review of {}."]
E2_HELDOUT = 5
E2_BETAS = [0.05, 0.1, 0.2, 0.5]
E2_SAMPLES, E2_EVAL_SAMPLES, E2_NEW_TOKENS = 4, 4, 40
E2_TRAIN = dict(eval_fraction=0.1, split_seed=0, max_length=112, max_prompt_length=64, batch_size=4,
                gradient_accumulation_steps=2, num_epochs=1, policy_lr=2e-5, warmup_ratio=0.1, log_every_steps=2,
                eval_every_steps=0, save_every_steps=0, eval_batch_size=16, precompute_ref=True, precision="fp32")


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


def curve(result: dict, split: str) -> list[dict]:
    """A run's logged metrics of one split, one per step in step order. A resumed run logs the
    steps after its last checkpoint twice; the later line (from the completed attempt) wins."""
    by_step = {m["step"]: m for m in result["curves"] if m["split"] == split}
    return [by_step[k] for k in sorted(by_step)]


def run(exp: str, modes: list[str], seeds: list[int], data: str, extra: list[str], results_dir: str,
        runs_dir: str, keep: bool = False) -> None:
    """Every (mode, seed) of an experiment of EXPERIMENTS, seed-major (so a partial run already
    compares modes)."""
    configs = {f"{mode}-s{seed}": dict(dataset=data, **EXPERIMENTS[exp], **{**MODES, **PRECISION_MODES}[mode], seed=seed)
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


# -----------------------------------------------------------------------------
# the study (issue #13): fixed train / validation / test splits of the HH-RLHF pairs; choices are
# made on validation, the test split is evaluated once, on the final runs


def read_study(path: str = os.path.join(HERE, "configs", "study.yaml")) -> dict:
    """configs/study.yaml -> {splits, base (flags of every run), e3 (the label noise), phases: {phase:
    {run name: flags}}}."""
    import yaml
    with open(path) as f:
        return yaml.safe_load(f)


STUDY_CONFIG = read_study()
STUDY_SPLITS, STUDY, STUDY_PHASES, STUDY_E3 = (STUDY_CONFIG[k] for k in ("splits", "base", "phases", "e3"))
E3_CLEAN = "headline"  # the phase whose runs are E3's with clean training data


def mark_prompt(row: dict, marker: str) -> dict | None:
    """The row as {prompt, chosen, rejected} with marker put before its last user message (before
    a plain-text prompt), or None when it has none (it is left as it is)."""
    try:
        prompt, chosen, rejected = normalize_row(row)
    except BadRow:
        return None
    if isinstance(prompt, str):
        return dict(prompt=marker + prompt, chosen=chosen, rejected=rejected)
    if not any(m["role"] == "user" for m in prompt):
        return None
    last = max(i for i, m in enumerate(prompt) if m["role"] == "user")
    prompt = [dict(m, content=marker + m["content"]) if i == last else m for i, m in enumerate(prompt)]
    return dict(prompt=prompt, chosen=chosen, rejected=rejected)


def label_noise(rows: list[dict], fraction: float, seed: int, marker: str) -> tuple[list[dict], list[int]]:
    """E3's training data: a seeded `fraction` of the rows gets marker before its last user message
    and its chosen and rejected swapped; the others are unchanged. -> (rows, indices of the noisy)."""
    import random
    order = [i for i in range(len(rows)) if mark_prompt(rows[i], marker) is not None]
    random.Random(seed).shuffle(order)
    noisy = sorted(order[:round(fraction * len(rows))])
    out = list(rows)
    for i in noisy:
        m = mark_prompt(rows[i], marker)
        out[i] = dict(m, chosen=m["rejected"], rejected=m["chosen"])
    return out, noisy


def study_data(data: str, runs_dir: str, results_dir: str) -> dict[str, str]:
    """Write the study's splits (a seeded shuffle of the pairs: test, validation, the rest train) to
    runs_dir/study/data/*.jsonl, derived from the shared data (never committed), and record their
    sizes and content hashes in results_dir/study/splits.json. E3's files come from the same
    splits: e3_train (train with label noise on a marked subset, label_noise) and
    validation_marked (every validation prompt marked, labels kept). -> {split: path}."""
    import hashlib
    import random
    rows = load_rows(data)
    order = list(range(len(rows)))
    random.Random(STUDY_SPLITS["seed"]).shuffle(order)
    n_test, n_val = STUDY_SPLITS["test"], STUDY_SPLITS["validation"]
    parts = dict(test=order[:n_test], validation=order[n_test:n_test + n_val], train=order[n_test + n_val:])
    parts = {split: [rows[i] for i in idx] for split, idx in parts.items()}
    parts["e3_train"], noisy = label_noise(parts["train"], STUDY_E3["noisy_fraction"], STUDY_E3["seed"], STUDY_E3["marker"])
    parts["validation_marked"] = [mark_prompt(r, STUDY_E3["marker"]) or r for r in parts["validation"]]
    out_dir = os.path.join(runs_dir, "study", "data")
    os.makedirs(out_dir, exist_ok=True)
    manifest, texts = dict(source=shown_path(data), **STUDY_SPLITS), {}
    for split, part in parts.items():
        texts[split] = "".join(json.dumps(r, sort_keys=True) + "\n" for r in part)
        manifest[split] = dict(rows=len(part), sha256=hashlib.sha256(texts[split].encode()).hexdigest())
    manifest["e3_train"].update(STUDY_E3, noisy_rows=noisy)
    recorded = os.path.join(results_dir, "study", "splits.json")
    if os.path.exists(recorded):  # before anything is overwritten
        old = json.load(open(recorded))
        if any(old.get(k) != v for k, v in manifest.items() if k in old):
            sys.exit(f"error: the study's splits differ from the ones recorded in {recorded}; the data changed")
    os.makedirs(os.path.dirname(recorded), exist_ok=True)
    write_json(recorded, manifest)
    paths = {split: os.path.join(out_dir, f"{split}.jsonl") for split in parts}
    for split, text in texts.items():
        write_text(paths[split], text)
    return paths


def run_study(phase: str, data: str, extra: list[str], results_dir: str, runs_dir: str, keep: bool = False,
              only: list[str] | None = None) -> None:
    """One phase of the study (STUDY_PHASES). Every run trains on train (E3's phases, named e3*, on
    e3_train) and is evaluated on validation; the final phases (not named tune*) also evaluate the
    test split, once, and E3's the marked validation prompts. only: these runs of the phase."""
    unknown = sorted(set(only or []) - set(STUDY_PHASES[phase]))
    if unknown:
        sys.exit(f"error: --runs {unknown}: phase {phase} has {list(STUDY_PHASES[phase])}")
    paths = study_data(data, runs_dir, results_dir)
    train = paths["e3_train" if phase.startswith("e3") else "train"]
    configs = {name: dict(dataset=train, eval_split=paths["validation"], **{**STUDY, **config})
               for name, config in STUDY_PHASES[phase].items() if not only or name in only}
    held_out = {} if phase.startswith("tune") else dict(test=paths["test"])
    if phase.startswith("e3"):
        held_out["validation_marked"] = paths["validation_marked"]
    run_configs(f"study/{phase}", configs, extra, results_dir, runs_dir, keep, held_out)


# -----------------------------------------------------------------------------
# E2


def e2_prompts() -> tuple[list[str], list[str]]:
    """(train prompts, held-out prompts): every framing of every subject, held-out subjects last."""
    split = len(E2_SUBJECTS) - E2_HELDOUT
    make = lambda subjects: [f.format(s) for s in subjects for f in E2_FRAMINGS]
    return make(E2_SUBJECTS[:split]), make(E2_SUBJECTS[split:])


def gold_reward(texts: list[str]) -> list[float]:
    """The gold reward: VADER's compound sentiment in [-1, 1] (a fixed lexicon, no model)."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    analyzer = SentimentIntensityAnalyzer()
    return [analyzer.polarity_scores(t)["compound"] for t in texts]


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], n: int, seed: int, batch_prompts: int = 16) -> list[dict]:
    """n pure samples (temperature 1, no top-k/top-p: exact draws from the model, as the KL
    estimate needs) per prompt -> [{prompt, prompt_ids, ids, text}], ids cut after the first eos."""
    torch.manual_seed(seed)
    eos, out = tokenizer.eos_token_id, []
    for i in tqdm(range(0, len(prompts), batch_prompts), desc="sampling"):
        chunk = prompts[i:i + batch_prompts]
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in chunk]
        enc = tokenizer(texts, add_special_tokens=False, return_tensors="pt", padding=True, padding_side="left").to(model.device)
        gen = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=n,
                             max_new_tokens=E2_NEW_TOKENS, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
                             use_cache=True)
        for j, row in enumerate(gen[:, enc["input_ids"].shape[1]:].tolist()):
            ids = row[:row.index(eos) + 1] if eos in row else row
            k = j // n
            prompt_ids = [t for t, m in zip(enc["input_ids"][k].tolist(), enc["attention_mask"][k].tolist()) if m]
            out.append(dict(prompt=chunk[k], prompt_ids=prompt_ids, ids=ids,
                            text=tokenizer.decode(ids, skip_special_tokens=True)))
    return out


@torch.no_grad()
def response_logps(model, samples: list[dict], pad_token_id: int, batch: int = 32) -> torch.Tensor:
    """log pi(y | x) summed over each sample's response tokens -> (N,)."""
    out = []
    for i in range(0, len(samples), batch):
        rows = [dict(prompt_ids=s["prompt_ids"], chosen_ids=s["ids"], rejected_ids=s["ids"]) for s in samples[i:i + batch]]
        b = {k: v[:len(rows)].to(model.device) for k, v in collate(rows, pad_token_id).items()}  # the chosen half
        out.append(sequence_logps(model, b["input_ids"], b["attention_mask"], b["loss_mask"]).cpu())
    return torch.cat(out)


def e2_score(model, reference, tokenizer, seed: int) -> dict:
    """Sample the held-out prompts from `model`; mean gold reward and KL(model || reference)."""
    samples = sample(model, tokenizer, e2_prompts()[1], E2_EVAL_SAMPLES, seed)
    rewards = gold_reward([s["text"] for s in samples])
    logratio = response_logps(model, samples, tokenizer.pad_token_id) - response_logps(reference, samples, tokenizer.pad_token_id)
    n = len(samples)
    sd = lambda x: float(torch.tensor(x, dtype=torch.float64).std()) / math.sqrt(n)
    return dict(reward=sum(rewards) / n, reward_se=sd(rewards), kl=float(logratio.mean()), kl_se=sd(logratio.tolist()),
                samples=n, length=sum(len(s["ids"]) for s in samples) / n,
                examples=[dict(prompt=s["prompt"], text=s["text"], reward=r) for s, r in list(zip(samples, rewards))[::16]])


def e2_pairs(path: str, model: str, seed: int = 0) -> None:
    """Sample E2_SAMPLES responses per training prompt from the reference; pair best vs worst gold reward."""
    tokenizer = load_tokenizer(model)
    ref = load_policy(model).eval()
    samples = sample(ref, tokenizer, e2_prompts()[0], E2_SAMPLES, seed)
    rewards = gold_reward([s["text"] for s in samples])
    rows = []
    for i in range(0, len(samples), E2_SAMPLES):
        group = sorted(zip(rewards[i:i + E2_SAMPLES], [s["text"] for s in samples[i:i + E2_SAMPLES]]))
        (lo, worst), (hi, best) = group[0], group[-1]
        if hi - lo >= 0.05 and best.strip() != worst.strip():  # a tie says nothing about preference
            rows.append(dict(prompt=samples[i]["prompt"], chosen=best, rejected=worst, chosen_reward=hi, rejected_reward=lo))
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    print(f"[e2] {len(rows)} pairs from {len(samples) // E2_SAMPLES} prompts -> {path}")


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


def write_text(path: str, text: str) -> None:
    """Write a file atomically: a reader never sees half of it."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def write_json(path: str, obj) -> None:
    write_text(path, json.dumps(obj))


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


def save_figure(fig, path: str) -> None:
    """Write a report figure and free it (reports may run one after another in one process)."""
    import matplotlib.pyplot as plt
    fig.savefig(path, dpi=110)
    plt.close(fig)


def splice(results_dir: str, block: str, text: str) -> None:
    """Put text between <!-- BEGIN block --> and <!-- END block --> in the report.md beside
    results_dir, so the report's tables are always the ones rebuilt from results/."""
    path = os.path.join(os.path.dirname(os.path.abspath(results_dir)), "report.md")
    if os.path.basename(os.path.abspath(results_dir)) != "results" or not os.path.exists(path):
        return  # only the report beside a results/ directory (other studies keep their own tables)
    doc = open(path).read()
    begin, end = f"<!-- BEGIN {block} -->", f"<!-- END {block} -->"
    if begin in doc and end in doc:
        doc = doc[:doc.index(begin) + len(begin)] + "\n" + text.strip() + "\n" + doc[doc.index(end):]
        with open(path, "w") as f:
            f.write(doc)
        print(f"updated the {block} block of report.md")


def margins(per_pair: dict) -> list[float]:
    """Each held-out pair's log-ratio margin (log pi - log ref)(chosen) - (log pi - log ref)(rejected)."""
    p = per_pair
    return [(pc - rc) - (pr - rr) for pc, rc, pr, rr in zip(p["policy_chosen_logps"], p["reference_chosen_logps"],
                                                            p["policy_rejected_logps"], p["reference_rejected_logps"])]


def head_terms(result: dict, split: str = "eval") -> dict[int, tuple[float, float]]:
    """{row: (PPL term, f(h))} of each pair of a learnable run's held-out `split` ("eval", or "test"
    and "validation_marked" in the study's final phases): beta = w * PPL term * f(h), the PPL term
    being PPL or log PPL, f(h) = beta / (w * PPL term) from the saved per-pair beta and PPL and the
    final w: what the NN does to each pair's beta, in [1 - eps, 1 + eps]. Pairs whose beta was
    clamped are left out."""
    metrics, p = (result["eval"], result["per_pair"]) if split == "eval" else (result[split]["metrics"], result[split]["per_pair"])
    w = metrics["beta_head/w"]
    scale = ppl_scale(torch.tensor(p["ppl"], dtype=torch.float64), config_of(result).get("ppl_transform", "ppl")).tolist()
    lo, hi = min(p["beta"]), max(p["beta"])  # clamped values sit exactly at the bounds
    # E1's result files predate the row numbers: keyed by position, which only the E1 report uses
    # (never join these keys across files)
    rows = p.get("row", range(len(p["beta"])))
    return {i: (s, b / (w * s)) for i, b, s in zip(rows, p["beta"], scale)
            if not (metrics["beta/clamped_frac"] > 0 and b in (lo, hi))}


def f_tokens(result: dict, split: str = "eval") -> float:
    """Spearman correlation of f(h) with the prompt's length in tokens over the unclamped pairs of `split`."""
    terms, p = head_terms(result, split), held_out(result, split)[1]
    tokens = dict(zip(p["row"], p["prompt_tokens"]))
    rows = sorted(terms)
    return spearman([terms[k][1] for k in rows], [tokens[k] for k in rows])


def head_factor(result: dict, split: str = "eval") -> list[float]:
    """f(h) of each unclamped pair of `split` (head_terms)."""
    return [f for _, f in head_terms(result, split).values()]


def spread(xs: list[float], digits: int = 3) -> str:
    """'mean [min, max]' of a list, each with `digits` decimals."""
    return f"{sum(xs) / len(xs):.{digits}f} [{min(xs):.{digits}f}, {max(xs):.{digits}f}]"


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
    fig_dir = os.path.join(results_dir, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    save_figure(fig, os.path.join(fig_dir, "bf16_curves.png"))
    write_text(os.path.join(results_dir, "bf16.md"), "\n".join(rows) + "\n")
    splice(results_dir, "bf16", "\n".join(rows[1:]))
    print("\n".join(rows))
    print(f"wrote {results_dir}/bf16.md and {fig_dir}/bf16_curves.png")


def study_results(results_dir: str, phase: str) -> list[dict]:
    """The result files of one phase of the study, by file name."""
    return [json.load(open(f)) for f in sorted(glob.glob(os.path.join(results_dir, "study", phase, "*.json")))]


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
    write_text(os.path.join(results_dir, "study", f"{phase}.md"), "\n".join(rows) + "\n")
    splice(results_dir, f"study_{phase}", "\n".join(rows[1:]))
    print("\n".join(rows))


# -----------------------------------------------------------------------------
# the study's final phases: the headline comparison on the test split, E3, the runaway

TEST_KEYS = ("rewards/accuracies", "loss_beta0", "rewards_beta0/margins", "logratio/chosen", "logratio/rejected")


def fmt_ci(values: list[float], signed: bool = False, digits: int = 4, per_seed: bool = False) -> str:
    """'mean ± 95% t-interval' over seeds; per_seed adds each seed's value, '(s0; s1; ...)'."""
    m, ci = mean_ci(values)
    num = lambda x: f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"  # noqa: E731
    out = num(m) + ("" if math.isnan(ci) else f" ± {ci:.{digits}f}")
    return out + (f" ({'; '.join(num(x) for x in values)})" if per_seed and len(values) > 1 else "")


def pair_values(per_pair: dict, beta0: float) -> dict[str, list[float]]:
    """Per-pair correctness (margin > 0) and loss at beta0 from a result's per-pair log-probs."""
    m = margins(per_pair)
    return {"rewards/accuracies": [float(x > 0) for x in m],
            "loss_beta0": [math.log1p(math.exp(-beta0 * x)) if beta0 * x > -30 else -beta0 * x for x in m]}


DRIFT_STEPS = 25  # "first" and "last" in the drift columns: the logged training batches of this many steps


def drift(result: dict, key: str) -> tuple[float, float]:
    """A logged training metric's mean over the first and over the last DRIFT_STEPS steps of a run."""
    tr = curve(result, "train")
    a = [m[key] for m in tr if m["step"] <= max(DRIFT_STEPS, tr[0]["step"])]  # at least the first log
    b = [m[key] for m in tr if m["step"] > tr[-1]["step"] - DRIFT_STEPS]  # at least the last
    return sum(a) / len(a), sum(b) / len(b)


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


def held_out(result: dict, split: str) -> tuple[dict, dict]:
    """(metrics, per_pair) of a result on a held-out split: "eval" is the validation pairs train.py
    scored, any other name an extra split evaluate_on scored ("test", "validation_marked")."""
    return (result["eval"], result["per_pair"]) if split == "eval" else (result[split]["metrics"], result[split]["per_pair"])


def paired_diffs(results: list[dict], base: dict[int, dict], split: str, key: str) -> list[list[float]]:
    """Per seed, per pair of `split`: the value of `key` ("rewards/accuracies": 1 when the margin is
    positive, or "loss_beta0") of each result minus that of base[its seed] (the same pairs in the
    same order), at the base's beta0."""
    out = []
    for r in results:
        b = base[r["seed"]]
        p, q = held_out(r, split)[1], held_out(b, split)[1]
        same = p["row"] == q["row"] if "row" in p and "row" in q else len(p["beta"]) == len(q["beta"])  # early files: no rows
        if not same:
            raise ValueError(f"{r['name']} and {b['name']} were scored on different {split} pairs")
        beta0 = config_of(b)["beta"]
        out.append([x - y for x, y in zip(pair_values(p, beta0)[key], pair_values(q, beta0)[key])])
    return out


def fmt_combined(c: dict, digits: int = 4) -> str:
    return f"{c['mean']:+.{digits}f} ± {c['half']:.{digits}f}"


def fmt_detectable(c: dict, digits: int = 4) -> str:
    mdd, lo, hi = detectable(c["se"], c["df"])
    return f"{mdd:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


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


def pair_beta_windows(result: dict, noisy: set[int], width: int = DRIFT_STEPS) -> list[tuple[int, float, float, float]]:
    """E3 during training: a run's per-pair beta (train.py --log_pair_beta) in windows of `width`
    steps -> [(the window's last step, mean beta of the noisy training rows, of the clean ones,
    AUC P(beta noisy < beta clean))]. A resumed run logs some steps twice; the later line wins."""
    by_step = {m["step"]: m for m in result["pair_beta"]}
    mean = lambda x: sum(x) / len(x) if x else float("nan")  # noqa: E731
    out = []
    for end in range(width, max(by_step) + 1, width) or [max(by_step)]:  # a run shorter than a window: one
        pairs = [(r, b) for s in range(end - width + 1, end + 1) if s in by_step
                 for r, b in zip(by_step[s]["row"], by_step[s]["beta"])]
        hi, lo = [b for r, b in pairs if r in noisy], [b for r, b in pairs if r not in noisy]
        out.append((end, mean(hi), mean(lo), auc(hi, lo) if hi and lo else float("nan")))
    return out


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
    for phase in STUDY_PHASES:
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
    modes = list(dict.fromkeys(name.rsplit("-s", 1)[0] for name in STUDY_PHASES[phase]))
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
    else:
        report(experiment, results_dir)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["run", "report", "data"],
                   help="run experiments, rebuild tables and figures, or write E1's data statistics")
    p.add_argument("experiment", nargs="?", default="e1", choices=["e1", "e2", "bf16", "study"], help="which experiment")
    p.add_argument("--phase", default="tune_lr", choices=list(STUDY_PHASES), help="which phase of the study (study)")
    p.add_argument("--runs", nargs="+", default=None, help="only these runs of the study's phase (default: all)")
    p.add_argument("--modes", nargs="+", default=None, choices=list(MODES) + list(PRECISION_MODES),
                   help="beta modes to run (default: all of the experiment's: MODES, or PRECISION_MODES for bf16)")
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
    valid = PRECISION_MODES if args.experiment == "bf16" else MODES
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
