"""Expert kernels: every path (grouped with each GEMM backend: auto, per-expert
slices, padded bmm, torch grouped_mm; fused Triton) equals the loop reference in the output and in every gradient
(x, gates, w1, w3, w2) at fp32 tolerance 1e-4, for the routing shapes that break
kernels: k in {1, 2, 4}, empty experts, all tokens on one expert, token counts that
are not a multiple of the block size, odd hidden sizes, dropped assignments, an
expert-choice list (a token 0..E times), a random upstream gradient.

Without a GPU the Triton path runs in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), fp32 only and on tiny shapes (seconds per launch); with a GPU the
same tests run the compiled kernels on CUDA tensors.
"""
import math
import os
import subprocess
import statistics
import sys

import pytest
import torch

import experts
from experts import auto_impl, moe_ffn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON_OK, TRITON_WHY = experts.triton_status()
TOL = dict(atol=1e-4, rtol=1e-4)

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes: one intra-op thread. On a loaded 2-core machine every parallel
    region of a tiny op can wait a whole scheduler slice for a descheduled thread
    (this file: ~50 s with 2 threads under load, ~10 s with 1)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# path id -> callable(x, tok, ex, gates, w1, w3, w2)
PATHS = {
    "grouped": lambda *a: moe_ffn(*a, impl="grouped"),
    "grouped_slices": lambda *a: experts.moe_ffn_grouped(*a, gemm="slices"),
    "grouped_padded": lambda *a: experts.moe_ffn_grouped(*a, gemm="padded"),
    "grouped_mm": lambda *a: experts.moe_ffn_grouped(*a, gemm="grouped_mm"),
    "triton": lambda *a: moe_ffn(*a, impl="triton"),
}


def skip_reason(path, d, h):
    if path == "triton" and not TRITON_OK:
        return f"Triton path unavailable: {TRITON_WHY}"
    if path == "grouped_mm":
        if not hasattr(torch.nn.functional, "grouped_mm"):
            return "torch has no F.grouped_mm"
        if DEVICE.type == "cuda":
            return "CUDA grouped_mm is bf16-only: covered by test_experts_gpu.py"
        if d % 4 or h % 4:
            return "grouped_mm needs 16-byte row strides (fp32: sizes multiple of 4)"
    return None


def topk_routing(T, E, k, gen, allowed=None):
    """Token-choice top-k over the `allowed` experts (default all E): token-major (A=T*k) lists."""
    pool = torch.arange(E) if allowed is None else torch.tensor(allowed)
    pick = torch.rand(T, len(pool), generator=gen).topk(k, dim=-1).indices        # (T, k)
    tok = torch.arange(T).repeat_interleave(k)
    return tok, pool[pick.reshape(-1)]


