"""
Every figure of the project, drawn from the files a run leaves behind: the
training log (metrics.jsonl, written by train.py) and the evaluation result
(eval.py's JSON: `python eval.py --ckpt=RUN --json`). Nothing here measures;
eval.py measures and this file draws, so a notebook can call the same functions.

    python plot.py --run=out/demo/upcycled                        # training-log plots
    python plot.py --run=out/demo/upcycled --eval=EVAL.json       # ... and the eval-based ones
    python eval.py --ckpt=out/demo/upcycled --plots               # evaluates, then calls make_plots

Every plot_* function takes data and an output path, writes one PNG of exactly
figsize * dpi pixels (constrained layout, no bbox cropping) and returns the path,
or returns None when the data have nothing to show (dense run, no MoE records).
matplotlib's object API only (Figure, no pyplot): no global state, any backend.

The token-level view (plot_token_routing, write_token_routing_html) draws the
snippets token_routing.py measures; eval.py --plots puts one per val domain in
its JSON ("token_routing"), so plot.py --eval=FILE redraws them too.
"""
import functools
import html
import json
import math
import os
import sys

import numpy as np
from matplotlib import colormaps, font_manager
from matplotlib.colors import Normalize, TwoSlopeNorm, hsv_to_rgb, to_hex
from matplotlib.figure import Figure
from matplotlib.ft2font import FT2Font
from matplotlib.patches import Rectangle
from matplotlib.ticker import ScalarFormatter

from configurator import ArgumentParser, run_cli
from metrics import load_metrics

def _figure(figsize, dpi):
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
    if E <= 1:
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


# ============================================================================ token routing view
# Mixtral (arXiv 2401.04088) section 5, fig. 8: the text itself, each token coloured by
# the expert it was routed to, one block per MoE layer. The data: token_routing.py.

SECOND_CHOICE = 0.8         # a token is marked (a near tie) when its second gate is >= this x its first
CHAR_W, LINE_H = 0.6, 1.6   # a monospace character cell (width, line height) in font sizes
VISIBLE = {" ": "\u00b7", "\t": "\u2192", "\n": "\u21b5", "\r": "\u240d"}   # . -> CR


def expert_colors(n_experts):
    """One hex colour per expert: tab10 up to 10 experts, tab20 up to 20, else hues."""
    if n_experts <= 20:
        cmap = colormaps["tab10" if n_experts <= 10 else "tab20"]
        return [to_hex(cmap(i)) for i in range(n_experts)]
    return [to_hex(hsv_to_rgb((i / n_experts, 0.55 + 0.35 * (i % 2), 0.95 - 0.25 * (i % 3 == 2))))
            for i in range(n_experts)]


def _text_color(hex_color):
    """Black on light backgrounds, white on dark ones (luma of the colour)."""
    r, g, b = (int(hex_color[i:i + 2], 16) / 255 for i in (1, 3, 5))
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.55 else "white"


def token_label(piece):
    """A token's text as drawn: whitespace and control characters made visible
    (space as a middle dot, newline as a return arrow, tab as an arrow, other
    control characters as \\xNN). "" is a byte that ends inside a multi-byte
    character (drawn as a narrow cell)."""
    return "".join(VISIBLE.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 32 or ord(c) == 127 else c) for c in piece)


@functools.lru_cache(maxsize=1)
def _monospace_charmap():
    """The code points matplotlib's monospace font (DejaVu Sans Mono, shipped with it) can draw."""
    return frozenset(FT2Font(font_manager.findfont("monospace")).get_charmap())


def drawable_label(piece):
    """token_label with every character the PNG font lacks (CJK, emoji) written as
    U+XXXX, so that the PNG shows no empty boxes (the HTML shows the characters)."""
    chars = _monospace_charmap()
    return "".join(c if ord(c) in chars else f"U+{ord(c):04X}" for c in token_label(piece))


def _second_marked(gates):
    return len(gates) > 1 and gates[0] > 0 and gates[1] >= SECOND_CHOICE * gates[0]


