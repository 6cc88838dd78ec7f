"""The study (issue #13, configs/study.yaml): its configuration, read when first needed; its fixed
train / validation / test splits of the HH-RLHF pairs, with E3's label noise on a marked subset;
and the runs of each of its phases."""

import functools
import json
import os
import sys

from data import BadRow, load_rows, normalize_row
from result_files import shown_path, write_json, write_text

HERE = os.path.dirname(os.path.abspath(__file__))

# the study (issue #13): fixed train / validation / test splits of the HH-RLHF pairs; choices are
# made on validation, the test split is evaluated once, on the final runs


def read_study(path: str = os.path.join(HERE, "configs", "study.yaml")) -> dict:
    """configs/study.yaml -> {splits, base (flags of every run), e3 (the label noise), phases: {phase:
    {run name: flags}}}."""
    import yaml
    with open(path) as f:
        return yaml.safe_load(f)


@functools.cache
def study_config() -> dict:
    """The study's configuration, read from configs/study.yaml (read_study) the first time it is
    asked for, never at import, and kept: {splits, base, e3, phases}."""
    return read_study()


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
    study = study_config()
    splits, e3 = study["splits"], study["e3"]
    rows = load_rows(data)
    order = list(range(len(rows)))
    random.Random(splits["seed"]).shuffle(order)
    n_test, n_val = splits["test"], splits["validation"]
    parts = dict(test=order[:n_test], validation=order[n_test:n_test + n_val], train=order[n_test + n_val:])
    parts = {split: [rows[i] for i in idx] for split, idx in parts.items()}
    parts["e3_train"], noisy = label_noise(parts["train"], e3["noisy_fraction"], e3["seed"], e3["marker"])
    parts["validation_marked"] = [mark_prompt(r, e3["marker"]) or r for r in parts["validation"]]
    e4_noise = {}  # E4: the same marker and seed at the flip rates its noise level is chosen from
    for fraction in study.get("e4", {}).get("noisy_fractions", []):
        parts[f"noisy{fraction}_train"], e4_noise[f"noisy{fraction}_train"] = label_noise(
            parts["train"], fraction, e3["seed"], e3["marker"])
    out_dir = os.path.join(runs_dir, "study", "data")
    os.makedirs(out_dir, exist_ok=True)
    manifest, texts = dict(source=shown_path(data), **splits), {}
    for split, part in parts.items():
        texts[split] = "".join(json.dumps(r, sort_keys=True) + "\n" for r in part)
        manifest[split] = dict(rows=len(part), sha256=hashlib.sha256(texts[split].encode()).hexdigest())
    manifest["e3_train"].update(e3, noisy_rows=noisy)
    for split, rows_noisy in e4_noise.items():
        manifest[split].update(e3, noisy_fraction=float(split[5:-6]), noisy_rows=rows_noisy)
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


def study_runs(phase: str, data: str, runs_dir: str, results_dir: str,
               only: list[str] | None = None) -> tuple[dict[str, dict], dict[str, str]]:
    """One phase of the study (study_config()["phases"]) as runs, after writing the splits
    (study_data): ({run name: train.py configuration}, {extra held-out set: pairs}), what
    run_configs trains and evaluates. Every run trains on train (E3's phases, named e3*, on
    e3_train) and is evaluated on validation; the final phases (not named tune*) also evaluate the
    test split, once, and E3's the marked validation prompts. A run whose flags name a train_split
    trains on that file of study_data instead (E4's noise levels: noisy0.4_train, ...). only: these
    runs of the phase."""
    study = study_config()
    phases = study["phases"]
    unknown = sorted(set(only or []) - set(phases[phase]))
    if unknown:
        sys.exit(f"error: --runs {unknown}: phase {phase} has {list(phases[phase])}")
    paths = study_data(data, runs_dir, results_dir)
    train = paths["e3_train" if phase.startswith("e3") else "train"]
    configs = {name: dict(dataset=paths[config["train_split"]] if "train_split" in config else train,
                          eval_split=paths["validation"],
                          **{**study["base"], **{k: v for k, v in config.items() if k != "train_split"}})
               for name, config in phases[phase].items() if not only or name in only}
    held_out = {} if phase.startswith("tune") else dict(test=paths["test"])
    if phase.startswith("e3"):
        held_out["validation_marked"] = paths["validation_marked"]
    return configs, held_out
