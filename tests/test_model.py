"""Model tests (docs/METHODS.md sections 1, 2, 7): MoE layer vs dense FFN, gradients,
eval-mode routing, causality, GQA, tied embeddings, parameter/FLOP counting,
config validation and two tiny training runs. Lory layers are tested elsewhere.
"""
import math
import os
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import GPT, GPTConfig, MoEFFN, SwiGLU, peak_flops  # noqa: E402
from router import ROUTERS  # noqa: E402

TINY = dict(block_size=16, vocab_size=32, n_layer=2, n_head=2, n_embd=32)


def tiny(**kw):
    return GPTConfig(**{**TINY, **kw})


def moe_from_dense(cfg, dense, seed=0):
    """MoEFFN whose every expert is a copy of `dense` (router: normal std 0.5)."""
    torch.manual_seed(seed)
    moe = MoEFFN(cfg)
    with torch.no_grad():
        torch.nn.init.normal_(moe.router.weight, std=0.5)
        for e in range(cfg.n_experts):
            moe.gate_proj[e].copy_(dense.gate_proj.weight)
            moe.up_proj[e].copy_(dense.up_proj.weight)
            moe.down_proj[e].copy_(dense.down_proj.weight)
    return moe


def dense_ffn(d, h, seed=0):
    torch.manual_seed(seed)
    ffn = SwiGLU(d, h)
    for lin in (ffn.gate_proj, ffn.up_proj, ffn.down_proj):
        torch.nn.init.normal_(lin.weight, std=0.2)
    return ffn


# ----------------------------------------------------------------------------- MoE layer vs dense

@pytest.mark.parametrize("router", ["topk_softmax", "softmax_topk", "sigmoid"])
def test_one_expert_top1_equals_dense(router):
    cfg = tiny(moe_layers="all", n_experts=1, top_k=1, expert_hidden=48, router=router)
    dense = dense_ffn(32, 48)
    moe = moe_from_dense(cfg, dense)
    x = torch.randn(3, 5, 32)
    y_moe, r = moe(x)
    y_dense, _ = dense(x)
    assert (y_moe - y_dense).abs().max().item() < 1e-6
    assert y_dense.abs().max().item() > 0.1         # not a trivially-zero comparison
    assert torch.allclose(r.gates, torch.ones(15))


@pytest.mark.parametrize("router,k", [("topk_softmax", 2), ("topk_softmax", 3), ("sigmoid", 2)])
def test_identical_experts_renormalised_equal_dense(router, k):
    cfg = tiny(moe_layers="all", n_experts=4, top_k=k, expert_hidden=48, router=router)
    dense = dense_ffn(32, 48)
    moe = moe_from_dense(cfg, dense)
    x = torch.randn(2, 7, 32)
    y_moe, r = moe(x)
    y_dense, _ = dense(x)
    assert (y_moe - y_dense).abs().max().item() < 1e-5
    assert r.gates.numel() == 14 * k
    assert len(set(r.expert_idx.tolist())) > 1     # the router really spreads tokens


def test_identical_experts_softmax_topk_shrinks_by_gate_sum():
    cfg = tiny(moe_layers="all", n_experts=4, top_k=2, expert_hidden=48, router="softmax_topk")
    dense = dense_ffn(32, 48)
    moe = moe_from_dense(cfg, dense)
    x = torch.randn(2, 7, 32)
    y_moe, r = moe(x)
    y_dense, _ = dense(x)
    gsum = torch.zeros(14).index_add(0, r.token_idx, r.gates.detach())
    assert torch.all(gsum < 1)
    assert torch.allclose(y_moe.view(14, 32), gsum[:, None] * y_dense.view(14, 32), atol=1e-6)


