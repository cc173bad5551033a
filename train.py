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
these names) and then --key=value arguments override them. Model keys are the
fields of model.GPTConfig and share this namespace.
"""
import ast
import datetime
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
import parallel
from btx import branch_domains, btx_from_checkpoints
from checkpoint import CheckpointError, NonFiniteCheckpointError, load_checkpoint, load_weights
from cli import device_problem, first_float_problem, ram_available
from data.dataset import TokenDataset, load_meta
from data.similarity import ensure_similarity_order
from data.tokenizer import copy_tokenizer_files
from kernels import auto_impl, triton_status
from metrics import METRICS_FILE, MetricsWriter, trim_for_resume
from model import GPT, GPTConfig, MoEFFN
from router import AdaptiveAuxCoef, Routing
from runlock import LockError, OutDirLock
from upcycle import (FUNCTION_KEYS, METHODS, ROUTER_INITS, SHAPE_KEYS, check_upcycle_options, dense_ffn_weights,
                     mean_pairwise_similarity, router_init_hidden, similarity_to_dense, upcycle_from_checkpoint,
                     upcycle_model)

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
compile = False
backend = "auto"             # DDP backend: nccl on CUDA, gloo on CPU
expert_parallel = 1          # N: ranks that split every MoE layer's experts (parallel.py); 1 = plain DDP
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
            except SystemExit as e:   # a config file is Python: sys.exit() in it must not end train.py silently
                raise ConfigError(f"config file {arg} called sys.exit({e.code!r}) while it ran: a config file "
                                  f"only assigns settings; remove the exit") from None
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

    def add(self, routings, loads=None):
        """loads: per routed layer, tokens_per_expert to log instead of this
        process's own (expert parallelism logs the global loads)."""
        self.n += 1
        loads = iter(loads or [])
        for l, r in enumerate(routings):
            if isinstance(r, Routing):
                items = dict(r.stats)
                items["tokens_per_expert"] = next(loads, items["tokens_per_expert"])
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


class LogWindow:
    """The training steps since the last train record: summed loss and step time, the
    last step's learning rate, and their routing statistics. close() writes the
    record (rank 0) and opens a new window; train() closes it every log_interval
    steps and before every checkpoint save, so that a resumed run starts with an
    empty window, as the straight run has at that step, and writes the same records."""

    def __init__(self, metrics, env, tokens_per_iter, gpu_name):
        self.metrics, self.env, self.tokens_per_iter, self.gpu_name = metrics, env, tokens_per_iter, gpu_name
        self.reset()

    def reset(self):
        self.stats = StatsAccumulator()
        self.loss_sum, self.n_steps, self.step_time, self.lr = 0.0, 0, 0.0, None

    def add(self, loss, seconds, lr):
        """One training step: its loss, its seconds (the step only) and learning rate."""
        self.loss_sum, self.n_steps = self.loss_sum + loss, self.n_steps + 1
        self.step_time, self.lr = self.step_time + seconds, lr

    def close(self, st, cfg):
        if self.n_steps and self.env.master:
            rec, line = train_record(st, self.loss_sum / self.n_steps, self.lr, self.step_time / self.n_steps,
                                     self.tokens_per_iter, self.env.world, self.gpu_name, self.stats, cfg)
            self.metrics.write(rec)
            self.env.log(line)
        self.reset()


# -----------------------------------------------------------------------------
# checking the settings

AUX_LOSSES = ("switch", "skywork", "none")
AT_LEAST = {"batch_size": 1, "eval_iters": 1, "eval_interval": 1, "log_interval": 1,
            "gradient_accumulation_steps": 1, "max_iters": 0, "warmup_iters": 0, "lr_decay_iters": 0,
            "dense_warmup_iters": 0, "upcycle_granularity": 1, "expert_parallel": 1}


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
    problem = first_float_problem(cfg)
    if problem:
        raise ConfigError(problem)
    if cfg["aux_loss"] not in AUX_LOSSES:
        raise ConfigError(f"aux_loss={cfg['aux_loss']!r} must be one of {', '.join(AUX_LOSSES)}")
    if cfg["expert_impl"] == "triton" and cfg["moe_layers"] != "none" and not triton_status()[0]:
        raise ConfigError(f"expert_impl='triton' cannot run here: {triton_status()[1]} (use expert_impl=auto)")
    if cfg["device"] != "auto" and device_problem(cfg["device"]):
        raise ConfigError(f"device={cfg['device']!r} {device_problem(cfg['device'])}")
    if cfg["expert_parallel"] > 1 and cfg["dtype"] == "float16":
        raise ConfigError("expert_parallel > 1 does not support dtype='float16' (each rank's loss scaler would "
                          "see other expert gradients); use dtype='bfloat16' or 'float32'")
    if cfg["expert_parallel"] > 1 and cfg["dense_warmup_iters"] > 0:
        raise ConfigError("expert_parallel > 1 does not support dense_warmup_iters (Lory's dense warm-up; EP "
                          "refuses Lory): use expert_parallel=1")
    if cfg["expert_parallel"] > 1 and (cfg["upcycle_method"] != "copy" or cfg["upcycle_router_init"] != "random"):
        raise ConfigError("expert_parallel > 1 upcycles online by copying (upcycle_method='copy', "
                          "upcycle_router_init='random'): build a drop/btx/hidden MoE with upcycle.py --out_dir=D first, "
                          "then continue it there with init_from=resume")
    check_upcycle_method(cfg)


