"""
The papers' findings in miniature: one function per experiment, each a handful
of train.py runs on the default data that ends in a figure and a table.

    python experiments.py list
    python experiments.py upcycle_vs_scratch         # one experiment
    python experiments.py all --jobs=2               # the whole suite, two runs at a time (README: times)
    python experiments.py beyond_copy --jobs=2       # 9. copies vs Drop-Upcycling vs BTX, 4x the MoE budget
    python experiments.py all --scale=gpu            # larger GPU-sized runs (more iterations and width)
    python experiments.py router_order --smoke       # 3 iterations per run: checks the configs, not the claims

Outputs: out/exp/<experiment>/{results.md, *.png} and one row per run in the
table; runs whose final checkpoint already exists are reused (--fresh reruns).
--jobs=N trains N independent runs at a time, each with cpu_count / N threads
(a run with nothing beside it, like the dense base, keeps every core): a small
model uses 2 threads poorly (on 2 cores one run at 2 threads took 400 ms/step,
at 1 thread 600), so two 1-thread runs side by side finish sooner.
Every run starts from config/exp/base.py, the dense shape of config/dense_small.py.
"""
import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, CancelledError, ThreadPoolExecutor, wait

import matplotlib
matplotlib.use("Agg")   # files only, no display (before pyplot is imported)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from checkpoint import CheckpointError, load_checkpoint, load_model  # noqa: E402
from configurator import ArgumentParser, parse_config  # noqa: E402
from data.dataset import load_meta  # noqa: E402
from data.similarity import ensure_similarity_order  # noqa: E402
from diagnostics import mean_pairwise_similarity  # noqa: E402
from eval import evaluate_checkpoint  # noqa: E402
from init_from import model_args_from  # noqa: E402
from metrics import load_metrics  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from plot import make_plots, plot_domain_specialization  # noqa: E402
from train import DEFAULTS, finished_run  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join("out", "exp")   # --smoke: out/exp_smoke, --scale=gpu: out/exp_gpu (unless --out)
OUT = DEFAULT_OUT
BASE = "config/exp/base.py"
MOE8 = ["--moe_layers=all", "--n_experts=8", "--top_k=2"]
OPTS = {"smoke": False, "fresh": False, "scale": "cpu", "data_dir": "", "jobs": 1, "out": ""}
TRAINED = set()   # out_dirs trained by this invocation
SMOKE_ITERS = 3


# ----------------------------------------------------------------------------- running

def iters(n):
    """Iteration budget: n on the CPU scale, 4n on GPU, SMOKE_ITERS for a smoke test."""
    return SMOKE_ITERS if OPTS["smoke"] else (4 * n if OPTS["scale"] == "gpu" else n)


def scale_args():
    """The train.py flags every run of this invocation adds (--data_dir, --smoke, --scale)."""
    extra = [f"--data_dir={OPTS['data_dir']}"] if OPTS["data_dir"] else []
    if OPTS["smoke"]:   # a tiny model: checks that every run's configuration loads and trains
        extra += ["--eval_interval=3", "--eval_iters=2", "--log_interval=1", "--warmup_iters=1", "--n_layer=2",
                  "--n_embd=32", "--n_head=2", "--block_size=64", "--batch_size=2"]
    if OPTS["scale"] == "gpu":
        extra += ["--n_layer=8", "--n_embd=512", "--n_head=8", "--batch_size=32", "--block_size=512"]
    return extra


def run(out_dir, *args, threads=None):
    """Train one run (train.py BASE args...) unless out_dir holds the finished run
    of exactly these settings (train.finished_run). threads: its torch threads
    (run_many's share of the cores; default torch's own, all cores)."""
    extra = scale_args()
    reusable = not OPTS["fresh"] or out_dir in TRAINED   # --fresh: each run once per invocation (the dense base)
    if reusable and finished_run(out_dir, parse_config([os.path.join(ROOT, BASE), f"--out_dir={out_dir}",
                                                        *args, *extra], DEFAULTS)):
        print(f"  reuse {out_dir}")
        return out_dir
    if OPTS["smoke"] and os.path.exists(os.path.join(out_dir, "ckpt.pt")):
        try:
            full = (load_checkpoint(out_dir).get("config") or {}).get("max_iters") != SMOKE_ITERS
        except CheckpointError:
            full = False
        if full:
            sys.exit(f"error: {out_dir} holds a full run; a --smoke run will not replace it (choose another --out)")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), BASE, f"--out_dir={out_dir}", "--overwrite=True", *args, *extra]
    env = dict(os.environ)
    if threads and "OMP_NUM_THREADS" not in env:   # share the cores between the parallel runs
        env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.time()
    print(f"  train {out_dir}: {' '.join(args)}", flush=True)
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        sys.exit(f"error: run {out_dir} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    TRAINED.add(out_dir)
    last = [l for l in p.stdout.splitlines() if l.startswith("eval iter")][-1:]
    print(f"    done {out_dir}: {last[0] if last else ''} ({time.time() - t0:.0f} s)", flush=True)
    return out_dir


def run_many(specs):
    """Train every (out_dir, [args]) of specs as run() does, --jobs of them at a time
    (the runs must not depend on each other). Returns the out_dirs, in order."""
    if OPTS["jobs"] <= 1 or len(specs) <= 1:
        return [run(d, *args) for d, args in specs]
    jobs = min(OPTS["jobs"], len(specs))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    failed = threading.Event()

    def run_unless_failed(d, args):   # once a run has failed, no queued run starts
        if failed.is_set():
            raise CancelledError(f"{d}: not started, an earlier run failed")
        try:
            return run(d, *args, threads=threads)
        except BaseException:
            failed.set()
            raise
    with ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(run_unless_failed, d, args) for d, args in specs]
        try:
            wait(futures, return_when=FIRST_EXCEPTION)   # the first failure, whichever run it is
            for f in futures:   # report the failure, not a run it stopped
                if f.done() and not f.cancelled() and f.exception() is not None \
                        and not isinstance(f.exception(), CancelledError):
                    raise f.exception()
            return [f.result() for f in futures]
        except BaseException:   # a failed run (or Ctrl-C): start no more
            failed.set()
            for f in futures:
                f.cancel()
            raise


