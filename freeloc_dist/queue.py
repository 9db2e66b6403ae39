"""Prompt queues: a file of render jobs, parsed and validated up front, with safe output names.

File format (`--prompts FILE`), one job per non-blank line; lines starting with `#` are comments:
    a red fox running through fresh snow
    {"prompt": "a lighthouse in a storm", "seed": 3, "frames": 161, "output": "storm/lighthouse.mp4"}
A plain line is a prompt with the command line's / config's seed and frames. A JSON line may set `seed`,
`frames` and `output` (a relative .mp4 path inside the output folder), and may give a `storyboard` (a prompt
schedule file, freeloc_dist.storyboard; a relative path is relative to the prompts file's folder) instead of
`prompt`: {"storyboard": "boards/fox.yaml", "seed": 1}. A job without a storyboard renders its prompt even where
the config names one. Default output names are a slug of
the prompt plus the seed (`a-red-fox-running-through-fresh-snow-s0.mp4`), so nothing a prompt contains can
name a path outside the output folder. Every problem is one line naming the file, the line and the field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path, PurePosixPath

from .errors import UserError

SLUG_MAX = 60
_JOB_KEYS = ("prompt", "storyboard", "seed", "frames", "output")


class QueueError(UserError, ValueError):
    """A problem in a prompts file; one line naming file, line and field."""


@dataclasses.dataclass(frozen=True)
class Job:
    line: int  # 1-based line in the prompts file
    prompt: str
    seed: int | None  # None: the config's / command line's
    frames: int | None
    output: Path  # absolute, inside the output folder
    storyboard: Path | None = None  # a prompt schedule instead of `prompt` (then "")


def slugify(text: str, max_len: int = SLUG_MAX) -> str:
    """Lowercase ASCII words joined by '-', at most max_len characters; 'video' if nothing is left."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    slug = ""
    for w in words:
        candidate = f"{slug}-{w}" if slug else w
        if len(candidate) > max_len:
            break
        slug = candidate
    return slug or (words[0][:max_len] if words else "video")


def job_output_name(prompt: str, seed: int) -> str:
    """`<slug>-s<seed>.mp4`; a prompt with non-ASCII characters (which the slug drops: every Chinese prompt
    would be `video`) also gets 8 hex digits of its SHA-256, so different prompts get different names."""
    slug = slugify(prompt)
    if not prompt.isascii():
        slug += "-" + hashlib.sha256(prompt.strip().encode()).hexdigest()[:8]
    return f"{slug}-s{seed}.mp4"


def _safe_relative(where: str, value) -> PurePosixPath:
    if not isinstance(value, str) or not value.strip():
        raise QueueError(f"{where}: output={value!r}: expected a relative .mp4 path")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise QueueError(f"{where}: output={value!r}: control characters (NUL, newline, ...) are not allowed")
    rel = PurePosixPath(value.replace("\\", "/"))
    if rel.is_absolute() or ".." in rel.parts or rel.suffix.lower() != ".mp4" or value.startswith("~"):
        raise QueueError(f"{where}: output={value!r}: must be a relative .mp4 path inside the output folder "
                         f"(no '..', not absolute)")
    return rel


def _int_field(where: str, obj: dict, key: str) -> int | None:
    if key not in obj:
        return None
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise QueueError(f"{where}: {key}={v!r}: expected an integer")
    return v


def _storyboard_field(where: str, obj: dict, prompts_file: Path) -> Path | None:
    if "storyboard" not in obj:
        return None
    value = obj["storyboard"]
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise QueueError(f"{where}: storyboard={value!r}: expected a path to a storyboard file")
    path = Path(value).expanduser()
    return path if path.is_absolute() else prompts_file.parent / path


def parse_prompts(path: str | Path, out_dir: str | Path, default_seed: int) -> list[Job]:
    """Read and validate a prompts file; outputs resolve inside `out_dir`. Raises QueueError."""
    path, out_dir = Path(path), Path(out_dir).resolve()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise QueueError(f"prompts file {path}: not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise QueueError(f"prompts file {path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    jobs: list[Job] = []
    seen: dict[Path, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{number}"
        seed = frames = output = storyboard = None
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise QueueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            unknown = [k for k in obj if k not in _JOB_KEYS]
            if unknown:
                raise QueueError(f"{where}: {unknown[0]}: unknown key (expected one of: {', '.join(_JOB_KEYS)})")
            prompt, storyboard = obj.get("prompt"), _storyboard_field(where, obj, path)
            if storyboard is not None:
                if prompt is not None:
                    raise QueueError(f"{where}: prompt: not allowed with storyboard (its entries are the prompts)")
                prompt = ""
            elif not isinstance(prompt, str) or not prompt.strip():
                raise QueueError(f"{where}: prompt: missing or not a non-empty string")
            seed, frames = _int_field(where, obj, "seed"), _int_field(where, obj, "frames")
            if seed is not None and not 0 <= seed < 2**63:
                raise QueueError(f"{where}: seed={seed}: must be in [0, 2**63)")
            if "output" in obj:
                output = out_dir / _safe_relative(where, obj["output"])
        else:
            prompt = line
        if output is None:
            name = prompt if storyboard is None else storyboard.stem
            output = out_dir / job_output_name(name, default_seed if seed is None else seed)
        output = output.resolve()
        if out_dir not in output.parents:  # belt and braces (symlinked folders inside out_dir)
            raise QueueError(f"{where}: output {output} is outside the output folder {out_dir}")
        if output in seen:
            raise QueueError(f"{where}: output {output.name!r} is also written by line {seen[output]}; "
                             f"give a different seed or output")
        seen[output] = number
        jobs.append(Job(number, prompt.strip(), seed, frames, output, storyboard))
    if not jobs:
        raise QueueError(f"prompts file {path}: no prompts")
    return jobs
