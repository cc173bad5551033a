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
router's per-expert token lists (a token may appear 0..E times) need nothing
special. A token with no assignment gets y[t] = 0 and passes through the residual only.

Implementations (impl=...):

  "loop"     the readable reference: one gather + SwiGLU + scatter per expert,
             differentiated by autograd. Obviously right, slow for many experts.
  "grouped"  sort the assignments by expert once, gather the token rows, run the
             expert matmuls as grouped GEMMs, scatter-add the gated results back.
             A custom autograd.Function (_GroupedMoE) with a hand-written backward.
             The grouped GEMMs (_Rows) are torch's grouped GEMM (F.grouped_mm with
             `offs`: no host sync; bf16 on CUDA sm90+), else one torch.bmm over the
             experts padded to the largest one (when that adds <= 50% rows), else
             one torch.mm per expert slice. On CPU torch's grouped_mm runs but is
             several times slower than either (bench.py --impls=grouped_mm).
  "triton"   fused Triton kernels in the style of ScatterMoE (Tan et al. 2024,
             arXiv 2403.08245) and vLLM's fused_moe: the gather of token rows is
             fused into the first GEMM's loads, SwiGLU into its epilogue, the gate
             multiply and the scatter(-add) into the second GEMM's epilogue; the
             backward (dX, dW1, dW3, dW2, dgates) is fused the same way. Triton is
             imported lazily, on first use: `import kernels` never imports it.
  "auto"     auto_impl(device, dtype) picks; the environment variable
             MOE_KERNEL_IMPL=loop|grouped|triton overrides "auto" (tests use it to
             force a path through a whole model).

