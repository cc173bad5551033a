"""data/text/prepare.py: a user's corpus (.txt, .jsonl, .json, .parquet, gzip) into the
dataset format. Every test checks the written tokens against the source texts encoded
one by one with the tokenizer's own encode (the reference), not just shapes."""
import collections
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data.dataset import TokenDataset, load_meta, load_split, token_dtype
from data.text import prepare as tp
from data.text import readers
from data.tokenizer import ByteTokenizer, HFTokenizer, encode_documents
from helpers import ROOT, TINY, read_jsonl, run_train
from hf_models import write_bpe_tokenizer, write_tokenizer

SCRIPT = os.path.join(ROOT, "data", "text", "prepare.py")


def write(path, text, mode="w"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, mode) as f:
        f.write(text)
    return str(path)


def text_tree(root, n=8):
    """root/code/*.txt, root/prose/*.txt and root/notes.txt (domain: root's own name).
    Returns {text: domain}."""
    docs = {}
    for i in range(n):
        docs[write(f"{root}/code/m{i}.txt", f"def f{i}(x):\n    return x * {i}\n" * (3 + i))] = "code"
        docs[write(f"{root}/prose/sub/p{i}.txt", f"Prose number {i}, naïve café.\n" * (2 + i))] = "prose"
    docs[write(f"{root}/notes.txt", "a note at the top level\n")] = os.path.basename(root)
    return {open(p, encoding="utf-8").read(): d for p, d in docs.items()}


def written_documents(out_dir, split):
    """[(token ids, domain name)] of a split, read with the repo's own loader."""
    meta = load_meta(out_dir)
    tokens, index = load_split(out_dir, split, meta)
    return [(tokens[o:o + n].tolist(), meta["domains"][d]) for o, n, d in index]


def expected_documents(tok, texts_domains):
    return collections.Counter((tuple(tok.encode(t) + [tok.eot_token]), d) for t, d in texts_domains)


def check_round_trip(out_dir, tok, texts_domains):
    """train + val hold exactly the source documents (each + eot, with its domain)."""
    got = [(tuple(ids), d) for split in ("train", "val") for ids, d in written_documents(out_dir, split)]
    assert collections.Counter(got) == expected_documents(tok, texts_domains)


# -----------------------------------------------------------------------------
# input kinds and domains

def test_txt_tree_domains_from_directories(tmp_path):
    docs = text_tree(str(tmp_path / "corpus"))
    meta = tp.prepare([str(tmp_path / "corpus")], str(tmp_path / "out"), val_fraction=0.3, verbose=False)
    assert sorted(meta["domains"]) == ["code", "corpus", "prose"]
    check_round_trip(str(tmp_path / "out"), ByteTokenizer(), docs.items())
    assert meta["sources"]["files"] == 17 and meta["counts"]["train"]["docs"] + meta["counts"]["val"]["docs"] == 17
    for name in ("code", "prose"):                      # every domain with 2+ documents is in both splits
        assert meta["counts"]["val"]["per_domain"][name]["docs"] >= 1
        assert meta["counts"]["train"]["per_domain"][name]["docs"] >= 1


def test_records_jsonl_json_gzip_with_field_domains(tmp_path):
    rows = [{"text": f"record {i} " + "word " * i, "lang": ["en", "de", "fr"][i % 3]} for i in range(30)]
    write(tmp_path / "in" / "a.jsonl", "\n".join(json.dumps(r) for r in rows[:10]) + "\n\n")
    write(tmp_path / "in" / "b.json", json.dumps(rows[10:20]))
    write(tmp_path / "in" / "c.jsonl.gz", "".join(json.dumps(r) + "\n" for r in rows[20:]), "wt")
    write(tmp_path / "in" / "skip.csv", "not read")
    meta = tp.prepare([str(tmp_path / "in")], str(tmp_path / "out"), domain_from="field:lang", verbose=False)
    assert sorted(meta["domains"]) == ["de", "en", "fr"] and meta["sources"]["files_skipped"] == 1
    check_round_trip(str(tmp_path / "out"), ByteTokenizer(), [(r["text"], r["lang"]) for r in rows])


