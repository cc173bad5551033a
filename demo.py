"""
The main job (`make demo`): the whole upcycling story on the default data.

  1. prepare data/multidomain (offline: Python stdlib, numpy, torch headers)
  2. train the dense model                        -> out/demo/dense
  3. upcycle it online into 8 experts top-2, train -> out/demo/upcycled
  4. same MoE shape from scratch, same steps       -> out/demo/moe_scratch
  5. dense model, same extra steps                 -> out/demo/dense_continued
  6. evaluate all three, plots, out/demo/report.md

On a CUDA machine it uses a larger model and more steps automatically
(--scale=gpu); --scale=cpu forces the CPU recipe. Finished stages are reused
(--fresh reruns them).
"""
import json
import os
import shutil
import subprocess
import sys
import time

import torch

import eval as ev
from configurator import ArgumentParser, parse_config
from metrics import load_metrics
from plot import SECOND_CHOICE, make_plots
from token_routing import val_snippet_routing
from train import DEFAULTS, finished_run

ROOT = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join("out", "demo")
STAGES = [("dense", "config/demo/dense.py"), ("upcycled", "config/demo/upcycled.py"),
          ("moe_scratch", "config/demo/moe_scratch.py"), ("dense_continued", "config/demo/dense_continued.py")]
GPU_OVERRIDES = ["--n_layer=8", "--n_head=8", "--n_embd=512", "--block_size=512", "--batch_size=32",
                 "--eval_iters=20", "--compile=True"]


def stage(i, n, text):
    print(f"\n[{i}/{n}] {text}", flush=True)


def train(name, config, extra):
    out_dir = os.path.join(OUT, name)
    cfg = parse_config([os.path.join(ROOT, config), f"--out_dir={out_dir}"] + extra, DEFAULTS)
    if finished_run(out_dir, cfg):          # the same settings (not, e.g., a CPU-scale run) and finished
        print(f"  {out_dir} is finished; reusing it (--fresh to retrain)")
        return out_dir
    # an unfinished stage is retrained from the start (its partial checkpoint replaced)
    cmd = [sys.executable, "-u", os.path.join(ROOT, "train.py"), config, f"--out_dir={out_dir}", "--overwrite=True"] + extra
    print("  $ " + " ".join(["python train.py", config, f"--out_dir={out_dir}"] + extra), flush=True)
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ROOT)
    if p.returncode != 0:
        sys.exit(f"error: stage {name} failed (exit {p.returncode}); see the output above")
    print(f"  {name}: {time.time() - t0:.0f} s", flush=True)
    return out_dir


def main(argv=None):
    ap = ArgumentParser(prog="demo.py", description="Run the upcycling demo end to end.")
    ap.add_argument("--scale", choices=("auto", "cpu", "gpu"), default="auto",
                    help="auto: gpu when CUDA is available, else cpu")
    ap.add_argument("--fresh", action="store_true", help="retrain stages that already finished")
    a = ap.parse_args(argv)
    scale = a.scale if a.scale != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
    extra = GPU_OVERRIDES if scale == "gpu" else ["--device=cpu"] if not torch.cuda.is_available() else []
    t_start = time.time()
    n = 2 + len(STAGES)

    stage(1, n, "prepare data/multidomain")
    if os.path.exists(os.path.join(ROOT, "data", "multidomain", "meta.json")):
        print("  data/multidomain is prepared; reusing it")
    else:
        subprocess.run([sys.executable, os.path.join(ROOT, "data", "multidomain", "prepare.py")], cwd=ROOT, check=True)

    if a.fresh:
        for name, _ in STAGES:
            shutil.rmtree(os.path.join(OUT, name), ignore_errors=True)
    dirs = {}
    for i, (name, config) in enumerate(STAGES, start=2):
        stage(i, n, f"train {name} ({config})")
        dirs[name] = train(name, config, extra)

    stage(n, n, "evaluate, plot, write the report")
    write_report({k: v for k, v in dirs.items() if k != "dense"}, dirs["dense"], scale, time.time() - t_start)
    print(f"\ndone in {time.time() - t_start:.0f} s: {os.path.join(OUT, 'report.md')}")
    return 0