def _token_layout(pieces, width):
    """(line, x, cell width) of every token on lines of `width` character cells;
    a token holding a newline ends its line."""
    cells, line, x = [], 0, 0.0
    for p in pieces:
        w = max(len(drawable_label(p)), 1) if p else 0.5
        if x > 0 and x + w > width:
            line, x = line + 1, 0.0
        cells.append((line, x, w))
        x += w
        if "\n" in p:
            line, x = line + 1, 0.0
    return cells


def _legend_items(snippet, colors):
    """(label, colour) of every expert that is some token's top-1 in the snippet."""
    used = sorted({e[0] for layer in snippet["experts"] for e in layer if e})
    return [(f"expert {e}", colors[e]) for e in used]


def _legend_layout(snippet, colors, width):
    """Where the expert swatches go, wrapped to `width` characters: ([(label, colour,
    x, y)], the line where the layers start)."""
    x, y, items = 0.0, 1.0, []
    for label, c in _legend_items(snippet, colors):
        label = label.replace("expert ", "e")
        if x > 0 and x + len(label) + 1 > width:
            x, y = 0.0, y + 1.1
        items.append((label, c, x, y))
        x += len(label) + 1.5
    return items, y + 2.2


def _draw_legend(ax, snippet, items, fontsize):
    """Title, expert swatches (_legend_layout) and the underline rule."""
    what = "segment's largest merge weight" if snippet["kind"] == "lory" else "top-1 expert"
    ax.text(0, 0.5, f"{snippet.get('name') or 'text'}: colour = {what}", fontsize=fontsize, va="center",
            fontweight="bold")
    for label, c, x, y in items:
        ax.add_patch(Rectangle((x, y), len(label) + 1, 0.9, color=c, lw=0))
        ax.text(x + 0.5, y + 0.45, label, fontsize=fontsize, family="monospace", va="center", color=_text_color(c))
    y = items[-1][3] if items else 1.0
    ax.text(0, y + 1.5, f"eN = expert N; underline: a near tie, the 2nd expert's gate is >= {SECOND_CHOICE:g} x "
            f"the 1st's (in its colour)", fontsize=fontsize - 1, va="center", color="0.3")


def plot_token_routing(snippet, path, width=72, figsize=None, dpi=100, fontsize=10):
    """The text of one snippet (token_routing.py's dict) once per MoE layer, each
    token on the colour of its top-1 expert (Lory: its segment's largest merge
    weight), underlined in the second expert's colour when that one's gate is at
    least SECOND_CHOICE of the first's; grey: every assignment dropped.
    width: characters per line."""
    pieces, L = snippet["pieces"], len(snippet["layers"])
    if L == 0 or not pieces:
        return None
    colors = expert_colors(snippet["n_experts"])
    cells = _token_layout(pieces, width)
    block = cells[-1][0] + 1 + 1.6                             # title line + text lines + gap
    legend, top = _legend_layout(snippet, colors, width)
    total = top + L * block
    cw, lh = CHAR_W * fontsize / 72, LINE_H * fontsize / 72    # inches
    fig = Figure(figsize=figsize or (width * cw + 0.3, total * lh + 0.2), dpi=dpi)
    ax = fig.add_axes((0.01, 0.01, 0.98, 0.98))
    ax.set_xlim(-0.2, width + 0.2)
    ax.set_ylim(total, 0)
    ax.axis("off")
    _draw_legend(ax, snippet, legend, fontsize)
    for l in range(L):
        y0 = top + l * block
        ax.text(0, y0 + 0.5, f"layer {snippet['layers'][l]}", fontsize=fontsize, va="center", fontweight="bold")
        for t, (line, x, w) in enumerate(cells):
            experts, gates = snippet["experts"][l][t], snippet["gates"][l][t]
            c = colors[experts[0]] if experts else "#d0d0d0"
            y = y0 + 1.0 + line
            ax.add_patch(Rectangle((x, y), w, 0.92, color=c, lw=0))
            if _second_marked(gates):
                ax.add_patch(Rectangle((x, y + 0.72), w, 0.2, color=colors[experts[1]], lw=0))
            if pieces[t]:
                ax.text(x, y + 0.4, drawable_label(pieces[t]), fontsize=fontsize, family="monospace", va="center",
                        color=_text_color(c))
    return _save(fig, path)


