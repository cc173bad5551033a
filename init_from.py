"""
Where a training run's model comes from (train.py's init_from setting):

    scratch        a new model (Lory with dense_warmup_iters: the dense shape first, Lory section 3.5)
    resume         out_dir/ckpt.pt, with the optimizer and RNG states train.py restores
    <dense dir>    with moe_layers='none': warm start (weights only, fresh optimizer and schedule)
    <dense dir>    with MoE layers: online upcycling in memory (Llama 3 meets MoE), by copying,
                   Drop-Upcycling, or Branch-Train-MiX from init_from=A,B,...; optionally with
                   routers from hidden states (upcycle.py, the same functions as its CLI)

and the checks around it, before anything is allocated or written: the memory a
run needs, an out_dir that holds a checkpoint, a model that does not fit the data.
How the model is split over processes is parallel.py's (Dist.build/load/upcycle).
"""
import math
import os
from dataclasses import asdict, fields

import torch

import checkpoint
import parallel
from checkpoint import load_checkpoint, load_weights
from configurator import ConfigError, ram_available, resolve_data_dir
from data.dataset import load_meta
from data.tokenizer import copy_tokenizer_files
from model import GPT, GPTConfig
from btx import branch_domains, btx_from_checkpoints
from upcycle import FFN_MATS, FUNCTION_KEYS, SHAPE_KEYS, check_upcycle_options, router_init_hidden, upcycle_model

# model keys that may differ between a checkpoint and the run that starts from it
RUNTIME_MODEL_KEYS = ("capacity_factor", "eval_capacity_factor", "drop_policy", "expert_impl", "dropout")
DENSE_WARMUP_NAME = "dense_warmup.pt"


def model_args_from(cfg, vocab_size):
    """The GPTConfig fields of a run's settings, with the data's vocab_size."""
    args = {f.name: cfg[f.name] for f in fields(GPTConfig) if f.name in cfg}
    args["vocab_size"] = vocab_size
    return args


def upcycle_source_shape(cfg, model_args, log):
    """Online upcycling keeps the dense source's shape, so its shape and function keys
    (SHAPE_KEYS, FUNCTION_KEYS) replace this run's: an imported model upcycles without
    its shape repeated in the config. The keys where this run's config asks for another
    value are named in the log. Other origins: model_args unchanged."""
    if cfg["init_from"] in ("scratch", "resume") or model_args["moe_layers"] == "none":
        return model_args
    path = cfg["init_from"].split(",")[0].strip()   # BTX: the branches share one shape
    source = load_checkpoint(path, map_location="cpu", mmap=True)["model_args"]
    note = kept_shape_note(GPTConfig.from_dict(source), model_args)
    if note:
        log(f"upcycling {path}" + note)
    return {**model_args, **{k: source[k] for k in SHAPE_KEYS + FUNCTION_KEYS if k in source}}


def with_runtime_keys(saved_args, model_args):
    """GPTConfig of a saved model's shape with this run's runtime settings (RUNTIME_MODEL_KEYS)."""
    return GPTConfig(**{**saved_args, **{k: model_args[k] for k in RUNTIME_MODEL_KEYS}})


def build_model(cfg, model_args, dist):
    """(model on the CPU, resume checkpoint or None, upcycled_from or None) from the
    origin init_from names (module docstring). model_args: the run's model settings
    (model_args_from). dist (parallel.Dist) builds it: under expert parallelism the
    model holds only this rank's experts."""
    init = cfg["init_from"]
    if init == "scratch":
        args = {**model_args, "moe_layers": "none"} if cfg["dense_warmup_iters"] > 0 else model_args
        return dist.build(GPTConfig(**args)), None, None
    if init == "resume":
        ckpt = load_checkpoint(cfg["out_dir"], map_location=dist.device)
        check_memory(ckpt["model_args"], cfg, dist.device)
        model = dist.load(with_runtime_keys(ckpt["model_args"], model_args), ckpt["model"], cfg["out_dir"])
        dist.log(f"resuming from {cfg['out_dir']} at iter {ckpt.get('iter_num', 0)}")
        return model, ckpt, ckpt.get("upcycled_from")
    if os.path.abspath(init) == os.path.abspath(cfg["out_dir"]):
        raise ConfigError(f"init_from={init} and out_dir must differ (use init_from='resume' to continue a run)")
    if model_args["moe_layers"] == "none":
        return warm_start(init, model_args, dist.log), None, None
    model, upcycled_from = upcycle_online(cfg, model_args, dist)
    return model, None, upcycled_from


