"""KV cache (model.KVCache) and cached generation: the reference is the same model
recomputing the whole context with a plain forward. Greedy tokens must be equal
and logits within 1e-5, for dense, GQA, every routed MoE router (capacity off at
inference) and Lory (prompt-only routing), with batch > 1 and past block_size.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import model as M  # noqa: E402
from model import GPT, GPTConfig, KVCache, MoEFFN  # noqa: E402
from router import ROUTERS  # noqa: E402

TINY = dict(block_size=32, vocab_size=64, n_layer=2, n_head=4, n_embd=32)
ROUTED = [r for r in ROUTERS if r != "lory"]   # Lory routes segments: tested with prompt weights below
ATOL = 1e-5


def router_kw(router):
    kw = dict(moe_layers="all", n_experts=4, top_k=2, router=router, router_init_std=0.5)
    if router == "expert_choice":
        kw["capacity_factor"] = 1.0    # training-only; at eval it is token-choice top-k
    return kw


CASES = {
    "dense": dict(),
    "gqa": dict(n_kv_head=2),
    "mqa_every_other_moe": dict(n_kv_head=1, moe_layers="every_other", n_experts=4, router_init_std=0.5),
    **{f"moe_{r}": router_kw(r) for r in ROUTED},
    "moe_gate_norm_shared": dict(router_kw("topk_softmax"), gate_norm_lambda=1.0, n_shared_experts=1),
    "moe_noisy": dict(router_kw("topk_softmax"), router_noise=True),
    "lory": dict(moe_layers="all", n_experts=4, router="lory", segment_len=8, router_init_std=0.5),
}


def make_model(seed=0, std=0.3, **kw):
    """A random model whose greedy continuations vary (weights std 0.3; at the
    default init a tiny model repeats one token, which would prove little)."""
    torch.manual_seed(seed)
    m = GPT(GPTConfig(**{**TINY, **kw})).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() >= 2 and "router" not in name:
                p.normal_(std=std)
        for _, ffn in m.moe_layers():
            if hasattr(ffn.router, "expert_bias"):    # sigmoid: a bias that changes selection
                ffn.router.expert_bias.normal_(std=0.1)
            if getattr(ffn.router, "noisy", False):    # noise weights are zero at init
                ffn.router.noise_weight.normal_(std=0.5)
    return m


def prompt_weights_of(m, prompt):
    is_lory = m.config.router == "lory" and m.config.is_moe
    return m.lory_prompt_weights(prompt) if is_lory else None


@torch.no_grad()
def cached_logits(m, idx, chunks, pw=None):
    """Feed idx (B, T) through one KVCache in chunks of the given sizes -> (B, T, V)."""
    cache, out, t = KVCache(m.config), [], 0
    for n in chunks:
        logits, _, _ = m(idx[:, t:t + n], prompt_weights=pw, cache=cache)
        out.append(logits)
        t += n
    assert cache.pos == idx.shape[1] == t
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("case", list(CASES))
def test_cached_logits_equal_full_forward(case):
    """Prefill 7 tokens, then one token at a time, then a chunk of 5 (a causal mask
    at an offset), then single tokens up to block_size: every position's logits
    equal the full forward's. Weights std 0.1: logits up to ~3, fp32 rounding
    differences ~2e-6 (at std 0.3, logits ~6, they reach 2e-5)."""
    m = make_model(std=0.1, **CASES[case])
    idx = torch.randint(0, 64, (3, 32))
    pw = prompt_weights_of(m, idx[:, :7])
    with torch.no_grad():
        full, _, _ = m(idx, prompt_weights=pw)                           # (B, T, V)
    got = cached_logits(m, idx, [7, 1, 1, 1, 5] + [1] * 17, pw)
    assert full.abs().max() > 1.0
    torch.testing.assert_close(got, full, rtol=0, atol=ATOL)


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_generation_with_cache_equals_without(case):
    """Batch of 3, 5-token prompt, 60 new tokens: past block_size=32, so the
    context window hops twice and the cache is refilled each time."""
    m = make_model(**CASES[case])
    prompt = torch.randint(0, 64, (3, 5))
    with_cache = m.generate(prompt, 60, temperature=0, use_cache=True)
    without = m.generate(prompt, 60, temperature=0, use_cache=False)
    assert with_cache.shape == (3, 65)
    assert torch.equal(with_cache[:, :5], prompt)
    assert torch.equal(with_cache, without)
    assert all(len(set(row[5:].tolist())) > 10 for row in with_cache)   # varied continuations


def test_greedy_is_argmax_of_full_forward():
    """Each greedy token is the argmax of the full forward on the tokens before it."""
    m = make_model(**CASES["moe_topk_softmax"])
    out = m.generate(torch.randint(0, 64, (2, 4)), 20, temperature=0)
    logits, _, _ = m(out[:, :-1])
    assert torch.equal(out[:, 4:], logits[:, 3:].argmax(-1))


def test_sampling_with_cache_equals_without():
    """Same seed, temperature and top_k: the same samples with and without the cache."""
    m = make_model(**CASES["moe_sigmoid"])
    prompt = torch.randint(0, 64, (2, 3))
    outs = [m.generate(prompt, 25, temperature=0.9, top_k=10, use_cache=c,
                       generator=torch.Generator().manual_seed(1)) for c in (True, False)]
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("case", ["moe_topk_softmax", "moe_expert_choice", "lory"])
def test_each_sequence_is_generated_as_if_alone(case):
    """Routing at inference is per token: a batch row decodes as it does alone."""
    m = make_model(**CASES[case])
    prompt = torch.randint(0, 64, (3, 6))
    batch = m.generate(prompt, 15, temperature=0)
    for b in range(3):
        assert torch.equal(m.generate(prompt[b:b + 1], 15, temperature=0), batch[b:b + 1])


def test_generation_is_dropless_whatever_eval_capacity_factor():
    """With eval_capacity_factor=0.5 a full forward drops tokens, so a decode step
    of B tokens and a recomputation of B*T tokens would differ; generate turns
    capacity off (and restores it), giving the dropless model's tokens."""
    kw = dict(router_kw("topk_softmax"), eval_capacity_factor=0.5)
    m, dropless = make_model(**kw), make_model(**router_kw("topk_softmax"))
    prompt = torch.randint(0, 64, (4, 8))
    _, _, routings = m(prompt)
    assert routings[0].stats["drop_rate"] > 0.1                       # capacity bites here
    out = m.generate(prompt, 20, temperature=0)
    assert torch.equal(out, m.generate(prompt, 20, temperature=0, use_cache=False))
    assert torch.equal(out, dropless.generate(prompt, 20, temperature=0))
    assert all(f.router.eval_capacity_factor == 0.5 for _, f in m.moe_layers() if isinstance(f, MoEFFN))
    assert all(f.router.with_stats for _, f in m.moe_layers() if isinstance(f, MoEFFN))   # restored too