def make_case(kind, T, d, h, E, k, seed=0):
    """Inputs for one routing shape; x ~ N(0, 1) and weights scaled so that every
    intermediate is O(1) (absolute and relative tolerances then mean the same)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "topk":
        tok, ex = topk_routing(T, E, k, g)
    elif kind == "empty_experts":                 # experts 1, 3, 4 get nothing
        tok, ex = topk_routing(T, E, k, g, allowed=[0, 2, 5])
    elif kind == "one_expert":                    # everything on expert E-1
        tok, ex = torch.arange(T), torch.full((T,), E - 1)
    elif kind == "dropped":                       # capacity dropping: a subset of the T*k list
        tok, ex = topk_routing(T, E, k, g)
        keep = torch.rand(tok.numel(), generator=g) < 0.6
        tok, ex = tok[keep], ex[keep]
    elif kind == "expert_choice":                 # each expert takes its top-C tokens
        C = math.ceil(T * 1.5 / E)
        tok = torch.rand(E, T, generator=g).topk(C, dim=-1).indices.reshape(-1)
        ex = torch.arange(E).repeat_interleave(C)
    else:
        raise ValueError(kind)
    x = torch.randn(T, d, generator=g)
    w1 = torch.randn(E, h, d, generator=g) / d ** 0.5
    w3 = torch.randn(E, h, d, generator=g) / d ** 0.5
    w2 = torch.randn(E, d, h, generator=g) / h ** 0.5
    gates = torch.rand(tok.numel(), generator=g)
    gy = torch.randn(T, d, generator=g)           # random upstream gradient (not .sum())
    to = lambda t: t.to(DEVICE)
    return [to(t) for t in (x, tok, ex, gates, w1, w3, w2, gy)]


def run(fn, x, tok, ex, gates, w1, w3, w2, gy, grads=(0, 3, 4, 5, 6)):
    """y and the gradients of the inputs at positions `grads` (default all:
    x, gates, w1, w3, w2) for upstream gradient gy."""
    args = [x, tok, ex, gates, w1, w3, w2]
    args = [a.detach().clone().requires_grad_(i in grads) for i, a in enumerate(args[:1])] + \
        [tok, ex] + [a.detach().clone().requires_grad_(i in grads) for i, a in zip((3, 4, 5, 6), args[3:])]
    y = fn(*args)
    inputs = [args[i] for i in grads]
    return [y.detach()] + list(torch.autograd.grad(y, inputs, gy))


NAMES = ["y", "dx", "dgates", "dw1", "dw3", "dw2"]

# (case id, routing kind, T, d, h, E, k). Blocks are 16 rows in the interpreter
# (64/128 on a GPU): none of these assignment counts is a multiple of the block.
CASES = [
    ("k1", "topk", 37, 72, 40, 4, 1),              # d = 72: several K steps, masked tail
    ("k2", "topk", 37, 24, 40, 4, 2),
    ("k4", "topk", 29, 24, 40, 6, 4),
    ("empty_experts", "empty_experts", 37, 24, 40, 6, 2),
    ("all_on_one_expert", "one_expert", 45, 24, 40, 5, 1),
    ("odd_hidden", "topk", 23, 19, 27, 3, 2),
    ("single_token", "topk", 1, 24, 40, 4, 2),
    ("dropped", "dropped", 41, 24, 40, 4, 2),
    ("expert_choice", "expert_choice", 33, 24, 40, 4, 0),
]


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_path_matches_loop(path, case):
    _, kind, T, d, h, E, k = case
    reason = skip_reason(path, d, h)
    if reason:
        pytest.skip(reason)
    inputs = make_case(kind, T, d, h, E, k)
    ref = run(experts.moe_ffn_loop, *inputs)
    out = run(PATHS[path], *inputs)
    for name, o, r in zip(NAMES, out, ref):
        assert o.dtype == r.dtype and o.shape == r.shape, name
        torch.testing.assert_close(o, r, **TOL, msg=lambda m: f"{path} {case[0]} {name}: {m}")


@pytest.mark.parametrize("path", ["grouped", "triton"])
def test_partial_gradients(path):
    """Only some inputs need gradients (frozen experts, a detached router): the
    backward skips the rest and what it does compute still matches."""
    if skip_reason(path, 24, 40):
        pytest.skip(skip_reason(path, 24, 40))
    inputs = make_case("topk", 21, 24, 40, 4, 2, seed=1)
    for grads in [(0,), (3,), (4, 6)]:
        ref = run(experts.moe_ffn_loop, *inputs, grads=grads)
        out = run(PATHS[path], *inputs, grads=grads)
        for o, r in zip(out, ref):
            torch.testing.assert_close(o, r, **TOL)


@pytest.mark.parametrize("path", list(PATHS))
def test_no_assignments(path):
    """Everything dropped: y = 0 and all gradients are zero (not an error)."""
    if skip_reason(path, 24, 40):
        pytest.skip(skip_reason(path, 24, 40))
    x, tok, ex, gates, w1, w3, w2, gy = make_case("topk", 9, 24, 40, 4, 2)
    out = run(PATHS[path], x, tok[:0], ex[:0], gates[:0], w1, w3, w2, gy)
    assert out[0].shape == x.shape
    for t in out:
        assert torch.count_nonzero(t) == 0


def test_grouped_under_autocast():
    """Under autocast the grouped path casts to the autocast dtype itself and returns
    y in x's dtype, like the loop (whose F.linear autocasts); bf16 tolerance."""
    dev = DEVICE.type
    x, tok, ex, gates, w1, w3, w2, gy = make_case("topk", 40, 32, 48, 4, 2)
    with torch.autocast(dev, dtype=torch.bfloat16):
        ref = run(experts.moe_ffn_loop, x, tok, ex, gates, w1, w3, w2, gy)
        out = run(PATHS["grouped"], x, tok, ex, gates, w1, w3, w2, gy)
    assert out[0].dtype == x.dtype
    for name, o, r in zip(NAMES, out, ref):
        assert o.dtype == r.dtype, name
        rel = ((o.float() - r.float()).norm() / r.float().norm()).item()
        assert rel < 2e-2, (name, rel)


