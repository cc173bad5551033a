"""
Evaluate, diagnose, plot, compare and sample any checkpoint the project writes
(dense, routed MoE, upcycled, Lory).

    python eval.py --ckpt=out/demo/upcycled                 # loss, ppl, routing diagnostics
    python eval.py --ckpt=out/demo/upcycled --json          # ... last stdout line: one JSON object
    python eval.py --ckpt=out/demo/upcycled --plots         # ... and PNGs in out/demo/upcycled/plots/
    python eval.py --compare out/demo/dense_continued out/demo/upcycled out/demo/moe_scratch --out=out/compare
    python eval.py --ckpt=out/demo/upcycled --sample --prompt="The " --max_new_tokens=200 --seed=0

What is measured (../shared/docs/METHODS.md sections 2-6)
---------------------------------------------------------
On a fixed, seeded set of val batches (TokenDataset.fixed_batches(seed=1234), the
same batches train.py evaluates on when --batches/--batch_size match its
eval_iters/batch_size), so numbers are comparable across runs:

* val loss and perplexity, overall and per data domain (document source);
* routed MoE layers: tokens per expert, drop rate (dropped / (k*T)), gate entropy,
  Max1/Max2 and Max2/Max3 of the sorted gate probabilities, load coefficient of
  variation, expert-pair co-activation (fraction of tokens that use experts i and
  j together; the diagonal is the fraction of tokens that use i), per-domain
  expert usage;
* Lory layers: per-domain mean merge weights, active experts (weight > 2/E), merge
  entropy, and the loss without segment 1 (positions >= segment_len), because
  segment 1 routes on its own mean and so sees its own future;
* every MoE layer: pairwise cosine similarity of the experts' weights and, for
  upcycled models, each expert's similarity to the dense FFN it was copied from.

Everything is an importable function (evaluate_checkpoint, routing_diagnostics,
plot_*, make_plots, compare_runs, sample); the CLI at the bottom only wires them.
Errors the user can fix (not a checkpoint, no val data, bad metrics file) are one
line on stderr and exit status 2.
"""
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.abspath(__file__))
VAL_SEED = 1234          # the seed train.py uses for its fixed val batches
DEFAULT_BATCHES = 20     # = train.py's eval_iters default
DEFAULT_BATCH_SIZE = 16  # = train.py's batch_size default


class EvalError(Exception):
    """A problem the user can fix; the CLI prints it as one line and exits 2."""


# ============================================================================ loading

def load_run(ckpt_dir, device="cpu"):
    """(model in eval mode, checkpoint dict) for an out_dir or .pt path.
    Raises EvalError for anything that is not a readable project checkpoint."""
    from checkpoint import CheckpointError, load_model
    if not os.path.exists(ckpt_dir):
        raise EvalError(f"{ckpt_dir} does not exist (pass --ckpt=OUT_DIR of a training run)")
    try:
        model, ckpt = load_model(ckpt_dir, device=device)
    except CheckpointError as e:
        raise EvalError(str(e)) from None
    except (KeyError, ValueError, RuntimeError) as e:   # model_args/state_dict mismatch
        raise EvalError(f"{ckpt_dir}: checkpoint does not build a model: {type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]}") from None
    model.eval()
    return model, ckpt


def model_kind(model):
    """'dense', 'moe' (routed experts) or 'lory' (merged experts)."""
    from model import LoryFFN
    layers = model.moe_layers()
    if not layers:
        return "dense"
    return "lory" if isinstance(layers[0][1], LoryFFN) else "moe"


def resolve_data_dir(ckpt, data_dir=None):
    """The data directory to evaluate on: explicit data_dir, else the checkpoint
    config's data_dir, else data/<dataset> (train.py's rule)."""
    if data_dir:
        return data_dir
    cfg = ckpt.get("config") or {}
    if cfg.get("data_dir"):
        d = cfg["data_dir"]
        if os.path.isdir(d) or os.path.isabs(d):
            return d
        return os.path.join(ROOT, d) if os.path.isdir(os.path.join(ROOT, d)) else d
    return os.path.join(ROOT, "data", cfg.get("dataset", "multidomain"))


def _prepare_hint(data_dir):
    return f"run {os.path.join(data_dir, 'prepare.py')} (or pass --data_dir)"


def load_val_data(ckpt, data_dir=None, split="val"):
    """TokenDataset for the checkpoint's data; EvalError naming the prepare.py to run."""
    from data.dataset import TokenDataset
    d = resolve_data_dir(ckpt, data_dir)
    try:
        ds = TokenDataset(d, split)
    except FileNotFoundError as e:
        msg = str(e).splitlines()[0] if str(e) else f"{d} has no {split} data"
        if "prepare" not in msg:
            msg += f"; {_prepare_hint(d)}"
        raise EvalError(f"no {split} data for this checkpoint: {msg}") from None
    vocab = ckpt["model_args"]["vocab_size"]
    if ds.meta["vocab_size"] != vocab:
        raise EvalError(f"{d} has vocab_size={ds.meta['vocab_size']} but the checkpoint has {vocab}: "
                        f"pass the --data_dir it was trained on")
    return ds


def load_metrics(run_dir):
    """Records of run_dir/metrics.jsonl ([] if absent). Reuses train.read_metrics,
    which skips (and reports on stderr) a truncated last line."""
    from train import read_metrics
    path = os.path.join(run_dir, "metrics.jsonl") if os.path.isdir(run_dir) else run_dir
    if not os.path.exists(path):
        return []
    try:
        return read_metrics(path)
    except ValueError as e:
        raise EvalError(str(e)) from None


# ============================================================================ diagnostics

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
        m = torch.zeros(D, E, dtype=torch.float64)
        m.index_put_((dom[token_idx], expert_idx), torch.ones(len(token_idx), dtype=torch.float64), accumulate=True)
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
        out["domain_merge_weights"] = (torch.zeros(D, E, dtype=torch.float64).index_add_(0, dom, w)
                                       / cnt[:, None]).tolist()
        out["domain_active_experts"] = (torch.zeros(D, dtype=torch.float64).index_add_(0, dom, active)
                                        / cnt).tolist()
    return out


def cosine_matrix(stacks):
    """(E, E) cosine similarity of experts; stacks: list of (E, ...) tensors, each
    expert's slices concatenated into one vector (fallback if upcycle.py lacks it)."""
    E = stacks[0].shape[0]
    v = torch.cat([s.detach().reshape(E, -1).float() for s in stacks], dim=1)
    v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return v @ v.t()