@pytest.mark.parametrize("router", ROUTED)
def test_routing_without_stats_is_the_same_decision(router):
    """While generating, routers skip the losses and diagnostics (Router.with_stats):
    the assignments and gates must be exactly those of the full routing."""
    m = make_model(**router_kw(router))
    r = m.moe_layers()[0][1].router
    x = torch.randn(24, 32)
    full = r(x)
    r.with_stats = False
    bare = r(x)
    r.with_stats = True
    assert bare.aux_losses == {} and bare.stats == {} and full.stats
    for a, b in ((full.token_idx, bare.token_idx), (full.expert_idx, bare.expert_idx), (full.gates, bare.gates)):
        assert torch.equal(a, b)


def test_lory_merged_once_equals_merging_per_call():
    """Generation merges each Lory layer's experts once (LoryFFN.merge) and reuses them:
    the same outputs as merging with the prompt weights on every forward."""
    m = make_model(**CASES["lory"])
    ffn = m.moe_layers()[0][1]
    x, w = torch.randn(2, 5, 32), torch.softmax(torch.randn(2, 4), -1)
    y_weights, routing = ffn(x, prompt_weights=w)
    y_merged, none = ffn(x, prompt_weights=ffn.merge(w))
    assert torch.equal(y_weights, y_merged) and none is None and routing["merge_weights"].shape == (2, 1, 4)


def test_lory_decodes_with_the_prompt_merge_weights():
    """Lory at inference: the merge weights come from the prompt and stay fixed, so
    each generated token is the argmax of a forward with those weights."""
    m = make_model(**CASES["lory"])
    prompt = torch.randint(0, 64, (2, 11))
    out = m.generate(prompt, 12, temperature=0)
    logits, _, _ = m(out[:, :-1], prompt_weights=m.lory_prompt_weights(prompt))
    assert torch.equal(out[:, 11:], logits[:, 10:].argmax(-1))


def test_rope_at_the_cache_offset():
    """A cached token is rotated at its absolute position: feeding it as if it were
    at position 0 (a fresh cache) gives different logits."""
    m = make_model()
    idx = torch.randint(0, 64, (1, 6))
    full, _, _ = m(idx)
    alone, _, _ = m(idx[:, 5:], cache=KVCache(m.config))
    assert (alone[0, 0] - full[0, 5]).abs().max() > 1e-3


