"""
Benchmark the expert kernels against the FLOP-matched dense SwiGLU FFN.

    python bench.py                       # CPU or GPU defaults, E in {8, 16, 32, 64}
    python bench.py --experts=8 --impls=grouped,loop --repeats=10
    python bench.py --profile             # + a torch.profiler table of the first E
    python bench.py --model               # whole training steps: dense vs MoE vs FLOP-matched dense
    python bench.py --decode              # generation tokens/s with and without the KV cache
    python bench.py --hf                  # this project vs transformers on the same weights:
                                          # a random Llama and its upcycled, exported Mixtral
    python bench.py --hf --hf_shape=smollm-135m --threads=1   # at SmolLM-135M's width (8 layers),
                                          # batch 1 x 512; smollm-135m-full: all 30 layers
    python bench.py --hf=HF_DIR           # the same for a local HF Llama / Mixtral directory
    python bench.py --hf --hf_control     # + transformers against a second copy of itself (A/A):
                                          # the ratios that identical code gets on this machine
    python bench.py --compile-only=90     # no GPU needed: compile the Triton kernels for
                                          # sm_90, report registers / spills / pipelining
    python bench.py --expert_parallel     # EP=1/2/4 in spawned gloo processes: step time and
                                          # all-to-all bytes per step (see bench_expert_parallel)

For every E the MoE layer (T tokens, top-k of E experts of width d_ff_expert) does the
same matmul FLOPs as a dense SwiGLU FFN of width k * d_ff_expert on the same T tokens:
18 * T * k * d * d_ff_expert for forward + backward. The table gives the forward and
forward+backward time of each path (gradients for x, gates and all weights; the
dense FFN: for x and its weights), the ratio MoE / dense (1.0 is the physical limit:
an MoE layer costing what its active FLOPs cost) and, on a GPU, achieved TFLOP/s.
Routing is random uniform top-k (seeded), gates a softmax over the chosen k.

Timing: each path is run `--warmup` times, then `--repeats` rounds in which every path
runs once (interleaved, so a noisy neighbour hurts all paths alike; in --model, --decode
and --hf the order is shuffled every round, so no path always goes first or always
follows the same other path); the median is
reported (column n: rounds; a very slow path gets fewer, see --max_path_seconds).
The Triton path on CPU only runs in the interpreter (seconds per launch): it is
skipped there with a note.

CPU note: on a machine shared with other busy processes, use --threads=1 as well.
With 2 threads every parallel op can wait a scheduler slice for a descheduled
worker thread, which penalises the MoE paths (more, smaller ops than the dense FFN)
far beyond their compute cost; the load average is printed in the header.
"""
import argparse
import json
import os
import platform
import random
import re
import socket
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile as tprofile

import experts
from configurator import ArgumentParser, device_problem
from model import GPT, GPTConfig


