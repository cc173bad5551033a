"""What train.py logs and feeds back: global tok/s and per-device
MFU at the training sequence length, a log line's timing without evals, checkpoint
saves or Lory's warm-up upcycle, the aux-free bias updated from the demand, Skywork's
alphas kept up when dropless, same-shard expert similarity after a fine-grained
upcycle; and eval.py's expert-choice loss with the routing the model trained with."""
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import eval as E
import train
from configurator import check_run_config, parse_config
from diagnostics import LogWindow
from data.dataset import TokenDataset
from helpers import TINY, make_dataset, read_jsonl
from model import GPT, GPTConfig, MoEFFN
from router import Router


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("data")))


def train_here(args):
    """train.py in this process (so tests can patch its steps); returns the config."""
    cfg = parse_config(TINY + args, train.DEFAULTS)
    check_run_config(cfg, train.DEFAULTS)
    assert train.train(cfg) == 0
    return cfg


def records(out_dir, split):
    return [r for r in read_jsonl(os.path.join(out_dir, "metrics.jsonl")) if r["split"] == split]


# ---------------------------------------------------------------- throughput

def test_log_record_mfu_is_per_device_at_the_training_length():
    model = GPT(GPTConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=32, block_size=64))
    h100 = "NVIDIA H100 80GB HBM3"

    def train_record(world, gpu_name):
        window = LogWindow(None, SimpleNamespace(world=world), 4000, 32, gpu_name)
        window.add(2.0, 0.5, 1e-3)   # loss 2.0, 0.5 s, lr 1e-3
        return window.record(model, 10, [])
    rec, line = train_record(4, h100)
    # by hand (PaLM appendix B): 6 * active non-embedding params (+ the tied lm_head) + 12 L d T, T = 32 (not 64)
    n = sum(p.numel() for p in model.parameters())
    flops = 6 * n + 12 * 2 * 32 * 32
    assert rec["tok_per_s"] == 8000 and rec["tok_per_s_per_device"] == 2000
    assert rec["mfu"] == pytest.approx(flops * 1000 / 0.5 / 989e12, rel=1e-9)     # 1000 tokens per device
    assert "8,000 tok/s (global)" in line and f"MFU {rec['mfu'] * 100:.1f}%" in line
    rec1, _ = train_record(1, h100)
    assert rec1["mfu"] == pytest.approx(4 * rec["mfu"])
    cpu, _ = train_record(4, None)
    assert "mfu" not in cpu


class FakeClock:
    """time.time() that moves only when a patched step says so."""

    def __init__(self):
        self.now = 1000.0

    def time(self):
        return self.now


