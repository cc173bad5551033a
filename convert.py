"""
Hugging Face interop: import Llama-family checkpoints into this project's format,
export dense and MoE checkpoints to classes that `transformers` loads.

    python convert.py --from_hf=HF_DIR --out_dir=OUT_DIR    # -> OUT_DIR/ckpt.pt (+ tokenizer files and
                                                            #    generation_config.json: bos/eos ids)
    python convert.py --ckpt=CKPT_DIR --to_hf=HF_DIR        # -> config.json, model.safetensors (or shards
                                                            #    + index), generation_config.json
    --dtype=auto|bfloat16|float16|float32   weights written (auto: the HF files' / the checkpoint's)
    --max_shard_size=50GB                   export: largest safetensors file (transformers' default)

Import reads config.json and model.safetensors (or model-0000X-of-0000N.safetensors
with model.safetensors.index.json). Safetensors only: nothing is ever unpickled.
config.json and the index are checked as a schema first (check_hf_config: types,
ranges, heads dividing hidden_size, a memory bound), then the tensors' headers
(floating dtypes only), then each tensor as it is read (finite). A key config.json
leaves out is read as transformers reads it for that class (HF_DEFAULTS). Export
writes the model's bos/eos ids back (export_special_ids).
LlamaForCausalLM, MistralForCausalLM without sliding window and MixtralForCausalLM
are supported; anything this project cannot compute exactly is refused with one line.

Memory: both directions stream. Import reads tensor by tensor from safetensors'
memory-mapped files into the state dict (no model is built); export memory-maps the
checkpoint (torch.load mmap) and writes the safetensors files itself, tensor by
tensor, so that the peak is about one copy of the weights in the output dtype.
Output is written into a temp directory renamed at the end: a failure (disk full
included) is one line and leaves nothing.

Which Hugging Face class an export writes (each computes the same function):

    dense                                   LlamaForCausalLM
    topk_softmax, every layer MoE           MixtralForCausalLM (per-expert hub keys)
    topk_softmax / softmax_topk, any layers Qwen2MoeForCausalLM (norm_topk_prob True / False,
    (+ shared experts)                      mlp_only_layers; shared experts behind a zero gate
                                            weight with down_proj 2 W2, else a zero-width one)
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
import struct
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import asdict

import torch

from checkpoint import CheckpointError, first_nonfinite, load_checkpoint, save_checkpoint
from configurator import ArgumentParser, float_problem, ram_available, run_cli
from data.tokenizer import HF_TOKENIZER_FILES as TOKENIZER_FILES, HFTokenizer, find_tokenizer_dir
from model import GPT, GPTConfig
from outdir import write_problem

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

# config.json's integer keys (positive, at most MAX_DIM: no real dimension is larger, and a
# bound keeps arithmetic on them in int64); null is allowed for the optional ones
REQUIRED_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "max_position_embeddings")
OPTIONAL_INTS = ("num_key_value_heads", "head_dim", "sliding_window", "pretraining_tp")
MIXTRAL_INTS = ("num_local_experts", "num_experts_per_tok")
FLAGS = ("tie_word_embeddings", "attention_bias", "mlp_bias")
MAX_DIM = 2**31 - 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}   # header name -> dtype
MAX_SHARD_SIZE = "50GB"   # save_pretrained's default in transformers 5 (a test compares it with the installed one)


class ConvertError(Exception):
    """Bad input for a conversion: the message is one line naming the key and the reason."""


# ============================================================================ config.json as a schema

def shown(value):
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def bad_key(where, key, value, want):
    """The one line for a config.json (or index) value of the wrong type or range."""
    return ConvertError(f"{where}: {key}={shown(value)} {want}")


def check_int(where, key, value, optional=False):
    """A positive int no larger than MAX_DIM (null too when optional)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_DIM:
        raise bad_key(where, key, value, f"must be an integer in [1, {MAX_DIM}]{' or null' if optional else ''}")


def check_number(where, key, value, kind=None):
    """A finite number; in configurator.FLOAT_RANGES[kind] when kind is given (rope_theta (1, inf),
    norm_eps (0, 1)), the ranges train.py holds the same settings to."""
    if kind:
        problem = float_problem(key, value, kind)
        if problem:
            raise ConvertError(f"{where}: {problem}")
    elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad_key(where, key, value, "must be a finite number")


def check_rope_dict(where, key, rope):
    """rope_scaling (transformers 4) / rope_parameters (transformers 5): null or an object
    whose type is a string, theta in range, llama3 factors finite and positive."""
    if rope is None:
        return
    if not isinstance(rope, dict):
        raise bad_key(where, key, rope, 'must be null or an object such as {"rope_type": "llama3", "factor": 8.0, ...}')
    for name in ("rope_type", "type"):
        if name in rope and not isinstance(rope[name], str):
            raise bad_key(where, f"{key}.{name}", rope[name], "must be a string such as 'default' or 'llama3'")
    if "rope_theta" in rope:
        check_number(where, f"{key}.rope_theta", rope["rope_theta"], "rope_theta")
    for name in ("factor", "low_freq_factor", "high_freq_factor", "partial_rotary_factor"):
        if name in rope:
            check_number(where, f"{key}.{name}", rope[name])
            if rope[name] <= 0:
                raise bad_key(where, f"{key}.{name}", rope[name], "must be > 0")
    if "original_max_position_embeddings" in rope:
        check_int(where, f"{key}.original_max_position_embeddings", rope["original_max_position_embeddings"])