def _html_token(snippet, t):
    """One token as an HTML span: background = top-1 expert, tooltip = its experts
    and gates in every layer."""
    piece = snippet["pieces"][t]
    tip = [f"token {t}: {piece!r} (id {snippet['ids'][t]})" if piece else
           f"token {t}: id {snippet['ids'][t]}, a byte inside a multi-byte character (shown on the next token)"]
    for l, layer in enumerate(snippet["layers"]):
        ex, gs = snippet["experts"][l][t], snippet["gates"][l][t]
        tip.append(f"layer {layer}: " + (", ".join(f"e{e} {g:.2f}" for e, g in zip(ex, gs)) or "dropped"))
    return tip, html.escape(token_label(piece) or "\u200a"), "\n" in piece


def _html_layer(snippet, l, colors):
    out = []
    for t in range(len(snippet["pieces"])):
        tip, text, newline = _html_token(snippet, t)
        ex, gs = snippet["experts"][l][t], snippet["gates"][l][t]
        c = colors[ex[0]] if ex else "#d0d0d0"
        style = f"background:{c};color:{_text_color(c)}"
        if _second_marked(gs):
            style += f";box-shadow:inset 0 -4px 0 {colors[ex[1]]}"
        out.append(f'<span class="t{" c" if not snippet["pieces"][t] else ""}" data-expert="{ex[0] if ex else -1}" '
                   f'style="{style}" title="{html.escape(chr(10).join(tip))}">{text}</span>' + ("<br>" if newline else ""))
    return f'<div class="layer"><div class="name">layer {snippet["layers"][l]}</div><div class="text">{"".join(out)}</div></div>'


