"""
Branch-Train-MiX (Sukhbaatar et al., arXiv 2403.07816, section 2, the "MiX" step): N dense
branches of one seed model, each trained on its own domain (train.py --domains=D), become
one MoE. In every MoE layer expert e is the FFN of branch e // (E/N); every other tensor
(attention, norms, embeddings, the FFNs of layers that stay dense) is the element-wise
mean over the branches; the router is new (drawn as upcycle.new_router draws it, or set
from hidden states with --router_init=hidden). N identical branches with top-k-then-softmax
gates give the dense model back. Online: train.py --upcycle_method=btx --init_from=A,B,...

    python btx.py --branches=out/b0,out/b1,out/b2,out/b3 --out_dir=out/btx --n_experts=4
"""
import os
import sys

import torch

from checkpoint import ckpt_path, file_sha256
from configurator import ArgumentParser, check_hidden_router_domains
from model import GPTConfig
from upcycle import (FFN_MATS, FUNCTION_KEYS, SHAPE_KEYS, activation_scale, add_moe_flags, check_state_shapes,
                     cli_options, config_dict, load_dense, model_from_state, new_router,
                     parse_flags, preservation, print_summary, resolve_options, resolve_weight_scaling, routed_k,
                     run_cli, scale_experts, target_config, write_step0_moe)


def average_tensors(tensors):
    """Element-wise mean of same-shape tensors: summed in float64, divided, rounded once to
    their dtype, so N identical tensors average to themselves bit for bit."""
    return (torch.stack([t.double() for t in tensors]).sum(0) / len(tensors)).to(tensors[0].dtype)


def check_branches(dense_args, names):
    """The GPTConfig the BTX branches share. ValueError (one line, naming both files) when
    a branch is an MoE or differs from the first in shape, vocabulary or RoPE/norm."""
    cfgs = []
    for args, name in zip(dense_args, names):
        c = GPTConfig.from_dict(config_dict(args))
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


def btx_ffn(ffns, branch, cfg, weight_scaling, generator, router_init_dist="normal"):
    """One BTX MoE layer (tensors named relative to blocks.{l}.ffn.): expert e is the FFN of
    branch branch[e] (ffns[b] = (W1 (d_ff, d), W3 (d_ff, d), W2 (d, d_ff)) of branch b), and a
    new router drawn exactly as upcycle_ffn draws it for G=1 (same seed, same rows)."""
    E, dtype = cfg.n_experts, ffns[0][0].dtype
    out = new_router(cfg, E, 1, generator, router_init_dist)
    gate, up, down = (torch.stack([ffns[b][i].float() for b in branch]) for i in range(3))  # (E, h, d) x2, (E, d, h)
    gate, up, down = scale_experts(gate, up, down, weight_scaling, activation_scale(cfg.router, E, 1, routed_k(cfg)))
    out["gate_proj"], out["up_proj"], out["down_proj"] = (t.to(dtype).contiguous() for t in (gate, up, down))
    return out