def expert_similarity_matrix(ffn):
    """(E, E) cosine similarity of an MoE layer's experts (upcycle.expert_similarity
    when available, else cosine_matrix)."""
    try:
        from upcycle import expert_similarity
        return expert_similarity(ffn)
    except (ImportError, AttributeError, TypeError, ValueError):
        return cosine_matrix([ffn.gate_proj, ffn.up_proj, ffn.down_proj])


def _similarity_to_dense(ffn, dense_state, layer):
    """(E,) cosine of each expert to the dense FFN of `layer` (per-matrix mean)."""
    p = f"blocks.{layer}.ffn."
    dense = tuple(dense_state[p + m + ".weight"] for m in ("gate_proj", "up_proj", "down_proj"))
    try:
        from upcycle import similarity_to_dense
        return similarity_to_dense(ffn, dense)
    except (ImportError, AttributeError):
        pass
    sims = []
    for stack, w in zip((ffn.gate_proj, ffn.up_proj, ffn.down_proj), dense):
        E = stack.shape[0]
        a, b = stack.detach().reshape(E, -1).float(), w.float().reshape(1, -1)
        if a.shape[1] != b.shape[1]:
            raise ValueError("fine-grained experts: use upcycle.similarity_to_dense")
        sims.append((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-30))
    return torch.stack(sims).mean(0)


def _load_dense_source(ckpt, notes):
    """State dict of the dense checkpoint an upcycled model came from, or None."""
    src = (ckpt.get("upcycled_from") or {}).get("path")
    if not src:
        return None
    from checkpoint import CheckpointError, file_sha256, load_checkpoint
    try:
        dense = load_checkpoint(src)
    except CheckpointError as e:
        notes.append(f"no similarity to the dense source: {e}")
        return None
    want = ckpt["upcycled_from"].get("sha256")
    if want and file_sha256(src) != want:
        notes.append(f"dense source {src} changed since upcycling (sha256 differs): similarity is to the current file")
    return dense["model"]


# ============================================================================ evaluation

@torch.no_grad()
def evaluate_model(model, batches, n_domains, domain_names=None, skip_positions=0, device="cpu"):
    """Evaluate `model` on a list of (x, y, domains_y) batches. Returns the result
    dict of evaluate_checkpoint without the checkpoint/run fields."""
    from model import LoryFFN
    from router import Routing
    model.eval()
    domain_names = domain_names or [f"domain{i}" for i in range(n_domains)]
    moe = model.moe_layers()
    E = model.config.n_experts
    k = model.config.top_k
    nll_sum = torch.zeros(n_domains, dtype=torch.float64)
    tok_cnt = torch.zeros(n_domains, dtype=torch.float64)
    skip_sum, skip_cnt = 0.0, 0
    per_layer = [{"tok": [], "exp": [], "dom": [], "gate": {}, "w": [], "wdom": []} for _ in moe]
    offset = 0
    for x, y, dom in batches:
        x, y = x.to(device), y.to(device)
        B, T = x.shape
        logits, _, routings = model(x, y)
        nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1),
                              reduction="none", ignore_index=-1).view(B, T).double().cpu()
        valid = (y >= 0).cpu()
        d = dom.cpu().long()
        nll_sum.index_add_(0, d[valid], nll[valid])
        tok_cnt.index_add_(0, d[valid], torch.ones(int(valid.sum()), dtype=torch.float64))
        if skip_positions:
            v = valid[:, skip_positions:]
            skip_sum += float(nll[:, skip_positions:][v].sum())
            skip_cnt += int(v.sum())
        flat_dom = d.reshape(-1)
        for acc, r in zip(per_layer, routings):
            if isinstance(r, Routing):
                acc["tok"].append(r.token_idx.cpu() + offset)
                acc["exp"].append(r.expert_idx.cpu())
                acc["dom"].append(flat_dom)
                for key in ("gate_entropy", "max1_max2", "max2_max3"):
                    if key in r.stats:
                        acc["gate"].setdefault(key, []).append(float(r.stats[key]))
            else:
                w = r["merge_weights"].float().cpu()                       # (B, S, E)
                S = w.shape[1]
                acc["w"].append(w.reshape(-1, w.shape[-1]))
                acc["wdom"].append(d.view(B, S, -1)[:, :, -1].reshape(-1))  # domain at each segment's end
        offset += B * T

    total = float(tok_cnt.sum())
    val_loss = float(nll_sum.sum() / max(total, 1))
    res = {
        "val_loss": val_loss,
        "val_ppl": math.exp(min(val_loss, 50)),
        "tokens": int(total),
        "per_domain": {},
    }
    for i, name in enumerate(domain_names):
        if tok_cnt[i] > 0:
            l = float(nll_sum[i] / tok_cnt[i])
            res["per_domain"][name] = {"loss": l, "ppl": math.exp(min(l, 50)), "tokens": int(tok_cnt[i])}
    if skip_positions:
        l = skip_sum / max(skip_cnt, 1)
        res["val_loss_from_pos"] = {"pos": skip_positions, "loss": l, "ppl": math.exp(min(l, 50)),
                                    "tokens": skip_cnt}

    layers = []
    for (layer_id, ffn), acc in zip(moe, per_layer):
        if isinstance(ffn, LoryFFN):
            diag = lory_diagnostics(torch.cat(acc["w"]), torch.cat(acc["wdom"]), n_domains)
            diag = {"layer": layer_id, "kind": "lory", **diag}
            diag["domain_merge_weights"] = dict(zip(domain_names, diag["domain_merge_weights"]))
            diag["domain_active_experts"] = dict(zip(domain_names, diag["domain_active_experts"]))
        else:
            diag = routing_diagnostics(torch.cat(acc["tok"]), torch.cat(acc["exp"]), offset, E, k,
                                       token_domains=torch.cat(acc["dom"]), n_domains=n_domains)
            # gate statistics: each batch's mean (router.routing_stats), batches are equal-sized
            diag.update({key: float(np.mean(v)) for key, v in acc["gate"].items()})
            diag = {"layer": layer_id, "kind": "routed", **diag}
            diag["domain_usage"] = dict(zip(domain_names, diag["domain_usage"]))
        S = expert_similarity_matrix(ffn).float()
        diag["expert_similarity"] = S.tolist()
        diag["mean_pairwise_similarity"] = (float((S.sum() - S.diagonal().sum()) / (E * (E - 1)))
                                            if E > 1 else 1.0)
        layers.append(diag)
    if layers:
        res["layers"] = layers
    return res


