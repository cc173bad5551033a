"""Router tests (docs/METHODS.md sections 2, 3, 5): every router against a brute-force
reference on hand-built logits, capacity/dropping, the auxiliary losses, adaptive
coefficients, gating-logit normalisation, noise and fp32 routing under autocast.

Trick used throughout: a Router with n_embd == n_experts and weight = I has
logits z = x exactly, so hand-built x *are* the router logits.
Lory (SegmentRouter) is tested elsewhere.
"""
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from router import (AdaptiveAuxCoef, Router, capacity_keep_mask, expert_capacity, expert_choice_k,  # noqa: E402
                    routing_stats, skywork_loss, switch_loss, z_loss)


def identity_router(E, k, router_type="topk_softmax", **kw):
    """Router whose logits equal its input (weight = I_E)."""
    r = Router(E, E, k, router_type, **kw)
    with torch.no_grad():
        r.weight.copy_(torch.eye(E))
    return r


def assignments(routing, T, E):
    """Dense (T, E) gate matrix from the flat assignment list (0 where not assigned)."""
    G = torch.zeros(T, E)
    G[routing.token_idx, routing.expert_idx] = routing.gates.detach()
    return G


# A hand-built 4-token, 4-expert logit matrix with distinct values per row.
Z = torch.tensor([[2.0, 1.0, 0.0, -1.0],
                  [0.0, 3.0, 1.0, 0.5],
                  [-1.0, 0.0, 0.5, 2.5],
                  [1.0, 1.5, 2.0, 0.2]])
TOP2 = [{0, 1}, {1, 2}, {3, 2}, {2, 1}]   # by hand


# ----------------------------------------------------------------------------- gate orders

def test_topk_softmax_matches_bruteforce():
    r = identity_router(4, 2, "topk_softmax")
    out = r(Z)
    T, E = Z.shape
    G = assignments(out, T, E)
    for t in range(T):
        chosen = set(out.expert_idx[out.token_idx == t].tolist())
        assert chosen == TOP2[t]
        idx = sorted(TOP2[t])
        ref = torch.softmax(Z[t, idx], dim=0)               # softmax over the chosen logits
        assert torch.allclose(G[t, idx], ref, atol=1e-6)
    assert torch.allclose(G.sum(1), torch.ones(T), atol=1e-6)
    # identical to softmax -> top-k -> renormalise (Skywork eq. 2)
    p = torch.softmax(Z, -1)
    v, i = p.topk(2, -1)
    ref = torch.zeros(T, E).scatter(1, i, v / v.sum(-1, keepdim=True))
    assert torch.allclose(G, ref, atol=1e-6)
    # hand value for token 0: logits 2, 1 -> gates e/(e+1), 1/(e+1)
    assert G[0, 0].item() == pytest.approx(math.e / (math.e + 1), abs=1e-6)
    assert G[0, 1].item() == pytest.approx(1 / (math.e + 1), abs=1e-6)


def test_softmax_topk_no_renormalisation():
    r = identity_router(4, 2, "softmax_topk")
    out = r(Z)
    G = assignments(out, 4, 4)
    p = torch.softmax(Z, -1)
    for t in range(4):
        assert set(out.expert_idx[out.token_idx == t].tolist()) == TOP2[t]
        idx = sorted(TOP2[t])
        assert torch.allclose(G[t, idx], p[t, idx], atol=1e-6)
    sums = G.sum(1)
    assert torch.all(sums < 1.0)
    assert torch.allclose(sums, p.topk(2, -1).values.sum(-1), atol=1e-6)
    # token 0: softmax([2,1,0,-1]) top-2 sum by hand
    den = math.exp(2) + math.exp(1) + 1 + math.exp(-1)
    assert sums[0].item() == pytest.approx((math.exp(2) + math.exp(1)) / den, abs=1e-6)


