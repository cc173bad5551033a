"""
The GPU check: every GPU number of the project from one command, in under ~8 minutes.

    python gpu_check.py                     # one CUDA device; writes out/gpu_check/
    python gpu_check.py --out_dir=DIR --sections=kernels,decode
    python gpu_check.py --dry_run           # the same code at tiny sizes on the CPU
    make gpu-check

Sections. Each runs in a process of its own under a time budget (BUDGET_S), so that a
CUDA fault, a hang or a slow section costs only itself: what it measured before is
kept (it saves its rows after every case), its error or timeout is recorded, and the
next section runs.
  tests      pytest on the GPU tests (GPU_TESTS)
  kernels    the expert paths of experts.moe_ffn (loop, grouped, triton) against the
             FLOP-matched dense SwiGLU (width top_k * expert width, the same matmul
             FLOPs: 18 * T * k * d * h forward + backward) at E = 8, 16, 32, 64 in bf16:
             forward + backward ms (median of interleaved rounds), ratio to dense, TFLOP/s
  agreement  the grouped and Triton paths and the loop, all in bf16 on the same
             bf16-representable inputs, against the loop in fp32 (and the two fast paths
             against the bf16 loop): max abs and max relative error (max abs error /
             max |reference|) of the output and of every gradient; the dry run uses fp16
  mfu        train.py (train.main) on random tokens: a dense model, then its copy-upcycled
             8x2 MoE (train.py's online upcycling from the dense checkpoint); ms/iter,
             tok/s and MFU (GPT.flops_per_token over the device's peak) of the last log
             window, which leaves out the first steps (CUDA warm-up)
  decode     model.generate tokens/s, greedy, with the KV cache and recomputing, for the
             dense model and its 8x2 upcycle (upcycle.upcycle_state_dict), and whether
             both ways give the same tokens
It writes OUT_DIR/gpu_check.json (every number, the device, torch / triton / CUDA
versions, the command) and OUT_DIR/gpu_check.md (the same as tables) after every
section. Exit status 0 when every section ran, 1 when one failed (see the files).
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

import experts
import train
from configurator import ArgumentParser, run_cli
from model import GPT, GPTConfig
from outdir import LockError, OutDirLock, write_atomic
from upcycle import upcycle_state_dict

ROOT = os.path.dirname(os.path.abspath(__file__))
SECTIONS = ("tests", "kernels", "agreement", "mfu", "decode")
BUDGET_S = {"tests": 90, "kernels": 100, "agreement": 30, "mfu": 180, "decode": 45}   # 445 s in all
GPU_TESTS = {"gpu": ["tests/test_experts_gpu.py", "tests/test_experts.py"], "dry": ["tests/test_experts_gpu.py"]}
MODEL = {   # the dense model of the mfu and decode sections (SmolLM-135M-like width, 8 layers)
    "gpu": dict(vocab_size=32768, block_size=1024, n_layer=8, n_head=16, n_embd=1024),
    "dry": dict(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32),
}
SIZES = {
    "gpu": {"kernels": dict(tokens=16384, d=2048, expert_hidden=1024, top_k=2, experts=(8, 16, 32, 64), rounds=10),
            "agreement": dict(tokens=4096, d=1024, expert_hidden=1024, top_k=2, experts=8, dtype="bfloat16"),
            "mfu": dict(batch_size=16, steps=30, n_experts=8, top_k=2),
            "decode": dict(prompt=128, new_tokens=256, batches=(1, 16), n_experts=8, top_k=2)},
    "dry": {"kernels": dict(tokens=32, d=16, expert_hidden=16, top_k=2, experts=(2, 4), rounds=1),
            # float16: Triton's interpreter multiplies bf16 bit patterns in tl.dot (triton-lang/triton#11584)
            "agreement": dict(tokens=48, d=32, expert_hidden=32, top_k=2, experts=4, dtype="float16"),
            "mfu": dict(batch_size=4, steps=4, n_experts=4, top_k=2),
            "decode": dict(prompt=4, new_tokens=6, batches=(1, 2), n_experts=4, top_k=2)},
}
EXPERT_PATHS = ("loop", "grouped", "triton")
DOC_TOKENS = 512   # document length of the mfu section's random data
GRAD_NAMES = ("y", "dx", "dgates", "dw1", "dw3", "dw2")


# ----------------------------------------------------------------------------- shared by the sections

def where(dry_run):
    """(device, dtype) of a section: CUDA in bf16, or the CPU (fp32 for models, bf16 kernels)."""
    return (torch.device("cpu"), torch.float32) if dry_run else (torch.device("cuda"), torch.bfloat16)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(calls, device, rounds):
    """{name: median seconds of one call} over `rounds` interleaved rounds (every call
    once per round, so a slow moment of the machine hurts all alike), after one warm-up."""
    times = {name: [] for name in calls}
    for r in range(rounds + 1):
        for name, call in calls.items():
            sync(device)
            t0 = time.perf_counter()
            call()
            sync(device)
            if r:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def routed_case(T, d, h, E, k, device, seed):
    """Random top-k routing of T tokens over E experts and SwiGLU weights, rounded to
    bf16-representable fp32 values: x (T, d), token_idx / expert_idx / gates (T*k,),
    w1, w3 (E, h, d), w2 (E, d, h), gy (T, d), all on `device`."""
    g = torch.Generator().manual_seed(seed)
    bf = lambda t: t.to(torch.bfloat16).float().to(device)
    token_idx = torch.arange(T).repeat_interleave(k).to(device)
    expert_idx = torch.rand(T, E, generator=g).topk(k, dim=-1).indices.reshape(-1).to(device)
    gates = F.softmax(torch.randn(T, k, generator=g), -1).reshape(-1).to(device)
    x, gy = bf(torch.randn(T, d, generator=g)), bf(torch.randn(T, d, generator=g))
    w1, w3 = bf(torch.randn(E, h, d, generator=g) / d ** 0.5), bf(torch.randn(E, h, d, generator=g) / d ** 0.5)
    w2 = bf(torch.randn(E, d, h, generator=g) / h ** 0.5)
    return x, token_idx, expert_idx, gates, w1, w3, w2, gy


def expert_grads(impl, case, dtype):
    """[y, dx, dgates, dw1, dw3, dw2] (fp32) of experts.moe_ffn(impl) in `dtype` for
    the output gradient gy."""
    x, token_idx, expert_idx, gates, w1, w3, w2, gy = case
    leaves = [t.to(dtype).requires_grad_() for t in (x, w1, w3, w2)]
    g = gates.clone().requires_grad_()
    y = experts.moe_ffn(leaves[0], token_idx, expert_idx, g, *leaves[1:], impl=impl)
    grads = torch.autograd.grad(y, [leaves[0], g] + leaves[1:], gy.to(y.dtype))
    return [t.float() for t in (y.detach(),) + grads]


# ----------------------------------------------------------------------------- sections

def section_tests(size, dry_run, deadline, save):
    """pytest on the GPU test files; one row with the counts of the summary line."""
    files = GPU_TESTS["dry" if dry_run else "gpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files]
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(1, deadline - time.time()))
    except subprocess.TimeoutExpired as e:
        done = (e.stdout or b"").decode(errors="replace").strip().splitlines()
        save([{"files": " ".join(files), "summary": f"timed out; progress so far: {done[0] if done else ''}"}])
        raise
    summary = (p.stdout.strip().splitlines() or [""])[-1]
    row = {"files": " ".join(files), "exit_status": p.returncode, "summary": summary}
    for word in ("passed", "failed", "skipped", "error"):
        counts = [int(n) for n, w in zip(summary.split(), summary.split()[1:]) if w.rstrip(",") in (word, word + "s")]
        row[word] = counts[0] if counts else 0
    save([row])
    if p.returncode not in (0, 5):   # 5: nothing collected
        raise RuntimeError(f"pytest exited with status {p.returncode}: {summary}")


def section_kernels(size, dry_run, deadline, save):
    """Each expert path against the FLOP-matched dense SwiGLU, forward + backward."""
    device, dtype = where(dry_run)[0], torch.bfloat16
    T, d, h, k = size["tokens"], size["d"], size["expert_hidden"], size["top_k"]
    flops = 18 * T * k * d * h
    rows = []
    for E in size["experts"]:
        if time.time() > deadline:
            rows.append({"E": E, "path": "-", "error": "skipped: the section's time budget is spent"})
            continue
        x, token_idx, expert_idx, gates, w1, w3, w2, gy = routed_case(T, d, h, E, k, device, seed=E)
        x, w1, w3, w2, gy = (t.to(dtype) for t in (x, w1, w3, w2, gy))     # gates stay fp32, as the router's
        leaves = [t.requires_grad_() for t in (x, gates, w1, w3, w2)]
        dense = [(torch.randn(*s, device=device) / s[-1] ** 0.5).to(dtype).requires_grad_()
                 for s in ((k * h, d), (k * h, d), (d, k * h))]
        calls = {"dense": lambda: torch.autograd.grad(
            F.linear(F.silu(F.linear(x, dense[0])) * F.linear(x, dense[1]), dense[2]), [x] + dense, gy)}
        for impl in EXPERT_PATHS:
            call = (lambda impl=impl: torch.autograd.grad(
                experts.moe_ffn(x, token_idx, expert_idx, gates, w1, w3, w2, impl=impl), leaves, gy))
            try:
                call()
                calls[impl] = call
            except Exception as e:   # a path that cannot run here: its row says why
                rows.append({"E": E, "path": impl, "error": one_line(e)})
        seconds = median_seconds(calls, device, size["rounds"])
        for name, s in seconds.items():
            rows.append({"E": E, "path": name, "fwd_bwd_ms": s * 1e3, "vs_dense": s / seconds["dense"],
                         "tflops": flops / s / 1e12})
        save(rows)


def section_agreement(size, dry_run, deadline, save):
    """Every path in low precision (bf16) against the fp32 loop, and the fast paths
    against the loop in the same low precision."""
    device, low = where(dry_run)[0], getattr(torch, size["dtype"])
    case = routed_case(size["tokens"], size["d"], size["expert_hidden"], size["experts"], size["top_k"], device,
                       seed=0)
    ref = expert_grads("loop", case, torch.float32)
    loop_low = expert_grads("loop", case, low)
    rows = []
    for impl in EXPERT_PATHS:
        try:
            out = loop_low if impl == "loop" else expert_grads(impl, case, low)
        except Exception as e:
            rows.append({"path": impl, "tensor": "-", "error": one_line(e)})
            continue
        for name, o, r, lb in zip(GRAD_NAMES, out, ref, loop_low):
            abs_err, rel_err = error_stats(o, r)
            row = {"path": impl, "dtype": size["dtype"], "tensor": name, "max_abs_vs_fp32": abs_err,
                   "max_rel_vs_fp32": rel_err}
            if impl != "loop":   # rounding alone: within twice the low-precision loop's error (+1e-2)
                row["max_abs_vs_loop"], row["max_rel_vs_loop"] = error_stats(o, lb)
                row["agrees"] = rel_err <= 2 * error_stats(lb, r)[1] + 1e-2
            rows.append(row)
        save(rows)


def error_stats(out, ref):
    """(max abs error of out against ref, that over max |ref|: the relative error)."""
    err = (out - ref).abs().max().item()
    return err, err / max(ref.abs().max().item(), 1e-30)


def section_mfu(size, dry_run, deadline, save):
    """train.py on random tokens: the dense model, then its upcycled MoE (online)."""
    device = where(dry_run)[0]
    model = MODEL["dry" if dry_run else "gpu"]
    with tempfile.TemporaryDirectory() as tmp:
        data = write_random_tokens(os.path.join(tmp, "data"), model["vocab_size"], 64 * model["block_size"])
        steps = size["steps"]
        common = [f"--{k}={v}" for k, v in model.items() if k != "vocab_size"] + [
            f"--data_dir={data}", f"--batch_size={size['batch_size']}", f"--max_iters={steps}",
            f"--log_interval={steps // 2}", f"--eval_interval={steps}", "--eval_iters=1", "--warmup_iters=0",
            f"--device={device.type}", "--always_save_checkpoint=False"]
        moe_args = {"moe_layers": "all", "n_experts": size["n_experts"], "top_k": size["top_k"]}
        runs = (("dense", {}, []),
                (f"upcycled {size['n_experts']}x{size['top_k']}", moe_args, [f"--init_from={os.path.join(tmp, 'dense')}"]))
        rows = []
        for name, extra_args, extra_argv in runs:
            out = os.path.join(tmp, name.split()[0])
            argv = common + [f"--{k}={v}" for k, v in extra_args.items()] + extra_argv + [f"--out_dir={out}"]
            status = train.main(argv)
            if status != 0:
                raise RuntimeError(f"train.py ({name}) exited with status {status} (its stderr is above)")
            rows.append(mfu_row(name, out, GPTConfig(**model, **extra_args), size))
            save(rows)


def mfu_row(name, out_dir, cfg, size):
    """The last train record of a run (its second half of steps), with the model's size
    (counted on the meta device: no memory)."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        last = [r for r in map(json.loads, f) if r["split"] == "train"][-1]
    with torch.device("meta"):
        m = GPT(cfg)
    return {"model": name, "params_M": m.num_params() / 1e6, "active_M": m.num_params(active=True) / 1e6,
            "flops_per_token_G": m.flops_per_token(cfg.block_size) / 1e9,
            "tokens_per_step": size["batch_size"] * cfg.block_size, "steps_timed": size["steps"] // 2,
            "ms_per_iter": last["ms_per_iter"], "tok_per_s": last["tok_per_s"], "mfu": last.get("mfu")}