def evaluate_checkpoint(ckpt_dir, batches=DEFAULT_BATCHES, batch_size=DEFAULT_BATCH_SIZE, data_dir=None,
                        device="cpu", skip_positions=None, eval_capacity_factor=None, seed=VAL_SEED):
    """Load a checkpoint and evaluate it on fixed, seeded val batches.

    batches x batch_size sequences of the run's block_size, drawn by
    TokenDataset.fixed_batches(seed=1234): the same for every run on the same data.
    skip_positions: also report the loss over positions >= this (None: segment_len
    for Lory, else off) -- the causal Lory loss, or a dense model's loss on the same
    positions for a fair comparison. eval_capacity_factor: override the checkpoint's
    (to measure drops at a given capacity). Returns a JSON-serialisable dict:

      ckpt, iter_num, kind ('dense'|'moe'|'lory'), router, n_experts, top_k,
      eval_capacity_factor, params, active_params, data_dir,
      batches, batch_size, block_size, tokens, val_loss, val_ppl,
      per_domain {name: {loss, ppl, tokens}}, [val_loss_from_pos {pos, loss, ppl, tokens}],
      [layers: one dict per MoE layer (routing_diagnostics / lory_diagnostics keys with
      domain-keyed usage, expert_similarity (E, E), mean_pairwise_similarity,
      [similarity_to_dense (E,)])], [lory {segment_len, val_loss_all, val_loss_causal,
      val_ppl_causal}], upcycled_from, notes (list of strings).
    """
    model, ckpt = load_run(ckpt_dir, device)
    ds = load_val_data(ckpt, data_dir)
    cfg = ckpt.get("config") or {}
    T = min(int(cfg.get("block_size", model.config.block_size)), model.config.block_size)
    kind = model_kind(model)
    if kind == "lory" and T % model.config.segment_len:
        T -= T % model.config.segment_len
    if skip_positions is None:
        skip_positions = model.config.segment_len if kind == "lory" else 0
    if not 0 <= skip_positions < T:
        raise EvalError(f"skip_positions={skip_positions} must be in 0..{T - 1} (the eval windows are {T} tokens)")
    if eval_capacity_factor is not None:
        for _, ffn in model.moe_layers():
            if hasattr(ffn.router, "eval_capacity_factor"):
                ffn.router.eval_capacity_factor = eval_capacity_factor
    try:
        fixed = ds.fixed_batches(batches, batch_size, T, seed=seed)
    except ValueError as e:
        raise EvalError(f"cannot draw {batches} val batches of {batch_size}x{T}: {e}") from None
    notes = []
    res = evaluate_model(model, fixed, ds.n_domains, ds.domain_names, skip_positions, device)
    if kind == "lory":
        lf = res["val_loss_from_pos"]
        res["lory"] = {"segment_len": model.config.segment_len, "first_segment": model.config.lory_first_segment,
                       "val_loss_all": res["val_loss"], "val_loss_causal": lf["loss"], "val_ppl_causal": lf["ppl"]}
    dense_state = _load_dense_source(ckpt, notes) if res.get("layers") else None
    if dense_state is not None:
        for diag, (l, ffn) in zip(res["layers"], model.moe_layers()):
            try:
                diag["similarity_to_dense"] = _similarity_to_dense(ffn, dense_state, l).tolist()
            except (KeyError, ValueError, RuntimeError) as e:
                notes.append(f"layer {l}: no similarity to dense ({type(e).__name__}: {e})")
    head = {
        "ckpt": ckpt_dir,
        "iter_num": ckpt.get("iter_num"),
        "kind": kind,
        "router": model.config.router if kind != "dense" else None,
        "n_experts": model.config.n_experts if kind != "dense" else None,
        "top_k": model.config.top_k if kind == "moe" else None,
        "eval_capacity_factor": (eval_capacity_factor if eval_capacity_factor is not None
                                 else model.config.eval_capacity_factor) if kind == "moe" else None,
        "params": model.num_params(),
        "active_params": model.num_params(active=True),
        "data_dir": resolve_data_dir(ckpt, data_dir),
        "batches": batches, "batch_size": batch_size, "block_size": T,
    }
    train_keys = ("aux_loss", "aux_loss_coef", "adaptive_aux", "z_loss_coef", "capacity_factor", "batching",
                  "init_from", "max_iters", "batch_size", "block_size", "gradient_accumulation_steps")
    res = {**head, **res, "train_config": {k: cfg[k] for k in train_keys if k in cfg},
           "upcycled_from": ckpt.get("upcycled_from"), "notes": notes}
    return res


def format_report(res):
    """Human-readable multi-line summary of an evaluate_checkpoint result."""
    lines = [f"{res['ckpt']}: {res['kind']} model, iter {res['iter_num']}, "
             f"{res['params'] / 1e6:.2f}M params ({res['active_params'] / 1e6:.2f}M active)",
             f"val ({res['batches']} x {res['batch_size']} x {res['block_size']} = {res['tokens']} tokens): "
             f"loss {res['val_loss']:.4f}, ppl {res['val_ppl']:.2f}"]
    for name, d in res["per_domain"].items():
        lines.append(f"  {name:>14}: loss {d['loss']:.4f}, ppl {d['ppl']:.2f} ({d['tokens']} tokens)")
    if "val_loss_from_pos" in res:
        f = res["val_loss_from_pos"]
        lines.append(f"positions >= {f['pos']}: loss {f['loss']:.4f}, ppl {f['ppl']:.2f}")
    cf = res.get("eval_capacity_factor")
    cap = "" if cf is None else f" (capacity {cf:g})" if cf > 0 else " (dropless)"
    for L in res.get("layers", []):
        if L["kind"] == "routed":
            lines.append(f"layer {L['layer']}: load {' '.join(f'{x:.2f}' for x in L['load_fraction'])} | "
                         f"cv {L['load_cv']:.3f}, drop {L['drop_rate'] * 100:.1f}%{cap}, "
                         f"gate entropy {L.get('gate_entropy', float('nan')):.3f}, "
                         f"max1/max2 {L.get('max1_max2', float('nan')):.3f}, "
                         f"max2/max3 {L.get('max2_max3', float('nan')):.3f}, "
                         f"expert sim {L['mean_pairwise_similarity']:.3f}")
        else:
            lines.append(f"layer {L['layer']}: merge weights {' '.join(f'{x:.2f}' for x in L['merge_weight_mean'])}"
                         f" | entropy {L['merge_entropy']:.3f}, active experts {L['active_experts']:.2f}, "
                         f"expert sim {L['mean_pairwise_similarity']:.3f}")
        if "similarity_to_dense" in L:
            lines.append(f"          similarity to dense: {' '.join(f'{x:.3f}' for x in L['similarity_to_dense'])}")
    for n in res.get("notes", []):
        lines.append(f"note: {n}")
    return "\n".join(lines)