def check_upcycle_method(cfg):
    """upcycle_method / upcycle_router_init and the keys that go with them (issue 16):
    one-line ConfigError for values or combinations that cannot work. A resumed run
    ignores them (its checkpoint is already the upcycled model)."""
    method, rinit, init = cfg["upcycle_method"], cfg["upcycle_router_init"], cfg["init_from"]
    if method not in METHODS:
        raise ConfigError(f"upcycle_method={method!r} must be one of {', '.join(METHODS)}")
    if rinit not in ROUTER_INITS:
        raise ConfigError(f"upcycle_router_init={rinit!r} must be one of {', '.join(ROUTER_INITS)}")
    if not 0 <= cfg["upcycle_drop_ratio"] <= 1:
        raise ConfigError(f"upcycle_drop_ratio={cfg['upcycle_drop_ratio']} must be in [0, 1] (0.5 is Drop-Upcycling's best)")
    if method != "drop" and cfg["upcycle_drop_ratio"] != DEFAULTS["upcycle_drop_ratio"]:
        raise ConfigError(f"upcycle_drop_ratio applies to upcycle_method='drop' only (got upcycle_method={method!r})")
    if cfg["upcycle_router_domains"] and rinit != "hidden":
        raise ConfigError("upcycle_router_domains is used by upcycle_router_init='hidden' only")
    if init == "resume":
        return
    if init == "scratch":
        if method == "btx" or rinit == "hidden" or (method == "drop" and not cfg["dense_warmup_iters"]):
            what = f"upcycle_method={method!r}" if method != "copy" else f"upcycle_router_init={rinit!r}"
            raise ConfigError(f"{what} upcycles a dense checkpoint: set init_from=<dense out_dir>"
                              + ("=A,B,... (branch out_dirs)" if method == "btx" else ""))
        return
    if (method != "copy" or rinit != "random") and str(cfg["moe_layers"]).strip() in ("none", ""):
        raise ConfigError(f"upcycle_method={method!r} / upcycle_router_init={rinit!r} build an MoE: set moe_layers "
                          f"(e.g. --moe_layers=all); with moe_layers='none' init_from is a dense warm start")
    paths = [p for p in init.split(",") if p.strip()]
    if method == "btx" and len(paths) < 2:
        raise ConfigError(f"upcycle_method='btx' merges 2 or more dense branches: init_from=A,B[,C,...] (got {init!r})")
    if method != "btx" and len(paths) != 1:
        raise ConfigError(f"init_from={init!r} names {len(paths)} checkpoints; only upcycle_method='btx' takes a list")
    if rinit == "hidden" and not cfg["upcycle_router_domains"] and method != "btx":
        raise ConfigError("upcycle_router_init='hidden' needs upcycle_router_domains=D1,D2,... "
                          "(one per expert, or fewer dividing n_experts)")
    n_dom = len({d.strip() for d in cfg["upcycle_router_domains"].split(",") if d.strip()}) or len(paths)
    copies = cfg["n_experts"] // cfg["upcycle_granularity"]   # experts that hold the same weights (shard)
    if rinit == "hidden" and method != "drop" and not cfg["upcycle_expert_noise"] and n_dom < copies:
        raise ConfigError(f"upcycle_router_init='hidden' with {n_dom} domains for {copies} copies of each weight: "
                          f"copies that share a domain share their router row too, get equal gradients and never "
                          f"diverge; give one domain per copy, use upcycle_method='drop', or upcycle_expert_noise > 0")


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
    ep: object = None     # parallel.EPGroups when expert_parallel > 1, else None (plain DDP or one process)

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
    """(ddp, rank, local_rank, world, device, ep). torchrun sets RANK/WORLD_SIZE; then
    each process joins the process group, checks that every rank runs the same
    config, and, on CUDA, takes GPU local_rank. With expert_parallel=N > 1 it also
    builds the EP and DP groups (ep: parallel.EPGroups) and gives every collective
    a timeout (parallel.DEFAULT_TIMEOUT_S), so a dead rank ends the job."""
    device = resolve_device(cfg["device"])
    N = cfg["expert_parallel"]
    if int(os.environ.get("RANK", -1)) == -1:
        check_ep_world(N, 1)
        return False, 0, 0, 1, device, None
    backend = cfg["backend"] if cfg["backend"] != "auto" else ("nccl" if device.startswith("cuda") else "gloo")
    if N > 1:
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=parallel.DEFAULT_TIMEOUT_S))
    else:
        dist.init_process_group(backend=backend)
    parallel.check_same_config(cfg)   # before the groups: another expert_parallel would hang them
    rank, local_rank, world = dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size()
    check_ep_world(N, world)
    ep = parallel.init_groups(N) if N > 1 else None
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if cfg["gradient_accumulation_steps"] % world:
        raise ConfigError(f"gradient_accumulation_steps={cfg['gradient_accumulation_steps']} must be a multiple "
                          f"of the number of processes ({world})")
    return True, rank, local_rank, world, device, ep


