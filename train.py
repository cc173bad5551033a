"""
Train a dense or MoE model, from scratch, from a checkpoint, or by upcycling a
dense checkpoint online (the "Llama 3 meets MoE" workflow).

    python train.py                                   # defaults below, CPU or GPU
    python train.py config/dense_small.py --max_iters=500
    python train.py config/moe_small.py --device=cpu
    python train.py --init_from=resume --out_dir=out/dense
    python train.py config/upcycle_8x2.py             # init_from=<dense out_dir>: upcycle in memory
    torchrun --standalone --nproc_per_node=2 train.py config/dense_small.py

Every default lives in the block below; a config file (plain Python assigning
these names) and then --key=value arguments override them. Model keys are the
fields of model.GPTConfig and share this namespace.
"""
import ast
import difflib
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
from checkpoint import CheckpointError, load_checkpoint, load_weights
from cli import device_problem
from data.dataset import TokenDataset
from data.similarity import ensure_similarity_order
from kernels import auto_impl
from metrics import METRICS_FILE, MetricsWriter, trim_for_resume
from model import GPT, GPTConfig, MoEFFN
from router import AdaptiveAuxCoef, Routing
from upcycle import (check_upcycle_options, dense_ffn_weights, mean_pairwise_similarity, similarity_to_dense,
                     upcycle_from_checkpoint, upcycle_model)

# -----------------------------------------------------------------------------
# defaults: I/O
out_dir = "out/dense"
init_from = "scratch"        # 'scratch' | 'resume' | path of a dense out_dir to upcycle online
eval_interval = 100
eval_iters = 20              # fixed val batches per evaluation
log_interval = 10
always_save_checkpoint = True  # save at every eval (needed for exact resume), not only on improvement
overwrite = False            # a new run may replace an existing out_dir/ckpt.pt only with this set
seed = 1337
# data
dataset = "multidomain"      # data/<dataset>/ (prepared by data/<dataset>/prepare.py)
data_dir = ""                # explicit data directory; "" -> data/<dataset>
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
compile = False
backend = "auto"             # DDP backend: nccl on CUDA, gloo on CPU
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in dict(globals()).items()
            if not k.startswith("_") and isinstance(v, (int, float, bool, str, type(None)))}
OPTIONAL_FLOATS = {"gate_norm_lambda"}   # None or a number


class ConfigError(Exception):
    pass