# ============================================================================ plots
# Every plot_* function takes data and an output path, writes one PNG of exactly
# figsize * dpi pixels (constrained layout, no bbox cropping) and returns the path,
# or returns None when the data have nothing to show (dense run, no MoE records).

def _figure(figsize, dpi):
    from matplotlib.figure import Figure   # no pyplot: no global state, any backend
    return Figure(figsize=figsize, dpi=dpi, layout="constrained")


def _save(fig, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=fig.dpi)
    return path


def _grid(n, max_cols=None):
    """(rows, cols) of a per-layer panel grid: 2 columns up to 4 layers, then 3, then 4."""
    cols = min(n, max_cols or (2 if n <= 4 else 3 if n <= 9 else 4))
    return math.ceil(n / cols), cols


def _layer_label(layer_ids, i):
    return f"layer {layer_ids[i]}" if layer_ids is not None and i < len(layer_ids) else f"MoE layer {i}"


def _moe_layers_of_record(rec):
    return rec.get("moe") or []


def _moe_train_records(records, stat=None):
    """The training-log records that carry per-layer MoE statistics (with `stat`
    among them, when given)."""
    return [r for r in records if r.get("split") == "train" and _moe_layers_of_record(r)
            and (stat is None or stat in r["moe"][0])]


def _load_norm(E, data_max=0.0):
    """Diverging colour scale centred on the balanced load 1/E (white), from 0
    (blue, unused) to at least 2/E (red, twice its share)."""
    from matplotlib.colors import TwoSlopeNorm
    if E <= 1:
        from matplotlib.colors import Normalize
        return Normalize(0.0, 1.0)
    return TwoSlopeNorm(vcenter=1.0 / E, vmin=0.0, vmax=max(2.0 / E, float(data_max)))


def _annotate(ax, im, M, fmt="{:.2f}", max_cells=100):
    """Write each cell's value on a small heatmap, black on light cells and white
    on dark ones (judged from the cell's colour)."""
    M = np.asarray(M, dtype=float)
    if M.size > max_cells:
        return
    for (i, j), v in np.ndenumerate(M):
        if not np.isfinite(v):
            continue
        r, g, b, _ = im.cmap(im.norm(v))
        light = 0.299 * r + 0.587 * g + 0.114 * b > 0.5
        ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7, color="black" if light else "white")


def plot_expert_load(load_fraction, path, layer_ids=None, title=None, figsize=None, dpi=100):
    """Heatmap of each MoE layer's share of assignments per expert (rows: layers,
    columns: experts; centred on the balanced 1/E). load_fraction: (L, E)."""
    M = np.asarray(load_fraction, dtype=float)
    if M.size == 0:
        return None
    L, E = M.shape
    figsize = figsize or (max(6.0, 0.6 * E + 3.0), max(3.0, 0.5 * L + 1.8))
    fig = _figure(figsize, dpi)
    ax = fig.add_subplot()
    im = ax.imshow(M, cmap="RdBu_r", norm=_load_norm(E, M.max()), aspect="auto")
    _annotate(ax, im, M)
    ax.set_xticks(range(E))
    ax.set_yticks(range(L), [_layer_label(layer_ids, i) for i in range(L)])
    ax.set_xlabel("expert")
    ax.set_title(title or "Expert load on the val batches")
    fig.colorbar(im, ax=ax, label=f"share (1/{E} = balanced)")
    return _save(fig, path)


def plot_load_over_training(records, path, layer_ids=None, figsize=None, dpi=100):
    """Per layer, a heatmap over training steps (x) and experts (y) of each expert's
    fraction of the step's assignments (routed: tokens_per_expert; Lory: mean merge
    weight). records: metrics.jsonl records."""
    tr = _moe_train_records(records)
    if not tr:
        return None
    key = "tokens_per_expert" if "tokens_per_expert" in tr[0]["moe"][0] else "merge_weight_mean"
    if key not in tr[0]["moe"][0]:
        return None
    steps = np.array([r["iter"] for r in tr], dtype=float)
    L = len(tr[0]["moe"])
    E = len(tr[0]["moe"][0][key])
    rows, cols = _grid(L, max_cols=2)
    figsize = figsize or (6.0 * cols + 1.2, 2.2 * rows + 1.2)
    fig = _figure(figsize, dpi)
    axes = np.atleast_1d(fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False)).ravel()
    # cell edges halfway between logged steps
    edges = np.concatenate([[steps[0] - 0.5], (steps[1:] + steps[:-1]) / 2, [steps[-1] + 0.5]]) \
        if len(steps) > 1 else np.array([steps[0] - 0.5, steps[0] + 0.5])
    Ms = [np.array([r["moe"][l][key] for r in tr], dtype=float) for l in range(L)]   # (steps, E)
    Ms = [M / np.clip(M.sum(1, keepdims=True), 1e-12, None) for M in Ms]
    norm = _load_norm(E, max(M.max() for M in Ms))
    for l, M in enumerate(Ms):
        ax = axes[l]
        im = ax.pcolormesh(edges, np.arange(E + 1) - 0.5, M.T, cmap="RdBu_r", norm=norm)
        ax.set_title(_layer_label(layer_ids, l), fontsize=10)
        ax.set_yticks(range(E)) if E <= 16 else None
    for ax in axes[L:]:
        ax.set_visible(False)
    for ax in axes[(rows - 1) * cols:]:
        ax.set_xlabel("step")
    for ax in axes[::cols]:
        ax.set_ylabel("expert")
    what = "share of assignments" if key == "tokens_per_expert" else "mean merge weight"
    fig.suptitle(f"Expert load over training ({what})")
    fig.colorbar(im, ax=list(axes[:L]), shrink=0.8, aspect=30, label=f"share (1/{E} = balanced)")
    return _save(fig, path)


def _line_panel(ax, steps, series, layer_ids, ylabel, title):
    for l, ys in enumerate(series):
        ax.plot(steps, ys, label=_layer_label(layer_ids, l), lw=1.4)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)


