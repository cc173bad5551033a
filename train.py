"""
Train a dense or MoE model, from scratch, from a checkpoint, or by upcycling a
dense checkpoint online (the "Llama 3 meets MoE" workflow).

    python train.py                                   # defaults below, CPU or GPU
    python train.py config/dense_small.py --max_iters=500
    python train.py config/moe_small.py --device=cpu
    python train.py --init_from=resume --out_dir=out/dense
    python train.py config/upcycle_8x2.py             # init_from=<dense out_dir>: upcycle in memory
    torchrun --standalone --nproc_per_node=2 train.py config/dense_small.py
    torchrun --standalone --nproc_per_node=2 train.py config/upcycle_8x2.py --expert_parallel=2

Every default lives in the block below; a config file (plain Python assigning
these names) and then --key=value arguments override them (configurator.py).
Model keys are the fields of model.GPTConfig and share this namespace. Where the
model comes from is init_from.py's; how it is split over processes, parallel.py's;
what is logged about the experts, diagnostics.py's.
"""
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch

import checkpoint
import parallel
from checkpoint import CheckpointError, NonFiniteCheckpointError, load_checkpoint
from configurator import ConfigError, check_run_config, parse_config, resolve_data_dir
from data.dataset import TokenDataset
from data.similarity import ensure_similarity_order
from diagnostics import LogWindow, domain_usage, eval_record, source_ffns
from init_from import (build_model, carry_tokenizer, check_memory, check_model_fits_data, check_new_run,
                       model_args_from, upcycle_dense_warmup, upcycle_source_shape)
from experts import auto_impl
from metrics import METRICS_FILE, MetricsWriter, trim_for_resume
from router import AdaptiveAuxCoef, Routing
from outdir import LockError, OutDirLock

# -----------------------------------------------------------------------------
# defaults: I/O
out_dir = "out/dense"
init_from = "scratch"        # 'scratch' | 'resume' | a checkpoint dir: upcycled online when moe_layers is set,
                             # else a warm start that keeps the checkpoint's shape (its model keys win)
