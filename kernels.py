"""
Expert computation: given a routing decision, compute the experts.

Every path shares one signature and goes through autograd (forward + backward):

    y = moe_ffn(x, token_idx, expert_idx, gates, w1, w3, w2, impl="auto")

    x:          (T, d)      token rows
    token_idx:  (A,) int64  token row of each kept assignment
    expert_idx: (A,) int64  expert of each kept assignment
    gates:      (A,)        gate weight of each assignment (fp32, differentiable)
    w1, w3:     (E, h, d)   gate_proj / up_proj of every expert (HF Llama names)
    w2:         (E, d, h)   down_proj
    y:          (T, d)      y[t] = sum_{a: token_idx[a]=t} gates[a] * W2_e (silu(W1_e x_t) * W3_e x_t)

Dropped assignments are simply absent, so capacity dropping and the expert-choice
router's per-expert token lists need nothing special. A token with no assignment
gets y[t] = 0 and passes through the residual only.

impl="loop" is the readable reference: one gather + SwiGLU + scatter per expert.
"""
import torch
import torch.nn.functional as F


def swiglu(x, w1, w3, w2):
    """Dense SwiGLU FFN: W2 (silu(W1 x) * W3 x). x (..., d), w1/w3 (h, d), w2 (d, h)."""
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def moe_ffn_loop(x, token_idx, expert_idx, gates, w1, w3, w2):
    """Reference: loop over experts, gather each expert's tokens, apply its SwiGLU,
    scatter-add the gated outputs back. Slow for many experts, but obviously right."""
    y = torch.zeros_like(x)                                             # (T, d)
    for e in range(w1.shape[0]):
        sel = (expert_idx == e).nonzero().squeeze(1)                    # assignments of expert e
        if sel.numel() == 0:
            continue
        rows = token_idx[sel]
        out = swiglu(x[rows], w1[e], w3[e], w2[e])                      # (n_e, d)
        y = y.index_add(0, rows, (out * gates[sel, None]).to(y.dtype))
    return y


IMPLS = {"loop": moe_ffn_loop}


def moe_ffn(x, token_idx, expert_idx, gates, w1, w3, w2, impl="auto"):
    """Compute the routed experts with the chosen implementation (see module doc)."""
    if impl == "auto":
        impl = auto_impl(x.device, x.dtype)[0]
    if impl not in IMPLS:
        raise ValueError(f"unknown expert kernel impl {impl!r}; valid: {sorted(IMPLS) + ['auto']}")
    return IMPLS[impl](x, token_idx, expert_idx, gates, w1, w3, w2)


def auto_impl(device, dtype):
    """Pick the fastest available path for this device and dtype: (name, reason)."""
    return "loop", "only the reference loop is available"


def merged_ffn(x, weights, w1, w3, w2):
    """Lory expert merging (arXiv 2405.03133 eq. 2; SMEAR): per segment, merge the
    expert stacks with that segment's weights and apply one SwiGLU.

    x:       (B, S, L, d)  S segments of L tokens
    weights: (B, S, E)     merge weights (rows sum to 1)
    w1, w3:  (E, h, d);  w2: (E, d, h)
    returns  (B, S, L, d)
    Cost: one merge (E*3*h*d multiply-adds) per segment, i.e. about E/L of the
    FFN's own cost per token; then batched matmuls with the merged weights.
    """
    weights = weights.to(w1.dtype)
    m1 = torch.einsum("bse,ehd->bshd", weights, w1)                     # (B, S, h, d)
    m3 = torch.einsum("bse,ehd->bshd", weights, w3)
    m2 = torch.einsum("bse,edh->bsdh", weights, w2)                     # (B, S, d, h)
    a = F.silu(x @ m1.transpose(-1, -2)) * (x @ m3.transpose(-1, -2))   # (B, S, L, h)
    return a @ m2.transpose(-1, -2)                                     # (B, S, L, d)
