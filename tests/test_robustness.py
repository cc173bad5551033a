"""Robustness: one run per out_dir (outdir.py), checkpoint
fields validated on load, write errors and a full disk at every checkpoint write,
no checkpoint with a non-finite number, float settings finite and in range.

Each table row is a bad value or a damaged file and the one-line message it must
give; "nothing lost" means the previous checkpoint is byte-identical afterwards
and no temp file is left behind."""
import errno
import glob
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import checkpoint as C
import outdir
import train
from configurator import FLOAT_RANGES, first_float_problem, float_problem, parse_config
from helpers import ROOT, TINY, make_dataset
from outdir import LOCK_NAME, LockError, OutDirLock


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 1-step MoE run written by train.py (adaptive aux: every field filled)."""
    data = make_dataset(str(tmp_path_factory.mktemp("data")))
    out = str(tmp_path_factory.mktemp("run"))
    argv = TINY + [f"--data_dir={data}", f"--out_dir={out}", "--overwrite=True", "--max_iters=1",
                   "--eval_interval=1", "--moe_layers=all", "--n_experts=4", "--adaptive_aux=True"]
    assert train.main(argv) == 0
    return {"data": data, "out": out, "argv": argv, "ckpt": torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)}


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def one_line(e):
    msg = str(e)
    assert "\n" not in msg and msg, msg
    return msg


def leftovers(d):
    return [f for f in os.listdir(d) if ".tmp" in f]


# ----------------------------------------------------------------------------- class 3: checkpoint fields

GOOD_RNG = torch.get_rng_state()


def with_field(ckpt, dotted, value):
    """A copy of ckpt with ckpt[a][b] = value for dotted 'a.b' (value DELETE removes it)."""
    out = dict(ckpt)
    keys = dotted.split(".")
    d = out
    for k in keys[:-1]:
        d[k] = dict(d[k])
        d = d[k]
    d[keys[-1]] = value
    return out


DAMAGED = [   # (field, bad value, text the one-line error must contain)
    ("model_args.n_layers", 2, "unknown key 'n_layers'"),
    ("model_args.n_layer", "2", "model_args.n_layer='2' must be int"),
    ("model_args.n_layer", 2.0, "model_args.n_layer=2.0 must be int"),
    ("model_args.tie_embeddings", 1, "model_args.tie_embeddings=1 must be bool"),
    ("model_args.rope_theta", float("inf"), "model_args.rope_theta=inf must be a finite number"),
    ("model_args.n_head", 3, "model_args does not describe a valid model: n_embd=32 must be divisible by n_head=3"),
    ("model_args.gate_norm_lambda", "x", "model_args.gate_norm_lambda='x'"),
    ("model", {"tok_emb.weight": "x"}, "field model['tok_emb.weight']='x' must be a tensor"),
    ("iter_num", "x", "iter_num='x' must be an int >= 0"),
    ("iter_num", None, "iter_num=None must be an int >= 0"),
    ("iter_num", -5, "iter_num=-5 must be an int >= 0"),
    ("iter_num", True, "iter_num=True must be an int >= 0"),
    ("best_val_loss", float("nan"), "best_val_loss=nan must be a finite number"),
    ("best_val_loss", "x", "best_val_loss='x'"),
    ("optimizer", "x", "optimizer='x' must be None or an optimizer state_dict"),
    ("optimizer", {"state": {}, "param_groups": ["x"]}, "optimizer.param_groups[0]='x'"),
    ("rng", "x", "rng='x' must be None or a dict"),
    ("rng", {"torch": GOOD_RNG, "numpy": 1}, "must be None or a dict with keys torch, data, cuda"),
    ("rng.torch", torch.zeros(5056, dtype=torch.uint8), "rng.torch=tensor(uint8, shape (5056,)) is not a valid "
                                                        "generator state: Invalid mt19937 state"),
    ("rng.data", torch.zeros(10, dtype=torch.uint8), "rng.data=tensor(uint8, shape (10,)) is not a valid generator"),
    ("rng.torch", GOOD_RNG.float(), "rng.torch=tensor(float32, shape (5056,)) must be a uint8 generator state"),
    ("rng.cuda", "x", "rng.cuda='x' must be None or a uint8 CUDA generator state"),
    ("config", "x", "config='x' must be None or train.py's config dict"),
    ("config.data_dir", 5, "config.data_dir=5 must be a string"),
    ("config.learning_rate", float("inf"), "config.learning_rate=inf must be finite"),
    ("config.moe_layers", [0, 1], "config['moe_layers']=[0, 1] must be a number, string, bool or None"),
    ("aux_coef", "x", "aux_coef='x' must be None or {'alpha'"),
    ("aux_coef.alpha", [0.01, "x"], "aux_coef.alpha=[0.01, 'x'] must be a list of finite numbers"),
    ("aux_coef.beta", float("nan"), "aux_coef.beta=nan must be a finite number"),
    ("upcycled_from", "x", "upcycled_from='x' must be None or a dict"),
    ("upcycled_from", {"path": 5}, "upcycled_from.path=5 must be a string or None"),
    ("upcycled_from", {"path": None, "options": "x"}, "upcycled_from.options='x' must be a dict"),
    ("evil", 1, "unknown field(s) evil"),
]


def describe(value):
    """A test id that does not depend on tensor contents (the rng state differs between
    pytest-xdist workers, and every worker must collect the same ids)."""
    if torch.is_tensor(value):
        return f"tensor({str(value.dtype).replace('torch.', '')}, {tuple(value.shape)})"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {describe(v)}" for k, v in value.items()) + "}"
    return repr(value)


@pytest.mark.parametrize("field, value, needle", DAMAGED, ids=[f"{f}={describe(v)}"[:60] for f, v, _ in DAMAGED])
def test_damaged_field_is_one_line_error_naming_file_and_field(run, tmp_path, field, value, needle):
    path = str(tmp_path / "ckpt.pt")
    torch.save(with_field(run["ckpt"], field, value), path)
    with pytest.raises(C.CheckpointError) as e:
        C.load_checkpoint(path)
    msg = one_line(e.value)
    assert msg.startswith(path + ": ") and needle in msg, msg


def test_empty_file_is_one_line_error(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"")
    with pytest.raises(C.CheckpointError, match="is empty") as e:
        C.load_checkpoint(str(tmp_path))
    assert str(tmp_path / "ckpt.pt") in one_line(e.value)


def test_every_field_train_writes_validates(run):
    """No false alarm: the checkpoint train.py wrote passes, and so does the
    offline-upcycle shape (optimizer, rng, aux_coef None; upcycled_from filled)."""
    C.validate_checkpoint(run["ckpt"], "x")
    C.validate_checkpoint({**run["ckpt"], "optimizer": None, "rng": None, "aux_coef": None, "config": None,
                           "upcycled_from": {"path": None, "sha256": None, "method": "dense warm-up",
                                             "options": {}, "iter": 3}}, "x")


@pytest.mark.parametrize("field, value, needle", [
    ("iter_num", -5, "iter_num=-5"),              # used to train from iter -5 and exit 0
    ("rng", "x", "rng='x'"),                      # used to exit 0
    ("config", "x", "config='x'"),                # used to exit 0 on resume
])
def test_resume_from_damaged_checkpoint_exits_2_and_keeps_files(run, tmp_path, capsys, field, value, needle):
    out = tmp_path / "o"
    shutil.copytree(run["out"], out)
    torch.save(with_field(run["ckpt"], field, value), out / "ckpt.pt")
    before = {f: sha(out / f) for f in ("ckpt.pt", "metrics.jsonl")}
    capsys.readouterr()
    argv = [a for a in run["argv"] if not a.startswith(("--out_dir", "--overwrite"))]
    assert train.main(argv + [f"--out_dir={out}", "--init_from=resume", "--max_iters=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and needle in err and "ckpt.pt" in err, err
    assert {f: sha(out / f) for f in before} == before


# ----------------------------------------------------------------------------- non-finite guard

NONFINITE = [   # (field, bad value, name the refusal must give)
    ("model.tok_emb.weight", "nan", "model.tok_emb.weight"),
    ("model.lm_head.weight", "inf", "model.lm_head.weight"),
    ("optimizer", "nan-moment", "optimizer.state.0.exp_avg"),
    ("model_args.rope_theta", float("inf"), "model_args.rope_theta"),
    ("config.expert_bias_gamma", float("inf"), "config.expert_bias_gamma"),
    ("aux_coef.alpha", [0.01, float("nan")], "aux_coef.alpha.1"),
]


def poisoned(ckpt, field, value):
    if value in ("nan", "inf"):
        name = field.split(".", 1)[1]
        t = ckpt["model"][name].clone()
        t.view(-1)[3] = float(value)
        return with_field(ckpt, "model", {**ckpt["model"], name: t})
    if value == "nan-moment":
        opt = {**ckpt["optimizer"], "state": dict(ckpt["optimizer"]["state"])}
        opt["state"][0] = {**opt["state"][0], "exp_avg": torch.full_like(opt["state"][0]["exp_avg"], float("nan"))}
        return {**ckpt, "optimizer": opt}
    return with_field(ckpt, field, value)


@pytest.mark.parametrize("field, value, name", NONFINITE, ids=[n for _, _, n in NONFINITE])
def test_nonfinite_checkpoint_is_never_written(run, tmp_path, field, value, name):
    ckpt = {k: v for k, v in run["ckpt"].items() if k != "format"}
    C.save_checkpoint(ckpt, str(tmp_path))
    before = sha(tmp_path / "ckpt.pt")
    with pytest.raises(C.CheckpointError) as e:
        C.save_checkpoint(poisoned(ckpt, field, value), str(tmp_path))
    msg = one_line(e.value)
    assert f"refusing to write {tmp_path / 'ckpt.pt'}: {name} is not finite" in msg, msg
    assert sha(tmp_path / "ckpt.pt") == before and not leftovers(tmp_path)


# ----------------------------------------------------------------------------- class 4: write errors, disk full

class FailingFile:
    """A real file whose writes fail with `err` once `room` bytes are written
    (ENOSPC: the disk filled up mid-checkpoint)."""

    def __init__(self, f, room, err):
        self.f, self.room, self.err = f, room, err

    def write(self, b):
        if len(b) > self.room:
            raise OSError(self.err, os.strerror(self.err))
        self.room -= len(b)
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


WRITE_FAULTS = [   # (where it fails, errno, bytes that fit, the one-line message)
    ("write", errno.ENOSPC, 0, "disk full: the filesystem holding"),
    ("write", errno.ENOSPC, 100, "disk full: the filesystem holding"),    # torch reports a RuntimeError here
    ("write", errno.ENOSPC, 50_000, "disk full: the filesystem holding"),
    ("write", errno.EDQUOT, 50_000, "disk full: the filesystem holding"),
    ("write", errno.EIO, 50_000, "could not write"),
    ("fsync", errno.EIO, None, "could not write"),
    ("fsync", errno.ENOSPC, None, "disk full"),
    ("rename", errno.EACCES, None, "could not write"),
]


@pytest.mark.parametrize("where, err, room, needle", WRITE_FAULTS,
                         ids=[f"{w}-{errno.errorcode[e]}-{r}" for w, e, r, _ in WRITE_FAULTS])
def test_write_error_is_one_line_and_keeps_the_last_checkpoint(run, tmp_path, monkeypatch, where, err, room, needle):
    ckpt = {k: v for k, v in run["ckpt"].items() if k != "format"}
    C.save_checkpoint(ckpt, str(tmp_path))
    before = sha(tmp_path / "ckpt.pt")

    def fail(*a, **k):
        raise OSError(err, os.strerror(err))
    if where == "write":
        monkeypatch.setattr(outdir, "open", lambda p, mode: FailingFile(open(p, mode), room, err), raising=False)
    else:
        monkeypatch.setattr(outdir.os, {"fsync": "fsync", "rename": "replace"}[where], fail)
    with pytest.raises(C.CheckpointError) as e:
        C.save_checkpoint(ckpt, str(tmp_path))
    monkeypatch.undo()
    msg = one_line(e.value)
    assert needle in msg and str(tmp_path / "ckpt.pt") in msg and "ckpt.pt was left as it was" in msg, msg
    assert sha(tmp_path / "ckpt.pt") == before and not leftovers(tmp_path)


def test_write_error_with_no_previous_checkpoint_leaves_nothing(run, tmp_path, monkeypatch):
    monkeypatch.setattr(outdir, "open", lambda p, mode: FailingFile(open(p, mode), 10, errno.ENOSPC), raising=False)
    with pytest.raises(C.CheckpointError, match="disk full"):
        C.save_checkpoint({k: v for k, v in run["ckpt"].items() if k != "format"}, str(tmp_path / "new"))
    assert os.listdir(tmp_path / "new") == []


def test_out_dir_that_is_a_file_is_one_line_error(run, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(C.CheckpointError, match="could not write") as e:
        C.save_checkpoint({"model_args": {}, "model": {}}, str(tmp_path / "f"))
    one_line(e.value)
    assert (tmp_path / "f").read_text() == "x"


TMPFS_SCRIPT = textwrap.dedent("""
    import os, subprocess, sys, torch
    sys.path.insert(0, sys.argv[2])
    import checkpoint as C
    d = sys.argv[1]
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", d], check=True)
    C.save_checkpoint({"model_args": {}, "model": {"w": torch.zeros(20_000)}}, d)       # 80 kB: fits
    before = open(os.path.join(d, "ckpt.pt"), "rb").read()
    try:
        C.save_checkpoint({"model_args": {}, "model": {"w": torch.zeros(100_000)}}, d)  # 400 kB: does not
    except C.CheckpointError as e:
        print("ERROR", e)
    print("KEPT", open(os.path.join(d, "ckpt.pt"), "rb").read() == before, "FILES", sorted(os.listdir(d)))
