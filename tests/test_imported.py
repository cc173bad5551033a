"""An imported Hugging Face model end to end: its tokenizer (data.tokenizer.HFTokenizer
against the `tokenizers` library), data prepared with it (uint32 for a vocabulary
above 65,536 tokens, the vocab-size check), training from it (dense warm start and
online upcycling), and greedy generation against transformers' generate on the same
weights, token for token (Llama and Mixtral)."""
import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import convert  # noqa: E402
import eval as E  # noqa: E402
import sample as sp  # noqa: E402
import init_from  # noqa: E402
import train  # noqa: E402
from configurator import ConfigError  # noqa: E402
from checkpoint import load_model  # noqa: E402
from data import tokenizer as tk  # noqa: E402
from data.dataset import TokenDataset  # noqa: E402
from data.multidomain import prepare as mdp  # noqa: E402
from data.shakespeare_char import prepare as scp  # noqa: E402
from tests import hf_models as H  # noqa: E402

N_NEW = 40        # prompt 8 + 40 new tokens stay inside the tiny models' 64-token block


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """{arch: (transformers model, HF dir, imported project checkpoint dir)}."""
    out = {}
    for arch in ("llama", "mixtral"):
        base = tmp_path_factory.mktemp(arch)
        hf = H.random_model(H.hf_config(arch), seed=3)
        H.save(hf, str(base / "hf"))
        convert.import_hf(str(base / "hf"), str(base / "imported"))
        out[arch] = (hf, str(base / "hf"), str(base / "imported"))
    return out


