"""bench/quality.py's arithmetic, which the README's testbed tables come from: merging split runs (one row per
video) and the paired differences against direct (mean, standard error, pairs better)."""

import pytest
from _scripts import load_script

pytestmark = pytest.mark.unit
METRICS = ("subject", "missing", "duplicated", "background", "imaging", "smoothness", "freeze_loop", "overall",
           "dynamic", "travel", "moving", "coverage", "travel_gap", "coverage_ratio")


@pytest.fixture(scope="module")
def quality():
    return load_script("bench/quality.py")


def _row(method, pair, frames=621, **values):
    return dict(method=method, length="12x", frames=frames, pair=pair, prompt="p",
                **{**{m: 0.5 for m in METRICS}, **values})


def test_split_runs_merge_to_one_row_per_video(quality):
    first = [_row("ground truth", 0), _row("direct", 0), _row("ground truth", 1), _row("direct", 1)]
    second = [_row("ground truth", 0), _row("freeloc", 0), _row("ground truth", 1), _row("freeloc", 1)]
    rows = quality.merged_rows([first, second])
    assert sorted((r["method"], r["pair"]) for r in rows) == sorted(
        [("ground truth", 0), ("direct", 0), ("freeloc", 0), ("ground truth", 1), ("direct", 1), ("freeloc", 1)])


def test_paired_differences_against_direct(quality):
    travel = {0: 10.0, 1: 20.0, 2: 30.0}
    up = {0: 3.0, 1: 1.0, 2: -1.0}  # freeloc - direct: mean +1.0, std (ddof 1) 2.0, standard error 2/sqrt(3)
    rows = [_row("direct", p, travel=travel[p], duplicated=0.1) for p in travel]
    rows += [_row("freeloc", p, travel=travel[p] + up[p], duplicated=0.3) for p in travel]
    text = quality.table(rows, 13, 3)
    line = next(x for x in text.splitlines() if x.startswith("| 12x | freeloc |") and "(" in x)
    cells = [c.strip() for c in line.strip("|").split("|")][2:]
    assert dict(zip(quality.PAIRED, cells))["travel"] == "+1.0 +- 1.2 (2/3)"
    assert dict(zip(quality.PAIRED, cells))["duplicated"] == "+0.200 +- 0.000 (0/3)"  # lower is better
    appearance, motion = [x for x in text.splitlines() if x.startswith("| 12x | direct |")]
    cells = [c.strip() for c in motion.strip("|").split("|")][2:]
    assert dict(zip(quality.MOTION, cells))["travel"] == "20.0 +- 8.2"  # mean 20, population std 8.16
