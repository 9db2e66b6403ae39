"""The dependency lock (requirements/lock.txt, written by `make lock`): read it, compare an environment with
it, and hand out its pins for the other environments the project builds (the GPU machine's wheel set).
The lock is the one list of versions; nothing else in the repository names a dependency's version.

    python scripts/lockfile.py check [--uninstall-list]   # this python's packages against the lock; exit 1 on a
                                                          # mismatch; --uninstall-list prints installed extras
    python scripts/lockfile.py pins NAME ...              # `name==version --hash=...` lines, for pip -r
"""

from __future__ import annotations

import os
import re
import sys
import sysconfig
from importlib import metadata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCK = os.path.join(ROOT, "requirements", "lock.txt")
# Installed but deliberately not locked: the venv's own installer, and the project itself (editable).
UNLOCKED = {"pip", "freeloc-dist"}
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")
_HASH = re.compile(r"--hash=(sha256:[0-9a-f]{64})")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: str = LOCK) -> dict[str, tuple[str, list[str]]]:
    """{canonical name: (version, [sha256 hashes])} for every package of the lock."""
    pins: dict[str, tuple[str, list[str]]] = {}
    current = None
    for line in open(path):
        match = _PIN.match(line)
        if match:
            current = canonical(match.group(1))
            pins[current] = (match.group(2).rstrip(" \\"), [])
        elif current and line.startswith(" "):
            pins[current][1].extend(_HASH.findall(line))
        else:
            current = None
    if not pins:
        raise ValueError(f"{path}: no pinned packages")
    return pins


def installed() -> dict[str, str]:
    """{canonical name: version} of what is installed in this environment's site-packages (not whatever else is
    on sys.path at the time, e.g. setuptools' vendored copies once something imported setuptools)."""
    paths = sorted({sysconfig.get_paths()[key] for key in ("purelib", "platlib")})
    return {canonical(d.metadata["Name"]): d.version for d in metadata.distributions(path=paths)
            if d.metadata["Name"]}


def compare(lock: dict[str, tuple[str, list[str]]], have: dict[str, str]) -> tuple[list[str], list[str]]:
    """(differences as one line each, installed packages the lock does not name)."""
    problems = []
    for name, (version, _) in sorted(lock.items()):
        if name not in have:
            problems.append(f"{name}: locked {version}, not installed")
        elif have[name] != version and not _cuda_torch(name, version, have[name]):
            problems.append(f"{name}: locked {version}, installed {have[name]}")
    cuda = "torch" in lock and "torch" in have and _cuda_torch("torch", lock["torch"][0], have["torch"])
    extra = sorted(n for n in set(have) - set(lock) - UNLOCKED
                   if not (cuda and (n.startswith("nvidia-") or n in ("triton", "cuda-bindings", "cuda-pathfinder"))))
    return problems, extra


def _cuda_torch(name: str, locked: str, have: str) -> bool:
    """On a GPU host scripts/setup_venv.sh installs torch's CUDA build of the locked release in place of the
    locked CPU build (same public version, another local label); torch pins its CUDA wheels exactly itself."""
    return name == "torch" and have.split("+")[0] == locked.split("+")[0] and not have.endswith("+cpu")


def pins(names: list[str], lock: dict[str, tuple[str, list[str]]]) -> list[str]:
    lines = []
    for name in names:
        key = canonical(name)
        if key not in lock:
            raise KeyError(f"{name} is not in {os.path.relpath(LOCK, ROOT)}")
        version, hashes = lock[key]
        lines.append(" ".join([f"{key}=={version}", *(f"--hash={h}" for h in hashes)]))
    return lines


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("check", "pins"):
        print(__doc__, file=sys.stderr)
        return 2
    lock = read_lock()
    if argv[0] == "check":
        problems, extra = compare(lock, installed())
        if "--uninstall-list" in argv:
            print("\n".join(extra))
            return 0
        for line in problems + [f"{name}: installed, not in the lock" for name in extra]:
            print(f"lock: {line}", file=sys.stderr)
        if problems or extra:
            print("lock: this environment does not match requirements/lock.txt (make setup installs it)",
                  file=sys.stderr)
            return 1
        print(f"lock: all {len(lock)} locked packages installed at their locked versions, nothing else")
        return 0
    try:
        print("\n".join(pins(argv[1:], lock)))
    except KeyError as err:
        print(f"lock: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
