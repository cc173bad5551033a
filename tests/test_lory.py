"""Lory (arXiv 2405.03133): causal segment routing, expert merging, prompt-only
generation."""
import pytest
import torch
import torch.nn.functional as F

from experts import merged_ffn, swiglu
from model import GPT, GPTConfig, LoryFFN
from router import SegmentRouter


def lory_cfg(**kw):
    base = dict(block_size=32, vocab_size=50, n_layer=2, n_head=2, n_embd=32, moe_layers="all",
                router="lory", n_experts=4, segment_len=8)
    base.update(kw)
    return GPTConfig(**base)


def test_segment_router_uses_previous_segment_mean():
    torch.manual_seed(0)
    r = SegmentRouter(16, 4, segment_len=4)
    x = torch.randn(2, 12, 16)
    w = r(x)                                                            # (2, 3, 4)
    means = x.view(2, 3, 4, 16).mean(2)
    for j in range(1, 3):
        torch.testing.assert_close(w[:, j], F.softmax(means[:, j - 1] @ r.weight.T, -1))
    torch.testing.assert_close(w[:, 0], F.softmax(means[:, 0] @ r.weight.T, -1))   # segment 1: its own mean
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3))


def test_first_segment_stop_gradient_and_uniform_mode():
    torch.manual_seed(0)
    r = SegmentRouter(16, 4, segment_len=4)
    x = torch.randn(1, 8, 16)
    r(x)[:, 0].pow(2).sum().backward()
    assert r.weight.grad is None or r.weight.grad.abs().max() == 0     # segment 1: no router gradient
    r.weight.grad = None
    r(x)[:, 1].pow(2).sum().backward()
    assert r.weight.grad.abs().max() > 0
    u = SegmentRouter(16, 4, segment_len=4, first_segment="uniform")
    torch.testing.assert_close(u(x)[:, 0], torch.full((1, 4), 0.25))


def test_merged_ffn_one_hot_and_single_expert():
    torch.manual_seed(0)
    E, h, d = 3, 10, 8
    w1, w3, w2 = torch.randn(E, h, d), torch.randn(E, h, d), torch.randn(E, d, h)
    x = torch.randn(2, 2, 5, d)
    onehot = F.one_hot(torch.tensor([[2, 0], [1, 1]]), E).float()       # (B, S, E)
    y = merged_ffn(x, onehot, w1, w3, w2)
    for b in range(2):
        for s in range(2):
            e = int(onehot[b, s].argmax())
            torch.testing.assert_close(y[b, s], swiglu(x[b, s], w1[e], w3[e], w2[e]), rtol=1e-5, atol=1e-5)
    y1 = merged_ffn(x, torch.ones(2, 2, 1), w1[:1], w3[:1], w2[:1])     # E=1 is the dense FFN
    torch.testing.assert_close(y1, swiglu(x, w1[0], w3[0], w2[0]), rtol=1e-5, atol=1e-5)


def test_lory_gradients_reach_router_and_all_experts():
    torch.manual_seed(0)
    m = GPT(lory_cfg())
    idx = torch.randint(0, 50, (2, 32))
    _, loss, routings = m(idx, idx)
    loss.backward()
    for _, f in m.moe_layers():
        assert isinstance(f, LoryFFN)
        assert f.router.weight.grad.abs().sum() > 0
        for p in (f.gate_proj, f.up_proj, f.down_proj):
            assert (p.grad.flatten(1).abs().sum(1) > 0).all()            # every expert
    assert routings[0]["merge_weights"].shape == (2, 4, 4)


