"""What the reports measure in a result file: each held-out pair's margin and loss at beta0, the
beta head's factor f(h), a training metric's drift, paired differences between runs, and beta of
E3's noisy training pairs."""

import math

import torch

from beta_head import ppl_scale
from result_files import config_of, curve, held_out
from stats import auc, spearman


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
