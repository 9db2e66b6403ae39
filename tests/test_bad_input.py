"""The bad-input matrix: every user error (config, flag, prompts file, model directory, profile, checkpoint,
plan that cannot fit) is one stderr line `error: ...` naming the problem, exit code 2, the same on every
rank, and nothing is written under an output name. Run in-process through generate.main (each case fails
before any weights load); two cases go through a real subprocess per rank."""

import os
import shutil
import subprocess
import sys

import pytest
import yaml

from freeloc_dist.config import REPO_ROOT

GENERATE = REPO_ROOT / "launch" / "generate.py"
TINY = yaml.safe_load((REPO_ROOT / "configs" / "tiny-random.yaml").read_text())


def write_config(tmp_path, edit=lambda c: None):
    raw = yaml.safe_load(yaml.safe_dump(TINY))
    raw["output"] = str(tmp_path / "out" / "v.mp4")
    edit(raw)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def prompts(tmp_path, *lines):
    path = tmp_path / "p.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def broken_model(tmp_path, remove):
    model = tmp_path / "model"
    shutil.copytree(REPO_ROOT / "assets" / "tiny-wan", model)
    target = model / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    return model


def bad_profile(tmp_path):
    p = yaml.safe_load((REPO_ROOT / "configs" / "profiles" / "tiny-random.yaml").read_text())
    p["layers"]["tsa"] = p["layers"]["tsa"] + p["layers"]["vrpr"][:1]  # a layer listed twice
    path = tmp_path / "bad-profile.yaml"
    path.write_text(yaml.safe_dump(p))
    return path


def storyboard(tmp_path, text):
    """["--storyboard", FILE] of a storyboard file with this text (tiny-random.yaml: 77 frames = 4.81 s)."""
    path = tmp_path / "sb.yaml"
    path.write_text(text)
    return ["--storyboard", path]