def plot_drop_and_alpha(records, path, layer_ids=None, adaptive=None, figsize=None, dpi=100):
    """Two panels over training: drop rate per MoE layer (fraction of the k*T
    assignments over capacity) and the auxiliary-loss coefficient alpha per layer
    (adaptive, Skywork section 3.2, or the fixed one; `adaptive` labels which,
    None = unknown)."""
    tr = _moe_train_records(records, "drop_rate")
    if not tr:
        return None
    steps = [r["iter"] for r in tr]
    L = len(tr[0]["moe"])
    has_alpha = all("alpha" in r for r in tr)
    figsize = figsize or (11.0 if has_alpha else 6.0, 4.0)
    fig = _figure(figsize, dpi)
    axes = fig.subplots(1, 2 if has_alpha else 1, squeeze=False).ravel()
    drops = [[100 * r["moe"][l]["drop_rate"] for r in tr] for l in range(L)]
    _line_panel(axes[0], steps, drops, layer_ids, "dropped assignments (%)", "Drop rate (training batches)"
                + (" - dropless" if max(map(max, drops)) == 0 else ""))
    axes[0].set_ylim(bottom=0, top=max(1.0, 1.1 * max(map(max, drops))))
    if has_alpha:
        alphas = [[r["alpha"][l] for r in tr] for l in range(len(tr[0]["alpha"]))]
        constant = len({a for s in alphas for a in s}) == 1
        how = {True: " (adaptive)", False: " (fixed)", None: ""}[adaptive]
        _line_panel(axes[1], steps, alphas, layer_ids, "alpha (aux-loss coefficient)",
                    "Aux-loss coefficient per layer" + how + (": all layers equal" if constant else ""))
        from matplotlib.ticker import ScalarFormatter
        fmt = ScalarFormatter(useOffset=False)       # plain numbers with as many digits as the ticks need
        fmt.set_scientific(False)
        axes[1].yaxis.set_major_formatter(fmt)
        if constant:
            axes[1].set_ylim(0, 1.5 * alphas[0][0] if alphas[0][0] > 0 else 1e-2)
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle("Capacity drops and load-balancing pressure")
    return _save(fig, path)


def plot_gate_sharpness(records, path, layer_ids=None, figsize=None, dpi=100):
    """Max1/Max2 and Max2/Max3 of the sorted gate probabilities (mean over tokens)
    per MoE layer over training: ~1 means a flat gate, larger means sharper
    (Skywork gating logit normalisation raises them)."""
    tr = _moe_train_records(records, "max1_max2")
    if not tr:
        return None
    steps = [r["iter"] for r in tr]
    L = len(tr[0]["moe"])
    has23 = "max2_max3" in tr[0]["moe"][0]
    figsize = figsize or (11.0 if has23 else 6.0, 4.0)
    fig = _figure(figsize, dpi)
    axes = fig.subplots(1, 2 if has23 else 1, squeeze=False).ravel()
    _line_panel(axes[0], steps, [[r["moe"][l]["max1_max2"] for r in tr] for l in range(L)],
                layer_ids, "mean Max1 / Max2", "Top-1 vs top-2 gate probability")
    if has23:
        _line_panel(axes[1], steps, [[r["moe"][l]["max2_max3"] for r in tr] for l in range(L)],
                    layer_ids, "mean Max2 / Max3", "Top-2 vs top-3 gate probability")
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle("Gate sharpness over training (1 = flat gate)")
    return _save(fig, path)


def plot_domain_specialization(usage, domain_names, path, layer_ids=None, lory=False, figsize=None, dpi=100):
    """Per layer, a domains x experts heatmap: the fraction of each domain's
    assignments that goes to each expert (routed), or the domain's mean merge
    weights (Lory). usage: (L, D, E) or a list of {domain: [E]} dicts."""
    if usage is None or len(usage) == 0:
        return None
    if isinstance(usage[0], dict):
        domain_names = list(usage[0])
        usage = [[u[d] for d in domain_names] for u in usage]
    U = np.asarray(usage, dtype=float)
    L, D, E = U.shape
    rows, cols = _grid(L)
    figsize = figsize or (max(4.0, 0.45 * E + 1.6) * cols + 1.5, max(2.0, 0.4 * D + 1.2) * rows + 0.8)
    fig = _figure(figsize, dpi)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    norm = _load_norm(E, U.max())
    for l in range(L):
        ax = axes[l]
        im = ax.imshow(U[l], cmap="RdBu_r", norm=norm, aspect="auto")
        _annotate(ax, im, U[l], max_cells=48)
        ax.set_title(_layer_label(layer_ids, l), fontsize=10)
        ax.set_xticks(range(E))
        ax.set_xlabel("expert")
        ax.set_yticks(range(D), domain_names if l % cols == 0 else [""] * D)
    for ax in axes[L:]:
        ax.set_visible(False)
    what = "mean merge weight" if lory else "share of the domain's assignments"
    fig.suptitle(f"Domain specialisation ({what})")
    fig.colorbar(im, ax=list(axes[:L]), shrink=0.8, aspect=30, label=f"mean weight (1/{E} = uniform)" if lory
                 else f"share (1/{E} = balanced)")
    return _save(fig, path)


def plot_expert_similarity(matrices, path, layer_ids=None, to_dense=None, figsize=None, dpi=100):
    """Per layer, the (E, E) cosine similarity of the experts' weights (1 right
    after a noiseless upcycle, falls as experts specialise); to_dense: optional
    per-layer (E,) similarity of each expert to its dense source, in the title.
    The colour range is shared by all layers and starts just below the smallest
    off-diagonal value, so that small differences stay visible."""
    if matrices is None or len(matrices) == 0:
        return None
    Ms, L, E, cols, fig, axes = _pair_grid(matrices, figsize, dpi, title_pad=0.5, extra_h=0.6)
    off_min = min(float(m[~np.eye(E, dtype=bool)].min()) if E > 1 else 1.0 for m in Ms)
    lo = min(math.floor(off_min * 20) / 20, 0.95)
    for l, M in enumerate(Ms):
        ax = axes[l]
        im = ax.imshow(M, cmap="viridis", vmin=lo, vmax=1.0)
        if E <= 8:
            _annotate(ax, im, M)
        off = (M.sum() - np.trace(M)) / (E * (E - 1)) if E > 1 else 1.0
        t = f"{_layer_label(layer_ids, l)}: mean {off:.3f}"
        if to_dense is not None and l < len(to_dense) and to_dense[l] is not None:
            t += f"\nto dense source: {np.mean(to_dense[l]):.3f}"
        ax.set_title(t, fontsize=9)
        _expert_pair_axes(ax, E, first_col=l % cols == 0)
    for ax in axes[L:]:
        ax.set_visible(False)
    fig.suptitle("Expert weight cosine similarity (mean = off-diagonal mean)")
    fig.colorbar(im, ax=list(axes[:L]), shrink=0.8, aspect=30, label="cosine similarity")
    return _save(fig, path)


