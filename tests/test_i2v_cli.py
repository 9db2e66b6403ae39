"""Bad input for the image-to-video flags and keys (--image, --last-image, image:, last_image:) and
image-to-video profile/model mismatches: one stderr line `error: ...`, exit 2, before any weights load,
nothing written (in-process through generate.main, as test_family_cli.py does)."""

import json
import shutil

import pytest
import yaml
from _cli import assert_refused, edited_config
from PIL import Image

from freeloc_dist.config import REPO_ROOT

pytestmark = pytest.mark.unit
PROFILES = REPO_ROOT / "configs" / "profiles"
FIRST = str(REPO_ROOT / "assets" / "i2v-first.png")


def image(tmp_path, name, mode="RGB", fmt=None, color=0):
    path = tmp_path / name
    Image.new(mode, (8, 8), color).save(path, format=fmt)
    return str(path)


def text_file(tmp_path):
    (tmp_path / "x.png").write_text("not a picture")
    return str(tmp_path / "x.png")


def truncated(tmp_path):
    data = (REPO_ROOT / "assets" / "i2v-first.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    return str(tmp_path / "cut.png")


def profile_with(tmp_path, **changes):
    p = yaml.safe_load((PROFILES / "tiny-random-i2v.yaml").read_text())
    p.update(changes)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(p))
    return str(path)


def model_with(tmp_path, where, **changes):
    model = tmp_path / "model"
    shutil.copytree(REPO_ROOT / "assets" / "tiny-i2v", model)
    data = json.loads((model / where).read_text())
    data.update(changes)
    (model / where).write_text(json.dumps(data))
    return model


def drop_image(t, raw):
    raw["image"] = None


# (id, config, config edit(tmp_path, raw), extra argv(tmp_path), text the error line must contain)
CASES = [
    ("image-no-value", "tiny-random-i2v.yaml", None, lambda t: ["--image"], "--image"),
    ("image-missing", "tiny-random-i2v.yaml", None, lambda t: ["--image", str(t / "nope.png")],
     "image='" + "{t}/nope.png': file not found"),
    ("image-directory", "tiny-random-i2v.yaml", None, lambda t: ["--image", str(t)], "is a directory"),
    ("image-not-an-image", "tiny-random-i2v.yaml", None, lambda t: ["--image", text_file(t)],
     "not an image (expected PNG or JPEG)"),
    ("image-gif", "tiny-random-i2v.yaml", None, lambda t: ["--image", image(t, "a.gif", "P", "GIF")],
     "a GIF image; expected PNG or JPEG"),
    ("image-cmyk", "tiny-random-i2v.yaml", None, lambda t: ["--image", image(t, "c.jpg", "CMYK")],
     "colour mode CMYK is not supported"),
    ("image-transparent", "tiny-random-i2v.yaml", None, lambda t: ["--image", image(t, "a.png", "RGBA")],
     "has transparent pixels"),
    ("image-truncated", "tiny-random-i2v.yaml", None, lambda t: ["--image", truncated(t)], "image='"),
    ("image-absent", "tiny-random-i2v.yaml", drop_image, lambda t: [],
     "image: the model at"),
    ("image-to-t2v", "tiny-random.yaml", None, lambda t: ["--image", FIRST],
     "image: the model at"),
    ("last-image-to-t2v", "tiny-random.yaml", None, lambda t: ["--last-image", FIRST], "last_image: the model at"),
    ("last-image-not-flf2v", "tiny-random-i2v.yaml", None, lambda t: ["--last-image", FIRST],
     "is not a first-last-frame model"),
    ("last-image-absent-flf2v", "tiny-random-flf2v.yaml", lambda t, raw: raw.update(last_image=None), lambda t: [],
     "is a first-last-frame model (FLF2V); give its last frame too"),
    ("last-image-missing", "tiny-random-flf2v.yaml", None, lambda t: ["--last-image", str(t / "nope.jpg")],
     "last_image='"),
    ("last-image-no-value", "tiny-random-flf2v.yaml", None, lambda t: ["--last-image"], "--last-image"),
    ("image-key-type", "tiny-random-i2v.yaml", lambda t, raw: raw.update(image=3), lambda t: [],
     "config error: image=3: expected a path"),
    ("text-not-512", "tiny-random-i2v.yaml", lambda t, raw: raw["sampling"].update(max_text_tokens=32),
     lambda t: [], "sampling.max_text_tokens=32: this model puts 5"),
    ("profile-trained-frames", "tiny-random-i2v.yaml", None,
     lambda t: ["--profile", profile_with(t, trained_frames=21)],
     "trained_frames=21, but this i2v model was trained on 5"),
    ("profile-layers", "tiny-random-i2v.yaml", None,
     lambda t: ["--profile", profile_with(t, layers={"tsa": [0], "vrpr": [1, 3], "full": [2]})],
     "lists 4 layers"),
    ("profile-2-one-expert", "tiny-random-i2v.yaml", None,
     lambda t: ["--profile-2", str(PROFILES / "tiny-random-i2v.yaml")], "profile_2: the model at"),
    ("i2v-a14b-profile-2-absent", "tiny-random-i2v-a14b.yaml", None, lambda t: ["--profile-2", "none"],
     "has two experts; give a profile for each"),
    ("model-clip-missing", "tiny-random-i2v.yaml",
     lambda t, raw: (shutil.rmtree(model_with(t, "model_index.json") / "image_encoder"),
                     raw["model"].update(path=str(t / "model"))), lambda t: [],
     "no weights in image_encoder/"),
    ("model-clip-processor-missing", "tiny-random-i2v.yaml",
     lambda t, raw: (shutil.rmtree(model_with(t, "model_index.json", image_processor=[None, None]) / "image_processor"),
                     raw["model"].update(path=str(t / "model"))), lambda t: [],
     "no image_processor/preprocessor_config.json"),
    ("model-in-channels", "tiny-random-i2v.yaml",
     lambda t, raw: raw["model"].update(path=str(model_with(t, "transformer/config.json", in_channels=20))),
     lambda t: [], "in_channels=20: expected 4 (text-to-video) or 12"),
]


