"""Tests of the data layer: tokenizers, multidomain/shakespeare preparation, TokenDataset,
similarity ordering. Toy source trees are written into tmp_path; one test uses the real
installed sources with a tiny size."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from data import tokenizer as tk
from data.dataset import TokenDataset, load_meta
from data.multidomain import prepare as md
from data.shakespeare_char import prepare as sc
from data.similarity import build, embed_documents, ensure_similarity_order, greedy_order, knn, same_domain_adjacency
from helpers import TINY, make_dataset, run_train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ["code", "prose", "math", "c"]


# -----------------------------------------------------------------------------
# helpers

def write_toy_tree(root, files_per_domain=12):
    """Four small source trees with unique, clearly different text; returns a sources dict."""
    rng = np.random.default_rng(0)
    words = ["the", "module", "returns", "value", "given", "object", "when", "called", "list", "string"]
    dirs = {n: os.path.join(root, n) for n in NAMES}
    for d in dirs.values():
        os.makedirs(os.path.join(d, "pkg"), exist_ok=True)
        os.makedirs(os.path.join(d, "tests"), exist_ok=True)  # skipped directory
    for i in range(files_per_domain):
        body = "\n".join(f"    y{j} = x * {j} + {i}\n    x = y{j} - {j}" for j in range(30))
        with open(os.path.join(dirs["code"], "pkg", f"mod{i}.py"), "w") as f:
            f.write(f'"""Module {i} docstring."""\nimport os\n\ndef f{i}(x):\n    """doc"""\n{body}\n    return x\n')
        prose = "\n\n".join(" ".join(rng.choice(words, 12)) + f" (paragraph {i}.{j})." for j in range(20))
        with open(os.path.join(dirs["prose"], f"doc{i}.py"), "w") as f:
            f.write(f'"""{prose}"""\n\ndef g():\n    """{prose[:300]}"""\n')
        with open(os.path.join(dirs["math"], f"eq{i}.txt"), "w") as f:
            f.write("\n".join(f"a_{i}{j} = sum_k x_k^{j} / {j + 1}!  => {rng.random():.4f}" for j in range(40)))
        with open(os.path.join(dirs["c"], "pkg", f"h{i}.h"), "w") as f:
            f.write("\n".join(f"#define MACRO_{i}_{j} ({j} << 2)\nstatic inline int fn_{i}_{j}(void);" for j in range(25)))
    with open(os.path.join(dirs["code"], "tests", "test_x.py"), "w") as f:
        f.write("SHOULD_NOT_APPEAR = 1\n" * 50)
    return {"code": [("code", dirs["code"], ".py")],
            "prose": [("docstrings", dirs["prose"], ".py")],
            "math": [("source", dirs["math"], ".txt")],
            "c": [("source", dirs["c"], ".h")]}


def toy_dataset(tmp_path, name="ds", **kw):
    sources = write_toy_tree(str(tmp_path / "src"))
    out = str(tmp_path / name)
    args = dict(chars_per_domain=6000, max_doc_chars=700, val_fraction=0.2, seed=7, verbose=False)
    args.update(kw)
    md.prepare(out, sources=sources, **args)
    return out


def documents(data_dir, split):
    tokens = np.fromfile(os.path.join(data_dir, f"{split}.bin"), dtype=np.uint16)
    index = np.load(os.path.join(data_dir, f"{split}_index.npy"))
    return tokens, index


# -----------------------------------------------------------------------------
# tokenizers

def test_byte_tokenizer_round_trip():
    tok = tk.get_tokenizer("byte")
    text = "héllo wörld ∑ 🙂\n\ttabs"
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids) and tok.vocab_size == 256 and tok.eot_token == 0
    assert tok.decode(ids) == text
    assert tok.encode("a\x00b") == [97, 98]  # NUL is the document separator: stripped
    assert tok.decode([0xff]) == "\ufffd"    # invalid UTF-8 -> replacement character


def test_get_tokenizer_unknown_name():
    with pytest.raises(ValueError, match="byte, gpt2"):
        tk.get_tokenizer("sentencepiece")


def test_gpt2_offline():
    path = tk.gpt2_tiktoken_path()
    if not os.path.exists(path):
        try:
            tk.fetch_gpt2_tiktoken(path)
        except RuntimeError as e:
            pytest.skip(f"gpt2.tiktoken missing and PyPI unreachable: {e}")
    tok = tk.GPT2Tokenizer(tk.get_gpt2_encoding(fetch=False))
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.vocab_size == 50257 and tok.eot_token == 50256
    text = "def f(x):\n    return x ** 2  # <|endoftext|> is plain text here"
    ids = tok.encode(text)
    assert 50256 not in ids and tok.decode(ids) == text


def test_gpt2_corrupt_file(tmp_path, monkeypatch):
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_text("SGVsbG8= 0\n")
    monkeypatch.setenv("GPT2_TIKTOKEN", str(bad))
    with pytest.raises(ValueError, match="--fetch"):
        tk.get_gpt2_encoding(fetch=False)


def test_char_tokenizer_from_meta():
    tok = tk.CharTokenizer.from_text("hello world")
    meta = {"tokenizer": "char", "vocab_size": tok.vocab_size, "itos": tok.itos}
    tok2 = tk.load_tokenizer(json.loads(json.dumps(meta)))
    assert tok2.decode(tok2.encode("low ode")) == "low ode"
    with pytest.raises(ValueError, match="not in the"):
        tok2.encode("xyz")
    assert isinstance(tk.load_tokenizer({"tokenizer": "byte"}), tk.ByteTokenizer)
    with pytest.raises(ValueError, match="unknown tokenizer"):
        tk.load_tokenizer({"tokenizer": "nope"})


# -----------------------------------------------------------------------------
# multidomain prepare

def test_prepare_toy_index_consistent(tmp_path):
    out = toy_dataset(tmp_path)
    meta = load_meta(out)
    assert meta["domains"] == NAMES and meta["eot_token"] == 0 and meta["vocab_size"] == 256
    seen = {}
    for split in ("train", "val"):
        tokens, index = documents(out, split)
        assert index.dtype == np.int64 and index.shape[1] == 3
        assert index[:, 1].sum() == len(tokens)                            # lengths sum to the file size
        assert (index[1:, 0] == index[:-1, 0] + index[:-1, 1]).all()        # contiguous
        assert set(index[:, 2].tolist()) == {0, 1, 2, 3}                    # stratified: every domain
        assert (index[:, 2][1:] != index[:, 2][:-1]).any()                  # shuffled across domains
        assert meta["counts"][split]["tokens"] == len(tokens)
        for o, n, d in index:
            doc = tokens[o:o + n]
            assert doc[-1] == 0 and (doc[:-1] != 0).all()                   # ends with eot, no eot inside
            text = bytes(doc[:-1].astype(np.uint8)).decode()
            seen.setdefault(split, []).append(text)
            assert meta["counts"][split]["per_domain"][NAMES[d]]["docs"] > 0
            if NAMES[d] == "code":
                assert "def f" in text or "y" in text
                assert "docstring" not in text and "SHOULD_NOT_APPEAR" not in text
            elif NAMES[d] == "prose":
                assert "paragraph" in text and "import" not in text
            elif NAMES[d] == "math":
                assert "sum_k" in text
            else:
                assert "MACRO_" in text
    assert not set(seen["train"]) & set(seen["val"])                        # split by document
    for name in NAMES:  # the size knob: each domain gets about chars_per_domain characters
        assert 6000 - md.MIN_DOC_CHARS <= meta["sources"][name]["chars"] <= 6000


def test_prepare_deterministic(tmp_path):
    sources = write_toy_tree(str(tmp_path / "src"))
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    for out in (a, b):
        md.prepare(out, sources=sources, chars_per_domain=5000, max_doc_chars=600, verbose=False)
    for f in ("train.bin", "val.bin", "train_index.npy", "val_index.npy", "meta.json"):
        with open(os.path.join(a, f), "rb") as fa, open(os.path.join(b, f), "rb") as fb:
            assert fa.read() == fb.read(), f
    assert not [f for f in os.listdir(a) if f.endswith(".tmp")]
    md.prepare(b, sources=sources, chars_per_domain=5000, max_doc_chars=600, seed=1, verbose=False)
    assert documents(a, "train")[1].tolist() != documents(b, "train")[1].tolist()


def test_prepare_bad_args(tmp_path):
    sources = write_toy_tree(str(tmp_path / "src"))
    with pytest.raises(ValueError, match="val_fraction"):
        md.prepare(str(tmp_path / "o"), sources=sources, val_fraction=1.5, verbose=False)
    with pytest.raises(ValueError, match="valid names"):
        md.prepare(str(tmp_path / "o"), sources=sources, tokenizer="words", verbose=False)
    with pytest.raises(FileNotFoundError, match="no source files"):
        md.prepare(str(tmp_path / "o"), sources={"x": [("source", str(tmp_path / "nope"), ".py")]}, verbose=False)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "data", "multidomain", "prepare.py"),
                        "--val_fraction=0", f"--out_dir={tmp_path / 'o'}"], capture_output=True, text=True)
    assert p.returncode != 0 and p.stderr.strip().count("\n") == 0 and "val_fraction" in p.stderr


def test_strip_docstrings():
    src = '"""Mod."""\nimport os\n\ndef f(x):\n    """Doc\n    more."""\n    return x\n\ndef g():\n    """only"""\n'
    out = md.strip_docstrings(src)
    assert "Doc" not in out and "Mod." not in out and "return x" in out
    compile(out, "<toy>", "exec")  # still valid Python (`pass` replaces a docstring-only body)


def test_prepare_real_sources_small(tmp_path):
    meta = md.prepare(str(tmp_path / "real"), chars_per_domain=20000, max_doc_chars=2000, verbose=False)
    assert meta["domains"] == NAMES
    for split in ("train", "val"):
        for name in NAMES:
            assert meta["counts"][split]["per_domain"][name]["docs"] >= 1
    ds = TokenDataset(str(tmp_path / "real"), "train")
    assert ds.n_domains == 4 and len(ds) == meta["counts"]["train"]["tokens"]


# -----------------------------------------------------------------------------
# TokenDataset

def test_missing_dir_mentions_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"prepare\.py"):
        TokenDataset(str(tmp_path / "multidomain"), "train")
    with pytest.raises(FileNotFoundError, match=r"data/multidomain/prepare\.py"):
        load_meta(os.path.join(ROOT, "data", "no_such_dataset"))


@pytest.mark.parametrize("damage", ["truncate", "odd", "index", "meta"])
def test_corrupt_files(tmp_path, damage):
    out = toy_dataset(tmp_path)
    if damage == "truncate":
        path = os.path.join(out, "train.bin")
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 2)
    elif damage == "odd":
        path = os.path.join(out, "train.bin")
        with open(path, "ab") as f:
            f.write(b"\x01")
    elif damage == "index":
        path = os.path.join(out, "train_index.npy")
        with open(path, "wb") as f:
            f.write(b"garbage")
    else:
        path = os.path.join(out, "meta.json")
        with open(path, "w") as f:
            f.write("{not json")
    with pytest.raises(ValueError, match="corrupt") as e:
        TokenDataset(out, "train")
    assert os.path.basename(path) in str(e.value) and "prepare.py" in str(e.value)


@pytest.mark.parametrize("field, value, needle", [
    ("vocab_size", "x", "vocab_size='x'"), ("vocab_size", 10, "token id"),
    ("domains", 5, "domains must be"), ("domains", [], "domains must be")])
def test_meta_with_wrong_values(tmp_path, field, value, needle):
    out = toy_dataset(tmp_path)
    path = os.path.join(out, "meta.json")
    with open(path) as f:
        meta = json.load(f)
    meta[field] = value
    with open(path, "w") as f:
        json.dump(meta, f)
    with pytest.raises(ValueError, match=needle) as e:
        TokenDataset(out, "train")
    assert "prepare.py" in str(e.value)


def test_get_batch_reproducible(tmp_path):
    ds = TokenDataset(toy_dataset(tmp_path), "train")
    g = torch.Generator().manual_seed(42)
    g.manual_seed(42)
    ds.get_batch(4, 16, g)             # advance a little
    state = g.get_state()
    x1, y1 = ds.get_batch(8, 16, g)
    g.set_state(state)
    x2, y2 = ds.get_batch(8, 16, g)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape == (8, 16) and x1.dtype == torch.int64
    assert torch.equal(x1[:, 1:], y1[:, :-1])
    with pytest.raises(ValueError, match="block_size"):
        ds.get_batch(2, len(ds), g)


def test_fixed_batches(tmp_path):
    out = toy_dataset(tmp_path)
    ds = TokenDataset(out, "val")
    torch.manual_seed(0)
    a = ds.fixed_batches(3, 4, 32, seed=5)
    torch.manual_seed(99)              # the global RNG must not matter
    b = ds.fixed_batches(3, 4, 32, seed=5)
    tokens, index = documents(out, "val")
    doc_of = np.repeat(np.arange(len(index)), index[:, 1])
    for (x, y, dom), (x2, y2, dom2) in zip(a, b):
        assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(dom, dom2)
        assert dom.shape == (4, 33) and dom.dtype == torch.int64
        for row_x, row_y, row_d in zip(x.numpy(), y.numpy(), dom.numpy()):
            # locate the window and check every position's domain by brute force
            starts = [s for s in range(len(tokens) - 32) if (tokens[s:s + 32] == row_x).all()
                      and (tokens[s + 1:s + 33] == row_y).all()]
            assert starts
            assert (index[doc_of[starts[0] + np.arange(33)], 2] == row_d).all()
    assert not torch.equal(a[0][0], ds.fixed_batches(1, 4, 32, seed=6)[0][0])


def test_domain_of(tmp_path):
    out = toy_dataset(tmp_path)
    ds = TokenDataset(out, "train")
    _, index = documents(out, "train")
    for o, n, d in index[:10]:
        assert (ds.domain_of(np.array([o, o + n - 1])) == d).all()
    with pytest.raises(ValueError):
        ds.domain_of(np.array([len(ds)]))


def test_bad_batching(tmp_path):
    out = toy_dataset(tmp_path)
    with pytest.raises(ValueError, match="random, similarity"):
        TokenDataset(out, "train", batching="sorted")
    with pytest.raises(FileNotFoundError, match=r"similarity\.py"):
        TokenDataset(out, "train", batching="similarity")


# -----------------------------------------------------------------------------
# similarity ordering

def synthetic_corpus(n_per_domain=40, n_domains=4, seed=0):
    """Documents of n_domains 'languages' with disjoint vocabularies, in random order."""
    rng = np.random.default_rng(seed)
    vocab = [[f"{chr(97 + d)}{''.join(rng.choice(list('xyzwvq'), 4))}" for _ in range(30)] for d in range(n_domains)]
    docs = [(" ".join(rng.choice(vocab[d], 60)), d) for d in range(n_domains) for _ in range(n_per_domain)]
    perm = rng.permutation(len(docs))
    return [docs[i][0] for i in perm], np.array([docs[i][1] for i in perm])


@pytest.mark.parametrize("restart", ["random", "nearest"])
def test_similarity_order(restart):
    texts, domains = synthetic_corpus()
    emb = embed_documents(texts, dim=2 ** 10)
    assert emb.shape == (len(texts), 2 ** 10) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    nb = knn(emb, 8)
    assert nb.shape == (len(texts), 8) and (nb != np.arange(len(texts))[:, None]).all()
    assert np.mean(domains[nb] == domains[:, None]) > 0.95
    order = greedy_order(nb, seed=3, emb=emb if restart == "nearest" else None)
    assert sorted(order.tolist()) == list(range(len(texts)))             # a permutation
    rand, sim = same_domain_adjacency(domains), same_domain_adjacency(domains[order])
    assert rand < 0.4 and sim > 0.8, (rand, sim)
    assert np.array_equal(order, greedy_order(nb, seed=3, emb=emb if restart == "nearest" else None))


def test_similarity_build_on_dataset(tmp_path):
    out = toy_dataset(tmp_path)
    stats = build(out, k=4, dim=2 ** 10, verbose=False)
    assert stats["adjacency_similarity"] > stats["adjacency_random"]
    tokens, index = documents(out, "train")
    stokens, sindex = documents(out, "train_similarity")
    docs = sorted(bytes(tokens[o:o + n]) for o, n, _ in index)
    sdocs = sorted(bytes(stokens[o:o + n]) for o, n, _ in sindex)
    assert docs == sdocs                                              # the same documents, reordered
    ds = TokenDataset(out, "train", batching="similarity")
    assert len(ds) == len(tokens) and ds.bin_path.endswith("train_similarity.bin")
    x, y = ds.get_batch(2, 8, torch.Generator().manual_seed(0))
    assert x.shape == (2, 8)
    md.prepare(out, sources=write_toy_tree(str(tmp_path / "src")), chars_per_domain=5000, verbose=False)
    assert not os.path.exists(os.path.join(out, "train_similarity.bin"))  # stale order removed


def test_similarity_cli_missing_dir(tmp_path):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "data", "similarity.py"), f"--data_dir={tmp_path / 'x'}"],
                       capture_output=True, text=True)
    assert p.returncode != 0 and p.stderr.startswith("error:") and "prepare.py" in p.stderr
    assert p.stderr.strip().count("\n") == 0


# -----------------------------------------------------------------------------
# shakespeare_char

def test_shakespeare_with_input(tmp_path):
    src = tmp_path / "tiny.txt"
    src.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 20)
    out = str(tmp_path / "sc")
    meta = sc.prepare(out, input_path=str(src), verbose=False)
    assert meta["tokenizer"] == "char" and meta["domains"] == ["shakespeare"]
    tok = tk.load_tokenizer(load_meta(out))
    tokens, index = documents(out, "train")
    assert index.tolist() == [[0, len(tokens), 0]]
    val_tokens, _ = documents(out, "val")
    assert tok.decode(tokens) + tok.decode(val_tokens) == src.read_text()
    ds = TokenDataset(out, "val")
    (x, y, dom), = ds.fixed_batches(1, 2, 8)
    assert (dom == 0).all()


def test_shakespeare_no_network_no_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="--input"):
        sc.prepare(str(tmp_path / "sc"), url="http://127.0.0.1:9/input.txt", timeout=2, verbose=False)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "data", "shakespeare_char", "prepare.py"),
                        f"--out_dir={tmp_path / 'sc'}", "--url=http://127.0.0.1:9/input.txt", "--timeout=2"],
                       capture_output=True, text=True)
    assert p.returncode != 0 and p.stderr.startswith("error:") and "--input" in p.stderr
    assert p.stderr.strip().count("\n") == 0
    assert not os.path.exists(tmp_path / "sc" / "input.txt")


def test_train_builds_similarity_order_on_first_use(tmp_path):
    """train.py with batching='similarity' on data that has no similarity order yet
    builds it, with progress output, identical to data/similarity.py's build; a
    second call finds it current; a newer train.bin makes it stale again."""
    data = make_dataset(str(tmp_path / "data"))
    p = run_train(TINY + [f"--data_dir={data}", "--batching=similarity", "--max_iters=1", "--eval_interval=1",
                          f"--out_dir={tmp_path / 'run'}"])
    assert "building the similarity order" in p.stdout and "4/4 writing" in p.stdout
    built = [open(os.path.join(data, f), "rb").read() for f in ("train_similarity.bin", "train_similarity_index.npy")]
    ref = str(tmp_path / "ref")
    make_dataset(ref)
    build(ref, verbose=False)
    assert built == [open(os.path.join(ref, f), "rb").read() for f in ("train_similarity.bin", "train_similarity_index.npy")]
    assert ensure_similarity_order(data) is False                                 # current: nothing to do
    later = os.path.getmtime(os.path.join(data, "train_similarity.bin")) + 5
    os.utime(os.path.join(data, "train.bin"), (later, later))                     # train.bin re-prepared
    assert ensure_similarity_order(data) is True


def test_prepare_hint_names_the_script_and_tokenizer_that_made_the_data(tmp_path):
    """A damaged dataset's error says how to rebuild that dataset: its meta names the
    prepare script and the tokenizer (a shakespeare_char dataset with an imported
    model's tokenizer is not rebuilt by multidomain's script)."""
    from data.dataset import prepare_hint
    d = tmp_path / "shakespeare_char_mymodel"
    d.mkdir()
    (d / "meta.json").write_text(json.dumps({"dataset": "shakespeare_char", "tokenizer": "hf",
                                             "tokenizer_dir": "/models/mymodel"}))
    assert prepare_hint(str(d)) == (f"python data/shakespeare_char/prepare.py --out_dir={d} "
                                    f"--tokenizer=/models/mymodel")
    (d / "meta.json").write_text("{not json")
    assert prepare_hint(str(d)) == f"python data/multidomain/prepare.py --out_dir={d}"
    g = tmp_path / "md_gpt2"
    g.mkdir()
    (g / "meta.json").write_text(json.dumps({"dataset": "multidomain", "tokenizer": "gpt2"}))
    assert prepare_hint(str(g)) == f"python data/multidomain/prepare.py --out_dir={g} --tokenizer=gpt2"