def write_random_tokens(path, vocab, n_tokens):
    """A dataset in train.py's format: uniform random tokens, documents of DOC_TOKENS
    in one domain, the same for train and val."""
    os.makedirs(path)
    tokens = np.random.default_rng(0).integers(0, vocab, n_tokens, dtype=np.int64).astype(np.uint16)
    starts = np.arange(0, n_tokens, DOC_TOKENS)
    index = np.stack([starts, np.minimum(DOC_TOKENS, n_tokens - starts), np.zeros_like(starts)], axis=1)
    for split in ("train", "val"):
        tokens.tofile(os.path.join(path, f"{split}.bin"))
        np.save(os.path.join(path, f"{split}_index.npy"), index.astype(np.int64))
    meta = {"tokenizer": "byte", "vocab_size": vocab, "eot_token": None, "domains": ["random"]}
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump(meta, f)
    return path


def section_decode(size, dry_run, deadline, save):
    """Greedy model.generate, cached and recomputing, dense and upcycled."""
    device, dtype = where(dry_run)
    dense = GPT(GPTConfig(**MODEL["dry" if dry_run else "gpu"]))
    moe_args = {"moe_layers": "all", "n_experts": size["n_experts"], "top_k": size["top_k"]}
    state, cfg, _ = upcycle_state_dict(dense.state_dict(), dense.config, model_args=moe_args)
    moe = GPT(cfg)
    moe.load_state_dict(state)
    rows = []
    for name, m in (("dense", dense), (f"upcycled {size['n_experts']}x{size['top_k']}", moe)):
        m = m.to(device=device, dtype=dtype).eval()
        for B in size["batches"]:
            if time.time() > deadline:
                rows.append({"model": name, "batch": B, "error": "skipped: the section's time budget is spent"})
                continue
            prompt = torch.randint(0, m.config.vocab_size, (B, size["prompt"]), device=device)
            tokens, seconds = {}, {}
            for cache in (True, False):
                m.generate(prompt, 2, temperature=0, use_cache=cache)   # warm-up
                sync(device)
                t0 = time.perf_counter()
                tokens[cache] = m.generate(prompt, size["new_tokens"], temperature=0, use_cache=cache)
                sync(device)
                seconds[cache] = time.perf_counter() - t0
            same = (tokens[True] == tokens[False]).float().mean().item()
            rows.append({"model": name, "batch": B, "new_tokens": size["new_tokens"],
                         "tok_per_s_cache": B * size["new_tokens"] / seconds[True],
                         "tok_per_s_recompute": B * size["new_tokens"] / seconds[False],
                         "cache_speedup": seconds[False] / seconds[True], "same_tokens": same})
            save(rows)
        m.to("cpu")


