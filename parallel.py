"""
Expert parallelism (EP) on torch.distributed: the experts of every MoE layer are
split across ranks and tokens travel to the rank that holds their expert.

Why a file of its own: experts.py computes experts that sit on one device, and
train.py runs a training loop. What is new here is everything about *several*
devices: the process groups, the two all-to-alls and their backward, which
gradients are averaged over which ranks, and how a checkpoint stays independent
of the number of ranks. train.py sees one object, made by start(): a Dist for one
process or plain DDP, or an ExpertParallel, with the same methods (wrap, mean,
clip_and_step, build, full_state, ...), so its training step has no branch on how
it runs.

Layout. The world of W ranks is cut into W/N EP groups of N consecutive ranks
(N = expert_parallel). Inside an EP group, rank r (ep_rank) holds experts
[r*E/N, (r+1)*E/N) of every MoE layer; everything else (embeddings, attention,
norms, routers, shared experts) is replicated on every rank, as under DDP. Ranks
with the same ep_rank in different EP groups hold the same experts: they are the
data-parallel replicas of those experts (the "DP group"). Consecutive ranks keep
the all-to-all inside a node when N <= GPUs per node.

    W = 4, N = 2:   EP groups {0,1} {2,3}     DP groups {0,2} {1,3}
                    rank 0, 2: experts [0, E/2)   rank 1, 3: experts [E/2, E)

The dispatch of one MoE layer on one rank (expert_parallel_ffn):

    1 route     the router runs locally on this rank's tokens; capacity and
                dropping apply here, before dispatch, exactly as on one process
    2 sort      assignments sorted by global expert, hence by destination rank
                (expert e lives on ep_rank e // (E/N))
    3 counts    all_to_all_single of the per-expert counts (E,): each rank learns
                how many rows it will receive from every source, per local expert
    4 tokens    all_to_all_single of the token rows, uneven splits
    5 experts   the local experts run on the received rows (experts.moe_ffn,
                ungated: gate weights stay on the token's own rank)
    6 return    all_to_all_single back, the reverse splits
    7 combine   y[t] = sum_a gate_a * out_a, scattered back to the token rows

Autograd flows through both all-to-alls: the backward of an all-to-all is the
all-to-all with the splits swapped (_AllToAll). An expert's gradient therefore
already sums the losses of all N ranks of its EP group; sync_gradients sums it
over the DP group and divides by W, which is the gradient of the mean loss.

Aux losses (Switch, Skywork, z) are computed by the router on each rank's own
micro-batch, as one process does with gradient accumulation over the same
micro-batches: an EP run and a one-process run give the same losses and
gradients. Routing statistics for logging and for the sigmoid router's bias
update use global counts (global_tokens_per_expert). Lory merges experts in
parameter space and sends no token anywhere, so EP does not apply to it.

Volume (per token, per MoE layer, per training step): k assignments, of which a
share (N-1)/N lands on another rank when routing is uniform, each a row of d
numbers crossing 4 times (dispatch and return, forward and backward):
    bytes/token/layer = 4 * k * (N-1)/N * d * bytes_per_element
"""
import datetime
import hashlib
import json
import math
import os
import re
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import CheckpointError, ckpt_path, file_sha256, load_checkpoint, load_weights
from configurator import ConfigError
from experts import moe_ffn
from model import GPT, rope_tables
from router import Routing
from upcycle import target_config, upcycle_from_checkpoint, upcycle_state_dict

EXPERT_MATS = ("gate_proj", "up_proj", "down_proj")   # the stacked (E, ...) tensors of an MoE layer
DEFAULT_TIMEOUT_S = 300   # a collective that waits longer than this ends the job with an error
LAUNCHER_POLL_S = 1.0     # how often a rank checks that its launcher is alive (watch_launcher)
# what gloo and NCCL say when a collective loses a peer process (it died) or waits too long for it
LOST_PEER = re.compile(r"gloo|nccl|connection (reset|closed)|closed by peer|timed out|timeout", re.IGNORECASE)


