"""The experiment runner: runs, skips finished runs, and rebuilds tables and figures from results."""

import glob
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow  # the experiment runner end to end

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_run_skip_and_report(tiny_qwen2_dir, tmp_path):
    res, runs = str(tmp_path / "results"), str(tmp_path / "runs")
    cmd = [sys.executable, "experiments.py", "run", "e1", "--modes", "fixed", "learnable", "--seeds", "0", "--data", "demo",
           "--results_dir", res, "--runs_dir", runs, "--extra", "--model_name_or_path", tiny_qwen2_dir, "--max_steps", "2",
           "--max_train_examples", "16", "--max_eval_examples", "8", "--max_length", "64", "--max_prompt_length", "40",
           "--eval_every_steps", "1", "--save_every_steps", "1", "--log_every_steps", "1",
           "--ref_cache_dir", str(tmp_path / "cache")]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    r = json.load(open(os.path.join(res, "e1", "learnable-s0.json")))
    assert r["mode"] == "learnable" and len(r["per_pair"]["beta"]) == 8
    assert {m["split"] for m in r["curves"]} == {"train", "eval"}
    # once its result is written a run keeps its final policy, not what only resuming needed
    run_dir = os.path.join(runs, "e1", "learnable-s0")
    assert not os.path.exists(os.path.join(run_dir, "checkpoints"))
    assert sorted(n for n in os.listdir(os.path.join(run_dir, "final")) if n.endswith((".safetensors", ".pt"))) == \
        ["beta_head.safetensors", "model.safetensors"]
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.stdout.count("done, skipped") == 2
    with open(tmp_path / "report.md", "w") as f:  # report.md beside results/ gets its blocks rebuilt
        f.write("intro\n<!-- BEGIN e1 -->\nstale\n<!-- END e1 -->\nend\n")
    rep = subprocess.run([sys.executable, "experiments.py", "report", "e1", "--results_dir", res], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr
    table = open(os.path.join(res, "e1.md")).read()
    doc = open(tmp_path / "report.md").read()
    assert "stale" not in doc and "| fixed | 1 |" in doc and doc.startswith("intro") and doc.endswith("<!-- END e1 -->\nend\n")
    assert "| fixed | 1 |" in table and "| learnable | 1 |" in table
    assert os.path.getsize(os.path.join(res, "figures", "e1_curves.png")) > 10_000
    assert os.path.exists(os.path.join(res, "figures", "e1_beta.png"))
    assert os.path.exists(os.path.join(res, "figures", "e1_beta_training.png"))
    assert "Difference to `fixed`" in table and re.search(r"\| learnable \| 1 \| [+-]\d", table)  # the paired row


def test_e2_prompts_hold_out_whole_subjects():
    import e2
    train, held = e2.e2_prompts()
    assert len(train) == (len(e2.E2_SUBJECTS) - e2.E2_HELDOUT) * len(e2.E2_FRAMINGS)
    assert len(held) == e2.E2_HELDOUT * len(e2.E2_FRAMINGS) and not set(train) & set(held)
    for subject in e2.E2_SUBJECTS[-e2.E2_HELDOUT:]:  # a held-out subject never appears in training
        assert not any(subject in p for p in train)


def test_gold_reward_orders_sentiment():
    import e2
    good, neutral, bad = e2.gold_reward(["What a wonderful, happy day!", "The bus leaves at nine.", "This is awful and sad."])
    assert good > 0.5 and bad < -0.5 and abs(neutral) < 0.1


def test_e2_sampling_and_sequence_logps(tiny_qwen2_dir, monkeypatch):
    """Samples are cut after the first eos and reproducible from the seed; their summed log-probs
    equal a plain full-vocabulary computation; e2_score scores every held-out sample."""
    import torch
    import e2
    from model_loader import load_policy, load_tokenizer
    tok, model = load_tokenizer(tiny_qwen2_dir), load_policy(tiny_qwen2_dir).eval()
    prompts = ["Write one sentence about a rainy Monday.", "Describe the city bus in one sentence."]
    monkeypatch.setattr(e2, "E2_NEW_TOKENS", 12)
    samples = e2.sample(model, tok, prompts, n=3, seed=0)
    assert [s["prompt"] for s in samples] == [prompts[0]] * 3 + [prompts[1]] * 3
    assert samples == e2.sample(model, tok, prompts, n=3, seed=0)
    for s in samples:
        assert 1 <= len(s["ids"]) <= e2.E2_NEW_TOKENS and tok.eos_token_id not in s["ids"][:-1]
        assert tok.decode(s["prompt_ids"]).endswith(tok.apply_chat_template(
            [{"role": "user", "content": s["prompt"]}], tokenize=False, add_generation_prompt=True)[-20:])
    logps = e2.response_logps(model, samples, tok.pad_token_id, batch=4)
    for s, lp in zip(samples, logps):
        ids = torch.tensor([s["prompt_ids"] + s["ids"]])
        with torch.no_grad():
            full = model(ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
        assert lp.item() == __import__("pytest").approx(full[len(s["prompt_ids"]) - 1:].sum().item(), abs=1e-3)
    monkeypatch.setattr(e2, "E2_EVAL_SAMPLES", 1)
    monkeypatch.setattr(e2, "E2_NEW_TOKENS", 4)
    score = e2.e2_score(model, model, tok, seed=0)
    assert -1 <= score["reward"] <= 1 and score["samples"] == e2.E2_HELDOUT * len(e2.E2_FRAMINGS)


def test_study_splits_phases_reuse_and_reports(tiny_qwen2_dir, tmp_path, monkeypatch):
    """The study's splits are disjoint, fixed by a seed and recorded; E3's noisy training file and
    marked validation prompts derive from them; a final phase evaluates the test split once, on the
    final policy, without touching train.py's validation eval.json, and reuses a run an earlier
    phase trained with the same flags; the final phases' reports are built from the results."""
    import experiments as E
    import measures
    import report_study
    import result_files
    import study
    from data import load_rows
    last_user = lambda prompt: prompt if isinstance(prompt, str) else prompt[-1]["content"]  # noqa: E731
    config = study.study_config()  # the study's configuration, where every function reads it
    monkeypatch.setitem(config, "splits", dict(test=6, validation=4, seed=0))
    monkeypatch.setitem(config, "base", dict(model_name_or_path=tiny_qwen2_dir, max_length=64, max_prompt_length=40,
                                            batch_size=2, log_every_steps=1, eval_every_steps=1, save_every_steps=1,
                                            precision="fp32", precompute_ref=True, ref_cache_dir=str(tmp_path / "cache"),
                                            max_train_examples=16, beta=0.1))
    fixed, learnable = dict(beta_mode="fixed", max_steps=2, seed=0), dict(beta_mode="learnable", max_steps=2, seed=0)
    monkeypatch.setitem(config, "phases", {"tune_x": {"fixed-s0": fixed, "learnable-s0": learnable},
                                           "final": {"fixed-s0": fixed, "learnable-s0": learnable},
                                           "e3": {"fixed-s0": dict(fixed, log_pair_beta=True),
                                                  "learnable-s0": dict(learnable, epsilon=0.9, log_pair_beta=True)},
                                           "runaway": {"headlr-noclamp-s0": dict(learnable, beta_head_lr=1e-2, beta_min=0.0,
                                                                                 beta_max=math.inf)}})
    res, runs = str(tmp_path / "results"), str(tmp_path / "runs")
    paths = study.study_data("demo", runs, res)
    rows = {k: [json.loads(x) for x in open(p)] for k, p in paths.items()}
    assert [len(rows[k]) for k in ("test", "validation")] == [6, 4]
    assert len(rows["train"]) == len(load_rows("demo")) - 10
    as_set = lambda k: {json.dumps(r, sort_keys=True) for r in rows[k]}  # noqa: E731
    assert not (as_set("test") & as_set("validation") or as_set("test") & as_set("train"))
    assert study.study_data("demo", runs, res) == paths  # the same splits again (and the recorded hashes agree)
    # E3: the recorded noisy rows are marked and swapped, the others are the clean training rows
    noisy = json.load(open(os.path.join(res, "study", "splits.json")))["e3_train"]["noisy_rows"]
    marker = config["e3"]["marker"]
    assert len(noisy) == round(config["e3"]["noisy_fraction"] * len(rows["train"]))
    for i, (clean, e3) in enumerate(zip(rows["train"], rows["e3_train"])):
        if i in noisy:
            m = study.mark_prompt(clean, marker)
            assert last_user(e3["prompt"]).startswith(marker) and (e3["chosen"], e3["rejected"]) == (m["rejected"], m["chosen"])
        else:
            assert e3 == clean
    assert all(last_user(r["prompt"]).startswith(marker) for r in rows["validation_marked"])

    E.run_study("tune_x", "demo", [], res, runs)
    E.run_study("final", "demo", [], res, runs)
    for name in ("fixed-s0", "learnable-s0"):
        r = json.load(open(os.path.join(res, "study", "final", name + ".json")))
        assert r["reused_from"] == "study/tune_x/" + name and not os.path.exists(os.path.join(runs, "study", "final", name))
    r = json.load(open(os.path.join(res, "study", "final", "fixed-s0.json")))
    assert r["eval"]["pairs"] == 4 and r["test"]["metrics"]["pairs"] == 6  # validation, then test
    final = os.path.join(runs, "study", "tune_x", "fixed-s0", "final")
    assert json.load(open(os.path.join(final, "eval.json")))["metrics"]["pairs"] == 4  # train.py's, kept
    assert json.load(open(os.path.join(final, "eval_test.json")))["metrics"] == r["test"]["metrics"]
    assert "test" not in json.load(open(os.path.join(res, "study", "tune_x", "fixed-s0.json")))  # tuning never sees test
    p = r["test"]["per_pair"]
    assert len(p["row"]) == 6 and p["row"] == sorted(p["row"]) and all(t <= 40 for t in p["prompt_tokens"])
    E.run_study("e3", "demo", [], res, runs, only=["fixed-s0"])  # one run of a phase
    assert not os.path.exists(os.path.join(res, "study", "e3", "learnable-s0.json"))
    E.run_study("e3", "demo", [], res, runs)  # the noisy training data: a new run even for the same flags
    r3 = json.load(open(os.path.join(res, "study", "e3", "fixed-s0.json")))
    assert "reused_from" not in r3 and r3["config"]["dataset"] == paths["e3_train"]
    assert r3["validation_marked"]["metrics"]["pairs"] == 4
    assert [m["step"] for m in r3["pair_beta"]] == [1, 2]  # train.py --log_pair_beta, carried into the result

    report_study.report_study_tuning("tune_x", res)  # validation curves, the choice table, what drives beta
    tuned = open(os.path.join(res, "study", "tune_x.md")).read()
    assert re.search(r"\| learnable-s0 \| 0\.\d{4} \[", tuned) and "ρ(β, PPL)" in tuned
    with open(tmp_path / "report.md", "w") as f:
        f.write("<!-- BEGIN study_final -->\n<!-- END study_final -->\n<!-- BEGIN study_e3 -->\n<!-- END study_e3 -->\n")
    report_study.report_study_final("final", res)
    monkeypatch.setattr(report_study, "E3_CLEAN", "final")  # the noise's cost: E3's runs against their clean twins
    report_study.report_study_final("e3", res)
    doc = open(tmp_path / "report.md").read()
    clean_fixed = json.load(open(os.path.join(res, "study", "final", "fixed-s0.json")))
    cost = [f"{x['test']['metrics']['loss_beta0']:.4f}" for x in (clean_fixed, r3)]
    assert re.search(rf"\| fixed \| 1 \| fixed \| [^|]+ \| {cost[0]} → {cost[1]} \|", doc)
    assert re.search(r"\| learnable \| 1 \| learnable \| ", doc)  # its own clean twin
    assert re.search(r"\| learnable \| 1 \| [+-]\d\.\d{4} \| \[", doc)  # the paired difference, with its pair interval
    assert "partial ρ(β, margin" in doc and "AUC P(β marked < β plain)" in doc
    assert re.search(r"\| fixed \| 1 \| 0\.1000 \| 0\.1000 \| 1\.0000 \| 0\.500 \| – \| – \|", doc)  # a constant beta ignores the marker
    # learnable beta's marked / plain ratio splits into the PPL term's (here PPL itself) and f(h)'s
    assert re.search(r"\| learnable \| 1 \| [^|]+ \| [^|]+ \| \d\.\d{4} \| \d\.\d{3} \| \d\.\d{4} \| \d\.\d{4} \|", doc)
    rl = json.load(open(os.path.join(res, "study", "e3", "learnable-s0.json")))
    terms, p = measures.head_terms(rl, "validation_marked"), rl["validation_marked"]["per_pair"]
    assert sorted(terms) == p["row"] and [terms[i][0] for i in p["row"]] == pytest.approx(p["ppl"], rel=1e-9)
    assert all(abs(f - 1) <= 0.9 + 1e-6 for _, f in terms.values())  # inside the NN's band, eps 0.9
    # ... and the noisy training rows (here 1 of the 4 pairs trained on: row 10 of rows 12, 10, 9, 6)
    assert "| fixed | 1 | 1.000 | 1.000 | 0.500 | 0.500 |" in doc and re.search(r"\| learnable \| 1 \| \d\.\d{3} \|", doc)
    assert os.path.getsize(os.path.join(res, "figures", "study_e3_pair_beta.png")) > 10_000
    assert os.path.getsize(os.path.join(res, "figures", "study_final.png")) > 10_000
    assert os.path.getsize(os.path.join(res, "figures", "study_final_beta.png")) > 10_000
    # the runaway: no clamp (an infinite beta_max passes through the runner to train.py), w over steps
    E.run_study("runaway", "demo", [], res, runs)
    rr = json.load(open(os.path.join(res, "study", "runaway", "headlr-noclamp-s0.json")))
    assert rr["flags"][rr["flags"].index("--beta_max") + 1] == "inf" and rr["test"]["metrics"]["pairs"] == 6
    with open(tmp_path / "report.md", "a") as f:
        f.write("<!-- BEGIN study_runaway -->\n<!-- END study_runaway -->\n")
    report_study.report_study_final("runaway", res)
    train = result_files.curve(rr, "train")
    w = [m["beta_head/w"] for m in train]
    row = re.search(r"\| headlr-noclamp-s0 \| (\S+) → (\S+) \((\S+), (\S+)\) \| \S+ → \S+ \| (\S+) \| – \(no clamp\) \| "
                    r"\S+, (\S+) \[\S+, \S+\] \| (?:0\.9\d\d|1\.\d{3}) \[\S+, \S+\] \| (\d\.\d{4}) \| \d\.\d{3} \| \d\.\d{4} \|",
                    open(tmp_path / "report.md").read())
    geometric = statistics.geometric_mean(rr["test"]["per_pair"]["beta"])
    assert row and [float(x) for x in row.groups()] == [float(f"{x:.4g}") for x in (w[0], w[-1], min(w), max(w))] + [
        round(max(m["beta/max"] for m in train), 3), float(f"{geometric:.4g}"), round(rr["eval"]["loss_beta0"], 4)]
    assert os.path.getsize(os.path.join(res, "figures", "study_runaway.png")) > 10_000


def test_a_stopped_run_resumes_and_counts_every_attempt(tiny_qwen2_dir, tmp_path):
    """SIGTERM to the runner reaches train.py, which checkpoints and stops; the runner records that
    attempt's seconds, and the resumed run's result counts both attempts in wall_s."""
    import signal
    import threading
    import experiments as E
    config = dict(model_name_or_path=tiny_qwen2_dir, dataset="demo", eval_split="test", max_eval_examples=4,
                  max_length=64, max_prompt_length=40, batch_size=2, max_steps=20, log_every_steps=1,
                  eval_every_steps=0, save_every_steps=0, precision="fp32", seed=0)
    res, runs = str(tmp_path / "results"), str(tmp_path / "runs")
    run_dir = os.path.join(runs, "x", "a-s0")

    def stop_after_the_first_steps():
        metrics = os.path.join(run_dir, "metrics.jsonl")
        while not (os.path.exists(metrics) and sum('"train"' in x for x in open(metrics)) >= 2):
            time.sleep(0.05)
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:  # the runner's handler, not pytest's death
            os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=stop_after_the_first_steps, daemon=True).start()
    with pytest.raises(SystemExit, match="stopped by a signal"):
        E.run_configs("x", {"a-s0": config}, [], res, runs)
    first = json.load(open(os.path.join(run_dir, "attempts.json")))
    assert len(first) == 1 and first[0] > 0 and os.listdir(os.path.join(run_dir, "checkpoints"))
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the runner's handler is gone again

    t0 = time.time()
    E.run_configs("x", {"a-s0": config}, [], res, runs)  # resumes
    second = time.time() - t0
    r = json.load(open(os.path.join(res, "x", "a-s0.json")))
    assert r["wall_s"] > second  # the resumed attempt alone took less: the first one is counted too
    assert max(m["step"] for m in r["curves"]) == 20 and r["train_data_report"]["kept"] > 0
    assert "resumed from" in open(os.path.join(run_dir, "train.log")).read()


def test_the_committed_report_rebuilds_from_the_committed_results(tmp_path, monkeypatch):
    """Every `experiments.py report ...` on a copy of results/ and report.md changes no table:
    report.md's blocks and results/*.md are what the commands make of the committed result files,
    wherever the checkout lives (CI clones it elsewhere than the one that ran the experiments)."""
    import experiments as E
    import result_files
    import study
    here = result_files.HERE
    shutil.copytree(os.path.join(here, "results"), tmp_path / "results")
    shutil.copy(os.path.join(here, "report.md"), tmp_path / "report.md")
    monkeypatch.setattr(result_files, "HERE", str(tmp_path / "a" / "checkout" / "three" / "levels" / "deeper"))
    res = str(tmp_path / "results")
    for experiment in ("e1", "e2", "bf16", "fused"):
        E.rebuild(experiment, "", res)
    for phase in study.study_config()["phases"]:
        if glob.glob(os.path.join(res, "study", phase, "*.json")):  # every phase with committed results (one
            E.rebuild("study", phase, res)                           # being run, such as E4's, has none yet)
    tables = sorted(glob.glob("**/*.md", root_dir=os.path.join(here, "results"), recursive=True))
    assert tables == sorted(glob.glob("**/*.md", root_dir=res, recursive=True))  # none written that is not committed
    for name in tables:
        assert open(os.path.join(res, name)).read() == open(os.path.join(here, "results", name)).read(), name
    assert open(tmp_path / "report.md").read() == open(os.path.join(here, "report.md")).read()


def test_shown_path_writes_shared_data_as_the_sibling_folder_wherever_it_was():
    import result_files
    assert result_files.shown_path("/work/shared/data/hh/pairs.jsonl.gz") == "../shared/data/hh/pairs.jsonl.gz"
    assert result_files.shown_path("/home/shared/ci/x/shared/data/p.jsonl") == "../shared/data/p.jsonl"  # the innermost shared/
    assert result_files.shown_path("data/mine.jsonl") == "data/mine.jsonl"
    assert result_files.shown_path(os.path.join(result_files.HERE, "runs", "d.jsonl")) == os.path.join("runs", "d.jsonl")