def parse_config(argv, defaults=DEFAULTS):
    """Apply config files and --key=value overrides to the defaults.
    Unknown keys and wrongly typed values raise ConfigError (one line)."""
    cfg = dict(defaults)

    def check(key, value, where):
        if key not in defaults:
            close = difflib.get_close_matches(key, defaults, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown config key '{key}' in {where}{hint}")
        want = defaults[key]
        if key in OPTIONAL_FLOATS:
            if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
                return None if value is None else float(value)
            raise ConfigError(f"config key '{key}' expects a number or None, got {value!r} in {where}")
        if isinstance(want, bool) or isinstance(value, bool):
            if type(value) is not type(want):
                raise ConfigError(f"config key '{key}' expects {type(want).__name__}, got {value!r} in {where}")
            return value
        if isinstance(want, float) and isinstance(value, int):
            return float(value)
        if type(value) is not type(want):
            raise ConfigError(f"config key '{key}' expects {type(want).__name__}, got {value!r} in {where}")
        return value

    for arg in argv:
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                raise ConfigError(f"config file {arg} not found (expected a .py file under config/ or --key=value)")
            scope = {}

            def run_file(path):
                """Run a config file into scope; include(name) inside it runs another
                config file first, relative to the including file (configs build on
                each other)."""
                here = os.path.dirname(os.path.abspath(path))
                include = lambda name: run_file(os.path.join(here, name))   # noqa: E731
                exec(open(path).read(), {"include": include}, scope)
            try:
                run_file(arg)
            except Exception as e:
                raise ConfigError(f"config file {arg} failed to run: {type(e).__name__}: {e}") from None
            for k, v in scope.items():
                if not k.startswith("_") and not callable(v) and not isinstance(v, type(os)):
                    cfg[k] = check(k, v, arg)
        else:
            if "=" not in arg:
                raise ConfigError(f"argument {arg} must look like --key=value")
            key, val = arg[2:].split("=", 1)
            if isinstance(defaults.get(key), str):
                value = val   # a string key takes the text as it is (--moe_layers=1,3, --out_dir=...)
            else:
                try:
                    value = ast.literal_eval(val)
                except (SyntaxError, ValueError):
                    value = val   # a bare string: check() names the expected type
            cfg[key] = check(key, value, "command line")
    return cfg


# -----------------------------------------------------------------------------
# small helpers used by main() (and by tests)

def model_args_from(cfg, vocab_size):
    args = {f.name: cfg[f.name] for f in fields(GPTConfig) if f.name in cfg}
    args["vocab_size"] = vocab_size
    return args


# model keys that may differ between a checkpoint and the run that resumes it
RUNTIME_MODEL_KEYS = ("capacity_factor", "eval_capacity_factor", "drop_policy", "expert_impl", "dropout")


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


def aux_total(routings, cfg, alphas):
    """sum_l alpha_l * L_aux_l + z_coef * sum_l L_z_l over routed MoE layers."""
    total = 0.0
    for l, r in enumerate(r for r in routings if isinstance(r, Routing)):
        if cfg["aux_loss"] != "none":
            total = total + alphas[l] * r.aux_losses[cfg["aux_loss"]]
        if cfg["z_loss_coef"] > 0:
            total = total + cfg["z_loss_coef"] * r.aux_losses["z"]
    return total


class StatsAccumulator:
    """Averages per-layer routing statistics over the micro-steps of a log interval
    (training steps only)."""

    def __init__(self):
        self.sums, self.n = {}, 0

    def add(self, routings):
        self.n += 1
        for l, r in enumerate(routings):
            if isinstance(r, Routing):
                items = dict(r.stats)
                items.update({f"loss_{k}": v.detach() for k, v in r.aux_losses.items()})
            else:
                items = dict(r["stats"])
            for k, v in items.items():
                v = v.detach().float().cpu() if torch.is_tensor(v) else torch.tensor(float(v))
                key = (l, k)
                self.sums[key] = self.sums[key] + v if key in self.sums else v.clone()

    def layers(self):
        out = {}
        for (l, k), v in self.sums.items():
            v = v / self.n
            out.setdefault(l, {})[k] = v.tolist() if v.dim() else round(float(v), 6)
        self.sums, self.n = {}, 0
        return [out[l] for l in sorted(out)]


# -----------------------------------------------------------------------------
# checking the settings

AUX_LOSSES = ("switch", "skywork", "none")
AT_LEAST = {"batch_size": 1, "eval_iters": 1, "eval_interval": 1, "log_interval": 1,
            "gradient_accumulation_steps": 1, "max_iters": 0, "warmup_iters": 0, "lr_decay_iters": 0,
            "dense_warmup_iters": 0, "upcycle_granularity": 1}


def check_run_config(cfg):
    """The training settings that GPTConfig.validate does not see, checked before
    anything is read or written (one-line ConfigError)."""
    for key, low in AT_LEAST.items():
        if cfg[key] < low:
            raise ConfigError(f"{key}={cfg[key]} must be >= {low}")
    if not cfg["learning_rate"] > 0 or cfg["min_lr"] < 0:
        raise ConfigError(f"learning_rate={cfg['learning_rate']} must be > 0 and min_lr={cfg['min_lr']} >= 0")
    for key in ("beta1", "beta2"):
        if not 0 <= cfg[key] < 1:
            raise ConfigError(f"{key}={cfg[key]} must be in [0, 1) (AdamW momentum)")
    for key in ("weight_decay", "grad_clip", "aux_loss_coef", "z_loss_coef", "expert_bias_gamma",
                "upcycle_expert_noise", "adaptive_aux_max"):
        if cfg[key] < 0:
            raise ConfigError(f"{key}={cfg[key]} must be >= 0")
    if cfg["aux_loss"] not in AUX_LOSSES:
        raise ConfigError(f"aux_loss={cfg['aux_loss']!r} must be one of {', '.join(AUX_LOSSES)}")
    if cfg["device"] != "auto" and device_problem(cfg["device"]):
        raise ConfigError(f"device={cfg['device']!r} {device_problem(cfg['device'])}")


# -----------------------------------------------------------------------------
# the steps of train(), in the order it calls them

@dataclass
class Env:
    """Where this process runs: its rank among the DDP processes and its device."""
    ddp: bool
    rank: int
    local_rank: int
    world: int
    device: str
    device_type: str      # 'cuda' | 'mps' | 'cpu'
    dtype: str            # 'float32' | 'bfloat16' | 'float16'
    autocast: object      # context manager for forward passes
    accum: int            # micro-steps per process per optimizer step

    @property
    def master(self):
        return self.rank == 0

    def log(self, *args):
        if self.master:
            print(*args)


def resolve_device(name):
    """'auto' -> cuda, then mps, then cpu; anything else as it is."""
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else "cpu"


def setup_distributed(cfg):
    """(ddp, rank, local_rank, world, device). torchrun sets RANK/WORLD_SIZE; then
    each process joins the process group and, on CUDA, takes GPU local_rank."""
    device = resolve_device(cfg["device"])
    if int(os.environ.get("RANK", -1)) == -1:
        return False, 0, 0, 1, device
    backend = cfg["backend"] if cfg["backend"] != "auto" else ("nccl" if device.startswith("cuda") else "gloo")
    dist.init_process_group(backend=backend)
    rank, local_rank, world = dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size()
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if cfg["gradient_accumulation_steps"] % world:
        raise ConfigError(f"gradient_accumulation_steps={cfg['gradient_accumulation_steps']} must be a multiple "
                          f"of the number of processes ({world})")
    return True, rank, local_rank, world, device


def setup_env(cfg):
    """The process's Env: distributed setup, device, precision, seed."""
    ddp, rank, local_rank, world, device = setup_distributed(cfg)
    cfg["device"] = device
    device_type = "cuda" if device.startswith("cuda") else ("mps" if device.startswith("mps") else "cpu")
    dtype = cfg["dtype"] if cfg["dtype"] != "auto" else ("bfloat16" if device_type == "cuda" else "float32")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype={dtype!r} must be 'auto', 'float32', 'bfloat16' or 'float16'")
    autocast = nullcontext() if dtype == "float32" else torch.autocast(device_type=device_type, dtype=getattr(torch, dtype))
    torch.manual_seed(cfg["seed"])
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Env(ddp, rank, local_rank, world, device, device_type, dtype, autocast,
               accum=cfg["gradient_accumulation_steps"] // world)


def load_data(cfg, env):
    """(data_dir, train split, val split). Lory's similarity order is built here on
    first use (by the master process; the others wait for it)."""
    data_dir = cfg["data_dir"] or os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", cfg["dataset"])
    if cfg["batching"] == "similarity":
        if env.master:
            ensure_similarity_order(data_dir)
        if env.ddp:
            dist.barrier()
    return data_dir, TokenDataset(data_dir, "train", batching=cfg["batching"]), TokenDataset(data_dir, "val")


def get_batch(train_data, cfg, env, data_gen):
    """One optimizer step's global batch, drawn identically on every rank; this
    rank takes micro-batches m*world + rank. The data a step sees therefore does
    not depend on the number of processes (1 process with accumulation 2 sees the
    same samples as 2 processes with accumulation 1). Yields (x, y), each (B, T)."""
    B, T = cfg["batch_size"], cfg["block_size"]
    x, y = train_data.get_batch(B * env.accum * env.world, T, data_gen)
    for m in range(env.accum):
        s = (m * env.world + env.rank) * B
        xb, yb = x[s:s + B], y[s:s + B]
        if env.device_type == "cuda":
            xb, yb = xb.pin_memory().to(env.device, non_blocking=True), yb.pin_memory().to(env.device, non_blocking=True)
        else:
            xb, yb = xb.to(env.device), yb.to(env.device)
        yield xb, yb


def check_new_run(cfg, target_args):
    """Before out_dir is touched: a new run must not replace a checkpoint unasked,
    and its model shape (and Lory's later upcycle) must be possible."""
    if cfg["init_from"] == "resume":
        return
    if os.path.exists(os.path.join(cfg["out_dir"], "ckpt.pt")) and not cfg["overwrite"]:
        raise ConfigError(f"{cfg['out_dir']} already holds a checkpoint: continue it with --init_from=resume, "
                          f"start over with --overwrite=True, or choose another --out_dir")
    GPTConfig(**target_args)                     # an impossible shape fails here
    if target_args["moe_layers"] != "none" and cfg["init_from"] == "scratch" and cfg["dense_warmup_iters"]:
        check_upcycle_options(upcycle_options(cfg, target_args))   # Lory: the upcycle after the warm-up must work


def model_with_runtime_keys(model_args, target_args):
    """A saved model's shape with this run's runtime settings (RUNTIME_MODEL_KEYS)."""
    args = dict(model_args)
    for k in RUNTIME_MODEL_KEYS:
        args[k] = target_args[k]
    return GPT(GPTConfig(**args))


def build_model(cfg, target_args, env):
    """The model on the CPU, from one of its origins:
      scratch        a new model (Lory with dense_warmup_iters: the dense shape first, Lory section 3.5)
      resume         out_dir/ckpt.pt; returns that checkpoint too, to restore the optimizer and RNGs
      <dense dir>    with moe_layers='none': warm start (weights only, fresh optimizer and schedule)
      <dense dir>    with MoE layers: online upcycling in memory (Llama 3 meets MoE)
    Returns (model, resume checkpoint or None, upcycled_from or None)."""
    init = cfg["init_from"]
    if init == "scratch":
        args = dict(target_args)
        if cfg["dense_warmup_iters"] > 0:
            args["moe_layers"] = "none"
        return GPT(GPTConfig(**args)), None, None
    if init == "resume":
        ckpt = load_checkpoint(cfg["out_dir"], map_location=env.device)
        model = model_with_runtime_keys(ckpt["model_args"], target_args)
        load_weights(model, ckpt["model"], cfg["out_dir"])
        env.log(f"resuming from {cfg['out_dir']} at iter {ckpt.get('iter_num', 0)}")
        return model, ckpt, ckpt.get("upcycled_from")
    if os.path.abspath(init) == os.path.abspath(cfg["out_dir"]):
        raise ConfigError(f"init_from={init} and out_dir must differ (use init_from='resume' to continue a run)")
    if target_args["moe_layers"] == "none":
        src = load_checkpoint(init, map_location="cpu")
        model = model_with_runtime_keys(src["model_args"], target_args)
        load_weights(model, src["model"], init)
        env.log(f"warm start from {init} (iter {src.get('iter_num', '?')}): fresh optimizer and schedule")
        return model, None, None
    model, upcycled_from = upcycle_from_checkpoint(init, upcycle_options(cfg, target_args), device="cpu")
    env.log(f"upcycled {init} -> {model.config.n_experts} experts top-{model.config.top_k} in memory "
            f"({upcycled_from['options'].get('function_preserving', '?')} function preservation)")
    return model, None, upcycled_from


def check_model_fits_data(model, cfg, vocab_size, data_dir):
    if model.config.vocab_size != vocab_size:
        raise ConfigError(f"model vocab_size={model.config.vocab_size} differs from {data_dir} "
                          f"vocab_size={vocab_size}: prepare the data with the tokenizer the model used")
    if model.config.block_size < cfg["block_size"]:
        raise ConfigError(f"block_size={cfg['block_size']} exceeds the model's block_size={model.config.block_size}")


def routed_ffns(model):
    """The routed (token-choice) MoE FFNs of a model, in layer order."""
    return [f for _, f in model.moe_layers() if isinstance(f, MoEFFN)]


def n_routed(model):
    return len(routed_ffns(model))


def new_aux_coef(model, cfg):
    """Skywork's adaptive auxiliary-loss coefficients, one per routed layer."""
    return AdaptiveAuxCoef(n_routed(model), cfg["adaptive_aux_xi"], cfg["adaptive_aux_max"],
                           cfg["adaptive_aux_beta"], alpha_init=cfg["adaptive_aux_max"])


def restore_training_state(ckpt, optimizer, aux_coef, data_gen, device_type):
    """Resume exactly: optimizer moments, Skywork alphas, and the torch, CUDA and data RNGs."""
    if ckpt.get("optimizer") is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("aux_coef") is not None:
        aux_coef.load_state_dict(ckpt["aux_coef"])
    rng = ckpt.get("rng") or {}
    if "torch" in rng:
        torch.set_rng_state(rng["torch"].cpu())
    if "data" in rng:
        data_gen.set_state(rng["data"].cpu())
    if device_type == "cuda" and rng.get("cuda") is not None:
        torch.cuda.set_rng_state(rng["cuda"].cpu())


def log_expert_kernel(model, env):
    if model.config.is_moe and routed_ffns(model):
        impl = model.config.expert_impl
        name, why = auto_impl(torch.device(env.device), getattr(torch, env.dtype)) if impl == "auto" else (impl, "forced")
        env.log(f"expert kernel: {name} ({why})")


def wrap_model(raw_model, cfg, env):
    """What the training step calls: the model, compiled and/or wrapped in DDP (which
    averages the gradients across processes during backward)."""
    model = torch.compile(raw_model) if cfg["compile"] else raw_model
    if env.ddp:
        model = DDP(model, device_ids=[env.local_rank] if env.device_type == "cuda" else None)
    return model


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


def upcycle_after_warmup(st, cfg, target_args, env):
    """Lory's dense warm-up ends: upcycle the dense model in memory, keep the Adam
    moments of the parameters that survive, and start fresh ones for the experts."""
    old_model, old_opt = st.raw_model, st.optimizer
    st.raw_model = upcycle_model(old_model, upcycle_options(cfg, target_args)).to(env.device)
    st.dense_ffns = {l: tuple(getattr(old_model.blocks[l].ffn, m).weight.detach().cpu().clone()
                              for m in ("gate_proj", "up_proj", "down_proj")) for l, _ in st.raw_model.moe_layers()}
    st.optimizer = make_optimizer(st.raw_model, cfg, env.device_type)
    carry_optimizer_state(old_opt, old_model, st.optimizer, st.raw_model)
    st.aux_coef = new_aux_coef(st.raw_model, cfg)
    st.upcycled_from = {"path": None, "sha256": None, "method": "dense warm-up",
                        "options": upcycle_options(cfg, target_args), "iter": st.iter_num}
    st.model = wrap_model(st.raw_model, cfg, env)
    env.log(f"dense warm-up done at iter {st.iter_num}: upcycled to {st.raw_model.config.n_experts} experts")


@torch.no_grad()
def evaluate(raw_model, eval_batches, n_domains, env):
    """Mean loss over the fixed train/val batches; for MoE also per-domain expert
    usage (routed: fraction of each domain's tokens per expert; Lory: mean merge
    weights of the segments whose last token is in the domain).
    eval_batches: {"train": [...], "val": [...]} of (x, y, domains_y), each (B, T)."""
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


def eval_record(ev, st, tokens_per_iter):
    """The metrics.jsonl record of one evaluation (plus the expert-similarity monitor
    for upcycled MoE models)."""
    rec = {"iter": st.iter_num, "tokens": st.iter_num * tokens_per_iter, "split": "eval",
           "train_loss": ev["train_loss"], "val_loss": ev["val_loss"]}
    if "domain_usage" in ev:
        rec["domain_usage"] = ev["domain_usage"]
    if st.upcycled_from is not None and st.raw_model.config.is_moe:
        rec.update(expert_similarity_record(st.raw_model, st.dense_ffns))
    return rec


def save_checkpoint(st, cfg, env, note=""):
    """out_dir/ckpt.pt (atomically): weights, optimizer, RNG and data-generator
    states, and the Skywork alphas, everything an exact resume needs."""
    obj = {
        "model_args": asdict(st.raw_model.config),
        "model": st.raw_model.state_dict(),
        "optimizer": st.optimizer.state_dict(),
        "iter_num": st.iter_num,
        "best_val_loss": st.best_val_loss,
        "config": cfg,
        "rng": {"torch": torch.get_rng_state(), "data": st.data_gen.get_state(),
                "cuda": torch.cuda.get_rng_state() if env.device_type == "cuda" else None},
        "aux_coef": st.aux_coef.state_dict() if n_routed(st.raw_model) else None,
        "upcycled_from": st.upcycled_from,
    }
    path = checkpoint.save_checkpoint(obj, cfg["out_dir"])
    env.log(f"saved checkpoint {path}{note}")


def forward_backward(st, batches, cfg, env, alphas, stats):
    """Forward and backward over this step's micro-batches, gradients accumulated;
    with DDP the gradients are averaged across processes in the last micro-step's
    backward only. Returns (mean loss, per-layer demand per expert summed over the
    micro-batches, per-layer adaptive drop rate averaged over them). Both are what
    update_balancing needs: the demand is the load the router assigned before
    capacity dropping (DeepSeek-V3 balances it), and the adaptive drop rate is the
    real one, or capacity factor 1's when dropless (router.AdaptiveAuxCoef)."""
    step_loads, step_drops, lossf = None, None, 0.0
    for m, (X, Y) in enumerate(batches):
        if env.ddp:
            st.model.require_backward_grad_sync = (m == env.accum - 1)
        with env.autocast:
            _, loss, routings = st.model(X, Y)
            total = (loss + aux_total(routings, cfg, alphas)) / env.accum
        st.scaler.scale(total).backward()
        lossf += loss.item() / env.accum
        stats.add(routings)
        routed_r = [r for r in routings if isinstance(r, Routing)]
        loads = [r.stats["demand_per_expert"] for r in routed_r]
        drops = [float(r.stats["adaptive_drop_rate"]) / env.accum for r in routed_r]
        step_loads = loads if step_loads is None else [a + b for a, b in zip(step_loads, loads)]
        step_drops = drops if step_drops is None else [a + b for a, b in zip(step_drops, drops)]
    return lossf, step_loads, step_drops


def all_reduce_sum(values, env):
    """(n,) float32 tensor: the sum over DDP processes of a list of floats."""
    t = torch.tensor(values, device=env.device)
    dist.all_reduce(t)
    return t


def optimizer_step(st, cfg):
    """Clip the global gradient norm, step, zero the gradients."""
    if cfg["grad_clip"] > 0:
        st.scaler.unscale_(st.optimizer)
        torch.nn.utils.clip_grad_norm_(st.raw_model.parameters(), cfg["grad_clip"])
    st.scaler.step(st.optimizer)
    st.scaler.update()
    st.optimizer.zero_grad(set_to_none=True)


def update_balancing(st, step_loads, step_drops, cfg, env):
    """After the step, from training statistics only: the sigmoid router's aux-free
    bias (DeepSeek-V3) from the step's demand per expert (before capacity dropping),
    and Skywork's adaptive alphas from its adaptive drop rates (capacity factor 1's
    when dropless), both summed over processes so every rank holds the same state."""
    if not step_loads:
        return
    if env.ddp:
        for t in step_loads:
            dist.all_reduce(t)
    for ffn, load in zip(routed_ffns(st.raw_model), step_loads):
        if ffn.router.router_type == "sigmoid":
            ffn.router.update_expert_bias(load, cfg["expert_bias_gamma"])
    if cfg["adaptive_aux"]:
        st.aux_coef.update((all_reduce_sum(step_drops, env) / env.world).tolist() if env.ddp else step_drops)


def current_alphas(st, cfg):
    """Auxiliary-loss coefficient per routed layer: adaptive (Skywork) or fixed."""
    return list(st.aux_coef.alpha) if cfg["adaptive_aux"] else [cfg["aux_loss_coef"]] * n_routed(st.raw_model)


def train_record(st, loss, lr, dt, tokens_per_iter, world, gpu_name, stats, cfg):
    """(metrics.jsonl record, console line) of one log interval: mean loss, speed,
    MFU, and the interval's mean routing statistics per MoE layer.
    dt: mean seconds of one training step (evals and checkpoint saves excluded);
    tokens_per_iter: the step's global tokens over `world` processes. tok_per_s is
    global; MFU is per device (model.GPT.throughput), with the attention FLOPs at
    the training sequence length block_size."""
    thr = st.raw_model.throughput(tokens_per_iter, dt, world, cfg["block_size"], gpu_name)
    tok_s, mfu = thr["tok_per_s"], thr.get("mfu")
    rec = {"iter": st.iter_num, "tokens": st.iter_num * tokens_per_iter, "split": "train",
           "loss": loss, "lr": lr, "ms_per_iter": dt * 1000, "tok_per_s": tok_s,
           "tok_per_s_per_device": thr["tok_per_s_per_device"]}
    if mfu is not None:
        rec["mfu"] = mfu
    line = (f"iter {st.iter_num}: loss {loss:.4f}, lr {lr:.2e}, {dt * 1000:.0f} ms/iter, "
            f"{tok_s:,.0f} tok/s (global)" + (f", MFU {mfu * 100:.1f}%" if mfu is not None else ""))
    layers = stats.layers()
    if layers:
        if n_routed(st.raw_model):
            rec["alpha"] = current_alphas(st, cfg)
        rec["moe"] = layers
        line += moe_summary(layers)
    return rec, line


def stop_not_finite(what, value, st, cfg, env):
    env.log(f"error: {what} is {'not finite' if value is None else value} at iter {st.iter_num}; stopping. "
            f"The last good checkpoint in {cfg['out_dir']} is kept (lower learning_rate or check the data).")
    return 1


# -----------------------------------------------------------------------------

def train(cfg):
    """Train one run as cfg says; returns the exit status (0, or 1 when the loss
    stops being finite)."""
    env = setup_env(cfg)
    data_dir, train_data, val_data = load_data(cfg, env)
    vocab_size = train_data.meta["vocab_size"]
    data_gen = torch.Generator().manual_seed(cfg["seed"])   # same stream on every rank: see get_batch

    # ---- model: scratch, resume, warm start or online upcycling ----
    target_args = model_args_from(cfg, vocab_size)
    check_new_run(cfg, target_args)
    if env.master:
        os.makedirs(cfg["out_dir"], exist_ok=True)
    raw_model, ckpt, upcycled_from = build_model(cfg, target_args, env)
    dense_ffns = source_ffns(upcycled_from, raw_model)
    check_model_fits_data(raw_model, cfg, vocab_size, data_dir)
    raw_model.to(env.device)
    optimizer = make_optimizer(raw_model, cfg, env.device_type)
    st = RunState(raw_model, raw_model, optimizer, torch.amp.GradScaler(enabled=(env.dtype == "float16")),
                  new_aux_coef(raw_model, cfg), data_gen, upcycled_from=upcycled_from, dense_ffns=dense_ffns)
    if ckpt is not None:
        restore_training_state(ckpt, st.optimizer, st.aux_coef, data_gen, env.device_type)
        st.iter_num, st.best_val_loss = ckpt.get("iter_num", 0), ckpt.get("best_val_loss", 1e9)
        ckpt = None   # free memory
    if env.master:
        log_expert_kernel(raw_model, env)
    st.model = wrap_model(raw_model, cfg, env)

    # fixed evaluation batches: comparable across runs and steps
    eval_batches = {"train": train_data.fixed_batches(cfg["eval_iters"], cfg["batch_size"], cfg["block_size"], seed=4321),
                    "val": val_data.fixed_batches(cfg["eval_iters"], cfg["batch_size"], cfg["block_size"], seed=1234)}
    path = os.path.join(cfg["out_dir"], METRICS_FILE)
    if env.master and cfg["init_from"] == "resume":
        trim_for_resume(path, st.iter_num)
    metrics = MetricsWriter(path, append=cfg["init_from"] == "resume", enabled=env.master)
    if st.upcycled_from is not None and st.iter_num == 0 and env.master:
        save_checkpoint(st, cfg, env, " (step-0 upcycled MoE)")

    tokens_per_iter = cfg["batch_size"] * cfg["block_size"] * cfg["gradient_accumulation_steps"]
    env.log(f"model: {raw_model.num_params() / 1e6:.2f}M parameters, {raw_model.num_params(active=True) / 1e6:.2f}M "
            f"active; {tokens_per_iter} tokens/iter; device {env.device} ({env.dtype}); {env.world} process(es)")
    gpu_name = torch.cuda.get_device_name(env.device) if env.device_type == "cuda" else None
    stats = StatsAccumulator()
    start_iter = st.iter_num
    step_time, loss_sum, n_steps = 0.0, 0.0, 0   # step_time: seconds in training steps only
    while True:
        if (cfg["dense_warmup_iters"] > 0 and st.iter_num >= cfg["dense_warmup_iters"]
                and target_args["moe_layers"] != "none" and not st.raw_model.config.is_moe):
            upcycle_after_warmup(st, cfg, target_args, env)
        lr = get_lr(st.iter_num, cfg)
        for g in st.optimizer.param_groups:
            g["lr"] = lr

        # ---- evaluation + checkpoint ----
        if st.iter_num % cfg["eval_interval"] == 0 or st.iter_num == cfg["max_iters"]:
            ev = evaluate(st.raw_model, eval_batches, val_data.n_domains, env)
            if not (math.isfinite(ev["val_loss"]) and math.isfinite(ev["train_loss"])):
                return stop_not_finite("eval loss", None, st, cfg, env)
            metrics.write(eval_record(ev, st, tokens_per_iter))
            env.log(f"eval iter {st.iter_num}: train {ev['train_loss']:.4f}, val {ev['val_loss']:.4f}")
            if ev["val_loss"] < st.best_val_loss or cfg["always_save_checkpoint"]:
                st.best_val_loss = min(st.best_val_loss, ev["val_loss"])
                if st.iter_num > start_iter and env.master:   # nothing new to save at the start
                    save_checkpoint(st, cfg, env)
        if st.iter_num >= cfg["max_iters"]:
            break

        # ---- one optimizer step (the only part a log line times) ----
        t0 = time.time()
        batches = get_batch(train_data, cfg, env, st.data_gen)
        lossf, step_loads, step_drops = forward_backward(st, batches, cfg, env, current_alphas(st, cfg), stats)
        if env.ddp:   # log the global batch's loss, not this rank's share
            lossf = all_reduce_sum([lossf], env).item() / env.world
        if not math.isfinite(lossf):
            return stop_not_finite("loss", lossf, st, cfg, env)
        optimizer_step(st, cfg)
        update_balancing(st, step_loads, step_drops, cfg, env)
        step_time += time.time() - t0

        loss_sum, n_steps, st.iter_num = loss_sum + lossf, n_steps + 1, st.iter_num + 1
        if st.iter_num % cfg["log_interval"] == 0 and env.master:
            rec, line = train_record(st, loss_sum / n_steps, lr, step_time / n_steps, tokens_per_iter, env.world,
                                     gpu_name, stats, cfg)
            metrics.write(rec)
            env.log(line)
            step_time, loss_sum, n_steps = 0.0, 0.0, 0

    if env.master:
        save_checkpoint(st, cfg, env, " (final)")
    metrics.close()
    if env.ddp:
        dist.destroy_process_group()
    return 0


def main(argv):
    try:
        cfg = parse_config(argv)
        check_run_config(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return train(cfg)
    except (ConfigError, ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


# -----------------------------------------------------------------------------
# helpers of the steps above (and of demo.py, experiments.py and the tests)

def source_ffns(upcycled_from, model):
    """{layer: (W1, W3, W2)} of the dense checkpoint an upcycled model came from,
    or {} when the source is unknown or gone."""
    path = (upcycled_from or {}).get("path")
    if not path or not os.path.exists(path):
        return {}
    try:
        state = load_checkpoint(path)["model"]
    except CheckpointError:
        return {}
    return {l: dense_ffn_weights(state, l) for l, _ in model.moe_layers()
            if f"blocks.{l}.ffn.gate_proj.weight" in state}


def upcycle_options(cfg, target_args):
    """What the upcycler needs: the target MoE shape and the upcycling options."""
    return {"model_args": target_args, "granularity": cfg["upcycle_granularity"],
            "weight_scaling": cfg["upcycle_weight_scaling"], "expert_noise": cfg["upcycle_expert_noise"],
            "seed": cfg["upcycle_seed"]}


def domain_usage(routings, dom, n_dom, usage, shape):
    """Accumulate per-layer (n_domains, E) expert usage for one eval batch.
    dom: (B, T) domain of each target token (the input token at the same position
    belongs to the same document except at document boundaries)."""
    B, T = shape
    dom = dom.reshape(-1).cpu()
    out = usage or [None] * len(routings)
    for l, r in enumerate(routings):
        if isinstance(r, Routing):
            E = r.stats["tokens_per_expert"].numel()
            m = torch.zeros(n_dom, E)
            m.index_put_((dom[r.token_idx.cpu()], r.expert_idx.cpu()), torch.ones(r.token_idx.numel()), accumulate=True)
        else:
            w = r["merge_weights"].float().cpu()                          # (B, S, E)
            S, E = w.shape[1], w.shape[2]
            seg_dom = dom.view(B, S, -1)[:, :, -1].reshape(-1)            # domain at each segment's end
            m = torch.zeros(n_dom, E).index_add_(0, seg_dom, w.reshape(-1, E))
        out[l] = m if out[l] is None else out[l] + m
    return out


def expert_similarity_record(model, dense_ffns):
    """Per MoE layer of an upcycled model: mean pairwise cosine similarity of the
    experts that started as copies, and each expert's similarity to the dense FFN it
    came from (Skywork / He et al. monitor: it falls as experts specialise; the run
    whose experts stay most similar is worst). A fine-grained upcycle (G shards per
    dense FFN) only copies shard e mod G, so the mean is over same-shard pairs
    (upcycle.mean_pairwise_similarity): 1.0 right after a noiseless upcycle."""
    G = model.config.ffn_hidden // model.config.expert_hidden
    rec = {"expert_similarity": [round(mean_pairwise_similarity(f, G), 6) for _, f in model.moe_layers()]}
    if dense_ffns:
        rec["similarity_to_dense"] = [[round(v, 6) for v in similarity_to_dense(f, dense_ffns[l]).tolist()]
                                      for l, f in model.moe_layers() if l in dense_ffns]
    return rec


RUN_ONLY_KEYS = ("out_dir", "overwrite", "device", "compile", "backend")   # do not change the result


def finished_run(out_dir, cfg):
    """True when out_dir holds the final checkpoint (iter max_iters) of a run with the
    settings cfg (runtime-only keys aside). demo.py and experiments.py reuse such
    runs; anything else (another shape, a smoke run, an unfinished run) is retrained."""
    try:
        ckpt = load_checkpoint(out_dir)
    except CheckpointError:
        return False
    saved = ckpt.get("config") or {}
    return ckpt.get("iter_num") == cfg["max_iters"] and all(
        saved.get(k) == v for k, v in cfg.items() if k not in RUN_ONLY_KEYS)


def moe_summary(layers):
    """Compact MoE part of the log line: worst layer's max/min load and mean drop rate."""
    parts = []
    loads = [l["tokens_per_expert"] for l in layers if "tokens_per_expert" in l]
    if loads:
        ratio = max(max(x) / max(min(x), 1e-9) for x in loads)
        drop = np.mean([l["drop_rate"] for l in layers if "drop_rate" in l])
        parts.append(f"load max/min {ratio:.1f}, drop {drop * 100:.1f}%")
    ent = [l["merge_entropy"] for l in layers if "merge_entropy" in l]
    if ent:
        parts.append(f"merge entropy {np.mean(ent):.2f}")
    return (" | " + ", ".join(parts)) if parts else ""


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
