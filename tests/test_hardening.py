"""Issue 14's hostile-user findings, one test each: hostile configs and flags are one line and exit 2 before
any weight loads; every output path is checked first and owned by one render (a lock); a failed job on one
rank never leaves the others waiting; any length renders; resume refuses what it cannot continue."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
import yaml

from freeloc_dist.config import REPO_ROOT, ConfigError, load_render_config

GENERATE = REPO_ROOT / "launch" / "generate.py"
TINY = yaml.safe_load((REPO_ROOT / "configs" / "tiny-random.yaml").read_text())
SMALL = ["--frames", "5", "--height", "32", "--width", "32", "--steps", "1"]


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.chdir(tmp_path)
    old = os.umask(0o022)
    yield
    os.umask(old)


def write_config(tmp_path, edit=lambda c: None, name="c.yaml"):
    raw = yaml.safe_load(yaml.safe_dump(TINY))
    raw["output"] = str(tmp_path / "out" / "v.mp4")
    edit(raw)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def one_line_error(capsys, code, needle, expect=2):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == expect, err
    errors = [line for line in err if "error: " in line]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    assert needle in errors[0], errors[0]
    return errors[0]


def model_copy(tmp_path, edit_config=None, sub="transformer"):
    model = tmp_path / "model"
    shutil.copytree(REPO_ROOT / "assets" / "tiny-wan", model)
    if edit_config is not None:
        path = model / sub / "config.json"
        cfg = json.loads(path.read_text())
        edit_config(cfg)
        path.write_text(json.dumps(cfg))
    return model


# ------------------------------------------------------------------------------------------ YAML and flags
@pytest.mark.unit
def test_yaml_alias_bomb_is_refused_at_once(tmp_path):
    lines = ["a0: &a0 {" + ", ".join(f"k{j}: x" for j in range(9)) + "}"]
    for i in range(1, 9):  # 9**8 mappings once expanded: copying them ran for minutes, then MemoryError
        lines.append(f"a{i}: &a{i} {{" + ", ".join(f"k{j}: *a{i - 1}" for j in range(9)) + "}")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="aliases"):
        load_render_config(bomb)
    assert time.perf_counter() - start < 1.0


@pytest.mark.unit
def test_duplicate_keys_and_non_utf8_are_config_errors(tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text("video:\n  frames: 5\n  frames: 9\n")
    with pytest.raises(ConfigError, match="line 3: duplicate key 'frames'"):
        load_render_config(dup)
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("prompt: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_render_config(latin1)


BAD = [  # (id, argv after --config, needle); every one fails before any weight loads
    ("seconds-overflow", ["--seconds", "1e308"], "--seconds=1e+308"),
    ("steps-absurd", ["--steps", str(10**12)], "sampling.steps"),
    ("dry-run-400001-frames", ["--dry-run", "--frames", "400001"], "does not fit"),
    ("save-latents-is-out", ["--save-latents", "out/v.mp4"], "is also the output"),
    ("checkpoint-is-sidecar", ["--checkpoint", "out/v.json"], "is also the sidecar"),
    ("stock-past-rope", ["--profile", "none", "--frames", "4101", "--height", "32", "--width", "32"],
     "RoPE positions for 1024"),
]


@pytest.mark.unit
@pytest.mark.parametrize("argv,needle", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_hostile_flags_are_one_line_exit_2(generate, tmp_path, clean_env, capsys, argv, needle):
    code = generate.main(["--config", str(write_config(tmp_path)), *argv])
    one_line_error(capsys, code, needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.unit
def test_queue_output_with_nul_and_directory_outputs(generate, tmp_path, clean_env, capsys):
    cfg = write_config(tmp_path)
    queue = tmp_path / "q.txt"
    queue.write_text('{"prompt": "x", "output": "a\\u0000.mp4"}\n')
    one_line_error(capsys, generate.main(["--config", str(cfg), "--prompts", str(queue)]), "control characters")
    (tmp_path / "out" / "a-cat-s0.mp4").mkdir(parents=True)
    queue.write_text("a dog\na cat\n")
    one_line_error(capsys, generate.main(["--config", str(cfg), "--prompts", str(queue)]),
                   "job 2: output")
    out_dir = tmp_path / "out" / "v.mp4"
    out_dir.mkdir()
    one_line_error(capsys, generate.main(["--config", str(cfg)]), "is a directory")
    ckpt_dir = tmp_path / "ck"
    ckpt_dir.mkdir()
    one_line_error(capsys, generate.main(["--config", str(cfg), "--out", "o/w.mp4", "--checkpoint", "ck"]),
                   "checkpoint")


@pytest.mark.unit
def test_unwritable_output_folder_is_refused_before_loading(generate, tmp_path, clean_env, capsys):
    # /proc accepts no new files even for root (a chmod 0555 folder would not stop root)
    code = generate.main(["--config", str(write_config(tmp_path)), "--out", "/proc/v.mp4"])
    one_line_error(capsys, code, "cannot be written")


@pytest.mark.unit
def test_profile_vrpr_settings_refused_for_a_short_video(tmp_path):
    from freeloc_dist.profile import ProfileError, load_profile

    p = yaml.safe_load((REPO_ROOT / "configs" / "profiles" / "tiny-random.yaml").read_text())
    for vrpr, needle in (({"windows": [3, 2], "groups": [1, 2]}, "strictly increasing"),
                         ({"windows": [2], "groups": [2], "clip": 9}, "exceeds the trained range")):
        path = tmp_path / "p.yaml"
        path.write_text(yaml.safe_dump({**p, "vrpr": vrpr}))
        with pytest.raises(ProfileError, match=needle):
            load_profile(path)


@pytest.mark.unit
def test_non_latin_prompts_get_distinct_names():
    from freeloc_dist.queue import job_output_name

    a, b = job_output_name("一只红狐狸在雪中奔跑", 0), job_output_name("灯塔在暴风雨中", 0)
    assert a != b and a.startswith("video-") and a.endswith("-s0.mp4") and a.isascii()
    assert job_output_name("a red fox", 0) == "a-red-fox-s0.mp4"  # ASCII names unchanged


# ---------------------------------------------------------------------------------- model vs its config
@pytest.mark.unit
@pytest.mark.parametrize("edit,needle", [
    (lambda c: c.update(num_layers=2), "no such tensor"),
    (lambda c: c.update(num_layers=4), "missing from the weights"),
    (lambda c: c.update(num_attention_heads=3), "in the weights"),
], ids=["layers-lowered", "layers-raised", "heads-changed"])
def test_config_disagreeing_with_weights_is_refused(generate, tmp_path, clean_env, capsys, edit, needle):
    model = model_copy(tmp_path, edit)
    cfg = write_config(tmp_path, lambda c: c["model"].update(path=str(model)))
    line = one_line_error(capsys, generate.main(["--config", str(cfg), "--profile", "none", *SMALL]), needle)
    assert "disagrees with its weights" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.unit
def test_garbage_tokenizer_and_malicious_bin_are_one_line(generate, tmp_path, clean_env, capsys):
    model = model_copy(tmp_path)
    (model / "tokenizer" / "tokenizer.json").write_text("{ not json")
    cfg = write_config(tmp_path, lambda c: (c["model"].update(path=str(model)),
                                            c.update(output=str(tmp_path / "new" / "sub" / "v.mp4"))))
    one_line_error(capsys, generate.main(["--config", str(cfg), "--profile", "none", *SMALL]), "tokenizer/")
    assert not (tmp_path / "new").exists()  # errors while loading leave no empty output folder

    shutil.copytree(REPO_ROOT / "assets" / "tiny-wan" / "tokenizer", model / "tokenizer", dirs_exist_ok=True)
    (model / "text_encoder" / "model.safetensors").unlink()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import pickle

    (model / "text_encoder" / "pytorch_model.bin").write_bytes(pickle.dumps({"shared.weight": Evil()}))
    one_line_error(capsys, generate.main(["--config", str(cfg), "--profile", "none", *SMALL]), "text_encoder/")
    assert not marker.exists() and not (tmp_path / "new").exists()


# --------------------------------------------------------------------------------------------- resume
def saved_checkpoint(tmp_path, **changes):
    from freeloc_dist.checkpoint import Checkpoint, fingerprint, fingerprint_settings, save_checkpoint
    from freeloc_dist.preflight import latent_shape

    cfg = load_render_config(write_config(tmp_path), {"profile": None, "video.frames": 5, "video.height": 32,
                                                      "video.width": 32, "sampling.steps": 4})
    fields = dict(step=2, total_steps=4, latents=torch.zeros(latent_shape(cfg)), scheduler={},
                  rng=torch.get_rng_state(), fingerprint=fingerprint(cfg, None),
                  settings=fingerprint_settings(cfg, None))
    fields.update(changes)
    path = tmp_path / "out" / ".v.mp4.ckpt"
    save_checkpoint(path, Checkpoint(**fields))
    return cfg, path


@pytest.mark.unit
@pytest.mark.parametrize("changes,needle", [
    ({"step": 99}, "step 99 is outside 0..4"),
    ({"step": -2}, "step -2 is outside"),
    ({"latents": torch.zeros(1, 4, 7, 4, 4)}, "latents [1, 4, 7, 4, 4], this render's are [1, 4, 2, 4, 4]"),
    ({"latents": torch.full((1, 4, 2, 4, 4), float("nan"))}, "NaN"),
], ids=["step-99", "step-negative", "latent-shape", "nan-latents"])
def test_resume_refuses_bad_checkpoints(tmp_path, changes, needle):
    from freeloc_dist.cli import UserError
    from freeloc_dist.preflight import read_checkpoint

    cfg, _ = saved_checkpoint(tmp_path, **changes)
    with pytest.raises(UserError) as e:
        read_checkpoint(cfg, None)
    assert needle in str(e.value)


@pytest.mark.unit
def test_resume_checks_missing_fields_weights_and_names_the_difference(tmp_path):
    import dataclasses

    from freeloc_dist.cli import UserError
    from freeloc_dist.preflight import read_checkpoint

    cfg, path = saved_checkpoint(tmp_path)
    payload = torch.load(path, weights_only=True)
    del payload["fingerprint"]
    torch.save(payload, path)
    with pytest.raises(UserError, match="fingerprint missing"):
        read_checkpoint(cfg, None)
    cfg, path = saved_checkpoint(tmp_path)
    other = dataclasses.replace(cfg, sampling=dataclasses.replace(cfg.sampling, seed=7))
    with pytest.raises(UserError, match=r"\(sampling.seed differ\)"):
        read_checkpoint(other, None)
    # weights replaced in place (same path, same size): the fingerprint sees the new mtime
    from freeloc_dist.checkpoint import fingerprint

    model = model_copy(tmp_path)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=model))
    before = fingerprint(cfg, None)
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert fingerprint(cfg, None) != before


# ------------------------------------------------------------------------------ renders in this process
@pytest.mark.unit
def test_nan_latents_write_no_video(generate, tmp_path, clean_env, capsys, monkeypatch):
    import freeloc_dist.sampling as sampling

    real = sampling.predict_noise
    monkeypatch.setattr(sampling, "predict_noise", lambda *a, **k: real(*a, **k) * float("nan"))
    cfg = write_config(tmp_path)
    one_line_error(capsys, generate.main(["--config", str(cfg), "--profile", "none", *SMALL,
                                          "--save-latents", "out/l.safetensors"]), "NaN", expect=1)
    assert not (tmp_path / "out" / "v.mp4").exists() and not (tmp_path / "out" / "l.safetensors").exists()


@pytest.mark.unit
def test_lock_leftovers_modes_and_finished_resume(generate, tmp_path, clean_env, capsys):
    cfg = write_config(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    leftover, other = out / ".v.k2j4h5g6.tmp.mp4", out / ".v2.k2j4h5g6.tmp.mp4"  # kill -9 during decode
    leftover.write_bytes(b"partial")
    other.write_bytes(b"another output's")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; "
                               "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); "
                               "os.write(fd, f'pid {os.getpid()} host testhost'.encode()); print('held', flush=True); "
                               "time.sleep(120)", str(out / ".v.mp4.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        line = one_line_error(capsys, generate.main(["--config", str(cfg), "--profile", "none", *SMALL]),
                              "another render is writing it")
        assert f"pid {holder.pid} host testhost" in line
    finally:
        holder.kill()
        holder.wait()
    assert leftover.exists()  # not touched while another render held the output
    # the dead holder's lock file is still there: taken over
    argv = ["--config", str(cfg), "--profile", "none", *SMALL, "--save-latents", "out/l.safetensors"]
    assert generate.main(argv) == 0, capsys.readouterr().err
    assert not leftover.exists() and other.exists() and not (out / ".v.mp4.lock").exists()
    modes = {p.name: p.stat().st_mode & 0o777 for p in (out / "v.mp4", out / "v.json", out / "l.safetensors")}
    assert set(modes.values()) == {0o644}, modes
    mtime = (out / "v.mp4").stat().st_mtime_ns
    capsys.readouterr()
    assert generate.main([*argv, "--resume"]) == 0
    assert "already rendered" in capsys.readouterr().err
    assert (out / "v.mp4").stat().st_mtime_ns == mtime


# ------------------------------------------------------------------------------------------ any length
@pytest.mark.unit
def test_rope_tables_grow_bitwise_equal_below_1024():
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    from freeloc_dist.families.wan.rope import grow_rope_tables, rope_table

    rope = WanRotaryPosEmbed(128, (1, 2, 2), 1024)
    cos, sin = rope_table(rope, 1030)
    assert torch.equal(cos[:1024], rope.freqs_cos) and torch.equal(sin[:1024], rope.freqs_sin)
    old = rope.freqs_cos.clone()
    assert grow_rope_tables(rope, 1030) and rope.freqs_cos.shape == (1030, 128)
    assert torch.equal(rope.freqs_cos[:1024], old) and "freqs_cos" in dict(rope.named_buffers())
    cos_out, _ = rope(torch.empty(1, 16, 1030, 2, 2))
    assert cos_out.shape == (1, 1030, 1, 128)


def env(**extra):
    e = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    return {**e, "OMP_NUM_THREADS": "1", **extra}


def long_args(tmp_path):
    """tiny-random (FreeLOC: tsa, vrpr and full layers) at 4101 frames = 1026 latent frames, the smallest
    size and one step without CFG: the suite's budget, while every layer still sees all 1026 frames."""
    cfg = write_config(tmp_path, lambda c: c["sampling"].update(guidance_scale=1.0))
    return ["--config", str(cfg), "--frames", "4101", "--height", "16", "--width", "16", "--steps", "1",
            "--out", str(tmp_path / "long.mp4")]


