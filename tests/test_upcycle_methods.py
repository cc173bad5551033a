"""Beyond copy-upcycling: Drop-Upcycling (arXiv 2502.19261), Branch-Train-MiX
(arXiv 2403.07816), the router init distributions, the hidden-state router inits (this
repo's domain-contrast rows and mergekit-moe's gates, checked against mergekit's computation
on transformers' Llama) and the data loader's domain filter that BTX branch training needs.

Tiny models (2 layers, d=32, d_ff=96) and the synthetic 4-domain dataset of
tests/helpers.py, whose domains use disjoint slices of the vocabulary.
"""
import json
import math
import os
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import btx as B  # noqa: E402
import convert  # noqa: E402
import hf_models as H  # noqa: E402
import upcycle as U  # noqa: E402
from checkpoint import load_checkpoint, load_model, save_checkpoint  # noqa: E402
from data.dataset import TokenDataset  # noqa: E402
from helpers import make_dataset  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D_FF = 96    # GPTConfig's Llama rule for n_embd=32
VOCAB = 65   # make_dataset: eot 0 + 4 domains x 16 tokens
DOMAINS = ["dom0", "dom1", "dom2", "dom3"]


def dense_cfg(**kw):
    return GPTConfig(**{**dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=VOCAB,
                                tie_embeddings=False), **kw})


def make_dense(seed=0, **kw):
    """A dense GPT whose FFN matters: W1/W3/W2 and lm_head ~ N(0, 1/fan_in), fp32."""
    torch.manual_seed(seed)
    model = GPT(dense_cfg(**kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("gate_proj.weight", "up_proj.weight", "down_proj.weight")) or n == "lm_head.weight":
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
    return model.eval()


def save_dense(model, path, config=None):
    ckpt = {"model_args": asdict(model.config), "model": model.state_dict(), "optimizer": None, "iter_num": 100,
            "best_val_loss": 1.0, "config": config or {"dataset": "multidomain"}, "rng": None, "aux_coef": None,
            "upcycled_from": None}
    save_checkpoint(ckpt, str(path))
    return str(path)


def moe_opts(n_experts=4, top_k=2, **kw):
    return {"model_args": {"moe_layers": "all", "n_experts": n_experts, "top_k": top_k}, **kw}


def logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)[0]


X = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))


def run_cli(*args, script="upcycle.py"):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_one_line_errors(capsys, base, cases, never_written):
    """upcycle.py with base + each case's flags exits 2 with one stderr line holding its
    message, and never writes `never_written`."""
    capsys.readouterr()
    for args, msg in cases:
        rc = U.main([*base, *args])
        lines = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and msg in lines[0], (args, lines)
        assert not os.path.exists(never_written)


# ----------------------------------------------------------------------------- Drop-Upcycling

def test_drop_ratio_zero_is_copy_upcycling_bit_for_bit(tmp_path):
    dense = make_dense()
    sd, args = dense.state_dict(), asdict(dense.config)
    copy, _, info_c = U.upcycle_state_dict(sd, args, moe_opts(seed=3))
    drop0, _, info_d = U.upcycle_state_dict(sd, args, moe_opts(seed=3, drop_ratio=0.0))
    assert copy.keys() == drop0.keys()
    assert all(torch.equal(copy[k], drop0[k]) for k in copy)
    assert info_c == info_d and info_d["method"] == "sparse_upcycling"
    # and through the CLI: --method=drop --drop_ratio=0 writes copy-upcycling's weights
    src = save_dense(dense, tmp_path / "dense")
    for name, extra in (("copy", []), ("drop0", ["--method=drop", "--drop_ratio=0"])):
        rc = U.main([f"--ckpt={src}", f"--out_dir={tmp_path / name}", "--n_experts=4", "--verify=false", *extra])
        assert rc == 0
    a, b = load_checkpoint(str(tmp_path / "copy"))["model"], load_checkpoint(str(tmp_path / "drop0"))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def changed_channels(expert_w, dense_w, dim):
    """Indices of channels (rows for dim=0, columns for dim=1) where an expert differs from the dense."""
    diff = (expert_w != dense_w).any(dim=1 - dim)
    return set(torch.nonzero(diff).flatten().tolist())


