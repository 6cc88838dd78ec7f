"""
The interface every beta mode implements, and fixed beta (plain DPO), the mode the others extend.

A beta mode decides the beta of each pair inside DynamicBetaDPOModel.forward. It is an nn.Module
(its parameters, if it has any, train with the policy and move with the model) with a small
interface; the training step and the model call it and never name a mode:

    forward(pairs)                   PairForward -> BetaOut: the pairs' beta and what the loss adds
    prompt_beta(ppl, h, ...)         beta from the prompt alone (get_dynamic_beta, evaluate --prompts);
                                     modes whose beta needs the responses raise
    bounds(beta)                     the default clamp [beta_min, beta_max] (classmethod)
    about, describe(cfg)             the mode in one line (--help), and a run of it in words (model card)
    per_prompt, resume_keys          whether beta is a function of the prompt alone; the flags a resume must keep
    add_flags(group), check_flags(args, error)
                                     its own train.py flags and their checks (classmethods)
    from_config(cfg, hidden_size)    a fresh one from a run's flags (classmethod)
    from_pretrained(directory, cfg)  the one a checkpoint holds; save_pretrained(directory) writes it
    param_groups(cfg)                its AdamW parameter groups (none here)
    start(model, batches, cfg, accelerator)
                                     once before the first step of a fresh run (learnable: calibrate w)
    after_step(applied)              after every optimizer step (applied=False: a skipped, non-finite one)
    metrics(stats), train_metrics()  what it adds to the logged metrics (train_metrics: tensors, no sync)

registry.py maps the names --beta_mode takes to these classes: adding a mode is one file with a
subclass of BetaMode and one line there.
"""

import json
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn


@dataclass
class PairForward:
    """What one forward of a pair batch offers a beta mode. Rows [:B] of the (2B, ...) tensors are
    prompt + chosen, rows [B:] prompt + rejected."""
    model: nn.Module  # the DynamicBetaDPOModel: its policy and reference
    hidden: torch.Tensor  # (2B, T, H) the policy's final hidden states
    input_ids: torch.Tensor  # (2B, T)
    attention_mask: torch.Tensor  # (2B, T)
    loss_mask: torch.Tensor  # (2B, T) the response tokens
    pack: dict | None  # the batch's packed layout (logprobs.pack_pairs), if it has one
    seq_logps: torch.Tensor  # (2B,) the policy's response log-probs, with their graph
    ppl: torch.Tensor  # (B,) the policy's perplexity of each prompt, with its graph
    h: torch.Tensor  # (B, H) the policy's last hidden state at each prompt's last token
    beta0: float  # --beta
    beta_min: float  # the clamp of beta
    beta_max: float
    training: bool
    reference: torch.Tensor | None = None  # (2B,) the reference's response log-probs, once known

    def reference_logps(self) -> torch.Tensor:
        """The reference's response log-probs (2B,): the cache's when the batch brought them, else
        one reference forward, run on first use only."""
        if self.reference is None:
            self.reference = self.model.reference_logps(self.input_ids, self.attention_mask, self.loss_mask, self.pack)
        return self.reference


@dataclass
class BetaOut:
    beta: torch.Tensor  # (B,) fp32, the beta the loss uses (clamped to [beta_min, beta_max])
    raw: torch.Tensor  # (B,) before the clamp (the clamped fraction is measured on it)
    weights: torch.Tensor | None = None  # (B,) the loss is the weighted mean over pairs; None: the plain mean
    penalty: torch.Tensor | None = None  # () added to the loss
    stats: dict = field(default_factory=dict)  # extra detached (B,) per-pair stats, logged and gathered


class BetaMode(nn.Module):
    """Fixed beta: plain DPO, beta = beta0 for every pair (TRL's sigmoid loss)."""

    about = "DPO with a constant --beta (TRL's sigmoid loss)"  # one line for --help
    per_prompt = True  # beta is a function of the prompt alone (prompt_beta works)
    resume_keys: tuple[str, ...] = ()  # flags that shape the mode's saved state: a resumed run must keep them

    @classmethod
    def bounds(cls, beta: float) -> tuple[float, float]:
        """The default clamp of beta; (0, inf) is no clamp (then --beta_min/--beta_max are refused)."""
        return 0.0, math.inf

    @classmethod
    def add_flags(cls, group) -> None:
        """Add this mode's own flags to train.py's parser (an argparse group named after the mode)."""

    @classmethod
    def check_flags(cls, args, error) -> None:
        """Check this mode's flag values (called whichever mode runs) and, when args.beta_mode is
        this mode, fill the defaults decided later; error(message) stops with the message."""

    @classmethod
    def from_config(cls, cfg: dict, hidden_size: int) -> "BetaMode":
        return cls()

    @classmethod
    def from_pretrained(cls, directory: str, cfg: dict | None = None) -> "BetaMode":
        return cls.from_config(cfg or {}, None)

    def save_pretrained(self, directory: str) -> None:
        """Write what from_pretrained reads back into a checkpoint directory."""

    @classmethod
    def describe(cls, cfg: dict) -> str:
        """What a run of this mode trained with, in words (the model card)."""
        return f"DPO with a fixed beta = {cfg['beta']}"

    def forward(self, pairs: PairForward) -> BetaOut:
        beta, raw = self.prompt_beta(pairs.ppl, pairs.h, pairs.beta0, pairs.beta_min, pairs.beta_max)
        return BetaOut(beta, raw)

    def prompt_beta(self, ppl: torch.Tensor, h: torch.Tensor, beta0: float, beta_min: float = 0.0,
                    beta_max: float = math.inf) -> tuple[torch.Tensor, torch.Tensor]:
        """(clamped beta, raw beta), each (B,) fp32, from the prompts alone: PPL (B,), hidden state (B, H)."""
        beta = torch.full_like(ppl, beta0, dtype=torch.float32)
        return beta, beta

    def param_groups(self, cfg: dict) -> list[dict]:
        return []

    def start(self, model: nn.Module, batches, cfg: dict, accelerator) -> None:
        """Before the first step of a fresh run (not on resume); batches: the training batches in order."""

    def after_step(self, applied: bool) -> None:
        """After every optimizer step; applied is False when the step was skipped (non-finite)."""

    def metrics(self, stats: dict[str, torch.Tensor]) -> dict[str, float]:
        """Metrics of this mode from forward()'s per-pair stats (gathered), for train and eval logs."""
        return {}

    def train_metrics(self) -> dict[str, torch.Tensor]:
        """Metrics of this mode's own state after a step, before its gradients are zeroed (train logs), as
        0-dim tensors: called every step, read (a device sync) only when the step is logged."""
        return {}


class JsonState:
    """A mode's running statistics as a small JSON file beside the weights (FILE): evaluation needs
    some of them, resume all. Subclasses give state() / load_state() and FILE, WHAT."""
    FILE, WHAT = "", ""

    def save_pretrained(self, directory: str) -> None:
        with open(os.path.join(directory, self.FILE), "w") as f:
            json.dump(self.state(), f, indent=2)

    @classmethod
    def read_state(cls, directory: str) -> dict:
        path = os.path.join(directory, cls.FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{directory} has no {cls.FILE} ({cls.WHAT}): it is not a checkpoint of this "
                                    "beta mode, was written before the file existed, or the file was lost; retrain")
        with open(path) as f:
            return json.load(f)


def gather_pairs(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(x of every process concatenated in rank order, this process's offset in it). Equal sizes."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts), dist.get_rank() * len(x)
