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
    upcycled_from  {"path", "sha256", "method", "options"} for upcycled models, else None
"""
import hashlib
import os

import torch

from model import GPT, GPTConfig

FORMAT = "moe-upcycling/1"
CKPT_NAME = "ckpt.pt"


class CheckpointError(Exception):
    """A missing, truncated or foreign checkpoint file (message names the file)."""


def ckpt_path(path):
    """Accept an out_dir or a path to the .pt file itself."""
    return os.path.join(path, CKPT_NAME) if os.path.isdir(path) else path


def save_checkpoint(ckpt, out_dir, name=CKPT_NAME):
    """Write atomically: temp file in the same dir, fsync, rename. A crash while
    saving leaves the previous checkpoint intact."""
    os.makedirs(out_dir, exist_ok=True)
    ckpt = {"format": FORMAT, **ckpt}
    final = os.path.join(out_dir, name)
    tmp = final + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return final


def load_checkpoint(path, map_location="cpu"):
    """Load a project checkpoint with weights_only=True; clear errors otherwise."""
    path = ckpt_path(path)
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path} (train one with train.py, or check --ckpt/out_dir)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, pickle of foreign objects, not a torch file...
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or foreign file?): "
                              f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "model" not in ckpt:
        raise CheckpointError(f"{path} is not a checkpoint written by this project (format {FORMAT!r} expected)")
    if not isinstance(ckpt["model"], dict) or not isinstance(ckpt.get("model_args"), dict):
        raise CheckpointError(f"{path} is damaged: its 'model' weights or 'model_args' are missing "
                              f"(retrain it, or point at another checkpoint)")
    return ckpt


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
    """Build the GPT a checkpoint describes and load its weights. Returns (model, ckpt)."""
    ckpt = load_checkpoint(path, map_location=device)
    model = GPT(GPTConfig.from_dict(ckpt["model_args"]))
    load_weights(model, ckpt["model"], path)
    return model.to(device), ckpt
