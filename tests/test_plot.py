"""plot.py: every figure is a PNG of the requested size, plots without data are
skipped, and the figures drawn from files (metrics.jsonl + eval.py's JSON, the
plot.py command line) are byte-identical to those eval.py --plots draws."""
import json
import os
import struct
from html.parser import HTMLParser

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import eval as ev
import plot
import token_routing
from data.tokenizer import ByteTokenizer, HFTokenizer
from metrics import load_metrics
from model import GPT, GPTConfig


@pytest.fixture
def runs(tiny_runs):
    return tiny_runs


def png_size(path):
    """(width, height) from a PNG's IHDR chunk."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", head[16:24])


def test_every_plot_writes_png_of_expected_size(runs, tmp_path):
    res = ev.evaluate_checkpoint(runs["upcycled"], batches=2, batch_size=4)
    recs = load_metrics(runs["upcycled"])
    layers = res["layers"]
    ids = [L["layer"] for L in layers]
    calls = {
        "expert_load": lambda p, **kw: plot.plot_expert_load([L["load_fraction"] for L in layers], p,
                                                            layer_ids=ids, **kw),
        "load_over_training": lambda p, **kw: plot.plot_load_over_training(recs, p, layer_ids=ids, **kw),
        "drop_rate_alpha": lambda p, **kw: plot.plot_drop_and_alpha(recs, p, **kw),
        "gate_sharpness": lambda p, **kw: plot.plot_gate_sharpness(recs, p, **kw),
        "domain": lambda p, **kw: plot.plot_domain_specialization([L["domain_usage"] for L in layers], None, p, **kw),
        "similarity": lambda p, **kw: plot.plot_expert_similarity([L["expert_similarity"] for L in layers], p,
                                                                to_dense=[L["similarity_to_dense"] for L in layers],
                                                                **kw),
        "coactivation": lambda p, **kw: plot.plot_coactivation([L["coactivation"] for L in layers], p, **kw),
        "loss": lambda p, **kw: plot.plot_loss_curves(recs, p, **kw),
        "similarity_over_training": lambda p, **kw: plot.plot_similarity_over_training(recs, p, **kw),
        "compare": lambda p, **kw: plot.plot_compare([("a", recs, {"val_loss": 3.0}), ("b", recs, {"val_loss": 3.2})],
                                                   p, **kw),
    }
    for name, fn in calls.items():
        path = str(tmp_path / f"{name}.png")
        assert fn(path, figsize=(6.4, 3.2), dpi=50) == path, name
        assert os.path.getsize(path) > 1000, name
        assert png_size(path) == (320, 160), name
        if name in ("domain", "similarity", "load_over_training"):    # per-layer grids: default size sensible
            w, h = png_size(fn(str(tmp_path / f"{name}_default.png")))
            assert 400 <= w <= 2000 and 200 <= h <= 1600, (name, w, h)


def test_plots_without_data_are_skipped(runs, tmp_path):
    assert plot.plot_expert_load([], str(tmp_path / "x.png")) is None
    assert plot.plot_load_over_training([{"split": "train", "iter": 1, "loss": 3}], str(tmp_path / "x.png")) is None
    res = ev.evaluate_checkpoint(runs["dense"], batches=2, batch_size=4)
    paths, notes = plot.make_plots(runs["dense"], res, out_dir=str(tmp_path / "dense"))
    assert [os.path.basename(p) for p in paths] == ["loss_curves.png"]
    assert any("dense" in n for n in notes) and not os.path.exists(tmp_path / "x.png")
    res = ev.evaluate_checkpoint(runs["lory"], batches=2, batch_size=4)
    paths, notes = plot.make_plots(runs["lory"], res, out_dir=str(tmp_path / "lory"))
    names = {os.path.basename(p) for p in paths}
    assert {"loss_curves.png", "load_over_training.png", "domain_specialization.png",
            "expert_similarity.png"} <= names and "gate_sharpness.png" not in names


def test_plots_from_files_match_eval_plots(runs, tmp_path, capsys):
    """plot.py --eval=FILE (the eval JSON written to disk, metrics.jsonl read back)
    draws byte-identical PNGs to eval.py --plots on the same run."""
    run = runs["moe"]
    capsys.readouterr()
    assert ev.cli([f"--ckpt={run}", "--json", "--plots", f"--out={tmp_path / 'from_eval'}", "--batches=2",
                   "--batch_size=4"]) == 0
    stdout = capsys.readouterr().out
    (tmp_path / "eval.json").write_text(stdout)
    assert plot.cli([f"--run={run}", f"--eval={tmp_path / 'eval.json'}", f"--out={tmp_path / 'from_files'}"]) == 0
    a, b = sorted(os.listdir(tmp_path / "from_eval")), sorted(os.listdir(tmp_path / "from_files"))
    assert a == b and len(a) >= 8
    for name in a:
        assert (tmp_path / "from_eval" / name).read_bytes() == (tmp_path / "from_files" / name).read_bytes(), name
    res = json.loads(stdout.splitlines()[-1])
    assert sorted(os.path.basename(x) for x in res["plots"]) == a


def test_plot_cli_without_eval_draws_training_plots(runs, tmp_path):
    assert plot.cli([f"--run={runs['moe']}", f"--out={tmp_path}"]) == 0
    names = set(os.listdir(tmp_path))
    assert {"loss_curves.png", "load_over_training.png", "drop_rate_alpha.png", "gate_sharpness.png"} == names


def _one_line_error(rc, capsys, *needles):
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


def test_plot_cli_bad_input(runs, tmp_path, capsys):
    _one_line_error(plot.cli([f"--run={tmp_path / 'nothing'}"]), capsys, "not a run directory")
    (tmp_path / "junk.json").write_text("not json\n")
    _one_line_error(plot.cli([f"--run={runs['moe']}", f"--eval={tmp_path / 'junk.json'}"]), capsys,
                    "junk.json", "eval.py")
    _one_line_error(plot.cli([f"--run={runs['moe']}", f"--eval={tmp_path / 'missing.json'}"]), capsys, "missing.json")
    _one_line_error(plot.cli([]), capsys, "--run")


# ---------------------------------------------------------------- token-level routing view

def tiny_moe(router="topk_softmax", init_std=0.5, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = GPTConfig(block_size=64, vocab_size=256, n_layer=2, n_head=2, n_embd=32, moe_layers="all",
                    n_experts=4, top_k=2, router=router, router_init_std=init_std, **kw)
    return GPT(cfg).eval()


class SpanReader(HTMLParser):
    """The token spans of token_routing.html, per layer block, and a check that
    every tag it opens is closed in order."""

    def __init__(self):
        super().__init__()
        self.stack, self.layers, self.span = [], [], None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag not in ("meta", "br"):
            self.stack.append(tag)
        if tag == "div" and a.get("class") == "layer":
            self.layers.append([])
        if tag == "span" and "t" in (a.get("class") or "").split():
            self.span = {"expert": int(a["data-expert"]), "style": a["style"], "title": a["title"], "text": ""}
            self.layers[-1].append(self.span)

    def handle_data(self, data):
        if self.span is not None:
            self.span["text"] += data

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, (self.stack, tag)
        self.stack.pop()
        if tag == "span":
            self.span = None


def read_html_spans(path):
    p = SpanReader()
    p.feed(open(path, encoding="utf-8").read())
    p.close()
    assert p.stack == [], p.stack
    return p.layers


def png_colours(path, palette):
    """The palette colours (hex) that fill at least 20 pixels of a PNG."""
    rgb = (mpimg.imread(path)[..., :3] * 255).round().astype(np.uint8).reshape(-1, 3)
    found = set()
    for c in palette:
        want = np.array([int(c[i:i + 2], 16) for i in (1, 3, 5)], dtype=np.uint8)
        if (rgb == want).all(1).sum() >= 20:
            found.add(c)
    return found


def independent_top1(model, ids):
    """Per MoE layer, each token's top-1 expert from the router logits of the FFN
    input, captured with a hook (argmax z: the largest topk_softmax gate)."""
    inputs = []
    hooks = [b.ffn.register_forward_pre_hook(lambda m, a: inputs.append(a[0])) for b in model.blocks]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return [(x[0] @ b.ffn.router.weight.t()).argmax(-1).tolist() for x, b in zip(inputs, model.blocks)]


def test_token_view_colours_come_from_the_routing(tmp_path):
    model = tiny_moe()
    ids = list(b"def f(x):\n    return x * 2  # caf\xc3\xa9\n") + list(range(40, 60))
    snip = token_routing.route_text(model, ByteTokenizer(), ids, name="mixed")
    want = independent_top1(model, ids)
    assert [[e[0] for e in layer] for layer in snip["experts"]] == want
    colours = plot.expert_colors(4)
    png = plot.plot_token_routing(snip, str(tmp_path / "free.png"))
    html_path = plot.write_token_routing_html([snip], str(tmp_path / "free.html"))
    layers = read_html_spans(html_path)
    assert [[s["expert"] for s in layer] for layer in layers] == want
    for layer, top1 in zip(layers, want):
        assert all(f"background:{colours[e]}" in s["style"] for s, e in zip(layer, top1))
    used = {colours[e] for layer in want for e in layer}
    assert len(used) > 1 and png_colours(png, colours) == used
    # a router forced to expert 3 (logit +20 on it): one colour everywhere, in the PNG and the HTML
    for _, ffn in model.moe_layers():
        ffn.router.gate_logits = lambda x: torch.tensor([0.0, 0.0, 0.0, 20.0]).expand(x.shape[0], 4)
    forced = token_routing.route_text(model, ByteTokenizer(), ids, name="forced")
    assert {e[0] for layer in forced["experts"] for e in layer} == {3}
    png = plot.plot_token_routing(forced, str(tmp_path / "forced.png"))
    assert png_colours(png, colours) == {colours[3]}
    layers = read_html_spans(plot.write_token_routing_html([forced], str(tmp_path / "forced.html")))
    assert {s["expert"] for layer in layers for s in layer} == {3}
    assert all(f"background:{colours[3]}" in s["style"] and "box-shadow" not in s["style"]
               for layer in layers for s in layer)


def test_token_pieces_keep_characters_and_show_whitespace(tmp_path):
    text = "naïve café — 中文\n\tx = 1  "
    ids = ByteTokenizer().encode(text)
    pieces = token_routing.token_pieces(ByteTokenizer(), ids)
    assert len(pieces) == len(ids) and "".join(pieces) == text
    assert pieces[ids.index(0xC3) + 1] == "ï" and pieces[ids.index(0xC3)] == ""   # 2 bytes: "" then the character
    assert "中" in pieces and "文" in pieces
    # a byte-level BPE (GPT-2 style) trained on the spot, read the way the project reads HF tokenizers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text * 20, "the cat sat on the mat " * 20],
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    bpe = HFTokenizer(str(tmp_path))
    ids = bpe.encode(text)
    pieces = token_routing.token_pieces(bpe, ids)
    assert "".join(pieces) == text and len(ids) < len(text.encode())
    labels = [plot.token_label(p) for p in pieces]
    assert "↵" in "".join(labels) and "→" in "".join(labels) and "·" in "".join(labels)
    assert not any(c in "".join(labels) for c in " \n\t")          # no invisible whitespace left
    assert plot.token_label("\x05") == "\\x05" and plot.token_label("") == ""
    assert plot.drawable_label(" 中é") == "·U+4E2Dé"             # the PNG font has no CJK glyphs
    # a token that holds a newline (BPE: "\n" + the next line's indentation) ends its line
    assert [line for line, _, _ in plot._token_layout(["a", "\n    ", "b"], width=40)] == [0, 0, 1]


def test_token_view_of_a_lory_model_follows_segments(tmp_path):
    model = tiny_moe(router="lory", segment_len=8, init_std=1.0)
    snip = token_routing.route_text(model, ByteTokenizer(), list(range(65, 97)), name="lory")
    assert snip["kind"] == "lory"
    for layer in snip["experts"]:
        for s in range(4):   # the 8 tokens of a segment share its merge weights
            assert all(e == layer[8 * s] for e in layer[8 * s:8 * s + 8])
    assert plot.plot_token_routing(snip, str(tmp_path / "l.png"))
    spans = read_html_spans(plot.write_token_routing_html([snip], str(tmp_path / "l.html")))
    assert len(spans) == 2 and all(len(layer) == 32 for layer in spans)


def test_eval_plots_add_one_token_view_per_domain(runs, tmp_path):
    assert ev.cli([f"--ckpt={runs['upcycled']}", "--plots", f"--out={tmp_path}", "--batches=2",
                   "--batch_size=4"]) == 0
    names = set(os.listdir(tmp_path))
    assert {"token_routing.html", "token_routing_dom0.png", "token_routing_dom1.png",
            "token_routing_dom2.png"} <= names
    layers = read_html_spans(str(tmp_path / "token_routing.html"))
    assert len(layers) == 3 * 2 and all(len(l) == 32 for l in layers)    # 3 domains x 2 layers, block_size tokens
    w, h = png_size(str(tmp_path / "token_routing_dom0.png"))
    assert 300 <= w <= 1200 and 100 <= h <= 1200, (w, h)
