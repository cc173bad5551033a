"""
What the notebooks share: the repository on sys.path, the multidomain text they
learn from, a tiny model shape and a few plain training steps.

    from common import ROOT, OUT, show, text_dataset, tiny_config, train_steps

The text is data/multidomain when `make demo` (or its prepare.py) has made it,
else a small copy made by the same prepare.py (SMALL_CHARS characters per domain)
under OUT, which is out/notebooks unless $NOTEBOOK_OUT says otherwise.
"""
import io
import os
import subprocess
import sys

import torch
from IPython.display import Image, display

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from data.dataset import TokenDataset  # noqa: E402
from model import GPTConfig  # noqa: E402

OUT = os.environ.get("NOTEBOOK_OUT") or os.path.join(ROOT, "out", "notebooks")
SMALL_CHARS = 60_000


def text_dir():
    """The multidomain data directory, preparing the small copy on first use."""
    full = os.path.join(ROOT, "data", "multidomain")
    if os.path.exists(os.path.join(full, "meta.json")):
        return full
    small = os.path.join(OUT, "multidomain_small")
    if not os.path.exists(os.path.join(small, "meta.json")):
        p = subprocess.run([sys.executable, os.path.join(ROOT, "data", "multidomain", "prepare.py"),
                            f"--out_dir={small}", f"--chars_per_domain={SMALL_CHARS}"], capture_output=True, text=True)
        if p.returncode != 0:
            last = (p.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"data/multidomain/prepare.py --out_dir={small} failed: {last}; run "
                               f"`python data/multidomain/prepare.py` (the full data) and rerun this notebook")
    return small


def text_dataset(split="train"):
    """TokenDataset of the multidomain text (byte-level: 256 token ids)."""
    return TokenDataset(text_dir(), split)


def tiny_config(**kw):
    """A 2-layer, 64-wide byte-level model: seconds to train a few dozen steps on a CPU."""
    shape = dict(block_size=64, vocab_size=256, n_layer=2, n_head=4, n_embd=64)
    return GPTConfig(**{**shape, **kw})


def train_steps(model, ds, steps, batch_size=8, lr=3e-3, aux_coef=0.01, seed=0, on_step=None):
    """`steps` AdamW steps on random windows of ds: next-token loss plus aux_coef
    times every routed layer's Switch load-balancing loss (docs/METHODS.md section 3).
    on_step(step, model) runs after each step. Returns the losses (list of float)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(steps):
        x, y = ds.get_batch(batch_size, model.config.block_size, gen)     # (B, T) each
        _, loss, routings = model(x, y)
        aux = sum(r.aux_losses["switch"] for r in routings if not isinstance(r, dict))
        (loss + aux_coef * aux).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, model)
    model.eval()
    return losses


def show(fig_or_path):
    """Display a matplotlib Figure (object API, as plot.py draws) or a PNG file;
    None (a plot.py function with nothing to draw) prints a line instead."""
    if fig_or_path is None:
        print("(nothing to plot)")
    elif isinstance(fig_or_path, str):
        display(Image(filename=fig_or_path))
    else:
        buf = io.BytesIO()
        fig_or_path.savefig(buf, format="png", dpi=fig_or_path.dpi)
        display(Image(data=buf.getvalue()))


@torch.no_grad()
def ffn_input(model, idx, layer):
    """(B, T, d): what block `layer`'s router reads, ffn_norm(x + attn(attn_norm(x))),
    with blocks 0..layer-1 run as GPT.forward runs them."""
    x = model.tok_emb(idx)                                              # (B, T, d)
    for block in model.blocks[:layer]:
        x, _ = block(x, model.rope_cos, model.rope_sin)
    b = model.blocks[layer]
    return b.ffn_norm(x + b.attn(b.attn_norm(x), model.rope_cos, model.rope_sin))