SB_OK = "- {at: 0, prompt: a fox}\n- {at: 2, prompt: a cat}\n"
# (id, make(tmp_path) -> extra argv, config edit, text the error line must contain)
CASES = [
    ("config-unknown-key", lambda t: [], lambda c: c["sampling"].update(stepz=3), "sampling.stepz"),
    ("config-checkpoint-every", lambda t: [], lambda c: c.update(checkpoint={"every": -1}), "checkpoint.every=-1"),
    ("config-checkpoint-key", lambda t: [], lambda c: c.update(checkpoint={"evry": 2}), "checkpoint.evry"),
    ("config-output-suffix", lambda t: [], lambda c: c.update(output="x.avi"), "output="),
    ("config-memory-text-encoder", lambda t: [], lambda c: c.update(memory={"text_encoder": "gpu0"}),
     "memory.text_encoder='gpu0': must be one of: gpu, cpu, rank0"),
    ("config-memory-experts", lambda t: [], lambda c: c.update(memory={"experts": "offlaod"}), "memory.experts="),
    ("config-memory-shard-type", lambda t: [], lambda c: c.update(memory={"shard_weights": "yes"}),
     "memory.shard_weights='yes': expected true or false"),
    ("config-memory-key", lambda t: [], lambda c: c.update(memory={"offload": True}), "memory.offload: unknown key"),
    ("flag-text-encoder", lambda t: ["--text-encoder", "tpu"], None, "--text-encoder"),
    ("flag-shard-weights", lambda t: ["--shard-weights", "1"], None, "--shard-weights: '1': must be true or false"),
    ("memory-with-compile", lambda t: ["--shard-weights", "true", "--compile", "blocks"], None,
     "memory.shard_weights=true with model.compile=blocks"),
    ("flag-checkpoint-every", lambda t: ["--checkpoint-every", "-2"], None, "--checkpoint-every=-2"),
    ("flag-checkpoint-every-type", lambda t: ["--checkpoint-every", "x"], None, "--checkpoint-every"),
    ("flag-out-dir-alone", lambda t: ["--out-dir", "d"], None, "--out-dir"),
    ("flag-world-size-alone", lambda t: ["--world-size", "2"], None, "--world-size"),
    ("flag-peak-tflops", lambda t: ["--dry-run", "--peak-tflops", "0"], None, "--peak-tflops"),
    ("lora-scale-huge", lambda t: ["--lora", "x.safetensors:1e30"], None,
     "model.loras[0].scale=1e+30: must be a number in [-100, 100]"),
    ("flag-gpu-memory-no-dry-run", lambda t: ["--gpu-memory-gb", "1"], None, "--gpu-memory-gb: only with --dry-run"),
    ("memory-experts-one-transformer", lambda t: ["--experts", "offload"], None,
     "memory.experts: the model at"),
    ("flag-out-with-prompts", lambda t: ["--prompts", prompts(t, "a cat"), "--out", "x.mp4"], None, "--out"),
    ("prompts-missing", lambda t: ["--prompts", t / "nope.txt"], None, "nope.txt"),
    ("prompts-empty", lambda t: ["--prompts", prompts(t, "# only a comment")], None, "no prompts"),
    ("prompts-json", lambda t: ["--prompts", prompts(t, "a cat", '{"prompt": "x",')], None, "p.txt:2: invalid JSON"),
    ("prompts-unknown-key", lambda t: ["--prompts", prompts(t, '{"prompt": "x", "sede": 1}')], None, "p.txt:1: sede"),
    ("prompts-no-prompt", lambda t: ["--prompts", prompts(t, '{"seed": 1}')], None, "p.txt:1: prompt"),
    ("prompts-seed-type", lambda t: ["--prompts", prompts(t, '{"prompt": "x", "seed": "1"}')], None, "p.txt:1: seed="),
    ("prompts-frames", lambda t: ["--prompts", prompts(t, "a", '{"prompt": "x", "frames": 64}')], None,
     "p.txt:2: config error: video.frames=64"),
    ("prompts-escape", lambda t: ["--prompts", prompts(t, '{"prompt": "x", "output": "../../etc/x.mp4"}')], None,
     "p.txt:1: output="),
    ("prompts-absolute", lambda t: ["--prompts", prompts(t, '{"prompt": "x", "output": "/tmp/x.mp4"}')], None,
     "p.txt:1: output="),
    ("prompts-job-too-long", lambda t: ["--profile", "none",
                                        "--prompts", prompts(t, "a", '{"prompt": "x", "frames": 4101}')],
     None, "p.txt: job 2 ("),  # stock RoPE ends at 1024 latent frames; the job is named (was: no job, no file)
    ("prompts-duplicate", lambda t: ["--prompts", prompts(t, "a cat", "A cat!")], None, "p.txt:2: output"),
    ("model-no-index", lambda t: ["--profile", "none"], "model_index.json", "missing model_index.json"),
    ("model-no-vae-config", lambda t: ["--profile", "none"], "vae/config.json", "missing vae/config.json"),
    ("model-no-weights", lambda t: ["--profile", "none"], "transformer/diffusion_pytorch_model.safetensors",
     "no weights in transformer/"),
    ("model-no-tokenizer", lambda t: ["--profile", "none"], "tokenizer", "missing tokenizer/tokenizer_config.json"),
    ("profile-invalid", lambda t: ["--profile", bad_profile(t)], None, "profile"),
    ("dry-run-does-not-fit", lambda t: ["--dry-run", "--gpu-memory-gb", "0.000001"], None, "does not fit"),
    ("dry-run-world", lambda t: ["--dry-run", "--world-size", "64"], None, "64 ranks give 64 sequence-parallel"),
    ("storyboard-unsorted", lambda t: storyboard(t, SB_OK + "- {at: 1, prompt: a bird}\n"), None,
     "entry 3: at=1: times must strictly increase"),
    ("storyboard-repeated", lambda t: storyboard(t, SB_OK + "- {at: 2, prompt: a bird}\n"), None,
     "entry 3: at=2: times must strictly increase"),
    ("storyboard-past-end", lambda t: storyboard(t, SB_OK + "- {at: 4.9, prompt: a bird}\n"), None,
     "entry 3: at=4.9: past the end of the video (77 frames at 16 fps = 4.8125 s)"),
    ("storyboard-empty-prompt", lambda t: storyboard(t, SB_OK + "- {at: 3, prompt: ' '}\n"), None,
     "entry 3: prompt=' ': expected a non-empty string"),
    ("storyboard-unknown-key", lambda t: storyboard(t, "- {at: 0, promt: a fox}\n"), None,
     "entry 1: promt: unknown key"),
    ("storyboard-not-a-list", lambda t: storyboard(t, "at: 0\nprompt: a fox\n"), None,
     "expected a YAML list of {at, prompt} entries, got dict"),
    ("storyboard-first-not-at-0", lambda t: storyboard(t, "- {at: 1, prompt: a fox}\n"), None,
     "entry 1: at=1: the first entry must be at 0"),
    ("storyboard-overlap", lambda t: storyboard(t, SB_OK + "- {at: 2.5, prompt: a bird}\n"), None,
     "entry 3: transition=1: overlaps the transition of entry 2"),
    ("storyboard-yaml", lambda t: storyboard(t, "- {at: 0, prompt: [\n"), None, "not valid YAML"),
    ("storyboard-missing", lambda t: ["--storyboard", t / "nope.yaml"], None, "nope.yaml: file not found"),
    ("storyboard-unreadable", lambda t: ["--storyboard", t], None, "cannot read"),
    ("storyboard-with-prompt", lambda t: [*storyboard(t, SB_OK), "--prompt", "a fox"], None,
     "--prompt: not allowed with a storyboard"),
    ("storyboard-compile", lambda t: [*storyboard(t, SB_OK), "--compile", "blocks"], None,
     "storyboard: not supported with model.compile=blocks"),
    ("storyboard-text-encoder-rank0", lambda t: [*storyboard(t, SB_OK), "--text-encoder", "rank0"], None,
     "storyboard: not supported with memory.text_encoder=rank0"),
    ("storyboard-config-key", lambda t: [], lambda c: c.update(storyboard="configs/storyboards/tiny-three.yaml",
                                                               video={**c["video"], "frames": 17}),
     "entry 3: at=1.4: past the end of the video (17 frames at 16 fps = 1.0625 s)"),
    ("storyboard-with-prompts", lambda t: [*storyboard(t, SB_OK), "--prompts", prompts(t, "a cat")], None,
     "--storyboard: not allowed with --prompts"),
    ("cache-name", lambda t: [], lambda c: c.update(cache={"name": "tea"}), "cache={'name': 'tea'}: needs name"),
    ("cache-no-name", lambda t: ["--cache-threshold", "0.1"], None, "cache={'threshold': 0.1}: needs name"),
    ("cache-flag-name", lambda t: ["--cache", "tea"], None, "--cache: invalid choice: 'tea'"),
    ("cache-setting", lambda t: [], lambda c: c.update(cache={"name": "first_block", "treshold": 0.1}),
     "cache.treshold: unknown setting of the first_block cache (expected one of: threshold)"),
    ("cache-setting-type", lambda t: ["--cache", "sea"], lambda c: c.update(cache={"residual_order": "one"}),
     "cache.residual_order='one': expected an integer"),
    ("cache-diffusers-check", lambda t: ["--cache", "sea"], lambda c: c.update(cache={"residual_order": 2}),
     "`residual_order` must be 0 or 1, got 2."),
    ("cache-threshold-nan", lambda t: ["--cache", "first_block", "--cache-threshold", "nan"], None,
     "cache.threshold=nan: must be a finite number >= 0"),
    ("cache-interval-zero", lambda t: [], lambda c: c.update(cache={"name": "taylorseer", "cache_interval": 0}),
     "cache.cache_interval=0: must be a finite number >= 1"),
    ("cache-mag-ratios", lambda t: ["--cache", "mag"], None, "`mag_ratios` must be provided"),
    ("cache-mag-ratios-type", lambda t: [], lambda c: c.update(cache={"name": "mag", "mag_ratios": [1, "x"]}),
     "cache.mag_ratios[1]='x': expected a number"),
    ("cache-from-render", lambda t: [], lambda c: c.update(cache={"name": "mag", "num_inference_steps": 3}),
     "cache.num_inference_steps: set by the render (sampling.steps)"),
    ("cache-taylor-dtype", lambda t: [], lambda c: c.update(cache={"name": "taylorseer", "taylor_factors_dtype": "f8"}),
     "cache.taylor_factors_dtype='f8': must be one of: float32, bfloat16, float16"),
    ("cache-pab-range", lambda t: [], lambda c: c.update(
        cache={"name": "pyramid_attention_broadcast", "spatial_attention_timestep_skip_range": [1]}),
     "expected a list of 2"),
]