def test_sigmoid_router_gates():
    r = identity_router(4, 2, "sigmoid")
    out = r(Z)
    G = assignments(out, 4, 4)
    s = torch.sigmoid(Z)
    for t in range(4):
        assert set(out.expert_idx[out.token_idx == t].tolist()) == TOP2[t]
        idx = sorted(TOP2[t])
        assert torch.allclose(G[t, idx], s[t, idx] / s[t, idx].sum(), atol=1e-6)
    assert torch.allclose(G.sum(1), torch.ones(4), atol=1e-6)


def test_sigmoid_bias_affects_selection_only():
    r = identity_router(4, 2, "sigmoid")
    x = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    with torch.no_grad():
        r.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))   # force expert 3 in
    out = r(x)
    assert set(out.expert_idx.tolist()) == {0, 3}
    s = torch.sigmoid(x[0])
    G = assignments(out, 1, 4)[0]
    # gates from the *unbiased* scores, renormalised over the chosen pair
    assert G[0].item() == pytest.approx((s[0] / (s[0] + s[3])).item(), abs=1e-6)
    assert G[3].item() == pytest.approx((s[3] / (s[0] + s[3])).item(), abs=1e-6)
    assert G[3].item() < 0.5   # the biased-in expert still has the smaller gate


def test_expert_bias_is_buffer_without_gradient():
    torch.manual_seed(0)
    r = Router(8, 4, 2, "sigmoid")
    assert "expert_bias" in dict(r.named_buffers())
    assert "expert_bias" not in dict(r.named_parameters())
    assert not r.expert_bias.requires_grad
    x = torch.randn(16, 8)
    out = r(x)
    (out.gates * torch.arange(out.gates.numel()).float()).sum().backward()
    assert r.expert_bias.grad is None
    assert r.weight.grad is not None and r.weight.grad.abs().sum() > 0


def test_update_expert_bias_sign_rule():
    r = identity_router(4, 1, "sigmoid")
    r.update_expert_bias(torch.tensor([5, 1, 2, 0]), gamma=0.1)   # mean load 2
    assert torch.allclose(r.expert_bias, torch.tensor([-0.1, 0.1, 0.0, 0.1]))
    r.update_expert_bias(torch.tensor([5, 1, 2, 0]), gamma=0.1)
    assert torch.allclose(r.expert_bias, torch.tensor([-0.2, 0.2, 0.0, 0.2]))


def test_update_expert_bias_moves_towards_balance():
    torch.manual_seed(0)
    E, T = 4, 64
    r = identity_router(E, 1, "sigmoid")
    x = torch.randn(T, E) * 0.5 + torch.tensor([1.0, 0.3, 0.0, -0.5])   # expert 0 favoured
    cv0 = r(x).stats["load_cv"].item()
    load0 = r(x).stats["tokens_per_expert"]
    for _ in range(100):
        r.update_expert_bias(r(x).stats["tokens_per_expert"], gamma=0.01)
    stats = r(x).stats
    assert load0[0] > T / E and stats["tokens_per_expert"][0] < load0[0]
    assert r.expert_bias[0] < 0 and r.expert_bias[3] > 0
    assert stats["load_cv"].item() < 0.5 * cv0


def skewed_x(demand, E=4):
    """Identity-router input whose top-1 choice gives `demand` tokens per expert,
    expert e's tokens scoring 2 on e and a distinct small value elsewhere."""
    rows = []
    for e, n in enumerate(demand):
        for i in range(n):
            row = torch.full((E,), -1.0 - 0.01 * i)
            row[e] = 2.0 - 0.01 * i
            rows.append(row)
    return torch.stack(rows)


def test_routing_stats_report_demand_before_capacity():
    """The stats report demand and load apart: demand [40, 14, 3, 3] with C = ceil(60/4 * 1.25) = 19."""
    r = identity_router(4, 1, "sigmoid", capacity_factor=1.25)
    out = r(skewed_x([40, 14, 3, 3]))
    assert out.stats["tokens_per_expert"].tolist() == [19, 14, 3, 3]     # after dropping
    assert out.stats["demand_per_expert"].tolist() == [40, 14, 3, 3]     # before
    d = torch.tensor([40.0, 14, 3, 3])
    assert out.stats["demand_cv"].item() == pytest.approx((d.std(unbiased=False) / d.mean()).item(), rel=1e-6)
    assert out.stats["load_cv"].item() < out.stats["demand_cv"].item()  # clipping hides imbalance


