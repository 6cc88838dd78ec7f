"""The study's statistics and E3's data derivation against hand-computed values."""

import json
import math

import pytest

import cells
import measures
import report_study
import report_study_tables
import stats as S
import study


def test_mean_interval_and_per_seed_cells_by_hand():
    # 1 and 3: mean 2, s.d. sqrt(2), half-width t(.975, 1 df) * sqrt(2) / sqrt(2) = 12.706
    assert cells.fmt_ci([1.0, 3.0]) == "2.0000 ± 12.7060"
    assert cells.fmt_ci([1.0, 3.0], digits=2, per_seed=True) == "2.00 ± 12.71 (1.00; 3.00)"
    # mean -0.125 (exact in binary) rounds half to even: -0.12; half-width 12.706 * 0.375 = 4.765 -> 4.76
    assert cells.fmt_ci([-0.5, 0.25], signed=True, digits=2, per_seed=True) == "-0.12 ± 4.76 (-0.50; +0.25)"
    assert cells.fmt_ci([0.7], per_seed=True) == "0.7000"  # one seed: no interval, nothing to list
    assert cells.spread([0.9, 1.1, 1.3]) == "1.100 [0.900, 1.300]"
    assert cells.spread([0.03, 0.02], 4) == "0.0250 [0.0200, 0.0300]"


def test_pair_values_by_hand():
    per_pair = dict(policy_chosen_logps=[0.0, 1.0], reference_chosen_logps=[0.0, 0.0],
                    policy_rejected_logps=[1.0, 0.0], reference_rejected_logps=[0.0, 0.0])
    v = measures.pair_values(per_pair, beta0=0.1)  # margins -1 and +1
    assert v["rewards/accuracies"] == [0.0, 1.0]
    assert v["loss_beta0"] == pytest.approx([math.log1p(math.exp(0.1)), math.log1p(math.exp(-0.1))])


def test_label_noise_marks_and_swaps_a_seeded_subset():
    rows = [dict(chosen=f"\n\nHuman: q{i}\n\nAssistant: good{i}", rejected=f"\n\nHuman: q{i}\n\nAssistant: bad{i}")
            for i in range(10)] + [dict(chosen="same", rejected="same")]  # not a usable pair: never noisy
    out, noisy = study.label_noise(rows, 0.3, seed=0, marker="[m] ")
    assert len(noisy) == 3 and 10 not in noisy and noisy == study.label_noise(rows, 0.3, seed=0, marker="[m] ")[1]
    for i, r in enumerate(out):
        if i in noisy:
            assert r == dict(prompt=[dict(role="user", content=f"[m] q{i}")], chosen=f"bad{i}", rejected=f"good{i}")
        else:
            assert r is rows[i]
    # several turns: only the last user message carries the marker
    two = dict(chosen="\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: yes",
               rejected="\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: no")
    m = study.mark_prompt(two, "[m] ")
    assert [x["content"] for x in m["prompt"]] == ["a", "b", "[m] c"] and (m["chosen"], m["rejected"]) == ("yes", "no")


def test_drift_means_the_first_and_last_logged_steps():
    """drift: a training metric's mean over the logs of the first and of the last DRIFT_STEPS (25)
    steps; a run that logs less often still gets its first and last log."""
    every_5 = dict(curves=[dict(split="train", step=s, x=float(s)) for s in range(5, 201, 5)])
    assert measures.drift(every_5, "x") == (15.0, 190.0)  # steps 5..25 and 180..200
    every_50 = dict(curves=[dict(split="train", step=s, x=float(s)) for s in (50, 100, 150, 200)]
                    + [dict(split="eval", step=200, x=-1.0)])
    assert measures.drift(every_50, "x") == (50.0, 200.0)


