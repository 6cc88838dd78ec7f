"""
The beta modes by the name --beta_mode takes: the one place a mode is looked up.

A mode is a subclass of beta_mode.BetaMode in a file of its own; adding one is that file and one
line below. train.py's --beta_mode choices, its flags and their checks, build_model, checkpoints
and evaluate.py all read this table.
"""

import math

from beta_dpo import BetaDPO
from beta_head import LearnableBeta
from beta_mode import BetaMode
from centered_beta import CenteredBeta
from epsilon_dpo import EpsilonDPO

BETA_MODES = {
    "fixed": BetaMode,          # DPO with a constant beta (TRL's sigmoid loss)
    "learnable": LearnableBeta,  # beta(x) = w * PPL(x) * f(h(x)), the BetaHead
    "beta_dpo": BetaDPO,        # batch-level beta and pair filtering (Wu et al. 2024)
    "epsilon_dpo": EpsilonDPO,  # per-pair beta from a perturbation test (Lee et al. 2025)
    "centered": CenteredBeta,   # beta redistributed between prompts, its batch mean held at beta0 (E4)
}


def beta_bounds(beta_mode: str, beta: float, beta_min: float | None = None,
                beta_max: float | None = None) -> tuple[float, float]:
    """The clamp [beta_min, beta_max] of a run, a bound given as None taking its mode's default
    (BetaMode.bounds: none for fixed beta and epsilon-DPO, [beta/10, 10 beta] for learnable beta,
    and for beta-DPO the authors' floor 1e-3, or beta/10 if lower, and no ceiling)."""
    default_min, default_max = BETA_MODES[beta_mode].bounds(beta)
    return (default_min if beta_min is None else beta_min, default_max if beta_max is None else beta_max)


def is_bounded(beta_mode: str) -> bool:
    """Whether the mode clamps beta by default, and so takes --beta_min and --beta_max."""
    return BETA_MODES[beta_mode].bounds(1.0) != (0.0, math.inf)