def test_moe_gradients_reach_router_and_all_experts():
    torch.manual_seed(0)
    cfg = tiny(moe_layers="all", n_experts=4, top_k=2, expert_hidden=16, n_shared_experts=1)
    model = GPT(cfg)
    idx = torch.randint(0, 32, (4, 16))
    _, loss, routings = model(idx, idx)
    (loss + 0.01 * sum(r.aux_losses["switch"] for r in routings)).backward()
    for _, ffn in model.moe_layers():
        assert ffn.router.weight.grad is not None and ffn.router.weight.grad.abs().sum() > 0
        for p in (ffn.gate_proj, ffn.up_proj, ffn.down_proj):
            assert p.grad is not None
            per_expert = p.grad.abs().flatten(1).sum(1)
            assert torch.all(per_expert > 0), per_expert
        assert ffn.shared.down_proj.weight.grad.abs().sum() > 0


def test_eval_keeps_router_state_and_uses_eval_capacity():
    torch.manual_seed(0)
    cfg = tiny(moe_layers="all", n_experts=4, top_k=2, expert_hidden=16, router="sigmoid",
               capacity_factor=0.5, eval_capacity_factor=0.0)
    model = GPT(cfg)
    with torch.no_grad():
        for _, ffn in model.moe_layers():
            ffn.router.expert_bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    before = [f.router.expert_bias.clone() for _, f in model.moe_layers()]
    idx = torch.randint(0, 32, (2, 16))
    model.eval()
    _, _, routings = model(idx)
    for b, (_, f) in zip(before, model.moe_layers()):
        assert torch.equal(b, f.router.expert_bias)
    for r in routings:
        assert r.stats["drop_rate"].item() == 0.0                   # eval: dropless
        assert r.gates.numel() == 2 * 16 * 2
    model.train()
    _, _, routings = model(idx)
    C = math.ceil(2 * 32 / 4 * 0.5)                                 # training capacity = 8
    for r in routings:
        assert r.stats["drop_rate"].item() >= 0.5 - 1e-6            # 4*8 slots for 64 assignments
        assert r.stats["tokens_per_expert"].max().item() <= C
    for b, (_, f) in zip(before, model.moe_layers()):
        assert torch.equal(b, f.router.expert_bias)                 # forward never updates the bias


# ----------------------------------------------------------------------------- model

def test_logits_shape_and_initial_loss():
    torch.manual_seed(0)
    for cfg in (tiny(), tiny(moe_layers="every_other", n_experts=4, top_k=2)):
        model = GPT(cfg)
        idx = torch.randint(0, 32, (3, 11))
        logits, loss, routings = model(idx)
        assert logits.shape == (3, 11, 32) and loss is None
        assert len(routings) == len(cfg.moe_layer_ids())
        tgt = torch.randint(0, 32, (3, 11))
        tgt[0, :4] = -1                                                 # ignore_index
        logits, loss, _ = model(idx, tgt)
        ref = torch.nn.functional.cross_entropy(logits.view(-1, 32), tgt.view(-1), ignore_index=-1)
        assert loss.shape == () and loss.item() == pytest.approx(ref.item(), abs=1e-6)
        assert abs(loss.item() - math.log(32)) < 0.1                    # small init ~ uniform
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_moe_layer_placement():
    assert tiny(n_layer=4).moe_layer_ids() == []
    assert tiny(n_layer=4, moe_layers="all").moe_layer_ids() == [0, 1, 2, 3]
    assert tiny(n_layer=4, moe_layers="every_other").moe_layer_ids() == [1, 3]
    assert tiny(n_layer=4, moe_layers="2, 0").moe_layer_ids() == [0, 2]
    model = GPT(tiny(n_layer=4, moe_layers="every_other", n_experts=4))
    assert [l for l, _ in model.moe_layers()] == [1, 3]
    assert isinstance(model.blocks[0].ffn, SwiGLU) and isinstance(model.blocks[1].ffn, MoEFFN)


