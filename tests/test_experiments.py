"""The committed configs load, and every experiment's runs train for a few steps
(--smoke: a tiny model, 3 iterations; this checks the scripts, not the claims)."""
import glob
import json
import os
import subprocess
import sys

import pytest

from experiments import EXPERIMENTS
from helpers import ROOT, make_dataset
from model import GPTConfig
from configurator import parse_config
from init_from import model_args_from
from train import DEFAULTS


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "config", "**", "*.py"), recursive=True)),
                         ids=lambda p: os.path.relpath(p, ROOT))
def test_config_file_loads_and_builds_a_valid_model(path):
    cfg = parse_config([path], DEFAULTS)
    GPTConfig(**model_args_from(cfg, vocab_size=256))   # validates the MoE shape


def check_gate_norm(out):
    # measures what it claims to: sharper gates as lambda grows
    g = load_rows(out, "gate_norm")
    assert g[0]["max1_max2"] < g[1]["max1_max2"] < g[2]["max1_max2"]


def check_router_order(out):
    # right after exact upcycling the loss equals the dense loss
    r = load_rows(out, "router_order")
    assert abs(r[0]["val_loss_step0"] - r[0]["dense_val_loss"]) < 1e-4


def check_routers(out):
    # expert choice also has its training-routing loss; demand CV everywhere
    rt = {x["run"]: x for x in load_rows(out, "routers")}
    assert "val_loss_training_routing" in rt["expert_choice"] and all("demand_cv" in x for x in rt.values())


def check_fine_grained(out):
    # similarity over same-shard pairs is at least the all-pairs mean; G=2: half the pairs are not copies
    fg = load_rows(out, "fine_grained")
    assert all(x["expert_sim_same_shard"] >= x["expert_sim_all_pairs"] - 1e-6 for x in fg)
    assert fg[0]["expert_sim_same_shard"] > fg[0]["expert_sim_all_pairs"] + 0.2


def check_adaptive_aux(out):
    # the adaptive experiment has a run with Skywork's own loss
    ad = {x["run"]: x for x in load_rows(out, "adaptive_aux")}
    assert ad["adaptive_skywork"]["aux_loss"] == "skywork" and ad["adaptive"]["aux_loss"] == "switch"


def check_beyond_copy(out):
    # every method ran, BTX's routing-by-domain figures exist, and copy-upcycling starts at the
    # dense loss while Drop-Upcycling (re-initialised channels) starts above it
    b = {r["method"]: r for r in load_rows(out, "beyond_copy")}
    domains = [k[5:] for k in b["copy"] if k.startswith("loss_")]
    E, btx = len(domains), ["btx_random", "btx_hidden", "btx_flops", "btx_seed"]
    assert sorted(b) == sorted(["copy", f"copy_{E}x2", "drop_0.25", "drop_0.5", "drop_0.75", *btx,
                                "moe_scratch", "dense_continued"])
    assert all(os.path.exists(os.path.join(out, "beyond_copy", f"routing_{t}.png")) for t in btx)
    assert os.path.exists(os.path.join(out, "beyond_copy", "loss_vs_flops.png"))
    # shapes: BTX and copy_Ex2 have one expert per domain, BTX with the seed one more
    assert [b[t]["experts"] for t in ("copy", f"copy_{E}x2", "btx_random", "btx_seed", "dense_continued")] \
        == [8, E, E, E + 1, 1]
    assert b[f"copy_{E}x2"]["ffn_params"] == b["btx_random"]["ffn_params"] == b["copy"]["ffn_params"] * E // 8
    # training FLOPs: flops_per_token x tokens of the run, plus (BTX) its dense branches' own
    import experiments as X
    branches = [os.path.join(out, "beyond_copy", f"branch_{D}") for D in domains]
    branch_flops = X.training_flops(branches)
    for t, r in b.items():
        d = os.path.join(out, "beyond_copy", t)
        own = X.run_shape(d)[0] * X.last_tokens(d)
        assert r["train_flops"] == pytest.approx(own + (branch_flops if t in btx else 0), rel=1e-9), t
    assert b["dense_continued"]["train_flops"] < b["copy"]["train_flops"]
    dense0 = [r for r in map(json.loads, open(os.path.join(out, "dense", "metrics.jsonl"))) if r["split"] == "eval"][-1]
    assert abs(b["copy"]["val_loss_step0"] - dense0["val_loss"]) < 1e-4
    assert b["drop_0.75"]["val_loss_step0"] > b["copy"]["val_loss_step0"]


CHECKS = {"gate_norm": check_gate_norm, "router_order": check_router_order, "routers": check_routers,
          "fine_grained": check_fine_grained, "adaptive_aux": check_adaptive_aux, "beyond_copy": check_beyond_copy}


def load_rows(out, name):
    return json.load(open(os.path.join(out, name, "results.json")))


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("data")), n_docs=80, doc_len=(80, 200))


