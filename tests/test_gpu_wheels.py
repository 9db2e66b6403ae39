"""scripts/gpu_wheels.sh: the wheel set for the H200 machine downloads, is complete, installs offline.

The set's versions are requirements/lock.txt's, and it is installed over this venv, which must itself hold the
lock's versions (as the GPU machine holds its own fixed set): so the outcome does not depend on the day's index.

What is testable here (python 3.11, no GPU): the set is pure-python and pinned, every requirement of
every wheel is met by the set or by a package the H200 has (scripts/check_wheels.py, for python 3.12
markers), `pip install --no-index --no-deps --target` takes it exactly as on the H200 (with
--python-version 3.12), and the installed diffusers, ahead of this venv's on PYTHONPATH, imports
WanTransformer3DModel. Not testable here: the import under that machine's python 3.12 and its
torch 2.11, and the versions of its own packages (check_wheels.py lists them as unverified).
The download is cached in pytest's cache folder; it is skipped only when PyPI is unreachable.
"""

import hashlib
import os
import shutil
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_wheels.sh")


def _pins():
    """The set's pins, name==version, as the script takes them from the lock."""
    names = open(SCRIPT).read().split("NAMES=(")[1].split(")")[0].split()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "lockfile.py"), "pins", *names],
                          capture_output=True, text=True, check=True)
    return [line.split()[0] for line in proc.stdout.splitlines()]


def _pypi_reachable():
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def wheels(request):
    # One cached folder per pin set: a refreshed lock starts a fresh folder instead of meeting stale wheels.
    key = hashlib.sha256(" ".join(_pins()).encode()).hexdigest()[:12]
    folder = str(request.config.cache.mkdir(f"gpu_wheels-{key}"))
    proc = subprocess.run(["bash", SCRIPT, folder], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHON": sys.executable})
    if proc.returncode != 0 and "pip download" not in proc.stderr and not _pypi_reachable():
        pytest.skip("PyPI unreachable (pypi.org:443) and the locked wheel set is not in pytest's cache")
    return folder, proc


def test_set_is_pinned_pure_and_complete(wheels):
    folder, proc = wheels
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("every requirement met by the set or the H200's packages")
    assert sorted(f for f in os.listdir(folder) if f.endswith(".whl")) and len(os.listdir(folder)) == len(_pins())


def test_installs_offline_and_imports_wan(wheels, tmp_path):
    folder, _ = wheels
    lock = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "lockfile.py"), "check"],
                          capture_output=True, text=True)
    assert lock.returncode == 0, "this venv is not the lock's (make setup):\n" + lock.stderr[-2000:]
    target = tmp_path / "gw"
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(target),
                    "--python-version", "3.12", "--only-binary=:all:", *files], check=True, timeout=300)
    code = ("import diffusers, huggingface_hub, requests; from diffusers import WanTransformer3DModel; "
            "print(diffusers.__file__, huggingface_hub.__file__, requests.__file__, diffusers.__version__, "
            "huggingface_hub.__version__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(target)}, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    *files_used, dver, hver = proc.stdout.split()
    assert all(f.startswith(str(target)) for f in files_used), files_used
    locked = dict(p.split("==") for p in _pins())
    assert (dver, hver) == (locked["diffusers"], locked["huggingface-hub"])


def test_checker_rejects_a_set_missing_a_requirement(wheels, tmp_path):
    folder, _ = wheels
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        from check_wheels import check
    finally:
        sys.path.pop(0)
    for f in os.listdir(folder):
        if not f.startswith("requests-"):
            shutil.copy(os.path.join(folder, f), tmp_path)
    pins = [p for p in _pins() if not p.startswith("requests==")]
    assert len(pins) == len(_pins()) - 1
    errors, _ = check(str(tmp_path), pins)
    assert errors and all("needs requests" in e for e in errors), errors
    assert check(folder, _pins())[0] == []