def _pair_grid(matrices, figsize, dpi, title_pad, extra_h):
    """A grid of square panels, one per layer, for (E, E) expert x expert matrices.
    Returns (matrices as float arrays, L, E, columns, figure, flat axes)."""
    Ms = [np.asarray(m, dtype=float) for m in matrices]
    L, E = len(Ms), Ms[0].shape[0]
    rows, cols = _grid(L)
    side = max(2.8, 0.32 * E + 1.4)
    figsize = figsize or (side * cols + 1.4, (side + title_pad) * rows + extra_h)
    fig = _figure(figsize, dpi)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    return Ms, L, E, cols, fig, axes


def _expert_pair_axes(ax, E, first_col):
    """Ticks and labels of an (E, E) expert x expert panel."""
    ticks = range(E) if E <= 16 else range(0, E, max(1, E // 8))
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_xlabel("expert")
    if first_col:
        ax.set_ylabel("expert")


def plot_coactivation(matrices, path, layer_ids=None, figsize=None, dpi=100):
    """Per layer, the (E, E) expert-pair co-activation: fraction of tokens that use
    experts i and j together (diagonal: fraction of tokens that use i)."""
    if matrices is None or len(matrices) == 0:
        return None
    Ms, L, E, cols, fig, axes = _pair_grid(matrices, figsize, dpi, title_pad=0.3, extra_h=0.8)
    # the diagonal (fraction of tokens using i) is the load, shown elsewhere; blank it
    # so the pair structure gets the whole colour range
    Ms = [np.where(np.eye(E, dtype=bool), np.nan, M) for M in Ms]
    vmax = max(float(np.nanmax(m)) if E > 1 else 0.0 for m in Ms) or 1.0
    for l, M in enumerate(Ms):
        ax = axes[l]
        im = ax.imshow(M, cmap="magma", vmin=0, vmax=vmax)
        if E <= 8:
            _annotate(ax, im, M)
        ax.set_title(_layer_label(layer_ids, l), fontsize=10)
        _expert_pair_axes(ax, E, first_col=l % cols == 0)
    for ax in axes[L:]:
        ax.set_visible(False)
    fig.suptitle("Expert co-activation: fraction of tokens routed to both (diagonal blank)")
    fig.colorbar(im, ax=list(axes[:L]), shrink=0.8, aspect=30, label="fraction of tokens")
    return _save(fig, path)


def plot_loss_curves(records, path, title=None, figsize=None, dpi=100):
    """Training loss (logged mean over each log interval) and the periodic eval
    losses (train and val splits on fixed batches) against the step."""
    tr = [r for r in records if r.get("split") == "train" and "loss" in r]
    ev = [r for r in records if r.get("split") == "eval" and "val_loss" in r]
    if not tr and not ev:
        return None
    fig = _figure(figsize or (7.0, 4.2), dpi)
    ax = fig.add_subplot()
    if tr:
        ax.plot([r["iter"] for r in tr], [r["loss"] for r in tr], lw=1, alpha=0.6, label="train (logged)")
    if ev:
        ax.plot([r["iter"] for r in ev], [r["train_loss"] for r in ev], "o-", ms=3, label="train (eval batches)")
        ax.plot([r["iter"] for r in ev], [r["val_loss"] for r in ev], "s-", ms=3, label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(title or "Loss curves")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_similarity_over_training(records, path, layer_ids=None, figsize=None, dpi=100):
    """Mean pairwise expert similarity per layer at each eval (upcycled runs log it)."""
    ev = [r for r in records if r.get("split") == "eval" and r.get("expert_similarity")]
    if not ev:
        return None
    fig = _figure(figsize or (6.5, 4.0), dpi)
    ax = fig.add_subplot()
    L = len(ev[0]["expert_similarity"])
    _line_panel(ax, [r["iter"] for r in ev], [[r["expert_similarity"][l] for r in ev] for l in range(L)],
                layer_ids, "mean pairwise cosine", "Expert similarity over training")
    ax.legend(fontsize=8)
    return _save(fig, path)


def make_plots(run_dir, result=None, records=None, out_dir=None, dpi=100, log=None):
    """Write every plot that has data for this run into out_dir (default
    run_dir/plots). result: evaluate_checkpoint's dict (eval-based plots);
    records: metrics.jsonl records (loaded if None). Returns (paths, notes): notes
    say which plots were skipped and why."""
    out_dir = out_dir or os.path.join(run_dir, "plots")
    records = load_metrics(run_dir) if records is None else records
    layers = (result or {}).get("layers") or []
    ids = [L["layer"] for L in layers] or None
    lory = bool(layers) and layers[0]["kind"] == "lory"
    routed = [L for L in layers if L["kind"] == "routed"]
    paths, notes = [], []

    def do(name, fn, *args, why, **kw):
        p = fn(*args, os.path.join(out_dir, name + ".png"), **kw)
        if p is None:
            notes.append(f"skipped {name}: {why}")
        else:
            paths.append(p)

    dense_why = "no routing (dense model)" if result and result["kind"] == "dense" else "no data"
    do("loss_curves", plot_loss_curves, records, why="no metrics.jsonl records", dpi=dpi,
       title=f"Loss curves: {os.path.basename(os.path.abspath(run_dir))}")
    do("expert_load", plot_expert_load, [L["load_fraction"] for L in routed],
       why=dense_why if not lory else "Lory merges experts (see domain_specialization)", layer_ids=ids, dpi=dpi)
    do("load_over_training", plot_load_over_training, records, why=f"{dense_why} in metrics.jsonl",
       layer_ids=ids, dpi=dpi)
    do("drop_rate_alpha", plot_drop_and_alpha, records,
       why="no routed MoE records in metrics.jsonl" + (" (Lory drops nothing)" if lory else ""), layer_ids=ids,
       adaptive=((result or {}).get("train_config") or {}).get("adaptive_aux"), dpi=dpi)
    do("gate_sharpness", plot_gate_sharpness, records,
       why="no routed MoE records in metrics.jsonl" + (" (Lory has no top-k gate)" if lory else ""),
       layer_ids=ids, dpi=dpi)
    usage = [L["domain_merge_weights"] for L in layers] if lory else [L["domain_usage"] for L in routed]
    do("domain_specialization", plot_domain_specialization, usage, None, why=dense_why, layer_ids=ids,
       lory=lory, dpi=dpi)
    do("coactivation", plot_coactivation, [L["coactivation"] for L in routed],
       why=dense_why if not lory else "Lory has no per-token expert choice", layer_ids=ids, dpi=dpi)
    to_dense = [L.get("similarity_to_dense") for L in layers]
    do("expert_similarity", plot_expert_similarity, [L["expert_similarity"] for L in layers], why=dense_why,
       layer_ids=ids, to_dense=to_dense if any(t is not None for t in to_dense) else None, dpi=dpi)
    do("similarity_over_training", plot_similarity_over_training, records,
       why="only upcycled runs log expert similarity", layer_ids=ids, dpi=dpi)
    if log is not None:
        for n in notes:
            log(f"note: {n}")
    return paths, notes


# ============================================================================ compare

def run_summary(run_dir, evaluate=False, **eval_kw):
    """One row of final metrics for a run: from metrics.jsonl and the checkpoint
    (and, with evaluate=True, evaluate_checkpoint on the shared fixed batches)."""
    recs = load_metrics(run_dir)
    model, ckpt = load_run(run_dir)
    tr = [r for r in recs if r.get("split") == "train"]
    ev = [r for r in recs if r.get("split") == "eval" and "val_loss" in r]
    row = {
        "run": run_dir,
        "kind": model_kind(model),
        "params_M": model.num_params() / 1e6,
        "active_M": model.num_params(active=True) / 1e6,
        "iters": ckpt.get("iter_num"),
        "tokens": (tr[-1] if tr else ev[-1] if ev else {}).get("tokens"),
        "train_loss": tr[-1]["loss"] if tr else None,
        "val_loss": ev[-1]["val_loss"] if ev else None,
        "best_val_loss": min(r["val_loss"] for r in ev) if ev else None,
        "tok_per_s": float(np.median([r["tok_per_s"] for r in tr if "tok_per_s" in r])) if tr else None,
    }
    row["val_ppl"] = math.exp(min(row["val_loss"], 50)) if row["val_loss"] is not None else None
    if evaluate:
        res = evaluate_checkpoint(run_dir, **eval_kw)
        row["eval_val_loss"], row["eval_val_ppl"] = res["val_loss"], res["val_ppl"]
    return row, recs


def markdown_table(rows, columns=None):
    """A markdown table of dict rows (numbers formatted compactly)."""
    columns = columns or list(rows[0])

    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return str(v)
        if isinstance(v, int) or abs(v) >= 1000:
            return f"{v:,.0f}"                      # counts, tokens/s
        return f"{v:.4f}" if abs(v) >= 1 else f"{v:.4g}"   # losses: 4 decimals; small values: 4 digits
    out = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    out += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(out)


def _run_names(dirs):
    names = [os.path.basename(os.path.normpath(d)) for d in dirs]
    if len(set(names)) < len(names):
        names = [os.path.normpath(d) for d in dirs]
    return names


def plot_compare(runs, path, figsize=None, dpi=100):
    """One figure for several runs: val loss vs step, val loss vs tokens (with the
    logged train loss faint), and a bar chart of each run's final val loss.
    runs: list of (name, records, row)."""
    fig = _figure(figsize or (15.0, 4.6), dpi)
    a1, a2, a3 = fig.subplots(1, 3)
    colors = [f"C{i}" for i in range(10)]
    for i, (name, recs, row) in enumerate(runs):
        c = colors[i % 10]
        tr = [r for r in recs if r.get("split") == "train" and "loss" in r]
        ev = [r for r in recs if r.get("split") == "eval" and "val_loss" in r]
        for ax, x in ((a1, "iter"), (a2, "tokens")):
            if tr:
                ax.plot([r[x] for r in tr], [r["loss"] for r in tr], color=c, lw=0.8, alpha=0.3)
            if ev:
                ax.plot([r[x] for r in ev], [r["val_loss"] for r in ev], "o-", color=c, ms=3, label=name)
    # zoom on where the runs end: the first evaluations (loss ~ log V) would
    # otherwise squash the differences that matter
    finals = [ev[-1]["val_loss"] for _, recs, _ in runs
              for ev in [[r for r in recs if r.get("split") == "eval" and "val_loss" in r]] if ev]
    zoomed = False
    if finals:
        lows = [r.get("val_loss", r.get("loss")) for _, recs, _ in runs for r in recs
                if r.get("split") in ("train", "eval") and r.get("val_loss", r.get("loss")) is not None]
        top = max(finals) + max(2 * (max(finals) - min(finals)), 0.5)
        bottom = min(lows) - 0.05 * (top - min(lows))
        zoomed = max(lows) > top
        for ax in (a1, a2):
            ax.set_ylim(bottom, top)
    for ax, xl in ((a1, "step"), (a2, "tokens")):
        ax.set_xlabel(xl)
        ax.set_ylabel("loss (nats/token)" + (" - zoomed" if zoomed else ""))
        ax.grid(alpha=0.3)
    a1.set_title("Val loss vs step (faint: train)", fontsize=10)
    a2.set_title("Val loss vs tokens (faint: train)", fontsize=10)
    a2.ticklabel_format(axis="x", style="sci", scilimits=(0, 3))
    a1.legend(fontsize=8)
    names = [n for n, _, _ in runs]
    vals = [row.get("eval_val_loss", row.get("val_loss")) for _, _, row in runs]
    vals = [np.nan if v is None else v for v in vals]
    bars = a3.barh(range(len(runs)), vals, color=colors[:len(runs)])
    a3.bar_label(bars, fmt="%.4f", padding=3, fontsize=8)
    a3.set_yticks(range(len(runs)), names)
    a3.invert_yaxis()
    finite = [v for v in vals if np.isfinite(v)]
    if finite:
        lo, hi = min(finite), max(finite)
        pad = max(0.05 * (hi - lo), 0.02 * hi, 1e-3)
        a3.set_xlim(max(0.0, lo - 4 * pad), hi + 3 * pad)
    evaluated = any("eval_val_loss" in row for _, _, row in runs)
    a3.set_xlabel("val loss" + (" (eval.py, same fixed batches)" if evaluated else " (last eval in metrics.jsonl)"))
    a3.set_title("Final val loss", fontsize=10)
    fig.suptitle("Run comparison")
    return _save(fig, path)


COMPARE_COLUMNS = ["run", "kind", "params_M", "active_M", "iters", "tokens", "train_loss", "val_loss",
                   "val_ppl", "best_val_loss", "tok_per_s"]


def compare_runs(dirs, out_dir, evaluate=False, dpi=100, **eval_kw):
    """Compare runs: writes out_dir/compare.png (loss curves vs step and tokens,
    final val loss) and out_dir/compare.md (the table). Returns (markdown table,
    [png paths]). evaluate=True adds eval_val_loss/ppl from evaluate_checkpoint
    on the same fixed val batches for every run."""
    if not dirs:
        raise EvalError("--compare needs at least one run directory")
    names = _run_names(dirs)
    runs, rows = [], []
    for name, d in zip(names, dirs):
        row, recs = run_summary(d, evaluate=evaluate, **eval_kw)
        row["run"] = name
        rows.append(row)
        runs.append((name, recs, row))
    cols = COMPARE_COLUMNS + (["eval_val_loss", "eval_val_ppl"] if evaluate else [])
    table = markdown_table(rows, cols)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "compare.md"), "w") as f:
        f.write(table + "\n")
    png = plot_compare(runs, os.path.join(out_dir, "compare.png"), dpi=dpi)
    return table, [png]


# ============================================================================ sampling

def sample(ckpt_dir, prompt="", max_new_tokens=200, temperature=0.8, top_k=None, seed=0, data_dir=None,
           device="cpu"):
    """Generate text after `prompt` with model.generate (Lory: prompt-only routing,
    inside generate). An empty prompt starts from the end-of-text token. Returns
    the decoded prompt + continuation."""
    from data.dataset import load_meta
    from data.tokenizer import load_tokenizer
    model, ckpt = load_run(ckpt_dir, device)
    d = resolve_data_dir(ckpt, data_dir)
    try:
        meta = load_meta(d)
    except FileNotFoundError as e:
        msg = str(e).splitlines()[0]
        raise EvalError(f"no tokenizer metadata for this checkpoint: {msg}"
                        + ("" if "prepare" in msg else f"; {_prepare_hint(d)}")) from None
    tok = load_tokenizer(meta)
    start = meta.get("eot_token")
    start = 0 if start is None else start       # no document separator (char data): start from id 0
    ids = tok.encode(prompt) if prompt else []
    prompt_given = bool(ids)
    ids = ids or [start]
    if max(ids) >= model.config.vocab_size:
        raise EvalError(f"the prompt encodes to token ids >= the model's vocab_size={model.config.vocab_size}")
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=gen)
    text = out[0].tolist()
    return tok.decode(text if prompt_given else text[1:])


