"""
Peak memory and time of dense HF Llama -> Mixtral upcycling, side by side with
mergekit-moe and, optionally, this project's three-step path and an older checkout.

    python bench_mergekit.py --out=out/bench_convert --mergekit               # streamed vs mergekit-moe
    python bench_mergekit.py --out=out/bench_360m --shape=smollm-360m --mergekit
    python bench_mergekit.py --out=out/bench_convert --three_step --base=../old_tree

The model is a random bf16 Llama of a real model's shape written by tests/hf_models.py
(--shape: smollm-135m, smollm-360m, llama-3.2-1b). Rows, each in its own process:
upcycle.py --from_hf --to_hf (one streamed pass, bf16; without and with --verify); with
--three_step, import (convert.py --from_hf), copy-upcycle (upcycle.py --ckpt), export
(convert.py --to_hf), in bf16 and fp32. A row's peak RSS is the kernel's ru_maxrss of
that process (os.wait4), its time the wall clock around it; "x output" is peak RSS over
the bytes written. mergekit-moe (PyPI mergekit, gate_mode random, --experts copies of
the same model, bf16 out) runs from a virtual environment made on first use
(--mergekit_venv, default --out/mergekit-venv): this process's torch version is installed
there first, so pip does not pull another build; pip needs the network then. Never run
by the tests. Writes --out/convert_bench.json and prints a markdown table.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


def measure(name, cmd, cwd, threads):
    """Run cmd; {step, seconds, peak_rss_gib}. Exits with one line when it fails."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        last = (out.strip().splitlines() or ["(no output)"])[-1]
        sys.exit(f"error: step {name!r} ({' '.join(cmd)}) failed: {last}")
    row = {"step": name, "seconds": round(seconds, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2)}
    print(f"{name:48s} {row['seconds']:7.1f} s  peak RSS {row['peak_rss_gib']:6.2f} GiB", flush=True)
    return row


def output_gib(path, delete):
    """dir_gib(path); with delete (--delete_outputs) the directory is removed once measured."""
    gib = dir_gib(path)
    if delete:
        shutil.rmtree(path)
    return gib


def dir_gib(path):
    return round(sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / 2**30, 2)


def pipeline(tree, label, hf_dir, out, experts, threads, dtype_flags):
    """import -> upcycle -> export with the convert.py/upcycle.py of `tree`; rows."""
    py = sys.executable
    slug = "".join(c if c.isalnum() else "_" for c in label)   # upcycle.py reads a comma as a list
    dense, moe, mixtral = (os.path.join(out, f"{slug}_{s}") for s in ("dense", "moe", "mixtral"))
    rows = [measure(f"{label}: import", [py, "convert.py", f"--from_hf={hf_dir}", f"--out_dir={dense}",
                                         *dtype_flags], tree, threads),
            measure(f"{label}: upcycle {experts}x2", [py, "upcycle.py", f"--ckpt={dense}", f"--out_dir={moe}",
                                                      f"--n_experts={experts}", "--top_k=2"], tree, threads),
            measure(f"{label}: export Mixtral", [py, "convert.py", f"--ckpt={moe}", f"--to_hf={mixtral}",
                                                 *dtype_flags], tree, threads)]
    rows[-1]["output_gib"] = dir_gib(mixtral)
    return rows


def streamed_rows(hf_dir, out, experts, threads, delete, verifies=("false", "true"), label=""):
    """upcycle.py --from_hf --to_hf in bf16, without and with the logit check."""
    rows = []
    for verify in verifies:
        target = os.path.join(out, f"streamed_verify_{verify}{label.replace(' ', '_')}")
        rows.append(measure(f"this tree: upcycle.py --from_hf --to_hf, verify {verify}{label}",
                            [sys.executable, "upcycle.py", f"--from_hf={hf_dir}", f"--to_hf={target}",
                             f"--n_experts={experts}", "--top_k=2", f"--verify={verify}"], ROOT, threads))
        rows[-1]["output_gib"] = output_gib(target, delete)
    return rows


def mergekit_tool(venv):
    """mergekit-moe in `venv`, made on first use with this process's torch installed first."""
    tool = os.path.join(venv, "bin", "mergekit-moe")
    if not os.path.exists(tool):
        pip = os.path.join(venv, "bin", "pip")
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        subprocess.run([pip, "install", "-q", f"torch=={torch.__version__.split('+')[0]}"], check=True)
        subprocess.run([pip, "install", "-q", "mergekit"], check=True)
    return tool