@dataclass
class EPGroups:
    """This rank's place in the EP x DP layout, and its process groups.
    ep_group: the N ranks that exchange tokens; dp_group: the W/N ranks holding the
    same experts (None when W == N). comm_bytes / comm_seconds count what this
    rank's all-to-alls sent (bench.py reads them)."""
    world: int
    rank: int
    ep_size: int
    ep_rank: int
    ep_group: object = None
    dp_group: object = None
    comm_bytes: int = 0
    comm_seconds: float = 0.0

    def owned(self, n_experts):
        """(lo, hi): the global expert indices this rank holds."""
        per = n_experts // self.ep_size
        return self.ep_rank * per, (self.ep_rank + 1) * per

    def moe_ffn(self, x, token_idx, expert_idx, gates, w1, w3, w2, impl="auto"):
        """MoEFFN calls this instead of experts.moe_ffn when its experts are sharded."""
        return expert_parallel_ffn(x, token_idx, expert_idx, gates, w1, w3, w2, self, impl)


# =============================================================================
# setup and checks

def check_ep_config(cfg, ep_size, world=None):
    """Refuse what EP cannot do, in one line (ValueError). cfg: a GPTConfig."""
    if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1:
        raise ValueError(f"expert_parallel={ep_size!r} must be a positive integer (1 = no expert parallelism)")
    if world is not None and world % ep_size:
        raise ValueError(f"expert_parallel={ep_size} must divide the number of processes ({world})")
    if ep_size == 1 or not cfg.is_moe:
        return
    if cfg.router == "lory":
        raise ValueError("expert_parallel does not apply to router='lory': Lory merges the experts' weights "
                         "per segment and sends no token to an expert; use expert_parallel=1 (plain DDP)")
    if cfg.n_experts % ep_size:
        raise ValueError(f"n_experts={cfg.n_experts} must be divisible by expert_parallel={ep_size} "
                         f"(each rank holds n_experts/expert_parallel experts)")