# ============================================================================ CLI

def build_parser():
    from cli import ArgumentParser
    p = ArgumentParser(prog="eval.py", description="Evaluate, plot, compare and sample checkpoints (see the module docstring).")
    p.add_argument("--ckpt", help="run directory (out_dir) or ckpt.pt to evaluate/sample")
    p.add_argument("--json", action="store_true", help="last stdout line: the result as one JSON object")
    p.add_argument("--batches", type=int, default=DEFAULT_BATCHES, help="fixed val batches (default %(default)s)")
    p.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE, help="sequences per batch")
    p.add_argument("--data_dir", default=None, help="default: the checkpoint config's data_dir or data/<dataset>")
    p.add_argument("--device", default="cpu", help="cpu | cuda | ... (default cpu)")
    p.add_argument("--skip_positions", type=int, default=None,
                   help="also report loss over positions >= N (default: segment_len for Lory)")
    p.add_argument("--eval_capacity_factor", type=float, default=None,
                   help="override the checkpoint's eval capacity factor (measure drops)")
    p.add_argument("--plots", action="store_true", help="write PNGs to OUT_DIR/plots (or --out)")
    p.add_argument("--compare", nargs="+", metavar="RUN_DIR", help="compare several runs")
    p.add_argument("--eval", action="store_true", help="with --compare: also evaluate every checkpoint")
    p.add_argument("--out", default=None, help="output folder for --compare (default out/compare) or --plots")
    p.add_argument("--sample", action="store_true", help="generate text instead of evaluating")
    p.add_argument("--prompt", default="", help="prompt for --sample")
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    return p