@pytest.mark.parametrize("ratio", [0.25, 0.5, 1.0])
def test_drop_reinitialises_exactly_one_channel_set_per_expert(ratio):
    dense = make_dense()
    sd, args = dense.state_dict(), asdict(dense.config)
    E = 8
    state, _, info = U.upcycle_state_dict(sd, args, moe_opts(n_experts=E, drop_ratio=ratio))
    copy, _, _ = U.upcycle_state_dict(sd, args, moe_opts(n_experts=E))
    n = int(ratio * D_FF)
    assert info["method"] == "drop_upcycling" and info["options"]["drop_ratio"] == ratio
    assert info["options"]["function_preserving"] == "approximate"
    for l in range(2):
        p = f"blocks.{l}.ffn."
        w1, w3, w2 = (sd[p + m + ".weight"] for m in U.FFN_MATS)
        sets = []
        for e in range(E):
            g, u, d = state[p + "gate_proj"][e], state[p + "up_proj"][e], state[p + "down_proj"][e]
            S = changed_channels(g, w1, 0)
            assert len(S) == n                                   # floor(r * d_ff) channels
            assert changed_channels(u, w3, 0) == S                # the same set in W3 ...
            assert changed_channels(d, w2, 1) == S                # ... and in W2's columns
            keep = sorted(set(range(D_FF)) - S)
            assert torch.equal(g[keep], w1[keep]) and torch.equal(u[keep], w3[keep])
            assert torch.equal(d[:, keep], w2[:, keep])
            sets.append(frozenset(S))
        if ratio < 1:
            assert len(set(sets)) == E                            # each expert its own subset
    # routers are drawn before the re-initialisation: identical to copy-upcycling's
    assert all(torch.equal(state[k], copy[k]) for k in state if ".router." in k)


def test_drop_reinitialised_weights_have_the_replaced_weights_statistics():
    """The paper's statistical re-init: new values ~ N(mean, std^2) of the weights they replace.
    Dense matrices with distinct means and stds, so a wrong statistic (e.g. 0.02 or the
    other matrix's) fails."""
    g = torch.Generator().manual_seed(0)
    h, d, E = 256, 64, 8
    w1 = 0.3 + 0.05 * torch.randn(h, d, generator=g)
    w3 = -0.2 + 0.1 * torch.randn(h, d, generator=g)
    w2 = 0.01 + 0.02 * torch.randn(d, h, generator=g)
    stacks = (w1.expand(E, h, d), w3.expand(E, h, d), w2.expand(E, d, h))
    gate, up, down, channels = U.drop_upcycle(*stacks, 0.5, torch.Generator().manual_seed(1))
    assert channels.shape == (E, 128)
    for e in range(E):
        S = channels[e]
        for new, old in ((gate[e, S], w1[S]), (up[e, S], w3[S]), (down[e][:, S].t(), w2[:, S].t())):
            assert not torch.equal(new, old)
            # 8192 samples: the standard error of the mean is ~1% of the std
            assert abs(float(new.mean() - old.mean())) < 0.05 * float(old.std())
            assert abs(float(new.std() / old.std()) - 1) < 0.05
    # ratio 0: the very same tensors, nothing drawn from the generator
    gen = torch.Generator().manual_seed(5)
    before = gen.get_state()
    out = U.drop_upcycle(*stacks, 0.0, gen)
    assert all(a is b for a, b in zip(out[:3], stacks)) and torch.equal(gen.get_state(), before)


def test_drop_cli_matches_online_and_rejects_bad_ratio(tmp_path, capsys):
    src = save_dense(make_dense(), tmp_path / "dense")
    rc = U.main([f"--ckpt={src}", f"--out_dir={tmp_path / 'drop'}", "--method=drop", "--n_experts=4",
                 "--seed=2", "--verify=false"])
    assert rc == 0
    ckpt = load_checkpoint(str(tmp_path / "drop"))
    o = ckpt["upcycled_from"]["options"]
    assert ckpt["upcycled_from"]["method"] == "drop_upcycling" and o["drop_ratio"] == 0.5   # the default
    online, info = U.upcycle_from_checkpoint(src, moe_opts(seed=2, drop_ratio=0.5))
    assert info["options"] == o
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in online.state_dict().items())
    capsys.readouterr()
    for bad in (["--method=drop", "--drop_ratio=1.5"], ["--drop_ratio=0.5"]):   # out of range; copy + ratio
        rc = U.main([f"--ckpt={src}", f"--out_dir={tmp_path / 'bad'}", *bad])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "drop_ratio" in err[0], err
        assert not os.path.exists(tmp_path / "bad" / "ckpt.pt")


# ----------------------------------------------------------------------------- Branch-Train-MiX