@pytest.mark.parametrize("kw", [
    dict(),
    dict(moe_layers="all", n_experts=4, top_k=2, capacity_factor=1.0, eval_capacity_factor=0.0),
    dict(moe_layers="all", n_experts=4, top_k=2, router="sigmoid"),
    dict(moe_layers="all", n_experts=4, top_k=1, router="expert_choice", capacity_factor=1.0),
])
def test_causality_eval_dropless(kw):
    torch.manual_seed(0)
    model = GPT(tiny(**kw)).eval()
    idx = torch.randint(0, 32, (2, 16))
    base, _, _ = model(idx)
    for t in (0, 5, 14):
        idx2 = idx.clone()
        idx2[:, t + 1] = (idx2[:, t + 1] + 7) % 32
        out, _, _ = model(idx2)
        assert (out[:, : t + 1] - base[:, : t + 1]).abs().max().item() < 1e-6
        assert (out[:, t + 1] - base[:, t + 1]).abs().max().item() > 1e-4   # the change is seen


def test_gqa_equals_mha_with_repeated_kv_heads():
    torch.manual_seed(0)
    cfg_g = tiny(n_head=4, n_kv_head=2)
    cfg_m = tiny(n_head=4)
    g, m = GPT(cfg_g), GPT(cfg_m)
    hd = 32 // 4
    assert g.blocks[0].attn.k_proj.weight.shape == (2 * hd, 32)
    sd = g.state_dict()
    for key in list(sd):
        if key.endswith("k_proj.weight") or key.endswith("v_proj.weight"):
            w = sd[key].view(2, hd, 32)
            sd[key] = w.repeat_interleave(2, dim=0).reshape(4 * hd, 32)   # head h uses kv head h // 2
    m.load_state_dict(sd)
    idx = torch.randint(0, 32, (2, 16))
    assert torch.allclose(g(idx)[0], m(idx)[0], atol=1e-5)
    assert g.num_params() < m.num_params()


def test_tied_embeddings_share_storage():
    tied = GPT(tiny())
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert tied.lm_head.weight.data_ptr() == tied.tok_emb.weight.data_ptr()
    untied = GPT(tiny(tie_embeddings=False))
    assert untied.lm_head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()
    assert untied.num_params() - tied.num_params() == 32 * 32


# hand count for the config below (d=16, V=32, L=2, ffn_hidden=expert_hidden=32, layer 1 MoE E=4, k=1)
EMB = 32 * 16
ATTN = 4 * 16 * 16
NORMS = 2 * 16
FFN = 3 * 16 * 32
ROUTER = 4 * 16
TOTAL = EMB + 2 * (ATTN + NORMS) + FFN + ROUTER + 4 * FFN + 16


def count_cfg(**kw):
    return GPTConfig(**{**dict(block_size=16, vocab_size=32, n_layer=2, n_head=2, n_embd=16, ffn_hidden=32,
                               moe_layers="1", n_experts=4, top_k=1, expert_hidden=32), **kw})


def test_num_params_total_and_active():
    model = GPT(count_cfg())
    assert TOTAL == 10384
    assert model.num_params() == TOTAL
    assert model.num_params(active=True) == TOTAL - 3 * FFN == 5776
    assert model.num_params(non_embedding=True) == TOTAL - EMB
    assert model.num_params(active=True, non_embedding=True) == TOTAL - 3 * FFN - EMB
    assert GPT(count_cfg(top_k=2)).num_params(active=True) == TOTAL - 2 * FFN
    untied = GPT(count_cfg(tie_embeddings=False))
    assert untied.num_params() == TOTAL + EMB
    assert untied.num_params(non_embedding=True) == TOTAL    # the untied lm_head stays
    ec = GPT(count_cfg(router="expert_choice", capacity_factor=2.0))
    assert ec.num_params(active=True) == TOTAL - 2 * FFN
    dense = GPT(count_cfg(moe_layers="none"))
    assert dense.num_params() == dense.num_params(active=True) == TOTAL - ROUTER - 3 * FFN