eval_interval = 100
eval_iters = 20              # fixed val batches per evaluation
log_interval = 10
always_save_checkpoint = True  # save at every eval (needed for exact resume), not only on improvement
overwrite = False            # a new run may replace an existing out_dir/ckpt.pt only with this set
seed = 1337
# data
dataset = "multidomain"      # data/<dataset>/ (prepared by data/<dataset>/prepare.py)
data_dir = ""                # explicit data directory; "" -> data/<dataset>
domains = ""                 # train and evaluate on these domains only ('code', 'code,prose'); "" -> all (BTX branches)
batching = "random"          # 'random' | 'similarity' (Lory; the order is built on first use)
batch_size = 16              # micro-batch size per process
block_size = 256
gradient_accumulation_steps = 1  # global: divided across DDP processes
# model (model.GPTConfig fields; vocab_size comes from the data's meta.json)
n_layer = 4
n_head = 4
n_kv_head = 0
n_embd = 128
ffn_hidden = 0
tie_embeddings = True
rope_theta = 10000.0
dropout = 0.0
moe_layers = "none"
n_experts = 8
top_k = 2
expert_hidden = 0
n_shared_experts = 0
router = "topk_softmax"
capacity_factor = 0.0
eval_capacity_factor = 0.0
drop_policy = "probs"
gate_norm_lambda = None
router_noise = False
router_init_std = 0.02
expert_impl = "auto"
segment_len = 32
lory_first_segment = "self"
# MoE losses and balancing (docs/METHODS.md section 3)
aux_loss = "switch"          # 'switch' | 'skywork' | 'none'
aux_loss_coef = 1e-2         # fixed coefficient (ignored when adaptive_aux is on)
adaptive_aux = False         # Skywork per-layer coefficients from drop rates
adaptive_aux_xi = 0.2
adaptive_aux_max = 0.01
adaptive_aux_beta = 0.99
z_loss_coef = 1e-3
expert_bias_gamma = 1e-3     # DeepSeek-V3 aux-free bias step (router='sigmoid')
# upcycling (init_from=<dense out_dir>, or dense_warmup_iters > 0 for Lory's dense warm-up)
upcycle_granularity = 1      # G: fine-grained shards per dense FFN
upcycle_weight_scaling = "auto"  # 'auto' | 'none' | 'exact' | 'megatron'
upcycle_expert_noise = 0.0   # relative std of noise on the expert copies
upcycle_seed = 0
upcycle_router_init_dist = "normal"  # 'normal' | 'uniform' (the Drop-Upcycling/BTX authors' router init)
upcycle_method = "copy"      # 'copy' | 'drop' (Drop-Upcycling) | 'btx' (Branch-Train-MiX: init_from=A,B,C,D)
upcycle_drop_ratio = 0.5     # upcycle_method='drop': share of each expert's channels re-initialised
upcycle_router_init = "random"   # 'random' (router_init_std) | 'hidden' (mean hidden state per domain)
upcycle_router_domains = ""  # upcycle_router_init='hidden': D1,D2,... per expert ("" with btx: the branches' domains)
dense_warmup_iters = 0       # train the dense shape first, then upcycle in memory (Lory)
# optimizer
learning_rate = 1e-3
max_iters = 1000
lr_decay_iters = 0           # 0 -> max_iters
min_lr = 1e-4
warmup_iters = 50
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
# system
device = "auto"              # 'auto' (cuda -> mps -> cpu) | 'cpu' | 'cuda' | 'cuda:1' | 'mps'
dtype = "auto"               # 'auto' (bf16 autocast on CUDA, fp32 elsewhere) | 'float32' | 'bfloat16'
save_dtype = "float32"       # weights in ckpt.pt: 'float32' (the fp32 masters: exact resume) | 'bfloat16' | 'float16'
compile = False
backend = "auto"             # DDP backend: nccl on CUDA, gloo on CPU
expert_parallel = 1          # N: ranks that split every MoE layer's experts (parallel.py); 1 = plain DDP
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in dict(globals()).items()
            if not k.startswith("_") and isinstance(v, (int, float, bool, str, type(None)))}


# -----------------------------------------------------------------------------
# setup

@dataclass
class Env:
    """Where this process computes: device, precision, micro-steps."""
    device: str
    device_type: str      # 'cuda' | 'mps' | 'cpu'
    dtype: str            # 'float32' | 'bfloat16' | 'float16'
    autocast: object      # context manager for forward passes
    micro_steps: int      # micro-batches per process per optimizer step


def setup_env(cfg):
    """(Env, parallel.Dist) of this process: distributed setup, device, precision, seed."""
    dist = parallel.start(cfg)
    cfg["device"] = dist.device
    device_type = "cuda" if dist.device.startswith("cuda") else ("mps" if dist.device.startswith("mps") else "cpu")
    dtype = cfg["dtype"] if cfg["dtype"] != "auto" else ("bfloat16" if device_type == "cuda" else "float32")
    autocast = nullcontext() if dtype == "float32" else torch.autocast(device_type=device_type, dtype=getattr(torch, dtype))
    torch.manual_seed(cfg["seed"])
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    micro_steps = cfg["gradient_accumulation_steps"] // dist.world
    return Env(dist.device, device_type, dtype, autocast, micro_steps), dist


def load_data(cfg, dist):
    """(data_dir, train split, val split). Lory's similarity order is built here on
    first use (by the master process; the others wait for it)."""
    data_dir = resolve_data_dir(cfg)
    if cfg["batching"] == "similarity":
        if dist.master:
            ensure_similarity_order(data_dir)
        dist.barrier()
    doms = cfg["domains"] or None   # a BTX branch: train and val windows of its domain(s) only
    return (data_dir, TokenDataset(data_dir, "train", batching=cfg["batching"], domains=doms),
            TokenDataset(data_dir, "val", domains=doms))