def check_token_ids(where, cfg):
    """bos/eos/pad ids: null, a token id, or a list of ids (eos: generation stops at any)."""
    for key in SPECIAL_IDS:
        v = cfg.get(key)
        ids = v if isinstance(v, list) else [v]
        if v is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise bad_key(where, key, v, "must be null, a token id (an integer >= 0) or a list of them")


def check_hf_config(cfg, where):
    """config.json checked as a schema before anything reads it: an object; architectures
    a list of class names; every size a positive int; flags booleans; theta, eps and the
    rope objects finite and in range; heads dividing hidden_size. One line naming the
    file, the key, the value and what it must be. Returns the architecture."""
    if not isinstance(cfg, dict):
        kind = {list: "array", str: "string", type(None): "null", bool: "boolean"}.get(type(cfg), "number")
        raise ConvertError(f"{where} holds a JSON {kind} ({shown(cfg)}), not an object: not an HF config.json")
    archs = cfg.get("architectures")
    if not (isinstance(archs, list) and archs and all(isinstance(a, str) for a in archs)):
        raise bad_key(where, "architectures", archs, 'must be a list of class names such as ["LlamaForCausalLM"]')
    arch = archs[0]
    if arch not in IMPORTABLE:
        raise ConvertError(f"{where}: architectures={archs}: not supported; importable: {', '.join(IMPORTABLE)}")
    for key in REQUIRED_INTS + (MIXTRAL_INTS if arch == "MixtralForCausalLM" else ()):
        if key not in cfg:
            raise ConvertError(f"{where} lacks {key!r}, which {arch} needs")
        check_int(where, key, cfg[key])
    for key in OPTIONAL_INTS:
        check_int(where, key, cfg.get(key), optional=True)
    for key in FLAGS:
        if not isinstance(cfg.get(key, False), bool):
            raise bad_key(where, key, cfg[key], "must be true or false")
    if not isinstance(cfg.get("hidden_act", "silu"), str):
        raise bad_key(where, "hidden_act", cfg["hidden_act"], "must be a string such as 'silu'")
    for key, kind in (("rope_theta", "rope_theta"), ("rms_norm_eps", "norm_eps"),
                      ("partial_rotary_factor", None), ("router_jitter_noise", None)):
        if key in cfg:
            check_number(where, key, cfg[key], kind)
    for key in ("rope_scaling", "rope_parameters"):
        check_rope_dict(where, key, cfg.get(key))
    check_token_ids(where, cfg)
    d, H, kv = cfg["hidden_size"], cfg["num_attention_heads"], kv_heads(cfg, arch)
    if d % H or H % kv:
        raise ConvertError(f"{where}: num_attention_heads={H} must divide hidden_size={d}, and "
                           f"num_key_value_heads={kv} must divide num_attention_heads")
    if arch == "MixtralForCausalLM" and cfg["num_experts_per_tok"] > cfg["num_local_experts"]:
        raise bad_key(where, "num_experts_per_tok", cfg["num_experts_per_tok"],
                      f"must be at most num_local_experts={cfg['num_local_experts']}")
    return arch


