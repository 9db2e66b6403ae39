"""What every launch/ entry point shares: one-line user errors with exit code 2, rank-prefixed logging,
and the documented exit codes.

A user error (bad flag, config, prompts file, model directory, profile) is a `UserError` (freeloc_dist.errors:
config.ConfigError, profile.ProfileError, ... all derive from it) and `main_with_exit_codes` turns it
into exactly one stderr line `error: ...` and exit code 2. Entry points validate everything on every rank
before joining a process group, so every rank prints the same line and none is left waiting.
This module imports nothing heavy (no torch), so a bad flag fails in milliseconds.

Exit codes (documented in README "Production rendering"):
    0   success
    1   a job of a prompt queue failed (the rest of the queue ran); a render that could not finish (a write
        failed, NaN latents: one line `error: ...`); or an internal error (traceback)
    2   user error, one line on stderr
    75  preempted (SIGTERM / SIGUSR1): a checkpoint was written; rerun with --resume  (EX_TEMPFAIL)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable

from .errors import UserError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PREEMPTED = 75


class RenderFailed(Exception):
    """A render that could not finish (a write failed, sampling diverged); one line `error: ...`, exit 1.
    Not a user error: the same command may succeed later (disk space, a transient failure)."""


class Preempted(Exception):
    """The render stopped on a preemption signal after writing a checkpoint; exit code 75."""

    def __init__(self, step: int, checkpoint):
        super().__init__(f"preempted after step {step}; checkpoint {checkpoint}; rerun with --resume")
        self.step = step
        self.checkpoint = checkpoint


class OneLineParser(argparse.ArgumentParser):
    """argparse that raises UserError instead of printing usage and exiting."""

    def error(self, message: str):
        raise UserError(message)


CONFIG_DEST = "config:"  # argparse dest prefix of a flag that sets a config key: dest = prefix + dotted key


def config_flag(parser, flag: str, key: str, *, prefix: str = CONFIG_DEST, **kwargs) -> None:
    """A flag that overrides config key `key` (a dotted path such as sampling.seed): the flag table is the
    argparse declaration itself, and `overrides_of` turns the parsed flags into the config's own overrides."""
    kwargs.setdefault("metavar", flag.lstrip("-").upper().replace("-", "_"))
    parser.add_argument(flag, dest=prefix + key, **kwargs)


def overrides_of(args: argparse.Namespace, prefix: str = CONFIG_DEST) -> dict:
    """{dotted key: value} for every flag declared with `config_flag(prefix=prefix)` that was given."""
    return {dest[len(prefix):]: value for dest, value in vars(args).items()
            if dest.startswith(prefix) and value is not None}


def given(args: argparse.Namespace, key: str, prefix: str = CONFIG_DEST):
    """The value of the config flag for `key` (None if not given)."""
    return getattr(args, prefix + key)


def rank_prefix() -> str:
    """"[rank R] " under a multi-process launch (from torchrun's environment), else ""."""
    world = os.environ.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) > 1:
        return f"[rank {os.environ.get('RANK', '?')}] "
    return ""


def log(message: str) -> None:
    print(f"{rank_prefix()}{message}", file=sys.stderr, flush=True)


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def is_user_error(e: BaseException) -> bool:
    return isinstance(e, UserError)


def main_with_exit_codes(run: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Call `run(argv)`; map user errors to one line + 2 and preemption to 75. `run` returns an exit code
    (None means 0)."""
    try:
        code = run(argv)
    except Preempted as e:
        log(f"stopped: {e}")
        return EXIT_PREEMPTED
    except RenderFailed as e:
        print(f"{rank_prefix()}error: {first_line(e)}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    except Exception as e:
        if not is_user_error(e):
            raise
        print(f"{rank_prefix()}error: {first_line(e)}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    return EXIT_OK if code is None else int(code)


def cwd_path(text: str) -> str:
    """A path given on the command line: relative to the working directory (config paths: to the repo)."""
    return str(Path.cwd() / text)
