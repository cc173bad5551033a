"""
The numbers about experts that train.py logs and eval.py reports: routing
statistics averaged over a log interval, the train and eval records of
metrics.jsonl, per-domain expert usage, the expert-similarity monitor (Skywork;
He et al.), the dense checkpoint an upcycled model came from, and eval.py's
per-layer routing and Lory diagnostics (docs/METHODS.md section 8).
"""
import math

import numpy as np
import torch

import parallel
from checkpoint import CheckpointError, file_sha256, load_checkpoint
from router import Routing
from upcycle import FFN_MATS, dense_ffn_weights


# ----------------------------------------------------------------------------- training logs

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
    empty window, as the straight run has at that step, and writes the same records.
    tokens_per_iter: one step's global tokens over dist.world processes; block_size:
    the training sequence length (for the attention FLOPs of MFU)."""

    def __init__(self, metrics, dist, tokens_per_iter, block_size, gpu_name):
        self.metrics, self.dist, self.gpu_name = metrics, dist, gpu_name
        self.tokens_per_iter, self.block_size = tokens_per_iter, block_size
        self.reset()

    def reset(self):
        self.stats = StatsAccumulator()
        self.loss_sum, self.n_steps, self.step_seconds, self.lr = 0.0, 0, 0.0, None

    def add(self, loss, seconds, lr):
        """One training step: its loss, its seconds (the step only) and learning rate."""
        self.loss_sum, self.n_steps = self.loss_sum + loss, self.n_steps + 1
        self.step_seconds, self.lr = self.step_seconds + seconds, lr

    def close(self, model, iter_num, alphas):
        """alphas: the auxiliary-loss coefficient per routed layer (logged with the stats)."""
        if self.n_steps and self.dist.master:
            rec, line = self.record(model, iter_num, alphas)
            self.metrics.write(rec)
            self.dist.log(line)
        self.reset()

    def record(self, model, iter_num, alphas):
        """(metrics.jsonl record, console line) of the window: mean loss, speed, MFU, and
        the mean routing statistics per MoE layer. Speed is of the training steps
        alone (evals and checkpoint saves excluded); tok_per_s is global, MFU is per
        device (model.GPT.throughput)."""
        seconds = self.step_seconds / self.n_steps   # mean seconds of one training step
        loss, lr, tokens = self.loss_sum / self.n_steps, self.lr, self.tokens_per_iter
        thr = model.throughput(tokens, seconds, self.dist.world, self.block_size, self.gpu_name)
        tok_s, mfu = thr["tok_per_s"], thr.get("mfu")
        rec = {"iter": iter_num, "tokens": iter_num * tokens, "split": "train",
               "loss": loss, "lr": lr, "ms_per_iter": seconds * 1000, "tok_per_s": tok_s,
               "tok_per_s_per_device": thr["tok_per_s_per_device"]}
        if mfu is not None:
            rec["mfu"] = mfu
        line = (f"iter {iter_num}: loss {loss:.4f}, lr {lr:.2e}, {seconds * 1000:.0f} ms/iter, "
                f"{tok_s:,.0f} tok/s (global)" + (f", MFU {mfu * 100:.1f}%" if mfu is not None else ""))
        layers = self.stats.layers()
        if layers:
            if alphas:
                rec["alpha"] = alphas
            rec["moe"] = layers
            line += moe_summary(layers)
        return rec, line


def moe_summary(layers):
    """Compact MoE part of the log line: worst layer's max/min load and mean drop rate."""
    parts = []
    loads = [l["tokens_per_expert"] for l in layers if "tokens_per_expert" in l]
    if loads:
        ratio = max(max(x) / min(x) if min(x) > 0 else math.inf for x in loads)   # inf: an expert got no token
        drop = np.mean([l["drop_rate"] for l in layers if "drop_rate" in l])
        parts.append(f"load max/min {ratio:.1f}, drop {drop * 100:.1f}%")
    ent = [l["merge_entropy"] for l in layers if "merge_entropy" in l]
    if ent:
        parts.append(f"merge entropy {np.mean(ent):.2f}")
    return (" | " + ", ".join(parts)) if parts else ""