def upcycled_8x2(dense, n, n_experts=8):
    """Online upcycling of the dense base to 8 (or n_experts) experts top-2 with the
    warm-restart schedule every upcycling experiment uses (peak a little below the dense peak)."""
    return [f"--init_from={dense}", "--moe_layers=all", f"--n_experts={n_experts}", "--top_k=2", f"--max_iters={n}",
            f"--eval_interval={max(n // 6, 1)}", "--learning_rate=1.5e-3", "--warmup_iters=20"]


def dense_base():
    """The dense checkpoint every upcycling experiment starts from (600 iterations)."""
    return run(os.path.join(OUT, "dense"), f"--max_iters={iters(600)}")


def ensure_data():
    """Prepare the default data (data/multidomain, ~4 s, offline) on first use."""
    if OPTS["data_dir"]:
        if not os.path.exists(os.path.join(OPTS["data_dir"], "meta.json")):
            sys.exit(f"error: --data_dir={OPTS['data_dir']} holds no prepared dataset (no meta.json): "
                     f"run python data/multidomain/prepare.py --out_dir={OPTS['data_dir']}")
        return
    if os.path.exists(os.path.join(ROOT, "data", "multidomain", "meta.json")):
        return
    print("  preparing data/multidomain (first use)", flush=True)
    subprocess.run([sys.executable, os.path.join(ROOT, "data", "multidomain", "prepare.py")], cwd=ROOT, check=True)


def read(out_dir):
    return load_metrics(out_dir)


def evals(out_dir):
    return [r for r in read(out_dir) if r.get("split") == "eval"]


def summary(out_dir, **extra):
    """Final numbers of a run from its metrics.jsonl."""
    recs = read(out_dir)
    ev = [r for r in recs if r.get("split") == "eval"]
    tr = [r for r in recs if r.get("split") == "train"]
    tail = tr[len(tr) // 2:] or tr
    row = {"run": os.path.basename(out_dir), "iters": ev[-1]["iter"], "val_loss": ev[-1]["val_loss"],
           "val_loss_step0": ev[0]["val_loss"]}
    if tail:
        row["tok_per_s"] = float(np.median([r["tok_per_s"] for r in tail]))
    moe = [r["moe"] for r in tail if "moe" in r]
    if moe and "drop_rate" in moe[-1][0]:
        row["drop_rate"] = float(np.mean([[l["drop_rate"] for l in m] for m in moe]))
        row["max1_max2"] = float(np.mean([[l.get("max1_max2", float("nan")) for l in m] for m in moe]))
        row["load_cv"] = float(np.mean([[l["load_cv"] for l in m] for m in moe]))
        if "demand_cv" in moe[-1][0]:   # CV of the load before capacity dropping: comparable across capacities
            row["demand_cv"] = float(np.mean([[l["demand_cv"] for l in m] for m in moe]))
    if ev and "expert_similarity" in ev[-1]:
        row["expert_sim"] = float(np.mean(ev[-1]["expert_similarity"]))
    row.update(extra)
    return row


def table(rows, columns=None):
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: (f"{v:.4f}" if abs(v) < 100 else f"{v:,.0f}") if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name, title, rows, figures, finding, columns=None, t0=None):
    out = os.path.join(OUT, name)
    os.makedirs(out, exist_ok=True)
    flags = ((" --smoke" if OPTS["smoke"] else "") + (" --scale=gpu" if OPTS["scale"] == "gpu" else "")
             + (f" --jobs={OPTS['jobs']}" if OPTS["jobs"] > 1 else "")
             + (f" --data_dir={OPTS['data_dir']}" if OPTS["data_dir"] else "")
             + (f" --out={OPTS['out']}" if OPTS["out"] else ""))
    md = [f"# {title}", "", f"Command: `python experiments.py {name}{flags}`",
          f"Wall time of this command: {time.time() - t0:.0f} s (runs it reused cost none)" if t0 else "",
          "", table(rows, columns), ""]
    md += [f"![{os.path.basename(f)}]({os.path.basename(f)})" for f in figures]
    md += ["", finding, ""]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(md))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(table(rows, columns))
    print(finding)
    return rows