def init_groups(ep_size):
    """Create the EP and DP process groups (every rank calls this, in the same order).
    Needs dist.init_process_group done; returns this rank's EPGroups."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % ep_size:
        raise ValueError(f"expert_parallel={ep_size} must divide the number of processes ({world})")
    ep = EPGroups(world, rank, ep_size, rank % ep_size)
    for g in range(world // ep_size):                        # EP groups: consecutive ranks
        ranks = list(range(g * ep_size, (g + 1) * ep_size))
        pg = dist.new_group(ranks)
        if rank in ranks:
            ep.ep_group = pg
    if world > ep_size:
        for r in range(ep_size):                             # DP groups: same ep_rank
            ranks = list(range(r, world, ep_size))
            pg = dist.new_group(ranks)
            if rank in ranks:
                ep.dp_group = pg
    return ep


def init_distributed(ep_size, backend="gloo", timeout_s=DEFAULT_TIMEOUT_S, **kw):
    """init_process_group with a bounded timeout (a dead rank ends the job instead
    of hanging it), then the EP/DP groups. kw: init_method, rank, world_size."""
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kw)
    return init_groups(ep_size)


def check_same_config(cfg_dict, ep=None):
    """Every rank must run the same settings: compare a hash over the world and
    raise a one-line ValueError on every rank when any rank differs. ep may be None
    (train.py checks before it builds the groups: a rank whose expert_parallel
    differs would otherwise create other groups and hang the rest)."""
    digest = hashlib.sha256(json.dumps(cfg_dict, sort_keys=True, default=str).encode()).hexdigest()[:16]
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    bad = [r for r, d in enumerate(digests) if d != digests[0]]
    if bad:
        raise ValueError(f"ranks {bad} run a different config than rank 0: start every rank with the same "
                         f"config file and --key=value flags")


def shard_model(model, ep):
    """Keep only this rank's experts in every routed MoE layer and attach ep, so that
    MoEFFN.forward dispatches through expert_parallel_ffn. Works on a full model
    (slices it) or a meta-device one. Call before building the optimizer.
    ep_size 1: nothing to shard, every rank holds every expert (plain DDP)."""
    check_ep_config(model.config, ep.ep_size)   # refuses Lory, E not divisible by N
    if ep.ep_size == 1:
        return model
    lo, hi = ep.owned(model.config.n_experts)
    for ffn in model.routed_layers():
        for m in EXPERT_MATS:
            setattr(ffn, m, nn.Parameter(getattr(ffn, m).detach()[lo:hi].clone()))
        ffn.ep = ep
    return model


def expert_keys(cfg):
    """State-dict keys of the expert stacks that EP shards (blocks.{l}.ffn.gate_proj, ...)."""
    if cfg.router == "lory":
        return []
    return [f"blocks.{l}.ffn.{m}" for l in cfg.moe_layer_ids() for m in EXPERT_MATS]


def expert_param_names(model):
    """Names of the expert stacks that are sharded in this model (empty when none is)."""
    return [k for k in expert_keys(model.config)
            if getattr(model.get_submodule(k.rsplit(".", 1)[0]), "ep", None) is not None]


def broadcast_parameters(model, ep):
    """Make replicas identical at the start: replicated parameters and buffers from
    rank 0, expert stacks from the first rank of each DP group (as DDP does)."""
    experts = set(expert_param_names(model))
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name in experts:
            if ep.dp_group is not None:
                dist.broadcast(t.data, src=ep.ep_rank, group=ep.dp_group)
        else:
            dist.broadcast(t.data, src=0)


# =============================================================================
# how this process runs: one object with the same methods for every kind

def resolve_device(name):
    """'auto' -> cuda, then mps, then cpu; anything else as it is."""
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else "cpu"


def check_ep_world(ep_size, world):
    if world % ep_size:
        raise ConfigError(f"expert_parallel={ep_size} must divide the number of processes ({world}): "
                          f"start N*k processes with torchrun --nproc_per_node, or lower expert_parallel")


def start(cfg):
    """This process's Dist, from torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE)
    and cfg's device, backend, expert_parallel and gradient_accumulation_steps. Under
    torchrun it joins the process group, checks that every rank runs the same config,
    builds the EP and DP groups when expert_parallel=N > 1 (every collective then has
    a timeout, DEFAULT_TIMEOUT_S, so a dead rank ends the job) and, on CUDA, takes GPU
    local_rank."""
    device, N = resolve_device(cfg["device"]), cfg["expert_parallel"]
    if int(os.environ.get("RANK", -1)) == -1:
        check_ep_world(N, 1)
        return Dist(False, 0, 0, 1, device)
    watch_launcher(int(os.environ["RANK"]))
    backend = cfg["backend"] if cfg["backend"] != "auto" else ("nccl" if device.startswith("cuda") else "gloo")
    if N > 1:
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=DEFAULT_TIMEOUT_S))
    else:
        dist.init_process_group(backend=backend)
    check_same_config(cfg)   # before the groups: another expert_parallel would hang them
    rank, local_rank, world = dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size()
    check_ep_world(N, world)
    ep = init_groups(N) if N > 1 else None
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if cfg["gradient_accumulation_steps"] % world:
        raise ConfigError(f"gradient_accumulation_steps={cfg['gradient_accumulation_steps']} must be a multiple "
                          f"of the number of processes ({world})")
    if ep is None:
        return Dist(True, rank, local_rank, world, device)
    return ExpertParallel(rank, local_rank, world, device, ep)


def watch_launcher(rank, poll_s=LAUNCHER_POLL_S):
    """End this rank within poll_s seconds of its launcher's death. torchrun killed by
    SIGKILL leaves its ranks running: they still reach each other, so no collective
    fails or times out, and they would train on for ever. A daemon thread polls the
    parent pid (portable; Linux's PR_SET_PDEATHSIG instead fires when the launcher
    *thread* that started the rank exits). It prints one line on stderr and exits
    with status 1 at once (os._exit): checkpoints are written atomically, so the last
    one loads, and the next run takes the out_dir lock over as a dead run's."""
    if any(t.name == "launcher-watchdog" for t in threading.enumerate()):
        return
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        print(f"error: rank {rank}: its launcher (pid {parent}) is gone; stopping. The last checkpoint is kept.",
              file=sys.stderr, flush=True)
        os._exit(1)
    threading.Thread(target=watch, name="launcher-watchdog", daemon=True).start()


def lost_peer(error):
    """True when a RuntimeError comes from a collective that lost another rank (it died,
    or did not answer within the process group's timeout)."""
    return isinstance(error, RuntimeError) and bool(LOST_PEER.search(str(error)))


