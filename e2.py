"""E2, the DPO paper's controlled sentiment experiment: its prompts, the gold reward (VADER), exact
samples from a policy and their log-probs, a policy's score (mean gold reward and KL to the
reference), and the training pairs (best vs worst of the reference's samples)."""

import json
import math

import torch
from tqdm import tqdm

from logprobs import sequence_logps
from batching import collate
from model_loader import load_policy, load_tokenizer
from result_files import write_text


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