def test_flops_per_token_formula():
    model = GPT(count_cfg())
    # 6 * N_active (non-embedding, plus the tied lm_head matmul) + 12 * L * d * T
    assert model.flops_per_token() == 6 * 5776 + 12 * 2 * 16 * 16 == 40800
    untied = GPT(count_cfg(tie_embeddings=False))
    # untied: the lm_head is a non-embedding parameter already; the lookup table is free
    assert untied.num_params(active=True, non_embedding=True) == 5776
    assert untied.flops_per_token() == 40800
    moe2 = GPT(count_cfg(top_k=2))
    assert moe2.flops_per_token() - model.flops_per_token() == 6 * FFN    # one more expert per token
    assert model.estimate_mfu(1000, 0.5, "NVIDIA H100 80GB HBM3") == pytest.approx(40800 * 1000 / 0.5 / 989e12)
    assert model.estimate_mfu(1000, 0.5, "cpu") is None
    assert model.estimate_mfu(1000, 0.0, "NVIDIA H100 80GB HBM3") is None


def test_flops_per_token_uses_the_training_sequence_length():
    """The attention term 12*L*d*T takes the T a run trains at, not block_size
    (a 256-token model trained at 64 would otherwise be overstated)."""
    model = GPT(count_cfg())                                            # block_size 16
    assert model.flops_per_token(seq_len=8) == 6 * 5776 + 12 * 2 * 16 * 8
    assert model.flops_per_token(seq_len=16) == model.flops_per_token() == 40800
    h100 = "NVIDIA H100 80GB HBM3"
    assert model.estimate_mfu(1000, 0.5, h100, seq_len=8) == pytest.approx(
        (6 * 5776 + 12 * 2 * 16 * 8) * 1000 / 0.5 / 989e12)
    with pytest.raises(ValueError, match="seq_len"):
        model.flops_per_token(seq_len=32)                               # longer than the model takes


def test_throughput_mfu_is_per_device_under_ddp():
    """MFU is per device: a step's global tokens are shared by world_size devices,
    each measured against one device's peak. tok/s is global."""
    model = GPT(count_cfg())
    h100 = "NVIDIA H100 80GB HBM3"
    one = model.throughput(4000, 0.5, world_size=1, seq_len=8, device_name=h100)
    four = model.throughput(4000, 0.5, world_size=4, seq_len=8, device_name=h100)
    assert one["tok_per_s"] == four["tok_per_s"] == 8000                # global
    assert four["tok_per_s_per_device"] == 2000
    assert four["mfu"] == pytest.approx(one["mfu"] / 4)
    assert four["mfu"] == pytest.approx(model.estimate_mfu(1000, 0.5, h100, seq_len=8))
    assert "mfu" not in model.throughput(4000, 0.5, world_size=4, seq_len=8, device_name="cpu")


@pytest.mark.parametrize("kind", ["dense", "moe", "lory"])
def test_flops_per_token_matches_a_flop_counter(kind):
    """flops_per_token against torch's FlopCounterMode over one forward + backward
    (SDPA on its math backend, so attention's matmuls are counted too), within 2%:
    dense, token-choice MoE, and Lory, whose expert merge costs forward and backward
    6 * (parameters merged) / segment_len per token (30% of this model's FLOPs)."""
    kw = {"dense": {}, "moe": dict(moe_layers="all", n_experts=4, top_k=2),
          "lory": dict(moe_layers="all", n_experts=8, router="lory", segment_len=8)}[kind]
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=64, n_layer=2, n_head=4, n_embd=64, **kw))
    idx = torch.randint(0, 64, (2, 64))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(idx, idx)[1].backward()
    assert counter.get_total_flops() / idx.numel() == pytest.approx(model.flops_per_token(64), rel=0.02)


def test_peak_flops_table():
    assert peak_flops(None) is None
    assert peak_flops("") is None
    assert peak_flops("cpu") is None
    assert peak_flops("NVIDIA GeForce RTX 4090") is None
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12


# ----------------------------------------------------------------------------- config validation