@pytest.mark.unit
@pytest.mark.parametrize("make,edit,needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2(generate, tmp_path, monkeypatch, capsys, make, edit, needle):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.chdir(tmp_path)
    if isinstance(edit, str):  # a model directory with that file removed
        model = broken_model(tmp_path, edit)
        cfg = write_config(tmp_path, lambda c: c["model"].update(path=str(model)))
    else:
        cfg = write_config(tmp_path, edit or (lambda c: None))
    code = generate.main(["--config", str(cfg), *map(str, make(tmp_path))])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert needle in err[0], err[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.unit
def test_storyboard_error_is_identical_on_every_rank(generate, tmp_path, monkeypatch, capsys):
    """Every rank reads the storyboard in preflight, before any rendezvous: the same line on each (in-process, as
    torchrun's environment sets each rank)."""
    monkeypatch.chdir(tmp_path)
    cfg = write_config(tmp_path)
    argv = ["--config", str(cfg), *map(str, storyboard(tmp_path, SB_OK + "- {at: 2, prompt: a bird}\n"))]
    lines = []
    for rank in (0, 1):
        for k, v in (("WORLD_SIZE", "2"), ("RANK", str(rank)), ("LOCAL_RANK", str(rank))):
            monkeypatch.setenv(k, v)
        assert generate.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"[rank {rank}] error: storyboard "), err
        lines.append(err[0].split("] ", 1)[1])
    assert lines[0] == lines[1] and "times must strictly increase" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.cli
def test_prompts_error_is_identical_on_every_rank(tmp_path):
    """As torchrun starts each rank: the same line, prefixed by the rank, before any rendezvous."""
    cfg = write_config(tmp_path)
    bad = prompts(tmp_path, "a cat", '{"prompt": "x", "output": "../escape.mp4"}')
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29997"}
    lines = []
    for rank in (0, 1):
        proc = subprocess.run([sys.executable, str(GENERATE), "--config", str(cfg), "--prompts", str(bad)],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path,
                              env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)})
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith(f"[rank {rank}] error: ") and proc.stderr.count("\n") == 1, proc.stderr
        lines.append(proc.stderr.split("] ", 1)[1])
    assert lines[0] == lines[1] and "p.txt:2: output='../escape.mp4'" in lines[0]
    assert not (tmp_path / "out").exists()
