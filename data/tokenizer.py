"""
Tokenizers with one small interface: encode(str) -> list[int], decode(list[int]) -> str,
vocab_size, eot_token (document separator, or None), name.

- ByteTokenizer: the 256 UTF-8 byte values; NUL (0) separates documents.
- GPT2Tokenizer: GPT-2 BPE via tiktoken, built offline from a local gpt2.tiktoken file.
- CharTokenizer: the character vocabulary of a dataset (shakespeare_char), stored in meta.json.
- HFTokenizer: an imported model's own tokenizer (its tokenizer.json, read with the
  `tokenizers` library that Hugging Face itself uses). convert.py --from_hf copies the
  tokenizer files next to ckpt.pt, train.py copies them into every run that starts from
  such a checkpoint, and find_tokenizer_dir follows a checkpoint back to them.

The GPT-2 merges file is not committed: `python data/tokenizer.py --fetch` obtains it
from the MIT-licensed openai-whisper sdist on PyPI (whisper/assets/gpt2.tiktoken, which is
byte-identical to tiktoken's r50k_base file) and checks its sha256.
"""
import argparse
import hashlib
import itertools
import os
import subprocess
import sys
import json
import tarfile
import tempfile

import numpy as np
import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tokenizers import Tokenizer

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
GPT2_TIKTOKEN_PATH = os.path.join(DATA_DIR, "gpt2.tiktoken")
GPT2_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
WHISPER_SDIST = "openai-whisper==20250625"
WHISPER_MEMBER = "whisper/assets/gpt2.tiktoken"
# the GPT-2 pre-tokenisation regex (tiktoken_ext.openai_public.r50k_pat_str)
R50K_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
ENDOFTEXT = "<|endoftext|>"
# the HF files of a model's text interface, copied together wherever its tokenizer goes
# (convert.py, train.py, the prepare scripts): the tokenizer, and the generation defaults
# with the bos/eos ids that transformers' generate stops at (convert.py's export reads them)
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
# end-of-document tokens of common HF vocabularies, tried when the config names none
# (Llama 1/2 and Mistral, GPT-2 family, Llama 3)
EOS_GUESSES = ("</s>", "<|endoftext|>", "<|end_of_text|>")


class ByteTokenizer:
    """UTF-8 bytes as tokens. NUL bytes are stripped from the text because token 0 is
    the end-of-document marker."""
    name = "byte"
    vocab_size = 256
    eot_token = 0

    def encode(self, text):
        return list(text.replace("\x00", "").encode("utf-8"))

    def decode(self, ids):
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class CharTokenizer:
    """Character-level vocabulary (nanoGPT shakespeare_char). itos[i] is the character of id i."""
    name = "char"
    eot_token = None

    def __init__(self, itos):
        self.itos = list(itos)
        self.stoi = {c: i for i, c in enumerate(self.itos)}
        self.vocab_size = len(self.itos)

    @classmethod
    def from_text(cls, text):
        return cls(sorted(set(text)))

    def encode(self, text):
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the {self.vocab_size}-character vocabulary") from None

    def decode(self, ids):
        return "".join(self.itos[int(i)] for i in ids)


class GPT2Tokenizer:
    """GPT-2 BPE (50257 tokens, <|endoftext|> = 50256). Special-token text inside a
    document is encoded as ordinary text, so only the separator we add is an EOT."""
    name = "gpt2"

    def __init__(self, encoding=None):
        self.enc = encoding or get_gpt2_encoding()
        self.vocab_size = self.enc.n_vocab
        self.eot_token = self.enc.eot_token

    def encode(self, text):
        return self.enc.encode_ordinary(text.replace("\x00", ""))

    def encode_batch(self, texts):
        return self.enc.encode_ordinary_batch([t.replace("\x00", "") for t in texts])

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids])


class HFTokenizer:
    """A Hugging Face tokenizer.json, read with `tokenizers`. encode() adds no special
    tokens (documents are separated by eot_token, as with the other tokenizers), so it
    equals `Tokenizer.encode(text, add_special_tokens=False).ids`. eot_token is the
    eos token that tokenizer_config.json / special_tokens_map.json name (else a common
    one found in the vocabulary, else None); bos_token likewise (None when absent)."""
    name = "hf"

    def __init__(self, tok_dir):
        self.dir = os.path.abspath(tok_dir)
        path = os.path.join(self.dir, "tokenizer.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{tok_dir} has no tokenizer.json: import the model with "
                                    f"`python convert.py --from_hf=HF_DIR` from a directory that has one")
        try:
            self.tok = Tokenizer.from_file(path)
        except Exception as e:   # the library raises its own Exception subclass for bad JSON / models
            raise ValueError(f"{path} is not a readable tokenizer.json ({str(e).splitlines()[0][:120]}): "
                             f"copy the file from the original model again") from None
        # ids may leave gaps: the vocabulary size a model and a dtype need is max id + 1
        self.vocab_size = max(self.tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        special = special_token_names(self.dir)
        self.eot_token = self._token_id(special.get("eos_token"), EOS_GUESSES)
        self.bos_token = self._token_id(special.get("bos_token"), ())

    def _token_id(self, name, guesses):
        for t in ([name] if name else []) + list(guesses):
            i = self.tok.token_to_id(t)
            if i is not None:
                return i
        return None

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts):
        encs = self.tok.encode_batch(list(texts), add_special_tokens=False)
        return [e.ids for e in encs]

    def decode(self, ids):
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