def test_update_expert_bias_from_demand_has_the_right_sign():
    """DeepSeek-V3 balances assigned load. On the clipped load [19, 14, 3, 3] (mean 9.75)
    expert 1 looks over-loaded and would be pushed down; on the demand (mean 15) it is
    under-loaded and goes up."""
    r = identity_router(4, 1, "sigmoid", capacity_factor=1.25)
    out = r(skewed_x([40, 14, 3, 3]))
    r.update_expert_bias(out.stats["demand_per_expert"], gamma=0.1)
    assert torch.allclose(r.expert_bias, torch.tensor([-0.1, 0.1, 0.1, 0.1]))


@pytest.mark.parametrize("router_type", ["topk_softmax", "sigmoid"])
def test_adaptive_drop_rate_when_dropless_is_the_capacity_1_rate(router_type):
    """Dropless drops nothing, so Skywork's controller is fed the drop rate
    capacity factor 1 would give: C = 60/4 = 15, expert 0 overflows by 40 - 15 = 25."""
    r = identity_router(4, 1, router_type, capacity_factor=0.0)
    out = r(skewed_x([40, 14, 3, 3]))
    assert out.stats["drop_rate"].item() == 0.0
    assert out.stats["adaptive_drop_rate"].item() == pytest.approx(25 / 60)
    c = AdaptiveAuxCoef(1)
    for _ in range(300):
        c.update([out.stats["adaptive_drop_rate"]])
    assert c.alpha[0] == pytest.approx(0.01)                            # balancing stays on
    # with a capacity the controller reads the actual drop rate (40 - 19 = 21 of 60)
    r.capacity_factor = 1.25
    out = r(skewed_x([40, 14, 3, 3]))
    assert out.stats["drop_rate"].item() == pytest.approx(21 / 60)
    assert out.stats["adaptive_drop_rate"].item() == pytest.approx(21 / 60)
    # balanced routing: nothing to drop at capacity 1 either
    r.capacity_factor = 0.0
    assert r(skewed_x([15, 15, 15, 15])).stats["adaptive_drop_rate"].item() == 0.0


# ----------------------------------------------------------------------------- expert choice

@pytest.mark.parametrize("T,E,cf", [(8, 4, 1.0), (10, 4, 1.0), (12, 3, 0.5), (6, 4, 2.0)])
def test_expert_choice_capacity_and_bruteforce(T, E, cf):
    torch.manual_seed(T + E)
    r = identity_router(E, 1, "expert_choice", capacity_factor=cf)
    r.train()
    x = torch.randn(T, E)
    out = r(x)
    C = math.ceil(T * cf / E)
    counts = torch.bincount(out.expert_idx, minlength=E)
    assert counts.tolist() == [C] * E
    p = torch.softmax(x, -1)
    for e in range(E):
        toks = out.token_idx[out.expert_idx == e]
        ref = p[:, e].topk(C).indices
        assert set(toks.tolist()) == set(ref.tolist())
        assert torch.allclose(out.gates[out.expert_idx == e].detach(), p[toks, e], atol=1e-6)
    covered = torch.zeros(T, dtype=torch.bool)
    covered[out.token_idx] = True
    assert out.stats["drop_rate"].item() == pytest.approx(1 - covered.float().mean().item())


