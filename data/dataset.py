"""
Reading a prepared dataset (data/<name>/ made by data/<name>/prepare.py):

    {split}.bin          token ids, documents back to back: uint16, or uint32 when the
                         vocabulary has ids above 65,535 (meta "dtype"; token_dtype)
    {split}_index.npy    int64 (n_docs, 3): offset, length, domain id of each document
    meta.json            tokenizer, vocab_size, eot_token, domains, dtype (absent = uint16), ...

TokenDataset draws nanoGPT-style random windows (get_batch) for training and fixed,
seeded windows with the domain of every position (fixed_batches) for evaluation.
With batching="similarity" the train split is read from train_similarity.bin (the same
documents in the order written by data/similarity.py: similar documents next to each other).

domains="code" (or "code,prose", or a list) restricts a TokenDataset to those domains'
documents: it reads the split as if the file held only them, in file order (a "view"), so
windows never contain a token of another domain. Training a Branch-Train-MiX branch on one
domain (Sukhbaatar et al., arXiv 2403.07816, section 2) uses it. Without a filter view
positions are file positions, and a batch's window starts are one torch.randint draw over
the whole split, as in nanoGPT's get_batch (with a filter, the same draw over the view).
"""
import json
import os

import numpy as np
import torch

DATA_ROOT = os.path.dirname(os.path.abspath(__file__))
BATCHINGS = ("random", "similarity")
MAX_VOCAB = 2 ** 32


def token_dtype(vocab_size):
    """The narrowest file dtype for token ids 0..vocab_size-1: uint16 up to id 65,535, else uint32."""
    return np.uint16 if vocab_size <= 2 ** 16 else np.uint32


def meta_dtype(meta):
    """The dtype of a dataset's .bin files, from its meta (datasets written before the key: uint16)."""
    return np.dtype(meta.get("dtype", "uint16"))


