"""
Any corpus into the dataset format train.py and eval.py read (see data/dataset.py):
files and directories of .txt, .jsonl/.json and .parquet (readers.py), tokenized with
any tokenizer the repo knows, streamed in bounded memory, tokenized in parallel.

    python data/text/prepare.py corpus/ --out_dir=data/mine                # byte tokenizer
    python data/text/prepare.py a.jsonl b.parquet --out_dir=data/mine --tokenizer=out/hf/dense
    python data/text/prepare.py corpus/ --out_dir=data/mine --domain_from=field:lang --num_proc=8

Domains (--domain_from): dir (the top-level directory under each input, or the input
file's name), field:NAME (a record's field), fixed:NAME. Files are read in an order
shuffled with --seed (so domains interleave in the token stream); each document goes to
val with probability --val_fraction from a seeded stream, and a domain with two or more
documents always has one in val and one in train. Documents longer than --max_doc_chars
are cut at a line break.

Writes, into a hidden temporary directory next to --out_dir, then moved into it (an
existing dataset there is replaced only when everything succeeded):
    train.bin, val.bin              token ids (uint16, or uint32 when the vocabulary has
                                    ids above 65,535), each document followed by eot
    train_index.npy, val_index.npy  int64 (n_docs, 3): offset, length (incl. eot), domain id
    meta.json                       tokenizer, vocab_size, eot_token, dtype, domains, counts,
                                    sources, args and the command that made it
    tokenizer.json, ...             with --tokenizer=DIR: a copy of DIR's tokenizer files
"""
import collections
import importlib.metadata
import json
import multiprocessing
import os
import platform
import shlex
import shutil
import signal
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:  # so `python data/text/prepare.py` can import the data package
    sys.path.insert(0, ROOT)
from configurator import ArgumentParser, run_cli  # noqa: E402
from data.text.readers import list_inputs, parse_domain_from, read_file  # noqa: E402
from data.tokenizer import HF_TOKENIZER_FILES, copy_tokenizer_files, encode_documents, get_tokenizer  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:     # a plain progress line instead
    tqdm = None

# the token file dtypes, narrowest first (data/dataset.py's token_dtype picks the same; importing
# it would import torch, which this script never needs: 2-20 s of start-up, ~200 MB per worker)
TOKEN_DTYPES = ("uint16", "uint32")
MAX_DOMAINS = 1024
BATCH_CHARS = 1 << 20        # characters per batch handed to a tokenizer worker
BATCH_DOCS = 4096
STALE_FILES = ("train_similarity.bin", "train_similarity_index.npy")   # made from an older train.bin


# -----------------------------------------------------------------------------
# documents -> batches

class DomainTable:
    """Domain names -> ids, in order of first appearance."""

    def __init__(self):
        self.names, self.ids = [], {}

    def id(self, name):
        if name not in self.ids:
            if len(self.names) == MAX_DOMAINS:
                raise ValueError(f"more than {MAX_DOMAINS} domains (the last: {name!r}): choose a --domain_from "
                                 f"with fewer distinct values")
            self.ids[name] = len(self.names)
            self.names.append(name)
        return self.ids[name]


def documents(files, text_field, domain_from, max_doc_chars, errors, stats):
    """Yield (text, domain name, input bytes read so far) of every non-empty document of
    `files` [(path, kind, top)]; stats counts empty documents and characters per file kind."""
    how, name = domain_from
    done = 0
    for path, kind, top in files:
        reader = read_file(path, kind, text_field, name if how == "field" else None, max_doc_chars, errors)
        for text, field_domain, pos in reader:
            if not text.strip():
                stats["empty_docs"] += 1
                continue
            if how == "field" and field_domain is None:
                raise ValueError(f"{path}: a record's domain field {name!r} is null: give every record a "
                                 f"domain, or use --domain_from=dir or fixed:NAME")
            stats[f"chars_{kind}"] += len(text)
            yield text, field_domain if how == "field" else name if how == "fixed" else top, done + pos
        done += os.path.getsize(path)
        stats[f"files_{kind}"] += 1


def batches(docs, domains, batch_chars=BATCH_CHARS):
    """Group documents into (texts, domain ids (n,), bytes read) of about batch_chars characters."""
    texts, ids, n, pos = [], [], 0, 0
    for text, domain, pos in docs:
        texts.append(text)
        ids.append(domains.id(domain))
        n += len(text)
        if n >= batch_chars or len(texts) >= BATCH_DOCS:
            yield texts, np.array(ids, dtype=np.int64), pos
            texts, ids, n = [], [], 0
    if texts:
        yield texts, np.array(ids, dtype=np.int64), pos


