"""Upcycling tests (docs/METHODS.md section 4): function preservation of every exact
combination (upcycled logits == dense logits in fp32, same loss), the measured
deviation of the approximate ones, the CLI's checkpoint, bad inputs, --force,
determinism (online == offline) and the expert-similarity monitor.

The dense models are tiny (2 layers, d=32) and put in an "FFN-active" regime:
W1/W3 give pre-activations ~N(0, 1) so silu works in its nonlinear range (with
GPT init the FFN is almost linear and tiny, which would hide the difference
between the exact and the Megatron scaling), and an untied lm_head of std
1/sqrt(d) gives logits of order 1, so the 1e-5 tolerance is a real test.
Run with -s to see the measured numbers.
"""
import math
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import diagnostics as D  # noqa: E402
import upcycle as U  # noqa: E402
from checkpoint import file_sha256, load_checkpoint, load_model, save_checkpoint  # noqa: E402
from model import GPT, GPTConfig, MoEFFN, LoryFFN, SwiGLU  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5
D_FF = 96   # GPTConfig's Llama rule for n_embd=32


def dense_cfg(**kw):
    args = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=64, tie_embeddings=False)
    args.update(kw)
    return GPTConfig(**args)


def ffn_active(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("gate_proj.weight", "up_proj.weight", "down_proj.weight")) or n == "lm_head.weight":
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
    return model


def make_dense(seed=0, **kw):
    torch.manual_seed(seed)
    return ffn_active(GPT(dense_cfg(**kw)), seed).eval()


def save_dense(model, path, iter_num=500):
    ckpt = {"model_args": asdict(model.config), "model": model.state_dict(), "optimizer": None,
            "iter_num": iter_num, "best_val_loss": 1.23, "config": {"dataset": "multidomain", "batch_size": 4},
            "rng": None, "aux_coef": None, "upcycled_from": None}
    save_checkpoint(ckpt, str(path))
    return str(path)


BATCH = torch.randint(0, 64, (4, 33), generator=torch.Generator().manual_seed(1))
X, Y = BATCH[:, :-1].contiguous(), BATCH[:, 1:].contiguous()


def compare(dense, moe):
    """(max |logit diff|, |loss diff|) on a fixed batch, both models in eval mode."""
    dense.eval(), moe.eval()
    with torch.no_grad():
        a, la, _ = dense(X, Y)
        b, lb, _ = moe(X, Y)
    return float((a - b).abs().max()), abs(float(la) - float(lb))


def up(dense, granularity=None, **model_args):
    """(MoE GPT, info): upcycle with model_args (moe_layers defaults to 'all'); extra options
    via the special keys weight_scaling / expert_noise / shared_fraction / seed."""
    opts = {k: model_args.pop(k) for k in ("weight_scaling", "expert_noise", "shared_fraction", "seed")
            if k in model_args}
    model_args.setdefault("moe_layers", "all")
    return U.upcycle_model(dense, {"model_args": model_args, "granularity": granularity, **opts})


# ----------------------------------------------------------------------------- function preservation

@pytest.mark.parametrize("std", [0.02, 0.0])
@pytest.mark.parametrize("router", ["topk_softmax", "sigmoid"])
def test_coarse_exact(std, router):
    dense = make_dense()
    moe, moe_info = up(dense, n_experts=8, top_k=2, router=router, router_init_std=std)
    assert all(isinstance(b.ffn, MoEFFN) for b in moe.blocks)
    dl, dloss = compare(dense, moe)
    print(f"\ncoarse {router} std={std}: max|dlogit|={dl:.2e} |dloss|={dloss:.2e}")
    assert dl <= TOL and dloss <= TOL
    assert moe_info["options"]["function_preserving"] == "exact"
    for _, f in moe.moe_layers():   # every expert an exact copy; router rows as asked
        assert torch.equal(f.gate_proj[0], f.gate_proj[-1])
        assert (f.router.weight.abs().sum() == 0) == (std == 0)
    if std > 0:
        w = moe.blocks[0].ffn.router.weight
        assert abs(float(w.detach().std()) - std) < 0.3 * std