def encode_documents(tok, texts, dtype):
    """Token ids of `texts`, each followed by tok.eot_token, as one flat array of `dtype`,
    and every document's length (its eot included): (ids (N,), lengths (n_docs,) int64).
    The same ids as tok.encode(text) + [eot] per text; the byte tokenizer works on the UTF-8
    buffer, the others through their batch encoders (the `tokenizers` library's
    encode_batch_fast when it has one: it skips the character offsets nobody reads here)."""
    if isinstance(tok, ByteTokenizer):      # eot_token 0 joins the documents
        blobs = [t.replace("\x00", "").encode("utf-8") for t in texts]
        ids = np.frombuffer(b"\x00".join(blobs) + b"\x00", dtype=np.uint8).astype(dtype)
        return ids, np.fromiter((len(b) + 1 for b in blobs), np.int64, count=len(blobs))
    if isinstance(tok, HFTokenizer):
        encode = getattr(tok.tok, "encode_batch_fast", tok.tok.encode_batch)
        lists = [e.ids for e in encode(list(texts), add_special_tokens=False)]
    else:
        lists = tok.encode_batch(texts) if hasattr(tok, "encode_batch") else [tok.encode(t) for t in texts]
    lengths = np.fromiter((len(ids) + 1 for ids in lists), np.int64, count=len(lists))
    ids = np.full(int(lengths.sum()), tok.eot_token, dtype=dtype)
    is_text = np.ones(len(ids), dtype=bool)
    is_text[np.cumsum(lengths) - 1] = False                      # the eot after each document
    ids[is_text] = np.fromiter(itertools.chain.from_iterable(lists), dtype, count=len(ids) - len(lists))
    return ids, lengths


def special_token_names(tok_dir):
    """{"bos_token": "<s>", "eos_token": "</s>", ...} from tokenizer_config.json, then
    special_tokens_map.json (a value may be a string or {"content": ...})."""
    out = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):   # the config wins
        try:
            with open(os.path.join(tok_dir, name)) as f:
                cfg = json.load(f)
        except (OSError, ValueError):
            continue
        for key in ("bos_token", "eos_token"):
            v = cfg.get(key) if isinstance(cfg, dict) else None
            v = v.get("content") if isinstance(v, dict) else v
            if isinstance(v, str):
                out[key] = v
    return out


def find_tokenizer_dir(ckpt, ckpt_path):
    """The directory holding a checkpoint's HF tokenizer.json, or None. Looked for next
    to the checkpoint (convert.py and train.py put it there), then next to the dense
    checkpoint it was upcycled from, the checkpoint a run started from (init_from) and
    the HF directory it was imported from. ckpt: the checkpoint dict; ckpt_path: its
    out_dir or .pt path."""
    path = os.path.abspath(ckpt_path)
    here = path if os.path.isdir(path) else os.path.dirname(path)
    cfg = ckpt.get("config") or {}
    source = (ckpt.get("upcycled_from") or {}).get("path")
    init = cfg.get("init_from")
    init = init if isinstance(init, str) and init not in ("scratch", "resume", "hf") else None
    for d in (here, source and os.path.dirname(source), init, cfg.get("hf_dir")):
        if d and os.path.exists(os.path.join(d, "tokenizer.json")):
            return d
    return None


def copy_tokenizer_files(src_dir, dst_dir):
    """Copy the HF tokenizer files that src_dir has into dst_dir (each atomically)."""
    for name in HF_TOKENIZER_FILES:
        if os.path.exists(os.path.join(src_dir, name)):
            with open(os.path.join(src_dir, name), "rb") as f:
                data = f.read()
            tmp = os.path.join(dst_dir, name + ".tmp")
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, os.path.join(dst_dir, name))


# -----------------------------------------------------------------------------
# obtaining gpt2.tiktoken

def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def gpt2_tiktoken_path():
    """Where the GPT-2 merges file lives: $GPT2_TIKTOKEN, else data/gpt2.tiktoken."""
    return os.environ.get("GPT2_TIKTOKEN") or GPT2_TIKTOKEN_PATH


