"""train.py: config errors, training lowers the loss, checkpoints, exact resume,
corrupt checkpoints, NaN stop, and 2-process DDP (gloo) equal to 1 process."""
import hashlib
import os

import pytest
import torch

from helpers import TINY, make_dataset, read_jsonl, run_train
import checkpoint  # noqa: E402
import train  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
import configurator  # noqa: E402
import parallel  # noqa: E402
from configurator import ConfigError  # noqa: E402


def parse_config(argv):
    return configurator.parse_config(argv, train.DEFAULTS)


def check_run_config(cfg):
    return configurator.check_run_config(cfg, train.DEFAULTS)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("data")))


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def state(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)


# ---------------------------------------------------------------- configuration

def test_parse_config_overrides_and_types(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("n_layer = 3\nlearning_rate = 1\nrouter = 'sigmoid'\n")
    cfg = parse_config([str(f), "--n_embd=64", "--gate_norm_lambda=2", "--compile=False"])
    assert cfg["n_layer"] == 3 and cfg["n_embd"] == 64 and cfg["router"] == "sigmoid"
    assert cfg["learning_rate"] == 1.0 and isinstance(cfg["learning_rate"], float)   # int -> float is fine
    assert cfg["gate_norm_lambda"] == 2.0 and cfg["compile"] is False


@pytest.mark.parametrize("argv, needle", [
    (["--n_layers=3"], "unknown config key 'n_layers'"),
    (["--n_layer=3.5"], "'n_layer' expects int"),
    (["--compile=1"], "'compile' expects bool"),
    (["--gate_norm_lambda=abc"], "expects a number or None"),
    (["--max_iters"], "must look like --key=value"),
    (["config/does_not_exist.py"], "not found"),
])
def test_parse_config_errors(argv, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        parse_config(argv)


def test_string_keys_take_the_text_as_is(tmp_path):
    # --moe_layers=0 or 1,3 would otherwise be parsed as a Python int / tuple
    cfg = parse_config(["--moe_layers=0", "--out_dir=out/1", "--device=cpu"])
    assert cfg["moe_layers"] == "0" and cfg["out_dir"] == "out/1"
    assert parse_config(["--moe_layers=1,3"])["moe_layers"] == "1,3"
    f = tmp_path / "c.py"
    f.write_text("router = 3\n")                    # a config file is still type-checked
    with pytest.raises(ConfigError, match="'router' expects str"):
        parse_config([str(f)])


@pytest.mark.parametrize("argv, needle", [
    (["--batch_size=0"], "batch_size=0 must be >= 1"),
    (["--eval_interval=0"], "eval_interval=0 must be >= 1"),
    (["--gradient_accumulation_steps=0"], "gradient_accumulation_steps=0 must be >= 1"),
    (["--max_iters=-5"], "max_iters=-5 must be >= 0"),
    (["--learning_rate=-1"], "learning_rate=-1.0 must be > 0"),
    (["--beta1=2.0"], "beta1=2.0 must be in"),
    (["--aux_loss=bogus"], "aux_loss='bogus' must be one of"),
    (["--device=tpu"], "device='tpu' is not"),
    (["--save_dtype=int8"], "save_dtype='int8' must be"),
])
def test_run_config_errors(argv, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        check_run_config(parse_config(argv))


def test_unknown_key_exit_status_and_suggestion(tmp_path):
    p = run_train(["--n_layers=3", f"--out_dir={tmp_path}/o"], check=False)
    assert p.returncode == 2
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "n_layers" in lines[0] and "n_layer" in lines[0].split("mean")[-1]


def test_bad_moe_shape_is_one_line_error(data_dir, tmp_path):
    p = run_train(TINY + [f"--data_dir={data_dir}", f"--out_dir={tmp_path}/o", "--moe_layers=all",
                          "--n_experts=2", "--top_k=3"], check=False)
    assert p.returncode == 2 and "top_k=3" in p.stderr and "Traceback" not in p.stderr


def test_missing_data_is_clear_error(tmp_path):
    p = run_train(TINY + [f"--data_dir={tmp_path}/nothing", f"--out_dir={tmp_path}/o"], check=False)
    assert p.returncode == 2 and "prepare.py" in p.stderr and "Traceback" not in p.stderr


# ---------------------------------------------------------------- training

def test_training_lowers_loss_and_writes_metrics(data_dir, tmp_path):
    out = str(tmp_path / "dense")
    train_here(TINY + [f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=30", "--eval_interval=10"])
    recs = read_jsonl(os.path.join(out, "metrics.jsonl"))
    evals = [r for r in recs if r["split"] == "eval"]
    trains = [r for r in recs if r["split"] == "train"]
    assert len(trains) == 30 and [r["iter"] for r in evals] == [0, 10, 20, 30]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3
    assert {"loss", "lr", "ms_per_iter", "tok_per_s", "tokens"} <= set(trains[0])
    ck = state(out)
    assert ck["iter_num"] == 30 and ck["optimizer"] is not None and ck["model_args"]["n_layer"] == 2


def test_moe_training_logs_router_statistics(data_dir, tmp_path):
    out = str(tmp_path / "moe")
    train_here(TINY + [f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=6", "--eval_interval=3",
                      "--moe_layers=all", "--n_experts=4", "--top_k=2", "--capacity_factor=1.0",
                      "--adaptive_aux=True"])
    recs = read_jsonl(os.path.join(out, "metrics.jsonl"))
    tr = [r for r in recs if r["split"] == "train"][-1]
    assert len(tr["moe"]) == 2 and len(tr["alpha"]) == 2
    layer = tr["moe"][0]
    for k in ("tokens_per_expert", "drop_rate", "gate_entropy", "max1_max2", "max2_max3", "load_cv",
              "logit_abs", "loss_switch", "loss_z"):
        assert k in layer, k
    assert len(layer["tokens_per_expert"]) == 4
    # capacity 1.0: every expert takes at most C = ceil(2*128/4) = 64 of the 2*128 assignments
    assert max(layer["tokens_per_expert"]) <= 64 + 1e-6
    ev = [r for r in recs if r["split"] == "eval"][-1]
    assert len(ev["domain_usage"]) == 2 and len(ev["domain_usage"][0]) == 3    # layers x domains x experts
    assert abs(sum(ev["domain_usage"][0][0]) - 1) < 1e-5


# ---------------------------------------------------------------- checkpoints

# the MoE run logs every 3 steps with checkpoints every 4: a log window closes at every
# checkpoint too, so no window straddles the resume and the records equal the straight run's
@pytest.mark.parametrize("extra", [[], ["--moe_layers=all", "--n_experts=4", "--router=sigmoid",
                                        "--capacity_factor=1.0", "--adaptive_aux=True", "--router_noise=True",
                                        "--log_interval=3"]])
def test_kill_and_resume_is_exact(data_dir, tmp_path, extra):
    common = TINY + [f"--data_dir={data_dir}", "--eval_interval=4", "--lr_decay_iters=8", "--dropout=0.1"] + extra
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train_here(common + [f"--out_dir={full}", "--max_iters=8"])
    train_here(common + [f"--out_dir={part}", "--max_iters=4"])        # "killed" after its iter-4 checkpoint
    train_here(common + [f"--out_dir={part}", "--max_iters=8", "--init_from=resume"])
    a, b = state(full), state(part)
    assert a["iter_num"] == b["iter_num"] == 8
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    la = [r for r in read_jsonl(os.path.join(full, "metrics.jsonl")) if r["split"] == "train"]
    lb = [r for r in read_jsonl(os.path.join(part, "metrics.jsonl")) if r["split"] == "train"]
    assert [r["iter"] for r in la] == [r["iter"] for r in lb] == ([3, 4, 6, 8] if extra else list(range(1, 9)))
    ea = [r for r in read_jsonl(os.path.join(full, "metrics.jsonl")) if r["split"] == "eval"]
    eb = [r for r in read_jsonl(os.path.join(part, "metrics.jsonl")) if r["split"] == "eval"]
    assert [r["iter"] for r in eb] == [0, 4, 8]                          # the resumed iter 4 once
    assert [r["val_loss"] for r in ea] == [r["val_loss"] for r in eb]
    assert [(r["loss"], r.get("moe")) for r in la] == [(r["loss"], r.get("moe")) for r in lb]
    if extra:
        assert a["aux_coef"]["alpha"] == b["aux_coef"]["alpha"]


def test_float16_loss_scale_is_saved_and_restored(tmp_path):
    """A float16 run's checkpoint keeps its GradScaler (scale and growth tracker), and
    resume loads it: a fresh scaler would restart at 65536 and skip different steps.
    (float16 trains on CUDA only; the scaler itself runs here on the CPU.)"""
    from types import SimpleNamespace

    def run_state(scaler):
        torch.manual_seed(0)
        m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=32, block_size=8))
        return train.RunState(m, m, torch.optim.AdamW(m.parameters()), scaler, train.new_aux_coef(m, train.DEFAULTS),
                              torch.Generator().manual_seed(0))
    st = run_state(torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2))
    x = torch.randint(0, 32, (2, 8))
    for overflow in (False, False, True, False):   # the scale grows, backs off, counts again
        st.scaler.scale(st.raw_model(x, x)[1]).backward()
        if overflow:
            next(st.raw_model.parameters()).grad.fill_(float("inf"))
        st.scaler.step(st.optimizer)
        st.scaler.update()
        st.optimizer.zero_grad()
    want = st.scaler.state_dict()
    assert (want["scale"], want["_growth_tracker"]) == (1024.0, 1)
    env, one_process = SimpleNamespace(device_type="cpu"), parallel.Dist(False, 0, 0, 1, "cpu")
    train.save_checkpoint(st, dict(train.DEFAULTS, out_dir=str(tmp_path)), env, one_process)
    resumed = run_state(torch.amp.GradScaler("cpu", growth_interval=2))
    train.restore_training_state(checkpoint.load_checkpoint(str(tmp_path)), resumed, "cpu", one_process)
    assert resumed.scaler.state_dict() == want
    bad = {**torch.load(tmp_path / "ckpt.pt", weights_only=True), "scaler": {"scale": float("nan")}}
    with pytest.raises(checkpoint.CheckpointError, match="field scaler"):
        checkpoint.validate_checkpoint(bad, "ckpt.pt")


def train_here(argv, capsys=None):
    """train.py's main in this process (a subprocess spends seconds importing torch);
    returns what it printed when capsys is given."""
    if capsys is not None:
        capsys.readouterr()
    assert train.main(argv) == 0
    return capsys.readouterr().out if capsys is not None else None


def test_save_dtype_writes_rounded_weights_that_resume_and_export(data_dir, tmp_path):
    """save_dtype='bfloat16' saves the fp32 masters rounded to bf16 (the moments stay fp32)
    and records the dtype; resume trains on from the rounded weights and export keeps bf16."""
    import convert
    common = TINY + [f"--data_dir={data_dir}", "--eval_interval=2", "--moe_layers=all", "--n_experts=4", "--top_k=2"]
    train_here(common + [f"--out_dir={tmp_path}/f", "--max_iters=2"])
    train_here(common + [f"--out_dir={tmp_path}/b", "--max_iters=2", "--save_dtype=bfloat16"])
    f, b = state(f"{tmp_path}/f"), state(f"{tmp_path}/b")
    assert (f["dtype"], b["dtype"]) == ("float32", "bfloat16")
    for k, v in f["model"].items():
        assert b["model"][k].dtype == torch.bfloat16 and torch.equal(b["model"][k], v.to(torch.bfloat16)), k
    assert all(s["exp_avg"].dtype == torch.float32 for s in b["optimizer"]["state"].values())
    train_here(common + [f"--out_dir={tmp_path}/b", "--max_iters=4", "--init_from=resume", "--save_dtype=bfloat16"])
    assert state(f"{tmp_path}/b")["iter_num"] == 4
    assert convert.export_hf(f"{tmp_path}/b", f"{tmp_path}/hf") == "mixtral"
    assert '"torch_dtype": "bfloat16"' in open(f"{tmp_path}/hf/config.json").read()


def test_resume_applies_this_runs_optimizer_settings(data_dir, tmp_path):
    """A resumed run trains with the weight decay, betas and Skywork settings on its command
    line (the checkpoint brings the Adam moments and the alphas only), which its
    checkpoint's config records."""
    common = TINY + [f"--data_dir={data_dir}", f"--out_dir={tmp_path}/r", "--eval_interval=2", "--moe_layers=all",
                     "--n_experts=4", "--top_k=2", "--adaptive_aux=True"]
    train_here(common + ["--max_iters=2"])
    alphas = state(f"{tmp_path}/r")["aux_coef"]["alpha"]
    train_here(common + ["--max_iters=2", "--init_from=resume", "--weight_decay=0.5", "--beta2=0.5",
                        "--adaptive_aux_xi=1.0", "--adaptive_aux_max=0.05"])
    ck = state(f"{tmp_path}/r")
    assert [(g["weight_decay"], tuple(g["betas"])) for g in ck["optimizer"]["param_groups"]] == \
        [(0.5, (0.9, 0.5)), (0.0, (0.9, 0.5))]
    assert (ck["aux_coef"]["xi"], ck["aux_coef"]["alpha_max"], ck["aux_coef"]["alpha"]) == (1.0, 0.05, alphas)
    assert (ck["config"]["weight_decay"], ck["config"]["beta2"]) == (0.5, 0.5)


def test_new_run_never_replaces_an_existing_checkpoint(data_dir, tmp_path):
    out = str(tmp_path / "o")
    train_here(TINY + [f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=2"])
    before = sha(os.path.join(out, "ckpt.pt"))
    p = run_train(TINY + [f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=2"], check=False)
    assert p.returncode == 2 and "--overwrite=True" in p.stderr and "Traceback" not in p.stderr
    assert sha(os.path.join(out, "ckpt.pt")) == before
    # a run that fails while starting (here: a bad MoE shape) leaves the old run alone
    log_before = sha(os.path.join(out, "metrics.jsonl"))
    for _ in range(2):
        p = run_train(TINY + [f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=2", "--overwrite=True",
                              "--moe_layers=all", "--n_experts=2", "--top_k=3"], check=False)
        assert p.returncode == 2 and "top_k=3" in p.stderr and "Traceback" not in p.stderr
    assert sha(os.path.join(out, "ckpt.pt")) == before and sha(os.path.join(out, "metrics.jsonl")) == log_before
    assert not os.path.exists(os.path.join(out, "metrics.jsonl.prev"))
    train_here(TINY + [f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=3", "--overwrite=True"])
    assert state(out)["iter_num"] == 3
    assert sha(os.path.join(out, "metrics.jsonl.prev")) == log_before    # the old log is kept beside


def test_corrupt_checkpoint_is_clear_error(data_dir, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(b"PK\x03\x04 this is not a checkpoint")
    before = sha(out / "ckpt.pt")
    p = run_train(TINY + [f"--data_dir={data_dir}", f"--out_dir={out}", "--init_from=resume"], check=False)
    assert p.returncode == 2 and "ckpt.pt" in p.stderr and "Traceback" not in p.stderr
    assert sha(out / "ckpt.pt") == before
    p = run_train(TINY + [f"--data_dir={data_dir}", f"--out_dir={tmp_path}/none", "--init_from=resume"], check=False)
    assert p.returncode == 2 and "no checkpoint" in p.stderr


def test_damaged_checkpoint_is_clear_error(data_dir, dense_run, tmp_path):
    good = torch.load(os.path.join(dense_run, "ckpt.pt"), weights_only=True)
    cases = {"no_args": ({**good, "model_args": None}, "model_args"),
             "missing_tensor": ({**good, "model": {k: v for k, v in good["model"].items() if k != "tok_emb.weight"}},
                                "tok_emb.weight")}
    for name, (obj, needle) in cases.items():
        d = tmp_path / name
        d.mkdir()
        torch.save(obj, d / "ckpt.pt")
        for how in ([f"--init_from={d}", f"--out_dir={tmp_path}/w_{name}"], ["--init_from=resume", f"--out_dir={d}"]):
            p = run_train(TINY + [f"--data_dir={data_dir}", "--max_iters=1", *how], check=False)
            assert p.returncode == 2 and needle in p.stderr and "Traceback" not in p.stderr, (name, how, p.stderr)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path):
    out = str(tmp_path / "o")
    common = TINY + [f"--data_dir={data_dir}", f"--out_dir={out}", "--eval_interval=2"]
    train_here(common + ["--max_iters=2"])
    good = sha(os.path.join(out, "ckpt.pt"))
    p = run_train(common + ["--max_iters=40", "--init_from=resume", "--learning_rate=1e30", "--min_lr=1e30",
                            "--warmup_iters=0", "--grad_clip=0.0"], check=False)
    said = p.stdout + p.stderr
    assert p.returncode == 1 and ("not finite" in said or "loss is nan" in said), said[-2000:]
    ck = state(out)
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    # either untouched, or re-saved only at a point where the loss was still finite
    assert sha(os.path.join(out, "ckpt.pt")) == good or ck["iter_num"] > 2


# ---------------------------------------------------------------- DDP

def test_ddp_two_processes_match_one(data_dir, tmp_path):
    common = TINY + [f"--data_dir={data_dir}", "--max_iters=4", "--eval_interval=100", "--backend=gloo",
                     "--gradient_accumulation_steps=2"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    train_here(common + [f"--out_dir={one}"])
    run_train(common + [f"--out_dir={two}"], torchrun_nproc=2)
    a, b = state(one), state(two)
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5)
    la = [r["loss"] for r in read_jsonl(os.path.join(one, "metrics.jsonl")) if r["split"] == "train"]
    lb = [r["loss"] for r in read_jsonl(os.path.join(two, "metrics.jsonl")) if r["split"] == "train"]
    assert len(la) == len(lb) == 4
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- upcycling in train.py

@pytest.fixture(scope="module")
def dense_run(data_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dense_src"))
    train_here(TINY + [f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=6", "--eval_interval=3"])
    return out


def test_online_upcycling_keeps_the_source_block_size(data_dir, dense_run, tmp_path):
    """Training at 16 tokens from a dense model of block_size 32 (an imported model: its
    max_position_embeddings) leaves the model's context at 32, by upcycling as by warm start."""
    short = [f"--data_dir={data_dir}", "--max_iters=1", "--eval_interval=1", "--block_size=16"]
    train_here(TINY + short + [f"--init_from={dense_run}", f"--out_dir={tmp_path}/moe", "--moe_layers=all",
                              "--n_experts=4", "--top_k=2"])
    train_here(TINY + short + [f"--init_from={dense_run}", f"--out_dir={tmp_path}/warm"])
    assert state(dense_run)["model_args"]["block_size"] == 32
    assert state(f"{tmp_path}/moe")["model_args"]["block_size"] == state(f"{tmp_path}/warm")["model_args"]["block_size"] == 32


def test_online_upcycling_takes_the_source_shape(data_dir, dense_run, tmp_path, capsys):
    """Online upcycling keeps the dense source's shape: a run that leaves train.py's default
    shape (n_layer=4, n_embd=128, ...) upcycles the 2-layer, 32-wide source as it is, names
    the keys it took, and equals the run that repeats the shape."""
    run = [f"--data_dir={data_dir}", "--max_iters=2", "--eval_interval=2", "--eval_iters=2", "--batch_size=4",
           "--block_size=32", "--device=cpu", f"--init_from={dense_run}", "--moe_layers=all", "--n_experts=4"]
    out = train_here(run + [f"--out_dir={tmp_path}/bare"], capsys)
    assert "it keeps the checkpoint's shape: n_layer=2 (this run's config: 4)" in out
    shape = [a for a in TINY if a.split("=")[0] in ("--n_layer", "--n_head", "--n_embd")]
    train_here(run + shape + [f"--out_dir={tmp_path}/repeated"])
    a, b = state(f"{tmp_path}/bare"), state(f"{tmp_path}/repeated")
    assert a["model_args"] == b["model_args"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_online_upcycling_matches_offline_cli(data_dir, dense_run, tmp_path):
    import subprocess
    import sys
    from helpers import ROOT
    moe = ["--moe_layers=all", "--n_experts=4", "--top_k=2"]
    online = str(tmp_path / "online")
    before = sha(os.path.join(dense_run, "ckpt.pt"))
    train_here(TINY + [f"--data_dir={data_dir}", f"--out_dir={online}", f"--init_from={dense_run}",
                      "--max_iters=0"] + moe)
    offline = str(tmp_path / "offline")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "upcycle.py"), f"--ckpt={dense_run}",
                        f"--out_dir={offline}"] + moe, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    a, b = state(online), state(offline)
    assert a["iter_num"] == b["iter_num"] == 0
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["upcycled_from"]["sha256"] == b["upcycled_from"]["sha256"] == before
    assert sha(os.path.join(dense_run, "ckpt.pt")) == before            # the source is never touched


def test_upcycled_training_starts_at_dense_loss_and_logs_similarity(data_dir, dense_run, tmp_path):
    out = str(tmp_path / "up")
    train_here(TINY + [f"--data_dir={data_dir}", f"--out_dir={out}", f"--init_from={dense_run}",
                      "--max_iters=4", "--eval_interval=2", "--moe_layers=all", "--n_experts=4", "--top_k=2",
                      "--upcycle_expert_noise=0.01"])
    dense_eval = [r for r in read_jsonl(os.path.join(dense_run, "metrics.jsonl")) if r["split"] == "eval"][-1]
    evals = [r for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if r["split"] == "eval"]
    assert abs(evals[0]["val_loss"] - dense_eval["val_loss"]) < 0.02   # function (nearly) preserved
    assert len(evals[0]["expert_similarity"]) == 2 and len(evals[0]["similarity_to_dense"][0]) == 4
    assert 0.9 < evals[0]["expert_similarity"][0] <= 1.0
    assert state(out)["upcycled_from"]["path"].endswith("ckpt.pt")


def test_resume_does_not_compare_with_a_changed_dense_source(data_dir, dense_run, tmp_path, capsys):
    """The similarity_to_dense monitor of a resumed MoE run reads the dense checkpoint
    again; when that file changed since upcycling (its run trained on), the monitor is
    off with a note instead of logging similarity to other weights."""
    import shutil
    dense = str(tmp_path / "dense")
    shutil.copytree(dense_run, dense)
    common = TINY + [f"--data_dir={data_dir}", f"--out_dir={tmp_path}/moe", f"--init_from={dense}",
                     "--eval_interval=2", "--moe_layers=all", "--n_experts=4", "--top_k=2"]
    train_here(common + ["--max_iters=2"])
    train_here(TINY + [f"--data_dir={data_dir}", f"--out_dir={dense}", "--init_from=resume", "--max_iters=8",
                      "--eval_interval=3"])                              # the dense run trains on
    out = train_here(common + ["--init_from=resume", "--max_iters=4"], capsys)
    assert "changed since it was upcycled" in out
    evals = [r for r in read_jsonl(f"{tmp_path}/moe/metrics.jsonl") if r["split"] == "eval"]
    assert "similarity_to_dense" in evals[0] and "similarity_to_dense" not in evals[-1]
    assert "expert_similarity" in evals[-1]


def test_dense_warm_start_and_upcycle_errors(data_dir, dense_run, tmp_path, capsys):
    out = str(tmp_path / "cont")
    p = run_train(TINY + [f"--data_dir={data_dir}", f"--out_dir={out}", f"--init_from={dense_run}", "--max_iters=2"])
    assert state(out)["iter_num"] == 2 and state(out)["model_args"]["moe_layers"] == "none"
    assert "keeps the checkpoint's shape" not in p.stdout
    # a warm start takes the checkpoint's shape; a different one asked for is named, not silently dropped
    out = train_here(TINY + [f"--data_dir={data_dir}", f"--out_dir={tmp_path}/w", f"--init_from={dense_run}",
                             "--max_iters=1", "--n_layer=3", "--rope_theta=500000.0"], capsys)
    assert "keeps the checkpoint's shape: n_layer=2 (this run's config: 3), rope_theta=10000.0 (this run's " \
           "config: 500000.0)" in out
    assert state(f"{tmp_path}/w")["model_args"]["n_layer"] == 2
    p = run_train(TINY + [f"--data_dir={data_dir}", f"--out_dir={tmp_path}/x", f"--init_from={tmp_path}/missing",
                          "--moe_layers=all"], check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    # online upcycling keeps the source's shape too, and names what this run asked for instead
    p = run_train(TINY + [f"--data_dir={data_dir}", f"--out_dir={tmp_path}/y", f"--init_from={dense_run}",
                          "--moe_layers=all", "--n_embd=64", "--max_iters=1"])
    assert "keeps the checkpoint's shape: n_embd=32 (this run's config: 64)" in p.stdout
    assert state(f"{tmp_path}/y")["model_args"]["n_embd"] == 32


def test_dense_warmup_then_lory(data_dir, tmp_path):
    out = str(tmp_path / "lory")
    train_here(TINY + [f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=6", "--eval_interval=2",
                      "--moe_layers=all", "--router=lory", "--segment_len=8", "--dense_warmup_iters=2"])
    ck = state(out)
    assert ck["model_args"]["router"] == "lory" and ck["upcycled_from"]["method"] == "dense warm-up"
    recs = read_jsonl(os.path.join(out, "metrics.jsonl"))
    tr = [r for r in recs if r["split"] == "train"]
    assert "moe" not in tr[0] and "merge_entropy" in tr[-1]["moe"][0]
    assert len([r for r in recs if r["split"] == "eval"][-1]["domain_usage"]) == 2