def warm_start(path, model_args, log):
    """The dense checkpoint at path with its own shape (its model keys win) and this
    run's runtime keys; the optimizer and schedule start fresh."""
    src = load_checkpoint(path, map_location="cpu", mmap=True)   # (its optimizer moments are not read)
    model = GPT(with_runtime_keys(src["model_args"], model_args))
    load_weights(model, src["model"], path)
    log(f"warm start from {path} (iter {src.get('iter_num', '?')}): fresh optimizer and schedule"
        + kept_shape_note(model.config, model_args))
    return model


def kept_shape_note(model_cfg, model_args):
    """A warm start keeps the checkpoint's shape: name the keys where this run's
    config asks for another one ('' when none)."""
    asked = GPTConfig(**{**model_args, "moe_layers": "none"})   # n_kv_head=0, ffn_hidden=0 resolved
    diff = [f"{k}={getattr(model_cfg, k)} (this run's config: {getattr(asked, k)})"
            for k in SHAPE_KEYS + FUNCTION_KEYS if k != "vocab_size" and getattr(model_cfg, k) != getattr(asked, k)]
    return f"; it keeps the checkpoint's shape: {', '.join(diff)}" if diff else ""


def upcycle_options(cfg, model_args):
    """What the upcycler needs: the target MoE shape and the upcycling options. The
    MoE keeps the source's block_size (the context it was trained for: for an imported
    model its max_position_embeddings), as a warm start does; this run's block_size is
    the length it trains at."""
    moe_args = {k: v for k, v in model_args.items() if k != "block_size"}
    return {"model_args": moe_args, "granularity": cfg["upcycle_granularity"],
            "weight_scaling": cfg["upcycle_weight_scaling"], "expert_noise": cfg["upcycle_expert_noise"],
            "seed": cfg["upcycle_seed"], "router_init_dist": cfg["upcycle_router_init_dist"],
            "drop_ratio": cfg["upcycle_drop_ratio"] if cfg["upcycle_method"] == "drop" else 0.0}


def upcycle_online(cfg, model_args, dist):
    """Online upcycling in memory, by upcycle_method: 'copy' or 'drop' (Drop-Upcycling)
    from the dense checkpoint init_from, or 'btx' (Branch-Train-MiX) from the branch
    checkpoints init_from=A,B,...; then, with upcycle_router_init='hidden', every router
    from the mean hidden states of its experts' domains (upcycle_router_domains, or each
    branch's `domains` setting). The same functions as upcycle.py's CLI, so the same
    settings give the same weights. Returns (model on the CPU, upcycled_from)."""
    init, options = cfg["init_from"], upcycle_options(cfg, model_args)
    paths = [p.strip() for p in init.split(",") if p.strip()]
    if cfg["upcycle_method"] == "btx":
        for p in paths:
            if os.path.abspath(p) == os.path.abspath(cfg["out_dir"]):
                raise ConfigError(f"init_from names out_dir {p} as a branch; write the merged MoE to another out_dir")
        model, upcycled_from = btx_from_checkpoints(paths, options, device="cpu")
    else:
        model, upcycled_from = dist.upcycle(init, options)
    if cfg["upcycle_router_init"] == "hidden":
        domains = cfg["upcycle_router_domains"] or branch_domains(paths)
        upcycled_from["options"].update(router_init_hidden(model, resolve_data_dir(cfg), domains,
                                                           seed=cfg["upcycle_seed"], block_size=cfg["block_size"]))
    dist.log(f"upcycled {init} ({upcycled_from['method']}, router {cfg['upcycle_router_init']}) -> "
             f"{model.config.n_experts} experts top-{model.config.top_k} in memory "
             f"({upcycled_from['options'].get('function_preserving', '?')} function preservation)")
    return model, upcycled_from


