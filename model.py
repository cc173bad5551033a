"""
A Llama-style decoder (the dense model that gets upcycled) and its MoE variants.

    GPT
    ├── tok_emb            (vocab, d)
    ├── blocks[l]
    │   ├── attn_norm      RMSNorm
    │   ├── attn           causal self-attention, RoPE, optional grouped-query (n_kv_head)
    │   ├── ffn_norm       RMSNorm
    │   └── ffn            make_ffn(config, l): SwiGLU | MoEFFN | LoryFFN
    ├── norm               RMSNorm
    └── lm_head            (vocab, d), optionally tied to tok_emb

Names follow Hugging Face `LlamaForCausalLM` / `MixtralForCausalLM` so weights map
one-to-one: gate_proj = W1, up_proj = W3, down_proj = W2 in FFN(x) = W2(silu(W1 x) * W3 x).
An MoE layer stores its experts as stacked tensors: gate_proj (E, h, d),
up_proj (E, h, d), down_proj (E, d, h), so expert e of a dense FFN is one index away.

`model(idx, targets)` returns (logits, loss, routings): loss is the plain
cross-entropy; routings has one entry per MoE layer (router.Routing for routed
layers, a dict of merge weights/stats for Lory layers) with the unweighted
auxiliary losses and statistics. train.py weights and logs them.

Generation (`model.generate`) keeps a `KVCache`: the keys and values of every
token seen so far, so that each new token costs one token's forward instead of
the whole prefix's. `model(idx, cache=cache)` appends idx's keys/values to the
cache and rotates them at their absolute positions.
"""
import math
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from experts import IMPLS, MergedExperts, merge_experts, merged_ffn, merged_swiglu, moe_ffn, swiglu
from router import DROP_POLICIES, ROUTERS, Router, SegmentRouter, expert_choice_k

EXPERT_IMPLS = ("auto", *IMPLS)   # experts.moe_ffn paths


