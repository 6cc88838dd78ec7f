"""
Log-probs of a causal LM, computed once and cheaply: the one forward (packed pairs), the chunked
lm-head log-softmax, sequence log-probs, the prompt's perplexity and its last hidden state.

Training, evaluation and the reference cache all read their log-probs through these functions:
there is no second copy. Full-vocabulary logits (B, T, V) are never built.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from batching import plan_packing


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

    Each pair becomes one unit [prompt | chosen | rejected] (batching.plan_packing) and a mask in which
    every token sees the earlier tokens of its unit except that rejected never sees chosen: each
    response attends to exactly the context it has in the padded layout, so the forward is the same
    function computed once per prompt instead of twice, and gradients through the prompt sum over
    both responses as they would. Padding slots attend only to themselves.
    plan, unpack: batching.plan_packing's index tensors, already on the batch's device (collate makes
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
