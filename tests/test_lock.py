"""requirements/lock.txt, the one list of versions (scripts/lockfile.py): the venv the tests run in is exactly the
lock, the lock satisfies the ranges pyproject.toml gives pip users, and the comparison finds every kind of drift.
"""

import os
import sys

import pytest
import tomllib
from _scripts import load_script
from packaging.requirements import Requirement

pytestmark = pytest.mark.unit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
lockfile = load_script("scripts/lockfile.py")


@pytest.fixture(scope="module")
def lock():
    return lockfile.read_lock()


def test_this_venv_is_the_lock(lock):
    problems, extra = lockfile.compare(lock, lockfile.installed())
    assert (problems, extra) == ([], []), f"{sys.prefix} differs from the lock (make setup installs it)"


def test_every_locked_package_has_a_hash(lock):
    assert all(hashes for _, hashes in lock.values()), [n for n, (_, h) in lock.items() if not h]
    assert all(len(h) == len("sha256:") + 64 for _, hashes in lock.values() for h in hashes)


def test_lock_satisfies_the_ranges_pip_users_get(lock):
    project = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]
    wanted = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    for line in wanted:
        req = Requirement(line)
        name = lockfile.canonical(req.name)
        assert name in lock, f"{req.name} is a dependency in pyproject.toml but not in the lock"
        assert req.specifier.contains(lock[name][0], prereleases=True), f"lock {name}=={lock[name][0]} vs {line}"


def test_lock_input_pins_hold(lock):
    for line in open(os.path.join(ROOT, "requirements", "lock.in")):
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            req = Requirement(line)
            assert req.specifier.contains(lock[lockfile.canonical(req.name)][0], prereleases=True), line


def test_compare_finds_each_kind_of_drift(lock):
    have = {name: version for name, (version, _) in lock.items()}
    assert lockfile.compare(lock, have) == ([], [])
    newer = {**have, "transformers": "99.0.0"}
    assert lockfile.compare(lock, newer)[0] == [f"transformers: locked {lock['transformers'][0]}, installed 99.0.0"]
    missing = {k: v for k, v in have.items() if k != "pyyaml"}
    assert lockfile.compare(lock, missing)[0] == [f"pyyaml: locked {lock['pyyaml'][0]}, not installed"]
    assert lockfile.compare(lock, {**have, "leftover": "1.0", "pip": "23.2.1"}) == ([], ["leftover"])


def test_cuda_torch_of_the_locked_release_is_accepted_and_no_other(lock):
    have = {name: version for name, (version, _) in lock.items()}
    release = lock["torch"][0].split("+")[0]
    cuda = {**have, "torch": release, "nvidia-cublas": "13.1.0", "triton": "3.7.0"}
    assert lockfile.compare(lock, cuda) == ([], [])
    other = {**have, "torch": "2.99.0", "nvidia-cublas": "13.1.0"}
    problems, extra = lockfile.compare(lock, other)
    assert problems == [f"torch: locked {lock['torch'][0]}, installed 2.99.0"] and extra == ["nvidia-cublas"]


def test_pins_name_unknown_packages(lock):
    assert lockfile.pins(["PyYAML"], lock)[0].startswith(f"pyyaml=={lock['pyyaml'][0]} --hash=sha256:")
    with pytest.raises(KeyError, match="not-a-package is not in requirements/lock.txt"):
        lockfile.pins(["not-a-package"], lock)