def check_ep_world(ep_size, world):
    if world % ep_size:
        raise ConfigError(f"expert_parallel={ep_size} must divide the number of processes ({world}): "
                          f"start N*k processes with torchrun --nproc_per_node, or lower expert_parallel")


def setup_env(cfg):
    """The process's Env: distributed setup, device, precision, seed."""
    ddp, rank, local_rank, world, device, ep = setup_distributed(cfg)
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
               accum=cfg["gradient_accumulation_steps"] // world, ep=ep)


def load_data(cfg, env):
    """(data_dir, train split, val split). Lory's similarity order is built here on
    first use (by the master process; the others wait for it)."""
    data_dir = resolve_data_dir(cfg)
    if cfg["batching"] == "similarity":
        if env.master:
            ensure_similarity_order(data_dir)
        if env.ddp:
            dist.barrier()
    doms = cfg["domains"] or None   # a BTX branch: train and val windows of its domain(s) only
    return (data_dir, TokenDataset(data_dir, "train", batching=cfg["batching"], domains=doms),
            TokenDataset(data_dir, "val", domains=doms))


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
    fp32. Fixed eval batches: 2 splits x eval_iters x (x, y, domain) int64 (B, T)."""
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
             "eval batches": 2 * cfg["eval_iters"] * 3 * 8 * B * T}
    return sum(parts.values()), parts


def available_memory(env):
    """(bytes, where) this process can still allocate: the GPU's free memory on CUDA,
    else the machine's MemAvailable (None when unknown, e.g. no /proc)."""
    if env.device_type == "cuda":
        return torch.cuda.mem_get_info(env.device)[0], f"{env.device} GPU"
    return ram_available(), "RAM"


def check_memory(args, cfg, env):
    """Refuse, before anything is allocated, a run whose lower-bound memory need
    (estimate_memory) exceeds what the device has free, with one line saying both."""
    need, parts = estimate_memory(args, cfg)
    have, where = available_memory(env)
    if have is not None and need > have:
        gib = lambda n: f"{n / 2**30:,.1f} GiB"   # noqa: E731
        raise ConfigError(f"this run needs at least {gib(need)} of {where} ("
                          + ", ".join(f"{k} {gib(v)}" for k, v in parts.items())
                          + f") but {gib(have)} is available: make the model, batch_size, block_size or "
                            f"eval_iters smaller")


