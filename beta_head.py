"""
Learnable beta: the BetaHead, the learnable-beta mode built on it, and DynamicBetaDPOModel, the
policy + reference + beta mode that computes the DPO loss in one forward.

    beta(x; pi) = w * PPL_pi(x) * f(h_pi(x)),   f(h) = 1 + eps * tanh(NN(h))
    L = -E[ log sigmoid( beta(x) * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))] ) ]

PPL is the policy's perplexity of the prompt and h its last-layer hidden state at the last
prompt token. Both are read from the same forward pass that scores chosen and rejected (causal
attention makes the prompt positions of `prompt + response` identical to the prompt alone), so
a learnable beta costs no extra forward pass.

DynamicBetaDPOModel runs any beta mode (beta_mode.py: fixed beta is plain DPO; registry.py lists
the others) through the same code path. Everything here is device- and precision-agnostic:
train.py and evaluate.py decide those.
"""

import itertools
import json
import math
import os
from contextlib import contextmanager

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from beta_mode import BetaMode, BetaOut, PairForward
from logprobs import last_token_hidden, masked_ppl, pack_pairs, can_pack, run_model, sequence_logps, token_logps
from losses import dpo_loss


# -----------------------------------------------------------------------------
# the beta head


def ppl_scale(ppl: torch.Tensor, ppl_transform: str = "ppl") -> torch.Tensor:
    """What beta scales with, (B,) fp32: the prompt PPL, or log PPL floored at 1e-3 ("log")."""
    return ppl.float().log().clamp(min=1e-3) if ppl_transform == "log" else ppl.float()


