"""
The training log, metrics.jsonl: one JSON record per line, written by train.py and
read by eval.py, plot.py, demo.py, experiments.py and the notebook. This file is
the one place that writes and reads it.

    {"iter": 10, "tokens": 20480, "split": "train", "loss": ..., "lr": ..., "moe": [...per layer...]}
    {"iter": 10, "tokens": 20480, "split": "eval", "train_loss": ..., "val_loss": ...}
"""
import json
import os
import sys

from outdir import WriteError, write_atomic, write_problem

METRICS_FILE = "metrics.jsonl"


def metrics_path(run_dir):
    """run_dir/metrics.jsonl; a path that is not a directory is taken as the file itself."""
    return os.path.join(run_dir, METRICS_FILE) if os.path.isdir(run_dir) else run_dir


class MetricsError(ValueError):
    """metrics.jsonl cannot be read or written (one line naming the file)."""


NUMBER_KEYS = ("tokens", "loss", "lr", "train_loss", "val_loss", "ms_per_iter", "tok_per_s", "mfu")
LIST_KEYS = ("moe", "alpha", "expert_similarity", "similarity_to_dense", "domain_usage")


def record_problem(rec):
    """Why a parsed line is not a metrics record (a dict with an int iter >= 0, a
    str split, and numbers where the known numeric keys are), or None. NaN and
    inf pass: they are what a diverged run logged (plot.py leaves them out)."""
    if not isinstance(rec, dict):
        return f"a JSON {type(rec).__name__}, not an object"
    it = rec.get("iter")
    if not isinstance(it, int) or isinstance(it, bool) or it < 0:
        return f"iter={it!r} is not an int >= 0"
    if not isinstance(rec.get("split"), str):
        return f"split={rec.get('split')!r} is not a string"
    for key in NUMBER_KEYS:
        v = rec.get(key)
        if key in rec and (isinstance(v, bool) or not isinstance(v, (int, float))):
            return f"{key}={v!r} is not a number"
    for key in LIST_KEYS:
        if key in rec and not isinstance(rec[key], list):
            return f"{key}={rec[key]!r} is not a list"
    if "moe" in rec and not all(isinstance(layer, dict) for layer in rec["moe"]):
        return "moe is not a list of per-layer objects"
    return None


def read_metrics(path):
    """Records of a metrics.jsonl. This is the one reader: a line that is not JSON
    (a truncated last line of a killed run, or damage) or not a record
    (record_problem) is skipped and counted, with one warning line on stderr.
    A path that cannot be read raises MetricsError (one line)."""
    if os.path.isdir(path):
        raise MetricsError(f"{path} is a directory, not a metrics file: move it away (or choose another out_dir)")
    try:
        with open(path) as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        raise MetricsError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    recs, skipped = [], []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            problem = record_problem(rec)
        except (json.JSONDecodeError, RecursionError):
            problem = "not valid JSON" + (" (truncated last line)" if i == len(lines) - 1 else "")
        if problem:
            skipped.append(f"line {i + 1}: {problem}")
        else:
            recs.append(rec)
    if skipped:
        print(f"warning: skipped {len(skipped)} malformed line(s) of {path} ({skipped[0]}"
              f"{', ...' if len(skipped) > 1 else ''})", file=sys.stderr)
    return recs


def load_metrics(run_dir):
    """Records of run_dir/metrics.jsonl (or of that file), [] if it does not exist."""
    path = metrics_path(run_dir)
    return read_metrics(path) if os.path.exists(path) else []


def trim_for_resume(path, iter_num):
    """A run resumed at iter_num drops the records logged after its checkpoint. The
    resumed iteration is evaluated again, so its old eval record goes too."""
    if not os.path.exists(path):
        return
    keep = [r for r in read_metrics(path)
            if r["iter"] < iter_num or (r["iter"] == iter_num and r["split"] != "eval")]
    text = "".join(json.dumps(r) + "\n" for r in keep).encode()
    try:
        write_atomic(path, lambda f: f.write(text))
    except WriteError as e:
        raise MetricsError(str(e)) from None


class MetricsWriter:
    """Appends records to metrics.jsonl, flushed one by one. A new run (append=False)
    moves an old log to metrics.jsonl.prev only when it writes its first record, so
    a run that fails while starting leaves the old log alone. enabled=False (the
    non-master DDP ranks) writes nothing."""

    def __init__(self, path, append, enabled=True):
        self.path, self.append, self.enabled, self.file = path, append, enabled, None

    def write(self, rec):
        if not self.enabled:
            return
        try:
            if self.file is None:
                if not self.append and os.path.exists(self.path):
                    os.replace(self.path, self.path + ".prev")   # keep the old run's log, start afresh
                self.file = open(self.path, "a")
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()
        except OSError as e:   # disk full, or metrics.jsonl is a directory...: one line, the run stops
            raise MetricsError(write_problem(e, self.path, kept=False)) from None

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None