SECTION_FUNCTIONS = {"tests": section_tests, "kernels": section_kernels, "agreement": section_agreement,
                     "mfu": section_mfu, "decode": section_decode}


# ----------------------------------------------------------------------------- one section in its own process

def one_line(e):
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


def run_section_here(name, dry_run, deadline, result_path):
    """The child's side: run one section, saving {"rows": [...]} after every case and
    {"rows", "error"} when it fails. Exit status 0 or 1."""
    rows = []

    def save(new_rows):
        rows[:] = new_rows
        write_atomic(result_path, lambda f: f.write(json.dumps({"rows": rows}).encode()))
    try:
        SECTION_FUNCTIONS[name](SIZES["dry" if dry_run else "gpu"].get(name, {}), dry_run, deadline, save)
    except Exception as e:
        write_atomic(result_path, lambda f: f.write(json.dumps({"rows": rows, "error": one_line(e)}).encode()))
        print(f"error: section {name}: {one_line(e)}", file=sys.stderr)
        return 1
    return 0


def run_isolated(cmd, result_path, budget_s, env=None):
    """The parent's side: run `cmd` (a child that writes result_path) for at most
    budget_s seconds. Returns {"status": ok | error | timeout | crashed, "seconds",
    "rows": what the child saved, "error": why, "output_tail"}."""
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=budget_s)
        rc, tail = p.returncode, (p.stdout + p.stderr)[-2000:]
    except subprocess.TimeoutExpired as e:
        rc, tail = None, ((e.stdout or b"")[-1000:] + (e.stderr or b"")[-1000:]).decode(errors="replace")
    try:
        with open(result_path) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        saved = {}
    result = {"seconds": time.time() - t0, "rows": saved.get("rows", [])}
    if rc is None:
        result.update(status="timeout", error=f"killed after its budget of {budget_s} s")
    elif rc == 0:
        result["status"] = "ok"
    elif "error" in saved:
        result.update(status="error", error=saved["error"])
    else:   # died without saying why: a signal (rc < 0), a CUDA abort, an import error
        result.update(status="crashed", error=f"exit status {rc}: {tail.strip().splitlines()[-1] if tail.strip() else ''}")
    if result["status"] != "ok":
        result["output_tail"] = tail
    return result