def small_nn(hidden_size: int, structure: str = "linear", mlp_hidden_size: int = 256) -> nn.Module:
    """(B, H) -> (B, 1): a linear layer ("linear") or a one-hidden-layer GELU MLP ("mlp"), its last
    layer at zero so that it outputs 0 for every input at the start (a head that starts neutral)."""
    if structure == "linear":
        net = nn.Linear(hidden_size, 1)
    elif structure == "mlp":
        net = nn.Sequential(nn.Linear(hidden_size, mlp_hidden_size), nn.GELU(), nn.Linear(mlp_hidden_size, 1))
    else:
        raise ValueError(f"nn_structure must be 'linear' or 'mlp'; got {structure!r}")
    last = net if structure == "linear" else net[-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return net


def norms(params: list) -> dict[str, torch.Tensor]:
    """The weight norm and the gradient norm of these parameters, 0-dim tensors on their device (no sync)."""
    grads = [p.grad.pow(2).sum() for p in params if p.grad is not None]
    return {"nn_weight_norm": torch.stack([p.detach().pow(2).sum() for p in params]).sum().sqrt(),
            "nn_grad_norm": torch.stack(grads).sum().sqrt() if grads else torch.zeros(())}


class BetaHead(nn.Module):
    """beta = w * ppl * (1 + epsilon * tanh(NN(context_embedding))).

    ppl_transform="log" uses log(ppl) (the prompt's mean NLL per token) in place of ppl: a
    stabiliser, since prompt PPL is heavy-tailed (28x within one batch of HH-RLHF prompts).
    log(ppl) is floored at 1e-3 (a one-token prompt has ppl 1), so beta stays > 0.

    forward(context_embedding (B, H), ppl (B,)) -> beta (B,), fp32.

    Range: for ppl > 0, beta lies in [w * ppl * (1 - eps), w * ppl * (1 + eps)] and is strictly
    positive, because w is stored as log_w and used as w = exp(log_w) > 0 (a raw w could cross 0
    and silently flip which response is preferred) and epsilon must be in [0, 1).

    NN is a linear layer (nn_structure="linear") or a one-hidden-layer GELU MLP ("mlp"). Its last
    layer starts at zero, so f(h) = 1 at step 0 and beta starts as w * ppl.
    """

    def __init__(self, hidden_size: int, nn_structure: str = "linear", epsilon: float = 0.1,
                 mlp_hidden_size: int = 256, init_w: float = 1.0, ppl_transform: str = "ppl"):
        super().__init__()
        if not 0.0 <= epsilon < 1.0:
            raise ValueError(f"epsilon must be in [0, 1) so that f(h) > 0; got {epsilon}")
        if init_w <= 0:
            raise ValueError(f"init_w must be > 0; got {init_w}")
        self.hidden_size, self.nn_structure, self.epsilon = hidden_size, nn_structure, epsilon
        self.mlp_hidden_size = mlp_hidden_size
        if ppl_transform not in ("ppl", "log"):
            raise ValueError(f"ppl_transform must be 'ppl' or 'log'; got {ppl_transform!r}")
        self.ppl_transform = ppl_transform
        self.log_w = nn.Parameter(torch.tensor(math.log(init_w)))
        self.nn = small_nn(hidden_size, nn_structure, mlp_hidden_size)

    @property
    def w(self) -> torch.Tensor:
        return self.log_w.exp()

    def forward(self, context_embedding: torch.Tensor, ppl: torch.Tensor) -> torch.Tensor:
        # always fp32, also inside a bf16 autocast region: bf16 would quantise f to ~25 levels
        with torch.autocast(context_embedding.device.type, enabled=False):
            f = 1 + self.epsilon * torch.tanh(self.nn(context_embedding.float()).squeeze(-1))
            return self.w * ppl_scale(ppl, self.ppl_transform) * f

    @torch.no_grad()
    def rescale_(self, context_embedding: torch.Tensor, ppl: torch.Tensor, target_mean: float,
                 beta_min: float = 0.0, beta_max: float = math.inf) -> None:
        """Set w so that the mean of the beta that training uses, clamp(beta, beta_min, beta_max),
        over these inputs equals target_mean. Unclamped, beta is linear in w: one step. With bounds
        the clamped mean still rises monotonically with w: bisection on log w."""
        self.log_w += math.log(target_mean) - self(context_embedding, ppl).mean().log()
        beta = self(context_embedding, ppl)
        if beta.min() >= beta_min and beta.max() <= beta_max:
            return
        per_w = beta / self.w
        lo, hi = self.log_w.item() - 30, self.log_w.item() + 30
        for _ in range(60):
            mid = (lo + hi) / 2
            if (per_w * math.exp(mid)).clamp(beta_min, beta_max).mean() < target_mean:
                lo = mid
            else:
                hi = mid
        self.log_w.fill_((lo + hi) / 2)

    def config(self) -> dict:
        return dict(hidden_size=self.hidden_size, nn_structure=self.nn_structure,
                    epsilon=self.epsilon, mlp_hidden_size=self.mlp_hidden_size, ppl_transform=self.ppl_transform)

    def save_pretrained(self, directory: str) -> None:
        """Write beta_head.safetensors (weights, with the config in its metadata)."""
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, os.path.join(directory, "beta_head.safetensors"),
                  metadata={"config": json.dumps(self.config())})

    @classmethod
    def from_pretrained(cls, directory: str) -> "BetaHead":
        path = os.path.join(directory, "beta_head.safetensors")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{directory} has no beta_head.safetensors: it is not a learnable-beta "
                                    "checkpoint, or the file was lost (its run_config.json says learnable)")
        with safe_open(path, "pt") as f:
            head = cls(**json.loads(f.metadata()["config"]))
        head.load_state_dict(load_file(path))
        return head


