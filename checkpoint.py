"""
Checkpoint files: one format for every model the project writes (dense, MoE,
upcycled, Lory), written atomically and read back safely.

OUT_DIR/ckpt.pt is a dict:
    format         "moe-upcycling/1"
    model_args     GPTConfig as a dict
    model          state_dict
    optimizer      optimizer state_dict, or None (fresh after upcycling)
    iter_num       optimizer steps taken
    best_val_loss
    config         train.py's full config dict
    rng            {"torch": cpu RNG state, "cuda": [...], "data": data generator state}
    aux_coef       AdaptiveAuxCoef state (MoE runs), or None
    scaler         the float16 loss scaler's state_dict (scale, growth tracker), or None
    upcycled_from  {"path", "sha256", "method", "options"} for upcycled models, else None
    dtype          "float32", "bfloat16" or "float16": the dtype of the model's floating
                   weights (absent or None in checkpoints written before it: the weights' own)

Loading checks every field above (validate_checkpoint) and names the file and the
field of the first wrong one. Saving refuses a non-finite number anywhere in the
dict, writes a per-process temp file (two writers never share one), and turns a
full disk or any other write error into one line; in every failure the previous
checkpoint stays as it was.
"""
import hashlib
import math
import os
from dataclasses import fields

import torch

from model import GPT, GPTConfig
from outdir import WriteError, write_atomic

FORMAT = "moe-upcycling/1"
CKPT_NAME = "ckpt.pt"
FIELDS = ("format", "model_args", "model", "optimizer", "iter_num", "best_val_loss", "config", "rng",
          "aux_coef", "upcycled_from", "scaler", "dtype")
WEIGHT_DTYPES = ("float32", "bfloat16", "float16")
DAMAGED = "damaged or foreign checkpoint: retrain it, or point at another one"


class CheckpointError(Exception):
    """A missing, truncated, foreign or damaged checkpoint file, or one that could
    not be written (message names the file, and the field or the disk)."""


class NonFiniteCheckpointError(CheckpointError):
    """save_checkpoint refused a checkpoint holding NaN/inf (a diverged run, not bad
    input: train.py stops with exit status 1 as for a non-finite loss)."""


def ckpt_path(path):
    """Accept an out_dir or a path to the .pt file itself."""
    return os.path.join(path, CKPT_NAME) if os.path.isdir(path) else path


# ----------------------------------------------------------------------------- writing

def first_nonfinite(obj, name):
    """Name of the first NaN/inf float or floating tensor in a nest of dicts,
    lists and tuples (e.g. 'model.lm_head.weight'), or None."""
    if torch.is_tensor(obj):
        if not obj.is_floating_point() or obj.numel() == 0:
            return None
        low, high = torch.aminmax(obj)   # NaN propagates; 7x faster than isfinite(obj).all() on CPU
        return None if math.isfinite(float(low)) and math.isfinite(float(high)) else name
    if isinstance(obj, float):
        return None if math.isfinite(obj) else name
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for k, v in items:
        found = first_nonfinite(v, f"{name}.{k}" if name else str(k))
        if found:
            return found
    return None


def save_checkpoint(ckpt, out_dir, name=CKPT_NAME):
    """Write atomically (outdir.write_atomic; a write error is a one-line
    CheckpointError). Refuses a checkpoint holding a non-finite
    number anywhere (weights, optimizer moments, model_args, config...), so the
    last good checkpoint is never replaced by a diverged one."""
    ckpt = {"format": FORMAT, **ckpt}
    final = os.path.join(out_dir, name)
    bad = first_nonfinite(ckpt, "")
    if bad:
        raise NonFiniteCheckpointError(f"refusing to write {final}: {bad} is not finite (NaN or inf); "
                              f"the previous checkpoint is kept")
    try:
        return write_atomic(final, lambda f: torch.save(ckpt, f))
    except WriteError as e:
        raise CheckpointError(str(e)) from None


# ----------------------------------------------------------------------------- reading

def load_checkpoint(path, map_location="cpu", mmap=False):
    """Load a project checkpoint with weights_only=True and validate every field;
    one-line CheckpointError otherwise. mmap: the tensors stay in the file (torch.load's
    mmap), read from disk as they are used."""
    path = ckpt_path(path)
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path} (train one with train.py, or check --ckpt/out_dir)")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): {DAMAGED}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # truncated zip, pickle of foreign objects, not a torch file...
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or foreign file?): "
                              f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "model" not in ckpt:
        raise CheckpointError(f"{path} is not a checkpoint written by this project (format {FORMAT!r} expected)")
    if not isinstance(ckpt["model"], dict) or not isinstance(ckpt.get("model_args"), dict):
        raise CheckpointError(f"{path} is damaged: its 'model' weights or 'model_args' are missing "
                              f"(retrain it, or point at another checkpoint)")
    validate_checkpoint(ckpt, path)
    return ckpt