def eval_record(ev, run, tokens_per_iter):
    """The metrics.jsonl record of one evaluation (plus the expert-similarity monitor
    for upcycled MoE models). run: the run state (iter_num, raw_model, upcycled_from,
    dense_ffns)."""
    rec = {"iter": run.iter_num, "tokens": run.iter_num * tokens_per_iter, "split": "eval",
           "train_loss": ev["train_loss"], "val_loss": ev["val_loss"]}
    if "domain_usage" in ev:
        rec["domain_usage"] = ev["domain_usage"]
    if run.upcycled_from is not None and run.raw_model.config.is_moe:
        rec.update(expert_similarity_record(run.raw_model, run.dense_ffns))
    return rec


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
            m = domain_counts(dom[r.token_idx.cpu()], r.expert_idx.cpu(), n_dom, E)
        else:
            w = r["merge_weights"].float().cpu()                          # (B, S, E)
            S, E = w.shape[1], w.shape[2]
            seg_dom = dom.view(B, S, -1)[:, :, -1].reshape(-1)            # each segment's last token's
            m = domain_sums(seg_dom, w.reshape(-1, E), n_dom)
        out[l] = m if out[l] is None else out[l] + m
    return out


def domain_counts(domains, experts, n_domains, n_experts, dtype=torch.float32):
    """(n_domains, n_experts) counts of the (domain, expert) pairs: domains, experts (A,)
    of A kept assignments (the domain of each assignment's token)."""
    m = torch.zeros(n_domains, n_experts, dtype=dtype)
    m.index_put_((domains, experts), torch.ones(len(experts), dtype=dtype), accumulate=True)
    return m


def domain_sums(domains, values, n_domains):
    """(n_domains, ...): the rows of values (N, ...) summed per domain; domains (N,)."""
    return torch.zeros((n_domains,) + tuple(values.shape[1:]), dtype=values.dtype).index_add_(0, domains, values)


# ----------------------------------------------------------------------------- similarity monitor

def expert_similarity_record(model, dense_ffns):
    """Per MoE layer of an upcycled model: mean pairwise cosine similarity of the
    experts that started as copies, and each expert's similarity to the dense FFN it
    came from (Skywork / He et al. monitor: it falls as experts specialise; the run
    whose experts stay most similar is worst). A fine-grained upcycle (G shards per
    dense FFN) only copies shard e mod G, so the mean is over same-shard pairs
    (mean_pairwise_similarity): 1.0 right after a noiseless upcycle.
    Under expert parallelism the full expert stacks are gathered first."""
    G = model.config.ffn_hidden // model.config.expert_hidden
    full = {l: parallel.full_expert_stacks(f) for l, f in model.moe_layers()}   # gathered under EP
    rec = {"expert_similarity": [round(mean_pairwise_similarity(f, G), 6) for f in full.values()]}
    if dense_ffns:
        rec["similarity_to_dense"] = [[round(v, 6) for v in similarity_to_dense(f, dense_ffns[l]).tolist()]
                                      for l, f in full.items() if l in dense_ffns]
    return rec


def load_dense_source(upcycled_from):
    """(state dict, changed) of the dense checkpoint an upcycled model came from
    (upcycled_from["path"]); changed: its sha256 differs from the one recorded at
    upcycling (e.g. a dense run that trained on). (None, False) when no path is
    recorded; CheckpointError when the file is gone or unreadable."""
    path = (upcycled_from or {}).get("path")
    if not path:
        return None, False
    state = load_checkpoint(path)["model"]
    want = upcycled_from.get("sha256")
    return state, bool(want) and file_sha256(path) != want


def source_ffns(upcycled_from, model, log, resumed=False):
    """{layer: (W1, W3, W2)} of the dense checkpoint an upcycled model came from, or {}
    when the source is unknown or gone, or (resumed) has changed since upcycling."""
    try:
        state, changed = load_dense_source(upcycled_from)
    except CheckpointError:
        return {}
    if state is None:
        return {}
    if resumed and changed:
        log(f"note: {upcycled_from['path']} changed since it was upcycled (sha256 differs): "
            f"similarity_to_dense is not logged")
        return {}
    return {l: dense_ffn_weights(state, l) for l, _ in model.moe_layers()
            if f"blocks.{l}.ffn.gate_proj.weight" in state}


