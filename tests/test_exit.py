"""freeloc_dist.parallel.exit.exit_process, which every entry point ends with: under torchrun (WORLD_SIZE > 1)
it ends the process without the interpreter's finalization, after flushing what the process wrote, so no gloo
worker thread can ask for the GIL of a finalizing interpreter (SIGABRT after a run that succeeded: 9 of 15
torchrun worlds with a plain exit, 0 of 15 through exit_process, `bench/exit_race.py`). Outside torchrun it is
sys.exit. The finalization is observed through an atexit hook, which runs in it."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.cli
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = ("import atexit, sys; atexit.register(lambda: print('finalized', flush=True)); print('written', end=''); "
          "sys.stderr.write('logged'); from freeloc_dist.parallel.exit import exit_process; exit_process(3)")


def _run(world_size):
    # Buffered output (as under torchrun, whose ranks write to pipes), so a missing flush loses it.
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "PYTHONUNBUFFERED")}
    if world_size is not None:
        env["WORLD_SIZE"] = str(world_size)
    return subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=120)


def test_under_torchrun_the_process_ends_without_finalization_and_with_its_output():
    proc = _run(2)
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "written", "logged")


def test_outside_torchrun_it_is_a_plain_exit():
    proc = _run(None)
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "writtenfinalized\n", "logged")
