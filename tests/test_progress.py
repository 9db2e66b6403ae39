"""Progress lines on rank 0: step, seconds per step (of this process's steps, so right after a resume), ETA."""

import pytest

from freeloc_dist.progress import Progress, format_seconds

pytestmark = pytest.mark.unit


def test_progress_line_and_eta_after_resume():
    lines = []
    p = Progress(lines.append, start_step=10, label="[job 1/2] ")
    p.tty = False
    p(12, 50, 4.0)  # 2 steps in 4 s -> 2 s/step, 38 steps left
    assert lines == ["[job 1/2] step 12/50  2.00 s/step  ETA 1:16"]
    assert format_seconds(3725) == "1:02:05"


def test_quiet_progress_prints_nothing():
    lines = []
    p = Progress(lines.append, enabled=False)
    p(1, 2, 1.0)
    assert lines == []
