"""
Command-line input checks shared by every script (train.py, eval.py, upcycle.py,
bench.py, demo.py, experiments.py, data/*): the project's rule is that bad input
gets one line naming the problem and the fix, and exit status 2.
"""
import argparse


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr (argparse's default
    prints the whole usage block first), exit status 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see python {self.prog} --help)\n")


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
