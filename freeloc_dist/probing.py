"""Layer-adaptive probing (DESIGN 3): measure how each self-attention layer reacts to out-of-range
temporal positions and to long context, and turn the scores into a FreeLOC profile.

Two probes, each perturbing one layer at a time while every other layer runs unchanged:
- position, at the trained length T (natural positions, nothing out of range): the layer's keys are
  moved to temporal positions f + s*R for each shift s (default -2, -1, +1, +2). Scores: the change of
  the layer's attention probabilities ||A_shift - A|| / ||A|| (Frobenius over sampled query rows and
  all keys, averaged over heads), and the relative change of the model's output.
- context, at the target length F > T: the baseline runs every layer `vrpr` (all keys, phi positions,
  so no pair is out of range); the probe restricts the layer to a sliding window of T frames with the
  same phi positions, so only the set of keys changes. The window of query frame a is the T frames
  [s, s + T) with s = clamp(a - (T-1)//2, 0, F - T): always exactly T frames, shifted inwards at the
  ends, so no pair in it is farther apart than R. Scores: the relative change of the layer's mean
  attention entropy |H_window - H| / H (per head, averaged), and the relative change of the output.
  Each layer's entropy at T (position baseline) and at F (context baseline) is reported too.
Attention statistics come from the baseline forward itself (the input of a layer does not depend on
how that layer is perturbed), for a seeded sample of query rows (softmax over all keys for those rows),
reduced to per-head numbers inside the layer: at most one layer's probabilities exist at a time, in
head chunks of bounded size. Output changes cost one forward per (layer, perturbation).

The decision rule (`RuleSettings`, written into the profile): a layer is `tsa` if its context score is
at least max(tsa_min, tsa_relative * mean context score over layers); otherwise `full` if its position
score is at most full_max (positions do not matter to it, stock attention is exact and cheapest);
otherwise `vrpr`. TSA layers also re-encode positions with phi, so every position-sensitive layer is
corrected either way.

Legend: B batch (1), L tokens, F frames, n tokens per frame, h heads, d head dim, m sampled query rows,
R = T - 1.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import yaml
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from .attention import get_backend
from .attention.sdpa import grouped_attention
from .config import REPO_ROOT, ConfigError
from .plan import DENSE, NONE, Group, LayerPlan, layer_plan
from .processor import project_out, project_qkv
from .profile import parse_profile
from .rope import apply_rotary, split_rotations, temporal_rope_of
from .sampling import predict_noise

DEFAULT_PROMPTS = (
    "a red fox running through fresh snow in a pine forest, golden morning light, tracking shot",
    "a busy city street at night in the rain, neon reflections on the pavement, people with umbrellas",
    "ocean waves rolling onto a rocky beach at sunset, slow aerial shot along the coastline",
)
DEFAULT_SETTINGS_PATH = REPO_ROOT / "configs" / "probing.yaml"
CONTEXT_SCORES = ("context_entropy", "context_output")
POSITION_SCORES = ("position_attention", "position_output")
_STATS_BUDGET_BYTES = 256 << 20  # probabilities of one head chunk of one layer, float32


# ------------------------------------------------------------------------------------------ settings
@dataclasses.dataclass(frozen=True, kw_only=True)
class RuleSettings:
    context_score: str = "context_entropy"  # which score decides tsa (CONTEXT_SCORES)
    position_score: str = "position_attention"  # which score decides full vs vrpr (POSITION_SCORES)
    tsa_relative: float = 1.0  # tsa if context score >= tsa_relative * mean over layers ...
    tsa_min: float = 0.02  # ... and >= tsa_min
    full_max: float = 0.01  # full if not tsa and position score <= full_max; negative: never full


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProbeSettings:
    prompts: tuple[str, ...] = DEFAULT_PROMPTS  # empty: the render config's prompt
    trained_frames: int | None = None  # T (latent); None: from the render config's profile
    frames: int | None = None  # target length in output video frames (4k+1); None: the render config's
    steps: int | None = None  # sampling steps of the trajectories; None: the render config's
    timesteps: tuple[float, ...] = (0.2, 0.5, 0.8)  # where on the trajectory to probe, fractions in [0, 1)
    shifts: tuple[int, ...] = (-2, -1, 1, 2)  # key shifts of the position probe, in units of R
    query_samples: int = 256  # query rows per layer for attention statistics (all rows if fewer)
    measure_output: bool = True  # also spend one forward per (layer, perturbation) on output changes
    seed: int | None = None  # noise and query sample; None: the render config's sampling.seed
    rule: RuleSettings = dataclasses.field(default_factory=RuleSettings)


def _fail(where: str, value: Any, message: str):
    text = repr(value)
    raise ConfigError(f"config error: {where}={text if len(text) <= 60 else text[:57] + '...'}: {message}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_rule(raw: Mapping[str, Any]) -> RuleSettings:
    fields = {f.name for f in dataclasses.fields(RuleSettings)}
    for key in raw:
        if key not in fields:
            raise ConfigError(f"config error: probing.rule.{key}: unknown key (expected one of: {', '.join(fields)})")
    for key, choices in (("context_score", CONTEXT_SCORES), ("position_score", POSITION_SCORES)):
        if key in raw and raw[key] not in choices:
            _fail(f"probing.rule.{key}", raw[key], f"must be one of: {', '.join(choices)}")
    for key in ("tsa_relative", "tsa_min", "full_max"):
        if key in raw and not _is_number(raw[key]):
            _fail(f"probing.rule.{key}", raw[key], "expected a finite number")
    numbers = {k: float(raw[k]) for k in ("tsa_relative", "tsa_min", "full_max") if k in raw}
    return RuleSettings(**{**raw, **numbers})


def parse_probe_settings(raw: Mapping[str, Any] | None) -> ProbeSettings:
    """Validate a mapping (the probing YAML, with overrides applied) into ProbeSettings."""
    raw = dict(raw or {})
    fields = {f.name for f in dataclasses.fields(ProbeSettings)}
    for key in raw:
        if key not in fields:
            raise ConfigError(f"config error: probing.{key}: unknown key (expected one of: {', '.join(fields)})")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        where = f"probing.{key}"
        if key == "rule":
            if not isinstance(value, Mapping):
                _fail(where, value, "expected a mapping")
            out[key] = _check_rule(value)
        elif key == "prompts":
            if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) and p for p in value):
                _fail(where, value, "expected a list of non-empty strings")
            out[key] = tuple(value)
        elif key == "timesteps":
            if (not isinstance(value, (list, tuple)) or not value
                    or not all(_is_number(x) and 0 <= x < 1 for x in value)):
                _fail(where, value, "expected a non-empty list of fractions in [0, 1)")
            out[key] = tuple(float(x) for x in value)
        elif key == "shifts":
            if not isinstance(value, (list, tuple)) or not value or not all(_is_int(x) and x != 0 for x in value):
                _fail(where, value, "expected a non-empty list of non-zero integers (multiples of R)")
            out[key] = tuple(value)
        elif key == "measure_output":
            if not isinstance(value, bool):
                _fail(where, value, "expected true or false")
            out[key] = value
        elif key in ("trained_frames", "frames", "steps", "seed", "query_samples"):
            if value is None and key != "query_samples":
                out[key] = None
                continue
            if not _is_int(value):
                _fail(where, value, "expected an integer")
            low = {"trained_frames": 2, "frames": 1, "steps": 1, "seed": 0, "query_samples": 1}[key]
            if value < low:
                _fail(where, value, f"must be >= {low}")
            if key == "frames" and value % 4 != 1:
                _fail(where, value, "must be 4k+1 (output video frames)")
            out[key] = value
    settings = ProbeSettings(**out)
    if not settings.measure_output:
        for key, score in (("context_score", settings.rule.context_score),
                           ("position_score", settings.rule.position_score)):
            if score.endswith("_output"):
                _fail(f"probing.rule.{key}", score, "needs probing.measure_output: true")
    return settings


def load_probe_settings(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> ProbeSettings:
    """Read the probing YAML (default configs/probing.yaml; a missing default file means all defaults)."""
    raw: dict[str, Any] = {}
    if path is not None or DEFAULT_SETTINGS_PATH.is_file():
        p = Path(path) if path is not None else DEFAULT_SETTINGS_PATH
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config error: {p}: file not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config error: {p}: invalid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(raw, Mapping):
            raise ConfigError(f"config error: {p}: the top level must be a mapping")
    raw = dict(raw)
    for key, value in (overrides or {}).items():
        if key.startswith("rule."):
            raw["rule"] = {**(raw.get("rule") or {}), key[5:]: value}
        else:
            raw[key] = value
    return parse_probe_settings(raw)


def trajectory_steps(fractions: Sequence[float], steps: int) -> list[int]:
    """Step indices of the trajectory to probe at (fractions of `steps`, deduplicated, in order)."""
    out: list[int] = []
    for frac in fractions:
        i = min(steps - 1, int(frac * steps))
        if i not in out:
            out.append(i)
    return out


# --------------------------------------------------------------------------------------- the probe
@dataclasses.dataclass(frozen=True)
class ProbeInput:
    """One point of a denoising trajectory: what the transformer sees there."""

    latents: torch.Tensor  # [1, C, F, H, W]
    timestep: torch.Tensor  # scalar
    text: torch.Tensor  # [1, L_text, D] conditional text states


def sample_rows(num_tokens: int, num_samples: int, seed: int) -> torch.Tensor:
    """Seeded query rows (sorted Long[m]); all rows when there are no more than num_samples."""
    if num_tokens <= num_samples:
        return torch.arange(num_tokens)
    g = torch.Generator().manual_seed((seed * 1_000_003 + num_tokens) % (2**63))
    return torch.randperm(num_tokens, generator=g)[:num_samples].sort().values


def window_starts(num_frames: int, window: int) -> torch.Tensor:
    """First frame of each query frame's window of `window` frames (centred, clamped at the ends)."""
    a = torch.arange(num_frames)
    return (a - (window - 1) // 2).clamp(0, num_frames - window)


def window_plan(plan: LayerPlan, window: int) -> LayerPlan:
    """`plan` (a vrpr LayerPlan) with each query frame's keys cut to its sliding window; same offsets."""
    num_frames = plan.num_frames
    starts = window_starts(num_frames, window)
    rel = torch.arange(num_frames)[None, :] - starts[:, None]  # [F, F] key frame relative to window start
    inside = (rel >= 0) & (rel < window)
    groups = []
    for a, s in enumerate(starts.tolist()):
        runs: list[Group] = []
        for k in range(s, s + window):
            off = int(plan.offsets[a, k])
            rule = None if off == a - k else off  # None: natural offset, stock RoPE on both sides
            if runs and runs[-1].offset == rule and runs[-1].frame_end == k:
                runs[-1] = Group(runs[-1].frame_start, k + 1, rule, False)
            else:
                runs.append(Group(k, k + 1, rule, False))
        groups.append(tuple(runs))
    tiers = torch.where(inside, DENSE, NONE)
    return dataclasses.replace(plan, tiers=tiers, stripe_width=plan.tokens_per_frame, groups=tuple(groups))


def _row_chunks(num_rows: int, heads: int, keys: int) -> list[slice]:
    """Chunks of query rows whose probabilities over all heads and keys fit the statistics budget."""
    per_row = max(1, heads * keys * 4 * 3)  # float32 logits, probabilities and one temporary
    size = max(1, _STATS_BUDGET_BYTES // per_row)
    return [slice(r, min(num_rows, r + size)) for r in range(0, num_rows, size)]


def _entropy_sum(probs: torch.Tensor) -> torch.Tensor:
    """Sum over rows of the row entropies of probs [h, m, keys] -> Float64[h] on CPU."""
    return torch.special.entr(probs).sum((1, 2)).double().cpu()


def position_stats(q0, k_nat, frames, rows, deltas, t_rope):
    """Attention statistics of one layer at the trained length.

    q0 [1, L, h, d] (temporal position 0), k_nat [1, L, h, d] (natural positions), frames Long[L],
    rows Long[m], deltas: key shifts in frames. Returns (entropy Float64[h], diff Float64[len(deltas), h]):
    mean row entropy of the stock attention, and ||A_shift - A|| / ||A|| per shift and head (Frobenius
    over the sampled rows and all keys).
    """
    heads, dim = q0.shape[2], q0.shape[3]
    scale = dim**-0.5
    keys_t = k_nat[0].float().permute(1, 2, 0)  # [h, d, L]
    entropy = torch.zeros(heads, dtype=torch.float64)
    base_sq = torch.zeros(heads, dtype=torch.float64)
    diff_sq = torch.zeros(len(deltas), heads, dtype=torch.float64)
    for chunk in _row_chunks(len(rows), heads, keys_t.shape[-1]):
        r = rows[chunk]
        f = frames[r].cpu()[:, None]  # [mc, 1]: broadcast over heads; rotate takes CPU positions
        q_r = q0[0, r].float()  # [mc, h, d]
        base = torch.softmax(torch.matmul(t_rope.rotate(q_r, f).transpose(0, 1), keys_t) * scale, -1)  # [h, mc, L]
        entropy += _entropy_sum(base)
        base_sq += base.square().sum((1, 2)).double().cpu()
        for j, delta in enumerate(deltas):
            # key at f_k + delta against query at f_q == query at f_q - delta against key at f_k
            q_s = t_rope.rotate(q_r, f - delta).transpose(0, 1)
            shifted = torch.softmax(torch.matmul(q_s, keys_t) * scale, -1)
            diff_sq[j] += (shifted - base).square().sum((1, 2)).double().cpu()
    return entropy / len(rows), (diff_sq / base_sq).sqrt()


def context_stats(q_nat, k_nat, q0, k0, plan, window: int, rows, t_rope):
    """Attention statistics of one layer at the target length under a vrpr `plan` (phi offsets).

    q_nat, k_nat [1, L, h, d] at natural positions, q0, k0 at temporal position 0. Returns
    (entropy_full, entropy_window), Float64[h]: mean row entropy over all keys and over the sliding
    window of `window` frames (window_starts), both with the plan's offsets.
    """
    heads, dim = q0.shape[2], q0.shape[3]
    n, num_frames = plan.tokens_per_frame, plan.num_frames
    scale = dim**-0.5
    starts = window_starts(num_frames, window).tolist()
    f_rows = rows // n
    h_full = torch.zeros(heads, dtype=torch.float64)
    h_win = torch.zeros(heads, dtype=torch.float64)
    for a in f_rows.unique().tolist():
        rows_a = rows[f_rows == a]
        for chunk in _row_chunks(len(rows_a), heads, num_frames * n):
            r = rows_a[chunk]
            q0_r, q_nat_r = q0[0, r].float(), q_nat[0, r].float()  # [mc, h, d]
            logits = torch.empty(heads, len(r), num_frames * n, device=q0.device)  # [h, mc, L]
            for g in plan.groups[a]:  # runs of key frames sharing one offset rule
                keys = slice(g.frame_start * n, g.frame_end * n)
                if g.offset is None:  # phi(d) = d: stock RoPE on both sides
                    q, k = q_nat_r, k_nat[0, keys]
                else:
                    q, k = t_rope.rotate(q0_r, g.offset), k0[0, keys]
                logits[:, :, keys] = torch.matmul(q.transpose(0, 1), k.float().permute(1, 2, 0)) * scale
            h_full += _entropy_sum(torch.softmax(logits, -1))
            s = starts[a]
            h_win += _entropy_sum(torch.softmax(logits[:, :, s * n : (s + window) * n], -1))
    return h_full / len(rows), h_win / len(rows)


class _ProbeState:
    """Shared by the probe processors of one transformer: grid, perturbation, statistics, counters."""

    def __init__(self, transformer, *, trained_frames, vrpr, backend, seed, query_samples, deltas):
        self.t_rope = temporal_rope_of(transformer)
        self.trained_frames = trained_frames
        self.vrpr = vrpr
        self.attention = get_backend(backend).run
        self.seed = seed
        self.query_samples = query_samples
        self.deltas = tuple(deltas)
        self.grid: tuple[int, int, int] | None = None
        self.perturb: tuple[int, str, int] | None = None  # (layer, "shift" | "window", delta)
        self.stats_layers: frozenset[int] = frozenset()  # layers that record statistics in this forward
        self.stats: dict[int, tuple] = {}
        self.forward_passes = 0
        self._plans: dict[tuple, Any] = {}

    @property
    def is_context(self) -> bool:
        return self.grid[0] > self.trained_frames

    def plans(self):
        """(vrpr plan, window plan) of the current grid, built once per grid."""
        if self.grid not in self._plans:
            plan = layer_plan("vrpr", self.grid, self.trained_frames, self.vrpr)
            self._plans[self.grid] = (plan, window_plan(plan, self.trained_frames))
        return self._plans[self.grid]

    def rows(self) -> torch.Tensor:
        f, h, w = self.grid
        return sample_rows(f * h * w, self.query_samples, self.seed)


class ProbeAttnProcessor:
    """Self-attention of one layer during probing: stock at F <= T, vrpr at F > T, or the perturbation."""

    def __init__(self, layer: int, state: _ProbeState):
        self.layer = layer
        self.state = state
        self.stock = WanAttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or rotary_emb is None or attention_mask is not None:
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        st = self.state
        q, k, v = project_qkv(attn, hidden_states)  # [B, L, h, d]
        num_frames, h, w = st.grid
        frames = torch.arange(num_frames).repeat_interleave(h * w)  # [L]
        active = st.perturb is not None and st.perturb[0] == self.layer
        assert not active or st.perturb[1] == ("window" if st.is_context else "shift"), st.perturb
        record = self.layer in st.stats_layers
        if not st.is_context:
            q_nat, k_nat = apply_rotary(q, *rotary_emb), apply_rotary(k, *rotary_emb)
            if record or active:
                _, _, q0, k0 = split_rotations(q, k, rotary_emb, st.t_rope)
            if record:
                st.stats[self.layer] = position_stats(q0, k_nat, frames, st.rows(), st.deltas, st.t_rope)
            if active:  # keys at temporal position f + delta
                k_nat = st.t_rope.rotate(k0, (frames + st.perturb[2])[:, None])
            out = torch.nn.functional.scaled_dot_product_attention(
                q_nat.transpose(1, 2), k_nat.transpose(1, 2), v.transpose(1, 2)
            ).transpose(1, 2)
        else:
            plan, windowed = st.plans()
            if record or active:
                rotated = split_rotations(q, k, rotary_emb, st.t_rope, frames)  # q_nat, k_nat, q0, k0
            if record:
                st.stats[self.layer] = context_stats(*rotated, plan, st.trained_frames, st.rows(), st.t_rope)
            if active:
                q_nat, k_nat, q0, k0 = (x.transpose(1, 2) for x in rotated)
                out, _ = grouped_attention(q_nat, k_nat, q0, k0, v.transpose(1, 2), windowed, st.t_rope)
                out = out.transpose(1, 2)
            else:
                out = st.attention(q, k, v, rotary_emb, plan, st.t_rope)
        return project_out(attn, out, q.dtype)


def _rel_change(y, y0) -> float:
    return float((y.double() - y0.double()).norm() / y0.double().norm().clamp_min(1e-30))


class Prober:
    """Installs probe processors on a WanTransformer3DModel (restored on exit) and accumulates scores.

        with Prober(transformer, trained_frames=T, layers=[...]) as prober:
            prober.probe_position(inp)   # inp.latents has T frames
            prober.probe_context(inp)    # inp.latents has F > T frames
        scores = prober.scores()         # name -> Float64[num_layers], NaN where not measured

    `layers` are the layers this process measures (all by default; ranks split them). Every forward
    of the transformer while installed (trajectories included) is counted and reported to on_forward.
    """

    def __init__(self, transformer, *, trained_frames: int, shifts=(-2, -1, 1, 2), query_samples=256,
                 measure_output=True, seed=0, vrpr=None, backend="sdpa", layers=None,
                 on_forward: Callable[[], None] | None = None):
        self.transformer = transformer
        self.num_layers = len(transformer.blocks)
        self.layers = list(range(self.num_layers)) if layers is None else sorted(layers)
        self.trained_frames = trained_frames
        self.shifts = tuple(shifts)
        self.deltas = tuple(s * (trained_frames - 1) for s in self.shifts)
        self.measure_output = measure_output
        self.on_forward = on_forward
        self.state = _ProbeState(transformer, trained_frames=trained_frames, vrpr=vrpr, backend=backend,
                                 seed=seed, query_samples=query_samples, deltas=self.deltas)
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, torch.Tensor] = {}
        self._saved = None

    # -- installation ---------------------------------------------------------------------------
    def __enter__(self):
        from .install import install_processors, snapshot

        t = self.transformer
        self._saved = snapshot(t)
        install_processors(t, lambda i, original: ProbeAttnProcessor(i, self.state), self.state,
                           on_forward=self._counted)
        return self

    def _counted(self):
        self.state.forward_passes += 1
        if self.on_forward is not None:
            self.on_forward()

    def __exit__(self, *exc):
        from .install import restore

        restore(self.transformer, self._saved)  # stock again, or the installation the probe replaced
        return False

    @property
    def forward_passes(self) -> int:
        return self.state.forward_passes

    def planned_forwards(self, num_position: int, num_context: int) -> int:
        per_layer = len(self.layers) if self.measure_output else 0
        return num_position * (1 + per_layer * len(self.deltas)) + num_context * (1 + per_layer)

    # -- measuring ------------------------------------------------------------------------------
    def _forward(self, inp: ProbeInput, *, stats=frozenset(), perturb=None) -> torch.Tensor:
        st = self.state
        st.stats_layers, st.perturb, st.stats = frozenset(stats), perturb, {}
        try:
            x = inp.latents.to(self.transformer.dtype)
            t = inp.timestep.reshape(1).expand(x.shape[0]).to(x.device)
            with torch.inference_mode():
                return self.transformer(hidden_states=x, timestep=t, encoder_hidden_states=inp.text,
                                        return_dict=False)[0]
        finally:
            st.stats_layers, st.perturb = frozenset(), None

    def _add(self, name: str, layer: int, value: float):
        if name not in self._sums:
            self._sums[name] = torch.zeros(self.num_layers, dtype=torch.float64)
            self._counts[name] = torch.zeros(self.num_layers, dtype=torch.float64)
        self._sums[name][layer] += value
        self._counts[name][layer] += 1

    def probe_position(self, inp: ProbeInput) -> None:
        """Position probe of every measured layer at one trajectory point of length T."""
        if inp.latents.shape[2] != self.trained_frames * self.transformer.config.patch_size[0]:
            raise ValueError(f"position probe: needs {self.trained_frames} latent frames, got {inp.latents.shape[2]}")
        base = self._forward(inp, stats=self.layers)
        stats = self.state.stats
        for layer in self.layers:
            entropy, diff = stats[layer]
            self._add("entropy_trained", layer, float(entropy.mean()))
            for delta, d in zip(self.deltas, diff):
                self._add(f"position_attention@{delta:+d}", layer, float(d.mean()))
        self.state.stats = {}
        if not self.measure_output:
            return
        for layer in self.layers:
            for delta in self.deltas:
                out = self._forward(inp, perturb=(layer, "shift", delta))
                self._add(f"position_output@{delta:+d}", layer, _rel_change(out, base))

    def probe_context(self, inp: ProbeInput) -> None:
        """Context probe of every measured layer at one trajectory point of length F > T."""
        if inp.latents.shape[2] <= self.trained_frames * self.transformer.config.patch_size[0]:
            raise ValueError(f"context probe: needs more than {self.trained_frames} latent frames")
        base = self._forward(inp, stats=self.layers)
        stats = self.state.stats
        for layer in self.layers:
            h_full, h_win = stats[layer]
            self._add("entropy_target", layer, float(h_full.mean()))
            self._add("context_entropy", layer, float(((h_win - h_full).abs() / h_full.clamp_min(1e-12)).mean()))
        self.state.stats = {}
        if not self.measure_output:
            return
        for layer in self.layers:
            out = self._forward(inp, perturb=(layer, "window", 0))
            self._add("context_output", layer, _rel_change(out, base))

    def scores(self) -> dict[str, torch.Tensor]:
        """name -> Float64[num_layers] mean over inputs (NaN for layers not measured here); the by-shift
        scores are also averaged into position_attention / position_output."""
        out = {name: self._sums[name] / self._counts[name] for name in self._sums}  # 0/0 = NaN
        for kind in ("position_attention", "position_output"):
            parts = [out[f"{kind}@{d:+d}"] for d in self.deltas if f"{kind}@{d:+d}" in out]
            if parts:
                out[kind] = torch.stack(parts).mean(0)
        return out


# -------------------------------------------------------------------------------- trajectories
@torch.inference_mode()
def trajectory_inputs(transformer, scheduler, noise, cond, uncond, *, steps: int, guidance: float,
                      record: Sequence[int]) -> list[ProbeInput]:
    """Run the sampler from `noise` and return the inputs it sees at the step indices `record`.

    Stops after the last recorded step. The forwards use whatever attention is installed (under a
    Prober: stock at F <= T, vrpr at F > T), with classifier-free guidance as a render would.
    """
    scheduler.set_timesteps(steps, device=noise.device)
    latents = noise
    out: list[ProbeInput] = []
    last = max(record)
    for i, t in enumerate(scheduler.timesteps):
        if i in record:
            out.append(ProbeInput(latents=latents.clone(), timestep=t, text=cond))
        if i == last:
            break
        flow = predict_noise(transformer, latents, t, cond, uncond, guidance)
        latents = scheduler.step(flow, t, latents, return_dict=False)[0]
    return out


# ------------------------------------------------------------------------------------ decision
def assign_kinds(scores: Mapping[str, Sequence[float]], rule: RuleSettings) -> tuple[list[str], dict[str, float]]:
    """Kinds per layer by the documented rule, and the thresholds as applied."""
    ctx = torch.as_tensor(scores[rule.context_score], dtype=torch.float64)
    pos = torch.as_tensor(scores[rule.position_score], dtype=torch.float64)
    if bool(torch.isnan(ctx).any() | torch.isnan(pos).any()):
        raise ValueError("probing: a layer has no score; every layer must be measured before deciding")
    tsa_cut = max(rule.tsa_min, rule.tsa_relative * float(ctx.mean()))
    kinds = []
    for c, p in zip(ctx.tolist(), pos.tolist()):
        kinds.append("tsa" if c >= tsa_cut else "full" if p <= rule.full_max else "vrpr")
    return kinds, {"tsa_cut": tsa_cut, "context_mean": float(ctx.mean())}


RULE_TEXT = (
    "tsa if context_score >= max(tsa_min, tsa_relative * mean of context_score over layers); "
    "else full if position_score <= full_max; else vrpr"
)


def _round(x: float) -> float:
    return float(f"{x:.6g}")


def score_table(scores: Mapping[str, torch.Tensor], shifts: Sequence[int], trained_frames: int) -> dict[str, Any]:
    """The profile's `scores` section: lists indexed by layer, by-shift scores keyed by the shift."""
    r = trained_frames - 1
    out: dict[str, Any] = {}
    for name in ("position_attention", "position_output", "context_entropy", "context_output",
                 "entropy_trained", "entropy_target"):
        if name in scores:
            out[name] = [_round(x) for x in scores[name].tolist()]
    for kind in ("position_attention", "position_output"):
        by = {f"{s:+d}R": [_round(x) for x in scores[f"{kind}@{s * r:+d}"].tolist()]
              for s in shifts if f"{kind}@{s * r:+d}" in scores}
        if by:
            out[f"{kind}_by_shift"] = by
    return out


def probed_profile(*, model: str, trained_frames: int, kinds: Sequence[str], scores: Mapping[str, Any],
                   rule: RuleSettings, applied: Mapping[str, float], settings: Mapping[str, Any],
                   base: Mapping[str, Any] | None = None, date: str | None = None) -> dict[str, Any]:
    """The profile mapping (DESIGN 9) plus date, settings, rule and scores; `base` lends tsa/vrpr sections."""
    date = date or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    layers = {k: [i for i, kind in enumerate(kinds) if kind == k] for k in ("tsa", "vrpr", "full")}
    counts = ", ".join(f"{len(v)} {k}" for k, v in layers.items())
    out: dict[str, Any] = {
        "model": model,
        "trained_frames": trained_frames,
        "source": f"layer probing (launch/probe.py) on {date[:10]}: {counts}; rule, settings and scores below",
        "layers": layers,
    }
    for section in ("vrpr", "tsa"):
        if base is not None and base.get(section) is not None:
            out[section] = dict(base[section])
    out["date"] = date
    out["rule"] = {"text": RULE_TEXT, **dataclasses.asdict(rule), **{k: _round(v) for k, v in applied.items()}}
    out["settings"] = dict(settings)
    out["scores"] = dict(scores)
    return out


def write_profile(path: str | Path, profile: Mapping[str, Any]) -> Path:
    """Write a probed profile as YAML (checked to load back through parse_profile first)."""
    parse_profile(profile, where=f"probed profile {path}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = ("# FreeLOC profile written by launch/probe.py (layer-adaptive probing).\n"
              "# layers: the assignment; rule, settings and scores: how it was obtained (lists are per layer).\n")
    path.write_text(header + yaml.dump(profile, Dumper=_ProfileDumper, sort_keys=False, width=120))
    return path


class _ProfileDumper(yaml.SafeDumper):
    """Block style, except lists of numbers (layer indices, per-layer scores) on one line each."""


def _represent_list(dumper, data):
    flow = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_ProfileDumper.add_representer(list, _represent_list)
