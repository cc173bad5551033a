"""
Upcycling: turn a dense Llama-style checkpoint into a Mixture-of-Experts one
(docs/METHODS.md section 4), offline (this CLI) or online (train.py
with init_from=<dense out_dir>; both call the same functions, so the same seed
gives bit-identical weights).

    python upcycle.py --ckpt=out/dense --out_dir=out/moe8x2 --n_experts=8 --top_k=2
    python upcycle.py --ckpt=out/dense --out_dir=out/moe_e4g2 --n_experts=8 --top_k=4 --granularity=2
    python upcycle.py --ckpt=out/dense --out_dir=out/moe_eo --moe_layers=every_other --router_init_std=0

What happens to the weights
---------------------------
Everything outside the chosen MoE layers' FFNs is copied. In an MoE layer:

* Sparse upcycling (Komatsuzaki et al., arXiv 2212.05055), granularity G=1:
  every expert is a copy of the dense SwiGLU FFN (W1=gate_proj, W3=up_proj,
  W2=down_proj).
* Fine-grained upcycling / virtual groups (He et al., arXiv 2410.07524;
  Megatron upcycling_utils.py), G>1: the hidden dimension d_ff is cut into G
  shards of width d_ff/G (rows of W1 and W3, columns of W2), so that
  FFN(x) = sum_g FFN_g(x) exactly. Each shard is replicated E' = n_experts/G
  times: expert e = i*G + g holds shard g. Router rows are shared inside a
  virtual group (draw E' rows, repeat each G times), so the G experts of a
  group always have the same logit and top-k with k a multiple of G picks k/G
  whole groups, i.e. k/G complete copies of the dense FFN.
* Router: normal(0, router_init_std) rows from a seeded torch.Generator, or
  zeros when router_init_std=0. noise_weight (router_noise) and expert_bias
  (sigmoid router) start at zero, as in router.Router.
* expert_noise (relative std): each expert copy gets independent Gaussian noise
  of std expert_noise * std(dense matrix) on W1, W3 and W2 to break symmetry
  (applied before the scalings below).
* Shared experts (n_shared_experts > 0, width n_shared_experts * d_ff/G): the
  shared FFN is built from the dense FFN's hidden units (unit j copies dense
  unit j mod d_ff) and the function is *split* between the shared and the
  routed path: for every dense hidden unit the shared copies get a fraction
  `shared_fraction` (default 0.5) of its W2 column and the routed experts the
  rest (1 - shared_fraction); units the shared expert does not cover stay
  wholly routed. Shared output + routed output = dense FFN whenever the routed
  part alone is exact (same conditions as below). shared_fraction=1 with a
  shared expert at least d_ff wide makes the routed experts start silent
  (W2 = 0): exact for *every* router, but the router and the routed W1/W3 get
  no gradient until W2 has moved; 0.5 keeps both paths alive.

Weight scaling (`weight_scaling`)
---------------------------------
Let s be the activation scale (Megatron `_get_moe_activation_scale`):
    s = E' * G^2 / k   softmax-then-topk gates (softmax_topk; expert_choice, whose
                       eval/generation path is softmax-then-topk with k = capacity_factor)
    s = G              gates renormalised over the picked experts (topk_softmax, sigmoid)
    s = 1              lory (merge weights sum to 1; G must be 1)
* "none":     no scaling.
* "megatron": Megatron's weight scale s^(1/3) on all three expert matrices
  (GLU experts). W2 (silu(c W1 x) * c W3 x) c = c^3 W2(silu(W1 x) W3 x) would
  need silu(c z) = c silu(z), which holds only in silu's linear regime
  (silu(z) ~ z/2 near 0): APPROXIMATE whenever s != 1.
* "exact":    scale only W2 by s. EXACT for SwiGLU, because the output is linear
  in W2.
* "auto" (default): "exact" when G > 1 or the gates are softmax-then-topk,
  otherwise "none" (then s = 1 and all three coincide).

Why the gates work out (k = m*G picks m whole groups):
* topk_softmax: the k picked logits are m group logits each repeated G times,
  so each shard of picked group j gets gate p_j / G with p = softmax over the m
  group logits. Output = sum_j sum_g (p_j / G) * s * FFN_g(x) = (s/G) * dense(x)
  -> s = G is exact, for ANY router weights. sigmoid: likewise with
  p_j = sigmoid(z_j) / sum sigmoid.
* softmax_topk: each shard of group i gets q_i / G with q = softmax over the E'
  group logits, so output = (s/G) * (sum_{picked j} q_j) * dense(x). The factor
  sum q_j depends on x unless all logits are equal: with router_init_std=0,
  q_j = 1/E' and s = E' G^2 / k makes it exactly 1. With a random router it is
  only approximate (the error grows with the logit spread, ~router_init_std *
  |x|); no weight scaling can fix an input-dependent factor.

Exact vs approximate, in one table (no expert_noise, dropless):
    router                     weight_scaling      G=1                    G>1
    topk_softmax / sigmoid     none                exact                  WRONG (output / G)
                               exact (auto)        exact                  exact
                               megatron            exact (s=1)            approximate (silu)
    softmax_topk               exact (auto)        exact iff router zero  exact iff router zero (*)
                               megatron / none     approximate            approximate
    lory                       any (s=1)           exact                  not allowed
    expert_choice              as softmax_topk, in eval mode only (training-mode expert choice
                               lets a token be taken by any number of experts)
(*) with a zero router all E'*G logits tie and torch.topk's tie-breaking decides
which experts run; the result is exact iff it takes k/G copies of every shard
(the CPU kernel returns a contiguous index window, which does; not guaranteed
elsewhere). The same caveat applies to topk_softmax/sigmoid with G>1 and a
zero router. Router noise (training mode only) and capacity dropping can also
break preservation; upcycle_state_dict() reports all of this in
info["options"]["function_preserving"] / ["preservation_note"].

Measured max |logit diff| vs the dense model, fp32, 2-layer d=32 models (tests/test_upcycle.py,
"FFN-active" weights: silu in its nonlinear range, logit std ~1, max |logit| ~4.5; and a tiny
dense model trained 300 AdamW steps):
    exact combinations (coarse any router init, E'4 G2 k2/k4, shared, lory)   <= 2e-6 (1e-5 at d=64)
    megatron, s=2 (E'4 G2 k2 topk_softmax)       0.72 (|dloss| 5e-3); trained 0.27 (|dloss| 0.04)
    megatron, s=4 (E'2 G4 k4; softmax_topk E8 k2) 1.18 (|dloss| 7e-3); trained 0.49 (|dloss| 0.09)
    megatron, s=2, GPT's own init (silu ~linear)  6e-4
    softmax_topk, router std 0.02, exact W2 scale 0.24 (|dloss| 1e-3); trained 0.94 (|dloss| 0.19)
    none with G=2                                 0.36; trained 3.0 (output halved)
    expert_noise=0.01                             0.11

Beyond copies: Drop-Upcycling, Branch-Train-MiX, hidden-state router init
--------------------------------------------------------------------------
    python upcycle.py --ckpt=out/dense --out_dir=out/drop --method=drop --drop_ratio=0.5
    python upcycle.py --ckpt=out/b0,out/b1,out/b2,out/b3 --out_dir=out/btx --method=btx --n_experts=4
    python upcycle.py --ckpt=out/dense --out_dir=out/h --n_experts=4 --router_init=hidden --domains=code,prose,math,c

* Drop-Upcycling (Nakamura et al., arXiv 2502.19261, section 3): after the copies are
  made, every expert re-initialises its own random share drop_ratio of its channels
  (rows of W1/W3, columns of W2; one set per expert for the three matrices) from the
  replaced weights' mean and std (drop_upcycle). drop_ratio=0 is copy-upcycling bit for
  bit. The draws come after the router's, so the routers equal copy-upcycling's.
* Branch-Train-MiX (Sukhbaatar et al., arXiv 2403.07816, section 2): N dense branches of
  one model, each trained on its own domain (TokenDataset(domains=D) samples one), -> one
  MoE whose expert e is branch e // (E/N)'s FFN; everything else is the branches' mean
  (btx_merge).
  N identical branches with top-k-then-softmax gates give the dense model back.
* router_init="hidden" (mergekit-moe's `hidden` gate mode): router row e is the unit
  direction of the mean FFN input, at that layer, of text from expert e's domain, centred
  over the domains and made orthogonal to their overall mean (hidden_router_rows). With
  topk_softmax and G=1 upcycling stays exact, since any router is.
Online use (train.py --init_from=... --upcycle_method=copy|drop|btx --upcycle_router_init=hidden,
train.upcycle_online): upcycle_from_checkpoint with options["drop_ratio"], or
btx_from_checkpoints(paths, options); then router_init_hidden(model, data_dir, domains)
and upcycled_from["options"].update(its result).

Public API
----------
    target_config(dense_args, model_args=None, granularity=None, expansion_rate=None) -> (GPTConfig, G)
    upcycle_state_dict(dense_state, dense_args, options=None, **kw) -> (state_dict, GPTConfig, info)
    upcycle_model(dense, options=None, **kw) -> GPT                  (dense: GPT | checkpoint dict)
    upcycle_from_checkpoint(path, options=None, device="cpu", **kw) -> (GPT, upcycled_from)
    upcycle_checkpoint(path, out_dir, options=None, force=False, **kw) -> (written path, GPTConfig, info)
    expert_similarity(experts) -> (E, E);  mean_pairwise_similarity(experts, granularity=1) -> float
    mean_similarity_of_pairs(S, granularity=1) -> float   (same-shard pairs e = e' mod G of an (E, E) matrix)
    similarity_to_dense(experts, dense) -> (E,);  dense_ffn_weights(state_dict, layer) -> (W1, W3, W2)
    drop_upcycle(gate, up, down, ratio, generator) -> (gate, up, down, channels (E, n))
    btx_merge(dense_states, dense_args, options=None, names=None, **kw) -> (state_dict, GPTConfig, info)
    btx_from_checkpoints(paths, options=None, device="cpu") -> (GPT, upcycled_from)
    btx_checkpoint(paths, out_dir, options=None, force=False, hidden=None) -> (written path, GPTConfig, info)
    branch_domains(paths) -> [the domain each branch checkpoint's config records]
    router_init_hidden(model, data_dir, domains, n_windows=16, ...) -> dict for info["options"]

`options` (a dict, or keyword arguments; train.py passes its upcycle_options()):
    model_args       target GPTConfig fields (dict or GPTConfig): MoE fields (n_experts,
                     top_k, moe_layers, router, router_init_std, n_shared_experts, ...);
                     dense-shape fields must match the checkpoint. Missing keys come from
                     the dense checkpoint's model_args.
    granularity      G (default: inferred from model_args expert_hidden, else 1)
    expansion_rate   E' (optional; checked against n_experts / G)
    weight_scaling   "auto" | "none" | "exact" | "megatron"
    expert_noise     relative std of the noise on the expert copies (0 = none)
    shared_fraction  share of the dense function given to the shared expert(s) (0.5)
    seed             torch.Generator seed for router rows and noise (0)
    drop_ratio       Drop-Upcycling's re-initialised share of each expert's channels (0 = copies)
"""
import argparse
import math
import os
import sys
from dataclasses import asdict, fields

