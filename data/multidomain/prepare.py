"""
The default dataset: documents from 4 clearly different domains, built only from text that
every machine has after `pip install torch numpy tiktoken matplotlib pytest` (no download):

    code   Python standard-library source files (.py) with their docstrings removed
    prose  English docstrings of the standard library + the pydoc topic pages (pydoc_data/topics.py)
    math   numpy's docstrings (math-heavy, full of array examples)
    c      C/C++ headers: Python's include dir and torch/include

Nothing is imported: files are read as text and docstrings extracted with `ast`.
Documents are at most --max_doc_chars characters (longer texts are cut at line breaks).
Sampling is deterministic (sorted paths, seeded numpy RNG).

    python data/multidomain/prepare.py                       # byte tokenizer, ~1.5M chars/domain
    python data/multidomain/prepare.py --tokenizer=gpt2
    python data/multidomain/prepare.py --tokenizer=out/hf/dense    # an imported model's tokenizer.json
                                                                   # -> data/multidomain_dense

Writes to --out_dir (default data/multidomain; with --tokenizer=DIR, data/multidomain_<DIR's name>):
    train.bin, val.bin              uint16 token ids (uint32 when the vocabulary has ids above
                                    65,535); documents in a seeded random order across domains,
                                    each followed by the tokenizer's eot token
    train_index.npy, val_index.npy  int64 (n_docs, 3): offset, length (incl. eot), domain id
    meta.json                       tokenizer, vocab_size, eot_token, domains, counts, sources, args
                                    (HF tokenizers also: tokenizer_dir, dtype)
    tokenizer.json, ...             with --tokenizer=DIR: a copy of DIR's tokenizer files
"""
import ast
import importlib.metadata
import importlib.util
import inspect
import json
import os
import platform
import sys
import sysconfig
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:  # so `python data/multidomain/prepare.py` can import the data package
    sys.path.insert(0, ROOT)
from configurator import ArgumentParser  # noqa: E402
from data.dataset import token_dtype  # noqa: E402
from data.tokenizer import copy_tokenizer_files, get_tokenizer  # noqa: E402

DEFAULT_OUT_DIR = os.path.dirname(os.path.abspath(__file__))
# directories never read (tests, bundled third-party code, generated tables, GUIs)
SKIP_DIRS = {"test", "tests", "site-packages", "dist-packages", "__pycache__", "idlelib", "turtledemo",
             "lib2to3", "ensurepip", "encodings", "pydoc_data", "_vendor", "vendored", "third_party"}
MIN_DOC_CHARS = 200          # shorter documents are dropped (tiny __init__.py files, stub headers)
KINDS = ("source", "code", "docstrings", "pydoc_topics")  # how a source root is turned into documents


# -----------------------------------------------------------------------------
# sources

def _package_dir(name):
    """Directory of an installed package, found without importing it (None if absent)."""
    spec = importlib.util.find_spec(name)
    return list(spec.submodule_search_locations)[0] if spec and spec.submodule_search_locations else None


def default_sources():
    """domain name -> list of (kind, path, suffix). kind is one of KINDS:
    source: each file's text; code: Python source without docstrings;
    docstrings: the docstrings in each .py file;
    pydoc_topics: the topic pages in pydoc_data/topics.py."""
    stdlib = sysconfig.get_paths()["stdlib"]
    numpy_dir = _package_dir("numpy")
    torch_dir = _package_dir("torch")
    sources = {
        "code": [("code", stdlib, ".py")],
        "prose": [("docstrings", stdlib, ".py"),
                  ("pydoc_topics", os.path.join(stdlib, "pydoc_data", "topics.py"), ".py")],
        "math": [("docstrings", numpy_dir, ".py")],
        "c": [("source", sysconfig.get_paths()["include"], ".h")],
    }
    if torch_dir:
        sources["c"].append(("source", os.path.join(torch_dir, "include"), ".h"))
    return sources


def list_files(path, suffix):
    """Sorted files under `path` (or `path` itself) ending in `suffix`, skipping SKIP_DIRS."""
    if os.path.isfile(path):
        return [path]
    out = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        out += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(suffix)]
    return out