@pytest.mark.parametrize("n_experts", [4, 8])
def test_btx_of_identical_branches_equals_the_dense_model(tmp_path, n_experts):
    """Mixtral gates (top-k then softmax) sum to 1 over k copies of the same FFN, and the
    float64 average of identical tensors is the tensor itself."""
    dense = make_dense()
    paths = [save_dense(dense, tmp_path / f"b{i}") for i in range(4)]
    rc = B.main([f"--branches={','.join(paths)}", f"--out_dir={tmp_path / 'btx'}",
                 f"--n_experts={n_experts}", "--verify=false"])
    assert rc == 0
    moe, ckpt = load_model(str(tmp_path / "btx"))
    assert ckpt["upcycled_from"]["method"] == "branch_train_mix"
    assert ckpt["upcycled_from"]["options"]["function_preserving"] == "exact"
    assert ckpt["upcycled_from"]["path"] is None and len(ckpt["upcycled_from"]["branch_files"]) == 4
    sd = dense.state_dict()
    assert all(torch.equal(ckpt["model"][k], v) for k, v in sd.items() if ".ffn." not in k)
    diff = float((logits(moe, X) - logits(dense, X)).abs().max())
    print(f"BTX of 4 identical branches, {n_experts} experts: max |logit diff| vs dense {diff:.2g}")
    assert diff < 1e-5, diff


def test_btx_expert_choice_scales_for_the_experts_it_routes_to(tmp_path):
    """Expert choice routes capacity_factor experts per token at eval (router.expert_choice_k),
    not top_k: with a zero router the exact scaling must use that k (E/k = 4 here, not E/2),
    as upcycle_ffn does, or the merged model computes half the dense FFN."""
    dense = make_dense()
    paths = [save_dense(dense, tmp_path / f"b{i}") for i in range(4)]
    rc = B.main([f"--branches={','.join(paths)}", f"--out_dir={tmp_path / 'btx'}", "--n_experts=4",
                 "--top_k=2", "--router=expert_choice", "--capacity_factor=1.0", "--router_init_std=0",
                 "--weight_scaling=exact", "--verify=false"])
    assert rc == 0
    moe, ckpt = load_model(str(tmp_path / "btx"))
    assert ckpt["upcycled_from"]["options"]["activation_scale"] == 4.0
    diff = float((logits(moe, X) - logits(dense, X)).abs().max())
    assert diff < 1e-5, diff


def test_btx_averages_exactly_and_takes_each_branch_ffn():
    branches = [make_dense(seed=s) for s in (1, 2, 3)]
    states = [b.state_dict() for b in branches]
    # layer 0 stays dense (its FFN is averaged too), layer 1 becomes 6 experts, 2 per branch
    opts = {"model_args": {"moe_layers": "1", "n_experts": 6, "top_k": 2}}
    state, cfg, info = B.btx_merge(states, [asdict(b.config) for b in branches], opts, names=["A", "B", "C"])
    assert info["options"]["expert_branch"] == [0, 0, 1, 1, 2, 2]
    assert info["options"]["function_preserving"] == "approximate"
    for k in states[0]:
        if k.startswith("blocks.1.ffn."):
            continue
        ref = np.mean(np.stack([s[k].numpy().astype(np.float64) for s in states]), axis=0).astype(np.float32)
        assert np.array_equal(state[k].numpy(), ref), k                   # exactly the mean
    for e, b in enumerate(info["options"]["expert_branch"]):
        w1, w3, w2 = U.dense_ffn_weights(states[b], 1)
        assert torch.equal(state["blocks.1.ffn.gate_proj"][e], w1)
        assert torch.equal(state["blocks.1.ffn.up_proj"][e], w3)
        assert torch.equal(state["blocks.1.ffn.down_proj"][e], w2)
    model = GPT(cfg)
    model.load_state_dict(state)                                           # a loadable MoE
    # the router is drawn as copy-upcycling draws it: same seed, same rows
    copy, _, _ = U.upcycle_state_dict(states[0], asdict(branches[0].config), {**opts, "model_args": {
        **opts["model_args"], "n_experts": 6}})
    assert torch.equal(state["blocks.1.ffn.router.weight"], copy["blocks.1.ffn.router.weight"])


def test_btx_takes_the_dense_seed_as_a_generalist_branch(tmp_path):
    """The seed checkpoint the branches were trained from has their shape, so it can be one
    more branch (the BTX paper's 4x7B: three domain experts and the seed Llama-2 7B): its FFN
    is an expert bit for bit and it joins the mean of the other weights. With branches that
    never moved from the seed, the merge is the seed's function again."""
    seed = make_dense(seed=5)
    branches = []
    for s in (6, 7):   # a branch: the seed with its FFNs and one attention matrix moved
        b = make_dense(seed=5)
        other = make_dense(seed=s).state_dict()
        b.load_state_dict({k: (other[k] if ".ffn." in k or k.endswith("attn.o_proj.weight") else v)
                           for k, v in b.state_dict().items()})
        branches.append(b)
    paths = [save_dense(m, tmp_path / n) for m, n in zip([seed, *branches], ("seed", "b0", "b1"))]
    assert B.main([f"--branches={','.join(paths)}", f"--out_dir={tmp_path / 'btx'}", "--n_experts=3",
                   "--verify=false"]) == 0
    ckpt = load_checkpoint(str(tmp_path / "btx"))
    assert ckpt["upcycled_from"]["options"]["expert_branch"] == [0, 1, 2]
    states = [m.state_dict() for m in (seed, *branches)]
    for l in range(2):
        for e, s in enumerate(states):
            for m, w in zip(("gate_proj", "up_proj", "down_proj"), U.dense_ffn_weights(s, l)):
                assert torch.equal(ckpt["model"][f"blocks.{l}.ffn.{m}"][e], w), (l, e, m)
    k = "blocks.0.attn.o_proj.weight"
    assert torch.equal(ckpt["model"][k], B.average_tensors([s[k] for s in states]))
    # seed + two unmoved copies of it: the seed's function (top-k-then-softmax gates sum to 1)
    same = [save_dense(seed, tmp_path / n) for n in ("s0", "s1")]
    assert B.main([f"--branches={paths[0]},{','.join(same)}", f"--out_dir={tmp_path / 'btx_same'}",
                   "--n_experts=3", "--verify=false"]) == 0
    moe, _ = load_model(str(tmp_path / "btx_same"))
    assert float((logits(moe, X) - logits(seed, X)).abs().max()) < 1e-5


