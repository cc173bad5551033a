"""convert.py against transformers on the same weights: import (Llama, Mixtral in both
MoE layouts), upcycle + train + export (Mixtral, Qwen2-MoE, GLM4-MoE), round trips,
and every refusal (one line, exit 2, nothing left behind).

Parity is max |logit difference| < 1e-5 in fp32 on random ids of the full block
length; test_parity_catches_layout_mistakes shows the tolerance catches a transposed,
permuted or dropped weight."""
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import convert  # noqa: E402
import eval as E  # noqa: E402
import sample as S  # noqa: E402
import upcycle as U  # noqa: E402
from checkpoint import load_checkpoint, load_model, save_checkpoint  # noqa: E402
from helpers import ROOT, make_dataset, run_train  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from tests import hf_models as H  # noqa: E402

TOL = 1e-5
BLOCK = H.TINY["max_position_embeddings"]


def ids(vocab=H.TINY["vocab_size"], B=2, T=BLOCK, seed=0):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def max_diff(project_model, hf_model, x):
    project_model.eval()
    with torch.no_grad():
        return (project_model(x)[0] - hf_model(x).logits).abs().max().item()


def load_hf(path, caplog):
    """AutoModelForCausalLM.from_pretrained with the loading report and the log checked:
    no missing, unexpected or mis-shaped keys."""
    import transformers
    from transformers import AutoModelForCausalLM
    caplog.clear()
    transformers.utils.logging.enable_propagation()   # transformers' load report reaches caplog
    try:
        with caplog.at_level(logging.WARNING):
            model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, dtype=torch.float32)
    finally:
        transformers.utils.logging.disable_propagation()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    text = caplog.text.lower()
    assert "missing" not in text and "unexpected" not in text and "mismatch" not in text, caplog.text
    return model.eval()


@pytest.fixture(scope="module")
def hf_llamas(tmp_path_factory):
    """{tied: (hf model, sharded HF dir)}."""
    out = {}
    for tied in (False, True):
        d = str(tmp_path_factory.mktemp(f"llama_tied{tied}"))
        m = H.random_model(H.hf_config("llama", tied=tied), seed=int(tied))
        H.save(m, d, shard_size="40KB")
        out[tied] = (m, d)
    return out


@pytest.fixture(scope="module")
def imported(hf_llamas, tmp_path_factory):
    """The untied Llama imported: OUT_DIR."""
    out = str(tmp_path_factory.mktemp("imp") / "llama")
    convert.import_hf(hf_llamas[False][1], out)
    return out


# ------------------------------------------------------------------ import

@pytest.mark.parametrize("tied", [False, True])
def test_import_llama_matches_transformers(hf_llamas, tmp_path, tied):
    hf, d = hf_llamas[tied]
    assert os.path.exists(os.path.join(d, "model.safetensors.index.json"))      # really sharded
    convert.import_hf(d, str(tmp_path / "o"))
    model, ckpt = load_model(str(tmp_path / "o"))
    cfg = model.config
    assert (cfg.n_kv_head, cfg.rope_theta, cfg.rope_scaling, cfg.rope_original_max_pos) == (2, 500000.0, "llama3", 32)
    assert cfg.tie_embeddings == tied and cfg.block_size == BLOCK
    assert max_diff(model, hf, ids()) < TOL
    for name in ("tokenizer.json", "tokenizer_config.json"):   # copied verbatim
        assert open(os.path.join(d, name), "rb").read() == open(tmp_path / "o" / name, "rb").read()
    # the llama3 scaling matters at this length: without it the logits move far beyond TOL
    plain = GPT(GPTConfig(**{**asdict(cfg), "rope_scaling": "none"}))
    plain.load_state_dict(model.state_dict())
    assert max_diff(plain, hf, ids()) > 1e-3


