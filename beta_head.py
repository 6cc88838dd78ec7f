"""
Learnable-beta DPO: the beta head, the DPO loss and the model that ties them to a policy.

    beta(x; pi) = w * PPL_pi(x) * f(h_pi(x)),   f(h) = 1 + eps * tanh(NN(h))
    L = -E[ log sigmoid( beta(x) * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))] ) ]

PPL is the policy's perplexity of the prompt and h its last-layer hidden state at the last
prompt token. Both are read from the same forward pass that scores chosen and rejected (causal
attention makes the prompt positions of `prompt + response` identical to the prompt alone), so
a learnable beta costs no extra forward pass.

Everything here is device- and precision-agnostic: train.py and evaluate.py decide those.

dpo_loss also takes cDPO's label smoothing. The last section holds ε-DPO (Lee et al. 2025, a
per-pair beta from a perturbation test) as pure functions and a small state class, which
DynamicBetaDPOModel uses with epsilon_dpo=EpsilonDPO(...).
"""

import json
import math
import os
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from data import collate, eval_batches, plan_packing


# -----------------------------------------------------------------------------
# pure functions of tensors


LOGITS_BYTES = 320 << 20  # the fp32 logits one lm_head chunk may hold (512 positions x 151,936 tokens)
CPU_LOGITS_BYTES = 32 << 20  # on CPU less: glibc's malloc keeps and reuses blocks up to 32 MB, while a
#   larger one is mmap'ed afresh at every use, and there its page faults cost more than its math


def logits_budget(device: torch.device) -> int:
    return CPU_LOGITS_BYTES if device.type == "cpu" else LOGITS_BYTES


class _LMHeadLogps(torch.autograd.Function):
    """log_softmax(h @ W^T + b)[target] for N positions, in fp32, without ever holding N x V logits.

    The matmuls run in `dtype` (bf16 under autocast; the weight is cast once per step); the
    normaliser is fp32. Forward walks over chunks of positions and keeps only each position's
    log-sum-exp (N floats). Backward walks over chunks of the VOCABULARY instead: with the saved
    normaliser, softmax(logits)[:, slice] = exp(logits[:, slice] - lse), so each slice of the weight
    gradient is computed once, directly in its final fp32 place, and only the small (N, H) input
    gradient is summed over slices. d out / d logits = onehot(target) - softmax(logits).
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, dtype):
        # one cast each of the inputs and the weight, kept for backward
        hd, w, b = h.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
        n = max(1, logits_budget(h.device) // (4 * weight.shape[0]))
        out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        lse = torch.empty_like(out)
        for i in range(0, h.shape[0], n):
            logits = F.linear(hd[i:i + n], w, b)
            target_logit = logits.gather(-1, targets[i:i + n, None]).squeeze(-1).float()
            out[i:i + n] = torch.log_softmax(logits, -1, dtype=torch.float32).gather(-1, targets[i:i + n, None]).squeeze(-1)
            lse[i:i + n] = target_logit - out[i:i + n]
        ctx.save_for_backward(hd, w, b, targets, lse)
        ctx.h_dtype, ctx.weight_dtype = h.dtype, weight.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hd, w, b, targets, lse = ctx.saved_tensors
        dtype, (V, H), N, device = w.dtype, w.shape, hd.shape[0], hd.device
        g = grad_out[:, None]
        grad_h = torch.zeros(N, H, dtype=torch.float32, device=device) if ctx.needs_input_grad[0] else None
        grad_w = torch.empty(V, H, dtype=ctx.weight_dtype, device=device) if ctx.needs_input_grad[1] else None
        grad_b = torch.empty(V, dtype=ctx.weight_dtype, device=device) if b is not None and ctx.needs_input_grad[2] else None
        vc = max(1, logits_budget(device) // (4 * max(N, 1)))
        for j in range(0, V, vc):
            logits = F.linear(hd, w[j:j + vc], None if b is None else b[j:j + vc])  # (N, vc)
            grad_logits = (logits.float() - lse[:, None]).exp_().mul_(-g)
            # the target's own column gets + g: a scatter of g where the target is in this slice and
            # of 0 elsewhere (no boolean indexing, so no device sync per slice)
            local = targets - j
            inside = (local >= 0) & (local < grad_logits.shape[1])
            grad_logits.scatter_add_(1, local.clamp(0, grad_logits.shape[1] - 1)[:, None],
                                     torch.where(inside, grad_out, 0.0)[:, None].to(grad_logits.dtype))
            grad_logits = grad_logits.to(dtype)
            if grad_h is not None:
                grad_h += grad_logits @ w[j:j + vc]
            if grad_w is not None:
                grad_w[j:j + vc] = grad_logits.T @ hd
            if grad_b is not None:
                grad_b[j:j + vc] = grad_logits.sum(0)
        return None if grad_h is None else grad_h.to(ctx.h_dtype), grad_w, grad_b, None, None


def token_logps(hidden: torch.Tensor, lm_head: nn.Linear, input_ids: torch.Tensor,
                needed: torch.Tensor) -> torch.Tensor:
    """Log-prob of each next token, only where needed. hidden (B, T, H) final hidden states,
    input_ids (B, T), needed (B, T-1) bool -> (B, T-1) fp32, zero where not needed.

    Entry t is log p(input_ids[t+1] | input_ids[:t+1]) = log_softmax(lm_head(hidden[t]))[input_ids[t+1]].
    The [B, T, V] logits are never materialised: the needed positions go through lm_head in
    chunks (_LMHeadLogps), in the autocast dtype when autocast is on, and each
    chunk's logits are recomputed in backward instead of stored, so memory grows with B*T*H,
    not B*T*V.
    """
    h = hidden[:, :-1][needed]
    targets = input_ids[:, 1:][needed]
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
    with torch.autocast(device, enabled=False):  # the dtypes are chosen explicitly above
        logps = _LMHeadLogps.apply(h, lm_head.weight, lm_head.bias, targets, dtype)
    return torch.zeros(needed.shape, dtype=torch.float32, device=hidden.device).masked_scatter(needed, logps)


def masked_ppl(logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Perplexity of the tokens selected by `mask`. logps (B, T-1) from token_logps, mask (B, T) -> (B,).

    A token counts when it and the token before it are both selected, so the first selected
    token (which has no context inside the selection) is excluded. The mean is over the counted
    tokens only: padding never changes the value. A selection of one token has PPL 1.
    """
    m = (mask[:, 1:] * mask[:, :-1]).to(logps.dtype)
    nll = -(logps * m).sum(-1) / m.sum(-1).clamp(min=1)
    return nll.exp()


