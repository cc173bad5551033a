"""
Expert computation: given a routing decision, compute the experts.

    y = moe_ffn(x, token_idx, expert_idx, gates, w1, w3, w2, impl="auto")

    x:          (T, d)      token rows
    token_idx:  (A,) int64  token row of each kept assignment
    expert_idx: (A,) int64  expert of each kept assignment
    gates:      (A,)        gate weight of each assignment (fp32, differentiable)
    w1, w3:     (E, h, d)   gate_proj / up_proj of every expert (HF Llama names)
    w2:         (E, d, h)   down_proj
    y:          (T, d)      y[t] = sum_{a: token_idx[a]=t} gates[a] * W2_e (silu(W1_e x_t) * W3_e x_t)

Dropped assignments are simply absent (a token may appear 0..E times, as under
expert choice); a token with no assignment gets y[t] = 0 and keeps its residual only.

Every path has this signature and goes through autograd. The file reads in this order:
  "loop"     the readable reference: one gather + SwiGLU + scatter-add per expert.
  "grouped"  sort by expert once, gather, grouped GEMMs (ExpertRows), scatter-add;
             a custom autograd.Function with a hand-written backward.
  "triton"   fused kernels (experts_triton.py, imported on first use only).
  "auto"     auto_impl(device, dtype) picks; MOE_KERNEL_IMPL=loop|grouped|triton
             overrides it (tests force a path through a whole model with it).
Then the dispatch (moe_ffn) and Lory's expert merge (merge_experts, merged_ffn).
"""
import contextlib
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

IMPL_ENV = "MOE_KERNEL_IMPL"      # overrides impl="auto" (tests force paths with it)


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


# =============================================================================
# shared: sort the assignments by expert once

def sort_by_expert(token_idx, expert_idx, n_experts):
    """Group the A assignments by expert without a host sync.

    Returns order (A,) (assignment index in expert-sorted position; stable, so each
    expert keeps the original assignment order), tok_s = token_idx[order] (A,),
    counts (E,) assignments per expert, ends (E,) = cumsum(counts): expert e owns
    sorted positions [ends[e] - counts[e], ends[e])."""
    order = torch.argsort(expert_idx, stable=True)                      # (A,)
    tok_s = token_idx[order]                                            # (A,)
    # scatter_add instead of bincount: bincount syncs with the host on CUDA (max())
    counts = torch.zeros(n_experts, dtype=torch.int64, device=expert_idx.device)
    counts.scatter_add_(0, expert_idx, torch.ones_like(expert_idx))     # (E,)
    ends = torch.cumsum(counts, 0)                                      # (E,)
    return order, tok_s, counts, ends


# =============================================================================
# "grouped": sort once, gather, grouped GEMMs, scatter-add

PAD_WASTE = 1.5    # "grouped" pads experts to one size (one bmm per GEMM) if that adds <= 50% rows


def _grouped_mm_ok(device, dtype, dims):
    """torch's grouped GEMM is fast for bf16 on CUDA sm90+ (CUTLASS); on CPU it runs
    (all dtypes) but is several times slower than torch.mm over the expert slices
    (bench.py --impls=grouped_mm). Strides must be multiples of 16 bytes."""
    if not hasattr(F, "grouped_mm") or device.type != "cuda" or dtype != torch.bfloat16:
        return False
    if torch.cuda.get_device_capability(device) < (9, 0):
        return False
    return all(n % 8 == 0 for n in dims)


