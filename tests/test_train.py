"""End to end on the tiny Qwen2 with the real DeepSeek tokenizer: train -> save -> evaluate,
exact resume, and flag errors."""

import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import evaluate
import train
from data import DataError


def common(model_dir, out, *extra):
    return ["--model_name_or_path", model_dir, "--dataset", "demo", "--eval_split", "test",
            "--max_eval_examples", "8", "--output_dir", str(out), "--batch_size", "2",
            "--max_length", "64", "--max_prompt_length", "40", "--policy_lr", "1e-3",
            "--log_every_steps", "2", "--eval_every_steps", "0", "--seed", "1", "--precision", "fp32",
            "--keep_checkpoints", *extra]


def run_and_resume_from_step_2(model_dir, tmp_path, args, global_seed=None):
    """Train `full` uninterrupted, then `part`: a run that stopped after step 2 (only its step-2
    checkpoint exists), resumed with --resume_from auto. -> (full, part) run directories."""
    full, part = tmp_path / "full", tmp_path / "part"
    train.main(common(model_dir, full, *args))
    os.makedirs(part / "checkpoints")
    shutil.copytree(full / "checkpoints" / "step_2", part / "checkpoints" / "step_2")
    if global_seed is not None:
        torch.manual_seed(global_seed)
    train.main(common(model_dir, part, *args, "--resume_from", "auto"))
    return full, part


@pytest.mark.slow
def test_train_save_evaluate_round_trip(tiny_qwen2_dir, tmp_path):
    from transformers import AutoModelForCausalLM
    out = tmp_path / "run"
    train.main(common(tiny_qwen2_dir, out, "--beta_mode", "learnable", "--nn_structure", "mlp",
                      "--max_steps", "4", "--beta_head_lr", "1e-2"))
    final = out / "final"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "beta_head.safetensors",
                 "run_config.json", "README.md", "COMPLETED"):
        assert (final / name).exists(), name
    assert not (final / "trainer_state.pt").exists()  # the model to deploy holds no optimizer state
    assert (out / "checkpoints" / "step_4" / "trainer_state.pt").exists()  # --keep_checkpoints: the last state
    card = (final / "README.md").read_text()
    # a local starting model is named in the text, not as the hub's base_model (which must be a hub id)
    assert f"A preference-tuned version of `{tiny_qwen2_dir}`" in card and "base_model:" not in card
    assert "Learnable-beta DPO" in card and "python train.py" in card
    assert "rewards/accuracies" in card
    for name in ("config.json", "data_report.json", "metrics.jsonl"):
        assert (out / name).exists(), name
    assert any(n.startswith("events") for _, _, files in os.walk(out / "tb") for n in files)

    # the policy is a plain Hugging Face checkpoint, and it changed
    policy = AutoModelForCausalLM.from_pretrained(str(final))
    start = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir)
    assert not torch.equal(policy.lm_head.weight, start.lm_head.weight)

    lines = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train_lines = [m for m in lines if m["split"] == "train"]
    assert [m["step"] for m in train_lines] == [2, 4]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "beta/mean", "beta/std", "beta/min", "beta/max",
                "ppl/mean", "beta_head/w", "beta_head/nn_grad_norm", "lr/policy", "lr/beta_head",
                "grad_norm", "tokens_per_s", "rewards_beta0/margins", "mem/peak_rss_gb"):
        assert key in train_lines[-1], key
    assert 0.1 < train_lines[0]["mem/peak_rss_gb"] <= train_lines[-1]["mem/peak_rss_gb"] < 64  # a peak: never falls
    assert train_lines[0]["beta/mean"] == pytest.approx(0.1, rel=0.5)  # w calibrated to beta0

    # train.py's own final eval.json has the same keys and values as evaluate.py's
    from_train = json.load(open(final / "eval.json"))
    assert len(from_train["per_pair"]["beta"]) == 8 and from_train["metrics"]["pairs"] == 8
    metrics = evaluate.main(["--ckpt", str(final), "--batch_size", "4"])
    assert set(metrics) == set(from_train["metrics"])
    for key in metrics:
        assert metrics[key] == pytest.approx(from_train["metrics"][key], rel=1e-4, abs=1e-6), key
    saved = json.load(open(final / "eval.json"))["metrics"]
    assert saved == pytest.approx(metrics)
    assert metrics["pairs"] == 8 and (final / "eval.md").exists()
    # evaluate.py reproduces the final in-training evaluation of the same pairs
    eval_line = [m for m in lines if m["split"] == "eval"][-1]
    for key in ("loss", "rewards/accuracies", "rewards/margins", "beta/mean", "ppl/mean"):
        assert metrics[key] == pytest.approx(eval_line[key], rel=1e-4, abs=1e-6), key


