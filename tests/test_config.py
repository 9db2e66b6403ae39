"""RenderConfig loading: every bad field is a one-line ConfigError naming the field by dotted path."""

import copy
import dataclasses

import pytest
import yaml

from freeloc_dist.config import (
    REPO_ROOT,
    ConfigError,
    RenderConfig,
    frames_for_seconds,
    latent_frames,
    load_render_config,
    parse_render_config,
)

pytestmark = pytest.mark.unit

GOOD = {
    "model": {"path": "assets/tiny-wan", "dtype": "float32"},
    "profile": None,
    "video": {"height": 64, "width": 48, "frames": 77, "fps": 16},
    "sampling": {"steps": 4, "guidance_scale": 5.0, "shift": 3.0, "seed": 1, "negative_prompt": "",
                 "max_text_tokens": 32},
    "prompt": "a fox",
    "output": "outputs/x.mp4",
}


def with_value(dotted, value):
    raw = copy.deepcopy(GOOD)
    *parents, leaf = dotted.split(".")
    node = raw
    for p in parents:
        node = node[p]
    node[leaf] = value
    return raw


def without(dotted):
    raw = copy.deepcopy(GOOD)
    *parents, leaf = dotted.split(".")
    node = raw
    for p in parents:
        node = node[p]
    del node[leaf]
    return raw


BAD = [
    ("video.frames", 64, "must be 4k+1 (e.g. 61 or 65)"),
    ("video.frames", 0, "4k+1"),
    ("video.frames", "77", "expected an integer"),
    ("video.frames", True, "expected an integer"),
    ("video.frames", 77.0, "expected an integer"),
    ("video.height", 70, "multiple of 16"),
    ("video.height", 0, "multiple of 16"),
    ("video.width", -16, "multiple of 16"),
    ("video.width", None, "expected an integer"),
    ("video.fps", 0, ">= 1"),
    ("sampling.steps", 0, ">= 1"),
    ("sampling.steps", 10**12, "<= 10000"),
    ("sampling.steps", 2.5, "expected an integer"),
    ("sampling.steps", False, "expected an integer"),
    ("sampling.guidance_scale", "high", "expected a number"),
    ("sampling.guidance_scale", True, "expected a number"),
    ("sampling.guidance_scale", -1.0, ">= 0"),
    ("sampling.guidance_scale", float("nan"), "finite"),
    ("sampling.guidance_scale", 1e308, "<= 100"),  # accepted before: NaN latents after every step had run
    ("sampling.guidance_scale", float("inf"), "<= 100"),
    ("sampling.guidance_scale_2", 1e308, "<= 100"),
    ("sampling.shift", 0, "> 0"),
    ("sampling.seed", -1, "[0, 2**63)"),
    ("sampling.max_text_tokens", 0, ">= 1"),
    ("sampling.negative_prompt", 3, "expected a string"),
    ("model.dtype", "fp8", "one of: float32, bfloat16, float16"),
    ("model.compile", "yes", "one of: none, blocks, full"),
    ("model.path", 5, "expected a path"),
    ("model.path", "", "expected a path"),
    ("attention_backend", "xformers", "one of: sdpa, flex"),
    ("profile", ["a"], "expected a path"),
    ("prompt", 5, "expected a string"),
    ("output", "out.avi", ".mp4"),
    ("video", 5, "expected a mapping"),
]


@pytest.mark.parametrize("dotted,value,message", BAD, ids=[f"{d}={v!r}" for d, v, _ in BAD])
def test_bad_value_names_field(dotted, value, message):
    with pytest.raises(ConfigError) as info:
        parse_render_config(with_value(dotted, value))
    text = str(info.value)
    assert text.startswith(f"config error: {dotted}="), text
    assert message in text
    assert "\n" not in text


def test_frames_message_exact():
    with pytest.raises(ConfigError, match=r"^config error: video\.frames=64: must be 4k\+1 \(e\.g\. 61 or 65\)$"):
        parse_render_config(with_value("video.frames", 64))


@pytest.mark.parametrize("dotted", ["model", "video", "model.path", "video.height", "video.width", "video.frames"])
def test_missing_required(dotted):
    with pytest.raises(ConfigError, match=rf"^config error: {dotted.replace('.', '[.]')}: missing required field$"):
        parse_render_config(without(dotted))


@pytest.mark.parametrize("dotted", ["foo", "video.fram", "sampling.cfg", "model.revision"])
def test_unknown_key(dotted):
    with pytest.raises(ConfigError) as info:
        parse_render_config(with_value(dotted, 1) if "." not in dotted else _add(dotted))
    assert str(info.value).startswith(f"config error: {dotted}: unknown key")


