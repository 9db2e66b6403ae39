"""What a model directory holds, as every family reports it (DESIGN 11): `ModelKind`, read from the directory's
configs by the family whose pipeline class model_index.json names (freeloc_dist.family.read_model_kind), never
from its name or path. No torch import: this runs before any heavy work.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

EXPERT_NAMES = ("transformer", "transformer_2")  # high-noise expert first (diffusers' component names)


class ModelKindError(UserError, ValueError):
    """The model directory's configs disagree with each other or with what this engine supports."""


@dataclass(frozen=True)
class FramesRule:
    """How a causal video VAE counts frames: the first frame is one latent frame, then every `temporal` frames
    another, so a video has temporal * k + 1 frames (k + 1 latent frames)."""

    temporal: int

    def latent_frames(self, frames: int) -> int:
        return (frames - 1) // self.temporal + 1

    def frames(self, latent_frames: int) -> int:
        """Video frames of `latent_frames` latent frames."""
        return self.temporal * (latent_frames - 1) + 1

    def valid(self, frames: int) -> bool:
        return frames >= 1 and (frames - 1) % self.temporal == 0

    def nearest(self, seconds: float, fps: int) -> int:
        """The valid frame count (at least 1) nearest to `seconds` of video at `fps` (ValueError when seconds x fps
        is not a finite number)."""
        if not math.isfinite(seconds * fps):
            raise ValueError(f"{seconds} seconds at {fps} fps is not a finite number of frames")
        return self.temporal * max(0, round((seconds * fps - 1) / self.temporal)) + 1

    def problem(self, frames: int) -> str:
        """What is wrong with an invalid count, with the two valid counts around it."""
        low = max(1, self.frames(self.latent_frames(frames)))  # the valid count at or below `frames` (at least 1)
        return f"must be {self.temporal}k+1 (e.g. {low} or {low + self.temporal})"


# The rule a config is checked against before its model is read. Every family served today (Wan's causal VAEs,
# HunyuanVideo's) compresses time 4x; preflight refuses a model whose VAE counts frames otherwise
# (ModelKind.frames_rule), so a family with another rule is one clear line, not a wrong latent length.
FRAMES_RULE = FramesRule(4)


@dataclass(frozen=True, kw_only=True)
class ModelKind:
    pipeline: str  # model_index.json _class_name
    task: str  # "t2v" (text only), "i2v" (image-conditioned channels), "ti2v" (expand_timesteps)
    experts: tuple[str, ...]  # ("transformer",) or ("transformer", "transformer_2")
    boundary_ratio: float | None  # the second expert runs at t < boundary_ratio * num_train_timesteps
    expand_timesteps: bool  # per-token timesteps
    latent_channels: int  # C: VAE z_dim = transformer out_channels
    in_channels: int  # transformer input: C, or C + 4 mask + C conditioning (i2v)
    image_tokens: int  # CLIP tokens before the text (0: no image encoder)
    num_layers: int
    num_heads: int
    head_dim: int
    patch_size: tuple[int, int, int]
    vae_temporal: int  # video frames per latent frame (after the first)
    vae_spatial: int  # pixels per latent cell, per axis
    trained_frames: int  # T
    condition_images: int = 1  # images the model is conditioned on: 2 for FLF2V (first and last frame)
    family: str = ""  # the family that read it (freeloc_dist.families), which a profile's `family` must name

    @property
    def frames_rule(self) -> FramesRule:
        return FramesRule(self.vae_temporal)

    @property
    def first_last_frame(self) -> bool:
        """Conditioned on a first and a last frame."""
        return self.condition_images == 2

    @property
    def conditioned(self) -> bool:
        """The transformer takes mask + conditioning-video channels (image-to-video)."""
        return self.in_channels != self.latent_channels

    @property
    def two_experts(self) -> bool:
        return len(self.experts) == 2

    @property
    def tokens_per_pixel_axis(self) -> tuple[int, int]:
        """Pixels per token along height and width (VAE factor x patch)."""
        return self.vae_spatial * self.patch_size[1], self.vae_spatial * self.patch_size[2]


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelKindError(f"model directory: missing {path.parent.name}/{path.name}") from None
    except (OSError, ValueError) as e:
        raise ModelKindError(f"model directory: {path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelKindError(f"model directory: {path}: expected a JSON object")
    return data


def read_pipeline(root: Path, pipelines: tuple[str, ...]) -> tuple[dict, str]:
    """(model_index.json, its pipeline class), which must be one of the family's `pipelines`."""
    index = read_json(root / "model_index.json")
    pipeline = str(index.get("_class_name", ""))
    if pipeline not in pipelines:
        raise ModelKindError(f"model_index.json: _class_name={pipeline!r}: expected {' or '.join(pipelines)}")
    return index, pipeline


def check_profile_fits(kind: ModelKind, profile, where: str) -> None:
    """A FreeLOC profile must be made for this model's family (when it names one), list its layers and be made
    for its trained length; one line."""
    if profile.family is not None and kind.family and profile.family != kind.family:
        raise ModelKindError(f"{where}: is a profile for the {profile.family} family, the model is {kind.family} "
                             f"({kind.pipeline})")
    if profile.num_layers != kind.num_layers:
        raise ModelKindError(f"{where}: lists {profile.num_layers} layers, the model has {kind.num_layers}")
    if profile.trained_frames != kind.trained_frames:
        raise ModelKindError(f"{where}: trained_frames={profile.trained_frames}, but this {kind.task} model was "
                             f"trained on {kind.trained_frames} latent frames")


FREELOC_FILE = "freeloc.json"  # our facts about a model directory, in a file diffusers never reads


def declared_trained_frames(root: Path, index: dict) -> int | None:
    """T as the model directory declares it (our writer does, for test models never trained at the family's
    length): freeloc.json's `trained_frames`, else (directories written before it) model_index.json's; None when
    neither says. It lives in its own file because diffusers warns about every key of model_index.json that
    its pipeline does not take, on every from_pretrained."""
    where, declared = "model_index.json", index.get("trained_frames")
    own = root / FREELOC_FILE
    if own.is_file():
        where, declared = FREELOC_FILE, read_json(own).get("trained_frames")
    if declared is not None and (isinstance(declared, bool) or not isinstance(declared, int) or declared < 1):
        raise ModelKindError(f"{where}: trained_frames={declared!r}: must be a positive integer")
    return declared


def write_declared_trained_frames(out: Path, trained_frames: int | None) -> None:
    """The writer's side of declared_trained_frames (a test model's T), beside the diffusers files."""
    if trained_frames is not None:
        (out / FREELOC_FILE).write_text(json.dumps({"trained_frames": trained_frames}, indent=2) + "\n")