""")


def test_real_full_disk_on_a_small_tmpfs(tmp_path):
    """The same on a real 256 kB filesystem, where unprivileged user namespaces
    allow mounting one (skipped elsewhere)."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("unshare -rm (an unprivileged mount namespace) is not available here")
    d = tmp_path / "small"
    d.mkdir()
    p = subprocess.run(["unshare", "-rm", sys.executable, "-c", TMPFS_SCRIPT, str(d), ROOT],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if "mount" in p.stderr and p.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip().splitlines()[-1]}")
    assert p.returncode == 0, p.stderr
    assert f"ERROR disk full: the filesystem holding {d}" in p.stdout, p.stdout
    assert "KEPT True FILES ['ckpt.pt']" in p.stdout, p.stdout


def save_many(out_dir, n=25):
    """A forked writer (cheaper than a new interpreter importing torch): n saves,
    exit status 1 on any error."""
    try:
        for i in range(n):
            C.save_checkpoint({"model_args": {}, "model": {"w": torch.full((20_000,), float(i))}, "iter_num": i}, out_dir)
    except BaseException as e:
        print(f"writer {os.getpid()}: {type(e).__name__}: {e}", file=sys.stderr)
        os._exit(1)
    os._exit(0)


def test_two_writers_on_one_out_dir_never_break_each_others_save(tmp_path):
    """With one shared ckpt.pt.tmp, one writer renamed the
    other's temp file away ('No such file or directory: ckpt.pt.tmp -> ckpt.pt')."""
    pids = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:
            save_many(str(tmp_path))
        pids.append(pid)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    assert codes == [0, 0]
    assert C.load_checkpoint(str(tmp_path))["iter_num"] == 24 and os.listdir(tmp_path) == ["ckpt.pt"]


