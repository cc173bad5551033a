"""Test-session setup shared by all test files.

Triton's CPU interpreter: without a CUDA GPU the Triton expert kernels can still be
checked for correctness by running them in the interpreter. TRITON_INTERPRET must be
set before experts_triton is first imported (it is read when the kernels are
defined), so it is set here, before any test module is imported. With a GPU nothing
is set and the same tests run the compiled kernels.
"""
import os

import pytest
import torch

from helpers import TINY, make_dataset, run_train

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
    """Tiny runs of every kind (dense, routed MoE, Lory, upcycled), trained once per
    session for test_eval, test_plot and test_sample."""
    data_dir = make_dataset(str(tmp_path_factory.mktemp("data")))
    base = tmp_path_factory.mktemp("runs")
    common = TINY + [f"--data_dir={data_dir}", "--max_iters=6", "--eval_interval=3"]
    specs = {
        "dense": [],
        "moe": ["--moe_layers=all", "--n_experts=4", "--top_k=2", "--capacity_factor=1.0", "--adaptive_aux=True"],
        "lory": ["--moe_layers=all", "--n_experts=4", "--router=lory", "--segment_len=8"],
        # upcycled from the dense run: similarity to the dense source
        "upcycled": ["--moe_layers=all", "--n_experts=4", "--top_k=2", f"--init_from={base / 'dense'}"],
    }
    out = {}
    for name, extra in specs.items():
        out[name] = str(base / name)
        run_train(common + extra + [f"--out_dir={out[name]}"])
    return out
