"""
What an evaluation reports: the evaluation pass over held-out pairs and its metrics, eval.json /
eval.md, the model card of final/, and samples (the policy's and the reference's responses to
held-out prompts). evaluate.py and the end of train.py both call these.
"""

import contextlib
import json
import os
import re

import torch
import torch.nn as nn
from accelerate import Accelerator
from tqdm import tqdm

from batching import collate, eval_batches
from beta_head import DynamicBetaDPOModel
from beta_mode import BetaMode
from losses import summarize
from model_loader import load_policy
from registry import BETA_MODES


# -----------------------------------------------------------------------------
# the evaluation pass and what it writes


@torch.no_grad()
def run_eval(model: nn.Module, examples: list[dict], batch_size: int, accelerator, pad_token_id: int,
             progress: bool = False) -> dict[str, torch.Tensor]:
    """Per-example stats (N,) of model.forward over examples, gathered from all processes, in order.
    model: a DynamicBetaDPOModel (or its DDP wrapper); accelerator: the run's accelerate.Accelerator."""
    was_training = model.training
    model.eval()
    parts = []
    batches = list(eval_batches(examples, batch_size, accelerator.num_processes, accelerator.process_index))
    for idx in tqdm(batches, desc="eval", disable=not (progress and accelerator.is_main_process)):
        batch = collate([examples[i] for i in idx], pad_token_id)
        _, stats = model(**{k: v.to(accelerator.device) for k, v in batch.items()})
        parts.append({k: accelerator.gather(v) for k, v in stats.items()})
    model.train(was_training)
    # each gathered batch is the global batch idx[s:s+G] in order; drop the tail padding
    return {k: torch.cat([p[k] for p in parts])[:len(examples)].cpu() for k in parts[0]}


def eval_metrics(stats: dict[str, torch.Tensor], beta0: float, beta_min: float, beta_max: float,
                 mode: BetaMode | None = None) -> dict[str, float]:
    """summarize() plus the drift of each response's log-ratio, the pair count and the beta mode's
    own metrics (learnable: w)."""
    metrics = summarize(stats, beta0, beta_min, beta_max)
    # KL(pi || ref) on the chosen responses is not observable from pairs; report the mean
    # log-ratio of both responses as a drift measure instead.
    metrics["logratio/chosen"] = float((stats["policy_chosen_logps"] - stats["reference_chosen_logps"]).mean())
    metrics["logratio/rejected"] = float((stats["policy_rejected_logps"] - stats["reference_rejected_logps"]).mean())
    metrics["pairs"] = len(stats["beta"])
    if mode is not None:
        metrics.update(mode.metrics(stats))
    return metrics


def write_eval(ckpt: str, stats: dict[str, torch.Tensor], metrics: dict[str, float], data_report: dict,
               title: str, args: dict, examples: list[dict], name: str = "eval") -> None:
    """NAME.json (metrics; per pair: beta, PPL, log-probs, its row in the data, its prompt tokens
    and whether the prompt was cut; data report; args) and NAME.md in ckpt."""
    md = f"# Evaluation of `{ckpt}`\n\n{title}\n\n" + markdown_table(metrics)
    print(md)
    per_pair = {k: [round(x, 6) for x in stats[k].tolist()] for k in ("beta", "ppl", "policy_chosen_logps",
                "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps")}
    per_pair.update(row=[e["row"] for e in examples], prompt_tokens=[len(e["prompt_ids"]) for e in examples],
                    prompt_truncated=[e["prompt_truncated"] for e in examples])
    with open(os.path.join(ckpt, name + ".json"), "w") as f:
        json.dump(dict(metrics=metrics, data_report=data_report, args=args, per_pair=per_pair), f, indent=2)
    with open(os.path.join(ckpt, name + ".md"), "w") as f:
        f.write(md)
    print(f"wrote {os.path.join(ckpt, name + '.json')} and {name}.md")


