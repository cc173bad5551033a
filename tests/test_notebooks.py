"""The teaching notebooks (notebooks/NN_*.ipynb) run from a fresh clone: each builds
its tiny models, on a small multidomain copy prepared once for all of them, and
prints the numbers its text talks about. They are executed with nbclient; the
checks read their printed output."""
import os
import re

import pytest

from helpers import ROOT

NOTEBOOKS = ["01_upcycling", "02_routers", "03_lory", "04_token_routing"]


@pytest.fixture(scope="module")
def notebook_out(tmp_path_factory):
    return str(tmp_path_factory.mktemp("notebook_out"))


def execute(name, env):
    """Run notebooks/NAME.ipynb in a fresh kernel with `env` added to the environment;
    returns (all stdout text, number of PNG outputs)."""
    nbformat = pytest.importorskip("nbformat", reason="nbformat not installed (pip install -r requirements-dev.txt)")
    nbclient = pytest.importorskip("nbclient", reason="nbclient not installed (pip install -r requirements-dev.txt)")
    path = os.path.join(ROOT, "notebooks", name + ".ipynb")
    nb = nbformat.read(path, as_version=4)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)                     # the kernel inherits this environment
    try:
        nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                resources={"metadata": {"path": os.path.dirname(path)}}).execute()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    return text, sum("image/png" in o.get("data", {}) for o in outputs)


def number_after(label, text):
    m = re.search(re.escape(label) + r"\s*([-+0-9.e]+)", text)
    assert m, (label, text[-2000:])
    return float(m.group(1))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_and_shows_what_it_says(name, notebook_out, tmp_path):
    env = {"NOTEBOOK_OUT": notebook_out, "RUN_DIR": str(tmp_path / "no_demo_run"), "OMP_NUM_THREADS": "1"}
    text, pngs = execute(name, env)
    if name == "01_upcycling":
        assert "every expert equals the dense FFN: True" in text and "upcycle's own verdict: exact" in text
        assert number_after("on real text:", text) < 1e-4 and number_after("on random tokens:", text) < 1e-4
        assert number_after("no weight scaling:", text) > 1e-2          # softmax_topk without scaling is not exact
        assert pngs == 1
    if name == "02_routers":
        sums = dict(re.findall(r"^(\S+)\s.*gate sum ([0-9.]+)$", text, re.M))
        assert float(sums["topk_softmax"]) == pytest.approx(1.0, abs=1e-3) and float(sums["softmax_topk"]) < 0.99
        cv = re.search(r"load CV ([0-9.]+) -> ([0-9.]+)", text)
        assert float(cv.group(2)) < float(cv.group(1))                   # the selection bias balances
        assert pngs == 2
    if name == "03_lory":
        assert "segment j's weights = softmax(R(mean of segment j-1)): True" in text
        assert "layer 0 = softmax(R(mean of the prompt's hidden states)): True" in text
        assert "with and without the KV cache, the same tokens: True" in text
        assert number_after("LoryFFN vs one SwiGLU with the merged weights: max diff", text) < 1e-5
        assert pngs == 1
    if name == "04_token_routing":
        assert "a tiny upcycled model trained here" in text and "4 snippets of" in text
        assert os.path.exists(os.path.join(notebook_out, "token_routing", "token_routing.html"))
        assert pngs == 4 + 1