@pytest.mark.cli
def test_4101_frames_render_on_one_process(tmp_path):
    from freeloc_dist.video import read_mp4_frame_count

    proc = subprocess.run([sys.executable, str(GENERATE), *long_args(tmp_path)],
                          cwd=REPO_ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1026 latent" in proc.stderr
    assert read_mp4_frame_count(tmp_path / "long.mp4") == 4101


@pytest.mark.dist
def test_4101_frames_render_on_two_ranks(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(GENERATE), *long_args(tmp_path)],
                          cwd=REPO_ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1026 latent" in proc.stderr and "decoded on 2 ranks" in proc.stderr
    assert (tmp_path / "long.mp4").is_file()


@pytest.mark.unit
def test_dry_run_plans_past_1024_latent_frames_and_huge_frames(generate, tmp_path, clean_env, capsys):
    code = generate.main(["--config", str(write_config(tmp_path)), "--dry-run", "--frames", "4101"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "1026 latent frames" in out.out
    # 10**6 tokens per frame: the planner counts band pairs without an n x n table (that was 8 TB)
    start = time.perf_counter()
    code = generate.main(["--config", str(write_config(tmp_path)), "--dry-run", "--height", "16000",
                          "--width", "16000", "--gpu-memory-gb", "1000"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "x 1000000 tokens" in out.out and time.perf_counter() - start < 10


# ------------------------------------------------------------------------------- agreement under torchrun
FAIL_RANK0_JOB2 = """
import os, runpy, sys
import freeloc_dist.video as video
real = video.write_mp4
def write_mp4(path, frames, fps):
    if os.environ["RANK"] == "0" and "dog" in str(path):
        raise PermissionError(13, "Permission denied", str(path))  # rank 0 only cannot write job 2
    return real(path, frames, fps)
video.write_mp4 = write_mp4
sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.dist
def test_job_failing_on_rank_0_only_fails_on_every_rank_and_the_queue_goes_on(tmp_path):
    harness = tmp_path / "fail.py"
    harness.write_text(FAIL_RANK0_JOB2)
    cfg = write_config(tmp_path, lambda c: c.update(profile=None, parallel={"timeout_s": 45.0}))
    queue = tmp_path / "q.txt"
    queue.write_text("a cat\na dog\na fox\n")
    out = tmp_path / "out"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(harness), str(GENERATE), "--config", str(cfg), "--frames", "9", "--height", "32",
                           "--width", "32", "--steps", "1", "--prompts", str(queue), "--out-dir", str(out)],
                          cwd=REPO_ROOT, env=env(), capture_output=True, text=True, timeout=400)
    elapsed = time.monotonic() - start
    assert "[rank 0] [job 2/3] failed: 'a dog'" in proc.stderr, proc.stderr[-3000:]
    assert "[rank 1] [job 2/3] failed on another rank" in proc.stderr, proc.stderr[-3000:]
    assert "queue: 2 rendered, 0 skipped (output exists), 1 failed" in proc.stderr
    assert (out / "a-cat-s0.mp4").is_file() and (out / "a-fox-s0.mp4").is_file()
    assert not (out / "a-dog-s0.mp4").exists()
    assert elapsed < 45 + 200, elapsed  # never a wait for parallel.timeout_s


@pytest.mark.cli
def test_torchrun_sh_validates_before_torchrun(tmp_path):
    proc = subprocess.run(["./torchrun.sh", "--config", "configs/tiny-random.yaml", "--frames", "64"],
                          cwd=REPO_ROOT, env=env(NPROC="2"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if not ln.startswith("setup:")]
    assert len(lines) == 1 and lines[0].startswith("error: config error: video.frames=64"), proc.stderr


@pytest.mark.unit
def test_a_model_whose_vae_counts_frames_otherwise_is_refused(generate, tmp_path, clean_env, capsys):
    """Configs count frames 4k+1 (families.kind.FRAMES_RULE); a VAE that compresses time 8x would turn them into
    the wrong number of latent frames, so preflight says so in one line instead of rendering."""
    model = model_copy(tmp_path, lambda c: c.update(scale_factor_temporal=8), sub="vae")
    cfg = write_config(tmp_path, lambda c: c["model"].update(path=str(model)))
    one_line_error(capsys, generate.main(["--config", str(cfg), "--validate-only"]),
                   "its VAE counts frames 8k+1, but configs count them 4k+1")


# ------------------------------------------------------------------------------------ conditioning images
I2V = REPO_ROOT / "configs" / "tiny-random-i2v.yaml"  # 64 x 64; image: assets/i2v-first.png
I2V_SMALL = ["--frames", "5", "--steps", "1", "--profile", "none"]


def i2v_config(tmp_path):
    raw = yaml.safe_load(I2V.read_text())
    raw["output"] = str(tmp_path / "out" / "v.mp4")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def png_header(width, height):
    """A PNG declaring width x height pixels whose data is empty: Pillow reads its size, nothing decodes."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


@pytest.mark.unit
@pytest.mark.parametrize("flag", ["--image", "--last-image"])
def test_image_from_a_pipe_is_one_line_before_loading(generate, tmp_path, clean_env, capsys, flag):
    """bash's `--image <(cat img.png)` is /dev/fd/N, a pipe: preflight read it, then the render read it again,
    drained, after the weights loaded (a traceback). A pipe is refused in one line: images are regular files."""
    config = i2v_config(tmp_path) if flag == "--image" else REPO_ROOT / "configs" / "tiny-random-flf2v.yaml"
    read, write = os.pipe()
    try:
        os.write(write, (REPO_ROOT / "assets" / "i2v-first.png").read_bytes())
        os.close(write)
        line = one_line_error(capsys, generate.main(["--config", str(config), *I2V_SMALL, flag, f"/dev/fd/{read}",
                                                     "--out", str(tmp_path / "out" / "v.mp4")]),
                              "is a pipe or FIFO, not a regular file")
        assert f"/dev/fd/{read}" in line
    finally:
        os.close(read)
    assert not (tmp_path / "out").exists()


@pytest.mark.unit
def test_image_on_a_fifo_is_refused_without_blocking(generate, tmp_path, clean_env, capsys):
    """open() of a FIFO without a writer blocks forever: preflight hung. Now its type is checked first."""
    import threading

    fifo = tmp_path / "img.png"
    os.mkfifo(fifo)
    blocked = []

    def unblock():  # only if the CLI is stuck opening the FIFO: give it a writer that writes nothing
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            blocked.append(True)
        except OSError:  # ENXIO: no reader waiting
            pass

    timer = threading.Timer(5.0, unblock)
    timer.start()
    start = time.perf_counter()
    try:
        code = generate.main(["--config", str(i2v_config(tmp_path)), "--image", str(fifo), "--validate-only"])
    finally:
        timer.cancel()
    assert not blocked, "preflight blocked opening the FIFO"
    assert time.perf_counter() - start < 5.0
    one_line_error(capsys, code, f"image={str(fifo)!r}: is a pipe or FIFO, not a regular file")


@pytest.mark.unit
def test_image_is_read_once_before_loading(generate, tmp_path, clean_env, capsys, monkeypatch):
    """The bytes preflight checked are the bytes the render uses (conditioning and checkpoint fingerprint): the
    file deleted after preflight, before the weights load, changes nothing (it was read again: not found)."""
    import freeloc_dist.render as render

    image = tmp_path / "first.png"
    shutil.copy(REPO_ROOT / "assets" / "i2v-first.png", image)
    real = render.preflight

    def preflight_then_delete(*args, **kwargs):
        pre = real(*args, **kwargs)
        image.unlink()
        return pre

    monkeypatch.setattr(render, "preflight", preflight_then_delete)
    code = generate.main(["--config", str(i2v_config(tmp_path)), *I2V_SMALL, "--image", str(image),
                          "--checkpoint-every", "1"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "v.mp4").is_file() and not image.exists()


@pytest.mark.unit
def test_image_whose_fitting_needs_a_huge_intermediate_is_refused(generate, tmp_path, clean_env, capsys):
    """A 1 x 1,000,000 PNG (a few KB) fitted to 64 x 64 is scaled to 64 x 64,000,000 before its crop: it ran
    out of memory after the weights loaded. The scaled size comes from the sizes alone, checked in preflight."""
    from PIL import Image

    from freeloc_dist.images import ImageError, fit

    tall = tmp_path / "tall.png"
    Image.new("L", (1, 1_000_000), 128).save(tall)
    assert tall.stat().st_size < 10_000
    config = str(i2v_config(tmp_path))
    one_line_error(capsys, generate.main(["--config", config, "--image", str(tall), "--validate-only"]),
                   "1x1000000 pixels would be scaled to 64x64000000 (more than 100,000,000 pixels)")
    with pytest.raises(ImageError, match="would be scaled to 64x64000000"):
        fit(Image.new("RGB", (1, 1_000_000)), 64, 64)
    wide = tmp_path / "wide.png"
    Image.new("RGB", (400, 64)).save(wide)  # an aspect ratio far from 1:1 but harmless: 400 x 64 as it is
    assert generate.main(["--config", config, "--image", str(wide), "--validate-only"]) == 0


@pytest.mark.unit
@pytest.mark.parametrize("height", [120_000_000, 200_000_000])  # past Pillow's warning limit; past its error limit
def test_decompression_bomb_is_exactly_one_line(generate, tmp_path, clean_env, capsys, height):
    """Pillow warns (DecompressionBombWarning, a second stderr line) past 89M pixels and raises its own error past
    179M; MAX_PIXELS is ours, said in our one line."""
    import warnings

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(1, height))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        code = generate.main(["--config", str(i2v_config(tmp_path)), "--image", str(bomb), "--validate-only"])
    one_line_error(capsys, code, "more than 100,000,000 pixels" if height > 2 * 89_478_485 else
                   f"1x{height} pixels is more than 100,000,000")
    assert not [w for w in seen if "DecompressionBomb" in w.category.__name__], [str(w.message) for w in seen]


@pytest.mark.unit
def test_resume_takes_the_same_image_at_another_path(generate, tmp_path, clean_env, capsys):
    """The checkpoint fingerprints the image's content: a moved or copied identical image resumes, another
    picture (at any path) is refused."""
    from PIL import Image

    from freeloc_dist.checkpoint import Checkpoint, checkpoint_path, fingerprint, fingerprint_settings, save_checkpoint
    from freeloc_dist.preflight import latent_shape, load_config, load_profile_of

    first, copy, other = tmp_path / "a.png", tmp_path / "moved" / "b.png", tmp_path / "c.png"
    copy.parent.mkdir()
    shutil.copy(REPO_ROOT / "assets" / "i2v-first.png", first)
    shutil.copy(first, copy)
    Image.open(first).convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(other)
    config = i2v_config(tmp_path)
    cfg = load_config(config, {"image": str(first)}, None)
    profile = load_profile_of(cfg)
    save_checkpoint(checkpoint_path(cfg), Checkpoint(
        step=1, total_steps=cfg.sampling.steps, latents=torch.zeros(latent_shape(cfg)), scheduler={},
        rng=torch.get_rng_state(), fingerprint=fingerprint(cfg, profile), settings=fingerprint_settings(cfg, profile)))
    argv = ["--config", str(config), "--resume", "--validate-only", "--image"]
    assert generate.main([*argv, str(first)]) == 0, capsys.readouterr().err
    assert generate.main([*argv, str(copy)]) == 0, capsys.readouterr().err
    one_line_error(capsys, generate.main([*argv, str(other)]), "(image differ)")


@pytest.mark.unit
def test_compile_blocks_renders_a_queue_of_mixed_lengths(generate, tmp_path, clean_env, capsys, monkeypatch):
    """--compile blocks: every block is one code object whose graphs are guarded on the layer's kind and the
    video's grid, so each length above T adds a graph per kind; from the third length on, dynamo's recompile
    limit (8) was hit and fullgraph=True failed the job (FailOnRecompileLimitHit). Dynamo's own backend
    "eager" stands in for inductor: the guards and the limit are the same, the C++ builds are not run."""
    real = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: real(self, *a, **{**k, "backend": "eager"}))
    torch._dynamo.reset()  # earlier tests' graphs of the same blocks must not count here
    queue = tmp_path / "q.txt"
    lengths = (21, 25, 29, 33)  # 6..9 latent frames, all past the tiny profile's T = 5
    queue.write_text("".join(json.dumps({"prompt": f"fox {f}", "frames": f}) + "\n" for f in lengths))
    code = generate.main(["--config", str(write_config(tmp_path)), "--height", "32", "--width", "32", "--steps", "1",
                          "--compile", "blocks", "--prompts", str(queue), "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    assert "queue: 4 rendered, 0 skipped (output exists), 0 failed" in err
    torch._dynamo.reset()


@pytest.mark.unit
def test_render_too_long_for_its_frame_tables_is_refused_before_loading(generate, tmp_path, clean_env, capsys,
                                                                       monkeypatch):
    """400001 frames (100001 latent) at 32x32: the latents are small, but every rank plans each layer kind in
    Long[F, F] frame tables (720 GB here); --dry-run refused it in one line, the render loaded and crashed."""
    import freeloc_dist.models as models

    def no_loading(*a, **k):
        raise AssertionError("preflight let it through: the model is being loaded")

    monkeypatch.setattr(models, "load_components", no_loading)
    args = ["--config", str(write_config(tmp_path)), "--frames", "400001", "--height", "32", "--width", "32",
            "--steps", "1"]
    assert generate.main([*args, "--dry-run"]) == 2
    capsys.readouterr()
    line = one_line_error(capsys, generate.main(args), "frame tables")
    assert "400001 frames" in line


@pytest.mark.unit
@pytest.mark.parametrize("config,flag", [("tiny-random.yaml", "--guidance-scale"),
                                         ("tiny-random-a14b.yaml", "--guidance-scale-2")])
def test_absurd_guidance_scale_is_one_line_at_config_load(generate, tmp_path, clean_env, capsys, config, flag):
    """1e308 was accepted and failed only on NaN latents after sampling; the bound is config.MAX_GUIDANCE."""
    code = generate.main(["--config", str(REPO_ROOT / "configs" / config), "--out", str(tmp_path / "v.mp4"),
                          flag, "1e308"])
    one_line_error(capsys, code, "must be a finite number >= 0 and <= 100")