def last_token_hidden(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Hidden state at the last selected position of each row. hidden (B, T, H), mask (B, T) -> (B, H).

    Works for left and right padding: the index is the largest t with mask[t] == 1.
    """
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (mask.long() * positions).argmax(-1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float | torch.Tensor,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DPO loss (Rafailov et al. 2023, arXiv 2305.18290, Eq. 7), per example.

    All log-prob inputs are (B,) sums over response tokens. `beta` is a float or a (B,) tensor;
    the function never knows whether beta was learned. Learnable-beta DPO departs from the paper
    only in that: beta is a per-prompt tensor and, if it carries a graph, the loss trains it.
    Returns (losses, chosen_rewards, rejected_rewards), each (B,); rewards are detached.

    label_smoothing = ls > 0 is conservative DPO, cDPO (Mitchell 2023, "A note on DPO with noisy
    preferences & relationship to IPO", Eq. 3; TRL's loss_type="sigmoid" with label_smoothing):
    each label is taken to be flipped with probability ls, so the loss is the expected DPO loss
    under that noise,
        L = -(1 - ls) * log sigmoid(beta * m) - ls * log sigmoid(-beta * m) = softplus(-beta * m) + ls * beta * m
    with m the log-ratio margin below. Its minimum in m is at sigmoid(beta * m) = 1 - ls instead of
    at m = +inf, so no pair's margin is pushed without bound. ls must be in [0, 0.5): at 0.5 the
    label carries no information, above it the loss prefers the rejected response. The
    rewards do not depend on ls.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) (the assumed probability that a preference "
                         f"label is flipped); got {label_smoothing}. Use 0 for plain DPO or e.g. 0.1 for cDPO")
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = reference_chosen_logps - reference_rejected_logps
    logits = pi_logratios - ref_logratios
    losses = -F.logsigmoid(beta * logits)
    if label_smoothing > 0:  # ls == 0 keeps the expression above untouched, bit for bit
        losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-beta * logits)
    chosen_rewards = (beta * (policy_chosen_logps - reference_chosen_logps)).detach()
    rejected_rewards = (beta * (policy_rejected_logps - reference_rejected_logps)).detach()
    return losses, chosen_rewards, rejected_rewards


# -----------------------------------------------------------------------------
# the beta head


def ppl_scale(ppl: torch.Tensor, ppl_transform: str = "ppl") -> torch.Tensor:
    """What beta scales with, (B,) fp32: the prompt PPL, or log PPL floored at 1e-3 ("log")."""
    return ppl.float().log().clamp(min=1e-3) if ppl_transform == "log" else ppl.float()


def beta_bounds(beta_mode: str, beta: float, beta_min: float | None = None,
                beta_max: float | None = None) -> tuple[float, float]:
    """The clamp [beta_min, beta_max] of a beta mode, a bound given as None taking the mode's default:
    none for fixed beta and epsilon-DPO, [beta/10, 10 beta] for learnable beta, and for beta-DPO the
    authors' floor 1e-3 (or beta/10, if lower) and no ceiling."""
    if beta_mode in ("fixed", "epsilon_dpo"):
        default_min, default_max = 0.0, math.inf
    elif beta_mode == "learnable":
        default_min, default_max = beta / 10, beta * 10
    else:
        default_min, default_max = min(1e-3, beta / 10), math.inf
    return (default_min if beta_min is None else beta_min, default_max if beta_max is None else beta_max)


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
        if nn_structure == "linear":
            self.nn = nn.Linear(hidden_size, 1)
        elif nn_structure == "mlp":
            self.nn = nn.Sequential(nn.Linear(hidden_size, mlp_hidden_size), nn.GELU(),
                                    nn.Linear(mlp_hidden_size, 1))
        else:
            raise ValueError(f"nn_structure must be 'linear' or 'mlp'; got {nn_structure!r}")
        last = self.nn if nn_structure == "linear" else self.nn[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

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


class JsonState:
    """Running statistics kept as a small JSON file beside the weights (FILE): evaluation needs
    some of them, resume all. Subclasses give state_dict() / load_state_dict() and FILE, WHAT."""
    FILE, WHAT = "", ""

    def save_pretrained(self, directory: str) -> None:
        with open(os.path.join(directory, self.FILE), "w") as f:
            json.dump(self.state_dict(), f, indent=2)

    @classmethod
    def from_pretrained(cls, directory: str):
        path = os.path.join(directory, cls.FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{directory} has no {cls.FILE} ({cls.WHAT}): it is not a checkpoint of this "
                                    "beta mode, was written before the file existed, or the file was lost; retrain")
        state = cls()
        with open(path) as f:
            state.load_state_dict(json.load(f))
        return state


class BetaDPO(JsonState):
    """Batch-level dynamic beta with data filtering: beta-DPO (Wu et al. 2024, arXiv 2407.08639),
    following the authors' code (junkangwu/beta-DPO, trainers.py: preference_loss and
    update_and_sync_tensor_mean). Per micro-batch, over the pairs of ALL processes (gathered):

        A_i   = (log pi - log ref)(y_w) - (log pi - log ref)(y_l)     raw reward gap, no beta
        M0    <- m * M0 + (1 - m) * mean(A),  sigma <- m * sigma + (1 - m) * std(A)
                 (from M0 = sigma = 0, updated BEFORE use; std unbiased; m = 0.9)
        keep  int(N * rho) pairs, drawn without replacement with probability proportional to
              exp(-((A_i - M0) / sigma)^2 / 2)                 (rho = 1 - the authors' mode_weight)
        beta  = beta0 * (1 + alpha * (mean of the KEPT A_i - M0)), no gradient

    and the loss is the mean over the kept pairs (of this process's slice). Departures, each a
    guard the authors' code lacks: at least one pair is kept; sigma = 0 (e.g. step 0, when the
    policy is still the reference and every A_i is 0) draws uniformly instead of dividing by 0;
    the draw uses its own generator seeded by (seed, number of calls), so every process draws the
    same pairs and a resumed run the same as an uninterrupted one. Evaluation neither filters nor
    updates M0 and sigma (the authors' loop updates them on eval batches too): beta there is
    beta0 * (1 + alpha * (mean(A) - M0)). The floor of beta (the authors' 1e-3) is the model's
    beta_min.
    """

    FILE, WHAT = "beta_dpo.json", "M0, sigma and the draw count of a beta_dpo run"

    def __init__(self, alpha: float = 0.6, rho: float = 0.8, momentum: float = 0.9, seed: int = 0):
        self.alpha, self.rho, self.momentum, self.seed = alpha, rho, momentum, seed
        self.m0, self.sigma, self.calls = 0.0, 0.0, 0

    def __call__(self, gaps: torch.Tensor, beta0: float, training: bool):
        """gaps (B,) this process's detached A_i -> (beta, a () tensor before any clamp; weights (B,) in
        {0, 1} marking the kept pairs of this slice, or None in evaluation)."""
        A, offset = _gather(gaps.float())
        if not training:
            return beta0 * (1 + self.alpha * (A.mean() - self.m0)), None
        m = self.momentum
        self.m0 = m * self.m0 + (1 - m) * A.mean().item()
        self.sigma = m * self.sigma + (1 - m) * (A.std().item() if len(A) > 1 else 0.0)
        z = (A - self.m0) / self.sigma if self.sigma > 0 else torch.zeros_like(A)
        p = (-0.5 * z.pow(2)).exp().clamp(min=1e-30).cpu()  # the floor keeps far outliers drawable
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.calls)
        self.calls += 1
        keep = torch.multinomial(p, max(1, int(len(A) * self.rho)), replacement=False, generator=g).to(A.device)
        beta = beta0 * (1 + self.alpha * (A[keep].mean() - self.m0))
        mask = torch.zeros_like(A).index_fill_(0, keep, 1.0)
        return beta, mask[offset:offset + len(gaps)]

    def state_dict(self) -> dict:
        return dict(alpha=self.alpha, rho=self.rho, momentum=self.momentum, seed=self.seed,
                    m0=self.m0, sigma=self.sigma, calls=self.calls)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)