def test_parity_catches_layout_mistakes(hf_llamas, imported):
    """A transposed, permuted (two kv heads swapped) or dropped (zeroed) weight moves
    the logits by far more than TOL."""
    hf = hf_llamas[False][0]
    model, _ = load_model(imported)
    x, hd = ids(), 16
    mutations = {
        "transposed q_proj": lambda s: s["blocks.0.attn.q_proj.weight"].copy_(s["blocks.0.attn.q_proj.weight"].T.clone()),
        "permuted kv heads": lambda s: s["blocks.1.attn.k_proj.weight"].copy_(
            torch.cat([s["blocks.1.attn.k_proj.weight"][hd:], s["blocks.1.attn.k_proj.weight"][:hd]])),
        "dropped ffn_norm": lambda s: s["blocks.0.ffn_norm.weight"].fill_(1.0),
        "rotate-half vs interleaved q": lambda s: s["blocks.0.attn.q_proj.weight"].copy_(
            s["blocks.0.attn.q_proj.weight"].view(4, 2, hd // 2, 64).transpose(1, 2).reshape(64, 64).clone()),
    }
    for name, mutate in mutations.items():
        m = GPT(model.config)
        m.load_state_dict(model.state_dict())
        with torch.no_grad():
            mutate(m.state_dict())
        assert max_diff(m, hf, x) > 1e-3, name


@pytest.mark.parametrize("layout", ["hub", "fused"])
def test_import_mixtral_matches_transformers(tmp_path, layout):
    hf = H.random_model(H.hf_config("mixtral", tied=False), seed=3)
    d = str(tmp_path / "hf")
    H.save(hf, d) if layout == "hub" else H.save_fused(hf, d)
    from safetensors import safe_open
    with safe_open(os.path.join(d, "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(("experts.0.w1" in k) == (layout == "hub") for k in keys)
    assert any(k.endswith("gate_up_proj") == (layout == "fused") for k in keys)
    convert.import_hf(d, str(tmp_path / "o"))
    model, _ = load_model(str(tmp_path / "o"))
    assert (model.config.moe_layers, model.config.n_experts, model.config.top_k, model.config.router) == \
        ("all", 4, 2, "topk_softmax")
    assert max_diff(model, hf, ids()) < TOL


def test_import_mistral_without_sliding_window(tmp_path):
    hf = H.random_model(H.hf_config("mistral"), seed=4)
    H.save(hf, str(tmp_path / "hf"))
    convert.import_hf(str(tmp_path / "hf"), str(tmp_path / "o"))
    assert max_diff(load_model(str(tmp_path / "o"))[0], hf, ids()) < TOL


def test_missing_config_keys_read_as_transformers_reads_them(tmp_path, caplog):
    """A Mixtral config.json without rope_theta and rms_norm_eps: transformers takes
    MixtralConfig's defaults (1e6, 1e-5), not Llama's (1e4, 1e-6); so must the import.
    A Mistral sliding_window at least as long as the context never binds: accepted."""
    hf = H.random_model(H.hf_config("mixtral", rope_scaling=None), seed=6)
    src = str(tmp_path / "hf")
    H.save(hf, src)
    cfg = json.load(open(os.path.join(src, "config.json")))
    for key in ("rope_parameters", "rope_theta", "rope_scaling", "rms_norm_eps"):
        cfg.pop(key, None)
    json.dump(cfg, open(os.path.join(src, "config.json"), "w"))
    theirs = load_hf(src, caplog)
    convert.import_hf(src, str(tmp_path / "o"))
    ours = load_model(str(tmp_path / "o"))[0]
    assert (ours.config.rope_theta, ours.config.norm_eps) == (1e6, 1e-5)
    assert max_diff(ours, theirs, ids()) < TOL
    mistral = dict(cfg, architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=64)
    assert convert.model_args_from_hf(mistral)["block_size"] == 64   # the window covers the whole context


def test_load_check_catches_missing_and_unexpected_keys(imported, tmp_path, caplog):
    """load_hf really sees transformers' report: an export with a renamed tensor fails it."""
    from safetensors.torch import load_file, save_file
    convert.export_hf(imported, str(tmp_path / "hf"))
    f = str(tmp_path / "hf" / "model.safetensors")
    state = load_file(f)
    state["model.final_norm.weight"] = state.pop("model.norm.weight")
    save_file(state, f, metadata={"format": "pt"})
    with pytest.raises(AssertionError, match="model.norm.weight"):
        load_hf(str(tmp_path / "hf"), caplog)


# ------------------------------------------------------------------ upcycle, train, export

def train_steps(model, n=3, seed=0):
    """A few AdamW steps on random ids so that the experts and routers move apart."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for i in range(n):
        x = ids(B=4, seed=100 + i)
        _, loss, _ = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def save_model(model, out, config=None):
    save_checkpoint({"model_args": asdict(model.config), "model": model.state_dict(), "config": config or {}}, out)
    return out


def test_upcycle_train_export_mixtral(hf_llamas, imported, tmp_path, caplog):
    up = str(tmp_path / "up")
    U.upcycle_checkpoint(imported, up, {"model_args": {"moe_layers": "all", "n_experts": 8, "top_k": 2}})
    convert.export_hf(up, str(tmp_path / "hf0"))
    assert json.load(open(tmp_path / "hf0" / "config.json"))["architectures"] == ["MixtralForCausalLM"]
    tok = os.path.join(hf_llamas[False][1], "tokenizer.json")   # found through upcycled_from
    assert open(tmp_path / "hf0" / "tokenizer.json", "rb").read() == open(tok, "rb").read()
    mixtral0 = load_hf(str(tmp_path / "hf0"), caplog)
    # right after upcycling the exported Mixtral is the original Llama
    assert max_diff(load_model(up)[0], hf_llamas[False][0], ids()) < TOL
    with torch.no_grad():
        x = ids()
        assert (mixtral0(x).logits - hf_llamas[False][0](x).logits).abs().max().item() < TOL
    model = train_steps(load_model(up)[0])
    g = model.blocks[0].ffn.gate_proj
    assert (g[0] - g[1]).abs().max() > 1e-4                                        # experts differ now
    save_model(model, str(tmp_path / "trained"))
    convert.export_hf(str(tmp_path / "trained"), str(tmp_path / "hf1"))
    mixtral = load_hf(str(tmp_path / "hf1"), caplog)
    assert max_diff(model, mixtral, ids(seed=1)) < TOL
    assert max_diff(model, mixtral0, ids(seed=1)) > 1e-3                           # training changed it


def moe_model(seed=0, **kw):
    base = dict(vocab_size=128, block_size=BLOCK, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, ffn_hidden=128,
                tie_embeddings=False, rope_theta=500000.0, n_experts=4, top_k=2, expert_hidden=64)
    torch.manual_seed(seed)
    m = GPT(GPTConfig(**{**base, **kw}))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith("router.weight"):
                p.normal_(std=0.5)                  # decisive routing, different per expert
    return m.eval()


@pytest.mark.parametrize("kw,target", [
    (dict(moe_layers="1", router="softmax_topk"), "Qwen2MoeForCausalLM"),
    (dict(moe_layers="every_other", router="topk_softmax"), "Qwen2MoeForCausalLM"),
    (dict(moe_layers="1,2", router="sigmoid", n_shared_experts=1), "Glm4MoeForCausalLM"),
    (dict(moe_layers="all", router="sigmoid"), "Glm4MoeForCausalLM"),
    (dict(moe_layers="all", router="topk_softmax", n_shared_experts=2), "GraniteMoeSharedForCausalLM"),
    # Qwen2-MoE's sigmoid-gated shared expert: gate weight 0 (sigmoid 0.5) and down_proj 2 W2 (qwen2_moe_shared)
    (dict(moe_layers="1", router="topk_softmax", n_shared_experts=1), "Qwen2MoeForCausalLM"),
    (dict(moe_layers="all", router="softmax_topk", n_shared_experts=1), "Qwen2MoeForCausalLM"),
    (dict(moe_layers="every_other", router="softmax_topk", n_shared_experts=2), "Qwen2MoeForCausalLM"),
])
def test_export_other_routers(tmp_path, caplog, kw, target):
    model = moe_model(**kw)
    if kw["router"] == "sigmoid":   # a selection bias that changes the choice, as after aux-free balancing
        for _, f in model.moe_layers():
            f.router.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))
    save_model(model, str(tmp_path / "c"))
    convert.export_hf(str(tmp_path / "c"), str(tmp_path / "hf"))
    assert json.load(open(tmp_path / "hf" / "config.json"))["architectures"] == [target]
    hf = load_hf(str(tmp_path / "hf"), caplog)
    assert max_diff(model, hf, ids()) < TOL


# ------------------------------------------------------------------ round trips

@pytest.mark.parametrize("moe", [False, True])
def test_round_trip_is_bit_identical(imported, tmp_path, moe):
    src = imported
    if moe:
        src = str(tmp_path / "up")
        U.upcycle_checkpoint(imported, src, {"model_args": {"moe_layers": "all", "n_experts": 8, "top_k": 2}})
        save_model(train_steps(load_model(src)[0]), str(tmp_path / "trained"))
        src = str(tmp_path / "trained")
    convert.export_hf(src, str(tmp_path / "hf"))
    convert.import_hf(str(tmp_path / "hf"), str(tmp_path / "back"))
    a, b = load_checkpoint(src), load_checkpoint(str(tmp_path / "back"))
    assert set(a["model"]) == set(b["model"])
    for k in a["model"]:
        assert a["model"][k].dtype == b["model"][k].dtype and torch.equal(a["model"][k], b["model"][k]), k
    assert b["model_args"] == a["model_args"]


# ------------------------------------------------------------------ the tools accept an imported checkpoint

def test_imported_checkpoint_in_eval_upcycle_train(imported, tmp_path, capsys):
    data = make_dataset(str(tmp_path / "data"), vocab=128)
    res = E.evaluate_checkpoint(imported, batches=2, batch_size=2, data_dir=data)
    assert res["kind"] == "dense" and res["val_loss"] > 0 and res["block_size"] == 64   # max_position_embeddings
    # a long-context model is evaluated at a window the user picks (the val set may be shorter)
    assert E.cli(["--ckpt", imported, "--data_dir", data, "--block_size=16", "--batches=2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["block_size"] == 16
    assert E.cli(["--ckpt", imported, "--data_dir", data, "--block_size=65"]) == 2
    assert "--block_size=65 must be between 1 and the model's block_size=64" in capsys.readouterr().err
    # without --data_dir there is no data of this model's vocabulary: one line, exit 2
    assert E.cli(["--ckpt", imported, "--data_dir", str(tmp_path / "none")]) == 2
    assert S.cli(["--ckpt", imported, "--data_dir", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(l.startswith("error: ") for l in err)
    assert U.main(["--ckpt", imported, "--out_dir", str(tmp_path / "up"), "--n_experts=4", "--top_k=2"]) == 0
    shape = ["--n_layer=2", "--n_head=4", "--n_kv_head=2", "--n_embd=64", "--ffn_hidden=128",
             "--tie_embeddings=False", "--rope_theta=500000.0"]
    run = ["--device=cpu", "--batch_size=2", "--block_size=32", "--eval_iters=1", "--eval_interval=2",
           "--max_iters=2", "--warmup_iters=1", f"--data_dir={data}"]
    run_train(shape + run + [f"--init_from={imported}", "--moe_layers=all", "--n_experts=4", "--top_k=2",
                             f"--out_dir={tmp_path}/online"])
    online = load_checkpoint(str(tmp_path / "online"))
    assert online["model_args"]["rope_scaling"] == "llama3" and online["iter_num"] == 2


def test_old_checkpoints_without_rope_scaling_still_load(tmp_path):
    m = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32))
    args = {k: v for k, v in asdict(m.config).items() if not k.startswith("rope_") or k == "rope_theta"}
    save_checkpoint({"model_args": args, "model": m.state_dict()}, str(tmp_path))
    m2, _ = load_model(str(tmp_path))
    assert m2.config.rope_scaling == "none" and torch.equal(m2.rope_cos, m.rope_cos)


# ------------------------------------------------------------------ refusals

def edit_hf(src, dst, config=None, drop=None, tensors=None):
    """A copy of the HF dir src with config.json keys replaced and/or tensors edited."""
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    cfg = json.load(open(os.path.join(dst, "config.json")))
    cfg.update(config or {})
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    if drop or tensors:
        for f in os.listdir(dst):
            if f.endswith(".safetensors"):
                state = load_file(os.path.join(dst, f))
                if drop in state:
                    state.pop(drop)
                for k, v in (tensors or {}).items():
                    if k in state:
                        state[k] = v
                save_file(state, os.path.join(dst, f), metadata={"format": "pt"})
    return dst


def refused(capsys, argv, words, out):
    assert convert.cli(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    for w in words:
        assert w in err, (w, err)
    assert not os.path.exists(out) and not [f for f in os.listdir(os.path.dirname(out)) if ".tmp-" in f]


@pytest.mark.parametrize("config,drop,tensors,words", [
    ({"attention_bias": True}, None, None, ["attention_bias"]),
    ({"mlp_bias": True}, None, None, ["mlp_bias"]),
    ({"hidden_act": "gelu"}, None, None, ["hidden_act", "gelu"]),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, None, None, ["yarn"]),
    ({"head_dim": 32}, None, None, ["head_dim=32"]),
    ({"architectures": ["Qwen2ForCausalLM"]}, None, None, ["Qwen2ForCausalLM", "not supported"]),
    ({"architectures": ["MistralForCausalLM"], "sliding_window": 16}, None, None,
     ["sliding_window=16", "max_position_embeddings=64"]),
    ({"architectures": ["MistralForCausalLM"], "max_position_embeddings": 8192}, None, None,
     ["sliding_window=4096 (MistralForCausalLM default)", "max_position_embeddings=8192"]),
    ({"hidden_size": 32, "head_dim": 8}, None, None, ["model.embed_tokens.weight", "shape"]),
    ({"intermediate_size": None}, None, None, ["intermediate_size=None must be an integer"]),
    ({"num_hidden_layers": "2"}, None, None, ["num_hidden_layers='2' must be an integer"]),
    ({"rms_norm_eps": "1e-5"}, None, None, ["rms_norm_eps='1e-5' must be a number"]),
    (None, "model.layers.1.mlp.up_proj.weight", None, ["model.layers.1.mlp.up_proj.weight", "missing"]),
    (None, None, {"model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 64)},
     ["model.layers.0.self_attn.k_proj.weight", "(64, 64)", "(32, 64)"]),
    (None, None, {"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}, ["unexpected", "q_proj.bias"]),
])
def test_import_refusals(hf_llamas, tmp_path, capsys, config, drop, tensors, words):
    src = edit_hf(hf_llamas[False][1], str(tmp_path / "hf"), config, drop, tensors)
    if tensors and "q_proj.bias" in str(tensors):   # an extra tensor: add it to the first shard
        from safetensors.torch import load_file, save_file
        first = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))[0]
        state = load_file(os.path.join(src, first))
        state.update(tensors)
        save_file(state, os.path.join(src, first), metadata={"format": "pt"})
    refused(capsys, [f"--from_hf={src}", f"--out_dir={tmp_path}/o"], words, str(tmp_path / "o"))


def test_import_refuses_pickles_and_damaged_files(hf_llamas, tmp_path, capsys):
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(os.path.join(hf_llamas[True][1], "config.json"), d)
    (d / "pytorch_model.bin").write_bytes(b"not opened")
    refused(capsys, [f"--from_hf={d}", f"--out_dir={tmp_path}/o"], ["pytorch_model.bin", "never unpickles"],
            str(tmp_path / "o"))
    bad = edit_hf(hf_llamas[False][1], str(tmp_path / "trunc"))
    shard = os.path.join(bad, sorted(f for f in os.listdir(bad) if f.endswith(".safetensors"))[0])
    open(shard, "r+b").truncate(100)
    refused(capsys, [f"--from_hf={bad}", f"--out_dir={tmp_path}/o"], [os.path.basename(shard), "safetensors"],
            str(tmp_path / "o"))
    (tmp_path / "empty").mkdir()
    refused(capsys, [f"--from_hf={tmp_path}/empty", f"--out_dir={tmp_path}/o"], ["config.json"], str(tmp_path / "o"))


def test_existing_output_is_never_touched(hf_llamas, imported, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert convert.cli([f"--from_hf={hf_llamas[False][1]}", f"--out_dir={out}"]) == 2
    assert convert.cli([f"--ckpt={imported}", f"--to_hf={out}"]) == 2
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert len(capsys.readouterr().err.strip().splitlines()) == 2


def test_import_keeps_or_casts_the_files_dtype(tmp_path):
    """--dtype=auto keeps a bf16 file's weights bit for bit and records bfloat16; float32
    upcasts exactly (every bf16 value is an fp32 value)."""
    hf = H.random_model(H.hf_config("llama"), seed=5).to(torch.bfloat16)
    H.save(hf, str(tmp_path / "hf"), tokenizer=False)
    for dtype, want in (("auto", torch.bfloat16), ("float32", torch.float32), ("float16", torch.float16)):
        convert.import_hf(str(tmp_path / "hf"), str(tmp_path / dtype), dtype)
        ckpt = load_checkpoint(str(tmp_path / dtype))
        assert ckpt["dtype"] == str(want).removeprefix("torch.")
        state = ckpt["model"]
        assert {v.dtype for v in state.values()} == {want}
        assert torch.equal(state["blocks.1.attn.k_proj.weight"], hf.model.layers[1].self_attn.k_proj.weight.to(want))
        assert torch.equal(state["lm_head.weight"], hf.lm_head.weight.to(want))
    a, b = load_model(str(tmp_path / "auto"))[0], load_model(str(tmp_path / "float32"))[0]
    assert max_diff(a, hf.float(), ids()) < TOL and max_diff(b, hf.float(), ids()) < TOL


@pytest.mark.parametrize("kw,words", [
    (dict(moe_layers="all", router="lory", segment_len=16), ["lory", "merges"]),
    (dict(moe_layers="all", router="expert_choice", capacity_factor=1.0), ["expert_choice", "not causal"]),
    (dict(moe_layers="all", gate_norm_lambda=1.0), ["gate_norm_lambda", "Skywork"]),
    (dict(moe_layers="all", router_noise=True), ["router_noise"]),
    (dict(moe_layers="all", eval_capacity_factor=1.0), ["eval_capacity_factor", "dropless"]),
    (dict(moe_layers="0", router="sigmoid"), ["sigmoid", "dense layers must come first"]),
])
def test_export_refusals(tmp_path, capsys, kw, words):
    save_model(moe_model(**kw), str(tmp_path / "c"))
    refused(capsys, [f"--ckpt={tmp_path}/c", f"--to_hf={tmp_path}/hf"], words, str(tmp_path / "hf"))


@pytest.mark.parametrize("edit,words", [
    ("wrong_shape", ["blocks.0.attn.q_proj.weight", "(64, 32)", "(64, 64)"]),
    ("missing", ["lacks tensor blocks.1.ffn.router.weight"]),
    ("extra", ["blocks.0.attn.q_proj.bias", "no place"]),
])
def test_export_refuses_a_state_that_does_not_fit_its_model_args(tmp_path, capsys, edit, words):
    """Checked before writing, instead of an export that from_pretrained rejects later."""
    model = moe_model(moe_layers="all")
    state = model.state_dict()
    if edit == "wrong_shape":
        state["blocks.0.attn.q_proj.weight"] = torch.zeros(64, 32)
    elif edit == "missing":
        state.pop("blocks.1.ffn.router.weight")
    else:
        state["blocks.0.attn.q_proj.bias"] = torch.zeros(64)
    save_checkpoint({"model_args": asdict(model.config), "model": state, "config": {}}, str(tmp_path / "c"))
    refused(capsys, [f"--ckpt={tmp_path}/c", f"--to_hf={tmp_path}/hf"], words, str(tmp_path / "hf"))


def test_swish_is_silu():
    """transformers' ACT2FN maps 'swish' to SiLU: such a config imports."""
    cfg = {**H.TINY, "architectures": ["LlamaForCausalLM"], "hidden_act": "swish", "rope_scaling": None}
    assert convert.model_args_from_hf(cfg)["n_embd"] == 64


def test_export_keeps_the_models_bos_eos(tmp_path):
    """An imported model's bos/eos ids reach the exported config.json and
    generation_config.json, through upcycling, whether the HF directory had a
    generation_config.json or only config.json's ids. Without them transformers would
    fill in its defaults (bos 1, eos 2) and its generate would not stop at the model's eos."""
    from transformers import AutoConfig, GenerationConfig
    hf = H.random_model(H.hf_config(bos_token_id=5, eos_token_id=6), seed=7)
    src = H.save(hf, str(tmp_path / "hf"))
    for with_generation_config in (True, False):
        if not with_generation_config:
            os.remove(os.path.join(src, "generation_config.json"))
        tag = str(with_generation_config)
        convert.import_hf(src, str(tmp_path / f"dense{tag}"))
        U.upcycle_checkpoint(str(tmp_path / f"dense{tag}"), str(tmp_path / f"moe{tag}"),
                           {"model_args": {"moe_layers": "all", "n_experts": 4, "top_k": 2}})
        convert.export_hf(str(tmp_path / f"moe{tag}"), str(tmp_path / f"out{tag}"))
        cfg = AutoConfig.from_pretrained(str(tmp_path / f"out{tag}"))
        gen = GenerationConfig.from_pretrained(str(tmp_path / f"out{tag}"))
        assert (cfg.bos_token_id, cfg.eos_token_id, gen.bos_token_id, gen.eos_token_id) == (5, 6, 5, 6), tag
    # a model of this project's own, with no HF tokenizer: no ids, rather than transformers' 1 and 2
    save_model(moe_model(moe_layers="all"), str(tmp_path / "own"))
    convert.export_hf(str(tmp_path / "own"), str(tmp_path / "own_hf"))
    cfg = AutoConfig.from_pretrained(str(tmp_path / "own_hf"))
    assert (cfg.bos_token_id, cfg.eos_token_id) == (None, None)


def test_cli_subprocess(imported, tmp_path, capsys):
    """The real entry point exits 0 and writes the HF files; bad flags exit 2 with one line."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "convert.py", f"--ckpt={imported}", f"--to_hf={tmp_path}/hf"],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "generation_config.json", "model.safetensors",
                                                   "tokenizer.json", "tokenizer_config.json"]
    for argv in ([f"--ckpt={imported}"], [f"--ckpt={imported}", f"--to_hf={tmp_path}/x", f"--from_hf={imported}"],
                 ["--bogus=1"]):
        assert convert.cli(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: "), err


# ------------------------------------------------------------------ dtype and shards

def test_export_dtype_and_shards_load_in_transformers(imported, tmp_path, caplog):
    """--dtype=bfloat16 with a tiny --max_shard_size: files of at most that many tensor
    bytes, an index transformers reads, and transformers' logits equal to those of the
    project's model with its weights rounded to bf16."""
    from safetensors import safe_open
    out = str(tmp_path / "hf")
    convert.export_hf(imported, out, "bfloat16", "20KB")
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert len(files) > 2 and set(index["weight_map"].values()) == set(files)
    total = 0
    for f in files:
        with safe_open(os.path.join(out, f), "pt") as st:
            sizes = [st.get_tensor(k).numel() * 2 for k in st.keys()]
            assert {st.get_slice(k).get_dtype() for k in st.keys()} == {"BF16"}
            assert all(index["weight_map"][k] == f for k in st.keys())
        assert sum(sizes) <= 20_000 or len(sizes) == 1, (f, sizes)
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total
    assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "bfloat16"
    ours = load_model(imported)[0]
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(p.bfloat16().float())
    assert max_diff(ours, load_hf(out, caplog), ids()) < TOL


def test_bf16_round_trip_keeps_every_bit(tmp_path):
    """A bf16 HF file imported with --dtype=auto and exported with --dtype=auto gives back
    the same bf16 tensors, in one model.safetensors (under the default shard size)."""
    from safetensors.torch import load_file
    hf = H.random_model(H.hf_config("mixtral"), seed=8).to(torch.bfloat16)
    H.save(hf, str(tmp_path / "hf"), tokenizer=False)
    assert convert.cli([f"--from_hf={tmp_path}/hf", f"--out_dir={tmp_path}/ckpt"]) == 0
    assert convert.cli([f"--ckpt={tmp_path}/ckpt", f"--to_hf={tmp_path}/back"]) == 0
    assert sorted(f for f in os.listdir(tmp_path / "back") if "safetensors" in f) == ["model.safetensors"]
    a, b = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]), k


def test_default_shard_size_is_transformers():
    import inspect
    from transformers import PreTrainedModel
    default = inspect.signature(PreTrainedModel.save_pretrained).parameters["max_shard_size"].default
    assert convert.MAX_SHARD_SIZE == default
    assert [convert.parse_size(s) for s in ("5GB", "2GiB", "40KB", "123")] == [5 * 10**9, 2 * 2**30, 40_000, 123]