def test_temp_file_is_per_process(tmp_path):
    seen = []
    outdir.write_atomic(str(tmp_path / "x"), lambda f: seen.append(f.name) or f.write(b"1"))
    assert seen == [f"{tmp_path / 'x'}.tmp.{os.getpid()}"] and os.listdir(tmp_path) == ["x"]


# ----------------------------------------------------------------------------- class 0: one run per out_dir

HOLDER_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[2])
    from outdir import OutDirLock
    lock = OutDirLock(sys.argv[1], "holder").acquire()
    print("locked", flush=True)
    time.sleep(60)
""")


def test_second_run_is_refused_and_a_dead_runs_lock_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER_SCRIPT, str(tmp_path), ROOT], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LockError) as e:
            OutDirLock(str(tmp_path), "second").acquire()
        msg = one_line(e.value)
        assert f"out_dir {tmp_path} is in use by another run (pid {holder.pid} on " in msg and "holder" in msg, msg
    finally:
        holder.send_signal(signal.SIGKILL)     # dies without releasing: its lock file stays behind
        holder.wait()
    assert os.path.exists(tmp_path / LOCK_NAME)
    with OutDirLock(str(tmp_path), "third") as lock:
        assert lock.stale.startswith(f"pid {holder.pid} on ") and "holder" in lock.stale
        assert f"pid {os.getpid()} on " in open(tmp_path / LOCK_NAME).read()
    assert not os.path.exists(tmp_path / LOCK_NAME)


def test_taking_over_a_dead_runs_lock_removes_its_temp_files(tmp_path):
    """kill -9 during a save leaves ckpt.pt.tmp.<pid>: the next holder of the lock
    removes the dead holder's temp files, and no other file."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER_SCRIPT, str(tmp_path), ROOT], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        dead = [f"ckpt.pt.tmp.{holder.pid}", f"metrics.jsonl.tmp.{holder.pid}"]
        kept = ["ckpt.pt", f"ckpt.pt.tmp.{holder.pid}0", f"ckpt.pt.tmp.{holder.pid + 1}"]
        for name in dead + kept:
            (tmp_path / name).write_bytes(b"x")
        (tmp_path / f"sub.tmp.{holder.pid}").mkdir()          # a directory is never removed
        with pytest.raises(LockError):                        # the holder is alive: nothing is touched
            OutDirLock(str(tmp_path), "early").acquire()
        assert sorted(os.listdir(tmp_path)) == sorted(dead + kept + [f"sub.tmp.{holder.pid}", LOCK_NAME])
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with OutDirLock(str(tmp_path), "next") as lock:
        assert lock.removed == sorted(dead)
        assert sorted(os.listdir(tmp_path)) == sorted(kept + [f"sub.tmp.{holder.pid}", LOCK_NAME])


