"""Resumable sampling: checkpoints of the denoising loop, and the preemption signal handler.

A checkpoint holds everything the loop needs to continue bit-for-bit: the global latents after step k, the
scheduler's mutable state (multistep schedulers such as UniPC keep previous model outputs), the torch CPU
RNG state, and a fingerprint of everything that determines the result (model, profile, video, sampling,
prompt). Resuming a checkpoint whose fingerprint differs is a user error rather than a silent mix of two
renders. Under torchrun every rank holds the same global latents and scheduler state, so rank 0 alone writes
the file and every rank reads it on resume (a shared filesystem is assumed). Files are written atomically
(temporary name, then rename), so a kill during the write leaves the previous checkpoint intact.

`PreemptionFlag` turns SIGTERM / SIGUSR1 (Slurm's preemption and time-limit warnings) into a flag that the
loop checks between steps; the ranks agree on it with one all-reduce per step so they all stop together.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import signal
from pathlib import Path
from typing import Any

import torch

from freeloc_dist.config import RenderConfig

from .errors import UserError

FORMAT_VERSION = 1
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be resumed (corrupt, or from a different render); message is one line."""


def checkpoint_path(cfg: RenderConfig) -> Path:
    """Default checkpoint file: hidden, next to the output (`outputs/.fox.mp4.ckpt`)."""
    if cfg.checkpoint.path is not None:
        return cfg.checkpoint.path
    return cfg.output.parent / f".{cfg.output.name}.ckpt"


def fingerprint_settings(cfg: RenderConfig, profile, *, profile_2=None, boundary_ratio: float | None = None) -> dict:
    """Every setting that changes the latents (not output names, parallel layout or checkpointing: a render
    may resume on a different number of ranks), by name. `profile`: the render's loaded Profile or None.
    The weights enter by (file, size, mtime): weights replaced in place under the same path change it.
    Two-expert models add the second expert's profile and the boundary (one-expert settings are unchanged)."""
    from freeloc_dist.models import weights_signature

    settings = {
        "model": [str(cfg.model.path), cfg.model.dtype],
        "weights": weights_signature(cfg.model.path),
        "profile": profile.to_mapping() if profile is not None else None,
        "attention_backend": cfg.attention_backend,
        **{f"video.{k}": getattr(cfg.video, k) for k in ("height", "width", "frames")},
        **{f"sampling.{k}": v for k, v in dataclasses.asdict(cfg.sampling).items()},
        "prompt": cfg.prompt,
    }
    # settings added later enter only when not at their default, so checkpoints written before them still resume
    for key, default in (("scheduler", "model"), ("true_cfg_scale", 1.0)):
        if getattr(cfg.sampling, key) == default:
            del settings[f"sampling.{key}"]
    if cfg.model.loras:  # each file's content (a changed file at the same path does not resume), scale, expert
        from freeloc_dist.loras import fingerprint_key

        settings["loras"] = fingerprint_key(cfg.model)
    # image-to-video: the pictures' content, not their paths (a moved or copied picture resumes; another picture
    # at the same path does not)
    for key in ("image", "last_image"):
        path = getattr(cfg, key)
        if path is not None:
            from freeloc_dist.images import image_digest

            settings[key] = image_digest(path)
    if cfg.storyboard is not None:  # the schedule itself, not its path (freeloc_dist.storyboard)
        from freeloc_dist.storyboard import load_storyboard

        settings["storyboard"] = load_storyboard(cfg.storyboard).to_mapping()
    if cfg.cache is not None:
        settings["cache"] = cfg.cache
    if boundary_ratio is not None:
        settings["profile_2"] = profile_2.to_mapping() if profile_2 is not None else None
        settings["boundary_ratio"] = boundary_ratio
    return settings


def expert_key(two_experts: bool, boundary_ratio: float | None, profile_2) -> dict:
    """What a second expert adds to the fingerprint (keyword arguments of fingerprint_settings): its
    profile and the switch point; nothing for a one-expert model."""
    return {"profile_2": profile_2, "boundary_ratio": boundary_ratio} if two_experts else {}


def _digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint(cfg: RenderConfig, profile, **experts) -> str:
    """Hash of `fingerprint_settings` (`experts`: profile_2 and boundary_ratio of a two-expert model)."""
    return _digest(fingerprint_settings(cfg, profile, **experts))


def _settings_digests(settings: dict) -> dict[str, str]:
    """One short hash per setting, stored in the checkpoint so a mismatch can name what differs."""
    return {k: _digest({k: v}) for k, v in settings.items()}


# ---------------------------------------------------------------------------------------- scheduler state
_SKIP = {"_internal_dict", "config"}