@pytest.mark.parametrize("name,edit,argv,needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_i2v_bad_input_is_one_line_exit_2(generate, tmp_path, monkeypatch, capsys, name, edit, argv,
                                          needle):
    flags = ["--config", str(edited_config(tmp_path, name, edit)), *argv(tmp_path)]
    assert_refused(generate, flags, tmp_path, monkeypatch, capsys, needle.replace("{t}", str(tmp_path)))


def test_the_i2v_configs_validate(generate, tmp_path, monkeypatch, capsys):
    """Every committed tiny image-to-video config passes every check (--validate-only: nothing loads)."""
    monkeypatch.chdir(tmp_path)
    for name in ("tiny-random-i2v.yaml", "tiny-random-i2v-a14b.yaml", "tiny-random-flf2v.yaml"):
        assert generate.main(["--config", str(REPO_ROOT / "configs" / name), "--validate-only"]) == 0, \
            capsys.readouterr().err


@pytest.mark.parametrize("name", ["wan2.1-i2v-14b-480p.yaml", "wan2.1-i2v-14b-720p.yaml", "wan2.2-i2v-a14b.yaml",
                                  "wan2.1-flf2v-14b-720p.yaml"])
def test_real_i2v_configs_parse_and_say_their_profiles_are_not_probed(name):
    from freeloc_dist.config import load_render_config
    from freeloc_dist.profile import load_profile

    cfg = load_render_config(REPO_ROOT / "configs" / name)
    assert cfg.sampling.max_text_tokens == 512 and cfg.image is None  # the image is the user's
    for path in (cfg.profile, cfg.profile_2):
        if path is not None:
            prof = load_profile(path)
            assert "NOT probed" in prof.source and prof.num_layers == 40 and not prof.tsa_sinks_given


def test_dry_run_of_the_wan21_i2v_config_counts_clip(generate, capsys):
    """No model directory here: the built-in Wan2.1-I2V-14B transformer config and ViT-H/14 are counted."""
    code = generate.main(["--config", str(REPO_ROOT / "configs" / "wan2.1-i2v-14b-480p.yaml"), "--dry-run",
                          "--world-size", "8"])
    out = capsys.readouterr().out
    assert code == 0 and "weights: image encoder" in out and "conditioning video (once)" in out, out