def prepare_hint(data_dir):
    """The command that creates data_dir: the command its meta.json records, else the
    prepare script (and tokenizer) it names when it can be read, else the one named
    like the directory, else multidomain's."""
    try:
        with open(os.path.join(data_dir, "meta.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        meta = {}
    meta = meta if isinstance(meta, dict) else {}
    if isinstance(meta.get("command"), str):      # data/text/prepare.py records its whole command line
        return meta["command"]
    name = os.path.basename(os.path.normpath(data_dir))
    dataset = next((n for n in (meta.get("dataset"), name) if isinstance(n, str)
                    and os.path.exists(os.path.join(DATA_ROOT, n, "prepare.py"))), "multidomain")
    cmd = f"python data/{dataset}/prepare.py"
    if os.path.abspath(data_dir) != os.path.join(DATA_ROOT, dataset):
        cmd += f" --out_dir={data_dir}"
    if meta.get("tokenizer") == "hf" and isinstance(meta.get("tokenizer_dir"), str):
        cmd += f" --tokenizer={meta['tokenizer_dir']}"
    elif meta.get("tokenizer") == "gpt2":
        cmd += " --tokenizer=gpt2"
    return cmd


def load_meta(data_dir):
    """meta.json of a prepared dataset as a dict."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        what = "does not exist" if not os.path.isdir(data_dir) else "has no meta.json"
        raise FileNotFoundError(f"dataset directory {data_dir} {what}: run `{prepare_hint(data_dir)}` first")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is corrupt ({e.msg if hasattr(e, 'msg') else e}): rerun `{prepare_hint(data_dir)}`") from None
    except OSError as e:   # a directory, unreadable, ...
        raise ValueError(f"{path} cannot be read ({e.strerror}): rerun `{prepare_hint(data_dir)}`") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} is corrupt (not a JSON object): rerun `{prepare_hint(data_dir)}`")
    missing = [k for k in ("vocab_size", "domains") if k not in meta]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: rerun `{prepare_hint(data_dir)}`")
    v, doms = meta["vocab_size"], meta["domains"]
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_VOCAB:
        raise ValueError(f"{path} is corrupt: vocab_size={v!r} must be an int in 1..{MAX_VOCAB}: "
                         f"rerun `{prepare_hint(data_dir)}`")
    dtype = meta.get("dtype", "uint16")
    if dtype not in ("uint16", "uint32") or np.dtype(dtype).itemsize < np.dtype(token_dtype(v)).itemsize:
        raise ValueError(f"{path} is corrupt: dtype={dtype!r} cannot hold vocab_size={v} "
                         f"(uint16 up to 65,536 tokens, else uint32): rerun `{prepare_hint(data_dir)}`")
    if not isinstance(doms, list) or not doms or not all(isinstance(d, str) for d in doms):
        raise ValueError(f"{path} is corrupt: domains must be a non-empty list of names: "
                         f"rerun `{prepare_hint(data_dir)}`")
    return meta


def load_split(data_dir, split, meta=None):
    """Validated (tokens memmap, index array) of {split}.bin / {split}_index.npy."""
    meta = meta if meta is not None else load_meta(data_dir)
    bin_path = os.path.join(data_dir, f"{split}.bin")
    index_path = os.path.join(data_dir, f"{split}_index.npy")
    hint = (f"run `python data/similarity.py --data_dir={data_dir}`" if split.endswith("_similarity")
            else f"rerun `{prepare_hint(data_dir)}`")
    for path in (bin_path, index_path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} is missing: {hint}")
    try:
        index = np.load(index_path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{index_path} is corrupt ({e}): {hint}") from None
    if index.ndim != 2 or index.shape[1] != 3 or len(index) == 0 or not np.issubdtype(index.dtype, np.integer):
        raise ValueError(f"{index_path} is corrupt (expected a non-empty int (n_docs, 3) array, got "
                         f"{index.dtype} {index.shape}): {hint}")
    index = index.astype(np.int64)
    size, dtype = os.path.getsize(bin_path), meta_dtype(meta)
    offsets, lengths, domains = index[:, 0], index[:, 1], index[:, 2]
    if size % dtype.itemsize or size // dtype.itemsize != offsets[-1] + lengths[-1]:
        raise ValueError(f"{bin_path} is corrupt: {size} bytes, but {index_path} describes "
                         f"{offsets[-1] + lengths[-1]} {dtype.name} tokens: {hint}")
    if offsets[0] != 0 or np.any(lengths <= 0) or np.any(offsets[1:] != offsets[:-1] + lengths[:-1]):
        raise ValueError(f"{index_path} is corrupt: documents are not contiguous: {hint}")
    if domains.min() < 0 or domains.max() >= len(meta["domains"]):
        raise ValueError(f"{index_path} is corrupt: domain ids outside 0..{len(meta['domains']) - 1}: {hint}")
    tokens = np.memmap(bin_path, dtype=dtype, mode="r")
    top = int(tokens.max())                              # one pass (~10 ms for 5M tokens)
    if top >= meta["vocab_size"]:
        raise ValueError(f"{bin_path} holds token id {top} >= vocab_size={meta['vocab_size']} in meta.json: {hint}")
    return tokens, index


class TokenDataset:
    """One split of a prepared dataset, optionally only some domains (domains="code").

    len(ds) is the number of tokens (of the chosen domains). get_batch draws random windows;
    fixed_batches gives deterministic evaluation windows plus the domain of each position.
    """

    def __init__(self, data_dir, split, batching="random", domains=None):
        if batching not in BATCHINGS:
            raise ValueError(f"batching={batching!r} is not one of {', '.join(BATCHINGS)}")
        if batching == "similarity" and split != "train":
            raise ValueError(f"batching='similarity' applies to the train split only, not {split!r}")
        self.data_dir, self.split, self.batching = data_dir, split, batching
        self.meta = load_meta(data_dir)
        self.file = split if batching == "random" else "train_similarity"
        self.bin_path = os.path.join(data_dir, f"{self.file}.bin")
        _, self.index = load_split(data_dir, self.file, self.meta)
        self.n_tokens = int(self.index[-1, 0] + self.index[-1, 1])
        self.offsets = np.ascontiguousarray(self.index[:, 0])
        self.domain_names = list(self.meta["domains"])
        self.n_domains = len(self.domain_names)
        self.domains = None           # ids of the chosen domains, None = all (no view)
        if domains is not None:
            self._select_domains(domains)

    def _select_domains(self, domains):
        """Keep only the documents of `domains`: positions 0..n_tokens-1 then address the
        concatenation of those documents (the view), mapped to file positions by _file_pos."""
        names = [d.strip() for d in domains.split(",")] if isinstance(domains, str) else [str(d) for d in domains]
        names = [d for d in names if d]
        unknown = [d for d in names if d not in self.domain_names]
        if not names or unknown:
            what = f"unknown domain(s) {', '.join(unknown)}" if unknown else f"domains={domains!r} names no domain"
            raise ValueError(f"{what} for {self.data_dir}: choose from {', '.join(self.domain_names)}")
        self.domains = sorted({self.domain_names.index(d) for d in names})
        docs = np.flatnonzero(np.isin(self.index[:, 2], self.domains))
        if len(docs) == 0:
            raise ValueError(f"{self.bin_path} has no document of domain(s) {', '.join(names)}: "
                             f"choose other domains or prepare more data")
        self.index = self.index[docs]                                    # (n_docs_kept, 3)
        lengths = self.index[:, 1]
        self.view_offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        self.offsets = self.view_offsets                                 # domain_of works in the view
        self.n_tokens = int(lengths.sum())

    def _file_pos(self, positions):
        """View positions -> positions in {file}.bin (the identity without a domain filter)."""
        if self.domains is None:
            return positions
        doc = np.searchsorted(self.view_offsets, positions, side="right") - 1
        return self.index[doc, 0] + (positions - self.view_offsets[doc])

    def __len__(self):
        return self.n_tokens

    def _tokens(self):
        # a fresh memmap per batch, as in nanoGPT (a long-lived one keeps growing its resident pages)
        return np.memmap(self.bin_path, dtype=meta_dtype(self.meta), mode="r")

    def _check_block_size(self, block_size):
        if block_size < 1 or self.n_tokens < block_size + 1:
            what = f"{self.bin_path}" + (f" (domains {', '.join(self.domain_names[d] for d in self.domains)})"
                                          if self.domains is not None else "")
            raise ValueError(f"{what} has {self.n_tokens} tokens, too few for block_size={block_size} "
                             f"(need at least block_size+1): use a smaller block_size or prepare more data")

    def _windows(self, starts, block_size):
        """(x, y) int64 tensors (B, T) for windows starting at `starts`."""
        idx = self._file_pos(np.asarray(starts, dtype=np.int64)[:, None] + np.arange(block_size + 1))
        buf = torch.from_numpy(self._tokens()[idx].astype(np.int64))
        return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()

    def sample_starts(self, batch_size, block_size, generator):
        """Random window starts, drawn from `generator` (save its state to resume exactly)."""
        self._check_block_size(block_size)
        return torch.randint(self.n_tokens - block_size, (batch_size,), generator=generator).numpy()

    def get_batch(self, batch_size, block_size, generator):
        """Random windows: x = tokens[i:i+T], y = tokens[i+1:i+T+1], int64 (B, T) on the CPU."""
        return self._windows(self.sample_starts(batch_size, block_size, generator), block_size)

    def domain_of(self, positions):
        """Domain id of each token position (any shape)."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= self.n_tokens):
            raise ValueError(f"token positions must lie in [0, {self.n_tokens})")
        doc = np.searchsorted(self.offsets, positions, side="right") - 1
        return self.index[doc, 2]

    def fixed_batches(self, n_batches, batch_size, block_size, seed=1234):
        """n_batches deterministic (x, y, domains) triples for evaluation; domains (B, T+1)
        int64 is the domain of every position of the window: the input tokens' domains
        are domains[:, :-1], the targets' domains[:, 1:] (they differ where a document
        ends: its end-of-text token belongs to it, the next target to the next one).
        Depends only on the seed and the data."""
        gen = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(n_batches):
            starts = self.sample_starts(batch_size, block_size, gen)
            x, y = self._windows(starts, block_size)
            dom = self.domain_of(starts[:, None] + np.arange(block_size + 1))
            out.append((x, y, torch.from_numpy(dom)))
        return out