@dataclass
class RunState:
    """What changes as a run goes on, and what its checkpoint holds."""
    raw_model: torch.nn.Module     # the GPT itself
    model: torch.nn.Module         # what the step calls (compiled / DDP-wrapped raw_model)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler   # loss scaling, active for float16 only
    aux_coef: AdaptiveAuxCoef
    data_gen: torch.Generator
    iter_num: int = 0
    best_val_loss: float = 1e9
    upcycled_from: dict = None     # where an upcycled model came from (checkpoint provenance)
    dense_ffns: dict = None        # {layer: (W1, W3, W2)} of the dense source, for the similarity monitor


def start_run(cfg, model_args, env, dist, data_dir, vocab_size):
    """The RunState of a new or resumed run: the model from its origin (init_from.py)
    on the device and wrapped for the step, its optimizer, and for a resumed run
    everything restore_training_state restores."""
    check_memory(model_args, cfg, env.device)    # before GPTConfig lists n_layer layers or anything is allocated
    check_new_run(cfg, model_args)
    if dist.master:
        os.makedirs(cfg["out_dir"], exist_ok=True)
    raw_model, ckpt, upcycled_from = build_model(cfg, model_args, dist)
    dense_ffns = source_ffns(upcycled_from, raw_model, dist.log, resumed=ckpt is not None)
    check_model_fits_data(raw_model, cfg, vocab_size, data_dir)
    if dist.master:
        carry_tokenizer(cfg)
    raw_model.to(env.device)
    data_gen = torch.Generator().manual_seed(cfg["seed"])   # same stream on every rank: see get_batch
    run = RunState(raw_model, raw_model, make_optimizer(raw_model, cfg, env.device_type),
                   torch.amp.GradScaler(enabled=(env.dtype == "float16")), new_aux_coef(raw_model, cfg), data_gen,
                   upcycled_from=upcycled_from, dense_ffns=dense_ffns)
    if ckpt is not None:
        restore_training_state(ckpt, run, env.device_type, dist)
        run.iter_num, run.best_val_loss = ckpt.get("iter_num", 0), ckpt.get("best_val_loss", 1e9)
    if dist.master:
        log_expert_kernel(raw_model, env, dist)
        if dist.describe(raw_model):
            dist.log(dist.describe(raw_model))
    run.model = dist.wrap(raw_model, cfg["compile"])
    return run


def fixed_eval_batches(train_data, val_data, cfg):
    """The train and val batches every evaluation uses: fixed, so losses compare across
    steps and runs."""
    B, T, n = cfg["batch_size"], cfg["block_size"], cfg["eval_iters"]
    return {"train": train_data.fixed_batches(n, B, T, seed=4321), "val": val_data.fixed_batches(n, B, T, seed=1234)}


def open_metrics(cfg, iter_num, dist):
    """out_dir/metrics.jsonl, written by rank 0; a resumed run appends to it after
    dropping the records past iter_num (written after its checkpoint)."""
    path, resume = os.path.join(cfg["out_dir"], METRICS_FILE), cfg["init_from"] == "resume"
    if dist.master and resume:
        trim_for_resume(path, iter_num)
    return MetricsWriter(path, append=resume, enabled=dist.master)


def log_expert_kernel(model, env, dist):
    if model.config.is_moe and model.routed_layers():
        impl = model.config.expert_impl
        name, why = auto_impl(torch.device(env.device), getattr(torch, env.dtype)) if impl == "auto" else (impl, "forced")
        dist.log(f"expert kernel: {name} ({why})")


# -----------------------------------------------------------------------------
# the steps of train(), in the order it calls them

def upcycle_after_warmup(run, cfg, model_args, env, dist):
    """Lory's dense warm-up ends: upcycle the dense model in memory, keep the Adam
    moments of the parameters that survive, and start fresh ones for the experts."""
    dense_model, dense_optimizer = run.raw_model, run.optimizer
    run.raw_model, run.dense_ffns, run.upcycled_from = upcycle_dense_warmup(dense_model, cfg, model_args,
                                                                            run.iter_num, dist)
    run.optimizer = make_optimizer(run.raw_model, cfg, env.device_type)
    carry_optimizer_state(dense_optimizer, dense_model, run.optimizer, run.raw_model)
    run.aux_coef = new_aux_coef(run.raw_model, cfg)
    run.model = dist.wrap(run.raw_model, cfg["compile"])
    dist.log(f"dense warm-up done at iter {run.iter_num}: upcycled to {run.raw_model.config.n_experts} experts")


