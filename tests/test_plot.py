"""plot.py: every figure is a PNG of the requested size, plots without data are
skipped, and the figures drawn from files (metrics.jsonl + eval.py's JSON, the
plot.py command line) are byte-identical to those eval.py --plots draws."""
import json
import os
import struct

import pytest

import eval as ev
import plot
from metrics import load_metrics


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