def test_lock_in_the_same_process_and_release(tmp_path):
    with OutDirLock(str(tmp_path), "first") as first:
        assert first.stale is None
        with pytest.raises(LockError, match=f"pid {os.getpid()} on .*first"):
            OutDirLock(str(tmp_path), "second").acquire()
    with OutDirLock(str(tmp_path)):   # released: free again
        pass
    assert os.listdir(tmp_path) == []


def test_lock_removes_only_an_out_dir_it_created_that_stayed_empty(tmp_path):
    with OutDirLock(str(tmp_path / "a" / "b")):
        pass
    assert os.listdir(tmp_path / "a") == []          # b created and left empty: removed; a (makedirs) stays
    with OutDirLock(str(tmp_path / "c")):
        (tmp_path / "c" / "ckpt.pt").write_bytes(b"x")
    assert os.listdir(tmp_path / "c") == ["ckpt.pt"]


@pytest.mark.parametrize("setup, needle", [
    ("file", "is a file, not a directory"),
    ("garbage_lock", None),      # a lock file nobody holds is taken over, whatever it says
])
def test_lock_bad_out_dirs(tmp_path, setup, needle):
    target = tmp_path / "out"
    if setup == "file":
        target.write_text("keep me")
        with pytest.raises(LockError, match=needle) as e:
            OutDirLock(str(target)).acquire()
        one_line(e.value)
        assert target.read_text() == "keep me"
    else:
        target.mkdir()
        (target / LOCK_NAME).write_bytes(b"\xff garbage\nsecond line")
        with OutDirLock(str(target)) as lock:
            assert "garbage second line" in lock.stale