def _show(value):
    if torch.is_tensor(value):
        return f"tensor({str(value.dtype).removeprefix('torch.')}, shape {tuple(value.shape)})"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _bad(path, field, value, want):
    return CheckpointError(f"{path}: field {field}={_show(value)} {want} ({DAMAGED})")


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate_checkpoint(ckpt, path):
    """Check every field of a loaded checkpoint dict (see the module docstring)
    before anything uses it. Raises CheckpointError naming the file and the field."""
    unknown = sorted(str(k) for k in ckpt if k not in FIELDS)
    if unknown:
        raise CheckpointError(f"{path}: unknown field(s) {', '.join(unknown)} ({DAMAGED})")
    check_model_args(ckpt["model_args"], path)
    for k, v in ckpt["model"].items():
        if not isinstance(k, str) or not torch.is_tensor(v):
            raise _bad(path, f"model[{k!r}]", v, "must be a tensor named by a string")
    check_optimizer(ckpt.get("optimizer"), path)
    iter_num = ckpt.get("iter_num", 0)
    if not isinstance(iter_num, int) or isinstance(iter_num, bool) or iter_num < 0:
        raise _bad(path, "iter_num", iter_num, "must be an int >= 0")
    if not _is_number(ckpt.get("best_val_loss", 1e9)):
        raise _bad(path, "best_val_loss", ckpt["best_val_loss"], "must be a finite number")
    check_config(ckpt.get("config"), path)
    check_rng(ckpt.get("rng"), path)
    check_aux_coef(ckpt.get("aux_coef"), path)
    check_upcycled_from(ckpt.get("upcycled_from"), path)
    check_scaler(ckpt.get("scaler"), path)
    check_dtype(ckpt, path)


def shared_dtype(state):
    """The torch dtype every floating tensor of a state dict has, else None (mixed or none)."""
    found = {v.dtype for v in state.values() if torch.is_tensor(v) and v.is_floating_point()}
    return found.pop() if len(found) == 1 else None


def check_dtype(ckpt, path):
    """dtype: None or one of WEIGHT_DTYPES, which every floating weight has."""
    name = ckpt.get("dtype")
    if name is None:
        return
    if name not in WEIGHT_DTYPES:
        raise _bad(path, "dtype", name, f"must be None or one of {', '.join(WEIGHT_DTYPES)}")
    wrong = next((k for k, v in ckpt["model"].items() if v.is_floating_point() and str(v.dtype) != f"torch.{name}"), None)
    if wrong:
        raise _bad(path, f"model[{wrong!r}]", ckpt["model"][wrong], f"must be {name}, the checkpoint's dtype")


def check_model_args(args, path):
    """model_args: GPTConfig's field names only, each of its field's type, and a
    shape GPTConfig.validate accepts. Missing keys take GPTConfig's defaults."""
    known = {f.name: f for f in fields(GPTConfig)}
    for key, value in args.items():
        if key not in known:
            raise CheckpointError(f"{path}: field model_args has an unknown key {key!r} "
                                  f"(valid: {', '.join(known)}) ({DAMAGED})")
        want = known[key].type
        if (known[key].default is None and value is None) or not isinstance(want, type):
            continue   # an optional field set to None, or a typing annotation: GPTConfig checks it
        ok = (type(value) is bool if want is bool else
              _is_number(value) if want is float else
              isinstance(value, want) and not isinstance(value, bool))
        if not ok:
            raise _bad(path, f"model_args.{key}", value, f"must be {'a finite number' if want is float else want.__name__}")
    try:
        GPTConfig(**args)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: field model_args does not describe a valid model: {e} ({DAMAGED})") from None


def check_optimizer(opt, path):
    """None (fresh after upcycling) or a torch optimizer state_dict's outline;
    optimizer.load_state_dict checks that it fits the model."""
    if opt is None:
        return
    if not isinstance(opt, dict) or not isinstance(opt.get("state"), dict) \
            or not isinstance(opt.get("param_groups"), list):
        raise _bad(path, "optimizer", opt, "must be None or an optimizer state_dict {'state', 'param_groups'}")
    for i, g in enumerate(opt["param_groups"]):
        if not isinstance(g, dict) or not isinstance(g.get("params"), list):
            raise _bad(path, f"optimizer.param_groups[{i}]", g, "must be a dict with a 'params' list")