def mergekit_rows(hf_dir, out, experts, threads, delete, venv, label=""):
    """mergekit-moe on `experts` copies of hf_dir (gate_mode random, bf16 out)."""
    tool = mergekit_tool(venv)
    config = os.path.join(out, "mergekit_moe.yml")
    with open(config, "w") as f:
        f.write(f"base_model: {hf_dir}\ngate_mode: random\ndtype: bfloat16\nexperts_per_token: 2\nexperts:\n")
        f.write("".join(f"  - source_model: {hf_dir}\n    positive_prompts: [\"\"]\n" for _ in range(experts)))
    target = os.path.join(out, "mergekit_mixtral" + label.replace(" ", "_"))
    row = measure(f"mergekit-moe (bf16 out){label}", [tool, config, target, "--lazy-unpickle", "--quiet",
                                              "--i-understand-this-is-not-useful-without-training",
                                              f"--num-threads={threads}"], out, threads)
    row["output_gib"] = output_gib(target, delete)
    return [row]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="new directory for the models and the results")
    p.add_argument("--shape", default="smollm-135m", help="tests/hf_models.py --shape")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--base", help="an older checkout of this project to measure the same steps with")
    p.add_argument("--mergekit", action="store_true", help="also run mergekit-moe (its own venv, made on demand)")
    p.add_argument("--mergekit_venv", help="the venv for mergekit-moe (default --out/mergekit-venv)")
    p.add_argument("--rounds", type=int, default=1, help="with --mergekit: alternate the streamed upcycle "
                   "(verify off) and mergekit-moe this many times")
    p.add_argument("--three_step", action="store_true", help="also import, upcycle and export in three steps")
    p.add_argument("--delete_outputs", action="store_true", help="remove each streamed or mergekit output once "
                   "measured (the 1B shape's are 13 GiB each)")
    args = p.parse_args(argv)
    if os.path.exists(os.path.join(args.out, "convert_bench.json")):
        p.exit(2, f"error: {args.out} already holds results; choose another --out\n")
    if os.path.exists(args.out) and set(os.listdir(args.out)) - {"hf", "mergekit-venv"}:
        p.exit(2, f"error: {args.out} holds other files; choose another --out (hf/ is reused)\n")
    os.makedirs(args.out, exist_ok=True)
    hf_dir = os.path.join(args.out, "hf")
    rows = [] if os.path.exists(hf_dir) else [measure("make the random bf16 HF Llama", [sys.executable, "-m", "tests.hf_models", f"--out={hf_dir}",
                                                      f"--shape={args.shape}", "--tied", "--dtype=bfloat16"],
                    ROOT, args.threads)]
    run = (hf_dir, args.out, args.experts, args.threads, args.delete_outputs)
    rows += streamed_rows(*run)
    if args.three_step:
        rows += pipeline(ROOT, "this tree, bf16", hf_dir, args.out, args.experts, args.threads, ["--dtype=bfloat16"])
        rows += pipeline(ROOT, "this tree, fp32", hf_dir, args.out, args.experts, args.threads, ["--dtype=float32"])
    if args.base:
        rows += pipeline(os.path.abspath(args.base), "base tree, fp32", hf_dir, args.out, args.experts,
                         args.threads, [])
    if args.mergekit:
        venv = args.mergekit_venv or os.path.join(args.out, "mergekit-venv")
        rows += mergekit_rows(*run, venv)
        for r in range(2, args.rounds + 1):   # more rounds, alternating, for the times
            rows += streamed_rows(*run, ("false",), f", round {r}")
            rows += mergekit_rows(*run, venv, f", round {r}")
    with open(os.path.join(args.out, "convert_bench.json"), "w") as f:
        json.dump({"shape": args.shape, "experts": args.experts, "threads": args.threads, "rows": rows}, f, indent=2)
    print(f"\n{args.shape}, {args.experts}x2, {args.threads} threads\n"
          "| step | seconds | peak RSS GiB | output GiB | peak RSS x output |\n|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['peak_rss_gib'] / r['output_gib']:.2f}" if r.get("output_gib") else ""
        print(f"| {r['step']} | {r['seconds']} | {r['peak_rss_gib']} | {r.get('output_gib', '')} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