# ----------------------------------------------------------------------------- class 1: float settings

FLOATS = [   # (name, value, kind, expected one line)
    ("rope_theta", 1e999, None, "rope_theta=inf must be a finite number in (1, inf)"),
    ("adaptive_aux_xi", float("inf"), None, "adaptive_aux_xi=inf must be a finite number in [0, inf)"),
    ("expert_bias_gamma", float("inf"), None, "expert_bias_gamma=inf must be a finite number in [0, inf)"),
    ("upcycle_expert_noise", float("inf"), None, "upcycle_expert_noise=inf must be a finite number in [0, inf)"),
    ("capacity_factor", float("inf"), None, "capacity_factor=inf must be a finite number in [0, inf)"),
    ("capacity_factor", float("nan"), None, "capacity_factor=nan must be a finite number in [0, inf)"),
    ("capacity_factor", -0.5, None, "capacity_factor=-0.5 must be a finite number in [0, inf)"),
    ("--expert_noise", float("nan"), "upcycle_expert_noise", "--expert_noise=nan must be a finite number in [0, inf)"),
    ("--router_init_std", float("nan"), "router_init_std", "--router_init_std=nan must be a finite number in [0, inf)"),
    ("--eval_capacity_factor", -1.0, None, "--eval_capacity_factor=-1.0 must be a finite number in [0, inf)"),
    ("--temperature", float("inf"), None, "--temperature=inf must be a finite number in (0, inf)"),
    ("--temperature", 0.0, None, "--temperature=0.0 must be a finite number in (0, inf)"),
    ("dropout", float("nan"), None, "dropout=nan must be a finite number in [0, 1)"),
    ("dropout", 1.0, None, "dropout=1.0 must be a finite number in [0, 1)"),
    ("beta2", 1.0, None, "beta2=1.0 must be a finite number in [0, 1)"),
    ("learning_rate", 0.0, None, "learning_rate=0.0 must be a finite number in (0, inf)"),
    ("gate_norm_lambda", "x", None, "gate_norm_lambda='x' must be a number in (0, inf)"),
    ("grad_clip", True, None, "grad_clip=True must be a number in [0, inf)"),
]


