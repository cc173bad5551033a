"""Robustness under torchrun: a rank whose launcher dies (torchrun killed with
SIGKILL) or that loses another rank ends within a bounded time, with one line on
stderr and exit status 1, and the last checkpoint loads. The ranks are real
processes: started by a stand-in launcher, or spawned, each with a deadline."""
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

import checkpoint
import parallel
import train
from helpers import ROOT, TINY, make_dataset

DEADLINE_S = 240   # for a run to start and reach its first checkpoint on a loaded machine

# a stand-in for torchrun: starts one rank (argv[2:]) with its output in files, prints its pid, waits
LAUNCHER = """
import subprocess, sys
rank = subprocess.Popen(sys.argv[2:], stdout=open(sys.argv[1] + ".out", "w"), stderr=open(sys.argv[1] + ".err", "w"))
print(rank.pid, flush=True)
rank.wait()
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("data")))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env(rank, world, port):
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port)}


def ended(pid):
    """True when process pid has exited (gone, or a zombie nobody reaps)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads process states from /proc")
def test_a_rank_whose_launcher_dies_stops_within_seconds(data_dir, tmp_path):
    out, log = tmp_path / "run", tmp_path / "rank0"
    env = dict(os.environ, OMP_NUM_THREADS="1", **torchrun_env(0, 1, free_port()))
    argv = [sys.executable, os.path.join(ROOT, "train.py"), *TINY, f"--data_dir={data_dir}", f"--out_dir={out}",
            "--max_iters=1000000", "--eval_interval=2"]
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(log), *argv], env=env, stdout=subprocess.PIPE,
                                text=True)
    pid = int(launcher.stdout.readline())
    try:
        deadline = time.time() + DEADLINE_S
        while not (out / "ckpt.pt").exists():   # it trains and saves
            assert time.time() < deadline and launcher.poll() is None, (log.with_suffix(".err").read_text())
            time.sleep(0.5)
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        killed = time.time()
        while not ended(pid):
            assert time.time() - killed < 10 * parallel.LAUNCHER_POLL_S + 20, "the rank trains on without its launcher"
            time.sleep(0.2)
    finally:
        launcher.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    err = log.with_suffix(".err").read_text().strip().splitlines()
    assert len(err) == 1 and f"error: rank 0: its launcher (pid {launcher.pid}) is gone" in err[0], err
    assert checkpoint.load_checkpoint(str(out))["iter_num"] >= 2


def rank_of_a_run_that_loses_rank_1(rank, argv, port, log_dir):
    """A torchrun-like rank of a 2-process DDP run (spawned); rank 1 dies at step 3."""
    torch.set_num_threads(1)
    os.environ.update(torchrun_env(rank, 2, port))
    if rank == 1:
        step = train.update_balancing

        def die_at_step_3(st, *args):
            if st.iter_num == 3:
                os._exit(9)
            return step(st, *args)
        train.update_balancing = die_at_step_3
    with open(os.path.join(log_dir, f"{rank}.err"), "w") as err, open(os.devnull, "w") as null, \
            contextlib.redirect_stderr(err), contextlib.redirect_stdout(null):
        code = train.main(argv)
    sys.exit(code)


def test_a_rank_that_loses_another_stops_with_one_line(data_dir, tmp_path):
    out = tmp_path / "run"
    argv = [*TINY, f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=1000", "--eval_interval=2",
            "--gradient_accumulation_steps=2", "--backend=gloo"]
    port, ctx = free_port(), mp.get_context("spawn")
    ranks = [ctx.Process(target=rank_of_a_run_that_loses_rank_1, args=(r, argv, port, str(tmp_path))) for r in range(2)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(DEADLINE_S)
    alive = [p.is_alive() for p in ranks]
    for p in ranks:
        p.kill()
    assert not any(alive), "a rank is still running after losing the other"
    assert [p.exitcode for p in ranks] == [1, 9]
    err = (tmp_path / "0.err").read_text().strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: rank 0 lost another process of this run ("), err
    assert checkpoint.load_checkpoint(str(out))["iter_num"] >= 2   # a step both ranks finished