def check_new_run(cfg, target_args):
    """Before out_dir is touched: a new run must not replace a checkpoint unasked,
    and its model shape (and Lory's later upcycle) must be possible."""
    if cfg["init_from"] == "resume":
        return
    if os.path.exists(os.path.join(cfg["out_dir"], "ckpt.pt")) and not cfg["overwrite"]:
        raise ConfigError(f"{cfg['out_dir']} already holds a checkpoint: continue it with --init_from=resume, "
                          f"start over with --overwrite=True, or choose another --out_dir")
    parallel.check_ep_config(GPTConfig(**target_args), cfg["expert_parallel"])   # an impossible shape fails here
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
    Returns (model, resume checkpoint or None, upcycled_from or None).
    Under expert parallelism (env.ep) the model holds only this rank's experts:
    build_model_ep."""
    init = cfg["init_from"]
    if env.ep is not None:
        return build_model_ep(cfg, target_args, env)
    if init == "scratch":
        args = dict(target_args)
        if cfg["dense_warmup_iters"] > 0:
            args["moe_layers"] = "none"
        return GPT(GPTConfig(**args)), None, None
    if init == "resume":
        ckpt = load_checkpoint(cfg["out_dir"], map_location=env.device)
        check_memory(ckpt["model_args"], cfg, env)
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
        env.log(f"warm start from {init} (iter {src.get('iter_num', '?')}): fresh optimizer and schedule"
                + kept_shape_note(model.config, target_args))
        return model, None, None
    model, upcycled_from = upcycle_online(cfg, target_args, env)
    return model, None, upcycled_from


def kept_shape_note(model_cfg, target_args):
    """A warm start keeps the checkpoint's shape: name the keys where this run's
    config asks for another one ('' when none)."""
    asked = GPTConfig(**{**target_args, "moe_layers": "none"})   # n_kv_head=0, ffn_hidden=0 resolved
    diff = [f"{k}={getattr(model_cfg, k)} (this run's config: {getattr(asked, k)})"
            for k in SHAPE_KEYS + FUNCTION_KEYS if k != "vocab_size" and getattr(model_cfg, k) != getattr(asked, k)]
    return f"; it keeps the checkpoint's shape: {', '.join(diff)}" if diff else ""


def upcycle_online(cfg, target_args, env):
    """Online upcycling in memory, by upcycle_method: 'copy' or 'drop' (Drop-Upcycling)
    from the dense checkpoint init_from, or 'btx' (Branch-Train-MiX) from the branch
    checkpoints init_from=A,B,...; then, with upcycle_router_init='hidden', every router
    from the mean hidden states of its experts' domains (upcycle_router_domains, or each
    branch's `domains` setting). The same functions as upcycle.py's CLI, so the same
    settings give the same weights. Returns (model on the CPU, upcycled_from)."""
    init, options = cfg["init_from"], upcycle_options(cfg, target_args)
    paths = [p.strip() for p in init.split(",") if p.strip()]
    if cfg["upcycle_method"] == "btx":
        for p in paths:
            if os.path.abspath(p) == os.path.abspath(cfg["out_dir"]):
                raise ConfigError(f"init_from names out_dir {p} as a branch; write the merged MoE to another out_dir")
        model, upcycled_from = btx_from_checkpoints(paths, options, device="cpu")
    else:
        model, upcycled_from = upcycle_from_checkpoint(init, options, device="cpu")
    if cfg["upcycle_router_init"] == "hidden":
        domains = cfg["upcycle_router_domains"] or branch_domains(paths)
        upcycled_from["options"].update(router_init_hidden(model, resolve_data_dir(cfg), domains,
                                                           seed=cfg["upcycle_seed"], block_size=cfg["block_size"]))
    env.log(f"upcycled {init} ({upcycled_from['method']}, router {cfg['upcycle_router_init']}) -> "
            f"{model.config.n_experts} experts top-{model.config.top_k} in memory "
            f"({upcycled_from['options'].get('function_preserving', '?')} function preservation)")
    return model, upcycled_from


def build_model_ep(cfg, target_args, env):
    """build_model's origins with experts sharded over env.ep (parallel.py): rank r
    of an EP group holds experts [r*E/N, (r+1)*E/N) of every MoE layer.
      scratch        GPT's own init for the full model, sliced: the same weights at any N
      resume         the saved full (E, ...) stacks sliced by global expert (shard_state_dict);
                     the optimizer moments are sliced in restore_training_state
      <dense dir>    warm start: as without EP (no experts to shard)
      <dense dir>    online upcycling of the owned experts only (upcycle_owned)"""
    init, ep = cfg["init_from"], env.ep
    if init == "scratch":
        return parallel.build_sharded_model(GPTConfig(**target_args), ep), None, None
    if init == "resume":
        ckpt = load_checkpoint(cfg["out_dir"], map_location=env.device)
        args = {**ckpt["model_args"], **{k: target_args[k] for k in RUNTIME_MODEL_KEYS}}
        gpt_cfg = GPTConfig(**args)
        model = sharded_from_state(gpt_cfg, parallel.shard_state_dict(ckpt["model"], gpt_cfg, ep), ep, cfg["out_dir"])
        env.log(f"resuming from {cfg['out_dir']} at iter {ckpt.get('iter_num', 0)}")
        return model, ckpt, ckpt.get("upcycled_from")
    if os.path.abspath(init) == os.path.abspath(cfg["out_dir"]):
        raise ConfigError(f"init_from={init} and out_dir must differ (use init_from='resume' to continue a run)")
    src = load_checkpoint(init, map_location="cpu")
    if target_args["moe_layers"] == "none":
        model = model_with_runtime_keys(src["model_args"], target_args)
        load_weights(model, src["model"], init)
        env.log(f"warm start from {init} (iter {src.get('iter_num', '?')}): fresh optimizer and schedule"
                + kept_shape_note(model.config, target_args))
        return model, None, None
    state, gpt_cfg, info = parallel.upcycle_owned(src["model"], src["model_args"], upcycle_options(cfg, target_args), ep)
    model = sharded_from_state(gpt_cfg, state, ep, init)
    path = os.path.abspath(checkpoint.ckpt_path(init))
    lo, hi = ep.owned(gpt_cfg.n_experts)
    env.log(f"upcycled {init} -> {gpt_cfg.n_experts} experts top-{gpt_cfg.top_k} in memory, this rank's "
            f"experts [{lo}, {hi}) only ({info['options']['function_preserving']} function preservation)")
    return model, None, {"path": path, "sha256": checkpoint.file_sha256(path), **info}


def sharded_from_state(gpt_cfg, local_state, ep, path):
    """parallel.build_sharded_model with a one-line CheckpointError for weights that
    do not fit the model (as checkpoint.load_weights)."""
    try:
        return parallel.build_sharded_model(gpt_cfg, ep, local_state)
    except RuntimeError as e:
        detail = next((l.strip() for l in str(e).splitlines()[1:] if l.strip()), str(e).splitlines()[0])
        raise CheckpointError(f"{checkpoint.ckpt_path(path)} does not match the model it describes: "
                              f"{detail[:300]}") from None


def check_model_fits_data(model, cfg, vocab_size, data_dir):
    if model.config.vocab_size != vocab_size and not padded_hf_vocab(model, vocab_size, data_dir):
        raise ConfigError(f"model vocab_size={model.config.vocab_size} differs from {data_dir} "
                          f"vocab_size={vocab_size}: prepare the data with the tokenizer the model used "
                          f"(an imported model: python data/multidomain/prepare.py --tokenizer=CKPT_DIR)")
    if model.config.block_size < cfg["block_size"]:
        raise ConfigError(f"block_size={cfg['block_size']} exceeds the model's block_size={model.config.block_size}")


def padded_hf_vocab(model, vocab_size, data_dir):
    """True when data made with an HF tokenizer has fewer tokens than the model has
    embedding rows (many HF models pad theirs): every id has a row, nothing wraps."""
    return vocab_size < model.config.vocab_size and load_meta(data_dir).get("tokenizer") == "hf"


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


def routed_ffns(model):
    """The routed (token-choice) MoE FFNs of a model, in layer order."""
    return [f for _, f in model.moe_layers() if isinstance(f, MoEFFN)]


def n_routed(model):
    return len(routed_ffns(model))


def new_aux_coef(model, cfg):
    """Skywork's adaptive auxiliary-loss coefficients, one per routed layer."""
    return AdaptiveAuxCoef(n_routed(model), cfg["adaptive_aux_xi"], cfg["adaptive_aux_max"],
                           cfg["adaptive_aux_beta"], alpha_init=cfg["adaptive_aux_max"])