class Dist:
    """One process (ddp False), or one of `world` DDP processes: every parameter on
    every process, gradients averaged by DDP during backward. ExpertParallel has the
    same methods, so train.py calls them without asking which it has."""

    def __init__(self, ddp, rank, local_rank, world, device):
        self.ddp, self.rank, self.local_rank, self.world, self.device = ddp, rank, local_rank, world, device

    @property
    def master(self):
        return self.rank == 0

    def log(self, *args):
        if self.master:
            print(*args)

    def describe(self, model):
        """A log line about how the model is split over the processes, or None."""
        return None

    def build(self, gpt_cfg):
        """A new model of config gpt_cfg (GPT's own init), on the CPU."""
        return GPT(gpt_cfg)

    def load(self, gpt_cfg, state, path):
        """The model gpt_cfg with the weights of a full state dict (read from path)."""
        model = GPT(gpt_cfg)
        load_weights(model, state, path)
        return model

    def upcycle(self, path, options):
        """(MoE model on the CPU, upcycled_from): the dense checkpoint at path upcycled
        by copying (upcycle.upcycle_from_checkpoint)."""
        return upcycle_from_checkpoint(path, options, device="cpu")

    def wrap(self, raw_model, compile):
        """What the training step calls: the model, compiled and/or wrapped in DDP."""
        model = torch.compile(raw_model) if compile else raw_model
        if self.ddp:
            model = DDP(model, device_ids=[self.local_rank] if self.device.startswith("cuda") else None)
        return model

    def sync_on_backward(self, model, last):
        """DDP averages the gradients in the backward of the last micro-step only."""
        if self.ddp:
            model.require_backward_grad_sync = last

    def logged_loads(self, routings):
        """tokens_per_expert to log per routed layer instead of the routings' own (None: their own)."""
        return None

    def barrier(self):
        if self.ddp:
            dist.barrier()

    def mean(self, value):
        """A float averaged over the processes (summed in float32, divided in float64)."""
        return self.sum_floats([value]).item() / self.world if self.ddp else value

    def mean_list(self, values):
        """Floats averaged over the processes, each on its own (in float32)."""
        return (self.sum_floats(values) / self.world).tolist() if self.ddp else values

    def sum_floats(self, values):
        """(n,) float32 tensor: the sum over the processes of a list of floats."""
        t = torch.tensor(values, device=self.device)
        dist.all_reduce(t)
        return t

    def sum_(self, tensors):
        """Sum tensors over the processes, in place."""
        for t in tensors if self.ddp else ():
            dist.all_reduce(t)

    def clip_and_step(self, model, optimizer, scaler, max_norm):
        """Clip the global gradient norm (max_norm > 0), step, zero the gradients."""
        if max_norm > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        step_and_zero(optimizer, scaler)

    def full_state(self, model, optimizer):
        """(model state, optimizer state) to save, on rank 0; None on the others."""
        return (model.state_dict(), optimizer.state_dict()) if self.master else None

    def local_optimizer_state(self, saved, optimizer, model):
        """The part of a saved optimizer state this process's optimizer loads."""
        return saved

    def close(self):
        if self.ddp:
            dist.destroy_process_group()


def step_and_zero(optimizer, scaler):
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