def loss_figure(name, runs, path_name="loss.png", title=None):
    """Val loss vs step of several runs (eval records)."""
    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    for label, d in runs:
        ev = evals(d)
        ax.plot([r["iter"] for r in ev], [r["val_loss"] for r in ev], marker="o", ms=3, label=label)
    ax.set_xlabel("training step (after upcycling / start)")
    ax.set_ylabel("val loss (nats/token)")
    ax.set_title(title or name)
    ax.grid(alpha=0.3)
    ax.legend()
    path = os.path.join(OUT, name, path_name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def bar_figure(name, rows, keys, path_name="bars.png", title=None):
    """One panel per metric, one bar per run."""
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 4), constrained_layout=True, squeeze=False)
    labels = [r["run"] for r in rows]
    for ax, k in zip(axes[0], keys):
        vals = [r.get(k, float("nan")) for r in rows]
        ax.bar(range(len(rows)), vals, color=[f"C{i}" for i in range(len(rows))])
        ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(k)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title or name)
    path = os.path.join(OUT, name, path_name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- experiments

def upcycle_vs_scratch():
    """1. Skywork-MoE section 2 / Sparse Upcycling: at a small MoE budget the upcycled
    model leads; with a budget of about 2x the dense model's cost, training from
    scratch catches up. Dense base: 600 steps. Budgets: 200 and 1200 further steps."""
    name, t0 = "upcycle_vs_scratch", time.time()
    dense = dense_base()
    specs, labels = [], []
    for budget in (200, 1200):
        n = iters(budget)
        sched = [f"--max_iters={n}", f"--eval_interval={max(n // 6, 1)}", "--warmup_iters=20"]
        specs += [(os.path.join(OUT, name, f"upcycled_{budget}"),
                   [f"--init_from={dense}", *MOE8, *sched, "--learning_rate=1.5e-3"]),
                  (os.path.join(OUT, name, f"scratch_{budget}"), [*MOE8, *sched]),
                  (os.path.join(OUT, name, f"dense_cont_{budget}"),
                   [f"--init_from={dense}", *sched, "--learning_rate=1.5e-3"])]
        labels += [(budget, n, method) for method in ("upcycled", "moe_scratch", "dense_continued")]
    rows = [summary(d, budget=budget, steps=n, method=method)
            for d, (budget, n, method) in zip(run_many(specs), labels)]
    fig, ax = plt.subplots(figsize=(6.5, 4.2), constrained_layout=True)
    for method in ("upcycled", "moe_scratch", "dense_continued"):
        pts = [(r["budget"], r["val_loss"]) for r in rows if r["method"] == method]
        ax.plot(*zip(*pts), marker="o", label=method)
    ax.set_xscale("log")
    ax.set_xlabel("MoE-stage training steps (dense base: 600 steps)")
    ax.set_ylabel("final val loss")
    ax.set_title("Upcycling vs from scratch vs continued dense")
    ax.grid(alpha=0.3)
    ax.legend()
    path = os.path.join(OUT, name, "budgets.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    curves = loss_figure(name, [(f"{r['method']} {r['budget']}", os.path.join(OUT, name, r["run"]))
                                for r in rows if r["budget"] == max(x["budget"] for x in rows)],
                         title="val loss, largest budget")
    small, big = [[r for r in rows if r["budget"] == b] for b in sorted({r["budget"] for r in rows})]
    by = lambda rs, m: next(r["val_loss"] for r in rs if r["method"] == m)
    finding = (f"Small budget: upcycled {by(small, 'upcycled'):.3f} vs scratch {by(small, 'moe_scratch'):.3f} vs "
               f"dense {by(small, 'dense_continued'):.3f}; large budget: upcycled {by(big, 'upcycled'):.3f} vs "
               f"scratch {by(big, 'moe_scratch'):.3f} vs dense {by(big, 'dense_continued'):.3f}.")
    return write_results(name, "Upcycling vs training from scratch (Skywork-MoE)", rows, [path, curves], finding,
                         ["method", "budget", "steps", "val_loss", "val_loss_step0", "tok_per_s", "expert_sim"], t0)


def gate_norm():
    """2. Skywork-MoE section 3.1: gating logit normalisation with lambda in
    {off, 1, 2} sharpens the gates (Max1/Max2 up), on an upcycled 8x2 model with
    capacity factor 1 so that drops are measurable."""
    name, t0 = "gate_norm", time.time()
    dense = dense_base()
    n = iters(300)
    lambdas = (None, 1.0, 2.0)
    dirs = run_many([(os.path.join(OUT, name, "off" if lam is None else f"lambda{lam:g}"),
                      [*upcycled_8x2(dense, n), "--capacity_factor=1.0", f"--gate_norm_lambda={lam}"])
                     for lam in lambdas])
    rows = [summary(d, gate_norm_lambda=str(lam)) for d, lam in zip(dirs, lambdas)]
    fig = bar_figure(name, rows, ["max1_max2", "drop_rate", "val_loss"], title="Gating logit normalisation")
    finding = ("Max1/Max2: " + ", ".join(f"{r['gate_norm_lambda']}: {r['max1_max2']:.2f}" for r in rows) +
               "; drop rate: " + ", ".join(f"{r['drop_rate'] * 100:.1f}%" for r in rows) +
               "; val loss: " + ", ".join(f"{r['val_loss']:.3f}" for r in rows) + ".")
    return write_results(name, "Gating logit normalisation (Skywork-MoE eq. 6)", rows,
                         [fig, loss_figure(name, [(r["run"], os.path.join(OUT, name, r["run"])) for r in rows])],
                         finding, ["run", "max1_max2", "drop_rate", "load_cv", "val_loss"], t0)