def test_pair_beta_windows_split_noisy_from_clean():
    """E3's β during training: per window of steps, the mean β of the noisy rows, of the clean rows,
    and the AUC P(β noisy < β clean); a step logged twice (a resumed run) counts once, the later line."""
    log = [dict(step=1, row=[0, 1], beta=[0.1, 0.3]), dict(step=2, row=[2, 3], beta=[9.0, 9.0]),
           dict(step=2, row=[2, 3], beta=[0.2, 0.4]), dict(step=3, row=[0, 2], beta=[0.5, 0.5]),
           dict(step=4, row=[1, 3], beta=[0.5, 0.1])]
    noisy = {0, 2}
    w = measures.pair_beta_windows(dict(pair_beta=log), noisy, width=2)
    # steps 1-2: noisy 0.1, 0.2 (mean 0.15); clean 0.3, 0.4 (0.35); every noisy beta < every clean: AUC 1
    assert [x[0] for x in w] == [2, 4]
    assert w[0][1:] == pytest.approx((0.15, 0.35, 1.0))
    # steps 3-4: noisy 0.5, 0.5; clean 0.5, 0.1: pairs (0.5 vs 0.5) tie twice, (0.5 vs 0.1) lose twice -> 1/4
    assert w[1][1:] == pytest.approx((0.5, 0.3, 0.25))


def test_head_factor_is_beta_over_w_times_the_ppl_term():
    """f(h) = beta / (w * PPL term) with the run's final w and its PPL transform, on the split asked
    for; a clamped pair (its beta at a bound, with beta/clamped_frac > 0) is left out."""
    test = dict(metrics={"beta_head/w": 0.5, "beta/clamped_frac": 0.0}, per_pair=dict(ppl=[math.e, math.e ** 2], beta=[0.55, 0.9], row=[3, 7]))
    log = dict(config=dict(ppl_transform="log"), test=test)
    assert measures.head_factor(log, "test") == pytest.approx([1.1, 0.9])  # 0.55 / (0.5 * 1), 0.9 / (0.5 * 2)
    terms = measures.head_terms(log, "test")  # by row: (PPL term, f)
    assert sorted(terms) == [3, 7] and terms[3] == pytest.approx((1.0, 1.1)) and terms[7] == pytest.approx((2.0, 0.9))
    spec = dict(config={}, eval={"beta_head/w": 0.5, "beta/clamped_frac": 0.5},  # the spec: PPL itself
                per_pair=dict(ppl=[1.0, 2.0, 4.0, 10.0], beta=[0.3, 1.1, 1.8, 3.0], row=[0, 1, 2, 3]))  # 0.3, 3.0: clamped at the bounds
    assert measures.head_factor(spec) == pytest.approx([1.1, 0.9])


def test_study_cost_counts_each_run_once(tmp_path):
    phases = list(study.study_config()["phases"])
    for phase, name, wall_s, extra in ((phases[0], "a", 600.0, {}), (phases[0], "b", 1200.0, {}),
                                       (phases[1], "c", 1800.0, {}),
                                       (phases[1], "d", 600.0, {"reused_from": f"study/{phases[0]}/a"})):
        (tmp_path / "study" / phase).mkdir(parents=True, exist_ok=True)
        (tmp_path / "study" / phase / f"{name}.json").write_text(json.dumps(dict(wall_s=wall_s, **extra)))
    rows = report_study.study_cost_rows(str(tmp_path))
    # phase 0: 10 and 20 min; phase 1: 30 min (the reused run is counted in phase 0 only); all: 60 min = 1 h
    assert rows[2:] == [f"| {phases[0]} | 2 | 15.0 [10.0, 20.0] | 30.0 |",
                        f"| {phases[1]} | 1 | 30.0 [30.0, 30.0] | 30.0 |",
                        "| all | 3 | 20.0 [10.0, 30.0] | 60.0 (1.00 h) |"]