def test_coarse_exact_in_training_mode_with_router_noise():
    """Identical experts: whatever the (noisy) gates, they sum to 1."""
    dense = make_dense()
    moe, moe_info = up(dense, n_experts=4, top_k=2, router_noise=True)
    moe.train()
    dense.train()
    with torch.no_grad():
        a, b = dense(X)[0], moe(X)[0]
    assert float((a - b).abs().max()) <= TOL


def test_coarse_lory_exact():
    dense = make_dense()
    moe, moe_info = up(dense, n_experts=4, top_k=1, router="lory", segment_len=8)
    assert all(isinstance(b.ffn, LoryFFN) for b in moe.blocks)
    assert compare(dense, moe)[0] <= TOL


def test_coarse_softmax_topk_zero_router_exact_random_router_approximate():
    dense = make_dense()
    exact, exact_info = up(dense, n_experts=8, top_k=2, router="softmax_topk", router_init_std=0.0)
    assert exact_info["options"]["weight_scaling"] == "exact"          # auto
    assert exact_info["options"]["activation_scale"] == 4.0            # E/k
    assert compare(dense, exact)[0] <= TOL
    approx, approx_info = up(dense, n_experts=8, top_k=2, router="softmax_topk", router_init_std=0.02)
    dl, dloss = compare(dense, approx)
    print(f"\nsoftmax_topk E8 k2 router std 0.02 (exact W2 scaling): max|dlogit|={dl:.3g} |dloss|={dloss:.3g}")
    assert approx_info["options"]["function_preserving"] == "approximate"
    assert TOL < dl < 1.0


@pytest.mark.parametrize("cf", [1.0, 2.0])
def test_expert_choice_exact_in_eval_only(cf):
    """Expert choice at eval is softmax-then-topk on the same logits with k = capacity
    factor (top_k is not used): exact with a zero router and W2 x E/cf; in training
    each expert takes its top-C tokens, which is not preserving."""
    dense = make_dense()
    moe, moe_info = up(dense, n_experts=4, top_k=2, router="expert_choice", router_init_std=0.0, capacity_factor=cf)
    o = moe_info["options"]
    assert o["activation_scale"] == 4 / cf
    assert o["function_preserving"] == "exact" and "eval mode only" in o["preservation_note"]
    assert compare(dense, moe)[0] <= TOL


@pytest.mark.parametrize("layers,ids", [("every_other", [1]), ("0", [0]), ("all", [0, 1])])
def test_moe_layer_selection(layers, ids):
    dense = make_dense()
    moe, moe_info = up(dense, n_experts=4, top_k=2, moe_layers=layers)
    assert [l for l, _ in moe.moe_layers()] == ids
    for l, b in enumerate(moe.blocks):
        if l not in ids:
            assert isinstance(b.ffn, SwiGLU)
            assert torch.equal(b.ffn.gate_proj.weight, dense.blocks[l].ffn.gate_proj.weight)
    assert compare(dense, moe)[0] <= TOL


@pytest.mark.parametrize("router", ["topk_softmax", "sigmoid"])
@pytest.mark.parametrize("k", [2, 4])
def test_fine_grained_exact(router, k):
    """E'=4, G=2: expert i*G+g = shard g of the dense FFN, shared router rows,
    down_proj scaled by G (topk-then-softmax: each shard of a picked group gets p_j/G)."""
    dense = make_dense()
    moe, moe_info = up(dense, granularity=2, n_experts=8, top_k=k, router=router)
    f = moe.blocks[0].ffn
    W1, W2 = dense.blocks[0].ffn.gate_proj.weight, dense.blocks[0].ffn.down_proj.weight
    h = D_FF // 2
    assert moe.config.expert_hidden == h and f.gate_proj.shape == (8, h, 32)
    for e in range(8):
        g = e % 2
        assert torch.equal(f.gate_proj[e], W1[g * h:(g + 1) * h])
        assert torch.allclose(f.down_proj[e], 2 * W2[:, g * h:(g + 1) * h])
        assert torch.equal(f.router.weight[e], f.router.weight[e - g])         # rows shared in a group
    assert not torch.equal(f.router.weight[0], f.router.weight[2])             # distinct across groups
    dl, dloss = compare(dense, moe)
    print(f"\nfine-grained {router} E'4 G2 k{k} exact: max|dlogit|={dl:.2e} |dloss|={dloss:.2e}")
    assert dl <= TOL and dloss <= TOL
    assert moe_info["method"] == "fine_grained_virtual_groups"


