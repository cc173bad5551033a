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
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, fields

import numpy as np
import torch

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
batching = "random"          # 'random' | 'similarity' (Lory, run data/similarity.py first)
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
# MoE losses and balancing (METHODS.md section 3)
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
    from model import GPTConfig
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
    from router import Routing
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
        from router import Routing
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

def main(argv):
    try:
        cfg = parse_config(argv)
        check_run_config(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from checkpoint import CheckpointError
    try:
        return train(cfg)
    except (ConfigError, ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


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
    from cli import device_problem
    if cfg["device"] != "auto" and device_problem(cfg["device"]):
        raise ConfigError(f"device={cfg['device']!r} {device_problem(cfg['device'])}")


def train(cfg):
    from checkpoint import load_checkpoint, load_weights, save_checkpoint
    from data.dataset import TokenDataset
    from kernels import auto_impl
    from model import GPT, GPTConfig, LoryFFN, MoEFFN
    from router import AdaptiveAuxCoef, Routing

    # ---- distributed setup (torchrun sets RANK/WORLD_SIZE) ----
    ddp = int(os.environ.get("RANK", -1)) != -1
    if cfg["device"] == "auto":
        cfg["device"] = "cuda" if torch.cuda.is_available() else (
            "mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else "cpu")
    if ddp:
        import torch.distributed as dist
        backend = cfg["backend"] if cfg["backend"] != "auto" else ("nccl" if cfg["device"].startswith("cuda") else "gloo")
        dist.init_process_group(backend=backend)
        rank, local_rank, world = dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size()
        if cfg["device"].startswith("cuda"):
            cfg["device"] = f"cuda:{local_rank}"
            torch.cuda.set_device(cfg["device"])
        if cfg["gradient_accumulation_steps"] % world:
            raise ConfigError(f"gradient_accumulation_steps={cfg['gradient_accumulation_steps']} must be a multiple "
                              f"of the number of processes ({world})")
    else:
        rank, world = 0, 1
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    device = cfg["device"]
    device_type = "cuda" if device.startswith("cuda") else ("mps" if device.startswith("mps") else "cpu")
    dtype = cfg["dtype"] if cfg["dtype"] != "auto" else ("bfloat16" if device_type == "cuda" else "float32")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype={dtype!r} must be 'auto', 'float32', 'bfloat16' or 'float16'")
    autocast = nullcontext() if dtype == "float32" else torch.autocast(device_type=device_type, dtype=getattr(torch, dtype))
    accum = cfg["gradient_accumulation_steps"] // world     # micro-steps per process per optimizer step
    torch.manual_seed(cfg["seed"])
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # ---- data ----
    data_dir = cfg["data_dir"] or os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", cfg["dataset"])
    train_data = TokenDataset(data_dir, "train", batching=cfg["batching"])
    val_data = TokenDataset(data_dir, "val")
    vocab_size = train_data.meta["vocab_size"]
    data_gen = torch.Generator().manual_seed(cfg["seed"])   # same stream on every rank: see get_batch

    def get_batch():
        """One optimizer step's global batch, drawn identically on every rank; this
        rank takes micro-batches m*world + rank. The data a step sees therefore does
        not depend on the number of processes (1 process with accumulation 2 sees the
        same samples as 2 processes with accumulation 1)."""
        B, T = cfg["batch_size"], cfg["block_size"]
        x, y = train_data.get_batch(B * accum * world, T, data_gen)
        for m in range(accum):
            s = (m * world + rank) * B
            xb, yb = x[s:s + B], y[s:s + B]
            if device_type == "cuda":
                xb, yb = xb.pin_memory().to(device, non_blocking=True), yb.pin_memory().to(device, non_blocking=True)
            else:
                xb, yb = xb.to(device), yb.to(device)
            yield xb, yb

    # ---- model ----
    if cfg["init_from"] != "resume" and os.path.exists(os.path.join(cfg["out_dir"], "ckpt.pt")) \
            and not cfg["overwrite"]:
        raise ConfigError(f"{cfg['out_dir']} already holds a checkpoint: continue it with --init_from=resume, "
                          f"start over with --overwrite=True, or choose another --out_dir")
    target_args = model_args_from(cfg, vocab_size)
    if cfg["init_from"] != "resume":
        GPTConfig(**target_args)                     # an impossible shape fails here, before out_dir is touched
        if target_args["moe_layers"] != "none" and cfg["init_from"] == "scratch" and cfg["dense_warmup_iters"]:
            from upcycle import check_upcycle_options      # Lory: the upcycle after the warm-up must work
            check_upcycle_options(upcycle_options(cfg, target_args))
    if master:
        os.makedirs(cfg["out_dir"], exist_ok=True)
    iter_num, best_val_loss, ckpt = 0, 1e9, None
    metrics_path = os.path.join(cfg["out_dir"], "metrics.jsonl")
    upcycled_from = None
    init = cfg["init_from"]
    if init == "scratch":
        args = dict(target_args)
        if cfg["dense_warmup_iters"] > 0:
            args["moe_layers"] = "none"      # dense warm-up phase first (Lory section 3.5)
        model = GPT(GPTConfig(**args))
    elif init == "resume":
        ckpt = load_checkpoint(cfg["out_dir"], map_location=device)
        args = dict(ckpt["model_args"])
        for k in RUNTIME_MODEL_KEYS:
            args[k] = target_args[k]
        model = GPT(GPTConfig(**args))
        load_weights(model, ckpt["model"], cfg["out_dir"])
        iter_num, best_val_loss = ckpt.get("iter_num", 0), ckpt.get("best_val_loss", 1e9)
        upcycled_from = ckpt.get("upcycled_from")
        log(f"resuming from {cfg['out_dir']} at iter {iter_num}")
    else:   # init_from = a checkpoint directory: warm-start a dense run, or upcycle online
        if os.path.abspath(init) == os.path.abspath(cfg["out_dir"]):
            raise ConfigError(f"init_from={init} and out_dir must differ (use init_from='resume' to continue a run)")
        if target_args["moe_layers"] == "none":
            # continued dense training: the weights only, with a fresh optimizer and schedule
            src = load_checkpoint(init, map_location="cpu")
            args = dict(src["model_args"])
            for k in RUNTIME_MODEL_KEYS:
                args[k] = target_args[k]
            model = GPT(GPTConfig(**args))
            load_weights(model, src["model"], init)
            log(f"warm start from {init} (iter {src.get('iter_num', '?')}): fresh optimizer and schedule")
        else:
            from upcycle import upcycle_from_checkpoint
            model, upcycled_from = upcycle_from_checkpoint(init, upcycle_options(cfg, target_args), device="cpu")
            log(f"upcycled {init} -> {model.config.n_experts} experts top-{model.config.top_k} in memory "
                f"({upcycled_from['options'].get('function_preserving', '?')} function preservation)")
    dense_ffns = source_ffns(init, upcycled_from, model)
    if model.config.vocab_size != vocab_size:
        raise ConfigError(f"model vocab_size={model.config.vocab_size} differs from {data_dir} "
                          f"vocab_size={vocab_size}: prepare the data with the tokenizer the model used")
    if model.config.block_size < cfg["block_size"]:
        raise ConfigError(f"block_size={cfg['block_size']} exceeds the model's block_size={model.config.block_size}")
    model.to(device)

    def moe_layers_of(m):
        return [f for _, f in m.moe_layers()]

    def n_routed(m):
        return sum(isinstance(f, MoEFFN) for f in moe_layers_of(m))

    optimizer = make_optimizer(model, cfg, device_type)
    scaler = torch.amp.GradScaler(enabled=(dtype == "float16"))
    aux_coef = AdaptiveAuxCoef(n_routed(model), cfg["adaptive_aux_xi"], cfg["adaptive_aux_max"],
                               cfg["adaptive_aux_beta"], alpha_init=cfg["adaptive_aux_max"])
    if ckpt is not None:
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
        ckpt = None   # free memory

    if model.config.is_moe and master and any(isinstance(f, MoEFFN) for f in moe_layers_of(model)):
        impl = model.config.expert_impl
        name, why = auto_impl(torch.device(device), getattr(torch, dtype)) if impl == "auto" else (impl, "forced")
        log(f"expert kernel: {name} ({why})")

    raw_model = model
    if cfg["compile"]:
        model = torch.compile(model)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)

    # fixed evaluation batches: comparable across runs and steps
    eval_B = cfg["batch_size"]
    val_batches = val_data.fixed_batches(cfg["eval_iters"], eval_B, cfg["block_size"], seed=1234)
    train_eval_batches = train_data.fixed_batches(cfg["eval_iters"], eval_B, cfg["block_size"], seed=4321)

    @torch.no_grad()
    def evaluate():
        """Mean loss over the fixed train/val batches; for MoE also per-domain expert
        usage (routed: fraction of each domain's tokens per expert; Lory: mean merge
        weights of the segments whose last token is in the domain)."""
        raw_model.eval()
        out = {}
        n_dom = val_data.n_domains
        for split, batches in (("train", train_eval_batches), ("val", val_batches)):
            losses = []
            usage = None
            for x, y, dom in batches:
                x, y = x.to(device), y.to(device)
                with autocast:
                    _, loss, routings = raw_model(x, y)
                losses.append(loss.item())
                if split == "val" and routings:
                    usage = domain_usage(routings, dom, n_dom, usage, x.shape)
            out[f"{split}_loss"] = float(np.mean(losses))
            if split == "val" and usage is not None:
                out["domain_usage"] = [(u / u.sum(-1, keepdim=True).clamp_min(1e-9)).tolist() for u in usage]
        raw_model.train()
        return out

    def save(extra_note=""):
        ckpt_obj = {
            "model_args": asdict(raw_model.config),
            "model": raw_model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "iter_num": iter_num,
            "best_val_loss": best_val_loss,
            "config": cfg,
            "rng": {"torch": torch.get_rng_state(), "data": data_gen.get_state(),
                    "cuda": torch.cuda.get_rng_state() if device_type == "cuda" else None},
            "aux_coef": aux_coef.state_dict() if n_routed(raw_model) else None,
            "upcycled_from": upcycled_from,
        }
        path = save_checkpoint(ckpt_obj, cfg["out_dir"])
        log(f"saved checkpoint {path}{extra_note}")

    # metrics: a resumed run drops records from after its checkpoint
    # (the resumed iteration is evaluated again, so its old eval record goes too).
    # A new run moves an old log to metrics.jsonl.prev only when it writes its
    # first record, so a run that fails while starting leaves the old log alone.
    if master and cfg["init_from"] == "resume" and os.path.exists(metrics_path):
        keep = [r for r in read_metrics(metrics_path)
                if r.get("iter", 0) < iter_num or (r.get("iter", 0) == iter_num and r.get("split") != "eval")]
        with open(metrics_path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)
        os.replace(metrics_path + ".tmp", metrics_path)
    metrics_file = None

    def write_metrics(rec):
        nonlocal metrics_file
        if not master:
            return
        if metrics_file is None:
            if cfg["init_from"] != "resume" and os.path.exists(metrics_path):
                os.replace(metrics_path, metrics_path + ".prev")   # keep the old run's log, start afresh
            metrics_file = open(metrics_path, "a")
        metrics_file.write(json.dumps(rec) + "\n")
        metrics_file.flush()

    if upcycled_from is not None and iter_num == 0 and master:
        save(" (step-0 upcycled MoE)")

    n_params, n_active = raw_model.num_params(), raw_model.num_params(active=True)
    tokens_per_iter = cfg["batch_size"] * cfg["block_size"] * cfg["gradient_accumulation_steps"]
    log(f"model: {n_params / 1e6:.2f}M parameters, {n_active / 1e6:.2f}M active; "
        f"{tokens_per_iter} tokens/iter; device {device} ({dtype}); {world} process(es)")
    gpu_name = torch.cuda.get_device_name(device) if device_type == "cuda" else None

    stats = StatsAccumulator()
    start_iter = iter_num
    t0 = time.time()
    train_loss_acc, acc_n = 0.0, 0
    while True:
        # ---- Lory dense warm-up: upcycle in memory when the warm-up ends ----
        if (cfg["dense_warmup_iters"] > 0 and iter_num >= cfg["dense_warmup_iters"]
                and target_args["moe_layers"] != "none" and not raw_model.config.is_moe):
            from upcycle import upcycle_model
            old_model, old_opt = raw_model, optimizer
            raw_model = upcycle_model(old_model, upcycle_options(cfg, target_args)).to(device)
            dense_ffns = {l: tuple(getattr(old_model.blocks[l].ffn, m).weight.detach().cpu().clone()
                                   for m in ("gate_proj", "up_proj", "down_proj")) for l, _ in raw_model.moe_layers()}
            optimizer = make_optimizer(raw_model, cfg, device_type)
            carry_optimizer_state(old_opt, old_model, optimizer, raw_model)
            aux_coef = AdaptiveAuxCoef(n_routed(raw_model), cfg["adaptive_aux_xi"], cfg["adaptive_aux_max"],
                                       cfg["adaptive_aux_beta"], alpha_init=cfg["adaptive_aux_max"])
            upcycled_from = {"path": None, "sha256": None, "method": "dense warm-up",
                             "options": upcycle_options(cfg, target_args), "iter": iter_num}
            model = torch.compile(raw_model) if cfg["compile"] else raw_model
            if ddp:
                model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)
            log(f"dense warm-up done at iter {iter_num}: upcycled to {raw_model.config.n_experts} experts")

        lr = get_lr(iter_num, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr

        # ---- evaluation + checkpoint ----
        if iter_num % cfg["eval_interval"] == 0 or iter_num == cfg["max_iters"]:
            ev = evaluate()
            rec = {"iter": iter_num, "tokens": iter_num * tokens_per_iter, "split": "eval",
                   "train_loss": ev["train_loss"], "val_loss": ev["val_loss"]}
            if "domain_usage" in ev:
                rec["domain_usage"] = ev["domain_usage"]
            if upcycled_from is not None and raw_model.config.is_moe:
                rec.update(expert_similarity_record(raw_model, dense_ffns))
            if not (math.isfinite(ev["val_loss"]) and math.isfinite(ev["train_loss"])):
                log(f"error: eval loss is not finite at iter {iter_num}; stopping. The last good checkpoint "
                    f"in {cfg['out_dir']} is kept (lower learning_rate or check the data).")
                return 1
            write_metrics(rec)
            log(f"eval iter {iter_num}: train {ev['train_loss']:.4f}, val {ev['val_loss']:.4f}")
            if ev["val_loss"] < best_val_loss or cfg["always_save_checkpoint"]:
                best_val_loss = min(best_val_loss, ev["val_loss"])
                if iter_num > start_iter and master:   # nothing new to save at the start
                    save()
        if iter_num >= cfg["max_iters"]:
            break

        # ---- one optimizer step ----
        alphas = aux_coef.alpha if cfg["adaptive_aux"] else [cfg["aux_loss_coef"]] * n_routed(raw_model)
        step_loads, step_drops = None, None
        lossf = 0.0
        for m, (X, Y) in enumerate(get_batch()):
            if ddp:
                model.require_backward_grad_sync = (m == accum - 1)
            with autocast:
                _, loss, routings = model(X, Y)
                total = (loss + aux_total(routings, cfg, alphas)) / accum
            scaler.scale(total).backward()
            lossf += loss.item() / accum
            stats.add(routings)
            routed_r = [r for r in routings if isinstance(r, Routing)]
            loads = [r.stats["tokens_per_expert"] for r in routed_r]
            drops = [float(r.stats["drop_rate"]) / accum for r in routed_r]
            step_loads = loads if step_loads is None else [a + b for a, b in zip(step_loads, loads)]
            step_drops = drops if step_drops is None else [a + b for a, b in zip(step_drops, drops)]
        if ddp:   # log the global batch's loss, not this rank's share
            t = torch.tensor([lossf], device=device)
            dist.all_reduce(t)
            lossf = t.item() / world
        if not math.isfinite(lossf):
            log(f"error: loss is {lossf} at iter {iter_num}; stopping. The last good checkpoint "
                f"in {cfg['out_dir']} is kept (lower learning_rate or check the data).")
            return 1
        if cfg["grad_clip"] > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg["grad_clip"])
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        # ---- after the step: balancing state (training statistics only) ----
        if step_loads:
            if ddp:
                for t in step_loads:
                    dist.all_reduce(t)
            routed = [f for f in moe_layers_of(raw_model) if isinstance(f, MoEFFN)]
            for ffn, load in zip(routed, step_loads):
                if ffn.router.router_type == "sigmoid":
                    ffn.router.update_expert_bias(load, cfg["expert_bias_gamma"])
            if cfg["adaptive_aux"]:
                if ddp:   # every rank must hold the same alphas
                    t = torch.tensor(step_drops)
                    dist.all_reduce(t)
                    step_drops = (t / world).tolist()
                aux_coef.update(step_drops)

        train_loss_acc += lossf
        acc_n += 1
        iter_num += 1
        if iter_num % cfg["log_interval"] == 0 and master:
            dt = (time.time() - t0) / acc_n
            tok_s = tokens_per_iter / dt
            mfu = raw_model.estimate_mfu(tokens_per_iter, dt, gpu_name)
            rec = {"iter": iter_num, "tokens": iter_num * tokens_per_iter, "split": "train",
                   "loss": train_loss_acc / acc_n, "lr": lr, "ms_per_iter": dt * 1000, "tok_per_s": tok_s}
            if mfu is not None:
                rec["mfu"] = mfu
            line = (f"iter {iter_num}: loss {rec['loss']:.4f}, lr {lr:.2e}, {dt * 1000:.0f} ms/iter, "
                    f"{tok_s:,.0f} tok/s" + (f", MFU {mfu * 100:.1f}%" if mfu is not None else ""))
            layers = stats.layers()
            if layers:
                if n_routed(raw_model):
                    rec["alpha"] = list(aux_coef.alpha) if cfg["adaptive_aux"] else [cfg["aux_loss_coef"]] * n_routed(raw_model)
                rec["moe"] = layers
                line += moe_summary(layers)
            write_metrics(rec)
            log(line)
            t0, train_loss_acc, acc_n = time.time(), 0.0, 0

    if master:
        save(" (final)")
        metrics_file.close()
    if ddp:
        dist.destroy_process_group()
    return 0


def source_ffns(init, upcycled_from, model):
    """{layer: (W1, W3, W2)} of the dense checkpoint an upcycled model came from,
    or {} when the source is unknown or gone."""
    from checkpoint import CheckpointError, load_checkpoint
    from upcycle import dense_ffn_weights
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
    from router import Routing
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
    """Per MoE layer: mean pairwise cosine similarity of the experts, and each
    expert's similarity to the dense FFN it came from (Skywork / He et al. monitor:
    it falls as experts specialise; the run whose experts stay most similar is worst)."""
    from upcycle import mean_pairwise_similarity, similarity_to_dense
    rec = {"expert_similarity": [round(mean_pairwise_similarity(f), 6) for _, f in model.moe_layers()]}
    if dense_ffns:
        rec["similarity_to_dense"] = [[round(v, 6) for v in similarity_to_dense(f, dense_ffns[l]).tolist()]
                                      for l, f in model.moe_layers() if l in dense_ffns]
    return rec


RUN_ONLY_KEYS = ("out_dir", "overwrite", "device", "compile", "backend")   # do not change the result


def finished_run(out_dir, cfg):
    """True when out_dir holds the final checkpoint (iter max_iters) of a run with the
    settings cfg (runtime-only keys aside). demo.py and experiments.py reuse such
    runs; anything else (another shape, a smoke run, an unfinished run) is retrained."""
    from checkpoint import CheckpointError, load_checkpoint
    try:
        ckpt = load_checkpoint(out_dir)
    except CheckpointError:
        return False
    saved = ckpt.get("config") or {}
    return ckpt.get("iter_num") == cfg["max_iters"] and all(
        saved.get(k) == v for k, v in cfg.items() if k not in RUN_ONLY_KEYS)


def read_metrics(path):
    """Records of a metrics.jsonl; a truncated last line (killed mid-write) is skipped."""
    recs = []
    with open(path) as f:
        lines = f.readlines()
    for i, line in enumerate(lines):
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                print(f"warning: skipped a truncated last line in {path}", file=sys.stderr)
            else:
                raise ValueError(f"{path} line {i + 1} is not valid JSON") from None
    return recs


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
