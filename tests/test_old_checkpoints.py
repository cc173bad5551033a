"""Checkpoints saved by commit 9b1dad1 (before cli.py became configurator.py and
train.py was split into init_from.py, diagnostics.py and parallel.py's Dist) load
with this code and compute the same function, bit for bit: through eval.py's
loader, and through train.py's resume. The fixtures and how they were made:
tests/fixtures/old_checkpoints/ (make_old_checkpoints.py)."""
import os
import shutil

import pytest
import torch

import eval as E
import train
from helpers import make_dataset, read_jsonl

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "old_checkpoints")
COMMON = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--ffn_hidden=64", "--block_size=32", "--batch_size=4",
          "--eval_iters=2", "--eval_interval=3", "--warmup_iters=1", "--device=cpu", "--learning_rate=3e-3",
          "--log_interval=1", "--moe_layers=all", "--n_experts=4", "--top_k=2"]


def saved(kind):
    return torch.load(os.path.join(FIXTURES, kind, "logits.pt"), weights_only=True)


@pytest.mark.parametrize("kind", ["dense", "moe", "lory"])
def test_old_checkpoint_loads_with_the_same_logits(kind):
    model, ckpt = E.load_run(os.path.join(FIXTURES, kind))
    want = saved(kind)
    assert ckpt["iter_num"] == 3 and model.config.is_moe == (kind != "dense")
    with torch.no_grad():
        logits = model(want["x"], want["x"])[0]                                   # (B, T, V)
    assert torch.equal(logits, want["logits"])


def test_old_moe_checkpoint_resumes(tmp_path):
    """train.py resumes the old MoE checkpoint: its first evaluation (iter 3, the
    same fixed batches) gives the old run's val loss exactly, and it trains on."""
    data = make_dataset(str(tmp_path / "data"))
    run = str(tmp_path / "moe")
    shutil.copytree(os.path.join(FIXTURES, "moe"), run)
    assert train.main(COMMON + [f"--data_dir={data}", f"--out_dir={run}", "--init_from=resume", "--max_iters=4"]) == 0
    evals = [r for r in read_jsonl(os.path.join(run, "metrics.jsonl")) if r["split"] == "eval"]
    assert [r["iter"] for r in evals] == [3, 4]
    assert evals[0]["val_loss"] == saved("moe")["val_loss"]