def adaptive_aux():
    """3. Skywork-MoE section 3.2: adaptive per-layer auxiliary-loss coefficients
    vs a fixed coefficient, from scratch with capacity factor 1 (drops). The fixed
    and adaptive runs use the Switch loss; one adaptive run uses Skywork's own loss
    (eq. 4), for which its alpha_max = 0.01 was chosen."""
    name, t0 = "adaptive_aux", time.time()
    n = iters(300)
    common = [*MOE8, f"--max_iters={n}", f"--eval_interval={max(n // 6, 1)}", "--capacity_factor=1.0"]
    variants = (("fixed_1e-2", ["--aux_loss_coef=0.01"]), ("fixed_1e-3", ["--aux_loss_coef=0.001"]),
                ("adaptive", ["--adaptive_aux=True"]),
                ("adaptive_skywork", ["--adaptive_aux=True", "--aux_loss=skywork"]))
    dirs = run_many([(os.path.join(OUT, name, tag), [*common, *extra]) for tag, extra in variants])
    rows = []
    for d, (tag, extra) in zip(dirs, variants):
        row = summary(d, aux_loss="skywork" if "--aux_loss=skywork" in extra else "switch")
        last = [r for r in read(d) if "moe" in r][-1]
        row["drop_per_layer"] = " ".join(f"{l['drop_rate'] * 100:.1f}" for l in last["moe"])
        if "alpha" in last:
            row["alpha_per_layer"] = " ".join(f"{a:.4f}" for a in last["alpha"])
        rows.append(row)
    fig = bar_figure(name, rows, ["drop_rate", "load_cv", "val_loss"], title="Adaptive vs fixed aux coefficient")
    finding = ("Drop rate (mean of the second half): " + ", ".join(f"{r['run']} {r['drop_rate'] * 100:.1f}%" for r in rows)
               + "; val loss: " + ", ".join(f"{r['val_loss']:.3f}" for r in rows) + ".")
    return write_results(name, "Adaptive auxiliary-loss coefficients (Skywork-MoE section 3.2), Switch and Skywork "
                         "losses", rows, [fig], finding,
                         ["run", "aux_loss", "drop_rate", "drop_per_layer", "alpha_per_layer", "load_cv", "val_loss"],
                         t0)


def router_order():
    """4. Llama 3 meets MoE (topk-then-softmax) vs He et al. (softmax-then-topk with
    weight scaling): loss right after upcycling and after training."""
    name, t0 = "router_order", time.time()
    dense = dense_base()
    n = iters(300)
    common = upcycled_8x2(dense, n)
    variants = (("topk_softmax", ["--router=topk_softmax"]),
                ("softmax_topk_exact", ["--router=softmax_topk", "--upcycle_weight_scaling=exact",
                                        "--router_init_std=0.0"]),
                ("softmax_topk_megatron", ["--router=softmax_topk", "--upcycle_weight_scaling=megatron"]),
                ("softmax_topk_unscaled", ["--router=softmax_topk", "--upcycle_weight_scaling=none"]))
    rows = [summary(d) for d in run_many([(os.path.join(OUT, name, tag), [*common, *extra]) for tag, extra in variants])]
    dense_loss = evals(dense)[-1]["val_loss"]
    for r in rows:
        r["dense_val_loss"] = dense_loss
    fig = loss_figure(name, [(r["run"], os.path.join(OUT, name, r["run"])) for r in rows], title="Router gate order")
    finding = (f"Dense val loss {dense_loss:.3f}. Right after upcycling: " +
               ", ".join(f"{r['run']} {r['val_loss_step0']:.3f}" for r in rows) + "; after training: " +
               ", ".join(f"{r['run']} {r['val_loss']:.3f}" for r in rows) + ".")
    return write_results(name, "Router gate order after upcycling", rows, [fig], finding,
                         ["run", "dense_val_loss", "val_loss_step0", "val_loss", "max1_max2"], t0)


def fine_grained():
    """5. He et al. (arXiv 2410.07524): fine-grained upcycling E'=4, G=2 (8 experts
    of half width, top-2 = one virtual group) with and without weight scaling.
    Expert similarity at the end: over the same-shard pairs (e = e' mod G, the only
    pairs that started as copies) and, for reference, over all pairs."""
    name, t0 = "fine_grained", time.time()
    dense = dense_base()
    n = iters(300)
    common = [f"--init_from={dense}", "--moe_layers=all", "--n_experts=8", "--top_k=2", "--upcycle_granularity=2",
              f"--max_iters={n}", f"--eval_interval={max(n // 6, 1)}", "--learning_rate=1.5e-3", "--warmup_iters=20"]
    variants = (("exact_scaling", ["--upcycle_weight_scaling=exact"]),
                ("megatron_scaling", ["--upcycle_weight_scaling=megatron"]),
                ("no_scaling", ["--upcycle_weight_scaling=none"]),
                ("coarse_8x2", ["--upcycle_granularity=1"]))
    dirs = run_many([(os.path.join(OUT, name, tag), [*common, *extra]) for tag, extra in variants])
    rows = [final_similarity(summary(d)) for d in dirs]
    fig = loss_figure(name, [(r["run"], os.path.join(OUT, name, r["run"])) for r in rows],
                      title="Fine-grained upcycling E'4 G2")
    finding = ("Right after upcycling: " + ", ".join(f"{r['run']} {r['val_loss_step0']:.3f}" for r in rows) +
               "; after training: " + ", ".join(f"{r['run']} {r['val_loss']:.3f}" for r in rows) + ".")
    return write_results(name, "Fine-grained upcycling and weight scaling (He et al.)", rows, [fig], finding,
                         ["run", "val_loss_step0", "val_loss", "expert_sim_same_shard", "expert_sim_all_pairs",
                          "tok_per_s"], t0)