def model_card(config: dict, metrics: dict[str, float], data_report: dict, command: str) -> str:
    """final/README.md in the Hugging Face convention: metadata, what the model is, how it was
    trained, its held-out metrics and the command that made it."""
    mode = BETA_MODES[config["beta_mode"]].describe(config) if config["beta_mode"] in BETA_MODES else config["beta_mode"]
    keys = ("loss", "loss_beta0", "rewards/accuracies", "rewards_beta0/margins", "beta/mean", "beta/std", "pairs")
    rows = "\n".join(f"| {k} | {metrics[k]:.4g} |" for k in keys if k in metrics)
    base = config["model_name_or_path"]
    lora = " (LoRA adapters)" if config.get("lora_r") else ""
    if config.get("lora_r"):
        load = ("LoRA adapters on the base model: `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), "
                "\"<this directory>\")` (needs `pip install peft`; without it transformers cannot read this directory)"
                + ("; `merged/` holds the policy with its adapters merged, a plain model for "
                   "`AutoModelForCausalLM.from_pretrained(\"<this directory>/merged\")`" if config.get("merge_lora") else
                   "; `--merge_lora` writes a merged plain model to `merged/`"))
    else:
        load = "`AutoModelForCausalLM.from_pretrained(\"<this directory>\")`"
    segments = "".join(f"\n- from step {h['from_step']}: `{h['command']}`" + (f" (changed: {h['changed']})" if h["changed"] else "")
                       for h in config.get("history") or [])
    history = f"\n\nIt was trained in segments, each resumed from the last one's checkpoint:{segments}" if segments else ""
    local = os.path.isabs(base) or os.path.exists(base)  # a local path says nothing on the hub
    return f"""---
{'' if local else f'base_model: {base}{chr(10)}'}library_name: {'peft' if config.get('lora_r') else 'transformers'}
tags:
- dpo
- learnable-beta-dpo
- {config['beta_mode']}
---

# {config.get('run_name') or 'DPO policy'}

A preference-tuned version of `{config['model_name_or_path']}`{lora}, trained with {mode}, on the
preference pairs of `{config['dataset']}` ({config.get('max_length')} tokens at most per prompt + response).

## Held-out evaluation

{metrics.get('pairs', '?')} held-out pairs ({data_report.get('skipped') or 'none'} skipped); rewards_beta0 and loss_beta0 use
the fixed beta0 = {config['beta']}, so runs with different beta modes compare.

| metric | value |
| --- | --- |
{rows}

## How it was made

```bash
{command}
```{history}

`run_config.json` holds every flag (and, for a resumed run, each segment's changes under `history`),
`eval.json` the per-pair evaluation; the BetaHead (learnable beta) is in `beta_head.safetensors`.
Load the policy: {load}.
"""


def markdown_table(metrics: dict[str, float]) -> str:
    rows = ["| metric | value |", "| --- | --- |"]
    rows += [f"| {k} | {v:.4g} |" for k, v in metrics.items()]
    return "\n".join(rows) + "\n"


# -----------------------------------------------------------------------------
# samples: what the policy and its reference answer to held-out prompts


def next_token(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from fp32 logits (B, V): the argmax at temperature 0, else a draw from
    softmax(logits / temperature) restricted to the top_p nucleus (the most probable tokens whose
    probabilities first sum to >= top_p)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        sorted_probs[sorted_probs.cumsum(-1) - sorted_probs >= top_p] = 0.0  # the nucleus was full before them
        return order.gather(-1, torch.multinomial(sorted_probs, 1, generator=generator)).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_batch(model: torch.nn.Module, prompts: list[list[int]], eos_token_id: int, pad_token_id: int,
                   max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                   generator: torch.Generator | None = None) -> list[list[int]]:
    """Responses (token ids) of a causal LM to one batch of prompts (token ids), a token at a time
    with a KV cache; each ends with its first eos (kept) or after max_new_tokens.

    The prompts are left-padded to (B, T), so every row's next token is read from the last column;
    padding is masked and position ids count real tokens only, so a row gets the tokens it would
    get alone. Only the last position's logits (B, V) are computed at each step.
    """
    device = next(model.parameters()).device
    B, T = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_token_id] * (T - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts], device=device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    was_training = model.training
    model.eval()
    cache, steps = None, []
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        ids = next_token(out.logits[:, -1].float(), temperature, top_p, generator)  # (B,)
        steps.append(ids)
        done |= ids == eos_token_id
        if done.all():
            break
        input_ids, position_ids = ids[:, None], position_ids[:, -1:] + 1
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
    model.train(was_training)
    rows = torch.stack(steps, dim=1).tolist()  # (B, steps): a finished row ran on past its eos, cut there
    return [r[:r.index(eos_token_id) + 1] if eos_token_id in r else r for r in rows]


def generate(model: torch.nn.Module, prompts: list[list[int]], eos_token_id: int, pad_token_id: int,
             batch_size: int = 8, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, desc: str = "generate") -> list[list[int]]:
    """generate_batch over prompts in batches of batch_size, with a progress bar. Sampling
    (temperature > 0) draws from a generator seeded with `seed`: the same seed gives the same
    responses, and the global RNG is left alone. The caller sets the precision (autocast)."""
    generator = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    out = []
    for s in tqdm(range(0, len(prompts), batch_size), desc=desc):
        out += generate_batch(model, prompts[s:s + batch_size], eos_token_id, pad_token_id, max_new_tokens,
                              temperature, top_p, generator)
    return out


