"""
Evaluate a checkpoint on held-out preference pairs.

    python evaluate.py --ckpt runs/demo/final
    python evaluate.py --ckpt runs/hh/final --dataset Anthropic/hh-rlhf --dataset_data_dir harmless-base \
        --split test --max_examples 500
    accelerate launch --multi_gpu --num_processes 8 evaluate.py --ckpt runs/hh/final

Reloads the policy (and BetaHead, for learnable runs) from the checkpoint and the reference
from the run's starting model, then reports DPO loss, reward accuracy, rewards and margins
(with the fixed beta0 and with the beta the run used) and beta / PPL statistics. Prints a table
and writes eval.json and eval.md into the checkpoint directory.
By default the data are the run's own held-out split, rebuilt from its run_config.json.

    python evaluate.py --ckpt runs/demo/final --num_samples 8

also writes samples.md and samples.jsonl: the policy's and the reference's (the starting model's)
responses to the first 8 held-out prompts, greedy, with each pair's beta and margin.

    python evaluate.py --ckpt runs/demo/final --prompts my_prompts.jsonl

scores your own prompts instead (a .txt file of one prompt per line, or .json/.jsonl/.csv/.parquet
rows with a `prompt`, a string or chat messages): each prompt's beta, PPL, f(h) and token count,
sorted from the least trusted (lowest beta), in prompt_beta.md and prompt_beta.jsonl, with a
histogram in prompt_beta.png, all in the checkpoint directory.
"""

import argparse
import os
import sys

import torch

from beta_head import ppl_scale
from checkpoint import check_checkpoint, nonfinite_tensors, read_run_config
from data import BadRow, DataError, load_rows, load_splits
from model_loader import add_reference_cache, autocast_dtype, build_model, load_tokenizer, make_accelerator
from registry import BETA_MODES
from reporting import eval_metrics, run_eval, write_eval, write_samples
from tokenization import build_examples, check_plain_text, prompt_tokens, structure_tokens


