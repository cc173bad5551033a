"""
Similarity-based document ordering (Lory, arXiv 2405.03133, "similarity-based data batching"):
put similar documents next to each other so that consecutive segments of a training
sequence share a domain, which is what lets segment-level routing specialise.

1. embed every train document: hashed token n-grams (byte 3- and 4-grams for the byte
   tokenizer, token 1- and 2-grams otherwise), sublinear tf * idf, L2-normalised;
2. find each document's k nearest neighbours by cosine similarity (chunked matmuls);
3. traverse greedily: from a document, go to its most similar unused neighbour; when all
   its neighbours are used, restart from an unused document: by default the one most similar
   to where we got stuck (--restart=nearest), or the next of a seeded random order (--restart=random).

    python data/similarity.py --data_dir=data/multidomain [--k=16] [--dim=8192]

writes train_similarity.bin / train_similarity_index.npy (the same documents reordered, same
format as train.bin / train_index.npy); train with --batching=similarity to use them.
train.py builds them on first use (ensure_similarity_order) when they are missing or older
than train.bin, so running this script by hand is optional.
"""
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # so `python data/similarity.py` can import the data package
    sys.path.insert(0, ROOT)
from configurator import ArgumentParser  # noqa: E402
from data.dataset import load_meta, load_split  # noqa: E402
from outdir import write_atomic  # noqa: E402

HASH_MULT = np.uint64(0x9E3779B97F4A7C15)  # 64-bit golden-ratio multiplier (Fibonacci hashing)


def hashed_ngrams(ids, n, dim):
    """Bucket (0..dim-1) of every n-gram of the 1-D int array `ids`."""
    ids = np.asarray(ids, dtype=np.uint64)
    if len(ids) < n:
        return np.empty(0, dtype=np.int64)
    h = np.zeros(len(ids) - n + 1, dtype=np.uint64)
    for j in range(n):  # polynomial rolling hash, wrapping mod 2**64
        h = h * HASH_MULT + ids[j:len(ids) - n + 1 + j] + np.uint64(1)
    h ^= h >> np.uint64(29)
    h *= HASH_MULT
    return (h >> np.uint64(20)) % np.uint64(dim)


def embed_documents(docs, dim=2 ** 13, ngrams=(3, 4)):
    """(n_docs, dim) float32 L2-normalised tf-idf rows of hashed n-gram counts.
    docs: a list of 1-D token arrays (or bytes / str, embedded as their UTF-8 bytes)."""
    n = len(docs)
    tf = np.zeros((n, dim), dtype=np.float32)
    for i, doc in enumerate(docs):
        if isinstance(doc, str):
            doc = doc.encode("utf-8")
        if isinstance(doc, (bytes, bytearray)):
            doc = np.frombuffer(doc, dtype=np.uint8)
        buckets = np.concatenate([hashed_ngrams(doc, g, dim) for g in ngrams])
        tf[i] = np.bincount(buckets.astype(np.int64), minlength=dim)
    df = (tf > 0).sum(0)
    idf = (np.log((1 + n) / (1 + df)) + 1).astype(np.float32)
    nz = tf > 0
    tf[nz] = 1 + np.log(tf[nz])  # sublinear tf
    tf *= idf
    tf /= np.maximum(np.linalg.norm(tf, axis=1, keepdims=True), 1e-12)
    return tf


def knn(emb, k, chunk=1024):
    """(n, k') int64 indices of each row's nearest other rows by cosine (emb rows are
    L2-normalised), most similar first; k' = min(k, n - 1)."""
    n = len(emb)
    k = min(k, n - 1)
    if k < 1:
        return np.zeros((n, 0), dtype=np.int64)
    out = np.empty((n, k), dtype=np.int64)
    for s in range(0, n, chunk):
        sims = emb[s:s + chunk] @ emb.T
        rows = np.arange(len(sims))
        sims[rows, s + rows] = -np.inf  # never your own neighbour
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, top, 1), axis=1, kind="stable")
        out[s:s + chunk] = np.take_along_axis(top, order, 1)
    return out


def greedy_order(neighbors, seed=1337, emb=None):
    """Permutation of range(n): start at a seeded random document and repeatedly append the
    most similar unused neighbour of the last one. When all its neighbours are used, restart
    at the next unused document of a seeded random order (emb=None), or, given the
    embeddings, at the unused document most similar to the last one (an O(n * dim) search
    per restart, which keeps many more consecutive documents in one domain)."""
    n = len(neighbors)
    restart = np.random.default_rng(seed).permutation(n)
    used = np.zeros(n, dtype=bool)
    order, r = [], 0
    cur = restart[0] if n else None
    while cur is not None:
        used[cur] = True
        order.append(cur)
        nxt = next((j for j in neighbors[cur] if not used[j]), None)
        if nxt is None and len(order) < n:  # stuck: restart
            if emb is not None:
                sims = emb @ emb[cur]
                sims[used] = -np.inf
                nxt = int(np.argmax(sims))
            else:
                while used[restart[r]]:
                    r += 1
                nxt = restart[r]
        cur = nxt
    return np.array(order, dtype=np.int64)


