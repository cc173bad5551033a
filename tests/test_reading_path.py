"""docs/READING.md is what docs/reading_path.py writes, and every reader's path stays
within its line budget (the pieces are named by function, so a rename that breaks a
path fails here too)."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "docs"))

import reading_path  # noqa: E402


def test_reading_guide_is_current():
    with open(os.path.join(ROOT, "docs", "READING.md")) as f:
        assert reading_path.render() in f.read(), "run: python docs/reading_path.py --write"


def test_every_path_is_within_its_budget():
    for question, (budget, _) in reading_path.PATHS.items():
        _, total = reading_path.table(question)
        assert 0 < total <= budget, f"{question}: {total} lines > {budget}"