@pytest.mark.parametrize("kind", ["dense", "lory_warmup"])
def test_log_line_times_training_steps_only(kind, data_dir, tmp_path, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(train, "time", clock)

    def costs(fn, seconds):
        def wrapped(*a, **k):
            clock.now += seconds
            return fn(*a, **k)
        return wrapped
    monkeypatch.setattr(train, "forward_backward", costs(train.forward_backward, 1.0))    # 1 s per step
    for step in ("evaluate", "save_checkpoint", "upcycle_after_warmup"):                 # 100 s each, untimed
        monkeypatch.setattr(train, step, costs(getattr(train, step), 100.0))
    extra = (["--moe_layers=all", "--router=lory", "--n_experts=4", "--segment_len=8", "--dense_warmup_iters=1"]
             if kind == "lory_warmup" else [])
    out = str(tmp_path / "run")
    # evaluations and checkpoints every 2 steps (a checkpoint also closes a log window), the
    # Lory upcycle after step 1, inside the first window
    train_here([f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=4", "--eval_interval=2",
                "--log_interval=2", "--always_save_checkpoint=True", *extra])
    tr = records(out, "train")
    assert [r["iter"] for r in tr] == [2, 4]
    assert all(r["ms_per_iter"] == pytest.approx(1000.0) for r in tr), [r["ms_per_iter"] for r in tr]
    assert all(r["tok_per_s"] == pytest.approx(4 * 32 / 1.0) for r in tr)


# ---------------------------------------------------------------- balancing inputs

def capture_training_routings(monkeypatch):
    """Patch Router.forward to keep (input, weight, bias, Routing) of training calls."""
    seen = []
    forward = Router.forward

    def spy(self, x):
        r = forward(self, x)
        if self.training:
            seen.append((x.detach().clone(), self.weight.detach().clone(),
                         getattr(self, "expert_bias", None), r))
        return r
    monkeypatch.setattr(Router, "forward", spy)
    return seen


def test_aux_free_bias_is_updated_from_the_demand(data_dir, tmp_path, monkeypatch):
    seen = capture_training_routings(monkeypatch)
    out, gamma, k = str(tmp_path / "sig"), 1e-3, 2
    train_here([f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=1", "--moe_layers=all", "--n_experts=4",
                f"--top_k={k}", "--router=sigmoid", "--aux_loss=none", "--capacity_factor=0.5",
                "--router_init_std=1.0", f"--expert_bias_gamma={gamma}"])
    state = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["model"]
    assert len(seen) == 2                                   # one training step, two MoE layers
    flipped = 0
    for layer, (x, w, _, r) in enumerate(seen):
        # the demand by hand: top-k of sigmoid scores (the bias starts at 0), before any capacity
        demand = torch.bincount(torch.sigmoid(x.float() @ w.t()).topk(k, dim=-1).indices.reshape(-1),
                                minlength=4).float()
        kept = torch.bincount(r.expert_idx, minlength=4).float()
        assert kept.sum() < demand.sum()                    # the capacity dropped assignments
        want = gamma * torch.sign(demand.mean() - demand)
        flipped += int(not torch.equal(want, gamma * torch.sign(kept.mean() - kept)))
        assert torch.allclose(state[f"blocks.{layer}.ffn.router.expert_bias"], want, atol=0, rtol=0)
    assert flipped, "the kept load gives the same update here: the test would not see the difference"


def test_adaptive_alpha_stays_up_when_dropless(data_dir, tmp_path):
    out, n, E, k, T = str(tmp_path / "ada"), 5, 4, 2, 4 * 32
    cfg = train_here([f"--data_dir={data_dir}", f"--out_dir={out}", f"--max_iters={n}", "--moe_layers=all",
                      f"--n_experts={E}", f"--top_k={k}", "--capacity_factor=0.0", "--adaptive_aux=True",
                      "--router_init_std=1.0"])
    tr = records(out, "train")
    assert len(tr) == n
    alpha = [cfg["adaptive_aux_max"]] * 2
    C1 = math.ceil(k * T / E)                               # capacity factor 1
    for rec in tr:
        for l, layer in enumerate(rec["moe"]):
            assert layer["drop_rate"] == 0                  # dropless: nothing is dropped
            d = sum(max(c - C1, 0) for c in layer["demand_per_expert"]) / (T * k)
            target = min(cfg["adaptive_aux_xi"] * d, cfg["adaptive_aux_max"])        # Skywork eq. 5
            alpha[l] = cfg["adaptive_aux_beta"] * alpha[l] + (1 - cfg["adaptive_aux_beta"]) * target
        assert rec["alpha"] == pytest.approx(alpha, rel=1e-9)
    decayed = cfg["adaptive_aux_max"] * cfg["adaptive_aux_beta"] ** n
    assert min(tr[-1]["alpha"]) > decayed + 1e-4, (tr[-1]["alpha"], decayed)


# ---------------------------------------------------------------- similarity and eval

def test_fine_grained_upcycle_similarity_is_over_same_shard_pairs(data_dir, tmp_path):
    dense, up = str(tmp_path / "dense"), str(tmp_path / "up")
    train_here([f"--data_dir={data_dir}", f"--out_dir={dense}", "--max_iters=2"])
    train_here([f"--data_dir={data_dir}", f"--out_dir={up}", "--max_iters=0", f"--init_from={dense}",
                "--moe_layers=all", "--n_experts=4", "--top_k=2", "--upcycle_granularity=2"])
    ev = records(up, "eval")[0]
    assert ev["expert_similarity"] == pytest.approx([1.0, 1.0], abs=1e-5)    # noiseless copies of each shard
    res = E.evaluate_checkpoint(up, batches=2, batch_size=4)
    assert res["similarity_granularity"] == 2
    for L in res["layers"]:
        S = torch.tensor(L["expert_similarity"])
        assert L["mean_pairwise_similarity"] == pytest.approx(1.0, abs=1e-5)
        assert float((S.sum() - S.trace()) / 12) < 0.7                         # all pairs: not copies


def test_eval_reports_expert_choice_loss_with_the_training_routing(data_dir, tmp_path, capsys):
    out = str(tmp_path / "ec")
    train_here([f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=4", "--moe_layers=all", "--n_experts=4",
                "--top_k=2", "--router=expert_choice", "--capacity_factor=1.0"])
    assert E.cli(["--ckpt", out, "--json", "--batches=2", "--batch_size=4"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ec = res["expert_choice"]
    assert ec["k_causal"] == 1 and ec["val_loss_causal"] == res["val_loss"]
    assert all(L["drop_rate"] == 0 for L in res["layers"])     # 1 expert per token at eval, all kept
    # reference: the model's own mean loss with every router in its training routing
    model, _ = E.load_run(out)
    batches = TokenDataset(data_dir, "val").fixed_batches(2, 4, 32, seed=E.VAL_SEED)
    routers = [f.router for _, f in model.moe_layers() if isinstance(f, MoEFFN)]
    for r in routers:
        r.eval_expert_choice = True
    with torch.no_grad():
        ref = sum(F.cross_entropy(model(x, y)[0].reshape(-1, 64), y.reshape(-1), reduction="sum").item()
                  for x, y, _ in batches) / (2 * 4 * 32)
    assert ec["val_loss_training_routing"] == pytest.approx(ref, abs=1e-5)
    assert abs(ec["val_loss_training_routing"] - ec["val_loss_causal"]) > 1e-4
    report = E.format_report(E.evaluate_checkpoint(out, batches=2, batch_size=4))
    assert "training routing" in report and f"{ec['val_loss_training_routing']:.4f}" in report


def test_log_line_load_ratio_is_inf_when_an_expert_gets_no_token():
    from diagnostics import moe_summary
    busy = {"tokens_per_expert": [30, 10, 20, 40], "drop_rate": 0.0}
    assert "load max/min 4.0, drop 0.0%" in moe_summary([busy])
    idle = {"tokens_per_expert": [30, 0, 20, 50], "drop_rate": 0.0}
    assert "load max/min inf, drop 0.0%" in moe_summary([busy, idle])