class LearnableBeta(BetaMode):
    """Learnable beta: beta(x) = w * PPL(x) * f(h(x)) from a BetaHead, clamped to [beta_min, beta_max].

      beta_reg             adds beta_reg * mean((log beta_raw - log beta0)^2) to the loss, a pull
                           back to the fixed beta that also acts on clamped values;
      grad_to_policy       False (default): PPL and h are detached, so the policy cannot lower
                           the loss by changing its own prompt perplexity to move beta.
    Where the clamp binds, mean((log beta_raw - log beta_clamped)^2) is added to the loss, so a head
    pushed out of bounds still gets a gradient back in.
    """

    about = "beta(x) = w * PPL(x) * f(h(x)), a BetaHead trained with the policy"
    resume_keys = ("nn_structure", "epsilon", "mlp_hidden_size", "ppl_transform")  # the head's shape and f

    def __init__(self, head: BetaHead, beta_reg: float = 0.0, grad_to_policy: bool = False):
        super().__init__()
        self.head, self.beta_reg, self.grad_to_policy = head, beta_reg, grad_to_policy

    @classmethod
    def bounds(cls, beta: float) -> tuple[float, float]:
        return beta / 10, beta * 10

    @classmethod
    def add_flags(cls, group) -> None:
        group.add_argument("--epsilon", type=float, default=0.1, help="f(h) = 1 + epsilon * tanh(NN(h)) lies in [1-eps, 1+eps]")
        group.add_argument("--nn_structure", default="linear", choices=["linear", "mlp"], help="the BetaHead's NN")
        group.add_argument("--mlp_hidden_size", type=int, default=256, help="hidden width of the mlp NN")
        group.add_argument("--calibration_pairs", type=int, default=64,
                           help="w starts so that the mean beta over the first this many training prompts is --beta")
        group.add_argument("--ppl_transform", default="ppl", choices=["ppl", "log"],
                           help="beta scales with the prompt PPL (the spec) or with log PPL (a stabiliser)")
        group.add_argument("--beta_reg", type=float, default=0.0, help="weight of the penalty mean((log beta - log beta0)^2)")
        group.add_argument("--beta_grad_to_policy", action="store_true",
                           help="let gradients flow from beta into the policy through PPL and h (ablation; default detached)")
        group.add_argument("--beta_head_lr", type=float, default=None, help="peak AdamW learning rate of the BetaHead (default 1e-3; learnable only)")

    @classmethod
    def check_flags(cls, args, error) -> None:
        if not 0 <= args.epsilon < 1:
            error(f"--epsilon must be in [0, 1); got {args.epsilon}")
        if args.mlp_hidden_size <= 0:
            error(f"--mlp_hidden_size must be > 0; got {args.mlp_hidden_size}")
        if args.calibration_pairs < 1:
            error(f"--calibration_pairs must be >= 1; got {args.calibration_pairs}")
        if args.beta_reg < 0:
            error(f"--beta_reg must be >= 0; got {args.beta_reg}")
        if args.beta_head_lr is not None and args.beta_head_lr <= 0:
            error(f"--beta_head_lr must be > 0; got {args.beta_head_lr}")
        if args.beta_mode == "learnable" and args.beta_head_lr is None:
            args.beta_head_lr = 1e-3

    @classmethod
    def from_config(cls, cfg: dict, hidden_size: int) -> "LearnableBeta":
        head = BetaHead(hidden_size, cfg["nn_structure"], cfg["epsilon"], cfg["mlp_hidden_size"],
                        ppl_transform=cfg.get("ppl_transform", "ppl"))
        return cls(head, cfg.get("beta_reg", 0.0), cfg.get("beta_grad_to_policy", False))

    @classmethod
    def from_pretrained(cls, directory: str, cfg: dict | None = None) -> "LearnableBeta":
        cfg = cfg or {}
        return cls(BetaHead.from_pretrained(directory), cfg.get("beta_reg", 0.0), cfg.get("beta_grad_to_policy", False))

    def save_pretrained(self, directory: str) -> None:
        self.head.save_pretrained(directory)

    @classmethod
    def describe(cls, cfg: dict) -> str:
        return (f"Learnable-beta DPO: beta(x) = w * PPL(x) * f(h(x)) (a {cfg.get('nn_structure')} BetaHead, "
                f"epsilon {cfg.get('epsilon')}), calibrated to a mean of {cfg['beta']}")

    def prompt_beta(self, ppl: torch.Tensor, h: torch.Tensor, beta0: float, beta_min: float = 0.0,
                    beta_max: float = math.inf) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.grad_to_policy:
            ppl, h = ppl.detach(), h.detach()
        raw = self.head(h, ppl)
        return raw.clamp(beta_min, beta_max), raw

    def forward(self, pairs: PairForward) -> BetaOut:
        beta, raw = self.prompt_beta(pairs.ppl, pairs.h, pairs.beta0, pairs.beta_min, pairs.beta_max)
        # Learnable-beta departures from DPO. The clamp passes no gradient where it binds: once every
        # raw beta is out of bounds, w and the NN would never move again. This pull, zero inside the
        # bounds, brings a clamped beta back towards its bound and so keeps the head alive.
        penalty = (raw.log() - beta.log()).pow(2).mean()
        if self.beta_reg > 0:  # a pull of log beta towards log beta_0 against the runaway
            penalty = penalty + self.beta_reg * (raw.log() - math.log(pairs.beta0)).pow(2).mean()
        return BetaOut(beta, raw, penalty=penalty)

    def param_groups(self, cfg: dict) -> list[dict]:
        return [dict(params=list(self.head.parameters()), lr=cfg["beta_head_lr"], weight_decay=0.0, name="beta_head")]

    @torch.no_grad()
    def start(self, model: nn.Module, batches, cfg: dict, accelerator) -> None:
        """Set w so that the mean beta over the first --calibration_pairs training prompts is beta0:
        learnable and fixed runs start from the same average beta (f(h) = 1 at init, so only PPL
        spreads it). One batch is not enough: prompt PPL is heavy-tailed, and a 4-prompt batch set the
        mean beta of a whole HH-RLHF run 2.5x off."""
        ppls, hs = [], []
        n_batches = math.ceil(cfg["calibration_pairs"] / (cfg["batch_size"] * accelerator.num_processes))
        with accelerator.autocast():  # the precision training will use
            for b in itertools.islice(iter(batches), n_batches):
                n = b["input_ids"].shape[0] // 2
                ppl, h = model.prompt_stats(b["input_ids"][:n].to(accelerator.device), b["prompt_mask"][:n].to(accelerator.device))
                ppls.append(accelerator.gather(ppl))
                hs.append(accelerator.gather(h))
        ppl, h = torch.cat(ppls), torch.cat(hs)
        self.head.rescale_(h, ppl, cfg["beta"], cfg["beta_min"], cfg["beta_max"])
        accelerator.print(f"beta head: w initialised to {self.head.w.item():.4g}, the mean beta over the first "
                          f"{len(ppl)} training prompts is {cfg['beta']} (their PPL: mean {ppl.mean().item():.4g}, "
                          f"min {ppl.min().item():.4g}, max {ppl.max().item():.4g})")

    def metrics(self, stats: dict) -> dict[str, float]:
        return {"beta_head/w": self.head.w.item()}

    @torch.no_grad()
    def train_metrics(self) -> dict[str, torch.Tensor]:
        head = self.head
        return {"beta_head/w": head.w.detach(),
                "beta_head/w_grad": head.log_w.grad.clone() if head.log_w.grad is not None else torch.zeros(()),
                **{f"beta_head/{k}": v for k, v in norms(list(head.nn.parameters())).items()}}