def get_lr(it, cfg):
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters."""
    decay_iters = cfg["lr_decay_iters"] or cfg["max_iters"]
    if it < cfg["warmup_iters"]:
        return cfg["learning_rate"] * (it + 1) / (cfg["warmup_iters"] + 1)
    if it >= decay_iters:
        return cfg["min_lr"]
    ratio = (it - cfg["warmup_iters"]) / max(1, decay_iters - cfg["warmup_iters"])
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return cfg["min_lr"] + coeff * (cfg["learning_rate"] - cfg["min_lr"])


@torch.no_grad()
def evaluate(raw_model, eval_batches, n_domains, env):
    """Mean loss over the fixed train/val batches; for MoE also per-domain expert
    usage (routed: fraction of each domain's tokens per expert; Lory: mean merge
    weights of the segments whose last token is in the domain).
    eval_batches: {"train": [...], "val": [...]} of (x, y, domains): (B, T), (B, T) and
    (B, T+1) (TokenDataset.fixed_batches)."""
    raw_model.eval()
    out = {}
    for split, batches in eval_batches.items():
        losses = []
        usage = None
        for x, y, dom in batches:
            x, y = x.to(env.device), y.to(env.device)
            with env.autocast:
                _, loss, routings = raw_model(x, y)
            losses.append(loss.item())
            if split == "val" and routings:
                usage = domain_usage(routings, dom, n_domains, usage, x.shape)
        out[f"{split}_loss"] = float(np.mean(losses))
        if split == "val" and usage is not None:
            out["domain_usage"] = [(u / u.sum(-1, keepdim=True).clamp_min(1e-9)).tolist() for u in usage]
    raw_model.train()
    return out


def get_batch(train_data, cfg, env, dist, data_gen):
    """One optimizer step's global batch, drawn identically on every rank; this
    rank takes micro-batches m*world + rank. The data a step sees therefore does
    not depend on the number of processes (1 process with accumulation 2 sees the
    same samples as 2 processes with accumulation 1). Yields (x, y), each (B, T)."""
    B, T = cfg["batch_size"], cfg["block_size"]
    x, y = train_data.get_batch(B * env.micro_steps * dist.world, T, data_gen)
    for m in range(env.micro_steps):
        s = (m * dist.world + dist.rank) * B
        xb, yb = x[s:s + B], y[s:s + B]
        if env.device_type == "cuda":
            xb, yb = xb.pin_memory().to(env.device, non_blocking=True), yb.pin_memory().to(env.device, non_blocking=True)
        else:
            xb, yb = xb.to(env.device), yb.to(env.device)
        yield xb, yb


def forward_backward(run, batches, cfg, env, dist, alphas, stats):
    """Forward and backward over this step's micro-batches, gradients accumulated
    (DDP averages them in the last micro-step's backward only). Returns (mean loss,
    per routed layer the demand per expert summed over the micro-batches and the
    adaptive drop rate averaged over them: what update_balancing needs)."""
    demand, drops, loss_mean = None, None, 0.0
    for m, (X, Y) in enumerate(batches):
        dist.sync_on_backward(run.model, last=(m == env.micro_steps - 1))
        with env.autocast:
            _, loss, routings = run.model(X, Y)
            total = (loss + aux_total(routings, cfg, alphas)) / env.micro_steps
        run.scaler.scale(total).backward()
        loss_mean += loss.item() / env.micro_steps
        stats.add(routings, dist.logged_loads(routings))
        routed = [r for r in routings if isinstance(r, Routing)]
        step_demand = [r.stats["demand_per_expert"] for r in routed]
        step_drops = [float(r.stats["adaptive_drop_rate"]) / env.micro_steps for r in routed]
        demand = step_demand if demand is None else [a + b for a, b in zip(demand, step_demand)]
        drops = step_drops if drops is None else [a + b for a, b in zip(drops, step_drops)]
    return loss_mean, demand, drops


def aux_total(routings, cfg, alphas):
    """sum_l alpha_l * L_aux_l + z_coef * sum_l L_z_l over routed MoE layers."""
    total = 0.0
    for l, r in enumerate(r for r in routings if isinstance(r, Routing)):
        if cfg["aux_loss"] != "none":
            total = total + alphas[l] * r.aux_losses[cfg["aux_loss"]]
        if cfg["z_loss_coef"] > 0:
            total = total + cfg["z_loss_coef"] * r.aux_losses["z"]
    return total


def update_balancing(run, demand, drops, cfg, dist):
    """After the step, from training statistics only: the sigmoid router's aux-free
    bias (DeepSeek-V3) from the step's demand per expert (before capacity dropping),
    and Skywork's adaptive alphas from its adaptive drop rates (capacity factor 1's
    when dropless), both over all processes so every rank holds the same state."""
    if not demand:
        return
    dist.sum_(demand)
    for ffn, load in zip(run.raw_model.routed_layers(), demand):
        if ffn.router.router_type == "sigmoid":
            ffn.router.update_expert_bias(load, cfg["expert_bias_gamma"])
    if cfg["adaptive_aux"]:
        run.aux_coef.update(dist.mean_list(drops))


def make_optimizer(model, cfg, device_type):
    """AdamW; weight decay on matrices and expert stacks (dim >= 2), none on norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg["weight_decay"]},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = device_type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]), fused=fused)