class ExpertRows:
    """Where the expert-sorted rows live, and how the grouped GEMMs run over them.

    "grouped_mm": R = A rows, expert e owns rows [ends[e-1], ends[e]); torch's grouped
                  GEMM with offs = ends (int32): no host sync.
    "slices":     the same rows; one torch.mm per expert slice (counts: python list).
    "padded":     R = E * cap rows, expert e's r-th assignment at row e * cap + r, so
                  every GEMM is ONE torch.bmm over (E, cap, .) views. Padding rows are
                  zeros (gather) with gate 0: they cost FLOPs (at most PAD_WASTE - 1
                  extra) and contribute exactly nothing (a copy of a real token could
                  overflow in fp16, and 0 * inf is NaN).
    tok (R,): token row of each row; pos (A,): row of each sorted assignment (None
    when rows == sorted assignments)."""

    def __init__(self, backend, tok_s, counts, ends, counts_list=None):
        self.backend, self.E, self.pos, self.tok, self.tok_s = backend, counts.shape[0], None, tok_s, tok_s
        if backend == "grouped_mm":
            self.offs = ends.to(torch.int32)
            return
        self.counts = counts_list if counts_list is not None else counts.tolist()   # host sync
        if backend == "padded":
            A = tok_s.shape[0]
            self.cap = max(self.counts) if A else 0
            ex_s = torch.repeat_interleave(torch.arange(self.E, device=counts.device), counts, output_size=A)
            rank = torch.arange(A, device=counts.device) - (ends - counts)[ex_s]
            self.pos = ex_s * self.cap + rank                           # (A,)
            self.tok = tok_s.new_zeros(self.E * self.cap).index_copy_(0, self.pos, tok_s)   # (R,)

    def gather(self, x):
        """(T, d) token rows -> (R, d) rows in expert order (padding rows zero)."""
        return self.from_sorted(x.index_select(0, self.tok_s))

    def from_sorted(self, v):
        """(A, ...) values in sorted-assignment order -> (R, ...) rows (padding rows 0)."""
        if self.pos is None:
            return v
        return v.new_zeros((self.tok.shape[0],) + v.shape[1:]).index_copy_(0, self.pos, v)

    def to_sorted(self, v):
        """(R, ...) rows -> (A, ...) values in sorted-assignment order."""
        return v if self.pos is None else v[self.pos]

    def mm(self, a, w):
        """a (R, K) @ w (E, K, N) -> (R, N): each expert's rows times its matrix."""
        if self.backend == "grouped_mm":
            return F.grouped_mm(a, w, offs=self.offs)
        if self.backend == "padded":
            E = self.E
            return torch.bmm(a.view(E, self.cap, a.shape[1]), w).view(a.shape[0], w.shape[2])
        out = a.new_empty(a.shape[0], w.shape[2])
        start = 0
        for e, n in enumerate(self.counts):
            if n:
                torch.mm(a[start:start + n], w[e], out=out[start:start + n])
            start += n
        return out

    def mm_tn(self, a, b):
        """a (R, M), b (R, N) -> (E, M, N): out[e] = a_e^T b_e over expert e's rows
        (the weight gradients); an expert without rows gets zeros."""
        if self.backend == "grouped_mm":
            return F.grouped_mm(a.t(), b, offs=self.offs)
        if self.backend == "padded":
            E = self.E
            return torch.bmm(a.view(E, self.cap, a.shape[1]).transpose(1, 2), b.view(E, self.cap, b.shape[1]))
        out = a.new_empty(self.E, a.shape[1], b.shape[1])
        start = 0
        for e, n in enumerate(self.counts):
            if n:
                torch.mm(a[start:start + n].t(), b[start:start + n], out=out[e])
            else:
                out[e].zero_()
            start += n
        return out