def check_config(cfg, path):
    """config: None or train.py's config dict (string keys, plain scalar values,
    finite numbers; data_dir and dataset strings)."""
    if cfg is None:
        return
    if not isinstance(cfg, dict):
        raise _bad(path, "config", cfg, "must be None or train.py's config dict")
    for key, value in cfg.items():
        if not isinstance(key, str) or not (value is None or isinstance(value, (bool, int, float, str))):
            raise _bad(path, f"config[{key!r}]", value, "must be a number, string, bool or None")
        if isinstance(value, float) and not math.isfinite(value):
            raise _bad(path, f"config.{key}", value, "must be finite")
    for key in ("data_dir", "dataset", "out_dir"):
        if key in cfg and not isinstance(cfg[key], str):
            raise _bad(path, f"config.{key}", cfg[key], "must be a string")


def check_rng(rng, path):
    """rng: None or {"torch", "data": CPU generator states, "cuda": a CUDA state or
    None}. The CPU states are tried on a scratch torch.Generator, which rejects
    garbage exactly as the resume would, without touching the global RNG."""
    if rng is None:
        return
    if not isinstance(rng, dict) or set(rng) - {"torch", "data", "cuda"}:
        raise _bad(path, "rng", rng, "must be None or a dict with keys torch, data, cuda")
    for key in ("torch", "data"):
        if key not in rng:
            continue
        state = rng[key]
        if not torch.is_tensor(state) or state.dtype != torch.uint8:
            raise _bad(path, f"rng.{key}", state, "must be a uint8 generator state (torch.get_rng_state())")
        try:
            torch.Generator().set_state(state.cpu())
        except RuntimeError as e:
            raise _bad(path, f"rng.{key}", state, f"is not a valid generator state: {str(e).splitlines()[0]}") from None
    cuda = rng.get("cuda")
    if cuda is not None and not (torch.is_tensor(cuda) and cuda.dtype == torch.uint8):
        raise _bad(path, "rng.cuda", cuda, "must be None or a uint8 CUDA generator state")


def check_aux_coef(aux, path):
    """aux_coef: None or router.AdaptiveAuxCoef.state_dict() with finite numbers."""
    if aux is None:
        return
    want = "must be None or {'alpha': [finite numbers], 'xi', 'alpha_max', 'beta': finite numbers}"
    if not isinstance(aux, dict) or set(aux) != {"alpha", "xi", "alpha_max", "beta"}:
        raise _bad(path, "aux_coef", aux, want)
    if not isinstance(aux["alpha"], list) or not all(_is_number(a) for a in aux["alpha"]):
        raise _bad(path, "aux_coef.alpha", aux["alpha"], "must be a list of finite numbers")
    for key in ("xi", "alpha_max", "beta"):
        if not _is_number(aux[key]):
            raise _bad(path, f"aux_coef.{key}", aux[key], "must be a finite number")


def check_scaler(scaler, path):
    """scaler: None or torch.amp.GradScaler.state_dict(): names to finite numbers."""
    if scaler is None:
        return
    if not isinstance(scaler, dict) or not scaler or not all(isinstance(k, str) and _is_number(v)
                                                              for k, v in scaler.items()):
        raise _bad(path, "scaler", scaler, "must be None or a GradScaler state_dict {'scale': number, ...}")


def check_upcycled_from(src, path):
    """upcycled_from: None or {"path": str or None, "sha256": str or None,
    "method": str, "options": dict, ...} (train.py's dense warm-up adds "iter")."""
    if src is None:
        return
    if not isinstance(src, dict):
        raise _bad(path, "upcycled_from", src, "must be None or a dict")
    for key in ("path", "sha256"):
        if not (src.get(key) is None or isinstance(src[key], str)):
            raise _bad(path, f"upcycled_from.{key}", src[key], "must be a string or None")
    if "method" in src and not isinstance(src["method"], str):
        raise _bad(path, "upcycled_from.method", src["method"], "must be a string")
    if "options" in src and not isinstance(src["options"], dict):
        raise _bad(path, "upcycled_from.options", src["options"], "must be a dict")


def load_weights(model, state_dict, path):
    """model.load_state_dict with a one-line CheckpointError naming the first
    missing, unexpected or mis-shaped tensor."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        detail = next((l.strip() for l in str(e).splitlines()[1:] if l.strip()), str(e).splitlines()[0])
        raise CheckpointError(f"{ckpt_path(path)} does not match the model it describes: {detail[:300]}") from None


def file_sha256(path):
    h = hashlib.sha256()
    with open(ckpt_path(path), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_model(path, device="cpu"):
    """Build the GPT a checkpoint describes and load its weights. Returns (model, ckpt).
    On the CPU the file is memory-mapped, so a training checkpoint's optimizer moments
    (twice the weights) are never read into memory by eval.py or sample.py."""
    ckpt = load_checkpoint(path, map_location=device, mmap=str(device) == "cpu")
    model = GPT(GPTConfig.from_dict(ckpt["model_args"]))
    load_weights(model, ckpt["model"], path)
    return model.to(device), ckpt