@pytest.mark.parametrize("name, value, kind, expected", FLOATS, ids=[f"{n}={v!r}" for n, v, _, _ in FLOATS])
def test_float_setting_out_of_range(name, value, kind, expected):
    assert float_problem(name, value, kind) == expected


def test_every_default_and_config_file_passes_the_float_ranges():
    assert first_float_problem(train.DEFAULTS) is None
    assert all(k in train.DEFAULTS or k in ("norm_eps", "temperature") for k in FLOAT_RANGES)
    for f in sorted(glob.glob(os.path.join(ROOT, "config", "**", "*.py"), recursive=True)):
        assert first_float_problem(parse_config([f], train.DEFAULTS)) is None, f
    assert float_problem("gate_norm_lambda", None) is None and float_problem("capacity_factor", 0) is None
    assert first_float_problem({**train.DEFAULTS, "z_loss_coef": -1.0}) == "z_loss_coef=-1.0 must be a finite number in [0, inf)"


def test_interrupted_write_removes_its_temp_file(tmp_path):
    (tmp_path / "x").write_bytes(b"old")

    def interrupted(f):
        f.write(b"half")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        outdir.write_atomic(str(tmp_path / "x"), interrupted)
    assert os.listdir(tmp_path) == ["x"] and (tmp_path / "x").read_bytes() == b"old"
