"""Storyboards: one video that follows a prompt schedule (`--storyboard FILE`, config `storyboard:`, a queue
job's `storyboard`).

A storyboard file is a YAML list of segments, in time order:

    - {at: 0, prompt: "a red circle"}
    - {at: 20, prompt: "a blue square", negative_prompt: "blurry", transition: 2}

`at` is the second the segment starts (the first at 0, strictly increasing, each before the end of the video);
`negative_prompt` defaults to the config's `sampling.negative_prompt`; `transition` (seconds, default
DEFAULT_TRANSITION, 0 for a hard cut) is the window centred on `at` over which the conditioning blends
linearly from the previous segment's embedding into this one's. Windows may not overlap, so every latent
frame's conditioning is a blend of at most two segments (weights in [0, 1] summing to 1).

Latent frame f stands for the video frames it decodes to (freeloc_dist.families.kind.FRAMES_RULE: frame 0 for
f = 0, frames t(f-1)+1 .. t f for f >= 1 with t the VAE's temporal factor); its time is their mean time.
Each frame gets one *mix* (segment text -> weight); frames with the same mix share one conditioning, and a rank
under sequence parallelism builds (and encodes the texts of) only the mixes of its own frames: `text_plan`.
The family's cross-attention then attends each frame's queries to its own conditioning
(Family.install_frame_text). This module parses and plans without torch; `encode_frame_texts` builds the
tensors of one rank.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

from .errors import UserError

DEFAULT_TRANSITION = 1.0  # seconds
_KEYS = ("at", "prompt", "negative_prompt", "transition")


class StoryboardError(UserError, ValueError):
    """A bad storyboard file or a storyboard the render cannot use; one line naming the file and entry."""


@dataclasses.dataclass(frozen=True)
class Segment:
    at: float  # seconds
    prompt: str
    negative_prompt: str | None  # None: the config's sampling.negative_prompt
    transition: float  # seconds, centred on `at` (the first segment's is 0)


@dataclasses.dataclass(frozen=True)
class Storyboard:
    segments: tuple[Segment, ...]

    def to_mapping(self) -> list[dict]:
        """The schedule as data (the sidecar's and the resume fingerprint's view)."""
        return [dataclasses.asdict(s) for s in self.segments]


def _number(where: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
        raise StoryboardError(f"{where}: {key}={value!r}: expected a finite number of seconds")
    return float(value)


def parse_storyboard(raw: Any, source: str) -> Storyboard:
    """Validate a parsed storyboard (a list of mappings); `source` names it in errors (the file)."""
    if not isinstance(raw, list):
        raise StoryboardError(f"storyboard {source}: expected a YAML list of {{at, prompt}} entries, "
                              f"got {type(raw).__name__}")
    if not raw:
        raise StoryboardError(f"storyboard {source}: no entries")
    segments: list[Segment] = []
    for i, entry in enumerate(raw):
        where = f"storyboard {source}: entry {i + 1}"
        if not isinstance(entry, dict):
            raise StoryboardError(f"{where}: expected a mapping {{at, prompt}}, got {type(entry).__name__}")
        unknown = [k for k in entry if k not in _KEYS]
        if unknown:
            raise StoryboardError(f"{where}: {unknown[0]}: unknown key (expected one of: {', '.join(_KEYS)})")
        for key in ("at", "prompt"):
            if key not in entry:
                raise StoryboardError(f"{where}: {key}: missing")
        at = _number(where, "at", entry["at"])
        prompt = entry["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise StoryboardError(f"{where}: prompt={prompt!r}: expected a non-empty string")
        negative = entry.get("negative_prompt")
        if negative is not None and not isinstance(negative, str):
            raise StoryboardError(f"{where}: negative_prompt={negative!r}: expected a string")
        if i == 0:
            if at != 0:
                raise StoryboardError(f"{where}: at={entry['at']!r}: the first entry must be at 0")
            if "transition" in entry:
                raise StoryboardError(f"{where}: transition: the first entry has nothing to blend from")
            transition = 0.0
        else:
            transition = _number(where, "transition", entry.get("transition", DEFAULT_TRANSITION))
            if transition < 0:
                raise StoryboardError(f"{where}: transition={transition:g}: must be >= 0 seconds")
            before = segments[-1]
            if at <= before.at:
                raise StoryboardError(f"{where}: at={at:g}: times must strictly increase (entry {i} is at "
                                      f"{before.at:g})")
            if at - transition / 2 < before.at + before.transition / 2:
                raise StoryboardError(f"{where}: transition={transition:g}: overlaps the transition of entry {i} "
                                      f"(at {before.at:g}); shorten one of them")
        segments.append(Segment(at, prompt.strip(), negative, transition))
    return Storyboard(tuple(segments))


_LOADED: dict[Path, Storyboard] = {}  # read once per process: preflight's reading is the one the render uses


def load_storyboard(path: str | Path) -> Storyboard:
    """Read and validate a storyboard file (StoryboardError, one line); cached by path for the process."""
    from .yamlio import read_yaml_file

    path = Path(path)
    if path in _LOADED:
        return _LOADED[path]
    board = parse_storyboard(read_yaml_file(path, "storyboard", StoryboardError), str(path))
    _LOADED[path] = board
    return board


def check_fits(board: Storyboard, frames: int, fps: int, source: str) -> None:
    """Every entry starts inside the video of `frames` frames at `fps`."""
    duration = frames / fps
    for i, s in enumerate(board.segments):
        if s.at >= duration:
            raise StoryboardError(f"storyboard {source}: entry {i + 1}: at={s.at:g}: past the end of the video "
                                  f"({frames} frames at {fps} fps = {duration:g} s)")


# ---------------------------------------------------------------------------------------------- the schedule
def frame_seconds(latent_frame: int, fps: int) -> float:
    """The time of a latent frame: the mean time of the video frames it decodes to."""
    from .families.kind import FRAMES_RULE

    t = FRAMES_RULE.temporal
    if latent_frame == 0:
        return 0.0
    first, last = t * (latent_frame - 1) + 1, t * latent_frame
    return (first + last) / 2 / fps


def segment_weights(board: Storyboard, seconds: float) -> dict[int, float]:
    """{segment index: weight} at `seconds` (nonzero weights only; they sum to 1). Entry k's share rises
    linearly from 0 at at_k - transition_k / 2 to 1 at at_k + transition_k / 2 (a step at at_k for 0)."""
    reached = []  # r_k: how far the change into segment k has gone (1 for the first segment)
    for k, s in enumerate(board.segments):
        if k == 0:
            r = 1.0
        elif s.transition == 0:
            r = 1.0 if seconds >= s.at else 0.0
        else:
            r = min(1.0, max(0.0, (seconds - (s.at - s.transition / 2)) / s.transition))
        reached.append(r)
    weights = {}
    for k, r in enumerate(reached):
        w = r - (reached[k + 1] if k + 1 < len(reached) else 0.0)  # windows do not overlap: r_k >= r_{k+1}
        if w > 0:
            weights[k] = w
    return weights


Mix = tuple[tuple[int, float], ...]  # ((text index, weight), ...) sorted by text index, weights summing to 1


@dataclasses.dataclass(frozen=True)
class FrameTexts:
    """One side (conditional or unconditional) of one rank's text: the texts to encode, the mixes built from
    them, and which mix each run of the rank's frames uses."""

    texts: tuple[str, ...]
    mixes: tuple[Mix, ...]
    runs: tuple[tuple[int, int, int], ...]  # (first, end, mix index), rank-local frames, in order, covering all