@pytest.mark.parametrize("kw,field", [
    (dict(moe_layers="all", n_experts=4, top_k=5), "top_k"),
    (dict(moe_layers="all", n_experts=4, top_k=0), "top_k"),
    (dict(moe_layers="all", n_experts=0), "n_experts"),
    (dict(moe_layers="all", router="switchy"), "router"),
    (dict(moe_layers="all", expert_hidden=-8), "expert_hidden"),
    (dict(moe_layers="all", router="expert_choice", capacity_factor=0.0), "capacity_factor"),
    (dict(moe_layers="all", router="expert_choice", capacity_factor=1.5), "capacity_factor"),
    (dict(moe_layers="all", n_experts=4, router="expert_choice", capacity_factor=8.0), "capacity_factor"),
    (dict(moe_layers="all", gate_norm_lambda=0.0), "gate_norm_lambda"),
    (dict(moe_layers="all", gate_norm_lambda=-1.0), "gate_norm_lambda"),
    (dict(moe_layers="all", n_experts=1, top_k=1, gate_norm_lambda=1.0), "gate_norm_lambda"),
    (dict(moe_layers="all", drop_policy="random"), "drop_policy"),
    (dict(moe_layers="all", n_shared_experts=-1), "n_shared_experts"),
    (dict(moe_layers="first,last"), "moe_layers"),
    (dict(moe_layers="0,2"), "moe_layers"),     # n_layer = 2
    (dict(moe_layers="-1"), "moe_layers"),
    (dict(moe_layers="all", router="lory", segment_len=5), "segment_len"),
    (dict(moe_layers="all", router="lory", segment_len=8, capacity_factor=1.0), "capacity_factor"),
    (dict(n_head=0), "n_head"),
    (dict(n_head=4, n_kv_head=3), "n_kv_head"),
    (dict(n_kv_head=-2), "n_kv_head"),
    (dict(n_head=3), "n_head"),
    (dict(vocab_size=0), "vocab_size"),
])
def test_bad_config_raises(kw, field):
    with pytest.raises(ValueError, match=field):
        tiny(**kw)


def test_bad_router_message_lists_valid_ones():
    with pytest.raises(ValueError) as e:
        tiny(moe_layers="all", router="switchy")
    for name in ROUTERS:
        assert name in str(e.value)


def test_config_defaults_and_from_dict():
    c = tiny(moe_layers="all", expert_hidden=0)
    assert c.ffn_hidden == 32 * math.ceil(8 * 32 / 3 / 32) == 96
    assert c.expert_hidden == c.ffn_hidden
    assert c.n_kv_head == c.n_head == 2
    assert GPTConfig.from_dict({**TINY, "n_experts": 4}).n_experts == 4
    with pytest.raises(ValueError, match="n_expert"):
        GPTConfig.from_dict({**TINY, "n_expert": 4})


# ----------------------------------------------------------------------------- training

def fixed_batch(cfg, B=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.vocab_size, (B, cfg.block_size), generator=g)
    y = torch.randint(0, cfg.vocab_size, (B, cfg.block_size), generator=g)
    return x, y


def train_steps(cfg, steps, lr=3e-3):
    torch.manual_seed(0)
    model = GPT(cfg)
    x, y = fixed_batch(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        _, loss, routings = model(x, y)
        aux = sum(r.aux_losses["switch"] for r in routings) if routings else 0.0
        opt.zero_grad(set_to_none=True)
        (loss + 0.01 * aux).backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_tiny_dense_overfits_one_batch():
    losses = train_steps(tiny(), 200)
    assert losses[0] == pytest.approx(math.log(32), abs=0.15)
    assert losses[-1] < 0.1


def test_tiny_moe_lowers_loss():
    losses = train_steps(tiny(moe_layers="all", n_experts=8, top_k=2, expert_hidden=32), 60)
    assert losses[0] == pytest.approx(math.log(32), abs=0.15)
    assert losses[-1] < 0.25 * losses[0]