def write_report(runs, dense_dir, scale, elapsed):
    rows, results = [], {}
    for name, d in runs.items():
        res = ev.evaluate_checkpoint(d)
        results[name] = res
        row = {"run": name, "kind": res["kind"], "params_M": res["params"] / 1e6,
               "active_M": res["active_params"] / 1e6, "val_loss": res["val_loss"], "val_ppl": res["val_ppl"]}
        for dom, v in res["per_domain"].items():
            row[f"ppl {dom}"] = v["ppl"]
        recs = load_metrics(d)
        tr = [r for r in recs if r.get("split") == "train"]
        if tr:   # median training throughput of the run
            row["tok/s"] = int(sorted(r["tok_per_s"] for r in tr)[len(tr) // 2])
        first = [r for r in recs if r.get("split") == "eval"][0]
        row["step-0 val loss (train.py eval)"] = first["val_loss"]
        rows.append(row)
        print(f"  {name}: val loss {res['val_loss']:.4f} (ppl {res['val_ppl']:.2f})", flush=True)
    dense_res = ev.evaluate_checkpoint(dense_dir)
    table, pngs = ev.compare_runs([runs[k] for k in runs], os.path.join(OUT, "compare"))
    model, ckpt = ev.load_run(runs["upcycled"])    # the token view: one fixed val snippet per domain
    results["upcycled"]["token_routing"] = val_snippet_routing(model, ev.load_val_data(ckpt))
    up_plots, notes = make_plots(runs["upcycled"], result=results["upcycled"],
                                 out_dir=os.path.join(OUT, "plots_upcycled"))
    wanted = ("expert_load", "domain_specialization", "load_over_training", "expert_similarity")
    key_plots = [p for p in up_plots if any(w in os.path.basename(p) for w in wanted)]
    up, sc, dc = (results[k]["val_loss"] for k in ("upcycled", "moe_scratch", "dense_continued"))
    lines = [
        "# Upcycling demo report", "",
        f"Scale: {scale}. Total wall time of `make demo` (this run's stages): {elapsed:.0f} s.",
        f"Dense model before upcycling: val loss {dense_res['val_loss']:.4f} "
        f"(ppl {dense_res['val_ppl']:.2f}), {dense_res['params'] / 1e6:.2f}M parameters.", "",
        "Every number below is measured on the same fixed, seeded val batches (eval.py).", "",
        ev.markdown_table(rows), "",
        f"After the same number of extra steps the upcycled MoE reaches val loss {up:.4f}, the same MoE "
        f"trained from scratch {sc:.4f}, and the continued dense model {dc:.4f}.", "",
        "## Loss curves", "", f"![compare]({os.path.relpath(pngs[0], OUT)})", "",
        "## Routing of the upcycled model", "",
    ]
    lines += [f"![{os.path.basename(p)}]({os.path.relpath(p, OUT)})" for p in key_plots]
    token_views = [p for p in up_plots if os.path.basename(p).startswith("token_routing_")]
    lines += ["", "## Which expert each token goes to", "",
              "One val snippet per domain, once per MoE layer: each token on the colour of its top-1 expert, "
              f"underlined in the second expert's colour where its gate is at least {SECOND_CHOICE:g} x the first "
              "one's, a near tie (Mixtral, arXiv 2401.04088, fig. 8). Hover the tokens in "
              "[token_routing.html](plots_upcycled/token_routing.html) for every layer's experts and gates.", ""]
    lines += [f"![{os.path.basename(p)}]({os.path.relpath(p, OUT)})" for p in token_views]
    lines += ["", "All plots of the upcycled run: `plots_upcycled/`. Regenerate with "
              "`python eval.py --ckpt=out/demo/upcycled --plots`; sample it with "
              "`python sample.py --ckpt=out/demo/upcycled`.", ""]
    with open(os.path.join(OUT, "report.md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(OUT, "report.json"), "w") as f:
        json.dump({"rows": rows, "dense": {"val_loss": dense_res["val_loss"]}, "scale": scale,
                   "wall_s": elapsed}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