def test_fine_grained_topk_picks_whole_groups():
    dense = make_dense()
    moe = up(dense, granularity=2, n_experts=8, top_k=4)[0].eval()
    captured = []
    moe.blocks[0].ffn.router.register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        moe(X)
    r = captured[0]
    groups = (r.expert_idx // 2).view(-1, 4)
    counts = torch.stack([(groups == g).sum(1) for g in range(4)], 1)
    assert set(counts.unique().tolist()) <= {0, 2}                             # 0 or a whole group


def _zero_router_topk_is_balanced(E, k, G):
    """Does torch.topk on all-tied logits pick k/G copies of every shard?"""
    idx = torch.zeros(256, E).topk(k, dim=-1).indices
    counts = torch.stack([(idx % G == g).sum(1) for g in range(G)], 1)
    return bool((counts == k // G).all())


def test_fine_grained_softmax_topk_exact_with_zero_router():
    """softmax-then-topk: each shard of group i gets q_i / G, q = softmax over the E'
    group logits; only a zero router makes sum_{picked} q_j = k/(G E') input-independent,
    and then W2 * E' G^2 / k is exact."""
    if not _zero_router_topk_is_balanced(8, 2, 2):
        pytest.skip("this torch.topk breaks ties unevenly across shards")
    dense = make_dense()
    moe, moe_info = up(dense, granularity=2, n_experts=8, top_k=2, router="softmax_topk", router_init_std=0.0)
    o = moe_info["options"]
    assert o["activation_scale"] == 4 * 2 * 2 / 2 and o["function_preserving"] == "exact"
    assert "tie" in o["preservation_note"]
    dl, dloss = compare(dense, moe)
    print(f"\nfine-grained softmax_topk E'4 G2 k2 zero router exact: max|dlogit|={dl:.2e}")
    assert dl <= TOL and dloss <= TOL


def test_megatron_scaling_is_approximate_and_bounded():
    """Megatron: weight scale s^(1/3) on W1, W3, W2. Exact only where silu is linear;
    in the FFN-active regime it measurably deviates. Exact W2-only scaling does not."""
    dense = make_dense()
    rows = []
    for name, G, E, k, router, std in [("topk_softmax E'4 G2 k2 (s=2)", 2, 8, 2, "topk_softmax", 0.02),
                                       ("topk_softmax E'2 G4 k4 (s=4)", 4, 8, 4, "topk_softmax", 0.02),
                                       ("softmax_topk E8 G1 k2 zero router (s=4)", 1, 8, 2, "softmax_topk", 0.0)]:
        meg, meg_info = up(dense, granularity=G, n_experts=E, top_k=k, router=router, router_init_std=std,
                           weight_scaling="megatron")
        ex, _ = up(dense, granularity=G, n_experts=E, top_k=k, router=router, router_init_std=std,
                   weight_scaling="exact")
        assert meg_info["options"]["function_preserving"] == "approximate"
        (dm, lm), (de, _) = compare(dense, meg), compare(dense, ex)
        rows.append(f"  {name:42s} megatron max|dlogit|={dm:.3g} |dloss|={lm:.2g}; exact {de:.1e}")
        assert de <= TOL
        assert 1e-3 < dm < 3.0 and lm < 0.05
    # the same construction with G=1 topk_softmax has s=1: megatron == exact
    same, _ = up(dense, n_experts=8, top_k=2, weight_scaling="megatron")
    assert compare(dense, same)[0] <= TOL
    # in the near-linear regime of GPT's own init, the cube root is nearly right
    torch.manual_seed(0)
    small = GPT(dense_cfg()).eval()
    dm_small = compare(small, up(small, granularity=2, n_experts=8, top_k=2, weight_scaling="megatron")[0])[0]
    rows.append(f"  topk_softmax E'4 G2 k2 (s=2), GPT init (near-linear silu): max|dlogit|={dm_small:.3g}")
    print("\nMegatron cube-root scaling on SwiGLU (FFN-active regime, logit std ~1):\n" + "\n".join(rows))
    assert dm_small < 5e-3


def test_no_scaling_is_wrong_for_fine_grained():
    dense = make_dense()
    moe, moe_info = up(dense, granularity=2, n_experts=8, top_k=2, weight_scaling="none")
    assert moe_info["options"]["function_preserving"] == "approximate"
    assert compare(dense, moe)[0] > 1e-2


@pytest.mark.parametrize("G,n_shared,frac", [(1, 1, 0.5), (2, 1, 0.5), (2, 2, 0.5), (2, 3, 0.25), (1, 1, 1.0)])
def test_shared_expert_exact(G, n_shared, frac):
    """Shared + routed split the dense function per hidden unit (shared_fraction to the
    shared copies, the rest to the routed experts); G=2, n_shared=1 covers only half the
    units, which then stay wholly routed."""
    dense = make_dense()
    moe, moe_info = up(dense, granularity=G, n_experts=8, top_k=2 * G, n_shared_experts=n_shared, shared_fraction=frac)
    f = moe.blocks[0].ffn
    assert f.shared.gate_proj.weight.shape == (n_shared * D_FF // G, 32)
    dl, dloss = compare(dense, moe)
    assert dl <= TOL and dloss <= TOL
    if frac == 1.0:
        assert f.down_proj.abs().max() == 0


def test_shared_expert_silent_routed_is_exact_for_any_router():
    dense = make_dense()
    moe, moe_info = up(dense, n_experts=8, top_k=2, n_shared_experts=1, shared_fraction=1.0, router="softmax_topk")
    assert moe_info["options"]["function_preserving"] == "exact"
    assert compare(dense, moe)[0] <= TOL


def test_expert_noise_is_approximate_and_seeded():
    dense = make_dense()
    a, a_info = up(dense, n_experts=4, top_k=2, expert_noise=0.01, seed=3)
    b, _ = up(dense, n_experts=4, top_k=2, expert_noise=0.01, seed=3)
    c, _ = up(dense, n_experts=4, top_k=2, expert_noise=0.01, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["blocks.0.ffn.gate_proj"], sc["blocks.0.ffn.gate_proj"])
    assert not torch.equal(sa["blocks.0.ffn.router.weight"], sc["blocks.0.ffn.router.weight"])
    dl = compare(dense, a)[0]
    print(f"\nexpert_noise=0.01: max|dlogit|={dl:.2e}")
    assert TOL < dl < 0.2
    assert a_info["options"]["function_preserving"] == "approximate"


# ----------------------------------------------------------------------------- checkpoints and the CLI

def test_cli_writes_resumable_checkpoint(tmp_path):
    dense = make_dense()
    src = save_dense(dense, tmp_path / "dense")
    out = tmp_path / "moe"
    rc = U.main([f"--ckpt={src}", f"--out_dir={out}", "--n_experts=8", "--top_k=4", "--granularity=2",
                 "--seed=7", "--verify=false"])
    assert rc == 0
    moe, ckpt = load_model(str(out))
    assert ckpt["iter_num"] == 0 and ckpt["optimizer"] is None and ckpt["aux_coef"] is None
    assert ckpt["best_val_loss"] == 1e9
    assert ckpt["config"] == {"dataset": "multidomain", "batch_size": 4}
    uf = ckpt["upcycled_from"]
    assert uf["path"] == os.path.abspath(os.path.join(src, "ckpt.pt"))
    assert uf["sha256"] == file_sha256(src)
    assert uf["method"] == "fine_grained_virtual_groups"
    o = uf["options"]
    assert (o["n_experts"], o["top_k"], o["granularity"], o["expansion_rate"], o["seed"]) == (8, 4, 2, 4, 7)
    assert o["weight_scaling"] == "exact" and o["function_preserving"] == "exact"
    assert ckpt["model_args"]["expert_hidden"] == D_FF // 2 and ckpt["model_args"]["moe_layers"] == "all"
    dl, dloss = compare(dense, moe)
    assert dl <= TOL and dloss <= TOL
    # online upcycling with the same options gives bit-identical weights
    online, info = U.upcycle_from_checkpoint(src, {"model_args": {"n_experts": 8, "top_k": 4, "moe_layers": "all"},
                                                   "granularity": 2, "seed": 7})
    assert info["sha256"] == uf["sha256"] and info["options"] == o
    so = online.state_dict()
    assert so.keys() == ckpt["model"].keys()
    assert all(torch.equal(so[k], ckpt["model"][k]) for k in so)


def test_online_with_train_py_style_options(tmp_path):
    """train.py passes the full target model_args (ffn_hidden=0, expert_hidden=0, its own
    block_size) plus granularity / weight_scaling / expert_noise / seed."""
    dense = make_dense()
    src = save_dense(dense, tmp_path / "dense")
    target = {k: v for k, v in asdict(dense_cfg()).items()}
    target.update(ffn_hidden=0, expert_hidden=0, n_kv_head=0, moe_layers="every_other", n_experts=4, top_k=2,
                  block_size=16)
    opts = {"model_args": target, "granularity": 2, "weight_scaling": "auto", "expert_noise": 0.0, "seed": 0}
    moe, info = U.upcycle_from_checkpoint(src, opts, device="cpu")
    assert moe.config.block_size == 16 and moe.config.expert_hidden == D_FF // 2
    assert [l for l, _ in moe.moe_layers()] == [1]
    with torch.no_grad():
        a, b = dense.eval()(X[:, :16])[0], moe.eval()(X[:, :16])[0]
    assert float((a - b).abs().max()) <= TOL
    # Lory dense warm-up path: upcycle_model(dense GPT, options) -> (GPT, info)
    again, again_info = U.upcycle_model(dense, opts)
    assert again_info == {k: v for k, v in info.items() if k not in ('path', 'sha256')}
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in moe.state_dict().items())


def test_cli_subprocess_prints_summary_and_verifies(tmp_path):
    src = save_dense(make_dense(), tmp_path / "dense")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "upcycle.py"), f"--ckpt={src}",
                        f"--out_dir={tmp_path / 'moe'}", "--n_experts=4", "--top_k=2"],
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert p.returncode == 0, p.stderr
    assert "function preserving: exact" in p.stdout and "max |logit diff|" in p.stdout
    diff = float(p.stdout.rsplit(":", 1)[1])
    assert diff <= TOL


# ----------------------------------------------------------------------------- bad input

def _cli_error(capsys, argv):
    rc = U.main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture
def dense_dir(tmp_path):
    return save_dense(make_dense(), tmp_path / "dense")


@pytest.mark.parametrize("flags,needle", [
    (["--n_experts=6", "--top_k=2", "--granularity=4"], "n_experts=6 is not a multiple of granularity=4"),
    (["--n_experts=8", "--top_k=2", "--granularity=2", "--expansion_rate=3"], "does not match n_experts=8"),
    (["--n_experts=10", "--top_k=5", "--granularity=5"], "ffn_hidden=96 is not divisible by granularity=5"),
    (["--n_experts=8", "--top_k=3", "--granularity=2"], "top_k=3 must be a multiple of granularity=2"),
    (["--n_experts=4", "--top_k=2", "--granularity=2", "--router=lory"], "granularity > 1"),
    (["--n_experts=4", "--top_k=8"], "top_k=8 must be between 1 and n_experts=4"),
    (["--moe_layers=none"], "nothing to upcycle"),
    (["--moe_layers=5"], "outside 0..1"),
    (["--shared_fraction=1.5", "--n_shared_experts=1"], "shared_fraction=1.5"),
    (["--expert_impl=bogus"], "unknown expert_impl 'bogus'"),     # before anything is written
])
def test_bad_options(capsys, tmp_path, dense_dir, flags, needle):
    out = tmp_path / "out"
    line = _cli_error(capsys, [f"--ckpt={dense_dir}", f"--out_dir={out}"] + flags)
    assert needle in line
    assert not out.exists()


def test_missing_and_corrupt_checkpoint(capsys, tmp_path):
    line = _cli_error(capsys, [f"--ckpt={tmp_path / 'nope'}", f"--out_dir={tmp_path / 'o'}"])
    assert "no checkpoint" in line
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ckpt.pt").write_bytes(b"PK\x03\x04 truncated zip")
    line = _cli_error(capsys, [f"--ckpt={bad}", f"--out_dir={tmp_path / 'o'}"])
    assert "not a readable checkpoint" in line
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        U.upcycle_from_checkpoint(str(bad), {"model_args": {"moe_layers": "all"}})


def test_already_moe_checkpoint(capsys, tmp_path, dense_dir):
    U.main([f"--ckpt={dense_dir}", f"--out_dir={tmp_path / 'moe'}", "--verify=false"])
    capsys.readouterr()
    line = _cli_error(capsys, [f"--ckpt={tmp_path / 'moe'}", f"--out_dir={tmp_path / 'moe2'}"])
    assert "already an MoE model" in line
    moe, _ = load_model(str(tmp_path / "moe"))
    with pytest.raises(ValueError, match="already an MoE model"):
        U.upcycle_model(moe, {"model_args": {"moe_layers": "all"}})


def test_target_shape_mismatch_names_both(dense_dir):
    with pytest.raises(ValueError) as e:
        U.upcycle_from_checkpoint(dense_dir, {"model_args": {"moe_layers": "all", "n_embd": 64, "n_layer": 4}})
    msg = str(e.value)
    assert "n_embd=64" in msg and "n_embd=32" in msg and "n_layer=4" in msg and "n_layer=2" in msg
    assert "\n" not in msg


def test_function_errors_are_value_errors(dense_dir):
    ckpt = load_checkpoint(dense_dir)
    for opts, needle in [({"model_args": {"moe_layers": "all", "n_experts": 8, "top_k": 2}, "granularity": 5},
                          "not divisible"),
                         ({"model_args": {"moe_layers": "all"}, "weight_scaling": "cubic"}, "unknown weight_scaling"),
                         ({"model_args": {"moe_layers": "all"}, "bogus": 1}, "unknown upcycling option"),
                         ({"model_args": {"moe_layers": "all", "n_expert": 4}}, "unknown model config key")]:
        with pytest.raises(ValueError, match=needle):
            U.upcycle_state_dict(ckpt["model"], ckpt["model_args"], opts)
    sd = dict(ckpt["model"])
    sd.pop("blocks.0.ffn.up_proj.weight")
    with pytest.raises(ValueError, match="missing"):
        U.upcycle_state_dict(sd, ckpt["model_args"], {"model_args": {"moe_layers": "all"}})


def test_force(capsys, tmp_path, dense_dir):
    out = tmp_path / "moe"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(b"precious")
    before = os.stat(out / "ckpt.pt")
    line = _cli_error(capsys, [f"--ckpt={dense_dir}", f"--out_dir={out}"])
    assert "already exists" in line and "--force" in line
    assert (out / "ckpt.pt").read_bytes() == b"precious"
    assert os.stat(out / "ckpt.pt").st_mtime_ns == before.st_mtime_ns
    assert sorted(os.listdir(out)) == ["ckpt.pt"]
    assert U.main([f"--ckpt={dense_dir}", f"--out_dir={out}", "--force", "--verify=false"]) == 0
    assert load_checkpoint(str(out))["upcycled_from"]["method"] == "sparse_upcycling"
    # never the source itself, even with --force
    sha = file_sha256(dense_dir)
    line = _cli_error(capsys, [f"--ckpt={dense_dir}", f"--out_dir={dense_dir}", "--force"])
    assert "source checkpoint" in line and file_sha256(dense_dir) == sha


def test_cli_subprocess_error_exit_code(tmp_path):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "upcycle.py"), f"--ckpt={tmp_path / 'missing'}",
                        f"--out_dir={tmp_path / 'o'}"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    assert p.stderr.startswith("error: ") and len(p.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- similarity monitor

def test_similarity_identical_copies_and_noise():
    dense = make_dense()
    clean, _ = up(dense, n_experts=4, top_k=2)
    f = clean.blocks[0].ffn
    S = D.expert_similarity(f)
    assert S.shape == (4, 4) and torch.allclose(S, torch.ones(4, 4), atol=1e-5)
    assert abs(D.mean_pairwise_similarity(f) - 1.0) < 1e-5
    assert torch.allclose(D.similarity_to_dense(f, dense.blocks[0].ffn), torch.ones(4), atol=1e-5)
    sims = []
    for noise in (0.1, 0.5):
        g = up(dense, n_experts=4, top_k=2, expert_noise=noise)[0].blocks[0].ffn
        sims.append(D.mean_pairwise_similarity(g))
        to_dense = D.similarity_to_dense(g, U.dense_ffn_weights(dense.state_dict(), 0))
        assert (to_dense < 1 - 1e-4).all()
    print(f"\nmean pairwise similarity: clean 1.0, noise 0.1 -> {sims[0]:.4f}, noise 0.5 -> {sims[1]:.4f}")
    assert 1.0 > sims[0] > sims[1] > 0
    # tensors work too, and a single expert is trivially similar to itself
    assert D.expert_similarity((f.gate_proj, f.up_proj, f.down_proj)).shape == (4, 4)
    assert D.mean_pairwise_similarity(f.gate_proj[:1]) == 1.0


def test_similarity_to_dense_fine_grained_shards():
    """Fine-grained experts are compared with their own shard; the scalings (exact: W2
    only; megatron: all three) do not change the per-matrix cosine."""
    dense = make_dense()
    for ws in ("exact", "megatron"):
        f = up(dense, granularity=2, n_experts=8, top_k=2, weight_scaling=ws)[0].blocks[1].ffn
        assert torch.allclose(D.similarity_to_dense(f, dense.blocks[1].ffn), torch.ones(8), atol=1e-5)
        S = D.expert_similarity(f)
        # same shard -> 1, different shards -> unrelated random weights (~0)
        assert torch.allclose(S[0, 2], torch.tensor(1.0), atol=1e-5)
        assert abs(float(S[0, 1])) < 0.2


@pytest.mark.parametrize("G", [2, 4])
def test_mean_similarity_over_same_shard_pairs(G):
    """A noiseless fine-grained upcycle: experts e and e' hold the same shard iff
    e = e' mod G, and only those pairs were copies. Over them the mean is 1.0; over
    all pairs it is diluted by the different-shard pairs, which never were copies."""
    dense = make_dense()
    f = up(dense, granularity=G, n_experts=8, top_k=G)[0].blocks[0].ffn
    assert D.mean_pairwise_similarity(f, granularity=G) == pytest.approx(1.0, abs=1e-5)
    S = D.expert_similarity(f)
    E = 8
    same = [(a, b) for a in range(E) for b in range(E) if a != b and a % G == b % G]
    diff = [(a, b) for a in range(E) for b in range(E) if a % G != b % G]
    ref_all = (sum(float(S[a, b]) for a, b in same + diff)) / (E * (E - 1))
    assert D.mean_pairwise_similarity(f) == pytest.approx(ref_all, abs=1e-6)   # default: all pairs
    assert D.mean_pairwise_similarity(f) < 0.6
    # after noise, the same-shard mean is the mean over exactly those pairs
    g = up(dense, granularity=G, n_experts=8, top_k=G, expert_noise=0.3)[0].blocks[0].ffn
    Sg = D.expert_similarity(g)
    ref = sum(float(Sg[a, b]) for a, b in same) / len(same)
    assert D.mean_pairwise_similarity(g, granularity=G) == pytest.approx(ref, abs=1e-6) and ref < 0.99
    assert D.mean_similarity_of_pairs(Sg, G) == pytest.approx(ref, abs=1e-6)
    with pytest.raises(ValueError, match="granularity"):
        D.mean_pairwise_similarity(f, granularity=3)                    # 8 experts are not groups of 3


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_upcycle_keeps_the_dense_checkpoints_dtype(tmp_path, dtype):
    """A bf16 (fp16) dense checkpoint upcycles to a bf16 (fp16) MoE checkpoint: the new router
    rows are cast too, and the checkpoint records the dtype, so an export with --dtype=auto
    writes it. The experts are exact copies of the low-precision dense weights."""
    dense = make_dense()
    ckpt = {"model_args": asdict(dense.config), "dtype": dtype, "optimizer": None, "iter_num": 1,
            "model": {k: v.to(getattr(torch, dtype)) for k, v in dense.state_dict().items()},
            "best_val_loss": 1.0, "config": None, "rng": None, "aux_coef": None, "upcycled_from": None}
    save_checkpoint(ckpt, str(tmp_path / "dense"))
    assert U.main([f"--ckpt={tmp_path / 'dense'}", f"--out_dir={tmp_path / 'moe'}", "--n_experts=4", "--top_k=2"]) == 0
    moe = load_checkpoint(str(tmp_path / "moe"))
    assert moe["dtype"] == dtype
    assert {v.dtype for v in moe["model"].values() if v.is_floating_point()} == {getattr(torch, dtype)}
    w1 = ckpt["model"]["blocks.0.ffn.gate_proj.weight"]
    assert all(torch.equal(moe["model"]["blocks.0.ffn.gate_proj"][e], w1) for e in range(4))
