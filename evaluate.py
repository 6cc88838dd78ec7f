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
"""

import argparse
import os
import sys

import torch

from beta_head import eval_metrics, run_eval
from data import DataError, build_examples, load_rows, load_splits
from model_loader import (add_reference_cache, autocast_dtype, build_model, check_checkpoint, load_tokenizer,
                          make_accelerator, nonfinite_tensors, read_run_config, write_eval, write_samples)


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
    examples, report = eval_examples(args, cfg, tokenizer)
    model = build_model(cfg, accelerator.device, autocast_dtype(accelerator), ckpt=args.ckpt, training=False)
    bad, n_tensors = nonfinite_tensors(model)
    if bad and not args.allow_nonfinite:
        raise DataError(f"--ckpt {args.ckpt}: {len(bad)} of {n_tensors} weight tensors hold NaN or inf (first: {bad[0]}): "
                        "its numbers would not be a result; evaluate an earlier checkpoint, or pass --allow_nonfinite")
    if cfg.get("precompute_ref"):  # the run's reference cache covers its held-out split: reuse it
        add_reference_cache(model, examples, cfg["ref_cache_dir"], args.batch_size, accelerator,
                            tokenizer.pad_token_id, cfg["model_name_or_path"], cfg["gguf_file"])
        model.drop_reference()
    head = model.beta_head
    model.requires_grad_(False)  # evaluation: no gradient buffers in a multi-GPU (DDP) wrapper
    model = accelerator.prepare(model)

    stats = run_eval(model, examples, args.batch_size, accelerator, tokenizer.pad_token_id, progress=True)
    metrics = eval_metrics(stats, cfg["beta"], cfg["beta_min"], cfg["beta_max"], head)
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


if __name__ == "__main__":
    try:
        main()
    except (DataError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
