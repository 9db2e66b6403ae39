"""Bad input for the Wan-family flags and keys: one stderr line `error: ...`, exit 2, before any weights load
(in-process through generate.main, as test_bad_input.py does), and profile/model mismatches."""

import json
import shutil

import pytest
import yaml
from _cli import assert_refused, edited_config

from freeloc_dist.config import REPO_ROOT

pytestmark = pytest.mark.unit
PROFILES = REPO_ROOT / "configs" / "profiles"


def profile_with(tmp_path, **changes):
    p = yaml.safe_load((PROFILES / "tiny-random.yaml").read_text())
    p.update(changes)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(p))
    return path


def model_with(tmp_path, where, **changes):
    model = tmp_path / "model"
    shutil.copytree(REPO_ROOT / "assets" / "tiny-a14b", model)
    data = json.loads((model / where).read_text())
    data.update(changes)
    (model / where).write_text(json.dumps(data))
    return model


def use_model(where, **changes):
    return lambda t, raw: raw["model"].update(path=str(model_with(t, where, **changes)))


# (id, config, config edit(tmp_path, raw), extra argv(tmp_path), text the error line must contain)
CASES = [
    ("guidance-type", "tiny-random.yaml", None, lambda t: ["--guidance-scale", "x"], "--guidance-scale"),
    ("guidance-negative", "tiny-random.yaml", None, lambda t: ["--guidance-scale", "-1"],
     "sampling.guidance_scale=-1.0: must be a finite number >= 0"),
    ("guidance-2-nan", "tiny-random-a14b.yaml", None, lambda t: ["--guidance-scale-2", "nan"],
     "sampling.guidance_scale_2=nan"),
    ("guidance-2-one-expert", "tiny-random.yaml", None, lambda t: ["--guidance-scale-2", "2"],
     "sampling.guidance_scale_2: the model at"),
    ("negative-prompt-no-value", "tiny-random.yaml", None, lambda t: ["--negative-prompt"], "--negative-prompt"),
    ("profile-2-one-expert", "tiny-random.yaml", None, lambda t: ["--profile-2", str(PROFILES / "tiny-random.yaml")],
     "profile_2: the model at"),
    ("profile-2-missing-file", "tiny-random-a14b.yaml", None, lambda t: ["--profile-2", str(t / "nope.yaml")],
     "profile_2='"),
    ("profile-2-absent", "tiny-random-a14b.yaml", None, lambda t: ["--profile-2", "none"],
     "has two experts; give a profile for each"),
    ("profile-2-trained-frames", "tiny-random-a14b.yaml", None,
     lambda t: ["--profile-2", str(profile_with(t, trained_frames=21))],
     "trained_frames=21, but this t2v model was trained on 5 latent frames"),
    ("profile-trained-frames", "tiny-random.yaml", None,
     lambda t: ["--profile", str(profile_with(t, trained_frames=9))],
     "trained_frames=9, but this t2v model was trained on 5"),
    ("model-in-channels", "tiny-random-a14b.yaml", use_model("transformer/config.json", in_channels=36), lambda t: [],
     "in_channels=36: expected 4 (text-to-video) or 12"),
    ("ti2v-size", "tiny-random-ti2v.yaml", None, lambda t: ["--width", "80"],
     "video.width=80: must be a multiple of 32 for this model"),
    ("ti2v-profile-trained-frames", "tiny-random-ti2v.yaml", None,
     lambda t: ["--profile", str(profile_with(t, trained_frames=21))],
     "trained_frames=21, but this ti2v model was trained on 5 latent frames"),
    ("model-no-boundary", "tiny-random-a14b.yaml", use_model("model_index.json", boundary_ratio=None), lambda t: [],
     "transformer_2 and boundary_ratio come together"),
    ("model-expert-layers", "tiny-random-a14b.yaml", use_model("transformer_2/config.json", num_layers=4),
     lambda t: [], "transformer_2/config.json: num_layers=4 differs"),
]


@pytest.mark.parametrize("name,edit,argv,needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_family_bad_input_is_one_line_exit_2(generate, tmp_path, monkeypatch, capsys, name, edit, argv,
                                             needle):
    flags = ["--config", str(edited_config(tmp_path, name, edit)), *argv(tmp_path)]
    assert_refused(generate, flags, tmp_path, monkeypatch, capsys, needle)
