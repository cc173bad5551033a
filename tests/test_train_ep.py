"""train.py --expert_parallel=N on CPU with gloo: train.main() runs in spawned
processes with torchrun's environment variables (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), and its metrics.jsonl and checkpoints are compared with
one process doing gradient accumulation over the same micro-batches (the
reference, run in-process).

One spawn of 2 ranks runs every EP case in turn (starting torch in a spawned
process costs seconds; a training run of the tiny model costs less than that)."""
import contextlib
import json
import os
import shutil
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train
from helpers import TINY, make_dataset, read_jsonl

MOE = ["--moe_layers=all", "--n_experts=4", "--top_k=2", "--capacity_factor=1.0", "--adaptive_aux=True",
       "--gradient_accumulation_steps=2", "--eval_interval=2", "--backend=gloo"]
DEADLINE_S = 240
BAD = {   # name -> (extra args for every rank, extra args for rank 1 only, the one line every rank prints)
    "indivisible": (["--n_experts=3"], [], "n_experts=3 must be divisible by expert_parallel=2"),
    "lory": (["--router=lory", "--segment_len=8", "--capacity_factor=0.0", "--adaptive_aux=False"], [],
             "expert_parallel does not apply to router='lory'"),
    "mismatch": ([], ["--top_k=1"], "ranks [1] run a different config than rank 0"),
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank, world, runs, out_dir):
    """One torchrun-like rank: train.main(argv) for each (name, port, argvs) in runs,
    stdout/stderr to out_dir/{name}.{rank}.out/.err, exit codes to codes{rank}.json."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    codes = {}
    try:
        for name, port, argvs in runs:
            os.environ["MASTER_PORT"] = str(port)
            with open(os.path.join(out_dir, f"{name}.{rank}.out"), "w") as out, \
                    open(os.path.join(out_dir, f"{name}.{rank}.err"), "w") as err, \
                    contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                codes[name] = train.main(argvs[rank])
            if dist.is_initialized():   # a run that failed with a one-line error leaves its group
                dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        os._exit(1)
    with open(os.path.join(out_dir, f"codes{rank}.json"), "w") as f:
        json.dump(codes, f)


def spawn(runs, world, out_dir):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(r, world, runs, str(out_dir))) for r in range(world)]
    for p in procs:
        p.start()
    end = time.time() + DEADLINE_S
    for p in procs:
        p.join(max(0.0, end - time.time()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in procs]


def run_here(args):
    """train.main in this process (one process, no torchrun variables)."""
    assert "RANK" not in os.environ
    with contextlib.redirect_stdout(open(os.devnull, "w")):
        code = train.main(args)
    assert code == 0, f"train.main({args}) returned {code}"


def records(out_dir, split):
    return [r for r in read_jsonl(os.path.join(out_dir, "metrics.jsonl")) if r["split"] == split]


def assert_same_metrics(got_dir, want_dir, iters):
    """Train losses and logged global loads of the given iters, and eval losses at
    the same iters, within 1e-6."""
    got = {r["iter"]: r for r in records(got_dir, "train")}
    want = {r["iter"]: r for r in records(want_dir, "train")}
    for it in iters:
        assert got[it]["loss"] == pytest.approx(want[it]["loss"], abs=1e-6), (got_dir, it)
        for lg, lw in zip(got[it]["moe"], want[it]["moe"]):
            torch.testing.assert_close(torch.tensor(lg["tokens_per_expert"]), torch.tensor(lw["tokens_per_expert"]),
                                       rtol=0, atol=1e-6)
    got_ev = {r["iter"]: r for r in records(got_dir, "eval")}
    want_ev = {r["iter"]: r for r in records(want_dir, "eval")}
    for it in set(got_ev) & set(want_ev):
        assert got_ev[it]["val_loss"] == pytest.approx(want_ev[it]["val_loss"], abs=1e-6), (got_dir, it)
        for k in ("expert_similarity", "similarity_to_dense"):   # logged rounded to 6 decimals
            if k in want_ev[it]:
                torch.testing.assert_close(torch.tensor(got_ev[it][k]), torch.tensor(want_ev[it][k]), rtol=0,
                                           atol=2e-6)


def test_expert_parallel_training_equals_one_process(tmp_path):
    data = make_dataset(str(tmp_path / "data"))
    common = TINY + [f"--data_dir={data}"] + MOE
    d = {name: str(tmp_path / name) for name in ("dense", "ref", "half", "half_ep2", "ep2", "ep2_ep1", "up1", "up2")}
    # one process: the references
    run_here(TINY + [f"--data_dir={data}", f"--out_dir={d['dense']}", "--max_iters=2"])
    run_here(common + [f"--out_dir={d['ref']}", "--max_iters=4"])     # the uninterrupted run
    run_here(common + [f"--out_dir={d['half']}", "--max_iters=2"])    # its first half, saved at iter 2
    shutil.copytree(d["half"], d["half_ep2"])
    upcycle = [f"--init_from={d['dense']}", "--upcycle_expert_noise=0.1", "--max_iters=2"]
    run_here(common + upcycle + [f"--out_dir={d['up1']}"])
    # EP=2 on 2 processes
    ep2 = common + ["--expert_parallel=2"]
    runs = [("ep2", free_port(), [ep2 + [f"--out_dir={d['ep2']}", "--max_iters=2"]] * 2),
            ("half_ep2", free_port(), [ep2 + [f"--out_dir={d['half_ep2']}", "--max_iters=4",
                                              "--init_from=resume"]] * 2),
            ("up2", free_port(), [ep2 + upcycle + [f"--out_dir={d['up2']}"]] * 2)]
    for name, (both, rank1, _) in BAD.items():
        argv = ep2 + both + [f"--out_dir={tmp_path / name}", "--max_iters=2"]
        runs.append((name, free_port(), [argv, argv + rank1]))
    codes = spawn(runs, 2, tmp_path)
    errors = "".join(open(tmp_path / f).read() for f in os.listdir(tmp_path) if f.startswith("error"))
    assert codes == [0, 0], f"exit codes {codes}\n{errors}"
    for rank in range(2):
        got = json.load(open(tmp_path / f"codes{rank}.json"))
        assert got == {"ep2": 0, "half_ep2": 0, "up2": 0, **{n: 2 for n in BAD}}, (rank, got)
    # save at EP=2 -> resume with one process (EP=1)
    shutil.copytree(d["ep2"], d["ep2_ep1"])
    run_here(common + [f"--out_dir={d['ep2_ep1']}", "--max_iters=4", "--init_from=resume"])

    assert_same_metrics(d["ep2"], d["ref"], [1, 2])
    assert_same_metrics(d["ep2_ep1"], d["ref"], [3, 4])    # saved at EP=2, resumed at EP=1
    assert_same_metrics(d["half_ep2"], d["ref"], [3, 4])   # saved by one process, resumed at EP=2
    assert_same_metrics(d["up2"], d["up1"], [1, 2])       # online upcycling of the owned experts
    assert "expert_similarity" in records(d["up2"], "eval")[-1]
    # the EP=2 checkpoint holds full stacks by global expert index, as one process saves them
    a, b = (torch.load(os.path.join(d[n], "ckpt.pt"), weights_only=True) for n in ("half", "ep2"))
    assert b["model"]["blocks.0.ffn.gate_proj"].shape[0] == 4
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=0, atol=1e-5, msg=k)
    u1, u2 = (torch.load(os.path.join(d[n], "ckpt.pt"), weights_only=True) for n in ("up1", "up2"))
    assert u2["upcycled_from"] == u1["upcycled_from"]
    for name, (_, _, line) in BAD.items():   # every rank fails with the same one line
        for rank in range(2):
            said = open(tmp_path / f"{name}.{rank}.err").read().strip().splitlines()
            assert len(said) == 1 and said[0].startswith("error: ") and line in said[0], (name, rank, said)
        assert not os.path.exists(tmp_path / name / "ckpt.pt")
