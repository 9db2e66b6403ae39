"""The procedural video world of the miniature long-video testbed.

A world is drawn from a seed: a low-saturation textured background (a grey gradient with soft stripes,
static over time) and one or two saturated shapes (circle or square, from a palette of six colours) that
move at constant velocity and bounce off the frame edges. Everything is known exactly: the prompt
("a red circle and a blue square"), every object's colour, shape, size and per-frame centre, so quality
metrics can be measured against ground truth. `render` draws any number of frames, so the same world serves
as a short training clip and as the reference for a 12x-long sample.

Shapes (legend): V video frames, P pixels (square frames, P x P), K objects.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Saturated object colours (RGB in [0, 1]); the background never reaches their saturation.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.80, 0.15),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "magenta": (0.90, 0.15, 0.85),
    "cyan": (0.10, 0.85, 0.90),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square")
RADIUS_FRACTION = 0.14  # object half-size as a fraction of the frame side (9 px at 64 px)
SPEED_RANGE = (0.012, 0.035)  # object speed per video frame, as a fraction of the frame side


@dataclass(frozen=True)
class WorldObject:
    colour: str
    shape: str
    position: tuple[float, float]  # (y, x) centre at frame 0, in units of the frame side
    velocity: tuple[float, float]  # (vy, vx) per video frame, in units of the frame side

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class World:
    objects: tuple[WorldObject, ...]
    background: tuple[float, ...]  # texture parameters: base, gradient angle, gradient amplitude,
    #                                stripe angle, stripe frequency, stripe amplitude, tint r, g, b

    @property
    def prompt(self) -> str:
        return " and ".join(f"a {o.name}" for o in self.objects)


def sample_world(seed: int, num_objects: int | None = None) -> World:
    """A random world; depends only on `seed` (and `num_objects`, 1 or 2; random when None)."""
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, 3)) if num_objects is None else num_objects
    colours = rng.choice(len(COLOURS), size=k, replace=False)  # distinct colours: identity is by colour
    r = RADIUS_FRACTION
    objects = []
    for c in colours:
        speed = rng.uniform(*SPEED_RANGE)
        angle = rng.uniform(0, 2 * np.pi)
        objects.append(WorldObject(
            colour=COLOURS[c],
            shape=SHAPES[int(rng.integers(len(SHAPES)))],
            position=(float(rng.uniform(r, 1 - r)), float(rng.uniform(r, 1 - r))),
            velocity=(float(speed * np.sin(angle)), float(speed * np.cos(angle))),
        ))
    background = (
        rng.uniform(0.35, 0.6), rng.uniform(0, 2 * np.pi), rng.uniform(0.05, 0.15),
        rng.uniform(0, np.pi), rng.uniform(3, 7), rng.uniform(0.03, 0.08),
        *rng.uniform(-0.04, 0.04, size=3),
    )
    return World(objects=tuple(objects), background=tuple(float(v) for v in background))


def _bounce(p0: float, v: float, t: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Position at times t of a point moving at speed v from p0, reflecting between lo and hi."""
    span = hi - lo
    u = np.mod(p0 - lo + v * t, 2 * span)  # unfold the reflections into a triangle wave
    return lo + np.where(u <= span, u, 2 * span - u)


def trajectories(world: World, num_frames: int) -> np.ndarray:
    """Object centres [K, V, 2] (y, x) in units of the frame side, frame 0 = the world's initial state."""
    t = np.arange(num_frames, dtype=np.float64)
    r = RADIUS_FRACTION
    out = np.zeros((len(world.objects), num_frames, 2))
    for k, o in enumerate(world.objects):
        for a in range(2):
            out[k, :, a] = _bounce(o.position[a], o.velocity[a], t, r, 1 - r)
    return out


def background_image(world: World, size: int) -> np.ndarray:
    """The static textured background [P, P, 3], float in [0, 1]."""
    base, g_ang, g_amp, s_ang, s_freq, s_amp, tr, tg, tb = world.background
    yy, xx = np.meshgrid((np.arange(size) + 0.5) / size, (np.arange(size) + 0.5) / size, indexing="ij")
    grad = g_amp * ((yy - 0.5) * np.sin(g_ang) + (xx - 0.5) * np.cos(g_ang)) * 2
    stripes = s_amp * np.sin(2 * np.pi * s_freq * (yy * np.sin(s_ang) + xx * np.cos(s_ang)))
    grey = base + grad + stripes  # [P, P]
    return np.clip(grey[..., None] + np.array([tr, tg, tb]), 0, 1)


def object_mask(shape: str, centre: tuple[float, float], size: int, supersample: int = 4) -> np.ndarray:
    """Antialiased coverage [P, P] in [0, 1] of one object centred at `centre` (frame-side units)."""
    s = supersample
    coords = (np.arange(size * s) + 0.5) / (size * s)
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    dy, dx = yy - centre[0], xx - centre[1]
    r = RADIUS_FRACTION
    inside = (dy * dy + dx * dx <= r * r) if shape == "circle" else (np.abs(dy) <= r * 0.9) & (np.abs(dx) <= r * 0.9)
    return inside.reshape(size, s, size, s).mean(axis=(1, 3))


def render(world: World, num_frames: int, size: int = 64, stride: int = 1) -> np.ndarray:
    """uint8 video [V, P, P, 3] of frames 0, stride, 2 stride, ... < num_frames; objects are drawn in list
    order (the later one on top)."""
    bg = background_image(world, size)
    paths = trajectories(world, num_frames)
    times = range(0, num_frames, stride)
    video = np.empty((len(times), size, size, 3), dtype=np.float64)
    for i, t in enumerate(times):
        frame = bg.copy()
        for k, o in enumerate(world.objects):
            m = object_mask(o.shape, tuple(paths[k, t]), size)[..., None]
            frame = frame * (1 - m) + np.array(PALETTE[o.colour]) * m
        video[i] = frame
    return (video * 255).round().astype(np.uint8)
