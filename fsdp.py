"""
Sharded and whole tensors: FSDP2 sharding of the policy (--fsdp; the BetaHead and the reference
stay whole), gathering shards into whole tensors for checkpoints and back, and the gradient
clipping and finiteness checks that work on sharded and whole tensors alike (every run uses them).
"""

import math

import torch
import torch.nn as nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.tensor import DTensor

from data import DataError


def shard_policy(policy: nn.Module, reshard_after_forward: bool) -> None:
    """fully_shard each transformer block (the model's _no_split_modules), then the policy itself
    (embeddings, final norm, lm_head). In place: parameters become DTensor shards."""
    from torch.distributed.fsdp import fully_shard
    names = set(getattr(policy, "_no_split_modules", None) or [])
    blocks = [m for m in policy.modules() if type(m).__name__ in names]
    if not blocks:
        raise DataError(f"--fsdp: {type(policy).__name__} names no transformer block class (_no_split_modules); "
                        "run without --fsdp")
    for m in blocks:
        fully_shard(m, reshard_after_forward=reshard_after_forward)
    # the policy's own parameters stay gathered after its forward: token_logps applies lm_head after it
    fully_shard(policy, reshard_after_forward=False)


def full(t):
    """A DTensor shard gathered into the whole tensor (a collective: every process calls it), the
    gather finished before it returns; other tensors as they are."""
    if not isinstance(t, DTensor):
        return t
    whole = t.full_tensor()
    # an unfinished functional collective still writes into its buffer: a caller that drops the
    # result at once (gathered(keep=False)) must not free it first, so wait here
    return whole.wait() if isinstance(whole, AsyncCollectiveTensor) else whole


def gathered(tensors: dict, keep: bool) -> dict | None:
    """Each tensor of `tensors` whole, on the CPU (full(): a collective, so every process calls it,
    one tensor at a time, in the same order); keep=False (every process but the main one) drops each
    gathered copy at once and returns None, so only the process that writes the checkpoint ever holds
    the whole state in host memory (~21 GB for the 1.5B model with AdamW's moments)."""
    out = {} if keep else None
    for k, v in tensors.items():
        whole = full(v)
        if keep:
            out[k] = whole.cpu()
        del whole
    return out


def gathered_optimizer_state(optimizer, keep: bool = True) -> dict | None:
    """optimizer.state_dict() with every sharded state tensor gathered (all processes call it), so
    that a checkpoint holds whole tensors whatever the sharding; None where keep is False."""
    sd = optimizer.state_dict()
    states = {i: gathered(s, keep) for i, s in sd["state"].items()}
    if not keep:
        return None
    sd["state"] = states
    return sd


def shard_optimizer_state(sd: dict, optimizer) -> dict:
    """The inverse: whole state tensors cut to the shards of this process's DTensor parameters."""
    from torch.distributed.tensor import distribute_tensor
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, s in sd["state"].items():
        p = params[i]
        if isinstance(p, DTensor):
            sd["state"][i] = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements) if v.dim() else v
                              for k, v in s.items()}
    return sd


def clip_grad_norm_(params: list, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_, also for sharded (DTensor, --fsdp) and whole gradients
    together, which torch's own cannot mix. Returns the total norm before clipping (every process
    the same)."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.stack([full(g.norm()).float() for g in grads]).norm()
    coef = float((max_norm / (total + 1e-6)).clamp(max=1.0))  # the step's one device sync here
    plain = [g for g in grads if not isinstance(g, DTensor)]
    if plain:
        torch._foreach_mul_(plain, coef)  # one fused launch, not one per parameter
    for g in grads:
        if isinstance(g, DTensor):
            g.mul_(coef)
    return total


def all_finite(params: list) -> bool:
    """Whether every value of these (possibly sharded) tensors is finite: one max-norm per tensor
    (it cannot overflow, and it is inf or nan exactly when some value is)."""
    local = [t for t in ((p.to_local() if isinstance(p, DTensor) else p).detach() for p in params) if t.numel()]
    return not local or bool(torch.stack(torch._foreach_norm(local, math.inf)).isfinite().all())