@pytest.mark.parametrize("cf", [1.0, 2.0])
def test_expert_choice_eval_falls_back_to_token_choice_with_k_cf(cf):
    """Training gives each token cf experts on average (E experts x C = T*cf/E
    tokens); the causal eval fallback is token-choice top-k with k = cf, whatever
    top_k says, so it evaluates the compute the model trained with."""
    r = identity_router(4, 2, "expert_choice", capacity_factor=cf)
    r.train()
    assert r(Z).token_idx.numel() / 4 == cf                           # experts per token in training
    r.eval()
    out = r(Z)
    k = int(cf)
    G = assignments(out, 4, 4)
    p = torch.softmax(Z, -1)
    assert out.token_idx.tolist() == [t for t in range(4) for _ in range(k)]   # k per token
    for t in range(4):
        idx = p[t].topk(k).indices.tolist()
        assert set(out.expert_idx[out.token_idx == t].tolist()) == set(idx)
        assert torch.allclose(G[t, idx], p[t, idx], atol=1e-6)         # softmax-then-topk gates
    assert out.stats["drop_rate"].item() == 0.0


@pytest.mark.parametrize("cf", [0.5, 1.5, 5.0])
def test_expert_choice_eval_needs_a_whole_capacity_factor(cf):
    r = identity_router(4, 2, "expert_choice", capacity_factor=cf)
    r.train()
    r(Z)                                                               # training takes any cf > 0
    r.eval()
    with pytest.raises(ValueError, match="capacity_factor"):
        r(Z)
    assert expert_choice_k(2.0, 4) == 2


def test_expert_choice_eval_can_route_as_in_training():
    """eval_expert_choice=True: eval mode (no noise, no dropout) with the training
    routing, so eval can report the loss the model trained with beside the causal one."""
    torch.manual_seed(0)
    r = identity_router(4, 2, "expert_choice", capacity_factor=1.0)
    x = torch.randn(12, 4)
    ref = r.train()(x)
    r.eval()
    r.eval_expert_choice = True
    out = r(x)
    for a, b in [(out.token_idx, ref.token_idx), (out.expert_idx, ref.expert_idx), (out.gates, ref.gates)]:
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- capacity

def test_expert_capacity_formula():
    assert expert_capacity(10, 4, 2, 1.25) == math.ceil(2 * 10 / 4 * 1.25) == 7
    assert expert_capacity(8, 8, 1, 1.0) == 1
    assert expert_capacity(7, 2, 1, 1.0) == 4
    assert expert_capacity(100, 8, 2, 1.0) == 25
    assert expert_capacity(100, 2, 1, 1.1) == 55 and expert_capacity(100, 2, 2, 1.1) == 110   # not 56 / 111
    assert expert_capacity(10, 4, 2, 0.0) is None
    assert expert_capacity(10, 4, 2, -1.0) is None


# all four tokens want expert 0; their router probabilities for it are 0.6, 0.9, 0.7, 0.8
P0 = torch.tensor([0.6, 0.9, 0.7, 0.8])
X_CAP = torch.stack([torch.log(P0), torch.log(1 - P0)], dim=1)   # softmax(x)[:, 0] = P0


@pytest.mark.parametrize("policy,kept", [("probs", [1, 3]), ("position", [0, 1])])
def test_capacity_dropping_by_hand(policy, kept):
    r = identity_router(2, 1, "softmax_topk", capacity_factor=1.0, drop_policy=policy)
    r.train()
    out = r(X_CAP)   # C = ceil(1*4/2*1) = 2 slots on expert 0, demand 4
    assert sorted(out.token_idx.tolist()) == kept
    assert out.expert_idx.tolist() == [0, 0]
    assert torch.allclose(out.gates.detach().sort().values, P0[kept].sort().values, atol=1e-6)
    assert out.stats["drop_rate"].item() == pytest.approx(0.5)
    assert out.stats["tokens_per_expert"].tolist() == [2.0, 0.0]
    # switch loss counts demand *before* dropping: f = [1, 0], P = [mean P0, ...]
    assert out.aux_losses["switch"].item() == pytest.approx(2 * P0.mean().item(), abs=1e-6)