def restore_training_state(ckpt, st, device_type, ep=None):
    """Resume exactly: optimizer moments, Skywork alphas, the float16 loss scale, and the
    torch, CUDA and data RNGs, into RunState st. Under expert parallelism (ep) the saved
    full expert moments are sliced to the model's experts."""
    # the checkpoint brings the moments and the alphas; the settings (weight decay, betas,
    # Skywork's xi, alpha_max, beta) are this run's, which may differ from the saved ones
    if ckpt.get("optimizer") is not None:
        opt = ckpt["optimizer"]
        sd = opt if ep is None else parallel.shard_optimizer_state(opt, st.optimizer, st.raw_model, ep)
        settings = [{k: g[k] for k in ("weight_decay", "betas")} for g in st.optimizer.param_groups]
        st.optimizer.load_state_dict(sd)
        for g, keep in zip(st.optimizer.param_groups, settings):
            g.update(keep)
    if ckpt.get("aux_coef") is not None:
        keep = st.aux_coef.xi, st.aux_coef.alpha_max, st.aux_coef.beta
        st.aux_coef.load_state_dict(ckpt["aux_coef"])
        st.aux_coef.xi, st.aux_coef.alpha_max, st.aux_coef.beta = keep
    if ckpt.get("scaler") is not None and st.scaler.is_enabled():   # a float16 run continues its loss scale
        st.scaler.load_state_dict(ckpt["scaler"])
    rng = ckpt.get("rng") or {}
    if "torch" in rng:
        torch.set_rng_state(rng["torch"].cpu())
    if "data" in rng:
        st.data_gen.set_state(rng["data"].cpu())
    if device_type == "cuda" and rng.get("cuda") is not None:
        torch.cuda.set_rng_state(rng["cuda"].cpu())


def log_expert_kernel(model, env):
    if model.config.is_moe and routed_ffns(model):
        impl = model.config.expert_impl
        name, why = auto_impl(torch.device(env.device), getattr(torch, env.dtype)) if impl == "auto" else (impl, "forced")
        env.log(f"expert kernel: {name} ({why})")


def log_expert_parallel(model, env):
    if env.ep is not None:
        ep, E = env.ep, model.config.n_experts
        lo, hi = ep.owned(E)
        env.log(f"expert parallel: {env.world} ranks = {env.world // ep.ep_size} replica(s) x {ep.ep_size} ranks "
                f"splitting the experts; rank 0 holds experts [{lo}, {hi}) of every MoE layer "
                f"({model.num_params() / 1e6:.2f}M parameters on this rank)")


