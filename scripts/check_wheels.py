"""Check a folder of wheels for the H200 machine (scripts/gpu_wheels.sh): one pure-python wheel per pin,
nothing else, and every requirement of every wheel met, for python 3.12 on linux x86_64, either by the
set itself (version checked) or by a package that machine is known to have (version not knowable from
here: listed as unverified). Exit 1 with `error: ...` lines otherwise.

    python scripts/check_wheels.py DIR NAME==VERSION ...
"""

from __future__ import annotations

import os
import sys
import zipfile
from email.parser import Parser

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename

# What the H200 machine has (issue 17), and what those packages themselves pull in.
H200_HAS = {
    **dict.fromkeys(["torch", "triton", "transformers", "accelerate", "safetensors", "numpy", "pytest", "imageio"],
                    "installed there"),
    **dict.fromkeys(["filelock", "fsspec", "sympy", "networkx", "jinja2"], "a torch dependency"),
    **dict.fromkeys(["packaging", "pyyaml", "regex", "tokenizers", "tqdm", "typer"], "a transformers 5.17 dependency"),
    "hf-xet": "a dependency of the huggingface_hub 1.x that transformers 5.17 requires",
    "pillow": "an imageio dependency",
    "psutil": "an accelerate dependency",
}
# Requirements of the H200's own packages on packages this set shadows (from their wheels' metadata).
H200_NEEDS = {"huggingface-hub": ("<2.0,>=1.5.0", "transformers 5.17"), "typing-extensions": (">=4.10.0", "torch 2.11")}
TARGET = {"python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux", "os_name": "posix",
          "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
          "platform_python_implementation": "CPython", "extra": ""}


def metadata(path: str):
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return Parser().parsestr(z.read(name).decode())


def check(folder: str, pins: list[str]) -> tuple[list[str], list[str]]:
    errors, notes = [], []
    wheels = {}
    for f in sorted(os.listdir(folder)):
        if not f.endswith(".whl"):
            continue
        name, version, _, tags = parse_wheel_filename(f)
        if not all(t.abi == "none" and t.platform == "any" for t in tags):
            errors.append(f"{f}: not a pure-python wheel")
        wheels[canonicalize_name(name)] = (str(version), os.path.join(folder, f))
    wanted = {canonicalize_name(p.split("==")[0]): p.split("==")[1] for p in pins}
    for name, version in wanted.items():
        if name not in wheels:
            errors.append(f"{name}=={version}: no wheel in {folder}")
        elif wheels[name][0] != version:
            errors.append(f"{name}: wheel is {wheels[name][0]}, pinned {version}")
    for name in sorted(set(wheels) - set(wanted)):
        errors.append(f"{os.path.basename(wheels[name][1])}: not pinned (stale?)")
    for name, (need, who) in H200_NEEDS.items():
        if name in wheels and wheels[name][0] not in SpecifierSet(need):
            errors.append(f"{name} {wheels[name][0]}: {who} on the H200 needs {need}")
    for name, (version, path) in sorted(wheels.items()):
        meta = metadata(path)
        python = meta.get("Requires-Python")
        if python and "3.12" not in SpecifierSet(python):
            errors.append(f"{name} {version}: Requires-Python {python} excludes 3.12")
        for line in meta.get_all("Requires-Dist") or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(TARGET):
                continue
            dep = canonicalize_name(req.name)
            if dep in wheels:
                if req.specifier and wheels[dep][0] not in req.specifier:
                    errors.append(f"{name} {version} needs {req}, the set has {dep} {wheels[dep][0]}")
            elif dep in H200_HAS:
                if req.specifier:
                    notes.append(f"unverified: {name} needs {req}; {dep} is {H200_HAS[dep]}, version unknown here")
            else:
                errors.append(f"{name} {version} needs {req}: neither in the set nor on the H200")
    return errors, notes


def main():
    folder, pins = sys.argv[1], sys.argv[2:]
    errors, notes = check(folder, pins)
    for n in notes:
        print(n)
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    if errors:
        sys.exit(1)
    print(f"ok: {len(pins)} pure-python wheels in {folder}, every requirement met by the set or the H200's packages")


if __name__ == "__main__":
    main()
