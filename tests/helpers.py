"""Shared test utilities: a tiny synthetic dataset in the project's data format
and a runner for train.py in a subprocess or in-process."""
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_dataset(path, n_docs=60, vocab=64, n_domains=3, seed=0, doc_len=(40, 120)):
    """Write train/val .bin + index + meta.json: documents from n_domains 'languages'
    (each domain draws from its own slice of the vocabulary with a repeating motif,
    so the data are learnable and domains are distinguishable)."""
    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    eot = 0
    band = (vocab - 1) // n_domains
    docs = []
    for i in range(n_docs):
        d = i % n_domains
        n = int(rng.integers(*doc_len))
        motif = rng.integers(1 + d * band, 1 + (d + 1) * band, size=5)
        toks = np.concatenate([np.tile(motif, n // 5 + 1)[:n], [eot]])
        noise = rng.random(n + 1) < 0.1
        toks[:-1][noise[:-1]] = rng.integers(1 + d * band, 1 + (d + 1) * band, size=noise[:-1].sum())
        docs.append((toks.astype(np.uint16), d))
    order = rng.permutation(n_docs)
    splits = {"val": [docs[i] for i in order[: n_docs // 6]], "train": [docs[i] for i in order[n_docs // 6:]]}
    counts = {}
    for split, ds in splits.items():
        stream = np.concatenate([t for t, _ in ds])
        index, off = [], 0
        for t, d in ds:
            index.append((off, len(t), d))
            off += len(t)
        stream.tofile(os.path.join(path, f"{split}.bin"))
        np.save(os.path.join(path, f"{split}_index.npy"), np.array(index, dtype=np.int64))
        counts[split] = {"docs": len(ds), "tokens": int(off)}
    meta = {"tokenizer": "byte", "vocab_size": vocab, "eot_token": eot,
            "domains": [f"dom{d}" for d in range(n_domains)], "counts": counts}
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump(meta, f)
    return path


TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
        "--eval_iters=2", "--log_interval=1", "--warmup_iters=2", "--device=cpu", "--learning_rate=3e-3"]


def run_train(args, cwd=ROOT, env=None, check=True, torchrun_nproc=None):
    """Run train.py as a subprocess; returns CompletedProcess (text)."""
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.update(env or {})
    if torchrun_nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={torchrun_nproc}", os.path.join(ROOT, "train.py")] + args
    else:
        cmd = [sys.executable, os.path.join(ROOT, "train.py")] + args
    p = subprocess.run(cmd, cwd=cwd, env=e, capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"train.py failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]