@pytest.mark.parametrize("other, what", [({"vocab_size": 70, "n_embd": 64}, "vocab_size 65 vs 70; n_embd 32 vs 64")])
def test_btx_mismatch_is_one_line_naming_both_files(tmp_path, other, what):
    """In a subprocess: exit status 2 and a one-line message naming both files."""
    a = save_dense(make_dense(), tmp_path / "a")
    b = save_dense(make_dense(**other), tmp_path / "b")
    p = run_cli(f"--branches={a},{b}", f"--out_dir={tmp_path / 'btx'}", "--n_experts=4", script="btx.py")
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and what in lines[0]
    assert os.path.join(str(tmp_path), "a", "ckpt.pt") in lines[0] and os.path.join(str(tmp_path), "b", "ckpt.pt") in lines[0]
    assert not os.path.exists(tmp_path / "btx")


def test_btx_bad_inputs(tmp_path, capsys):
    a = save_dense(make_dense(), tmp_path / "a")
    b = save_dense(make_dense(seed=1), tmp_path / "b")
    moe_dir = tmp_path / "moe"
    assert U.main([f"--ckpt={a}", f"--out_dir={moe_dir}", "--n_experts=4", "--verify=false"]) == 0
    cases = [
        (B.main, [f"--branches={a}"], "2 or more"),
        (B.main, [f"--branches={a},{b}", "--n_experts=3"], "multiple of the 2 branches"),
        (B.main, [f"--branches={a},{moe_dir}"], "is an MoE checkpoint"),
        (U.main, [f"--ckpt={a},{b}"], "btx.py --branches"),
        (B.main, [f"--branches={a},{tmp_path / 'missing'}"], "no checkpoint"),
    ]
    capsys.readouterr()
    for main, args, msg in cases:
        rc = main([*args, f"--out_dir={tmp_path / 'out'}", "--verify=false"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and msg in err[0], (args, err)
        assert not os.path.exists(tmp_path / "out"), args
    states = [load_checkpoint(p) for p in (a, b)]
    with pytest.raises(ValueError, match="do not apply"):
        B.btx_merge([c["model"] for c in states], [c["model_args"] for c in states],
                    {"model_args": {"moe_layers": "all", "n_experts": 4, "top_k": 2}, "granularity": 2})


# ----------------------------------------------------------------------------- router init distribution

def test_uniform_router_init_is_the_authors_torch_rand_002(tmp_path):
    """router_init_dist=uniform draws what the Drop-Upcycling/BTX authors' torch_rand_002
    draws: u ~ U[0, 1), (u - mean(u)) * 0.02 * sqrt(12), so std 0.02 and mean 0; normal stays
    the default. Upcycle and BTX CLIs record the distribution."""
    dense = make_dense()
    sd, args = dense.state_dict(), asdict(dense.config)
    opts = moe_opts(n_experts=4, top_k=2, router_init_dist="uniform", seed=3)
    state, _, info = U.upcycle_state_dict(sd, args, opts)
    u = torch.rand(4, 32, generator=torch.Generator().manual_seed(3))    # the first draw of the seed
    ref = (u - u.mean()) * 0.02 * 12 ** 0.5
    w = state["blocks.0.ffn.router.weight"]
    assert torch.equal(w, ref) and info["options"]["router_init_dist"] == "uniform"
    assert abs(float(w.std()) - 0.02) < 0.004 and float(w.abs().max()) <= 0.02 * 12 ** 0.5
    normal, _, info_n = U.upcycle_state_dict(sd, args, moe_opts(n_experts=4, top_k=2, seed=3))
    assert info_n["options"]["router_init_dist"] == "normal"
    assert torch.equal(normal["blocks.0.ffn.router.weight"],
                       torch.randn(4, 32, generator=torch.Generator().manual_seed(3)) * 0.02)
    src = save_dense(dense, tmp_path / "dense")
    assert U.main([f"--ckpt={src}", f"--out_dir={tmp_path / 'up'}", "--n_experts=4", "--router_init_dist=uniform",
                   "--seed=3", "--verify=false"]) == 0
    assert torch.equal(load_checkpoint(str(tmp_path / "up"))["model"]["blocks.0.ffn.router.weight"], ref)
    assert B.main([f"--branches={src},{src}", f"--out_dir={tmp_path / 'btx'}", "--n_experts=4",
                   "--router_init_dist=uniform", "--seed=3", "--verify=false"]) == 0
    ckpt = load_checkpoint(str(tmp_path / "btx"))
    assert ckpt["upcycled_from"]["options"]["router_init_dist"] == "uniform"
    assert torch.equal(ckpt["model"]["blocks.0.ffn.router.weight"], ref)
    with pytest.raises(ValueError, match="router_init_dist='cauchy' must be one of normal, uniform"):
        U.upcycle_state_dict(sd, args, moe_opts(router_init_dist="cauchy"))


# ----------------------------------------------------------------------------- router init from hidden states

@pytest.fixture(scope="module")
def four_domains(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("data") / "four"), n_docs=80, vocab=VOCAB, n_domains=4)


def own_expert_rate(model, data_dir, layer, n_windows=16):
    """Share of held-out (val) tokens of each domain whose top-1 expert at `layer` is the
    expert of that domain (expert e <-> DOMAINS[e]); read from the model's own routing."""
    rates = []
    for d, name in enumerate(DOMAINS):
        x, _ = TokenDataset(data_dir, "val", domains=name).get_batch(n_windows, 32, torch.Generator().manual_seed(9))
        model.eval()
        with torch.no_grad():
            r = model(x)[2][layer]
        assert torch.equal(r.token_idx, torch.arange(x.numel()))   # top-1, dropless: one assignment per token
        rates.append(float((r.expert_idx == d).float().mean()))
    return rates


@pytest.fixture(scope="module")
def trained_dense(four_domains):
    """A dense model trained 50 AdamW steps on the 4 domains (~1 s): enough for its hidden
    states to tell the domains apart, which a random model's barely do (its FFN inputs are
    mostly the current token's random embedding)."""
    torch.manual_seed(0)
    model = GPT(dense_cfg())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ds, g = TokenDataset(four_domains, "train"), torch.Generator().manual_seed(0)
    for _ in range(50):
        x, y = ds.get_batch(8, 32, g)
        loss = model(x, y)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_hidden_router_init_sends_domain_tokens_to_their_expert(four_domains, trained_dense):
    dense = trained_dense
    model, _ = U.upcycle_model(dense, moe_opts(n_experts=4, top_k=1))
    before = [own_expert_rate(model, four_domains, l) for l in range(2)]
    info = U.router_init_hidden(model, four_domains, "dom0,dom1,dom2,dom3", n_windows=16)
    assert info["router_init"] == "hidden" and info["router_init_domains"] == DOMAINS
    # reference rows from the FFN inputs a forward hook sees (the same windows: seed 0)
    seen = {}
    hooks = [ffn.register_forward_hook(lambda m, inp, out, l=l: seen.setdefault(l, []).append(inp[0]))
             for l, ffn in model.moe_layers()]
    with torch.no_grad():
        for name in DOMAINS:
            model(TokenDataset(four_domains, "train", domains=name).get_batch(16, 32, torch.Generator().manual_seed(0))[0])
    for hk in hooks:
        hk.remove()
    for l, ffn in model.moe_layers():
        m = torch.stack([h.reshape(-1, 32).mean(0) for h in seen[l]])          # (4 domains, d)
        c = m - m.mean(0)
        u = m.mean(0) / m.mean(0).norm()
        c = c - torch.outer(c @ u, u)                                          # orthogonal to the mean
        ref = c / c.norm(dim=1, keepdim=True)
        assert torch.allclose(ffn.router.weight.detach(), ref, atol=1e-5)
        rates = own_expert_rate(model, four_domains, l)
        print(f"layer {l}: own-expert rate per domain {np.round(rates, 3)} (random router {np.round(before[l], 3)})")
        assert min(rates) > 0.5, rates                                       # chance is 1/4
    # still the dense function: top-1 softmax gates are 1 whatever the router says
    assert float((logits(model, X) - logits(dense, X)).abs().max()) < 1e-5


def test_own_domain_routing_of_hidden_and_mergekit_rows_against_a_random_router(four_domains, trained_dense):
    """The measurement behind docs/METHODS.md: share of held-out tokens whose top-1 expert is
    their own domain's, for a random router, this repo's domain-contrast rows (hidden) and
    mergekit's gates (16 windows of 32 tokens of the expert's domain as its positive prompts,
    no negatives). mergekit's rows keep full rank E; the centred hidden rows have rank E-1."""
    rows = {}
    for name in ("random", "hidden", "mergekit_hidden", "mergekit_hidden_avg"):
        model, _ = U.upcycle_model(trained_dense, moe_opts(n_experts=4, top_k=1))
        if name == "hidden":
            U.router_init_hidden(model, four_domains, "dom0,dom1,dom2,dom3", n_windows=16)
        elif name != "random":
            prompts = [([w.tolist() for w in TokenDataset(four_domains, "train", domains=d).get_batch(
                16, 32, torch.Generator().manual_seed(0))[0]], []) for d in DOMAINS]
            gates = U.mergekit_router_rows(trained_dense, prompts, last_token=name == "mergekit_hidden")
            with torch.no_grad():
                for l, ffn in model.moe_layers():
                    ffn.router.weight.copy_(gates[l])
        rows[name] = [ffn.router.weight.detach().clone() for _, ffn in model.moe_layers()]
        rates = [np.mean(own_expert_rate(model, four_domains, l)) for l in range(2)]
        print(f"{name:20s} own-domain top-1 rate per layer {np.round(rates, 3)} (chance 0.25)")
    for l in range(2):
        assert int(torch.linalg.matrix_rank(rows["mergekit_hidden"][l])) == 4
        assert int(torch.linalg.matrix_rank(rows["hidden"][l])) <= 3


def test_hidden_router_for_btx_branches_from_their_configs(tmp_path, four_domains):
    """Each BTX branch records its domain (config['domains']); experts of branch b get b's row."""
    dense = make_dense(seed=4)
    paths = [save_dense(dense, tmp_path / f"b{i}", config={"domains": DOMAINS[i]}) for i in range(4)]
    rc = B.main([f"--branches={','.join(paths)}", f"--out_dir={tmp_path / 'btx'}", "--n_experts=4",
                 "--top_k=2", "--router_init=hidden", f"--data_dir={four_domains}"])   # and --verify
    assert rc == 0
    moe, ckpt = load_model(str(tmp_path / "btx"))
    o = ckpt["upcycled_from"]["options"]
    assert o["router_init_domains"] == list(DOMAINS)
    w = ckpt["model"]["blocks.0.ffn.router.weight"]
    assert all(not torch.equal(w[a], w[b]) for a in range(4) for b in range(a))   # one domain's row each


def test_hidden_router_rows_run_each_block_once_per_domain():
    """The windows go through the blocks once (each layer's rows are read on the way), not
    once per MoE layer: on a 4-layer model every attention runs once per domain, and the
    rows equal those recomputed from scratch for each layer with the earlier rows set."""
    torch.manual_seed(0)
    dense = GPT(dense_cfg(n_layer=4))
    model, _ = U.upcycle_model(dense, moe_opts(n_experts=4, top_k=2))
    g = torch.Generator().manual_seed(1)
    windows = {d: torch.randint(0, VOCAB, (4, 32), generator=g) for d in ("x", "y", "z")}
    calls = [0] * 4
    hooks = [b.attn.register_forward_hook(lambda m, i, o, l=l: calls.__setitem__(l, calls[l] + 1))
             for l, b in enumerate(model.blocks)]
    rows = U.hidden_router_rows(model, windows, ["x", "y", "z", "x"])
    for hk in hooks:
        hk.remove()
    assert calls == [3, 3, 3, 3], calls
    for l in range(4):   # the FFN input of layer l, from the embeddings up, with the rows as set
        h = {}
        for d, w in windows.items():
            x = model.tok_emb(w)
            for b in model.blocks[:l]:
                x, _ = b(x, model.rope_cos, model.rope_sin)
            b = model.blocks[l]
            h[d] = b.ffn_norm(x + b.attn(b.attn_norm(x), model.rope_cos, model.rope_sin)).mean((0, 1))
        ref = U.domain_contrast(torch.stack([h[d] for d in ("x", "y", "z")]))[torch.tensor([0, 1, 2, 0])]
        assert torch.equal(rows[l], ref.detach()), l


def test_hidden_windows_take_the_source_run_block_size_or_the_flag(tmp_path, four_domains, capsys):
    """The CLI's hidden-state windows are --hidden_block_size tokens, else the block_size the
    source was trained at (its config), never the model's context when that is longer."""
    dense = make_dense(seed=4, block_size=64)
    src = save_dense(dense, tmp_path / "dense", config={"block_size": 16})
    base = [f"--ckpt={src}", "--n_experts=4", "--router_init=hidden", "--domains=dom0,dom1,dom2,dom3",
            f"--data_dir={four_domains}", "--verify=false"]
    for name, extra, T in [("trained", [], 16), ("flag", ["--hidden_block_size=8"], 8)]:
        assert U.main([*base, f"--out_dir={tmp_path / name}", *extra]) == 0
        o = load_checkpoint(str(tmp_path / name))["upcycled_from"]["options"]
        assert o["router_init_tokens_per_domain"] == 16 * T
        assert f"{16 * T} tokens per domain" in capsys.readouterr().out


def test_hidden_router_bad_inputs(tmp_path, four_domains, capsys):
    src = save_dense(make_dense(), tmp_path / "dense")
    base = [f"--ckpt={src}", f"--out_dir={tmp_path / 'out'}", "--n_experts=4", "--expert_noise=0.01"]   # copies differ
    data = f"--data_dir={four_domains}"
    cases = [
        ([data, "--router_init=hidden"], "--domains"),
        ([data, "--router_init=hidden", "--domains=dom0,code"], "unknown domain(s) code"),
        ([data, "--router_init=hidden", "--domains=dom0,dom1,dom2"], "divides n_experts=4"),
        ([data, "--router_init=hidden", "--domains=dom1"], "at least 2 different domains"),
        ([data, "--domains=dom0,dom1"], "--router_init=hidden only"),
        ([data, "--router_init=hidden", "--domains=dom0,dom1", "--expert_noise=0"],   # as train.py refuses it
         "--router_init='hidden' with 2 domains for 4 copies"),
        ([f"--data_dir={tmp_path / 'nodata'}", "--router_init=hidden", "--domains=dom0,dom1"], "does not exist"),
    ]
    assert_one_line_errors(capsys, base, cases, tmp_path / "out" / "ckpt.pt")


# ----------------------------------------------------------------------------- mergekit-moe's hidden gates

def mergekit_gate_params(hf_model, tok, experts, average):
    """Reference: mergekit/moe/router.py get_gate_params for gate_mode hidden (average=False)
    or hidden_avg, run on the transformers model. experts: [(positive texts, negative texts)].
    Returns (n_layer, n_experts, d)."""
    def states(prompts):
        batch = tok([(tok.bos_token or "") + p for p in prompts], return_tensors="pt", padding=True,
                    add_special_tokens=False)
        with torch.no_grad():
            out = hf_model(**batch, output_hidden_states=True, return_dict=True)
        h = torch.stack(out.hidden_states[:-1])                       # (L, B, T, d)
        h = h.sum(dim=2) / h.shape[2] if average else h[:, :, -1, :]
        return h.sum(dim=1) / h.shape[1]                              # (L, d)
    vecs = []
    for positive, negative in experts:
        v = states(positive)
        if negative:
            v -= states(negative)
        v /= v.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)
        vecs.append(v)
    return torch.stack(vecs, dim=0).permute(1, 0, 2)