def test_capacity_dropping_top2_by_hand():
    # T=3, E=3, k=2, cf=1 -> C = ceil(2*3/3) = 2; every token picks experts {0, 1}
    x = torch.log(torch.tensor([[0.50, 0.30, 0.20],
                                [0.40, 0.45, 0.15],
                                [0.60, 0.25, 0.15]]))
    r = identity_router(3, 2, "topk_softmax", capacity_factor=1.0, drop_policy="probs")
    r.train()
    out = r(x)
    kept = sorted(zip(out.token_idx.tolist(), out.expert_idx.tolist()))
    # expert 0 keeps tokens 2 (0.60) and 0 (0.50); expert 1 keeps tokens 1 (0.45) and 0 (0.30)
    assert kept == [(0, 0), (0, 1), (1, 1), (2, 0)]
    assert out.stats["drop_rate"].item() == pytest.approx(2 / 6)
    # a kept assignment keeps its original (pre-drop) gate: token 1 -> expert 1
    g = out.gates[(out.token_idx == 1) & (out.expert_idx == 1)].item()
    assert g == pytest.approx(0.45 / (0.40 + 0.45), abs=1e-6)
    r.drop_policy = "position"
    out = r(x)
    kept = sorted(zip(out.token_idx.tolist(), out.expert_idx.tolist()))
    assert kept == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_capacity_keep_mask_direct():
    e = torch.tensor([0, 1, 0, 0, 1, 2])
    pr = torch.tensor([0.1, 0.9, 0.8, 0.5, 0.2, 0.3])
    assert capacity_keep_mask(e, pr, 3, 1).tolist() == [False, True, True, False, False, True]
    assert capacity_keep_mask(e, None, 3, 1).tolist() == [True, True, False, False, False, True]
    assert capacity_keep_mask(e, pr, 3, 2).tolist() == [False, True, True, True, True, True]


def test_dropless_drops_nothing():
    r = identity_router(2, 1, "topk_softmax", capacity_factor=0.0)
    r.train()
    out = r(X_CAP)
    assert out.token_idx.tolist() == [0, 1, 2, 3]
    assert out.expert_idx.tolist() == [0, 0, 0, 0]
    assert out.stats["drop_rate"].item() == 0.0
    assert out.stats["tokens_per_expert"].tolist() == [4.0, 0.0]


# ----------------------------------------------------------------------------- losses

def test_switch_loss_uniform_and_imbalance():
    E, T = 4, 8
    probs = torch.full((T, E), 1.0 / E)
    assert switch_loss(probs, torch.full((E,), T / E), 1).item() == pytest.approx(1.0)
    assert switch_loss(probs, torch.full((E,), 2 * T / E), 2).item() == pytest.approx(1.0)
    # hand value: probs [[.7,.3],[.6,.4]], both tokens to expert 0 -> 2 * 1 * 0.65
    p = torch.tensor([[0.7, 0.3], [0.6, 0.4]])
    assert switch_loss(p, torch.tensor([2.0, 0.0]), 1).item() == pytest.approx(1.3)
    # grows with imbalance: mix uniform with one-hot on expert 0
    vals = []
    for a in (0.0, 0.25, 0.5, 0.75, 1.0):
        pr = (1 - a) * probs + a * F.one_hot(torch.zeros(T, dtype=torch.long), E).float()
        demand = torch.bincount(pr.argmax(-1), minlength=E).float() if a > 0 else torch.full((E,), T / E)
        vals.append(switch_loss(pr, demand, 1).item())
    assert all(b > a for a, b in zip(vals, vals[1:]))
    assert vals[-1] == pytest.approx(E)


def test_router_switch_loss_is_one_at_uniform_routing():
    # each expert is the argmax of exactly T/E tokens and the mean probabilities are
    # uniform (cyclic permutations of one logit row): f_i = P_i = 1/E
    E = 4
    base = torch.tensor([1.0, 0.0, 0.0, 0.0])
    x = torch.stack([base.roll(i) for i in range(E)] * 2)    # (8, 4)
    r = identity_router(E, 1, "softmax_topk")
    out = r(x)
    assert torch.bincount(out.expert_idx, minlength=E).tolist() == [2] * E
    assert out.aux_losses["switch"].item() == pytest.approx(1.0, abs=1e-6)
    assert out.aux_losses["skywork"].item() == pytest.approx(0.0, abs=1e-12)