def final_similarity(row):
    """row + the expert similarity at the end, averaged over the MoE layers: over the
    same-shard pairs (e = e' mod G, the only pairs that started as copies), which is
    train.py's similarity monitor at the last eval (row["expert_sim"]), and over all
    pairs, from the final checkpoint."""
    model, _ = load_model(os.path.join(OUT, "fine_grained", row["run"]))
    row["expert_sim_same_shard"] = row["expert_sim"]
    row["expert_sim_all_pairs"] = float(np.mean([mean_pairwise_similarity(f) for _, f in model.moe_layers()]))
    return row


def lory():
    """6. Lory: fully differentiable MoE (8 experts, segment 64) with similarity vs
    random batching, against the dense model with the same active parameters and a
    token-choice MoE with the same total, at equal steps. Lory runs use a 5% dense
    warm-up. Reports per-domain loss and the causal loss without segment 1."""
    name, t0 = "lory", time.time()
    n = iters(400)
    seg = 16 if OPTS["smoke"] else 64
    common = [f"--max_iters={n}", f"--eval_interval={max(n // 6, 1)}"]
    lory_args = ["--moe_layers=all", "--router=lory", "--n_experts=8", f"--segment_len={seg}",
                 f"--dense_warmup_iters={max(n // 20, 1)}"]
    runs = [("lory_similarity", [*lory_args, "--batching=similarity"]), ("lory_random", lory_args),
            ("dense", []), ("moe_top2", MOE8)]
    data_dir = OPTS["data_dir"] or os.path.join(ROOT, "data", "multidomain")
    ensure_similarity_order(data_dir)   # here, not inside train.py's captured output, to show its progress
    rows = []
    dirs = run_many([(os.path.join(OUT, name, tag), [*common, *extra]) for tag, extra in runs])
    for d, (tag, _) in zip(dirs, runs):
        res = evaluate_checkpoint(d, skip_positions=seg, batches=4 if OPTS["smoke"] else 32)
        row = summary(d, eval_val_loss=res["val_loss"])
        if res.get("val_loss_from_pos"):
            row["val_loss_no_seg1"] = res["val_loss_from_pos"]["loss"]
        for dom, v in res["per_domain"].items():
            row[f"ppl_{dom}"] = v["ppl"]
        rows.append(row)
        if tag == "lory_similarity":
            paths, _ = make_plots(d, result=res, out_dir=os.path.join(OUT, name, "plots_lory_similarity"))
    doms = [k for k in rows[0] if k.startswith("ppl_")]
    fig = bar_figure(name, rows, ["val_loss_no_seg1", "tok_per_s"] + doms[:2], title="Lory vs dense vs top-2 MoE")
    finding = (f"Val loss over positions >= {seg} (causal for Lory): " +
               ", ".join(f"{r['run']} {r.get('val_loss_no_seg1', float('nan')):.3f}" for r in rows) +
               "; tokens/s: " + ", ".join(f"{r['run']} {r.get('tok_per_s', 0):,.0f}" for r in rows) + ".")
    return write_results(name, "Lory: fully differentiable MoE (arXiv 2405.03133)", rows, [fig], finding,
                         ["run", "eval_val_loss", "val_loss_no_seg1", *doms, "tok_per_s"], t0)


def capacity():
    """7. Llama 3 meets MoE: capacity factor 1 vs 2 vs dropless on an upcycled 8x2
    model: loss and tokens/s."""
    name, t0 = "capacity", time.time()
    dense = dense_base()
    n = iters(300)
    common = upcycled_8x2(dense, n)
    variants = (("cf1", 1.0), ("cf2", 2.0), ("dropless", 0.0))
    dirs = run_many([(os.path.join(OUT, name, tag), [*common, f"--capacity_factor={cf}"]) for tag, cf in variants])
    rows = [summary(d, capacity_factor=cf) for d, (_, cf) in zip(dirs, variants)]
    fig = bar_figure(name, rows, ["val_loss", "drop_rate", "tok_per_s"], title="Capacity factor")
    finding = ("Val loss: " + ", ".join(f"{r['run']} {r['val_loss']:.3f}" for r in rows) + "; drop rate: " +
               ", ".join(f"{r['drop_rate'] * 100:.1f}%" for r in rows) + "; tokens/s: " +
               ", ".join(f"{r['tok_per_s']:,.0f}" for r in rows) + ".")
    return write_results(name, "Capacity factor (Llama 3 meets MoE)", rows, [fig], finding,
                         ["run", "capacity_factor", "val_loss", "drop_rate", "tok_per_s"], t0)


def routers():
    """8. Every router type from scratch on the same 8x2 shape, capacity factor 1.25:
    what their statistics look like after a short run (load balance, drops,
    sharpness, entropy). Load CV is on the kept load, demand CV on the assignments
    before capacity dropping. Expert choice's val loss is its causal eval routing
    (k = capacity_factor experts per token); val_loss_training_routing is the
    routing it trained with (not causal), on the same val batches."""
    name, t0 = "routers", time.time()
    n = iters(200)
    common = [*MOE8, f"--max_iters={n}", f"--eval_interval={max(n // 4, 1)}", "--capacity_factor=1.25"]
    variants = (("topk_softmax", []), ("softmax_topk", ["--router=softmax_topk"]),
                ("sigmoid_auxfree", ["--router=sigmoid", "--aux_loss=none"]),
                ("expert_choice", ["--router=expert_choice", "--capacity_factor=1.0"]),
                ("noisy_topk", ["--router_noise=True"]),
                ("topk_lambda1", ["--gate_norm_lambda=1.0"]))
    rows = []
    for d, (tag, _) in zip(run_many([(os.path.join(OUT, name, tag), [*common, *extra]) for tag, extra in variants]),
                           variants):
        row = summary(d)
        last = [r for r in read(d) if "moe" in r][-1]["moe"]
        row["gate_entropy"] = float(np.mean([l["gate_entropy"] for l in last]))
        if tag == "expert_choice":
            row["val_loss_training_routing"] = expert_choice_training_loss(d)
        rows.append(row)
    fig = bar_figure(name, rows, ["load_cv", "drop_rate", "max1_max2", "val_loss"], title="Router types")
    finding = "; ".join(f"{r['run']}: load CV {r['load_cv']:.2f}, drop {r['drop_rate'] * 100:.1f}%, "
                        f"Max1/Max2 {r['max1_max2']:.2f}, val {r['val_loss']:.3f}" for r in rows) + "."
    return write_results(name, "Router types after a short run", rows, [fig], finding,
                         ["run", "load_cv", "demand_cv", "drop_rate", "max1_max2", "gate_entropy", "val_loss",
                          "val_loss_training_routing", "tok_per_s"], t0)