def machine(device):
    """One line naming the machine: CPU model / GPU name, torch, threads, triton."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    parts = [f"CPU {cpu} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"]
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        parts.insert(0, f"GPU {torch.cuda.get_device_name(device)} (sm_{cap[0]}{cap[1]})")
    parts.append(f"torch {torch.__version__}")
    if hasattr(os, "getloadavg"):   # other processes on the machine skew CPU timings
        parts.append(f"1-min load average at start {os.getloadavg()[0]:.2f}")
    try:
        import triton
        parts.append(f"triton {triton.__version__}")
    except Exception:
        parts.append("triton absent")
    return "; ".join(parts)


def make_impl(name, x, tok, ex, gates, w1, w3, w2):
    """A callable running one MoE path (bench aliases: grouped_mm / grouped_padded /
    grouped_slices force the grouped path's GEMM backend)."""
    if name in ("grouped_mm", "grouped_slices", "grouped_padded"):
        gemm = name.split("_", 1)[1] if name != "grouped_mm" else "grouped_mm"
        return lambda: experts.moe_ffn_grouped(x, tok, ex, gates, w1, w3, w2, gemm=gemm)
    return lambda: experts.moe_ffn(x, tok, ex, gates, w1, w3, w2, impl=name)


def timer(device):
    if device.type == "cuda":
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
    else:
        def run(fn):
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
    return run


def bench_one(args, E, device, dtype, impls, notes):
    """Time every path at one E. Returns rows (name, fwd s, fwd+bwd s, rounds)."""
    T, d, h, k = args.tokens, args.d, args.d_ff_expert, args.k
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    std = 0.02

    def param(*shape):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype).requires_grad_()

    x = torch.randn(T, d, generator=g).to(device=device, dtype=dtype).requires_grad_()
    gy = torch.randn(T, d, generator=g).to(device=device, dtype=dtype)
    # MoE: random uniform top-k routing, softmax gates over the chosen k
    topi = torch.rand(T, E, generator=g).topk(k, dim=-1).indices                # (T, k)
    tok = torch.arange(T).repeat_interleave(k).to(device)                      # (A,)
    ex = topi.reshape(-1).to(device)                                           # (A,)
    gates = F.softmax(torch.randn(T, k, generator=g), -1).reshape(-1).to(device).requires_grad_()
    w1, w3, w2 = param(E, h, d), param(E, h, d), param(E, d, h)
    # dense SwiGLU of width k*h: the same active FLOPs
    dw1, dw3, dw2 = param(k * h, d), param(k * h, d), param(d, k * h)

    cases = {"dense": (lambda: experts.swiglu(x, dw1, dw3, dw2), (x, dw1, dw3, dw2))}
    for name in impls:
        cases[name] = (make_impl(name, x, tok, ex, gates, w1, w3, w2), (x, gates, w1, w3, w2))

    def fwd(fn):   # forward with autograd recording, as in training
        return lambda: fn()

    def fwd_bwd(fn, inputs):
        return lambda: torch.autograd.grad(fn(), inputs, gy)

    run = timer(device)
    times = {n: ([], []) for n in cases}
    rounds = {}
    for name, (fn, inputs) in list(cases.items()):
        try:
            t = 0.0
            for _ in range(max(args.warmup, 1)):
                t = run(fwd_bwd(fn, inputs))
        except Exception as e:   # a path that cannot run here: note it and go on
            notes.append(f"E={E}: {name} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            del cases[name]
            continue
        # a very slow path (the loop at large E on CPU) gets fewer rounds
        rounds[name] = max(1, min(args.repeats, int(args.max_path_seconds / max(t, 1e-9))))
    for r in range(args.repeats):
        for name, (fn, inputs) in cases.items():
            if r < rounds[name]:
                times[name][0].append(run(fwd(fn)))
                times[name][1].append(run(fwd_bwd(fn, inputs)))
    rows = [(n, statistics.median(times[n][0]), statistics.median(times[n][1]), rounds[n]) for n in cases]
    if args.profile and E == args.experts[0]:
        profile(cases, gy, device)
    return rows


def profile(cases, gy, device):
    """Print where the time goes (torch.profiler, self time by op) for each path."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for name, (fn, inputs) in cases.items():
        with tprofile(activities=acts) as prof:
            for _ in range(3):
                torch.autograd.grad(fn(), inputs, gy)
            if device.type == "cuda":
                torch.cuda.synchronize()
        key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(f"\n--- profile: {name} (3 x forward+backward) ---")
        print(prof.key_averages().table(sort_by=key, row_limit=12))


def triton_variants(dtype, shape):
    """Every launch variant of the Triton kernels, as compile_report compiles it: (kernel
    name, pointer dtypes, int args with example values of shape (T, d, h, E), constexprs)."""
    T, d, h, E = shape
    A = 2 * T
    nb = A // 128 + E
    return [
        ("gather_up_swiglu", dict(x_ptr=dtype, w1_ptr=dtype, w3_ptr=dtype, h1_ptr=dtype, h3_ptr=dtype, a_ptr=dtype),
         dict(n_blocks_m=nb, N=h, K=d, stride_xt=d, stride_xk=1, stride_we=h * d, stride_wn=d, stride_wk=1,
              stride_hm=h, stride_hn=1), dict(SAVE_PRE=True)),
        ("gemm_gate_scatter", dict(a1_ptr=dtype, b1_ptr=dtype, a2_ptr=dtype, b2_ptr=dtype, out_ptr="fp32"),
         dict(n_blocks_m=nb, N=d, K=h, stride_am=h, stride_ak=1, stride_be=h * d, stride_bk=1, stride_bn=h,
              stride_ot=d, stride_on=1), dict(DUAL=False, SCALE=True)),
        ("gemm_gate_scatter", dict(a1_ptr=dtype, b1_ptr=dtype, a2_ptr=dtype, b2_ptr=dtype, out_ptr="fp32"),
         dict(n_blocks_m=nb, N=d, K=h, stride_am=h, stride_ak=1, stride_be=h * d, stride_bk=d, stride_bn=1,
              stride_ot=d, stride_on=1), dict(DUAL=True, SCALE=False)),
        ("gather_down_t_swiglu_bwd", dict(gy_ptr=dtype, w2_ptr=dtype, h1_ptr=dtype, h3_ptr=dtype, dh1_ptr=dtype,
                                          dh3_ptr=dtype, dgp_ptr="fp32"),
         dict(n_blocks_m=nb, N=h, K=d, A=A, stride_gt=d, stride_gk=1, stride_we=h * d, stride_wk=h, stride_wn=1,
              stride_hm=h, stride_hn=1), dict(NEED_DG=True)),
        ("expert_xty", dict(l1_ptr=dtype, l2_ptr=dtype, r_ptr=dtype, out1_ptr=dtype, out2_ptr=dtype),
         dict(M=d, N=h, stride_lr=d, stride_lc=1, stride_rr=h, stride_rc=1, stride_oe=h * d, stride_om=h, stride_on=1),
         dict(L_GATHER=True, L_SCALE=True, R_GATHER=False, DUAL=False)),
        ("expert_xty", dict(l1_ptr=dtype, l2_ptr=dtype, r_ptr=dtype, out1_ptr=dtype, out2_ptr=dtype),
         dict(M=h, N=d, stride_lr=h, stride_lc=1, stride_rr=d, stride_rc=1, stride_oe=h * d, stride_om=d, stride_on=1),
         dict(L_GATHER=False, L_SCALE=False, R_GATHER=True, DUAL=True)),
    ]


def compile_report(arch, dtype="bf16", first_only=False, shape=(16384, 1024, 2816, 8)):
    """Compile every Triton kernel variant and autotune config for sm_<arch> ahead of
    time, without a GPU (Triton's bundled ptxas), and print registers, spills,
    the MMA instruction and whether loads are pipelined (cp.async): the checks that
    the CPU interpreter cannot make. Argument specialisation mimics a real launch
    (pointers 16-byte aligned, ints divisible by 16 marked so, stride 1 constant).
    Returns the number of variants compiled; raises on a compile error."""
    import triton   # optional dependency (Linux; CUDA wheels bring it): imported only here
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    import experts_triton
    prec = "ieee" if dtype == "fp32" else "tf32"
    target = GPUTarget("cuda", arch, 32)
    idx = dict(tok_ptr="i64", perm_ptr="i64", blk_expert_ptr="i64", blk_start_ptr="i64", ends_ptr="i64",
               starts_ptr="i64", gates_ptr="fp32")
    variants = triton_variants(dtype, shape)
    sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    n = 0
    for name, ptrs, ints, consts in variants:
        tuner = getattr(experts_triton, name)
        fn = tuner.fn
        cfgs = tuner.configs[:1] if first_only else tuner.configs
        for cfg in cfgs:
            sig, const, attrs = {}, dict(consts, PREC=prec, **cfg.kwargs), {}
            if "BLOCK_M" in fn.arg_names and "BLOCK_M" not in const:
                const["BLOCK_M"] = 128
            for i, a in enumerate(fn.arg_names):
                if a in ptrs or a in idx:
                    sig[a] = "*" + (ptrs.get(a) or idx[a])
                    attrs[(i,)] = [["tt.divisibility", 16]]
                elif a in ints and ints[a] == 1:
                    sig[a], const[a] = "constexpr", 1
                elif a in ints:
                    sig[a] = "i32"
                    if ints[a] % 16 == 0:
                        attrs[(i,)] = [["tt.divisibility", 16]]
                else:
                    sig[a] = "constexpr"
            k = triton.compile(ASTSource(fn, sig, const, attrs), target=target,
                               options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
            ptx = k.asm["ptx"]
            with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
                f.write(ptx)
            log = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={sm}", f.name, "-o", os.devnull],
                                 capture_output=True, text=True, check=True).stderr
            os.unlink(f.name)
            regs = re.findall(r"Used (\d+) registers", log)
            spill = re.findall(r"(\d+) bytes spill stores", log)
            mma = "wgmma" if "wgmma" in ptx else ("mma.sync" if "mma.sync" in ptx else "no-mma")
            flags = ",".join(f"{c}={v}" for c, v in consts.items())
            print(f"sm_{arch} {dtype} {name:<25} {flags:<45} {str(cfg.kwargs):<52} w{cfg.num_warps} s{cfg.num_stages}: "
                  f"regs {regs[0] if regs else '?'} spill {spill[0] if spill else '?'}B smem {k.metadata.shared} "
                  f"{mma} {'pipelined' if 'cp.async' in ptx else 'NOT pipelined'}", flush=True)
            n += 1
    return n


def bench_model(args, device):
    """Whole training steps (forward, backward, AdamW) of three models on one batch:
    the dense model, the same shape with every FFN an 8-expert top-k MoE, and the dense
    model whose FFN width equals the MoE's active width (k * expert width: the same
    active FLOPs). Interleaved rounds, median ms/step; MFU on a known GPU."""
    B, T = args.model_batch, args.model_block
    base = dict(vocab_size=256, block_size=T, n_layer=4, n_head=4, n_embd=128)
    if device.type == "cuda":
        base.update(n_layer=8, n_head=8, n_embd=512)
    h = GPTConfig(**base).ffn_hidden
    configs = {"dense": dict(base), f"moe {args.model_experts}x{args.k} ({args.model_impl})":
               dict(base, moe_layers="all", n_experts=args.model_experts, top_k=args.k, expert_impl=args.model_impl),
               f"dense ffn={args.k * h} (FLOP-matched)": dict(base, ffn_hidden=args.k * h)}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randint(0, 256, (B, T), generator=g).to(device)
    steps = {}
    for name, c in configs.items():
        torch.manual_seed(args.seed)
        m = GPT(GPTConfig(**c)).to(device)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)

        def step(m=m, opt=opt):
            with autocast:
                _, loss, _ = m(x, x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        steps[name] = (step, m)
    run = timer(device)
    paths = {name: step for name, (step, _) in steps.items()}
    interleaved_rounds(paths, max(args.warmup or 1, 1), run)
    times = interleaved_rounds(paths, args.repeats or 5, run)
    print(f"machine: {machine(device)}")
    print(f"training step: batch {B} x {T} tokens, AdamW; median of {args.repeats or 5} interleaved rounds")
    print(f"{'model':<34} {'params':>8} {'active':>8} {'ms/step':>9} {'tok/s':>10} {'vs dense':>9} {'vs matched':>10}")
    med = {n: statistics.median(t) for n, t in times.items()}
    dense, matched = med["dense"], med[list(configs)[2]]
    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    for name, (_, m) in steps.items():
        mfu = m.estimate_mfu(B * T, med[name], gpu_name, seq_len=T)
        print(f"{name:<34} {m.num_params() / 1e6:>7.2f}M {m.num_params(active=True) / 1e6:>7.2f}M "
              f"{med[name] * 1e3:>9.1f} {B * T / med[name]:>10,.0f} {med[name] / dense:>9.2f} {med[name] / matched:>10.2f}"
              + (f"  MFU {mfu * 100:.1f}%" if mfu is not None else ""))


def bench_decode(args, device):
    """Generation speed with and without the KV cache (model.generate, greedy): a
    --decode_tokens continuation of a --decode_prompt-token random prompt, for each
    batch size, on the demo-sized models (config/dense_small.py's shape: dense, every
    FFN an 8-expert top-k MoE, Lory). tokens/s = batch * new tokens / seconds,
    median of interleaved rounds; 'cache x' is the cached speed over recomputation.
    The greedy tokens of both ways are compared too ('same').
    With transformers installed, the dense and MoE models are also exported (convert.py:
    LlamaForCausalLM, MixtralForCausalLM) and timed in transformers' generate
    (do_sample=False, its own KV cache) on the same weights: 'vs hf' is transformers'
    time over ours with the cache (> 1: ours is faster); 'same hf' compares the greedy
    tokens of the first block_size positions (past block_size ours hops its window, see
    GPT.generate, while transformers keeps going)."""
    base = dict(vocab_size=256, block_size=256, n_layer=4, n_head=4, n_embd=128)
    E, k = args.model_experts, args.k
    configs = {"dense": base,
               f"moe {E}x{k} ({args.model_impl})": dict(base, moe_layers="all", n_experts=E, top_k=k,
                                                         expert_impl=args.model_impl),
               f"lory {E}": dict(base, moe_layers="all", n_experts=E, router="lory")}
    repeats, N, P = args.repeats or 3, args.decode_tokens, args.decode_prompt
    run = timer(device)
    print(f"machine: {machine(device)}")
    print(f"decoding: {P}-token prompt + {N} new tokens, greedy, block_size {base['block_size']}; "
          f"median of {repeats} interleaved rounds")
    print(f"{'model':<24} {'batch':>5} {'cache tok/s':>12} {'recompute tok/s':>16} {'cache x':>8} {'same':>5} "
          f"{'hf tok/s':>9} {'vs hf':>6} {'same hf':>7}")
    g = torch.Generator().manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        for B in args.decode_batches:
            prompt = torch.randint(0, base["vocab_size"], (B, P), generator=g).to(device)
            for name, c in configs.items():
                torch.manual_seed(args.seed)
                m = GPT(GPTConfig(**c)).to(device).eval()
                paths = {True: lambda m=m: m.generate(prompt, N, temperature=0, use_cache=True),
                         False: lambda m=m: m.generate(prompt, N, temperature=0, use_cache=False)}
                hf = decode_hf_twin(m, os.path.join(tmp, f"{name.split()[0]}{B}"), device)
                if hf is not None:
                    paths["hf"] = lambda hf=hf: hf_generate(hf, prompt, N)
                outs, times = time_decode_paths(paths, repeats, run)
                cached, recomputed = (statistics.median(times[c]) for c in (True, False))
                line = (f"{name:<24} {B:>5} {B * N / cached:>12,.0f} {B * N / recomputed:>16,.0f} "
                        f"{recomputed / cached:>8.1f} {str(torch.equal(outs[True], outs[False])):>5}")
                if hf is not None:
                    theirs, T = statistics.median(times["hf"]), base["block_size"]
                    same = torch.equal(outs[True][:, :T], outs["hf"][:, :T])
                    line += f" {B * N / theirs:>9,.0f} {theirs / cached:>6.2f} {str(same):>7}"
                print(line, flush=True)


def time_decode_paths(paths, repeats, run):
    """{path: output}, {path: [seconds]} of `repeats` interleaved rounds over `paths`."""
    outs = {}

    def keeping_output(p, fn):
        def call():
            outs[p] = fn()
        return call
    times = interleaved_rounds({p: keeping_output(p, fn) for p, fn in paths.items()}, repeats, run)
    return outs, times


def interleaved_rounds(paths, repeats, run, seed=0):
    """{path: [seconds]} of `repeats` rounds in which every path runs once, in an order
    shuffled anew each round (seeded). A path inherits the freed memory and the cache
    state of the one before it; a fixed cyclic order (even rotated) would have each path
    always follow the same other path, a bias that a shuffle spreads over all of them."""
    names, times = list(paths), {p: [] for p in paths}
    rng = random.Random(seed)
    for _ in range(repeats):
        rng.shuffle(names)
        for p in names:
            times[p].append(run(paths[p]))
    return times


def decode_hf_twin(model, tmp, device):
    """The transformers model with `model`'s weights (exported by convert.py), or None:
    no transformers, or a model no HF class computes (Lory)."""
    try:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging
    except ImportError:
        return None
    import convert
    from checkpoint import save_checkpoint
    save_checkpoint({"model_args": asdict(model.config), "model": model.state_dict(), "config": {}}, tmp + "_ckpt")
    try:
        convert.export_hf(tmp + "_ckpt", tmp)
    except convert.ConvertError:
        return None
    hf_logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).to(device).eval()


@torch.no_grad()
def hf_generate(hf, prompt, n):
    """transformers' greedy generate for exactly n new tokens (no early stop at eos)."""
    hf.generation_config.eos_token_id = None
    return hf.generate(prompt, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0,
                       attention_mask=torch.ones_like(prompt))


# --hf_shape: the random HF Llama --hf builds when no HF_DIR is given, and the batch it
# times (batch, tokens per sequence); --model_batch / --model_block override the batch
SMOLLM_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                   num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                   rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True)
HF_SHAPES = {
    "toy": (8, 256, dict(vocab_size=256, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rms_norm_eps=1e-5, tie_word_embeddings=False)),
    "smollm-135m": (1, 512, dict(SMOLLM_135M, num_hidden_layers=8)),     # its width, 8 of its 30 layers
    "smollm-135m-full": (1, 512, SMOLLM_135M),
}