@dataclass
class GPTConfig:
    block_size: int = 256
    vocab_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 0            # 0 -> n_head (plain multi-head attention)
    n_embd: int = 128
    ffn_hidden: int = 0           # 0 -> 8/3 * n_embd rounded up to a multiple of 32 (Llama)
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    # RoPE frequency scaling of Llama 3.1 (rope_scaling type "llama3" in Hugging Face configs)
    rope_scaling: str = "none"    # "none" | "llama3"
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_pos: int = 8192
    norm_eps: float = 1e-5
    dropout: float = 0.0
    # ---- MoE (a dense model is moe_layers="none") ----
    moe_layers: str = "none"      # "none" | "all" | "every_other" (layers 1,3,5..) | "0,2,5"
    n_experts: int = 8
    top_k: int = 2                # (expert_choice ignores it: k = capacity_factor)
    expert_hidden: int = 0        # 0 -> ffn_hidden; smaller for fine-grained experts
    n_shared_experts: int = 0     # always-on experts of width expert_hidden (DeepSeekMoE)
    router: str = "topk_softmax"  # one of router.ROUTERS
    capacity_factor: float = 0.0  # training; <= 0 means dropless
    eval_capacity_factor: float = 0.0
    drop_policy: str = "probs"    # "probs" | "position"
    gate_norm_lambda: float = None  # Skywork gating logit normalisation; None = off
    router_noise: bool = False    # noisy top-k (Shazeer et al. 2017)
    router_init_std: float = 0.02 # 0 -> zeros
    expert_impl: str = "auto"     # experts.moe_ffn impl
    segment_len: int = 32         # Lory: tokens per routing segment
    lory_first_segment: str = "self"  # "self" (Lory) | "uniform" (fully causal)

    def __post_init__(self):
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        if self.ffn_hidden == 0:
            self.ffn_hidden = 32 * math.ceil(8 * self.n_embd / 3 / 32)
        if self.expert_hidden == 0:
            self.expert_hidden = self.ffn_hidden
        self.validate()

    def validate(self):
        """Reject impossible shapes before anything is built (one-line errors)."""
        def bad(msg):
            raise ValueError(msg)
        # positivity first: the divisibility checks below would otherwise die with
        # ZeroDivisionError (n_head=0) or pass a negative n_kv_head through
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "ffn_hidden"):
            if getattr(self, name) <= 0:
                bad(f"{name}={getattr(self, name)} must be positive")
        if self.n_embd % self.n_head:
            bad(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if (self.n_embd // self.n_head) % 2:
            bad(f"head size n_embd/n_head={self.n_embd // self.n_head} must be even for rotary embeddings")
        if self.n_head % self.n_kv_head:
            bad(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if self.rope_scaling not in ("none", "llama3"):
            bad(f"rope_scaling={self.rope_scaling!r} must be 'none' or 'llama3'")
        if self.rope_scaling == "llama3" and not (self.rope_factor > 0 and self.rope_original_max_pos > 0
                                                  and 0 < self.rope_low_freq_factor < self.rope_high_freq_factor):
            bad(f"rope_scaling='llama3' needs rope_factor > 0, rope_original_max_pos > 0 and 0 < "
                f"rope_low_freq_factor < rope_high_freq_factor (got {self.rope_factor}, {self.rope_original_max_pos}, "
                f"{self.rope_low_freq_factor}, {self.rope_high_freq_factor})")
        layers = self.moe_layer_ids()   # validates the spec
        if not layers:
            return
        if self.router not in ROUTERS:
            bad(f"unknown router {self.router!r}; valid: {', '.join(ROUTERS)}")
        if self.expert_impl not in EXPERT_IMPLS:
            bad(f"unknown expert_impl {self.expert_impl!r}; valid: {', '.join(EXPERT_IMPLS)}")
        if self.n_experts < 1:
            bad(f"n_experts={self.n_experts} must be >= 1")
        if self.expert_hidden <= 0:
            bad(f"expert_hidden={self.expert_hidden} must be positive")
        if self.n_shared_experts < 0:
            bad(f"n_shared_experts={self.n_shared_experts} must be >= 0")
        if self.gate_norm_lambda is not None and self.gate_norm_lambda <= 0:
            bad(f"gate_norm_lambda={self.gate_norm_lambda} must be > 0 (use None to turn it off)")
        if self.gate_norm_lambda is not None and self.router != "lory" and self.n_experts < 2:
            bad(f"gate_norm_lambda needs n_experts >= 2 (the std of {self.n_experts} logit is undefined: NaN gates)")
        if self.router == "lory":
            if self.segment_len <= 0 or self.block_size % self.segment_len:
                bad(f"segment_len={self.segment_len} must divide block_size={self.block_size} for router='lory'")
            if self.capacity_factor > 0 or self.eval_capacity_factor > 0:
                bad("router='lory' merges experts and drops nothing: set capacity_factor=0 and eval_capacity_factor=0")
            if self.lory_first_segment not in ("self", "uniform"):
                bad(f"lory_first_segment={self.lory_first_segment!r} must be 'self' or 'uniform'")
            if self.n_shared_experts or self.router_noise or self.gate_norm_lambda is not None:
                bad("router='lory' does not take n_shared_experts, router_noise or gate_norm_lambda")
            return
        if not 1 <= self.top_k <= self.n_experts:
            bad(f"top_k={self.top_k} must be between 1 and n_experts={self.n_experts}")
        if self.drop_policy not in DROP_POLICIES:
            bad(f"unknown drop_policy {self.drop_policy!r}; valid: {', '.join(DROP_POLICIES)}")
        if self.router == "expert_choice" and self.capacity_factor <= 0:
            bad("router='expert_choice' needs capacity_factor > 0 (each expert takes "
                "C = T*capacity_factor/E tokens); it has no dropless mode")
        if self.router == "expert_choice":
            expert_choice_k(self.capacity_factor, self.n_experts)   # eval's k; raises ValueError

    def moe_layer_ids(self):
        spec = str(self.moe_layers).strip()
        if spec in ("none", ""):
            return []
        if spec == "all":
            return list(range(self.n_layer))
        if spec == "every_other":
            return list(range(1, self.n_layer, 2))
        try:
            ids = sorted({int(s) for s in spec.split(",") if s.strip()})
        except ValueError:
            raise ValueError(f"moe_layers={spec!r} must be 'none', 'all', 'every_other' or a list like '1,3'") from None
        if any(not 0 <= i < self.n_layer for i in ids):
            raise ValueError(f"moe_layers={spec!r} names a layer outside 0..{self.n_layer - 1}")
        return ids

    @property
    def is_moe(self):
        return bool(self.moe_layer_ids())

    @classmethod
    def from_dict(cls, d):
        """Build from a dict, rejecting unknown keys with a clear message."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown model config key(s) {unknown}")
        return cls(**d)


# -----------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def llama3_inv_freq(inv_freq, factor, low_freq_factor, high_freq_factor, original_max_pos):
    """Llama 3.1 RoPE scaling (Meta's Llama 3.1 reference code, `apply_scaling`; the
    Llama 3 paper arXiv 2407.21783 gives only theta = 500000): wavelengths 2*pi/f shorter than original_max_pos/high_freq_factor
    keep their frequency, ones longer than original_max_pos/low_freq_factor are divided
    by `factor`, and the band between interpolates linearly in original_max_pos/wavelength:
        s = (original_max_pos / wavelen - low) / (high - low),  f' = (1 - s) f / factor + s f."""
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = original_max_pos / low_freq_factor, original_max_pos / high_freq_factor
    smooth = (original_max_pos / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)


def rope_cache(seq_len, head_dim, theta, device=None, scaling=None):
    """cos/sin tables (T, head_dim/2) for rotary embeddings (Su et al. 2021).
    scaling: None, or llama3_inv_freq's keyword arguments."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    if scaling is not None:
        inv_freq = llama3_inv_freq(inv_freq, **scaling)
    angles = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """x (B, T, H, hd): rotate pairs (first half, second half) as HF Llama does, by the
    angles of the first T rows of cos/sin (>= T, hd/2). x is in the projection's own
    memory order: rotating it before the transpose to (B, H, T, hd) reads contiguous
    memory and is about 1.6x faster on a CPU than rotating the transposed view."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[: x.shape[1], None], sin[: x.shape[1], None]        # (T, 1, hd/2): every head
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


def causal_mask(pos, T, device=None):
    """(T, pos+T) bool: query i sits at absolute position pos+i and sees keys 0..pos+i."""
    return torch.ones(T, pos + T, dtype=torch.bool, device=device).tril(diagonal=pos)


class KVCache:
    """Keys and values of every layer for the tokens generated so far.

    k, v: (n_layer, B, n_kv_head, T_max, head_dim) with T_max = max_len (default
    block_size; generate passes what the prompt and the new tokens need, which for
    an imported 128k-context model is far less), allocated once, on the first
    write, in the dtype and device of the keys
    (bf16 under autocast). The first `pos` positions are filled. A forward with
    the cache writes its T new tokens at pos..pos+T-1 in every layer and then
    advances pos by T (GPT.forward does both).

    Routed MoE layers must be dropless while a cache is in use: capacity drops
    depend on which other tokens share the batch, so one token decoded alone
    would be kept where the same token in a full-sequence forward may be dropped
    (GPT.generate turns capacity off, see `inference_routing`).
    """

    def __init__(self, cfg, max_len=None):
        self.n_layer, self.max_len = cfg.n_layer, min(max_len or cfg.block_size, cfg.block_size)
        self.k = self.v = None
        self.pos = 0

    def update(self, layer, k, v):
        """Store k, v (B, Hkv, T, hd) at pos..pos+T-1 of `layer`; return the keys
        and values of positions 0..pos+T-1, (B, Hkv, pos+T, hd) each (views)."""
        B, H, T, hd = k.shape
        if self.k is None:
            shape = (self.n_layer, B, H, self.max_len, hd)
            self.k = k.new_zeros(shape)
            self.v = v.new_zeros(shape)
        if B != self.k.shape[1]:
            raise ValueError(f"KV cache holds a batch of {self.k.shape[1]} sequences, got {B}; start a new KVCache")
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions cannot take {T} more after {self.pos}; "
                             f"make a KVCache with a larger max_len (at most block_size)")
        self.k[layer, :, :, self.pos:self.pos + T] = k
        self.v[layer, :, :, self.pos:self.pos + T] = v
        return self.k[layer, :, :, :self.pos + T], self.v[layer, :, :, :self.pos + T]

    def reset(self):
        """Forget every token (the buffers are kept and overwritten)."""
        self.pos = 0
def rope_scaling_of(cfg):
    """llama3_inv_freq's arguments for cfg, or None (no scaling)."""
    if cfg.rope_scaling != "llama3":
        return None
    return dict(factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
                high_freq_factor=cfg.rope_high_freq_factor, original_max_pos=cfg.rope_original_max_pos)


def rope_tables(cfg):
    """The rotary cos/sin tables (block_size, head_dim/2) of a GPTConfig: its theta and
    scaling. GPT keeps them as buffers; parallel.py rebuilds them after to_empty."""
    return rope_cache(cfg.block_size, cfg.n_embd // cfg.n_head, cfg.rope_theta, scaling=rope_scaling_of(cfg))


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, cache=None, layer_idx=0):
        """x (B, T, d); cos/sin: the tables of x's absolute positions (T, hd/2).
        With a cache, x follows the cache's pos earlier tokens and attends to them too."""
        B, T, C = x.shape
        q = apply_rope(self.q_proj(x).view(B, T, self.n_head, self.head_dim), cos, sin)     # (B, T, H, hd)
        k = apply_rope(self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim), cos, sin)  # (B, T, Hkv, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)              # (B, H or Hkv, T, hd)
        pos = 0 if cache is None else cache.pos
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)                                      # (B, Hkv, pos+T, hd)
        # pos == 0: the usual causal mask; one new token sees every key, needs none
        mask = causal_mask(pos, T, x.device) if pos > 0 and T > 1 else None
        # grouped-query attention: query head i reads kv head i // (n_head / n_kv_head), the
        # order of repeat_interleave on dim 1 (and of transformers' repeat_kv); enable_gqa
        # does that inside SDPA without materialising the repeated k, v
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=pos == 0,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=self.n_kv_head != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    """Dense FFN(x) = W2 (silu(W1 x) * W3 x); W1 = gate_proj, W3 = up_proj, W2 = down_proj."""

    def __init__(self, n_embd, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(n_embd, hidden, bias=False)
        self.up_proj = nn.Linear(n_embd, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, n_embd, bias=False)

    def forward(self, x):
        return swiglu(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight), None


class MoEFFN(nn.Module):
    """Token-choice (or expert-choice) MoE: y = sum_{i in TopK(x)} g_i(x) Expert_i(x)
    (+ shared experts). Experts are stacked SwiGLUs."""

    def __init__(self, cfg):
        super().__init__()
        E, h, d = cfg.n_experts, cfg.expert_hidden, cfg.n_embd
        self.router = Router(d, E, cfg.top_k, cfg.router, cfg.capacity_factor, cfg.eval_capacity_factor,
                             cfg.drop_policy, cfg.gate_norm_lambda, cfg.router_noise, cfg.router_init_std)
        self.gate_proj = nn.Parameter(torch.empty(E, h, d))   # W1 of every expert
        self.up_proj = nn.Parameter(torch.empty(E, h, d))     # W3
        self.down_proj = nn.Parameter(torch.empty(E, d, h))   # W2
        self.shared = SwiGLU(d, cfg.n_shared_experts * h) if cfg.n_shared_experts else None
        self.impl = cfg.expert_impl
        self.ep = None   # parallel.EPGroups once parallel.shard_model keeps only this rank's experts

    def forward(self, x):
        B, T, d = x.shape
        flat = x.reshape(B * T, d)                                      # (N, d)
        r = self.router(flat)
        ffn = moe_ffn if self.ep is None else self.ep.moe_ffn           # expert parallel: parallel.py
        y = ffn(flat, r.token_idx, r.expert_idx, r.gates,
                self.gate_proj, self.up_proj, self.down_proj, impl=self.impl)
        if self.shared is not None:
            y = y + self.shared(flat)[0]
        return y.view(B, T, d), r


class LoryFFN(nn.Module):
    """Lory fully differentiable MoE (arXiv 2405.03133): experts are merged in
    parameter space per segment, theta_bar = sum_i e_i theta_i, and one SwiGLU with
    the merged weights runs on the segment. Every expert gets gradient through the
    soft weights, and the cost does not depend on which experts are "chosen", so
    there is no load to balance and no auxiliary loss (Lory section 3)."""

    def __init__(self, cfg):
        super().__init__()
        E, h, d = cfg.n_experts, cfg.expert_hidden, cfg.n_embd
        self.router = SegmentRouter(d, E, cfg.segment_len, cfg.lory_first_segment, cfg.router_init_std)
        self.gate_proj = nn.Parameter(torch.empty(E, h, d))
        self.up_proj = nn.Parameter(torch.empty(E, h, d))
        self.down_proj = nn.Parameter(torch.empty(E, d, h))
        self.segment_len = cfg.segment_len

    def merge(self, weights):
        """The experts merged with weights (B, E): one MergedExperts of (B, 1, ...)."""
        return merge_experts(weights[:, None, :], self.gate_proj, self.up_proj, self.down_proj)

    def forward(self, x, prompt_weights=None):
        """x (B, T, d). prompt_weights: None (training: causal segment routing), (B, E)
        merge weights of the prompt (inference: one merge for the whole sequence), or the
        experts already merged with them (generation merges once, see GPT.generate)."""
        B, T, d = x.shape
        if isinstance(prompt_weights, MergedExperts):
            return merged_swiglu(x[:, None], prompt_weights).reshape(B, T, d), None
        if prompt_weights is not None:   # inference: one merge for the whole sequence
            weights = prompt_weights[:, None, :]                        # (B, 1, E)
            xs = x[:, None]                                             # (B, 1, T, d)
        else:
            if T % self.segment_len:
                raise ValueError(f"Lory needs a sequence length that is a multiple of segment_len="
                                 f"{self.segment_len}, got {T}; generation uses prompt-only routing")
            weights = self.router(x)                                    # (B, S, E)
            xs = x.view(B, T // self.segment_len, self.segment_len, d)  # (B, S, L, d)
        y = merged_ffn(xs, weights, self.gate_proj, self.up_proj, self.down_proj)
        return y.reshape(B, T, d), {"merge_weights": weights, "stats": self.router.stats(weights)}


def make_ffn(cfg, layer_idx):
    """The one place that decides what FFN a block gets."""
    if layer_idx not in cfg.moe_layer_ids():
        return SwiGLU(cfg.n_embd, cfg.ffn_hidden)
    return LoryFFN(cfg) if cfg.router == "lory" else MoEFFN(cfg)


class Block(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.attn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.ffn = make_ffn(cfg, layer_idx)

    def forward(self, x, cos, sin, prompt_weights=None, cache=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, self.layer_idx)
        h = self.ffn_norm(x)
        if prompt_weights is not None:
            out, routing = self.ffn(h, prompt_weights=prompt_weights)
        else:
            out, routing = self.ffn(h)
        return x + out, routing


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg, l) for l in range(cfg.n_layer)])
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2 scaled init of the projections that write into the residual stream
        std_out = 0.02 / math.sqrt(2 * cfg.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("o_proj.weight") or name.endswith("down_proj.weight") or name.endswith("down_proj"):
                nn.init.normal_(p, mean=0.0, std=std_out)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        elif isinstance(m, (MoEFFN, LoryFFN)):
            for p in (m.gate_proj, m.up_proj, m.down_proj):
                nn.init.normal_(p, std=0.02)
        elif isinstance(m, (Router, SegmentRouter)):
            m.reset_parameters()

    def moe_layers(self):
        """(layer index, ffn module) of every MoE layer."""
        return [(l, b.ffn) for l, b in enumerate(self.blocks) if isinstance(b.ffn, (MoEFFN, LoryFFN))]

    def routed_layers(self):
        """The routed (token-choice) MoE FFNs, in layer order: MoEFFN, not Lory's merged ones."""
        return [ffn for _, ffn in self.moe_layers() if isinstance(ffn, MoEFFN)]

    def forward(self, idx, targets=None, prompt_weights=None, cache=None):
        """idx (B, T) -> logits (B, T, V), loss (CE or None), routings (one per MoE layer).
        With a KVCache, idx continues the cache's pos tokens (positions pos..pos+T-1)."""
        B, T = idx.shape
        pos = 0 if cache is None else cache.pos
        if pos + T > self.config.block_size:
            raise ValueError(f"sequence length {pos + T} exceeds block_size {self.config.block_size}"
                             + (f" ({pos} cached + {T} new tokens); reset the KVCache" if pos else ""))
        cos, sin = self.rope_cos[pos:pos + T], self.rope_sin[pos:pos + T]   # (T, hd/2) at absolute positions
        x = self.drop(self.tok_emb(idx))                                # (B, T, d)
        routings, moe_i = [], 0
        for block in self.blocks:
            pw = None
            if prompt_weights is not None and isinstance(block.ffn, LoryFFN):
                pw, moe_i = prompt_weights[moe_i], moe_i + 1
            x, r = block(x, cos, sin, pw, cache)
            if r is not None:
                routings.append(r)
        if cache is not None:
            cache.pos += T
        logits = self.lm_head(self.norm(x))                             # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss, routings

    # ------------------------------------------------------------------ counting
    def num_params(self, active=False, non_embedding=False):
        """Total parameters, or active ones (what one token touches: k of E experts,
        or one merged expert for Lory). non_embedding drops the embedding table
        (the lm_head stays when untied)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
        if active:
            cfg = self.config
            for _, ffn in self.moe_layers():
                per_expert = ffn.gate_proj[0].numel() + ffn.up_proj[0].numel() + ffn.down_proj[0].numel()
                used = 1 if isinstance(ffn, LoryFFN) else cfg.top_k
                if isinstance(ffn, MoEFFN) and cfg.router == "expert_choice":
                    used = cfg.capacity_factor   # tokens per expert * E / T on average
                n -= int(per_expert * (ffn.gate_proj.shape[0] - used))   # experts held: E/N under EP
        return n

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token: 6 * N_active + 12 * L * d * T (PaLM appendix B),
        T = seq_len, the sequence length the run trains at (train.py's block_size;
        default: the model's block_size, the longest it takes). Embedding lookups are free.
        Lory adds its expert merge (arXiv 2405.03133 eq. 2): per segment of segment_len
        tokens each Lory layer forms sum_e w_e theta_e over its 3 (E, h, d) stacks, 2 FLOPs
        per expert parameter forward and 4 backward (gradients of the weights and of the
        stacks): 6 * (expert parameters) / segment_len per token."""
        cfg = self.config
        T = cfg.block_size if seq_len is None else int(seq_len)
        if not 0 < T <= cfg.block_size:
            raise ValueError(f"seq_len={seq_len} must be between 1 and the model's block_size={cfg.block_size}")
        n_active = self.num_params(active=True, non_embedding=True)
        if cfg.tie_embeddings:   # the tied lm_head matmul is still a matmul
            n_active += self.tok_emb.weight.numel()
        flops = 6 * n_active + 12 * cfg.n_layer * cfg.n_embd * T
        for _, ffn in self.moe_layers():
            if isinstance(ffn, LoryFFN):
                merged = ffn.gate_proj.numel() + ffn.up_proj.numel() + ffn.down_proj.numel()
                flops += 6 * merged / cfg.segment_len
        return flops

    def estimate_mfu(self, tokens_per_device, dt, device_name=None, seq_len=None):
        """Model FLOPs utilisation of ONE device on a known GPU, else None (report
        tokens/s instead). tokens_per_device: the tokens this process handled in dt
        seconds (under DDP a step's global tokens / world size); it is measured
        against one device's peak, as per-device MFU is reported (e.g. Llama 3 meets
        MoE's 46.8%). seq_len: the training sequence length (flops_per_token)."""
        peak = peak_flops(device_name)
        if peak is None or dt <= 0:
            return None
        return self.flops_per_token(seq_len) * tokens_per_device / dt / peak

    def throughput(self, global_tokens, dt, world_size=1, seq_len=None, device_name=None):
        """What a training log line reports for one step (or a mean step) that
        processed global_tokens across world_size processes in dt seconds:
        {"tok_per_s": global tok/s, "tok_per_s_per_device", "mfu" (per device; only
        on a GPU with a known peak)}. dt should time training steps only (no evals
        or checkpoint saves)."""
        per_device = global_tokens / world_size
        out = {"tok_per_s": global_tokens / dt, "tok_per_s_per_device": per_device / dt}
        mfu = self.estimate_mfu(per_device, dt, device_name, seq_len)
        if mfu is not None:
            out["mfu"] = mfu
        return out

    # ---------------------------------------------------------------- generation
    @torch.no_grad()
    def lory_prompt_weights(self, idx):
        """Lory inference: one set of merge weights per Lory layer from the mean
        hidden state of the prompt (Lory section 3.4). Returns a list of (B, E)."""
        B, T = idx.shape
        x = self.tok_emb(idx)
        weights = []
        for block in self.blocks:
            if isinstance(block.ffn, LoryFFN):
                h = block.ffn_norm(x + block.attn(block.attn_norm(x), self.rope_cos, self.rope_sin))
                weights.append(block.ffn.router.prompt_weights(h))
                pw = weights[-1]
            else:
                pw = None
            x, _ = block(x, self.rope_cos, self.rope_sin, pw)
        return weights

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, use_cache=True):
        """Append max_new_tokens to idx (B, T); temperature <= 0 is greedy (argmax).

        use_cache=True feeds the prompt once (prefill), then one token per step
        through a KVCache. use_cache=False recomputes the whole context every step
        (the reference that tests and bench.py compare with). Both compute the
        same function, in eval mode only:
        - routed MoE layers route each token on its own: capacity is off
          (`inference_routing`), and expert choice falls back to token-choice top-k at
          eval (router.py), because both would make a token's experts depend on
          the other tokens in the batch;
        - Lory layers merge once from the prompt (Lory section 3.4) and keep
          those weights for every generated token;
        - the context is at most block_size tokens. When the sequence outgrows
          it, the window hops: the last block_size // 2 tokens become the new
          context at positions 0.. (the cache is refilled from them in one
          forward), so the cache costs one prefill per block_size // 2 tokens.
        """
        if self.training:
            raise ValueError("generate needs model.eval(): dropout, router noise and expert choice's "
                             "batch-wide selection are training-time behaviour")
        if idx.shape[1] == 0:
            raise ValueError("generate needs a prompt of at least one token (e.g. the end-of-text token)")
        block_size = self.config.block_size
        prompt_experts = None
        lory = [f for _, f in self.moe_layers() if isinstance(f, LoryFFN)]
        if lory:   # merge each Lory layer's experts once, with the prompt's weights
            weights = self.lory_prompt_weights(idx[:, -block_size:])
            prompt_experts = [f.merge(w) for f, w in zip(lory, weights)]
        # the window never holds more than the whole sequence or block_size tokens
        cache = KVCache(self.config, max_len=idx.shape[1] + max_new_tokens) if use_cache else None
        start = max(0, idx.shape[1] - block_size)            # first token of the context window
        with inference_routing(self):
            for _ in range(max_new_tokens):
                if idx.shape[1] - start > block_size:        # window full: hop (see above)
                    start = idx.shape[1] - max(1, block_size // 2)
                    if cache is not None:
                        cache.reset()
                cached = 0 if cache is None else cache.pos  # context tokens already in the cache
                logits, _, _ = self(idx[:, start + cached:], prompt_weights=prompt_experts, cache=cache)
                idx_next = next_token(logits[:, -1, :], temperature, top_k, generator)   # (B, 1)
                idx = torch.cat((idx, idx_next), dim=1)
        return idx


def next_token(logits, temperature=1.0, top_k=None, generator=None):
    """logits (B, V) -> next token ids (B, 1): argmax when temperature <= 0, else a
    sample from softmax(logits / temperature) over the top_k most likely tokens."""
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1 (or None: every token)")
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float("inf")
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


@contextmanager
def inference_routing(model):
    """Routed MoE layers as generation needs them, for the duration:
    - capacity off (dropless). With a capacity, whether a token is dropped depends
      on the other tokens of the batch: the other sequences, and the whole prefix
      when it is recomputed. Decoding one token per step from a cache would then
      compute a different function from a full forward (and from the same prompt
      in another batch);
    - routers return the decision only (Router.with_stats): the auxiliary losses
      and diagnostics are a few dozen small ops per layer and decode step."""
    routers = [ffn.router for ffn in model.routed_layers()]
    saved = [(r.eval_capacity_factor, r.with_stats, r.eval_expert_choice) for r in routers]
    for r in routers:   # (expert choice's batch-wide selection at eval, as eval.py measures it, is off too)
        r.eval_capacity_factor, r.with_stats, r.eval_expert_choice = 0.0, False, False
    try:
        yield
    finally:
        for r, (cf, with_stats, ec) in zip(routers, saved):
            r.eval_capacity_factor, r.with_stats, r.eval_expert_choice = cf, with_stats, ec


# peak dense bf16 FLOP/s by GPU name (substring match, most specific first)
PEAK_BF16_FLOPS = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),        # SXM / HBM3
    ("A100", 312e12),
]


def peak_flops(device_name):
    """Peak bf16 FLOP/s for a GPU name, None when unknown (never a wrong number)."""
    if not device_name:
        return None
    for key, flops in PEAK_BF16_FLOPS:
        if key in device_name:
            return flops
    return None