def _stacks(experts):
    """An MoEFFN/LoryFFN module, a tuple/list of (E, ...) stacks, or one stack -> list of stacks."""
    if isinstance(experts, torch.Tensor):
        return [experts.detach()]
    if isinstance(experts, (tuple, list)):
        return [t.detach() for t in experts]
    if all(hasattr(experts, m) for m in FFN_MATS):
        return [getattr(experts, m).detach() for m in FFN_MATS]
    raise ValueError(f"expected an MoE FFN module or (E, ...) weight stacks, got {type(experts).__name__}")


def _cos(a, b):
    """Row-wise cosine of (E, n) and (E or 1, n); 0 where a vector is zero."""
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-30)


def expert_similarity(experts):
    """(E, E) cosine similarity of the experts' flattened weights (gate, up and down
    of each expert concatenated into one vector), computed in fp32.
    experts: an MoEFFN/LoryFFN module or a tuple of (E, ...) stacks."""
    stacks = _stacks(experts)
    E = stacks[0].shape[0]
    v = torch.cat([s.reshape(E, -1).float() for s in stacks], dim=1)
    v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return v @ v.t()


def mean_similarity_of_pairs(S, granularity=1):
    """Mean of an (E, E) expert similarity matrix over the pairs e != e' that hold
    the same shard of the dense FFN, e = e' mod G (every pair when G = 1). A float;
    1.0 when there is no such pair (a single expert, or E = G)."""
    E, G = S.shape[0], int(granularity)
    if G < 1 or E % G:
        raise ValueError(f"granularity={granularity} must be >= 1 and divide the {E} experts")
    e = torch.arange(E, device=S.device)
    pairs = (e[:, None] % G == e[None, :] % G) & (e[:, None] != e[None, :])   # (E, E)
    if not pairs.any():
        return 1.0
    return float(S[pairs].mean())


def mean_pairwise_similarity(experts, granularity=1):
    """Mean cosine similarity between copies of the same dense weights (He et al.;
    Skywork): 1.0 right after a noiseless upcycle, falls as experts specialise.
    granularity G: for a fine-grained upcycle expert e holds shard e mod G, and only
    same-shard pairs (e = e' mod G) started as copies; pairs holding different
    shards are unrelated weights (cosine ~0), so averaging over all pairs gives
    about (E/G - 1)/(E - 1) at step 0 (0.43 at E=8, G=2), not 1.0. Pass the
    upcycle's G (cfg.ffn_hidden // cfg.expert_hidden of an upcycled model), 1 for
    coarse upcycling or a model trained from scratch (all pairs). A float."""
    return mean_similarity_of_pairs(expert_similarity(experts), granularity)


def similarity_to_dense(experts, dense):
    """(E,) similarity of each expert to the dense FFN it was upcycled from.
    experts: MoE FFN module or (gate (E,h,d), up (E,h,d), down (E,d,h)) stacks;
    dense: a SwiGLU module or (W1 (d_ff,d), W3 (d_ff,d), W2 (d,d_ff)).
    Fine-grained experts (h = d_ff/G) are compared with their shard g = e mod G.
    The cosine is taken per matrix and averaged over the three, so the upcycling
    scalings (exact: W2 only; megatron: all three) leave it at 1."""
    gate, up, down = (s.float() for s in _stacks(experts))
    if isinstance(dense, (tuple, list)):
        w1, w3, w2 = (t.detach().float() for t in dense)
    else:
        w1, w3, w2 = (getattr(dense, m).weight.detach().float() for m in FFN_MATS)
    E, h, d = gate.shape
    d_ff = w1.shape[0]
    if d_ff % h:
        raise ValueError(f"expert width {h} does not divide the dense ffn_hidden={d_ff}")
    G = d_ff // h
    shard = torch.arange(E) % G
    d1 = w1.view(G, h, d)[shard].reshape(E, -1)
    d3 = w3.view(G, h, d)[shard].reshape(E, -1)
    d2 = w2.view(d, G, h).permute(1, 0, 2)[shard].reshape(E, -1)
    sims = [_cos(gate.reshape(E, -1), d1), _cos(up.reshape(E, -1), d3), _cos(down.reshape(E, -1), d2)]
    return torch.stack(sims).mean(0)


# ----------------------------------------------------------------------------- eval.py's per-layer diagnostics

def _entropy(p, dim=-1):
    return -(p * torch.log(p.clamp_min(1e-20))).sum(dim)