def _result(name: str, mode: str, seed: int, val: list[float], test: list[float]) -> dict:
    """A result file whose held-out margins are the given numbers (policy chosen log-prob = margin)."""
    pp = lambda m: dict(policy_chosen_logps=m, reference_chosen_logps=[0.0] * len(m), beta=[0.1] * len(m),  # noqa: E731
                        policy_rejected_logps=[0.0] * len(m), reference_rejected_logps=[0.0] * len(m), row=list(range(len(m))))
    return dict(name=name, mode=mode, seed=seed, config=dict(beta=1.0), eval={}, per_pair=pp(val),
                test=dict(metrics={}, per_pair=pp(test)))


def test_paired_diffs_and_the_family_with_holm(tmp_path):
    """paired_diffs: per seed and pair, mode minus fixed (accuracy: margin > 0). family_rows: every
    comparison of the headline and E3 plus fixed beta's noise cost, each with the combined interval,
    and Holm's correction over all of them."""
    fixed = {0: _result("fixed-s0", "fixed", 0, [1.0, -1.0], [1.0, -1.0, 2.0]),
             1: _result("fixed-s1", "fixed", 1, [1.0, 1.0], [-1.0, -1.0, 2.0])}
    other = [_result("x-s0", "x", 0, [1.0, 1.0], [1.0, 1.0, -2.0]), _result("x-s1", "x", 1, [1.0, 1.0], [1.0, -1.0, -2.0])]
    assert measures.paired_diffs(other, fixed, "test", "rewards/accuracies") == [[0.0, 1.0, -1.0], [1.0, 0.0, -1.0]]
    loss = measures.paired_diffs(other, fixed, "eval", "loss_beta0")  # beta0 = 1: log(1 + e^-m)
    assert loss[0] == pytest.approx([0.0, math.log1p(math.exp(-1)) - math.log1p(math.exp(1))]) and loss[1] == [0.0, 0.0]
    with pytest.raises(ValueError):  # other pairs than fixed's
        measures.paired_diffs([dict(other[0], test=dict(metrics={}, per_pair=dict(other[0]["test"]["per_pair"], row=[5, 6, 7])))],
                       fixed, "test", "loss_beta0")
    for phase in ("headline", "e3"):
        (tmp_path / "study" / phase).mkdir(parents=True)
        for r in list(fixed.values()) + other:
            (tmp_path / "study" / phase / f"{r['name']}.json").write_text(json.dumps(dict(r, experiment=f"study/{phase}")))
    rows = report_study_tables.family_rows(str(tmp_path))
    body = [r for r in rows[2:] if r.startswith("| ")]
    assert len(body) == 9 and "9 comparisons in the family" in rows[-1]  # (x, both phases, noise cost) x 3 metrics
    p = [float(r.split(" | ")[6]) for r in body]
    assert [float(r.split(" | ")[7]) for r in body] == pytest.approx([round(x, 3) for x in S.holm(p)], abs=1e-3)
    acc = S.combined_interval([[0.0, 1.0, -1.0], [1.0, 0.0, -1.0]])
    assert body[0].startswith(f"| headline: x − fixed | test accuracy | {acc['mean']:+.4f} ± {acc['half']:.4f} |")
    assert report_study_tables.family_rows(str(tmp_path / "none")) == []  # no results: no family


def test_beta_dpo_rows_report_the_floor_and_the_median():
    """After step 25: mean of the logged means, mean clamped share, and the windows where more than half
    of the micro-batches sat at the floor (the median there is the floor; at exactly half it is not)."""
    logs = [dict(split="train", step=s, **{"beta/mean": b, "beta/clamped_frac": c, "beta/max": x})
            for s, b, c, x in ((25, 9.0, 0.0, 9.0), (30, 0.05, 0.5, 0.2), (35, 0.07, 0.25, 0.4), (40, 0.03, 0.75, 0.1))]
    rows = report_study_tables.beta_dpo_rows([dict(name="beta_dpo-s0", mode="beta_dpo", config=dict(beta=0.02), curves=logs)])
    assert rows[2] == "| beta_dpo-s0 | 0.0500 | 0.50 | 1 of 3 | 0.400 | 20.0 |"
