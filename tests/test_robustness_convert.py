"""Robustness of convert.py, the Hugging Face doors: config.json and the shard index
checked as a schema, safetensors tensors that are not floating or not finite, export
of a non-finite checkpoint, and write errors (disk full, unwritable output) in import
and export. Each table row is one bad value or fault, run through convert.cli: the
one line it must print, exit status 2, and nothing written or lost (the output
directory, created empty beforehand, stays empty; no temp directory is left; the
source files are unchanged)."""
import errno
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import checkpoint as C  # noqa: E402
import convert  # noqa: E402
import outdir  # noqa: E402  (checkpoint.py writes through outdir.write_atomic)
from helpers import ROOT  # noqa: E402
from test_robustness import FailingFile  # noqa: E402  (writes fail after `room` bytes)
from tests import hf_models as H  # noqa: E402

GiB = 2**30


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random Llama saved by transformers in 40 kB shards, with its tokenizer."""
    d = str(tmp_path_factory.mktemp("hf") / "llama")
    H.save(H.random_model(H.hf_config("llama"), seed=0), d, shard_size="40KB")
    return d


@pytest.fixture(scope="module")
def ckpt_dir(hf_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ckpt") / "imported")
    convert.import_hf(hf_dir, out)
    return out


@pytest.fixture(autouse=True)
def fixed_ram(monkeypatch):
    """16 GiB free, whatever this machine has: the size rows give the same answer everywhere."""
    monkeypatch.setattr(convert, "ram_available", lambda: 16 * GiB, raising=False)


def digest(d):
    return {f: hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest() for f in sorted(os.listdir(d))}


def refused(capsys, argv, needle, out, sources=()):
    """convert.cli(argv) exits 2 with one line holding needle; out (an empty directory
    made before) stays empty, no temp directory is left, the sources are unchanged."""
    os.makedirs(out, exist_ok=True)
    before = [digest(s) for s in sources]
    assert convert.cli(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert needle in err, (needle, err)
    assert os.listdir(out) == [] and not [f for f in os.listdir(os.path.dirname(out)) if ".tmp-" in f]
    assert [digest(s) for s in sources] == before
    return err


def copy_with_config(src, dst, edit):
    """A copy of the HF dir src whose config.json is edit(config dict) (any JSON value)."""
    shutil.copytree(src, dst)
    path = os.path.join(dst, "config.json")
    cfg = edit(json.load(open(path)))
    with open(path, "w") as f:
        json.dump(cfg, f)
    return dst


def set_key(key, value):
    def edit(cfg):
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
        return cfg
    return edit


# ----------------------------------------------------------------------------- config.json as a schema

CONFIG_ROWS = [   # (edit of config.json, text the one line must hold)
    (lambda c: [], "holds a JSON array ([]), not an object"),
    (lambda c: "llama", "holds a JSON string ('llama'), not an object"),
    (lambda c: None, "holds a JSON null (None), not an object"),
    (set_key("architectures", {"a": 1}), "architectures={'a': 1} must be a list of class names"),
    (set_key("architectures", []), "architectures=[] must be a list of class names"),
    (set_key("architectures", [3]), "architectures=[3] must be a list of class names"),
    (set_key("hidden_size", "64"), "hidden_size='64' must be an integer in [1, 2147483647]"),
    (set_key("hidden_size", 64.0), "hidden_size=64.0 must be an integer"),
    (set_key("vocab_size", True), "vocab_size=True must be an integer"),
    (set_key("num_attention_heads", 0), "num_attention_heads=0 must be an integer in [1, 2147483647]"),
    (set_key("num_attention_heads", 3), "num_attention_heads=3 must divide hidden_size=64"),
    (set_key("num_key_value_heads", 3), "num_key_value_heads=3 must divide num_attention_heads"),
    (set_key("intermediate_size", -1), "intermediate_size=-1 must be an integer in [1"),
    (set_key("num_hidden_layers", 10**9), "it needs at least"),
    (set_key("max_position_embeddings", 10**9), "rotary tables"),
    (set_key("max_position_embeddings", 10**30), "max_position_embeddings=1000000000000000000000000000000 must be"),
    (set_key("vocab_size", 2 * 10**9), "it needs at least"),
    (set_key("rope_parameters", [1]), "rope_parameters=[1] must be null or an object"),
    (set_key("rope_parameters", "llama3"), "rope_parameters='llama3' must be null or an object"),
    (set_key("rope_scaling", "llama3"), "rope_scaling='llama3' must be null or an object"),
    (set_key("rope_parameters.rope_type", 3), "rope_parameters.rope_type=3 must be a string"),
    (set_key("rope_parameters.rope_theta", 0), "rope_parameters.rope_theta=0 must be a finite number in (1, inf)"),
    (set_key("rope_parameters.factor", -8.0), "rope_parameters.factor=-8.0 must be > 0"),
    (set_key("rope_parameters.original_max_position_embeddings", "32"), "original_max_position_embeddings='32'"),
    (set_key("rope_theta", 0), "rope_theta=0 must be a finite number in (1, inf)"),
    (set_key("rope_theta", -1), "rope_theta=-1 must be a finite number in (1, inf)"),
    (set_key("rope_theta", float("nan")), "rope_theta=nan must be a finite number in (1, inf)"),
    (set_key("rope_theta", float("inf")), "rope_theta=inf must be a finite number in (1, inf)"),
    (set_key("rms_norm_eps", -1), "rms_norm_eps=-1 must be a finite number in (0, 1)"),
    (set_key("rms_norm_eps", float("nan")), "rms_norm_eps=nan must be a finite number in (0, 1)"),
    (set_key("sliding_window", "x"), "sliding_window='x' must be an integer in [1, 2147483647] or null"),
    (set_key("head_dim", "16"), "head_dim='16' must be an integer"),
    (set_key("tie_word_embeddings", "yes"), "tie_word_embeddings='yes' must be true or false"),
    (set_key("attention_bias", 0), "attention_bias=0 must be true or false"),
    (set_key("hidden_act", ["silu"]), "hidden_act=['silu'] must be a string"),
    (set_key("eos_token_id", "</s>"), "eos_token_id='</s>' must be null, a token id"),
    (set_key("partial_rotary_factor", "1"), "partial_rotary_factor='1' must be a finite number"),
    (lambda c: {k: v for k, v in c.items() if k != "vocab_size"}, "lacks 'vocab_size', which LlamaForCausalLM needs"),
    (lambda c: dict(c, architectures=["MixtralForCausalLM"]), "lacks 'num_local_experts'"),
    (lambda c: dict(c, architectures=["MixtralForCausalLM"], num_local_experts=2, num_experts_per_tok=3),
     "num_experts_per_tok=3 must be at most num_local_experts=2"),
]


@pytest.mark.parametrize("edit, needle", CONFIG_ROWS, ids=[n[:40] for _, n in CONFIG_ROWS])
def test_bad_config_json_is_one_line(hf_dir, tmp_path, capsys, edit, needle):
    src = copy_with_config(hf_dir, str(tmp_path / "hf"), edit)
    err = refused(capsys, [f"--from_hf={src}", f"--out_dir={tmp_path}/o"], needle, str(tmp_path / "o"), [src])
    assert os.path.join(src, "config.json") in err


def test_config_errors_name_the_file(hf_dir, tmp_path, capsys):
    src = copy_with_config(hf_dir, str(tmp_path / "hf"), set_key("rope_theta", 0))
    refused(capsys, [f"--from_hf={src}", f"--out_dir={tmp_path}/o"], f"{src}/config.json: rope_theta=0",
            str(tmp_path / "o"))


def test_param_count_is_exact():
    """The size bound counts exactly the parameters GPT builds (dense, GQA, tied, Mixtral)."""
    for hf in (H.hf_config("llama"), H.hf_config("llama", tied=True, num_key_value_heads=4),
               H.hf_config("mixtral")):
        cfg = hf.to_dict()
        cfg["architectures"] = [{"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM"}[hf.model_type]]
        args = convert.model_args_from_hf(cfg)
        assert convert.param_count(args) == convert.GPT(convert.GPTConfig(**args)).num_params(), hf.model_type


# ----------------------------------------------------------------------------- the shard index

INDEX_ROWS = [
    ([], "weight_map=None must be a non-empty object"),
    ("x", "weight_map=None must be a non-empty object"),
    ({"weight_map": []}, "weight_map=[] must be a non-empty object"),
    ({"weight_map": {}}, "weight_map={} must be a non-empty object"),
    ({"weight_map": {"lm_head.weight": 1}}, "weight_map['lm_head.weight']=1 must name a .safetensors file"),
    ({"weight_map": {"lm_head.weight": None}}, "weight_map['lm_head.weight']=None must name"),
    ({"weight_map": {"lm_head.weight": ["a.safetensors"]}}, "weight_map['lm_head.weight']=['a.safetensors'] must"),
    ({"weight_map": {"lm_head.weight": "../x.safetensors"}}, "(a file name, no path)"),
    ({"weight_map": {"lm_head.weight": "model.bin"}}, "must name a .safetensors file"),
]


@pytest.mark.parametrize("index, needle", INDEX_ROWS, ids=[n[:40] for _, n in INDEX_ROWS])
def test_bad_shard_index_is_one_line(hf_dir, tmp_path, capsys, index, needle):
    src = str(tmp_path / "hf")
    shutil.copytree(hf_dir, src)
    with open(os.path.join(src, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    refused(capsys, [f"--from_hf={src}", f"--out_dir={tmp_path}/o"], needle, str(tmp_path / "o"), [src])


# ----------------------------------------------------------------------------- tensors

def first_shard(d):
    return os.path.join(d, sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))[0])


def rewrite_header(path, edit):
    """Replace a safetensors file's JSON header by edit(header); the data stay."""
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    head = edit(json.loads(raw[8:8 + n]))
    text = json.dumps(head).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def replace_tensor(path, key, make):
    from safetensors.torch import load_file, save_file
    state = load_file(path)
    state[key] = make(state[key])
    save_file(state, path, metadata={"format": "pt"})


