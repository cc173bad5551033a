"""
Upcycling: a dense Llama-style checkpoint becomes a Mixture-of-Experts one, offline
(this CLI) or online (train.py with init_from=<dense out_dir>). Both call
upcycle_state_dict, so the same seed gives bit-identical weights. docs/METHODS.md
section 4 has the formulas, the exactness table and the measured errors.

    python upcycle.py --ckpt=out/dense --out_dir=out/moe8x2 --n_experts=8 --top_k=2
    python upcycle.py --ckpt=out/dense --out_dir=out/moe_e4g2 --n_experts=8 --top_k=4 --granularity=2
    python upcycle.py --ckpt=out/dense --out_dir=out/drop --method=drop --drop_ratio=0.5
    python upcycle.py --ckpt=out/dense --out_dir=out/h --n_experts=4 --router_init=hidden --domains=a,b,c,d

What happens to the weights. Everything outside the MoE layers' FFNs is copied. In an
MoE layer (upcycle_ffn):
* the copy (Komatsuzaki et al., arXiv 2212.05055): every expert is the dense SwiGLU FFN
  (W1 = gate_proj, W3 = up_proj, W2 = down_proj);
* fine-grained (He et al., arXiv 2410.07524), granularity G > 1: d_ff is cut into G shards
  (rows of W1/W3, columns of W2), FFN(x) = sum_g FFN_g(x), and expert e = i*G + g holds
  shard g; each of the E' = E/G virtual groups holds one whole copy;
* the router is new: E' rows from N(0, router_init_std^2) or (router_init_dist=uniform) a
  centred uniform of that std, zero when the std is 0, each repeated G times, so a group's
  experts always tie;
* weight scaling: W2 times the activation scale s (E'G^2/k for softmax-then-topk gates,
  G for renormalised ones), so that the routed output equals the dense FFN;
* shared experts take a fraction shared_fraction of each dense unit's W2 column, the
  routed experts the rest; expert_noise adds seeded Gaussian noise to each copy;
* Drop-Upcycling (Nakamura et al., arXiv 2502.19261) then re-initialises a random share
  drop_ratio of every expert's channels (drop_upcycle);
* router_init=hidden / mergekit_hidden replace the router rows with directions read off
  hidden states of text per domain (hidden_router_rows, mergekit_router_rows).
upcycle_info records what was done and whether the MoE computes the dense function at
step 0 (preservation). Branch-Train-MiX, which merges several dense branches, is btx.py.
"""
import argparse
import json
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import asdict, fields

import torch
import torch.nn.functional as F

from checkpoint import (CheckpointError, ckpt_path, file_sha256, load_checkpoint, save_checkpoint,
                        shared_dtype)
from configurator import (METHODS, ROUTER_INITS, ArgumentParser, check_hidden_router_domains, float_problem,
                          ram_available)
from convert import (DTYPES, MAX_SHARD_SIZE, ConvertError, GPT_state_shapes, HFState, check_new_output, export_target,
                     hf_special_ids, open_hf, open_tensors, parse_size, safetensors_files, write_hf_dir)
from data.dataset import TokenDataset, load_meta
from data.tokenizer import HFTokenizer, find_tokenizer_dir, load_tokenizer
from model import GPT, Block, GPTConfig, RMSNorm, rope_tables
from router import expert_choice_k
from outdir import LockError, OutDirLock

FFN_MATS = ("gate_proj", "up_proj", "down_proj")
WEIGHT_SCALINGS = ("auto", "none", "exact", "megatron")
CLI_ROUTER_INITS = ROUTER_INITS + ("mergekit_hidden", "mergekit_hidden_avg")
HIDDEN_BLOCK_SIZE = 256   # hidden-state window length when no run block_size is known (train.py's default)
DEFAULT_DROP_RATIO = 0.5   # Drop-Upcycling's best ratio (arXiv 2502.19261)
# fields that fix the dense parameter shapes, and ones that change the dense function
SHAPE_KEYS = ("vocab_size", "n_layer", "n_embd", "n_head", "n_kv_head", "ffn_hidden", "tie_embeddings")
FUNCTION_KEYS = ("rope_theta", "norm_eps", "rope_scaling", "rope_factor", "rope_low_freq_factor",
                 "rope_high_freq_factor", "rope_original_max_pos")
OPTION_DEFAULTS = {"model_args": None, "granularity": None, "expansion_rate": None,
                   "weight_scaling": "auto", "expert_noise": 0.0, "shared_fraction": 0.5, "seed": 0,
                   "drop_ratio": 0.0, "router_init_dist": "normal"}
ROUTER_INIT_DISTS = ("normal", "uniform")


# ----------------------------------------------------------------------------- the copy

def new_router(cfg, n_rows, G, generator, dist="normal"):
    """The router tensors of a new MoE layer, named relative to blocks.{l}.ffn.: n_rows rows
    of std router_init_std (zeros when it is 0), each repeated G times (virtual groups);
    router noise weights and the sigmoid router's expert bias start at zero, as in
    router.Router. dist "normal": N(0, std^2). "uniform": the Drop-Upcycling/BTX authors'
    torch_rand_002, u ~ U[0, 1) centred on its sample mean and scaled by std * sqrt(12)."""
    E, d = n_rows * G, cfg.n_embd
    if cfg.router_init_std > 0 and dist == "uniform":
        u = torch.rand(n_rows, d, generator=generator)
        rows = (u - u.mean()) * cfg.router_init_std * math.sqrt(12)               # std(U[0, 1)) = 1/sqrt(12)
    elif cfg.router_init_std > 0:
        rows = torch.randn(n_rows, d, generator=generator) * cfg.router_init_std
    else:
        rows = torch.zeros(n_rows, d)
    out = {"router.weight": rows.repeat_interleave(G, dim=0)}                # (E, d) fp32
    if cfg.router_noise and cfg.router != "lory":
        out["router.noise_weight"] = torch.zeros(E, d)
    if cfg.router == "sigmoid":
        out["router.expert_bias"] = torch.zeros(E)
    return out


