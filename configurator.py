"""
Settings: parsing them and checking them, for every script (train.py, eval.py,
upcycle.py, bench.py, demo.py, experiments.py, data/*). The project's rule is that
bad input gets one line naming the problem and the fix, and exit status 2.

    parse_config(argv, defaults)   config files, then --key=value, over the defaults
    check_run_config(cfg, defaults)  every training setting GPTConfig.validate does not see
    ArgumentParser, run_cli        argparse with one-line errors, and how every CLI ends
    FLOAT_RANGES, float_problem    the interval of every float setting

It imports no torch at the top: the data scripts use it and nothing else of torch.
"""
import argparse
import ast
import difflib
import math
import os
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
    import torch   # here, not at the top: importing torch takes seconds, and the data scripts need none of it
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


# -----------------------------------------------------------------------------
# train.py's settings: config files and --key=value over the defaults

class ConfigError(ValueError):
    """A setting that cannot work, as one line naming it and the fix."""


OPTIONAL_FLOATS = {"gate_norm_lambda"}   # None or a number


def check_value(key, value, where, defaults):
    """value for config key `key` (set in `where`), typed like its default: an int
    for a float key becomes a float; anything else of the wrong type, or an unknown
    key (with a did-you-mean), raises ConfigError."""
    if key not in defaults:
        close = difflib.get_close_matches(key, defaults, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown config key '{key}' in {where}{hint}")
    want = defaults[key]
    if key in OPTIONAL_FLOATS:
        if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            return None if value is None else float(value)
        raise ConfigError(f"config key '{key}' expects a number or None, got {value!r} in {where}")
    if isinstance(want, bool) or isinstance(value, bool):
        if type(value) is not type(want):
            raise ConfigError(f"config key '{key}' expects {type(want).__name__}, got {value!r} in {where}")
        return value
    if isinstance(want, float) and isinstance(value, int):
        return float(value)
    if type(value) is not type(want):
        raise ConfigError(f"config key '{key}' expects {type(want).__name__}, got {value!r} in {where}")
    return value


def read_config_file(path):
    """The names a config file assigns. It is plain Python; include(name) inside it
    runs another config file first, relative to the including file (configs build
    on each other)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} not found (expected a .py file under config/ or --key=value)")
    scope = {}

    def run_file(file):
        here = os.path.dirname(os.path.abspath(file))
        include = lambda name: run_file(os.path.join(here, name))   # noqa: E731
        exec(open(file).read(), {"include": include}, scope)
    try:
        run_file(path)
    except SystemExit as e:   # a config file is Python: sys.exit() in it must not end train.py silently
        raise ConfigError(f"config file {path} called sys.exit({e.code!r}) while it ran: a config file "
                          f"only assigns settings; remove the exit") from None
    except Exception as e:
        raise ConfigError(f"config file {path} failed to run: {type(e).__name__}: {e}") from None
    return {k: v for k, v in scope.items() if not k.startswith("_") and not callable(v) and not isinstance(v, type(os))}


def parse_config(argv, defaults):
    """Apply config files and --key=value overrides to the defaults (a dict of
    name -> default value). Unknown keys and wrongly typed values raise ConfigError
    (one line)."""
    cfg = dict(defaults)
    for arg in argv:
        if not arg.startswith("--"):
            for k, v in read_config_file(arg).items():
                cfg[k] = check_value(k, v, arg, defaults)
            continue
        if "=" not in arg:
            raise ConfigError(f"argument {arg} must look like --key=value")
        key, val = arg[2:].split("=", 1)
        if isinstance(defaults.get(key), str):
            value = val   # a string key takes the text as it is (--moe_layers=1,3, --out_dir=...)
        else:
            try:
                value = ast.literal_eval(val)
            except (SyntaxError, ValueError):
                value = val   # a bare string: check_value names the expected type
        cfg[key] = check_value(key, value, "command line", defaults)
    return cfg


ROOT = os.path.dirname(os.path.abspath(__file__))


def resolve_data_dir(cfg):
    """The data directory of a run's settings (train.py's cfg, or a checkpoint's
    saved config): data_dir as given, or, when it is relative and names no directory
    from here, the one next to this file; data/<dataset> when data_dir is empty."""
    d = cfg.get("data_dir")
    if not d:
        return os.path.join(ROOT, "data", cfg.get("dataset", "multidomain"))
    if os.path.isdir(d) or os.path.isabs(d):
        return d
    return os.path.join(ROOT, d) if os.path.isdir(os.path.join(ROOT, d)) else d


# -----------------------------------------------------------------------------
# checking train.py's settings (before anything is read or written)

AUX_LOSSES = ("switch", "skywork", "none")
METHODS = ("copy", "drop", "btx")
ROUTER_INITS = ("random", "hidden")
AT_LEAST = {"batch_size": 1, "eval_iters": 1, "eval_interval": 1, "log_interval": 1,
            "gradient_accumulation_steps": 1, "max_iters": 0, "warmup_iters": 0, "lr_decay_iters": 0,
            "dense_warmup_iters": 0, "upcycle_granularity": 1, "expert_parallel": 1}


def check_run_config(cfg, defaults):
    """The training settings that GPTConfig.validate does not see (one-line ConfigError)."""
    from experts import triton_status   # here, not at the top: experts imports torch
    for key, low in AT_LEAST.items():
        if cfg[key] < low:
            raise ConfigError(f"{key}={cfg[key]} must be >= {low}")
    if not cfg["learning_rate"] > 0 or cfg["min_lr"] < 0:
        raise ConfigError(f"learning_rate={cfg['learning_rate']} must be > 0 and min_lr={cfg['min_lr']} >= 0")
    for key in ("beta1", "beta2"):
        if not 0 <= cfg[key] < 1:
            raise ConfigError(f"{key}={cfg[key]} must be in [0, 1) (AdamW momentum)")
    for key in ("weight_decay", "grad_clip", "aux_loss_coef", "z_loss_coef", "expert_bias_gamma",
                "upcycle_expert_noise", "adaptive_aux_max"):
        if cfg[key] < 0:
            raise ConfigError(f"{key}={cfg[key]} must be >= 0")
    problem = first_float_problem(cfg)
    if problem:
        raise ConfigError(problem)
    if cfg["aux_loss"] not in AUX_LOSSES:
        raise ConfigError(f"aux_loss={cfg['aux_loss']!r} must be one of {', '.join(AUX_LOSSES)}")
    if cfg["dtype"] not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype={cfg['dtype']!r} must be 'auto', 'float32', 'bfloat16' or 'float16'")
    if cfg["save_dtype"] not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"save_dtype={cfg['save_dtype']!r} must be 'float32', 'bfloat16' or 'float16'")
    if cfg["expert_impl"] == "triton" and cfg["moe_layers"] != "none" and not triton_status()[0]:
        raise ConfigError(f"expert_impl='triton' cannot run here: {triton_status()[1]} (use expert_impl=auto)")
    if cfg["device"] != "auto" and device_problem(cfg["device"]):
        raise ConfigError(f"device={cfg['device']!r} {device_problem(cfg['device'])}")
    check_expert_parallel(cfg)
    check_upcycle_method(cfg, defaults)


def check_expert_parallel(cfg):
    """What expert_parallel > 1 cannot be combined with."""
    if cfg["expert_parallel"] > 1 and cfg["dtype"] == "float16":
        raise ConfigError("expert_parallel > 1 does not support dtype='float16' (each rank's loss scaler would "
                          "see other expert gradients); use dtype='bfloat16' or 'float32'")
    if cfg["expert_parallel"] > 1 and cfg["dense_warmup_iters"] > 0:
        raise ConfigError("expert_parallel > 1 does not support dense_warmup_iters (Lory's dense warm-up; EP "
                          "refuses Lory): use expert_parallel=1")
    if cfg["expert_parallel"] > 1 and (cfg["upcycle_method"] != "copy" or cfg["upcycle_router_init"] != "random"):
        raise ConfigError("expert_parallel > 1 upcycles online by copying (upcycle_method='copy', "
                          "upcycle_router_init='random'): build a drop/btx/hidden MoE with upcycle.py --out_dir=D first, "
                          "then continue it there with init_from=resume")


def check_upcycle_method(cfg, defaults):
    """upcycle_method / upcycle_router_init and the keys that go with them: one-line
    ConfigError for values or combinations that cannot work. A resumed run ignores
    them (its checkpoint is already the upcycled model)."""
    method, rinit, init = cfg["upcycle_method"], cfg["upcycle_router_init"], cfg["init_from"]
    if method not in METHODS:
        raise ConfigError(f"upcycle_method={method!r} must be one of {', '.join(METHODS)}")
    if rinit not in ROUTER_INITS:
        raise ConfigError(f"upcycle_router_init={rinit!r} must be one of {', '.join(ROUTER_INITS)}")
    if not 0 <= cfg["upcycle_drop_ratio"] <= 1:
        raise ConfigError(f"upcycle_drop_ratio={cfg['upcycle_drop_ratio']} must be in [0, 1] (0.5 is Drop-Upcycling's best)")
    if method != "drop" and cfg["upcycle_drop_ratio"] != defaults["upcycle_drop_ratio"]:
        raise ConfigError(f"upcycle_drop_ratio applies to upcycle_method='drop' only (got upcycle_method={method!r})")
    if cfg["upcycle_router_domains"] and rinit != "hidden":
        raise ConfigError("upcycle_router_domains is used by upcycle_router_init='hidden' only")
    if init == "resume":
        return
    if init == "scratch":
        if method == "btx" or rinit == "hidden" or (method == "drop" and not cfg["dense_warmup_iters"]):
            what = f"upcycle_method={method!r}" if method != "copy" else f"upcycle_router_init={rinit!r}"
            raise ConfigError(f"{what} upcycles a dense checkpoint: set init_from=<dense out_dir>"
                              + ("=A,B,... (branch out_dirs)" if method == "btx" else ""))
        return
    if (method != "copy" or rinit != "random") and str(cfg["moe_layers"]).strip() in ("none", ""):
        raise ConfigError(f"upcycle_method={method!r} / upcycle_router_init={rinit!r} build an MoE: set moe_layers "
                          f"(e.g. --moe_layers=all); with moe_layers='none' init_from is a dense warm start")
    paths = [p for p in init.split(",") if p.strip()]
    if method == "btx" and len(paths) < 2:
        raise ConfigError(f"upcycle_method='btx' merges 2 or more dense branches: init_from=A,B[,C,...] (got {init!r})")
    if method != "btx" and len(paths) != 1:
        raise ConfigError(f"init_from={init!r} names {len(paths)} checkpoints; only upcycle_method='btx' takes a list")
    if rinit == "hidden" and not cfg["upcycle_router_domains"] and method != "btx":
        raise ConfigError("upcycle_router_init='hidden' needs upcycle_router_domains=D1,D2,... "
                          "(one per expert, or fewer dividing n_experts)")
    if rinit == "hidden":
        n_dom = len({d.strip() for d in cfg["upcycle_router_domains"].split(",") if d.strip()}) or len(paths)
        check_hidden_router_domains(n_dom, cfg["n_experts"], cfg["upcycle_granularity"], method,
                                    cfg["upcycle_expert_noise"])


def check_hidden_router_domains(n_domains, n_experts, granularity, method, expert_noise, prefix="upcycle_"):
    """A hidden-state router init (one router row per domain) must leave no two
    experts with the same weights and the same router row: those get equal gradients
    and never diverge. Shared by train.py (prefix 'upcycle_': its keys) and
    upcycle.py's CLI (prefix '--': its flags)."""
    copies = n_experts // granularity   # experts that hold the same weights (shard)
    if method != "drop" and not expert_noise and n_domains < copies:
        raise ConfigError(f"{prefix}router_init='hidden' with {n_domains} domains for {copies} copies of each "
                          f"weight: copies that share a domain share their router row too, get equal gradients "
                          f"and never diverge; give one domain per copy, use {prefix}method='drop', or "
                          f"{prefix}expert_noise > 0")