@pytest.fixture(scope="module")
def imported_llama(tmp_path_factory):
    """(transformers LlamaForCausalLM, its tokenizer, the model imported with convert.py)."""
    base = tmp_path_factory.mktemp("mergekit")
    hf = H.random_model(H.hf_config("llama"), seed=3)
    H.save(hf, str(base / "hf"))
    convert.import_hf(str(base / "hf"), str(base / "dense"))
    tok = AutoTokenizer.from_pretrained(str(base / "hf"))
    tok.pad_token = tok.eos_token
    return hf, tok, str(base / "dense")


EXPERT_TEXTS = [(["w5 w6 w7 w8", "w9 w5 w6 w10"], ["w40 w41 w42 w43"]),
                (["w20 w21 w22 w23", "w24 w25 w20 w21"], []),
                (["w60 w61 w62 w63", "w64 w65 w66 w60"], ["w5 w6 w7 w8", "w20 w21 w22 w23"]),
                (["w100 w101 w102 w103", "w110 w111 w112 w113"], [])]


@pytest.mark.parametrize("mode", ["mergekit_hidden", "mergekit_hidden_avg"])
def test_mergekit_hidden_rows_match_mergekit_reference(imported_llama, tmp_path, mode):
    """upcycle.py --router_init=mergekit_hidden(_avg) --prompts=FILE: every router row has
    cosine >= 0.99 with mergekit's gate vector computed on the transformers model (residual
    stream entering each layer, last token / token average, mean over prompts, negatives
    subtracted, L2-normalised, no centring)."""
    hf, tok, dense = imported_llama
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"positive_prompts": p, "negative_prompts": n} for p, n in EXPERT_TEXTS]))
    out = tmp_path / "moe"
    assert U.main([f"--ckpt={dense}", f"--out_dir={out}", "--n_experts=8", "--top_k=2", f"--router_init={mode}",
                   f"--prompts={prompts}", "--verify=false"]) == 0
    ckpt = load_checkpoint(str(out))
    o = ckpt["upcycled_from"]["options"]
    assert o["router_init"] == mode and o["router_init_prompt_entries"] == [0, 0, 1, 1, 2, 2, 3, 3]
    ref = mergekit_gate_params(hf, tok, EXPERT_TEXTS, average=mode.endswith("avg"))     # (L, 4, d)
    for l in range(2):
        rows = ckpt["model"][f"blocks.{l}.ffn.router.weight"].float()                    # (8, d)
        cos = torch.nn.functional.cosine_similarity(rows, ref[l].repeat_interleave(2, dim=0), dim=-1)
        print(f"{mode} layer {l}: cosine to mergekit's gates per row {cos.numpy().round(5)}")
        assert float(cos.min()) >= 0.99, cos
    # the function is still the dense one (top-k then softmax gates sum to 1 over copies)
    assert ckpt["upcycled_from"]["options"]["function_preserving"] == "exact"


