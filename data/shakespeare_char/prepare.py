"""
Tiny Shakespeare at the character level (as in nanoGPT's data/shakespeare_char).

    python data/shakespeare_char/prepare.py                  # downloads input.txt (~1MB) once
    python data/shakespeare_char/prepare.py --input=FILE     # offline: any text file

The text is read from --input, else from a previously downloaded data/shakespeare_char/input.txt,
else downloaded (10s timeout). The first 90% of the characters is train, the rest val.
Writes train.bin / val.bin (uint16), meta.json (vocab_size, itos/stoi, tokenizer "char"), and
train_index.npy / val_index.npy describing one document of domain 0 ("shakespeare"), so the
same loader (data/dataset.py) reads it like every other dataset.
"""
import json
import os
import sys
import urllib.request

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:  # so `python data/shakespeare_char/prepare.py` can import the data package
    sys.path.insert(0, ROOT)
from cli import ArgumentParser  # noqa: E402
from data.tokenizer import CharTokenizer  # noqa: E402

DEFAULT_OUT_DIR = os.path.dirname(os.path.abspath(__file__))
URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def download(url, path, timeout=10):
    """Fetch url into path (atomically). Raises OSError on any network failure."""
    with urllib.request.urlopen(url, timeout=timeout) as r:
        data = r.read()
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def get_text(input_path=None, out_dir=DEFAULT_OUT_DIR, url=URL, timeout=10):
    """The corpus text: --input, else out_dir/input.txt, else downloaded to out_dir/input.txt."""
    if input_path is not None:
        if not os.path.isfile(input_path):
            raise FileNotFoundError(f"--input {input_path} does not exist")
        path = input_path
    else:
        path = os.path.join(out_dir, "input.txt")
        if not os.path.exists(path):
            try:
                os.makedirs(out_dir, exist_ok=True)
                download(url, path, timeout)
            except (OSError, ValueError) as e:  # URLError, timeouts, DNS failures are OSErrors
                raise FileNotFoundError(f"could not download {url} ({getattr(e, 'reason', e)}): "
                                        f"pass a local copy with --input=FILE") from None
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if len(text) < 100:
        raise ValueError(f"{path} has only {len(text)} characters: too little text to train on")
    return text


def atomic_write(path, write):
    with open(path + ".tmp", "wb") as f:
        write(f)
    os.replace(path + ".tmp", path)


def prepare(out_dir=DEFAULT_OUT_DIR, input_path=None, url=URL, timeout=10, verbose=True):
    """Build the dataset into out_dir; returns its meta dict."""
    text = get_text(input_path, out_dir, url, timeout)
    tok = CharTokenizer.from_text(text)
    if tok.vocab_size > 65536:
        raise ValueError(f"{tok.vocab_size} distinct characters: too many for uint16 token ids")
    n = len(text)
    splits = {"train": text[:int(n * 0.9)], "val": text[int(n * 0.9):]}
    os.makedirs(out_dir, exist_ok=True)
    counts = {}
    for split, part in splits.items():
        ids = np.array(tok.encode(part), dtype=np.uint16)
        index = np.array([[0, len(ids), 0]], dtype=np.int64)  # one document, domain 0
        atomic_write(os.path.join(out_dir, f"{split}.bin"), ids.tofile)
        atomic_write(os.path.join(out_dir, f"{split}_index.npy"), lambda f: np.save(f, index))
        counts[split] = {"docs": 1, "tokens": len(ids), "per_domain": {"shakespeare": {"docs": 1, "tokens": len(ids)}}}
    meta = {"dataset": "shakespeare_char", "tokenizer": "char", "vocab_size": tok.vocab_size, "eot_token": None,
            "itos": tok.itos, "stoi": tok.stoi, "domains": ["shakespeare"], "counts": counts,
            "source": input_path or url}
    atomic_write(os.path.join(out_dir, "meta.json"), lambda f: f.write(json.dumps(meta, indent=1).encode()))
    if verbose:
        print(f"{n:,} characters, vocab_size={tok.vocab_size}: train {counts['train']['tokens']:,} tokens, "
              f"val {counts['val']['tokens']:,} tokens -> {out_dir}")
    return meta


def main():
    p = ArgumentParser(prog="data/shakespeare_char/prepare.py", description="Prepare Tiny Shakespeare (character level).")
    p.add_argument("--input", default=None, help="local text file (skips the download)")
    p.add_argument("--out_dir", default=DEFAULT_OUT_DIR)
    p.add_argument("--url", default=URL)
    p.add_argument("--timeout", type=float, default=10.0, help="download timeout in seconds")
    args = p.parse_args()
    try:
        prepare(args.out_dir, args.input, args.url, args.timeout)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
