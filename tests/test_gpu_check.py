"""gpu_check.py: its dry run (the GPU check's own code at tiny sizes on the CPU) writes
every section with numbers that make sense; a section that fails, crashes or hangs is
recorded with what it saved and the others go on; bad flags are one line."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import gpu_check
from helpers import ROOT
from outdir import OutDirLock


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    p = subprocess.run([sys.executable, "gpu_check.py", "--dry_run", f"--out_dir={out}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    with open(out / "gpu_check.json") as f:
        report = json.load(f)
    return p, report, (out / "gpu_check.md").read_text(), out


def rows(report, section):
    return report["sections"][section]["rows"]


def positive(x):
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_dry_run_runs_every_section(dry_run):
    p, report, md, out = dry_run
    assert p.returncode == 0, p.stdout + p.stderr
    assert list(report["sections"]) == list(gpu_check.SECTIONS)
    assert {n: s["status"] for n, s in report["sections"].items()} == {n: "ok" for n in gpu_check.SECTIONS}
    assert report["device"] == "cpu (dry run)" and report["torch"] == torch.__version__ and report["dry_run"]
    assert report["command"].startswith("python gpu_check.py --dry_run")
    for name in gpu_check.SECTIONS:
        assert f"## {name}: ok" in md
    assert sorted(os.listdir(out)) == ["gpu_check.json", "gpu_check.md"]   # no lock or temp file left
    tests = rows(report, "tests")[0]
    assert tests["skipped"] > 0 and tests["failed"] == 0 and tests["exit_status"] == 0


def test_dry_run_kernels_time_every_path_against_dense(dry_run):
    kernel_rows = rows(dry_run[1], "kernels")
    for E in gpu_check.SIZES["dry"]["kernels"]["experts"]:
        by_path = {r["path"]: r for r in kernel_rows if r["E"] == E}
        assert sorted(by_path) == sorted(("dense",) + gpu_check.EXPERT_PATHS)
        assert by_path["dense"]["vs_dense"] == 1.0
        assert all(positive(r["fwd_bwd_ms"]) and positive(r["tflops"]) for r in by_path.values())


def test_dry_run_agreement_of_low_precision_paths(dry_run):
    """fp16 (bf16 on a GPU) against fp32 on the same bf16-representable inputs: a few
    roundings apart, far below the order-1 error of a kernel bug."""
    agreement = rows(dry_run[1], "agreement")
    assert {(r["path"], r["tensor"]) for r in agreement} == {
        (p, t) for p in gpu_check.EXPERT_PATHS for t in gpu_check.GRAD_NAMES}
    for r in agreement:
        if r["path"] == "loop":
            assert 0 < r["max_rel_vs_fp32"] < 0.05, r
        else:
            assert r["agrees"] and r["max_rel_vs_loop"] < 0.05, r


def test_dry_run_training_steps_and_decoding(dry_run):
    dense, moe = rows(dry_run[1], "mfu")
    assert dense["model"] == "dense" and moe["model"] == "upcycled 4x2"
    assert moe["active_M"] < moe["params_M"] and moe["flops_per_token_G"] > dense["flops_per_token_G"]
    assert all(positive(r["ms_per_iter"]) and positive(r["tok_per_s"]) and r["mfu"] is None for r in (dense, moe))
    decode = rows(dry_run[1], "decode")
    assert [(r["model"], r["batch"]) for r in decode] == [(m, b) for m in ("dense", "upcycled 4x2") for b in (1, 2)]
    for r in decode:   # fp32 on the CPU: the cache gives exactly the recomputed tokens
        assert r["same_tokens"] == 1.0 and positive(r["tok_per_s_cache"]) and positive(r["tok_per_s_recompute"])


CHILDREN = [   # (the child's python code, budget s, status, error text, rows kept)
    ("pass", 60, "ok", None, []),
    ("import time; time.sleep(60)", 1, "timeout", "killed after its budget of 1 s", []),
    ("import os; os.abort()", 60, "crashed", "exit status -6", []),
    ("import sys; sys.exit(3)", 60, "crashed", "exit status 3", []),
    ("import json, sys; json.dump({'rows': [{'E': 8}], 'error': 'ValueError: bad'}, open(sys.argv[1], 'w')); "
     "sys.exit(1)", 60, "error", "ValueError: bad", [{"E": 8}]),
]


@pytest.mark.parametrize("code, budget, status, error, kept", CHILDREN, ids=[c[2] + str(i) for i, c in enumerate(CHILDREN)])
def test_a_failing_section_is_recorded(tmp_path, code, budget, status, error, kept):
    result = str(tmp_path / "r.json")
    got = gpu_check.run_isolated([sys.executable, "-c", code, result], result, budget)
    assert got["status"] == status and got["rows"] == kept and got["seconds"] < 30
    assert (error is None and "error" not in got) or error in got["error"], got


def test_section_saves_its_rows_before_it_fails(tmp_path, monkeypatch):
    def half_done(size, dry_run, deadline, save):
        save([{"E": 8, "ms": 1.0}])
        raise RuntimeError("CUDA error: an illegal memory access\nsecond line")
    monkeypatch.setitem(gpu_check.SECTION_FUNCTIONS, "kernels", half_done)
    result = str(tmp_path / "r.json")
    assert gpu_check.run_section_here("kernels", True, 0, result) == 1
    with open(result) as f:
        assert json.load(f) == {"rows": [{"E": 8, "ms": 1.0}], "error": "RuntimeError: CUDA error: an illegal memory access"}


def test_bad_flags_are_one_line(tmp_path, capsys):
    def one_line_error(argv, needle):
        assert gpu_check.run_cli(gpu_check.main, argv, user_errors=(gpu_check.LockError,)) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and needle in err, err
    one_line_error(["--dry_run", "--sections=kernels,bogus"], "unknown one ['bogus']")
    if not torch.cuda.is_available():
        one_line_error([f"--out_dir={tmp_path / 'x'}"], "no CUDA device here")
    with OutDirLock(str(tmp_path), "another check"):
        one_line_error(["--dry_run", f"--out_dir={tmp_path}"], "is in use by another run")
    assert not (tmp_path / "x").exists() and os.listdir(tmp_path) == []


def test_gpu_settings_have_the_dry_runs_keys_and_fit_the_budget(monkeypatch):
    """The GPU sizes are read by the same code as the dry run's: the same keys, so a
    GPU run cannot stop on a missing one; the budgets add up to under 8 minutes."""
    assert gpu_check.SIZES["gpu"].keys() == gpu_check.SIZES["dry"].keys()
    for name, size in gpu_check.SIZES["gpu"].items():
        assert size.keys() == gpu_check.SIZES["dry"][name].keys(), name
    assert gpu_check.MODEL["gpu"].keys() == gpu_check.MODEL["dry"].keys()
    assert set(gpu_check.BUDGET_S) == set(gpu_check.SECTIONS) == set(gpu_check.SECTION_FUNCTIONS)
    assert sum(gpu_check.BUDGET_S.values()) < 8 * 60
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (9, 0))
    info = gpu_check.machine(dry_run=False)
    assert info["device"] == "NVIDIA H200" and info["capability"] == "sm_90" and info["torch"] == torch.__version__