Under torch.autocast the non-loop paths cast x and the expert weights to the
autocast dtype themselves (a custom Function is not autocast by torch), and
return y in x's original dtype, as the loop path does.
"""
import contextlib
import functools
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

IMPL_ENV = "MOE_KERNEL_IMPL"      # overrides impl="auto" (tests force paths with it)
tl = _block_tile = None           # set by _triton_kernels() on first use of the Triton path


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


class _Rows:
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
        return self.rows(x.index_select(0, self.tok_s))

    def rows(self, v):
        """(A, ...) sorted values -> (R, ...) rows (padding rows 0)."""
        if self.pos is None:
            return v
        return v.new_zeros((self.tok.shape[0],) + v.shape[1:]).index_copy_(0, self.pos, v)

    def unrows(self, v):
        """(R, ...) rows -> (A, ...) sorted values."""
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


class _GroupedMoE(torch.autograd.Function):
    """Sorted-and-gathered MoE SwiGLU with a hand-written backward.

    Saves the gathered rows xs, the pre-activations h1, h3, the activation a and
    the ungated expert outputs ys (for dgates) -- about what autograd of the dense
    SwiGLU keeps -- and never differentiates through index ops (no autograd of
    gather/index_add, no per-expert graph)."""

    @staticmethod
    def forward(ctx, x, gates, w1, w3, w2, order, L, out_dtype):
        T, d = x.shape
        acc = torch.promote_types(x.dtype, torch.float32)
        g_r = L.rows(gates[order].to(acc))                              # (R,) gate of each row
        xs = L.gather(x)                                                # (R, d) gather
        h1 = L.mm(xs, w1.transpose(1, 2))                               # (R, h)
        h3 = L.mm(xs, w3.transpose(1, 2))                               # (R, h)
        a = F.silu(h1).mul_(h3)                                         # (R, h)
        ys = L.mm(a, w2.transpose(1, 2))                                # (R, d) ungated outputs
        y = torch.zeros(T, d, dtype=acc, device=x.device)               # (T, d) fp32 accumulator
        y.index_add_(0, L.tok, ys.to(acc) * g_r[:, None])               # gate + scatter-add
        ctx.save_for_backward(gates, w1, w3, w2, order, g_r, xs, h1, h3, a,
                              ys if ctx.needs_input_grad[1] else None)
        ctx.L, ctx.T = L, T
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, gy):                                              # gy (T, d)
        gates, w1, w3, w2, order, g_r, xs, h1, h3, a, ys = ctx.saved_tensors
        L = ctx.L
        need_x, need_g, need_w1, need_w3, need_w2 = ctx.needs_input_grad[:5]
        dt, acc = xs.dtype, g_r.dtype
        gys = L.gather(gy).to(acc)                                      # (R, d) gather of dy
        dgates = None
        if need_g:
            dg = L.unrows((gys * ys.to(acc)).sum(1))                    # (A,) <dy_t, expert out>
            dgates = torch.empty_like(gates).index_copy_(0, order, dg.to(gates.dtype))
        gysg = gys.mul_(g_r[:, None]).to(dt)                            # (R, d) gated dy
        dw2 = L.mm_tn(gysg, a) if need_w2 else None                     # (E, d, h)
        dx = dw1 = dw3 = None
        if need_x or need_w1 or need_w3:
            da = L.mm(gysg, w2)                                         # (R, h)
            dh3 = da * F.silu(h1)                                       # (R, h)
            dh1 = torch.ops.aten.silu_backward(da.mul_(h3), h1)         # (R, h) da*h3*silu'(h1)
            if need_x:
                dxs = L.mm(dh1, w1)                                     # (R, d)
                dxs += L.mm(dh3, w3)
                dx = torch.zeros(ctx.T, xs.shape[1], dtype=acc, device=xs.device)
                dx = dx.index_add_(0, L.tok, dxs.to(acc)).to(dt)        # scatter-add back to tokens
            dw1 = L.mm_tn(dh1, xs) if need_w1 else None                 # (E, h, d)
            dw3 = L.mm_tn(dh3, xs) if need_w3 else None
        return dx, dgates, dw1, dw3, dw2, None, None, None


def moe_ffn_grouped(x, token_idx, expert_idx, gates, w1, w3, w2, gemm="auto", out_dtype=None):
    """Sort by expert once, gather, grouped GEMMs, scatter-add (see module doc).
    gemm: "auto" | "grouped_mm" | "padded" | "slices" (tests force each on CPU).
    auto: grouped_mm where it is fast (bf16, CUDA sm90+); slices on a single CPU
    thread; else padded when padding every expert to the largest adds at most
    PAD_WASTE - 1 rows, else slices. Measured on 2 loaded CPU cores (bench.py,
    E=64, 30% padding): padded 1.4x the dense FFN, slices 2.4x; on 1 thread slices
    1.3x, padded 1.6x: E small mm calls are E parallel regions, and on a busy
    machine each one can wait a scheduler slice for a descheduled thread."""
    E, h, d = w1.shape
    if gemm not in ("auto", "grouped_mm", "padded", "slices"):
        raise ValueError(f"unknown grouped gemm backend {gemm!r}")
    order, tok_s, counts, ends = sort_by_expert(token_idx, expert_idx, E)
    cl = None
    if gemm == "auto":
        if _grouped_mm_ok(x.device, x.dtype, (h, d)):
            gemm = "grouped_mm"
        elif x.device.type == "cpu" and torch.get_num_threads() == 1:
            gemm = "slices"                                             # no waste, no thread barriers
        else:   # one bmm is one parallel region / kernel launch instead of E of them
            cl = counts.tolist()                                        # host sync
            gemm = "padded" if E * max(cl) <= PAD_WASTE * tok_s.shape[0] else "slices"
    L = _Rows(gemm, tok_s, counts, ends, cl)
    return _GroupedMoE.apply(x, gates, w1, w3, w2, order, L, out_dtype or x.dtype)


# =============================================================================
# "triton": fused gather-GEMM-SwiGLU / GEMM-gate-scatter kernels

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


@functools.cache
def _triton_kernels():
    """Define (once) and return the Triton kernels. They live inside this function
    so that `import kernels` never imports triton.

    Design (ScatterMoE, arXiv 2403.08245, and vLLM fused_moe): the A assignments are
    sorted by expert (sort_by_expert); each program of the "row" kernels owns a block
    of BLOCK_M consecutive sorted assignments of ONE expert (blocks are padded per
    expert: an expert with n rows gets ceil(n / BLOCK_M) blocks, the last one partly
    masked), described by two small tables built on the device without a host sync:
    blk_expert[b] (-1 for unused trailing blocks, which exit at once) and blk_start[b].
    Token rows are never materialised in sorted order: the first GEMM loads them
    straight from x through tok_s (gather fused into the loads); the second GEMM
    multiplies by the gate and atomically adds into the fp32 output rows (gate and
    scatter fused into the epilogue). All products accumulate in fp32.
    """
    # `tl` and the helper _block_tile become module globals (set here, on first use):
    # Triton's interpreter re-executes kernel source against the module's globals
    # and does not see closure variables.
    global tl, _block_tile
    import triton
    import triton.language as tl

    interpret = os.environ.get("TRITON_INTERPRET") == "1"

    def configs(kind):
        """Autotune configs. The interpreter gets one small config (each launch costs
        seconds there). On a GPU: "acc2" kernels keep two (BLOCK_M, BLOCK_N) fp32
        accumulators or load two extra tiles in the epilogue, so they use 8 warps and
        BLOCK_N = 64 (checked spill-free on sm_90 by `python bench.py --compile-only=90`);
        "xty" (weight gradients) also tiles its output rows."""
        if kind == "xty":
            if interpret:
                return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=4, num_stages=1)]
            return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
                    for bm, bn, bk, w, s in [(128, 128, 32, 8, 3), (128, 64, 32, 4, 4),
                                             (64, 128, 32, 4, 4), (128, 128, 64, 8, 3)]]
        if interpret:
            return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)]
        tiles = {"acc2": [(64, 64, 8, 3), (64, 64, 8, 4), (64, 32, 8, 4), (128, 64, 8, 3), (64, 64, 4, 3)],
                 "acc1": [(64, 64, 4, 4), (128, 64, 8, 3), (128, 32, 4, 4), (64, 32, 4, 5), (128, 64, 4, 3)]}[kind]
        return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
                for bn, bk, w, s in tiles]

    @triton.jit
    def _block_tile(pid, n_blocks_m, N, blk_expert_ptr, blk_start_ptr, ends_ptr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """The tile a "row" kernel program owns: BLOCK_M sorted assignments of expert e
        (rows, rmask) times BLOCK_N output columns (cols, cmask). e < 0 marks an unused
        trailing block; the caller returns at once. Programs are launched in grouped
        ("swizzled") order, as in the Triton matmul tutorial: GROUP_M consecutive row
        blocks sweep the column tiles together, so the expert's weight tiles stay in L2."""
        n_blocks_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * n_blocks_n
        first_m = (pid // per_group) * GROUP_M
        size_m = tl.minimum(n_blocks_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % size_m
        pid_n = (pid % per_group) // size_m
        e = tl.load(blk_expert_ptr + pid_m)
        start = tl.load(blk_start_ptr + pid_m)
        end = tl.load(ends_ptr + tl.maximum(e, 0))                      # (e < 0: any valid read)
        rows = start + tl.arange(0, BLOCK_M)                            # sorted positions
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        return e, pid_n, rows, rows < end, cols, cols < N

    @triton.autotune(configs=configs("acc2"), key=["N", "K", "BLOCK_M"])
    @triton.jit
    def gather_up_swiglu(x_ptr, w1_ptr, w3_ptr, tok_ptr, blk_expert_ptr, blk_start_ptr, ends_ptr,
                         h1_ptr, h3_ptr, a_ptr, n_blocks_m, N, K,
                         stride_xt, stride_xk, stride_we, stride_wn, stride_wk, stride_hm, stride_hn,
                         SAVE_PRE: tl.constexpr, PREC: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr):
        """Forward GEMM 1 (both up projections) for one block of sorted assignments:
            h1 = x[tok] @ W1[e]^T, h3 = x[tok] @ W3[e]^T   (BLOCK_M, BLOCK_N) tiles of (A, h)
            a  = silu(h1) * h3                             SwiGLU in the epilogue
        x rows are gathered inside the loads (never materialised in sorted order)."""
        e, pid_n, rows, rmask, cols, cmask = _block_tile(tl.program_id(0), n_blocks_m, N, blk_expert_ptr,
                                                         blk_start_ptr, ends_ptr, BLOCK_M, BLOCK_N, GROUP_M)
        if e < 0:                                    # unused trailing block
            return
        tok = tl.load(tok_ptr + rows, mask=rmask, other=0)              # token row of each
        ks = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + tok[:, None] * stride_xt + ks[None, :] * stride_xk          # (BM, BK)
        w_off = e.to(tl.int64) * stride_we + cols[None, :] * stride_wn + ks[:, None] * stride_wk  # (BK, BN)
        acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kmask = ks < K - k0
            xt = tl.load(x_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
            w1t = tl.load(w1_ptr + w_off, mask=kmask[:, None] & cmask[None, :], other=0.0)
            w3t = tl.load(w3_ptr + w_off, mask=kmask[:, None] & cmask[None, :], other=0.0)
            acc1 = tl.dot(xt, w1t, acc1, input_precision=PREC)
            acc3 = tl.dot(xt, w3t, acc3, input_precision=PREC)
            x_ptrs += BLOCK_K * stride_xk
            w_off += BLOCK_K * stride_wk
        act = acc1 * tl.sigmoid(acc1) * acc3                            # silu(h1) * h3
        out_off = rows[:, None] * stride_hm + cols[None, :] * stride_hn
        omask = rmask[:, None] & cmask[None, :]
        tl.store(a_ptr + out_off, act.to(a_ptr.dtype.element_ty), mask=omask)
        if SAVE_PRE:                                 # kept for the backward
            tl.store(h1_ptr + out_off, acc1.to(h1_ptr.dtype.element_ty), mask=omask)
            tl.store(h3_ptr + out_off, acc3.to(h3_ptr.dtype.element_ty), mask=omask)

    @triton.autotune(configs=configs("acc1"), key=["N", "K", "BLOCK_M", "DUAL"], reset_to_zero=["out_ptr"])
    @triton.jit
    def gemm_gate_scatter(a1_ptr, b1_ptr, a2_ptr, b2_ptr, out_ptr, tok_ptr, perm_ptr, gates_ptr,
                          blk_expert_ptr, blk_start_ptr, ends_ptr, n_blocks_m, N, K,
                          stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_ot, stride_on,
                          DUAL: tl.constexpr, SCALE: tl.constexpr, PREC: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          GROUP_M: tl.constexpr):
        """GEMM over sorted rows with the gate and the scatter in the epilogue:
            out[tok[r]] += gate[perm[r]] * (A1[r] @ B1[e] (+ A2[r] @ B2[e]))
        A1/A2 (A, K) in sorted order, B1/B2 (E, K, N) given by strides, out (T, N) fp32.
        Forward GEMM 2: A1 = a, B1 = W2^T, SCALE.   Backward dX: A1 = dh1, B1 = W1,
        A2 = dh3, B2 = W3 (DUAL), no gate. Rows of one token come from different
        programs, so they meet in atomic adds (fp32; order-dependent for >2 terms)."""
        e, pid_n, rows, rmask, cols, cmask = _block_tile(tl.program_id(0), n_blocks_m, N, blk_expert_ptr,
                                                         blk_start_ptr, ends_ptr, BLOCK_M, BLOCK_N, GROUP_M)
        if e < 0:
            return
        ks = tl.arange(0, BLOCK_K)
        a_off = rows[:, None].to(tl.int64) * stride_am + ks[None, :] * stride_ak   # (BM, BK)
        b_off = e.to(tl.int64) * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kmask = ks < K - k0
            amask = rmask[:, None] & kmask[None, :]
            bmask = kmask[:, None] & cmask[None, :]
            acc = tl.dot(tl.load(a1_ptr + a_off, mask=amask, other=0.0),
                         tl.load(b1_ptr + b_off, mask=bmask, other=0.0), acc, input_precision=PREC)
            if DUAL:
                acc = tl.dot(tl.load(a2_ptr + a_off, mask=amask, other=0.0),
                             tl.load(b2_ptr + b_off, mask=bmask, other=0.0), acc, input_precision=PREC)
            a_off += BLOCK_K * stride_ak
            b_off += BLOCK_K * stride_bk
        if SCALE:                                    # gate multiply
            p = tl.load(perm_ptr + rows, mask=rmask, other=0)
            g = tl.load(gates_ptr + p, mask=rmask, other=0.0).to(tl.float32)
            acc = acc * g[:, None]
        tok = tl.load(tok_ptr + rows, mask=rmask, other=0)              # scatter target rows
        tl.atomic_add(out_ptr + tok[:, None] * stride_ot + cols[None, :] * stride_on, acc,
                      mask=rmask[:, None] & cmask[None, :])

    @triton.autotune(configs=configs("acc2"), key=["N", "K", "BLOCK_M"], reset_to_zero=["dgp_ptr"])
    @triton.jit
    def gather_down_t_swiglu_bwd(gy_ptr, w2_ptr, h1_ptr, h3_ptr, tok_ptr, perm_ptr, gates_ptr,
                                 blk_expert_ptr, blk_start_ptr, ends_ptr, dh1_ptr, dh3_ptr, dgp_ptr,
                                 n_blocks_m, N, K, A,
                                 stride_gt, stride_gk, stride_we, stride_wk, stride_wn,
                                 stride_hm, stride_hn,
                                 NEED_DG: tl.constexpr, PREC: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                 GROUP_M: tl.constexpr):
        """Backward through GEMM 2 and SwiGLU for one block of sorted assignments:
            u   = dy[tok] @ W2[e]                 (BM, BN) tile of (A, h), dy gathered in the loads
            dgate partial = sum_n u * a,  a = silu(h1) * h3   (one partial per column tile)
            da  = gate * u
            dh1 = da * h3 * silu'(h1),  dh3 = da * silu(h1)     stored in sorted order."""
        e, pid_n, rows, rmask, cols, cmask = _block_tile(tl.program_id(0), n_blocks_m, N, blk_expert_ptr,
                                                         blk_start_ptr, ends_ptr, BLOCK_M, BLOCK_N, GROUP_M)
        if e < 0:
            return
        tok = tl.load(tok_ptr + rows, mask=rmask, other=0)
        ks = tl.arange(0, BLOCK_K)
        g_ptrs = gy_ptr + tok[:, None] * stride_gt + ks[None, :] * stride_gk           # (BM, BK)
        w_off = e.to(tl.int64) * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kmask = ks < K - k0
            gt = tl.load(g_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
            wt = tl.load(w2_ptr + w_off, mask=kmask[:, None] & cmask[None, :], other=0.0)
            acc = tl.dot(gt, wt, acc, input_precision=PREC)
            g_ptrs += BLOCK_K * stride_gk
            w_off += BLOCK_K * stride_wk
        h_off = rows[:, None] * stride_hm + cols[None, :] * stride_hn
        hmask = rmask[:, None] & cmask[None, :]
        h1 = tl.load(h1_ptr + h_off, mask=hmask, other=0.0).to(tl.float32)
        h3 = tl.load(h3_ptr + h_off, mask=hmask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(h1)
        s = h1 * sig                                                    # silu(h1)
        p = tl.load(perm_ptr + rows, mask=rmask, other=0)
        if NEED_DG:   # partial dgate of this column tile, written at the original assignment index
            tl.store(dgp_ptr + pid_n * A + p, tl.sum(acc * s * h3, axis=1), mask=rmask)
        g = tl.load(gates_ptr + p, mask=rmask, other=0.0).to(tl.float32)
        da = acc * g[:, None]
        dh1 = da * h3 * sig * (1.0 + h1 * (1.0 - sig))
        dh3 = da * s
        tl.store(dh1_ptr + h_off, dh1.to(dh1_ptr.dtype.element_ty), mask=hmask)
        tl.store(dh3_ptr + h_off, dh3.to(dh3_ptr.dtype.element_ty), mask=hmask)

    @triton.autotune(configs=configs("xty"), key=["M", "N", "DUAL"])
    @triton.jit
    def expert_xty(l1_ptr, l2_ptr, r_ptr, out1_ptr, out2_ptr, tok_ptr, perm_ptr, gates_ptr,
                   starts_ptr, ends_ptr, M, N,
                   stride_lr, stride_lc, stride_rr, stride_rc, stride_oe, stride_om, stride_on,
                   L_GATHER: tl.constexpr, L_SCALE: tl.constexpr, R_GATHER: tl.constexpr,
                   DUAL: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Weight gradients, one (BLOCK_M, BLOCK_N) tile of one expert per program:
            out1[e] = sum_{r in e} L1[r]^T R[r]   (M, N)   (+ out2[e] with L2, DUAL)
        The reduction runs over the expert's sorted rows; L or R rows are gathered from
        token rows through tok (L_GATHER / R_GATHER), L optionally scaled by the gate.
        dW2: L1 = dy (gathered, gated), R = a.   dW1, dW3: L1 = dh1, L2 = dh3, R = x (gathered).
        An expert with no rows gets a zero tile."""
        e = tl.program_id(1)
        n_n = tl.cdiv(N, BLOCK_N)
        pid_m = tl.program_id(0) // n_n
        pid_n = tl.program_id(0) % n_n
        start = tl.load(starts_ptr + e)
        end = tl.load(ends_ptr + e)
        ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mmask = ms < M
        nmask = ns < N
        acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(start, end, BLOCK_K):
            rows = r0 + tl.arange(0, BLOCK_K)
            rmask = rows < end
            tok = tl.load(tok_ptr + rows, mask=rmask, other=0)
            lrow = tok if L_GATHER else rows
            rrow = tok if R_GATHER else rows
            l_off = lrow[None, :].to(tl.int64) * stride_lr + ms[:, None] * stride_lc   # (BM, BK) = L^T
            lmask = mmask[:, None] & rmask[None, :]
            rt = tl.load(r_ptr + rrow[:, None].to(tl.int64) * stride_rr + ns[None, :] * stride_rc,
                         mask=rmask[:, None] & nmask[None, :], other=0.0)             # (BK, BN)
            lt = tl.load(l1_ptr + l_off, mask=lmask, other=0.0)
            if L_SCALE:
                p = tl.load(perm_ptr + rows, mask=rmask, other=0)
                g = tl.load(gates_ptr + p, mask=rmask, other=0.0).to(tl.float32)
                lt = (lt.to(tl.float32) * g[None, :]).to(rt.dtype)
            acc1 = tl.dot(lt, rt, acc1, input_precision=PREC)
            if DUAL:
                acc2 = tl.dot(tl.load(l2_ptr + l_off, mask=lmask, other=0.0), rt, acc2, input_precision=PREC)
        o_off = e.to(tl.int64) * stride_oe + ms[:, None] * stride_om + ns[None, :] * stride_on
        omask = mmask[:, None] & nmask[None, :]
        tl.store(out1_ptr + o_off, acc1.to(out1_ptr.dtype.element_ty), mask=omask)
        if DUAL:
            tl.store(out2_ptr + o_off, acc2.to(out2_ptr.dtype.element_ty), mask=omask)

    return dict(triton=triton, gather_up_swiglu=gather_up_swiglu, gemm_gate_scatter=gemm_gate_scatter,
                gather_down_t_swiglu_bwd=gather_down_t_swiglu_bwd, expert_xty=expert_xty,
                interpret=interpret)


def _triton_block_m(A, E, interpret):
    """Rows per block of sorted assignments (fixed before the block tables are built,
    so not autotuned): small in the interpreter, 64/128 on a GPU by rows per expert."""
    if interpret:
        return 16
    return 128 if A >= 256 * E else 64


def _block_tables(ends, counts, A, block_m):
    """Per-expert padded blocks of block_m sorted rows, built on the device (no sync).
    Returns blk_expert (nb,) (-1: unused) and blk_start (nb,), nb a host-side bound."""
    E = counts.shape[0]
    nb = min(A, -(-A // block_m) + E)                                   # >= sum_e ceil(n_e / BM)
    per = (counts + block_m - 1) // block_m                             # (E,) blocks per expert
    blk_end = torch.cumsum(per, 0)                                      # (E,)
    b = torch.arange(nb, device=counts.device)
    e = torch.searchsorted(blk_end, b, right=True)                      # (nb,) expert of block b
    valid = e < E
    ec = e.clamp(max=E - 1)
    blk_start = (ends - counts)[ec] + (b - (blk_end - per)[ec]) * block_m
    return torch.where(valid, e, -1), torch.where(valid, blk_start, 0)


def _dot_precision(dtype):
    """fp32 dots: exact IEEE unless torch itself allows TF32 for matmuls."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


class _TritonMoE(torch.autograd.Function):
    """Fused Triton MoE SwiGLU: 2 kernels forward, 4 backward (see _triton_kernels)."""

    @staticmethod
    def forward(ctx, x, gates, w1, w3, w2, perm, tok_s, counts, ends, out_dtype):
        K = _triton_kernels()
        T, d = x.shape
        E, h, _ = w1.shape
        A = tok_s.shape[0]
        BM = _triton_block_m(A, E, K["interpret"])
        blk_expert, blk_start = _block_tables(ends, counts, A, BM)
        nb = blk_expert.shape[0]
        prec = _dot_precision(x.dtype)
        train = any(ctx.needs_input_grad)                              # (grad mode is off in here)
        a = x.new_empty(A, h)                                           # (A, h) sorted order
        h1 = x.new_empty(A, h) if train else a
        h3 = x.new_empty(A, h) if train else a
        y = torch.zeros(T, d, dtype=torch.float32, device=x.device)     # (T, d) fp32 accumulator
        if A:
            grid = lambda meta: (nb * _cdiv(h, meta["BLOCK_N"]),)
            K["gather_up_swiglu"][grid](
                x, w1, w3, tok_s, blk_expert, blk_start, ends, h1, h3, a, nb, h, d,
                x.stride(0), x.stride(1), w1.stride(0), w1.stride(1), w1.stride(2),
                a.stride(0), a.stride(1), SAVE_PRE=train, PREC=prec, BLOCK_M=BM)
            grid = lambda meta: (nb * _cdiv(d, meta["BLOCK_N"]),)
            K["gemm_gate_scatter"][grid](                                # y[tok] += g * a @ W2[e]^T
                a, w2, a, w2, y, tok_s, perm, gates, blk_expert, blk_start, ends, nb, d, h,
                a.stride(0), a.stride(1), w2.stride(0), w2.stride(2), w2.stride(1),
                y.stride(0), y.stride(1), DUAL=False, SCALE=True, PREC=prec, BLOCK_M=BM)
        ctx.save_for_backward(x, gates, w1, w3, w2, perm, tok_s, counts, ends, blk_expert, blk_start, h1, h3, a)
        ctx.block_m = BM
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, gy):                                              # gy (T, d)
        x, gates, w1, w3, w2, perm, tok_s, counts, ends, blk_expert, blk_start, h1, h3, a = ctx.saved_tensors
        need_x, need_g, need_w1, need_w3, need_w2 = ctx.needs_input_grad[:5]
        K = _triton_kernels()
        T, d = x.shape
        E, h, _ = w1.shape
        A, BM, nb = tok_s.shape[0], ctx.block_m, blk_expert.shape[0]
        prec = _dot_precision(x.dtype)
        gy = gy.to(x.dtype).contiguous()
        starts = ends - counts
        dx = dgates = dw1 = dw3 = dw2 = None
        if need_w2:   # dW2[e] = sum_{r in e} (g_r dy[tok_r])^T a_r        (d, h)
            dw2 = torch.empty_like(w2)
            grid = lambda meta: (_cdiv(d, meta["BLOCK_M"]) * _cdiv(h, meta["BLOCK_N"]), E)
            K["expert_xty"][grid](
                gy, gy, a, dw2, dw2, tok_s, perm, gates, starts, ends, d, h,
                gy.stride(0), gy.stride(1), a.stride(0), a.stride(1),
                dw2.stride(0), dw2.stride(1), dw2.stride(2),
                L_GATHER=True, L_SCALE=True, R_GATHER=False, DUAL=False, PREC=prec)
        if need_x or need_g or need_w1 or need_w3:
            dh1, dh3 = torch.empty_like(h1), torch.empty_like(h3)       # (A, h) sorted order
            min_bn = min(c.kwargs["BLOCK_N"] for c in K["gather_down_t_swiglu_bwd"].configs)
            n_tiles_max = _cdiv(h, min_bn)                              # column tiles of any config
            dgp = torch.zeros(n_tiles_max if need_g else 1, A if need_g else 1, dtype=torch.float32,
                              device=x.device)                          # partial dgates per column tile
            if A:
                grid = lambda meta: (nb * _cdiv(h, meta["BLOCK_N"]),)
                K["gather_down_t_swiglu_bwd"][grid](
                    gy, w2, h1, h3, tok_s, perm, gates, blk_expert, blk_start, ends, dh1, dh3, dgp,
                    nb, h, d, A, gy.stride(0), gy.stride(1), w2.stride(0), w2.stride(1), w2.stride(2),
                    h1.stride(0), h1.stride(1), NEED_DG=need_g, PREC=prec, BLOCK_M=BM)
            if need_g:
                dgates = dgp.sum(0).to(gates.dtype)                      # (A,) original order
            if need_x:   # dx[tok] += dh1 @ W1[e] + dh3 @ W3[e]
                dx = torch.zeros(T, d, dtype=torch.float32, device=x.device)
                if A:
                    grid = lambda meta: (nb * _cdiv(d, meta["BLOCK_N"]),)
                    K["gemm_gate_scatter"][grid](
                        dh1, w1, dh3, w3, dx, tok_s, perm, gates, blk_expert, blk_start, ends, nb, d, h,
                        dh1.stride(0), dh1.stride(1), w1.stride(0), w1.stride(1), w1.stride(2),
                        dx.stride(0), dx.stride(1), DUAL=True, SCALE=False, PREC=prec, BLOCK_M=BM)
                dx = dx.to(x.dtype)
            if need_w1 or need_w3:   # dW1[e] = sum dh1^T x[tok], dW3[e] = sum dh3^T x[tok]   (h, d)
                dw1, dw3 = torch.empty_like(w1), torch.empty_like(w3)
                grid = lambda meta: (_cdiv(h, meta["BLOCK_M"]) * _cdiv(d, meta["BLOCK_N"]), E)
                K["expert_xty"][grid](
                    dh1, dh3, x, dw1, dw3, tok_s, perm, gates, starts, ends, h, d,
                    dh1.stride(0), dh1.stride(1), x.stride(0), x.stride(1),
                    dw1.stride(0), dw1.stride(1), dw1.stride(2),
                    L_GATHER=False, L_SCALE=False, R_GATHER=True, DUAL=True, PREC=prec)
                dw1 = dw1 if need_w1 else None
                dw3 = dw3 if need_w3 else None
        return dx, dgates, dw1, dw3, dw2, None, None, None, None, None


def _cdiv(a, b):
    """ceil(a / b) for python ints."""
    return -(-a // b)


def moe_ffn_triton(x, token_idx, expert_idx, gates, w1, w3, w2, out_dtype=None):
    """Fused Triton path (see _triton_kernels). Raises RuntimeError if triton cannot
    run here (use impl="auto" for a clean fallback)."""
    ok, why = triton_status()
    if not ok:
        raise RuntimeError(f"impl='triton' is unavailable: {why}")
    E = w1.shape[0]
    perm, tok_s, counts, ends = sort_by_expert(token_idx, expert_idx, E)
    x, w1, w3, w2 = (t.contiguous() for t in (x, w1, w3, w2))
    return _TritonMoE.apply(x, gates.contiguous(), w1, w3, w2, perm, tok_s, counts, ends,
                            out_dtype or x.dtype)


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
    return _fused(IMPLS[impl], x, token_idx, expert_idx, gates, w1, w3, w2, dtype, autocast)


def _fused(fn, x, token_idx, expert_idx, gates, w1, w3, w2, dtype, autocast):
    out_dtype = x.dtype
    if autocast:   # a custom Function is not autocast by torch: cast here (differentiably)
        x, w1, w3, w2 = (t.to(dtype) for t in (x, w1, w3, w2))
    elif not (w1.dtype == w3.dtype == w2.dtype == x.dtype):
        raise ValueError(f"x ({x.dtype}) and expert weights ({w1.dtype}, {w3.dtype}, {w2.dtype}) "
                         "must share a dtype (or run under torch.autocast)")
    with torch.autocast(x.device.type, enabled=False) if autocast else contextlib.nullcontext():
        return fn(x, token_idx, expert_idx, gates, w1, w3, w2, out_dtype=out_dtype)


def auto_impl(device, dtype):
    """Pick the fastest available path for this device and dtype: (name, reason).

    Not CUDA: "grouped" (padded bmm or per-expert mm; bench.py on 2 CPU cores: 1.0x
    the FLOP-matched dense FFN at E=8, 1.35x at E=64 on one thread, 12-35x faster
    than the loop at E=64; Triton runs on CPU only in its interpreter).
    CUDA: "grouped" on torch's CUTLASS grouped GEMM for bf16 on sm90+; else the fused
    Triton kernels for bf16/fp16 (tensor cores) when triton imports; else "grouped"
    (fp32: cuBLAS beats Triton's exact-fp32 FMA dots). The CUDA order is a design
    choice not yet measured on a GPU: `python bench.py` there shows all paths.
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