@contextlib.contextmanager
def reference_for_generation(model: DynamicBetaDPOModel, cfg: dict, device: torch.device):
    """(causal LM, what it is): the run's starting model, to generate the reference's responses. The
    frozen reference when it is in memory; for LoRA the policy with its adapters disabled; after
    --precompute_ref dropped the reference, the starting model (cfg's) loaded again for the
    duration (the evaluation itself ran on cached log-probs)."""
    if model.reference_model is not None or hasattr(model.policy_model, "disable_adapter"):
        with model.as_reference() as reference:
            yield reference, ("the starting model (the run's frozen reference)" if model.reference_model is not None
                              else "the starting model (the policy with its LoRA adapters disabled)")
    else:
        base = load_policy(cfg["model_name_or_path"], cfg["gguf_file"], cfg["trust_remote_code"]).to(device)
        yield base, f"the starting model {cfg['model_name_or_path']}, loaded again (--precompute_ref had dropped it)"


def write_samples(ckpt: str, model: DynamicBetaDPOModel, tokenizer, examples: list[dict],
                  stats: dict[str, torch.Tensor], cfg: dict, accelerator: Accelerator, num_samples: int,
                  batch_size: int = 8, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                  seed: int = 0, name: str = "samples") -> list[dict]:
    """NAME.jsonl and NAME.md in ckpt: the policy's and the reference's responses to the first
    num_samples held-out prompts (all of them when there are fewer), with each pair's beta and
    margin. Returns the records written.

    examples: the held-out pairs; their prompt_ids are the prompts, the chat template exactly as
        training rendered it (tokenization.tokenize_pair), truncation included.
    stats: run_eval's per-pair stats (N,) of the same examples, in order: beta, and the margin
        beta * (log-ratio chosen - log-ratio rejected), the pair's rewards/margins.
    A response is decoded raw, special tokens skipped (a <think> block stays as written). Runs on
    the calling process alone (the main one), so not with a sharded (--fsdp) policy.
    """
    if num_samples > len(examples):
        print(f"--num_samples {num_samples} is more than the {len(examples)} held-out pairs: samples for all of them")
    prompts = [e["prompt_ids"] for e in examples[:num_samples]]
    kwargs = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, batch_size=batch_size,
                  max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    with accelerator.autocast():  # the run's precision
        policy = generate(model.policy_model, prompts, desc="samples: policy", **kwargs)
        with reference_for_generation(model, cfg, accelerator.device) as (reference_model, reference_name):
            reference = generate(reference_model, prompts, desc="samples: reference", **kwargs)
    margins = stats["chosen_rewards"] - stats["rejected_rewards"]
    records = [dict(pair=i, prompt=tokenizer.decode(p), policy=tokenizer.decode(a, skip_special_tokens=True),
                    reference=tokenizer.decode(b, skip_special_tokens=True), beta=round(float(stats["beta"][i]), 6),
                    margin=round(float(margins[i]), 6))
               for i, (p, a, b) in enumerate(zip(prompts, policy, reference))]
    with open(os.path.join(ckpt, name + ".jsonl"), "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    how = "greedy" if temperature == 0 else f"sampled (temperature {temperature}, top_p {top_p}, seed {seed})"
    md = [f"# Samples from `{ckpt}`", "",
          f"{len(records)} held-out prompts, {how}, at most {max_new_tokens} new tokens. Policy: the checkpoint; "
          f"reference: {reference_name}. Prompts as the model saw them (chat template included), responses raw "
          "(special tokens skipped). beta and margin (beta times the log-ratio margin, the pair's rewards/margins) "
          "are the pair's in this checkpoint's evaluation.", ""]
    for r in records:
        md += [f"## Pair {r['pair']}: beta {r['beta']:.4g}, margin {r['margin']:.4g}", ""]
        for title, key in (("Prompt", "prompt"), ("Policy", "policy"), ("Reference", "reference")):
            md += [f"**{title}**", "", fenced(r[key]), ""]
    with open(os.path.join(ckpt, name + ".md"), "w") as f:
        f.write("\n".join(md))
    print(f"wrote {os.path.join(ckpt, name + '.md')} and {name}.jsonl ({len(records)} prompts)")
    return records


def fenced(text: str) -> str:
    """text as a markdown code block, fenced with more backticks than any run of them inside it."""
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", text)), default=0))
    return f"{fence}text\n{text}\n{fence}"