def routing_diagnostics(token_idx, expert_idx, n_tokens, n_experts, top_k, probs=None,
                        token_domains=None, n_domains=None):
    """Diagnostics of one routed layer from its kept assignments.

    token_idx, expert_idx: (A,) kept (token, expert) assignments over n_tokens tokens
    (dropped assignments are absent, as in router.Routing).
    probs: optional (n_tokens, E) gate distribution for the gate statistics.
    token_domains: optional (n_tokens,) domain id of each token, for domain usage.

    Returns a dict of plain Python values:
      tokens_per_expert (E,)  kept assignments per expert
      load_fraction (E,)      tokens_per_expert / all kept assignments (uniform: 1/E)
      drop_rate               1 - A / (k * n_tokens)
      load_cv                 std/mean of tokens_per_expert (population std; 0 = balanced)
      load_entropy            entropy of load_fraction in nats (log E = balanced)
      coactivation (E, E)     [i][j] = fraction of tokens sent to both i and j
                              (diagonal: fraction of tokens sent to i)
      gate_entropy, max1_max2, max2_max3  (with probs) mean per-token entropy of the
                              gate distribution and ratios of its sorted top-3
      domain_usage (D, E)     (with token_domains) fraction of each domain's kept
                              assignments that went to each expert (rows sum to 1)
    """
    token_idx = torch.as_tensor(token_idx, dtype=torch.long).reshape(-1).cpu()
    expert_idx = torch.as_tensor(expert_idx, dtype=torch.long).reshape(-1).cpu()
    E = n_experts
    load = torch.bincount(expert_idx, minlength=E).double()
    total = load.sum()
    frac = load / total.clamp_min(1)
    onehot = torch.zeros(n_tokens, E, dtype=torch.float64)
    onehot[token_idx, expert_idx] = 1.0
    coact = onehot.t() @ onehot / max(n_tokens, 1)
    out = {
        "tokens_per_expert": load.tolist(),
        "load_fraction": frac.tolist(),
        "drop_rate": float(1.0 - total / max(top_k * n_tokens, 1)),
        "load_cv": float(load.std(unbiased=False) / load.mean().clamp_min(1e-9)),
        "load_entropy": float(_entropy(frac)),
        "coactivation": coact.tolist(),
    }
    if probs is not None:
        p = torch.as_tensor(probs).double().cpu()
        out["gate_entropy"] = float(_entropy(p).mean())
        if E >= 2:
            top = p.topk(min(3, E), dim=-1).values.clamp_min(1e-20)
            out["max1_max2"] = float((top[:, 0] / top[:, 1]).mean())
            if E >= 3:
                out["max2_max3"] = float((top[:, 1] / top[:, 2]).mean())
    if token_domains is not None:
        dom = torch.as_tensor(token_domains, dtype=torch.long).reshape(-1).cpu()
        D = n_domains if n_domains is not None else int(dom.max()) + 1
        m = domain_counts(dom[token_idx], expert_idx, D, E, torch.float64)
        out["domain_usage"] = (m / m.sum(-1, keepdim=True).clamp_min(1e-12)).tolist()
    return out


def lory_diagnostics(weights, segment_domains=None, n_domains=None):
    """Diagnostics of one Lory layer from its merge weights.

    weights: (N, E) merge weights of N segments (rows sum to 1).
    segment_domains: optional (N,) domain of each segment (that of its last token).
    Returns merge_weight_mean (E,), merge_entropy (mean per segment, nats),
    active_experts (mean number of experts with weight > 2/E, Lory section 5), and
    with domains: domain_merge_weights (D, E) mean weights per domain and
    domain_active_experts (D,).
    """
    w = torch.as_tensor(weights).double().cpu()
    E = w.shape[-1]
    w = w.reshape(-1, E)
    active = (w > 2.0 / E).double().sum(-1)
    out = {
        "merge_weight_mean": w.mean(0).tolist(),
        "merge_entropy": float(_entropy(w).mean()),
        "active_experts": float(active.mean()),
    }
    if segment_domains is not None:
        dom = torch.as_tensor(segment_domains, dtype=torch.long).reshape(-1).cpu()
        D = n_domains if n_domains is not None else int(dom.max()) + 1
        cnt = torch.bincount(dom, minlength=D).double().clamp_min(1)
        out["domain_merge_weights"] = (domain_sums(dom, w, D) / cnt[:, None]).tolist()
        out["domain_active_experts"] = (domain_sums(dom, active, D) / cnt).tolist()
    return out
