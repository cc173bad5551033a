"""
The fused Triton path of the expert computation, in the style of ScatterMoE (Tan et
al. 2024, arXiv 2403.08245) and vLLM's fused_moe. experts.py imports this module
lazily, on first use of impl="triton", so that `import experts` never imports triton.

It receives the assignments already sorted by expert (experts.sort_by_expert): perm
(A,) the assignment index of each sorted position, tok_s (A,) its token row, counts
(E,) and ends (E,) = cumsum(counts). Each program of the "row" kernels owns a block of
BLOCK_M consecutive sorted assignments of ONE expert (blocks are padded per expert: an
expert with n rows gets ceil(n / BLOCK_M) blocks, the last one partly masked),
described by two small tables built on the device without a host sync: blk_expert[b]
(-1 for unused trailing blocks, which exit at once) and blk_start[b]. Token rows are
never materialised in sorted order: the first GEMM loads them straight from x through
tok_s (gather fused into the loads, SwiGLU in its epilogue); the second GEMM multiplies
by the gate and atomically adds into the fp32 output rows (gate and scatter fused into
its epilogue). The backward (dX, dW1, dW3, dW2, dgates) is fused the same way. All
products accumulate in fp32.

Triton's interpreter (TRITON_INTERPRET=1, read when this module is imported) runs the
same kernels on CPU, slowly, for the tests.
"""
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def configs(kind):
    """Autotune configs. The interpreter gets one small config (each launch costs
    seconds there). On a GPU: "acc2" kernels keep two (BLOCK_M, BLOCK_N) fp32
    accumulators or load two extra tiles in the epilogue, so they use 8 warps and
    BLOCK_N = 64 (checked spill-free on sm_90 by `python bench.py --compile-only=90`);
    "xty" (weight gradients) also tiles its output rows."""
    if kind == "xty":
        if INTERPRET:
            return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=4, num_stages=1)]
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
                for bm, bn, bk, w, s in [(128, 128, 32, 8, 3), (128, 64, 32, 4, 4),
                                         (64, 128, 32, 4, 4), (128, 128, 64, 8, 3)]]
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    tiles = {"acc2": [(64, 64, 8, 3), (64, 64, 8, 4), (64, 32, 8, 4), (128, 64, 8, 3), (64, 64, 4, 3)],
             "acc1": [(64, 64, 4, 4), (128, 64, 8, 3), (128, 32, 4, 4), (64, 32, 4, 5), (128, 64, 4, 3)]}[kind]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bn, bk, w, s in tiles]


# =============================================================================
# kernels

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


# =============================================================================
# host side: block tables and the autograd.Function

def rows_per_block(A, E):
    """Rows per block of sorted assignments (fixed before the block tables are built,
    so not autotuned): small in the interpreter, 64/128 on a GPU by rows per expert."""
    if INTERPRET:
        return 16
    return 128 if A >= 256 * E else 64


def block_tables(ends, counts, A, block_m):
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