def _plain(value: Any, where: str) -> Any:
    """Scheduler attributes as types torch.load(weights_only=True) accepts."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if torch.is_tensor(value):
        return value.detach().to("cpu").clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v, where) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v, where) for k, v in value.items()}
    import numpy as np

    if isinstance(value, np.ndarray):
        return {"__ndarray__": torch.from_numpy(value.copy())}
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot checkpoint scheduler attribute {where} of type {type(value).__name__}")


def _restore(value: Any, device) -> Any:
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, dict):
        if set(value) == {"__ndarray__"}:
            return value["__ndarray__"].numpy()
        return {k: _restore(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_restore(v, device) for v in value)
    return value


def scheduler_state(scheduler) -> dict:
    """The mutable state of a diffusers scheduler (everything but its config)."""
    return {k: _plain(v, k) for k, v in vars(scheduler).items() if k not in _SKIP}


def load_scheduler_state(scheduler, state: dict, device) -> None:
    """Restore `scheduler_state` output onto a scheduler built from the same config."""
    for k, v in state.items():
        setattr(scheduler, k, _restore(v, device))


# ---------------------------------------------------------------------------------------- files
@dataclasses.dataclass
class Checkpoint:
    step: int  # scheduler steps completed
    total_steps: int
    latents: torch.Tensor  # [B, C, F, H, W] float32, after `step` steps
    scheduler: dict
    rng: torch.Tensor
    fingerprint: str
    settings: dict | None = None  # fingerprint_settings of the render (names what differs on a mismatch)


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> Path:
    from freeloc_dist.video import atomic_path

    payload = {
        "format": FORMAT_VERSION,
        "step": ckpt.step,
        "total_steps": ckpt.total_steps,
        "latents": ckpt.latents.detach().to("cpu").contiguous(),
        "scheduler": ckpt.scheduler,
        "rng": ckpt.rng,
        "fingerprint": ckpt.fingerprint,
        "settings": _settings_digests(ckpt.settings) if ckpt.settings is not None else None,
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


_FIELDS = {"step": int, "total_steps": int, "latents": torch.Tensor, "scheduler": dict, "rng": torch.Tensor,
           "fingerprint": str}


def load_checkpoint(path: str | Path, expected_fingerprint: str, expected_settings: dict | None = None,
                    *, latent_shape: tuple[int, ...] | None = None) -> Checkpoint:
    """Read and check a checkpoint against this render; every problem is one CheckpointError line.
    `latent_shape`: the render's [B, C, F, H, W] (None: not checked)."""
    path = Path(path)
    fix = "delete it to start over"
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, unpickling refused
        raise CheckpointError(f"checkpoint {path}: cannot read ({type(e).__name__}); {fix}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path}: not a freeloc_dist checkpoint (format {FORMAT_VERSION})")
    for key, kind in _FIELDS.items():
        value = payload.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise CheckpointError(f"checkpoint {path}: {key} missing or not a {kind.__name__}; {fix}")
    if payload["fingerprint"] != expected_fingerprint:
        differ = _what_differs(payload, expected_settings)
        raise CheckpointError(f"checkpoint {path}: written by a different render ({differ} differ); "
                              f"delete it or drop --resume")
    step, total, latents = payload["step"], payload["total_steps"], payload["latents"]
    if not 0 <= step <= total:
        raise CheckpointError(f"checkpoint {path}: step {step} is outside 0..{total}; {fix}")
    if latent_shape is not None and tuple(latents.shape) != tuple(latent_shape):
        raise CheckpointError(f"checkpoint {path}: latents {list(latents.shape)}, this render's are "
                              f"{list(latent_shape)}; {fix}")
    if latents.dtype != torch.float32 or not bool(torch.isfinite(latents).all()):
        raise CheckpointError(f"checkpoint {path}: latents are not finite float32 (NaN or inf); {fix}")
    return Checkpoint(step=step, total_steps=total, latents=latents, scheduler=payload["scheduler"],
                      rng=payload["rng"], fingerprint=payload["fingerprint"])


def _what_differs(payload: dict, expected_settings: dict | None) -> str:
    """The names of the settings that differ, when the checkpoint recorded them."""
    theirs = payload.get("settings")
    if not isinstance(theirs, dict) or expected_settings is None:
        return "model, weights, profile, video, sampling or prompt"
    ours = _settings_digests(expected_settings)
    names = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    return ", ".join(names) if names else "settings"


# ---------------------------------------------------------------------------------------- signals
class PreemptionFlag:
    """Context manager: while active, SIGTERM/SIGUSR1 set `.raised` instead of killing the process."""

    def __init__(self):
        self.raised: int | None = None  # the signal number received
        self._previous: dict = {}

    def _handle(self, signum, frame):
        self.raised = signum

    def __enter__(self) -> "PreemptionFlag":
        for sig in PREEMPT_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
