"""
Checkpoints: the directory protocol (written to a .tmp directory, fsynced, renamed into place, a
COMPLETED marker last), the trainer state and RNG, the run config, checks that a checkpoint reads
back whole, pruning, and the rules for resuming a run from one.

A checkpoint directory (runs/NAME/checkpoints/step_N, runs/NAME/final) holds
  the policy        HF model (model.safetensors, config.json), or LoRA adapters (adapter_*)
  the tokenizer     its files, as the run used it
  the beta state    what the run's beta mode saves (BetaMode.save_pretrained): beta_head.safetensors
                    (learnable), beta_dpo.json (beta_dpo), epsilon_dpo.json (epsilon_dpo), nothing (fixed)
  TRAINER_STATE     optimizer, step, examples_seen, skipped_steps, num_processes, RNG states
                    (step checkpoints only: final/ is the model to deploy, without it)
  RUN_CONFIG        the run's flags
  COMPLETED         written last: a directory without it is never read
save_checkpoint writes one; model_loader.build_model(cfg, ..., ckpt=path) loads its model parts and
load_trainer_state the rest.
"""

import json
import os
import random
import shutil

import torch

from data import DataError
from registry import BETA_MODES

TRAINER_STATE, RUN_CONFIG, COMPLETED = "trainer_state.pt", "run_config.json", "COMPLETED"


def save_checkpoint(path: str, model, tokenizer, config: dict, trainer_state: dict | None,
                    policy_state: dict | None = None, extra_files: dict[str, str] | None = None) -> None:
    """Write a complete checkpoint at `path` atomically: everything goes to path.tmp, is fsynced,
    and is renamed into place with a COMPLETED marker; an old `path` is replaced only then.
    trainer_state: optimizer state dict and counters (the RNG states are added here); None for a
    model to deploy (final/), which then holds no optimizer state.
    extra_files: file name -> text, written inside the checkpoint too (the model card).
    policy_state: the policy's gathered weights when they are sharded (--fsdp)."""
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        # a copy: save_pretrained drops entries from the dict it is given
        model.policy_model.save_pretrained(tmp, safe_serialization=True,
                                           state_dict=None if policy_state is None else dict(policy_state))
        tokenizer.save_pretrained(tmp)
        model.mode.save_pretrained(tmp)  # the beta mode's state: a BetaHead, running statistics
        if trainer_state is not None:
            rng = dict(python=random.getstate(), torch=torch.get_rng_state(),
                       cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])
            torch.save(dict(trainer_state, rng=rng), os.path.join(tmp, TRAINER_STATE))
        for name, text in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
        with open(os.path.join(tmp, RUN_CONFIG), "w") as f:
            json.dump(config, f, indent=2)
        open(os.path.join(tmp, COMPLETED), "w").close()
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


def load_trainer_state(path: str) -> dict:
    """The optimizer state and counters save_checkpoint wrote; restores the RNG states it saved."""
    # on the CPU: the optimizer's load_state_dict moves each state to its parameter's device (saved from
    # cuda:0, it would otherwise land on cuda:0 in every process of a multi-GPU resume)
    state = torch.load(os.path.join(path, TRAINER_STATE), weights_only=True, map_location="cpu")
    random.setstate(state["rng"]["python"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state


# what evaluate.py and a resumed run read from a checkpoint's run_config.json
RUN_CONFIG_KEYS = ("model_name_or_path", "gguf_file", "trust_remote_code", "dataset", "split", "eval_split",
                   "eval_fraction", "split_seed", "dataset_config", "dataset_data_dir", "max_eval_examples",
                   "max_length", "max_prompt_length", "no_chat_template", "beta_mode", "beta", "beta_min", "beta_max")


def check_checkpoint(path: str) -> None:
    """Read back what a resume or evaluate.py will load from checkpoint `path` — every .safetensors
    file's header against its size, every .json file, the trainer state's pickle (tensors stay on
    disk: mmap) — and raise DataError naming the first damaged or foreign file, what is wrong and
    what to do. Nothing is loaded into the model here and nothing is deleted."""
    for name in sorted(os.listdir(path)):
        file = os.path.join(path, name)
        try:
            if name.endswith(".safetensors"):
                check_safetensors(file)
            elif name.endswith(".json"):
                with open(file, encoding="utf-8") as f:
                    json.load(f)
            elif name == TRAINER_STATE:
                torch.load(file, weights_only=True, mmap=True, map_location="cpu")
        except Exception as e:  # noqa: BLE001 - any failure to read back is a damaged file
            what = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            if name == TRAINER_STATE and "weights_only" in str(e):
                what = "it holds objects other than tensors (torch.load(weights_only=True) refused it, nothing ran)"
            raise DataError(f"checkpoint {path}: {name} is damaged or not written by train.py ({what}); resume from "
                            "an earlier checkpoint (--resume_from auto passes over damaged ones) or evaluate another") from None


def check_safetensors(path: str) -> None:
    """A .safetensors file is whole: 8 bytes of header length, the JSON header, then exactly the bytes
    its tensors' offsets promise (a copy cut short or a full disk leaves fewer)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{size} bytes, shorter than a header")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise ValueError(f"truncated: its header alone should take {n} bytes, the file has {size}")
        header = json.loads(f.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise ValueError(f"truncated: {size} bytes where its header promises {8 + n + end}")


def nonfinite_tensors(model) -> tuple[list[str], int]:
    """(names of the trained tensors — policy and the beta mode's (a BetaHead), not the reference — that hold NaN or inf,
    how many tensors there are)."""
    named = list(model.policy_model.state_dict().items())
    named += [("mode." + k, v) for k, v in model.mode.state_dict().items()]  # a BetaHead's weights
    bad = [k for k, v in named if v.is_floating_point() and not torch.isfinite(v).all()]
    return bad, len(named)


def read_run_config(ckpt: str) -> dict:
    """The flags of the run that wrote checkpoint `ckpt`; DataError when they are missing or damaged."""
    path = os.path.join(ckpt, RUN_CONFIG)
    if not os.path.exists(path):
        raise DataError(f"{ckpt} has no {RUN_CONFIG}; pass a checkpoint directory written by train.py "
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
    if cfg["beta_mode"] not in BETA_MODES:
        raise DataError(f"{path}: beta_mode {cfg['beta_mode']!r} is not one this code knows ({', '.join(BETA_MODES)}); "
                        "it was written by another version of train.py")
    # runs from before these flags had their defaults
    return {"ppl_transform": "ppl", "think_prefill": "close", **cfg}


def complete_checkpoints(run_dir: str) -> list[str]:
    """Complete step checkpoints of a run, oldest first."""
    d = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(d):
        return []
    steps = [n for n in os.listdir(d) if n.startswith("step_") and n[5:].isdigit()
             and os.path.exists(os.path.join(d, n, COMPLETED))]
    return [os.path.join(d, n) for n in sorted(steps, key=lambda n: int(n[5:]))]


def is_complete(path: str) -> bool:
    return os.path.exists(os.path.join(path, COMPLETED))


def prune_checkpoints(run_dir: str, keep: int) -> None:
    """Delete all but the newest `keep` step checkpoints (keep=0: delete none)."""
    if keep:
        for old in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)


def drop_resume_state(run_dir: str) -> None:
    """Delete what only resuming a run needs: its step checkpoints (and, in runs written before
    final/ stopped holding one, final/'s trainer state). final/ keeps the policy, the beta state and
    eval.json."""
    shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
    state = os.path.join(run_dir, "final", TRAINER_STATE)
    if os.path.exists(state):
        os.remove(state)


# -----------------------------------------------------------------------------
# resuming a run


# what fixes a run's starting point and its training rows, their tokens and order (with the step):
# a resumed run must agree on every one of these
RESUME_KEYS = ("model_name_or_path", "gguf_file", "lora_r", "lora_alpha", "lora_target_modules",  # start
               "beta_mode",                                                                         # + the mode's own
               "dataset", "dataset_config", "dataset_data_dir", "split", "eval_split",               # which rows
               "eval_fraction", "split_seed", "max_train_examples",
               "max_length", "max_prompt_length", "no_chat_template", "think_prefill",               # their tokens
               "seed", "batch_size", "gradient_accumulation_steps")                                  # their order


def check_resume(resume: str, args) -> None:
    """A checkpoint continues only the run it came from: same starting model, beta mode (and the flags
    that shape its state, its resume_keys), training rows and data order (RESUME_KEYS). Learning
    rates, betas, eps, weight decay and intervals may change on resume."""
    saved = read_run_config(resume)
    for key in RESUME_KEYS + BETA_MODES[args.beta_mode].resume_keys:
        if saved.get(key) != getattr(args, key):
            raise DataError(f"checkpoint {resume} has {key}={saved.get(key)!r} but this run has "
                            f"{getattr(args, key)!r}; pass --{key} {saved.get(key)} or start a new run")


def resolve_resume(args, say=print) -> str | None:
    """The checkpoint --resume_from names: 'auto' is the run's newest complete one that reads back
    whole (check_checkpoint; a damaged newer one is passed over, said, and left on disk; None when
    there is none yet: start fresh); a directory must be complete and whole."""
    if args.resume_from is None:
        return None
    if args.resume_from == "auto":
        for ckpt in reversed(complete_checkpoints(args.output_dir)):
            try:
                check_checkpoint(ckpt)
                return ckpt
            except DataError as e:
                say(f"warning: passing over {e}")
        return None
    if not is_complete(args.resume_from):
        raise DataError(f"--resume_from {args.resume_from}: not a complete checkpoint (no COMPLETED marker)")
    if not os.path.exists(os.path.join(args.resume_from, TRAINER_STATE)):
        raise DataError(f"--resume_from {args.resume_from}: holds no optimizer state (final/ is the model to "
                        "deploy); resume from checkpoints/step_N, which --keep_checkpoints keeps after a run")
    check_checkpoint(args.resume_from)
    return args.resume_from


# flags that differ between segments of one run without changing what it trains
SEGMENT_NOISE = ("resume_from", "history", "command", "output_dir", "run_name", "overwrite_output_dir")


def record_segment(args, resume: str, say=print) -> None:
    """A resumed run keeps what ran before: args.history becomes the checkpoint's history plus this
    segment ({from_step, command, changed: {flag: [before, now]}}), which config.json,
    run_config.json and the model card then show; the flags that changed are said."""
    saved = read_run_config(resume)
    changed = {k: [saved[k], v] for k, v in sorted(vars(args).items())
               if k in saved and k not in SEGMENT_NOISE and saved[k] != v}
    step = int(os.path.basename(os.path.normpath(resume)).rsplit("_", 1)[-1]) if "step_" in resume else None
    earlier = saved.get("history") or [dict(from_step=0, command=saved.get("command", "(not recorded)"), changed={})]
    args.history = earlier + [dict(from_step=step, command=args.command, changed=changed)]
    if changed:
        say("resuming with changed flags: " + ", ".join(f"--{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