def test_skywork_loss():
    assert skywork_loss(torch.full((5, 4), 0.25)).item() == pytest.approx(0.0, abs=1e-12)
    p = torch.tensor([[0.7, 0.3], [0.6, 0.4]])
    assert skywork_loss(p).item() == pytest.approx(0.045, abs=1e-7)   # 2 * 0.15^2
    p3 = torch.tensor([[1.0, 0.0, 0.0]])
    assert skywork_loss(p3).item() == pytest.approx((2 / 3) ** 2 + 2 * (1 / 3) ** 2, abs=1e-6)


def test_z_loss():
    z = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])   # lse = ln2, ln4
    assert z_loss(z).item() == pytest.approx((math.log(2) ** 2 + math.log(4) ** 2) / 2, abs=1e-6)
    assert z_loss(torch.zeros(3, 8)).item() == pytest.approx(math.log(8) ** 2, abs=1e-6)
    r = identity_router(2, 1)
    assert r(z).aux_losses["z"].item() == pytest.approx(2.5 * math.log(2) ** 2, abs=1e-6)


def test_adaptive_aux_coef_recurrence_and_state_dict():
    c = AdaptiveAuxCoef(2, xi=0.2, alpha_max=0.01, beta=0.9, alpha_init=0.005)
    drops = [(0.0, 0.2), (0.02, 0.1), (0.04, 0.0)]
    a = [0.005, 0.005]
    for d in drops[:2]:
        for l in range(2):
            target = min(0.2 * d[l], 0.01)
            a[l] = 0.9 * a[l] + 0.1 * target
        out = c.update(d)
        assert out == pytest.approx(a, abs=1e-15)
    # by hand: layer 0: 0.0045 then 0.9*0.0045 + 0.1*0.004 = 0.00445
    #          layer 1: 0.0055 (target saturates at 0.01) then 0.00595
    assert c.alpha == pytest.approx([0.00445, 0.00595], abs=1e-12)
    sd = c.state_dict()
    c2 = AdaptiveAuxCoef(2)
    c2.load_state_dict(sd)
    assert c2.alpha == c.alpha and (c2.xi, c2.alpha_max, c2.beta) == (0.2, 0.01, 0.9)
    assert c2.update(drops[2]) == c.update(drops[2])


def test_adaptive_aux_coef_defaults_saturate():
    c = AdaptiveAuxCoef(1, alpha_init=0.0)
    for _ in range(2000):
        c.update([0.5])   # drops 50% >> 5%: target = alpha_max
    assert c.alpha[0] == pytest.approx(0.01, rel=1e-6)
    assert (c.xi, c.alpha_max, c.beta) == (0.2, 0.01, 0.99)


# ----------------------------------------------------------------------------- gate norm, stats

@pytest.mark.parametrize("lam", [0.5, 1.0, 3.0])
def test_gate_norm_mean_zero_std_lambda(lam):
    torch.manual_seed(1)
    r = Router(8, 6, 2, gate_norm_lambda=lam)
    z = torch.randn(10, 6) * 3 + 1
    zn = r.normalise(z)
    assert torch.allclose(zn.mean(-1), torch.zeros(10), atol=1e-5)
    assert torch.allclose(zn.std(-1), torch.full((10,), lam), atol=1e-4)
    assert torch.allclose(zn, lam * (z - z.mean(-1, keepdim=True)) / z.std(-1, keepdim=True), atol=1e-4)
    assert Router(8, 6, 2).normalise(z) is z    # off -> unchanged