def expert_choice_training_loss(out_dir):
    """An expert-choice run's val loss with its training routing, on the val batches
    train.py evaluates on (its eval_iters x batch_size, the same seed)."""
    cfg = load_checkpoint(out_dir)["config"]
    res = evaluate_checkpoint(out_dir, batches=cfg["eval_iters"], batch_size=cfg["batch_size"])
    return res["expert_choice"]["val_loss_training_routing"]


# ----------------------------------------------------------------------------- 9. beyond copy-upcycling

BEYOND_STEPS = 1200        # steps of 8 x 256 tokens per method: 4x the demo's 300-step MoE budget
BTX_BRANCH_STEPS = 600     # BTX's dense branch steps (all branches together), counted in its 1200
DROP_RATIOS = (0.25, 0.5, 0.75)


def experiment_data_dir():
    """The experiment data directory (--data_dir, default data/multidomain)."""
    return OPTS["data_dir"] or os.path.join(ROOT, "data", "multidomain")


def data_domains():
    """The domain names of the experiment data (meta.json)."""
    return load_meta(experiment_data_dir())["domains"]


def planned_flops_per_token(shape_flags, vocab_size=None):
    """Training FLOPs per token (model.flops_per_token at the run's block_size) of the model
    that train.py BASE shape_flags... trains at this invocation's scale, from its shape alone
    (built on the meta device: no weights). vocab_size: default the data's."""
    cfg = parse_config([os.path.join(ROOT, BASE), *shape_flags, *scale_args()], DEFAULTS)
    vocab = vocab_size or load_meta(experiment_data_dir())["vocab_size"]
    with torch.device("meta"):
        model = GPT(GPTConfig(**model_args_from(cfg, vocab)))
    return model.flops_per_token(cfg["block_size"])


def btx_moe_steps_at_flops(steps, branch_steps, f_copy, f_dense, f_btx):
    """MoE steps after the merge that bring BTX's training FLOPs (branch_steps dense steps
    at f_dense FLOPs per token, then these at f_btx) to those of `steps` copy-upcycled steps
    at f_copy, every step the same tokens: round((steps f_copy - branch_steps f_dense) / f_btx)."""
    return max(1, round((steps * f_copy - branch_steps * f_dense) / f_btx))


