"""Every command-line script answers bad input with one line on stderr and a
non-zero exit, before it writes anything (bench.py, experiments.py, demo.py and
the data scripts; train.py, eval.py and upcycle.py have their own tests)."""
import os
import subprocess
import sys

import pytest

from helpers import ROOT


def run(script, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("script, args, needle", [
    ("bench.py", ["--experts=abc"], "--experts='abc'"),
    ("bench.py", ["--experts=0"], "counts >= 1"),
    ("bench.py", ["--k=9", "--experts=8"], "--k=9"),
    ("bench.py", ["--impls=bogus"], "unknown ['bogus']"),
    ("bench.py", ["--dtype=fp8"], "--dtype=fp8"),
    ("bench.py", ["--device=tpu"], "--device=tpu"),
    ("bench.py", ["--model", "--model_experts=0"], "--model_experts=0"),
    ("bench.py", ["--compile-only=sm90"], "--compile-only='sm90'"),
    ("bench.py", ["--bogus"], "unrecognized arguments: --bogus"),
    ("bench.py", ["--hf_control"], "pass --hf too"),
    ("experiments.py", ["nope"], "unknown experiment 'nope'"),
    ("experiments.py", ["all", "--scale=tpu"], "invalid choice: 'tpu'"),
    ("experiments.py", ["all", "--data_dir=/no/such/dir"], "holds no prepared dataset"),
    ("demo.py", ["--scale=tpu"], "invalid choice: 'tpu'"),
    ("data/similarity.py", ["--dim=100000000000"], "--dim <= 2**20"),
    ("data/similarity.py", ["--k=x"], "invalid int value: 'x'"),
    ("data/multidomain/prepare.py", ["--tokenizer=bogus"], "unknown tokenizer 'bogus'"),
])
def test_one_line_error(script, args, needle):
    p = run(script, *args)
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert p.returncode != 0 and len(lines) == 1, (p.returncode, p.stderr)
    assert lines[0].startswith("error:") and needle in lines[0], lines[0]


def test_smoke_run_never_replaces_a_full_run(tmp_path):
    """experiments.py --smoke into a folder with real runs stops before touching them."""
    from helpers import TINY, make_dataset, run_train
    data = make_dataset(str(tmp_path / "data"))
    dense = tmp_path / "exp" / "dense"
    run_train(TINY + [f"--data_dir={data}", f"--out_dir={dense}", "--max_iters=4"])
    before = (dense / "ckpt.pt").read_bytes()
    p = run("experiments.py", "gate_norm", "--smoke", f"--out={tmp_path / 'exp'}", f"--data_dir={data}")
    assert p.returncode != 0 and "will not replace it" in p.stderr, p.stderr
    assert (dense / "ckpt.pt").read_bytes() == before


def test_demo_stage_prints_and_runs_its_train_command(tmp_path, monkeypatch, capsys):
    """demo.train prints the train.py command it runs and runs it (the subprocess is
    replaced here: the demo's training itself is `make demo`)."""
    import subprocess

    import demo
    calls = []
    monkeypatch.setattr(demo, "OUT", str(tmp_path))
    monkeypatch.setattr(subprocess, "run", lambda cmd, cwd=None: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    out_dir = demo.train("dense", "config/demo/dense.py", ["--device=cpu"])
    assert out_dir == str(tmp_path / "dense") and len(calls) == 1 and calls[0][-1] == "--device=cpu"
    assert f"$ python train.py config/demo/dense.py --out_dir={out_dir} --device=cpu" in capsys.readouterr().out