class GroupedMoE(torch.autograd.Function):
    """Sorted-and-gathered MoE SwiGLU with a hand-written backward.

    Saves the gathered rows xs, the pre-activations h1, h3, the activation a and
    the ungated expert outputs ys (for dgates) -- about what autograd of the dense
    SwiGLU keeps -- and never differentiates through index ops (no autograd of
    gather/index_add, no per-expert graph)."""

    @staticmethod
    def forward(ctx, x, gates, w1, w3, w2, order, rows, out_dtype):
        T, d = x.shape
        acc = torch.promote_types(x.dtype, torch.float32)
        row_gates = rows.from_sorted(gates[order].to(acc))              # (R,) gate of each row
        xs = rows.gather(x)                                             # (R, d) gather
        h1 = rows.mm(xs, w1.transpose(1, 2))                            # (R, h)
        h3 = rows.mm(xs, w3.transpose(1, 2))                            # (R, h)
        a = F.silu(h1).mul_(h3)                                         # (R, h)
        ys = rows.mm(a, w2.transpose(1, 2))                             # (R, d) ungated outputs
        y = torch.zeros(T, d, dtype=acc, device=x.device)               # (T, d) fp32 accumulator
        y.index_add_(0, rows.tok, ys.to(acc) * row_gates[:, None])      # gate + scatter-add
        ctx.save_for_backward(gates, w1, w3, w2, order, row_gates, xs, h1, h3, a,
                              ys if ctx.needs_input_grad[1] else None)
        ctx.rows, ctx.T = rows, T
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, gy):                                              # gy (T, d)
        gates, w1, w3, w2, order, row_gates, xs, h1, h3, a, ys = ctx.saved_tensors
        rows = ctx.rows
        need_x, need_g, need_w1, need_w3, need_w2 = ctx.needs_input_grad[:5]
        compute_dtype, acc = xs.dtype, row_gates.dtype
        dy_rows = rows.gather(gy).to(acc)                               # (R, d) gather of dy
        dgates = None
        if need_g:
            dg = rows.to_sorted((dy_rows * ys.to(acc)).sum(1))          # (A,) <dy_t, expert out>
            dgates = torch.empty_like(gates).index_copy_(0, order, dg.to(gates.dtype))
        gated_dy_rows = dy_rows.mul_(row_gates[:, None]).to(compute_dtype)   # (R, d)
        dw2 = rows.mm_tn(gated_dy_rows, a) if need_w2 else None         # (E, d, h)
        dx = dw1 = dw3 = None
        if need_x or need_w1 or need_w3:
            da = rows.mm(gated_dy_rows, w2)                             # (R, h)
            dh3 = da * F.silu(h1)                                       # (R, h)
            dh1 = torch.ops.aten.silu_backward(da.mul_(h3), h1)         # (R, h) da*h3*silu'(h1)
            if need_x:
                dxs = rows.mm(dh1, w1)                                  # (R, d)
                dxs += rows.mm(dh3, w3)
                dx = torch.zeros(ctx.T, xs.shape[1], dtype=acc, device=xs.device)
                dx = dx.index_add_(0, rows.tok, dxs.to(acc)).to(compute_dtype)   # scatter-add to tokens
            dw1 = rows.mm_tn(dh1, xs) if need_w1 else None              # (E, h, d)
            dw3 = rows.mm_tn(dh3, xs) if need_w3 else None
        return dx, dgates, dw1, dw3, dw2, None, None, None


def moe_ffn_grouped(x, token_idx, expert_idx, gates, w1, w3, w2, gemm="auto", out_dtype=None):
    """Sort by expert once, gather, grouped GEMMs, scatter-add (see module doc).
    gemm: "auto" | "grouped_mm" | "padded" | "slices" (tests force each on CPU).
    auto: grouped_mm where it is fast (bf16, CUDA sm90+); slices on a single CPU
    thread (E small mm calls without thread barriers); else padded when padding every
    expert to the largest adds at most PAD_WASTE - 1 rows (one bmm is one parallel
    region / kernel launch instead of E of them), else slices."""
    E, h, d = w1.shape
    if gemm not in ("auto", "grouped_mm", "padded", "slices"):
        raise ValueError(f"unknown grouped gemm backend {gemm!r}")
    order, tok_s, counts, ends = sort_by_expert(token_idx, expert_idx, E)
    counts_list = None
    if gemm == "auto":
        if _grouped_mm_ok(x.device, x.dtype, (h, d)):
            gemm = "grouped_mm"
        elif x.device.type == "cpu" and torch.get_num_threads() == 1:
            gemm = "slices"
        else:
            counts_list = counts.tolist()                               # host sync
            gemm = "padded" if E * max(counts_list) <= PAD_WASTE * tok_s.shape[0] else "slices"
    rows = ExpertRows(gemm, tok_s, counts, ends, counts_list)
    return GroupedMoE.apply(x, gates, w1, w3, w2, order, rows, out_dtype or x.dtype)


