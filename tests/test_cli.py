"""launch/generate.py as a user runs it: user errors are one line on stderr and exit code 2, before any
model loading; a small render writes an mp4 with the requested frame count."""

import os
import subprocess
import sys

import pytest
import yaml

from freeloc_dist.config import REPO_ROOT

pytestmark = pytest.mark.cli

GENERATE = REPO_ROOT / "launch" / "generate.py"
TINY = yaml.safe_load((REPO_ROOT / "configs" / "tiny-random.yaml").read_text())


# A hang guard, not a speed check: the default render took 118-197 s here with the machine loaded (load ~20).
def run(args, cwd=REPO_ROOT, env_extra=None, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, str(GENERATE), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def write_config(tmp_path, edit):
    raw = yaml.safe_load(yaml.safe_dump(TINY))
    raw["profile"] = None
    edit(raw)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def assert_user_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


CONFIG_ERRORS = [
    ("unknown-key", lambda c: c["video"].update(length=3), "video.length"),
    ("unknown-top-key", lambda c: c.update(gpus=8), "gpus"),
    ("wrong-type", lambda c: c["sampling"].update(steps="ten"), "sampling.steps"),
    ("bool-as-int", lambda c: c["video"].update(fps=True), "video.fps"),
    ("frames-not-4k+1", lambda c: c["video"].update(frames=64), "video.frames=64: must be 4k+1 (e.g. 61 or 65)"),
    ("height-not-16", lambda c: c["video"].update(height=72), "video.height"),
    ("width-not-16", lambda c: c["video"].update(width=100), "video.width"),
    ("model-dir-missing", lambda c: c["model"].update(path="/nonexistent/wan"), "model.path"),
]


@pytest.mark.parametrize("edit,needle", [c[1:] for c in CONFIG_ERRORS], ids=[c[0] for c in CONFIG_ERRORS])
def test_config_errors_exit_2(tmp_path, edit, needle):
    proc = run(["--config", write_config(tmp_path, edit)])
    assert_user_error(proc, needle)


FLAG_ERRORS = [
    ("frames-flag", ["--frames", "64"], {}, "video.frames=64"),
    ("width-flag", ["--width", "50"], {}, "video.width=50"),
    ("unknown-flag", ["--no-such-flag"], {}, "--no-such-flag"),
    ("frames-and-seconds", ["--frames", "9", "--seconds", "2"], {}, "--seconds"),
    ("negative-seconds", ["--seconds", "-1"], {}, "--seconds"),
    ("bad-backend", ["--backend", "xformers"], {}, "--backend"),
    ("missing-profile-flag", ["--profile", "missing.yaml"], {}, "missing.yaml"),
    ("world-size", [], {"WORLD_SIZE": "two"}, "WORLD_SIZE"),
    ("cfg-degree", ["--cfg-degree", "3"], {}, "--cfg-degree"),
    ("strategy", ["--strategy", "xdit"], {}, "--strategy"),
]


@pytest.mark.parametrize("args,env,needle", [c[1:] for c in FLAG_ERRORS], ids=[c[0] for c in FLAG_ERRORS])
def test_flag_errors_exit_2(tmp_path, args, env, needle):
    cfg = write_config(tmp_path, lambda c: None)
    assert_user_error(run(["--config", cfg, *args], cwd=tmp_path, env_extra=env), needle)


def test_missing_config_file_exit_2(tmp_path):
    assert_user_error(run(["--config", tmp_path / "nope.yaml"]), "nope.yaml")


def test_missing_profile_in_config_exit_2(tmp_path):
    cfg = write_config(tmp_path, lambda c: c.update(profile="configs/profiles/does-not-exist.yaml"))
    assert_user_error(run(["--config", cfg]), "does-not-exist.yaml")


def test_small_render(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    from freeloc_dist.video import read_mp4_frame_count

    cfg = write_config(tmp_path, lambda c: c["model"].update(path=str(tiny_model_dir)))
    proc = run(["--config", cfg, "--frames", 13, "--steps", 2, "--height", 32, "--width", 48, "--seed", 3,
                "--out", "sub/v.mp4", "--save-latents", "lat.safetensors", "--prompt", "a cat"],
               cwd=tmp_path)  # CLI paths are relative to the working directory
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "sub" / "v.mp4"
    assert proc.stdout.strip() == str(out)
    assert "step 2/2" in proc.stderr
    assert read_mp4_frame_count(out) == 13
    assert load_file(tmp_path / "lat.safetensors")["latents"].shape == (1, 4, 4, 4, 6)


def test_default_tiny_config_with_freeloc(tmp_path):
    """The embedded default, FreeLOC on (F=20 latent frames > the tiny profile's trained length)."""
    from freeloc_dist.video import read_mp4_frame_count

    proc = run(["--config", "configs/tiny-random.yaml", "--steps", 2, "--out", tmp_path / "t.mp4"])
    assert proc.returncode == 0, proc.stderr
    assert "FreeLOC: " in proc.stderr and "off" not in proc.stderr
    assert read_mp4_frame_count(tmp_path / "t.mp4") == 77