def _gather(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(x of every process concatenated in rank order, this process's offset in it). Equal sizes."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts), dist.get_rank() * len(x)


# -----------------------------------------------------------------------------
# the model


class DynamicBetaDPOModel(nn.Module):
    """A policy, an optional BetaHead and a frozen reference, computing the DPO loss.

    beta_head=None is plain DPO with beta = `beta` everywhere, through the same code path;
    beta_dpo=BetaDPO(...) is the batch-level dynamic beta of beta-DPO, the published baseline;
    epsilon_dpo=EpsilonDPO(...) the per-pair beta of ε-DPO (it needs the reference model, not a
    cache). label_smoothing > 0 is cDPO's loss (dpo_loss), in any mode.
    The reference is kept outside the module tree (so it is never in state_dict(), the optimizer
    or a DDP wrapper); the caller places it on the device.

    Learnable-beta controls:
      beta_min, beta_max   beta is clamped to this range (the clamped fraction is reported); where
                           the clamp binds, mean((log beta_raw - log beta_clamped)^2) is added to the
                           loss, so a head pushed out of bounds still gets a gradient back in;
      beta_reg             adds beta_reg * mean((log beta_raw - log beta0)^2) to the loss, a pull
                           back to the fixed beta that also acts on clamped values;
      beta_grad_to_policy  False (default): PPL and h are detached, so the policy cannot lower
                           the loss by changing its own prompt perplexity to move beta.
    share_prompt=True runs each pair's prompt once for both responses (run_model's packed layout);
    False runs the padded (2B, T) batch as it is. Same values, different cost.
    """

    def __init__(self, policy_model: nn.Module, beta_head: BetaHead | None = None,
                 reference_model: nn.Module | None = None, beta: float = 0.1,
                 beta_min: float = 0.0, beta_max: float = math.inf, beta_reg: float = 0.0,
                 beta_grad_to_policy: bool = False, beta_dpo: "BetaDPO | None" = None,
                 share_prompt: bool = True, epsilon_dpo: "EpsilonDPO | None" = None, label_smoothing: float = 0.0):
        super().__init__()
        if sum(x is not None for x in (beta_head, beta_dpo, epsilon_dpo)) > 1:
            raise ValueError("a BetaHead (per-prompt beta), beta_dpo (batch-level beta) and epsilon_dpo (per-pair "
                             "beta) exclude each other")
        if beta <= 0:
            raise ValueError(f"beta must be > 0; got {beta}")
        if not beta_min < beta_max:
            raise ValueError(f"need beta_min < beta_max; got {beta_min} and {beta_max}")
        self.policy_model = policy_model
        self.beta_head = beta_head
        self.__dict__["reference_model"] = reference_model  # not a submodule, see docstring
        self.beta, self.beta_min, self.beta_max = beta, beta_min, beta_max
        self.beta_reg, self.beta_grad_to_policy = beta_reg, beta_grad_to_policy
        self.beta_dpo, self.epsilon_dpo = beta_dpo, epsilon_dpo
        self.share_prompt = share_prompt
        self.label_smoothing = label_smoothing

    def drop_reference(self) -> None:
        """Free the reference model: from now on forward() needs reference_logps (a cache), or a
        LoRA policy is its own reference."""
        self.__dict__["reference_model"] = None

    # --- the spec's methods: the prompt on its own -------------------------------------------

    def _prompt_stats(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        hidden = run_model(self.policy_model, input_ids, attention_mask)
        needed = (attention_mask[:, 1:] * attention_mask[:, :-1]).bool()
        logps = token_logps(hidden, self.policy_model.get_output_embeddings(), input_ids, needed)
        return masked_ppl(logps, attention_mask), last_token_hidden(hidden, attention_mask)

    def compute_ppl(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Policy perplexity of each prompt. input_ids, attention_mask (B, T) -> (B,)."""
        return self._prompt_stats(input_ids, attention_mask)[0]

    def get_dynamic_beta(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """beta(x) for each prompt, clamped to [beta_min, beta_max]. (B, T) -> (B,).

        Training does not call this: forward() reads the same PPL and h from its one forward.
        """
        ppl, h = self._prompt_stats(input_ids, attention_mask)
        return self.beta_from(ppl, h)[0]

    def beta_from(self, ppl: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(clamped beta, raw beta), each (B,) fp32, from prompt PPL (B,) and hidden state (B, H)."""
        if self.beta_head is None:
            beta = torch.full_like(ppl, self.beta, dtype=torch.float32)
            return beta, beta
        if not self.beta_grad_to_policy:
            ppl, h = ppl.detach(), h.detach()
        raw = self.beta_head(h, ppl)
        return raw.clamp(self.beta_min, self.beta_max), raw

    # --- training / evaluation -----------------------------------------------------------------

    def pair_layout(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_mask: torch.Tensor,
                    pack_plan: torch.Tensor | None = None, pack_unpack: torch.Tensor | None = None) -> dict | None:
        """pack_pairs' layout of a pair batch (2B, T) when prompts are shared: share_prompt is on
        and the policy (so its reference, the same architecture) takes the custom mask; else None.
        pack_plan, pack_unpack: collate's plan of it (data.plan_packing), when the batch has one."""
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
        beta, raw_beta = self.beta_from(ppl, h)

        steps = None
        if self.epsilon_dpo is not None:  # per-pair beta from the perturbed policies; the reference comes along
            if reference_logps is not None:
                raise ValueError("epsilon_dpo needs the reference model's logits, not cached reference log-probs")
            raw_beta, steps, reference_logps = self.epsilon_dpo_beta(hidden, input_ids, attention_mask, loss_mask, pack)
            beta = raw_beta.clamp(self.beta_min, self.beta_max)
        elif reference_logps is None:
            reference_logps = self.reference_logps(input_ids, attention_mask, loss_mask, pack)
        weights = None
        if self.beta_dpo is not None:  # batch-level beta from the raw reward gaps
            logratios = seq_logps.detach() - reference_logps
            raw_beta, weights = self.beta_dpo(logratios[:B] - logratios[B:], self.beta, self.training)
            raw_beta = raw_beta.expand(B)
            beta = raw_beta.clamp(self.beta_min, self.beta_max)

        losses, chosen_rewards, rejected_rewards = dpo_loss(
            seq_logps[:B], seq_logps[B:], reference_logps[:B], reference_logps[B:], beta,
            label_smoothing=self.label_smoothing)
        # beta-DPO: the mean over the kept pairs of this slice (none kept: 0, as in the authors' code)
        loss = losses.mean() if weights is None else (losses * weights).sum() / weights.sum().clamp(min=1)
        if self.beta_head is not None:
            # Learnable-beta departures. The clamp passes no gradient where it binds: once every raw
            # beta is out of bounds, w and the NN would never move again. This pull, zero inside the
            # bounds, brings a clamped beta back towards its bound and so keeps the head alive.
            loss = loss + (raw_beta.log() - beta.log()).pow(2).mean()
            if self.beta_reg > 0:  # a pull of log beta towards log beta_0 against the runaway
                loss = loss + self.beta_reg * (raw_beta.log() - math.log(self.beta)).pow(2).mean()

        stats = dict(
            losses=losses.detach(),
            chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards,
            policy_chosen_logps=seq_logps[:B].detach(), policy_rejected_logps=seq_logps[B:].detach(),
            reference_chosen_logps=reference_logps[:B].detach(),
            reference_rejected_logps=reference_logps[B:].detach(),
            beta=beta.detach(), raw_beta=raw_beta.detach(), ppl=ppl.detach(),
        )
        if steps is not None:  # -1: beta went up for this pair, +1: down, 0: unchanged
            stats["epsilon_steps"] = steps.float()
        return loss, stats

    @torch.no_grad()
    def epsilon_dpo_beta(self, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         loss_mask: torch.Tensor, pack: dict | None):
        """ε-DPO's per-pair beta (Lee et al. 2025) from the policy's final hidden states (2B, T, H) of
        this batch and the reference's, computed here -> (beta~ (B,), steps s (B,), reference
        sequence log-probs (2B,)). One lm_head pass over the response tokens gives the policy under
        beta/(1+eps), beta, beta/(1-eps) and the reference itself (lam = 0)."""
        B = input_ids.shape[0] // 2
        with self.as_reference() as reference:
            ref_hidden = run_model(reference, input_ids, attention_mask, pack)
            ref_head = reference.get_output_embeddings()  # LoRA leaves lm_head alone: the base one
        response = loss_mask[:, 1:].bool()
        mixed = mixed_token_logps(hidden.detach(), self.policy_model.get_output_embeddings(), ref_hidden,
                                  ref_head, input_ids, response, self.epsilon_dpo.coefs + (0.0,))
        seq = (mixed * response).sum(-1)  # (4, 2B)
        beta, steps = self.epsilon_dpo(seq[:3, :B], seq[:3, B:], self.training)
        return beta, steps, seq[3]


def run_model(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              pack: dict | None = None) -> torch.Tensor:
    """One forward of a Hugging Face causal LM -> final hidden states (N, T, H), without logits.

    logits_to_keep=[] skips the lm_head (token_logps applies it in chunks to the positions it
    needs); the last entry of hidden_states is the final norm's output, i.e. lm_head's input.
    Position ids are derived from the mask, so left- and right-padded rows give the same values.

    With pack (pack_pairs' layout of this batch, rows [:N/2] and [N/2:] pairs sharing a prompt)
    the forward runs on the packed rows: each prompt once, almost no padding. The hidden states
    come back in the padded (N, T) layout, the rejected rows' prompt positions holding the shared
    prompt's, so callers see no difference but the cost.
    """
    if pack is None:
        ids, mask = input_ids, attention_mask
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    else:
        ids, mask, position_ids = pack["input_ids"], pack["attention_mask"], pack["position_ids"]
        if model.config._attn_implementation == "eager":  # eager adds the mask to the scores
            mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, output_hidden_states=True,
                use_cache=False, logits_to_keep=torch.empty(0, dtype=torch.long, device=input_ids.device))
    hidden = out.hidden_states[-1]
    if pack is None:
        return hidden
    return hidden.flatten(0, 1)[pack["unpack"]].view(*input_ids.shape, hidden.shape[-1])


def can_pack(model: nn.Module) -> bool:
    """Whether run_model can give this model pack_pairs' 4D mask: its attention takes a custom mask
    (sdpa, eager; flash-attention kernels do not) and no layer uses a sliding window (the custom
    mask would replace the window)."""
    config = getattr(model, "config", None)
    return (getattr(config, "_attn_implementation", None) in ("sdpa", "eager")
            and getattr(config, "sliding_window", None) is None
            and "sliding_attention" not in (getattr(config, "layer_types", None) or []))


def pack_pairs(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_mask: torch.Tensor,
               plan: torch.Tensor | None = None, unpack: torch.Tensor | None = None) -> dict:
    """The shared-prompt layout of a pair batch (2B, T), rows [:B] prompt+chosen and [B:]
    prompt+rejected with equal prompts, for run_model.

    Each pair becomes one unit [prompt | chosen | rejected] (data.plan_packing) and a mask in which
    every token sees the earlier tokens of its unit except that rejected never sees chosen: each
    response attends to exactly the context it has in the padded layout, so the forward is the same
    function computed once per prompt instead of twice, and gradients through the prompt sum over
    both responses as they would. Padding slots attend only to themselves.
    plan, unpack: data.plan_packing's index tensors, already on the batch's device (collate makes
    them on the CPU): then nothing here copies to the host or waits on the device. Without them
    they are computed from the batch (a copy to the CPU). Returns input_ids, position_ids (R, L),
    attention_mask (R, 1, L, L), bool, True = may attend, formed on the device, and unpack (2B*T,).
    """
    device = input_ids.device
    if plan is None:
        plan, unpack = plan_packing(input_ids, attention_mask, prompt_mask)
        plan, unpack = plan.to(device), unpack.to(device)
    src, pos, part, unit = plan
    L = src.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    mask = ((unit[:, :, None] == unit[:, None, :]) & causal
            & ~((part[:, :, None] == 2) & (part[:, None, :] == 1)))
    return dict(input_ids=input_ids.flatten()[src], position_ids=pos, attention_mask=mask.unsqueeze(1), unpack=unpack)


def sequence_logps(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   loss_mask: torch.Tensor, pack: dict | None = None) -> torch.Tensor:
    """Summed log-probs (N,) of the tokens marked by loss_mask (N, T) under a causal LM
    (with pack: the pairs' packed layout, see run_model)."""
    hidden = run_model(model, input_ids, attention_mask, pack)
    response = loss_mask[:, 1:].bool()
    return (token_logps(hidden, model.get_output_embeddings(), input_ids, response) * response).sum(-1)


def summarize(stats: dict[str, torch.Tensor], beta0: float, beta_min: float = 0.0,
              beta_max: float = math.inf) -> dict[str, float]:
    """Scalar metrics from forward()'s per-example stats (possibly concatenated over batches).

    Names follow TRL's DPOTrainer. rewards/* use the beta that trained; rewards_beta0/* use the
    fixed beta0, so runs with different beta modes compare. Accuracy is beta-independent.
    """
    s = {k: v.float() for k, v in stats.items()}
    chosen_lr = s["policy_chosen_logps"] - s["reference_chosen_logps"]
    rejected_lr = s["policy_rejected_logps"] - s["reference_rejected_logps"]
    margin0 = beta0 * (chosen_lr - rejected_lr)
    out = {
        "loss": s["losses"].mean(),
        "loss_beta0": -F.logsigmoid(margin0).mean(),
        "rewards/chosen": s["chosen_rewards"].mean(),
        "rewards/rejected": s["rejected_rewards"].mean(),
        "rewards/accuracies": (s["chosen_rewards"] > s["rejected_rewards"]).float().mean(),
        "rewards/margins": (s["chosen_rewards"] - s["rejected_rewards"]).mean(),
        "rewards_beta0/chosen": (beta0 * chosen_lr).mean(),
        "rewards_beta0/rejected": (beta0 * rejected_lr).mean(),
        "rewards_beta0/margins": margin0.mean(),
        "logps/chosen": s["policy_chosen_logps"].mean(),
        "logps/rejected": s["policy_rejected_logps"].mean(),
        "beta/clamped_frac": ((s["raw_beta"] < beta_min) | (s["raw_beta"] > beta_max)).float().mean(),
    }
    if "epsilon_steps" in s:  # ε-DPO: the share of pairs whose beta went down (s = +1) and up (s = -1)
        out["epsilon_dpo/down_frac"] = (s["epsilon_steps"] > 0).float().mean()
        out["epsilon_dpo/up_frac"] = (s["epsilon_steps"] < 0).float().mean()
    for name in ("beta", "ppl"):
        v = s[name]
        out.update({f"{name}/mean": v.mean(), f"{name}/std": v.std(unbiased=False),
                    f"{name}/min": v.min(), f"{name}/max": v.max()})
    return {k: float(v) for k, v in out.items()}


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


# -----------------------------------------------------------------------------
# ε-DPO
#
# ε-DPO (Lee et al., "KL Penalty Control via Perturbation for Direct Preference Optimization",
# NeurIPS 2025, arXiv 2502.13177; the authors' code: github.com/oddqueue/e-dpo, trainer.py,
# EpsilonDPOTrainer) gives every pair its own beta, chosen by one test per step:
#
#   z_theta(x, y_w, y_l) = log pi_theta(y_w|x) - log pi_theta(y_l|x)       the logit of the policy as a
#   gamma(x, y_w, y_l)   = log pi_ref(y_w|x) - log pi_ref(y_l|x)           preference model (§3.2), with
#   P(y_w > y_l)         = sigmoid(beta * (z_theta - gamma))               beta as its inverse temperature
#
#   beta's perturbations (§3.2):  beta_eps^- = beta / (1 + eps)  (weaker KL penalty)
#                                 beta_eps^+ = beta / (1 - eps)  (stronger KL penalty)
#
#   the policy trained under a perturbed beta is estimated without training it, by Proposition 1
#   (from Liu et al. 2024, "Decoding-time realignment", arXiv 2402.02992): the optimal policy under
#   beta / lam is, per token, softmax(lam * f_theta + (1 - lam) * f_ref) with f the logits, so
#       pi(beta_eps^-) ~ prod_i softmax((1 + eps) f_theta - eps f_ref)[y_i]     Eq. (3)
#       pi(beta_eps^+) ~ prod_i softmax((1 - eps) f_theta + eps f_ref)[y_i]     Eq. (4)
#
#   the instance-level beta (Eq. (5)), from the strict monotonicity of z in beta:
#       beta~ = beta_eps^-   if z(beta_eps^-) > z(beta) > z(beta_eps^+)   the logit rises as beta falls
#               beta_eps^+   if z(beta_eps^-) < z(beta) < z(beta_eps^+)   the logit rises as beta rises
#               beta         otherwise
#   written here, as in the authors' code, as beta~_i = beta / (1 + eps * s_i) with s_i in {+1, -1, 0}
#   (the paper's Table 5 reports the mean of this s_i as "sgn(eps_i)");
#
#   the loss is DPO's with beta~ per pair, and after each optimizer step the baseline beta moves to
#   the mean of the beta~ of every pair in that step (Algorithm 1, line 5).
#
# The equation numbers (3)-(5) are those Algorithm 1 of the NeurIPS version cites ("according to 3
# and 4", "according to 5"). Defaults: eps = 0.01 (the authors' EpsilonDPOConfig; the paper's grid
# is 0.005, 0.01, 0.02 with beta = 0.01 on UltraFeedback, and eps = 0.01 on Anthropic-HH).
# The reference model must be live: the test needs the reference's full logits f_ref at every
# response position, which a cache of sequence log-probs does not hold.


def mixed_logps(policy_logits: torch.Tensor, reference_logits: torch.Tensor, targets: torch.Tensor,
                coefs: tuple[float, ...]) -> torch.Tensor:
    """The plain form of Proposition 1, for tests: log softmax(lam * f_theta + (1 - lam) * f_ref)[target]
    for each lam in coefs. policy_logits, reference_logits (..., V), targets (...) long -> (K, ...) fp32.

    lam = 1 + eps estimates the policy under beta / (1 + eps) (Eq. (3)), lam = 1 - eps the one under
    beta / (1 - eps) (Eq. (4)), lam = 1 is the policy itself and lam = 0 the reference. Materialises
    the (K, ..., V) mixes.
    """
    f, g = policy_logits.float(), reference_logits.float()
    t = targets.unsqueeze(-1)
    return torch.stack([(lam * f + (1 - lam) * g).log_softmax(-1).gather(-1, t).squeeze(-1) for lam in coefs])


@torch.no_grad()
def mixed_token_logps(policy_hidden: torch.Tensor, policy_lm_head: nn.Linear, reference_hidden: torch.Tensor,
                      reference_lm_head: nn.Linear, input_ids: torch.Tensor, needed: torch.Tensor,
                      coefs: tuple[float, ...]) -> torch.Tensor:
    """Per-token log-probs of the ε-DPO perturbed policies (Eqs. (3), (4)), only where needed.
    policy_hidden, reference_hidden (B, T, H) final hidden states of the same input_ids (B, T),
    needed (B, T-1) bool, coefs K mixing coefficients lam -> (K, B, T-1) fp32, zero where not needed.

    Entry [k, b, t] is log softmax(lam_k * f_theta + (1 - lam_k) * f_ref)[input_ids[b, t+1]], with
    f = lm_head(hidden[b, t]): token_logps' layout, one row per coefficient (mixed_logps' values).
    lam = 1 gives the policy's own log-probs and lam = 0 the reference's, each from its logits
    unmixed, so one call can also stand in for the reference's token_logps (its lm_head then runs
    once per step, not twice).

    Like token_logps, the (B, T, V) logits are never held: the needed positions go through both
    lm_heads a chunk at a time (matmuls in the autocast dtype when autocast is on, else the hidden
    states' dtype; the mix and its log-softmax normaliser in fp32). No gradient: ε-DPO uses these
    log-probs only to compare them (the authors' steps are booleans), so nothing is kept for backward.

    The mix is computed as f_theta + (lam - 1) * (f_theta - f_ref), algebraically the paper's
    lam * f_theta + (1 - lam) * f_ref, because it is exact where it matters: lam = 1 (and 0) are the
    logits themselves, and where the policy still equals the reference (step 0) every lam gives f_theta, so the
    three log-ratios tie and no pair's beta moves on rounding noise. (In the paper's form
    1.01 * f - 0.01 * f != f in floating point: on random fp32 logits with policy = reference, about
    1% of pairs then passed the strict test on rounding alone.)
    """
    h = policy_hidden[:, :-1][needed]
    r = reference_hidden[:, :-1][needed]
    targets = input_ids[:, 1:][needed]
    device = policy_hidden.device
    autocast = torch.is_autocast_enabled(device.type)
    p_dtype = torch.get_autocast_dtype(device.type) if autocast else h.dtype
    r_dtype = torch.get_autocast_dtype(device.type) if autocast else r.dtype

    def cast(head: nn.Linear, dtype: torch.dtype):  # once per call, like _LMHeadLogps
        return head.weight.to(dtype), None if head.bias is None else head.bias.to(dtype)

    wp, bp = cast(policy_lm_head, p_dtype)
    wr, br = cast(reference_lm_head, r_dtype)
    V = wp.shape[0]
    # about five fp32 (n, V) arrays live at once: f, the reference logits g, d, a mix, its log-softmax
    n = max(1, logits_budget(device) // (5 * 4 * V))
    flat = torch.empty(len(coefs), h.shape[0], dtype=torch.float32, device=device)
    with torch.autocast(device.type, enabled=False):  # the dtypes are chosen explicitly above
        for i in range(0, h.shape[0], n):
            t = targets[i:i + n, None]
            f = F.linear(h[i:i + n].to(p_dtype), wp, bp).float()
            g = F.linear(r[i:i + n].to(r_dtype), wr, br).float()
            d = f - g
            for k, lam in enumerate(coefs):
                mix = f if lam == 1 else g if lam == 0 else torch.add(f, d, alpha=lam - 1)
                flat[k, i:i + n] = torch.log_softmax(mix, -1).gather(-1, t).squeeze(-1)
    out = torch.zeros(len(coefs), *needed.shape, dtype=torch.float32, device=device)
    out[:, needed] = flat
    return out


def epsilon_dpo_steps(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> torch.Tensor:
    """The monotonicity test of ε-DPO (§3.2, Eq. (5)). chosen_logps, rejected_logps (3, B): sequence
    log-probs of y_w and y_l under the policies for lam = 1 + eps, 1, 1 - eps, i.e. under beta / (1 + eps),
    beta, beta / (1 - eps) -> s (B,) int64:

        +1  z(beta / (1 + eps)) > z(beta) > z(beta / (1 - eps))   lower beta separates y_w from y_l better
        -1  z(beta / (1 + eps)) < z(beta) < z(beta / (1 - eps))   higher beta does
         0  otherwise (not monotone, or a tie)

    with z = log pi(y_w) - log pi(y_l). The paper's logit z_theta - gamma would give the same answer:
    the reference's gamma is the same in all three and cancels. Strict inequalities, as in the paper
    and the authors' code.
    """
    z = chosen_logps.float() - rejected_logps.float()
    lower, now, higher = z[0], z[1], z[2]  # z under beta / (1 + eps), beta, beta / (1 - eps)
    down = (lower > now) & (now > higher)
    up = (lower < now) & (now < higher)
    return down.long() - up.long()


def epsilon_dpo_beta(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta: float,
                     epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The instance-level beta of ε-DPO (Eq. (5)). chosen_logps, rejected_logps (3, B) as for
    epsilon_dpo_steps, beta the current baseline -> (beta~ (B,) fp32, s (B,) int64), both without
    gradient: beta~_i = beta / (1 + epsilon * s_i), i.e. beta / (1 + eps), beta / (1 - eps) or beta.

    epsilon here is the step size; the neighbourhood checked is the eps of the coefficients that
    produced the log-probs. The paper uses one eps for both (its Table 5 ablates them apart, eps_c
    and eps_s, and finds the shared one best). s is what the baseline update needs
    (epsilon_dpo_baseline).
    """
    steps = epsilon_dpo_steps(chosen_logps, rejected_logps)
    return beta / (1 + epsilon * steps.float()), steps


def epsilon_dpo_baseline(beta: float, epsilon: float, n_down: int, n_up: int, n: int,
                         mean: str = "harmonic") -> float:
    """The baseline beta for the next step from the decisions s_i of all n pairs of this optimizer
    step (every micro-batch and process): n_down pairs with s = +1 (beta~ = beta / (1 + eps)), n_up
    with s = -1 (beta~ = beta / (1 - eps)), the rest with s = 0. n = 0 leaves beta as it is.

    Algorithm 1 (line 5) says beta <- E[beta~]. The authors' code instead sets
    beta <- beta / (1 + eps * mean(s)) (get_batch_loss_metrics, at each gradient sync), which is the
    HARMONIC mean of the beta~: 1 / beta_new = mean((1 + eps s_i) / beta) = mean(1 / beta~_i).
    The two agree to first order in eps, but the arithmetic mean drifts up even when decisions
    cancel: half the pairs each way gives beta / (1 - eps^2), +0.01% a step at eps = 0.01, about
    +10% over 1000 steps with no net signal. mean="harmonic" (default) is the authors' code, the
    update their results come from; mean="arithmetic" is the paper's text.
    """
    if n == 0:
        return beta
    if mean == "harmonic":
        return beta / (1 + epsilon * (n_down - n_up) / n)
    if mean == "arithmetic":
        return beta * (n_down / (1 + epsilon) + n_up / (1 - epsilon) + (n - n_down - n_up)) / n
    raise ValueError(f"mean must be 'harmonic' or 'arithmetic'; got {mean!r}")


class EpsilonDPO(JsonState):
    """The running state of ε-DPO: the baseline beta, which moves after every optimizer step, and the
    decisions counted since the last move. See the section comment above for the method.

        coefs                     (1 + eps, 1, 1 - eps): the lam to pass to mixed_token_logps; rows
                                  0, 1, 2 of its output are the policy under beta / (1 + eps), beta, beta / (1 - eps)
        __call__(chosen, rejected, training)
                                  (3, B) sequence log-probs -> (beta~ (B,), s (B,)); in training the
                                  decisions are counted for the next update_
        update_()                 after optimizer.step(): beta <- the mean of beta~ over every pair
                                  counted since the last update (all processes); returns the new beta
        discard_()                forget the counted decisions (a skipped, non-finite step: the
                                  policy did not move, so neither does beta)

    Evaluation computes beta~ from the current baseline but counts nothing (the authors' trainer also
    applies beta~ in its eval loss and moves beta only in training). step_epsilon, when given, is
    the paper's eps_s (Table 5): the size of the step beta / (1 + eps_s * s) while epsilon (eps_c)
    sets the neighbourhood checked; None uses epsilon for both, as the paper does by default.
    Departures from the authors' code: the mean runs over pairs, not over micro-batch means (the same
    when micro-batches are equal in size), and the rounding-exact mix of mixed_token_logps.
    """

    FILE, WHAT = "epsilon_dpo.json", "the running beta of an epsilon_dpo run"

    def __init__(self, beta: float = 0.1, epsilon: float = 0.01, step_epsilon: float | None = None,
                 mean: str = "harmonic"):
        if not beta > 0:
            raise ValueError(f"beta must be > 0; got {beta}")
        if not 0.0 < epsilon < 1.0:
            raise ValueError(f"epsilon must be in (0, 1) (beta / (1 - epsilon) must stay positive); got {epsilon}. "
                             "The authors' default is 0.01, their grid 0.005-0.02")
        if step_epsilon is not None and not 0.0 <= step_epsilon < 1.0:
            raise ValueError(f"step_epsilon must be in [0, 1) or None (= epsilon); got {step_epsilon}")
        if mean not in ("harmonic", "arithmetic"):
            raise ValueError(f"mean must be 'harmonic' (the authors' code) or 'arithmetic' (the paper's "
                             f"Algorithm 1); got {mean!r}")
        self.beta, self.epsilon, self.step_epsilon, self.mean = beta, epsilon, step_epsilon, mean
        self.pending: torch.Tensor | None = None  # (n_down, n_up, n) since the last update_
        self.updates = 0

    @property
    def coefs(self) -> tuple[float, float, float]:
        return (1 + self.epsilon, 1.0, 1 - self.epsilon)

    @property
    def step_size(self) -> float:
        return self.epsilon if self.step_epsilon is None else self.step_epsilon

    def __call__(self, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
                 training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        beta, steps = epsilon_dpo_beta(chosen_logps, rejected_logps, self.beta, self.step_size)
        if training:  # counted on the device, no sync per micro-batch
            counts = torch.stack([(steps == 1).sum(), (steps == -1).sum(), torch.tensor(steps.numel(), device=steps.device)])
            self.pending = counts if self.pending is None else self.pending.to(counts.device) + counts
        return beta, steps

    def update_(self) -> float:
        """Move the baseline beta (Algorithm 1, line 5); every process must call it at the same step."""
        if self.pending is None:
            return self.beta
        n_down, n_up, n = (int(v) for v in _gather(self.pending)[0].view(-1, 3).sum(0).tolist())
        self.beta = epsilon_dpo_baseline(self.beta, self.step_size, n_down, n_up, n, self.mean)
        self.pending = None
        self.updates += 1
        return self.beta

    def discard_(self) -> None:
        self.pending = None

    def state_dict(self) -> dict:
        return dict(beta=self.beta, epsilon=self.epsilon, step_epsilon=self.step_epsilon, mean=self.mean,
                    updates=self.updates, pending=None if self.pending is None else self.pending.tolist())

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)
        if self.pending is not None:
            self.pending = torch.tensor(self.pending, dtype=torch.long)