def hf_bench_models(hf_dir, tmp, shape="toy", control=False):
    """[(name, project GPT, transformers model, control)] on the same weights: the HF model
    in hf_dir (a random Llama of HF_SHAPES[shape] when None) and, for a dense one, its
    upcycled 8x2 MoE exported to Mixtral. Both sides are loaded from the files convert.py
    wrote. control: a second transformers model loaded from the same files (else None)."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    import convert
    from checkpoint import load_model
    from upcycle import upcycle_checkpoint
    if hf_dir is None:
        torch.manual_seed(0)
        hf_dir = os.path.join(tmp, "llama")
        AutoModelForCausalLM.from_config(LlamaConfig(**HF_SHAPES[shape][2]), dtype=torch.float32).save_pretrained(hf_dir)
    convert.import_hf(hf_dir, os.path.join(tmp, "imported"))
    pairs = [(os.path.join(tmp, "imported"), hf_dir)]
    if not load_model(pairs[0][0])[0].config.is_moe:
        upcycle_checkpoint(pairs[0][0], os.path.join(tmp, "moe"),
                           {"model_args": {"moe_layers": "all", "n_experts": 8, "top_k": 2}})
        convert.export_hf(os.path.join(tmp, "moe"), os.path.join(tmp, "mixtral"))
        pairs.append((os.path.join(tmp, "moe"), os.path.join(tmp, "mixtral")))
    out = []
    for ckpt, hf in pairs:
        ours = load_model(ckpt)[0]
        theirs = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
        second = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32) if control else None
        out.append((type(theirs).__name__, ours, theirs, second))
    return out


def bench_hf(args, device):
    """Forward tokens/s (no grad) and training steps (forward, backward, AdamW) of this
    project's model and transformers' on the same weights, interleaved rounds, median.
    Ratios are transformers' time / ours: > 1 means this project is faster. With
    --hf_control a second copy of the transformers model runs in the same rounds, and its
    row (name(A/A)) gives the ratios of identical code: the benchmark's own noise."""
    B = args.model_batch
    with tempfile.TemporaryDirectory() as tmp:
        models = hf_bench_models(None if args.hf == "random" else args.hf, tmp, args.hf_shape, args.hf_control)
        print(f"machine: {machine(device)}")
        print(f"shape: {args.hf if args.hf != 'random' else args.hf_shape}; same weights in this project and in "
              f"transformers; batch {B} x T tokens, fp32; median of {args.repeats or 5} interleaved rounds; "
              f"ratio = transformers time / ours; 95%: bootstrap interval of the ratio over the rounds")
        print(f"{'model':<24} {'params':>8} {'T':>5} {'max|dlogit|':>12} {'fwd tok/s ours':>15} {'theirs':>10} "
              f"{'ratio':>6} {'fwd 95%':>10} {'step ms ours':>13} {'theirs':>9} {'ratio':>6} {'step 95%':>10} "
              f"{'fwd rounds':>11} {'step rounds':>11}")
        for name, ours, theirs, control in models:
            T = min(args.model_block, ours.config.block_size)
            x = torch.randint(0, ours.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(args.seed))
            ours, theirs, x = ours.to(device), theirs.to(device), x.to(device)
            sides = {"ours": ours} if control is None else {"ours": ours, "control": control.to(device)}
            with torch.no_grad():
                logits = bench_logits(theirs.eval(), x)
                diffs = {side: (bench_logits(m.eval(), x) - logits).abs().max().item() for side, m in sides.items()}
            paths = hf_bench_paths({"theirs": theirs, **sides}, x)
            run = timer(device)
            interleaved_rounds(paths, max(args.warmup or 1, 1), run)
            times = interleaved_rounds(paths, args.repeats or 5, run)
            print(hf_row(name, ours.num_params(), B, T, diffs["ours"], times, "ours"), flush=True)
            if control is not None:
                print(hf_row(f"{name}(A/A)", control.num_parameters(), B, T, diffs["control"], times, "control"))