def upcycle_dense_warmup(dense_model, cfg, model_args, iter_num, dist):
    """Lory's dense warm-up ends (Lory section 3.5): the dense model upcycled in memory.
    Returns (MoE model on dist.device, {layer: (W1, W3, W2)} of the dense FFNs for the
    similarity monitor, upcycled_from). Rank 0 saves the dense model as
    out_dir/dense_warmup.pt, which upcycled_from points at, so a resumed run finds
    the dense FFNs again and logs similarity_to_dense like a straight run."""
    model = upcycle_model(dense_model, upcycle_options(cfg, model_args))[0].to(dist.device)
    dense_ffns = {l: tuple(getattr(dense_model.blocks[l].ffn, m).weight.detach().cpu().clone() for m in FFN_MATS)
                  for l, _ in model.moe_layers()}
    path = save_dense_warmup(dense_model, cfg, iter_num) if dist.master else None
    upcycled_from = {"path": path, "sha256": checkpoint.file_sha256(path) if path else None,
                     "method": "dense warm-up", "options": upcycle_options(cfg, model_args), "iter": iter_num}
    return model, dense_ffns, upcycled_from


def save_dense_warmup(dense_model, cfg, iter_num):
    """The dense model as out_dir/dense_warmup.pt (weights only); its absolute path."""
    obj = {"model_args": asdict(dense_model.config), "model": dense_model.state_dict(), "optimizer": None,
           "iter_num": iter_num, "best_val_loss": 1e9, "config": cfg, "rng": None, "aux_coef": None,
           "upcycled_from": None}
    return os.path.abspath(checkpoint.save_checkpoint(obj, cfg["out_dir"], DENSE_WARMUP_NAME))


# -----------------------------------------------------------------------------
# checks before anything is allocated or written

def check_new_run(cfg, model_args):
    """Before out_dir is touched: a new run must not replace a checkpoint unasked,
    and its model shape (and Lory's later upcycle) must be possible."""
    if cfg["init_from"] == "resume":
        return
    if os.path.exists(os.path.join(cfg["out_dir"], "ckpt.pt")) and not cfg["overwrite"]:
        raise ConfigError(f"{cfg['out_dir']} already holds a checkpoint: continue it with --init_from=resume, "
                          f"start over with --overwrite=True, or choose another --out_dir")
    parallel.check_ep_config(GPTConfig(**model_args), cfg["expert_parallel"])   # an impossible shape fails here
    if model_args["moe_layers"] != "none" and cfg["init_from"] == "scratch" and cfg["dense_warmup_iters"]:
        check_upcycle_options(upcycle_options(cfg, model_args))   # Lory: the upcycle after the warm-up must work


def n_moe_layers(args):
    """How many layers moe_layers names, counted without listing them (n_layer may be huge)."""
    spec, L = str(args.get("moe_layers", "none")).strip(), args["n_layer"]
    if spec in ("none", ""):
        return 0
    return L if spec == "all" else L // 2 if spec == "every_other" else len([s for s in spec.split(",") if s.strip()])