def carry_optimizer_state(old_opt, old_model, new_opt, new_model):
    """After an in-memory upcycle, keep Adam moments of parameters that survived
    unchanged (attention, norms, embeddings); new expert stacks start fresh."""
    old_by_name = {n: p for n, p in old_model.named_parameters()}
    for n, p in new_model.named_parameters():
        q = old_by_name.get(n)
        if q is not None and q.shape == p.shape and q in old_opt.state:
            new_opt.state[p] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in old_opt.state[q].items()}


def new_aux_coef(model, cfg):
    """Skywork's adaptive auxiliary-loss coefficients, one per routed layer."""
    return AdaptiveAuxCoef(len(model.routed_layers()), cfg["adaptive_aux_xi"], cfg["adaptive_aux_max"],
                           cfg["adaptive_aux_beta"], alpha_init=cfg["adaptive_aux_max"])


def current_alphas(run, cfg):
    """Auxiliary-loss coefficient per routed layer: adaptive (Skywork) or fixed."""
    if cfg["adaptive_aux"]:
        return list(run.aux_coef.alpha)
    return [cfg["aux_loss_coef"]] * len(run.raw_model.routed_layers())


def save_checkpoint(run, cfg, env, dist, note=""):
    """out_dir/ckpt.pt (atomically): weights, optimizer, RNG and data-generator
    states, and the Skywork alphas, everything an exact resume needs. Every rank
    calls it (dist.full_state may gather expert shards) and rank 0 writes."""
    state = dist.full_state(run.raw_model, run.optimizer)
    if state is None:
        return
    save_dtype = getattr(torch, cfg["save_dtype"])   # the weights only: AdamW's moments stay fp32
    obj = {
        "model_args": asdict(run.raw_model.config),
        "model": {k: v.to(save_dtype) if v.is_floating_point() else v for k, v in state[0].items()},
        "dtype": cfg["save_dtype"],
        "optimizer": state[1],
        "iter_num": run.iter_num,
        "best_val_loss": run.best_val_loss,
        "config": cfg,
        "rng": {"torch": torch.get_rng_state(), "data": run.data_gen.get_state(),
                "cuda": torch.cuda.get_rng_state() if env.device_type == "cuda" else None},
        "aux_coef": run.aux_coef.state_dict() if run.raw_model.routed_layers() else None,
        "upcycled_from": run.upcycled_from,
        "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
    }
    path = checkpoint.save_checkpoint(obj, cfg["out_dir"])
    dist.log(f"saved checkpoint {path}{note}")