def read_text(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read().replace("\x00", "")


def strip_docstrings(text):
    """Python source without its docstrings (they belong to the prose domain). A docstring
    on lines of its own is deleted (replaced by `pass` if it was the whole body); inline
    ones are kept. Unparsable files are returned unchanged."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return text
    lines = text.splitlines(keepends=True)
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        first = node.body[0] if node.body else None
        if not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)):
            continue
        a, b = first.lineno - 1, first.end_lineno  # the docstring occupies lines[a:b]
        if lines[a][:first.col_offset].strip() or lines[b - 1][first.end_col_offset:].strip() not in ("", ";"):
            continue  # shares a line with other code
        indent = lines[a][:first.col_offset]
        lines[a:b] = [indent + "pass\n" if len(node.body) == 1 and not isinstance(node, ast.Module) else ""] + [""] * (b - a - 1)
    return "".join(lines)


def docstrings_of(text):
    """Docstrings of a module's source (module, classes, functions, in source order), plus
    the documentation strings numpy attaches with add_newdoc(...). Unparsable files -> []."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            d = ast.get_docstring(node)
            if d:
                docs.append((node.lineno if hasattr(node, "lineno") else 0, d))
        elif isinstance(node, ast.Call):
            f = node.func
            fname = f.id if isinstance(f, ast.Name) else (f.attr if isinstance(f, ast.Attribute) else "")
            if fname.startswith("add_newdoc"):
                for c in ast.walk(node):
                    if isinstance(c, ast.Constant) and isinstance(c.value, str) and "\n" in c.value:
                        docs.append((node.lineno, inspect.cleandoc(c.value)))
    docs.sort(key=lambda t: t[0])
    return [d for _, d in docs]


def pydoc_topics_of(text):
    """The topic pages of pydoc_data/topics.py (a dict literal `topics = {name: text}`)."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            return [v.value for v in node.value.values if isinstance(v, ast.Constant) and isinstance(v.value, str)]
    return []


def chunk(text, max_chars):
    """Cut text into pieces of at most max_chars, at line breaks where possible."""
    pieces, cur, n = [], [], 0
    for line in text.splitlines(keepends=True):
        while len(line) > max_chars:  # a single huge line: hard split
            pieces.append(line[:max_chars])
            line = line[max_chars:]
        if n + len(line) > max_chars and cur:
            pieces.append("".join(cur))
            cur, n = [], 0
        cur.append(line)
        n += len(line)
    if cur:
        pieces.append("".join(cur))
    return pieces


def file_documents(kind, path, max_doc_chars):
    """The documents (strings) one file contributes."""
    text = read_text(path)
    if kind == "source":
        texts = [text]
    elif kind == "code":
        texts = [strip_docstrings(text)]
    elif kind == "docstrings":
        texts = ["\n\n".join(docstrings_of(text))]
    elif kind == "pydoc_topics":
        texts = pydoc_topics_of(text)
    else:
        raise ValueError(f"unknown source kind {kind!r}: valid kinds are {', '.join(KINDS)}")
    docs = []
    for t in texts:
        docs += [c.strip("\n") for c in chunk(t, max_doc_chars)]
    return [d for d in docs if len(d) >= MIN_DOC_CHARS]


def collect_documents(sources, chars_per_domain, max_doc_chars=8000, seed=1337):
    """Sample documents for every domain.

    sources: {domain name: [(kind, path, suffix), ...]} (see default_sources); the dict order
    defines the domain ids. For each domain the files of all its sources are listed (sorted),
    shuffled with a seeded RNG, and read in that order until the domain has chars_per_domain
    characters (the last document is trimmed to fit). A single file contributes at most
    max(max_doc_chars, chars_per_domain // 20) characters, so no file dominates a domain.
    Returns (docs, info): docs a list of (text, domain_id); info per domain (files, chars, ...).
    """
    if chars_per_domain < MIN_DOC_CHARS:
        raise ValueError(f"chars_per_domain={chars_per_domain} is below the minimum document size {MIN_DOC_CHARS}")
    per_file_cap = max(max_doc_chars, chars_per_domain // 20)
    docs, info = [], {}
    for d, (domain, srcs) in enumerate(sources.items()):
        files = []
        for kind, path, suffix in srcs:
            if kind not in KINDS:
                raise ValueError(f"domain {domain!r}: unknown source kind {kind!r}: valid kinds are {', '.join(KINDS)}")
            if path is None or not os.path.exists(path):
                print(f"warning: domain {domain!r}: source {path} does not exist, skipped", file=sys.stderr)
                continue
            files += [(kind, f) for f in list_files(path, suffix)]
        if not files:
            raise FileNotFoundError(f"domain {domain!r} has no source files (looked in "
                                    f"{', '.join(str(p) for _, p, _ in srcs)})")
        rng = np.random.default_rng([seed, d])  # one stream per domain: domains do not influence each other
        total, used_files, n_docs = 0, 0, 0
        for i in rng.permutation(len(files)):
            kind, f = files[i]
            from_file = 0
            for text in file_documents(kind, f, max_doc_chars):
                text = text[:min(chars_per_domain - total, per_file_cap - from_file)]
                if len(text) < MIN_DOC_CHARS:
                    break
                docs.append((text, d))
                total += len(text)
                from_file += len(text)
                n_docs += 1
            used_files += from_file > 0
            if chars_per_domain - total < MIN_DOC_CHARS:
                break
        if total < chars_per_domain - MIN_DOC_CHARS:
            print(f"warning: domain {domain!r} has only {total:,} characters (asked for {chars_per_domain:,})",
                  file=sys.stderr)
        info[domain] = {"files_available": len(files), "files_used": used_files, "docs": n_docs, "chars": total}
    return docs, info


# -----------------------------------------------------------------------------
# tokenise, split, write

def split_documents(domains, val_fraction, seed, names=None):
    """Stratified train/val split by document: in each domain a seeded random
    round(val_fraction * n) documents (at least 1) go to val. Returns (train_ids, val_ids)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be strictly between 0 and 1")
    rng = np.random.default_rng([seed, 1])
    train, val = [], []
    for d in np.unique(domains):
        ids = np.flatnonzero(domains == d)
        if len(ids) < 2:
            name = names[d] if names else d
            raise ValueError(f"domain {name!r} has {len(ids)} document(s), need at least 2 for a train/val split: "
                             f"raise chars_per_domain or lower max_doc_chars")
        ids = rng.permutation(ids)
        n_val = min(len(ids) - 1, max(1, round(val_fraction * len(ids))))
        val += ids[:n_val].tolist()
        train += ids[n_val:].tolist()
    return np.array(train, dtype=np.int64), np.array(val, dtype=np.int64)


def build_split(token_lists, domains, order, eot, dtype=np.uint16):
    """Concatenate the documents `order` (each + eot) -> (dtype tokens, int64 index (n,3))."""
    lengths = np.array([len(token_lists[i]) + 1 for i in order], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    tokens = np.empty(int(lengths.sum()), dtype=dtype)
    for i, off, n in zip(order, offsets, lengths):
        tokens[off:off + n - 1] = token_lists[i]
        tokens[off + n - 1] = eot
    index = np.stack([offsets, lengths, domains[order]], axis=1).astype(np.int64)
    return tokens, index


def atomic_write(path, write):
    """write(f) into path + '.tmp', then rename: an interrupted run never leaves a half file."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def _version(pkg):
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def load_tokenizer(tokenizer):
    """(tokenizer, dtype of its token files); the tokenizer must name an end-of-text token."""
    tok = get_tokenizer(tokenizer)
    if tok.eot_token is None:
        raise ValueError(f"tokenizer {tokenizer} names no end-of-text token (eos_token in tokenizer_config.json), "
                         f"which separates the documents: add one there")
    return tok, token_dtype(tok.vocab_size)     # uint32 above id 65,535: never a silent wrap


def tokenize_documents(tok, docs, dtype):
    """docs [(text, domain_id), ...] -> (token_lists, one dtype array per document; domains, int64 array)."""
    texts = [t for t, _ in docs]
    domains = np.array([d for _, d in docs], dtype=np.int64)
    if hasattr(tok, "encode_batch"):
        token_lists = tok.encode_batch(texts)
    else:
        token_lists = [tok.encode(t) for t in texts]
    return [np.asarray(t, dtype=dtype) for t in token_lists], domains


def split_orders(domains, val_fraction, seed, domain_names):
    """{"train": document ids, "val": document ids}, each split's documents in a seeded random order."""
    train_ids, val_ids = split_documents(domains, val_fraction, seed, domain_names)
    rng = np.random.default_rng([seed, 2])
    # a random order across domains: a domain-sorted stream would make random windows single-domain
    return {"train": rng.permutation(train_ids), "val": rng.permutation(val_ids)}


def write_splits(out_dir, splits, token_lists, domains, eot, dtype, domain_names):
    """Write {split}.bin and {split}_index.npy for every split and delete a stale
    train_similarity order; returns the counts for meta.json."""
    os.makedirs(out_dir, exist_ok=True)
    counts = {}
    for split, order in splits.items():
        tokens, index = build_split(token_lists, domains, order, eot, dtype)
        atomic_write(os.path.join(out_dir, f"{split}.bin"), lambda f: tokens.tofile(f))
        atomic_write(os.path.join(out_dir, f"{split}_index.npy"), lambda f: np.save(f, index))
        counts[split] = {
            "docs": len(order), "tokens": len(tokens),
            "per_domain": {name: {"docs": int((index[:, 2] == d).sum()),
                                  "tokens": int(index[index[:, 2] == d, 1].sum())}
                           for d, name in enumerate(domain_names)},
        }
    # a similarity order made from an older train.bin would no longer match it
    for stale in ("train_similarity.bin", "train_similarity_index.npy"):
        if os.path.exists(os.path.join(out_dir, stale)):
            os.remove(os.path.join(out_dir, stale))
    return counts


def build_meta(tok, dtype, sources, info, counts, args):
    """The meta.json dict. args: the prepare() arguments that define the dataset."""
    meta = {
        "dataset": "multidomain",
        "tokenizer": tok.name, "vocab_size": tok.vocab_size, "eot_token": tok.eot_token,
        "domains": list(sources),
        "counts": counts,
        "sources": {name: {"roots": [[k, str(p)] for k, p, _ in srcs], **info[name]}
                    for name, srcs in sources.items()},
        "versions": {"python": platform.python_version(), "numpy": np.__version__,
                     "torch": _version("torch"), "tiktoken": _version("tiktoken")},
        "args": args,
    }
    if tok.name == "hf":   # the byte/gpt2 meta has no dtype key (uint16)
        meta.update(tokenizer_dir=tok.dir, dtype=np.dtype(dtype).name)
        meta["versions"]["tokenizers"] = _version("tokenizers")
    return meta


def prepare(out_dir=DEFAULT_OUT_DIR, tokenizer="byte", chars_per_domain=1_500_000, val_fraction=0.05,
            seed=1337, max_doc_chars=8000, sources=None, verbose=True):
    """Build the dataset into out_dir and return its meta dict (see the module docstring).
    tokenizer: 'byte', 'gpt2' or the directory of an imported checkpoint with tokenizer.json.
    sources: {domain: [(kind, path, suffix), ...]}, default default_sources()."""
    t0 = time.time()
    if max_doc_chars < MIN_DOC_CHARS:
        raise ValueError(f"max_doc_chars={max_doc_chars} must be at least {MIN_DOC_CHARS}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be strictly between 0 and 1")
    tok, dtype = load_tokenizer(tokenizer)
    sources = sources if sources is not None else default_sources()
    domain_names = list(sources)

    docs, info = collect_documents(sources, chars_per_domain, max_doc_chars, seed)
    token_lists, domains = tokenize_documents(tok, docs, dtype)
    splits = split_orders(domains, val_fraction, seed, domain_names)
    counts = write_splits(out_dir, splits, token_lists, domains, tok.eot_token, dtype, domain_names)

    args = {"tokenizer": tokenizer, "chars_per_domain": chars_per_domain, "val_fraction": val_fraction,
            "seed": seed, "max_doc_chars": max_doc_chars}
    meta = build_meta(tok, dtype, sources, info, counts, args)
    if tok.name == "hf":
        copy_tokenizer_files(tok.dir, out_dir)
    atomic_write(os.path.join(out_dir, "meta.json"), lambda f: f.write(json.dumps(meta, indent=1).encode()))
    if verbose:
        print_summary(meta, out_dir, time.time() - t0)
    return meta


def print_summary(meta, out_dir, seconds):
    print(f"{'domain':<8} {'chars':>10} {'train docs':>10} {'train tokens':>13} {'val docs':>9} {'val tokens':>11}")
    for name in meta["domains"]:
        tr, va = meta["counts"]["train"]["per_domain"][name], meta["counts"]["val"]["per_domain"][name]
        print(f"{name:<8} {meta['sources'][name]['chars']:>10,} {tr['docs']:>10,} {tr['tokens']:>13,} "
              f"{va['docs']:>9,} {va['tokens']:>11,}")
    tr, va = meta["counts"]["train"], meta["counts"]["val"]
    print(f"{'total':<8} {'':>10} {tr['docs']:>10,} {tr['tokens']:>13,} {va['docs']:>9,} {va['tokens']:>11,}")
    print(f"tokenizer={meta['tokenizer']} vocab_size={meta['vocab_size']}: wrote {out_dir} in {seconds:.1f}s")


def default_out_dir(tokenizer):
    """data/multidomain for the built-in tokenizers, data/multidomain_<name> for a tokenizer directory."""
    if tokenizer in ("byte", "gpt2"):
        return DEFAULT_OUT_DIR
    return f"{DEFAULT_OUT_DIR}_{os.path.basename(os.path.normpath(tokenizer))}"


def main():
    p = ArgumentParser(prog="data/multidomain/prepare.py", description="Prepare the multidomain dataset from locally installed text.")
    p.add_argument("--out_dir", default=None, help="default data/multidomain, or data/multidomain_<name> for "
                                                    "--tokenizer=DIR (DIR's last path component)")
    p.add_argument("--tokenizer", default="byte", help="byte | gpt2 | DIR: an imported checkpoint (or HF model) "
                                                       "directory holding tokenizer.json")
    p.add_argument("--chars_per_domain", type=int, default=1_500_000)
    p.add_argument("--val_fraction", type=float, default=0.05)
    p.add_argument("--max_doc_chars", type=int, default=8000)
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args()
    args.out_dir = args.out_dir or default_out_dir(args.tokenizer)
    try:
        prepare(**vars(args))
    except (ValueError, FileNotFoundError, OSError) as e:
        raise SystemExit(f"error: {type(e).__name__ + ': ' if isinstance(e, OSError) else ''}{e}")


if __name__ == "__main__":
    main()