# -----------------------------------------------------------------------------
# the model


class DynamicBetaDPOModel(nn.Module):
    """A policy, a frozen reference and a beta mode, computing the DPO loss.

    The beta mode (beta_mode.BetaMode and its subclasses, see registry.py) decides each pair's beta;
    this class never names one. The spec's constructor still works: beta_head=BetaHead(...) is
    learnable beta (LearnableBeta, with beta_reg and beta_grad_to_policy), beta_head=None and no
    mode plain DPO with beta = `beta` everywhere; mode=... any other. label_smoothing > 0 is cDPO's
    loss (dpo_loss), in any mode. beta_min, beta_max clamp beta (the clamped fraction is reported).
    The reference is kept outside the module tree (so it is never in state_dict(), the optimizer
    or a DDP wrapper); the caller places it on the device.
    share_prompt=True runs each pair's prompt once for both responses (run_model's packed layout);
    False runs the padded (2B, T) batch as it is. Same values, different cost.
    """

    def __init__(self, policy_model: nn.Module, beta_head: BetaHead | None = None,
                 reference_model: nn.Module | None = None, beta: float = 0.1,
                 beta_min: float = 0.0, beta_max: float = math.inf, beta_reg: float = 0.0,
                 beta_grad_to_policy: bool = False, share_prompt: bool = True, label_smoothing: float = 0.0,
                 mode: BetaMode | None = None):
        super().__init__()
        if mode is not None and beta_head is not None:
            raise ValueError("pass a BetaHead (learnable beta) or a beta mode, not both")
        if beta <= 0:
            raise ValueError(f"beta must be > 0; got {beta}")
        if not beta_min < beta_max:
            raise ValueError(f"need beta_min < beta_max; got {beta_min} and {beta_max}")
        if mode is None:
            mode = BetaMode() if beta_head is None else LearnableBeta(beta_head, beta_reg, beta_grad_to_policy)
        self.policy_model = policy_model
        self.mode = mode
        self.__dict__["reference_model"] = reference_model  # not a submodule, see docstring
        self.beta, self.beta_min, self.beta_max = beta, beta_min, beta_max
        self.share_prompt = share_prompt
        self.label_smoothing = label_smoothing

    @property
    def beta_head(self) -> BetaHead | None:
        """The BetaHead of a learnable-beta model, else None."""
        return getattr(self.mode, "head", None)

    def drop_reference(self) -> None:
        """Free the reference model: from now on forward() needs reference_logps (a cache), or a
        LoRA policy is its own reference."""
        self.__dict__["reference_model"] = None

    # --- the spec's methods: the prompt on its own -------------------------------------------

    def prompt_stats(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """(PPL (B,), last-token hidden state (B, H)) of prompts (B, T) on their own."""
        hidden = run_model(self.policy_model, input_ids, attention_mask)
        needed = (attention_mask[:, 1:] * attention_mask[:, :-1]).bool()
        logps = token_logps(hidden, self.policy_model.get_output_embeddings(), input_ids, needed)
        return masked_ppl(logps, attention_mask), last_token_hidden(hidden, attention_mask)

    def compute_ppl(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Policy perplexity of each prompt. input_ids, attention_mask (B, T) -> (B,)."""
        return self.prompt_stats(input_ids, attention_mask)[0]

    def get_dynamic_beta(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """beta(x) for each prompt, clamped to [beta_min, beta_max]. (B, T) -> (B,).

        Training does not call this: forward() reads the same PPL and h from its one forward.
        """
        ppl, h = self.prompt_stats(input_ids, attention_mask)
        return self.beta_from(ppl, h)[0]

    def beta_from(self, ppl: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(clamped beta, raw beta), each (B,) fp32, from prompt PPL (B,) and hidden state (B, H)."""
        if not self.mode.per_prompt:
            raise ValueError(f"{type(self.mode).__name__} sets beta from pairs of responses, not from a prompt alone")
        return self.mode.prompt_beta(ppl, h, self.beta, self.beta_min, self.beta_max)

    # --- training / evaluation -----------------------------------------------------------------

    def pair_layout(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_mask: torch.Tensor,
                    pack_plan: torch.Tensor | None = None, pack_unpack: torch.Tensor | None = None) -> dict | None:
        """pack_pairs' layout of a pair batch (2B, T) when prompts are shared: share_prompt is on
        and the policy (so its reference, the same architecture) takes the custom mask; else None.
        pack_plan, pack_unpack: collate's plan of it (batching.plan_packing), when the batch has one."""
        if self.share_prompt and can_pack(self.policy_model):
            return pack_pairs(input_ids, attention_mask, prompt_mask, pack_plan, pack_unpack)
        return None

    @torch.no_grad()
    def reference_logps(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        loss_mask: torch.Tensor, pack: dict | None = None) -> torch.Tensor:
        """Sequence log-probs (N,) of the response tokens under the reference. With no reference
        model and a LoRA (peft) policy, the reference is the policy with its adapters disabled.
        pack: the batch's pair_layout, when it has one."""
        with self.as_reference() as reference:
            return sequence_logps(reference, input_ids, attention_mask, loss_mask, pack)

    @contextmanager
    def as_reference(self):
        """The reference as a causal LM: the frozen copy, or a LoRA policy with its adapters off."""
        if self.reference_model is not None:
            yield self.reference_model
        elif hasattr(self.policy_model, "disable_adapter"):
            with self.policy_model.disable_adapter():
                yield self.policy_model
        else:
            raise ValueError("no reference: pass reference_model, a LoRA policy, or reference_logps")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor,
                prompt_mask: torch.Tensor, reference_logps: torch.Tensor | None = None,
                pack_plan: torch.Tensor | None = None, pack_unpack: torch.Tensor | None = None):
        """One DPO step's loss. All inputs (2B, T): rows [:B] are chosen, rows [B:] rejected.

        loss_mask selects response tokens, prompt_mask the prompt tokens (the same tokens in both
        halves, at the same positions under right padding). PPL and h come from the chosen half.
        reference_logps (2B,), when given (a precomputed cache), replaces the reference forward.
        pack_plan, pack_unpack: collate's plan of the shared-prompt layout (see pair_layout).
        Returns (loss, stats) where stats holds detached (B,) tensors for summarize().
        """
        B = input_ids.shape[0] // 2
        pack = self.pair_layout(input_ids, attention_mask, prompt_mask, pack_plan, pack_unpack)  # policy and reference
        hidden = run_model(self.policy_model, input_ids, attention_mask, pack)
        response = loss_mask[:, 1:].bool()
        prompt = (prompt_mask[:, 1:] * prompt_mask[:, :-1]).bool()
        prompt[B:] = False  # the rejected half's prompt repeats the chosen half's
        logps = token_logps(hidden, self.policy_model.get_output_embeddings(), input_ids, response | prompt)
        seq_logps = (logps * response).sum(-1)
        # PPL and h of the prompt, read from the chosen half of the same forward
        ppl = masked_ppl(logps[:B], prompt_mask[:B])
        h = last_token_hidden(hidden[:B], prompt_mask[:B])
        pairs = PairForward(self, hidden, input_ids, attention_mask, loss_mask, pack, seq_logps, ppl, h, self.beta,
                            self.beta_min, self.beta_max, self.training, reference_logps)
        out = self.mode(pairs)
        reference_logps = pairs.reference_logps()  # the mode's, the cache's, or one reference forward now

        losses, chosen_rewards, rejected_rewards = dpo_loss(
            seq_logps[:B], seq_logps[B:], reference_logps[:B], reference_logps[B:], out.beta,
            label_smoothing=self.label_smoothing)
        # a mode's pair weights (beta-DPO: 1 for the kept pairs; none kept: 0, as in the authors' code)
        loss = losses.mean() if out.weights is None else (losses * out.weights).sum() / out.weights.sum().clamp(min=1)
        if out.penalty is not None:
            loss = loss + out.penalty

        stats = dict(
            losses=losses.detach(),
            chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards,
            policy_chosen_logps=seq_logps[:B].detach(), policy_rejected_logps=seq_logps[B:].detach(),
            reference_chosen_logps=reference_logps[:B].detach(),
            reference_rejected_logps=reference_logps[B:].detach(),
            beta=out.beta.detach(), raw_beta=out.raw.detach(), ppl=ppl.detach(), **out.stats,
        )
        return loss, stats