def get_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint directory written by train.py (e.g. runs/NAME/final)")
    p.add_argument("--dataset", default=None, help="evaluate on this dataset instead of the run's held-out split "
                   "(file, save_to_disk dir, hub name or 'demo')")
    p.add_argument("--split", default="test", help="split of --dataset to use")
    p.add_argument("--dataset_config", default=None, help="hub dataset config name for --dataset")
    p.add_argument("--dataset_data_dir", default=None, help="hub dataset data_dir for --dataset")
    p.add_argument("--max_examples", type=int, default=0, help="use at most this many pairs (0 = all)")
    p.add_argument("--batch_size", type=int, default=8, help="pairs per forward per process")
    p.add_argument("--out_name", default="eval", help="write NAME.json and NAME.md into the checkpoint (default eval; "
                   "another name keeps train.py's own eval.json)")
    p.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16"],
                   help="default: the precision the run trained in (its --precision, 'auto' decided on this "
                        "machine), so the numbers match training's own evaluation")
    p.add_argument("--num_samples", type=int, default=0,
                   help="also write samples.md / samples.jsonl (NAME_samples.* with another --out_name): the policy's "
                        "and the reference's responses to this many held-out prompts, with their beta and margin (0 = off)")
    p.add_argument("--max_new_tokens", type=int, default=128, help="samples: the longest response, in tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="samples: 0 = greedy, else sample at this temperature")
    p.add_argument("--top_p", type=float, default=1.0, help="samples: nucleus sampling's probability mass (temperature > 0)")
    p.add_argument("--seed", type=int, default=0, help="samples: seed of the sampling (temperature > 0)")
    p.add_argument("--prompts", default=None,
                   help="score these prompts' beta instead of evaluating pairs: a .txt file (one prompt per line) or "
                        "rows with a 'prompt' (.json/.jsonl/.csv/.parquet); writes prompt_beta.md/.jsonl/.png")
    p.add_argument("--allow_nonfinite", action="store_true",
                   help="evaluate a checkpoint whose weights hold NaN or inf anyway (refused by default: such numbers "
                        "are not a result); eval.json then records nonfinite_tensors")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.max_examples < 0:
        p.error("--batch_size must be >= 1 and --max_examples >= 0")
    if args.num_samples < 0 or args.max_new_tokens < 1 or not args.temperature >= 0 or not 0 < args.top_p <= 1:
        p.error("need --num_samples >= 0, --max_new_tokens >= 1, --temperature >= 0 and 0 < --top_p <= 1")
    return args


def eval_examples(args, cfg: dict, tokenizer) -> tuple[list[dict], dict]:
    """The pairs to evaluate, tokenised as the run tokenised its own: by default the run's held-out
    split rebuilt exactly as train.py built it, else --dataset."""
    if args.dataset is None:
        rows = load_splits(cfg["dataset"], cfg["split"], cfg["eval_split"], cfg["eval_fraction"],
                           cfg["split_seed"], cfg["dataset_config"], cfg["dataset_data_dir"])[1]
        rows = rows[:cfg["max_eval_examples"] or None]
    else:
        rows = load_rows(args.dataset, args.split, args.dataset_config, args.dataset_data_dir)
    if args.max_examples:
        rows = rows[:args.max_examples]
    return build_examples(rows, tokenizer, cfg["max_length"], cfg["max_prompt_length"], not cfg["no_chat_template"],
                          name="eval data", think_prefill=cfg["think_prefill"])


def main(argv=None):
    args = get_args(argv)
    if not os.path.isdir(args.ckpt):
        raise DataError(f"--ckpt {args.ckpt} is not a directory; pass a checkpoint written by train.py "
                        "(runs/NAME/final or runs/NAME/checkpoints/step_N)")
    check_checkpoint(args.ckpt)  # a damaged file: one line naming it, before anything loads
    cfg = read_run_config(args.ckpt)
    precision = args.precision or cfg.get("precision", "auto")
    if precision == "auto" and not args.precision:  # recorded before train.py resolved it: the rule of then
        precision = "bf16" if torch.cuda.is_available() else "fp32"
    accelerator = make_accelerator(precision)
    tokenizer = load_tokenizer(args.ckpt)
    if args.prompts and not BETA_MODES[cfg["beta_mode"]].per_prompt:
        raise DataError(f"--prompts: a {cfg['beta_mode']} run sets beta from pairs of responses, not from a prompt "
                        "alone; learnable runs (and fixed ones, beta0 everywhere) have a beta per prompt")
    prompts = read_prompts(args.prompts, tokenizer, cfg) if args.prompts else None
    examples, report = eval_examples(args, cfg, tokenizer) if prompts is None else (None, None)
    model = build_model(cfg, accelerator.device, autocast_dtype(accelerator), ckpt=args.ckpt, training=False)
    bad, n_tensors = nonfinite_tensors(model)
    if bad and not args.allow_nonfinite:
        raise DataError(f"--ckpt {args.ckpt}: {len(bad)} of {n_tensors} weight tensors hold NaN or inf (first: {bad[0]}): "
                        "its numbers would not be a result; evaluate an earlier checkpoint, or pass --allow_nonfinite")
    if prompts is not None:
        model.drop_reference()  # beta needs the policy alone
        rows = prompt_betas(model.requires_grad_(False), prompts, args.batch_size, tokenizer.pad_token_id, accelerator)
        write_prompt_betas(args.ckpt, rows, cfg)
        return rows
    if cfg.get("precompute_ref"):  # the run's reference cache covers its held-out split: reuse it
        add_reference_cache(model, examples, cfg["ref_cache_dir"], args.batch_size, accelerator,
                            tokenizer.pad_token_id, cfg["model_name_or_path"], cfg["gguf_file"])
        model.drop_reference()
    mode = model.mode
    model.requires_grad_(False)  # evaluation: no gradient buffers in a multi-GPU (DDP) wrapper
    model = accelerator.prepare(model)

    stats = run_eval(model, examples, args.batch_size, accelerator, tokenizer.pad_token_id, progress=True)
    metrics = eval_metrics(stats, cfg["beta"], cfg["beta_min"], cfg["beta_max"], mode)
    if bad:  # --allow_nonfinite: said in eval.json and eval.md beside the numbers
        metrics["nonfinite_tensors"] = len(bad)
    if accelerator.is_main_process:
        write_eval(args.ckpt, stats, metrics, report, f"{len(examples)} held-out pairs (skipped {report['skipped']}), "
                   f"beta_mode={cfg['beta_mode']}, beta0={cfg['beta']}.", vars(args), examples, args.out_name)
        if args.num_samples:
            write_samples(args.ckpt, accelerator.unwrap_model(model), tokenizer, examples, stats, cfg, accelerator,
                          args.num_samples, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                          name="samples" if args.out_name == "eval" else args.out_name + "_samples")
    return metrics


def read_prompts(path: str, tokenizer, cfg: dict) -> list[dict]:
    """Prompts from a .txt file (one per line) or rows with a 'prompt', tokenised as the run
    tokenised its own (chat template, think prefill; cut to its last max_prompt_length tokens)
    -> [{row, prompt, ids, truncated}]."""
    if path.endswith(".txt"):
        with open(path, encoding="utf-8") as f:
            texts = [(i, line.rstrip("\n")) for i, line in enumerate(f) if line.strip()]
    else:
        texts = [(i, r.get("prompt") if isinstance(r, dict) else None) for i, r in enumerate(load_rows(path))]
        if any(t is None for _, t in texts):
            raise DataError(f"--prompts {path}: every row needs a 'prompt' (a string or chat messages); row "
                            f"{next(i for i, t in texts if t is None)} has none")
    if not texts:
        raise DataError(f"--prompts {path}: no prompts in it")
    markers, out = structure_tokens(tokenizer), []
    for i, prompt in texts:
        try:
            check_plain_text(prompt, "", "", markers)
        except BadRow as e:
            raise DataError(f"--prompts {path} row {i}: {e}") from None
        ids = prompt_tokens(tokenizer, prompt, not cfg["no_chat_template"], cfg["think_prefill"])[0]
        keep = cfg["max_prompt_length"]
        out.append(dict(row=i, prompt=prompt, ids=ids[-keep:], truncated=len(ids) > keep))
    return out


@torch.no_grad()
def prompt_betas(model, prompts: list[dict], batch_size: int, pad_token_id: int, accelerator) -> list[dict]:
    """Each prompt's beta (clamped as in training), its raw beta, the policy's PPL of it and f(h) =
    raw beta / (w * PPL term) (1 for a beta mode without a BetaHead), from one forward of the prompt
    alone (DynamicBetaDPOModel's compute_ppl / get_dynamic_beta path)."""
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        T = max(len(p["ids"]) for p in chunk)
        ids = torch.tensor([p["ids"] + [pad_token_id] * (T - len(p["ids"])) for p in chunk], device=accelerator.device)
        mask = torch.tensor([[1] * len(p["ids"]) + [0] * (T - len(p["ids"])) for p in chunk], device=accelerator.device)
        with accelerator.autocast():
            ppl, h = model.prompt_stats(ids, mask)
            beta, raw = model.beta_from(ppl, h)
        head = model.beta_head
        f = raw / (head.w * ppl_scale(ppl, head.ppl_transform)) if head is not None else torch.ones_like(raw)
        for p, b, r, q, x in zip(chunk, beta.tolist(), raw.tolist(), ppl.float().tolist(), f.tolist()):
            text = p["prompt"] if isinstance(p["prompt"], str) else p["prompt"][-1]["content"]
            out.append(dict(row=p["row"], beta=b, raw_beta=r, ppl=q, f=x, prompt_tokens=len(p["ids"]),
                            truncated=p["truncated"], prompt=text))
    return sorted(out, key=lambda r: (r["beta"], r["row"]))


def write_prompt_betas(ckpt: str, rows: list[dict], cfg: dict) -> None:
    """prompt_beta.jsonl (one row per prompt, lowest beta first), prompt_beta.md (the same as a table)
    and prompt_beta.png (beta's histogram) in the checkpoint directory."""
    import json
    with open(os.path.join(ckpt, "prompt_beta.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    short = lambda t: " ".join(t.split())[:80].replace("|", "\\|")  # noqa: E731
    lines = [f"# beta of {len(rows)} prompts (beta_mode={cfg['beta_mode']}, beta0={cfg['beta']}), lowest first\n",
             "| file row | beta | PPL | f(h) | prompt tokens | prompt (last turn, start) |", "| ---: | ---: | ---: | ---: | ---: | --- |"]
    lines += [f"| {r['row']} | {r['beta']:.4g} | {r['ppl']:.4g} | {r['f']:.4f} | {r['prompt_tokens']}"
              f"{' (cut)' if r['truncated'] else ''} | {short(r['prompt'])} |" for r in rows]
    with open(os.path.join(ckpt, "prompt_beta.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist([r["beta"] for r in rows], bins=min(40, max(5, len(rows) // 3)))
    ax.axvline(cfg["beta"], color="k", ls="--", label=f"beta0 = {cfg['beta']}")
    ax.set(xlabel="beta", ylabel="prompts", title=f"beta of {len(rows)} prompts")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(ckpt, "prompt_beta.png"), dpi=110)
    plt.close(fig)
    print("\n".join(lines[:13]) + (f"\n... ({len(rows) - 10} more)" if len(rows) > 10 else ""))
    print(f"wrote {ckpt}/prompt_beta.md, prompt_beta.jsonl and prompt_beta.png")


if __name__ == "__main__":
    try:
        main()
    except (DataError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