@pytest.mark.slow
def test_w_is_calibrated_on_the_first_training_prompts(tiny_qwen2_dir, tmp_path):
    """With --calibration_pairs = one step's pairs, the first step's mean beta is exactly beta0
    (f(h) = 1 and the policy has not moved yet); with more pairs it is beta0 only on average."""
    def first_beta(out, pairs):
        train.main(common(tiny_qwen2_dir, out, "--beta_mode", "learnable", "--max_steps", "1", "--log_every_steps", "1",
                          "--beta", "0.2", "--calibration_pairs", str(pairs)))
        return json.loads(open(out / "metrics.jsonl").readline())["beta/mean"]
    assert first_beta(tmp_path / "a", 2) == pytest.approx(0.2, rel=1e-5)
    assert first_beta(tmp_path / "b", 16) != pytest.approx(0.2, rel=1e-5)


@pytest.mark.slow
def test_resume_is_exact(tiny_qwen2_dir, tmp_path):
    """Stop at step 2, resume to step 4: parameters, BetaHead, optimizer state and the logged
    metrics equal those of an uninterrupted run, bit for bit."""
    args = ["--beta_mode", "learnable", "--max_steps", "4", "--save_every_steps", "2", "--save_total_limit", "0",
            "--beta_head_lr", "1e-2", "--gradient_accumulation_steps", "2"]
    full, part = run_and_resume_from_step_2(tiny_qwen2_dir, tmp_path, args)

    a, b = full / "final", part / "final"
    for name in ("model.safetensors", "beta_head.safetensors"):
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (name, k)
    sa = torch.load(full / "checkpoints" / "step_4" / "trainer_state.pt", weights_only=True)
    sb = torch.load(part / "checkpoints" / "step_4" / "trainer_state.pt", weights_only=True)
    assert sa["step"] == sb["step"] == 4
    for i, st in sa["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, sb["optimizer"]["state"][i][k]), (i, k)
    assert [g["lr"] for g in sa["optimizer"]["param_groups"]] == [g["lr"] for g in sb["optimizer"]["param_groups"]]

    def logged(run, step):
        lines = [json.loads(line) for line in open(run / "metrics.jsonl")]
        m = [x for x in lines if x["step"] == step and x["split"] == "train"][-1]
        return {k: v for k, v in m.items() if k != "tokens_per_s" and not k.startswith("mem/")}  # the machine's, not the run's
    assert logged(full, 4) == logged(part, 4)


@pytest.mark.slow
def test_fixed_mode_trains_and_evaluates(tiny_qwen2_dir, tmp_path):
    out = tmp_path / "fixed"
    train.main(common(tiny_qwen2_dir, out, "--max_steps", "2"))
    assert not (out / "final" / "beta_head.safetensors").exists()
    metrics = evaluate.main(["--ckpt", str(out / "final")])
    assert metrics["beta/std"] < 1e-6 and metrics["beta/min"] == metrics["beta/max"] == pytest.approx(0.1)


@pytest.mark.parametrize("flags,message", [
    (["--beta_mode", "fixed", "--beta_head_lr", "1e-3"], "only applies to --beta_mode learnable"),
    (["--max_length", "64", "--max_prompt_length", "64"], "must be < --max_length"),
    (["--policy_lr", "0"], "--policy_lr must be > 0"),
    (["--policy_lr=-1e-5"], "--policy_lr must be > 0"),
    (["--beta_mode", "learnable", "--beta_min", "0.5"], "beta_min < --beta"),
    (["--epsilon", "1.5"], "epsilon"),
    (["--beta_mode", "epsilon_dpo", "--precompute_ref"], "drop --precompute_ref"),
    (["--beta_mode", "epsilon_dpo", "--beta_max", "1"], "only applies to --beta_mode learnable or beta_dpo"),
    (["--label_smoothing", "0.5"], "0 <= --label_smoothing < 0.5"),
    (["--beta_mode", "epsilon_dpo", "--epsilon_dpo_epsilon", "0"], "0 < --epsilon_dpo_epsilon < 1"),
])
def test_bad_flags_fail_before_loading(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.get_args(flags)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_refuses_to_overwrite_another_run(tiny_qwen2_dir, tmp_path):
    """A directory where training started (metrics, checkpoints or final/) holds a run and is never
    overwritten; one where only a failed start wrote its config.json does not block the same command."""
    out = tmp_path / "run"
    os.makedirs(out)
    (out / "config.json").write_text("{}")
    (out / "metrics.jsonl").write_text("")
    with pytest.raises(DataError, match="already holds a run"):
        train.main(common(tiny_qwen2_dir, out, "--max_steps", "1"))
    failed_start = tmp_path / "failed"
    os.makedirs(failed_start)
    (failed_start / "config.json").write_text("{}")
    train.main(common(tiny_qwen2_dir, failed_start, "--max_steps", "1", "--max_eval_examples", "2"))
    assert (failed_start / "final" / "COMPLETED").exists()


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_cleanly(tiny_qwen2_dir, tmp_path):
    import signal
    import subprocess
    import sys
    import time
    out = tmp_path / "run"
    cmd = [sys.executable, "train.py", *common(tiny_qwen2_dir, out, "--max_steps", "500", "--log_every_steps", "1")]
    proc = subprocess.Popen(cmd, cwd=os.path.dirname(train.__file__), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text()):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert "--resume_from auto" in output
    ckpts = checkpoint.complete_checkpoints(str(out))
    assert len(ckpts) == 1 and not (out / "final").exists()
    step = torch.load(os.path.join(ckpts[0], "trainer_state.pt"), weights_only=True)["step"]
    assert 1 <= step < 500


def test_lr_schedule():
    f = train.lr_factor
    assert [f(s, 10, 2, "cosine") for s in (0, 1)] == [0.5, 1.0]  # linear warmup
    assert f(2, 10, 2, "cosine") == pytest.approx(1.0) and f(6, 10, 2, "cosine") == pytest.approx(0.5)
    assert f(9, 10, 2, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert f(6, 10, 2, "linear") == pytest.approx(0.5) and f(9, 10, 0, "constant") == 1.0


@pytest.mark.slow
def test_bf16_autocast_on_cpu_trains_with_fp32_master_weights(tiny_qwen2_dir, tmp_path):
    import subprocess
    import sys
    out = tmp_path / "bf16"  # own process: accelerate fixes the precision once per process
    subprocess.run([sys.executable, "train.py", *common(tiny_qwen2_dir, out, "--beta_mode", "learnable", "--max_steps",
                    "2", "--precision", "bf16", "--log_every_steps", "1", "--calibration_pairs", "2")],
                   cwd=os.path.dirname(train.__file__), check=True, capture_output=True, timeout=300)
    first = [json.loads(x) for x in open(out / "metrics.jsonl") if '"train"' in x][0]
    # the reference runs under the same autocast: policy == reference at step 0 exactly
    assert first["rewards/margins"] == 0.0 and first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    # calibration on the first step's 2 prompts, under the same autocast as training: mean beta is beta0
    assert first["beta/mean"] == pytest.approx(0.1, rel=1e-3)
    w = load_file(str(out / "final" / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in w.values())


@pytest.mark.slow
def test_resume_applies_new_learning_rate_and_refuses_new_data_order(tiny_qwen2_dir, tmp_path):
    out = tmp_path / "run"
    train.main(common(tiny_qwen2_dir, out, "--max_steps", "4", "--save_every_steps", "2", "--lr_scheduler", "constant",
                      "--warmup_ratio", "0"))
    with pytest.raises(DataError, match="has batch_size=2 but this run has 4"):
        train.main(common(tiny_qwen2_dir, out, "--max_steps", "6", "--resume_from", "auto", "--batch_size", "4"))
    train.main(common(tiny_qwen2_dir, out, "--max_steps", "6", "--resume_from", "auto", "--policy_lr", "1e-4",
                      "--lr_scheduler", "constant", "--warmup_ratio", "0"))
    state = torch.load(out / "checkpoints" / "step_6" / "trainer_state.pt", weights_only=True)
    assert {g["lr"] for g in state["optimizer"]["param_groups"]} == {1e-4}


@pytest.mark.slow
def test_beta_dpo_mode_trains_and_resumes_exactly(tiny_qwen2_dir, tmp_path):
    """rho 0.8 at batch 8 keeps 6 pairs per step: the filter's draws resume exactly, and a run whose
    optimizer state was pruned is still evaluable (M0 lives in beta_dpo.json beside the weights)."""
    args = ["--beta_mode", "beta_dpo", "--max_steps", "4", "--save_every_steps", "2", "--batch_size", "8",
            "--log_every_steps", "1", "--beta_dpo_rho", "0.8"]
    # the global RNG must not matter to the filter
    full, part = run_and_resume_from_step_2(tiny_qwen2_dir, tmp_path, args, global_seed=12345)
    a, b = load_file(str(full / "final" / "model.safetensors")), load_file(str(part / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa = json.load(open(full / "final" / "beta_dpo.json"))
    sb = json.load(open(part / "final" / "beta_dpo.json"))
    assert sa == sb and sa["calls"] == 4 and sa["m0"] != 0.0
    lines = [json.loads(x) for x in open(full / "metrics.jsonl") if '"train"' in x]
    assert lines[-1]["beta/std"] < 1e-6  # one beta per batch
    assert not (full / "final" / "trainer_state.pt").exists()  # final/ has no optimizer state
    metrics = evaluate.main(["--ckpt", str(full / "final")])
    assert metrics["pairs"] == 8


@pytest.mark.slow
def test_epsilon_dpo_mode_trains_and_resumes_exactly(tiny_qwen2_dir, tmp_path):
    """ε-DPO with cDPO label smoothing: its running beta moves with training, is saved in
    epsilon_dpo.json and resumes exactly; evaluate.py reloads it."""
    args = ["--beta_mode", "epsilon_dpo", "--epsilon_dpo_epsilon", "0.2", "--label_smoothing", "0.1",
            "--max_steps", "4", "--save_every_steps", "2", "--log_every_steps", "1"]
    full, part = run_and_resume_from_step_2(tiny_qwen2_dir, tmp_path, args)
    a, b = load_file(str(full / "final" / "model.safetensors")), load_file(str(part / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa = json.load(open(full / "final" / "epsilon_dpo.json"))
    assert sa == json.load(open(part / "final" / "epsilon_dpo.json")) and sa["updates"] == 4
    lines = [json.loads(x) for x in open(full / "metrics.jsonl") if '"train"' in x]
    assert lines[0]["epsilon_dpo/down_frac"] == lines[0]["epsilon_dpo/up_frac"] == 0  # step 0: policy = reference
    moved = sum(m["epsilon_dpo/down_frac"] + m["epsilon_dpo/up_frac"] for m in lines[1:])
    assert moved > 0 and (sa["beta"] != 0.1) == (moved > 0)
    metrics = evaluate.main(["--ckpt", str(full / "final")])
    assert metrics["beta/mean"] != 0.1 and metrics["loss"] == pytest.approx(
        json.load(open(full / "final" / "eval.json"))["metrics"]["loss"], rel=1e-5)


# one group per line: flags that decide which rows train, their tokens, and their order
RESUME_GROUPS = {
    "source": [("--dataset_config", "other"), ("--dataset_data_dir", "harmless-base")],
    "splits": [("--split", "validation"), ("--eval_split", "validation")],
    "held-out fraction": [("--eval_fraction", "0.2"), ("--split_seed", "3")],
    "row count": [("--max_train_examples", "100")],
    "tokens": [("--think_prefill", "open"), ("--max_length", "96"), ("--no_chat_template", None)],
    "order": [("--seed", "7"), ("--batch_size", "4"), ("--gradient_accumulation_steps", "2")],
}


@pytest.mark.parametrize("group", list(RESUME_GROUPS))
def test_resume_refuses_other_rows(group, tmp_path):
    ckpt = tmp_path / "ckpt"
    os.makedirs(ckpt)
    base = common("tiny", tmp_path / "run")
    json.dump(vars(train.get_args(base)), open(ckpt / "run_config.json", "w"))
    checkpoint.check_resume(str(ckpt), train.get_args(base))  # the same flags resume
    for flag, value in RESUME_GROUPS[group]:
        changed = [x for x in base]
        if flag in changed:
            changed[changed.index(flag) + 1] = value
        else:
            changed += [flag] + ([value] if value is not None else [])
        with pytest.raises(DataError, match=f"has {flag[2:]}="):
            checkpoint.check_resume(str(ckpt), train.get_args(changed))


@pytest.mark.slow
def test_non_finite_weights_are_never_saved(tiny_qwen2_dir, tmp_path):
    """A finite gradient with an absurd step (lr * weight decay overflows fp32) makes inf weights:
    the run stops with one line at that step and writes no checkpoint of them."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="step 0: the update made weights non-finite"):
        train.main(common(tiny_qwen2_dir, out, "--max_steps", "3", "--policy_lr", "1e38", "--weight_decay", "10",
                          "--save_every_steps", "1"))
    assert not (out / "final").exists() and not (out / "checkpoints").exists()


def test_pair_beta_log_names_the_pairs_each_step_trained_on(tiny_qwen2_dir, tmp_path):
    """--log_pair_beta: one line per step with every pair's row number and beta, in the loader's
    order. Checked where beta is known from outside: at step 1 (f(h) = 1, the policy not yet moved)
    a pair's beta is w times its prompt's perplexity under the starting model, so beta / PPL is the
    same for every logged pair only if the rows name the right prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from data import load_rows
    from tokenization import build_examples
    out = tmp_path / "run"
    train.main(common(tiny_qwen2_dir, out, "--beta_mode", "learnable", "--max_steps", "2",
                      "--gradient_accumulation_steps", "2", "--log_pair_beta"))
    lines = [json.loads(x) for x in open(out / "pair_beta.jsonl")]
    assert [m["step"] for m in lines] == [1, 2] and all(len(m["row"]) == len(m["beta"]) == 4 for m in lines)
    examples, _ = build_examples(load_rows("demo"), AutoTokenizer.from_pretrained(tiny_qwen2_dir), 64, 40)
    prompt = {e["row"]: e["prompt_ids"] for e in examples}
    policy = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir).eval()

    def ppl(ids):  # masked_ppl of one unpadded prompt: the first token has no context and is left out
        with torch.no_grad():
            logps = torch.log_softmax(policy(torch.tensor([ids])).logits[0, :-1].float(), -1)
        return math.exp(-logps[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean().item())
    ppls = [ppl(prompt[r]) for r in lines[0]["row"]]
    ratios = [b / p for b, p in zip(lines[0]["beta"], ppls)]
    assert max(ppls) / min(ppls) > 1.01  # the prompts differ (by ~2% on the random model): a wrong row would show
    assert max(ratios) / min(ratios) == pytest.approx(1.0, abs=1e-4)


def test_evaluate_wraps_a_model_that_needs_no_gradients(tiny_qwen2_dir, tmp_path, monkeypatch):
    """evaluate.py hands accelerate a model with no parameter requiring grad, so a multi-GPU launch does
    not wrap it in DDP with a gradient buffer per process (~7 GB each for the 1.5B model)."""
    from accelerate import Accelerator
    train.main(common(tiny_qwen2_dir, tmp_path / "run", "--max_steps", "1", "--max_eval_examples", "2"))
    seen, real = [], Accelerator.prepare
    monkeypatch.setattr(Accelerator, "prepare", lambda self, *m, **k: seen.append(
        any(p.requires_grad for x in m for p in x.parameters())) or real(self, *m, **k))
    evaluate.main(["--ckpt", str(tmp_path / "run" / "final")])
    assert seen == [False]


def test_help_shows_defaults_and_trl_names_get_an_answer(capsys):
    """--help shows each flag's default; TRL's DPOConfig names are answered with ours; 'latest' is 'auto'."""
    with pytest.raises(SystemExit):
        train.get_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for fragment in ("peak AdamW learning rate of the policy (default: 1e-06)", "(default: 512)",
                     "(0 = only final) (default: 500)", "(default 1e-3; learnable only)"):
        assert fragment in text, fragment
    assert "(default: None)" not in text
    with pytest.raises(SystemExit):
        train.get_args(["--learning_rate", "1e-5", "--per_device_train_batch_size", "4", "--bf16"])
    err = " ".join(capsys.readouterr().err.split())
    assert "unrecognized arguments: --learning_rate 1e-5 --per_device_train_batch_size 4 --bf16" in err
    for hint in ("--learning_rate is TRL's; here use --policy_lr", "--per_device_train_batch_size is TRL's; here use "
                 "--batch_size", "--bf16 is TRL's; here use --precision bf16"):
        assert hint in err, hint
    assert train.get_args(["--resume_from", "latest"]).resume_from == "auto"
    assert set(train.TRL_FLAGS) >= {"--learning_rate", "--per_device_train_batch_size", "--num_train_epochs",
                                    "--logging_steps", "--bf16", "--resume_from_checkpoint", "--warmup_steps",
                                    "--max_completion_length", "--loss_type"}


def test_logged_rows_are_the_data_files_rows(tiny_qwen2_dir, tmp_path):
    """With the default held-out fraction, pair_beta.jsonl's and eval.json's row numbers are rows of
    the user's file: each one's prompt text is that file row's, the trained ones are never held out."""
    from transformers import AutoTokenizer
    from data import split_eval
    rows = [dict(prompt=f"Question number {i} about topic {i * 7}?", chosen=f"Good answer {i}.", rejected=f"Bad {i}.")
            for i in range(24)]
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    train.main(["--model_name_or_path", tiny_qwen2_dir, "--dataset", str(path), "--output_dir", str(out),
                "--batch_size", "2", "--max_length", "64", "--max_prompt_length", "40", "--max_steps", "3",
                "--eval_every_steps", "0", "--precision", "fp32", "--log_pair_beta", "--eval_fraction", "0.25"])
    held = set(split_eval(rows, 0.25, 0)[1].numbers)  # the held-out file rows, by the same rule
    trained = {r for line in open(out / "pair_beta.jsonl") for r in json.loads(line)["row"]}
    assert trained and not trained & held and trained <= set(range(24))
    per_pair = json.load(open(out / "final" / "eval.json"))["per_pair"]
    assert set(per_pair["row"]) == held
    # the text behind a logged row number is that file row's prompt
    from tokenization import build_examples
    tok = AutoTokenizer.from_pretrained(tiny_qwen2_dir)
    train_rows, held_rows = split_eval(rows, 0.25, 0)
    for part in (train_rows, held_rows):
        for ex in build_examples(part, tok, 64, 40)[0]:
            assert rows[ex["row"]]["prompt"] in tok.decode(ex["prompt_ids"])


def test_beta_for_my_own_prompts(tiny_qwen2_dir, tmp_path):
    """evaluate.py --prompts FILE: each prompt's beta, PPL, f(h) and token count, lowest beta first, as
    JSONL and a table, with a histogram; beta and PPL are those get_dynamic_beta / compute_ppl give."""
    from beta_head import ppl_scale
    from checkpoint import read_run_config
    from model_loader import build_model, load_tokenizer
    out = tmp_path / "run"
    train.main(common(tiny_qwen2_dir, out, "--beta_mode", "learnable", "--max_steps", "2", "--max_eval_examples", "2",
                      "--beta_head_lr", "1e-1"))
    prompts = ["How do I tie a tie?", "Why is the sky blue? Explain it to a child in three sentences, please.", "Hi"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n\n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": [{"role": "user", "content": "Name a colour."}]}) + "\n")
    final = out / "final"
    rows = evaluate.main(["--ckpt", str(final), "--prompts", str(tmp_path / "p.txt"), "--batch_size", "2"])
    assert sorted(r["row"] for r in rows) == [0, 1, 2] and [r["beta"] for r in rows] == sorted(r["beta"] for r in rows)
    logged = [json.loads(x) for x in open(final / "prompt_beta.jsonl")]
    assert logged == rows and (final / "prompt_beta.png").stat().st_size > 0
    table = open(final / "prompt_beta.md").read()
    assert "| file row | beta | PPL | f(h) | prompt tokens |" in table and "How do I tie a tie?" in table
    # the same numbers through the spec's methods on the prompt alone
    cfg = read_run_config(str(final))
    tok = load_tokenizer(str(final))
    model = build_model(cfg, torch.device("cpu"), None, ckpt=str(final), training=False)
    from tokenization import prompt_tokens
    for r in rows:
        ids = torch.tensor([prompt_tokens(tok, prompts[r["row"]])[0]])
        mask = torch.ones_like(ids)
        with torch.no_grad():
            assert model.get_dynamic_beta(ids, mask).item() == pytest.approx(r["beta"], rel=1e-5)
            ppl = model.compute_ppl(ids, mask)
        assert ppl.item() == pytest.approx(r["ppl"], rel=1e-5) and r["prompt_tokens"] == ids.shape[1]
        head = model.beta_head
        assert r["f"] == pytest.approx(r["raw_beta"] / (head.w.item() * ppl_scale(ppl).item()), rel=1e-5)
        assert 1 - head.epsilon - 1e-6 <= r["f"] <= 1 + head.epsilon + 1e-6
    assert len(evaluate.main(["--ckpt", str(final), "--prompts", str(tmp_path / "p.jsonl")])) == 1  # chat messages
    with pytest.raises(DataError, match="every row needs a 'prompt'"):
        (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "x"}) + "\n")
        evaluate.main(["--ckpt", str(final), "--prompts", str(tmp_path / "bad.jsonl")])


def test_a_resume_keeps_its_history_and_says_what_changed(tiny_qwen2_dir, tmp_path, capsys):
    """--resume_from auto with another learning rate: said at the start, and run_config.json, config.json
    and the model card keep both segments (commands and changes); --no_FLAG undoes a config file's
    on/off flag; a LoRA card says peft, names no local path as its base and points at merged/."""
    out = tmp_path / "run"
    first = common(tiny_qwen2_dir, out, "--max_steps", "4", "--save_every_steps", "2", "--max_eval_examples", "2")
    part = tmp_path / "part"
    train.main(first)
    os.makedirs(part / "checkpoints")
    shutil.copytree(out / "checkpoints" / "step_2", part / "checkpoints" / "step_2")
    capsys.readouterr()
    train.main(common(tiny_qwen2_dir, part, "--max_steps", "4", "--save_every_steps", "2", "--max_eval_examples", "2",
                      "--resume_from", "auto", "--policy_lr", "5e-3"))
    assert "resuming with changed flags: --policy_lr 0.001 -> 0.005" in capsys.readouterr().out
    history = json.load(open(part / "final" / "run_config.json"))["history"]
    assert [h["from_step"] for h in history] == [0, 2]
    assert history[0]["command"].endswith(" ".join(first[-6:])) and history[1]["changed"] == {"policy_lr": [1e-3, 5e-3]}
    assert json.load(open(part / "config.json"))["history"] == history
    card = open(part / "final" / "README.md").read()
    assert "trained in segments" in card and "from step 2:" in card and "policy_lr" in card
    # a YAML config turns an on/off flag on; --no_FLAG turns it off again
    cfg = tmp_path / "c.yaml"
    cfg.write_text("keep_checkpoints: true\nprecompute_ref: true\n")
    args = train.get_args(["--config", str(cfg), "--no_keep_checkpoints"])
    assert args.keep_checkpoints is False and args.precompute_ref is True
    from reporting import model_card
    lora = model_card(dict(json.load(open(part / "final" / "run_config.json")), lora_r=8, merge_lora=True), {}, {}, "cmd")
    assert "library_name: peft" in lora and "base_model:" not in lora  # the base here is a local directory
    assert "PeftModel.from_pretrained" in lora and "merged/" in lora and "pip install peft" in lora
    hub = model_card(dict(json.load(open(part / "final" / "run_config.json")), model_name_or_path="org/model"), {}, {}, "cmd")
    assert "base_model: org/model" in hub and "library_name: transformers" in hub
