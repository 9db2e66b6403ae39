"""Long-video sampling methods in one engine: FreeLOC variants and the baselines it is compared with.

A method changes at most three things of a render, each through an existing seam of the sampling loop
(freeloc_dist.sampling): the model (an install that returns its own undo: FreeLOC processors, RIFLEx's
RoPE frequency), the prediction function (`predict=`: global latents in, guided flow out; sliding-window
and FreeNoise fusion live here) and the initial noise (FreeNoise's rescheduling). Methods only need the
model's trained length T (latent frames); every method reduces to direct sampling when F <= T.

- direct: stock attention over all F frames.
- sliding: windows of T frames, stride `stride` (default T // 2, at least 1), the last window aligned to
  the end; the predictions of overlapping windows are averaged (uniform overlap fusion).
- freenoise: FreeNoise (Qiu et al. 2024): noise of the first window, then every next block of `stride`
  frames reuses the first window's frame noises in a shuffled order (noise rescheduling), plus window
  fusion weighted by closeness to each window's centre.
- riflex: RIFLEx (Zhao et al. 2025): the temporal RoPE component whose period is closest to T (the
  intrinsic frequency) is lowered to 0.9 * 2 pi / F, so it stays inside one period over the whole video.
- freeloc, freeloc-all, freeloc-random: FreeLOC with a profile (the probed or published one), with TSA (both
  fixes: re-encoded positions and tiered sparse attention) on every layer, and with a random assignment of
  the same number of TSA/VRPR layers (the paper's ablation).
- freeloc-long: FreeLOC with the profile's long variant (issue 18: a sparse long range on some dense layers):
  the sibling file `<profile stem>-long.yaml` (configs/profiles/toy.yaml -> toy-long.yaml), or `long_profile`.

Shapes (legend): B batch, C latent channels, F latent frames, H/W latent cells.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Callable

import torch

from freeloc_dist.sampling import LatentGeometry, PredictFn, initial_noise, predict_noise, render

METHODS = ("direct", "sliding", "freenoise", "riflex", "freeloc", "freeloc-all", "freeloc-random", "freeloc-long")

Undo = Callable[[], None]


@dataclass
class Method:
    name: str
    install: Callable[[Any, int], Undo] = lambda transformer, num_frames: (lambda: None)
    predict: PredictFn = predict_noise
    noise: Callable[[LatentGeometry, int, Any], torch.Tensor] = initial_noise

    def render(self, components, cfg, latent_frames: int):
        """freeloc_dist.sampling.render of `cfg` (`latent_frames` latent frames) with this method: installed on the
        model for this render only, its predict and noise. Rendering with `sampling.render` alone is direct."""
        undo = self.install(components.transformer, latent_frames)
        try:
            return render(components, cfg, predict=self.predict, noise=self.noise)
        finally:
            undo()


# ----------------------------------------------------------------------------------------------- windows

def window_starts(num_frames: int, window: int, stride: int) -> list[int]:
    """Start frames of windows of `window` frames covering [0, F); the last window ends at F."""
    if not 1 <= stride <= window:
        raise ValueError(f"window stride {stride} must be in [1, window={window}] so windows cover every frame")
    if num_frames <= window:
        return [0]
    starts = list(range(0, num_frames - window + 1, stride))
    if starts[-1] != num_frames - window:
        starts.append(num_frames - window)
    return starts


def window_weights(window: int, shape: str) -> torch.Tensor:
    """Per-frame fusion weights [window]: uniform, or peaked at the centre (triangular, never zero)."""
    if shape == "uniform":
        return torch.ones(window)
    i = torch.arange(window, dtype=torch.float32)
    return torch.minimum(i + 1, window - i)


def windowed_predict(window: int, stride: int, weights: str = "uniform", inner: PredictFn = predict_noise) -> PredictFn:
    """A predict function running `inner` on temporal windows and fusing the overlaps by weighted mean."""

    def predict(transformer, latents, t, cond, uncond, guidance):
        num_frames = latents.shape[2]
        if num_frames <= window:
            return inner(transformer, latents, t, cond, uncond, guidance)
        w = window_weights(window, weights).to(latents.device).view(1, 1, -1, 1, 1)
        total = torch.zeros(latents.shape, dtype=torch.float32, device=latents.device)
        norm = torch.zeros((1, 1, num_frames, 1, 1), dtype=torch.float32, device=latents.device)
        for s in window_starts(num_frames, window, stride):
            flow = inner(transformer, latents[:, :, s:s + window], t, cond, uncond, guidance)  # [B, C, w, H, W]
            total[:, :, s:s + window] += w * flow
            norm[:, :, s:s + window] += w
        return total / norm

    return predict


def freenoise_noise(window: int, stride: int) -> Callable[[LatentGeometry, int, Any], torch.Tensor]:
    """FreeNoise's rescheduled initial noise: the first window's frame noises, reused shuffled per block."""

    def noise(geometry: LatentGeometry, seed: int, device) -> torch.Tensor:
        base = initial_noise(geometry, seed, "cpu")  # [1, C, F, H, W]; frames >= window are replaced
        if geometry.frames <= window:
            return base.to(device)
        gen = torch.Generator().manual_seed(seed + 1)
        out = base.clone()
        for start in range(window, geometry.frames, stride):
            n = min(stride, geometry.frames - start)
            perm = torch.randperm(window, generator=gen)[:n]
            out[:, :, start:start + n] = base[:, :, perm]
        return out.to(device)

    return noise


# ----------------------------------------------------------------------------------------------- RIFLEx

def riflex_frequency(t_dim: int, trained_frames: int, theta: float = 10000.0) -> int:
    """Index k of the temporal RoPE frequency whose period 2 pi / w_k is closest to T (intrinsic)."""
    w = 1.0 / theta ** (torch.arange(0, t_dim, 2, dtype=torch.float64) / t_dim)
    return int(torch.argmin((2 * math.pi / w - trained_frames).abs()))


def install_riflex(transformer, num_frames: int, trained_frames: int) -> Undo:
    """Lower the intrinsic temporal frequency in the model's RoPE tables (its family's set_temporal_frequency)."""
    if num_frames <= trained_frames:
        return lambda: None
    from .families import family_of

    family = family_of(transformer)
    k = riflex_frequency(family.temporal_rope(transformer).t_dim, trained_frames)
    return family.set_temporal_frequency(transformer, k, 0.9 * 2 * math.pi / num_frames)


# ----------------------------------------------------------------------------------------------- FreeLOC

def install_freeloc_profile(transformer, profile, backend: str = "sdpa") -> Undo:
    from freeloc_dist.install import apply_freeloc, restore, snapshot

    before = snapshot(transformer)
    apply_freeloc(transformer, profile, backend)
    return lambda: restore(transformer, before)


def profile_variant(profile, variant: str, seed: int = 0) -> dict:
    """The profile mapping as given ("freeloc"), TSA on every layer ("freeloc-all"), or the same numbers
    of TSA/VRPR/full layers assigned at random ("freeloc-random")."""
    from freeloc_dist.profile import load_profile

    prof = load_profile(profile)
    m = prof.to_mapping()
    n = prof.num_layers
    if variant == "freeloc-all":
        m["layers"] = {"tsa": list(range(n)), "vrpr": [], "full": []}
        m["source"] = f"all layers tsa (ablation of {prof.model})"
    elif variant == "freeloc-random":
        kinds = list(prof.kinds)
        random.Random(seed).shuffle(kinds)
        m["layers"] = {k: [i for i, kind in enumerate(kinds) if kind == k] for k in ("tsa", "vrpr", "full")}
        m["source"] = f"random assignment, seed {seed} (ablation of {prof.model})"
    elif variant != "freeloc":
        raise ValueError(f"unknown FreeLOC variant {variant!r}")
    return m


# ----------------------------------------------------------------------------------------------- registry

def long_variant(profile) -> str:
    """The long variant of a profile file: `<stem>-long.yaml` beside it (freeloc-long)."""
    import os

    if not isinstance(profile, (str, os.PathLike)):
        raise ValueError("method 'freeloc-long' needs a profile path (its long variant is <stem>-long.yaml) "
                         "or long_profile")
    path = os.fspath(profile)
    stem, ext = os.path.splitext(path)
    return f"{stem}-long{ext}"


def get_method(name: str, *, trained_frames: int, profile=None, stride: int | None = None,
               backend: str = "sdpa", seed: int = 0, long_profile=None) -> Method:
    """Build a method by name (see METHODS); FreeLOC methods need `profile`."""
    t = trained_frames
    stride = stride or max(1, t // 2)
    if name == "direct":
        return Method(name)
    if name == "sliding":
        return Method(name, predict=windowed_predict(t, stride, "uniform"))
    if name == "freenoise":
        return Method(name, predict=windowed_predict(t, stride, "centre"), noise=freenoise_noise(t, stride))
    if name == "riflex":
        return Method(name, install=lambda tr, f: install_riflex(tr, f, t))
    if name in ("freeloc", "freeloc-all", "freeloc-random"):
        if profile is None:
            raise ValueError(f"method {name!r} needs a FreeLOC profile")
        m = profile_variant(profile, name, seed)
        return Method(name, install=lambda tr, f: install_freeloc_profile(tr, m, backend))
    if name == "freeloc-long":
        if profile is None and long_profile is None:
            raise ValueError("method 'freeloc-long' needs a FreeLOC profile")
        from freeloc_dist.profile import load_profile

        m = load_profile(long_profile if long_profile is not None else long_variant(profile)).to_mapping()
        return Method(name, install=lambda tr, f: install_freeloc_profile(tr, m, backend))
    raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