class ExpertParallel(Dist):
    """A process of an expert-parallel world (EPGroups ep): rank r of an EP group holds
    experts [r*E/N, (r+1)*E/N) of every MoE layer, everything else is replicated.
    No DDP: replicas start from the same weights (broadcast) and clip_and_step
    averages the gradients (sync_gradients). Checkpoints hold full (E, ...) stacks."""

    def __init__(self, rank, local_rank, world, device, ep):
        super().__init__(True, rank, local_rank, world, device)
        self.ep = ep

    def describe(self, model):
        lo, hi = self.ep.owned(model.config.n_experts)
        return (f"expert parallel: {self.world} ranks = {self.world // self.ep.ep_size} replica(s) x "
                f"{self.ep.ep_size} ranks splitting the experts; rank 0 holds experts [{lo}, {hi}) of every "
                f"MoE layer ({model.num_params() / 1e6:.2f}M parameters on this rank)")

    def build(self, gpt_cfg):
        """GPT's own init for the full model, sliced: the same weights at any N."""
        return build_sharded_model(gpt_cfg, self.ep)

    def load(self, gpt_cfg, state, path):
        """The saved full (E, ...) stacks sliced by global expert."""
        return sharded_from_state(gpt_cfg, shard_state_dict(state, gpt_cfg, self.ep), self.ep, path)

    def upcycle(self, path, options):
        """Online upcycling of this rank's experts only (upcycle_owned)."""
        src = load_checkpoint(path, map_location="cpu")
        state, gpt_cfg, info = upcycle_owned(src["model"], src["model_args"], options, self.ep)
        model = sharded_from_state(gpt_cfg, state, self.ep, path)
        src_path = os.path.abspath(ckpt_path(path))
        return model, {"path": src_path, "sha256": file_sha256(src_path), **info}

    def wrap(self, raw_model, compile):
        model = torch.compile(raw_model) if compile else raw_model
        broadcast_parameters(raw_model, self.ep)
        return model

    def sync_on_backward(self, model, last):
        pass   # gradients are averaged in clip_and_step

    def logged_loads(self, routings):
        """Per routed layer, the tokens per expert of this micro-step summed over all
        ranks / world: the mean micro-batch's load, what one process logs with
        gradient accumulation over the same micro-batches."""
        return [t / self.world for t in global_tokens_per_expert(routings, self.ep)]

    def clip_and_step(self, model, optimizer, scaler, max_norm):
        """Average the gradients over the ranks (which DDP does during backward), clip
        the global norm (the expert shards add over the EP group), step, zero."""
        sync_gradients(model, self.ep)
        if max_norm > 0:
            clip_grad_norm(model, self.ep, max_norm)
        step_and_zero(optimizer, scaler)

    def full_state(self, model, optimizer):
        """Collective: every rank calls it; rank 0 gets the full (E, ...) stacks."""
        state = full_state_dict(model, self.ep), full_optimizer_state(optimizer, model, self.ep)
        return state if self.master else None

    def local_optimizer_state(self, saved, optimizer, model):
        return shard_optimizer_state(saved, optimizer, model, self.ep)


def sharded_from_state(gpt_cfg, local_state, ep, path):
    """build_sharded_model with a one-line CheckpointError for weights that do not fit
    the model (as checkpoint.load_weights)."""
    try:
        return build_sharded_model(gpt_cfg, ep, local_state)
    except RuntimeError as e:
        detail = next((l.strip() for l in str(e).splitlines()[1:] if l.strip()), str(e).splitlines()[0])
        raise CheckpointError(f"{ckpt_path(path)} does not match the model it describes: "
                              f"{detail[:300]}") from None


# =============================================================================
# the dispatch

def _exchange(x, out_splits, in_splits, ep):
    """all_to_all_single: send in_splits[j] rows of x to EP rank j, receive
    out_splits[j] rows from EP rank j. Counts the bytes that leave this rank."""
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    t0 = time.perf_counter()
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=ep.ep_group)
    ep.comm_seconds += time.perf_counter() - t0
    row_bytes = math.prod(x.shape[1:]) * x.element_size()
    ep.comm_bytes += (sum(in_splits) - in_splits[ep.ep_rank]) * row_bytes
    return out


