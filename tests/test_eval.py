"""eval.py: diagnostics on hand-built routings, deterministic evaluation of dense /
MoE / upcycled / Lory checkpoints, --json, --compare, the bad-input messages, and
the routing-diagnostics notebook. Plots: test_plot.py; sampling: test_sample.py."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import eval as ev
import diagnostics
from helpers import ROOT

EVAL_ARGS = ["--batches=3", "--batch_size=4"]


# ---------------------------------------------------------------- fixtures

@pytest.fixture
def runs(tiny_runs):
    return tiny_runs


def run_eval(args, env=None):
    e = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    e.update(env or {})
    return subprocess.run([sys.executable, os.path.join(ROOT, "eval.py")] + args, cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=300)


def cli(args, capsys):
    """eval.py's command line in this process (faster than a subprocess):
    (exit status, stdout, stderr)."""
    capsys.readouterr()
    rc = ev.cli(args)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out, err)


# ---------------------------------------------------------------- diagnostics by hand

def test_routing_diagnostics_hand_built():
    # 4 tokens, 4 experts, top-2: t0 -> {0,1}, t1 -> {0,1}, t2 -> {0,2}, t3 -> {0,3}
    tok = [0, 0, 1, 1, 2, 2, 3, 3]
    exp = [0, 1, 0, 1, 0, 2, 0, 3]
    probs = torch.full((4, 4), 0.25)                      # flat gates
    d = ev.routing_diagnostics(tok, exp, n_tokens=4, n_experts=4, top_k=2, probs=probs,
                               token_domains=[0, 0, 1, 1], n_domains=2)
    assert d["tokens_per_expert"] == [4, 2, 1, 1]
    assert d["load_fraction"] == [0.5, 0.25, 0.125, 0.125]
    assert d["drop_rate"] == 0.0
    # loads 4,2,1,1: mean 2, population std sqrt((4+0+1+1)/4)
    assert d["load_cv"] == pytest.approx(math.sqrt(1.5) / 2)
    assert d["load_entropy"] == pytest.approx(-(0.5 * math.log(0.5) + 0.25 * math.log(0.25)
                                                + 2 * 0.125 * math.log(0.125)))
    assert d["gate_entropy"] == pytest.approx(math.log(4))
    assert d["max1_max2"] == pytest.approx(1.0) and d["max2_max3"] == pytest.approx(1.0)
    C = torch.tensor(d["coactivation"])
    assert torch.allclose(C, C.t())
    assert C.diagonal().tolist() == [1.0, 0.5, 0.25, 0.25]       # fraction of tokens using i
    assert C[0, 1] == 0.5 and C[0, 2] == 0.25 and C[1, 2] == 0 and C[2, 3] == 0
    # domain 0 = tokens 0,1 -> experts 0,1,0,1; domain 1 = tokens 2,3 -> 0,2,0,3
    assert d["domain_usage"] == [[0.5, 0.5, 0, 0], [0.5, 0, 0.25, 0.25]]


def test_routing_diagnostics_balanced_and_dropped():
    # perfectly balanced: 4 tokens over 4 experts, top-1 -> cv 0, entropy log 4
    d = ev.routing_diagnostics([0, 1, 2, 3], [0, 1, 2, 3], 4, 4, 1)
    assert d["load_cv"] == 0 and d["load_entropy"] == pytest.approx(math.log(4))
    # 3 of 8 top-2 assignments dropped
    d = ev.routing_diagnostics([0, 1, 2, 3, 3], [0, 0, 1, 1, 2], 4, 4, 2)
    assert d["drop_rate"] == pytest.approx(3 / 8)
    # sharp gates: sorted probs 0.6, 0.3, 0.1 -> Max1/Max2 = 2, Max2/Max3 = 3
    p = torch.tensor([[0.6, 0.3, 0.1, 0.0]])
    d = ev.routing_diagnostics([0], [0], 1, 4, 1, probs=p)
    assert d["max1_max2"] == pytest.approx(2.0) and d["max2_max3"] == pytest.approx(3.0)


def test_lory_diagnostics_hand_built():
    E = 4
    w = torch.tensor([[0.7, 0.1, 0.1, 0.1],     # one expert above 2/E = 0.5
                      [0.25, 0.25, 0.25, 0.25],  # none
                      [0.55, 0.05, 0.35, 0.05]])  # one
    d = ev.lory_diagnostics(w, segment_domains=[0, 1, 0], n_domains=2)
    assert d["active_experts"] == pytest.approx(2 / 3)
    assert d["merge_weight_mean"] == pytest.approx(w.mean(0).tolist())
    ent = -(w * w.log()).sum(-1).mean()
    assert d["merge_entropy"] == pytest.approx(float(ent))
    assert d["domain_merge_weights"][1] == pytest.approx([0.25] * E)
    assert d["domain_merge_weights"][0] == pytest.approx(((w[0] + w[2]) / 2).tolist())
    assert d["domain_active_experts"] == pytest.approx([1.0, 0.0])
    assert E == len(d["merge_weight_mean"])


# ---------------------------------------------------------------- evaluation

def test_evaluate_is_deterministic_and_complete(runs):
    a = ev.evaluate_checkpoint(runs["moe"], batches=3, batch_size=4)
    b = ev.evaluate_checkpoint(runs["moe"], batches=3, batch_size=4)
    assert a == b
    assert a["kind"] == "moe" and a["tokens"] == 3 * 4 * 32
    assert math.isclose(a["val_ppl"], math.exp(a["val_loss"]))
    assert set(a["per_domain"]) == {"dom0", "dom1", "dom2"}
    assert sum(d["tokens"] for d in a["per_domain"].values()) == a["tokens"]
    # the overall loss is the token-weighted mean of the domain losses
    mean = sum(d["loss"] * d["tokens"] for d in a["per_domain"].values()) / a["tokens"]
    assert a["val_loss"] == pytest.approx(mean)
    assert len(a["layers"]) == 2
    for L in a["layers"]:
        for k in ("tokens_per_expert", "drop_rate", "gate_entropy", "max1_max2", "max2_max3", "load_cv",
                  "coactivation", "domain_usage", "expert_similarity", "mean_pairwise_similarity"):
            assert k in L, k
        assert sum(L["tokens_per_expert"]) == 2 * a["tokens"]          # dropless at eval
        assert len(L["coactivation"]) == 4 and len(L["expert_similarity"]) == 4
        assert all(sum(u) == pytest.approx(1) for u in L["domain_usage"].values())
        assert 0 < L["gate_entropy"] <= math.log(4) + 1e-6


def test_eval_loss_matches_training_eval(runs):
    # train.py evaluates on fixed_batches(eval_iters=2, batch_size=4, seed=1234): same batches
    res = ev.evaluate_checkpoint(runs["dense"], batches=2, batch_size=4)
    last = [r for r in ev.load_metrics(runs["dense"]) if r["split"] == "eval"][-1]
    assert res["val_loss"] == pytest.approx(last["val_loss"], rel=1e-5)
    assert res["kind"] == "dense" and "layers" not in res


def test_eval_capacity_override_measures_drops(runs):
    res = ev.evaluate_checkpoint(runs["moe"], batches=2, batch_size=4, eval_capacity_factor=0.5)
    assert all(L["drop_rate"] > 0.4 for L in res["layers"])   # capacity 0.5: at least half dropped


def test_lory_evaluation(runs):
    res = ev.evaluate_checkpoint(runs["lory"], batches=2, batch_size=4)
    assert res["kind"] == "lory"
    lo = res["lory"]
    assert lo["segment_len"] == 8 and lo["val_loss_all"] == res["val_loss"]
    assert res["val_loss_from_pos"]["pos"] == 8 and res["val_loss_from_pos"]["tokens"] == 2 * 4 * 24
    for L in res["layers"]:
        assert L["kind"] == "lory"
        assert set(L["domain_merge_weights"]) == {"dom0", "dom1", "dom2"}
        assert sum(L["merge_weight_mean"]) == pytest.approx(1)
        assert 0 <= L["active_experts"] <= 2 and 0 < L["merge_entropy"] <= math.log(4) + 1e-6


def test_upcycled_similarity_to_dense(runs):
    res = ev.evaluate_checkpoint(runs["upcycled"], batches=2, batch_size=4)
    for L in res["layers"]:
        assert len(L["similarity_to_dense"]) == 4
        # 6 steps after a noiseless copy: experts still close to the source and to each other
        assert min(L["similarity_to_dense"]) > 0.5 and L["mean_pairwise_similarity"] > 0.5
    assert res["upcycled_from"]["path"]


# ---------------------------------------------------------------- CLI

def test_cli_json_has_documented_keys(runs, capsys):
    p = run_eval([f"--ckpt={runs['moe']}", "--json", "--plots"] + EVAL_ARGS)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert {"val_loss", "val_ppl", "per_domain", "layers", "plots"} <= set(res)
    assert set(res["per_domain"]["dom0"]) == {"loss", "ppl", "tokens"}
    assert len(res["layers"]) == 2 and "tokens_per_expert" in res["layers"][0]
    expected = {"loss_curves", "expert_load", "load_over_training", "drop_rate_alpha", "gate_sharpness",
                "domain_specialization", "coactivation", "expert_similarity"}
    assert expected <= {os.path.splitext(os.path.basename(x))[0] for x in res["plots"]}
    assert all(os.path.dirname(x) == os.path.join(runs["moe"], "plots") for x in res["plots"])
    p = cli([f"--ckpt={runs['dense']}", "--json"] + EVAL_ARGS, capsys)
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert p.returncode == 0 and res["kind"] == "dense" and "layers" not in res
    p = cli([f"--ckpt={runs['lory']}"] + EVAL_ARGS, capsys)                # human-readable report
    assert p.returncode == 0 and "positions >= 8" in p.stdout and "merge weights" in p.stdout


def test_compare_two_runs(runs, tmp_path, capsys):
    out = str(tmp_path / "cmp")
    table, pngs = ev.compare_runs([runs["dense"], runs["moe"]], out)
    lines = table.splitlines()
    assert lines[0].startswith("| run |") and len(lines) == 4
    assert "dense" in lines[2] and "moe" in lines[3]
    assert open(os.path.join(out, "compare.md")).read().strip() == table
    assert len(pngs) == 1 and os.path.getsize(pngs[0]) > 1000
    p = cli(["--compare", runs["dense"], runs["lory"], f"--out={tmp_path / 'cmp2'}", "--eval"] + EVAL_ARGS, capsys)
    assert p.returncode == 0, p.stderr
    assert "eval_val_loss" in p.stdout and os.path.exists(tmp_path / "cmp2" / "compare.png")
    # --compare --eval scores every run with the evaluation flags given (here a shorter window)
    short = ev.evaluate_checkpoint(runs["dense"], 3, 4, block_size=16)
    row = ev.run_summary(runs["dense"], evaluate=True, batches=3, batch_size=4, block_size=16)[0]
    assert row["eval_val_loss"] == short["val_loss"] != ev.evaluate_checkpoint(runs["dense"], 3, 4)["val_loss"]
    p = cli(["--compare", runs["dense"], f"--out={tmp_path / 'c4'}", "--block_size=16"] + EVAL_ARGS, capsys)
    assert p.returncode == 2 and "--block_size applies to evaluation: add --eval" in p.stderr
    p = cli(["--compare", runs["dense"], f"--out={tmp_path / 'c5'}", "--eval", "--block_size=16"] + EVAL_ARGS, capsys)
    assert p.returncode == 0 and f"{short['val_loss']:.4f}" in p.stdout, p.stdout


def test_compare_names_a_diverged_run(runs, tmp_path):
    """A run whose last val loss is NaN is named under the table, and its best_val_loss
    is the best finite one, not NaN (min over a list with NaN depends on the order)."""
    bad = tmp_path / "diverged"
    shutil.copytree(runs["dense"], bad)
    recs = [json.loads(l) for l in open(bad / "metrics.jsonl")]
    evals = [r for r in recs if r.get("split") == "eval"]
    evals[-1]["val_loss"] = float("nan")
    best = min(r["val_loss"] for r in evals[:-1])
    with open(bad / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    table, _ = ev.compare_runs([runs["dense"], str(bad)], str(tmp_path / "cmp"))
    row = ev.run_summary(str(bad))[0]
    assert row["diverged"] and row["best_val_loss"] == best
    assert "note: diverged: the last val loss is nan (the run diverged)" in table
    assert table.count("note:") == 1                                   # the healthy run has none


# ---------------------------------------------------------------- bad input

def _one_line_error(p, *needles):
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, p.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_not_a_checkpoint(tmp_path, capsys):
    _one_line_error(run_eval([f"--ckpt={tmp_path / 'nothing'}"]), "does not exist")   # the real entry point
    _one_line_error(cli([f"--ckpt={tmp_path}"], capsys), "no checkpoint")
    (tmp_path / "ckpt.pt").write_bytes(b"garbage, not a torch file")
    _one_line_error(cli([f"--ckpt={tmp_path}"], capsys), "ckpt.pt")
    _one_line_error(cli(["--compare", str(tmp_path)], capsys), "ckpt.pt")
    _one_line_error(cli([], capsys), "--ckpt")
    _one_line_error(cli(["--bogus"], capsys), "--bogus")
    _one_line_error(cli(["--ckpt=x", "--batches=0"], capsys), "--batches")
    _one_line_error(cli(["--ckpt=x", "--device=tpu"], capsys), "--device=tpu is not a torch device")


def test_bad_flags_on_a_good_checkpoint(runs, tmp_path, capsys):
    ckpt = f"--ckpt={runs['dense']}"
    _one_line_error(cli([ckpt, "--sample"], capsys), "--sample")          # moved to sample.py
    _one_line_error(cli([ckpt, "--skip_positions=1000"] + EVAL_ARGS, capsys), "skip_positions=1000")
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    _one_line_error(cli(["--compare", runs["dense"], f"--out={a_file}"], capsys), "a_file")
    assert a_file.read_text() == "keep me"


def test_checkpoint_without_val_data(runs, tmp_path, capsys):
    missing = tmp_path / "gone"
    _one_line_error(cli([f"--ckpt={runs['dense']}", f"--data_dir={missing}"], capsys), "prepare.py", str(missing))
    half = tmp_path / "half"                                          # meta.json but no val split
    os.makedirs(half)
    shutil.copy(os.path.join(ev.eval_data_dir(ev.load_run(runs["dense"])[1]), "meta.json"), half)
    _one_line_error(cli([f"--ckpt={runs['dense']}", f"--data_dir={half}"], capsys), "val", "prepare.py")


def test_truncated_metrics_line(runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs["moe"], run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"iter": 7, "split": "tra')                          # killed mid-write
    recs = ev.load_metrics(str(run))
    assert recs[-1]["iter"] == 6
    p = cli([f"--ckpt={run}", "--plots", "--json"] + EVAL_ARGS, capsys)
    assert p.returncode == 0 and "truncated last line" in p.stderr and "Traceback" not in p.stderr
    json.loads(p.stdout.splitlines()[-1])
    with open(run / "metrics.jsonl", "a") as f:
        f.write('\n{"iter": 8}\n')                                    # now a corrupt line in the middle
    p = cli([f"--ckpt={run}", "--plots"] + EVAL_ARGS, capsys)         # skipped and counted
    assert p.returncode == 0 and "skipped 2 malformed line(s)" in p.stderr and "not valid JSON" in p.stderr


# ---------------------------------------------------------------- notebook

def test_notebook_executes(runs):
    nbformat = pytest.importorskip("nbformat", reason="nbformat not installed (pip install -r requirements-dev.txt)")
    nbclient = pytest.importorskip("nbclient", reason="nbclient not installed (pip install -r requirements-dev.txt)")
    path = os.path.join(ROOT, "notebooks", "routing_diagnostics.ipynb")
    nb = nbformat.read(path, as_version=4)
    old = os.environ.get("RUN_DIR")
    os.environ["RUN_DIR"] = runs["upcycled"]      # the kernel inherits this environment
    try:
        client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                         resources={"metadata": {"path": os.path.dirname(path)}})
        client.execute()
    finally:
        if old is None:
            os.environ.pop("RUN_DIR", None)
        else:
            os.environ["RUN_DIR"] = old
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 5


def test_a_routed_token_counts_for_its_own_domain():
    """Expert usage by domain credits each routed token (the input) with its own
    domain, and a Lory segment with its last token's: a document's end-of-text token
    belongs to that document, not to the next one (the target's domain)."""
    from router import Routing
    B, T, E = 1, 8, 2
    dom = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1]])    # (B, T+1): positions 0-3 domain 0 (3 = its eot)
    routed = Routing(token_idx=torch.arange(T), expert_idx=torch.zeros(T, dtype=torch.long),
                     gates=torch.ones(T), aux_losses={}, stats={"tokens_per_expert": torch.zeros(E)})
    usage = diagnostics.domain_usage([routed], dom, 2, None, (B, T))[0]
    assert usage[:, 0].tolist() == [4.0, 4.0]              # 4 tokens of each domain, not 3 and 5
    lory = {"merge_weights": torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])}   # 2 segments of 4 tokens
    assert diagnostics.domain_usage([lory], dom, 2, None, (B, T))[0].tolist() == [[1.0, 0.0], [0.0, 1.0]]
