"""
The DPO loss (Eq. 7 of the DPO paper, with cDPO's label smoothing) as a pure function of four
log-prob tensors and beta, and the per-pair metrics in TRL's vocabulary.

dpo_loss never knows how beta was chosen: a float, or a (B,) tensor from any beta mode.
"""

import math

import torch
import torch.nn.functional as F


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


def summarize(stats: dict[str, torch.Tensor], beta0: float, beta_min: float = 0.0,
              beta_max: float = math.inf) -> dict[str, float]:
    """Scalar metrics from forward()'s per-example stats (possibly concatenated over batches).

    Names follow TRL's DPOTrainer. rewards/* use the beta that trained; rewards_beta0/* use the
    fixed beta0, so runs with different beta modes compare. Accuracy is beta-independent. A beta
    mode adds its own metrics (BetaMode.metrics).
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
    for name in ("beta", "ppl"):
        v = s[name]
        out.update({f"{name}/mean": v.mean(), f"{name}/std": v.std(unbiased=False),
                    f"{name}/min": v.min(), f"{name}/max": v.max()})
    return {k: float(v) for k, v in out.items()}
