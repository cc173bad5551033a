"""
Hugging Face interop: import Llama-family checkpoints into this project's format,
export dense and MoE checkpoints to classes that `transformers` loads.

    python convert.py --from_hf=HF_DIR --out_dir=OUT_DIR    # -> OUT_DIR/ckpt.pt (+ tokenizer files and
                                                            #    generation_config.json: bos/eos ids)
    python convert.py --ckpt=CKPT_DIR --to_hf=HF_DIR        # -> config.json, model.safetensors,
                                                            #    generation_config.json

Import reads config.json and model.safetensors (or model-0000X-of-0000N.safetensors
with model.safetensors.index.json). Safetensors only: nothing is ever unpickled.
A key config.json leaves out is read as transformers reads it for that class
(HF_DEFAULTS). Export writes the model's bos/eos ids back (export_special_ids).
LlamaForCausalLM, MistralForCausalLM without sliding window and MixtralForCausalLM
are supported; anything this project cannot compute exactly is refused with one line.

Which Hugging Face class an export writes (each computes the same function):

    dense                                   LlamaForCausalLM
    topk_softmax, every layer MoE           MixtralForCausalLM (per-expert hub keys)
    topk_softmax / softmax_topk, any layers Qwen2MoeForCausalLM (norm_topk_prob True / False,
                                            mlp_only_layers, a zero-width shared expert)
    sigmoid (+ shared experts), MoE layers  Glm4MoeForCausalLM (n_group 1, routed_scaling_factor 1,
    k..L-1                                  first_k_dense_replace k, partial_rotary_factor 1)
    topk_softmax + shared experts, every    GraniteMoeSharedForCausalLM (multipliers 1, attention
    layer MoE                               multiplier 1/sqrt(head_dim))

Weight layout (both sides are read in model.py and transformers' modeling_llama.py):
- RoPE: model.apply_rope rotates (first half, second half) pairs, as transformers'
  `rotate_half` does, so q_proj/k_proj rows map one-to-one. (Meta's original
  consolidated.pth files use interleaved pairs; transformers' convert_llama_weights_to_hf
  permutes q/k into the half layout once, so every HF checkpoint is in that layout.)
- GQA: q_proj rows are head-major (head h = rows h*hd..(h+1)*hd), k/v likewise over the
  kv heads, and query head h reads kv head h // (n_head / n_kv_head): model.Attention's
  repeat_interleave and transformers' repeat_kv agree.
- Linear weights are (out, in) on both sides; experts: project gate_proj[e] (h, d) =
  Mixtral w1, up_proj[e] = w3, down_proj[e] (d, h) = w2; transformers 5's fused
  experts.gate_up_proj (E, 2h, d) = cat(gate_proj, up_proj, dim=1).
- Tied embeddings: one tensor, model.embed_tokens.weight; lm_head.weight is absent
  (or a copy) in the file.
"""
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import asdict

import torch

from checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from configurator import ArgumentParser, run_cli
from data.tokenizer import HF_TOKENIZER_FILES as TOKENIZER_FILES, HFTokenizer, find_tokenizer_dir
from model import GPT, GPTConfig

IMPORTABLE = ("LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM")
GENERATION_CONFIG = "generation_config.json"   # travels with the tokenizer files (data/tokenizer.py)
SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
# What transformers assumes for a key that config.json leaves out: the defaults of its
# LlamaConfig / MistralConfig / MixtralConfig (read from transformers 5). They differ by
# class (Mixtral's rope_theta is 1e6, Mistral's window 4096), so a missing key is read
# the way transformers reads that class, never with one project-wide default.
# num_key_value_heads None: as many kv heads as query heads.
HF_DEFAULTS = {
    "LlamaForCausalLM": dict(rope_theta=10000.0, rms_norm_eps=1e-6, num_key_value_heads=None, sliding_window=None),
    "MistralForCausalLM": dict(rope_theta=10000.0, rms_norm_eps=1e-6, num_key_value_heads=8, sliding_window=4096),
    "MixtralForCausalLM": dict(rope_theta=1e6, rms_norm_eps=1e-5, num_key_value_heads=8, sliding_window=None),
}


class ConvertError(Exception):
    """Bad input for a conversion: the message is one line naming the key and the reason."""


# ============================================================================ reading HF files

def read_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConvertError(f"{path} is missing: {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path} is not valid JSON ({e})") from None


