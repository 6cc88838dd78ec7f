"""The lean paths: the reference log-prob cache (hit, miss, stale), LoRA with the reference as
the adapter-less policy (train, save, load with peft, merge), gradient checkpointing."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import evaluate
import train
from test_train import common

pytestmark = pytest.mark.slow  # whole trainings


def train_lines(run):
    return [json.loads(x) for x in open(run / "metrics.jsonl") if '"train"' in x]


def test_reference_cache_hit_miss_stale(tiny_qwen2_dir, tmp_path, capsys):
    cache = tmp_path / "cache"
    args = ["--max_steps", "2", "--log_every_steps", "1", "--precompute_ref", "--ref_cache_dir", str(cache),
            "--max_train_examples", "40"]
    plain = tmp_path / "plain"
    train.main(common(tiny_qwen2_dir, plain, "--max_steps", "2", "--log_every_steps", "1", "--max_train_examples", "40"))
    first = tmp_path / "first"
    train.main(common(tiny_qwen2_dir, first, *args))
    out = capsys.readouterr().out
    assert "reference cache written" in out and "cache hit" not in out
    assert len(os.listdir(cache)) == 2  # train and eval pairs
    # the cached reference gives the same training as the live one
    for a, b in zip(train_lines(plain), train_lines(first)):
        for k in ("loss", "rewards/margins", "logps/chosen"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), k  # other padding: float noise

    # hit: same model, data and tokenisation
    train.main(common(tiny_qwen2_dir, tmp_path / "second", *args))
    out = capsys.readouterr().out
    assert out.count("reference cache hit") == 2 and "written" not in out
    for a, b in zip(train_lines(first), train_lines(tmp_path / "second")):
        assert a["loss"] == b["loss"] and a["rewards/margins"] == b["rewards/margins"]

    # evaluate.py reuses the run's cache for its held-out pairs (hit), and computes the reference
    # itself for other pairs (miss); both agree with train.py's own final evaluation
    final = tmp_path / "second" / "final"
    from_train = json.load(open(final / "eval.json"))["metrics"]
    hit = evaluate.main(["--ckpt", str(final)])
    assert "reference cache hit" in capsys.readouterr().out
    miss = evaluate.main(["--ckpt", str(final), "--max_examples", "5"])
    assert "reference cache written" in capsys.readouterr().out and miss["pairs"] == 5
    for k in ("loss", "rewards/margins", "logratio/chosen"):
        assert hit[k] == pytest.approx(from_train[k], rel=1e-5, abs=1e-6), k

    # miss: other tokenisation settings make other token ids
    train.main(common(tiny_qwen2_dir, tmp_path / "third", *args, "--no_chat_template"))
    assert "reference cache hit" not in capsys.readouterr().out
    assert len(os.listdir(cache)) == 5  # + evaluate.py's 5-pair cache

    # stale: a damaged or foreign file under the right name is detected, never used
    victim = sorted(cache.iterdir())[0]
    cached = torch.load(victim, weights_only=True)
    cached["key"]["pairs"] = -1
    torch.save(cached, victim)
    for f in cache.iterdir():
        if f != victim:
            f.write_bytes(b"garbage")
    train.main(common(tiny_qwen2_dir, tmp_path / "fourth", *args))
    out = capsys.readouterr().out
    assert "cache hit" not in out and out.count("unusable") >= 2


def test_lora_train_save_load_merge_evaluate(tiny_qwen2_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    out = tmp_path / "lora"
    flags = ["--beta_mode", "learnable", "--lora_r", "4", "--lora_alpha", "8", "--max_steps", "4",
             "--save_every_steps", "2", "--merge_lora"]
    train.main(common(tiny_qwen2_dir, out, *flags))
    final = out / "final"
    assert (final / "adapter_config.json").exists() and (final / "adapter_model.safetensors").exists()
    assert not (final / "model.safetensors").exists()  # no full second copy
    adapters = load_file(str(final / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in adapters.items() if "lora_B" in k)  # it trained

    base = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir)
    peft_model = PeftModel.from_pretrained(base, str(final))
    merged = AutoModelForCausalLM.from_pretrained(str(final / "merged"))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.allclose(peft_model(ids).logits, merged(ids).logits, atol=1e-4)
        with peft_model.disable_adapter():
            assert torch.allclose(peft_model(ids).logits, base(ids).logits)

    metrics = evaluate.main(["--ckpt", str(final)])
    eval_line = [json.loads(x) for x in open(out / "metrics.jsonl") if '"eval"' in x][-1]
    assert metrics["loss"] == pytest.approx(eval_line["loss"], rel=1e-4)

    # resume a LoRA run from its step-2 checkpoint: same final adapters
    part = tmp_path / "part"
    os.makedirs(part / "checkpoints")
    import shutil
    shutil.copytree(out / "checkpoints" / "step_2", part / "checkpoints" / "step_2")
    train.main(common(tiny_qwen2_dir, part, *flags, "--resume_from", "auto"))
    resumed = load_file(str(part / "final" / "adapter_model.safetensors"))
    assert all(torch.equal(adapters[k], resumed[k]) for k in adapters)


def test_gradient_checkpointing_gives_the_same_step(tiny_qwen2_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train.main(common(tiny_qwen2_dir, a, "--max_steps", "2", "--log_every_steps", "1"))
    train.main(common(tiny_qwen2_dir, b, "--max_steps", "2", "--log_every_steps", "1", "--gradient_checkpointing"))
    for x, y in zip(train_lines(a), train_lines(b)):
        for k in ("loss", "grad_norm", "rewards/margins"):
            assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-7), k