HTML_STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;max-width:62em;color:#222}
.text{font-family:"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:14px;line-height:1.9;white-space:normal}
.t{white-space:pre;padding:1px 0;border-right:1px solid rgba(255,255,255,.6)}
.t.c{padding:1px 2px}.t:hover{outline:2px solid #000}
.layer{display:flex;gap:1em;margin:.4em 0}.name{min-width:5em;font-weight:bold;font-size:13px;padding-top:.3em}
.legend span{display:inline-block;padding:2px 8px;margin:2px;font-size:13px;border-radius:3px}
p.help{font-size:13px;color:#555}"""


def write_token_routing_html(snippets, path, title="Token routing"):
    """One self-contained HTML file (inline CSS, no script) with every snippet's
    text once per MoE layer, coloured as plot_token_routing does; hovering a
    token shows its experts and gates in every layer. Written atomically."""
    if not snippets:
        return None
    colors = expert_colors(snippets[0]["n_experts"])
    what = ("Each token takes the colour of its segment's largest Lory merge weight"
            if snippets[0]["kind"] == "lory" else "Each token takes the colour of its top-1 expert")
    parts = [f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
             f"<style>{HTML_STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
             f'<p class="help">{what}; a coloured underline marks a near tie: the second expert has at least '
             f'{SECOND_CHOICE:g} x the first one\'s gate (the underline has its colour); grey: every assignment '
             f"dropped. Hover a token for its experts and gates in every layer. "
             f"\u00b7 is a space, \u21b5 a newline, \u2192 a tab.</p>"]
    for s in snippets:
        legend = "".join(f'<span style="background:{c};color:{_text_color(c)}">{html.escape(n)}</span>'
                         for n, c in _legend_items(s, colors))
        parts.append(f'<section><h2>{html.escape(s.get("name") or "text")}</h2><div class="legend">{legend}</div>')
        parts += [_html_layer(s, l, colors) for l in range(len(s["layers"]))]
        parts.append("</section>")
    parts.append("</body></html>\n")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    os.replace(tmp, path)
    return path


def _file_stem(name):
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in str(name)) or "text"


def token_routing_plots(snippets, out_dir, dpi=100):
    """plot_token_routing for every snippet (token_routing_<name>.png) and one
    token_routing.html with them all. Returns the paths ([] without snippets)."""
    if not snippets:
        return []
    paths = [plot_token_routing(s, os.path.join(out_dir, f"token_routing_{_file_stem(s['name'])}.png"), dpi=dpi)
             for s in snippets]
    paths.append(write_token_routing_html(snippets, os.path.join(out_dir, "token_routing.html")))
    return [p for p in paths if p is not None]


def make_plots(run_dir, result=None, records=None, out_dir=None, dpi=100, log=None):
    """Write every plot that has data for this run into out_dir (default
    run_dir/plots). result: evaluate_checkpoint's dict (eval-based plots);
    records: metrics.jsonl records (loaded if None). Returns (paths, notes): notes
    say which plots were skipped and why."""
    out_dir = out_dir or os.path.join(run_dir, "plots")
    records = load_metrics(run_dir) if records is None else records
    records, n_nonfinite = finite_records(records)
    layers = (result or {}).get("layers") or []
    ids = [L["layer"] for L in layers] or None
    lory = bool(layers) and layers[0]["kind"] == "lory"
    routed = [L for L in layers if L["kind"] == "routed"]
    paths, notes = [], []
    if n_nonfinite:
        notes.append(f"left out {n_nonfinite} metrics.jsonl record(s) with a NaN/inf value")

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
    snippets = (result or {}).get("token_routing")
    if snippets:
        paths += token_routing_plots(snippets, out_dir, dpi=dpi)
    elif layers:
        notes.append("skipped token_routing: the result has no token_routing (eval.py --plots measures it)")
    if log is not None:
        for n in notes:
            log(f"note: {n}")
    return paths, notes


def finite_records(records):
    """(records, n): the records without a NaN/inf number among their top-level
    values (a diverged run logs them; a plot leaves those points out), and how
    many were left out."""
    keep = [r for r in records if all(math.isfinite(v) for v in r.values()
                                      if isinstance(v, float))]
    return keep, len(records) - len(keep)


def _drop_nonfinite(runs):
    """runs (name, records, row) without their records that hold a NaN/inf value,
    with a warning on stderr for each run that had some."""
    kept = []
    for name, recs, row in runs:
        recs, n = finite_records(recs)
        if n:
            print(f"warning: {name}: left out {n} metrics.jsonl record(s) with a NaN/inf value", file=sys.stderr)
        kept.append((name, recs, row))
    return kept


def _val_records(recs):
    return [r for r in recs if r.get("split") == "eval" and "val_loss" in r]


def _draw_compare_curves(ax_step, ax_tokens, runs, colors):
    """Every run's val loss (and its train loss, faint) against step and against tokens."""
    for i, (name, recs, _) in enumerate(runs):
        c = colors[i % 10]
        tr = [r for r in recs if r.get("split") == "train" and "loss" in r]
        ev = _val_records(recs)
        for ax, x in ((ax_step, "iter"), (ax_tokens, "tokens")):
            if tr:
                ax.plot([r[x] for r in tr], [r["loss"] for r in tr], color=c, lw=0.8, alpha=0.3)
            if ev:
                ax.plot([r[x] for r in ev], [r["val_loss"] for r in ev], "o-", color=c, ms=3, label=name)


def _zoom_compare_curves(axes, runs):
    """Set the y range of the curve axes to where the runs end: the first evaluations
    (loss ~ log V) would otherwise squash the differences that matter. Returns whether
    some logged loss lies above the range (the axes are zoomed)."""
    finals = [ev[-1]["val_loss"] for _, recs, _ in runs for ev in [_val_records(recs)] if ev]
    if not finals:
        return False
    lows = [r.get("val_loss", r.get("loss")) for _, recs, _ in runs for r in recs
            if r.get("split") in ("train", "eval") and r.get("val_loss", r.get("loss")) is not None]
    top = max(finals) + max(2 * (max(finals) - min(finals)), 0.5)
    bottom = min(lows) - 0.05 * (top - min(lows))
    for ax in axes:
        ax.set_ylim(bottom, top)
    return max(lows) > top


def _draw_final_loss_bars(ax, runs, colors):
    """A horizontal bar per run: its final val loss (eval.py's when the row has one)."""
    names = [n for n, _, _ in runs]
    vals = [row.get("eval_val_loss", row.get("val_loss")) for _, _, row in runs]
    vals = [np.nan if v is None else v for v in vals]
    bars = ax.barh(range(len(runs)), vals, color=colors[:len(runs)])
    ax.bar_label(bars, fmt="%.4f", padding=3, fontsize=8)
    ax.set_yticks(range(len(runs)), names)
    ax.invert_yaxis()
    finite = [v for v in vals if np.isfinite(v)]
    if finite:
        lo, hi = min(finite), max(finite)
        pad = max(0.05 * (hi - lo), 0.02 * hi, 1e-3)
        ax.set_xlim(max(0.0, lo - 4 * pad), hi + 3 * pad)
    evaluated = any("eval_val_loss" in row for _, _, row in runs)
    ax.set_xlabel("val loss" + (" (eval.py, same fixed batches)" if evaluated else " (last eval in metrics.jsonl)"))
    ax.set_title("Final val loss", fontsize=10)


def plot_compare(runs, path, figsize=None, dpi=100):
    """One figure for several runs: val loss vs step, val loss vs tokens (with the
    logged train loss faint), and a bar chart of each run's final val loss.
    runs: list of (name, records, row). Records with a NaN/inf value are left out,
    with a warning on stderr."""
    runs = _drop_nonfinite(runs)
    fig = _figure(figsize or (15.0, 4.6), dpi)
    a1, a2, a3 = fig.subplots(1, 3)
    colors = [f"C{i}" for i in range(10)]
    _draw_compare_curves(a1, a2, runs, colors)
    zoomed = _zoom_compare_curves((a1, a2), runs)
    for ax, xl in ((a1, "step"), (a2, "tokens")):
        ax.set_xlabel(xl)
        ax.set_ylabel("loss (nats/token)" + (" - zoomed" if zoomed else ""))
        ax.grid(alpha=0.3)
    a1.set_title("Val loss vs step (faint: train)", fontsize=10)
    a2.set_title("Val loss vs tokens (faint: train)", fontsize=10)
    a2.ticklabel_format(axis="x", style="sci", scilimits=(0, 3))
    a1.legend(fontsize=8)
    _draw_final_loss_bars(a3, runs, colors)
    fig.suptitle("Run comparison")
    return _save(fig, path)


# ============================================================================ CLI

def main(argv=None):
    p = ArgumentParser(prog="plot.py", description="Draw a run's figures from metrics.jsonl (and an eval JSON).")
    p.add_argument("--run", required=True, help="run directory (train.py's out_dir, holding metrics.jsonl)")
    p.add_argument("--eval", default=None, metavar="JSON",
                   help="eval.py's result (python eval.py --ckpt=RUN --json > FILE) for the eval-based plots")
    p.add_argument("--out", default=None, help="output folder (default RUN/plots)")
    p.add_argument("--dpi", type=int, default=100)
    args = p.parse_args(argv)
    if not os.path.isdir(args.run):
        raise ValueError(f"--run={args.run} is not a run directory (pass train.py's out_dir)")
    result = read_eval_json(args.eval) if args.eval else None
    paths, _ = make_plots(args.run, result, out_dir=args.out, dpi=args.dpi, log=print)
    print("plots:\n" + "\n".join(f"  {x}" for x in paths))
    return 0


def read_eval_json(path):
    """eval.py's result dict from a file holding its --json output (the last line
    that parses as a JSON object is taken, so a whole stdout capture works)."""
    with open(path) as f:
        lines = f.read().splitlines()
    for line in reversed(lines):
        try:
            res = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(res, dict) and "val_loss" in res:
            return res
    raise ValueError(f"{path} holds no eval.py result: write one with `python eval.py --ckpt=RUN --json > {path}`")


def cli(argv=None):
    """main() with user errors as one line on stderr and exit status 2."""
    return run_cli(main, argv, user_errors=(OSError, ValueError))


if __name__ == "__main__":
    sys.exit(cli())