# one test per experiment, so that a parallel test run spreads them; beyond_copy, the largest,
# also checks --jobs=2 (independent runs side by side)
@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_experiment_smoke(name, smoke_data, tmp_path):
    out = str(tmp_path / "exp")
    jobs = ["--jobs=2"] if name == "beyond_copy" else []
    # from another directory, with relative --out and --data_dir (train.py runs in the repository root)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "experiments.py"), name, "--smoke", "--out=exp",
                        f"--data_dir={os.path.relpath(smoke_data, tmp_path)}", *jobs], cwd=str(tmp_path),
                       capture_output=True, text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = load_rows(out, name)
    assert rows and all("val_loss" in r for r in rows), name
    assert os.path.getsize(os.path.join(out, name, "results.md")) > 100
    assert f"Command: `python experiments.py {name} --smoke" in open(os.path.join(out, name, "results.md")).read()
    assert glob.glob(os.path.join(out, name, "*.png")), name
    if name in CHECKS:
        CHECKS[name](out)


def test_a_failed_run_stops_the_queue(monkeypatch):
    """--jobs=2: when one run fails, no queued run starts, even while another is still
    running, and the failure is what is reported."""
    import threading
    import time
    import experiments as X
    started, release = [], threading.Event()

    def fake_run(d, *args, threads=None):
        started.append(d)
        if d == "b":
            time.sleep(0.1)
            sys.exit("error: run b failed")
        if d == "a":
            release.wait(5)
        return d
    monkeypatch.setattr(X, "run", fake_run)
    monkeypatch.setitem(X.OPTS, "jobs", 2)
    timer = threading.Timer(1.0, release.set)   # a is still running well after b failed
    timer.start()
    with pytest.raises(SystemExit, match="run b failed"):
        X.run_many([(d, []) for d in "abcd"])
    timer.cancel()
    assert started == ["a", "b"]


def test_fresh_trains_each_run_once_per_invocation(monkeypatch):
    """--fresh retrains what exists, but a run this invocation already trained (the dense
    base every experiment of `all` starts from) is reused."""
    import types
    import experiments as X
    calls = []
    monkeypatch.setattr(X, "finished_run", lambda out_dir, cfg: True)
    monkeypatch.setattr(X.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or types.SimpleNamespace(
        returncode=0, stdout="", stderr=""))
    monkeypatch.setitem(X.OPTS, "fresh", True)
    monkeypatch.setattr(X, "TRAINED", set())
    for _ in range(3):
        X.run("/tmp/never_written/dense", "--max_iters=1")
    assert len(calls) == 1


def test_overtakes_compares_curves_evaluated_at_different_steps(tmp_path):
    """copy evaluates every 200 steps, the others every 150: their first eval below
    copy's (interpolated) curve is found (1050, 750), which comparing only the steps
    in common (0, 600, 1200) would miss or place at 1200."""
    import experiments as X

    def write(name, points):
        os.makedirs(tmp_path / name)
        with open(tmp_path / name / "metrics.jsonl", "w") as f:
            for it, loss in points:
                f.write(json.dumps({"iter": it, "split": "eval", "val_loss": loss, "tokens": it}) + "\n")
        return str(tmp_path / name)
    copy = write("copy", [(i, 2.0 - i / 2000) for i in range(0, 1201, 200)])           # 2.0 -> 1.4
    scratch = write("scratch", [(i, 2.6 - i / 900) for i in range(0, 1201, 150)])      # steeper: crosses at 982
    assert X.overtakes(copy, scratch) == 1050 and X.overtakes(scratch, copy) == 200
    late = write("late", [(i, 2.0 - i / 2000 + (0.1 if i < 750 else -0.01)) for i in range(0, 1201, 150)])
    assert X.overtakes(copy, late) == 750


def test_btx_at_copy_flops_takes_the_moe_steps_that_match_copy_8x2():
    """Experiment 9's BTX at copy's FLOPs: on the experiment's shape (base config, byte
    vocabulary) a dense step costs 6.59M FLOPs per token, an 8x2 or 4x2 MoE step 9.86M/9.85M,
    so 600 branch steps and 600 MoE steps are 0.834x of 1200 copy-upcycled steps; 800 MoE
    steps after the branches bring BTX to copy's FLOPs (within one MoE step)."""
    import experiments as X
    fd, fc, fb = (X.planned_flops_per_token(a, vocab_size=256) for a in
                  ([], X.MOE8, ["--moe_layers=all", "--n_experts=4", "--top_k=2"]))
    assert (fd, fc, fb) == (6_593_280, 9_861_888, 9_849_600)
    assert (600 * fd + 600 * fb) / (1200 * fc) == pytest.approx(0.834, abs=1e-3)
    m = X.btx_moe_steps_at_flops(1200, 600, fc, fd, fb)
    assert m == 800 and abs(600 * fd + m * fb - 1200 * fc) <= fb / 2


def test_jobs_below_one_is_one_line_error():
    p = subprocess.run([sys.executable, os.path.join(ROOT, "experiments.py"), "gate_norm", "--jobs=0"], cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 2 and "--jobs=0" in p.stderr and "Traceback" not in p.stderr


def test_unknown_experiment_is_one_line_error():
    p = subprocess.run([sys.executable, os.path.join(ROOT, "experiments.py"), "nope"], cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 2 and "valid:" in p.stderr and "Traceback" not in p.stderr
