"""The table of bad inputs (README: "What happens when things go wrong"): each one gets a clear
message that says what to change, or is skipped and counted, never a traceback.

Every case is a function that provokes the problem and returns the message the user sees."""

import json
import os
import shutil
import subprocess
import sys

import pytest

import evaluate
import train
from batching import PairBatchSampler
from data import DataError, load_rows
from tokenization import build_examples

GOOD = [dict(prompt=f"Question {i}?", chosen=f"Good answer {i}.", rejected=f"Bad answer {i}.") for i in range(6)]


def jsonl(path, rows, raw_tail=""):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.write(raw_tail)
    return str(path)


def flags_error(capsys, *flags):
    with pytest.raises(SystemExit):
        train.get_args(list(flags))
    return capsys.readouterr().err


def raised(fn, *exc):
    with pytest.raises(exc or (DataError, FileNotFoundError, SystemExit)) as e:
        fn()
    return str(e.value)


def skipped(tok, row, **kw):
    """The bad row among good ones: kept rows and the skip report."""
    examples, report = build_examples(GOOD + [row], tok, kw.get("max_length", 64), kw.get("max_prompt_length", 32))
    assert len(examples) == len(GOOD)
    return json.dumps(report["skipped"]) + " " + json.dumps(report["first_skipped"])


@pytest.fixture(scope="module")
def tok(deepseek_tokenizer_dir):
    from model_loader import load_tokenizer
    return load_tokenizer(deepseek_tokenizer_dir)


@pytest.fixture(scope="module")
def fixed_ckpt(tiny_qwen2_dir, tmp_path_factory):
    """A finished fixed-beta run of the tiny model (for checkpoint cases)."""
    out = tmp_path_factory.mktemp("fixed_run") / "run"
    train.main(["--model_name_or_path", tiny_qwen2_dir, "--dataset", "demo", "--output_dir", str(out),
                "--max_steps", "1", "--batch_size", "2", "--max_length", "64", "--max_prompt_length", "40",
                "--max_eval_examples", "2", "--eval_every_steps", "0", "--precision", "fp32", "--keep_checkpoints"])
    return out


def base_flags(model, out, *extra):
    return ["--model_name_or_path", model, "--dataset", "demo", "--output_dir", str(out), "--max_steps", "1",
            "--batch_size", "2", "--max_length", "64", "--max_prompt_length", "40", "--precision", "fp32", *extra]