@dataclasses.dataclass(frozen=True)
class TextPlan:
    cond: FrameTexts
    uncond: FrameTexts | None  # None: no unconditional pass (guidance <= 1)

    @property
    def encodings(self) -> int:
        """Text-encoder passes of this rank (each distinct text once per side)."""
        return len(self.cond.texts) + (len(self.uncond.texts) if self.uncond is not None else 0)


def _frame_texts(per_frame: list[dict[str, float]]) -> FrameTexts:
    texts: list[str] = []
    mixes: list[Mix] = []
    runs: list[list[int]] = []
    for f, weights in enumerate(per_frame):
        for text in weights:
            if text not in texts:
                texts.append(text)
        mix = tuple(sorted((texts.index(t), w) for t, w in weights.items()))
        if mix not in mixes:
            mixes.append(mix)
        u = mixes.index(mix)
        if runs and runs[-1][2] == u:
            runs[-1][1] = f + 1
        else:
            runs.append([f, f + 1, u])
    return FrameTexts(tuple(texts), tuple(mixes), tuple(tuple(r) for r in runs))


def text_plan(board: Storyboard, latent_frames: int, fps: int, frames: tuple[int, int], negative_prompt: str,
              use_cfg: bool) -> TextPlan:
    """The texts, mixes and runs of latent frames [first, end) (one rank's) of a video of `latent_frames`."""
    first, end = frames
    assert 0 <= first < end <= latent_frames, (frames, latent_frames)
    cond, uncond = [], []
    for f in range(first, end):
        weights = segment_weights(board, frame_seconds(f, fps))
        pos: dict[str, float] = {}
        neg: dict[str, float] = {}
        for k, w in weights.items():
            s = board.segments[k]
            pos[s.prompt] = pos.get(s.prompt, 0.0) + w  # a prompt repeated in two segments is one text
            n = negative_prompt if s.negative_prompt is None else s.negative_prompt
            neg[n] = neg.get(n, 0.0) + w
        cond.append(pos)
        uncond.append(neg)
    return TextPlan(_frame_texts(cond), _frame_texts(uncond) if use_cfg else None)