def hf_row(label, params, B, T, diff, times, side):
    """One line of bench_hf's table: `side` (ours, or the transformers control) against theirs."""
    med = {k: statistics.median(t) for k, t in times.items()}
    fwd, step = (med[f"{w} theirs"] / med[f"{w} {side}"] for w in ("fwd", "step"))
    return (f"{label:<24} {params / 1e6:>7.2f}M {T:>5} {diff:>12.1e} "
            f"{B * T / med[f'fwd {side}']:>15,.0f} {B * T / med['fwd theirs']:>10,.0f} {fwd:>6.2f} "
            f"{ratio_interval(times, 'fwd', side):>10} {med[f'step {side}'] * 1e3:>13.1f} "
            f"{med['step theirs'] * 1e3:>9.1f} {step:>6.2f} {ratio_interval(times, 'step', side):>10} "
            f"{round_ratios(times, 'fwd', side):>11} {round_ratios(times, 'step', side):>11}")


def round_ratios(times, what, side="ours"):
    """'lo-hi': the smallest and largest ratio theirs / side within one round. Both sides
    of a round run within seconds of each other, so a slow spell of a shared machine moves
    a round's two times together; the spread shows what a single round can say."""
    ratios = [t / o for o, t in zip(times[f"{what} {side}"], times[f"{what} theirs"])]
    return f"{min(ratios):.2f}-{max(ratios):.2f}"


