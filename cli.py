"""
Command-line input checks shared by every script (train.py, eval.py, upcycle.py,
bench.py, demo.py, experiments.py, data/*): the project's rule is that bad input
gets one line naming the problem and the fix, and exit status 2.
"""
import argparse
import math
import sys


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr (argparse's default
    prints the whole usage block first), exit status 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see python {self.prog} --help)\n")


def run_cli(main, argv=None, user_errors=()):
    """Run a script's main(argv) the way every CLI here ends: argparse's own exit
    code (--help 0, a usage error 2, already printed), and a user error (one of
    user_errors, or an OSError / ValueError: a missing file, an output path that is a
    file, bad data) as one line on stderr with exit status 2."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code
    except user_errors as e:
        print(f"error: {_first_line(e)}", file=sys.stderr)
    except (OSError, ValueError) as e:
        print(f"error: {type(e).__name__}: {_first_line(e)}", file=sys.stderr)
    return 2


def _first_line(e):
    text = str(e)
    return text.splitlines()[0] if text else type(e).__name__


def device_problem(name):
    """Why the torch device `name` cannot be used on this machine, as the end of a
    sentence that starts with the name ("... is not a torch device (...)"), or None."""
    # torch is imported here, not at the top: the data scripts import this file and nothing
    # else of torch. `python -c "import cli"` takes 0.3 s; `import torch` 16-23 s on the shared
    # 2-core box under load (measured 2026-11-29).
    import torch
    try:
        kind = torch.device(name).type
    except RuntimeError:
        return "is not a torch device (use cpu, cuda, cuda:N or mps)"
    if kind == "cuda" and not torch.cuda.is_available():
        return "needs CUDA, which is not available on this machine (use cpu)"
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        return "needs MPS, which is not available on this machine (use cpu)"
    if kind not in ("cpu", "cuda", "mps"):
        return "is not supported (use cpu, cuda, cuda:N or mps)"
    return None


def ram_available():
    """Bytes of RAM this machine can still hand out (/proc/meminfo MemAvailable), or
    None where that is unknown (no /proc): the memory checks then pass."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("MemAvailable:")) * 1024
    except (OSError, StopIteration, ValueError, IndexError):
        return None


# Every float setting of the project and the interval it must lie in; each must
# also be finite. The keys are train.py's config names (GPTConfig fields share
# them); upcycle.py and eval.py flags of the same meaning pass the key as `kind`.
FLOAT_RANGES = {
    # model (model.GPTConfig)
    "rope_theta": "(1, inf)",            # RoPE base: wavelengths grow as theta^(2i/d)
    "norm_eps": "(0, 1)",
    "dropout": "[0, 1)",
    "capacity_factor": "[0, inf)",       # 0 = dropless
    "eval_capacity_factor": "[0, inf)",
    "gate_norm_lambda": "(0, inf)",      # None = off
    "router_init_std": "[0, inf)",
    # MoE losses and balancing
    "aux_loss_coef": "[0, inf)",
    "adaptive_aux_xi": "[0, inf)",
    "adaptive_aux_max": "[0, inf)",
    "adaptive_aux_beta": "[0, 1]",       # EMA factor
    "z_loss_coef": "[0, inf)",
    "expert_bias_gamma": "[0, inf)",
    "upcycle_expert_noise": "[0, inf)",  # relative std
    # optimizer
    "learning_rate": "(0, inf)",
    "min_lr": "[0, inf)",
    "weight_decay": "[0, inf)",
    "beta1": "[0, 1)",
    "beta2": "[0, 1)",
    "grad_clip": "[0, inf)",             # 0 = no clipping
    # sampling (eval.py)
    "temperature": "(0, inf)",
}


def in_interval(x, interval):
    """x in an interval written as text: '[0, 1)', '(0, inf)'..."""
    low, high = (float(s) for s in interval[1:-1].split(","))
    above = x >= low if interval[0] == "[" else x > low
    below = x <= high if interval[-1] == "]" else x < high
    return above and below


def float_problem(name, value, kind=None):
    """Why the float setting `name` cannot be used, as one line naming it and its
    range ("rope_theta=inf must be a finite number in (1, inf)"), or None.
    kind: the FLOAT_RANGES key when the flag has another name (upcycle.py's
    --expert_noise is kind 'upcycle_expert_noise'). None passes (an optional key)."""
    interval = FLOAT_RANGES[kind or name.lstrip("-")]
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{name}={value!r} must be a number in {interval}"
    if not math.isfinite(value) or not in_interval(value, interval):
        return f"{name}={value} must be a finite number in {interval}"
    return None


def first_float_problem(cfg):
    """float_problem for every FLOAT_RANGES key in a config dict (train.py's, or a
    checkpoint's model_args): the first problem, or None."""
    for key in FLOAT_RANGES:
        if key in cfg:
            problem = float_problem(key, cfg[key])
            if problem:
                return problem
    return None