def test_auto_and_forced_path(monkeypatch):
    """auto_impl names an available path and says why; MOE_KERNEL_IMPL forces the
    path "auto" takes (how tests push a whole model through one path)."""
    monkeypatch.delenv(experts.IMPL_ENV, raising=False)
    name, why = auto_impl(DEVICE, torch.float32)
    assert name in experts.IMPLS and why
    cpu_name, cpu_why = auto_impl("cpu", torch.float32)
    assert cpu_name == "grouped" and "cpu" in cpu_why
    inputs = make_case("topk", 17, 24, 40, 4, 2)
    calls = []
    monkeypatch.setitem(experts.IMPLS, "loop", lambda *a: calls.append("loop") or experts.moe_ffn_loop(*a))
    monkeypatch.setenv(experts.IMPL_ENV, "loop")
    assert auto_impl("cpu", torch.float32) == ("loop", f"forced by {experts.IMPL_ENV}=loop")
    moe_ffn(*inputs[:7])
    assert calls == ["loop"]
    with pytest.raises(ValueError, match="unknown expert kernel impl"):
        moe_ffn(*inputs[:7], impl="nope")


def test_model_forced_through_each_path(monkeypatch):
    """A whole MoE model (top-k with capacity dropping, and expert choice) gives the
    same loss and gradients through every path as through the loop."""
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    idx = torch.randint(0, 64, (2, 16), device=DEVICE)
    for router, cf in [("topk_softmax", 1.0), ("expert_choice", 1.0)]:
        cfg = GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=64, block_size=16, moe_layers="all",
                        n_experts=4, top_k=2, router=router, capacity_factor=cf)
        model = GPT(cfg).to(DEVICE)
        results = {}
        for path in ["loop", "grouped", "triton"]:
            if skip_reason(path, 32, cfg.expert_hidden):
                continue
            monkeypatch.setenv(experts.IMPL_ENV, path)
            model.zero_grad(set_to_none=True)
            _, loss, _ = model(idx, idx)
            loss.backward()
            results[path] = [loss.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]
        for path, res in results.items():
            for a, b in zip(res, results["loop"]):
                torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{router} {path}: {m}")