def same_domain_adjacency(domains_in_order):
    """Fraction of consecutive document pairs that share a domain."""
    d = np.asarray(domains_in_order)
    return float(np.mean(d[1:] == d[:-1])) if len(d) > 1 else 0.0


def write_reordered(data_dir, tokens, index, order):
    """train_similarity.bin / train_similarity_index.npy: documents `order` of (tokens, index)."""
    lengths = index[order, 1]
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    out = np.empty(len(tokens), dtype=tokens.dtype)   # uint16 or uint32, as train.bin
    for i, off in zip(order, offsets):
        o, n = index[i, 0], index[i, 1]
        out[off:off + n] = tokens[o:o + n]
    new_index = np.stack([offsets, lengths, index[order, 2]], axis=1).astype(np.int64)
    for name, write in (("train_similarity.bin", out.tofile), ("train_similarity_index.npy", lambda f: np.save(f, new_index))):
        write_atomic(os.path.join(data_dir, name), write)
    return out, new_index


def build(data_dir, k=16, dim=2 ** 13, ngrams=None, seed=1337, restart="nearest", verbose=True):
    """Reorder data_dir's train split by similarity; returns a dict of statistics."""
    t0 = time.time()
    meta = load_meta(data_dir)
    tokens, index = load_split(data_dir, "train", meta)
    tokens = np.asarray(tokens)
    eot = meta.get("eot_token")
    if ngrams is None:  # bytes need longer n-grams than BPE tokens to be informative
        ngrams = (3, 4) if meta["vocab_size"] <= 256 else (1, 2)
    docs = []
    for o, n, _ in index:
        doc = tokens[o:o + n]
        docs.append(doc[:-1] if eot is not None and n > 1 and doc[-1] == eot else doc)
    if restart not in ("nearest", "random"):
        raise ValueError(f"restart={restart!r} must be 'nearest' or 'random'")
    say = print if verbose else (lambda *a, **kw: None)
    say(f"  1/4 embedding {len(docs)} documents (hashed {ngrams}-grams, dim {dim})", flush=True)
    emb = embed_documents(docs, dim=dim, ngrams=ngrams)
    say(f"  2/4 {k} nearest neighbours of each document ({time.time() - t0:.1f}s)", flush=True)
    neighbors = knn(emb, k)
    say(f"  3/4 greedy traversal, restart={restart} ({time.time() - t0:.1f}s)", flush=True)
    order = greedy_order(neighbors, seed, emb if restart == "nearest" else None)
    say(f"  4/4 writing the reordered split ({time.time() - t0:.1f}s)", flush=True)
    write_reordered(data_dir, tokens, index, order)
    stats = {"docs": len(index), "k": int(neighbors.shape[1]), "dim": dim, "ngrams": list(ngrams), "restart": restart,
             "adjacency_random": same_domain_adjacency(index[:, 2]),
             "adjacency_similarity": same_domain_adjacency(index[order, 2]),
             "knn_same_domain": float(np.mean(index[neighbors, 2] == index[:, 2:3])) if neighbors.size else 0.0,
             "seconds": time.time() - t0}
    if verbose:
        print(f"{stats['docs']} train documents, k={stats['k']}, dim={dim}, n-grams={tuple(ngrams)}, restart={restart}")
        print(f"neighbours in the same domain:            {stats['knn_same_domain']:.3f}")
        print(f"same-domain adjacency, random order:      {stats['adjacency_random']:.3f}")
        print(f"same-domain adjacency, similarity order:  {stats['adjacency_similarity']:.3f}")
        print(f"wrote {os.path.join(data_dir, 'train_similarity.bin')} in {stats['seconds']:.1f}s")
    return stats


def ensure_similarity_order(data_dir):
    """Build data_dir's similarity order (train_similarity.bin / _index.npy) when it is
    missing or older than train.bin, printing progress; returns True when it built one."""
    files = [os.path.join(data_dir, f) for f in ("train_similarity.bin", "train_similarity_index.npy")]
    source = os.path.join(data_dir, "train.bin")
    if all(os.path.exists(f) for f in files) and (
            not os.path.exists(source) or min(os.path.getmtime(f) for f in files) >= os.path.getmtime(source)):
        return False
    print(f"batching='similarity': building the similarity order of {data_dir} (once; "
          f"`python data/similarity.py` does the same)", flush=True)
    build(data_dir)
    return True


def main():
    p = ArgumentParser(prog="data/similarity.py", description="Reorder a dataset's train documents by similarity (Lory).")
    p.add_argument("--data_dir", default=os.path.join(ROOT, "data", "multidomain"))
    p.add_argument("--k", type=int, default=16, help="nearest neighbours per document")
    p.add_argument("--dim", type=int, default=2 ** 13, help="hashed feature dimension")
    p.add_argument("--restart", default="nearest", choices=("nearest", "random"),
                   help="where the traversal continues when stuck: most similar unused document, or a random one")
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args()
    if args.k < 1 or not 2 <= args.dim <= 2 ** 20:
        raise SystemExit(f"error: need --k >= 1 and 2 <= --dim <= 2**20 (got k={args.k}, dim={args.dim})")
    try:
        build(args.data_dir, k=args.k, dim=args.dim, seed=args.seed, restart=args.restart)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