# =============================================================================
# "triton": the fused kernels of experts_triton.py

def triton_status():
    """(usable, reason): can the Triton path run here? Never raises."""
    try:
        import triton  # noqa: F401  (lazy: only when asked)
    except Exception as e:   # ImportError, or a broken install
        return False, f"triton is not importable ({type(e).__name__}: {e})"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, f"triton {triton.__version__} in interpreter mode (TRITON_INTERPRET=1; slow, for tests)"
    if not torch.cuda.is_available():
        return False, "triton needs a CUDA GPU (or TRITON_INTERPRET=1 for the CPU interpreter)"
    return True, f"triton {triton.__version__}"


def moe_ffn_triton(x, token_idx, expert_idx, gates, w1, w3, w2, out_dtype=None):
    """Fused Triton path (experts_triton.py). Raises RuntimeError if triton cannot
    run here (use impl="auto" for a clean fallback)."""
    ok, why = triton_status()
    if not ok:
        raise RuntimeError(f"impl='triton' is unavailable: {why}")
    import experts_triton   # the one lazy import: `import experts` never imports triton
    perm, tok_s, counts, ends = sort_by_expert(token_idx, expert_idx, w1.shape[0])
    return experts_triton.fused_moe(x, gates, w1, w3, w2, perm, tok_s, counts, ends, out_dtype or x.dtype)


# =============================================================================
# dispatch

IMPLS = {"loop": moe_ffn_loop, "grouped": moe_ffn_grouped, "triton": moe_ffn_triton}


def moe_ffn(x, token_idx, expert_idx, gates, w1, w3, w2, impl="auto"):
    """Compute the routed experts with the chosen implementation (see module doc)."""
    dev = x.device.type
    autocast = dev in ("cuda", "cpu", "mps", "xpu") and torch.is_autocast_enabled(dev)
    dtype = torch.get_autocast_dtype(dev) if autocast else x.dtype
    if impl == "auto":
        impl = auto_impl(x.device, dtype)[0]
    if impl not in IMPLS:
        raise ValueError(f"unknown expert kernel impl {impl!r}; valid: {sorted(IMPLS) + ['auto']}")
    if impl == "loop":
        return IMPLS["loop"](x, token_idx, expert_idx, gates, w1, w3, w2)
    return call_in_compute_dtype(IMPLS[impl], x, token_idx, expert_idx, gates, w1, w3, w2, dtype, autocast)


def call_in_compute_dtype(fn, x, token_idx, expert_idx, gates, w1, w3, w2, dtype, autocast):
    """Run a custom-Function path (grouped, triton) in the compute dtype: under autocast
    cast x and the weights to it (differentiably) and switch autocast off inside; y comes
    back in x's original dtype. Without autocast x and the weights must share a dtype."""
    out_dtype = x.dtype
    if autocast:
        x, w1, w3, w2 = (t.to(dtype) for t in (x, w1, w3, w2))
    elif not (w1.dtype == w3.dtype == w2.dtype == x.dtype):
        raise ValueError(f"x ({x.dtype}) and expert weights ({w1.dtype}, {w3.dtype}, {w2.dtype}) "
                         "must share a dtype (or run under torch.autocast)")
    with torch.autocast(x.device.type, enabled=False) if autocast else contextlib.nullcontext():
        return fn(x, token_idx, expert_idx, gates, w1, w3, w2, out_dtype=out_dtype)