def test_mergekit_hidden_bad_inputs(imported_llama, tmp_path, capsys):
    _, _, dense = imported_llama
    good = tmp_path / "good.json"
    good.write_text(json.dumps([{"positive_prompts": ["w5"]}, {"positive_prompts": ["w6"]}]))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"positive_prompts": ["w5"]}))
    three = tmp_path / "three.json"
    three.write_text(json.dumps([{"positive_prompts": ["w5"]}] * 3))
    base = [f"--ckpt={dense}", f"--out_dir={tmp_path / 'out'}", "--n_experts=4", "--verify=false"]
    cases = [(["--router_init=mergekit_hidden"], "--prompts=FILE goes with"),
             ([f"--prompts={good}"], "--prompts=FILE goes with"),
             (["--router_init=mergekit_hidden", f"--prompts={bad}"], "cannot be used"),
             (["--router_init=mergekit_hidden", f"--prompts={tmp_path / 'none.json'}"], "cannot be used"),
             (["--router_init=mergekit_hidden", f"--prompts={three}"], "divides n_experts=4")]
    assert_one_line_errors(capsys, base, cases, tmp_path / "out" / "ckpt.pt")
    a = save_dense(make_dense(), tmp_path / "a")
    assert B.main([f"--branches={a},{a}", f"--out_dir={tmp_path / 'btx'}", "--n_experts=2", "--verify=false",
                   "--router_init=mergekit_hidden", f"--prompts={good}"]) == 2
    assert "a BTX merge has several" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the loader's domain filter