def _json_default(o):
    if torch.is_tensor(o):
        return o.tolist()
    if isinstance(o, (np.generic,)):
        return o.item()
    return str(o)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.batches <= 0 or args.batch_size <= 0:
        raise EvalError("--batches and --batch_size must be positive")
    from cli import device_problem
    if device_problem(args.device):
        raise EvalError(f"--device={args.device} {device_problem(args.device)}")
    if args.sample and (args.max_new_tokens < 0 or not args.temperature > 0 or (args.top_k is not None and args.top_k < 1)):
        raise EvalError(f"--sample needs --max_new_tokens >= 0, --temperature > 0 and --top_k >= 1 (got "
                        f"{args.max_new_tokens}, {args.temperature}, {args.top_k})")
    if args.compare:
        out = args.out or os.path.join("out", "compare")
        table, pngs = compare_runs(args.compare, out, evaluate=args.eval, batches=args.batches,
                                   batch_size=args.batch_size, data_dir=args.data_dir, device=args.device)
        print(table)
        print(f"wrote {os.path.join(out, 'compare.md')} and {', '.join(pngs)}")
        if args.json:
            print(json.dumps({"table": table, "pngs": pngs}))
        return 0
    if not args.ckpt:
        raise EvalError("pass --ckpt=OUT_DIR (or --compare RUN_DIR ...); see python eval.py --help")
    if args.sample:
        text = sample(args.ckpt, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed,
                      args.data_dir, args.device)
        print(json.dumps({"sample": text}) if args.json else text)
        return 0
    res = evaluate_checkpoint(args.ckpt, args.batches, args.batch_size, args.data_dir, args.device,
                              args.skip_positions, args.eval_capacity_factor)
    if not args.json:
        print(format_report(res))
    if args.plots:
        run_dir = args.ckpt if os.path.isdir(args.ckpt) else os.path.dirname(os.path.abspath(args.ckpt))
        paths, notes = make_plots(run_dir, res, out_dir=args.out)
        res["plots"] = paths
        res["notes"] = res["notes"] + notes
        if not args.json:
            print("plots:\n" + "\n".join(f"  {p}" for p in paths))
            for n in notes:
                print(f"note: {n}")
    if args.json:
        print(json.dumps(res, default=_json_default))
    return 0


def cli(argv=None):
    """main() with user errors turned into one line on stderr and exit status 2."""
    from checkpoint import CheckpointError
    try:
        return main(argv)
    except SystemExit as e:          # argparse: --help (0) or a usage error (already printed, 2)
        return e.code
    except (EvalError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:   # missing files, an output path that is a file, bad data
        print(f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
