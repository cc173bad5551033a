"""upcycle.py --from_hf --to_hf, the streamed HF -> HF upcycle: the same bytes as
convert.py --from_hf, upcycle.py --ckpt and convert.py --to_hf in turn; a Mixtral that
transformers computes equal to the dense Llama; the lazy pieces (HFState,
StreamedUpcycle, blockwise_logits) against their eager references; and the refusals."""
import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import convert  # noqa: E402
import upcycle as U  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from tests import hf_models as H  # noqa: E402

MOE = ["--n_experts=4", "--top_k=2"]


def hf_llama(d, tied=False, dtype=torch.float32, shard_size="40KB", seed=0):
    model = H.random_model(H.hf_config("llama", tied=tied), seed=seed)
    H.save(model.to(dtype), d, shard_size=shard_size)
    return model.float()


def three_step(src, tmp, extra=()):
    """convert.py --from_hf, upcycle.py --ckpt, convert.py --to_hf: the output dir."""
    assert convert.cli([f"--from_hf={src}", f"--out_dir={tmp}/dense"]) == 0
    assert U.main([f"--ckpt={tmp}/dense", f"--out_dir={tmp}/moe", *MOE, "--verify=false", *extra]) == 0
    assert convert.cli([f"--ckpt={tmp}/moe", f"--to_hf={tmp}/hf3"]) == 0
    return f"{tmp}/hf3"


def same_files(a, b, names):
    for name in names:
        assert open(os.path.join(a, name), "rb").read() == open(os.path.join(b, name), "rb").read(), name


@pytest.mark.parametrize("tied,dtype,extra", [
    (False, torch.float32, ()),
    (True, torch.bfloat16, ("--seed=3",)),
    (False, torch.float32, ("--granularity=2", "--n_shared_experts=1")),
])
def test_streamed_upcycle_writes_the_three_step_bytes(tmp_path, capsys, tied, dtype, extra):
    src = str(tmp_path / "llama")
    hf_llama(src, tied, dtype)
    ref = three_step(src, tmp_path, extra)
    out = str(tmp_path / "streamed")
    assert U.main([f"--from_hf={src}", f"--to_hf={out}", *MOE, *extra]) == 0
    printed = capsys.readouterr().out
    weights = sorted(f for f in os.listdir(ref) if f.endswith((".safetensors", ".json")))
    assert weights == sorted(f for f in os.listdir(out) if f.endswith((".safetensors", ".json")))
    same_files(ref, out, weights)   # config.json, generation_config.json, tokenizer files, every weight byte
    diff = float(printed.split("max |logit diff| vs dense on a random batch (fp32, ")[1].split(": ")[1].split()[0])
    assert ("read back from the files" in printed) == (not extra or "--seed=3" in extra), printed
    assert diff < 1e-5, printed