def _add(dotted):
    raw = copy.deepcopy(GOOD)
    section, key = dotted.split(".")
    raw[section][key] = 1
    return raw


def test_unknown_override_key():
    with pytest.raises(ConfigError, match=r"^config error: video\.nope: unknown key"):
        parse_render_config(GOOD, {"video.nope": 3})


def test_good_config_and_defaults():
    raw = copy.deepcopy(GOOD)
    del raw["sampling"]
    raw["sampling"] = {"guidance_scale": 4}  # an int is a valid float
    cfg = parse_render_config(raw)
    assert isinstance(cfg, RenderConfig)
    assert cfg.sampling.guidance_scale == 4.0 and isinstance(cfg.sampling.guidance_scale, float)
    assert cfg.sampling.steps == 50  # default
    assert cfg.model.path == REPO_ROOT / "assets/tiny-wan"  # config paths resolve against the repo root
    assert cfg.output == REPO_ROOT / "outputs/x.mp4"
    assert cfg.profile is None and cfg.attention_backend == "sdpa"
    assert cfg.latent_frames == 20
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.video.frames = 5  # frozen


def test_overrides_and_absolute_paths(tmp_path):
    cfg = parse_render_config(GOOD, {"video.frames": 9, "prompt": "x", "profile": str(tmp_path / "p.yaml"),
                                     "output": str(tmp_path / "o.mp4")})
    assert cfg.video.frames == 9 and cfg.prompt == "x"
    assert cfg.profile == tmp_path / "p.yaml" and cfg.output == tmp_path / "o.mp4"
    with pytest.raises(ConfigError, match=r"^config error: video\.frames=10:"):
        parse_render_config(GOOD, {"video.frames": 10})


def test_load_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    assert load_render_config(path, {}).video.height == 64
    path.write_text("video: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML") as info:
        load_render_config(path, {})
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="file not found"):
        load_render_config(tmp_path / "missing.yaml", {})
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_render_config(path, {})


@pytest.mark.parametrize("name", ["tiny", "tiny-random", "wan2.1-t2v-1.3b", "wan2.1-t2v-14b"])
def test_shipped_configs_load(name):
    cfg = load_render_config(REPO_ROOT / "configs" / f"{name}.yaml", {})
    assert cfg.video.height % 16 == 0 and cfg.video.width % 16 == 0 and cfg.video.frames % 4 == 1
    assert cfg.profile is not None and cfg.profile.parent == REPO_ROOT / "configs" / "profiles"


@pytest.mark.parametrize("name, model", [("tiny", "toy-wan"), ("tiny-random", "tiny-wan")])
def test_tiny_configs_render_4x_their_profiles_trained_length(name, model):
    from freeloc_dist.profile import load_profile

    cfg = load_render_config(REPO_ROOT / "configs" / f"{name}.yaml", {})
    assert cfg.latent_frames == 4 * load_profile(cfg.profile).trained_frames
    assert cfg.model.path == REPO_ROOT / "assets" / model


def test_frames_for_seconds():
    assert frames_for_seconds(10, 16) == 161
    assert frames_for_seconds(5, 16) == 81
    assert frames_for_seconds(60, 16) == 961
    assert frames_for_seconds(0.01, 16) == 1
    for s in [0.3, 1.7, 2.2, 7.77]:
        f = frames_for_seconds(s, 16)
        assert f % 4 == 1 and abs(f - s * 16) <= 2
    assert latent_frames(961) == 241 and latent_frames(81) == 21


def test_frames_rule_of_a_causal_vae():
    from freeloc_dist.families.kind import FRAMES_RULE, FramesRule

    assert FRAMES_RULE == FramesRule(4)
    assert [FRAMES_RULE.latent_frames(f) for f in (1, 5, 77, 81)] == [1, 2, 20, 21]
    assert all(FRAMES_RULE.frames(FRAMES_RULE.latent_frames(f)) == f for f in range(1, 400, 4))
    eight = FramesRule(8)
    assert (eight.latent_frames(17), eight.frames(3), eight.valid(17), eight.valid(13)) == (3, 17, True, False)
    assert eight.problem(12) == "must be 8k+1 (e.g. 9 or 17)" and eight.problem(0) == "must be 8k+1 (e.g. 1 or 9)"
    assert FRAMES_RULE.nearest(5, 16) == 81 and FRAMES_RULE.nearest(0, 16) == 1