def test_cache_past_block_size_is_a_one_line_error():
    m = make_model()
    cache = KVCache(m.config)
    m(torch.randint(0, 64, (2, 30)), cache=cache)
    with pytest.raises(ValueError, match=r"^sequence length 33 exceeds block_size 32 \(30 cached \+ 3 new"):
        m(torch.randint(0, 64, (2, 3)), cache=cache)
    assert cache.pos == 30                                             # nothing written
    with pytest.raises(ValueError, match="batch of 2 sequences, got 1"):
        m(torch.randint(0, 64, (1, 1)), cache=cache)
    cache.reset()
    m(torch.randint(0, 64, (2, 32)), cache=cache)                      # a full block fits
    assert cache.pos == 32 and cache.k.shape == (2, 2, 4, 32, 8)       # (L, B, Hkv, T_max, hd)


def test_generate_sizes_the_cache_for_the_sequence(monkeypatch):
    """The cache holds prompt + new tokens, at most block_size (an imported model's
    block_size is its max_position_embeddings, 131072 for Llama 3.2: 8 GiB of fp32
    keys and values per sequence that a short sample never uses)."""
    made = []

    class Spy(KVCache):
        def __init__(self, cfg, max_len=None):
            super().__init__(cfg, max_len)
            made.append(self)
    monkeypatch.setattr(M, "KVCache", Spy)
    m = make_model()
    for prompt_len, new, size in ((3, 4, 7), (45, 3, 32), (20, 30, 32)):   # the last two hop their window
        prompt = torch.randint(0, 64, (2, prompt_len))
        out = m.generate(prompt, new, temperature=0)
        assert made[-1].max_len == size and made[-1].k.shape[3] == size
        assert torch.equal(out, m.generate(prompt, new, temperature=0, use_cache=False))
    cache = KVCache(m.config, max_len=7)
    m(torch.randint(0, 64, (1, 7)), cache=cache)
    with pytest.raises(ValueError, match=r"^KV cache of 7 positions cannot take 1 more after 7"):
        m(torch.randint(0, 64, (1, 1)), cache=cache)


def test_long_prompt_keeps_its_last_block():
    """A prompt longer than block_size is cut to its last block_size tokens."""
    m = make_model()
    prompt = torch.randint(0, 64, (2, 45))
    out = m.generate(prompt, 3, temperature=0)
    assert torch.equal(out[:, :45], prompt)
    assert torch.equal(out, m.generate(prompt, 3, temperature=0, use_cache=False))
    assert torch.equal(out[:, 45:48], m.generate(prompt[:, 13:], 3, temperature=0)[:, 32:])


def test_generation_ignores_eval_expert_choice_and_refuses_top_k_0():
    """eval.py's switch for expert choice's batch-wide routing at eval is off while
    generating (a token's experts must not depend on the batch) and restored after;
    top_k=0 is a one-line error, not an IndexError inside topk."""
    m = make_model(**CASES["moe_expert_choice"]).eval()
    prompt = torch.randint(0, 64, (2, 5))
    want = m.generate(prompt, 4, temperature=0)
    for _, ffn in m.moe_layers():
        ffn.router.eval_expert_choice = True
    assert torch.equal(m.generate(prompt, 4, temperature=0), want)
    assert all(ffn.router.eval_expert_choice for _, ffn in m.moe_layers())
    with pytest.raises(ValueError, match="top_k=0 must be >= 1"):
        m.generate(prompt, 1, top_k=0)


def test_generate_refuses_training_mode_and_empty_prompt():
    m = make_model(**CASES["moe_expert_choice"]).train()
    with pytest.raises(ValueError, match=r"model\.eval\(\)"):
        m.generate(torch.zeros(1, 2, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="at least one token"):
        m.eval().generate(torch.zeros(1, 0, dtype=torch.long), 1)


def test_cache_under_bf16_autocast():
    """Under autocast the cache takes the keys' dtype (bf16) and decoding runs."""
    m = make_model(**CASES["gqa"])
    prompt = torch.randint(0, 64, (2, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cache = KVCache(m.config)
        m(prompt, cache=cache)
        logits, _, _ = m(prompt[:, :1], cache=cache)
        full, _, _ = m(torch.cat([prompt, prompt[:, :1]], dim=1))
    assert cache.k.dtype == torch.bfloat16
    torch.testing.assert_close(logits[:, 0].float(), full[:, -1].float(), rtol=0, atol=0.05)