def dot_precision(dtype):
    """fp32 dots: exact IEEE unless torch itself allows TF32 for matmuls."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def cdiv(a, b):
    """ceil(a / b) for python ints."""
    return -(-a // b)


class FusedMoE(torch.autograd.Function):
    """Fused Triton MoE SwiGLU: 2 kernels forward, 4 backward."""

    @staticmethod
    def forward(ctx, x, gates, w1, w3, w2, perm, tok_s, counts, ends, out_dtype):
        T, d = x.shape
        E, h, _ = w1.shape
        A = tok_s.shape[0]
        block_m = rows_per_block(A, E)
        blk_expert, blk_start = block_tables(ends, counts, A, block_m)
        nb = blk_expert.shape[0]
        prec = dot_precision(x.dtype)
        train = any(ctx.needs_input_grad)                              # (grad mode is off in here)
        a = x.new_empty(A, h)                                           # (A, h) sorted order
        h1 = x.new_empty(A, h) if train else a
        h3 = x.new_empty(A, h) if train else a
        y = torch.zeros(T, d, dtype=torch.float32, device=x.device)     # (T, d) fp32 accumulator
        if A:
            grid = lambda meta: (nb * cdiv(h, meta["BLOCK_N"]),)
            gather_up_swiglu[grid](
                x, w1, w3, tok_s, blk_expert, blk_start, ends, h1, h3, a, nb, h, d,
                x.stride(0), x.stride(1), w1.stride(0), w1.stride(1), w1.stride(2),
                a.stride(0), a.stride(1), SAVE_PRE=train, PREC=prec, BLOCK_M=block_m)
            grid = lambda meta: (nb * cdiv(d, meta["BLOCK_N"]),)
            gemm_gate_scatter[grid](                                     # y[tok] += g * a @ W2[e]^T
                a, w2, a, w2, y, tok_s, perm, gates, blk_expert, blk_start, ends, nb, d, h,
                a.stride(0), a.stride(1), w2.stride(0), w2.stride(2), w2.stride(1),
                y.stride(0), y.stride(1), DUAL=False, SCALE=True, PREC=prec, BLOCK_M=block_m)
        ctx.save_for_backward(x, gates, w1, w3, w2, perm, tok_s, counts, ends, blk_expert, blk_start, h1, h3, a)
        ctx.block_m = block_m
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, gy):                                              # gy (T, d)
        x, gates, w1, w3, w2, perm, tok_s, counts, ends, blk_expert, blk_start, h1, h3, a = ctx.saved_tensors
        need_x, need_g, need_w1, need_w3, need_w2 = ctx.needs_input_grad[:5]
        gy = gy.to(x.dtype).contiguous()
        starts = ends - counts
        dx = dgates = dw1 = dw3 = dw2 = None
        sorted_idx = (tok_s, perm, gates, starts, ends)
        if need_w2:   # dW2[e] = sum_{r in e} (g_r dy[tok_r])^T a_r   (E, d, h)
            dw2 = torch.empty_like(w2)
            expert_outer_sums(gy, gy, a, dw2, dw2, sorted_idx, l_gather=True, l_scale=True, r_gather=False)
        if need_x or need_g or need_w1 or need_w3:
            tables = (tok_s, perm, gates, blk_expert, blk_start, ends, ctx.block_m)
            dh1, dh3, dgates = grad_swiglu(gy, w2, h1, h3, tables, need_g)
            if need_x:
                dx = grad_x(dh1, dh3, w1, w3, x, tables)
            if need_w1 or need_w3:   # dW1[e] = sum dh1^T x[tok], dW3[e] = sum dh3^T x[tok]   (E, h, d)
                dw1, dw3 = torch.empty_like(w1), torch.empty_like(w3)
                expert_outer_sums(dh1, dh3, x, dw1, dw3, sorted_idx, l_gather=False, l_scale=False, r_gather=True)
                dw1 = dw1 if need_w1 else None
                dw3 = dw3 if need_w3 else None
        return dx, dgates, dw1, dw3, dw2, None, None, None, None, None


def expert_outer_sums(l1, l2, r, out1, out2, sorted_idx, l_gather, l_scale, r_gather):
    """The weight gradients: out1[e] = sum_{r in e} L1[r]^T R[r] (E, M, N), and out2 the
    same with L2 unless out2 is out1 (see expert_xty for the gather and gate flags)."""
    tok_s, perm, gates, starts, ends = sorted_idx
    E, M, N = out1.shape
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]), E)
    expert_xty[grid](
        l1, l2, r, out1, out2, tok_s, perm, gates, starts, ends, M, N,
        l1.stride(0), l1.stride(1), r.stride(0), r.stride(1), out1.stride(0), out1.stride(1), out1.stride(2),
        L_GATHER=l_gather, L_SCALE=l_scale, R_GATHER=r_gather, DUAL=out2 is not out1,
        PREC=dot_precision(r.dtype))


def grad_swiglu(gy, w2, h1, h3, tables, need_g):
    """Back through GEMM 2 and SwiGLU: dh1, dh3 (A, h) in sorted order, and dgates (A,)
    in the original assignment order (None unless need_g)."""
    tok_s, perm, gates, blk_expert, blk_start, ends, block_m = tables
    A, h = h1.shape
    d = w2.shape[1]
    nb = blk_expert.shape[0]
    dh1, dh3 = torch.empty_like(h1), torch.empty_like(h3)
    min_bn = min(c.kwargs["BLOCK_N"] for c in gather_down_t_swiglu_bwd.configs)
    n_tiles_max = cdiv(h, min_bn)                                       # column tiles of any config
    dgp = torch.zeros(n_tiles_max if need_g else 1, A if need_g else 1, dtype=torch.float32,
                      device=gy.device)                                 # partial dgates per column tile
    if A:
        grid = lambda meta: (nb * cdiv(h, meta["BLOCK_N"]),)
        gather_down_t_swiglu_bwd[grid](
            gy, w2, h1, h3, tok_s, perm, gates, blk_expert, blk_start, ends, dh1, dh3, dgp,
            nb, h, d, A, gy.stride(0), gy.stride(1), w2.stride(0), w2.stride(1), w2.stride(2),
            h1.stride(0), h1.stride(1), NEED_DG=need_g, PREC=dot_precision(gy.dtype), BLOCK_M=block_m)
    dgates = dgp.sum(0).to(gates.dtype) if need_g else None            # (A,) original order
    return dh1, dh3, dgates


def grad_x(dh1, dh3, w1, w3, x, tables):
    """dx[tok] += dh1 @ W1[e] + dh3 @ W3[e]   (T, d)."""
    tok_s, perm, gates, blk_expert, blk_start, ends, block_m = tables
    T, d = x.shape
    A, h = dh1.shape
    nb = blk_expert.shape[0]
    dx = torch.zeros(T, d, dtype=torch.float32, device=x.device)
    if A:
        grid = lambda meta: (nb * cdiv(d, meta["BLOCK_N"]),)
        gemm_gate_scatter[grid](
            dh1, w1, dh3, w3, dx, tok_s, perm, gates, blk_expert, blk_start, ends, nb, d, h,
            dh1.stride(0), dh1.stride(1), w1.stride(0), w1.stride(1), w1.stride(2),
            dx.stride(0), dx.stride(1), DUAL=True, SCALE=False, PREC=dot_precision(x.dtype), BLOCK_M=block_m)
    return dx.to(x.dtype)


def fused_moe(x, gates, w1, w3, w2, perm, tok_s, counts, ends, out_dtype):
    """y (T, d) = the routed experts on x, from assignments already sorted by expert
    (see the module doc), differentiable in x, gates and the three weight stacks."""
    x, w1, w3, w2 = (t.contiguous() for t in (x, w1, w3, w2))
    return FusedMoE.apply(x, gates.contiguous(), w1, w3, w2, perm, tok_s, counts, ends, out_dtype)