def wrap_model(raw_model, cfg, env):
    """What the training step calls: the model, compiled and/or wrapped in DDP (which
    averages the gradients across processes during backward). Under expert
    parallelism no DDP: replicas start from rank 0's weights (expert stacks from
    their DP group's first rank), and optimizer_step averages the gradients."""
    model = torch.compile(raw_model) if cfg["compile"] else raw_model
    if env.ep is not None:
        parallel.broadcast_parameters(raw_model, env.ep)
        return model
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
    st.raw_model = upcycle_model(old_model, upcycle_options(cfg, target_args))[0].to(env.device)
    st.dense_ffns = {l: tuple(getattr(old_model.blocks[l].ffn, m).weight.detach().cpu().clone()
                              for m in ("gate_proj", "up_proj", "down_proj")) for l, _ in st.raw_model.moe_layers()}
    st.optimizer = make_optimizer(st.raw_model, cfg, env.device_type)
    carry_optimizer_state(old_opt, old_model, st.optimizer, st.raw_model)
    st.aux_coef = new_aux_coef(st.raw_model, cfg)
    dense_path = save_dense_warmup(old_model, cfg, st.iter_num) if env.master else None
    st.upcycled_from = {"path": dense_path, "sha256": checkpoint.file_sha256(dense_path) if dense_path else None,
                        "method": "dense warm-up", "options": upcycle_options(cfg, target_args), "iter": st.iter_num}
    st.model = wrap_model(st.raw_model, cfg, env)
    env.log(f"dense warm-up done at iter {st.iter_num}: upcycled to {st.raw_model.config.n_experts} experts")


DENSE_WARMUP_NAME = "dense_warmup.pt"