def test_input_files_name_their_domain_and_fixed_domain(tmp_path):
    a = write(tmp_path / "wiki.jsonl", "".join(json.dumps({"body": f"wiki {i}"}) + "\n" for i in range(6)))
    b = write(tmp_path / "code.txt.gz", "x = 1\n" * 50, "wt")
    meta = tp.prepare([a, b], str(tmp_path / "o1"), text_field="body", max_doc_chars=60, verbose=False)
    assert sorted(meta["domains"]) == ["code", "wiki"]
    meta = tp.prepare([a], str(tmp_path / "o2"), text_field="body", domain_from="fixed:web", verbose=False)
    assert meta["domains"] == ["web"]


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    texts = [f"row {i} " * (i + 1) for i in range(40)]
    table = pa.table({"content": texts, "src": [f"s{i % 2}" for i in range(40)]})
    pq.write_table(table, str(tmp_path / "d.parquet"), row_group_size=7)
    tp.prepare([str(tmp_path / "d.parquet")], str(tmp_path / "out"), text_field="content",
               domain_from="field:src", verbose=False)
    check_round_trip(str(tmp_path / "out"), ByteTokenizer(), [(t, f"s{i % 2}") for i, t in enumerate(texts)])


def test_parquet_without_pyarrow_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "pq", None)
    path = write(tmp_path / "d.parquet", "PAR1", "w")
    with pytest.raises(ValueError, match=r"d\.parquet: reading \.parquet files needs pyarrow.*pip install pyarrow"):
        tp.prepare([path], str(tmp_path / "out"), verbose=False)


def test_long_documents_are_cut_at_line_breaks(tmp_path):
    text = "".join(f"line {i:04d} of a long file\n" for i in range(400))           # 10,400 chars
    path = write(tmp_path / "big" / "f.txt", text)
    tp.prepare([path], str(tmp_path / "out"), max_doc_chars=1000, val_fraction=0.2, verbose=False)
    meta, tok = load_meta(str(tmp_path / "out")), ByteTokenizer()
    pieces = {}
    for split in ("train", "val"):
        tokens, index = load_split(str(tmp_path / "out"), split, meta)
        for o, n, _ in index:
            pieces[int(o) + (0 if split == "train" else 10 ** 9)] = tok.decode(tokens[o:o + n - 1])
    assert all(len(p) <= 1000 and p.endswith("\n") for p in pieces.values())
    assert sorted(pieces.values()) == sorted(readers_pieces(text, 1000))


def readers_pieces(text, max_chars):
    """The reference cut: greedy pieces of <= max_chars ending after the last line break."""
    out = []
    while len(text) > max_chars:
        cut = text.rfind("\n", 0, max_chars) + 1
        out.append(text[:cut])
        text = text[cut:]
    return out + [text]


# -----------------------------------------------------------------------------
# tokenizers

