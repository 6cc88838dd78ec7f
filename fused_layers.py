"""
Decoder layers that keep less for backward. Autograd keeps, per Llama / Qwen2 decoder layer, four
(tokens, intermediate) tensors of the gated MLP down_proj(silu(gate_proj(x)) * up_proj(x)) — gate,
silu(gate), up and their product — and x, 1/rms and the normalised x of each of its two RMSNorms
(weight * x / sqrt(mean(x^2) + eps), in fp32). Gate and up, and x and 1/rms, suffice: the rest is
a few elementwise ops away. Two autograd functions keep only those and recompute the rest in
backward:

  _SwiGLUDown   the MLP's product and down_proj: the same values and gradients, bit for bit (the
                same ops in the same order)
  _RMSNorm      the same values; gradients equal to fp32 rounding but not bit for bit: the three
                gradients that reach x (the norm's two paths and the residual) are summed in
                another order than autograd's

tests/test_fused_layers.py checks both on the tiny Qwen2 and on SmolLM2's real weights. A 4-pair
SmolLM2-135M step (fp32, HH-RLHF) keeps 1.09 GB for backward instead of 1.67 GB, 0.83 GB of which
were the MLPs' four tensors. fuse_layers(model) patches a Hugging Face model in place; train.py
does it for the policy unless --no_fused_layers.
"""

import types

import torch
import torch.nn as nn
import torch.nn.functional as F


class _SwiGLUDown(torch.autograd.Function):
    """down(silu(gate) * up): gate, up (..., I) -> (..., H), weight (H, I), bias (H,) or None.

    Under autocast the product and the matmul run in `dtype` (autocast's, as down_proj would); the
    weight is cast once and that copy kept, as autocast keeps its own for backward.
    """

    @staticmethod
    def forward(ctx, gate, up, weight, bias, dtype):
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        act = F.silu(gate) * up
        out = F.linear(act.to(dtype), w, b)
        ctx.save_for_backward(gate, up, w)
        ctx.has_bias, ctx.weight_dtype = bias is not None, weight.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        gate, up, w = ctx.saved_tensors
        silu = F.silu(gate)
        act = (silu * up).to(w.dtype)
        g = grad_out.to(w.dtype)
        grad_act = (g @ w).to(silu.dtype)
        grad_w = g.reshape(-1, g.shape[-1]).T @ act.reshape(-1, act.shape[-1])
        grad_b = g.reshape(-1, g.shape[-1]).sum(0) if ctx.has_bias else None
        grad_gate = torch.ops.aten.silu_backward(grad_act * up, gate)
        grad_up = grad_act * silu
        return (grad_gate, grad_up, grad_w.to(ctx.weight_dtype),
                None if grad_b is None else grad_b.to(ctx.weight_dtype), None)


def swiglu_down(gate: torch.Tensor, up: torch.Tensor, down_proj: nn.Linear) -> torch.Tensor:
    """down_proj(silu(gate) * up), keeping only gate and up for backward."""
    device = gate.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else gate.dtype
    with torch.autocast(device, enabled=False):  # the dtype is chosen explicitly above
        return _SwiGLUDown.apply(gate, up, down_proj.weight, down_proj.bias, dtype)


def is_swiglu(module: nn.Module) -> bool:
    """A Llama-style gated MLP whose down_proj is a plain Linear (a LoRA-wrapped one is left alone)."""
    act = getattr(module, "act_fn", None)
    return (all(isinstance(getattr(module, k, None), nn.Module) for k in ("gate_proj", "up_proj"))
            and type(getattr(module, "down_proj", None)) is nn.Linear
            and (isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"))


class _RMSNorm(torch.autograd.Function):
    """x (..., H) any float dtype, weight (H,) -> weight * (x32 * rstd).to(x.dtype), as Hugging Face's."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        x32 = x.to(torch.float32)
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, rstd, weight)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, rstd, weight = ctx.saved_tensors
        normed = x.to(torch.float32) * rstd
        normed_in = normed.to(x.dtype)  # what the forward multiplied the weight by
        grad_weight = (grad_out * normed_in).sum_to_size(weight.shape)
        g = (grad_out * weight).to(x.dtype).to(torch.float32)  # back through the cast to x's dtype
        # d/dx of x * rstd(x): rstd * (g - normed * mean(g * normed))
        grad_x = rstd * (g - normed * (g * normed).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight, None


def is_rmsnorm(module: nn.Module) -> bool:
    """Llama's or Qwen2's RMSNorm (the same computation under two class names)."""
    return type(module).__name__ in ("LlamaRMSNorm", "Qwen2RMSNorm")


def fuse_layers(model: nn.Module) -> tuple[int, int]:
    """Make every gated SiLU MLP of model run through swiglu_down and every Llama / Qwen2 RMSNorm
    through _RMSNorm. Returns how many (MLPs, norms) were patched."""
    mlps = norms = 0
    for m in model.modules():  # bound methods: a deepcopy of the model binds them to the copy
        if is_swiglu(m):
            m.forward, mlps = types.MethodType(_mlp_forward, m), mlps + 1
        elif is_rmsnorm(m):
            m.forward, norms = types.MethodType(_norm_forward, m), norms + 1
    return mlps, norms


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    return swiglu_down(self.gate_proj(x), self.up_proj(x), self.down_proj)


def _norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    return _RMSNorm.apply(x, self.weight, self.variance_epsilon)