import torch

from checkpoint import CheckpointError, ckpt_path, file_sha256, load_checkpoint, load_model, save_checkpoint
from configurator import (METHODS, ROUTER_INITS, ArgumentParser, check_hidden_router_domains, float_problem,
                          ram_available)
from data.dataset import TokenDataset
from model import GPT, GPTConfig
from router import expert_choice_k
from outdir import LockError, OutDirLock

WEIGHT_SCALINGS = ("auto", "none", "exact", "megatron")
# fields that fix the dense parameter shapes, and ones that change the dense function
SHAPE_KEYS = ("vocab_size", "n_layer", "n_embd", "n_head", "n_kv_head", "ffn_hidden", "tie_embeddings")
FUNCTION_KEYS = ("rope_theta", "norm_eps", "rope_scaling", "rope_factor", "rope_low_freq_factor",
                 "rope_high_freq_factor", "rope_original_max_pos")
OPTION_DEFAULTS = {"model_args": None, "granularity": None, "expansion_rate": None,
                   "weight_scaling": "auto", "expert_noise": 0.0, "shared_fraction": 0.5, "seed": 0,
                   "drop_ratio": 0.0}
FFN_MATS = ("gate_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------- config

def _as_dict(args):
    if args is None:
        return {}
    if isinstance(args, GPTConfig):
        return asdict(args)
    return dict(args)


def _shape(cfg, keys=SHAPE_KEYS + FUNCTION_KEYS):
    return ", ".join(f"{k}={getattr(cfg, k)}" for k in keys)


def target_config(dense_args, model_args=None, granularity=None, expansion_rate=None):
    """The MoE GPTConfig an upcycle of a dense model with `dense_args` produces.

    model_args: target fields (dict or GPTConfig); keys it lacks come from the
    dense config (its MoE fields reset to the GPTConfig defaults). Returns
    (cfg, G) with cfg.expert_hidden = d_ff / G. Raises ValueError (one line) for
    an MoE source, a target whose dense shape differs from the source, or an
    impossible fine-grained layout."""
    dense_args = _as_dict(dense_args)
    dense = GPTConfig.from_dict(dense_args)
    if dense.is_moe:
        raise ValueError(f"the source is already an MoE model (moe_layers={dense.moe_layers!r}); "
                         f"upcycle a dense checkpoint")
    moe_names = {f.name for f in fields(GPTConfig)} - set(SHAPE_KEYS + FUNCTION_KEYS) - {"block_size", "dropout"}
    args = {k: v for k, v in asdict(dense).items() if k not in moe_names}
    user = _as_dict(model_args)
    unknown = sorted(set(user) - {f.name for f in fields(GPTConfig)})
    if unknown:
        raise ValueError(f"unknown model config key(s) {unknown}")
    args.update(user)
    if str(args.get("moe_layers", "none")).strip() in ("none", ""):
        raise ValueError("the target config has moe_layers='none': nothing to upcycle "
                         "(use --moe_layers=all, every_other or a list like 1,3)")
    # the target's dense part, resolved (ffn_hidden=0 -> Llama rule, n_kv_head=0 -> n_head)
    tgt_dense = GPTConfig(**{**args, "moe_layers": "none", "expert_hidden": 0})
    if any(getattr(tgt_dense, k) != getattr(dense, k) for k in SHAPE_KEYS + FUNCTION_KEYS):
        raise ValueError(f"target config ({_shape(tgt_dense)}) differs from the dense checkpoint's "
                         f"({_shape(dense)}); upcycling keeps the dense shape")
    d_ff = dense.ffn_hidden
    eh = int(args.get("expert_hidden") or 0)
    if granularity in (None, 0):
        if eh and d_ff % eh:
            raise ValueError(f"expert_hidden={eh} does not divide the dense ffn_hidden={d_ff}")
        G = d_ff // eh if eh else 1
    else:
        G = int(granularity)
        if G < 1:
            raise ValueError(f"granularity={G} must be >= 1")
        if d_ff % G:
            raise ValueError(f"the dense ffn_hidden={d_ff} is not divisible by granularity={G}")
        if eh and eh * G != d_ff:
            raise ValueError(f"expert_hidden={eh} contradicts granularity={G} (d_ff/G = {d_ff // G})")
    E = int(args.get("n_experts", GPTConfig.n_experts))
    k = int(args.get("top_k", GPTConfig.top_k))
    if args.get("router") == "expert_choice":   # evaluates with k = capacity_factor experts per token
        k = expert_choice_k(args.get("capacity_factor", GPTConfig.capacity_factor), E)
    if expansion_rate not in (None, 0) and int(expansion_rate) * G != E:
        raise ValueError(f"expansion_rate*granularity = {int(expansion_rate)}*{G} = {int(expansion_rate) * G} "
                         f"does not match n_experts={E}")
    if E % G:
        raise ValueError(f"n_experts={E} is not a multiple of granularity={G} "
                         f"(fine-grained upcycling makes expansion_rate*granularity experts)")
    if G > 1 and k % G:
        raise ValueError(f"top_k={k} must be a multiple of granularity={G} so that top-k picks whole "
                         f"virtual groups")
    if G > 1 and args.get("router") == "lory":
        raise ValueError("router='lory' merges whole experts: fine-grained upcycling (granularity > 1) "
                         "cannot preserve the dense function there; use granularity=1")
    args["expert_hidden"] = d_ff // G
    return GPTConfig(**args), G


def resolve_weight_scaling(weight_scaling, router, G):
    if weight_scaling not in WEIGHT_SCALINGS:
        raise ValueError(f"unknown weight_scaling {weight_scaling!r}; valid: {', '.join(WEIGHT_SCALINGS)}")
    if weight_scaling == "auto":
        return "exact" if G > 1 or router in ("softmax_topk", "expert_choice") else "none"
    return weight_scaling


def routed_k(cfg):
    """Experts per token of the token-wise routing the upcycle must preserve: top_k,
    or capacity_factor for expert choice (its eval fallback, router.expert_choice_k)."""
    if cfg.router == "expert_choice":
        return expert_choice_k(cfg.capacity_factor, cfg.n_experts)
    return cfg.top_k


def activation_scale(router, n_experts, G, top_k):
    """Megatron `_get_moe_activation_scale`: how much smaller the routed output is
    than the dense FFN at upcycling time (see the module docstring). top_k: the
    experts per token, routed_k(cfg)."""
    if router == "lory":
        return 1.0
    if router in ("softmax_topk", "expert_choice"):
        return (n_experts // G) * G * G / top_k
    return float(G)


def _routed_silent(cfg, G, shared_fraction):
    return cfg.n_shared_experts > 0 and shared_fraction == 1 and cfg.n_shared_experts * cfg.expert_hidden >= cfg.ffn_hidden


def preservation(cfg, G, weight_scaling, expert_noise=0.0, shared_fraction=0.5):
    """('exact' | 'approximate', note): does the upcycled model compute the dense
    function at step 0, and under which caveats (see the module docstring)."""
    ws = resolve_weight_scaling(weight_scaling, cfg.router, G)
    s = activation_scale(cfg.router, cfg.n_experts, G, routed_k(cfg))
    caveats = []
    if cfg.capacity_factor > 0 or cfg.eval_capacity_factor > 0:
        caveats.append("only while no assignment is dropped (capacity_factor > 0)")
    if expert_noise > 0:
        return "approximate", f"expert_noise={expert_noise} perturbs the expert copies"
    if _routed_silent(cfg, G, shared_fraction):
        return "exact", "the shared expert carries the whole dense FFN; routed experts start with down_proj = 0"
    if ws != "exact" and s != 1:
        why = "silu is not homogeneous: silu(c z) != c silu(z)" if ws == "megatron" else \
            f"unscaled routed output is 1/{s:g} of the dense FFN"
        return "approximate", f"weight_scaling={ws} with activation scale {s:g}: {why}"
    if cfg.router in ("softmax_topk", "expert_choice"):
        if cfg.router_init_std > 0 and cfg.n_experts != routed_k(cfg):   # (k = E: all probs, sum 1)
            return "approximate", ("softmax-then-topk gates sum to an input-dependent value unless the router "
                                   "is zero (router_init_std=0)")
        if cfg.router == "expert_choice":
            caveats.append("in eval mode only (training-mode expert choice is not token-wise top-k)")
    if cfg.router != "lory" and cfg.router_init_std == 0 and G > 1:
        caveats.append("zero router with granularity > 1: all logits tie, exact iff torch.topk picks k/G "
                       "copies of every shard (true for the CPU kernel)")
    if cfg.router_noise and (G > 1 or cfg.router in ("softmax_topk", "expert_choice")):
        caveats.append("in eval mode only (router noise is independent per expert)")
    return "exact", "; ".join(caveats)


# ----------------------------------------------------------------------------- weights

def _options(options, kw):
    opts = dict(OPTION_DEFAULTS)
    for src in (options or {}), kw:
        unknown = sorted(set(src) - set(OPTION_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown upcycling option(s) {unknown}; valid: {sorted(OPTION_DEFAULTS)}")
        opts.update({k: v for k, v in src.items() if v is not None})
    if opts["expert_noise"] < 0:
        raise ValueError(f"expert_noise={opts['expert_noise']} must be >= 0")
    if not 0 <= opts["shared_fraction"] <= 1:
        raise ValueError(f"shared_fraction={opts['shared_fraction']} must be in [0, 1]")
    if not 0 <= opts["drop_ratio"] <= 1:
        raise ValueError(f"drop_ratio={opts['drop_ratio']} must be in [0, 1] (the share of each expert's "
                         f"channels Drop-Upcycling re-initialises; 0.5 is the paper's best)")
    return opts


def scale_experts(g1, g3, g2, weight_scaling, s):
    """Apply the activation scale s to stacked expert weights: 'exact' multiplies W2
    by s, 'megatron' spreads it as s^(1/3) over W1, W3 and W2; anything else leaves
    them as they are. Returns (g1, g3, g2)."""
    if weight_scaling == "exact":
        return g1, g3, g2 * s
    if weight_scaling == "megatron":
        c = s ** (1.0 / 3.0)
        return g1 * c, g3 * c, g2 * c
    return g1, g3, g2


def upcycle_ffn(w1, w3, w2, cfg, G, weight_scaling="exact", expert_noise=0.0, shared_fraction=0.5,
                generator=None):
    """One dense SwiGLU (w1, w3: (d_ff, d); w2: (d, d_ff)) -> the tensors of one MoE
    layer, named relative to blocks.{l}.ffn. (router.weight, [router.noise_weight],
    [router.expert_bias], gate_proj, up_proj, down_proj, [shared.*.weight]).
    Random draws, in this order: router rows (E', d), then noise on the gate, up and
    down stacks. Computed in fp32 on the CPU; experts are returned in w1's dtype."""
    dtype = w1.dtype
    w1, w3, w2 = (t.detach().to("cpu", torch.float32) for t in (w1, w3, w2))
    d_ff, d = w1.shape
    E, k = cfg.n_experts, routed_k(cfg)
    Ep, h = E // G, d_ff // G
    ws = resolve_weight_scaling(weight_scaling, cfg.router, G)
    out = {}
    # router: E' rows, each repeated G times (virtual groups)
    if cfg.router_init_std > 0:
        rows = torch.randn(Ep, d, generator=generator) * cfg.router_init_std
    else:
        rows = torch.zeros(Ep, d)
    out["router.weight"] = rows.repeat_interleave(G, dim=0)                 # (E, d) fp32
    if cfg.router_noise and cfg.router != "lory":
        out["router.noise_weight"] = torch.zeros(E, d)
    if cfg.router == "sigmoid":
        out["router.expert_bias"] = torch.zeros(E)
    # shared expert(s): hidden unit j copies dense unit j mod d_ff; the dense function
    # is split per unit: shared alpha_u, routed 1 - alpha_u
    routed_col = torch.ones(d_ff)
    if cfg.n_shared_experts:
        S = cfg.n_shared_experts * h
        src = torch.arange(S) % d_ff
        count = torch.bincount(src, minlength=d_ff).float()
        alpha = shared_fraction * (count > 0).float()                      # (d_ff,)
        out["shared.gate_proj.weight"] = w1[src].to(dtype)
        out["shared.up_proj.weight"] = w3[src].to(dtype)
        out["shared.down_proj.weight"] = (w2[:, src] * (alpha[src] / count[src])).to(dtype)
        routed_col = 1.0 - alpha
    # routed experts: expert i*G + g holds shard g
    g1 = w1.view(G, h, d).repeat(Ep, 1, 1)                                  # (E, h, d)
    g3 = w3.view(G, h, d).repeat(Ep, 1, 1)
    g2 = w2.view(d, G, h).permute(1, 0, 2).repeat(Ep, 1, 1)                 # (E, d, h)
    if expert_noise > 0:
        g1 = g1 + expert_noise * w1.std() * torch.randn(g1.shape, generator=generator)
        g3 = g3 + expert_noise * w3.std() * torch.randn(g3.shape, generator=generator)
        g2 = g2 + expert_noise * w2.std() * torch.randn(g2.shape, generator=generator)
    g2 = g2 * routed_col.view(G, h).repeat(Ep, 1)[:, None, :]
    g1, g3, g2 = scale_experts(g1, g3, g2, ws, activation_scale(cfg.router, E, G, k))
    out["gate_proj"], out["up_proj"], out["down_proj"] = (t.to(dtype).contiguous() for t in (g1, g3, g2))
    return out


def _reference_shapes(cfg):
    """Parameter/buffer names and shapes of GPT(cfg), built on the meta device (no memory)."""
    with torch.device("meta"):
        m = GPT(cfg)
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def _check_keys(state, cfg, what):
    ref = _reference_shapes(cfg)
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing, extra = sorted(set(ref) - set(got)), sorted(set(got) - set(ref))
    bad = [f"{k} {got[k]} vs {ref[k]}" for k in sorted(set(ref) & set(got)) if got[k] != ref[k]]
    if missing or extra or bad:
        parts = [f"missing {missing[:4]}" if missing else "", f"unexpected {extra[:4]}" if extra else "",
                 f"shape {bad[:4]}" if bad else ""]
        raise ValueError(f"{what} does not match its model_args: " + "; ".join(p for p in parts if p))


def check_upcycle_options(options, dense_args=None):
    """Check upcycling options before any weights exist (train.py calls it before a
    Lory dense warm-up starts). dense_args defaults to the target's own dense part.
    Raises ValueError (one line)."""
    opts = _options(options, {})
    dense = dense_args or {**_as_dict(opts["model_args"]), "moe_layers": "none", "expert_hidden": 0}
    cfg, G = target_config(dense, opts["model_args"], opts["granularity"], opts["expansion_rate"])
    resolve_weight_scaling(opts["weight_scaling"], cfg.router, G)


def upcycle_info(cfg, G, ws, opts):
    """What an upcycle records of itself (upcycled_from["method"], ["options"]): the
    resolved options, activation scale and function-preservation verdict. Depends
    on the shapes and options only, not on the weights (parallel.upcycle_owned
    reports the same record without building every expert)."""
    verdict, note = preservation(cfg, G, ws, opts["expert_noise"], opts["shared_fraction"])
    if opts["drop_ratio"] > 0:
        verdict, note = "approximate", (f"drop_ratio={opts['drop_ratio']:g} re-initialises that share of "
                                        f"every expert's channels")
    return {
        "method": ("drop_upcycling" if opts["drop_ratio"] > 0 else
                   "sparse_upcycling" if G == 1 else "fine_grained_virtual_groups"),
        "options": {
            "n_experts": cfg.n_experts, "top_k": cfg.top_k, "granularity": G, "expansion_rate": cfg.n_experts // G,
            "expert_hidden": cfg.expert_hidden, "moe_layers": cfg.moe_layers, "router": cfg.router,
            "router_init_std": cfg.router_init_std, "n_shared_experts": cfg.n_shared_experts,
            "shared_fraction": float(opts["shared_fraction"]) if cfg.n_shared_experts else None,
            "weight_scaling": ws, "activation_scale": activation_scale(cfg.router, cfg.n_experts, G, routed_k(cfg)),
            "expert_noise": float(opts["expert_noise"]), "seed": int(opts["seed"]),
            "drop_ratio": float(opts["drop_ratio"]),
            "function_preserving": verdict, "preservation_note": note,
        },
    }


def upcycle_state_dict(dense_state, dense_args, options=None, **kw):
    """Dense state dict + target MoE config -> MoE state dict.

    dense_state: the dense GPT's state_dict; dense_args: its GPTConfig (or dict).
    options / kw: see the module docstring (model_args, granularity, expansion_rate,
    weight_scaling, expert_noise, shared_fraction, seed).
    Returns (state_dict, cfg, info): cfg the MoE GPTConfig, info = {"method", "options"}
    with the resolved options, activation scale and function-preservation verdict.
    Deterministic: same inputs and seed -> identical tensors. Raises ValueError."""
    opts = _options(options, kw)
    dense_cfg = GPTConfig.from_dict(_as_dict(dense_args))
    cfg, G = target_config(dense_cfg, opts["model_args"], opts["granularity"], opts["expansion_rate"])
    _check_keys(dense_state, dense_cfg, "the dense state dict")
    ws = resolve_weight_scaling(opts["weight_scaling"], cfg.router, G)
    gen = torch.Generator().manual_seed(int(opts["seed"]))
    moe_ids = cfg.moe_layer_ids()
    prefixes = tuple(f"blocks.{l}.ffn." for l in moe_ids)
    state = {k: v for k, v in dense_state.items() if not k.startswith(prefixes)}
    for l in moe_ids:
        p = f"blocks.{l}.ffn."
        w1, w3, w2 = (dense_state[p + m + ".weight"] for m in FFN_MATS)
        layer = upcycle_ffn(w1, w3, w2, cfg, G, ws, opts["expert_noise"], opts["shared_fraction"], gen)
        state.update({p + name: t for name, t in layer.items()})
    if opts["drop_ratio"] > 0:   # after every router/noise draw, so the routers equal copy-upcycling's
        drop_upcycle_layers(state, moe_ids, opts["drop_ratio"], gen)
    _check_keys(state, cfg, "the upcycled state dict")   # guards against model.py drifting
    info = upcycle_info(cfg, G, ws, opts)
    return state, cfg, info


def upcycle_model(dense, options=None, **kw):
    """Upcycle a dense GPT (or a loaded dense checkpoint dict) in memory.
    Returns a new MoE GPT on the CPU (fp32 parameters), in train mode.
    Used by train.py's dense warm-up (Lory) and by upcycle_from_checkpoint."""
    if isinstance(dense, GPT):
        state, args = {k: v.detach().cpu() for k, v in dense.state_dict().items()}, dense.config
    elif isinstance(dense, dict) and "model" in dense and "model_args" in dense:
        state, args = dense["model"], dense["model_args"]
    else:
        raise ValueError(f"upcycle_model needs a dense GPT or a checkpoint dict, got {type(dense).__name__}")
    moe_state, cfg, info = upcycle_state_dict(state, args, options, **kw)
    model = GPT(cfg)
    model.load_state_dict(moe_state)
    model.upcycle_info = info
    return model


def _load_dense(path):
    try:
        ckpt = load_checkpoint(path, map_location="cpu")
    except CheckpointError as e:
        raise ValueError(str(e)) from None
    if not isinstance(ckpt.get("model_args"), dict):
        raise ValueError(f"{ckpt_path(path)} has no model_args: not a model checkpoint of this project")
    return ckpt


def _check_fits_in_memory(dense_args, options):
    """Refuse (one-line ValueError) an upcycle whose expert stacks cannot fit in RAM:
    at least one MoE layer of E experts of width ffn_hidden / G, 3 fp32 matrices
    (E, h_e, d) each, before anything is allocated (--n_experts=10**6)."""
    E = int((options or {}).get("model_args", {}).get("n_experts", 8))
    G = max(int((options or {}).get("granularity", 1) or 1), 1)
    d, h = int(dense_args.get("n_embd", 0)), int(dense_args.get("ffn_hidden", 0))
    need, have = 4 * 3 * E * d * max(h // G, 1), ram_available()
    if have is not None and need > have:
        raise ValueError(f"--n_experts={E} needs at least {need / 2**30:,.1f} GiB of RAM for one layer's experts "
                         f"(3 x {E} x {max(h // G, 1)} x {d} fp32) but {have / 2**30:,.1f} GiB is available: "
                         f"use fewer experts")


def upcycle_from_checkpoint(path, options=None, device="cpu", **kw):
    """Online upcycling: dense checkpoint (out_dir or .pt) -> (MoE GPT on `device`,
    upcycled_from). upcycled_from = {"path", "sha256", "method", "options"} as
    stored in the checkpoint (checkpoint.py). Raises ValueError for a missing,
    corrupt or MoE checkpoint and for every bad option."""
    dense = _load_dense(path)
    model = upcycle_model(dense, options, **kw)
    src = os.path.abspath(ckpt_path(path))
    upcycled_from = {"path": src, "sha256": file_sha256(src), **model.upcycle_info}
    return model.to(device), upcycled_from


def _check_out_dir(paths, out_dir, force):
    """Refuse to overwrite a source checkpoint, or out_dir/ckpt.pt without force."""
    dst = os.path.abspath(os.path.join(out_dir, "ckpt.pt"))
    for path in paths:
        src = os.path.abspath(ckpt_path(path))
        if os.path.exists(dst) and os.path.exists(src) and os.path.samefile(src, dst):
            raise ValueError(f"--out_dir={out_dir} holds the source checkpoint {src}; choose another out_dir")
    if os.path.exists(dst) and not force:
        raise ValueError(f"{dst} already exists; pass --force to overwrite it")


def _save_moe(out_dir, cfg, moe_state, config, upcycled_from):
    """Write a step-0 MoE checkpoint (no optimizer, no RNG state) atomically."""
    ckpt = {
        "model_args": asdict(cfg),
        "model": moe_state,
        "optimizer": None,
        "iter_num": 0,
        "best_val_loss": 1e9,
        "config": config,
        "rng": None,
        "aux_coef": None,
        "upcycled_from": upcycled_from,
    }
    return save_checkpoint(ckpt, out_dir)


def upcycle_checkpoint(path, out_dir, options=None, force=False, hidden=None, **kw):
    """Offline upcycling (the CLI): write out_dir/ckpt.pt, an MoE checkpoint that
    train.py can resume (--init_from=resume) and eval.py can read. iter_num 0,
    optimizer None, best_val_loss 1e9, aux_coef None, rng None; the dense
    checkpoint's "config" is kept. Refuses to overwrite out_dir/ckpt.pt unless
    force, and never overwrites the source. hidden: None, or the keyword arguments
    of router_init_hidden (data_dir, domains, ...) for router_init="hidden".
    Returns (path written, cfg, info)."""
    with OutDirLock(out_dir, "upcycle.py " + " ".join(sys.argv[1:])):   # LockError if a run writes there
        _check_out_dir([path], out_dir, force)
        src = os.path.abspath(ckpt_path(path))
        dense = _load_dense(path)
        _check_fits_in_memory(dense["model_args"], options)
        moe_state, cfg, info = upcycle_state_dict(dense["model"], dense["model_args"], options, **kw)
        if hidden is not None:
            moe_state = _with_hidden_router(moe_state, cfg, info, hidden)
        upcycled_from = {"path": src, "sha256": file_sha256(src), **info}
        return _save_moe(out_dir, cfg, moe_state, dense.get("config"), upcycled_from), cfg, info


# ----------------------------------------------------------------------------- beyond copies (issue 16)
# Drop-Upcycling, Branch-Train-MiX and a router initialised from hidden states. Every expert
# of a copy-upcycled model starts identical; these give the experts (or the router) a
# reason to differ from step 0.

def _redraw(w, generator):
    """Fresh values of w's shape from N(mean(w), std(w)^2), in fp32."""
    return torch.randn(w.shape, generator=generator) * w.std() + w.mean()


def drop_upcycle(gate, up, down, ratio, generator):
    """Drop-Upcycling (Nakamura et al., arXiv 2502.19261, section 3, "diversity
    re-initialization"): in every expert, re-initialise a random share `ratio` of its
    intermediate channels and keep the rest of the dense copy.

    gate, up: (E, h, d), channel j = row j of W1 / W3; down: (E, d, h), channel j = column j
    of W2. For each expert e in turn: S_e = floor(ratio * h) channels drawn without
    replacement (torch.randperm); then for W1, W3, W2 in that order the weights at S_e are
    replaced by draws from N(mu, sigma^2), where mu and sigma are the mean and std of the
    weights they replace (the original weights' statistics; the authors' conversion script
    computes them on the selected channels too). Each expert gets its own S_e, one set for
    all three matrices as in the paper; the released script draws a separate set per matrix.
    (It also permutes the channels first, which does not change an FFN, so it is left out.)
    Returns (gate, up, down, channels): new tensors in the input dtype, channels (E, |S|)
    sorted. ratio=0 returns the inputs themselves and draws nothing."""
    E, h, d = gate.shape
    n = math.floor(ratio * h + 1e-9)                                     # |S| = floor(r * h)
    if n == 0:
        return gate, up, down, torch.zeros(E, 0, dtype=torch.long)
    dtype = gate.dtype
    gate, up, down = (t.detach().to("cpu", torch.float32).clone() for t in (gate, up, down))
    picks = []
    for e in range(E):
        S = torch.randperm(h, generator=generator)[:n].sort().values     # (n,)
        gate[e, S] = _redraw(gate[e, S], generator)                      # (n, d) rows
        up[e, S] = _redraw(up[e, S], generator)
        down[e, :, S] = _redraw(down[e, :, S], generator)                # (d, n) columns
        picks.append(S)
    return gate.to(dtype), up.to(dtype), down.to(dtype), torch.stack(picks)


def drop_upcycle_layers(state, layers, ratio, generator):
    """drop_upcycle on the expert stacks of every layer in `layers` of an MoE state dict,
    in place, layer by layer. Returns {layer: (E, |S|) re-initialised channels}."""
    out = {}
    for l in layers:
        names = [f"blocks.{l}.ffn.{m}" for m in FFN_MATS]
        *stacks, out[l] = drop_upcycle(*(state[k] for k in names), ratio, generator)
        state.update(zip(names, stacks))
    return out


def average_tensors(tensors):
    """Element-wise mean of same-shape tensors: summed in float64, divided, rounded once to
    their dtype, so N identical tensors average to themselves bit for bit."""
    return (torch.stack([t.double() for t in tensors]).sum(0) / len(tensors)).to(tensors[0].dtype)


def check_branches(dense_args, names):
    """The GPTConfig the BTX branches share. ValueError (one line, naming both files) when
    a branch is an MoE or differs from the first in shape, vocabulary or RoPE/norm."""
    cfgs = []
    for args, name in zip(dense_args, names):
        c = GPTConfig.from_dict(_as_dict(args))
        if c.is_moe:
            raise ValueError(f"{name} is an MoE checkpoint (moe_layers={c.moe_layers!r}); BTX merges dense branches")
        cfgs.append(c)
    for c, name in zip(cfgs[1:], names[1:]):
        diff = [f"{k} {getattr(cfgs[0], k)} vs {getattr(c, k)}" for k in SHAPE_KEYS + FUNCTION_KEYS
                if getattr(cfgs[0], k) != getattr(c, k)]
        if diff:
            raise ValueError(f"{names[0]} and {name} differ ({'; '.join(diff)}): BTX merges branches trained "
                             f"from one dense model, which share its shape and vocabulary")
    return cfgs[0]


def btx_ffn(ffns, branch, cfg, weight_scaling, generator):
    """One BTX MoE layer (tensors named relative to blocks.{l}.ffn.): expert e is the FFN of
    branch branch[e] (ffns[b] = (W1 (d_ff, d), W3 (d_ff, d), W2 (d, d_ff)) of branch b), and a
    new router drawn exactly as upcycle_ffn draws it for G=1 (same seed, same rows)."""
    E, d, dtype = cfg.n_experts, cfg.n_embd, ffns[0][0].dtype
    out = {"router.weight": torch.randn(E, d, generator=generator) * cfg.router_init_std
           if cfg.router_init_std > 0 else torch.zeros(E, d)}
    if cfg.router_noise and cfg.router != "lory":
        out["router.noise_weight"] = torch.zeros(E, d)
    if cfg.router == "sigmoid":
        out["router.expert_bias"] = torch.zeros(E)
    g1, g3, g2 = (torch.stack([ffns[b][i].float() for b in branch]) for i in range(3))  # (E, h, d) x2, (E, d, h)
    g1, g3, g2 = scale_experts(g1, g3, g2, weight_scaling, activation_scale(cfg.router, E, 1, routed_k(cfg)))
    out["gate_proj"], out["up_proj"], out["down_proj"] = (t.to(dtype).contiguous() for t in (g1, g3, g2))
    return out


def btx_merge(dense_states, dense_args, options=None, names=None, **kw):
    """Branch-Train-MiX (Sukhbaatar et al., arXiv 2403.07816, section 2, the "MiX" step):
    N dense branches of one seed model, each trained on its own domain -> one MoE.

    In every MoE layer expert e is the FFN of branch e // (E/N) (E must be a multiple of N;
    E = N is the paper's one expert per branch). Every other parameter (attention, norms,
    embeddings, the FFNs of layers that stay dense) is the element-wise mean over the
    branches (average_tensors). The router is new (btx_ffn; router_init_hidden can replace
    it) and is what the MoE then trains. Weight scaling as for G=1 upcycling.
    dense_states: N state dicts; dense_args: N GPTConfig dicts (or one for all); names: how
    errors and info name the branches (file paths). options/kw as upcycle_state_dict's,
    without granularity > 1, shared experts, expert_noise and drop_ratio (not defined for
    BTX). Returns (state_dict, cfg, info)."""
    N = len(dense_states)
    if N < 2:
        raise ValueError(f"BTX merges 2 or more dense branches, got {N}")
    names = list(names) if names else [f"branch {b}" for b in range(N)]
    args_list = list(dense_args) if isinstance(dense_args, (list, tuple)) else [dense_args] * N
    dense_cfg = check_branches(args_list, names)
    for state, name in zip(dense_states, names):
        _check_keys(state, dense_cfg, name)
    opts = _options(options, kw)
    cfg, G = target_config(dense_cfg, opts["model_args"], opts["granularity"], opts["expansion_rate"])
    if G != 1 or cfg.n_shared_experts or opts["expert_noise"] or opts["drop_ratio"]:
        raise ValueError("BTX takes whole branch FFNs as experts: granularity, n_shared_experts, expert_noise "
                         "and drop_ratio do not apply")
    E = cfg.n_experts
    if E % N:
        raise ValueError(f"n_experts={E} is not a multiple of the {N} branches (expert e takes branch e // (E/N))")
    ws = resolve_weight_scaling(opts["weight_scaling"], cfg.router, 1)
    gen = torch.Generator().manual_seed(int(opts["seed"]))
    moe_ids = cfg.moe_layer_ids()
    prefixes = tuple(f"blocks.{l}.ffn." for l in moe_ids)
    state = {k: average_tensors([s[k] for s in dense_states]) for k in dense_states[0] if not k.startswith(prefixes)}
    branch = [e // (E // N) for e in range(E)]
    for l in moe_ids:
        layer = btx_ffn([dense_ffn_weights(s, l) for s in dense_states], branch, cfg, ws, gen)
        state.update({f"blocks.{l}.ffn.{name}": t for name, t in layer.items()})
    _check_keys(state, cfg, "the merged state dict")
    verdict, note = preservation(cfg, 1, ws)
    if not all(torch.equal(dense_states[0][k], s[k]) for s in dense_states[1:] for k in dense_states[0]):
        verdict, note = "approximate", f"the {N} branches differ: experts are different FFNs, the rest is their mean"
    info = {
        "method": "branch_train_mix",
        "options": {
            "n_experts": E, "top_k": cfg.top_k, "moe_layers": cfg.moe_layers, "router": cfg.router,
            "router_init_std": cfg.router_init_std, "weight_scaling": ws,
            "activation_scale": activation_scale(cfg.router, E, 1, routed_k(cfg)), "seed": int(opts["seed"]),
            "branches": names, "expert_branch": branch,
            "function_preserving": verdict, "preservation_note": note,
        },
    }
    return state, cfg, info


def _load_branches(paths):
    """(checkpoints, absolute file names) of BTX branch checkpoints."""
    names = [os.path.abspath(ckpt_path(p)) for p in paths]
    return [_load_dense(p) for p in paths], names


def _branch_record(names):
    """What upcycled_from keeps of the branches. path/sha256 stay None: there is no single
    dense source, so similarity-to-dense monitors skip a BTX model."""
    return {"path": None, "sha256": None,
            "branch_files": [{"path": n, "sha256": file_sha256(n)} for n in names]}


def btx_from_checkpoints(paths, options=None, device="cpu", **kw):
    """BTX in memory (for train.py): dense branch checkpoints -> (MoE GPT on `device`,
    upcycled_from). Raises ValueError for a missing, corrupt, MoE or mismatched branch."""
    ckpts, names = _load_branches(paths)
    state, cfg, info = btx_merge([c["model"] for c in ckpts], [c["model_args"] for c in ckpts], options, names, **kw)
    model = GPT(cfg)
    model.load_state_dict(state)
    model.upcycle_info = info
    return model.to(device), {**_branch_record(names), **info}


def btx_checkpoint(paths, out_dir, options=None, force=False, hidden=None, **kw):
    """BTX offline (the CLI): merge the branch checkpoints `paths` into out_dir/ckpt.pt, a
    step-0 MoE checkpoint like upcycle_checkpoint's (config: the first branch's). hidden as
    in upcycle_checkpoint; its domains default to the branches' config["domains"] (one
    each). Returns (path written, cfg, info)."""
    with OutDirLock(out_dir, "upcycle.py " + " ".join(sys.argv[1:])):   # LockError if a run writes there
        _check_out_dir(paths, out_dir, force)
        ckpts, names = _load_branches(paths)
        state, cfg, info = btx_merge([c["model"] for c in ckpts], [c["model_args"] for c in ckpts], options, names,
                                     **kw)
        if hidden is not None:
            if not hidden.get("domains"):
                hidden = {**hidden, "domains": _branch_domains(ckpts, names)}
            state = _with_hidden_router(state, cfg, info, hidden)
        return _save_moe(out_dir, cfg, state, ckpts[0].get("config"), {**_branch_record(names), **info}), cfg, info


def branch_domains(paths):
    """The one domain each BTX branch checkpoint trained on (train.py's `domains` setting,
    kept in its config); ValueError (one line) when a branch records none or several."""
    ckpts, names = _load_branches(paths)
    return _branch_domains(ckpts, names)


def _branch_domains(ckpts, names):
    """The one domain each branch trained on (its config["domains"]), for router_init=hidden."""
    doms = [str((c.get("config") or {}).get("domains") or "") for c in ckpts]
    bad = [n for n, d in zip(names, doms) if not d or "," in d]
    if bad:
        raise ValueError(f"router_init=hidden needs one domain per branch: {bad[0]} records none (or several); "
                         f"pass --domains=D1,D2,... (one per branch)")
    return doms


def expert_domains(domains, n_experts):
    """One domain name per expert. `domains` (comma string or list) has n names, n dividing
    n_experts; expert e takes domains[e // (n_experts / n)], i.e. with BTX the domain of
    its branch, and with n = n_experts its own."""
    names = [d.strip() for d in domains.split(",")] if isinstance(domains, str) else [str(d) for d in domains]
    names = [d for d in names if d]
    if not names or n_experts % len(names):
        raise ValueError(f"domains={','.join(names)!r} has {len(names)} names; router_init=hidden needs a number "
                         f"that divides n_experts={n_experts} (expert e takes name e // (n_experts / n))")
    m = n_experts // len(names)
    return [names[e // m] for e in range(n_experts)]


@torch.no_grad()
def ffn_input(model, idx, layer):
    """(B, T, d) input of block `layer`'s FFN, the vector its router reads:
    ffn_norm(x + attn(attn_norm(x))), with blocks 0..layer-1 run as GPT.forward runs them."""
    x = model.tok_emb(idx)                                              # (B, T, d)
    for block in model.blocks[:layer]:
        x, _ = block(x, model.rope_cos, model.rope_sin)
    b = model.blocks[layer]
    return b.ffn_norm(x + b.attn(b.attn_norm(x), model.rope_cos, model.rope_sin))


@torch.no_grad()
def hidden_router_rows(model, windows, expert_domain):
    """router_init="hidden" (mergekit-moe's `hidden` gate mode): router row e points along
    the mean FFN input of the text expert e should take. Sets every MoE layer's
    router.weight in place and returns {layer: (E, d) rows}.

    windows: {domain: (B, T) token windows of that domain}; expert_domain: a domain per expert.
    For each MoE layer l in order (so the rows already set shape the later layers' inputs):
        m_D   = mean over the tokens of domain D of ffn_input(model, windows[D], l)    (d,)
        m     = mean over domains of m_D
        c_D   = (m_D - m) minus its component along m   (the part all domains share: mergekit
                removes it with negative prompts; here it is what every token carries, and
                row . m = 0 keeps it from favouring one expert for every token)
        row_e = c_{D(e)} / ||c_{D(e)}||           (unit norm, as mergekit normalises its gates)
    A token at its domain's mean then scores highest on its own domain's row (Cauchy-Schwarz).
    Experts that share a domain share a row (a virtual group, like fine-grained upcycling's)."""
    was = model.training
    model.eval()
    doms = list(dict.fromkeys(expert_domain))
    pick = torch.tensor([doms.index(D) for D in expert_domain])
    rows, dev = {}, model.tok_emb.weight.device
    for l, ffn in model.moe_layers():
        m = torch.stack([ffn_input(model, windows[D].to(dev), l).float().mean((0, 1)).cpu()
                         for D in doms])                                        # (n_domains, d)
        mean = m.mean(0)                                                        # (d,)
        u = mean / mean.norm().clamp_min(1e-12)
        c = m - mean
        c = c - (c @ u)[:, None] * u                                            # row . mean = 0
        c = c / c.norm(dim=1, keepdim=True).clamp_min(1e-12)
        rows[l] = c[pick]                                                       # (E, d)
        ffn.router.weight.copy_(rows[l].to(dev))
    model.train(was)
    return rows


def router_init_hidden(model, data_dir, domains, n_windows=16, block_size=None, split="train", seed=0):
    """Set every MoE router of `model` from hidden states (hidden_router_rows): n_windows
    windows of block_size tokens (default the model's) of each domain, drawn from
    data_dir's split with TokenDataset(domains=D) and a Generator seeded with `seed`.
    domains: see expert_domains (at least 2 different names). Returns what to record in
    info["options"] (router_init, its domains and data, and the preservation verdict when
    a non-zero router breaks it)."""
    cfg = model.config
    names = expert_domains(domains, cfg.n_experts)
    if len(set(names)) < 2:
        raise ValueError(f"router_init=hidden needs at least 2 different domains (got {names[0]!r} for every "
                         f"expert): rows are the domains' mean hidden states minus their average")
    G = cfg.ffn_hidden // cfg.expert_hidden
    if any(len(set(names[i:i + G])) > 1 for i in range(0, cfg.n_experts, G)):
        raise ValueError(f"granularity {G}: the {G} experts of a virtual group must take the same domain "
                         f"(give n_experts / {G} or fewer domains)")
    T = block_size or cfg.block_size
    windows = {}
    for D in dict.fromkeys(names):
        ds = TokenDataset(data_dir, split, domains=D)
        if ds.meta["vocab_size"] != cfg.vocab_size:
            raise ValueError(f"{data_dir} has vocab_size={ds.meta['vocab_size']}, the model {cfg.vocab_size}: "
                             f"use the data the model was trained on")
        windows[D] = ds.get_batch(n_windows, T, torch.Generator().manual_seed(seed))[0]
    hidden_router_rows(model, windows, names)
    out = {"router_init": "hidden", "router_init_domains": names, "router_init_data": os.path.abspath(data_dir),
           "router_init_windows": n_windows}
    if cfg.router in ("softmax_topk", "expert_choice") and cfg.n_experts != routed_k(cfg):
        out.update(function_preserving="approximate",
                   preservation_note="softmax-then-topk gates sum to an input-dependent value with a non-zero "
                                     "(hidden-state) router")
    return out


def _with_hidden_router(state, cfg, info, hidden):
    """state with its routers from router_init_hidden(**hidden); records it in info."""
    model = GPT(cfg)
    model.load_state_dict(state)
    info["options"].update(router_init_hidden(model, **hidden))
    return {k: v.detach().to(state[k].dtype) for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- dense weights

def dense_ffn_weights(state, layer):
    """(W1, W3, W2) of a dense state dict's layer (gate_proj, up_proj, down_proj)."""
    p = f"blocks.{layer}.ffn."
    return tuple(state[p + m + ".weight"] for m in FFN_MATS)


# ----------------------------------------------------------------------------- CLI

def _bool(s):
    v = str(s).strip().lower()
    if v in ("1", "true", "yes", "y", "on"):
        return True
    if v in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {s!r}")


def _opt_float(s):
    return None if str(s).strip().lower() in ("none", "") else float(s)


def build_parser():
    p = ArgumentParser(prog="upcycle.py", description="Upcycle a dense checkpoint into an MoE checkpoint (docs/METHODS.md section 4).")
    a = p.add_argument
    a("--ckpt", required=True, help="dense out_dir or .pt file; with --method=btx a comma list A,B,C,D")
    a("--out_dir", required=True, help="where ckpt.pt is written")
    a("--method", default="copy", choices=METHODS,
      help="copy: sparse upcycling; drop: Drop-Upcycling; btx: Branch-Train-MiX of the --ckpt branches")
    a("--drop_ratio", type=float, default=None, help="--method=drop: share of each expert's channels "
      f"re-initialised (default {DEFAULT_DROP_RATIO})")
    a("--router_init", default="random", choices=ROUTER_INITS,
      help="random: normal(0, router_init_std) rows; hidden: rows from mean hidden states per domain")
    a("--domains", default="", help="--router_init=hidden: one domain per expert, or fewer dividing n_experts "
      "(btx default: each branch's config domains)")
    a("--data_dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "multidomain"),
      help="--router_init=hidden: the prepared dataset the domains come from")
    a("--router_init_windows", type=int, default=16, help="--router_init=hidden: windows per domain")
    a("--n_experts", type=int, default=8, help="E = expansion_rate * granularity")
    a("--top_k", type=int, default=2)
    a("--granularity", type=int, default=1, help="G: shards per dense FFN (fine-grained upcycling)")
    a("--expansion_rate", type=int, default=0, help="E' (0: n_experts / granularity)")
    a("--moe_layers", default="all", help="all | every_other | list like 1,3")
    a("--router", default="topk_softmax")
    a("--router_init_std", type=float, default=0.02, help="0 = zeros")
    a("--router_noise", type=_bool, default=False)
    a("--gate_norm_lambda", type=_opt_float, default=None)
    a("--expert_noise", type=float, default=0.0, help="relative std of noise on the expert copies")
    a("--weight_scaling", default="auto", choices=WEIGHT_SCALINGS)
    a("--n_shared_experts", type=int, default=0)
    a("--shared_fraction", type=float, default=0.5, help="share of the dense FFN given to the shared expert")
    a("--capacity_factor", type=float, default=0.0)
    a("--eval_capacity_factor", type=float, default=0.0)
    a("--drop_policy", default="probs")
    a("--expert_impl", default="auto")
    a("--segment_len", type=int, default=32)
    a("--lory_first_segment", default="self")
    a("--seed", type=int, default=0)
    a("--force", type=_bool, nargs="?", const=True, default=False, help="overwrite out_dir/ckpt.pt")
    a("--verify", type=_bool, nargs="?", const=True, default=True,
      help="compare dense and upcycled logits on a random batch (default on)")
    return p


DEFAULT_DROP_RATIO = 0.5   # Drop-Upcycling's best ratio (arXiv 2502.19261)
MODEL_FLAGS = ("n_experts", "top_k", "moe_layers", "router", "router_init_std", "router_noise", "gate_norm_lambda",
               "n_shared_experts", "capacity_factor", "eval_capacity_factor", "drop_policy", "expert_impl",
               "segment_len", "lory_first_segment")


@torch.no_grad()
def logit_difference(dense_model, moe_model, n_tokens=64, seed=0):
    """Max |logits_moe - logits_dense| on a random batch (both in eval mode, fp32)."""
    cfg = dense_model.config
    T = min(n_tokens, moe_model.config.block_size, cfg.block_size)
    if moe_model.config.router == "lory":
        T = T // moe_model.config.segment_len * moe_model.config.segment_len or moe_model.config.segment_len
    idx = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(seed))
    was = dense_model.training, moe_model.training
    dense_model.eval(), moe_model.eval()
    a = dense_model(idx)[0].float()
    b = moe_model(idx)[0].float()
    dense_model.train(was[0]), moe_model.train(was[1])
    return float((a - b).abs().max())


def cli_plan(args):
    """(checkpoint paths, options, hidden) from the parsed flags; ValueError (one line) for
    flags that do not fit together."""
    paths = [p.strip() for p in args.ckpt.split(",") if p.strip()]
    if args.method == "btx" and len(paths) < 2:
        raise ValueError("--method=btx merges 2 or more dense branches: --ckpt=A,B[,C,...]")
    if args.method != "btx" and len(paths) != 1:
        raise ValueError(f"--ckpt names {len(paths)} checkpoints; only --method=btx takes a list")
    if args.drop_ratio is not None and args.method != "drop":
        raise ValueError("--drop_ratio applies to --method=drop only")
    if args.domains and args.router_init != "hidden":
        raise ValueError("--domains is used by --router_init=hidden only")
    if args.router_init == "hidden" and not args.domains and args.method != "btx":
        raise ValueError("--router_init=hidden needs --domains=D1,D2,... (one per expert, or fewer dividing n_experts)")
    if args.granularity < 1:   # 0 would be read as "unset" further down and upcycle with G=1
        raise ValueError(f"--granularity={args.granularity} must be >= 1 (shards per dense FFN)")
    if args.router_init_windows < 1:
        raise ValueError(f"--router_init_windows={args.router_init_windows} must be >= 1")
    if args.router_init == "hidden":
        n_domains = len({d.strip() for d in args.domains.split(",") if d.strip()}) or len(paths)
        check_hidden_router_domains(n_domains, args.n_experts, args.granularity, args.method,
                                    args.expert_noise, prefix="--")
    model_args = {k: getattr(args, k) for k in MODEL_FLAGS}
    options = {"model_args": model_args, "granularity": args.granularity, "expansion_rate": args.expansion_rate,
               "weight_scaling": args.weight_scaling, "expert_noise": args.expert_noise,
               "shared_fraction": args.shared_fraction, "seed": args.seed}
    if args.method == "drop":
        options["drop_ratio"] = DEFAULT_DROP_RATIO if args.drop_ratio is None else args.drop_ratio
    hidden = None
    if args.router_init == "hidden":
        hidden = {"data_dir": args.data_dir, "domains": args.domains, "n_windows": args.router_init_windows,
                  "seed": args.seed}
    return paths, options, hidden


CLI_FLOATS = {"expert_noise": "upcycle_expert_noise", "router_init_std": None, "capacity_factor": None,
              "eval_capacity_factor": None, "gate_norm_lambda": None}   # flag -> configurator.FLOAT_RANGES key


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    for flag, kind in CLI_FLOATS.items():
        problem = float_problem("--" + flag, getattr(args, flag), kind)
        if problem:
            p.error(problem)
    try:
        paths, options, hidden = cli_plan(args)
        if args.method == "btx":
            path, cfg, info = btx_checkpoint(paths, args.out_dir, options, force=args.force, hidden=hidden)
        else:
            path, cfg, info = upcycle_checkpoint(paths[0], args.out_dir, options, force=args.force, hidden=hidden)
    except (ValueError, CheckpointError, LockError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:   # e.g. --out_dir names an existing file
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    o = info["options"]
    print(f"upcycled {', '.join(os.path.abspath(ckpt_path(p)) for p in paths)} -> {path}")
    if args.method == "btx":
        print(f"  {info['method']}: layers {cfg.moe_layer_ids()}, {cfg.n_experts} experts top-{cfg.top_k}, "
              f"expert e from branch {o['expert_branch']}, non-expert weights averaged over {len(paths)} branches")
    else:
        print(f"  {info['method']}: layers {cfg.moe_layer_ids()}, {cfg.n_experts} experts "
              f"(E'={o['expansion_rate']} x G={o['granularity']}, width {cfg.expert_hidden}) top-{cfg.top_k}, "
              f"router {cfg.router} (init std {cfg.router_init_std}), shared {cfg.n_shared_experts}"
              + (f", drop_ratio {o['drop_ratio']:g}" if o["drop_ratio"] else ""))
    if o.get("router_init") == "hidden":
        print(f"  router init from hidden states: expert domains {o['router_init_domains']}")
    print(f"  weight scaling {o['weight_scaling']} (activation scale {o['activation_scale']:g}); "
          f"function preserving: {o['function_preserving']}"
          + (f" ({o['preservation_note']})" if o["preservation_note"] else ""))
    if args.verify:
        moe, _ = load_model(path)
        dense, _ = load_model(paths[0])
        vs = "the first branch" if args.method == "btx" else "dense"
        print(f"  {moe.num_params() / 1e6:.2f}M parameters ({moe.num_params(active=True) / 1e6:.2f}M active); "
              f"max |logit diff| vs {vs} on a random batch: {logit_difference(dense, moe):.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
