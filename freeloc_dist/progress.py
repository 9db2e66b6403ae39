"""Progress on rank 0: one line per sampling step with seconds per step and the time left.

Lines rather than a carriage-return bar, because long renders run under Slurm where stderr is a log file;
on a terminal the line is redrawn in place. Seconds per step count only the steps run in this process, so
the estimate stays right after a resume.
"""

from __future__ import annotations

import sys
from typing import Callable


def format_seconds(seconds: float) -> str:
    seconds = int(round(max(0.0, seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """A sampling.StepCallback: `progress(step, total, seconds_since_start)`."""

    def __init__(self, log: Callable[[str], None], *, start_step: int = 0, enabled: bool = True, label: str = ""):
        self.log = log
        self.start_step = start_step
        self.enabled = enabled
        self.label = label
        self.tty = sys.stderr.isatty()

    def __call__(self, step: int, total: int, seconds: float) -> None:
        if not self.enabled:
            return
        done = step - self.start_step
        per_step = seconds / done if done > 0 else 0.0
        line = (f"{self.label}step {step}/{total}  {per_step:.2f} s/step  "
                f"ETA {format_seconds(per_step * (total - step))}")
        if self.tty:
            end = "\n" if step == total else ""
            print(f"\r{line}", end=end, file=sys.stderr, flush=True)
        else:
            self.log(line)