def ratio_interval(times, what, side="ours", resamples=2000, seed=0):
    """'lo-hi': a 95% bootstrap interval of the reported ratio, median(theirs) /
    median(side), resampling whole rounds (a round's times stay paired). An interval
    that contains 1.0 does not tell the two apart; one above 1.0 says `side` is faster."""
    ours, theirs = times[f"{what} {side}"], times[f"{what} theirs"]
    rng, rounds = random.Random(seed), range(len(ours))
    ratios = []
    for _ in range(resamples):
        pick = [rng.choice(rounds) for _ in rounds]
        ratios.append(statistics.median(theirs[i] for i in pick) / statistics.median(ours[i] for i in pick))
    ratios.sort()
    return f"{ratios[int(0.025 * resamples)]:.2f}-{ratios[int(0.975 * resamples) - 1]:.2f}"


def hf_bench_paths(sides, x):
    """The timed closures, "fwd SIDE" and "step SIDE": forward (eval, no grad) and
    training step (forward, backward, AdamW) of every side: theirs (transformers), ours
    (the project's GPT) and, when given, control (a second transformers model)."""
    paths = {}
    for side, model in sides.items():
        paths[f"fwd {side}"] = forward_path(model, x)
        paths[f"step {side}"] = step_path(model, lambda m=model: bench_loss(m, x))
    return paths


