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

METRICS_FILE = "metrics.jsonl"


def metrics_path(run_dir):
    """run_dir/metrics.jsonl; a path that is not a directory is taken as the file itself."""
    return os.path.join(run_dir, METRICS_FILE) if os.path.isdir(run_dir) else run_dir


def read_metrics(path):
    """Records of a metrics.jsonl; a truncated last line (killed mid-write) is skipped
    with a warning on stderr; a bad line elsewhere raises ValueError."""
    recs = []
    with open(path) as f:
        lines = f.readlines()
    for i, line in enumerate(lines):
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                print(f"warning: skipped a truncated last line in {path}", file=sys.stderr)
            else:
                raise ValueError(f"{path} line {i + 1} is not valid JSON") from None
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
            if r.get("iter", 0) < iter_num or (r.get("iter", 0) == iter_num and r.get("split") != "eval")]
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in keep)
    os.replace(path + ".tmp", path)


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
        if self.file is None:
            if not self.append and os.path.exists(self.path):
                os.replace(self.path, self.path + ".prev")   # keep the old run's log, start afresh
            self.file = open(self.path, "a")
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None