@pytest.mark.parametrize("first", ["self", "uniform"])
def test_lory_causality(first):
    """Outputs in segment j >= 2 never depend on later tokens; with a uniform
    first segment every position is causal."""
    torch.manual_seed(0)
    m = GPT(lory_cfg(lory_first_segment=first)).eval()
    idx = torch.randint(0, 50, (1, 32))
    base, _, _ = m(idx)
    L = 8
    for t in range(31):
        idx2 = idx.clone()
        idx2[0, t + 1:] = (idx2[0, t + 1:] + 7) % 50
        out, _, _ = m(idx2)
        if first == "uniform" or t >= L:
            torch.testing.assert_close(out[0, : t + 1], base[0, : t + 1], rtol=1e-5, atol=1e-5)
    if first == "self":   # segment 1 sees its own future: the documented caveat
        idx2 = idx.clone()
        idx2[0, 5:] = (idx2[0, 5:] + 7) % 50
        out, _, _ = m(idx2)
        assert (out[0, :5] - base[0, :5]).abs().max() > 1e-6


def test_prompt_only_generation_matches_forward_with_same_routing():
    torch.manual_seed(0)
    m = GPT(lory_cfg()).eval()
    prompt = torch.randint(0, 50, (2, 11))                              # not a multiple of segment_len
    pw = m.lory_prompt_weights(prompt)
    assert len(pw) == 2 and pw[0].shape == (2, 4)
    logits, _, _ = m(prompt, prompt_weights=pw)
    expected = logits[:, -1].argmax(-1)
    out = m.generate(prompt, 1, temperature=1e-8)
    assert torch.equal(out[:, -1], expected)
    # the weights are computed once from the prompt and reused: identical for a longer sequence
    longer = m.generate(prompt, 5, temperature=1e-8)
    assert longer.shape == (2, 16)


def test_lory_config_errors():
    with pytest.raises(ValueError, match="segment_len"):
        lory_cfg(segment_len=5)
    with pytest.raises(ValueError, match="capacity_factor"):
        lory_cfg(capacity_factor=1.0)
    with pytest.raises(ValueError, match="lory_first_segment"):
        lory_cfg(lory_first_segment="future")


def test_first_segment_stop_gradient_covers_its_hidden_states():
    """Lory section 3.1: the stop-gradient is on R(h_1) -- the router *output* of
    segment 1 -- so neither the router weight nor segment 1's hidden states (and
    the layers below them) get gradient through segment 1's merge weights."""
    torch.manual_seed(0)
    r = SegmentRouter(16, 4, segment_len=4)
    x = torch.randn(1, 12, 16, requires_grad=True)
    w = r(x)                                                            # (1, 3, 4)
    (w[:, 0] * torch.randn(1, 4)).sum().backward()
    assert x.grad is None or x.grad.abs().max() == 0                    # nothing reaches h_1
    # segment 2 routes on segment 1's mean: that path is causal and keeps its gradient
    x.grad = None
    (r(x)[:, 1] * torch.randn(1, 4)).sum().backward()
    assert x.grad[0, :4].abs().max() > 0 and x.grad[0, 4:].abs().max() == 0


def test_lory_ffn_segment1_gradient_only_through_the_ffn():
    """In a LoryFFN, the gradient that reaches segment 1's inputs equals the one
    with its merge weights held constant: no look-ahead can be learned through them."""
    torch.manual_seed(0)
    cfg = lory_cfg()
    ffn = LoryFFN(cfg)
    for p in (ffn.gate_proj, ffn.up_proj, ffn.down_proj):
        torch.nn.init.normal_(p, std=0.2)
    torch.nn.init.normal_(ffn.router.weight, std=0.5)
    x = torch.randn(2, 32, 32, requires_grad=True)
    y, out = ffn(x)
    L = cfg.segment_len
    g = torch.randn(2, L, 32)
    (y[:, :L] * g).sum().backward()
    # reference: segment 1 through one SwiGLU with its merge weights as constants
    x_ref = x.detach()[:, :L].clone().requires_grad_(True)
    w = out["merge_weights"][:, 0].detach()                             # (2, E)
    y_ref = merged_ffn(x_ref[:, None], w[:, None], ffn.gate_proj, ffn.up_proj, ffn.down_proj)
    (y_ref[:, 0] * g).sum().backward()
    torch.testing.assert_close(x.grad[:, :L], x_ref.grad, rtol=1e-5, atol=1e-6)
    assert x.grad[:, L:].abs().max() == 0