class _AllToAll(torch.autograd.Function):
    """Differentiable all-to-all: the gradient of the rows a rank received goes back
    to the rank that sent them, i.e. the backward is the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, ep):
        ctx.splits, ctx.ep = (out_splits, in_splits), ep
        return _exchange(x, out_splits, in_splits, ep)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _exchange(grad, in_splits, out_splits, ctx.ep), None, None, None


def expert_parallel_ffn(x, token_idx, expert_idx, gates, w1, w3, w2, ep, impl="auto"):
    """The routed experts of one MoE layer with experts sharded over ep.ep_group.

    x: (T, d) this rank's tokens; token_idx, expert_idx, gates: (A,) its kept
    assignments (global expert ids); w1, w3: (E_loc, h, d), w2: (E_loc, d, h) the
    local experts. Returns y (T, d), the same as experts.moe_ffn on the full stacks."""
    N, E_loc = ep.ep_size, w1.shape[0]
    E = N * E_loc
    # 2 sort by global expert = by destination rank (stable: token order inside an expert)
    order = torch.argsort(expert_idx, stable=True)                      # (A,)
    tok_s = token_idx[order]                                            # (A,)
    send_counts = torch.bincount(expert_idx, minlength=E)               # (E,) rows per global expert
    # 3 exchange counts: recv_counts[j, e] = rows rank j sends to my local expert e
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=ep.ep_group)
    recv_counts = recv_counts.view(N, E_loc)                            # (N, E_loc)
    in_splits = send_counts.view(N, E_loc).sum(1).tolist()              # rows to each rank
    out_splits = recv_counts.sum(1).tolist()                            # rows from each rank
    # 4 exchange tokens (uneven splits)
    recv_x = _AllToAll.apply(x[tok_s], out_splits, in_splits, ep)       # (R, d)
    # 5 local experts on the received rows, ungated (each row its own "token")
    R = recv_x.shape[0]
    local_e = torch.arange(E_loc, device=x.device).repeat(N)            # (N*E_loc,) expert of each block
    recv_e = torch.repeat_interleave(local_e, recv_counts.reshape(-1), output_size=R)   # (R,)
    rows = torch.arange(R, device=x.device)
    ones = torch.ones(R, dtype=torch.float32, device=x.device)
    out = moe_ffn(recv_x, rows, recv_e, ones, w1, w3, w2, impl=impl)   # (R, d)
    # 6 send the results back (reverse splits)
    back = _AllToAll.apply(out, in_splits, out_splits, ep)              # (A, d) in sorted order
    # 7 combine with the gates on the token's own rank
    acc = torch.promote_types(back.dtype, torch.float32)
    y = torch.zeros(x.shape, dtype=acc, device=x.device)                # (T, d)
    y = y.index_add(0, tok_s, back.to(acc) * gates[order, None].to(acc))
    return y.to(x.dtype)


# =============================================================================
# gradients and statistics

def _all_reduce_flat(tensors, group):
    """Sum a list of tensors over group with one collective."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    i = 0
    for t in tensors:
        t.copy_(flat[i:i + t.numel()].view_as(t))
        i += t.numel()


def sync_gradients(model, ep):
    """Gradient of the mean loss over all W ranks.
    Replicated parameters: sum over the world / W (what DDP does).
    Expert stacks: autograd through the all-to-all already summed the N ranks of the
    EP group; sum over the DP group (the replicas of the same experts) / W."""
    experts = set(expert_param_names(model))
    dense, exp = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:   # an expert that got no rows, a layer that was skipped
            p.grad = torch.zeros_like(p)
        (exp if name in experts else dense).append(p.grad)
    _all_reduce_flat(dense, None)
    if ep.dp_group is not None:
        _all_reduce_flat(exp, ep.dp_group)
    for g in dense + exp:
        g.div_(ep.world)


def clip_grad_norm(model, ep, max_norm):
    """torch.nn.utils.clip_grad_norm_ for a sharded model: the global norm adds the
    squares of the expert shards over the EP group. Call after sync_gradients."""
    experts = set(expert_param_names(model))
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    dense_sq = sum((g.float().pow(2).sum() for n, g in grads.items() if n not in experts), torch.zeros(()))
    exp_sq = sum((g.float().pow(2).sum() for n, g in grads.items() if n in experts), torch.zeros(()))
    if experts:
        dist.all_reduce(exp_sq, group=ep.ep_group)
    total = (dense_sq + exp_sq).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads.values():
        g.mul_(coef.to(g.dtype))
    return total


@torch.no_grad()
def global_tokens_per_expert(routings, ep):
    """Per routed layer, tokens_per_expert (E,) summed over all W ranks (no grad):
    the load the sigmoid bias update and the logs should see."""
    loads = [r.stats["tokens_per_expert"].clone() for r in routings if isinstance(r, Routing)]
    _all_reduce_flat(loads, None)
    return loads


# =============================================================================
# checkpoints: full (E, ...) stacks by global expert index, whatever the world size

def _gather_experts(t, ep):
    """(E_loc, ...) on each EP rank -> (E, ...) in global expert order."""
    parts = [torch.empty_like(t) for _ in range(ep.ep_size)]
    dist.all_gather(parts, t.contiguous(), group=ep.ep_group)
    return torch.cat(parts, 0)                                          # part j = experts of ep_rank j


