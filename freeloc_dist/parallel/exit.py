"""How an entry point's process ends (launch/*.py, the dist test workers, the dist benches): exit_process.

Under torchrun (WORLD_SIZE > 1) the interpreter's finalization is skipped. A gloo worker thread drops a finished
collective's work, and with it the last C++ reference to the work's tensors, just after the caller's wait()
returns; dropping it needs the GIL, and a thread that asks for the GIL once the main thread has begun finalizing is
unwound through noexcept code: "terminate called without an active exception", SIGABRT, after a run that had
succeeded (`bench/exit_race.py`: 9 of 15 torchrun worlds aborted with a plain exit, 0 of 15 through this).
Everything the process wrote is flushed first; its outputs are closed by then (their `with` blocks and
destroy_parallel have run), so only atexit hooks are skipped. Outside torchrun it is sys.exit.
No torch import here: `--help` and user errors stay cheap.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn


def exit_process(code: int) -> NoReturn:
    world_size = os.environ.get("WORLD_SIZE", "")  # not trusted: a bad value is the render's one-line error
    if world_size.isdigit() and int(world_size) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
