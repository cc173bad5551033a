"""train.py access to the upcycling methods beyond copies: online Drop-Upcycling, BTX from
branch checkpoints, the hidden-state router init, and --domains for branch training.
References: online copy upcycling (drop r=0 must equal it bit for bit) and the
btx.py CLI (train.py's BTX must build the same weights)."""
import os

import numpy as np
import pytest
import torch

import btx
import eval as E
import init_from
import train
import upcycle
from configurator import check_run_config, parse_config
from checkpoint import load_checkpoint, save_checkpoint
from data.dataset import TokenDataset
from helpers import TINY, make_dataset, read_jsonl

N_DOM = 4
BAND = (64 - 1) // N_DOM   # make_dataset: domain d uses tokens 1 + d*BAND .. (d+1)*BAND, eot is 0


def run_train(argv):
    """train.py in this process (a subprocess would spend seconds importing torch)."""
    assert train.main(argv) == 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny 4-domain dataset, a dense run, and four branches warm-started from it, each
    trained on one domain (--domains=dom0 ... dom3)."""
    base = tmp_path_factory.mktemp("beyond")
    data = make_dataset(str(base / "data"), n_docs=80, n_domains=N_DOM)
    common = TINY + [f"--data_dir={data}", "--eval_interval=2"]
    dense = str(base / "dense")
    run_train(common + [f"--out_dir={dense}", "--max_iters=4"])
    branches = []
    for d in ("dom0", "dom1", "dom2", "dom3"):
        branches.append(str(base / f"branch_{d}"))
        run_train(common + [f"--out_dir={branches[-1]}", f"--init_from={dense}", f"--domains={d}", "--max_iters=2"])
    return {"base": base, "data": data, "common": common, "dense": dense, "branches": branches}


def losses(out_dir):
    return [r["loss"] for r in read_jsonl(os.path.join(out_dir, "metrics.jsonl")) if r["split"] == "train"]


def weights(out_dir):
    return load_checkpoint(out_dir)["model"]


def test_online_drop_ratio_zero_is_online_copy_bit_for_bit(runs):
    moe = ["--moe_layers=all", "--n_experts=4", "--top_k=2", f"--init_from={runs['dense']}", "--max_iters=3"]
    copy, drop0 = str(runs["base"] / "copy"), str(runs["base"] / "drop0")
    run_train(runs["common"] + moe + [f"--out_dir={copy}", "--upcycle_method=copy"])
    run_train(runs["common"] + moe + [f"--out_dir={drop0}", "--upcycle_method=drop", "--upcycle_drop_ratio=0"])
    assert len(losses(copy)) == 3 and losses(copy) == losses(drop0)
    a, b = weights(copy), weights(drop0)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_online_drop_reinitialises_experts(runs):
    """The key is wired: r=0.5 in train.py changes half of every expert's channels,
    exactly as upcycle.py's upcycle_from_checkpoint does with drop_ratio=0.5."""
    cfg = parse_config(runs["common"] + ["--moe_layers=all", "--n_experts=4", "--top_k=2",
                                         f"--init_from={runs['dense']}", "--upcycle_method=drop",
                                         "--upcycle_drop_ratio=0.5", "--out_dir=unused"], train.DEFAULTS)
    check_run_config(cfg, train.DEFAULTS)
    target = init_from.model_args_from(cfg, 64)
    _, dist = train.setup_env(cfg)
    model, _, upcycled_from = init_from.build_model(cfg, target, dist)
    ref, _ = upcycle.upcycle_from_checkpoint(runs["dense"], {**init_from.upcycle_options(cfg, target), "drop_ratio": 0.0})
    assert upcycled_from["method"] == "drop_upcycling" and upcycled_from["options"]["drop_ratio"] == 0.5
    g, g0 = model.blocks[0].ffn.gate_proj.detach(), ref.blocks[0].ffn.gate_proj.detach()   # (E, h, d)
    changed = (g != g0).any(-1)                                                             # (E, h)
    assert changed.sum(-1).tolist() == [g.shape[1] // 2] * 4
    assert torch.equal(model.blocks[0].ffn.router.weight, ref.blocks[0].ffn.router.weight)


def test_domains_run_sees_only_that_domain(runs, tmp_path, monkeypatch):
    """--domains=dom2: every training window and every fixed eval window holds dom2
    tokens only (or end-of-text), and the checkpoint's config records the domain."""
    seen, evals = [], []
    get_batch, evaluate = train.get_batch, train.evaluate

    def spy_batch(*a):
        for x, y in get_batch(*a):
            seen.append(torch.cat([x, y]))
            yield x, y

    def spy_eval(model, eval_batches, *a):
        evals.append(eval_batches)
        return evaluate(model, eval_batches, *a)

    monkeypatch.setattr(train, "get_batch", spy_batch)
    monkeypatch.setattr(train, "evaluate", spy_eval)
    out = str(tmp_path / "dom2")
    cfg = parse_config(runs["common"] + [f"--out_dir={out}", "--domains=dom2", "--max_iters=3"], train.DEFAULTS)
    check_run_config(cfg, train.DEFAULTS)
    assert train.train(cfg) == 0
    toks = torch.cat(seen + [torch.cat([x, y]) for e in evals for b in e.values() for x, y, _ in b]).unique()
    lo, hi = 1 + 2 * BAND, 3 * BAND
    assert len(seen) == 3 and toks.numel() > 5
    assert bool(((toks == 0) | ((toks >= lo) & (toks <= hi))).all()), toks.tolist()
    assert all(bool((dom == 2).all()) for e in evals for _, _, dom in e["val"])
    assert load_checkpoint(out)["config"]["domains"] == "dom2"
    # eval.py evaluates the branch on its domain too: train.py's last val loss, on its batches
    res = E.evaluate_checkpoint(out, batches=2, batch_size=4)
    assert set(res["per_domain"]) == {"dom2"} and res["domains"] == "dom2"
    last = [r for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if r["split"] == "eval"][-1]
    assert abs(res["val_loss"] - last["val_loss"]) < 1e-5
    # the reference: without the filter the same run sees every domain
    assert len(np.unique(np.fromfile(os.path.join(runs["data"], "train.bin"), dtype=np.uint16) // BAND)) > 3


def test_btx_through_train_equals_btx_cli(runs):
    """train.py --init_from=A,B --upcycle_method=btx --upcycle_router_init=hidden builds the
    MoE that `btx.py --router_init=hidden` writes, tensor for tensor; the
    hidden rows' domains come from the branches' recorded --domains."""
    cli = str(runs["base"] / "btx_cli")
    assert btx.main([f"--branches={','.join(runs['branches'])}", f"--out_dir={cli}", "--n_experts=4",
                     "--top_k=2", "--router_init=hidden", f"--data_dir={runs['data']}", "--verify=False"]) == 0
    out = str(runs["base"] / "btx_train")
    run_train(runs["common"] + [f"--out_dir={out}", f"--init_from={','.join(runs['branches'])}", "--max_iters=0",
                                "--upcycle_method=btx", "--moe_layers=all", "--n_experts=4", "--top_k=2",
                                "--upcycle_router_init=hidden"])
    a, b = weights(cli), weights(out)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    src = load_checkpoint(out)["upcycled_from"]
    assert src["method"] == "branch_train_mix"
    assert src["options"]["router_init_domains"] == ["dom0", "dom1", "dom2", "dom3"]
    # the router is the hidden-state one, not the random draw (unit rows)
    assert torch.allclose(b["blocks.0.ffn.router.weight"].norm(dim=1), torch.ones(4))


@pytest.mark.parametrize("extra, needle", [
    (["--upcycle_method=nope"], "upcycle_method='nope' must be one of"),
    (["--upcycle_method=btx", "--init_from=out/a", "--moe_layers=all"], "merges 2 or more dense branches"),
    (["--upcycle_method=drop", "--init_from=out/a,out/b", "--moe_layers=all"], "only upcycle_method='btx' takes a list"),
    (["--upcycle_method=drop"], "upcycles a dense checkpoint: set init_from"),
    (["--upcycle_drop_ratio=0.3"], "applies to upcycle_method='drop' only"),
    (["--upcycle_method=drop", "--upcycle_drop_ratio=1.5", "--init_from=out/a", "--moe_layers=all"], "must be in [0, 1]"),
    (["--upcycle_router_domains=dom0"], "upcycle_router_init='hidden' only"),
    (["--upcycle_router_init=hidden", "--init_from=out/a", "--moe_layers=all"], "needs upcycle_router_domains"),
    (["--upcycle_method=btx", "--init_from=out/a,out/b"], "set moe_layers"),
    (["--upcycle_router_init=hidden", "--upcycle_router_domains=dom0,dom1", "--init_from=out/a", "--moe_layers=all",
      "--n_experts=4"], "never diverge"),
    (["--upcycle_router_init=hidden", "--upcycle_method=btx", "--init_from=out/a,out/b", "--moe_layers=all",
      "--n_experts=4"], "never diverge"),
    (["--upcycle_method=drop", "--init_from=out/a", "--moe_layers=all", "--expert_parallel=2"],
     "expert_parallel > 1 upcycles online by copying"),
])
def test_bad_combinations_are_one_line_errors(extra, needle, tmp_path, capsys):
    out = tmp_path / "o"
    assert train.main(TINY + [f"--out_dir={out}"] + extra) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err
    assert not out.exists()


def test_unknown_domain_is_one_line_error(runs, tmp_path, capsys):
    assert train.main(runs["common"] + [f"--out_dir={tmp_path / 'o'}", "--domains=klingon"]) == 2
    err = capsys.readouterr().err
    assert "unknown domain(s) klingon" in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_finished_run_reads_a_key_added_since_as_its_default(runs, tmp_path):
    """experiments.py / demo.py reuse: a checkpoint saved before the new keys existed ran
    with their defaults, so it still matches a config that leaves them at the defaults."""
    ckpt = load_checkpoint(runs["dense"])
    new = ("domains", "upcycle_method", "upcycle_drop_ratio", "upcycle_router_init", "upcycle_router_domains")
    ckpt["config"] = {k: v for k, v in ckpt["config"].items() if k not in new}
    out = str(tmp_path / "old")
    save_checkpoint(ckpt, out)
    cfg = dict(load_checkpoint(runs["dense"])["config"], out_dir=out)
    assert train.finished_run(out, cfg)
    assert not train.finished_run(out, dict(cfg, domains="dom1"))


def test_router_init_dist_uniform_online_equals_the_function_and_bad_value_is_one_line(runs, tmp_path, capsys):
    """upcycle_router_init_dist reaches the upcycler: train.py builds the uniform router
    upcycle_state_dict builds, records it, and refuses an unknown distribution in one line."""
    moe = ["--moe_layers=all", "--n_experts=4", "--top_k=2", f"--init_from={runs['dense']}", "--max_iters=0"]
    out = str(runs["base"] / "uniform")
    run_train(runs["common"] + moe + [f"--out_dir={out}", "--upcycle_router_init_dist=uniform"])
    dense = load_checkpoint(runs["dense"])
    ref, _, _ = upcycle.upcycle_state_dict(dense["model"], dense["model_args"], {
        "model_args": {"moe_layers": "all", "n_experts": 4, "top_k": 2}, "router_init_dist": "uniform"})
    got = load_checkpoint(out)
    assert got["upcycled_from"]["options"]["router_init_dist"] == "uniform"
    assert torch.equal(got["model"]["blocks.0.ffn.router.weight"], ref["blocks.0.ffn.router.weight"])
    bad = tmp_path / "bad"
    assert train.main(runs["common"] + moe + [f"--out_dir={bad}", "--upcycle_router_init_dist=cauchy"]) == 2
    err = capsys.readouterr().err
    assert "router_init_dist='cauchy' must be one of normal, uniform" in err and err.count("\n") == 1, err
    assert not bad.exists()


def test_hidden_router_windows_never_exceed_the_run_block_size(runs, tmp_path, monkeypatch, capsys):
    """A dense model with a 64-token context upcycled online by a 16-token run: the hidden-state
    windows are 16 tokens (not the model's 64), and the tokens read per domain are recorded and
    printed (16 windows x 16 tokens)."""
    dense = str(tmp_path / "dense64")
    run_train([a for a in runs["common"] if not a.startswith("--block_size")] + [
        "--block_size=64", f"--out_dir={dense}", "--max_iters=1"])
    lengths = []
    get_batch = TokenDataset.get_batch
    monkeypatch.setattr(TokenDataset, "get_batch", lambda self, B, T, *a, **k: (lengths.append(T),
                                                                                 get_batch(self, B, T, *a, **k))[1])
    out = str(tmp_path / "moe16")
    run_train([a for a in runs["common"] if not a.startswith("--block_size")] + [
        "--block_size=16", f"--out_dir={out}", f"--init_from={dense}", "--max_iters=0", "--moe_layers=all",
        "--n_experts=4", "--top_k=1", "--upcycle_router_init=hidden", "--upcycle_router_domains=dom0,dom1,dom2,dom3"])
    assert lengths and max(lengths) == 16, lengths
    assert load_checkpoint(out)["upcycled_from"]["options"]["router_init_tokens_per_domain"] == 16 * 16
    assert "16 windows x 16 tokens = 256 tokens of each of 4 domains" in capsys.readouterr().out