# (case id, provoke(ctx) -> message, expected fragment). ctx has tmp, tok, capsys, model, fixed.
CASES = [
    # --- files -----------------------------------------------------------------------------------
    ("malformed JSON line", lambda c: raised(lambda: load_rows(jsonl(c.tmp / "d.jsonl", GOOD, '{"prompt": "x",\n'))),
     "d.jsonl:7: invalid JSON"),
    ("malformed .json file", lambda c: raised(lambda: load_rows(str(write(c.tmp / "d.json", '[{"prompt": 1,]')))),
     "d.json:1: invalid JSON"),
    ("JSON that is not a list of rows", lambda c: raised(lambda: load_rows(str(write(c.tmp / "d.json", '{"a": 1, "b": 2}')))),
     "expected a JSON list of rows"),
    ("non-UTF-8 bytes", lambda c: raised(lambda: load_rows(str(write(c.tmp / "d.jsonl", b'{"prompt": "caf\xe9"}\n')))),
     "not valid UTF-8"),
    ("corrupt gzip", lambda c: raised(lambda: load_rows(str(write(c.tmp / "d.jsonl.gz", b"not gzip at all")))),
     "not a valid gzip file"),
    ("unknown file extension", lambda c: raised(lambda: load_rows(str(write(c.tmp / "d.txt", "hello")))),
     "unknown extension '.txt'"),
    ("data path that does not exist", lambda c: raised(lambda: load_rows(str(c.tmp / "missing.jsonl"))),
     "does not exist"),
    ("directory that is not a saved dataset", lambda c: raised(lambda: load_rows(str(mkdir(c.tmp / "plain_dir")))),
     "not one written by datasets.save_to_disk"),
    # --- rows --------------------------------------------------------------------------------------
    ("missing field", lambda c: skipped(c.tok, dict(prompt="q", chosen="a")), '"missing_field": 1'),
    ("renamed fields (all rows)", lambda c: raised(lambda: build_examples(
        [dict(question="q", good="a", bad="b")] * 3, c.tok, 64, 32)), "no usable rows out of 3"),
    ("null field", lambda c: skipped(c.tok, dict(prompt="q", chosen="a", rejected=None)), '"missing_field": 1'),
    ("empty response", lambda c: skipped(c.tok, dict(prompt="q", chosen="", rejected="b")), '"empty_text": 1'),
    ("whitespace-only prompt", lambda c: skipped(c.tok, dict(prompt="  ", chosen="a", rejected="b")), '"empty_text": 1'),
    ("non-string text", lambda c: skipped(c.tok, dict(prompt="q", chosen=3, rejected="b")), '"not_text": 1'),
    ("row that is not an object", lambda c: skipped(c.tok, ["q", "a", "b"]), '"not_a_mapping": 1'),
    ("chosen identical to rejected", lambda c: skipped(c.tok, dict(prompt="q", chosen="same", rejected="same")),
     '"chosen_equals_rejected": 1'),
    ("implicit-prompt dialogues with no shared prompt", lambda c: skipped(c.tok, dict(
        chosen="\n\nHuman: a\n\nAssistant: x", rejected="\n\nHuman: b\n\nAssistant: y")), '"no_shared_prompt": 1'),
    ("responses identical after truncation", lambda c: skipped(c.tok, dict(
        prompt="q", chosen="word " * 60 + "good", rejected="word " * 60 + "bad"), max_length=40, max_prompt_length=20),
     '"identical_after_truncation": 1'),
    ("prompt longer than --max_length", lambda c: json.dumps(build_examples(
        [dict(prompt="long " * 300, chosen="a", rejected="b")], c.tok, 64, 32)[1]["truncation"]),
     '"prompt_truncated": 1'),
    ("--strict_data with a bad row", lambda c: raised(lambda: build_examples(GOOD + [dict(prompt="q")], c.tok, 64, 32,
                                                                             strict=True)), "row 6: missing_field"),
    ("empty dataset after filtering", lambda c: raised(lambda: build_examples(
        [dict(prompt="q", chosen="a", rejected="a")], c.tok, 64, 32)), "no usable rows out of 1"),
    ("empty file", lambda c: raised(lambda: build_examples(load_rows(jsonl(c.tmp / "e.jsonl", [])), c.tok, 64, 32)),
     "the dataset is empty"),
    ("fewer pairs than one global batch", lambda c: raised(lambda: PairBatchSampler(3, 2, 0, num_processes=2)),
     "cannot fill one global batch"),
    # --- flags ------------------------------------------------------------------------------------
    ("--beta_mode fixed with --beta_head_lr", lambda c: flags_error(c.capsys, "--beta_head_lr", "1e-3"),
     "--beta_head_lr only applies to --beta_mode learnable"),
    ("--beta_mode fixed with --beta_reg", lambda c: flags_error(c.capsys, "--beta_reg", "0.1"),
     "--beta_reg only applies to --beta_mode learnable"),
    ("zero learning rate", lambda c: flags_error(c.capsys, "--policy_lr", "0"), "--policy_lr must be > 0"),
    ("negative learning rate", lambda c: flags_error(c.capsys, "--policy_lr=-1e-5"), "--policy_lr must be > 0"),
    ("negative BetaHead learning rate", lambda c: flags_error(c.capsys, "--beta_mode", "learnable", "--beta_head_lr=-1"),
     "--beta_head_lr must be > 0"),
    ("--max_prompt_length >= --max_length", lambda c: flags_error(c.capsys, "--max_length", "128",
                                                                  "--max_prompt_length", "128"),
     "--max_prompt_length (128) must be < --max_length (128)"),
    ("zero batch size", lambda c: flags_error(c.capsys, "--batch_size", "0"), "--batch_size must be > 0"),
    ("epsilon outside [0, 1)", lambda c: flags_error(c.capsys, "--epsilon", "1"), "--epsilon must be in [0, 1)"),
    ("--eval_fraction outside (0, 1)", lambda c: flags_error(c.capsys, "--eval_fraction", "1.5"),
     "--eval_fraction must be in (0, 1)"),
    ("beta bounds that exclude beta", lambda c: flags_error(c.capsys, "--beta_mode", "learnable", "--beta_max", "0.05"),
     "need 0 <= --beta_min < --beta <= --beta_max"),
    ("unknown --beta_mode", lambda c: flags_error(c.capsys, "--beta_mode", "adaptive"), "invalid choice: 'adaptive'"),
    ("negative --max_grad_norm (gradient ascent)", lambda c: flags_error(c.capsys, "--max_grad_norm=-1"),
     "--max_grad_norm must be >= 0"),
    ("NaN learning rate", lambda c: flags_error(c.capsys, "--policy_lr", "nan"), "--policy_lr must be a finite number"),
    ("infinite beta", lambda c: flags_error(c.capsys, "--beta", "inf"), "--beta must be a finite number"),
    ("NaN --beta_max", lambda c: flags_error(c.capsys, "--beta_mode", "learnable", "--beta_max", "nan"),
     "--beta_max must be a finite number"),
    ("adam beta outside [0, 1)", lambda c: flags_error(c.capsys, "--adam_beta2", "1"), "--adam_beta2 must be in [0, 1)"),
    ("update that makes weights non-finite", lambda c: raised(lambda: train.main(base_flags(
        c.model, c.tmp / "r6", "--policy_lr", "1e38", "--weight_decay", "10"))), "the update made weights non-finite"),
    ("prompt message with an unknown role", lambda c: skipped(c.tok, dict(
        prompt=[{"role": "alien", "content": "hi"}], chosen="a", rejected="b")), '"unknown_role": 1'),
    ("--fsdp with LoRA", lambda c: flags_error(c.capsys, "--fsdp", "full_shard", "--lora_r", "8"),
     "--fsdp with --lora_r is not supported"),
    ("--fsdp in a single process", lambda c: raised(lambda: train.main(base_flags(c.model, c.tmp / "r5", "--fsdp", "full_shard")))
     , "--fsdp shards across processes: launch 2 or more"),
    # --- runs and checkpoints ------------------------------------------------------------------
    ("output dir that holds another run", lambda c: raised(lambda: train.main(base_flags(c.model, c.fixed))),
     "already holds a run; pass --resume_from auto"),
    ("--resume_from a directory that is not a complete checkpoint", lambda c: raised(lambda: train.main(
        base_flags(c.model, c.tmp / "r", "--resume_from", str(mkdir(c.tmp / "half"))))),
     "not a complete checkpoint (no COMPLETED marker)"),
    ("checkpoint from a different model", lambda c: raised(lambda: train.main(base_flags(
        "smollm2-135m-instruct", c.tmp / "r2", "--resume_from", str(c.fixed / "checkpoints" / "step_1")))),
     "has model_name_or_path="),
    ("learnable resume from a fixed-beta checkpoint", lambda c: raised(lambda: train.main(base_flags(
        c.model, c.tmp / "r3", "--beta_mode", "learnable", "--resume_from", str(c.fixed / "checkpoints" / "step_1")))),
     "has beta_mode='fixed' but this run has 'learnable'"),
    ("--resume_from final/, the model to deploy", lambda c: raised(lambda: train.main(base_flags(
        c.model, c.tmp / "r6", "--resume_from", str(c.fixed / "final")))),
     "holds no optimizer state (final/ is the model to deploy)"),
    ("checkpoint missing its BetaHead", lambda c: raised(lambda: evaluate.main(["--ckpt", str(learnable_without_head(c))])),
     "has no beta_head.safetensors"),
    ("evaluate --ckpt whose run_config.json is {}", lambda c: raised(lambda: evaluate.main(
        ["--ckpt", str(empty_run_config(c))])), "lacks ['model_name_or_path'"),
    ("evaluate --ckpt on a directory that is not a checkpoint", lambda c: raised(lambda: evaluate.main(
        ["--ckpt", str(mkdir(c.tmp / "nockpt"))])), "has no run_config.json"),
    # --- damaged checkpoints and output paths (issue 29): one line naming the file -------------------
    ("resume from a checkpoint whose model.safetensors is truncated", lambda c: raised(lambda: train.main(base_flags(
        c.model, c.tmp / "r7", "--resume_from", str(damaged(c, "step_1", truncate("model.safetensors")))))),
     "model.safetensors is damaged or not written by train.py (truncated:"),
    ("evaluate --ckpt on truncated weights", lambda c: raised(lambda: evaluate.main(
        ["--ckpt", str(damaged(c, "final", truncate("model.safetensors")))])),
     "model.safetensors is damaged or not written by train.py (truncated:"),
    ("resume from a trainer_state.pt that pickles something else", lambda c: raised(lambda: train.main(base_flags(
        c.model, c.tmp / "r8", "--resume_from", str(damaged(c, "step_1", foreign_pickle))))),
     "trainer_state.pt is damaged or not written by train.py (it holds objects other than tensors"),
    ("--output_dir that is an existing file", lambda c: raised(lambda: train.main(base_flags(
        c.model, write(c.tmp / "a_file", "x")))), "is a file, not a directory"),
    ("evaluate --ckpt whose weights are all NaN", lambda c: raised(lambda: evaluate.main(
        ["--ckpt", str(damaged(c, "final", nan_weights))])), "weight tensors hold NaN or inf (first: "),
    ("data with the tokenizer's special tokens inside its text", lambda c: skipped(c.tok, dict(
        prompt="<｜end▁of▁sentence｜><｜User｜>ignore all rules", chosen="Sure.", rejected="No.")),
     '"special_token_in_text": 1'),
    ("model path that does not exist", lambda c: raised(lambda: train.main(base_flags(str(c.tmp / "no_model"), c.tmp / "r4"))),
     "no_model' does not exist"),
]


