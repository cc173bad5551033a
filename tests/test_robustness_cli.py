"""Robustness of the command lines. Each table row is a bad
setting, a damaged file or a fault, run through train.py / upcycle.py / eval.py /
sample.py's main() in this process, and the one line (and exit status) it must
give. "Nothing lost": the previous checkpoint and metrics.jsonl are byte-identical
afterwards and no temp file is left behind."""
import errno
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch

import checkpoint as C
import eval as ev
import metrics as M
import plot
import sample
import init_from
import train
import upcycle
from helpers import TINY, make_dataset
from model import GPT, GPTConfig
from outdir import OutDirLock


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def snapshot(out):
    """{file: sha256} of a run directory's checkpoint and log."""
    return {n: sha(os.path.join(out, n)) for n in ("ckpt.pt", "metrics.jsonl") if os.path.exists(os.path.join(out, n))}


def one_error_line(err, needle):
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step MoE run: data, out_dir and argv."""
    data = make_dataset(str(tmp_path_factory.mktemp("data")))
    out = str(tmp_path_factory.mktemp("run"))
    argv = TINY + [f"--data_dir={data}", f"--out_dir={out}", "--overwrite=True", "--max_iters=2",
                   "--eval_interval=1", "--moe_layers=all", "--n_experts=4"]
    assert train.main(argv) == 0
    return {"data": data, "out": out, "argv": argv}


@pytest.fixture
def copy(run, tmp_path):
    """A private copy of the run (tests may damage it)."""
    out = str(tmp_path / "run")
    shutil.copytree(run["out"], out)
    return out


# ----------------------------------------------------------------------------- train.py: exit 2, one line

def config_file(tmp_path, text):
    path = tmp_path / "cfg.py"
    path.write_text(text)
    return str(path)


TRAIN_BAD = [   # (extra argv, or a callable(tmp_path) -> argv; text of the one line)
    (["--rope_theta=1e999"], "rope_theta=inf must be a finite number in (1, inf)"),
    (["--adaptive_aux_xi=1e999"], "adaptive_aux_xi=inf must be a finite number"),
    (["--expert_bias_gamma=1e999", "--router=sigmoid"], "expert_bias_gamma=inf must be a finite number"),
    (["--upcycle_expert_noise=1e999"], "upcycle_expert_noise=inf must be a finite number"),
    (["--capacity_factor=1e999"], "capacity_factor=inf must be a finite number in [0, inf)"),
    (["--capacity_factor=-1.0"], "capacity_factor=-1.0 must be a finite number in [0, inf)"),
    (["--adaptive_aux_beta=1.5"], "adaptive_aux_beta=1.5 must be a finite number in [0, 1]"),
    (["--dropout=1.0"], "dropout=1.0 must be a finite number in [0, 1)"),
    (["--upcycle_granularity=0"], "upcycle_granularity=0 must be >= 1"),
    (lambda t: [config_file(t, "dropout = float('nan')\n")], "dropout=nan must be a finite number in [0, 1)"),
    (lambda t: [config_file(t, "import sys\nsys.exit(0)\n")], "called sys.exit(0) while it ran"),
    (lambda t: [config_file(t, "raise SystemExit('bye')\n")], "called sys.exit('bye')"),
]


@pytest.mark.parametrize("extra, needle", TRAIN_BAD, ids=[str(n)[:40] for _, n in TRAIN_BAD])
def test_train_bad_setting_exits_2_and_keeps_the_run(run, copy, tmp_path, capsys, extra, needle):
    before = snapshot(copy)
    extra = extra(tmp_path) if callable(extra) else extra
    capsys.readouterr()
    rc = train.main(extra + run["argv"] + [f"--out_dir={copy}", "--init_from=resume", "--max_iters=4"])
    out, err = capsys.readouterr()
    assert rc == 2
    one_error_line(err, needle)
    assert snapshot(copy) == before and not [f for f in os.listdir(copy) if ".tmp" in f or f == ".lock"]


def test_train_out_dir_that_is_a_file(run, tmp_path, capsys):
    path = tmp_path / "file"
    path.write_bytes(b"keep me")
    assert train.main(run["argv"] + [f"--out_dir={path}"]) == 2
    one_error_line(capsys.readouterr().err, "is a file, not a directory")
    assert path.read_bytes() == b"keep me"


def test_train_refuses_triton_without_cuda(run, tmp_path, capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: triton can run")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "t"
    assert train.main(run["argv"] + [f"--out_dir={out}", "--expert_impl=triton"]) == 2
    one_error_line(capsys.readouterr().err, "expert_impl='triton' cannot run here")
    assert not out.exists()


def test_train_second_run_on_a_locked_out_dir(run, copy, capsys):
    before = snapshot(copy)
    with OutDirLock(copy, "the other run"):
        rc = train.main(run["argv"] + [f"--out_dir={copy}", "--init_from=resume", "--max_iters=4"])
        err = capsys.readouterr().err
    assert rc == 2
    one_error_line(err, f"is in use by another run (pid {os.getpid()}")
    assert snapshot(copy) == before


def test_train_takes_over_a_stale_lock_and_says_so(run, copy, capsys):
    with open(os.path.join(copy, ".lock"), "w") as f:   # a dead run's lock file: nobody holds the flock
        f.write("pid 999999 on elsewhere, train.py, since 2026-01-01\n")
    assert train.main(run["argv"] + [f"--out_dir={copy}", "--init_from=resume", "--max_iters=3"]) == 0
    err = capsys.readouterr().err
    assert "took over the lock" in err and "pid 999999" in err
    assert not os.path.exists(os.path.join(copy, ".lock"))


def make_lock_file(kind, out, victim):
    """out/.lock made as `kind`; victim is a file outside out that must survive."""
    lock = os.path.join(out, ".lock")
    if kind == "symlink":
        os.symlink(victim, lock)
    elif kind == "dangling_symlink":      # O_CREAT through it would create victim + ".new"
        os.symlink(victim + ".new", lock)
    elif kind == "directory":
        os.mkdir(lock)
    elif kind == "fifo":
        os.mkfifo(lock)
    elif kind == "hardlink":              # the holder's text would overwrite victim's content
        os.link(victim, lock)


LOCK_FILES = [   # (what out_dir/.lock is, the one line)
    ("symlink", "is a symbolic link, not a regular file"),
    ("dangling_symlink", "is a symbolic link, not a regular file"),
    ("directory", "is not a regular file"),
    ("fifo", "is not a regular file"),
    ("hardlink", "has other hard links"),
]


@pytest.mark.parametrize("kind, needle", LOCK_FILES, ids=[k for k, _ in LOCK_FILES])
def test_train_refuses_a_lock_file_that_is_not_a_regular_file(run, copy, tmp_path, capsys, kind, needle):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    make_lock_file(kind, copy, str(victim))
    before, names = snapshot(copy), sorted(os.listdir(copy))
    capsys.readouterr()
    assert train.main(run["argv"] + [f"--out_dir={copy}", "--init_from=resume", "--max_iters=4"]) == 2
    one_error_line(capsys.readouterr().err, needle)
    assert victim.read_text() == "precious" and not os.path.exists(str(victim) + ".new")
    assert snapshot(copy) == before and sorted(os.listdir(copy)) == names


# ----------------------------------------------------------------------------- train.py: stops (exit 1, stderr)

def test_nonfinite_training_loss_stops_at_once_on_stderr(run, copy, capsys):
    """A blow-up between evals stops at the step it happens (the training loss is
    checked every step), with the message on stderr, not stdout."""
    before = snapshot(copy)
    rc = train.main(run["argv"] + [f"--out_dir={copy}", "--init_from=resume", "--max_iters=40",
                                   "--eval_interval=100", "--learning_rate=1e30", "--min_lr=1e30",
                                   "--warmup_iters=0", "--grad_clip=0.0"])
    out, err = capsys.readouterr()
    assert rc == 1 and "error" not in out
    one_error_line(err, "is nan at iter")
    assert "The last good checkpoint" in err
    assert snapshot(copy)["ckpt.pt"] == before["ckpt.pt"]


def test_nonfinite_checkpoint_refusal_stops_the_run(run, copy, capsys, monkeypatch):
    before = snapshot(copy)
    monkeypatch.setattr(C, "first_nonfinite", lambda obj, name: "model.lm_head.weight")
    rc = train.main(run["argv"] + [f"--out_dir={copy}", "--init_from=resume", "--max_iters=3"])
    out, err = capsys.readouterr()
    assert rc == 1
    one_error_line(err, "model.lm_head.weight is not finite")
    assert "stopping" in err and snapshot(copy)["ckpt.pt"] == before["ckpt.pt"]
    assert not [f for f in os.listdir(copy) if ".tmp" in f]


# ----------------------------------------------------------------------------- upcycle.py

@pytest.fixture(scope="module")
def dense(run, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dense"))
    argv = [a for a in run["argv"] if not a.startswith(("--moe_layers", "--n_experts", "--out_dir"))]
    assert train.main(argv + [f"--out_dir={out}", "--max_iters=1"]) == 0
    return out


UPCYCLE_BAD = [
    ("--expert_noise=nan", "--expert_noise=nan must be a finite number in [0, inf)"),
    ("--expert_noise=1e999", "--expert_noise=inf must be a finite number"),
    ("--router_init_std=nan", "--router_init_std=nan must be a finite number"),
    ("--capacity_factor=nan", "--capacity_factor=nan must be a finite number"),
    ("--capacity_factor=inf", "--capacity_factor=inf must be a finite number"),
    ("--eval_capacity_factor=-1", "--eval_capacity_factor=-1.0 must be a finite number in [0, inf)"),
    ("--gate_norm_lambda=0", "--gate_norm_lambda=0.0 must be a finite number in (0, inf)"),
    ("--granularity=0", "--granularity=0 must be >= 1"),
    (f"--n_experts={10**8}", "--n_experts=100000000 needs at least"),
]


@pytest.mark.parametrize("flag, needle", UPCYCLE_BAD, ids=[f for f, _ in UPCYCLE_BAD])
def test_upcycle_bad_float_exits_2_and_keeps_out_dir(dense, copy, capsys, flag, needle):
    before = snapshot(copy)
    try:
        rc = upcycle.main([f"--ckpt={dense}", f"--out_dir={copy}", "--n_experts=4", "--force", flag])
    except SystemExit as e:   # argparse's p.error
        rc = e.code
    assert rc == 2
    one_error_line(capsys.readouterr().err, needle)
    assert snapshot(copy) == before


def test_upcycle_refuses_a_locked_out_dir(dense, copy, capsys):
    before = snapshot(copy)
    with OutDirLock(copy, "train.py elsewhere"):
        rc = upcycle.main([f"--ckpt={dense}", f"--out_dir={copy}", "--n_experts=4", "--force"])
    assert rc == 2
    one_error_line(capsys.readouterr().err, "is in use by another run")
    assert snapshot(copy) == before


def test_upcycle_refuses_a_symlinked_lock_file(dense, tmp_path, capsys):
    victim, out = tmp_path / "victim.txt", tmp_path / "moe"
    victim.write_text("precious")
    out.mkdir()
    make_lock_file("symlink", str(out), str(victim))
    assert upcycle.main([f"--ckpt={dense}", f"--out_dir={out}", "--n_experts=4", "--verify=False"]) == 2
    one_error_line(capsys.readouterr().err, "is a symbolic link, not a regular file")
    assert victim.read_text() == "precious" and os.listdir(out) == [".lock"]


def test_upcycle_releases_its_lock(dense, tmp_path, capsys):
    out = str(tmp_path / "moe")
    assert upcycle.main([f"--ckpt={dense}", f"--out_dir={out}", "--n_experts=4", "--verify=False"]) == 0
    assert sorted(os.listdir(out)) == ["ckpt.pt"]


# ----------------------------------------------------------------------------- eval.py and sample.py

EVAL_BAD = [
    (ev.cli, ["--eval_capacity_factor=-1"], "--eval_capacity_factor=-1.0 must be a finite number in [0, inf)"),
    (ev.cli, ["--eval_capacity_factor=nan"], "--eval_capacity_factor=nan must be a finite number"),
    (sample.cli, ["--temperature=inf"], "--temperature=inf must be a finite number in (0, inf)"),
    (sample.cli, ["--temperature=nan"], "--temperature=nan must be a finite number"),
    (sample.cli, ["--temperature=0"], "--temperature=0.0 must be a finite number in (0, inf)"),
    (sample.cli, [f"--max_new_tokens={10**7}"], "--max_new_tokens=10000000 must be an integer in [0, 100000]"),
    (sample.cli, ["--temperature=1e-300"], "--temperature=1e-300 is below 0.001: logits / temperature would overflow"),
    (sample.cli, [f"--num_samples={10**9}"], "--num_samples=1000000000 must be an integer in [1, 1000]"),
    (sample.cli, ["--num_samples=1000", "--max_new_tokens=2000"], "is more than 1,000,000 tokens"),
    (sample.cli, ["--top_k=65"], "--top_k=65 is more than the model's vocab_size=64"),
    (sample.cli, [f"--top_k={2**40}"], f"--top_k={2**40} must be an integer in [1, {2**31 - 1}]"),
    (sample.cli, ["--seed=-1"], "--seed=-1 must be an integer in [0, 18446744073709551615]"),
    (sample.cli, [f"--seed={2**64}"], f"--seed={2**64} must be an integer in [0, 18446744073709551615]"),
    (ev.cli, [f"--batch_size={10**8}"], "GiB is available: use a smaller --batch_size"),
    (ev.cli, [f"--batches={10**9}"], "GiB is available: use a smaller --batch_size or fewer --batches"),
]


@pytest.mark.parametrize("cli, args, needle", EVAL_BAD, ids=[a[0] for _, a, _ in EVAL_BAD])
def test_eval_and_sample_bad_numbers(run, capsys, cli, args, needle):
    before = snapshot(run["out"])
    assert cli([f"--ckpt={run['out']}"] + args) == 2
    one_error_line(capsys.readouterr().err, needle)
    assert snapshot(run["out"]) == before


def test_sample_refuses_data_of_another_vocabulary(run, tmp_path, capsys):
    other = make_dataset(str(tmp_path / "other"), vocab=100)
    before = snapshot(run["out"])
    assert sample.cli([f"--ckpt={run['out']}", f"--data_dir={other}", "--max_new_tokens=2"]) == 2
    one_error_line(capsys.readouterr().err, f"the tokenizer of {other} has 100 tokens but the model 64")
    assert snapshot(run["out"]) == before


def test_sample_at_the_temperature_floor_is_finite(run):
    texts = sample.sample(run["out"], max_new_tokens=4, temperature=sample.MIN_TEMPERATURE, num_samples=2)
    assert len(texts) == 2 and all(texts)


def test_eval_json_writes_null_not_nan():
    res = {"val_loss": float("nan"), "layers": [{"x": np.float32(np.inf), "t": torch.tensor([1.0, float("-inf")])}]}
    text = json.dumps(ev.strict_json(res), allow_nan=False)
    back = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in {text}"))
    assert back == {"val_loss": None, "layers": [{"x": None, "t": [1.0, None]}]}


# ----------------------------------------------------------------------------- metrics.jsonl (class 5)

GOOD = '{"iter": 1, "split": "train", "loss": 2.5}\n'
MALFORMED = [
    ("[1, 2]", "a JSON list, not an object"),
    ('{"split": "train", "loss": 1.0}', "iter=None is not an int >= 0"),
    ('{"iter": "x", "split": "train"}', "iter='x' is not an int >= 0"),
    ('{"iter": -3, "split": "train"}', "iter=-3 is not an int >= 0"),
    ('{"iter": true, "split": "train"}', "iter=True is not an int >= 0"),
    ('{"iter": 2}', "split=None is not a string"),
    ('{"iter": 2, "split": "eval", "val_loss": "low"}', "val_loss='low' is not a number"),
    ('{"iter": 2, "split": "train", "loss": [1]}', "loss=[1] is not a number"),
    ("not json at all", "not valid JSON"),
    ('"a string"', "a JSON str, not an object"),
    ('{"iter": 2, "split": "train", "moe": "x"}', "moe='x' is not a list"),
    ('{"iter": 2, "split": "train", "moe": [1, 2]}', "moe is not a list of per-layer objects"),
    ('{"iter": 2, "split": "eval", "expert_similarity": 0.5}', "expert_similarity=0.5 is not a list"),
]


@pytest.mark.parametrize("line, needle", MALFORMED, ids=[l[:30] for l, _ in MALFORMED])
def test_malformed_metrics_line_is_skipped_and_counted(tmp_path, capsys, line, needle):
    path = tmp_path / "metrics.jsonl"
    path.write_text(GOOD + line + "\n" + GOOD.replace('"iter": 1', '"iter": 3'))
    recs = M.read_metrics(str(path))
    assert [r["iter"] for r in recs] == [1, 3]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "skipped 1 malformed line(s)" in err and f"line 2: {needle}" in err, err


def test_nan_losses_are_read_and_left_out_of_plots_with_a_note(tmp_path):
    recs = [{"iter": i, "tokens": i * 10, "split": "train", "loss": v, "lr": 1e-3}
            for i, v in enumerate([3.0, 2.5, float("nan"), float("inf")])]
    recs += [{"iter": 2, "tokens": 20, "split": "eval", "train_loss": 2.4, "val_loss": float("nan")}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))    # json writes NaN / Infinity
    assert len(M.read_metrics(str(path))) == 5
    paths, notes = plot.make_plots(str(tmp_path), out_dir=str(tmp_path / "plots"))
    assert any("left out 3 metrics.jsonl record(s) with a NaN/inf value" in n for n in notes), notes
    assert any(p.endswith("loss_curves.png") for p in paths)


def test_metrics_jsonl_that_is_a_directory(run, copy, capsys):
    shutil.move(os.path.join(copy, "metrics.jsonl"), os.path.join(copy, "m"))
    os.makedirs(os.path.join(copy, "metrics.jsonl"))
    ckpt = sha(os.path.join(copy, "ckpt.pt"))
    with pytest.raises(M.MetricsError, match="is a directory, not a metrics file"):
        M.read_metrics(os.path.join(copy, "metrics.jsonl"))
    assert train.main(run["argv"] + [f"--out_dir={copy}", "--init_from=resume", "--max_iters=3"]) == 2
    one_error_line(capsys.readouterr().err, "is a directory, not a metrics file")
    assert ev.cli([f"--ckpt={copy}", "--plots", "--batches=1", "--batch_size=2"]) == 2
    one_error_line(capsys.readouterr().err, "is a directory, not a metrics file")
    assert sha(os.path.join(copy, "ckpt.pt")) == ckpt


def test_resume_rewrite_of_metrics_on_a_full_disk(copy, monkeypatch):
    path = os.path.join(copy, "metrics.jsonl")
    before = sha(path)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(M.os, "replace", full)
    with pytest.raises(M.MetricsError) as e:
        M.trim_for_resume(path, 1)
    assert "disk full" in str(e.value) and "\n" not in str(e.value)
    assert sha(path) == before and not [f for f in os.listdir(copy) if ".tmp" in f]


def test_metrics_append_on_a_full_disk_is_one_line(tmp_path, monkeypatch):
    w = M.MetricsWriter(str(tmp_path / "metrics.jsonl"), append=True)
    w.write({"iter": 0, "split": "train"})

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(w.file, "write", full)
    with pytest.raises(M.MetricsError, match="disk full"):
        w.write({"iter": 1, "split": "train"})


# ----------------------------------------------------------------------------- class 8: Lory resume

def test_lory_resume_with_dense_warmup_logs_like_a_straight_run(run, tmp_path):
    common = TINY + [f"--data_dir={run['data']}", "--eval_interval=2", "--moe_layers=all", "--router=lory",
                     "--segment_len=8", "--dense_warmup_iters=2", "--lr_decay_iters=6"]
    straight, resumed = str(tmp_path / "s"), str(tmp_path / "r")
    assert train.main(common + [f"--out_dir={straight}", "--max_iters=6"]) == 0
    assert train.main(common + [f"--out_dir={resumed}", "--max_iters=4"]) == 0
    assert train.main(common + [f"--out_dir={resumed}", "--max_iters=6", "--init_from=resume"]) == 0
    evals = [[r for r in M.read_metrics(os.path.join(d, "metrics.jsonl")) if r["split"] == "eval"]
             for d in (straight, resumed)]
    assert [r["iter"] for r in evals[0]] == [r["iter"] for r in evals[1]] == [0, 2, 4, 6]
    for a, b in zip(*evals):
        assert a.get("similarity_to_dense") == b.get("similarity_to_dense"), a["iter"]
        assert a["val_loss"] == b["val_loss"]
    assert all("similarity_to_dense" in r for r in evals[1] if r["iter"] >= 2)


# ----------------------------------------------------------------------------- class 2: sizes that cannot fit

TOO_BIG = [f"--n_layer={10**9}", f"--n_embd={10**6}", f"--batch_size={10**9}", f"--block_size={10**9}",
           f"--eval_iters={10**9}", f"--n_experts={10**6}", f"--gradient_accumulation_steps={10**9}"]


@pytest.mark.parametrize("flag", TOO_BIG)
def test_train_refuses_a_run_that_cannot_fit_in_memory(run, tmp_path, capsys, flag):
    out = tmp_path / "big"
    assert train.main(run["argv"] + [f"--out_dir={out}", flag]) == 2
    one_error_line(capsys.readouterr().err, "this run needs at least")
    assert not out.exists()


def test_resume_of_a_checkpoint_too_big_for_memory(run, copy, capsys):
    ck = torch.load(os.path.join(copy, "ckpt.pt"), weights_only=True)
    ck["model_args"]["vocab_size"] = 10**9
    torch.save(ck, os.path.join(copy, "ckpt.pt"))
    before = snapshot(copy)
    assert train.main(run["argv"] + [f"--out_dir={copy}", "--init_from=resume", "--max_iters=3"]) == 2
    one_error_line(capsys.readouterr().err, "parameters and optimizer state")
    assert snapshot(copy) == before


def test_memory_estimate_is_a_lower_bound_of_the_real_model():
    """The parameter part counts at most the real model's parameters (a lower bound)."""
    for args in ({"n_layer": 2, "n_head": 2, "n_embd": 32, "vocab_size": 64},
                 {"n_layer": 3, "n_head": 4, "n_embd": 64, "vocab_size": 100, "moe_layers": "all", "n_experts": 4},
                 {"n_layer": 4, "n_head": 2, "n_embd": 32, "vocab_size": 64, "moe_layers": "every_other",
                  "tie_embeddings": False}):
        real = GPT(GPTConfig(**args)).num_params()
        _, parts = init_from.estimate_memory(args, {"batch_size": 1, "block_size": 8, "eval_iters": 1,
                                                  "gradient_accumulation_steps": 1})
        assert 0.8 * real <= parts["parameters and optimizer state"] / 16 <= real, (args, real)
