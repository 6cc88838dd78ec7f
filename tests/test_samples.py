"""Samples: batched generation equals a token-by-token greedy loop, stops at eos and samples
reproducibly; samples.md / samples.jsonl hold the policy's and the reference's responses with each
pair's beta and margin, for a model with its reference, after --precompute_ref dropped it, and for
LoRA checkpoints, from train.py and evaluate.py alike."""

import json
import math

import pytest
import torch

import evaluate
import train
from reporting import run_eval
from data import make_demo_pairs
from tokenization import build_examples
from model_loader import build_model, load_policy, load_tokenizer, make_accelerator
from reporting import generate, next_token, write_samples
from test_train import common


@pytest.fixture(scope="module")
def tiny(tiny_qwen2_dir):
    """(model dir, tokenizer, policy, 6 held-out prompts as training renders them)."""
    tokenizer = load_tokenizer(tiny_qwen2_dir)
    examples, _ = build_examples(make_demo_pairs("test")[:6], tokenizer, 64, 40)
    return tiny_qwen2_dir, tokenizer, load_policy(tiny_qwen2_dir), [e["prompt_ids"] for e in examples]


def greedy_loop(model, prompt: list[int], eos_token_id: int, max_new_tokens: int) -> list[int]:
    """The reference implementation: the whole sequence through the model at every step, argmax."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            t = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(t)
            out.append(t)
            if t == eos_token_id:
                break
    return out


def test_batched_greedy_generation_equals_a_token_by_token_loop(tiny):
    _, tok, model, prompts = tiny
    assert len({len(p) for p in prompts}) > 2  # left padding really pads
    assert tok.decode(prompts[0]).endswith("<｜Assistant｜><think>\n")  # the generation prompt, as in training
    expected = [greedy_loop(model, p, tok.eos_token_id, 10) for p in prompts]
    for batch_size in (6, 4, 1):  # one padded batch, a split, no padding at all
        got = generate(model, prompts, tok.eos_token_id, tok.pad_token_id, batch_size=batch_size, max_new_tokens=10)
        assert got == expected, batch_size
    assert model.training  # left as it was


def test_generation_stops_at_the_first_eos(tiny):
    _, tok, model, prompts = tiny
    free = generate(model, prompts, tok.eos_token_id, tok.pad_token_id, max_new_tokens=10)
    stop = free[0][3]  # pretend this token is eos: every row must end at its first occurrence, kept
    got = generate(model, prompts, stop, tok.pad_token_id, max_new_tokens=10)
    assert got == [r[:r.index(stop) + 1] if stop in r else r for r in free]
    assert len(got[0]) <= 4 and got[0][-1] == stop


def test_sampling_is_seeded_and_top_p_narrows_it(tiny):
    _, tok, model, prompts = tiny
    rng = torch.get_rng_state()
    kw = dict(max_new_tokens=6, temperature=1.0, top_p=0.9)
    a = generate(model, prompts, tok.eos_token_id, tok.pad_token_id, seed=3, **kw)
    assert a == generate(model, prompts, tok.eos_token_id, tok.pad_token_id, seed=3, **kw)
    assert a != generate(model, prompts, tok.eos_token_id, tok.pad_token_id, seed=4, **kw)
    assert torch.equal(rng, torch.get_rng_state())  # the global RNG is left alone
    logits = torch.randn(5, 100)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(next_token(logits, 1.0, 1e-6, g), logits.argmax(-1))  # a nucleus of one token
    assert torch.equal(next_token(logits), logits.argmax(-1))


def test_write_samples_with_the_reference_in_memory_and_dropped(tiny, tmp_path, capsys):
    model_dir, tok, _, _ = tiny
    cfg = dict(model_name_or_path=model_dir, gguf_file=None, trust_remote_code=False, beta_mode="fixed", beta=0.1,
               beta_min=0.0, beta_max=math.inf)
    accelerator = make_accelerator("fp32")
    model = build_model(cfg, accelerator.device, None, training=False)
    with torch.no_grad():  # a policy that answers differently from its reference
        model.policy_model.lm_head.weight.add_(0.05 * torch.randn_like(model.policy_model.lm_head.weight))
    examples, _ = build_examples(make_demo_pairs("test")[:8], tok, 64, 40)
    stats = run_eval(model, examples, 4, accelerator, tok.pad_token_id)

    records = write_samples(str(tmp_path), model, tok, examples, stats, cfg, accelerator, 3, max_new_tokens=6)
    lines = [json.loads(x) for x in open(tmp_path / "samples.jsonl")]
    assert lines == records and len(lines) == 3
    prompts = [e["prompt_ids"] for e in examples[:3]]
    policy = generate(model.policy_model, prompts, tok.eos_token_id, tok.pad_token_id, max_new_tokens=6)
    reference = generate(model.reference_model, prompts, tok.eos_token_id, tok.pad_token_id, max_new_tokens=6)
    margins = stats["chosen_rewards"] - stats["rejected_rewards"]
    for i, r in enumerate(lines):
        assert set(r) == {"pair", "prompt", "policy", "reference", "beta", "margin"} and r["pair"] == i
        assert r["prompt"] == tok.decode(prompts[i])
        assert r["policy"] == tok.decode(policy[i], skip_special_tokens=True)
        assert r["reference"] == tok.decode(reference[i], skip_special_tokens=True)
        assert r["beta"] == pytest.approx(float(stats["beta"][i]), abs=1e-6)
        assert r["margin"] == pytest.approx(float(margins[i]), abs=1e-6)
    assert any(r["policy"] != r["reference"] for r in lines)
    md = (tmp_path / "samples.md").read_text()
    assert md.count("## Pair ") == 3 and md.count("**Policy**") == 3 and md.count("**Reference**") == 3
    assert "frozen reference" in md and "greedy" in md

    # --precompute_ref dropped the reference: the starting model is loaded again, same responses;
    # more samples than pairs: all of them, said in one line
    model.drop_reference()
    capsys.readouterr()
    again = write_samples(str(tmp_path), model, tok, examples, stats, cfg, accelerator, 100, max_new_tokens=6,
                          name="again")
    assert "--num_samples 100 is more than the 8 held-out pairs" in capsys.readouterr().out
    assert len(again) == 8 and len(open(tmp_path / "again.jsonl").readlines()) == 8
    assert again[:3] == records
    assert "loaded again" in (tmp_path / "again.md").read_text()


def test_flags(tiny_qwen2_dir):
    with pytest.raises(SystemExit):
        train.get_args(common(tiny_qwen2_dir, "x", "--fsdp", "full_shard", "--num_samples", "2"))
    with pytest.raises(SystemExit):
        train.get_args(common(tiny_qwen2_dir, "x", "--num_samples", "-1"))
    for bad in (["--num_samples", "-1"], ["--max_new_tokens", "0"], ["--temperature", "-1"], ["--top_p", "0"]):
        with pytest.raises(SystemExit):
            evaluate.get_args(["--ckpt", "x", *bad])


@pytest.mark.slow  # two short trainings
def test_train_and_evaluate_write_the_same_samples_lora_and_precompute_ref(tiny_qwen2_dir, tmp_path, capsys):
    def read(path):
        return [json.loads(x) for x in open(path)]

    # LoRA: the reference is the policy with its adapters disabled
    out = tmp_path / "lora"
    train.main(common(tiny_qwen2_dir, out, "--beta_mode", "learnable", "--lora_r", "4", "--lora_alpha", "8",
                      "--max_steps", "1", "--num_samples", "3"))
    final = out / "final"
    from_train = read(final / "samples.jsonl")
    assert len(from_train) == 3 and "adapters disabled" in (final / "samples.md").read_text()
    capsys.readouterr()
    evaluate.main(["--ckpt", str(final), "--num_samples", "20", "--out_name", "again"])
    assert "--num_samples 20 is more than the 8 held-out pairs" in capsys.readouterr().out
    from_eval = read(final / "again_samples.jsonl")
    assert len(from_eval) == 8 and (final / "again_samples.md").exists()
    betas = json.load(open(final / "again.json"))["per_pair"]["beta"]
    assert [r["beta"] for r in from_eval] == pytest.approx(betas, abs=1e-6)
    for a, b in zip(from_train, from_eval):  # greedy: the same responses from both scripts
        assert (a["prompt"], a["policy"], a["reference"]) == (b["prompt"], b["policy"], b["reference"])
        assert a["beta"] == pytest.approx(b["beta"], rel=1e-4) and a["margin"] == pytest.approx(b["margin"], rel=1e-3, abs=1e-5)

    # --precompute_ref: no reference in memory after evaluation, the starting model is loaded for generation
    out = tmp_path / "cached"
    train.main(common(tiny_qwen2_dir, out, "--max_steps", "1", "--precompute_ref", "--ref_cache_dir",
                      str(tmp_path / "cache"), "--num_samples", "2"))
    final = out / "final"
    assert "loaded again" in (final / "samples.md").read_text()
    evaluate.main(["--ckpt", str(final), "--num_samples", "2", "--out_name", "again"])
    for a, b in zip(read(final / "samples.jsonl"), read(final / "again_samples.jsonl")):
        assert (a["prompt"], a["policy"], a["reference"]) == (b["prompt"], b["policy"], b["reference"])