def auto_impl(device, dtype):
    """Pick the fastest available path for this device and dtype: (name, reason).

    Not CUDA: "grouped" (padded bmm or per-expert mm; Triton runs on CPU only in its
    interpreter). CUDA: "grouped" on torch's CUTLASS grouped GEMM for bf16 on sm90+;
    else the fused Triton kernels for bf16/fp16 (tensor cores) when triton imports;
    else "grouped" (fp32: cuBLAS beats Triton's exact-fp32 FMA dots). `python bench.py`
    compares all paths on the machine at hand.
    The environment variable MOE_KERNEL_IMPL (loop|grouped|triton) overrides it."""
    forced = os.environ.get(IMPL_ENV, "auto") or "auto"
    if forced != "auto":
        return forced, f"forced by {IMPL_ENV}={forced}"
    device = torch.device(device)
    dname = str(dtype).replace("torch.", "")
    if device.type != "cuda":
        return "grouped", (f"{device.type} {dname}: sort-once grouped GEMMs (padded bmm or per-expert mm); "
                           "Triton needs a CUDA GPU")
    cap = torch.cuda.get_device_capability(device)
    name = f"{torch.cuda.get_device_name(device)} sm_{cap[0]}{cap[1]} {dname}"
    if hasattr(F, "grouped_mm") and dtype == torch.bfloat16 and cap >= (9, 0):
        return "grouped", f"{name}: torch grouped_mm (CUTLASS grouped GEMM, no host sync)"
    ok, why = triton_status()
    if ok and dtype in (torch.bfloat16, torch.float16):
        return "triton", f"{name}: fused Triton gather-GEMM-SwiGLU / GEMM-gate-scatter kernels"
    why = "fp32: cuBLAS GEMMs" if ok else why
    return "grouped", f"{name}: padded bmm / per-expert GEMMs ({why})"


# =============================================================================
# Lory: merge the experts in parameter space

class MergedExperts(NamedTuple):
    """One merged SwiGLU per (sequence, segment): w1, w3 (B, S, h, d), w2 (B, S, d, h)."""
    w1: torch.Tensor
    w3: torch.Tensor
    w2: torch.Tensor


def merge_experts(weights, w1, w3, w2):
    """Lory expert merging (arXiv 2405.03133 eq. 2; SMEAR): theta_bar = sum_e w_e theta_e
    per segment. weights (B, S, E) (rows sum to 1); w1, w3 (E, h, d), w2 (E, d, h).
    Cost: E*3*h*d multiply-adds per segment."""
    weights = weights.to(w1.dtype)
    return MergedExperts(torch.einsum("bse,ehd->bshd", weights, w1),    # (B, S, h, d)
                         torch.einsum("bse,ehd->bshd", weights, w3),
                         torch.einsum("bse,edh->bsdh", weights, w2))    # (B, S, d, h)


def merged_swiglu(x, merged):
    """x (B, S, L, d) through each segment's merged SwiGLU -> (B, S, L, d)."""
    a = F.silu(x @ merged.w1.transpose(-1, -2)) * (x @ merged.w3.transpose(-1, -2))   # (B, S, L, h)
    return a @ merged.w2.transpose(-1, -2)                                            # (B, S, L, d)


def merged_ffn(x, weights, w1, w3, w2):
    """Lory's FFN: per segment, merge the expert stacks with that segment's weights
    (merge_experts) and apply one SwiGLU with the merged weights (merged_swiglu).

    x:       (B, S, L, d)  S segments of L tokens
    weights: (B, S, E)     merge weights (rows sum to 1)
    w1, w3:  (E, h, d);  w2: (E, d, h)
    returns  (B, S, L, d)
    Cost: one merge per segment, about E/L of the FFN's own cost per token.
    Generation merges once, from the prompt, and keeps the MergedExperts.
    """
    return merged_swiglu(x, merge_experts(weights, w1, w3, w2))