def estimate_memory(args, cfg):
    """(bytes, breakdown): a lower bound of the memory a training run of this model
    shape and batch holds at once, from the numbers alone (nothing allocated).
    Parameters: embedding (and an untied head), per layer the q and o projections
    (k, v left out: a lower bound), a SwiGLU FFN (3 d h) or E experts (3 d h_e each);
    times 16 bytes (fp32 weight, gradient, two AdamW moments). Activations: the
    logits and their gradient (2 B T V) and, per layer, 4 saved (B, T, d) tensors,
    fp32. The step's batch, drawn whole on every process (train.get_batch): (x, y)
    int64 (B * gradient_accumulation_steps, T). Fixed eval batches: 2 splits x
    eval_iters x (x, y, domain) int64 (B, T)."""
    args = {**{f.name: f.default for f in fields(GPTConfig)}, **args}   # a checkpoint may leave defaults out
    d, L, V = args["n_embd"], args["n_layer"], args["vocab_size"]
    ffn = args.get("ffn_hidden") or 32 * math.ceil(8 * d / 3 / 32)
    h_e = args.get("expert_hidden") or ffn
    n_moe = n_moe_layers(args)
    experts = args.get("n_experts", 1) + args.get("n_shared_experts", 0)
    params = (V * d * (1 if args.get("tie_embeddings", True) else 2) + L * 2 * d * d
              + (L - n_moe) * 3 * d * ffn + n_moe * experts * 3 * d * h_e)
    B, T = cfg["batch_size"], cfg["block_size"]
    parts = {"parameters and optimizer state": 16 * params, "activations": 4 * B * T * (2 * V + 4 * L * d),
             "step batch": 2 * 8 * B * T * cfg["gradient_accumulation_steps"],
             "eval batches": 2 * cfg["eval_iters"] * 3 * 8 * B * T}
    return sum(parts.values()), parts


def available_memory(device):
    """(bytes, where) this process can still allocate: the GPU's free memory on CUDA,
    else the machine's MemAvailable (None when unknown, e.g. no /proc)."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(device)[0], f"{device} GPU"
    return ram_available(), "RAM"


def check_memory(args, cfg, device):
    """Refuse, before anything is allocated, a run whose lower-bound memory need
    (estimate_memory) exceeds what the device has free, with one line saying both."""
    need, parts = estimate_memory(args, cfg)
    have, where = available_memory(device)
    if have is not None and need > have:
        gib = lambda n: f"{n / 2**30:,.1f} GiB"   # noqa: E731
        raise ConfigError(f"this run needs at least {gib(need)} of {where} ("
                          + ", ".join(f"{k} {gib(v)}" for k, v in parts.items())
                          + f") but {gib(have)} is available: make the model, batch_size, block_size, "
                            f"gradient_accumulation_steps or eval_iters smaller")


def check_model_fits_data(model, cfg, vocab_size, data_dir):
    tokenizer = load_meta(data_dir).get("tokenizer") if model.config.vocab_size != vocab_size else None
    if model.config.vocab_size != vocab_size and not padded_hf_vocab(tokenizer, vocab_size, model.config.vocab_size):
        raise ConfigError(f"model vocab_size={model.config.vocab_size} differs from {data_dir} "
                          f"vocab_size={vocab_size}: prepare the data with the tokenizer the model used "
                          f"(an imported model: python data/multidomain/prepare.py --tokenizer=CKPT_DIR)")
    if model.config.block_size < cfg["block_size"]:
        raise ConfigError(f"block_size={cfg['block_size']} exceeds the model's block_size={model.config.block_size}")


def padded_hf_vocab(tokenizer, data_vocab_size, model_vocab_size):
    """True when data made with an HF tokenizer (tokenizer: its meta.json's) has fewer
    tokens than the model has embedding rows (many HF models pad theirs): every id
    has a row, nothing wraps."""
    return tokenizer == "hf" and data_vocab_size < model_vocab_size


def carry_tokenizer(cfg):
    """An imported model's tokenizer files (tokenizer.json, ...) travel with every run that
    starts from it: copied from init_from's directory into out_dir, so sample.py and the
    data scripts find them from the run alone."""
    init = cfg["init_from"]
    if init in ("scratch", "resume"):
        return
    src = init if os.path.isdir(init) else os.path.dirname(os.path.abspath(init))
    if os.path.exists(os.path.join(src, "tokenizer.json")):
        copy_tokenizer_files(src, cfg["out_dir"])