def nan_at_0(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


def first_key(path):
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        return sorted(f.keys())[0]


TENSOR_ROWS = [   # (edit of the first shard (path, its first tensor's name), the one line's text)
    (lambda p, k: replace_tensor(p, k, lambda t: t.to(torch.int32)), "is stored as I32: weights must be floating"),
    (lambda p, k: replace_tensor(p, k, lambda t: t > 0), "is stored as BOOL: weights must be floating"),
    (lambda p, k: rewrite_header(p, lambda h: {**h, k: {**h[k], "dtype": "I32"}}), "is stored as I32"),
    (lambda p, k: replace_tensor(p, k, nan_at_0), "holds NaN or inf: refusing to import it"),
    (lambda p, k: replace_tensor(p, k, lambda t: t / 0), "holds NaN or inf"),
    (lambda p, k: rewrite_header(p, lambda h: {**h, k: {**h[k], "shape": [h[k]["shape"][0] + 1, *h[k]["shape"][1:]]}}),
     "is not a readable safetensors file"),   # byte length != dtype x shape: safetensors refuses the header
    (lambda p, k: rewrite_header(p, lambda h: {**h, k: {**h[k], "dtype": "F16"}}), "is not a readable safetensors"),
]


@pytest.mark.parametrize("edit, needle", TENSOR_ROWS, ids=[str(i) for i in range(len(TENSOR_ROWS))])
def test_bad_tensor_is_one_line_naming_it(hf_dir, tmp_path, capsys, edit, needle):
    src = str(tmp_path / "hf")
    shutil.copytree(hf_dir, src)
    shard = first_shard(src)
    key = first_key(shard)
    edit(shard, key)
    err = refused(capsys, [f"--from_hf={src}", f"--out_dir={tmp_path}/o"], needle, str(tmp_path / "o"), [src])
    assert shard in err and (key in err or "readable" in needle)


def test_import_to_float16_refuses_an_overflow(hf_dir, tmp_path, capsys):
    src = str(tmp_path / "hf")
    shutil.copytree(hf_dir, src)
    shard = first_shard(src)
    replace_tensor(shard, first_key(shard), lambda t: t + 1e6)
    refused(capsys, [f"--from_hf={src}", f"--out_dir={tmp_path}/o", "--dtype=float16"],
            f"{first_key(shard)} overflows float16", str(tmp_path / "o"), [src])


# ----------------------------------------------------------------------------- export

def damaged_checkpoint(ckpt_dir, out, edit):
    """A copy of ckpt_dir whose weights edit(state) changed, written with torch.save
    (save_checkpoint would refuse a non-finite one)."""
    shutil.copytree(ckpt_dir, out)
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    edit(ck["model"])
    torch.save(ck, os.path.join(out, "ckpt.pt"))
    return out


EXPORT_ROWS = [   # (edit of the state dict, extra flags, the one line's text)
    (lambda s: s["blocks.1.attn.v_proj.weight"].view(-1)[3].fill_(float("nan")), [],
     "refusing to export: tensor model.layers.1.self_attn.v_proj.weight holds NaN or inf"),
    (lambda s: s["norm.weight"].fill_(float("inf")), [], "model.norm.weight holds NaN or inf"),
    (lambda s: s["norm.weight"].fill_(1e6), ["--dtype=float16"], "model.norm.weight overflows float16"),
    (lambda s: None, ["--max_shard_size=0"], "--max_shard_size='0' must be a positive size"),
    (lambda s: None, ["--max_shard_size=-5GB"], "--max_shard_size='-5GB' must be a positive size"),
    (lambda s: None, ["--max_shard_size=5 parsecs"], "--max_shard_size='5 parsecs' must be a positive size"),
    (lambda s: None, ["--dtype=int8"], "argument --dtype: invalid choice: 'int8'"),
]


@pytest.mark.parametrize("edit, flags, needle", EXPORT_ROWS, ids=[n[:40] for _, _, n in EXPORT_ROWS])
def test_export_refusals_are_one_line(ckpt_dir, tmp_path, capsys, edit, flags, needle):
    src = damaged_checkpoint(ckpt_dir, str(tmp_path / "ck"), edit)
    refused(capsys, [f"--ckpt={src}", f"--to_hf={tmp_path}/hf", *flags], needle, str(tmp_path / "hf"), [src])


# ----------------------------------------------------------------------------- write errors

def fail_with(err):
    def fail(*a, **k):
        raise OSError(err, os.strerror(err))
    return fail


def failing_open(module, room, err):
    """module's open() with writes failing after `room` bytes (reads unchanged)."""
    return lambda p, mode="r", *a, **k: (FailingFile(open(p, mode, *a, **k), room, err) if "w" in mode
                                         else open(p, mode, *a, **k))


WRITE_FAULTS = [   # (direction, what fails, the one line's text)
    ("import", ("open", outdir, 0, errno.ENOSPC), "disk full"),             # ckpt.pt, at once
    ("import", ("open", outdir, 50_000, errno.ENOSPC), "disk full"),        # ckpt.pt, half written
    ("import", ("open", outdir, 50_000, errno.EIO), "could not write"),
    ("import", ("copyfile", errno.ENOSPC), "disk full: the filesystem holding"),   # the tokenizer files
    ("import", ("mkdtemp", errno.EACCES), "could not write"),          # an unwritable parent directory
    ("import", ("mkdtemp", errno.EROFS), "Read-only file system"),
    ("import", ("rename", errno.ENOSPC), "disk full"),
    ("export", ("open", convert, 0, errno.ENOSPC), "disk full: the filesystem holding"),
    ("export", ("open", convert, 30_000, errno.ENOSPC), "disk full: the filesystem holding"),   # mid-shard
    ("export", ("open", convert, 30_000, errno.EDQUOT), "disk full: the filesystem holding"),
    ("export", ("open", convert, 30_000, errno.EIO), "could not write"),
    ("export", ("copyfile", errno.ENOSPC), "disk full: the filesystem holding"),
    ("export", ("mkdtemp", errno.EACCES), "could not write"),
    ("export", ("rename", errno.EXDEV), "could not write"),
]


@pytest.mark.parametrize("direction, fault, needle", WRITE_FAULTS,
                         ids=[f"{d}-{f[0]}-{errno.errorcode[f[-1]]}-{f[2] if len(f) > 2 else ''}"
                              for d, f, _ in WRITE_FAULTS])
def test_write_error_is_one_line_and_leaves_nothing(hf_dir, ckpt_dir, tmp_path, capsys, monkeypatch,
                                                    direction, fault, needle):
    if fault[0] == "open":
        _, module, room, err = fault
        monkeypatch.setattr(module, "open", failing_open(module, room, err), raising=False)
    elif fault[0] == "copyfile":
        monkeypatch.setattr(convert.shutil, "copyfile", fail_with(fault[1]))
    elif fault[0] == "mkdtemp":
        monkeypatch.setattr(convert.tempfile, "mkdtemp", fail_with(fault[1]))
    else:
        monkeypatch.setattr(convert.os, "rename", fail_with(fault[1]))
    out = str(tmp_path / "out")
    argv = ([f"--from_hf={hf_dir}", f"--out_dir={out}"] if direction == "import" else
            [f"--ckpt={ckpt_dir}", f"--to_hf={out}", "--max_shard_size=20KB"])
    refused(capsys, argv, needle, out, [hf_dir, ckpt_dir])


TMPFS_SCRIPT = textwrap.dedent("""
    import os, subprocess, sys
    sys.path.insert(0, sys.argv[3])
    import convert
    d = sys.argv[1]
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", d], check=True)
    os.mkdir(os.path.join(d, "hf"))
    print("EXIT", convert.cli([f"--ckpt={sys.argv[2]}", f"--to_hf={d}/hf"]), "FILES", sorted(os.listdir(d)),
          sorted(os.listdir(os.path.join(d, "hf"))))
""")


def test_export_onto_a_real_full_disk(ckpt_dir, tmp_path):
    """The same on a real 64 kB filesystem (the export needs ~150 kB), where unprivileged
    user namespaces allow mounting one (skipped elsewhere)."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("unshare -rm (an unprivileged mount namespace) is not available here")
    d = tmp_path / "small"
    d.mkdir()
    p = subprocess.run(["unshare", "-rm", sys.executable, "-c", TMPFS_SCRIPT, str(d), ckpt_dir, ROOT],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if "mount" in p.stderr and p.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip().splitlines()[-1]}")
    assert p.returncode == 0, p.stderr
    assert "EXIT 2 FILES ['hf'] []" in p.stdout, p.stdout
    assert p.stderr.count("\n") == 1 and f"error: disk full: the filesystem holding {d}" in p.stderr, p.stderr


@pytest.mark.parametrize("value, needle", [
    ("int8", "field dtype='int8' must be None or one of float32, bfloat16, float16"),
    (7, "field dtype=7 must be None or one of"),
    ("bfloat16", "must be bfloat16, the checkpoint's dtype"),   # the weights are float32
])
def test_recorded_dtype_is_checked_on_load(ckpt_dir, tmp_path, value, needle):
    ck = torch.load(os.path.join(ckpt_dir, "ckpt.pt"), weights_only=True)
    ck["dtype"] = value
    torch.save(ck, str(tmp_path / "ckpt.pt"))
    with pytest.raises(C.CheckpointError, match="dtype") as e:
        C.load_checkpoint(str(tmp_path))
    assert needle in str(e.value) and "\n" not in str(e.value)