def restore_training_state(ckpt, run, device_type, dist):
    """Resume exactly: optimizer moments (this process's part: dist), Skywork alphas,
    the float16 loss scale, and the torch, CUDA and data RNGs, into RunState run."""
    # the checkpoint brings the moments and the alphas; the settings (weight decay, betas,
    # Skywork's xi, alpha_max, beta) are this run's, which may differ from the saved ones
    if ckpt.get("optimizer") is not None:
        saved = dist.local_optimizer_state(ckpt["optimizer"], run.optimizer, run.raw_model)
        settings = [{k: g[k] for k in ("weight_decay", "betas")} for g in run.optimizer.param_groups]
        run.optimizer.load_state_dict(saved)
        for g, keep in zip(run.optimizer.param_groups, settings):
            g.update(keep)
    if ckpt.get("aux_coef") is not None:
        keep = run.aux_coef.xi, run.aux_coef.alpha_max, run.aux_coef.beta
        run.aux_coef.load_state_dict(ckpt["aux_coef"])
        run.aux_coef.xi, run.aux_coef.alpha_max, run.aux_coef.beta = keep
    if ckpt.get("scaler") is not None and run.scaler.is_enabled():   # a float16 run continues its loss scale
        run.scaler.load_state_dict(ckpt["scaler"])
    rng = ckpt.get("rng") or {}
    if "torch" in rng:
        torch.set_rng_state(rng["torch"].cpu())
    if "data" in rng:
        run.data_gen.set_state(rng["data"].cpu())
    if device_type == "cuda" and rng.get("cuda") is not None:
        torch.cuda.set_rng_state(rng["cuda"].cpu())


def stop_not_finite(what, value, run, cfg, dist):
    """A run whose loss (training, every step; or eval) stops being finite ends here:
    one line on stderr, exit status 1, the last good checkpoint left as it is."""
    if dist.master:
        print(f"error: {what} is {'not finite' if value is None else value} at iter {run.iter_num}; stopping. "
              f"The last good checkpoint in {cfg['out_dir']} is kept (lower learning_rate or check the data).",
              file=sys.stderr)
    return 1


# -----------------------------------------------------------------------------

