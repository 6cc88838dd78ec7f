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
"""

import argparse
import json
import os
import sys

import torch
from accelerate import Accelerator
from tqdm import tqdm

from beta_head import BetaDPO, BetaHead, DynamicBetaDPOModel, summarize
from data import DataError, build_examples, collate, eval_batches, load_rows, load_splits
from model_loader import (autocast_dtype, frozen_copy, is_lora_checkpoint, load_policy, load_tokenizer,
                          make_accelerator)


@torch.no_grad()
def run_eval(model, examples: list[dict], batch_size: int, accelerator: Accelerator, pad_token_id: int,
             progress: bool = False) -> dict[str, torch.Tensor]:
    """Per-example stats of model.forward over examples, gathered from all processes, in order."""
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
                 head: BetaHead | None = None) -> dict[str, float]:
    """summarize() plus the drift of each response's log-ratio, the pair count and w."""
    metrics = summarize(stats, beta0, beta_min, beta_max)
    # KL(pi || ref) on the chosen responses is not observable from pairs; report the mean
    # log-ratio of both responses as a drift measure instead.
    metrics["logratio/chosen"] = float((stats["policy_chosen_logps"] - stats["reference_chosen_logps"]).mean())
    metrics["logratio/rejected"] = float((stats["policy_rejected_logps"] - stats["reference_rejected_logps"]).mean())
    metrics["pairs"] = len(stats["beta"])
    if head is not None:
        metrics["beta_head/w"] = head.w.item()
    return metrics


def write_eval(ckpt: str, stats: dict[str, torch.Tensor], metrics: dict[str, float], data_report: dict,
               title: str, args: dict) -> None:
    """eval.json (metrics, per-pair beta / PPL / log-probs, data report, args) and eval.md in ckpt."""
    md = f"# Evaluation of `{ckpt}`\n\n{title}\n\n" + markdown_table(metrics)
    print(md)
    per_pair = {k: [round(x, 6) for x in stats[k].tolist()] for k in ("beta", "ppl", "policy_chosen_logps",
                "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps")}
    with open(os.path.join(ckpt, "eval.json"), "w") as f:
        json.dump(dict(metrics=metrics, data_report=data_report, args=args, per_pair=per_pair), f, indent=2)
    with open(os.path.join(ckpt, "eval.md"), "w") as f:
        f.write(md)
    print(f"wrote {os.path.join(ckpt, 'eval.json')} and eval.md")


def markdown_table(metrics: dict[str, float]) -> str:
    rows = ["| metric | value |", "| --- | --- |"]
    rows += [f"| {k} | {v:.4g} |" for k, v in metrics.items()]
    return "\n".join(rows) + "\n"


# what evaluate.py reads from a checkpoint's run_config.json
RUN_CONFIG_KEYS = ("model_name_or_path", "gguf_file", "trust_remote_code", "dataset", "split", "eval_split",
                   "eval_fraction", "split_seed", "dataset_config", "dataset_data_dir", "max_eval_examples",
                   "max_length", "max_prompt_length", "no_chat_template", "beta_mode", "beta", "beta_min", "beta_max")


def read_run_config(ckpt: str) -> dict:
    """The flags of the run that wrote checkpoint `ckpt`; DataError when they are missing or damaged."""
    path = os.path.join(ckpt, "run_config.json")
    if not os.path.exists(path):
        raise DataError(f"{ckpt} has no run_config.json; pass a checkpoint directory written by train.py "
                        "(runs/NAME/final or runs/NAME/checkpoints/step_N)")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); the checkpoint is damaged") from None
    missing = [k for k in RUN_CONFIG_KEYS if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise DataError(f"{path} lacks {missing}: not written by train.py, or damaged; restore it from the "
                        "run's config.json")
    return cfg


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint directory written by train.py (e.g. runs/NAME/final)")
    p.add_argument("--dataset", default=None, help="evaluate on this dataset instead of the run's held-out split "
                   "(file, save_to_disk dir, hub name or 'demo')")
    p.add_argument("--split", default="test", help="split of --dataset to use")
    p.add_argument("--dataset_config", default=None, help="hub dataset config name for --dataset")
    p.add_argument("--dataset_data_dir", default=None, help="hub dataset data_dir for --dataset")
    p.add_argument("--max_examples", type=int, default=0, help="use at most this many pairs (0 = all)")
    p.add_argument("--batch_size", type=int, default=8, help="pairs per forward per process")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto = bf16 autocast on CUDA, fp32 on CPU")
    args = p.parse_args(argv)

    if args.batch_size < 1 or args.max_examples < 0:
        p.error("--batch_size must be >= 1 and --max_examples >= 0")
    cfg = read_run_config(args.ckpt)

    accelerator = make_accelerator(args.precision)
    tokenizer = load_tokenizer(args.ckpt)
    if args.dataset is None:  # the run's own held-out data, rebuilt exactly as train.py did
        rows = load_splits(cfg["dataset"], cfg["split"], cfg["eval_split"], cfg["eval_fraction"],
                           cfg["split_seed"], cfg["dataset_config"], cfg["dataset_data_dir"])[1]
        rows = rows[:cfg["max_eval_examples"] or None]
    else:
        rows = load_rows(args.dataset, args.split, args.dataset_config, args.dataset_data_dir)
    if args.max_examples:
        rows = rows[:args.max_examples]
    examples, report = build_examples(rows, tokenizer, cfg["max_length"], cfg["max_prompt_length"],
                                      not cfg["no_chat_template"], name="eval data",
                                      think_prefill=cfg.get("think_prefill", "close"))

    base = load_policy(cfg["model_name_or_path"], cfg["gguf_file"], cfg["trust_remote_code"])
    if is_lora_checkpoint(args.ckpt):  # reference = the same model with its adapters disabled
        from peft import PeftModel
        policy, reference = PeftModel.from_pretrained(base, args.ckpt), None
    else:
        policy, reference = load_policy(args.ckpt), frozen_copy(base, autocast_dtype(accelerator)).to(accelerator.device)
    head = BetaHead.from_pretrained(args.ckpt) if cfg["beta_mode"] == "learnable" else None
    beta_dpo = BetaDPO.from_pretrained(args.ckpt) if cfg["beta_mode"] == "beta_dpo" else None  # its M0
    model = DynamicBetaDPOModel(policy, head, reference, beta=cfg["beta"], beta_min=cfg["beta_min"],
                                beta_max=cfg["beta_max"], beta_dpo=beta_dpo,
                                share_prompt=not cfg.get("no_prompt_sharing", False))
    if cfg.get("precompute_ref"):  # the run's reference cache covers its held-out split: reuse it
        from train import add_reference_cache  # here, not at the top: train imports this module
        model.policy_model.to(accelerator.device)  # a LoRA policy is its own reference
        add_reference_cache(model, examples, argparse.Namespace(**{**cfg, "eval_batch_size": args.batch_size}),
                            accelerator, tokenizer.pad_token_id)
        model.__dict__["reference_model"] = None
    model = accelerator.prepare(model)

    stats = run_eval(model, examples, args.batch_size, accelerator, tokenizer.pad_token_id, progress=True)
    metrics = eval_metrics(stats, cfg["beta"], cfg["beta_min"], cfg["beta_max"], head)
    if accelerator.is_main_process:
        write_eval(args.ckpt, stats, metrics, report, f"{len(examples)} held-out pairs (skipped {report['skipped']}), "
                   f"beta_mode={cfg['beta_mode']}, beta0={cfg['beta']}.", vars(args))
    return metrics


if __name__ == "__main__":
    try:
        main()
    except (DataError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