def save_dense_warmup(dense_model, cfg, iter_num):
    """The dense model at the end of Lory's warm-up, as out_dir/dense_warmup.pt (weights
    only). upcycled_from points at it, so a resumed run finds the dense FFNs again and
    logs similarity_to_dense like a straight run. Returns its absolute path."""
    obj = {"model_args": asdict(dense_model.config), "model": dense_model.state_dict(), "optimizer": None,
           "iter_num": iter_num, "best_val_loss": 1e9, "config": cfg, "rng": None, "aux_coef": None,
           "upcycled_from": None}
    return os.path.abspath(checkpoint.save_checkpoint(obj, cfg["out_dir"], DENSE_WARMUP_NAME))


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
    states, and the Skywork alphas, everything an exact resume needs. Every rank
    calls it and rank 0 writes. Under expert parallelism the expert stacks and their
    Adam moments are first gathered (a collective) to full (E, ...) tensors by
    global expert index, so the file does not depend on the number of ranks."""
    if env.ep is None and not env.master:
        return
    if env.ep is None:
        model_state, optim_state = st.raw_model.state_dict(), st.optimizer.state_dict()
    else:
        model_state = parallel.full_state_dict(st.raw_model, env.ep)
        optim_state = parallel.full_optimizer_state(st.optimizer, st.raw_model, env.ep)
    if not env.master:
        return
    obj = {
        "model_args": asdict(st.raw_model.config),
        "model": model_state,
        "optimizer": optim_state,
        "iter_num": st.iter_num,
        "best_val_loss": st.best_val_loss,
        "config": cfg,
        "rng": {"torch": torch.get_rng_state(), "data": st.data_gen.get_state(),
                "cuda": torch.cuda.get_rng_state() if env.device_type == "cuda" else None},
        "aux_coef": st.aux_coef.state_dict() if n_routed(st.raw_model) else None,
        "upcycled_from": st.upcycled_from,
        "scaler": st.scaler.state_dict() if st.scaler.is_enabled() else None,
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
        if env.ddp and env.ep is None:
            st.model.require_backward_grad_sync = (m == env.accum - 1)
        with env.autocast:
            _, loss, routings = st.model(X, Y)
            total = (loss + aux_total(routings, cfg, alphas)) / env.accum
        st.scaler.scale(total).backward()
        lossf += loss.item() / env.accum
        stats.add(routings, global_loads(routings, env))
        routed_r = [r for r in routings if isinstance(r, Routing)]
        loads = [r.stats["demand_per_expert"] for r in routed_r]
        drops = [float(r.stats["adaptive_drop_rate"]) / env.accum for r in routed_r]
        step_loads = loads if step_loads is None else [a + b for a, b in zip(step_loads, loads)]
        step_drops = drops if step_drops is None else [a + b for a, b in zip(step_drops, drops)]
    return lossf, step_loads, step_drops


def global_loads(routings, env):
    """Under expert parallelism, per routed layer the tokens per expert of this
    micro-step summed over all ranks / world: the mean micro-batch's load, what one
    process logs with gradient accumulation over the same micro-batches. Else None
    (plain DDP logs rank 0's own loads, as before)."""
    if env.ep is None:
        return None
    return [t / env.world for t in parallel.global_tokens_per_expert(routings, env.ep)]


def all_reduce_sum(values, env):
    """(n,) float32 tensor: the sum over DDP processes of a list of floats."""
    t = torch.tensor(values, device=env.device)
    dist.all_reduce(t)
    return t


def optimizer_step(st, cfg, ep=None):
    """Clip the global gradient norm, step, zero the gradients. Under expert
    parallelism (ep) first average the gradients over the ranks, which DDP does
    during backward: parallel.sync_gradients, then parallel.clip_grad_norm (the
    norm adds the expert shards over the EP group). float16 is refused with EP."""
    if ep is not None:
        parallel.sync_gradients(st.raw_model, ep)
    if cfg["grad_clip"] > 0 and ep is not None:
        parallel.clip_grad_norm(st.raw_model, ep, cfg["grad_clip"])
    elif cfg["grad_clip"] > 0:
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
    """A run whose loss (training, every step; or eval) stops being finite ends here:
    one line on stderr, exit status 1, the last good checkpoint left as it is."""
    if env.master:
        print(f"error: {what} is {'not finite' if value is None else value} at iter {st.iter_num}; stopping. "
              f"The last good checkpoint in {cfg['out_dir']} is kept (lower learning_rate or check the data).",
              file=sys.stderr)
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
    check_memory(target_args, cfg, env)          # before GPTConfig lists n_layer layers or anything is allocated
    check_new_run(cfg, target_args)
    if env.master:
        os.makedirs(cfg["out_dir"], exist_ok=True)
    raw_model, ckpt, upcycled_from = build_model(cfg, target_args, env)
    dense_ffns = source_ffns(upcycled_from, raw_model, env, resumed=ckpt is not None)
    check_model_fits_data(raw_model, cfg, vocab_size, data_dir)
    if env.master:
        carry_tokenizer(cfg)
    raw_model.to(env.device)
    optimizer = make_optimizer(raw_model, cfg, env.device_type)
    st = RunState(raw_model, raw_model, optimizer, torch.amp.GradScaler(enabled=(env.dtype == "float16")),
                  new_aux_coef(raw_model, cfg), data_gen, upcycled_from=upcycled_from, dense_ffns=dense_ffns)
    if ckpt is not None:
        restore_training_state(ckpt, st, env.device_type, env.ep)
        st.iter_num, st.best_val_loss = ckpt.get("iter_num", 0), ckpt.get("best_val_loss", 1e9)
        ckpt = None   # free memory
    if env.master:
        log_expert_kernel(raw_model, env)
        log_expert_parallel(raw_model, env)
    st.model = wrap_model(raw_model, cfg, env)

    # fixed evaluation batches: comparable across runs and steps
    eval_batches = {"train": train_data.fixed_batches(cfg["eval_iters"], cfg["batch_size"], cfg["block_size"], seed=4321),
                    "val": val_data.fixed_batches(cfg["eval_iters"], cfg["batch_size"], cfg["block_size"], seed=1234)}
    path = os.path.join(cfg["out_dir"], METRICS_FILE)
    if env.master and cfg["init_from"] == "resume":
        trim_for_resume(path, st.iter_num)
    metrics = MetricsWriter(path, append=cfg["init_from"] == "resume", enabled=env.master)
    if st.upcycled_from is not None and st.iter_num == 0:
        save_checkpoint(st, cfg, env, " (step-0 upcycled MoE)")

    tokens_per_iter = cfg["batch_size"] * cfg["block_size"] * cfg["gradient_accumulation_steps"]
    env.log(f"model: {raw_model.num_params() / 1e6:.2f}M parameters, {raw_model.num_params(active=True) / 1e6:.2f}M "
            f"active; {tokens_per_iter} tokens/iter; device {env.device} ({env.dtype}); {env.world} process(es)")
    gpu_name = torch.cuda.get_device_name(env.device) if env.device_type == "cuda" else None
    start_iter = st.iter_num
    window = LogWindow(metrics, env, tokens_per_iter, gpu_name)
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
                if st.iter_num > start_iter:   # nothing new to save at the start
                    window.close(st, cfg)
                    save_checkpoint(st, cfg, env)
        if st.iter_num >= cfg["max_iters"]:
            break

        # ---- one optimizer step (the only part a log line times) ----
        t0 = time.time()
        batches = get_batch(train_data, cfg, env, st.data_gen)
        lossf, step_loads, step_drops = forward_backward(st, batches, cfg, env, current_alphas(st, cfg), window.stats)
        if env.ddp:   # log the global batch's loss, not this rank's share
            lossf = all_reduce_sum([lossf], env).item() / env.world
        if not math.isfinite(lossf):
            return stop_not_finite("loss", lossf, st, cfg, env)
        optimizer_step(st, cfg, env.ep)
        update_balancing(st, step_loads, step_drops, cfg, env)
        window.add(lossf, time.time() - t0, lr)
        st.iter_num += 1
        if st.iter_num % cfg["log_interval"] == 0:
            window.close(st, cfg)

    window.close(st, cfg)
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
    refused for a non-finite number stops the run like a non-finite loss (exit 1)."""
    try:
        return train(cfg)
    except NonFiniteCheckpointError as e:
        print(f"error: {e}; stopping (lower learning_rate or check the data)", file=sys.stderr)
        return 1
    except (ConfigError, ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


# -----------------------------------------------------------------------------
# helpers of the steps above (and of demo.py, experiments.py and the tests)

def source_ffns(upcycled_from, model, env, resumed=False):
    """{layer: (W1, W3, W2)} of the dense checkpoint an upcycled model came from,
    or {} when the source is unknown or gone, or (resumed: checked against the sha256
    recorded at upcycling) has changed since, e.g. a dense run that trained on."""
    path = (upcycled_from or {}).get("path")
    if not path or not os.path.exists(path):
        return {}
    want = upcycled_from.get("sha256")
    if resumed and want and checkpoint.file_sha256(path) != want:
        env.log(f"note: {path} changed since it was upcycled (sha256 differs): similarity_to_dense is not logged")
        return {}
    try:
        state = load_checkpoint(path)["model"]
    except CheckpointError:
        return {}
    return {l: dense_ffn_weights(state, l) for l, _ in model.moe_layers()
            if f"blocks.{l}.ffn.gate_proj.weight" in state}


def upcycle_options(cfg, target_args):
    """What the upcycler needs: the target MoE shape and the upcycling options. The
    MoE keeps the source's block_size (the context it was trained for: for an imported
    model its max_position_embeddings), as a warm start does; this run's block_size is
    the length it trains at."""
    model_args = {k: v for k, v in target_args.items() if k != "block_size"}
    return {"model_args": model_args, "granularity": cfg["upcycle_granularity"],
            "weight_scaling": cfg["upcycle_weight_scaling"], "expert_noise": cfg["upcycle_expert_noise"],
            "seed": cfg["upcycle_seed"], "router_init_dist": cfg["upcycle_router_init_dist"],
            "drop_ratio": cfg["upcycle_drop_ratio"] if cfg["upcycle_method"] == "drop" else 0.0}


def resolve_data_dir(cfg):
    """data_dir, or data/<dataset> next to this file."""
    return cfg["data_dir"] or os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", cfg["dataset"])


def domain_usage(routings, dom, n_dom, usage, shape):
    """Accumulate per-layer (n_domains, E) expert usage for one eval batch.
    dom: (B, T+1) domain of every window position; a routed token counts for its own
    domain (dom[:, :-1]), a Lory segment for the domain of its last token."""
    B, T = shape
    dom = dom[:, :-1].reshape(-1).cpu()                                 # (B*T,) the input tokens' domains
    out = usage or [None] * len(routings)
    for l, r in enumerate(routings):
        if isinstance(r, Routing):
            E = r.stats["tokens_per_expert"].numel()
            m = torch.zeros(n_dom, E)
            m.index_put_((dom[r.token_idx.cpu()], r.expert_idx.cpu()), torch.ones(r.token_idx.numel()), accumulate=True)
        else:
            w = r["merge_weights"].float().cpu()                          # (B, S, E)
            S, E = w.shape[1], w.shape[2]
            seg_dom = dom.view(B, S, -1)[:, :, -1].reshape(-1)            # each segment's last token's
            m = torch.zeros(n_dom, E).index_add_(0, seg_dom, w.reshape(-1, E))
        out[l] = m if out[l] is None else out[l] + m
    return out


def expert_similarity_record(model, dense_ffns):
    """Per MoE layer of an upcycled model: mean pairwise cosine similarity of the
    experts that started as copies, and each expert's similarity to the dense FFN it
    came from (Skywork / He et al. monitor: it falls as experts specialise; the run
    whose experts stay most similar is worst). A fine-grained upcycle (G shards per
    dense FFN) only copies shard e mod G, so the mean is over same-shard pairs
    (upcycle.mean_pairwise_similarity): 1.0 right after a noiseless upcycle.
    Under expert parallelism the full expert stacks are gathered first."""
    G = model.config.ffn_hidden // model.config.expert_hidden
    full = {l: parallel.full_expert_stacks(f) for l, f in model.moe_layers()}   # gathered under EP
    rec = {"expert_similarity": [round(mean_pairwise_similarity(f, G), 6) for f in full.values()]}
    if dense_ffns:
        rec["similarity_to_dense"] = [[round(v, 6) for v in similarity_to_dense(f, dense_ffns[l]).tolist()]
                                      for l, f in full.items() if l in dense_ffns]
    return rec


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