def bench_logits(model, x):
    """(B, T, V) logits of either kind of model: the project's GPT returns a tuple,
    transformers an output object."""
    out = model(x)
    return out[0] if isinstance(model, GPT) else out.logits


def bench_loss(model, x):
    """Next-token loss on x: the project's GPT takes the shifted targets, transformers
    shifts the labels itself."""
    return model(x[:, :-1], x[:, 1:])[1] if isinstance(model, GPT) else model(x, labels=x).loss


def forward_path(model, x):
    """A forward of model on x in eval mode, without autograd."""
    @torch.no_grad()
    def fwd():
        model.eval()
        model(x)
    return fwd


def step_path(model, loss_of):
    """One training step: loss_of() forward, backward, an AdamW update, gradients freed."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        model.train()
        loss_of().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _ep_bench_rank(rank, world, port, ep_size, args, out_path):
    """One spawned rank of bench_expert_parallel: demo-scale upcycled MoE, sharded
    over ep_size ranks (ep_size 1: the plain model, no dispatch), timed steps."""
    import torch.distributed as dist
    import parallel
    from model import GPTConfig
    torch.set_num_threads(1)
    ep = parallel.init_distributed(ep_size, "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                   rank=rank, world_size=world)
    cfg = GPTConfig(vocab_size=256, block_size=args["block"], n_layer=4, n_head=4, n_embd=128,
                    moe_layers="all", n_experts=8, top_k=args["k"], expert_impl="grouped")
    torch.manual_seed(0)
    model = parallel.build_sharded_model(cfg, ep)   # ep_size 1: the plain model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, 256, (args["batch"], args["block"]), generator=torch.Generator().manual_seed(rank))
    times, comm = [], []
    for i in range(args["warmup"] + args["repeats"]):
        dist.barrier()
        ep.comm_bytes, ep.comm_seconds = 0, 0.0
        t0 = time.perf_counter()
        _, loss, _ = model(x, x)
        loss.backward()
        parallel.sync_gradients(model, ep)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= args["warmup"]:
            times.append(time.perf_counter() - t0)
            comm.append((ep.comm_bytes, ep.comm_seconds))
    stats = torch.tensor([statistics.median(times), sum(c[0] for c in comm) / len(comm),
                          sum(c[1] for c in comm) / sum(times)], dtype=torch.float64)
    dist.all_reduce(stats)                                     # mean over ranks
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump((stats / world).tolist(), f)
    dist.destroy_process_group()


def bench_expert_parallel(args):
    """Expert parallelism on CPU: EP=N ranks (spawned processes, gloo), each with its
    own micro-batch of batch x block tokens, the demo's upcycled shape (4 layers,
    d=128, 8 experts top-k, every FFN an MoE). Per EP size: median step time
    (forward, backward, gradient sync, AdamW), the bytes one rank's all-to-alls send
    per step, and the share of the step spent inside all-to-all calls (this includes
    waiting for the slowest rank). Bytes per token per MoE layer, uniform routing:
    4 * k * (N-1)/N * d * 4 (fp32 rows, dispatch + return, forward + backward)."""
    import torch.multiprocessing as mp
    B, T, k, d, L = args.model_batch, args.model_block, args.k, 128, 4
    cfg = {"batch": B, "block": T, "k": k, "warmup": args.warmup or 1, "repeats": args.repeats or 5}
    print(f"machine: {machine(torch.device('cpu'))}")
    print(f"expert parallel: {L} MoE layers, d={d}, 8 experts top-{k}, {B} x {T} tokens per rank per step, "
          f"fp32, gloo; median of {cfg['repeats']} steps")
    print("all-to-all bytes per token per MoE layer = 4 * k * (N-1)/N * d * 4 "
          "(dispatch + return, forward + backward; uniform routing)")
    print(f"{'EP':>3} {'ms/step':>9} {'tok/s':>10} {'a2a MB/step':>12} {'formula MB':>11} {'a2a share':>10}")
    ctx = mp.get_context("spawn")
    for N in args.expert_parallel:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "ep.json")
            procs = [ctx.Process(target=_ep_bench_rank, args=(r, N, port, N, cfg, out)) for r in range(N)]
            for p in procs:
                p.start()
            for p in procs:
                p.join(600)
            if any(p.exitcode != 0 for p in procs) or not os.path.exists(out):
                for p in procs:
                    p.kill()
                raise SystemExit(f"error: the EP={N} benchmark ranks failed (exit codes "
                                 f"{[p.exitcode for p in procs]}); see their output above")
            step, sent, share = json.load(open(out))
        formula = 4 * k * (N - 1) / N * d * 4 * B * T * L
        print(f"{N:>3} {step * 1e3:>9.1f} {N * B * T / step:>10,.0f} {sent / 1e6:>12.2f} "
              f"{formula / 1e6:>11.2f} {share * 100:>9.1f}%", flush=True)


EXPERT_IMPLS = ("auto", *experts.IMPLS)                                    # what moe_ffn(impl=...) takes
BENCH_IMPLS = (*EXPERT_IMPLS, "grouped_mm", "grouped_padded", "grouped_slices")  # + bench-only aliases


def check_args(p, args):
    """Reject bad flags with one line before anything runs (p.error exits 2)."""
    def ints(flag, text):
        try:
            return [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            p.error(f"--{flag}={text!r} takes comma-separated integers")
    args.experts = ints("experts", args.experts)
    args.decode_batches = ints("decode_batches", args.decode_batches)
    if not args.decode_batches or min(args.decode_batches) < 1:
        p.error(f"--decode_batches needs one or more batch sizes >= 1, got {args.decode_batches}")
    archs = ints("compile-only", args.compile_only)
    if args.compile_only and not archs:
        p.error("--compile-only needs compute capabilities like 90 or 80,90")
    if not args.experts or min(args.experts) < 1:
        p.error(f"--experts needs one or more counts >= 1, got {args.experts}")
    for key in ("tokens", "d", "d_ff_expert", "repeats", "model_batch", "model_block", "model_experts",
                "decode_tokens", "decode_prompt"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            p.error(f"--{key}={getattr(args, key)} must be >= 1")
    if not 1 <= args.k <= min(args.experts + ([args.model_experts] if args.model or args.decode else [])):
        p.error(f"--k={args.k} must be between 1 and the smallest expert count")
    if args.warmup is not None and args.warmup < 0:
        p.error(f"--warmup={args.warmup} must be >= 0")
    if args.dtype not in (None, "float32", "bfloat16", "float16"):
        p.error(f"--dtype={args.dtype} must be float32, bfloat16 or float16")
    if args.impls is not None:
        bad = [s.strip() for s in args.impls.split(",") if s.strip() not in BENCH_IMPLS]
        if bad or not args.impls.strip(","):
            p.error(f"--impls: unknown {bad or 'empty list'}; valid: {', '.join(BENCH_IMPLS)}")
    if args.model_impl not in EXPERT_IMPLS:
        p.error(f"--model_impl={args.model_impl} must be one of {', '.join(EXPERT_IMPLS)}")
    if args.hf_control and not args.hf:
        p.error("--hf_control adds a row to --hf; pass --hf too")
    if args.hf and args.hf != "random" and not os.path.isfile(os.path.join(args.hf, "config.json")):
        p.error(f"--hf={args.hf} is not a Hugging Face model directory (no config.json)")
    if args.device != "auto" and device_problem(args.device):
        p.error(f"--device={args.device} {device_problem(args.device)}")
    if args.expert_parallel is not None:
        args.expert_parallel = ints("expert_parallel", args.expert_parallel)
        if not args.expert_parallel or min(args.expert_parallel) < 1 or any(8 % n for n in args.expert_parallel):
            p.error(f"--expert_parallel={args.expert_parallel} needs EP sizes that divide the 8 experts (1, 2, 4, 8)")
    return archs


def make_parser():
    """bench.py's flags (see the module doc)."""
    p = ArgumentParser(prog="bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="store_true",
                   help="time whole training steps: dense vs MoE vs FLOP-matched dense (see bench_model)")
    p.add_argument("--hf", nargs="?", const="random", default=None, metavar="HF_DIR",
                   help="this project vs transformers on the same weights (see bench_hf); needs transformers")
    p.add_argument("--hf_shape", default="toy", choices=sorted(HF_SHAPES),
                   help="with --hf and no HF_DIR: the random Llama's shape and batch (see HF_SHAPES)")
    p.add_argument("--hf_control", action="store_true",
                   help="with --hf: also time a second copy of the transformers model in the same rounds "
                        "(an A/A row: the ratios identical code gets, the benchmark's own noise)")
    p.add_argument("--model_batch", type=int, default=None, help="sequences per batch (--model: 8; --hf: the shape's)")
    p.add_argument("--model_block", type=int, default=None, help="tokens per sequence (--model: 256; --hf: the shape's)")
    p.add_argument("--model_experts", type=int, default=8)
    p.add_argument("--model_impl", default="auto", help="expert kernel of the MoE model")
    p.add_argument("--decode", action="store_true",
                   help="time generation with and without the KV cache (see bench_decode)")
    p.add_argument("--decode_batches", default="1,8", help="comma-separated batch sizes for --decode")
    p.add_argument("--decode_tokens", type=int, default=256, help="new tokens per sequence for --decode")
    p.add_argument("--decode_prompt", type=int, default=32, help="prompt tokens for --decode")
    p.add_argument("--expert_parallel", nargs="?", const="1,2,4", default=None, metavar="N[,N]",
                   help="expert parallelism in spawned gloo processes for these EP sizes (default 1,2,4): "
                        "step time and all-to-all bytes (see bench_expert_parallel)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--tokens", type=int, default=None, help="T (CPU 4096, GPU 16384)")
    p.add_argument("--d", type=int, default=None, help="model width (CPU 256, GPU 1024)")
    p.add_argument("--d_ff_expert", type=int, default=None, help="expert hidden size (CPU 704, GPU 2816)")
    p.add_argument("--k", type=int, default=2, help="experts per token")
    p.add_argument("--experts", default="8,16,32,64", help="comma-separated E sweep")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (CPU float32, GPU bfloat16)")
    p.add_argument("--impls", default=None,
                   help="comma-separated: loop, grouped, triton, auto; bench-only aliases "
                        "grouped_mm / grouped_padded / grouped_slices force the grouped GEMM backend "
                        "(default: loop,grouped,triton; on a GPU also grouped_padded)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (CPU 5, GPU 20)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs per path (CPU 1, GPU 5)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--max_path_seconds", type=float, default=15.0,
                   help="a path whose forward+backward takes t s gets only max(1, this / t) timed rounds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="torch.profiler table for the first E")
    p.add_argument("--compile-only", default="", metavar="ARCH[,ARCH]",
                   help="no timing: compile the Triton kernels for these compute capabilities (e.g. 90 or "
                        "80,90) without a GPU and report registers / spills / pipelining")
    p.add_argument("--compile-configs", default="all", choices=["all", "first"],
                   help="with --compile-only: every autotune config, or the first of each kernel")
    return p


def main(argv=None):
    p = make_parser()
    args = p.parse_args(argv)
    archs = check_args(p, args)
    if args.compile_only:
        os.environ["TRITON_INTERPRET"] = "0"         # real compilation, GPU autotune configs
        for arch in archs:
            compile_report(arch, {"float32": "fp32", "float16": "fp16"}.get(args.dtype, "bf16"),
                           first_only=args.compile_configs == "first")
        return

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    batch, block = HF_SHAPES[args.hf_shape][:2] if args.hf else (8, 256)
    args.model_batch, args.model_block = args.model_batch or batch, args.model_block or block
    if args.model:
        return bench_model(args, device)
    if args.decode:
        return bench_decode(args, device)
    if args.hf:
        return bench_hf(args, device)
    if args.expert_parallel:
        return bench_expert_parallel(args)
    return bench_kernels(args, device)


def bench_kernels(args, device):
    """The default bench: every expert path against the FLOP-matched dense FFN, per E."""
    gpu = device.type == "cuda"
    defaults = dict(tokens=16384, d=1024, d_ff_expert=2816, dtype="bfloat16", repeats=20, warmup=5,
                    impls="loop,grouped,grouped_padded,triton") if gpu else \
        dict(tokens=4096, d=256, d_ff_expert=704, dtype="float32", repeats=5, warmup=1, impls="loop,grouped,triton")
    for key, val in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, val)
    dtype = getattr(torch, args.dtype)
    impls, notes = [], []
    for name in [s.strip() for s in args.impls.split(",") if s.strip()]:
        if name == "triton" and not gpu:
            notes.append("triton skipped: on CPU it runs only in the Triton interpreter (seconds per launch); "
                         "its correctness is tested (tests/test_experts.py), its speed needs a GPU")
            continue
        if name == "triton" and not experts.triton_status()[0]:
            notes.append(f"triton skipped: {experts.triton_status()[1]}")
            continue
        impls.append(name)

    T, d, h, k = args.tokens, args.d, args.d_ff_expert, args.k
    flops = 18 * T * k * d * h                     # forward + backward matmul FLOPs (MoE = dense)
    name, why = experts.auto_impl(device, dtype)
    print(f"machine: {machine(device)}")
    print(f"shape: T={T} d={d} d_ff_expert={h} k={k} dtype={args.dtype}; dense FFN width k*d_ff_expert={k * h}; "
          f"{flops / 1e9:.1f} GFLOP per forward+backward; median of n rounds")
    print(f"auto -> {name} ({why})")
    head = f"{'E':>3} {'path':<15} {'fwd ms':>9} {'fwd+bwd ms':>11} {'MoE/dense':>10} {'vs loop':>8} {'n':>3}"
    print(head + (f" {'TFLOP/s':>8}" if gpu else ""))
    for E in args.experts:
        rows = bench_one(args, E, device, dtype, impls, notes)
        fb = {n: t for n, _, t, _ in rows}
        dense, loop = fb["dense"], fb.get("loop")
        for n, tf, tfb, reps in rows:
            line = (f"{E:>3} {n:<15} {tf * 1e3:>9.2f} {tfb * 1e3:>11.2f} {tfb / dense:>10.2f} "
                    f"{(loop / tfb if loop else float('nan')):>8.2f} {reps:>3}")
            print(line + (f" {flops / tfb / 1e12:>8.1f}" if gpu else ""), flush=True)
    for n in notes:
        print(f"note: {n}")


if __name__ == "__main__":
    main()