def train(cfg):
    """Train one run as cfg says; returns the exit status (0, or 1 when the loss
    stops being finite)."""
    env, dist = setup_env(cfg)
    data_dir, train_data, val_data = load_data(cfg, dist)
    model_args = upcycle_source_shape(cfg, model_args_from(cfg, train_data.meta["vocab_size"]), dist.log)
    run = start_run(cfg, model_args, env, dist, data_dir, train_data.meta["vocab_size"])
    eval_batches = fixed_eval_batches(train_data, val_data, cfg)
    metrics = open_metrics(cfg, run.iter_num, dist)
    if run.upcycled_from is not None and run.iter_num == 0:
        save_checkpoint(run, cfg, env, dist, " (step-0 upcycled MoE)")
    tokens_per_iter = cfg["batch_size"] * cfg["block_size"] * cfg["gradient_accumulation_steps"]
    dist.log(f"model: {run.raw_model.num_params() / 1e6:.2f}M parameters, "
             f"{run.raw_model.num_params(active=True) / 1e6:.2f}M active; {tokens_per_iter} tokens/iter; "
             f"device {env.device} ({env.dtype}); {dist.world} process(es)")
    gpu_name = torch.cuda.get_device_name(env.device) if env.device_type == "cuda" else None
    window, start_iter = LogWindow(metrics, dist, tokens_per_iter, cfg["block_size"], gpu_name), run.iter_num
    while True:
        if (cfg["dense_warmup_iters"] > 0 and run.iter_num >= cfg["dense_warmup_iters"]
                and model_args["moe_layers"] != "none" and not run.raw_model.config.is_moe):
            upcycle_after_warmup(run, cfg, model_args, env, dist)
        lr = get_lr(run.iter_num, cfg)
        for g in run.optimizer.param_groups:
            g["lr"] = lr

        # ---- evaluation + checkpoint ----
        if run.iter_num % cfg["eval_interval"] == 0 or run.iter_num == cfg["max_iters"]:
            ev = evaluate(run.raw_model, eval_batches, val_data.n_domains, env)
            if not (math.isfinite(ev["val_loss"]) and math.isfinite(ev["train_loss"])):
                return stop_not_finite("eval loss", None, run, cfg, dist)
            metrics.write(eval_record(ev, run, tokens_per_iter))
            dist.log(f"eval iter {run.iter_num}: train {ev['train_loss']:.4f}, val {ev['val_loss']:.4f}")
            if ev["val_loss"] < run.best_val_loss or cfg["always_save_checkpoint"]:
                run.best_val_loss = min(run.best_val_loss, ev["val_loss"])
                if run.iter_num > start_iter:   # nothing new to save at the start
                    window.close(run.raw_model, run.iter_num, current_alphas(run, cfg))
                    save_checkpoint(run, cfg, env, dist)
        if run.iter_num >= cfg["max_iters"]:
            break

        # ---- one optimizer step (the only part a log line times) ----
        t0 = time.time()
        batches = get_batch(train_data, cfg, env, dist, run.data_gen)
        loss, demand, drops = forward_backward(run, batches, cfg, env, dist, current_alphas(run, cfg), window.stats)
        loss = dist.mean(loss)   # the global batch's loss, not this rank's share
        if not math.isfinite(loss):
            return stop_not_finite("loss", loss, run, cfg, dist)
        dist.clip_and_step(run.raw_model, run.optimizer, run.scaler, cfg["grad_clip"])
        update_balancing(run, demand, drops, cfg, dist)
        window.add(loss, time.time() - t0, lr)
        run.iter_num += 1
        if run.iter_num % cfg["log_interval"] == 0:
            window.close(run.raw_model, run.iter_num, current_alphas(run, cfg))

    window.close(run.raw_model, run.iter_num, current_alphas(run, cfg))
    save_checkpoint(run, cfg, env, dist, " (final)")
    metrics.close()
    dist.close()
    return 0


def main(argv):
    try:
        cfg = parse_config(argv, DEFAULTS)
        check_run_config(cfg, DEFAULTS)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", 0)) != 0:   # DDP: rank 0 holds the out_dir lock for all
        return train_reporting_errors(cfg)
    try:
        with OutDirLock(cfg["out_dir"], "train.py " + " ".join(argv)) as lock:
            if lock.stale:
                print(f"warning: took over the lock of a run that ended without releasing it ({lock.stale})",
                      file=sys.stderr)
            return train_reporting_errors(cfg)
    except LockError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def train_reporting_errors(cfg):
    """train(cfg) with bad input as one line on stderr and exit status 2; a checkpoint
    refused for a non-finite number stops the run like a non-finite loss, and so does
    a collective that lost another rank (exit 1, one line)."""
    try:
        return train(cfg)
    except NonFiniteCheckpointError as e:
        print(f"error: {e}; stopping (lower learning_rate or check the data)", file=sys.stderr)
        return 1
    except (ConfigError, ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if not parallel.lost_peer(e):
            raise
        print(f"error: rank {os.environ.get('RANK', 0)} lost another process of this run "
              f"({str(e).splitlines()[0][:200]}); stopping. The last checkpoint in {cfg['out_dir']} is kept.",
              file=sys.stderr)
        return 1


RUN_ONLY_KEYS = ("out_dir", "overwrite", "device", "compile", "backend", "expert_parallel")   # do not change the result


def finished_run(out_dir, cfg):
    """True when out_dir holds the final checkpoint (iter max_iters) of a run with the
    settings cfg (runtime-only keys aside). demo.py and experiments.py reuse such
    runs; anything else (another shape, a smoke run, an unfinished run) is retrained."""
    try:
        ckpt = load_checkpoint(out_dir)
    except CheckpointError:
        return False
    saved = ckpt.get("config") or {}
    return ckpt.get("iter_num") == cfg["max_iters"] and all(   # a key added since ran at its default
        saved.get(k, DEFAULTS.get(k)) == v for k, v in cfg.items() if k not in RUN_ONLY_KEYS)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