# -----------------------------------------------------------------------------
# parallel tokenization

_worker = {}


def _init_worker(tokenizer):
    signal.signal(signal.SIGINT, signal.SIG_IGN)          # Ctrl-C is the main process's to handle
    os.environ["TOKENIZERS_PARALLELISM"] = "false"        # one thread per worker: num_proc is the parallelism
    _worker["tok"] = get_tokenizer(tokenizer)


def _encode_in_worker(texts, dtype):
    return encode_documents(_worker["tok"], texts, dtype)


def encoded_batches(batch_iter, tok, tokenizer, dtype, num_proc):
    """Yield ((ids, lengths), (texts, domains, bytes read)) for every batch, in order.
    num_proc > 1: worker processes encode, at most 2 * num_proc batches in flight (bounded memory)."""
    if num_proc == 1:
        for batch in batch_iter:
            yield encode_documents(tok, batch[0], dtype), batch
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ctx.Pool(num_proc, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        pending = collections.deque()
        for batch in batch_iter:
            pending.append((pool.apply_async(_encode_in_worker, (batch[0], dtype)), batch))
            if len(pending) >= 2 * num_proc:
                result, done = pending.popleft()
                yield result.get(), done
        while pending:
            result, done = pending.popleft()
            yield result.get(), done


# -----------------------------------------------------------------------------
# writing the splits

class SplitFile:
    """One split being written: {split}.bin tokens and a raw int64 (offset, length, domain)
    row per document, appended batch by batch; finish() turns the rows into {split}_index.npy."""

    def __init__(self, directory, split):
        self.directory, self.split = directory, split
        self.bin = open(os.path.join(directory, f"{split}.bin"), "wb")
        self.raw_index = os.path.join(directory, f"{split}_index.raw")
        self.index = open(self.raw_index, "wb")
        self.tokens = 0
        self.docs = np.zeros(MAX_DOMAINS, dtype=np.int64)          # documents per domain
        self.domain_tokens = np.zeros(MAX_DOMAINS, dtype=np.int64)

    def append(self, ids, lengths, domains):
        """Documents back to back: ids (N,) all of them, lengths (n,), domains (n,)."""
        if len(lengths) == 0:
            return
        offsets = self.tokens + np.cumsum(lengths) - lengths
        ids.tofile(self.bin)
        np.stack([offsets, lengths, domains], axis=1).astype(np.int64).tofile(self.index)
        self.tokens += int(lengths.sum())
        np.add.at(self.docs, domains, 1)
        np.add.at(self.domain_tokens, domains, lengths)

    def finish(self):
        self.bin.close()
        self.index.close()
        rows = np.memmap(self.raw_index, dtype=np.int64, mode="r").reshape(-1, 3) if self.tokens else None
        n = 0 if rows is None else len(rows)
        index = np.lib.format.open_memmap(os.path.join(self.directory, f"{self.split}_index.npy"), mode="w+",
                                          dtype=np.int64, shape=(n, 3))
        for start in range(0, n, 1 << 20):                           # 24 MiB at a time
            index[start:start + (1 << 20)] = rows[start:start + (1 << 20)]
        index.flush()
        del index, rows
        os.remove(self.raw_index)


class ValSplit:
    """Routes each document to train or val: val with probability `fraction`, drawn from a
    stream seeded by `seed` (the same documents in the same order give the same split).
    While a domain has no val document its latest train document is held back; finish()
    sends a held document to val when its domain has some in train, so every domain with
    two or more documents lands in both splits."""

    def __init__(self, train, val, fraction, seed):
        self.train, self.val, self.fraction = train, val, fraction
        self.rng = np.random.default_rng([seed, 1])
        self.has_val = set()
        self.held = {}        # domain id -> (ids, length) of its held-back train document

    def route(self, ids, lengths, domains):
        """Append one batch of documents (ids (N,), lengths (n,), domains (n,)) to the splits."""
        is_val = self.rng.random(len(lengths)) < self.fraction
        self.has_val.update(domains[is_val].tolist())
        to_train = ~is_val
        released = [self.held.pop(d) for d in list(self.held) if d in self.has_val]
        ends = np.cumsum(lengths)
        for d in np.unique(domains[to_train]).tolist():
            if d in self.has_val:
                continue
            last = np.flatnonzero(to_train & (domains == d))[-1]
            to_train[last] = False
            if d in self.held:
                released.append(self.held.pop(d))
            self.held[d] = (ids[ends[last] - lengths[last]:ends[last]].copy(), lengths[last:last + 1].copy(),
                            domains[last:last + 1].copy())
        for doc in released:
            self.train.append(*doc)
        self.train.append(ids[np.repeat(to_train, lengths)], lengths[to_train], domains[to_train])
        self.val.append(ids[np.repeat(is_val, lengths)], lengths[is_val], domains[is_val])

    def finish(self):
        """Held documents to val (their domain has train documents) or train (it has none)."""
        for d, doc in self.held.items():
            (self.val if self.train.docs[d] > 0 else self.train).append(*doc)
        self.held = {}


# -----------------------------------------------------------------------------
# progress

class Progress:
    """Input bytes read, tokens written, tokens/s and ETA on stderr: a tqdm bar when tqdm is
    installed, else a plain line every `every` seconds; nothing when disabled."""

    def __init__(self, total_bytes, enabled=True, every=5.0):
        self.total, self.enabled, self.every = max(1, total_bytes), enabled, every
        self.t0 = self.last = time.time()
        self.done = self.tokens = 0
        self.bar = None             # made at the first update: a run that fails at once draws none

    def update(self, bytes_done, tokens):
        now = time.time()
        rate = tokens / max(now - self.t0, 1e-9)
        if self.enabled and tqdm is not None and self.bar is None:
            self.bar = tqdm(total=self.total, unit="B", unit_scale=True, unit_divisor=1024, desc="tokenizing",
                            file=sys.stderr, smoothing=0.1)
        if self.bar is not None:
            self.bar.update(bytes_done - self.done)
            self.bar.set_postfix_str(f"{tokens:,} tokens, {rate:,.0f} tok/s", refresh=False)
        elif self.enabled and (now - self.last >= self.every or bytes_done >= self.total):
            eta = (now - self.t0) * (self.total - bytes_done) / max(bytes_done, 1)
            print(f"tokenizing: {bytes_done / 2 ** 20:,.1f}/{self.total / 2 ** 20:,.1f} MiB "
                  f"({100 * bytes_done / self.total:.0f}%), {tokens:,} tokens, {rate:,.0f} tok/s, "
                  f"ETA {eta:.0f}s", file=sys.stderr, flush=True)
            self.last = now
        self.done, self.tokens = bytes_done, tokens

    def close(self, failed=False):
        """End the bar; after a failure erase it, so that the error is the one line left."""
        if self.bar is not None:
            self.bar.leave = not failed
            self.bar.close()


# -----------------------------------------------------------------------------
# checks, output directory, meta

def file_dtype(tok, dtype):
    """The .bin dtype: `dtype` (uint16|uint32), or "auto": the narrowest that holds every id."""
    fits = [d for d in TOKEN_DTYPES if np.iinfo(d).max >= tok.vocab_size - 1]
    if not fits:
        raise ValueError(f"tokenizer vocabulary of {tok.vocab_size:,} ids does not fit uint32 token files")
    if dtype == "auto":
        return np.dtype(fits[0])
    if dtype not in TOKEN_DTYPES:
        raise ValueError(f"--dtype={dtype!r} is not one of auto, {', '.join(TOKEN_DTYPES)}")
    if dtype not in fits:
        raise ValueError(f"--dtype={dtype} cannot hold token id {tok.vocab_size - 1} of a {tok.vocab_size:,}-id "
                         f"vocabulary: use --dtype=uint32 (or auto)")
    return np.dtype(dtype)


def check_out_dir(out_dir):
    """An out_dir that may be written: new, empty, or a prepared dataset (its meta.json)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out_dir {out_dir} is a file: choose a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.exists(os.path.join(out_dir, "meta.json")):
        raise ValueError(f"--out_dir {out_dir} holds files but no dataset (no meta.json): choose a new or empty "
                         f"directory, so nothing of yours is overwritten")


def commit(tmp_dir, out_dir):
    """Move the finished dataset from tmp_dir into out_dir: a new out_dir is one rename; into
    an existing dataset each file is replaced (meta.json last) and files that would no longer
    match it (a similarity order, another tokenizer's files) are removed."""
    if not os.path.exists(out_dir):
        os.rename(tmp_dir, out_dir)
        return
    names = sorted(os.listdir(tmp_dir), key=lambda n: n == "meta.json")
    for stale in STALE_FILES + HF_TOKENIZER_FILES:
        if stale not in names and os.path.exists(os.path.join(out_dir, stale)):
            os.remove(os.path.join(out_dir, stale))
    for name in names:
        os.replace(os.path.join(tmp_dir, name), os.path.join(out_dir, name))


def _version(pkg):
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def split_counts(split, names):
    return {"docs": int(split.docs.sum()), "tokens": split.tokens,
            "per_domain": {name: {"docs": int(split.docs[d]), "tokens": int(split.domain_tokens[d])}
                           for d, name in enumerate(names)}}


def command_line(inputs, out_dir, args):
    """The command that remakes the dataset (meta "command", which data/dataset.py's hint prints)."""
    flags = [f"--{k}={v}" for k, v in args.items() if v != PREPARE_DEFAULTS.get(k)]
    return shlex.join(["python", "data/text/prepare.py", *inputs, f"--out_dir={out_dir}", *flags])


def build_meta(tok, dtype, domains, splits, stats, files, inputs, out_dir, args):
    kinds = sorted({k for _, k, _ in files})
    meta = {
        "dataset": "text",
        "tokenizer": tok.name, "vocab_size": tok.vocab_size, "eot_token": tok.eot_token, "dtype": dtype.name,
        "domains": domains.names,
        "counts": {name: split_counts(split, domains.names) for name, split in splits.items()},
        "sources": {"inputs": [os.path.abspath(p) for p in inputs], "files": len(files),
                    "bytes": sum(os.path.getsize(p) for p, _, _ in files),
                    "files_skipped": stats["files_skipped"], "empty_docs": stats["empty_docs"],
                    "per_kind": {k: {"files": stats[f"files_{k}"], "chars": stats[f"chars_{k}"]} for k in kinds}},
        "command": command_line(inputs, out_dir, args),
        "versions": {"python": platform.python_version(), "numpy": np.__version__,
                     "tiktoken": _version("tiktoken"), "tokenizers": _version("tokenizers"),
                     "pyarrow": _version("pyarrow")},
        "args": args,
    }
    if tok.name == "hf":
        meta["tokenizer_dir"] = tok.dir
    return meta


# -----------------------------------------------------------------------------

PREPARE_DEFAULTS = dict(tokenizer="byte", text_field="text", domain_from="dir", val_fraction=0.05, seed=1337,
                        num_proc=1, max_doc_chars=100_000, dtype="auto", encoding_errors="strict")


def check_args(val_fraction, num_proc, max_doc_chars, encoding_errors):
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val_fraction={val_fraction} must lie strictly between 0 and 1")
    if num_proc < 1:
        raise ValueError(f"--num_proc={num_proc} must be at least 1")
    if max_doc_chars < 1:
        raise ValueError(f"--max_doc_chars={max_doc_chars} must be at least 1")
    if encoding_errors not in ("strict", "replace"):
        raise ValueError(f"--encoding_errors={encoding_errors!r} is not one of strict, replace")


def tokenize_into(tmp_dir, files, tok, tokenizer, dtype, args, stats, verbose):
    """Read, tokenize and split every document into tmp_dir; returns (domains, splits)."""
    domains = DomainTable()
    splits = {name: SplitFile(tmp_dir, name) for name in ("train", "val")}
    router = ValSplit(splits["train"], splits["val"], args["val_fraction"], args["seed"])
    docs = documents(files, args["text_field"], parse_domain_from(args["domain_from"]), args["max_doc_chars"],
                     args["encoding_errors"], stats)
    progress = Progress(sum(os.path.getsize(p) for p, _, _ in files), verbose)
    try:
        for (ids, lengths), (_, doc_domains, pos) in encoded_batches(batches(docs, domains), tok, tokenizer,
                                                                     dtype, args["num_proc"]):
            router.route(ids, lengths, doc_domains)
            progress.update(pos, splits["train"].tokens + splits["val"].tokens)
    except BaseException:
        progress.close(failed=True)
        raise
    progress.close()
    router.finish()
    for split in splits.values():
        split.finish()
    return domains, splits


def check_splits(splits, domains, inputs):
    n_docs = sum(int(s.docs.sum()) for s in splits.values())
    if n_docs == 0:
        raise ValueError(f"no text in {', '.join(inputs)}: every document is empty")
    if n_docs < 2 or splits["train"].docs.sum() == 0:
        raise ValueError(f"{', '.join(inputs)} gave {n_docs} document(s) with {splits['val'].docs.sum()} in val: "
                         f"need one in train and one in val (add text, lower --max_doc_chars or --val_fraction)")
    alone = [name for d, name in enumerate(domains.names) if splits["val"].docs[d] == 0]
    if alone:
        print(f"warning: domain(s) {', '.join(alone)} have a single document, which is in train only",
              file=sys.stderr)


def prepare(inputs, out_dir, verbose=True, **kw):
    """Build the dataset of `inputs` (files and directories) into out_dir and return its meta
    dict. Keywords as PREPARE_DEFAULTS (the command-line flags)."""
    t0 = time.time()
    unknown = set(kw) - set(PREPARE_DEFAULTS)
    if unknown:
        raise TypeError(f"prepare() got unknown argument(s) {', '.join(sorted(unknown))}")
    args = dict(PREPARE_DEFAULTS, **kw)
    check_args(args["val_fraction"], args["num_proc"], args["max_doc_chars"], args["encoding_errors"])
    parse_domain_from(args["domain_from"])
    tok = get_tokenizer(args["tokenizer"])
    if tok.eot_token is None:
        raise ValueError(f"tokenizer {args['tokenizer']} names no end-of-text token (eos_token in "
                         f"tokenizer_config.json), which separates the documents: add one there")
    dtype = file_dtype(tok, args["dtype"])
    check_out_dir(out_dir)
    files, skipped = list_inputs(inputs, exclude=[out_dir])
    if not files:
        raise ValueError(f"no .txt, .jsonl, .json or .parquet files in {', '.join(inputs)}")
    order = np.random.default_rng([args["seed"], 0]).permutation(len(files))   # domains interleave
    files = [files[i] for i in order]
    stats = collections.Counter(files_skipped=skipped)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.tmp-", dir=parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_dir, 0o777 & ~umask)          # mkdtemp's 0700 would become out_dir's mode
        domains, splits = tokenize_into(tmp_dir, files, tok, args["tokenizer"], dtype, args, stats, verbose)
        check_splits(splits, domains, inputs)
        meta = build_meta(tok, dtype, domains, splits, stats, files, inputs, out_dir, args)
        if tok.name == "hf":
            copy_tokenizer_files(tok.dir, tmp_dir)
        with open(os.path.join(tmp_dir, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        commit(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    if verbose:
        print_summary(meta, out_dir, time.time() - t0)
    return meta


def print_summary(meta, out_dir, seconds):
    tr, va = meta["counts"]["train"], meta["counts"]["val"]
    width = max(8, *(len(n) for n in meta["domains"]))
    print(f"{'domain':<{width}} {'train docs':>10} {'train tokens':>13} {'val docs':>9} {'val tokens':>11}")
    for name in meta["domains"]:
        a, b = tr["per_domain"][name], va["per_domain"][name]
        print(f"{name:<{width}} {a['docs']:>10,} {a['tokens']:>13,} {b['docs']:>9,} {b['tokens']:>11,}")
    print(f"{'total':<{width}} {tr['docs']:>10,} {tr['tokens']:>13,} {va['docs']:>9,} {va['tokens']:>11,}")
    tokens = tr["tokens"] + va["tokens"]
    print(f"tokenizer={meta['tokenizer']} vocab_size={meta['vocab_size']} dtype={meta['dtype']}: wrote {out_dir} "
          f"in {seconds:.1f}s ({tokens / max(seconds, 1e-9):,.0f} tokens/s)")


def main(argv=None):
    p = ArgumentParser(prog="data/text/prepare.py", description="Prepare a dataset from your own text files.")
    p.add_argument("inputs", nargs="+", help="files and directories (read recursively): .txt, .jsonl, .json, "
                                             ".parquet (pyarrow), .txt.gz, .jsonl.gz, .json.gz")
    p.add_argument("--out_dir", required=True, help="where the dataset goes (new, empty, or a dataset to replace)")
    p.add_argument("--tokenizer", default="byte", help="byte | gpt2 | DIR holding tokenizer.json (an imported model)")
    p.add_argument("--text_field", default="text", help="the text field of .jsonl/.json records and .parquet rows")
    p.add_argument("--domain_from", default="dir", help="dir | field:NAME | fixed:NAME")
    p.add_argument("--val_fraction", type=float, default=PREPARE_DEFAULTS["val_fraction"])
    p.add_argument("--seed", type=int, default=PREPARE_DEFAULTS["seed"], help="file order and val split")
    p.add_argument("--num_proc", type=int, default=1, help="tokenizer worker processes")
    p.add_argument("--max_doc_chars", type=int, default=PREPARE_DEFAULTS["max_doc_chars"],
                   help="longer documents are cut at a line break")
    p.add_argument("--dtype", default="auto", help="auto | uint16 | uint32: the token file dtype")
    p.add_argument("--encoding_errors", default="strict", help="strict (stop at a byte that is not UTF-8) | replace")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    args = vars(p.parse_args(argv))
    inputs, out_dir, quiet = args.pop("inputs"), args.pop("out_dir"), args.pop("quiet")
    try:
        prepare(inputs, out_dir, verbose=not quiet, **args)
    except KeyboardInterrupt:
        print(f"interrupted: {out_dir} left as it was", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, user_errors=(FileNotFoundError, ValueError)))
