"""
beta-DPO (Wu et al. 2024, arXiv 2407.08639), the published batch-level dynamic beta: a beta per
micro-batch from the pairs' reward gaps, and a filter that keeps the pairs near the running mean gap.
"""

import math

import torch

from beta_mode import BetaMode, BetaOut, JsonState, PairForward, gather_pairs


class BetaDPO(JsonState, BetaMode):
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
    beta0 * (1 + alpha * (mean(A) - M0)). The floor of beta (the authors' 1e-3) is the default
    --beta_min (bounds).
    """

    FILE, WHAT = "beta_dpo.json", "M0, sigma and the draw count of a beta_dpo run"


    about = "batch-level beta and pair filtering (Wu et al. 2024)"
    per_prompt = False  # beta comes from pairs of responses, not from a prompt alone

    @classmethod
    def bounds(cls, beta: float) -> tuple[float, float]:
        """The authors' floor 1e-3 (or beta/10, if lower), no ceiling."""
        return min(1e-3, beta / 10), math.inf

    @classmethod
    def add_flags(cls, group) -> None:
        group.add_argument("--beta_dpo_alpha", type=float, default=0.6,
                           help="beta = beta0 * (1 + alpha * (mean kept reward gap - M0)), the authors' a")
        group.add_argument("--beta_dpo_rho", type=float, default=0.8,
                           help="fraction of each batch kept by the filter, int(B * rho) pairs (the authors' "
                                "1 - mode_weight): a micro-batch of 8 keeps 6, of 4 keeps 3")

    @classmethod
    def check_flags(cls, args, error) -> None:
        if not 0 < args.beta_dpo_rho <= 1:
            error(f"--beta_dpo_rho must be in (0, 1]; got {args.beta_dpo_rho}")

    @classmethod
    def from_config(cls, cfg: dict, hidden_size: int | None) -> "BetaDPO":
        return cls(alpha=cfg.get("beta_dpo_alpha", 0.6), rho=cfg.get("beta_dpo_rho", 0.8), seed=cfg["seed"])

    @classmethod
    def describe(cls, cfg: dict) -> str:
        return f"beta-DPO (Wu et al. 2024), batch-level beta around {cfg['beta']} with pair filtering"

    @classmethod
    def from_pretrained(cls, directory: str, cfg: dict | None = None) -> "BetaDPO":
        """M0, sigma and the draw count as saved; alpha and rho this run's flags (like learning rates,
        they may change on resume)."""
        mode = cls()
        mode.load_state(cls.read_state(directory))
        if "beta_dpo_alpha" in (cfg or {}):
            mode.alpha, mode.rho = cfg["beta_dpo_alpha"], cfg["beta_dpo_rho"]
        return mode

    def forward(self, pairs: PairForward) -> BetaOut:
        B = pairs.ppl.shape[0]
        logratios = pairs.seq_logps.detach() - pairs.reference_logps()
        raw, weights = self.batch_beta(logratios[:B] - logratios[B:], pairs.beta0, pairs.training)
        raw = raw.expand(B)
        return BetaOut(raw.clamp(pairs.beta_min, pairs.beta_max), raw, weights)


    def __init__(self, alpha: float = 0.6, rho: float = 0.8, momentum: float = 0.9, seed: int = 0):
        super().__init__()
        self.alpha, self.rho, self.momentum, self.seed = alpha, rho, momentum, seed
        self.m0, self.sigma, self.calls = 0.0, 0.0, 0

    def batch_beta(self, gaps: torch.Tensor, beta0: float, training: bool):
        """gaps (B,) this process's detached A_i -> (beta, a () tensor before any clamp; weights (B,) in
        {0, 1} marking the kept pairs of this slice, or None in evaluation)."""
        A, offset = gather_pairs(gaps.float())
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

    def state(self) -> dict:
        return dict(alpha=self.alpha, rho=self.rho, momentum=self.momentum, seed=self.seed,
                    m0=self.m0, sigma=self.sigma, calls=self.calls)

    def load_state(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)