def btx_merge(dense_states, dense_args, options=None, names=None, **kw):
    """N dense branch state dicts -> (MoE state dict, GPTConfig, info).

    dense_args: N GPTConfig dicts (or one for all); names: how errors and info name the
    branches (file paths). options/kw as upcycle.upcycle_state_dict's, without granularity
    > 1, shared experts, expert_noise and drop_ratio (not defined for BTX). E must be a
    multiple of N (E = N is the paper's one expert per branch). Weight scaling as for G=1
    upcycling."""
    N = len(dense_states)
    if N < 2:
        raise ValueError(f"BTX merges 2 or more dense branches, got {N}")
    names = list(names) if names else [f"branch {b}" for b in range(N)]
    cfg, scaling, settings = check_merge(dense_states, dense_args, names, options, kw)
    generator = torch.Generator().manual_seed(int(settings["seed"]))
    moe_ids = cfg.moe_layer_ids()
    prefixes = tuple(f"blocks.{l}.ffn." for l in moe_ids)
    state = {k: average_tensors([s[k] for s in dense_states]) for k in dense_states[0] if not k.startswith(prefixes)}
    branch = [e // (cfg.n_experts // N) for e in range(cfg.n_experts)]
    for l in moe_ids:
        ffns = [tuple(s[f"blocks.{l}.ffn.{m}.weight"] for m in FFN_MATS) for s in dense_states]
        layer = btx_ffn(ffns, branch, cfg, scaling, generator, settings["router_init_dist"])
        state.update({f"blocks.{l}.ffn.{name}": t for name, t in layer.items()})
    check_state_shapes(state, cfg, "the merged state dict")
    return state, cfg, btx_info(cfg, scaling, settings, dense_states, names, branch)


def check_merge(dense_states, dense_args, names, options, kw):
    """(target cfg, weight scaling, resolved options) of a BTX merge; ValueError (one line)
    for mismatched branches or options BTX does not define."""
    N = len(dense_states)
    args_list = list(dense_args) if isinstance(dense_args, (list, tuple)) else [dense_args] * N
    dense_cfg = check_branches(args_list, names)
    for state, name in zip(dense_states, names):
        check_state_shapes(state, dense_cfg, name)
    settings = resolve_options(options, kw)
    cfg, G = target_config(dense_cfg, settings["model_args"], settings["granularity"], settings["expansion_rate"])
    if G != 1 or cfg.n_shared_experts or settings["expert_noise"] or settings["drop_ratio"]:
        raise ValueError("BTX takes whole branch FFNs as experts: granularity, n_shared_experts, expert_noise "
                         "and drop_ratio do not apply")
    if cfg.n_experts % N:
        raise ValueError(f"n_experts={cfg.n_experts} is not a multiple of the {N} branches (expert e takes "
                         f"branch e // (E/N))")
    return cfg, resolve_weight_scaling(settings["weight_scaling"], cfg.router, 1), settings


def btx_info(cfg, scaling, settings, dense_states, names, branch):
    """What a BTX merge records of itself (upcycled_from["method"], ["options"])."""
    verdict, note = preservation(cfg, 1, scaling)
    if not all(torch.equal(dense_states[0][k], s[k]) for s in dense_states[1:] for k in dense_states[0]):
        verdict, note = "approximate", (f"the {len(names)} branches differ: experts are different FFNs, the rest "
                                        f"is their mean")
    return {
        "method": "branch_train_mix",
        "options": {
            "n_experts": cfg.n_experts, "top_k": cfg.top_k, "moe_layers": cfg.moe_layers, "router": cfg.router,
            "router_init_std": cfg.router_init_std, "router_init_dist": settings["router_init_dist"],
            "weight_scaling": scaling,
            "activation_scale": activation_scale(cfg.router, cfg.n_experts, 1, routed_k(cfg)),
            "seed": int(settings["seed"]), "branches": names, "expert_branch": branch,
            "function_preserving": verdict, "preservation_note": note,
        },
    }


def load_branches(paths):
    """(checkpoints, absolute file names) of BTX branch checkpoints."""
    names = [os.path.abspath(ckpt_path(p)) for p in paths]
    return [load_dense(p) for p in paths], names


def branch_record(names):
    """What upcycled_from keeps of the branches. path/sha256 stay None: there is no single
    dense source, so similarity-to-dense monitors skip a BTX model."""
    return {"path": None, "sha256": None,
            "branch_files": [{"path": n, "sha256": file_sha256(n)} for n in names]}


def btx_from_checkpoints(paths, options=None, device="cpu", **kw):
    """BTX in memory (for train.py): dense branch checkpoints -> (MoE GPT on `device`,
    upcycled_from). Raises ValueError for a missing, corrupt, MoE or mismatched branch."""
    ckpts, names = load_branches(paths)
    state, cfg, info = btx_merge([c["model"] for c in ckpts], [c["model_args"] for c in ckpts], options, names, **kw)
    return model_from_state(cfg, state).to(device), {**branch_record(names), **info}


def btx_checkpoint(paths, out_dir, options=None, force=False, hidden=None, **kw):
    """BTX offline (the CLI): merge the branch checkpoints `paths` into out_dir/ckpt.pt, a
    step-0 MoE checkpoint like upcycle.upcycle_checkpoint's (config: the first branch's).
    hidden: as upcycle_checkpoint's; its domains default to the branches' config["domains"]
    (one each). Returns (path written, cfg, info)."""
    def build():
        ckpts, names = load_branches(paths)
        state, cfg, info = btx_merge([c["model"] for c in ckpts], [c["model_args"] for c in ckpts], options,
                                     names, **kw)
        if hidden is not None and hidden["method"] == "hidden" and not hidden.get("domains"):
            hidden["domains"] = recorded_domains(ckpts, names)
        return state, cfg, info, ckpts[0].get("config"), branch_record(names)
    hidden = dict(hidden) if hidden is not None else None
    return write_step0_moe(out_dir, paths, force, build, hidden)


def branch_domains(paths):
    """The one domain each BTX branch checkpoint trained on (train.py's `domains` setting,
    kept in its config); ValueError (one line) when a branch records none or several."""
    ckpts, names = load_branches(paths)
    return recorded_domains(ckpts, names)


def recorded_domains(ckpts, names):
    """The one domain each branch trained on (its config["domains"]), for router_init=hidden."""
    doms = [str((c.get("config") or {}).get("domains") or "") for c in ckpts]
    bad = [n for n, d in zip(names, doms) if not d or "," in d]
    if bad:
        raise ValueError(f"router_init=hidden needs one domain per branch: {bad[0]} records none (or several); "
                         f"pass --domains=D1,D2,... (one per branch)")
    return doms


# ----------------------------------------------------------------------------- CLI

def build_parser():
    p = ArgumentParser(prog="btx.py", description="Merge dense branch checkpoints into an MoE checkpoint "
                                                  "(Branch-Train-MiX, docs/METHODS.md section 4).")
    p.add_argument("--branches", required=True, help="the dense branch out_dirs or .pt files: A,B[,C,...]")
    p.add_argument("--out_dir", required=True, help="where ckpt.pt is written")
    add_moe_flags(p)
    p.set_defaults(n_experts=0)
    return p


def main(argv=None):
    args = parse_flags(build_parser(), argv)
    paths = [p.strip() for p in args.branches.split(",") if p.strip()]
    if args.n_experts == 0:   # one expert per branch, the paper's layout
        args.n_experts = len(paths)

    def write():
        if len(paths) < 2:
            raise ValueError("btx.py merges 2 or more dense branches: --branches=A,B[,C,...]")
        options, hidden = cli_options(args)
        if args.router_init == "hidden":   # the same check as train.py's upcycle_method='btx'
            n_domains = len({d.strip() for d in args.domains.split(",") if d.strip()}) or len(paths)
            check_hidden_router_domains(n_domains, args.n_experts, 1, "btx", 0.0, prefix="--")
        return btx_checkpoint(paths, args.out_dir, options, force=args.force, hidden=hidden)
    written = run_cli(write)
    if written is None:
        return 2
    path, cfg, info = written
    print_summary(paths, path, info, f"layers {cfg.moe_layer_ids()}, {cfg.n_experts} experts top-{cfg.top_k}, "
                  f"expert e from branch {info['options']['expert_branch']}, non-expert weights averaged over "
                  f"{len(paths)} branches", args.verify, vs="the first branch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
