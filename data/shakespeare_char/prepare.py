"""
Tiny Shakespeare at the character level (as in nanoGPT's data/shakespeare_char).

    python data/shakespeare_char/prepare.py                  # downloads input.txt (~1MB) once
    python data/shakespeare_char/prepare.py --input=FILE     # offline: any text file
    python data/shakespeare_char/prepare.py --tokenizer=out/hf/dense   # an imported model's tokenizer.json
                                                             # -> data/shakespeare_char_dense

The text is read from --input, else from a previously downloaded data/shakespeare_char/input.txt,
else downloaded (10s timeout). The first 90% of the characters is train, the rest val.
Writes train.bin / val.bin (uint16), meta.json (vocab_size, itos/stoi, tokenizer "char"), and
train_index.npy / val_index.npy describing one document of domain 0 ("shakespeare"), so the
same loader (data/dataset.py) reads it like every other dataset.
With --tokenizer=DIR the text is tokenized with DIR's tokenizer.json instead (uint32 ids when
the vocabulary has ids above 65,535), into --out_dir (default data/shakespeare_char_<DIR's
name>), with a copy of DIR's tokenizer files and meta tokenizer "hf", tokenizer_dir, dtype; the
token stream (not the text) is split 90/10, so no word is cut in two.
"""
import json
import os
import sys
import urllib.request

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:  # so `python data/shakespeare_char/prepare.py` can import the data package
    sys.path.insert(0, ROOT)
from configurator import ArgumentParser  # noqa: E402
from data.dataset import token_dtype  # noqa: E402
from data.tokenizer import CharTokenizer, HFTokenizer, copy_tokenizer_files  # noqa: E402

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


def prepare(out_dir=DEFAULT_OUT_DIR, input_path=None, url=URL, timeout=10, verbose=True, tokenizer=None):
    """Build the dataset into out_dir; returns its meta dict. tokenizer: None (characters)
    or the directory of an imported checkpoint holding tokenizer.json."""
    hf = HFTokenizer(tokenizer) if tokenizer else None        # a bad directory fails before any download
    text = get_text(input_path, DEFAULT_OUT_DIR if hf else out_dir, url, timeout)
    tok = hf or CharTokenizer.from_text(text)
    dtype = token_dtype(tok.vocab_size)
    n = len(text)
    if hf:   # split the token stream, not the text: a cut inside a word would change its tokens
        all_ids = tok.encode(text)
        cut = int(len(all_ids) * 0.9)
        splits = {"train": all_ids[:cut], "val": all_ids[cut:]}
    else:
        splits = {"train": tok.encode(text[:int(n * 0.9)]), "val": tok.encode(text[int(n * 0.9):])}
    os.makedirs(out_dir, exist_ok=True)
    counts = {}
    for split, part in splits.items():   # part: token ids
        ids = np.array(part, dtype=dtype)
        index = np.array([[0, len(ids), 0]], dtype=np.int64)  # one document, domain 0
        atomic_write(os.path.join(out_dir, f"{split}.bin"), ids.tofile)
        atomic_write(os.path.join(out_dir, f"{split}_index.npy"), lambda f: np.save(f, index))
        counts[split] = {"docs": 1, "tokens": len(ids), "per_domain": {"shakespeare": {"docs": 1, "tokens": len(ids)}}}
    if hf:
        copy_tokenizer_files(hf.dir, out_dir)
        meta = {"dataset": "shakespeare_char", "tokenizer": "hf", "tokenizer_dir": hf.dir, "dtype": np.dtype(dtype).name,
                "vocab_size": tok.vocab_size, "eot_token": tok.eot_token, "domains": ["shakespeare"],
                "counts": counts, "source": input_path or url}
    else:
        meta = {"dataset": "shakespeare_char", "tokenizer": "char", "dtype": np.dtype(dtype).name,
                "vocab_size": tok.vocab_size, "eot_token": None,
                "itos": tok.itos, "stoi": tok.stoi, "domains": ["shakespeare"], "counts": counts,
                "source": input_path or url}
    atomic_write(os.path.join(out_dir, "meta.json"), lambda f: f.write(json.dumps(meta, indent=1).encode()))
    if verbose:
        print(f"{n:,} characters, tokenizer {tok.name}, vocab_size={tok.vocab_size}: train {counts['train']['tokens']:,} tokens, "
              f"val {counts['val']['tokens']:,} tokens -> {out_dir}")
    return meta


def main():
    p = ArgumentParser(prog="data/shakespeare_char/prepare.py", description="Prepare Tiny Shakespeare (character level).")
    p.add_argument("--input", default=None, help="local text file (skips the download)")
    p.add_argument("--out_dir", default=None, help="default data/shakespeare_char, or data/shakespeare_char_<name> "
                                                    "for --tokenizer=DIR")
    p.add_argument("--tokenizer", default=None, help="DIR: an imported checkpoint (or HF model) directory holding "
                                                     "tokenizer.json (default: characters)")
    p.add_argument("--url", default=URL)
    p.add_argument("--timeout", type=float, default=10.0, help="download timeout in seconds")
    args = p.parse_args()
    out_dir = args.out_dir or (f"{DEFAULT_OUT_DIR}_{os.path.basename(os.path.normpath(args.tokenizer))}"
                               if args.tokenizer else DEFAULT_OUT_DIR)
    try:
        prepare(out_dir, args.input, args.url, args.timeout, tokenizer=args.tokenizer)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