def fetch_gpt2_tiktoken(path=None, timeout=180):
    """Download the openai-whisper sdist with pip, extract whisper/assets/gpt2.tiktoken,
    check its sha256 and write it (atomically) to `path`. Returns the path.
    Raises RuntimeError with a one-line reason when pip cannot get the package."""
    path = path or gpt2_tiktoken_path()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:",
               "--timeout", "15", "--retries", "1", "-q", WHISPER_SDIST, "-d", tmp]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"`pip download {WHISPER_SDIST}` timed out after {timeout}s") from None
        sdists = [f for f in os.listdir(tmp) if f.endswith(".tar.gz")]
        if p.returncode != 0 or not sdists:
            last = (p.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"`pip download {WHISPER_SDIST}` failed: {last}")
        with tarfile.open(os.path.join(tmp, sdists[0]), "r:gz") as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith("/" + WHISPER_MEMBER)), None)
            if member is None:
                raise RuntimeError(f"{sdists[0]} has no {WHISPER_MEMBER}")
            data = tar.extractfile(member).read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != GPT2_SHA256:
        raise RuntimeError(f"{WHISPER_MEMBER} from {sdists[0]} has sha256 {digest}, expected {GPT2_SHA256}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp_path = path + ".tmp"
    with open(tmp_path, "wb") as f:
        f.write(data)
    os.replace(tmp_path, path)
    return path


def _encoding_from_file(path):
    if _sha256(path) != GPT2_SHA256:
        raise ValueError(f"{path} is not the GPT-2 merges file (sha256 mismatch): delete it and run "
                         f"`python data/tokenizer.py --fetch`")
    ranks = load_tiktoken_bpe(path, expected_hash=GPT2_SHA256)
    return tiktoken.Encoding(name="gpt2", pat_str=R50K_PAT_STR, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: 50256}, explicit_n_vocab=50257)


def get_gpt2_encoding(fetch=True):
    """The GPT-2 tiktoken Encoding, offline-first:
    1. the local file ($GPT2_TIKTOKEN or data/gpt2.tiktoken) if present;
    2. else fetch that file with pip (the openai-whisper sdist) and use it;
    3. else tiktoken.get_encoding("gpt2") (needs openaipublic.blob.core.windows.net or its cache).
    Raises FileNotFoundError with one line naming the fix when all fail."""
    path = gpt2_tiktoken_path()
    if os.path.exists(path):
        return _encoding_from_file(path)
    reasons = []
    if fetch:
        try:
            return _encoding_from_file(fetch_gpt2_tiktoken(path))
        except RuntimeError as e:
            reasons.append(str(e))
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        reasons.append(f"tiktoken.get_encoding('gpt2'): {type(e).__name__}")
    raise FileNotFoundError(f"GPT-2 merges file {path} is missing and could not be obtained "
                            f"({'; '.join(reasons)}): run `python data/tokenizer.py --fetch` where PyPI is "
                            f"reachable, or set GPT2_TIKTOKEN=/path/to/gpt2.tiktoken")


# -----------------------------------------------------------------------------

TOKENIZERS = ("byte", "gpt2")


def get_tokenizer(name):
    """A tokenizer by name: 'byte' or 'gpt2', or the directory of an imported checkpoint
    (or HF model) holding tokenizer.json (the char tokenizer comes from a dataset's meta.json)."""
    if name == "byte":
        return ByteTokenizer()
    if name == "gpt2":
        return GPT2Tokenizer()
    if os.path.isdir(name):
        return HFTokenizer(name)
    raise ValueError(f"unknown tokenizer {name!r}: valid names are {', '.join(TOKENIZERS)}, or the directory "
                     f"of an imported checkpoint that holds tokenizer.json")


def load_tokenizer(meta, data_dir=None):
    """The tokenizer a prepared dataset was made with, from its meta.json dict (an HF
    tokenizer is read from the copy in data_dir, else from meta's tokenizer_dir)."""
    name = meta.get("tokenizer")
    if name == "hf":
        for d in (data_dir, meta.get("tokenizer_dir")):
            if d and os.path.exists(os.path.join(d, "tokenizer.json")):
                return HFTokenizer(d)
        raise FileNotFoundError(f"meta.json says tokenizer 'hf' but neither {data_dir} nor "
                                f"{meta.get('tokenizer_dir')} has tokenizer.json: rerun the dataset's prepare.py")
    if name == "char":
        if "itos" not in meta:
            raise ValueError("meta.json says tokenizer 'char' but has no 'itos' list: rerun the dataset's prepare.py")
        return CharTokenizer(meta["itos"])
    if name in TOKENIZERS:
        return get_tokenizer(name)
    raise ValueError(f"meta.json names unknown tokenizer {name!r}: valid names are char, hf, {', '.join(TOKENIZERS)}")


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--fetch", action="store_true", help="download gpt2.tiktoken (via pip, openai-whisper sdist)")
    p.add_argument("--force", action="store_true", help="with --fetch: replace an existing file")
    args = p.parse_args()
    path = gpt2_tiktoken_path()
    if args.fetch:
        if os.path.exists(path) and not args.force:
            print(f"{path} already exists (use --force to fetch again)")
        else:
            try:
                fetch_gpt2_tiktoken(path)
            except RuntimeError as e:
                raise SystemExit(f"error: could not fetch gpt2.tiktoken: {e}")
            print(f"wrote {path} (sha256 {GPT2_SHA256[:12]}...)")
    try:
        tok = GPT2Tokenizer(get_gpt2_encoding(fetch=False))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    ids = tok.encode("Hello world")
    print(f"gpt2: vocab_size={tok.vocab_size} eot_token={tok.eot_token} 'Hello world' -> {ids}")


if __name__ == "__main__":
    main()
