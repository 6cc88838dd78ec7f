"""
ε-DPO (Lee et al. 2025, arXiv 2502.13177): a beta per pair from a perturbation test of the policy,
and a baseline beta that moves after every optimizer step. Pure functions, then the mode.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from beta_mode import BetaMode, BetaOut, JsonState, PairForward, gather_pairs
from logprobs import logits_budget, run_model


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


class EpsilonDPO(JsonState, BetaMode):
    """The running state of ε-DPO: the baseline beta, which moves after every optimizer step, and the
    decisions counted since the last move. See the section comment above for the method.

        coefs                     (1 + eps, 1, 1 - eps): the lam to pass to mixed_token_logps; rows
                                  0, 1, 2 of its output are the policy under beta / (1 + eps), beta, beta / (1 - eps)
        pair_beta(chosen, rejected, training)
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

    about = "per-pair beta from a perturbation test (Lee et al. 2025); needs the reference model"
    per_prompt = False  # beta comes from pairs of responses, not from a prompt alone

    @classmethod
    def add_flags(cls, group) -> None:
        group.add_argument("--epsilon_dpo_epsilon", type=float, default=0.01,
                           help="the perturbation beta/(1+eps), beta/(1-eps) checked per pair, also the step "
                                "of its beta (the authors' default 0.01)")

    @classmethod
    def check_flags(cls, args, error) -> None:
        if not 0 < args.epsilon_dpo_epsilon < 1:
            error(f"need 0 < --epsilon_dpo_epsilon < 1; got {args.epsilon_dpo_epsilon}")
        if args.beta_mode != "epsilon_dpo":
            return
        if args.precompute_ref:
            error("--beta_mode epsilon_dpo reads the reference model's logits at every response token: drop "
                  "--precompute_ref (its cache holds only sequence log-probs)")
        if args.fsdp != "none":
            error("--fsdp with --beta_mode epsilon_dpo is not supported yet (untested): use plain DDP (no --fsdp)")

    @classmethod
    def from_config(cls, cfg: dict, hidden_size: int | None) -> "EpsilonDPO":
        return cls(beta=cfg["beta"], epsilon=cfg["epsilon_dpo_epsilon"])

    @classmethod
    def describe(cls, cfg: dict) -> str:
        return f"ε-DPO (Lee et al. 2025), per-pair beta around {cfg['beta']}"

    @classmethod
    def from_pretrained(cls, directory: str, cfg: dict | None = None) -> "EpsilonDPO":
        """The running beta as saved; epsilon this run's flag (it may change on resume)."""
        mode = cls()
        mode.load_state(cls.read_state(directory))
        if "epsilon_dpo_epsilon" in (cfg or {}):
            mode.epsilon = cfg["epsilon_dpo_epsilon"]
        return mode

    @torch.no_grad()
    def forward(self, pairs: PairForward) -> BetaOut:
        """beta~ per pair from the policy's final hidden states of this batch and the reference's,
        computed here: one lm_head pass over the response tokens gives the policy under beta/(1+eps),
        beta, beta/(1-eps) and the reference itself (lam = 0), whose log-probs the loss then uses."""
        if pairs.reference is not None:
            raise ValueError("epsilon_dpo needs the reference model's logits, not cached reference log-probs")
        B = pairs.ppl.shape[0]
        with pairs.model.as_reference() as reference:
            ref_hidden = run_model(reference, pairs.input_ids, pairs.attention_mask, pairs.pack)
            ref_head = reference.get_output_embeddings()  # LoRA leaves lm_head alone: the base one
        response = pairs.loss_mask[:, 1:].bool()
        mixed = mixed_token_logps(pairs.hidden.detach(), pairs.model.policy_model.get_output_embeddings(), ref_hidden,
                                  ref_head, pairs.input_ids, response, self.coefs + (0.0,))
        seq = (mixed * response).sum(-1)  # (4, 2B)
        raw, steps = self.pair_beta(seq[:3, :B], seq[:3, B:], pairs.training)
        pairs.reference = seq[3]
        # steps: -1: beta went up for this pair, +1: down, 0: unchanged
        return BetaOut(raw.clamp(pairs.beta_min, pairs.beta_max), raw, stats=dict(epsilon_steps=steps.float()))


    def after_step(self, applied: bool) -> None:
        """Its beta moves with the policy, every process alike; a skipped step moves neither."""
        self.update_() if applied else self.discard_()

    def metrics(self, stats: dict) -> dict[str, float]:
        """The share of pairs whose beta went down (s = +1) and up (s = -1)."""
        if "epsilon_steps" not in stats:
            return {}
        s = stats["epsilon_steps"].float()
        return {"epsilon_dpo/down_frac": float((s > 0).float().mean()), "epsilon_dpo/up_frac": float((s < 0).float().mean())}

    def __init__(self, beta: float = 0.1, epsilon: float = 0.01, step_epsilon: float | None = None,
                 mean: str = "harmonic"):
        super().__init__()
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

    def pair_beta(self, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
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
        n_down, n_up, n = (int(v) for v in gather_pairs(self.pending)[0].view(-1, 3).sum(0).tolist())
        self.beta = epsilon_dpo_baseline(self.beta, self.step_size, n_down, n_up, n, self.mean)
        self.pending = None
        self.updates += 1
        return self.beta

    def discard_(self) -> None:
        self.pending = None

    def state(self) -> dict:
        return dict(beta=self.beta, epsilon=self.epsilon, step_epsilon=self.step_epsilon, mean=self.mean,
                    updates=self.updates, pending=None if self.pending is None else self.pending.tolist())

    def load_state(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)
        if self.pending is not None:
            self.pending = torch.tensor(self.pending, dtype=torch.long)