def test_domain_filter_samples_only_that_domain(four_domains):
    band = (VOCAB - 1) // 4
    for d, name in enumerate(DOMAINS):
        ds = TokenDataset(four_domains, "train", domains=name)
        x, y = ds.get_batch(64, 32, torch.Generator().manual_seed(0))
        toks = torch.cat([x, y]).unique()
        inside = (toks == 0) | ((toks >= 1 + d * band) & (toks < 1 + (d + 1) * band))   # eot or the domain's slice
        assert bool(inside.all()), (name, toks)
        full = TokenDataset(four_domains, "train")
        assert len(ds) == int(full.index[full.index[:, 2] == d, 1].sum())
        for _, _, dom in ds.fixed_batches(2, 4, 32):
            assert bool((dom == d).all())


def test_no_filter_keeps_the_stream_and_all_domains_equal_no_filter(four_domains):
    plain = TokenDataset(four_domains, "train")
    every = TokenDataset(four_domains, "train", domains=DOMAINS)
    g1, g2, g3 = (torch.Generator().manual_seed(7) for _ in range(3))
    tokens = np.fromfile(os.path.join(four_domains, "train.bin"), dtype=np.uint16).astype(np.int64)
    for _ in range(3):
        x, y = plain.get_batch(4, 32, g1)
        starts = torch.randint(len(tokens) - 32, (4,), generator=g3).numpy()   # the nanoGPT draw
        assert torch.equal(x, torch.from_numpy(tokens[starts[:, None] + np.arange(32)]))
        assert torch.equal(y, torch.from_numpy(tokens[starts[:, None] + 1 + np.arange(32)]))
        x2, y2 = every.get_batch(4, 32, g2)
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.equal(g1.get_state(), g2.get_state())


def test_domain_filter_errors(four_domains):
    with pytest.raises(ValueError, match=r"unknown domain\(s\) code for .*choose from dom0, dom1, dom2, dom3"):
        TokenDataset(four_domains, "train", domains="code")
    with pytest.raises(ValueError, match="names no domain"):
        TokenDataset(four_domains, "train", domains=",")
    ds = TokenDataset(four_domains, "val", domains="dom0")
    with pytest.raises(ValueError, match=r"domains dom0\) has \d+ tokens, too few"):
        ds.get_batch(1, len(ds) + 5, torch.Generator())