def btx_branches(name, dense, domains):
    """Branch-Train-MiX's branch stage (arXiv 2403.07816 section 2): one dense copy per
    domain, trained on that domain only (--domains), BTX_BRANCH_STEPS / n steps each."""
    b = iters(BTX_BRANCH_STEPS // len(domains))
    return run_many([(os.path.join(OUT, name, f"branch_{D}"),
                      [f"--init_from={dense}", f"--domains={D}", f"--max_iters={b}", f"--eval_interval={max(b // 3, 1)}",
                       "--learning_rate=1.5e-3", "--warmup_iters=20"]) for D in domains])


def beyond_copy_runs(name, dense, branches):
    """(tag, out_dir) of every compared run. Each sees BEYOND_STEPS steps of tokens in all
    (BTX's branch steps counted) except btx_flops, which trains as many MoE steps after its
    branches as bring its training FLOPs to copy-upcycling 8x2's (more tokens)."""
    n = iters(BEYOND_STEPS)
    branch_steps = len(branches) * (BTX_BRANCH_STEPS // len(branches))
    n_btx = iters(BEYOND_STEPS - branch_steps)
    # one expert per branch, top-2 (the BTX paper's layout). Two experts from one branch would start with equal
    # weights and, with hidden-state rows, equal router rows: they would get equal gradients and never diverge.
    E = len(branches)
    moe = lambda e: ["--moe_layers=all", f"--n_experts={e}", "--top_k=2"]  # noqa: E731
    n_flops = iters(btx_moe_steps_at_flops(BEYOND_STEPS, branch_steps, planned_flops_per_token(MOE8),
                                           planned_flops_per_token([]), planned_flops_per_token(moe(E))))
    sched = lambda m: [f"--max_iters={m}", f"--eval_interval={max(m // 8, 1)}", "--warmup_iters=20"]  # noqa: E731
    btx = lambda srcs, e, m: [f"--init_from={','.join(srcs)}", "--upcycle_method=btx", *moe(e), *sched(m),  # noqa: E731
                              "--learning_rate=1.5e-3"]
    specs = [("copy", upcycled_8x2(dense, n)),
             *[(f"drop_{r:g}", [*upcycled_8x2(dense, n), "--upcycle_method=drop", f"--upcycle_drop_ratio={r}"])
               for r in DROP_RATIOS],
             ("btx_random", btx(branches, E, n_btx)), ("btx_hidden", [*btx(branches, E, n_btx), "--upcycle_router_init=hidden"]),
             # BTX's shape (E experts top-2) copy-upcycled; BTX at copy 8x2's training FLOPs; BTX with the
             # dense seed as one more branch, a generalist expert (the BTX paper's 4x7B model: three domain
             # experts and the seed Llama-2 7B), its FFN expert 0, the rest averaged over the seed and the branches
             (f"copy_{E}x2", upcycled_8x2(dense, n, n_experts=E)),
             ("btx_flops", btx(branches, E, n_flops)),
             ("btx_seed", btx([dense, *branches], E + 1, n_btx)),
             ("moe_scratch", [*MOE8, *sched(n)]),
             ("dense_continued", [f"--init_from={dense}", *sched(n), "--learning_rate=1.5e-3"])]
    dirs = run_many([(os.path.join(OUT, name, tag), args) for tag, args in specs])
    return [(tag, d) for (tag, _), d in zip(specs, dirs)]


def last_tokens(out_dir):
    """Training tokens a finished run saw (its last eval record)."""
    return evals(out_dir)[-1]["tokens"]


def run_shape(out_dir):
    """(training FLOPs per token at the run's block_size, FFN weights, experts per MoE
    layer) of a finished run's model. FFN weights: every layer's gate/up/down matrices,
    all experts (routers left out)."""
    model, ckpt = load_model(out_dir)
    T = (ckpt.get("config") or {}).get("block_size") or model.config.block_size
    ffn = sum(p.numel() for n, p in model.named_parameters() if ".ffn." in n and ".router." not in n)
    return model.flops_per_token(T), ffn, model.config.n_experts if model.config.is_moe else 1


def training_flops(out_dirs):
    """Training FLOPs of finished runs together: flops_per_token x tokens of each."""
    return sum(run_shape(d)[0] * last_tokens(d) for d in out_dirs)


def beyond_copy_row(tag, d, offset, domains):
    """Table row: final losses (train.py's eval batches and eval.py's), per-domain eval.py
    losses, the run's experts and FFN weights, and its total training tokens and FLOPs
    (offset: (tokens, FLOPs) trained before it, BTX's branches; a branch step is a dense
    step). The dense base, shared by every row, is counted in none."""
    res = evaluate_checkpoint(d, batches=4 if OPTS["smoke"] else 20)
    fpt, ffn, experts = run_shape(d)
    flops = offset[1] + fpt * last_tokens(d)
    row = summary(d, method=tag, experts=experts, ffn_params=ffn, eval_val_loss=res["val_loss"],
                  total_tokens=offset[0] + last_tokens(d), train_flops=flops, train_tflops=flops / 1e12)
    for D in domains:
        row[f"loss_{D}"] = res["per_domain"].get(D, {}).get("loss", float("nan"))
    return row, res


def budget_figure(name, curves, dense_loss, flops=False):
    """Val loss vs total training tokens (flops: training FLOPs) after the dense base; curves:
    (tag, out_dir, (tokens, FLOPs) before it). BTX's curves start after their branches; the
    dotted line is the dense base."""
    fig, ax = plt.subplots(figsize=(7.5, 4.8), constrained_layout=True)
    for i, (tag, d, offset) in enumerate(curves):
        ev, per = evals(d), (run_shape(d)[0] if flops else 1)
        ax.plot([(offset[flops] + per * r["tokens"]) / (1e12 if flops else 1e6) for r in ev],
                [r["val_loss"] for r in ev], marker="o", ms=2.5, label=tag, ls="--" if tag.startswith("btx") else "-",
                color=f"C{i}" if i < 10 else "black")   # (matplotlib's cycle has 10 colours)
    ax.axhline(dense_loss, color="grey", lw=0.8, ls=":", label="dense base")
    ax.set_xlabel(f"training {'TFLOPs' if flops else 'tokens (M)'} after the dense base (BTX includes its branches)")
    ax.set_ylabel("val loss (nats/token)")
    ax.set_title(f"Beyond copy-upcycling: val loss vs training {'FLOPs' if flops else 'tokens'}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = os.path.join(OUT, name, f"loss_vs_{'flops' if flops else 'tokens'}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def overtakes(ahead, behind):
    """First eval step of run `behind` at which its val loss is below run `ahead`'s,
    or None. The runs may evaluate at different steps (copy every n/6, scratch every
    n/8): `ahead`'s curve is interpolated linearly between its evals, at steps
    inside its evaluated range."""
    a = evals(ahead)
    steps, losses = [r["iter"] for r in a], [r["val_loss"] for r in a]
    return next((r["iter"] for r in evals(behind) if 0 < r["iter"] <= steps[-1]
                 and r["val_loss"] < float(np.interp(r["iter"], steps, losses))), None)


def beyond_copy_finding(rows, dirs):
    """The finding line, from the measured rows and curves: whether MoE from scratch
    overtakes copy-upcycling, whether Drop-Upcycling ends ahead of both, and where each
    BTX variant ends, with its training FLOPs relative to copy-upcycling 8x2's."""
    by = {r["method"]: r["val_loss"] for r in rows}
    rel = {r["method"]: r["train_flops"] / next(x["train_flops"] for x in rows if x["method"] == "copy") for r in rows}
    step = overtakes(dirs["copy"], dirs["moe_scratch"])
    parts = [("MoE from scratch never gets below copy-upcycling within the budget" if step is None else
              f"MoE from scratch first gets below copy-upcycling at step {step}")
             + f" (final: copy {by['copy']:.3f}, scratch {by['moe_scratch']:.3f})."]
    for r in DROP_RATIOS:
        v = by[f"drop_{r:g}"]
        parts.append(f"Drop r={r:g}: {v:.3f} ({'ahead of' if v < min(by['copy'], by['moe_scratch']) else 'not ahead of'}"
                     f" both copy and scratch).")
    small = next(t for t in by if t.startswith("copy_"))
    f = lambda t: f"{by[t]:.3f} ({rel[t]:.2f}x copy's FLOPs)"  # noqa: E731
    parts.append(f"BTX random router {f('btx_random')}, hidden router {f('btx_hidden')}; {small} (BTX's shape) "
                 f"{f(small)}; BTX with more MoE steps {f('btx_flops')}; BTX with the seed as an extra expert "
                 f"{f('btx_seed')}; dense continued {f('dense_continued')}.")
    return " ".join(parts)


def beyond_copy():
    """9. Skywork-MoE section 2's open question and two alternatives to copies:
    copy-upcycling vs Drop-Upcycling r in {0.25, 0.5, 0.75}, BTX (one branch per domain)
    with random and hidden-state router, MoE from scratch and dense continued, at equal
    training tokens (BTX's branches counted), 4x the demo's MoE budget; and, to separate
    BTX's method from its budget and shape, copy-upcycling in BTX's shape, BTX at copy's
    training FLOPs and BTX with the seed as an extra expert. Per-domain losses, training
    FLOPs per row; BTX's expert-by-domain routing."""
    name, t0 = "beyond_copy", time.time()
    dense, domains = dense_base(), data_domains()
    branches = btx_branches(name, dense, domains)
    branch = (sum(last_tokens(b) for b in branches), training_flops(branches))
    runs = beyond_copy_runs(name, dense, branches)
    offset = lambda tag: branch if tag.startswith("btx") else (0, 0.0)  # noqa: E731
    rows, figures = [], []
    for tag, d in runs:
        row, res = beyond_copy_row(tag, d, offset(tag), domains)
        rows.append(row)
        if tag.startswith("btx"):
            usage = [L["domain_usage"] for L in res.get("layers", []) if L["kind"] == "routed"]
            figures.append(plot_domain_specialization(usage, None, os.path.join(OUT, name, f"routing_{tag}.png"),
                                                      layer_ids=[L["layer"] for L in res["layers"]]))
    dirs = dict(runs)
    curves, dense_loss = [(t, d, offset(t)) for t, d in runs], evals(dense)[-1]["val_loss"]
    figures[:0] = [budget_figure(name, curves, dense_loss), budget_figure(name, curves, dense_loss, flops=True),
                   bar_figure(name, rows, [f"loss_{D}" for D in domains], path_name="per_domain.png",
                              title="Per-domain val loss (eval.py)")]
    return write_results(name, "Beyond copy-upcycling: Drop-Upcycling, BTX, hidden-state router", rows,
                         figures, beyond_copy_finding(rows, dirs),
                         ["method", "experts", "ffn_params", "total_tokens", "train_tflops", "val_loss_step0",
                          "val_loss", "eval_val_loss", *[f"loss_{D}" for D in domains], "expert_sim", "tok_per_s"], t0)


EXPERIMENTS = {f.__name__: f for f in (upcycle_vs_scratch, gate_norm, adaptive_aux, router_order, fine_grained,
                                       lory, capacity, routers, beyond_copy)}


def main(argv=None):
    p = ArgumentParser(prog="experiments.py", description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("name", help="an experiment name, 'all' or 'list'")
    p.add_argument("--smoke", action="store_true", help="3 iterations per run (checks configs, not claims)")
    p.add_argument("--fresh", action="store_true", help="rerun even where a finished run exists")
    p.add_argument("--scale", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--out", default=None, help="output root (default out/exp; out/exp_smoke with --smoke, "
                                                "out/exp_gpu with --scale=gpu)")
    p.add_argument("--data_dir", default="", help="data directory (default data/multidomain)")
    p.add_argument("--jobs", type=int, default=1, help="independent runs trained at a time (each with "
                                                        "cpu_count / jobs threads; default 1)")
    a = p.parse_args(argv)
    # absolute (train.py runs in the repository root, the results are read from here): --out from
    # the current directory, the default in the repository
    default = os.path.join(ROOT, DEFAULT_OUT + ("_smoke" if a.smoke else "_gpu" if a.scale == "gpu" else ""))
    globals()["OUT"] = os.path.abspath(a.out) if a.out else default
    if a.jobs < 1:
        print(f"error: --jobs={a.jobs}: need at least 1 run at a time", file=sys.stderr)
        return 2
    OPTS.update(smoke=a.smoke, fresh=a.fresh, scale=a.scale, data_dir=a.data_dir and os.path.abspath(a.data_dir),
                jobs=a.jobs, out=a.out or "")
    if a.name == "list":
        for k, f in EXPERIMENTS.items():
            print(f"{k:20s} {f.__doc__.strip().splitlines()[0]}")
        return 0
    if a.name != "all" and a.name not in EXPERIMENTS:
        print(f"error: unknown experiment {a.name!r}; valid: all, list, {', '.join(EXPERIMENTS)}", file=sys.stderr)
        return 2
    names = list(EXPERIMENTS) if a.name == "all" else [a.name]
    ensure_data()
    t0 = time.time()
    for n in names:
        print(f"== {n}", flush=True)
        EXPERIMENTS[n]()
    print(f"done: {', '.join(names)} in {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