def section_command(name, dry_run, result_path, budget_s):
    deadline = time.time() + 0.8 * budget_s   # the section stops starting new cases here
    return [sys.executable, os.path.abspath(__file__), f"--section={name}", f"--result={result_path}",
            f"--deadline={deadline:.0f}"] + (["--dry_run"] if dry_run else [])


def section_env(dry_run):
    """The child's environment: one thread per op on a shared CPU, and Triton's
    interpreter where there is no GPU (the dry run then runs the Triton path too)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if dry_run:
        env.update(OMP_NUM_THREADS="1", TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    return env


# ----------------------------------------------------------------------------- the report

def machine(dry_run):
    """Device name (and capability), torch, CUDA and triton versions."""
    info = {"device": "cpu (dry run)" if dry_run else torch.cuda.get_device_name(0), "torch": torch.__version__,
            "cuda": torch.version.cuda}
    if not dry_run:
        info["capability"] = "sm_%d%d" % torch.cuda.get_device_capability(0)
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "absent"
    return info


def markdown(report):
    """The report as markdown: a header, then one table per section."""
    lines = [f"# GPU check: {report['device']}", "",
             f"`{report['command']}`; torch {report['torch']}, CUDA {report['cuda']}, triton {report['triton']}; "
             f"{report['started']}, {report['seconds']:.0f} s", ""]
    for name, sec in report["sections"].items():
        lines += [f"## {name}: {sec['status']} ({sec['seconds']:.0f} s)", ""]
        if sec.get("error"):
            lines += [f"error: {sec['error']}", ""]
        lines += table(sec["rows"]) + [""]
    return "\n".join(lines)


def table(rows):
    """Rows of dicts as a markdown table (columns: every key, in order of appearance)."""
    if not rows:
        return []
    cols = list(dict.fromkeys(k for r in rows for k in r))
    show = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))
    return (["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            + ["| " + " | ".join(show(r.get(c)) for c in cols) + " |" for r in rows])


def write_report(report, out_dir):
    write_atomic(os.path.join(out_dir, "gpu_check.json"), lambda f: f.write(json.dumps(report, indent=1).encode()))
    write_atomic(os.path.join(out_dir, "gpu_check.md"), lambda f: f.write(markdown(report).encode()))


def check_all(sections, dry_run, out_dir, command):
    """Every section in turn, each isolated; the report is rewritten after each one."""
    report = {"command": command, "dry_run": dry_run, **machine(dry_run),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "seconds": 0.0, "sections": {}}
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for name in sections:
            result_path = os.path.join(tmp, f"{name}.json")
            cmd = section_command(name, dry_run, result_path, BUDGET_S[name])
            report["sections"][name] = sec = run_isolated(cmd, result_path, BUDGET_S[name], section_env(dry_run))
            report["seconds"] = time.time() - t0
            write_report(report, out_dir)
            print(f"{name}: {sec['status']} in {sec['seconds']:.0f} s" + (f" ({sec['error']})" if sec.get("error") else ""),
                  flush=True)
    return report


def build_parser():
    p = ArgumentParser(prog="gpu_check.py", description="Every GPU number of the project (see the module docstring).")
    p.add_argument("--out_dir", default=os.path.join("out", "gpu_check"))
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument("--dry_run", action="store_true", help="tiny sizes on the CPU: checks the code, not the GPU")
    p.add_argument("--section", help="(internal) run this one section in this process")
    p.add_argument("--result", help="(internal) where --section saves its rows")
    p.add_argument("--deadline", type=float, help="(internal) time.time() after which --section starts no new case")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.section:
        return run_section_here(args.section, args.dry_run, args.deadline, args.result)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown or not sections:
        raise ValueError(f"--sections={args.sections} names no section or an unknown one {unknown}: "
                         f"use a comma list of {', '.join(SECTIONS)}")
    if not args.dry_run and not torch.cuda.is_available():
        raise ValueError("no CUDA device here: run the GPU check on a machine with one, or pass --dry_run "
                         "to check the code at tiny sizes on the CPU")
    command = "python gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:])
    with OutDirLock(args.out_dir, command):
        report = check_all(sections, args.dry_run, args.out_dir, command.strip())
    print(f"wrote {os.path.join(args.out_dir, 'gpu_check.json')} and gpu_check.md")
    return 0 if all(s["status"] == "ok" for s in report["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(run_cli(main, user_errors=(LockError,)))