def full_expert_stacks(ffn):
    """(gate_proj, up_proj, down_proj) of one MoE layer as full (E, ...) stacks in
    global expert order (detached): gathered over the EP group when the layer is
    sharded (a collective), the layer's own tensors otherwise."""
    stacks = tuple(getattr(ffn, m).detach() for m in EXPERT_MATS)
    ep = getattr(ffn, "ep", None)
    return stacks if ep is None else tuple(_gather_experts(t, ep) for t in stacks)


def full_state_dict(model, ep):
    """model.state_dict() with every expert stack gathered to (E, ...), indexed by
    GLOBAL expert (rank j's local expert i is global expert j*E/N + i). Collective:
    every rank of the EP group calls it; any rank may then save it."""
    experts = set(expert_param_names(model))
    return {k: (_gather_experts(v, ep) if k in experts else v) for k, v in model.state_dict().items()}


def shard_state_dict(state, cfg, ep):
    """A full state dict -> the one this rank's sharded model loads: expert stacks
    sliced to the experts it owns, [ep_rank*E/N, (ep_rank+1)*E/N) by GLOBAL index."""
    experts = set(expert_keys(cfg))
    lo, hi = ep.owned(cfg.n_experts)
    return {k: (v[lo:hi] if k in experts else v) for k, v in state.items()}


def _param_names_by_index(optimizer, model):
    """Optimizer state dicts index parameters by position over the param groups."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def full_optimizer_state(optimizer, model, ep):
    """optimizer.state_dict() with the moments of expert stacks gathered to (E, ...)
    (AdamW exp_avg, exp_avg_sq), so that a run resumes at any world size."""
    sd = optimizer.state_dict()
    experts = set(expert_param_names(model))
    names = _param_names_by_index(optimizer, model)
    state = {}
    for i, st in sd["state"].items():
        sharded = names[i] in experts
        state[i] = {k: (_gather_experts(v, ep) if sharded and torch.is_tensor(v) and v.dim() else v)
                    for k, v in st.items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def shard_optimizer_state(sd, optimizer, model, ep):
    """The inverse of full_optimizer_state for this rank: slice the expert moments."""
    experts = set(expert_param_names(model))
    names = _param_names_by_index(optimizer, model)
    lo, hi = ep.owned(model.config.n_experts)
    state = {}
    for i, st in sd["state"].items():
        sharded = names[int(i)] in experts
        state[i] = {k: (v[lo:hi] if sharded and torch.is_tensor(v) and v.dim() else v) for k, v in st.items()}
    return {"state": state, "param_groups": sd["param_groups"]}


# =============================================================================
# building a sharded model

def build_sharded_model(cfg, ep, local_state=None):
    """GPT(cfg) holding only this rank's experts.
    local_state None: GPT's own random init, drawn for the full model and sliced,
    so every world size starts from the same weights (materialises the full model
    once). local_state given (this rank's slice: shard_state_dict or upcycle_owned):
    built on the meta device and filled from it, so the full expert stacks never
    exist on this rank."""
    if local_state is None:
        return shard_model(GPT(cfg), ep)
    with torch.device("meta"):
        model = GPT(cfg)
    shard_model(model, ep)
    model.to_empty(device="cpu")              # new, untied tensors: tie and rebuild below
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    model.rope_cos, model.rope_sin = rope_tables(cfg)
    model.load_state_dict(local_state)
    return model


def upcycle_owned(dense_state, dense_args, options, ep):
    """Online upcycling under EP: the MoE state dict of this rank, holding only the
    experts it owns ([ep_rank*E/N, (ep_rank+1)*E/N) of every MoE layer), equal to
    upcycle.upcycle_state_dict's full result sliced (upcycle_state_dict(experts=...)
    builds one layer at a time and slices it at once). Returns (state, cfg, info)."""
    cfg, _ = target_config(dense_args, options.get("model_args"), options.get("granularity"),
                           options.get("expansion_rate"))
    check_ep_config(cfg, ep.ep_size)
    if options.get("drop_ratio"):
        raise ValueError("drop_ratio > 0 is not built per rank under expert_parallel: upcycle offline "
                         "(python upcycle.py --method=drop) and train the MoE checkpoint")
    return upcycle_state_dict(dense_state, dense_args, options, experts=ep.owned(cfg.n_experts))