def hf_greedy(hf, prompt, n):
    """transformers' greedy generate for exactly n new tokens (no stopping at eos)."""
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        return hf.generate(prompt, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0,
                           attention_mask=torch.ones_like(prompt))


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_greedy_generation_equals_transformers(hf_pair, arch):
    hf, _, ckpt = hf_pair[arch]
    model, _ = load_model(ckpt)
    model.eval()
    prompt = torch.randint(3, H.TINY["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(1))
    theirs = hf_greedy(hf, prompt, N_NEW)
    assert theirs.shape == (2, 8 + N_NEW)
    with torch.no_grad():
        for use_cache in (True, False):
            ours = model.generate(prompt, N_NEW, temperature=0, use_cache=use_cache)
            assert torch.equal(ours, theirs), (use_cache, (ours != theirs).nonzero()[:3])


def test_sample_uses_the_checkpoints_tokenizer(hf_pair, capsys):
    """sample.py on the imported checkpoint alone (no data): the HF tokenizer encodes the
    prompt, greedy text equals transformers' generate decoded by `tokenizers`."""
    hf, hf_dir, ckpt = hf_pair["llama"]
    prompt = "w5 w17 w99 w3"
    lib = tokenizers.Tokenizer.from_file(os.path.join(hf_dir, "tokenizer.json"))
    ids = torch.tensor([lib.encode(prompt).ids])
    want = lib.decode(hf_greedy(hf, ids, 12)[0].tolist(), skip_special_tokens=False)
    for cache_flag in ([], ["--no_cache"]):
        capsys.readouterr()
        assert sp.cli([f"--ckpt={ckpt}", f"--start={prompt}", "--top_k=1", "--max_new_tokens=12", "--json",
                       *cache_flag]) == 0
        assert json.loads(capsys.readouterr().out.splitlines()[-1])["samples"] == [want]


def test_checkpoint_without_tokenizer_says_so(tmp_path, capsys):
    hf = H.random_model(H.hf_config("llama"), seed=0)
    H.save(hf, str(tmp_path / "hf"), tokenizer=False)
    convert.import_hf(str(tmp_path / "hf"), str(tmp_path / "imp"))
    capsys.readouterr()
    assert sp.cli([f"--ckpt={tmp_path / 'imp'}", "--start=w5"]) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(err) == 1 and "has no tokenizer" in err[0], err


def bpe_tokenizer(path, text, vocab_size=300):
    """A byte-level BPE tokenizer trained on `text` (as GPT-2 / Llama 3 tokenizers are built)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    return path


def test_tokenizer_round_trip_equals_the_library(tmp_path):
    text = open(tk.__file__, encoding="utf-8").read()
    for d in (bpe_tokenizer(str(tmp_path / "bpe"), text), H.write_tokenizer(str(tmp_path / "words"), 64) or
              str(tmp_path / "words")):
        lib = tokenizers.Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
        tok = tk.get_tokenizer(d)
        sample_text = text[:3000] + " w5 w63 w64 \x00 ünïcödé"
        assert tok.encode(sample_text) == lib.encode(sample_text, add_special_tokens=False).ids
        assert tok.encode_batch([sample_text, "x"]) == [tok.encode(sample_text), tok.encode("x")]
        assert tok.vocab_size == lib.get_vocab_size(with_added_tokens=True)
    bpe = tk.get_tokenizer(str(tmp_path / "bpe"))
    assert bpe.decode(bpe.encode(text)) == text and bpe.eot_token == 0   # <|endoftext|>, found by name
    words = tk.get_tokenizer(str(tmp_path / "words"))
    assert (words.eot_token, words.bos_token) == (2, 1)                   # named in tokenizer_config.json
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        tk.HFTokenizer(str(tmp_path))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable tokenizer.json"):
        tk.HFTokenizer(str(tmp_path / "bad"))


def big_vocab_tokenizer(path, n_words=70_000):
    """A word-level tokenizer whose ids pass 65,535 (w0..w69999, then <unk>, </s>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {f"w{i}": i for i in range(n_words)}
    vocab.update({"<unk>": n_words, "</s>": n_words + 1})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "</s>"}, f)
    return path


def word_docs(path, n_files=12, words=400, top=70_000, seed=0):
    """Text files of random words w<i>, i < top."""
    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    for f in range(n_files):
        with open(os.path.join(path, f"doc{f:02d}.txt"), "w") as fh:
            fh.write(" ".join(f"w{i}" for i in rng.integers(0, top, words)))
    return path


def test_char_vocabulary_above_uint16_and_hf_ids_with_gaps(tmp_path):
    """A character vocabulary above 65,535 is written as uint32 and its meta says so
    (the loader then reads it back); an HF vocabulary whose ids leave gaps needs
    max id + 1, not its token count, to choose the dtype and the model's vocab."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    text = "".join(chr(i) for i in range(0x10000, 0x10000 + 70_000)) * 2
    (tmp_path / "big.txt").write_text(text, encoding="utf-8")
    meta = scp.prepare(str(tmp_path / "char"), str(tmp_path / "big.txt"), verbose=False)
    assert (meta["vocab_size"], meta["dtype"]) == (70_000, "uint32")
    assert TokenDataset(str(tmp_path / "char"), "train").get_batch(2, 8, torch.Generator().manual_seed(0))[0].max() > 0
    vocab = {"[UNK]": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate("abc")}, "hello": 70_000}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    os.makedirs(tmp_path / "gap")
    t.save(str(tmp_path / "gap" / "tokenizer.json"))
    assert tk.HFTokenizer(str(tmp_path / "gap")).vocab_size == 70_001


def test_prepare_with_a_big_vocabulary_writes_uint32(tmp_path):
    tok_dir = big_vocab_tokenizer(str(tmp_path / "big"))
    docs = word_docs(str(tmp_path / "docs"))
    out = str(tmp_path / "md")
    meta = mdp.prepare(out, tokenizer=tok_dir, chars_per_domain=20_000, max_doc_chars=2000, verbose=False,
                       sources={"words": [("source", docs, ".txt")]})
    assert (meta["tokenizer"], meta["vocab_size"], meta["dtype"], meta["eot_token"]) == ("hf", 70_002, "uint32", 70_001)
    assert open(os.path.join(out, "tokenizer.json"), "rb").read() == open(os.path.join(tok_dir, "tokenizer.json"), "rb").read()
    tokens = np.fromfile(os.path.join(out, "train.bin"), dtype=np.uint32)
    assert tokens.max() > 65_535 and len(tokens) == meta["counts"]["train"]["tokens"]
    index = np.load(os.path.join(out, "train_index.npy"))
    ends = index[:, 0] + index[:, 1] - 1
    assert np.all(tokens[ends] == 70_001) and (tokens == 70_001).sum() == len(index)   # each document, then eot
    ds = TokenDataset(out, "train")
    x, y = ds.get_batch(4, 16, torch.Generator().manual_seed(0))
    assert x.max().item() > 65_535 and torch.equal(x[:, 1:], y[:, :-1])
    assert mdp.default_out_dir(tok_dir) == mdp.DEFAULT_OUT_DIR + "_big" and mdp.default_out_dir("byte") == mdp.DEFAULT_OUT_DIR

    # shakespeare_char with the same tokenizer: one document, uint32, decodes back to the text
    (tmp_path / "input.txt").write_text(open(os.path.join(docs, "doc00.txt")).read())
    meta = scp.prepare(str(tmp_path / "sc"), str(tmp_path / "input.txt"), tokenizer=tok_dir, verbose=False)
    assert (meta["dtype"], meta["vocab_size"]) == ("uint32", 70_002)
    ids = np.concatenate([np.fromfile(str(tmp_path / "sc" / f"{s}.bin"), dtype=np.uint32) for s in ("train", "val")])
    assert ids.max() > 65_535 and len(ids) == 400
    assert tk.load_tokenizer(meta, str(tmp_path / "sc")).decode(ids.tolist()) == open(tmp_path / "input.txt").read()


def test_vocab_mismatch_is_one_line(hf_pair, tmp_path, capsys):
    """Data from a 70,002-token tokenizer against the imported 128-token model."""
    _, _, ckpt = hf_pair["llama"]
    tok_dir = big_vocab_tokenizer(str(tmp_path / "big"))
    data = str(tmp_path / "data")
    mdp.prepare(data, tokenizer=tok_dir, chars_per_domain=20_000, max_doc_chars=2000, verbose=False,
                sources={"words": [("source", word_docs(str(tmp_path / "docs")), ".txt")]})
    capsys.readouterr()
    rc = train.main([f"--init_from={ckpt}", f"--data_dir={data}", f"--out_dir={tmp_path / 'run'}", "--device=cpu",
                     "--block_size=32", "--max_iters=1"])
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert rc == 2 and len(err) == 1 and "vocab_size=128 differs" in err[0] and "70002" in err[0], err
    assert not os.path.exists(tmp_path / "run" / "ckpt.pt") and not os.path.exists(tmp_path / "run" / "tokenizer.json")
    with pytest.raises(E.EvalError, match="vocab_size=70002 but the checkpoint has 128"):
        E.load_val_data({"model_args": {"vocab_size": 128}}, data)
    # a model with more embedding rows than its HF tokenizer has tokens (padded, as many HF models) is fine
    model = load_model(ckpt)[0]
    init_from.check_model_fits_data(model, {"block_size": 32}, 100, data)          # data made with an HF tokenizer
    byte_data = str(tmp_path / "bytes")
    os.makedirs(byte_data)
    with open(os.path.join(byte_data, "meta.json"), "w") as f:
        json.dump({"tokenizer": "byte", "vocab_size": 100, "domains": ["x"]}, f)
    with pytest.raises(ConfigError, match="vocab_size=128 differs"):
        init_from.check_model_fits_data(model, {"block_size": 32}, 100, byte_data)
    assert E.load_val_data({"model_args": {"vocab_size": 70_010}}, data).meta["vocab_size"] == 70_002


def test_train_from_imported_on_its_own_tokens(hf_pair, tmp_path, capsys):
    """prepare --tokenizer=IMPORTED, then a dense warm start and online upcycling train on
    it; both runs carry the tokenizer, and sample.py reads it from the run alone."""
    _, _, ckpt = hf_pair["llama"]
    docs = word_docs(str(tmp_path / "docs"), top=H.TINY["vocab_size"])
    data = str(tmp_path / "data")
    meta = mdp.prepare(data, tokenizer=ckpt, chars_per_domain=20_000, max_doc_chars=2000, verbose=False,
                       sources={"words": [("source", docs, ".txt")]})
    assert (meta["vocab_size"], meta["eot_token"]) == (128, 2) and "dtype" in meta and meta["dtype"] == "uint16"
    shape = ["--n_layer=2", "--n_head=4", "--n_kv_head=2", "--n_embd=64", "--ffn_hidden=128", "--rope_theta=500000.0",
             "--tie_embeddings=False"]
    common = [f"--init_from={ckpt}", f"--data_dir={data}", "--device=cpu", "--block_size=32", "--batch_size=4",
              "--max_iters=2", "--eval_interval=2", "--eval_iters=1", "--warmup_iters=1"] + shape
    for name, extra in (("dense", []), ("moe", ["--moe_layers=all", "--n_experts=4", "--top_k=2"])):
        out = tmp_path / name
        assert train.main(common + [f"--out_dir={out}"] + extra) == 0, capsys.readouterr().err
        assert (out / "tokenizer.json").read_bytes() == open(os.path.join(ckpt, "tokenizer.json"), "rb").read()
        model, _ = load_model(str(out))
        assert model.config.is_moe == (name == "moe")
        text = sp.sample(str(out), prompt="w5 w6", max_new_tokens=5, top_k=1)[0]
        assert text.startswith("w5 w6") and len(text.split()) == 7, text