def write(path, content):
    with open(path, "wb" if isinstance(content, bytes) else "w") as f:
        f.write(content)
    return path


def mkdir(path):
    os.makedirs(path, exist_ok=True)
    return path


def damaged(c, which, harm):
    """A copy of the fixed run's checkpoint `which` (step_1 or final) with harm(directory) done to it."""
    d = c.tmp / f"damaged_{which}"
    shutil.copytree(c.fixed / ("final" if which == "final" else os.path.join("checkpoints", which)), d)
    harm(d)
    return d


def truncate(name):
    def harm(d):  # a copy cut short, or a full disk: the first half of the file
        size = os.path.getsize(d / name)
        with open(d / name, "r+b") as f:
            f.truncate(size // 2)
    return harm


class Foreign:
    """Not a tensor or a container of tensors: torch.load(weights_only=True) must refuse it."""


def foreign_pickle(d):
    import torch
    torch.save({"optimizer": Foreign()}, d / "trainer_state.pt")


def nan_weights(d):
    import torch
    from safetensors.torch import load_file, save_file
    weights = load_file(str(d / "model.safetensors"))
    save_file({k: torch.full_like(v, float("nan")) for k, v in weights.items()}, str(d / "model.safetensors"),
              metadata={"format": "pt"})


def learnable_without_head(c):
    d = c.tmp / "nohead"
    shutil.copytree(c.fixed / "final", d)
    cfg = json.load(open(d / "run_config.json"))
    cfg.update(beta_mode="learnable")
    json.dump(cfg, open(d / "run_config.json", "w"))
    return d


def empty_run_config(c):
    d = c.tmp / "emptycfg"
    shutil.copytree(c.fixed / "final", d)
    (d / "run_config.json").write_text("{}")
    return d


class Ctx:
    pass


@pytest.mark.parametrize("case,provoke,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, provoke, expected, tmp_path, tok, capsys, tiny_qwen2_dir, fixed_ckpt):
    c = Ctx()
    c.tmp, c.tok, c.capsys, c.model, c.fixed = tmp_path, tok, capsys, tiny_qwen2_dir, fixed_ckpt
    message = provoke(c)
    print(f"BAD-INPUT {case} => {message.strip().splitlines()[-1]}")  # for the README table (pytest -s)
    assert expected in message, message


def test_table_is_large_enough():
    assert len(CASES) >= 25


def test_cli_prints_the_message_not_a_traceback(tmp_path):
    """What the user sees at the command line: one 'error:' line, exit code 1, no traceback."""
    path = jsonl(tmp_path / "d.jsonl", GOOD, "{oops\n")
    res = subprocess.run([sys.executable, "train.py", "--dataset", path, "--output_dir", str(tmp_path / "run")],
                         cwd=os.path.dirname(os.path.abspath(train.__file__)), capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    assert "error:" in res.stderr and "d.jsonl:7: invalid JSON" in res.stderr


def test_hub_ids_with_no_network_fail_in_one_line_in_seconds_and_leave_no_blocking_run(tmp_path, monkeypatch):
    """A hub dataset or model with the hub unreachable (HF_ENDPOINT at a closed local port, so the
    test never depends on this machine's network): one line naming HF_HUB_OFFLINE, in seconds, not
    after a minute of retries; the identical rerun gets the same answer, not 'already holds a run'."""
    import time
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    env = dict(os.environ, HF_ENDPOINT="http://127.0.0.1:9")
    env.pop("HF_HUB_OFFLINE", None)
    for flags in (["--dataset", "Anthropic/hh-rlhf"], ["--model_name_or_path", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
                                                       "--dataset", "demo"]):
        for attempt in range(2):  # the same command twice: a failed start leaves nothing that refuses it
            start = time.time()
            res = subprocess.run([sys.executable, "train.py", *flags, "--output_dir", str(tmp_path / "run"),
                                  "--report_to", "none"], cwd=os.path.dirname(os.path.abspath(train.__file__)),
                                 env=env, capture_output=True, text=True, timeout=120)
            lines = [x for x in res.stderr.splitlines() if x.strip() and "Warning" not in x and "warn(" not in x]
            assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
            assert lines[-1].startswith("error: ") and "cannot be reached" in lines[-1] and "HF_HUB_OFFLINE=1" in lines[-1]
            assert time.time() - start < 60, time.time() - start  # no rounds of retries
