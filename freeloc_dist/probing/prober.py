"""The prober: probe processors installed on a transformer's FreeLOC layers (its family's attention layers;
restored on exit), the forwards
that perturb one layer at a time, and the scores they accumulate (freeloc_dist.probing's docstring)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import torch

from ..attention import get_backend
from ..attention.joint import get_joint, joint_attention
from ..attention.sdpa import grouped_attention
from ..families import family_of
from ..plan import layer_plan
from ..processor import _with_signature_of
from ..rope import apply_rotary, split_rotations
from ..sampling import sample, set_timesteps, transformer_inputs
from .stats import context_stats, position_stats, sample_rows, text_entropy, text_phase_stats, window_plan


@dataclasses.dataclass(frozen=True)
class ProbeInput:
    """One point of a denoising trajectory: what the transformer sees there."""

    latents: torch.Tensor  # [1, C, F, H, W]
    timestep: torch.Tensor  # scalar
    text: Any  # conditional text: states [1, L_text, D], or the family's text object (its text_kwargs read it)
    # image-to-video: the whole video's freeloc_dist.families.wan.conditioning.Conditioning (channels and CLIP tokens)
    condition: Any = None
    # Wan2.2 TI2V: freeloc_dist.families.wan.token_timesteps.TokenTimesteps (per-token t, clean frame 0 in image mode)
    token_timesteps: Any = None

    def transformer_call(self, transformer) -> dict:
        """The keyword arguments of the transformer call that sees this point, as the sampler builds them
        (freeloc_dist.sampling.sample and predict_noise): same input, timesteps, text and image tokens."""
        x, t = self.latents, self.timestep
        if self.token_timesteps is not None:
            x, t = self.token_timesteps.model_input(x), self.token_timesteps.timestep(t)
        x, timestep, extra = transformer_inputs(transformer.dtype, x, t, self.condition)
        text = family_of(transformer).text_kwargs(self.text)
        return {"hidden_states": x, "timestep": timestep, **text, **extra}


class _ProbeState:
    """Shared by the probe processors of one transformer: grid, perturbation, statistics, counters."""

    def __init__(self, transformer, *, trained_frames, vrpr, backend, seed, query_samples, deltas, text_phase):
        self.family = family_of(transformer)
        self.t_rope = self.family.temporal_rope(transformer)
        self.trained_frames = trained_frames
        self.vrpr = vrpr
        self.attention = get_backend(backend).run
        # joint text-video families (DESIGN 11): their attention with text, at the profile's text phase
        self.joint_attention = get_joint(backend) if self.family.joint_text else None
        self.text_phase = text_phase
        self.seed = seed
        self.query_samples = query_samples
        self.deltas = tuple(deltas)
        self.grid: tuple[int, int, int] | None = None
        self.perturb: tuple[int, str, int] | None = None  # (layer, "shift" | "window", delta)
        self.stats_layers: frozenset[int] = frozenset()  # layers that record statistics in this forward
        self.stats: dict[int, tuple] = {}
        self.text_stats: dict[int, dict[str, torch.Tensor]] = {}  # joint families: text entropies per phase
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


class _Text:
    """The text of a joint attention call (DESIGN 11): q, k, v [B, Lt, h, d] and valid keys Bool[B, Lt] or None."""

    def __init__(self, family, attn, args, kwargs, num_video_tokens: int):
        states, self.valid = family.joint_inputs(args, kwargs, num_video_tokens)
        self.q, self.k, self.v = family.project_text_qkv(attn, states)

    def valid_keys(self) -> torch.Tensor:
        """k [Lt', h, d] of the valid text keys (batch 1, as probing runs)."""
        return self.k[0] if self.valid is None else self.k[0, self.valid[0]]


def _stock_joint(q_nat, k_nat, v, text: _Text):
    """Stock joint attention (video first, text last, one softmax, padded text keys masked) of rotated video
    q_nat, k_nat and text; (out_video, out_text) [B, L, h, d]."""
    lv = q_nat.shape[1]
    q, k, v = (torch.cat(pair, 1).transpose(1, 2) for pair in ((q_nat, text.q), (k_nat, text.k), (v, text.v)))
    mask = None
    if text.valid is not None:  # [B, 1, 1, Lv + Lt]: every video key, the valid text keys
        video = torch.ones(text.valid.shape[0], lv, dtype=torch.bool, device=text.valid.device)
        mask = torch.cat([video, text.valid], 1)[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    return out[:, :lv], out[:, lv:]


class ProbeAttnProcessor:
    """Self-attention of one layer during probing: stock at F <= T, vrpr at F > T, or the perturbation.
    Joint text-video layers (DESIGN 11) attend their text as FreeLOC does; the perturbations move and window
    the video keys only (text is never sparsified), and the attention statistics are over the video keys."""

    def __init__(self, layer: int, state: _ProbeState):
        self.layer = layer
        self.state = state
        self.stock = state.family.stock_processor()
        if state.family.joint_text:  # diffusers' generic Attention passes only the keywords __call__ names
            self.__call__ = _with_signature_of(self._call, self.stock.__call__)

    def __call__(self, attn, hidden_states, *args, **kwargs):
        return self._call(attn, hidden_states, *args, **kwargs)

    def _call(self, attn, hidden_states, *args, **kwargs):
        st = self.state
        rotary_emb = st.family.freeloc_rotary(args, kwargs)
        if rotary_emb is None:  # a call FreeLOC leaves alone (the family says which)
            return self.stock(attn, hidden_states, *args, **kwargs)
        q, k, v = st.family.project_qkv(attn, hidden_states)  # [B, L, h, d]
        text = _Text(st.family, attn, args, kwargs, q.shape[1]) if st.family.joint_text else None
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
                if text is not None:  # in range: every video frame meets the text at its own phase
                    rows = st.rows()
                    st.text_stats[self.layer] = {"trained": text_entropy(q0, text.valid_keys(), frames[rows],
                                                                         rows, st.t_rope)}
            if active:  # video keys at temporal position f + delta
                k_nat = st.t_rope.rotate(k0, (frames + st.perturb[2])[:, None])
            if text is not None:
                out, out_text = _stock_joint(q_nat, k_nat, v, text)
            else:
                out = torch.nn.functional.scaled_dot_product_attention(
                    q_nat.transpose(1, 2), k_nat.transpose(1, 2), v.transpose(1, 2)
                ).transpose(1, 2)
        else:
            plan, windowed = st.plans()
            if record or active:
                rotated = split_rotations(q, k, rotary_emb, st.t_rope, frames)  # q_nat, k_nat, q0, k0
            if record:
                st.stats[self.layer] = context_stats(*rotated, plan, st.trained_frames, st.rows(), st.t_rope)
                if text is not None:
                    st.text_stats[self.layer] = text_phase_stats(rotated[2], text.valid_keys(), plan, st.rows(),
                                                                 st.t_rope)
            if text is not None:  # the window runs the grouped kernel whatever the backend, as below
                attend_joint, used = (joint_attention, windowed) if active else (st.joint_attention, plan)
                out, out_text = attend_joint(q, k, v, text.q, text.k, text.v, rotary_emb, used, st.t_rope,
                                             text_phase=st.text_phase, text_valid=text.valid)
            elif active:
                q_nat, k_nat, q0, k0 = (x.transpose(1, 2) for x in rotated)
                out, _ = grouped_attention(q_nat, k_nat, q0, k0, v.transpose(1, 2), windowed, st.t_rope)
                out = out.transpose(1, 2)
            else:
                out = st.attention(q, k, v, rotary_emb, plan, st.t_rope)
        if text is not None:
            return st.family.project_joint_out(attn, out, out_text, q.dtype)
        return st.family.project_out(attn, out, q.dtype)


def _rel_change(y, y0) -> float:
    return float((y.double() - y0.double()).norm() / y0.double().norm().clamp_min(1e-30))


class Prober:
    """Installs probe processors on a transformer's FreeLOC layers (restored on exit) and accumulates scores.

        with Prober(transformer, trained_frames=T, layers=[...]) as prober:
            prober.probe_position(inp)   # inp.latents has T frames
            prober.probe_context(inp)    # inp.latents has F > T frames
        scores = prober.scores()         # name -> Float64[num_layers], NaN where not measured

    `layers` are the layers this process measures (all by default; ranks split them). Every forward
    of the transformer while installed (trajectories included) is counted and reported to on_forward.
    """

    def __init__(self, transformer, *, trained_frames: int, shifts=(-2, -1, 1, 2), query_samples=256,
                 measure_output=True, seed=0, vrpr=None, backend="sdpa", layers=None, text_phase="phi",
                 on_forward: Callable[[], None] | None = None):
        self.transformer = transformer
        self.num_layers = len(family_of(transformer).attention_layers(transformer))
        self.layers = list(range(self.num_layers)) if layers is None else sorted(layers)
        self.trained_frames = trained_frames
        self.shifts = tuple(shifts)
        self.deltas = tuple(s * (trained_frames - 1) for s in self.shifts)
        self.measure_output = measure_output
        self.on_forward = on_forward
        self.state = _ProbeState(transformer, trained_frames=trained_frames, vrpr=vrpr, backend=backend,
                                 seed=seed, query_samples=query_samples, deltas=self.deltas, text_phase=text_phase)
        self.frame_patch = family_of(transformer).patch_size(transformer)[0]  # latent frames per token frame
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, torch.Tensor] = {}
        self._saved = None

    # -- installation ---------------------------------------------------------------------------
    def __enter__(self):
        from ..install import install_processors, snapshot

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
        from ..install import restore

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
        st.stats_layers, st.perturb, st.stats, st.text_stats = frozenset(stats), perturb, {}, {}
        try:
            with torch.inference_mode():
                return self.transformer(**inp.transformer_call(self.transformer), return_dict=False)[0]
        finally:
            st.stats_layers, st.perturb = frozenset(), None

    def _add(self, name: str, layer: int, value: float):
        if name not in self._sums:
            self._sums[name] = torch.zeros(self.num_layers, dtype=torch.float64)
            self._counts[name] = torch.zeros(self.num_layers, dtype=torch.float64)
        self._sums[name][layer] += value
        self._counts[name][layer] += 1

    def _add_text_stats(self) -> None:
        """Joint families: the text-phase probe's entropies (mean over heads) of the baseline just run, as
        text_entropy_trained (at T) or text_entropy_phi and text_entropy_natural (at F)."""
        for layer, by_key in self.state.text_stats.items():
            for key, entropy in by_key.items():
                self._add(f"text_entropy_{key}", layer, float(entropy.mean()))
        self.state.text_stats = {}

    def probe_position(self, inp: ProbeInput) -> None:
        """Position probe of every measured layer at one trajectory point of length T."""
        if inp.latents.shape[2] != self.trained_frames * self.frame_patch:
            raise ValueError(f"position probe: needs {self.trained_frames} latent frames, got {inp.latents.shape[2]}")
        base = self._forward(inp, stats=self.layers)
        stats = self.state.stats
        for layer in self.layers:
            entropy, diff = stats[layer]
            self._add("entropy_trained", layer, float(entropy.mean()))
            for delta, d in zip(self.deltas, diff):
                self._add(f"position_attention@{delta:+d}", layer, float(d.mean()))
        self.state.stats = {}
        self._add_text_stats()
        if not self.measure_output:
            return
        for layer in self.layers:
            for delta in self.deltas:
                out = self._forward(inp, perturb=(layer, "shift", delta))
                self._add(f"position_output@{delta:+d}", layer, _rel_change(out, base))

    def probe_context(self, inp: ProbeInput) -> None:
        """Context probe of every measured layer at one trajectory point of length F > T."""
        if inp.latents.shape[2] <= self.trained_frames * self.frame_patch:
            raise ValueError(f"context probe: needs more than {self.trained_frames} latent frames")
        base = self._forward(inp, stats=self.layers)
        stats = self.state.stats
        for layer in self.layers:
            h_full, h_win = stats[layer]
            self._add("entropy_target", layer, float(h_full.mean()))
            self._add("context_entropy", layer, float(((h_win - h_full).abs() / h_full.clamp_min(1e-12)).mean()))
        self.state.stats = {}
        self._add_text_stats()
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


class _Recorded(Exception):
    """Ends a trajectory once its last recorded step is reached."""


def trajectory_inputs(transformer, scheduler, noise, cond, uncond, *, steps: int, guidance: float,
                      record: Sequence[int], experts=None, condition=None,
                      token_timesteps=None) -> list[ProbeInput]:
    """Run the sampler (freeloc_dist.sampling.sample, as a render does) from `noise` and return the inputs
    it sees at the step indices `record`. `experts`: a two-expert model's freeloc_dist.experts.ExpertSchedule
    (each step runs its own expert, as in a render). `condition` / `token_timesteps`: an image-to-video or
    TI2V model's conditioning of this length, as `sample` takes them; the inputs carry them too.

    Stops after the last recorded step. The forwards use whatever attention is installed (under a
    Prober: stock at F <= T, vrpr at F > T), with classifier-free guidance as a render would.
    """
    out: dict[int, torch.Tensor] = {}
    last = max(record)
    if 0 in record:
        out[0] = noise.clone()

    def after_step(step: int, latents, _scheduler) -> None:  # latents after `step` steps = input of step `step`
        if step in record:
            out[step] = latents.clone()
        if step >= last:
            raise _Recorded

    if last > 0:
        try:
            sample(transformer, scheduler, noise, cond, uncond, steps=steps, guidance=guidance, after_step=after_step,
                   experts=experts, condition=condition, token_timesteps=token_timesteps)
        except _Recorded:
            pass
    else:
        set_timesteps(transformer, scheduler, steps, noise.device)
    timesteps = scheduler.timesteps
    return [ProbeInput(latents=out[i], timestep=timesteps[i], text=cond, condition=condition,
                       token_timesteps=token_timesteps) for i in sorted(out, key=list(record).index)]