def shared_experts(w1, w3, w2, cfg, G, shared_fraction):
    """The shared expert(s) of a layer from its dense FFN, and the share of each dense unit's
    W2 column left to the routed experts. Shared unit j copies dense unit j mod d_ff; a
    covered unit gives shared_fraction of its output to the shared path, the rest stays
    routed, so shared + routed = dense. Returns ({shared.*.weight: fp32}, routed (d_ff,))."""
    d_ff = w1.shape[0]
    if not cfg.n_shared_experts:
        return {}, torch.ones(d_ff)
    src = torch.arange(cfg.n_shared_experts * (d_ff // G)) % d_ff                 # (S,) dense unit per shared unit
    count = torch.bincount(src, minlength=d_ff).float()                        # (d_ff,) copies of each unit
    alpha = shared_fraction * (count > 0).float()                              # (d_ff,) shared share
    shared = {"shared.gate_proj.weight": w1[src], "shared.up_proj.weight": w3[src],
              "shared.down_proj.weight": w2[:, src] * (alpha[src] / count[src])}
    return shared, 1.0 - alpha


def upcycle_ffn(w1, w3, w2, cfg, G, weight_scaling="exact", expert_noise=0.0, shared_fraction=0.5,
                generator=None, router_init_dist="normal"):
    """One dense SwiGLU (w1, w3: (d_ff, d); w2: (d, d_ff)) -> the tensors of one MoE layer,
    named relative to blocks.{l}.ffn. (router.*, gate_proj, up_proj, down_proj, [shared.*]).
    Random draws, in this order: router rows (E', d), then noise on the gate, up and down
    stacks. Computed in fp32 on the CPU; returned in w1's dtype (the router in fp32)."""
    dtype = w1.dtype
    w1, w3, w2 = (t.detach().to("cpu", torch.float32) for t in (w1, w3, w2))
    d_ff, d = w1.shape
    expansion, h = cfg.n_experts // G, d_ff // G
    out = new_router(cfg, expansion, G, generator, router_init_dist)
    shared, routed_share = shared_experts(w1, w3, w2, cfg, G, shared_fraction)
    out.update({name: t.to(dtype) for name, t in shared.items()})
    # the copy: expert i*G + g holds shard g of the dense FFN
    gate, up = w1.view(G, h, d), w3.view(G, h, d)                               # (G, h, d) shards
    down = w2.view(d, G, h).permute(1, 0, 2)                                    # (G, d, h)
    if expert_noise > 0:   # each copy draws its own noise: make the E copies first
        gate, up, down = (t.repeat(expansion, 1, 1) for t in (gate, up, down))    # (E, h, d), (E, d, h)
        gate = gate + expert_noise * w1.std() * torch.randn(gate.shape, generator=generator)
        up = up + expert_noise * w3.std() * torch.randn(up.shape, generator=generator)
        down = down + expert_noise * w2.std() * torch.randn(down.shape, generator=generator)
        expansion = 1
    down = down * routed_share.view(G, h).repeat(down.shape[0] // G, 1)[:, None, :]
    scaling = resolve_weight_scaling(weight_scaling, cfg.router, G)
    gate, up, down = scale_experts(gate, up, down, scaling, activation_scale(cfg.router, cfg.n_experts, G, routed_k(cfg)))
    # without noise the copies are equal: the G shards are scaled once, then copied in w1's dtype
    out["gate_proj"], out["up_proj"], out["down_proj"] = (t.to(dtype).repeat(expansion, 1, 1) for t in (gate, up, down))
    return out


def scale_experts(gate, up, down, weight_scaling, s):
    """The activation scale s applied to stacked expert weights: 'exact' multiplies W2 by s
    (the SwiGLU output is linear in W2), 'megatron' multiplies all three by s^(1/3) (exact
    only in silu's linear regime); anything else leaves them. Returns (gate, up, down)."""
    if weight_scaling == "exact":
        return gate, up, down * s
    if weight_scaling == "megatron":
        c = s ** (1.0 / 3.0)
        return gate * c, up * c, down * c
    return gate, up, down


def upcycle_state_dict(dense_state, dense_args, options=None, experts=None, **kw):
    """Dense state dict + target MoE options -> (MoE state dict, GPTConfig, info).

    dense_args: the dense GPTConfig (or dict). options / kw: OPTION_DEFAULTS' keys (model_args,
    granularity, expansion_rate, weight_scaling, expert_noise, shared_fraction, seed,
    drop_ratio, router_init_dist). experts=(lo, hi): keep only experts lo..hi-1 of every expert stack (one
    expert-parallel rank's share); one layer's full stacks exist at a time and the random
    stream does not depend on the range. info = upcycle_info(...). Deterministic: the same
    inputs and seed give identical tensors. Raises ValueError (one line)."""
    settings = resolve_options(options, kw)
    dense_cfg = GPTConfig.from_dict(config_dict(dense_args))
    cfg, G, scaling = upcycle_target(dense_cfg, settings)
    check_state_shapes(dense_state, dense_cfg, "the dense state dict")
    if experts is not None and settings["drop_ratio"] > 0:
        raise ValueError("drop_ratio > 0 is built for all experts at once: upcycle offline "
                         "(python upcycle.py --method=drop) and load the MoE checkpoint")
    moe_ids = cfg.moe_layer_ids()
    prefixes = tuple(f"blocks.{l}.ffn." for l in moe_ids)
    state = {k: v for k, v in dense_state.items() if not k.startswith(prefixes)}
    generator = torch.Generator().manual_seed(int(settings["seed"]))
    for l, layer in upcycled_layers(dense_state, cfg, G, settings, generator):
        for name, t in layer.items():
            state[f"blocks.{l}.ffn.{name}"] = t[experts[0]:experts[1]].clone() if experts and name in FFN_MATS else t
        del layer
    if settings["drop_ratio"] > 0:   # after every router/noise draw, so the routers equal copy-upcycling's
        drop_upcycle_layers(state, moe_ids, settings["drop_ratio"], generator)
    if experts is None:
        check_state_shapes(state, cfg, "the upcycled state dict")   # guards against model.py drifting
    return in_dtype_of(dense_state, state), cfg, upcycle_info(cfg, G, scaling, settings)


def upcycle_target(dense_cfg, settings):
    """(MoE GPTConfig, G, resolved weight scaling) that resolved options make of a dense
    config (a GPTConfig or dict); ValueError (one line) for options that do not fit it."""
    cfg, G = target_config(dense_cfg, settings["model_args"], settings["granularity"], settings["expansion_rate"])
    return cfg, G, resolve_weight_scaling(settings["weight_scaling"], cfg.router, G)


def upcycled_layers(dense_state, cfg, G, settings, generator):
    """(l, the tensors of MoE layer l) for every MoE layer in order, each built from the
    dense FFN of layer l when asked for (upcycle_ffn), so one layer's stacks exist at a
    time; the random stream is drawn in this order."""
    for l in cfg.moe_layer_ids():
        p = f"blocks.{l}.ffn."
        w1, w3, w2 = (dense_state[p + m + ".weight"] for m in FFN_MATS)
        yield l, upcycle_ffn(w1, w3, w2, cfg, G, settings["weight_scaling"], settings["expert_noise"],
                             settings["shared_fraction"], generator, settings["router_init_dist"])


class StreamedUpcycle(Mapping):
    """The state dict upcycle_state_dict returns, as a mapping built while it is read: a
    key of MoE layer l builds layer l (and drops the one before), every other key is the
    dense state's. Read in layer order (as convert.hf_tensors and blockwise_logits do) it
    holds one MoE layer at a time, and its tensors equal upcycle_state_dict's. dense_state
    may itself be lazy (convert.HFState). Copy upcycling and its variants only:
    Drop-Upcycling draws its re-initialisation after every layer's router, so it needs
    the whole model at once."""

    def __init__(self, dense_state, dense_cfg, dtype, options=None, **kw):
        settings = resolve_options(options, kw)
        if settings["drop_ratio"] > 0:
            raise ValueError("--method=drop re-initialises after every layer is built: upcycle a project "
                             "checkpoint (convert.py --from_hf, then upcycle.py --ckpt) instead")
        self.cfg, G, scaling = upcycle_target(dense_cfg, settings)
        self.dense, self.dtype = dense_state, dtype
        self.keys_ = list(GPT_state_shapes(self.cfg))
        generator = torch.Generator().manual_seed(int(settings["seed"]))
        self.layers = upcycled_layers(dense_state, self.cfg, G, settings, generator)
        self.moe_ids, self.layer, self.tensors = set(self.cfg.moe_layer_ids()), None, {}
        self.info = upcycle_info(self.cfg, G, scaling, settings)

    def __getitem__(self, key):
        parts = key.split(".", 3)   # blocks.{l}.ffn.{name}
        if parts[0] != "blocks" or parts[2] != "ffn" or int(parts[1]) not in self.moe_ids:
            return self.dense[key]
        l = int(parts[1])
        if self.layer is not None and l < self.layer:
            raise KeyError(f"{key}: layer {l} was already built and dropped (read the layers in order)")
        while self.layer != l:
            self.layer, self.tensors = next(self.layers)
        t = self.tensors[parts[3]]
        return t.to(self.dtype) if t.is_floating_point() else t

    def __iter__(self):
        return iter(self.keys_)

    def __len__(self):
        return len(self.keys_)


def in_dtype_of(dense_state, state):
    """state with every floating tensor in the dense source's dtype when the source has one
    (a bf16 checkpoint stays bf16: the new router rows are drawn in fp32, then cast)."""
    dtype = shared_dtype(dense_state)
    if dtype is None or dtype == torch.float32:
        return state
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def upcycle_model(dense, options=None, **kw):
    """Upcycle a dense GPT (or a loaded dense checkpoint dict) in memory. Returns (a new MoE
    GPT on the CPU, fp32 parameters, in train mode; info as upcycle_state_dict's)."""
    if isinstance(dense, GPT):
        state, args = {k: v.detach().cpu() for k, v in dense.state_dict().items()}, dense.config
    elif isinstance(dense, dict) and "model" in dense and "model_args" in dense:
        state, args = dense["model"], dense["model_args"]
    else:
        raise ValueError(f"upcycle_model needs a dense GPT or a checkpoint dict, got {type(dense).__name__}")
    moe_state, cfg, info = upcycle_state_dict(state, args, options, **kw)
    return model_from_state(cfg, moe_state), info


def model_from_state(cfg, state):
    """GPT(cfg) holding `state`."""
    model = GPT(cfg)
    model.load_state_dict(state)
    return model


def upcycle_from_checkpoint(path, options=None, device="cpu", **kw):
    """Online upcycling: dense checkpoint (out_dir or .pt) -> (MoE GPT on `device`,
    upcycled_from = {"path", "sha256", "method", "options"}, as the checkpoint stores it).
    Raises ValueError for a missing, corrupt or MoE checkpoint and for every bad option."""
    dense = load_dense(path)
    model, info = upcycle_model(dense, options, **kw)
    return model.to(device), {**source_record(path), **info}


def source_record(path):
    """Where an upcycle's weights came from: {"path", "sha256"} of the dense checkpoint file."""
    src = os.path.abspath(ckpt_path(path))
    return {"path": src, "sha256": file_sha256(src)}


def upcycle_checkpoint(path, out_dir, options=None, force=False, hidden=None, **kw):
    """Offline upcycling (the CLI): write out_dir/ckpt.pt, a step-0 MoE checkpoint that
    train.py resumes (--init_from=resume) and eval.py reads. hidden: None, or the keyword
    arguments of set_router_from_hidden (method, data_dir, domains, ...). Never overwrites the source,
    nor out_dir/ckpt.pt unless force. Returns (path written, cfg, info)."""
    def build():
        dense = load_dense(path)
        check_fits_in_memory(dense["model_args"], options)
        state, cfg, info = upcycle_state_dict(dense["model"], dense["model_args"], options, **kw)
        return state, cfg, info, dense.get("config"), source_record(path)
    return write_step0_moe(out_dir, [path], force, build, hidden)


def write_step0_moe(out_dir, sources, force, build, hidden=None):
    """Hold out_dir's lock, refuse to overwrite a source or (without force) out_dir/ckpt.pt,
    build() -> (state, cfg, info, config, source record), set the routers from hidden states
    when `hidden` is given (set_router_from_hidden's keyword arguments), and write a step-0
    MoE checkpoint (no optimizer, no RNG state) atomically. Returns (path written, cfg, info)."""
    with OutDirLock(out_dir):   # LockError while another process writes there
        check_out_dir(sources, out_dir, force)
        state, cfg, info, config, record = build()
        if hidden is not None:
            model = model_from_state(cfg, state)
            info["options"].update(set_router_from_hidden(model, (config or {}).get("block_size"), **hidden))
            state = {k: v.detach().to(state[k].dtype) for k, v in model.state_dict().items()}
        dtype = shared_dtype(state)
        ckpt = {"model_args": asdict(cfg), "model": state, "optimizer": None, "iter_num": 0, "best_val_loss": 1e9,
                "config": config, "rng": None, "aux_coef": None, "upcycled_from": {**record, **info},
                "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None}
        return save_checkpoint(ckpt, out_dir), cfg, info

def upcycle_hf(hf_dir, out_dir, options=None, dtype="auto", max_shard_size=MAX_SHARD_SIZE, **kw):
    """Dense HF directory (Llama, Mistral) -> new HF directory of the upcycled MoE
    (Mixtral, or the class convert.export_target picks) in one streamed pass: the tensors
    convert.py --from_hf, upcycle.py --ckpt and convert.py --to_hf write in turn, built
    one MoE layer at a time (HFState -> StreamedUpcycle -> convert.write_hf_dir), so the
    model is never whole in memory. Returns (MoE GPTConfig, target, info)."""
    max_bytes = parse_size(max_shard_size)
    check_new_output(out_dir, "--to_hf")
    hf_cfg, args, refs, torch_dtype = open_hf(hf_dir, dtype)
    if args.get("moe_layers", "none") != "none":
        raise ValueError(f"--from_hf={hf_dir} holds {hf_cfg['architectures'][0]}, already an MoE: upcycle a "
                         f"dense model (Llama, Mistral)")
    dense_cfg = GPTConfig(**args)
    moe = StreamedUpcycle(HFState(refs, dense_cfg, torch_dtype), dense_cfg, torch_dtype, options, **kw)
    target = export_target(moe.cfg, None)
    write_hf_dir(out_dir, moe, moe.cfg, target, torch_dtype, max_bytes, hf_dir, hf_special_ids(hf_dir, hf_cfg))
    return moe.cfg, target, moe.info


def hf_logit_difference(dense_dir, moe_dir, moe_cfg, target, options):
    """(state_logit_difference of a dense HF directory and the MoE upcycle_hf made from it,
    where the MoE came from). Both are read one block at a time in fp32: a Mixtral back
    from its files; another class, whose names convert.py does not read, rebuilt by
    StreamedUpcycle with the same options."""
    _, args, dense_refs, dtype = open_hf(dense_dir)
    dense_cfg = GPTConfig(**args)
    dense = HFState(dense_refs, dense_cfg, torch.float32)
    if target == "mixtral":
        moe, source = HFState(open_tensors(safetensors_files(moe_dir)), moe_cfg, torch.float32), "read back from the files"
    else:
        moe, source = StreamedUpcycle(HFState(dense_refs, dense_cfg, dtype), dense_cfg, dtype, options), "rebuilt"
    return state_logit_difference(dense_cfg, dense, moe_cfg, moe), source


# ----------------------------------------------------------------------------- Drop-Upcycling

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



# ----------------------------------------------------------------------------- router from hidden states

def expert_domains(domains, n_experts):
    """One domain name per expert. `domains` (comma string or list) has n names, n dividing
    n_experts; expert e takes domains[e // (n_experts / n)], i.e. with BTX the domain of
    its branch, and with n = n_experts its own."""
    names = [d.strip() for d in domains.split(",")] if isinstance(domains, str) else [str(d) for d in domains]
    names = [d for d in names if d]
    if not names or n_experts % len(names):
        raise ValueError(f"{','.join(names)!r} has {len(names)} entries; a hidden-state router init needs a number "
                         f"that divides n_experts={n_experts} (expert e takes entry e // (n_experts / n))")
    m = n_experts // len(names)
    return [names[e // m] for e in range(n_experts)]


def check_expert_groups(names, cfg, what):
    """ValueError (one line) unless the G experts of every virtual group take the same name."""
    G = cfg.ffn_hidden // cfg.expert_hidden
    if any(len(set(names[i:i + G])) > 1 for i in range(0, cfg.n_experts, G)):
        raise ValueError(f"granularity {G}: the {G} experts of a virtual group must take the same {what} "
                         f"(give n_experts / {G} or fewer)")


@torch.no_grad()
def hidden_router_rows(model, windows, expert_domain):
    """router_init="hidden", this repo's domain-contrast rows: router row e points along the
    mean FFN input of the text expert e should take, relative to the other domains. Sets
    every MoE layer's router.weight in place and returns {layer: (E, d) rows}.

    windows: {domain: (B, T) token windows of that domain}; expert_domain: a domain per expert.
    Each domain's windows run through the blocks once, as Block.forward runs them; at each
    MoE layer l, before its FFN runs (so the rows already set shape the later layers' inputs):
        m_D   = mean over the tokens of domain D of the FFN input ffn_norm(x + attn(attn_norm(x)))
        m     = mean over domains of m_D
        c_D   = (m_D - m) minus its component along m   (row . m = 0: what every token
                carries favours no expert)
        row_e = c_{D(e)} / ||c_{D(e)}||
    A token at its domain's mean then scores highest on its own domain's row (Cauchy-Schwarz).
    Experts that share a domain share a row (a virtual group, like fine-grained upcycling's).
    It is not mergekit-moe's `hidden` gate mode (mergekit_router_rows), in four ways: it
    reads (1) the normalised post-attention FFN input, not the residual stream entering
    the layer, (2) of the MoE being built, not the dense base model, (3) averaged over every
    token of data windows, not a prompt's last token, and (4) centres over domains and
    removes the overall mean instead of subtracting negative prompts; the centred rows sum
    to zero, so they have rank E-1 at most (mergekit's warn_degenerate_gates flags that)."""
    was = model.training
    model.eval()
    doms = list(dict.fromkeys(expert_domain))
    pick = torch.tensor([doms.index(D) for D in expert_domain])
    rows, dev = {}, model.tok_emb.weight.device
    moe = dict(model.moe_layers())
    x = {D: model.tok_emb(windows[D].to(dev)) for D in doms}                   # (B, T, d) per domain
    for l, block in enumerate(model.blocks[:max(moe) + 1]):
        x = {D: x[D] + block.attn(block.attn_norm(x[D]), model.rope_cos, model.rope_sin) for D in doms}
        h = {D: block.ffn_norm(x[D]) for D in doms}                             # (B, T, d) FFN inputs
        if l in moe:
            m = torch.stack([h[D].float().mean((0, 1)).cpu() for D in doms])   # (n_domains, d)
            rows[l] = domain_contrast(m)[pick]                                  # (E, d)
            moe[l].router.weight.copy_(rows[l].to(dev))
        if l < max(moe):
            x = {D: x[D] + block.ffn(h[D])[0] for D in doms}
    model.train(was)
    return rows


def domain_contrast(m):
    """(n_domains, d) mean hidden states -> unit rows: centred over the domains and made
    orthogonal to their overall mean (hidden_router_rows)."""
    mean = m.mean(0)                                                            # (d,)
    u = mean / mean.norm().clamp_min(1e-12)
    c = m - mean
    c = c - (c @ u)[:, None] * u                                                # row . mean = 0
    return c / c.norm(dim=1, keepdim=True).clamp_min(1e-12)


def domain_windows(data_dir, names, n_windows, T, split, seed, vocab_size):
    """{domain: (n_windows, T) token windows} of each name, drawn from data_dir's split with
    TokenDataset(domains=D) and a Generator seeded with `seed`."""
    windows = {}
    for D in dict.fromkeys(names):
        ds = TokenDataset(data_dir, split, domains=D)
        if ds.meta["vocab_size"] != vocab_size:
            raise ValueError(f"{data_dir} has vocab_size={ds.meta['vocab_size']}, the model {vocab_size}: "
                             f"use the data the model was trained on")
        windows[D] = ds.get_batch(n_windows, T, torch.Generator().manual_seed(seed))[0]
    return windows


def router_init_hidden(model, data_dir, domains, n_windows=16, block_size=None, split="train", seed=0):
    """Set every MoE router of `model` from hidden states (hidden_router_rows): n_windows
    windows of T = min(block_size, the model's block_size) tokens of each domain (block_size:
    the run's; None: HIDDEN_BLOCK_SIZE), so n_windows * T tokens per domain, printed.
    domains: see expert_domains (at least 2 different names). Returns what to record in
    info["options"] (router_init, its domains, data and tokens, and the preservation verdict
    when a non-zero router breaks it)."""
    cfg = model.config
    names = expert_domains(domains, cfg.n_experts)
    if len(set(names)) < 2:
        raise ValueError(f"router_init=hidden needs at least 2 different domains (got {names[0]!r} for every "
                         f"expert): rows are the domains' mean hidden states minus their average")
    check_expert_groups(names, cfg, "domain")
    T = min(block_size or HIDDEN_BLOCK_SIZE, cfg.block_size)
    hidden_router_rows(model, domain_windows(data_dir, names, n_windows, T, split, seed, cfg.vocab_size), names)
    print(f"router init from hidden states: {n_windows} windows x {T} tokens = {n_windows * T} tokens of each of "
          f"{len(set(names))} domains")
    out = {"router_init": "hidden", "router_init_domains": names, "router_init_data": os.path.abspath(data_dir),
           "router_init_windows": n_windows, "router_init_tokens_per_domain": n_windows * T}
    return {**out, **nonzero_router_verdict(cfg)}


def nonzero_router_verdict(cfg):
    """The preservation verdict to record when a non-zero router replaces the drawn one:
    softmax-then-topk gates then sum to an input-dependent value ({} otherwise)."""
    if cfg.router in ("softmax_topk", "expert_choice") and cfg.n_experts != routed_k(cfg):
        return {"function_preserving": "approximate",
                "preservation_note": "softmax-then-topk gates sum to an input-dependent value with a non-zero "
                                     "(hidden-state) router"}
    return {}


@torch.no_grad()
def layer_inputs(model, idx):
    """(n_layer, B, T, d): the residual stream entering each block, before attention and any
    norm (transformers' hidden_states[:-1], what mergekit-moe reads)."""
    T = idx.shape[1]
    x = model.tok_emb(idx)                                              # (B, T, d)
    out = []
    for block in model.blocks:
        out.append(x)
        x, _ = block(x, model.rope_cos[:T], model.rope_sin[:T])
    return torch.stack(out)


def prompt_states(dense, prompts, last_token):
    """(n_layer, d): layer_inputs of each prompt (a list of token ids, run alone) at its last
    token (mergekit `hidden`) or averaged over its tokens (`hidden_avg`), then averaged over
    the prompts."""
    dev = dense.tok_emb.weight.device
    states = [layer_inputs(dense, torch.tensor([ids], device=dev))[:, 0].float() for ids in prompts]  # (L, T, d)
    return torch.stack([h[:, -1] if last_token else h.mean(1) for h in states]).mean(0).cpu()


def mergekit_router_rows(dense, expert_prompts, last_token=True):
    """mergekit-moe's `hidden` / `hidden_avg` gate vectors (mergekit/moe/router.py
    get_gate_params) from the dense base model `dense`: for each expert's (positive,
    negative) prompt lists, v = prompt_states(positive) - prompt_states(negative) (no
    negatives: nothing subtracted), L2-normalised per layer; no centring. Returns
    (n_layer, n_experts, d); MoE layer l takes [l]. mergekit batches the prompts with padding
    and reads position -1 (or averages over the padded length); each prompt runs alone
    here, which equals it whenever the prompts of a batch have the same token length."""
    dense.eval()
    rows = []
    for positive, negative in expert_prompts:
        v = prompt_states(dense, positive, last_token)                       # (L, d)
        if negative:
            v = v - prompt_states(dense, negative, last_token)
        rows.append(v / v.norm(dim=-1, keepdim=True).clamp_min(1e-8))
    return torch.stack(rows, 1)                                             # (L, n_experts, d)


def read_expert_prompts(path, tokenizer):
    """[(positive ids lists, negative ids lists)] of a JSON file holding a list with one
    {"positive_prompts": [text, ...], "negative_prompts": [text, ...]} per expert (mergekit's
    names). Each prompt starts with the tokenizer's begin-of-text id (its end-of-text id
    when it has none), as mergekit prepends bos_token."""
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
        if not isinstance(entries, list) or not entries or not all(
                isinstance(e, dict) and e.get("positive_prompts") for e in entries):
            raise ValueError("not a list of {positive_prompts, negative_prompts}")
    except (OSError, ValueError) as e:
        raise ValueError(f"--prompts={path} cannot be used ({getattr(e, 'strerror', None) or e}): give a JSON list "
                         f"with one {{\"positive_prompts\": [...], \"negative_prompts\": [...]}} per expert") from None
    start = getattr(tokenizer, "bos_token", None)
    start = tokenizer.eot_token if start is None else start
    encode = lambda text: ([] if start is None else [start]) + tokenizer.encode(str(text))   # noqa: E731
    return [([encode(p) for p in e["positive_prompts"]], [encode(p) for p in e.get("negative_prompts") or []])
            for e in entries]


def router_init_mergekit(model, dense_path, prompts, data_dir=None, last_token=True):
    """Set every MoE router of `model` to mergekit-moe's gates (mergekit_router_rows) from the
    dense checkpoint dense_path and the prompt file `prompts` (read_expert_prompts; n entries,
    n dividing n_experts: expert e takes entry e // (n_experts / n)). The tokenizer is the
    dense checkpoint's own (tokenizer.json) or data_dir's. Returns what to record in
    info["options"]."""
    if dense_path is None:
        raise ValueError("router_init=mergekit_hidden reads a dense base model's hidden states; a BTX merge has "
                         "several: use --router_init=hidden")
    ckpt = load_dense(dense_path)
    dense = model_from_state(GPTConfig.from_dict(ckpt["model_args"]), ckpt["model"])
    tok_dir = find_tokenizer_dir(ckpt, dense_path)
    tokenizer = HFTokenizer(tok_dir) if tok_dir else load_tokenizer(load_meta(data_dir), data_dir)
    expert_prompts = read_expert_prompts(prompts, tokenizer)
    entry = expert_domains([str(i) for i in range(len(expert_prompts))], model.config.n_experts)
    check_expert_groups(entry, model.config, "prompt entry")
    rows = mergekit_router_rows(dense, expert_prompts, last_token)           # (L, n, d)
    pick = torch.tensor([int(i) for i in entry])
    with torch.no_grad():
        for l, ffn in model.moe_layers():
            ffn.router.weight.copy_(rows[l][pick].to(ffn.router.weight))
    out = {"router_init": "mergekit_hidden" if last_token else "mergekit_hidden_avg",
           "router_init_prompts": os.path.abspath(prompts), "router_init_prompt_entries": [int(i) for i in entry]}
    return {**out, **nonzero_router_verdict(model.config)}


def set_router_from_hidden(model, trained_block_size, method, **kw):
    """router_init_hidden (method 'hidden'; block_size defaults to trained_block_size, the one
    the source was trained at) or router_init_mergekit ('mergekit_hidden', last token;
    'mergekit_hidden_avg', token average). Returns what to record in info["options"]."""
    if method == "hidden":
        return router_init_hidden(model, **{**kw, "block_size": kw.get("block_size") or trained_block_size})
    return router_init_mergekit(model, last_token=method == "mergekit_hidden", **kw)


# ----------------------------------------------------------------------------- verdict: what an upcycle preserved

def resolve_weight_scaling(weight_scaling, router, G):
    """The weight scaling `auto` stands for: 'exact' when G > 1 or the gates are
    softmax-then-topk, else 'none'. ValueError (one line) for an unknown name."""
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
    than the dense FFN at upcycling time (docs/METHODS.md section 4). top_k: the
    experts per token, routed_k(cfg)."""
    if router == "lory":
        return 1.0
    if router in ("softmax_topk", "expert_choice"):
        return (n_experts // G) * G * G / top_k
    return float(G)


def routed_experts_silent(cfg, G, shared_fraction):
    """True when the shared expert(s) carry the whole dense FFN and the routed W2 start at 0."""
    return cfg.n_shared_experts > 0 and shared_fraction == 1 and cfg.n_shared_experts * cfg.expert_hidden >= cfg.ffn_hidden


def preservation(cfg, G, weight_scaling, expert_noise=0.0, shared_fraction=0.5):
    """('exact' | 'approximate', note): does the upcycled model compute the dense
    function at step 0, and under which caveats (docs/METHODS.md section 4)."""
    scaling = resolve_weight_scaling(weight_scaling, cfg.router, G)
    s = activation_scale(cfg.router, cfg.n_experts, G, routed_k(cfg))
    caveats = []
    if cfg.capacity_factor > 0 or cfg.eval_capacity_factor > 0:
        caveats.append("only while no assignment is dropped (capacity_factor > 0)")
    if expert_noise > 0:
        return "approximate", f"expert_noise={expert_noise} perturbs the expert copies"
    if routed_experts_silent(cfg, G, shared_fraction):
        return "exact", "the shared expert carries the whole dense FFN; routed experts start with down_proj = 0"
    if scaling != "exact" and s != 1:
        why = "silu is not homogeneous: silu(c z) != c silu(z)" if scaling == "megatron" else \
            f"unscaled routed output is 1/{s:g} of the dense FFN"
        return "approximate", f"weight_scaling={scaling} with activation scale {s:g}: {why}"
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


def upcycle_info(cfg, G, scaling, settings):
    """What an upcycle records of itself (upcycled_from["method"], ["options"]): the
    resolved options, activation scale and function-preservation verdict. Depends
    on the shapes and options only, not on the weights (parallel.upcycle_owned
    reports the same record without building every expert)."""
    verdict, note = preservation(cfg, G, scaling, settings["expert_noise"], settings["shared_fraction"])
    if settings["drop_ratio"] > 0:
        verdict, note = "approximate", (f"drop_ratio={settings['drop_ratio']:g} re-initialises that share of "
                                        f"every expert's channels")
    return {
        "method": ("drop_upcycling" if settings["drop_ratio"] > 0 else
                   "sparse_upcycling" if G == 1 else "fine_grained_virtual_groups"),
        "options": {
            "n_experts": cfg.n_experts, "top_k": cfg.top_k, "granularity": G, "expansion_rate": cfg.n_experts // G,
            "expert_hidden": cfg.expert_hidden, "moe_layers": cfg.moe_layers, "router": cfg.router,
            "router_init_std": cfg.router_init_std, "router_init_dist": settings["router_init_dist"],
            "n_shared_experts": cfg.n_shared_experts,
            "shared_fraction": float(settings["shared_fraction"]) if cfg.n_shared_experts else None,
            "weight_scaling": scaling, "activation_scale": activation_scale(cfg.router, cfg.n_experts, G, routed_k(cfg)),
            "expert_noise": float(settings["expert_noise"]), "seed": int(settings["seed"]),
            "drop_ratio": float(settings["drop_ratio"]),
            "function_preserving": verdict, "preservation_note": note,
        },
    }



# ----------------------------------------------------------------------------- validation

def config_dict(args):
    """A GPTConfig, a dict or None as a plain dict."""
    if args is None:
        return {}
    if isinstance(args, GPTConfig):
        return asdict(args)
    return dict(args)


def describe_shape(cfg, keys=SHAPE_KEYS + FUNCTION_KEYS):
    """'vocab_size=..., n_layer=..., ...' of a GPTConfig, for error messages."""
    return ", ".join(f"{k}={getattr(cfg, k)}" for k in keys)


def target_config(dense_args, model_args=None, granularity=None, expansion_rate=None):
    """The MoE GPTConfig an upcycle of a dense model with `dense_args` produces.

    model_args: target fields (dict or GPTConfig); keys it lacks come from the
    dense config (its MoE fields reset to the GPTConfig defaults). Returns
    (cfg, G) with cfg.expert_hidden = d_ff / G. Raises ValueError (one line) for
    an MoE source, a target whose dense shape differs from the source, or an
    impossible fine-grained layout (check_target, check_granularity)."""
    dense = GPTConfig.from_dict(config_dict(dense_args))
    moe_names = {f.name for f in fields(GPTConfig)} - set(SHAPE_KEYS + FUNCTION_KEYS) - {"block_size", "dropout"}
    args = {k: v for k, v in asdict(dense).items() if k not in moe_names}
    args.update(check_target(dense, config_dict(model_args), args))
    G = check_granularity(args, dense.ffn_hidden, granularity, expansion_rate)
    args["expert_hidden"] = dense.ffn_hidden // G
    return GPTConfig(**args), G


def check_target(dense, user, args):
    """user (the target fields), after refusing in one line (ValueError) an MoE source,
    unknown keys, a target with no MoE layer, or one whose dense part (args updated by
    user) differs from the source's shape."""
    if dense.is_moe:
        raise ValueError(f"the source is already an MoE model (moe_layers={dense.moe_layers!r}); "
                         f"upcycle a dense checkpoint")
    unknown = sorted(set(user) - {f.name for f in fields(GPTConfig)})
    if unknown:
        raise ValueError(f"unknown model config key(s) {unknown}")
    target = {**args, **user}
    if str(target.get("moe_layers", "none")).strip() in ("none", ""):
        raise ValueError("the target config has moe_layers='none': nothing to upcycle "
                         "(use --moe_layers=all, every_other or a list like 1,3)")
    # the target's dense part, resolved (ffn_hidden=0 -> Llama rule, n_kv_head=0 -> n_head)
    tgt_dense = GPTConfig(**{**target, "moe_layers": "none", "expert_hidden": 0})
    if any(getattr(tgt_dense, k) != getattr(dense, k) for k in SHAPE_KEYS + FUNCTION_KEYS):
        raise ValueError(f"target config ({describe_shape(tgt_dense)}) differs from the dense checkpoint's "
                         f"({describe_shape(dense)}); upcycling keeps the dense shape")
    return user


def check_granularity(args, d_ff, granularity, expansion_rate):
    """G for the target fields `args` (granularity, else d_ff / expert_hidden, else 1);
    ValueError (one line) for a layout fine-grained upcycling cannot build."""
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
    return G


def resolve_options(options, kw):
    """OPTION_DEFAULTS updated by `options` then `kw` (None values skipped); ValueError (one
    line) for an unknown key or a value out of range."""
    settings = dict(OPTION_DEFAULTS)
    for src in (options or {}), kw:
        unknown = sorted(set(src) - set(OPTION_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown upcycling option(s) {unknown}; valid: {sorted(OPTION_DEFAULTS)}")
        settings.update({k: v for k, v in src.items() if v is not None})
    if settings["expert_noise"] < 0:
        raise ValueError(f"expert_noise={settings['expert_noise']} must be >= 0")
    if not 0 <= settings["shared_fraction"] <= 1:
        raise ValueError(f"shared_fraction={settings['shared_fraction']} must be in [0, 1]")
    if settings["router_init_dist"] not in ROUTER_INIT_DISTS:
        raise ValueError(f"router_init_dist={settings['router_init_dist']!r} must be one of "
                         f"{', '.join(ROUTER_INIT_DISTS)}")
    if not 0 <= settings["drop_ratio"] <= 1:
        raise ValueError(f"drop_ratio={settings['drop_ratio']} must be in [0, 1] (the share of each expert's "
                         f"channels Drop-Upcycling re-initialises; 0.5 is the paper's best)")
    return settings


def check_upcycle_options(options, dense_args=None):
    """Check upcycling options before any weights exist (train.py calls it before a
    Lory dense warm-up starts). dense_args defaults to the target's own dense part.
    Raises ValueError (one line)."""
    settings = resolve_options(options, {})
    dense = dense_args or {**config_dict(settings["model_args"]), "moe_layers": "none", "expert_hidden": 0}
    upcycle_target(dense, settings)


def check_state_shapes(state, cfg, what):
    """ValueError (one line) when `state` lacks, adds or reshapes a tensor of GPT(cfg)."""
    ref = GPT_state_shapes(cfg)
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing, extra = sorted(set(ref) - set(got)), sorted(set(got) - set(ref))
    bad = [f"{k} {got[k]} vs {ref[k]}" for k in sorted(set(ref) & set(got)) if got[k] != ref[k]]
    if missing or extra or bad:
        parts = [f"missing {missing[:4]}" if missing else "", f"unexpected {extra[:4]}" if extra else "",
                 f"shape {bad[:4]}" if bad else ""]
        raise ValueError(f"{what} does not match its model_args: " + "; ".join(p for p in parts if p))


def load_dense(path):
    """A checkpoint dict with model_args, memory-mapped (a training checkpoint's optimizer
    moments are never read); ValueError (one line) for a missing, corrupt or foreign file."""
    try:
        ckpt = load_checkpoint(path, map_location="cpu", mmap=True)
    except CheckpointError as e:
        raise ValueError(str(e)) from None
    if not isinstance(ckpt.get("model_args"), dict):
        raise ValueError(f"{ckpt_path(path)} has no model_args: not a model checkpoint of this project")
    return ckpt


def check_fits_in_memory(dense_args, options):
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


def check_out_dir(paths, out_dir, force):
    """Refuse to overwrite a source checkpoint, or out_dir/ckpt.pt without force."""
    dst = os.path.abspath(os.path.join(out_dir, "ckpt.pt"))
    for path in paths:
        src = os.path.abspath(ckpt_path(path))
        if os.path.exists(dst) and os.path.exists(src) and os.path.samefile(src, dst):
            raise ValueError(f"--out_dir={out_dir} holds the source checkpoint {src}; choose another out_dir")
    if os.path.exists(dst) and not force:
        raise ValueError(f"{dst} already exists; pass --force to overwrite it")


# ----------------------------------------------------------------------------- dense weights

def dense_ffn_weights(state, layer):
    """(W1, W3, W2) of a dense state dict's layer (gate_proj, up_proj, down_proj)."""
    p = f"blocks.{layer}.ffn."
    return tuple(state[p + m + ".weight"] for m in FFN_MATS)


# ----------------------------------------------------------------------------- CLI

MODEL_FLAGS = ("n_experts", "top_k", "moe_layers", "router", "router_init_std", "router_noise", "gate_norm_lambda",
               "n_shared_experts", "capacity_factor", "eval_capacity_factor", "drop_policy", "expert_impl",
               "segment_len", "lory_first_segment")
MODEL_FLAG_HELP = {"n_experts": "E = expansion_rate * granularity", "moe_layers": "all | every_other | list like 1,3",
                   "router_init_std": "0 = zeros"}
CLI_FLOATS = {"expert_noise": "upcycle_expert_noise", "router_init_std": None, "capacity_factor": None,
              "eval_capacity_factor": None, "gate_norm_lambda": None}   # flag -> cli.FLOAT_RANGES key


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
    p = ArgumentParser(prog="upcycle.py", description="Upcycle a dense checkpoint into an MoE checkpoint "
                                                      "(docs/METHODS.md section 4).")
    a = p.add_argument
    a("--ckpt", help="dense out_dir or .pt file")
    a("--out_dir", help="where ckpt.pt is written")
    a("--from_hf", help="instead of --ckpt: a dense HF directory (Llama, Mistral), upcycled in one streamed pass")
    a("--to_hf", help="with --from_hf: new directory for the MoE in HF format (Mixtral for top-k softmax "
                      "routers on every layer)")
    a("--dtype", default="auto", choices=("auto", *DTYPES),
      help="with --from_hf: dtype read and written (default auto: the files')")
    a("--max_shard_size", default=MAX_SHARD_SIZE, help="with --to_hf: largest safetensors file, as convert.py")
    a("--method", default="copy", choices=("copy", "drop"),
      help="copy: sparse upcycling; drop: Drop-Upcycling (Branch-Train-MiX is btx.py)")
    a("--drop_ratio", type=float, default=None, help="--method=drop: share of each expert's channels "
      f"re-initialised (default {DEFAULT_DROP_RATIO})")
    a("--granularity", type=int, default=1, help="G: shards per dense FFN (fine-grained upcycling)")
    a("--expansion_rate", type=int, default=0, help="E' (0: n_experts / granularity)")
    a("--expert_noise", type=float, default=0.0, help="relative std of noise on the expert copies")
    a("--shared_fraction", type=float, default=0.5, help="share of the dense FFN given to the shared expert")
    add_moe_flags(p)
    return p


def add_moe_flags(p):
    """The flags of the target MoE shape, its router and the output, shared with btx.py."""
    a = p.add_argument
    for name in MODEL_FLAGS:   # GPTConfig's defaults, but every layer upcycled
        default = "all" if name == "moe_layers" else getattr(GPTConfig, name)
        kind = {bool: _bool, int: int, float: float, str: str}.get(type(default), _opt_float)
        a("--" + name, type=kind, default=default, help=MODEL_FLAG_HELP.get(name))
    a("--weight_scaling", default="auto", choices=WEIGHT_SCALINGS)
    a("--seed", type=int, default=0)
    a("--force", type=_bool, nargs="?", const=True, default=False, help="overwrite out_dir/ckpt.pt")
    a("--verify", type=_bool, nargs="?", const=True, default=True,
      help="compare dense and upcycled logits on a random batch (default on)")
    add_router_init_flags(p)


def add_router_init_flags(p):
    """The flags that choose how the new router rows are drawn or computed."""
    a = p.add_argument
    a("--router_init", default="random", choices=CLI_ROUTER_INITS,
      help="random: rows of std router_init_std; hidden: domain-contrast rows from hidden states per domain; "
           "mergekit_hidden(_avg): mergekit-moe's gates from --prompts")
    a("--router_init_dist", default="normal", choices=ROUTER_INIT_DISTS,
      help="--router_init=random: normal, or uniform (the Drop-Upcycling/BTX authors' torch_rand_002)")
    a("--domains", default="", help="--router_init=hidden: one domain per expert, or fewer dividing n_experts")
    a("--data_dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "multidomain"),
      help="--router_init=hidden: the prepared dataset the domains come from")
    a("--router_init_windows", type=int, default=16, help="--router_init=hidden: windows per domain")
    a("--hidden_block_size", type=int, default=0, help="--router_init=hidden: tokens per window (0: the "
      f"block_size the source was trained at, else {HIDDEN_BLOCK_SIZE}; never above the model's)")
    a("--prompts", default="", help="--router_init=mergekit_hidden(_avg): JSON list, one {positive_prompts, "
      "negative_prompts} per expert")


def parse_flags(parser, argv):
    """parser.parse_args(argv), exiting with a one-line error for a float flag out of range."""
    args = parser.parse_args(argv)
    for flag, kind in CLI_FLOATS.items():
        problem = float_problem("--" + flag, getattr(args, flag), kind) if flag in vars(args) else None
        if problem:
            parser.error(problem)
    return args


def cli_options(args):
    """(options, hidden) for the flags add_moe_flags defines, and those of build_parser the
    parser has; ValueError (one line) for flags that do not fit together."""
    flags = vars(args)
    if flags.get("granularity", 1) < 1:   # 0 would be read as "unset" further down and upcycle with G=1
        raise ValueError(f"--granularity={args.granularity} must be >= 1 (shards per dense FFN)")
    options = {"model_args": {k: flags[k] for k in MODEL_FLAGS if k in flags}, "weight_scaling": args.weight_scaling,
               "seed": args.seed, "router_init_dist": args.router_init_dist}
    options.update({k: flags[k] for k in ("granularity", "expansion_rate", "expert_noise", "shared_fraction")
                    if k in flags})
    return options, router_init_plan(args)


def router_init_plan(args):
    """set_router_from_hidden's keyword arguments for the --router_init flags (None for
    random rows); ValueError (one line) for flags that do not fit together."""
    if args.domains and args.router_init != "hidden":
        raise ValueError("--domains is used by --router_init=hidden only")
    if bool(args.prompts) != args.router_init.startswith("mergekit"):
        raise ValueError("--prompts=FILE goes with --router_init=mergekit_hidden or mergekit_hidden_avg, and only there")
    if args.hidden_block_size < 0:
        raise ValueError(f"--hidden_block_size={args.hidden_block_size} must be >= 0 (0: the source's block_size)")
    if args.router_init_windows < 1:
        raise ValueError(f"--router_init_windows={args.router_init_windows} must be >= 1")
    hidden = None
    if args.router_init == "hidden":
        hidden = {"method": "hidden", "data_dir": args.data_dir, "domains": args.domains,
                  "n_windows": args.router_init_windows, "seed": args.seed, "block_size": args.hidden_block_size}
    elif args.router_init != "random":
        hidden = {"method": args.router_init, "dense_path": vars(args).get("ckpt"), "prompts": args.prompts,
                  "data_dir": args.data_dir}
    return hidden


def cli_plan(args):
    """(checkpoint paths, options, hidden) from upcycle.py's parsed flags; ValueError (one
    line) for flags that do not fit together."""
    paths = [p.strip() for p in args.ckpt.split(",") if p.strip()]
    if len(paths) != 1:
        raise ValueError(f"--ckpt names {len(paths)} checkpoints; merge dense branches with "
                         f"python btx.py --branches=A,B,...")
    if args.drop_ratio is not None and args.method != "drop":
        raise ValueError("--drop_ratio applies to --method=drop only")
    if args.router_init == "hidden" and not args.domains:   # (btx.py takes the branches' domains)
        raise ValueError("--router_init=hidden needs --domains=D1,D2,... (one per expert, or fewer dividing n_experts)")
    if args.router_init == "hidden":   # the same check as train.py's upcycle_router_init='hidden'
        n_domains = len({d.strip() for d in args.domains.split(",") if d.strip()})
        check_hidden_router_domains(n_domains, args.n_experts, args.granularity, args.method,
                                    args.expert_noise, prefix="--")
    options, hidden = cli_options(args)
    if args.method == "drop":
        options["drop_ratio"] = DEFAULT_DROP_RATIO if args.drop_ratio is None else args.drop_ratio
    return paths, options, hidden


def run_cli(write):
    """write() -> (path, cfg, info); None after a one-line error on stderr."""
    try:
        return write()
    except (ValueError, CheckpointError, LockError, ConvertError) as e:
        print(f"error: {e}", file=sys.stderr)
    except OSError as e:   # e.g. --out_dir names an existing file
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
    return None


@torch.no_grad()
def logit_difference(dense_model, moe_model, n_tokens=64, seed=0):
    """Max |logits_moe - logits_dense| on a random batch (both in eval mode, fp32)."""
    idx = verify_batch(dense_model.config, moe_model.config, n_tokens, seed)
    was = dense_model.training, moe_model.training
    dense_model.eval(), moe_model.eval()
    a = dense_model(idx)[0].float()
    b = moe_model(idx)[0].float()
    dense_model.train(was[0]), moe_model.train(was[1])
    return float((a - b).abs().max())


def verify_batch(dense_cfg, moe_cfg, n_tokens=64, seed=0):
    """The random (2, T) token batch the logit comparisons run on (T a whole number of
    Lory segments)."""
    T = min(n_tokens, moe_cfg.block_size, dense_cfg.block_size)
    if moe_cfg.router == "lory":
        T = T // moe_cfg.segment_len * moe_cfg.segment_len or moe_cfg.segment_len
    return torch.randint(0, dense_cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def blockwise_logits(cfg, state, idx):
    """GPT(cfg)'s eval-mode logits (B, T, V) for idx (B, T), in fp32, from a state dict
    (or a lazy mapping such as convert.HFState), one block at a time: each block is built
    on the meta device and given its weights (cast to fp32) only while it runs, so the
    whole model never exists at once. Equal to GPT(cfg) loaded with `state` and cast to fp32."""
    def part(build, prefix):
        with torch.device("meta"):
            module = build()
        module.load_state_dict({k: state[prefix + k].float() for k in module.state_dict()}, assign=True)
        return module.eval()
    T = idx.shape[1]
    cos, sin = (t[:T] for t in rope_tables(cfg))                                   # (T, hd/2)
    x = F.embedding(idx, state["tok_emb.weight"].float())                          # (B, T, d)
    for l in range(cfg.n_layer):
        x, _ = part(lambda: Block(cfg, l), f"blocks.{l}.")(x, cos, sin)
    x = part(lambda: RMSNorm(cfg.n_embd, cfg.norm_eps), "norm.")(x)
    return F.linear(x, state["lm_head.weight"].float())                            # (B, T, V)


def state_logit_difference(dense_cfg, dense_state, moe_cfg, moe_state, n_tokens=64, seed=0):
    """logit_difference from state dicts (or lazy mappings) through blockwise_logits: the
    check holds one block of each model at a time."""
    idx = verify_batch(dense_cfg, moe_cfg, n_tokens, seed)
    a = blockwise_logits(dense_cfg, dense_state, idx)
    return float((blockwise_logits(moe_cfg, moe_state, idx) - a).abs().max())


def checkpoint_logit_difference(dense_path, moe_path):
    """state_logit_difference of two checkpoints, memory-mapped (their tensors are read
    from disk as each block runs)."""
    dense, moe = (load_checkpoint(p, mmap=True) for p in (dense_path, moe_path))
    return state_logit_difference(GPTConfig.from_dict(dense["model_args"]), dense["model"],
                                  GPTConfig.from_dict(moe["model_args"]), moe["model"])


def print_summary(paths, path, info, layout, verify, vs="dense"):
    """What the CLI wrote: sources, the layout line, the router and the verdict; with
    verify, max |logit diff| against paths[0] on a random batch."""
    o = info["options"]
    print(f"upcycled {', '.join(os.path.abspath(ckpt_path(p)) for p in paths)} -> {path}")
    print(f"  {info['method']}: {layout}")
    if o.get("router_init", "random") != "random":
        print(f"  {describe_router_init(o)}")
    print(f"  weight scaling {o['weight_scaling']} (activation scale {o['activation_scale']:g}); "
          f"function preserving: {o['function_preserving']}"
          + (f" ({o['preservation_note']})" if o["preservation_note"] else ""))
    if verify:
        with torch.device("meta"):
            moe = GPT(GPTConfig.from_dict(load_checkpoint(path, mmap=True)["model_args"]))
        print(f"  {moe.num_params() / 1e6:.2f}M parameters ({moe.num_params(active=True) / 1e6:.2f}M active); "
              f"max |logit diff| vs {vs} on a random batch: {checkpoint_logit_difference(paths[0], path):.3g}")


def describe_router_init(o):
    """One line on a router set from hidden states, from the recorded options o."""
    if o["router_init"] == "hidden":
        return (f"router init from hidden states: expert domains {o['router_init_domains']}, "
                f"{o['router_init_tokens_per_domain']} tokens per domain")
    return f"router init {o['router_init']} from {o['router_init_prompts']}: expert e takes entry " \
           f"{o['router_init_prompt_entries']}"


def main(argv=None):
    args = parse_flags(build_parser(), argv)
    try:
        check_io_flags(args)
        paths, options, hidden = cli_plan(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.from_hf:
        return main_hf(args, options)
    written = run_cli(lambda: upcycle_checkpoint(paths[0], args.out_dir, options, force=args.force, hidden=hidden))
    if written is None:
        return 2
    path, cfg, info = written
    print_summary(paths, path, info, describe_layout(cfg, info), args.verify)
    return 0


def check_io_flags(args):
    """--ckpt with --out_dir, or --from_hf with --to_hf (copy upcycling with random router
    rows); ValueError (one line) otherwise."""
    if bool(args.from_hf) == bool(args.ckpt) or bool(args.to_hf) != bool(args.from_hf) or \
            bool(args.out_dir) != bool(args.ckpt):
        raise ValueError("use --ckpt=DENSE --out_dir=OUT (a project checkpoint), or --from_hf=HF_DIR "
                         "--to_hf=NEW_HF_DIR (an HF model, streamed)")
    if args.from_hf:
        args.ckpt = args.from_hf   # cli_plan's checks read --ckpt
        if args.method != "copy" or args.router_init != "random" or args.force:
            raise ValueError("--from_hf streams copy upcycling with random router rows; for --method=drop, "
                             "--router_init or --force import it first (convert.py --from_hf) and use --ckpt")
    elif args.dtype != "auto" or args.max_shard_size != MAX_SHARD_SIZE:
        raise ValueError("--dtype and --max_shard_size go with --from_hf/--to_hf (convert.py sets them on "
                         "import and export)")


def main_hf(args, options):
    """upcycle.py --from_hf=... --to_hf=...: upcycle_hf, then (with --verify) the logit check
    read back from the written files."""
    written = run_cli(lambda: upcycle_hf(args.from_hf, args.to_hf, options, args.dtype, args.max_shard_size))
    if written is None:
        return 2
    cfg, target, info = written
    print(f"upcycled {os.path.abspath(args.from_hf)} -> {os.path.abspath(args.to_hf)} ({target})")
    print(f"  {info['method']}: {describe_layout(cfg, info)}")
    if args.verify:
        diff, source = hf_logit_difference(args.from_hf, args.to_hf, cfg, target, options)
        print(f"  max |logit diff| vs dense on a random batch (fp32, {source}): {diff:.3g}")
    return 0


def describe_layout(cfg, info):
    o = info["options"]
    return (f"layers {cfg.moe_layer_ids()}, {cfg.n_experts} experts (E'={o['expansion_rate']} x G={o['granularity']}, "
            f"width {cfg.expert_hidden}) top-{cfg.top_k}, router {cfg.router} (init std {cfg.router_init_std}), "
            f"shared {cfg.n_shared_experts}" + (f", drop_ratio {o['drop_ratio']:g}" if o["drop_ratio"] else ""))


if __name__ == "__main__":
    sys.exit(main())