def param_count(args):
    """Exact parameter count of GPT(GPTConfig(**args)) (tied embeddings counted once),
    from the numbers alone: nothing is allocated, so a config of 10**9 layers is
    refused in microseconds. Per layer: two RMSNorms, q and o (d x d), k and v
    (d x kv_heads * head_dim), and a SwiGLU FFN (3 d h) or E experts plus the router."""
    d, L, V = args["n_embd"], args["n_layer"], args["vocab_size"]
    kv = args["n_kv_head"] * (d // args["n_head"])
    per_layer = 2 * d + 2 * d * d + 2 * d * kv
    ffn = (args["n_experts"] * (3 * d * args["expert_hidden"] + d) if args.get("moe_layers") == "all"
           else 3 * d * args["ffn_hidden"])
    return V * d * (1 if args["tie_embeddings"] else 2) + d + L * (per_layer + ffn)


def check_memory(args, dtype, where):
    """Refuse, before anything is allocated, a model whose weights in `dtype` and rotary
    tables (cos and sin, (block_size, head_dim / 2) fp32 each, built by every GPT) do
    not fit the RAM this machine has free (configurator.ram_available; skipped where unknown)."""
    have = ram_available()
    weights = param_count(args) * torch.tensor([], dtype=dtype).element_size()
    rope = 4 * args["block_size"] * (args["n_embd"] // args["n_head"])
    if have is not None and weights + rope > have:
        gib = lambda n: f"{n / 2**30:,.1f} GiB"   # noqa: E731
        raise ConvertError(f"{where} describes a model of {param_count(args):,} parameters and "
                           f"{args['block_size']:,} positions: it needs at least {gib(weights + rope)} (weights in "
                           f"{dtype_name(dtype)} {gib(weights)}, rotary tables {gib(rope)}) but {gib(have)} of RAM "
                           f"is available (a damaged config.json, or a model for a larger machine)")


# ============================================================================ reading HF files

def read_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConvertError(f"{path} is missing: {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path} is not valid JSON ({e})") from None


def read_index(index, hf_dir):
    """The shard files model.safetensors.index.json names: an object whose weight_map maps
    tensor names (strings) to .safetensors file names in hf_dir (no paths)."""
    data = read_json(index, "the shard index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConvertError(f"{index}: weight_map={shown(weight_map)} must be a non-empty object "
                           f"{{tensor name: shard file}}: a damaged shard index")
    for key, f in weight_map.items():
        if not isinstance(f, str) or os.path.basename(f) != f or not f.endswith(".safetensors"):
            raise ConvertError(f"{index}: weight_map[{key!r}]={shown(f)} must name a .safetensors file in "
                               f"{hf_dir} (a file name, no path)")
    return [os.path.join(hf_dir, f) for f in sorted(set(weight_map.values()))]


def safetensors_files(hf_dir):
    """The safetensors files of an HF directory: the shards an index names, or
    model.safetensors. A pickle-based checkpoint is refused, never opened."""
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        return read_index(index, hf_dir)
    single = os.path.join(hf_dir, "model.safetensors")
    if os.path.exists(single):
        return [single]
    pickles = [f for f in sorted(os.listdir(hf_dir)) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    if pickles:
        raise ConvertError(f"{hf_dir} holds {pickles[0]}, a pickle-based checkpoint, and no model.safetensors: "
                           f"this converter reads safetensors only (it never unpickles); re-save it with "
                           f"save_pretrained(safe_serialization=True)")
    raise ConvertError(f"{hf_dir} has no model.safetensors (nor model.safetensors.index.json with shards)")


def unreadable(path, e):
    return ConvertError(f"{path} is not a readable safetensors file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''})")


def open_tensors(files):
    """{HF key: TensorRef} for every tensor of the files, from their headers alone (nothing
    is read yet). The headers are checked here: safetensors itself refuses an offset or
    byte length that does not match dtype x shape; this refuses a tensor that is not
    floating (F32, F16, BF16) and a name two files share."""
    from safetensors import safe_open
    refs = {}
    for path in files:
        if not os.path.exists(path):
            raise ConvertError(f"{path} is missing (named by model.safetensors.index.json)")
        try:
            with safe_open(path, framework="pt") as f:
                heads = {k: f.get_slice(k) for k in f.keys()}
                heads = {k: (s.get_dtype(), tuple(s.get_shape())) for k, s in heads.items()}
        except Exception as e:   # header too large / truncated / lying offsets / not safetensors
            raise unreadable(path, e) from None
        for key, (dtype, shape) in heads.items():
            if dtype not in SAFETENSORS_DTYPES:
                raise ConvertError(f"{path}: tensor {key} is stored as {dtype}: weights must be floating "
                                   f"(F32, F16 or BF16); a damaged or foreign file")
            if key in refs:
                raise ConvertError(f"{path}: tensor {key} is also in {refs[key].path}: a damaged shard set")
            refs[key] = TensorRef(path, key, SAFETENSORS_DTYPES[dtype], shape)
    return refs


class TensorRef:
    """One tensor of a safetensors file, not read yet: its file, name, dtype, shape."""

    def __init__(self, path, key, dtype, shape):
        self.path, self.key, self.dtype, self.shape = path, key, dtype, shape

    def read(self, dtype):
        """The tensor in `dtype`; one line naming it when it holds NaN or inf (in the file,
        or after a cast to float16 beyond its range). The file is memory-mapped for this
        read only: a mapping kept open would count every page read so far in the process's
        resident memory, the whole model by the last tensor."""
        from safetensors import safe_open
        try:
            with safe_open(self.path, framework="pt") as f:
                t = f.get_tensor(self.key)
        except Exception as e:
            raise unreadable(self.path, e) from None
        was_finite = first_nonfinite(t, self.key) is None
        t = t.to(dtype)
        if not was_finite or first_nonfinite(t, self.key):
            why = "holds NaN or inf" if not was_finite else f"overflows {dtype_name(dtype)} (values beyond its range)"
            raise ConvertError(f"{self.path}: tensor {self.key} {why}: refusing to import it")
        return t


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


def kv_heads(cfg, arch):
    """num_key_value_heads as transformers reads it: the class default when absent, and
    null meaning as many as the query heads (in every class)."""
    kv = cfg["num_key_value_heads"] if "num_key_value_heads" in cfg else HF_DEFAULTS[arch]["num_key_value_heads"]
    return kv or cfg["num_attention_heads"]


def model_args_from_hf(cfg, where="config.json"):
    """GPTConfig fields of an HF config.json (dict), checked as a schema first
    (check_hf_config). ConvertError (one line) when invalid or unsupported."""
    arch = check_hf_config(cfg, where)
    default = HF_DEFAULTS[arch]
    try:
        refuse_unsupported(cfg, arch)
        theta, scaling = rope_settings(cfg, default["rope_theta"])
    except ConvertError as e:
        raise ConvertError(f"{where}: {e}") from None
    args = dict(block_size=cfg["max_position_embeddings"], vocab_size=cfg["vocab_size"],
                n_layer=cfg["num_hidden_layers"], n_head=cfg["num_attention_heads"], n_kv_head=kv_heads(cfg, arch),
                n_embd=cfg["hidden_size"], ffn_hidden=cfg["intermediate_size"],
                tie_embeddings=cfg.get("tie_word_embeddings", False), rope_theta=theta,
                norm_eps=float(cfg.get("rms_norm_eps", default["rms_norm_eps"])), **scaling)
    if arch == "MixtralForCausalLM":
        args.update(moe_layers="all", n_experts=cfg["num_local_experts"], top_k=cfg["num_experts_per_tok"],
                    expert_hidden=args["ffn_hidden"], router="topk_softmax")
    try:
        GPTConfig(**args)
    except ValueError as e:
        raise ConvertError(f"{where} describes an impossible model here: {e}") from None
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


def take(tensors, key, shape, dtype):
    """Read tensors[key] (a TensorRef) in `dtype`, after checking the shape its header
    gives; one-line error naming the key."""
    if key not in tensors:
        raise ConvertError(f"tensor {key} is missing from the checkpoint")
    ref = tensors[key]
    if ref.shape != tuple(shape):
        raise ConvertError(f"tensor {key} has shape {ref.shape}, but config.json implies {tuple(shape)}")
    return ref.read(dtype)


def stack(tensors, keys, shape, dtype):
    """torch.stack of the tensors `keys` name, written into one preallocated tensor
    (E, *shape) so that only one expert's copy is held besides it."""
    out = torch.empty((len(keys), *shape), dtype=dtype)
    for e, key in enumerate(keys):
        out[e] = take(tensors, key, shape, dtype)
    return out


def take_experts(tensors, l, E, h, d, dtype):
    """(gate_proj, up_proj, down_proj, router) stacks of Mixtral layer l, from the hub's
    per-expert keys (block_sparse_moe.experts.N.w1/w2/w3, block_sparse_moe.gate) or
    transformers 5's fused ones (mlp.experts.gate_up_proj (E, 2h, d), mlp.experts.down_proj, mlp.gate)."""
    p = f"model.layers.{l}."
    if p + "mlp.experts.gate_up_proj" in tensors:
        gate_up = take(tensors, p + "mlp.experts.gate_up_proj", (E, 2 * h, d), dtype)
        down = take(tensors, p + "mlp.experts.down_proj", (E, d, h), dtype)
        router = take(tensors, p + "mlp.gate.weight", (E, d), dtype)
        return gate_up[:, :h].contiguous(), gate_up[:, h:].contiguous(), down, router
    m = p + "block_sparse_moe."
    w1 = stack(tensors, [f"{m}experts.{e}.w1.weight" for e in range(E)], (h, d), dtype)
    w3 = stack(tensors, [f"{m}experts.{e}.w3.weight" for e in range(E)], (h, d), dtype)
    w2 = stack(tensors, [f"{m}experts.{e}.w2.weight" for e in range(E)], (d, h), dtype)
    return w1, w3, w2, take(tensors, m + "gate.weight", (E, d), dtype)


def state_from_hf(tensors, cfg, dtype=torch.float32):
    """Project state_dict of GPT(cfg) in `dtype`, read tensor by tensor from an HF
    {key: TensorRef}; refuses missing, mis-shaped and unexpected tensors (before
    reading any: the names and shapes are in the headers)."""
    check_hf_names(tensors, cfg)
    shapes = GPT_state_shapes(cfg)
    state = {k: take(tensors, hf, shapes[k], dtype) for k, hf in hf_names(cfg).items()}
    if cfg.tie_embeddings:
        check_tied(tensors, state["tok_emb.weight"], dtype)
        state["lm_head.weight"] = state["tok_emb.weight"]
    for l in cfg.moe_layer_ids():
        w1, w3, w2, router = take_experts(tensors, l, cfg.n_experts, cfg.expert_hidden, cfg.n_embd, dtype)
        b = f"blocks.{l}.ffn."
        state.update({b + "gate_proj": w1, b + "up_proj": w3, b + "down_proj": w2, b + "router.weight": router})
    return state


def check_tied(tensors, embedding, dtype):
    """A tied model's file may still hold lm_head.weight: it must equal the embedding."""
    if "lm_head.weight" in tensors:
        if not torch.equal(take(tensors, "lm_head.weight", tuple(embedding.shape), dtype), embedding):
            raise ConvertError("tie_word_embeddings=true but lm_head.weight differs from model.embed_tokens.weight")


def check_hf_names(tensors, cfg):
    """Refuse a tensor that has no place in GPT(cfg) (one line, before any is read)."""
    leftover = set(tensors) - set(hf_names(cfg).values()) - set(expert_names(cfg, tensors))
    leftover = sorted(k for k in leftover if k != "lm_head.weight" and not k.endswith("rotary_emb.inv_freq"))
    if leftover:   # (old files kept the rotary buffer)
        raise ConvertError(f"unexpected tensor {leftover[0]} ({len(leftover)} in all): it has no place in the "
                           f"model config.json describes")


class HFState(Mapping):
    """GPT(cfg)'s state dict over an HF checkpoint's {HF key: TensorRef}, read as it is
    asked for: a key reads its tensor from the file in `dtype` (a MoE layer's key reads
    that layer's four stacks, kept until another layer is asked for). Read in layer order,
    it holds about one layer; state_from_hf is the eager equivalent."""

    def __init__(self, tensors, cfg, dtype):
        check_hf_names(tensors, cfg)
        self.tensors, self.cfg, self.dtype = tensors, cfg, dtype
        self.shapes, self.names = GPT_state_shapes(cfg), hf_names(cfg)
        if cfg.tie_embeddings:
            self.names["lm_head.weight"] = self.names["tok_emb.weight"]
            if "lm_head.weight" in tensors:   # a stored lm_head: read the embedding to compare them
                check_tied(tensors, self["tok_emb.weight"], dtype)
        self.moe_ids, self.layer = set(cfg.moe_layer_ids()), (None, {})

    def __getitem__(self, key):
        if key in self.names:
            return take(self.tensors, self.names[key], self.shapes[key], self.dtype)
        l = int(key.split(".")[1])   # blocks.{l}.ffn.{gate_proj, up_proj, down_proj, router.weight}
        if l not in self.moe_ids:
            raise KeyError(key)
        if self.layer[0] != l:
            names = ("gate_proj", "up_proj", "down_proj", "router.weight")
            stacks = take_experts(self.tensors, l, self.cfg.n_experts, self.cfg.expert_hidden, self.cfg.n_embd,
                                  self.dtype)
            self.layer = (l, dict(zip(names, stacks)))
        return self.layer[1][key.split(".", 3)[3]]

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self):
        return len(self.shapes)


def expert_names(cfg, tensors):
    """The HF keys of the MoE layers' experts and routers, in the layout the file uses."""
    names = []
    for l in cfg.moe_layer_ids():
        p = f"model.layers.{l}."
        if p + "mlp.experts.gate_up_proj" in tensors:
            names += [p + "mlp.experts.gate_up_proj", p + "mlp.experts.down_proj", p + "mlp.gate.weight"]
            continue
        names.append(p + "block_sparse_moe.gate.weight")
        names += [f"{p}block_sparse_moe.experts.{e}.{w}.weight" for e in range(cfg.n_experts) for w in ("w1", "w2", "w3")]
    return names


# ============================================================================ import

def import_hf(hf_dir, out_dir, dtype="auto"):
    """HF directory -> out_dir/ckpt.pt (+ the tokenizer files, copied verbatim), its
    weights in `dtype` (auto: the file's, see import_dtype). In order: config.json and
    the shard index as a schema, the safetensors headers (names, dtypes, shapes), the
    memory the model needs; then the tensors, read one by one from the memory-mapped
    files straight into the checkpoint's state dict (no model is built). Everything is
    written into a temporary sibling directory renamed to out_dir at the end, so a
    failure leaves nothing behind. Returns the ckpt path."""
    check_new_output(out_dir, "--out_dir")
    hf_cfg, args, refs, torch_dtype = open_hf(hf_dir, dtype)
    check_memory(args, torch_dtype, os.path.join(hf_dir, "config.json"))
    cfg = GPTConfig(**args)
    state = state_from_hf(refs, cfg, torch_dtype)
    ckpt = {"model_args": asdict(cfg), "model": state, "optimizer": None, "iter_num": 0,
            "best_val_loss": 1e9, "rng": None, "aux_coef": None, "upcycled_from": None, "dtype": dtype_name(torch_dtype),
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


def open_hf(hf_dir, dtype="auto"):
    """(config.json dict, GPTConfig fields, {HF key: TensorRef}, torch dtype to read in) of
    an HF directory, from its config and headers alone: config.json and the shard index
    checked as a schema, the safetensors headers checked (names, dtypes, shapes)."""
    if not os.path.isdir(hf_dir):
        raise ConvertError(f"--from_hf={hf_dir} is not a directory")
    config_path = os.path.join(hf_dir, "config.json")
    hf_cfg = read_json(config_path, "an HF model directory needs config.json")
    args = model_args_from_hf(hf_cfg, config_path)
    refs = open_tensors(safetensors_files(hf_dir))
    return hf_cfg, args, refs, import_dtype(refs, dtype)


def import_dtype(refs, dtype):
    """The torch dtype an import writes: `dtype` by name, or for auto the one dtype all
    the file's tensors share (float32 when they mix dtypes: exact for every one)."""
    if dtype != "auto":
        return DTYPES[dtype]
    found = {ref.dtype for ref in refs.values()}
    return found.pop() if len(found) == 1 else torch.float32


def dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def special_ids(cfg):
    """{bos_token_id, eos_token_id, pad_token_id: value} of an HF config or generation
    config dict, for the keys it sets (eos may be a list: generation stops at any)."""
    return {k: cfg[k] for k in SPECIAL_IDS if cfg.get(k) is not None}


def check_new_output(path, flag):
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise ConvertError(f"{flag}={path} already exists and is not an empty directory; choose a new path "
                           f"(nothing is ever overwritten)")


def write_atomically(out_dir, write):
    """write(tmp_dir) into a fresh sibling temp dir, then rename it to out_dir. Any
    failure, Ctrl-C included, removes the temp dir; a write error (disk full, read-only
    or unwritable directory) becomes one line, and out_dir stays as it was."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    tmp = None
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.tmp-", dir=parent)
        write(tmp)
        os.rename(tmp, out_dir)  # replaces an empty out_dir (check_new_output) in one step
    except OSError as e:
        raise ConvertError(write_problem(e, out_dir)) from None
    except CheckpointError as e:   # save_checkpoint's own one line for the same errors
        raise ConvertError(f"could not write {out_dir}: {e}") from None
    finally:
        if tmp and os.path.lexists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


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
    if cfg.router == "topk_softmax" and len(moe) == cfg.n_layer:
        return "granitemoeshared" if cfg.n_shared_experts else "mixtral"
    return "qwen2_moe"   # softmax_topk, or MoE on some layers; shared experts: see qwen2_moe_shared


def hf_config(cfg, target, dtype=torch.float32):
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
         "use_cache": True, "torch_dtype": dtype_name(dtype)}
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
                 shared_expert_intermediate_size=cfg.n_shared_experts * cfg.expert_hidden, norm_topk_prob=cfg.router == "topk_softmax",
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


def hf_tensors(state, cfg, target):
    """(HF key, tensor) pairs of a project state_dict in the hub's per-expert layout, one
    at a time: views of the state where the layouts agree, and a new tensor (a fused or
    scaled copy of one layer) only where they differ. On a state of meta tensors it
    yields the shapes alone."""
    for k, hf in hf_names(cfg).items():
        yield hf, state[k]
    for l in cfg.moe_layer_ids():
        b, p = f"blocks.{l}.ffn.", f"model.layers.{l}."
        w1, w3, w2, router = state[b + "gate_proj"], state[b + "up_proj"], state[b + "down_proj"], state[b + "router.weight"]
        if target == "granitemoeshared":   # fused hub layout: input_linear = cat(W1, W3) rows
            m = p + "block_sparse_moe."
            yield m + "router.layer.weight", router
            yield m + "input_linear.weight", torch.cat([w1, w3], dim=1)
            yield m + "output_linear.weight", w2
            yield p + "shared_mlp.input_linear.weight", torch.cat(
                [state[b + "shared.gate_proj.weight"], state[b + "shared.up_proj.weight"]], dim=0)
            yield p + "shared_mlp.output_linear.weight", state[b + "shared.down_proj.weight"]
            continue
        m = p + ("block_sparse_moe." if target == "mixtral" else "mlp.")
        yield m + "gate.weight", router
        names = ("w1", "w3", "w2") if target == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        for e in range(cfg.n_experts):
            for name, w in zip(names, (w1, w3, w2)):
                yield f"{m}experts.{e}.{name}.weight", w[e]
        if target == "qwen2_moe":
            yield from qwen2_moe_shared(state, b, p, cfg.n_embd, w1)
        elif target == "glm4_moe":   # ungated shared experts of width n_shared * h, the selection bias
            yield p + "mlp.gate.e_score_correction_bias", state[b + "router.expert_bias"]
            for name in ("gate_proj", "up_proj", "down_proj"):
                shared = state.get(f"{b}shared.{name}.weight")
                if shared is None:
                    shared = w1.new_zeros((0, cfg.n_embd) if name != "down_proj" else (cfg.n_embd, 0))
                yield f"{p}mlp.shared_experts.{name}.weight", shared


def qwen2_moe_shared(state, b, p, d, like):
    """Qwen2-MoE's shared expert of one layer. The class always has one, gated by
    sigmoid(shared_expert_gate(x)) (modeling_qwen2_moe.Qwen2MoeSparseMoeBlock), where
    this project adds its shared experts ungated: a zero gate weight gives sigmoid(0) =
    0.5 exactly and down_proj = 2 W2 gives back W2 h exactly (both powers of two, so no
    rounding). Without shared experts it gets width 0."""
    yield p + "mlp.shared_expert_gate.weight", like.new_zeros(1, d)
    if b + "shared.gate_proj.weight" not in state:
        yield p + "mlp.shared_expert.gate_proj.weight", like.new_zeros(0, d)
        yield p + "mlp.shared_expert.up_proj.weight", like.new_zeros(0, d)
        yield p + "mlp.shared_expert.down_proj.weight", like.new_zeros(d, 0)
        return
    yield p + "mlp.shared_expert.gate_proj.weight", state[b + "shared.gate_proj.weight"]
    yield p + "mlp.shared_expert.up_proj.weight", state[b + "shared.up_proj.weight"]
    yield p + "mlp.shared_expert.down_proj.weight", 2 * state[b + "shared.down_proj.weight"]


def export_hf(ckpt_dir, hf_dir, dtype="auto", max_shard_size=MAX_SHARD_SIZE):
    """Project checkpoint -> hf_dir with config.json, the weights in `dtype` (auto: the
    checkpoint's) as model.safetensors or, past max_shard_size, shards with
    model.safetensors.index.json, generation_config.json (+ the tokenizer files found
    next to the checkpoint). The checkpoint is memory-mapped and written tensor by
    tensor. Atomic like import_hf. Returns the target ('mixtral', ...)."""
    max_bytes = parse_size(max_shard_size)
    check_new_output(hf_dir, "--to_hf")
    try:
        ckpt = load_checkpoint(ckpt_dir, mmap=True)
        cfg = GPTConfig.from_dict(ckpt["model_args"])
    except (CheckpointError, ValueError) as e:
        raise ConvertError(str(e)) from None
    state = ckpt["model"]
    target = export_target(cfg, state)
    check_export_state(state, cfg)
    torch_dtype = DTYPES[dtype] if dtype != "auto" else checkpoint_dtype(ckpt)
    src = tokenizer_dir(ckpt, ckpt_dir)
    write_hf_dir(hf_dir, state, cfg, target, torch_dtype, max_bytes, src, export_special_ids(src))
    return target


def write_hf_dir(hf_dir, state, cfg, target, torch_dtype, max_bytes, tokenizer_src, ids):
    """hf_dir (new, written atomically): config.json for `target`, the weights of `state`
    (a state dict or a lazy mapping, read once in hf_tensors' order) in torch_dtype,
    generation_config.json with the special ids, then the tokenizer files of
    tokenizer_src (a model's own generation config among them replaces ours)."""
    meta = {k: torch.empty(shape, dtype=torch_dtype, device="meta") for k, shape in GPT_state_shapes(cfg).items()}
    shapes = {k: tuple(v.shape) for k, v in hf_tensors(meta, cfg, target)}
    config = {**hf_config(cfg, target, torch_dtype), **ids}

    def write(tmp):
        write_weights(tmp, shapes, torch_dtype, max_bytes, hf_tensors(state, cfg, target))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        with open(os.path.join(tmp, GENERATION_CONFIG), "w") as f:   # replaced by the model's own, if any
            json.dump({"do_sample": False, **{k: v for k, v in ids.items() if v is not None}}, f, indent=2)
        for name in TOKENIZER_FILES:
            if tokenizer_src and os.path.exists(os.path.join(tokenizer_src, name)):
                shutil.copyfile(os.path.join(tokenizer_src, name), os.path.join(tmp, name))
    write_atomically(hf_dir, write)


def check_export_state(state, cfg):
    """The state has exactly GPT(cfg)'s tensors and shapes: checked before writing,
    instead of an export that from_pretrained rejects later."""
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


def checkpoint_dtype(ckpt):
    """The dtype a checkpoint records, else the one its floating weights share (float32
    when they mix)."""
    if ckpt.get("dtype"):
        return DTYPES[ckpt["dtype"]]
    found = {v.dtype for v in ckpt["model"].values() if v.is_floating_point()}
    return found.pop() if len(found) == 1 else torch.float32


# ============================================================================ writing safetensors

def parse_size(size):
    """Bytes of a shard size written as transformers takes it: a number of bytes, or
    digits and a unit (KB, MB, GB: powers of 10; KiB, MiB, GiB: powers of 2)."""
    text = str(size).strip()
    for unit, scale in (("KIB", 2**10), ("MIB", 2**20), ("GIB", 2**30), ("KB", 10**3), ("MB", 10**6),
                        ("GB", 10**9), ("B", 1), ("", 1)):
        digits = text[:len(text) - len(unit)]
        if text.upper().endswith(unit) and digits.isdigit() and int(digits) > 0:
            return int(digits) * scale
    raise ConvertError(f"--max_shard_size={size!r} must be a positive size such as 5GB, 500MB, 2GiB or a "
                       f"number of bytes")


def shard_plan(shapes, itemsize, max_bytes):
    """[[HF key, ...] per file]: the tensors in order, a new file when the next one would
    pass max_bytes (a tensor larger than max_bytes gets a file of its own), as
    transformers' save_pretrained splits."""
    shards, size = [[]], 0
    for key, shape in shapes.items():
        n = math.prod(shape) * itemsize
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += n
    return shards


def safetensors_header(keys, shapes, dtype):
    """The header of a safetensors file holding `keys` contiguously in this order: the
    JSON header's length (8 bytes, little-endian), then the JSON, padded with spaces to
    a multiple of 8 (the format: github.com/huggingface/safetensors, README "Format")."""
    name = next(k for k, v in SAFETENSORS_DTYPES.items() if v == dtype)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    head, offset = {"__metadata__": {"format": "pt"}}, 0
    for key in keys:
        n = math.prod(shapes[key]) * itemsize
        head[key] = {"dtype": name, "shape": list(shapes[key]), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(head, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_weights(out, shapes, dtype, max_bytes, tensors):
    """model.safetensors, or model-0000i-of-0000n.safetensors shards and
    model.safetensors.index.json, in `out`. tensors: (HF key, tensor) pairs in the order
    of `shapes` (hf_tensors), each cast, checked finite and written as it comes, so only
    one tensor's copy is held at a time."""
    shards = shard_plan(shapes, torch.empty(0, dtype=dtype).element_size(), max_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, keys in zip(names, shards):
        with open(os.path.join(out, name), "wb") as f:
            f.write(safetensors_header(keys, shapes, dtype))
            for key in keys:
                hf_key, t = next(tensors)
                assert hf_key == key, (hf_key, key)   # the meta pass and this one walk the same order
                f.write(export_cast(key, t, dtype).reshape(-1).view(torch.uint8).numpy().data)
    if len(shards) > 1:
        total = sum(math.prod(s) for s in shapes.values()) * torch.empty(0, dtype=dtype).element_size()
        index = {"metadata": {"total_size": total},
                 "weight_map": {key: name for name, keys in zip(names, shards) for key in keys}}
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)


def export_cast(key, t, dtype):
    """t on the CPU in `dtype`, contiguous; one line naming it when it is not finite
    (in the checkpoint, or after a cast to float16 beyond its range)."""
    out = t.detach().to("cpu", dtype).contiguous()
    if first_nonfinite(out, key):
        why = "holds NaN or inf" if first_nonfinite(t, key) else f"overflows {dtype_name(dtype)} (values beyond its range)"
        raise ConvertError(f"refusing to export: tensor {key} {why}; export an earlier checkpoint"
                           f"{'' if first_nonfinite(t, key) else ' or choose another --dtype'}")
    return out


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


def hf_special_ids(hf_dir, hf_cfg):
    """export_special_ids for a model exported straight from an HF directory, as if it had
    been imported first (import_hf keeps config.json's ids when there is no generation
    config)."""
    if os.path.exists(os.path.join(hf_dir, GENERATION_CONFIG)) or not special_ids(hf_cfg):
        return export_special_ids(hf_dir)
    return {**dict.fromkeys(SPECIAL_IDS[:2]), **special_ids(hf_cfg)}


def tokenizer_dir(ckpt, ckpt_dir):
    """Where the HF tokenizer files of a checkpoint are: next to it, else next to the
    dense checkpoint it was upcycled from, the run it started from, or the HF directory
    it was imported from (upcycle.py keeps the dense "config"). None when there are none."""
    return find_tokenizer_dir(ckpt, ckpt_dir)


_STATE_SHAPES = {}   # GPT_state_shapes' results, by config


def GPT_state_shapes(cfg):
    """{key: shape} of GPT(cfg)'s state dict (built on the meta device: no memory; about a
    second for a 30-layer MoE, so remembered per config)."""
    key = json.dumps(asdict(cfg), sort_keys=True)
    if key not in _STATE_SHAPES:
        with torch.device("meta"):
            _STATE_SHAPES[key] = {k: tuple(v.shape) for k, v in GPT(cfg).state_dict().items()}
    return dict(_STATE_SHAPES[key])


# ============================================================================ CLI

def build_parser():
    p = ArgumentParser(prog="convert.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--from_hf", help="HF model directory to import")
    p.add_argument("--out_dir", help="with --from_hf: new directory for ckpt.pt")
    p.add_argument("--ckpt", help="project checkpoint (out_dir or .pt) to export")
    p.add_argument("--to_hf", help="with --ckpt: new directory for the HF files")
    p.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                   help="dtype of the weights written (default auto: the HF files' on import, the checkpoint's "
                        "on export)")
    p.add_argument("--max_shard_size", default=MAX_SHARD_SIZE,
                   help=f"with --to_hf: largest safetensors file (default {MAX_SHARD_SIZE}, as transformers); "
                        f"more weights go to model-0000i-of-0000n.safetensors with model.safetensors.index.json")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.from_hf and args.out_dir and not (args.ckpt or args.to_hf):
        if args.max_shard_size != MAX_SHARD_SIZE:
            p.error("--max_shard_size is for export (--to_hf)")
        path = import_hf(args.from_hf, args.out_dir, args.dtype)
        print(f"wrote {path}")
    elif args.ckpt and args.to_hf and not (args.from_hf or args.out_dir):
        target = export_hf(args.ckpt, args.to_hf, args.dtype, args.max_shard_size)
        print(f"wrote {args.to_hf} ({target})")
    else:
        p.error("use --from_hf=HF_DIR --out_dir=OUT_DIR, or --ckpt=CKPT_DIR --to_hf=HF_DIR")
    return 0


def cli(argv=None):
    """main() with the CLI's error handling (configurator.run_cli): a ConvertError, or an OSError
    such as a full disk while writing, is one line on stderr and exit status 2."""
    return run_cli(main, argv, user_errors=(ConvertError,))


if __name__ == "__main__":
    sys.exit(cli())
