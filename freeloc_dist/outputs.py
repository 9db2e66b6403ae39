"""Every file a render writes, checked before any weight loads, and owned by one render at a time.

`check_outputs` (preflight, every rank): for each job, the mp4, its JSON sidecar, the checkpoint, the
latents (--save-latents) and the temporary names they are written under (freeloc_dist.video.atomic_path:
`.<stem>.<8 random>.tmp<suffix>` in the same folder) must land in a folder that exists or can be made and
is writable, must not be a directory, and must not name the same file as another output. Nothing is created
here, so a run refused later (bad weights, a held lock) leaves no empty folder behind.

`OutputClaim` (rank 0, after the checks, before the weights): makes the missing folders, takes an exclusive
lock beside each output (`.<name>.lock`, holding `pid host`), and deletes the temporary files a killed
render left for that output (the lock proves no live render is writing them). A lock held by a live process
is a user error naming the holder; one left by a dead process is free (fcntl locks die with their
process) and is taken over. On release the locks go, and so do the folders it made if they stayed empty.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import socket
import tempfile
from pathlib import Path

from .cli import UserError

TMP_RANDOM = r"[a-z0-9_]{8}"  # tempfile.mkstemp's random part


def sidecar_path(output: Path) -> Path:
    return output.with_suffix(".json")


def lock_path(output: Path) -> Path:
    return output.parent / f".{output.name}.lock"


def tmp_pattern(final: Path) -> re.Pattern:
    """The temporary names atomic_path gives `final` (and no other output's)."""
    return re.compile(rf"^\.{re.escape(final.stem)}\.{TMP_RANDOM}\.tmp{re.escape(final.suffix)}$")


def job_files(cfg, save_latents: Path | None) -> dict[str, Path]:
    """{role: path} of every file one job writes."""
    from .checkpoint import checkpoint_path

    files = {"output": cfg.output, "sidecar": sidecar_path(cfg.output), "checkpoint": checkpoint_path(cfg),
             "lock": lock_path(cfg.output)}
    if save_latents is not None:
        files["--save-latents"] = Path(save_latents)
    return {role: Path(os.path.abspath(p)) for role, p in files.items()}


def _writable_folder(path: Path) -> str | None:
    """Why files cannot be created in path's folder (None: they can, or the folder can be made)."""
    folder = path.parent
    while not folder.exists():
        if folder.is_symlink():
            return f"{folder} is a broken link"
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is not a folder"
    try:  # a real file, not os.access: root passes access() on a read-only mount or in /proc
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".freeloc-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"folder {folder} is not writable: {e.strerror}"
    return None


def check_output_file(path: Path, role: str) -> None:
    """Raise UserError (one line, naming `role` and the path) if a file written atomically at `path` (a temporary
    name in its folder, then a rename) cannot be: it is a directory, or its folder cannot be made or written.
    Nothing is created."""
    path = Path(os.path.abspath(path))
    if path.is_dir():
        raise UserError(f"{role} {path}: is a directory")
    problem = _writable_folder(path)
    if problem is not None:
        raise UserError(f"{role} {path}: cannot be written ({problem})")


def check_outputs(configs, save_latents: Path | None, *, queue: bool) -> None:
    """Raise UserError (one line) if any output of any job cannot be written or collides with another."""
    owners: dict[Path, str] = {}
    for index, cfg in enumerate(configs):
        label = f"job {index + 1}: " if queue else ""
        for role, path in job_files(cfg, save_latents).items():
            if path in owners:
                raise UserError(f"{label}{role} {path}: is also the {owners[path]}; give them different paths")
            owners[path] = f"{label}{role}"
            check_output_file(path, f"{label}{role}")


class OutputClaim:
    """The folders, locks and leftover clean-up of a run's outputs (rank 0 only); a context manager."""

    def __init__(self, configs, save_latents: Path | None):
        self.jobs = [job_files(cfg, save_latents) for cfg in configs]
        self.made: list[Path] = []
        self.held: list[tuple[Path, int]] = []

    def __enter__(self) -> "OutputClaim":
        try:
            for files in self.jobs:
                for path in files.values():
                    self._make_folder(path.parent)
                self._lock(files["lock"], files["output"])
            for files in self.jobs:
                for role in ("output", "sidecar", "checkpoint", "--save-latents"):
                    if role in files:
                        remove_leftovers(files[role])
        except BaseException:
            self.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _make_folder(self, folder: Path) -> None:
        missing = []
        while not folder.exists():
            missing.append(folder)
            folder = folder.parent
        for f in reversed(missing):
            try:
                f.mkdir()
            except FileExistsError:
                continue
            except OSError as e:
                raise UserError(f"cannot create the folder {f}: {e.strerror}") from None
            self.made.append(f)

    def _lock(self, path: Path, output: Path) -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot create the lock {path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise UserError(f"{output}: another render is writing it (lock {path} held by {holder}); "
                                f"wait for it or give another output") from None
            raise UserError(f"cannot lock {path}: {e.strerror}") from None
        # Free (no lock, or a dead holder's file): ours now; record who holds it for the next one's message.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} host {socket.gethostname()}\n".encode(), 0)
        self.held.append((path, fd))

    def release(self) -> None:
        for path, fd in self.held:
            try:
                path.unlink(missing_ok=True)  # before the unlock: a waiter that then locks makes a new file
            finally:
                os.close(fd)
        self.held.clear()
        for folder in reversed(self.made):
            try:
                folder.rmdir()  # only if empty: a render that wrote nothing leaves no folder
            except OSError:
                pass
        self.made.clear()


def remove_leftovers(final: Path) -> list[Path]:
    """Delete the temporary files of `final` a killed render left (call only while holding its lock)."""
    if not final.parent.is_dir():
        return []
    pattern, removed = tmp_pattern(final), []
    for entry in final.parent.iterdir():
        if pattern.match(entry.name) and entry.is_file():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed
