"""
Centred beta (E4, issue 28): a learnable beta that can only move beta between prompts, never scale it.

    log beta_i = log beta0 + z_i - mean(z),   z_i = s * tanh(NN(h_i))

h_i is the policy's last hidden state at the prompt's last token (detached), NN a linear layer or a
small MLP whose last layer starts at zero (so beta = beta0 everywhere at step 0), s the largest
log-ratio one prompt can take from the others' mean (beta stays within beta0 * exp(+-2 s)).

Why: DPO's dL/dbeta = -m * sigmoid(-beta * m) is negative wherever the policy already prefers the
chosen response (m > 0), so an unconstrained head's cheapest move is to raise every beta together:
the study found the spec's f(h) acting as one more global scale. Here the mean of log beta over
each micro-batch is log beta0 by construction, so the head can only lower some prompts' beta to
raise others': the pairs the policy disagrees with (m < 0, noisy ones among them) want a lower beta,
the others a higher one. There is no PPL term (the study found prompt PPL to be prompt length in
disguise).

A single prompt has no batch to centre on: evaluation and prompt_beta centre on a running mean of
z over the training micro-batches (momentum --centered_momentum), which training updates.
"""

import json
import math
import os

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from beta_head import norms, small_nn
from beta_mode import BetaMode, BetaOut, PairForward


class CenteredBeta(BetaMode):
    """Centred beta: log beta = log beta0 + z - mean(z), z = s * tanh(NN(h)); the batch's geometric mean is beta0."""

    about = "log beta = log beta0 + z - mean(z), z = s * tanh(NN(h)): beta moves between prompts, its mean stays beta0"
    resume_keys = ("centered_nn", "centered_scale")
    FILE = "centered_beta.safetensors"

    def __init__(self, hidden_size: int, nn_structure: str = "linear", scale: float = 1.5, momentum: float = 0.99,
                 mlp_hidden_size: int = 256):
        super().__init__()
        if not scale > 0:
            raise ValueError(f"scale must be > 0; got {scale}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1); got {momentum}")
        self.hidden_size, self.nn_structure, self.scale, self.momentum = hidden_size, nn_structure, scale, momentum
        self.mlp_hidden_size = mlp_hidden_size
        self.nn = small_nn(hidden_size, nn_structure, mlp_hidden_size)  # starts at 0: beta = beta0 everywhere
        self.register_buffer("running_z", torch.zeros(()))  # the running mean of z that single prompts centre on

    # --- flags and state -----------------------------------------------------------------------

    @classmethod
    def add_flags(cls, group) -> None:
        group.add_argument("--centered_nn", default="linear", choices=["linear", "mlp"], help="the NN of z")
        group.add_argument("--centered_scale", type=float, default=1.5,
                           help="s in z = s * tanh(NN(h)): beta lies within beta0 * exp(+-2 s)")
        group.add_argument("--centered_head_lr", type=float, default=1e-4, help="peak AdamW learning rate of the NN")
        group.add_argument("--centered_momentum", type=float, default=0.99,
                           help="momentum of the running mean of z that evaluation and single prompts centre on")

    @classmethod
    def check_flags(cls, args, error) -> None:
        if not args.centered_scale > 0 or not args.centered_head_lr > 0:
            error(f"need --centered_scale > 0 and --centered_head_lr > 0; got {args.centered_scale}, {args.centered_head_lr}")
        if not 0 <= args.centered_momentum < 1:
            error(f"--centered_momentum must be in [0, 1); got {args.centered_momentum}")

    @classmethod
    def describe(cls, cfg: dict) -> str:
        return (f"centred learnable beta: log beta = log {cfg['beta']} + z(h) - mean(z), z = "
                f"{cfg.get('centered_scale')} * tanh(NN(h)) (a {cfg.get('centered_nn')} NN)")

    @classmethod
    def from_config(cls, cfg: dict, hidden_size: int) -> "CenteredBeta":
        return cls(hidden_size, cfg["centered_nn"], cfg["centered_scale"], cfg["centered_momentum"])

    def config(self) -> dict:
        return dict(hidden_size=self.hidden_size, nn_structure=self.nn_structure, scale=self.scale,
                    momentum=self.momentum, mlp_hidden_size=self.mlp_hidden_size)

    def save_pretrained(self, directory: str) -> None:
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, os.path.join(directory, self.FILE), metadata={"config": json.dumps(self.config())})

    @classmethod
    def from_pretrained(cls, directory: str, cfg: dict | None = None) -> "CenteredBeta":
        """The NN and the running mean as saved; the momentum this run's flag (it may change on resume)."""
        path = os.path.join(directory, cls.FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{directory} has no {cls.FILE}: it is not a centered-beta checkpoint, or the file was lost")
        with safe_open(path, "pt") as f:
            mode = cls(**json.loads(f.metadata()["config"]))
        mode.load_state_dict(load_file(path))
        if cfg and "centered_momentum" in cfg:
            mode.momentum = cfg["centered_momentum"]
        return mode

    def param_groups(self, cfg: dict) -> list[dict]:
        return [dict(params=list(self.nn.parameters()), lr=cfg["centered_head_lr"], weight_decay=0.0, name="centered_beta")]

    # --- beta ----------------------------------------------------------------------------------

    def z(self, h: torch.Tensor) -> torch.Tensor:
        """z = s * tanh(NN(h)), (B, H) -> (B,) fp32, h detached (the policy cannot move beta)."""
        with torch.autocast(h.device.type, enabled=False):  # fp32, also inside a bf16 autocast region
            return self.scale * torch.tanh(self.nn(h.detach().float()).squeeze(-1))

    def prompt_beta(self, ppl: torch.Tensor, h: torch.Tensor, beta0: float, beta_min: float = 0.0,
                    beta_max: float = math.inf) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts on their own: centred on the running mean of z."""
        beta = beta0 * torch.exp(self.z(h) - self.running_z)
        return beta, beta

    def forward(self, pairs: PairForward) -> BetaOut:
        z = self.z(pairs.h)
        if not pairs.training:
            beta = pairs.beta0 * torch.exp(z - self.running_z)
            return BetaOut(beta, beta)
        mean = z.mean()
        with torch.no_grad():
            self.running_z.mul_(self.momentum).add_((1 - self.momentum) * mean.detach())
        beta = pairs.beta0 * torch.exp(z - mean)
        return BetaOut(beta, beta)

    def metrics(self, stats: dict) -> dict[str, float]:
        return {"centered/running_z": float(self.running_z)}

    @torch.no_grad()
    def train_metrics(self) -> dict[str, torch.Tensor]:
        return {"centered/running_z": self.running_z.clone(),
                **{f"centered/{k}": v for k, v in norms(list(self.nn.parameters())).items()}}