def test_gate_norm_sharpens_max1_max2():
    torch.manual_seed(2)
    E = 8
    x = torch.randn(32, E) * 0.01            # tiny spread: nearly uniform gates
    ratios = []
    for lam in (None, 1.0, 2.0, 4.0):
        r = identity_router(E, 2, gate_norm_lambda=lam)
        ratios.append(r(x).stats["max1_max2"].item())
    assert ratios[0] == pytest.approx(1.0, abs=0.02)       # about 1 without normalisation
    assert ratios[0] < ratios[1] < ratios[2] < ratios[3]
    # entropy falls as lambda grows
    ent = [identity_router(E, 2, gate_norm_lambda=l)(x).stats["gate_entropy"].item() for l in (1.0, 2.0, 4.0)]
    assert ent[0] > ent[1] > ent[2]


def test_routing_stats_hand_values():
    E = 4
    probs = torch.full((5, E), 0.25)
    st = routing_stats(torch.zeros(5, E), probs, torch.tensor([3, 3, 3, 3]), 2, 12)
    assert st["gate_entropy"].item() == pytest.approx(math.log(E), abs=1e-6)
    assert st["load_cv"].item() == pytest.approx(0.0, abs=1e-7)
    assert st["drop_rate"].item() == pytest.approx(2 / 12)
    assert st["max1_max2"].item() == pytest.approx(1.0)
    assert st["logit_abs"].item() == 0.0
    p = torch.tensor([[0.5, 0.25, 0.125, 0.125]])
    st = routing_stats(torch.tensor([[1.0, -3.0, 0.0, 0.0]]), p, torch.tensor([3, 1, 0, 0]), 0, 4)
    assert st["max1_max2"].item() == pytest.approx(2.0)
    assert st["max2_max3"].item() == pytest.approx(2.0)
    assert st["load_cv"].item() == pytest.approx(math.sqrt(1.5) / 1.0)   # std([3,1,0,0]) / mean 1
    assert st["gate_entropy"].item() == pytest.approx(1.75 * math.log(2), abs=1e-6)
    assert st["logit_abs"].item() == pytest.approx(1.0)


# ----------------------------------------------------------------------------- noise, precision

def test_noisy_topk_only_in_training():
    torch.manual_seed(3)
    r = Router(8, 4, 2, "topk_softmax", noisy=True)
    clean = Router(8, 4, 2, "topk_softmax")
    clean.load_state_dict({"weight": r.weight.detach().clone()})
    x = torch.randn(64, 8)
    r.eval()
    a, b, c = r(x), r(x), clean(x)
    assert torch.equal(a.gates, b.gates) and torch.equal(a.expert_idx, b.expert_idx)
    assert torch.equal(a.gates, c.gates) and torch.equal(a.expert_idx, c.expert_idx)
    r.train()
    torch.manual_seed(4)
    n1 = r(x)
    n2 = r(x)
    assert not torch.allclose(n1.gates, n2.gates)
    assert not torch.allclose(n1.gates, c.gates)
    assert (n1.expert_idx != c.expert_idx).any()    # noise std softplus(0)=ln2 >> logit spread
    # gradient reaches the noise weight in training
    n1.gates.mul(torch.randn_like(n1.gates)).sum().backward()
    assert r.noise_weight.grad is not None and r.noise_weight.grad.abs().sum() > 0


@pytest.mark.parametrize("router_type", ["topk_softmax", "softmax_topk", "sigmoid", "expert_choice"])
def test_router_fp32_under_bf16_autocast(router_type):
    torch.manual_seed(5)
    r = Router(16, 4, 2, router_type, capacity_factor=1.0)
    x = torch.randn(8, 16).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = r.gate_logits(x)
        out = r(x)
        lin = F.linear(x, r.weight)    # what autocast would do without the guard
    assert z.dtype == torch.float32 and out.gates.dtype == torch.float32
    assert lin.dtype == torch.bfloat16
    assert torch.equal(z, F.linear(x.float(), r.weight.float()))
    assert all(v.dtype == torch.float32 for v in out.aux_losses.values())