def test_streamed_mixtral_equals_the_dense_llama_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM
    src, out = str(tmp_path / "llama"), str(tmp_path / "mixtral")
    dense = hf_llama(src, shard_size=None)
    U.upcycle_hf(src, out, {"model_args": {"moe_layers": "all", "n_experts": 8, "top_k": 2}}, max_shard_size="60KB")
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))   # sharded output
    mixtral = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(mixtral).__name__ == "MixtralForCausalLM"
    x = torch.randint(0, H.TINY["vocab_size"], (2, H.TINY["max_position_embeddings"]),
                      generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (mixtral(x).logits - dense(x).logits).abs().max().item() < 1e-5


def test_hf_state_equals_state_from_hf(tmp_path):
    src = str(tmp_path / "llama")
    hf_llama(src, tied=True)
    _, args, refs, dtype = convert.open_hf(src)
    cfg = GPTConfig(**args)
    eager = convert.state_from_hf(refs, cfg, dtype)
    lazy = convert.HFState(refs, cfg, dtype)
    assert list(lazy) == list(GPT(cfg).state_dict()) and len(lazy) == len(eager)
    for k in lazy:
        assert torch.equal(lazy[k], eager[k]), k


def test_streamed_upcycle_equals_upcycle_state_dict_and_reads_in_order():
    cfg = GPTConfig(n_layer=3, n_embd=32, n_head=4, vocab_size=64, block_size=32, ffn_hidden=64)
    state = GPT(cfg).state_dict()
    options = {"model_args": {"moe_layers": "all", "n_experts": 4, "top_k": 2, "n_shared_experts": 1},
               "granularity": 2, "expert_noise": 0.05, "seed": 5}
    eager, moe_cfg, info = U.upcycle_state_dict(state, cfg, options)
    lazy = U.StreamedUpcycle(state, cfg, torch.float32, options)
    assert lazy.cfg == moe_cfg and lazy.info == info and list(lazy) == list(GPT(moe_cfg).state_dict())
    for k in lazy:
        assert torch.equal(lazy[k], eager[k]), k
    with pytest.raises(KeyError, match="already built"):
        lazy["blocks.0.ffn.gate_proj"]
    with pytest.raises(ValueError, match="--method=drop"):
        U.StreamedUpcycle(state, cfg, torch.float32, {**options, "drop_ratio": 0.5})


@pytest.mark.parametrize("kw", [
    {},
    {"moe_layers": "all", "n_experts": 4, "top_k": 2, "n_shared_experts": 1},
    {"moe_layers": "every_other", "n_experts": 4, "router": "lory", "segment_len": 8},
    {"moe_layers": "all", "n_experts": 4, "top_k": 2, "router": "sigmoid"},
])
def test_blockwise_logits_equal_the_models_forward(kw):
    cfg = GPTConfig(n_layer=3, n_embd=32, n_head=4, n_kv_head=2, vocab_size=64, block_size=32, ffn_hidden=64,
                    tie_embeddings=not kw, **kw)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    idx = torch.randint(0, 64, (2, 32))
    with torch.no_grad():
        assert torch.equal(U.blockwise_logits(cfg, model.state_dict(), idx), model(idx)[0])


def test_checkpoint_verify_matches_the_model_level_check(tmp_path):
    cfg = GPTConfig(n_layer=2, n_embd=32, n_head=4, vocab_size=64, block_size=32, ffn_hidden=64)
    dense = GPT(cfg)
    from checkpoint import load_model, save_checkpoint
    from dataclasses import asdict
    save_checkpoint({"model_args": asdict(cfg), "model": dense.state_dict(), "config": {}}, str(tmp_path / "d"))
    U.upcycle_checkpoint(str(tmp_path / "d"), str(tmp_path / "m"),
                         {"model_args": {"moe_layers": "all", "n_experts": 4, "top_k": 2}, "expert_noise": 0.1})
    moe = load_model(str(tmp_path / "m"))[0]
    a = U.checkpoint_logit_difference(str(tmp_path / "d"), str(tmp_path / "m"))
    assert a > 1e-4 and a == U.logit_difference(dense, moe)   # noise moved the logits; both checks agree


@pytest.mark.parametrize("argv,words", [
    (["--to_hf={t}/x"], ["--ckpt=DENSE --out_dir=OUT"]),
    (["--from_hf={src}"], ["--from_hf=HF_DIR --to_hf=NEW_HF_DIR"]),
    (["--from_hf={src}", "--to_hf={t}/x", "--ckpt={src}"], ["--from_hf=HF_DIR"]),
    (["--from_hf={src}", "--to_hf={t}/x", "--method=drop"], ["--method=drop", "convert.py --from_hf"]),
    (["--from_hf={src}", "--to_hf={t}/x", "--router_init=hidden", "--domains=a,b"], ["--router_init"]),
    (["--ckpt={src}", "--out_dir={t}/x", "--dtype=bfloat16"], ["--dtype", "--from_hf/--to_hf"]),
    (["--from_hf={src}", "--to_hf={src}"], ["already exists"]),
    (["--from_hf={t}/nothing", "--to_hf={t}/x"], ["not a directory"]),
    (["--from_hf={mixtral}", "--to_hf={t}/x"], ["MixtralForCausalLM", "already an MoE"]),
    (["--from_hf={src}", "--to_hf={t}/x", "--max_shard_size=lots"], ["--max_shard_size"]),
])
def test_refusals_are_one_line_and_write_nothing(tmp_path, capsys, argv, words):
    src, mixtral = str(tmp_path / "llama"), str(tmp_path / "mixtral")
    hf_llama(src)
    H.save(H.random_model(H.hf_config("mixtral")), mixtral)
    before = sorted(os.listdir(tmp_path))
    argv = [a.format(t=tmp_path, src=src, mixtral=mixtral) for a in argv]
    capsys.readouterr()   # (transformers' progress bars)
    assert U.main([*argv, *MOE]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    for w in words:
        assert w in err, (w, err)
    assert sorted(os.listdir(tmp_path)) == before
    assert json.load(open(os.path.join(src, "config.json")))["architectures"] == ["LlamaForCausalLM"]


def test_bench_mergekit_measures_the_streamed_rows(tmp_path, capsys):
    """bench_mergekit.py's own rows on the tiny shape (mergekit-moe itself needs its venv
    and the network, so it is never run here)."""
    import bench_mergekit
    out = str(tmp_path / "bench")
    assert bench_mergekit.main([f"--out={out}", "--shape=tiny", "--experts=4", "--threads=1"]) == 0
    rows = json.load(open(os.path.join(out, "convert_bench.json")))["rows"]
    assert [r["step"] for r in rows][1:] == ["this tree: upcycle.py --from_hf --to_hf, verify false",
                                            "this tree: upcycle.py --from_hf --to_hf, verify true"]
    assert all(r["output_gib"] >= 0 and r["peak_rss_gib"] > 0 for r in rows[1:])
    assert "peak RSS x output" in capsys.readouterr().out


def test_tied_model_with_a_different_lm_head_is_refused(tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    src = str(tmp_path / "llama")
    hf_llama(src, tied=True, shard_size=None)
    path = os.path.join(src, "model.safetensors")
    tensors = load_file(path)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 1
    save_file(tensors, path, metadata={"format": "pt"})
    capsys.readouterr()
    assert U.main([f"--from_hf={src}", f"--to_hf={tmp_path}/out", *MOE]) == 2
    assert "lm_head.weight differs from model.embed_tokens.weight" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")
