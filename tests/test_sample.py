"""sample.py: seeded and reproducible, greedy decoding (--top_k=1) equals an argmax
loop written here on the model's own forward, --start=FILE:, --num_samples, and
one-line errors for bad flags."""
import json
import os
import subprocess
import sys

import pytest
import torch

import sample as sp
from checkpoint import load_model
from helpers import ROOT


@pytest.fixture
def runs(tiny_runs):
    return tiny_runs


def cli(args, capsys):
    """(exit status, stdout, stderr) of sample.py's command line in this process."""
    capsys.readouterr()
    rc = sp.cli(args)
    out, err = capsys.readouterr()
    return rc, out, err


def test_sample_is_seeded(runs):
    a = sp.sample(runs["moe"], prompt="", max_new_tokens=6, seed=3)
    b = sp.sample(runs["moe"], prompt="", max_new_tokens=6, seed=3)
    assert a == b and len(a) == 1 and len(a[0]) > 0
    text = sp.sample(runs["lory"], prompt="", max_new_tokens=10, seed=0)   # prompt-only routing
    assert isinstance(text[0], str)
    three = sp.sample(runs["moe"], prompt="", max_new_tokens=6, seed=3, num_samples=3)
    assert len(three) == 3 and three[0] == a[0]       # one generator, seeded once: sample 1 does not move


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_greedy_matches_argmax_loop(runs, kind):
    """--top_k=1 is greedy decoding: the same tokens as an argmax loop over the
    model's forward pass, decoded with the data's tokenizer."""
    model, ckpt = load_model(runs[kind])
    model.eval()
    tok, _ = sp.load_tokenizer_for(ckpt)
    prompt_ids = [3, 1, 4, 1, 5]
    prompt = tok.decode(prompt_ids)
    assert tok.encode(prompt) == prompt_ids
    idx = torch.tensor([prompt_ids])
    with torch.no_grad():
        for _ in range(8):
            logits = model(idx[:, -model.config.block_size:])[0]
            idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    want = tok.decode(idx[0].tolist())
    assert sp.sample(runs[kind], prompt=prompt, max_new_tokens=8, top_k=1, seed=5) == [want]


def test_cli_start_file_and_json(runs, tmp_path, capsys):
    model, ckpt = load_model(runs["dense"])
    tok, _ = sp.load_tokenizer_for(ckpt)
    prompt = tok.decode([1, 2, 3])
    (tmp_path / "prompt.txt").write_text(prompt, encoding="utf-8")
    rc, out, err = cli([f"--ckpt={runs['dense']}", f"--start=FILE:{tmp_path / 'prompt.txt'}", "--num_samples=2",
                        "--max_new_tokens=4", "--seed=1", "--json"], capsys)
    assert rc == 0, err
    texts = json.loads(out.splitlines()[-1])["samples"]
    assert texts == sp.sample(runs["dense"], prompt=prompt, max_new_tokens=4, seed=1, num_samples=2)
    assert all(t.startswith(prompt) for t in texts)
    rc, out, err = cli([f"--ckpt={runs['dense']}", "--max_new_tokens=3", "--num_samples=2"], capsys)
    assert rc == 0 and out.count(sp.SEPARATOR) == 2


def _one_line_error(result, *needles):
    rc, out, err = result
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


def test_bad_input(runs, tmp_path, capsys):
    ckpt = f"--ckpt={runs['dense']}"
    _one_line_error(cli([ckpt, "--top_k=0"], capsys), "--top_k=0 must be an integer in [1, ")
    _one_line_error(cli([ckpt, "--temperature=-1"], capsys), "--temperature=-1.0 must be a finite number in (0, inf)")
    _one_line_error(cli([ckpt, "--num_samples=0"], capsys), "--num_samples=0 must be an integer in [1, 1000]")
    _one_line_error(cli([ckpt, "--device=tpu"], capsys), "--device=tpu is not a torch device")
    _one_line_error(cli([ckpt, f"--start=FILE:{tmp_path / 'none.txt'}"], capsys), "none.txt")
    _one_line_error(cli([ckpt, f"--data_dir={tmp_path / 'gone'}"], capsys), "prepare.py")
    _one_line_error(cli([f"--ckpt={tmp_path / 'nothing'}"], capsys), "does not exist")
    _one_line_error(cli([], capsys), "--ckpt")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--ckpt=x", "--bogus"], cwd=ROOT,
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    _one_line_error((p.returncode, p.stdout, p.stderr), "--bogus")