def safetensors_files(hf_dir):
    """The safetensors files of an HF directory: the shards an index names, or
    model.safetensors. A pickle-based checkpoint is refused, never opened."""
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = read_json(index, "the shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConvertError(f"{index} has no 'weight_map': a damaged shard index")
        files = sorted(set(weight_map.values()))
        for f in files:
            if os.path.basename(f) != f or not f.endswith(".safetensors"):
                raise ConvertError(f"{index} names the shard {f!r}: only .safetensors files in {hf_dir} are read")
        return [os.path.join(hf_dir, f) for f in files]
    single = os.path.join(hf_dir, "model.safetensors")
    if os.path.exists(single):
        return [single]
    pickles = [f for f in sorted(os.listdir(hf_dir)) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    if pickles:
        raise ConvertError(f"{hf_dir} holds {pickles[0]}, a pickle-based checkpoint, and no model.safetensors: "
                           f"this converter reads safetensors only (it never unpickles); re-save it with "
                           f"save_pretrained(safe_serialization=True)")
    raise ConvertError(f"{hf_dir} has no model.safetensors (nor model.safetensors.index.json with shards)")


def read_tensors(hf_dir):
    """{HF key: tensor} from every safetensors file; one-line errors for unreadable files."""
    from safetensors import safe_open
    tensors = {}
    for path in safetensors_files(hf_dir):
        if not os.path.exists(path):
            raise ConvertError(f"{path} is missing (named by model.safetensors.index.json)")
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except Exception as e:   # header too large / truncated / not safetensors
            raise ConvertError(f"{path} is not a readable safetensors file ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    return tensors


# ============================================================================ HF config -> GPTConfig

def rope_settings(cfg, default_theta):
    """(rope_theta, GPTConfig rope-scaling fields) from a transformers 4 config.json
    (rope_theta, rope_scaling) or a transformers 5 one (rope_parameters)."""
    params = cfg.get("rope_parameters") or {}
    key = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"   # named in the errors
    scaling = cfg.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    theta = params.get("rope_theta", cfg.get("rope_theta", default_theta))
    if params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConvertError("partial_rotary_factor != 1 is not supported: model.py rotates the whole head")
    if not scaling or scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        return float(theta), {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "llama3":
        raise ConvertError(f"{key} type {kind!r} is not supported: model.py implements 'llama3' only")
    try:
        return float(theta), dict(rope_scaling="llama3", rope_factor=float(scaling["factor"]),
                                  rope_low_freq_factor=float(scaling["low_freq_factor"]),
                                  rope_high_freq_factor=float(scaling["high_freq_factor"]),
                                  rope_original_max_pos=int(scaling["original_max_position_embeddings"]))
    except KeyError as e:
        raise ConvertError(f"{key} of type 'llama3' lacks {e.args[0]!r}") from None


def refuse_unsupported(cfg, arch):
    """One-line errors for the features model.py does not compute."""
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise ConvertError(f"{key}=true is not supported: model.py has no biases")
    if cfg.get("hidden_act", "silu") not in ("silu", "swish"):   # transformers' ACT2FN: swish is silu
        raise ConvertError(f"hidden_act={cfg['hidden_act']!r} is not supported: model.py's FFN is SwiGLU (silu)")
    window = cfg.get("sliding_window", HF_DEFAULTS[arch]["sliding_window"])
    if window is not None and window < cfg.get("max_position_embeddings", 0):   # a window that binds
        raise ConvertError(f"sliding_window={window}{'' if 'sliding_window' in cfg else ' (' + arch + ' default)'} "
                           f"is shorter than max_position_embeddings={cfg.get('max_position_embeddings')}: "
                           f"not supported, model.py attends to the whole causal context (set sliding_window "
                           f"to null only if the model never used it)")
    if cfg.get("pretraining_tp", 1) != 1:
        raise ConvertError(f"pretraining_tp={cfg['pretraining_tp']} is not supported (only 1)")
    if arch == "MixtralForCausalLM" and cfg.get("router_jitter_noise", 0.0):
        raise ConvertError(f"router_jitter_noise={cfg['router_jitter_noise']} is not supported: "
                           f"the project's routers have no jitter")
    d, H = cfg["hidden_size"], cfg["num_attention_heads"]
    if cfg.get("head_dim") not in (None, d // H) or d % H:
        raise ConvertError(f"head_dim={cfg.get('head_dim')} with hidden_size={d} and num_attention_heads={H}: "
                           f"model.py needs head_dim = hidden_size / num_attention_heads")


def integer(cfg, key, default=KeyError):
    """config.json's cfg[key], an int. When a default is given: that when the key is
    absent, and None for an explicit null (num_key_value_heads: null means as many as
    the query heads, in every class). Else a missing key raises KeyError (named by the
    caller); a value of another type is one line naming it."""
    if default is not KeyError and cfg.get(key) is None:
        return default if key not in cfg else None
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConvertError(f"config.json: {key}={v!r} must be an integer")
    return v


def number(cfg, key, default):
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConvertError(f"config.json: {key}={v!r} must be a number")
    return float(v)


def model_args_from_hf(cfg):
    """GPTConfig fields of an HF config.json (dict). ConvertError when unsupported."""
    archs = cfg.get("architectures") or [None]
    arch = archs[0]
    if arch not in IMPORTABLE:
        raise ConvertError(f"architectures={archs}: not supported; importable: {', '.join(IMPORTABLE)}")
    try:
        refuse_unsupported(cfg, arch)
        default = HF_DEFAULTS[arch]
        theta, scaling = rope_settings(cfg, default["rope_theta"])
        n_head = integer(cfg, "num_attention_heads")
        args = dict(block_size=integer(cfg, "max_position_embeddings"), vocab_size=integer(cfg, "vocab_size"),
                    n_layer=integer(cfg, "num_hidden_layers"), n_head=n_head,
                    n_kv_head=integer(cfg, "num_key_value_heads", default["num_key_value_heads"]) or n_head,
                    n_embd=integer(cfg, "hidden_size"), ffn_hidden=integer(cfg, "intermediate_size"),
                    tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), rope_theta=theta,
                    norm_eps=number(cfg, "rms_norm_eps", default["rms_norm_eps"]), **scaling)
        if arch == "MixtralForCausalLM":
            args.update(moe_layers="all", n_experts=integer(cfg, "num_local_experts"),
                        top_k=integer(cfg, "num_experts_per_tok"), expert_hidden=args["ffn_hidden"],
                        router="topk_softmax")
    except KeyError as e:
        raise ConvertError(f"config.json lacks {e.args[0]!r}, which {arch} needs") from None
    try:
        GPTConfig(**args)
    except ValueError as e:
        raise ConvertError(f"config.json describes an impossible model here: {e}") from None
    return args


# ============================================================================ weights: HF <-> project

def hf_names(cfg):
    """{project key: HF key} for every tensor but the MoE layers' experts and routers.
    cfg: GPTConfig."""
    names = {"tok_emb.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    moe = set(cfg.moe_layer_ids())
    for l in range(cfg.n_layer):
        b, h = f"blocks.{l}.", f"model.layers.{l}."
        names[b + "attn_norm.weight"] = h + "input_layernorm.weight"
        names[b + "ffn_norm.weight"] = h + "post_attention_layernorm.weight"
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names[f"{b}attn.{p}.weight"] = f"{h}self_attn.{p}.weight"
        if l not in moe:
            for p in ("gate_proj", "up_proj", "down_proj"):
                names[f"{b}ffn.{p}.weight"] = f"{h}mlp.{p}.weight"
    return names


def take(tensors, key, shape):
    """Pop tensors[key] as fp32 after checking its shape; one-line error naming the key."""
    if key not in tensors:
        raise ConvertError(f"tensor {key} is missing from the checkpoint")
    t = tensors.pop(key)
    if tuple(t.shape) != tuple(shape):
        raise ConvertError(f"tensor {key} has shape {tuple(t.shape)}, but config.json implies {tuple(shape)}")
    return t.to(torch.float32)


def take_experts(tensors, l, E, h, d):
    """(gate_proj, up_proj, down_proj, router) stacks of Mixtral layer l, from the hub's
    per-expert keys (block_sparse_moe.experts.N.w1/w2/w3, block_sparse_moe.gate) or
    transformers 5's fused ones (mlp.experts.gate_up_proj (E, 2h, d), mlp.experts.down_proj, mlp.gate)."""
    p = f"model.layers.{l}."
    if p + "mlp.experts.gate_up_proj" in tensors:
        gate_up = take(tensors, p + "mlp.experts.gate_up_proj", (E, 2 * h, d))
        down = take(tensors, p + "mlp.experts.down_proj", (E, d, h))
        router = take(tensors, p + "mlp.gate.weight", (E, d))
        return gate_up[:, :h], gate_up[:, h:], down, router
    m = p + "block_sparse_moe."
    w1 = torch.stack([take(tensors, f"{m}experts.{e}.w1.weight", (h, d)) for e in range(E)])
    w3 = torch.stack([take(tensors, f"{m}experts.{e}.w3.weight", (h, d)) for e in range(E)])
    w2 = torch.stack([take(tensors, f"{m}experts.{e}.w2.weight", (d, h)) for e in range(E)])
    return w1, w3, w2, take(tensors, m + "gate.weight", (E, d))


def state_from_hf(tensors, cfg):
    """Project state_dict of GPT(cfg) from an HF {key: tensor}; refuses missing,
    mis-shaped and unexpected tensors."""
    tensors = dict(tensors)
    with torch.device("meta"):   # shapes only: no memory
        ref = GPT(cfg)
    shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    state = {k: take(tensors, hf, shapes[k]) for k, hf in hf_names(cfg).items()}
    if cfg.tie_embeddings:
        lm = tensors.pop("lm_head.weight", None)
        if lm is not None and not torch.equal(lm.float(), state["tok_emb.weight"]):
            raise ConvertError("tie_word_embeddings=true but lm_head.weight differs from model.embed_tokens.weight")
        state["lm_head.weight"] = state["tok_emb.weight"]
    for l in cfg.moe_layer_ids():
        w1, w3, w2, router = take_experts(tensors, l, cfg.n_experts, cfg.expert_hidden, cfg.n_embd)
        b = f"blocks.{l}.ffn."
        state.update({b + "gate_proj": w1.contiguous(), b + "up_proj": w3.contiguous(),
                      b + "down_proj": w2.contiguous(), b + "router.weight": router})
    leftover = sorted(k for k in tensors if not k.endswith("rotary_emb.inv_freq"))   # old files kept the buffer
    if leftover:
        raise ConvertError(f"unexpected tensor {leftover[0]} ({len(leftover)} in all): it has no place in the "
                           f"model config.json describes")
    return state


# ============================================================================ import

def import_hf(hf_dir, out_dir):
    """HF directory -> out_dir/ckpt.pt (+ the tokenizer files, copied verbatim).
    Everything is written into a temporary sibling directory that is renamed to
    out_dir at the end, so a failure leaves nothing behind. Returns the ckpt path."""
    if not os.path.isdir(hf_dir):
        raise ConvertError(f"--from_hf={hf_dir} is not a directory")
    check_new_output(out_dir, "--out_dir")
    hf_cfg = read_json(os.path.join(hf_dir, "config.json"), "an HF model directory needs config.json")
    args = model_args_from_hf(hf_cfg)
    cfg = GPTConfig(**args)
    state = state_from_hf(read_tensors(hf_dir), cfg)
    model = GPT(cfg)
    model.load_state_dict(state)   # cannot fail: state_from_hf checked every key and shape
    ckpt = {"model_args": asdict(cfg), "model": model.state_dict(), "optimizer": None, "iter_num": 0,
            "best_val_loss": 1e9, "rng": None, "aux_coef": None, "upcycled_from": None,
            # no data_dir/dataset: eval.py and train.py need --data_dir with this model's tokenizer
            "config": {"init_from": "hf", "hf_dir": os.path.abspath(hf_dir), "hf_architecture": hf_cfg["architectures"][0]}}

    def write(tmp):
        save_checkpoint(ckpt, tmp)
        for name in TOKENIZER_FILES:
            if os.path.exists(os.path.join(hf_dir, name)):
                shutil.copyfile(os.path.join(hf_dir, name), os.path.join(tmp, name))
        ids = special_ids(hf_cfg)
        if ids and not os.path.exists(os.path.join(hf_dir, GENERATION_CONFIG)):   # transformers derives it so
            with open(os.path.join(tmp, GENERATION_CONFIG), "w") as f:
                json.dump(ids, f, indent=2)
    write_atomically(out_dir, write)
    return os.path.join(out_dir, "ckpt.pt")


def special_ids(cfg):
    """{bos_token_id, eos_token_id, pad_token_id: value} of an HF config or generation
    config dict, for the keys it sets (eos may be a list: generation stops at any)."""
    return {k: cfg[k] for k in SPECIAL_IDS if cfg.get(k) is not None}


def check_new_output(path, flag):
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise ConvertError(f"{flag}={path} already exists and is not an empty directory; choose a new path "
                           f"(nothing is ever overwritten)")


def write_atomically(out_dir, write):
    """write(tmp_dir) into a fresh sibling temp dir, then rename it to out_dir."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.tmp-", dir=parent)
    try:
        write(tmp)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)    # empty (check_new_output)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ============================================================================ export

def export_target(cfg, state):
    """Which transformers class computes what GPT(cfg) computes: 'llama', 'mixtral',
    'qwen2_moe' or 'glm4_moe'; ConvertError (one line, why) when none does."""
    moe = cfg.moe_layer_ids()
    if not moe:
        return "llama"
    if cfg.router in ("lory", "expert_choice"):
        why = ("Lory merges experts in parameter space per segment" if cfg.router == "lory" else
               "expert choice lets every expert pick its tokens across the batch (not causal)")
        raise ConvertError(f"router={cfg.router!r}: no Hugging Face class computes this ({why})")
    if cfg.gate_norm_lambda is not None:
        raise ConvertError("gate_norm_lambda (Skywork gating logit normalisation) is set: no Hugging Face "
                           "class normalises the router logits before the softmax")
    if cfg.router_noise:
        raise ConvertError("router_noise=True: no Hugging Face class has noisy top-k weights (noise_weight)")
    if cfg.eval_capacity_factor > 0:
        raise ConvertError(f"eval_capacity_factor={cfg.eval_capacity_factor} drops tokens at inference: "
                           f"Hugging Face MoE classes are dropless (set it to 0 to export)")
    if cfg.router == "sigmoid":
        k = moe[0]
        if moe != list(range(k, cfg.n_layer)):
            raise ConvertError(f"router='sigmoid' with MoE layers {moe}: Glm4MoeForCausalLM makes layers "
                               f"first_k_dense_replace..L-1 MoE, so the dense layers must come first")
        if cfg.n_experts < 2:
            raise ConvertError("router='sigmoid' with 1 expert: Glm4MoeForCausalLM's group scores need 2")
        return "glm4_moe"
    if cfg.n_shared_experts:
        if cfg.router == "topk_softmax" and len(moe) == cfg.n_layer:
            return "granitemoeshared"
        raise ConvertError(f"n_shared_experts={cfg.n_shared_experts} with router={cfg.router!r} and MoE layers "
                           f"{moe}: GraniteMoeShared (always-on shared expert) takes topk_softmax with every layer "
                           f"MoE only, and Qwen2-MoE gates its shared expert by a sigmoid")
    if cfg.router == "topk_softmax" and len(moe) == cfg.n_layer:
        return "mixtral"
    return "qwen2_moe"


def hf_config(cfg, target):
    """config.json for the target class (transformers 4 names: rope_theta, rope_scaling;
    transformers 5 reads them too)."""
    c = {"architectures": [{"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM",
                            "qwen2_moe": "Qwen2MoeForCausalLM", "glm4_moe": "Glm4MoeForCausalLM",
                            "granitemoeshared": "GraniteMoeSharedForCausalLM"}[target]],
         "model_type": target, "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd,
         "intermediate_size": cfg.ffn_hidden, "num_hidden_layers": cfg.n_layer,
         "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head,
         "head_dim": cfg.n_embd // cfg.n_head, "hidden_act": "silu",
         "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
         "tie_word_embeddings": cfg.tie_embeddings, "rope_theta": cfg.rope_theta, "rope_scaling": None,
         "attention_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02,
         "use_cache": True, "torch_dtype": "float32"}
    if cfg.rope_scaling == "llama3":
        c["rope_scaling"] = {"rope_type": "llama3", "factor": cfg.rope_factor,
                             "low_freq_factor": cfg.rope_low_freq_factor,
                             "high_freq_factor": cfg.rope_high_freq_factor,
                             "original_max_position_embeddings": cfg.rope_original_max_pos}
    if target == "llama":
        c["mlp_bias"] = False
    elif target == "mixtral":
        c.update(num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k, sliding_window=None,
                 router_jitter_noise=0.0, output_router_logits=False)
        c["intermediate_size"] = cfg.expert_hidden
    elif target == "qwen2_moe":
        moe = cfg.moe_layer_ids()
        c.update(num_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k, moe_intermediate_size=cfg.expert_hidden,
                 shared_expert_intermediate_size=0, norm_topk_prob=cfg.router == "topk_softmax",
                 decoder_sparse_step=1, mlp_only_layers=[l for l in range(cfg.n_layer) if l not in moe],
                 qkv_bias=False, use_sliding_window=False, sliding_window=None, output_router_logits=False)
    elif target == "glm4_moe":
        c.update(n_routed_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k, moe_intermediate_size=cfg.expert_hidden,
                 n_shared_experts=cfg.n_shared_experts, n_group=1, topk_group=1, norm_topk_prob=True,
                 routed_scaling_factor=1.0, first_k_dense_replace=cfg.moe_layer_ids()[0], use_qk_norm=False,
                 partial_rotary_factor=1.0)
    elif target == "granitemoeshared":   # its multipliers set to what a Llama computes
        hd = cfg.n_embd // cfg.n_head
        c.update(num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k, intermediate_size=cfg.expert_hidden,
                 shared_intermediate_size=cfg.n_shared_experts * cfg.expert_hidden, embedding_multiplier=1.0,
                 logits_scaling=1.0, residual_multiplier=1.0, attention_multiplier=1.0 / math.sqrt(hd))
    return c


def hf_state(state, cfg, target):
    """{HF key: tensor} of a project state_dict, in the hub's per-expert layout."""
    out = {hf: state[k] for k, hf in hf_names(cfg).items()}
    for l in cfg.moe_layer_ids():
        b, p = f"blocks.{l}.ffn.", f"model.layers.{l}."
        w1, w3, w2 = state[b + "gate_proj"], state[b + "up_proj"], state[b + "down_proj"]
        if target == "granitemoeshared":   # fused hub layout: input_linear = cat(W1, W3) rows
            m = p + "block_sparse_moe."
            out[m + "router.layer.weight"] = state[b + "router.weight"]
            out[m + "input_linear.weight"] = torch.cat([w1, w3], dim=1)
            out[m + "output_linear.weight"] = w2
            out[p + "shared_mlp.input_linear.weight"] = torch.cat(
                [state[b + "shared.gate_proj.weight"], state[b + "shared.up_proj.weight"]], dim=0)
            out[p + "shared_mlp.output_linear.weight"] = state[b + "shared.down_proj.weight"]
            continue
        if target == "mixtral":
            out[p + "block_sparse_moe.gate.weight"] = state[b + "router.weight"]
            for e in range(cfg.n_experts):
                m = f"{p}block_sparse_moe.experts.{e}."
                out[m + "w1.weight"], out[m + "w3.weight"], out[m + "w2.weight"] = w1[e], w3[e], w2[e]
            continue
        out[p + "mlp.gate.weight"] = state[b + "router.weight"]
        for e in range(cfg.n_experts):
            m = f"{p}mlp.experts.{e}."
            out[m + "gate_proj.weight"], out[m + "up_proj.weight"], out[m + "down_proj.weight"] = w1[e], w3[e], w2[e]
        if target == "qwen2_moe":   # the class always has a sigmoid-gated shared expert: give it width 0
            d = cfg.n_embd
            out[p + "mlp.shared_expert.gate_proj.weight"] = torch.zeros(0, d)
            out[p + "mlp.shared_expert.up_proj.weight"] = torch.zeros(0, d)
            out[p + "mlp.shared_expert.down_proj.weight"] = torch.zeros(d, 0)
            out[p + "mlp.shared_expert_gate.weight"] = torch.zeros(1, d)
        else:   # glm4_moe: ungated shared experts of width n_shared * h, the selection bias
            out[p + "mlp.gate.e_score_correction_bias"] = state[b + "router.expert_bias"]
            for name in ("gate_proj", "up_proj", "down_proj"):
                shared = state.get(f"{b}shared.{name}.weight")
                if shared is None:
                    shared = torch.zeros((0, cfg.n_embd) if name != "down_proj" else (cfg.n_embd, 0))
                out[f"{p}mlp.shared_experts.{name}.weight"] = shared
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}


def export_hf(ckpt_dir, hf_dir):
    """Project checkpoint -> hf_dir with config.json, model.safetensors, generation_config.json
    (+ the tokenizer files found next to the checkpoint). Atomic like import_hf."""
    from safetensors.torch import save_file
    check_new_output(hf_dir, "--to_hf")
    try:
        ckpt = load_checkpoint(ckpt_dir)
        cfg = GPTConfig.from_dict(ckpt["model_args"])
    except (CheckpointError, ValueError) as e:
        raise ConvertError(str(e)) from None
    state = ckpt["model"]
    target = export_target(cfg, state)
    want = GPT_state_shapes(cfg)
    missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing:
        raise ConvertError(f"the checkpoint lacks tensor {missing[0]}: damaged or from another model")
    if extra:
        raise ConvertError(f"the checkpoint has tensor {extra[0]}, which its model_args have no place for: "
                           f"damaged or from another model")
    wrong = [k for k in want if tuple(state[k].shape) != want[k]]
    if wrong:
        raise ConvertError(f"tensor {wrong[0]} has shape {tuple(state[wrong[0]].shape)}, model_args say "
                           f"{want[wrong[0]]}: damaged or from another model")
    tensors = hf_state(state, cfg, target)
    src = tokenizer_dir(ckpt, ckpt_dir)
    ids = export_special_ids(src)
    config = {**hf_config(cfg, target), **ids}

    def write(tmp):
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        with open(os.path.join(tmp, GENERATION_CONFIG), "w") as f:   # replaced by the model's own, if any
            json.dump({"do_sample": False, **{k: v for k, v in ids.items() if v is not None}}, f, indent=2)
        for name in TOKENIZER_FILES:
            if src and os.path.exists(os.path.join(src, name)):
                shutil.copyfile(os.path.join(src, name), os.path.join(tmp, name))
    write_atomically(hf_dir, write)
    return target


def export_special_ids(src):
    """bos/eos/pad ids for an exported config.json: those of the model's own generation
    config (imported with it, carried with its tokenizer), else the tokenizer's bos and
    end-of-text tokens, else None written out, so that transformers does not fill in its
    classes' defaults (bos 1, eos 2: ordinary tokens of most vocabularies)."""
    ids = dict.fromkeys(SPECIAL_IDS[:2])
    if src and os.path.exists(os.path.join(src, GENERATION_CONFIG)):
        ids.update(special_ids(read_json(os.path.join(src, GENERATION_CONFIG), "the model's generation defaults")))
    elif src:
        try:
            tok = HFTokenizer(src)
        except ValueError as e:   # a damaged tokenizer.json
            raise ConvertError(str(e)) from None
        ids.update(bos_token_id=tok.bos_token, eos_token_id=tok.eot_token)
    return ids


def tokenizer_dir(ckpt, ckpt_dir):
    """Where the HF tokenizer files of a checkpoint are: next to it, else next to the
    dense checkpoint it was upcycled from, the run it started from, or the HF directory
    it was imported from (upcycle.py keeps the dense "config"). None when there are none."""
    return find_tokenizer_dir(ckpt, ckpt_dir)


def GPT_state_shapes(cfg):
    """{key: shape} of GPT(cfg)'s state dict (built on the meta device: no memory)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in GPT(cfg).state_dict().items()}


# ============================================================================ CLI

def build_parser():
    p = ArgumentParser(prog="convert.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--from_hf", help="HF model directory to import")
    p.add_argument("--out_dir", help="with --from_hf: new directory for ckpt.pt")
    p.add_argument("--ckpt", help="project checkpoint (out_dir or .pt) to export")
    p.add_argument("--to_hf", help="with --ckpt: new directory for the HF files")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.from_hf and args.out_dir and not (args.ckpt or args.to_hf):
        path = import_hf(args.from_hf, args.out_dir)
        print(f"wrote {path}")
    elif args.ckpt and args.to_hf and not (args.from_hf or args.out_dir):
        target = export_hf(args.ckpt, args.to_hf)
        print(f"wrote {args.to_hf} ({target})")
    else:
        p.error("use --from_hf=HF_DIR --out_dir=OUT_DIR, or --ckpt=CKPT_DIR --to_hf=HF_DIR")
    return 0


def cli(argv=None):
    """main() with the CLI's error handling (cli.run_cli): a ConvertError, or an OSError
    such as a full disk while writing, is one line on stderr and exit status 2."""
    return run_cli(main, argv, user_errors=(ConvertError,))


if __name__ == "__main__":
    sys.exit(cli())