def test_import_never_imports_triton():
    """`import experts` (and the model) must work where triton is absent, and must not
    import it; with triton blocked, "auto" falls back and "triton" says why."""
    code = (
        "import sys\n"
        "import experts, model\n"
        "assert 'triton' not in sys.modules, 'import experts imported triton'\n"
        "sys.modules['triton'] = None\n"          # triton is now unimportable
        "import torch\n"
        "ok, why = experts.triton_status()\n"
        "assert not ok and 'not importable' in why, why\n"
        "print(experts.auto_impl('cpu', torch.float32))\n"
        "x = torch.randn(5, 8); w = torch.randn(2, 12, 8); w2 = torch.randn(2, 8, 12)\n"
        "tok = torch.arange(5); ex = torch.tensor([0, 1, 1, 0, 1]); g = torch.rand(5)\n"
        "y = experts.moe_ffn(x, tok, ex, g, w, w, w2, impl='auto')\n"
        "torch.testing.assert_close(y, experts.moe_ffn_loop(x, tok, ex, g, w, w, w2))\n"
        "try:\n"
        "    experts.moe_ffn(x, tok, ex, g, w, w, w2, impl='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'triton' in str(e)\n"
        "else:\n"
        "    raise AssertionError('impl=triton ran without triton')\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]


def _ptxas_available():
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return os.path.exists(get_ptxas(90).path)
    except Exception:
        return False


@pytest.mark.skipif(not TRITON_OK or not _ptxas_available(), reason="needs triton with its bundled ptxas")
def test_triton_kernels_compile_for_sm90():
    """The interpreter does not type-check like the compiler does: compile every
    kernel variant (first autotune config) for sm_90 ahead of time, no GPU needed,
    and require tensor-core MMAs, pipelined loads and no register spills."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--compile-only=90",
                        "--compile-configs=first"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [l for l in p.stdout.splitlines() if l.startswith("sm_90")]
    assert len(lines) == 6, p.stdout
    for line in lines:
        assert "wgmma" in line and " pipelined" in line and "spill 0B" in line, line


def test_bench_script_smoke():
    """bench.py runs end to end on tiny sizes and prints its table."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--device=cpu", "--tokens=64", "--d=32",
                        "--d_ff_expert=48", "--experts=4,8", "--repeats=1", "--warmup=1", "--threads=1",
                        "--impls=loop,grouped,grouped_padded,triton"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout
    assert "machine: CPU" in out and "MoE/dense" in out and "triton skipped" in out, out
    rows = [l.split() for l in out.splitlines() if l.split()[:1] in (["4"], ["8"])]
    assert {r[1] for r in rows} == {"dense", "loop", "grouped", "grouped_padded"}, out


def test_bench_hf_shape_preset_smoke():
    """bench.py --hf with a shape preset: the random Llama and its upcycled Mixtral run
    in this project and in transformers on the same weights (logits agree), and every
    row prints forward and training-step ratios; --hf_control adds the A/A rows of a
    second transformers copy, whose logits equal the first's exactly."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--hf", "--hf_shape=toy", "--model_batch=1",
                        "--model_block=16", "--repeats=1", "--warmup=0", "--threads=1", "--hf_control"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "shape: toy" in p.stdout, p.stdout
    names = ["LlamaForCausalLM", "MixtralForCausalLM", "LlamaForCausalLM(A/A)", "MixtralForCausalLM(A/A)"]
    rows = {l.split()[0]: l.split() for l in p.stdout.splitlines() if l.split()[:1] in [[n] for n in names]}
    assert set(rows) == set(names), p.stdout
    for name, r in rows.items():   # name params T max|dlogit| fwd: ours theirs ratio 95%, step: the same, 2 ranges
        assert r[2] == "16" and float(r[3]) < 1e-4 and float(r[6]) > 0 and float(r[10]) > 0, r
        assert float(r[3]) == 0 or "(A/A)" not in name, r           # the same code on the same files
        (f_lo, f_hi), (s_lo, s_hi), (fr_lo, fr_hi), (sr_lo, sr_hi) = (map(float, c.split("-")) for c in
                                                                        (r[7], r[11], r[12], r[13]))
        # one round: the interval and the range are the ratio itself
        assert f_lo == f_hi == fr_lo == fr_hi == float(r[6]) and s_lo == s_hi == sr_lo == sr_hi == float(r[10]), r


def test_bench_ratio_interval_brackets_the_median_ratio():
    """bench.ratio_interval: a bootstrap interval over paired rounds that contains the
    reported median ratio, is a single point when every round agrees, and widens with
    the spread of the rounds."""
    import bench
    flat = {"fwd ours": [1.0] * 9, "fwd theirs": [1.1] * 9}
    assert bench.ratio_interval(flat, "fwd") == "1.10-1.10"
    noisy = {"fwd ours": [1.0, 1.2, 0.9, 1.1, 1.0, 1.3, 0.8, 1.0, 1.05],
             "fwd theirs": [1.1, 1.0, 1.0, 1.2, 0.9, 1.1, 1.0, 1.3, 1.0]}
    lo, hi = map(float, bench.ratio_interval(noisy, "fwd").split("-"))
    ratio = statistics.median(noisy["fwd theirs"]) / statistics.median(noisy["fwd ours"])
    assert lo <= ratio <= hi and hi - lo > 0.05, (lo, ratio, hi)


def test_experts_imports_triton_lazily_and_experts_triton_stands_alone():
    """`import experts` imports no triton (the fused path loads on first use), and
    experts_triton works from sorted inputs without importing experts."""
    code = ("import sys, experts\n"
            "assert 'triton' not in sys.modules and 'experts_triton' not in sys.modules\n"
            "del sys.modules['experts']\n"
            "import experts_triton\n"
            "assert 'experts' not in sys.modules\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert p.returncode == 0, p.stderr[-2000:]


def test_padding_rows_contribute_nothing_even_on_overflow():
    """The padded grouped GEMM fills experts to one size with zero rows: a padding row
    that copied a real token could overflow in fp16 (expert 1 on token 0 is inf here,
    although token 0 never goes to expert 1), and gate 0 * inf would be NaN in y[0]."""
    T, d, h, E = 4, 8, 8, 2
    x = torch.full((T, d), 0.1, dtype=torch.float16)
    x[0] = 4.0
    w1 = torch.full((E, h, d), 0.1, dtype=torch.float16)
    w1[1] = 30.0
    w3, w2 = w1.clone(), torch.full((E, d, h), 0.1, dtype=torch.float16)
    assert not torch.isfinite(experts.swiglu(x[0], w1[1], w3[1], w2[1])).all()
    tok, ex, g = torch.arange(4), torch.tensor([0, 0, 0, 1]), torch.ones(4)
    outs = []
    for f in (experts.moe_ffn_loop, lambda *a: experts.moe_ffn_grouped(*a, gemm="padded")):
        xx, ww = x.clone().requires_grad_(), [t.clone().requires_grad_() for t in (w1, w3, w2)]
        y = f(xx, tok, ex, g, *ww)
        y.float().sum().backward()
        outs.append((y, xx.grad, *[w.grad for w in ww]))
    for ref, got in zip(*outs):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.float(), ref.float(), rtol=1e-2, atol=1e-2)