# ------------------------------------------------------------------------------------------------- tensors
@dataclasses.dataclass(frozen=True)
class FrameText:
    """What a transformer call gets as `encoder_hidden_states` under a storyboard: the conditionings of one
    rank's frames stacked along tokens, and which one each run of its frames attends. The family's hook turns
    it into the tensor its forward takes (Family.install_frame_text)."""

    states: Any  # torch.Tensor [1, U L, D]: U conditionings of L tokens each
    tokens: int  # L
    runs: tuple[tuple[int, int, int], ...]  # (first, end, conditioning index) over the call's frames

    def to(self, **kwargs) -> FrameText:
        return dataclasses.replace(self, states=self.states.to(**kwargs))


def encode_frame_texts(embeds: list, side: FrameTexts, max_tokens: int) -> FrameText:
    """FrameText of one side from its texts' embeddings (`embeds[i]` of `side.texts[i]`, [1, L, D]): each mix the
    weighted sum of its texts (in float32, then the encoder's dtype; a mix of one text is that text's embedding, bit
    for bit)."""
    import torch

    states = []
    for mix in side.mixes:
        if len(mix) == 1:
            states.append(embeds[mix[0][0]])
        else:
            blend = sum(w * embeds[i].float() for i, w in mix)
            states.append(blend.to(embeds[mix[0][0]].dtype))
    return FrameText(states=torch.cat(states, dim=1), tokens=max_tokens, runs=side.runs)


def storyboard_of(cfg) -> Storyboard | None:
    return load_storyboard(cfg.storyboard) if cfg.storyboard is not None else None


def own_frames(latent_frames: int, sp_degree: int, sp_rank: int) -> tuple[int, int]:
    """The latent frames a sequence-parallel rank owns (the engine's shard plan)."""
    from .parallel.shards import frame_shards

    return tuple(frame_shards(latent_frames, sp_degree).ranges[sp_rank])


def render_texts(components, cfg, latent_frames: int, frames: tuple[int, int] | None, use_cfg: bool,
                 encode_prompts):
    """(cond, uncond) FrameTexts of a storyboard render for latent frames `frames` (None: all of them).
    `encode_prompts(components, texts, max_tokens)`: every text of both sides in one call (freeloc_dist.memory's
    PromptEncoder places the encoder and sends it off the device after that call)."""
    board = storyboard_of(cfg)
    s = cfg.sampling
    plan = text_plan(board, latent_frames, cfg.video.fps, frames or (0, latent_frames), s.negative_prompt, use_cfg)
    sides = [plan.cond] + ([plan.uncond] if plan.uncond is not None else [])
    embeds = encode_prompts(components, [t for side in sides for t in side.texts], s.max_text_tokens)
    out, start = [], 0
    for side in sides:
        out.append(encode_frame_texts(embeds[start:start + len(side.texts)], side, s.max_text_tokens))
        start += len(side.texts)
    return out[0], (out[1] if plan.uncond is not None else None)


@contextlib.contextmanager
def frame_text_attention(components, enabled: bool = True):
    """Every transformer of the model takes FrameText conditioning while the block runs (the family's
    per-frame cross-attention); the model is as before afterwards."""
    if not enabled:
        yield
        return
    from .families import family_of

    undo = [family_of(t).install_frame_text(t) for t in (components.transformer,
                                                        getattr(components, "transformer_2", None)) if t is not None]
    try:
        yield
    finally:
        for u in reversed(undo):
            u()


def with_storyboard(cfg, model_dir, prompt_flag: bool):
    """Preflight (every rank, before weights) of a job's storyboard: the file, its fit in the video, the model's
    family and the settings; returns the config with `prompt` the first entry's (what logs and names show)."""
    if cfg.storyboard is None:
        return cfg
    family = None
    if (Path(model_dir) / "model_index.json").is_file():  # a --dry-run may plan a model that is not here
        from .family import model_family

        family = model_family(model_dir)
    board = check_storyboard(cfg, family, prompt_flag)
    return dataclasses.replace(cfg, prompt=board.segments[0].prompt)


def check_storyboard(cfg, family, prompt_flag: bool) -> Storyboard:
    """The storyboard of a config with one: read, fitted to the video, and allowed for the family and settings."""
    if prompt_flag:
        raise StoryboardError("--prompt: not allowed with a storyboard (its entries are the prompts)")
    board = load_storyboard(cfg.storyboard)
    check_fits(board, cfg.video.frames, cfg.video.fps, str(cfg.storyboard))
    if family is not None and not family.per_frame_text:
        raise StoryboardError(f"storyboard: the {family.name} family has no per-frame text conditioning "
                              "(its text joins self-attention); render one prompt")
    if cfg.memory.text_encoder == "rank0":  # each rank encodes its own frames' texts: there is no one set to broadcast
        raise StoryboardError("storyboard: not supported with memory.text_encoder=rank0 (each rank encodes its own "
                              "frames' texts); use memory.text_encoder: gpu or cpu")
    if cfg.model.compile != "none":
        raise StoryboardError(f"storyboard: not supported with model.compile={cfg.model.compile} (the per-frame "
                              "cross-attention runs eagerly); use model.compile=none")
    return board