def test_hf_tokenizers_match_their_own_encode(tmp_path):
    word_dir, bpe_dir = str(tmp_path / "word"), str(tmp_path / "bpe")
    write_tokenizer(word_dir, 300)
    write_bpe_tokenizer(bpe_dir, 400, n_files=5)
    texts = [" ".join(f"w{(i * 7 + j) % 290 + 3}" for j in range(5 + i)) for i in range(20)] + ["ünïcode ok?"]
    path = write(tmp_path / "c" / "t.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in texts))
    for tok_dir in (word_dir, bpe_dir):
        out = str(tmp_path / f"out_{os.path.basename(tok_dir)}")
        meta = tp.prepare([path], out, tokenizer=tok_dir, num_proc=2, verbose=False)
        assert meta["tokenizer"] == "hf" and os.path.exists(os.path.join(out, "tokenizer.json"))
        check_round_trip(out, HFTokenizer(tok_dir), [(t, "t") for t in texts])


def test_encode_documents_equals_encode_for_byte_and_gpt2():
    texts = ["héllo\x00 world", "", "def f():\n    return 1 <|endoftext|>"]
    ids, lengths = encode_documents(ByteTokenizer(), texts, np.uint16)
    want = [i for t in texts for i in ByteTokenizer().encode(t) + [0]]
    assert ids.tolist() == want and lengths.tolist() == [len(ByteTokenizer().encode(t)) + 1 for t in texts]
    from data import tokenizer as tk
    if not os.path.exists(tk.gpt2_tiktoken_path()):
        pytest.skip("gpt2.tiktoken is not present (python data/tokenizer.py --fetch)")
    gpt2 = tk.GPT2Tokenizer()
    ids, _ = encode_documents(gpt2, texts, np.uint16)
    assert ids.tolist() == [i for t in texts for i in gpt2.encode(t) + [gpt2.eot_token]]


def test_file_dtype_agrees_with_the_loader():
    class Vocab:
        def __init__(self, n):
            self.vocab_size = n
    for n in (256, 50257, 2 ** 16, 2 ** 16 + 1, 128_256, 2 ** 32):
        assert tp.file_dtype(Vocab(n), "auto") == np.dtype(token_dtype(n)), n
    with pytest.raises(ValueError, match="does not fit uint32"):
        tp.file_dtype(Vocab(2 ** 32 + 1), "auto")


def test_prepare_does_not_import_torch():
    code = "import sys; import data.text.prepare; print('torch' in sys.modules)"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert p.stdout.strip() == "False"


# -----------------------------------------------------------------------------
# the val split

def test_val_split_by_document_deterministic_and_parallel_identical(tmp_path):
    docs = text_tree(str(tmp_path / "corpus"), n=12)
    files = lambda out: {n: open(os.path.join(out, n), "rb").read()
                         for n in ("train.bin", "val.bin", "train_index.npy", "val_index.npy")}
    outs = {}
    for name, kw in {"a": {}, "b": {}, "par": {"num_proc": 2}, "seed": {"seed": 7}}.items():
        outs[name] = str(tmp_path / name)
        tp.prepare([str(tmp_path / "corpus")], outs[name], val_fraction=0.25, verbose=False, **kw)
    assert files(outs["a"]) == files(outs["b"]) == files(outs["par"])
    val = lambda out: {tuple(ids) for ids, _ in written_documents(out, "val")}
    train = lambda out: {tuple(ids) for ids, _ in written_documents(out, "train")}
    assert val(outs["a"]) != val(outs["seed"])                       # the seed decides the split
    assert not val(outs["a"]) & train(outs["a"])                     # whole documents, never shared
    check_round_trip(outs["seed"], ByteTokenizer(), docs.items())


def test_val_router_holds_back_a_document_per_domain(tmp_path):
    """With a tiny val_fraction the draw gives no val document: the held-back last train
    document of each domain goes to val."""
    docs = {write(tmp_path / "c" / d / f"{i}.txt", f"{d} {i}\n"): d for d in ("x", "y") for i in range(5)}
    meta = tp.prepare([str(tmp_path / "c")], str(tmp_path / "out"), val_fraction=1e-9, verbose=False)
    assert [meta["counts"]["val"]["per_domain"][d]["docs"] for d in ("x", "y")] == [1, 1]
    check_round_trip(str(tmp_path / "out"), ByteTokenizer(), [(open(p).read(), d) for p, d in docs.items()])


# -----------------------------------------------------------------------------
# atomic writes

def snapshot(directory):
    return {n: open(os.path.join(directory, n), "rb").read() for n in sorted(os.listdir(directory))}


def test_failure_or_interrupt_leaves_the_existing_dataset_untouched(tmp_path, monkeypatch):
    text_tree(str(tmp_path / "corpus"))
    out = str(tmp_path / "out")
    tp.prepare([str(tmp_path / "corpus")], out, verbose=False)
    before = snapshot(out)
    write(tmp_path / "corpus" / "zz" / "bad.jsonl", '{"text": "fine"}\n{"text": "broken\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl line 2 is not JSON"):
        tp.prepare([str(tmp_path / "corpus")], out, tokenizer="byte", verbose=False)
    os.remove(tmp_path / "corpus" / "zz" / "bad.jsonl")
    calls = []

    def interrupted(*a):
        calls.append(1)
        raise KeyboardInterrupt
    monkeypatch.setattr(tp, "encode_documents", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tp.prepare([str(tmp_path / "corpus")], out, seed=3, verbose=False)
    with pytest.raises(KeyboardInterrupt):
        tp.prepare([str(tmp_path / "corpus")], str(tmp_path / "new"), verbose=False)
    assert calls and snapshot(out) == before
    assert sorted(os.listdir(tmp_path)) == ["corpus", "out"]            # no temporary directory, no "new"


def test_replacing_a_dataset_removes_files_that_no_longer_match(tmp_path):
    text_tree(str(tmp_path / "corpus"))
    out = str(tmp_path / "out")
    write_tokenizer(str(tmp_path / "tok"), 100)
    tp.prepare([str(tmp_path / "corpus" / "code")], out, tokenizer=str(tmp_path / "tok"), verbose=False)
    write(os.path.join(out, "train_similarity.bin"), "stale")
    tp.prepare([str(tmp_path / "corpus")], out, verbose=False)
    assert not {"train_similarity.bin", "tokenizer.json", "tokenizer_config.json"} & set(os.listdir(out))
    assert load_meta(out)["tokenizer"] == "byte"


# -----------------------------------------------------------------------------
# bad input: one line naming the file (and line) and the fix

def bad_cases(tmp):
    good = write(tmp / "good" / "g.txt", "some good text\n" * 3)
    latin = tmp / "latin" / "l.txt"
    os.makedirs(latin.parent)
    latin.write_bytes(b"fine\n" * 5 + b"caf\xe9 au lait\n")
    big_vocab = str(tmp / "big_vocab")
    write_tokenizer(big_vocab, 70_000)
    return {
        "missing file": ([str(tmp / "nope.txt")], {}, r"input .*nope\.txt does not exist"),
        "not UTF-8": ([str(latin)], {}, r"l\.txt line 6 is not UTF-8 \(byte 0xe9\).*--encoding_errors=replace"),
        "not JSON": ([write(tmp / "j" / "a.jsonl", '{"text": "ok"}\nnot json\n')], {},
                     r"a\.jsonl line 2 is not JSON"),
        "no field": ([write(tmp / "k" / "b.jsonl", '{"text": "ok"}\n{"body": "x"}\n')], {},
                     r"b\.jsonl line 2 has no field 'text' \(its fields: body\): pass --text_field=NAME"),
        "empty corpus": ([write(tmp / "e" / "empty.txt", "  \n")], {}, r"every document is empty"),
        "no files": ([str(os.path.dirname(write(tmp / "n" / "x.csv", "a")))], {}, r"no \.txt, \.jsonl"),
        "unknown tokenizer": ([good], {"tokenizer": "words"}, r"unknown tokenizer 'words'"),
        "vocab too large": ([good], {"tokenizer": big_vocab, "dtype": "uint16"},
                            r"--dtype=uint16 cannot hold token id 69999"),
        "field domain of txt": ([good], {"domain_from": "field:lang"}, r"g\.txt is a text file"),
    }


def test_bad_input_is_one_clear_error(tmp_path):
    for name, (inputs, kw, pattern) in bad_cases(tmp_path).items():
        with pytest.raises((ValueError, FileNotFoundError), match=pattern):
            tp.prepare(inputs, str(tmp_path / "out"), verbose=False, **kw)
        assert not os.path.exists(tmp_path / "out"), name
    os.makedirs(tmp_path / "mine")
    write(tmp_path / "mine" / "notes.md", "my own file")
    with pytest.raises(ValueError, match=r"holds files but no dataset"):
        tp.prepare([str(tmp_path / "good")], str(tmp_path / "mine"), verbose=False)


def test_cli_error_is_one_line_with_status_2(tmp_path):
    bad = write(tmp_path / "c" / "a.jsonl", '{"text": "ok"}\n' * 5000 + '{"text": 3}\n')   # after a batch
    p = subprocess.run([sys.executable, SCRIPT, bad, f"--out_dir={tmp_path / 'out'}"], capture_output=True,
                       text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    last = p.stderr.strip().split("\n")[-1].split("\r")[-1].strip()
    assert p.returncode == 2 and p.stderr.count("error: ") == 1 and last.startswith("error: "), p.stderr
    assert "a.jsonl line 5001: field 'text' is a int, not a string" in p.stderr


# -----------------------------------------------------------------------------
# progress, hint, training on the output

def test_plain_progress_line_without_tqdm(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tp, "tqdm", None)
    progress = tp.Progress(1000, enabled=True, every=0.0)
    progress.update(500, 12_345)
    err = capsys.readouterr().err
    assert "12,345 tokens" in err and "tok/s" in err and "ETA" in err and "(50%)" in err


def test_hint_names_the_recorded_command(tmp_path):
    text_tree(str(tmp_path / "corpus"))
    out = str(tmp_path / "out")
    tp.prepare([str(tmp_path / "corpus")], out, seed=5, verbose=False)
    os.remove(os.path.join(out, "val.bin"))
    with pytest.raises(FileNotFoundError, match=r"val\.bin is missing: rerun `python data/text/prepare.py "
                                                 r".*corpus --out_dir=.*out --seed=5`"):
        TokenDataset(out, "val")


def test_train_runs_on_prepared_text(tmp_path):
    text_tree(str(tmp_path / "corpus"), n=10)
    data = str(tmp_path / "data")
    tp.prepare([str(tmp_path / "corpus")], data, val_fraction=0.3, verbose=False)
    out = str(tmp_path / "run")
    run_train(TINY + [f"--data_dir={data}", f"--out_dir={out}", "--max_iters=3", "--eval_interval=3",
                      "--moe_layers=all", "--n_experts=2", "--top_k=1"])
    evals = [r for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if r["split"] == "eval"]
    assert [r["iter"] for r in evals] == [0, 3] and np.isfinite(evals[-1]["val_loss"])
    usage = evals[-1]["domain_usage"][0]                     # layer 0: (n_domains, n_experts) routing shares
    code, prose = (load_meta(data)["domains"].index(d) for d in ("code", "prose"))
    assert len(usage) == 3 and abs(sum(usage[code]) - 1) < 1e-5 and abs(sum(usage[prose]) - 1) < 1e-5
