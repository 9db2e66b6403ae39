"""Joint text-video attention under FreeLOC (DESIGN 11): families whose text joins the video inside
self-attention (HunyuanVideo: video tokens first, text last; only video tokens carry RoPE).

For one layer with plan `plan` (video frames F, n tokens per frame):
  video -> video: the layer's kind, exactly as without text (sections 3-6, freeloc_dist.attention.sdpa);
  video -> text:  every valid text key, whatever the kind;
  text  -> video: every video key (dense);
  text  -> text:  stock (valid keys).
Text has no RoPE, i.e. it sits at temporal position 0: a video token of frame a meets text at temporal phase a
(`text_phase: natural`, stock) or phi(a) = plan.offsets[a, 0] (`phi`, bounded by R like every other pair). On a
stock plan the phase is always natural, so a stock layer is diffusers' joint attention.
Groups merge by log-sum-exp: a video query's text keys are one more key group; a text query attends the video
keys (at their phases) and the valid text keys in one softmax.

Shapes: B batch, Lv video tokens (frame-major), Lt text tokens, h heads, d head channels; inputs [B, L, h, d]
un-rotated (normalised as the stock processor does), text_valid Bool[B, Lt] (None: all valid).
"""

from __future__ import annotations

import torch

from ..plan import LayerPlan
from ..rope import TemporalRope, rotate_temporal_, split_rotations
from .lse import attend, merge_into
from .sdpa import grouped_attention

TEXT_PHASES = ("phi", "natural")


def text_phases(plan: LayerPlan, text_phase: str) -> torch.Tensor:
    """Long[F]: the temporal phase at which each video frame meets the text (text sits at position 0)."""
    if text_phase not in TEXT_PHASES:
        raise ValueError(f"text_phase={text_phase!r}: must be one of {', '.join(TEXT_PHASES)}")
    if plan.is_stock or text_phase == "natural":
        return torch.arange(plan.num_frames)
    return plan.offsets[:, 0].clone()  # sign(a - 0) phi(a) = phi(a)


def _valid_rows(text_valid: torch.Tensor | None, b: int, lt: int, device) -> torch.Tensor:
    if text_valid is None:
        return torch.arange(lt, device=device)
    return text_valid[b].nonzero().flatten().to(device)


def joint_attention(qv, kv, vv, qt, kt, vt, rotary_emb, plan: LayerPlan, t_rope: TemporalRope, *,
                    text_phase: str = "phi", text_valid: torch.Tensor | None = None, impl: str = "auto"):
    """(out_video [B, Lv, h, d], out_text [B, Lt, h, d]) of one joint layer (see the module docstring)."""
    frames = torch.arange(plan.num_frames).repeat_interleave(plan.tokens_per_frame)  # [Lv]
    q_nat, k_nat, q0, k0 = split_rotations(qv, kv, rotary_emb, t_rope, frames)  # [B, Lv, h, d]
    heads_first = lambda x: x.transpose(1, 2)  # noqa: E731  [B, L, h, d] -> [B, h, L, d]
    if plan.is_stock:  # stock video-video: one natural group (all keys)
        out, lse = attend(heads_first(q_nat), heads_first(k_nat), heads_first(vv), impl=impl)
        out = out.float()
    else:
        out, lse = grouped_attention(*(heads_first(x) for x in (q_nat, k_nat, q0, k0, vv)), plan, t_rope, impl=impl)
        out = out.float()  # [B, h, Lv, d]
    phase = text_phases(plan, text_phase)
    natural = bool(torch.equal(phase, torch.arange(plan.num_frames)))
    q_text, k_text = (q_nat, k_nat) if natural else (
        rotate_temporal_(x.clone(), t_rope, phase[frames][:, None]) for x in (q0, k0))
    out_v = torch.empty_like(out)
    out_t = torch.empty(qt.shape[0], qt.shape[2], qt.shape[1], qt.shape[3], dtype=torch.float32, device=qt.device)
    for b in range(qv.shape[0]):  # text validity may differ per batch element
        rows = _valid_rows(text_valid, b, kt.shape[1], kt.device)
        kt_b, vt_b = heads_first(kt[b:b + 1, rows]), heads_first(vt[b:b + 1, rows])  # [1, h, Lt', d]
        o_b, l_b = out[b:b + 1].clone(), lse[b:b + 1].clone()
        if len(rows):
            o2, l2 = attend(heads_first(q_text[b:b + 1]), kt_b, vt_b, impl=impl)
            merge_into(o_b, l_b, o2, l2)
        out_v[b:b + 1] = o_b
        keys = torch.cat([heads_first(k_text[b:b + 1]), kt_b], dim=2)  # [1, h, Lv + Lt', d]
        values = torch.cat([heads_first(vv[b:b + 1]), vt_b], dim=2)
        out_t[b:b + 1] = attend(heads_first(qt[b:b + 1]), keys, values, impl=impl)[0].float()
    return out_v.transpose(1, 2).to(qv.dtype), out_t.transpose(1, 2).to(qt.dtype)


def reference_joint_attention(qv, kv, vv, qt, kt, vt, rotary_emb, plan: LayerPlan, t_rope: TemporalRope, *,
                              text_phase: str = "phi", text_valid: torch.Tensor | None = None,
                              dtype=torch.float64):
    """The oracle: DESIGN 11's joint mask and phases materialised over all Lv + Lt tokens, one softmax, float64."""
    from ..plan import expand_to_tokens

    lv, lt = qv.shape[1], qt.shape[1]
    frames = torch.arange(plan.num_frames).repeat_interleave(plan.tokens_per_frame)
    _, _, q0, k0 = split_rotations(qv.to(dtype), kv.to(dtype), tuple(t.to(dtype) for t in rotary_emb), t_rope)
    q0, k0 = q0.transpose(1, 2), k0.transpose(1, 2)  # [B, h, Lv, d]
    qt_, kt_, vall = (x.to(dtype).transpose(1, 2) for x in (qt, kt, torch.cat([vv, vt], 1)))
    mask_vv, offset_vv = expand_to_tokens(plan)
    phase = text_phases(plan, text_phase)[frames]  # [Lv]
    scale = qv.shape[-1] ** -0.5
    scores = torch.full(q0.shape[:2] + (lv + lt, lv + lt), float("-inf"), dtype=dtype)
    for o in offset_vv.unique().tolist():  # video -> video at each pair's offset
        s_o = t_rope.rotate(q0, o) @ k0.transpose(-1, -2) * scale
        scores[..., :lv, :lv] = torch.where(offset_vv == o, s_o, scores[..., :lv, :lv])
    scores[..., :lv, :lv] = scores[..., :lv, :lv].masked_fill(~mask_vv, float("-inf"))
    q_ph = t_rope.rotate(q0, phase)  # video query at its phase, text key at 0 (positions over Lv)
    k_ph = t_rope.rotate(k0, phase)
    scores[..., :lv, lv:] = q_ph @ kt_.transpose(-1, -2) * scale
    scores[..., lv:, :lv] = qt_ @ k_ph.transpose(-1, -2) * scale
    scores[..., lv:, lv:] = qt_ @ kt_.transpose(-1, -2) * scale
    if text_valid is not None:
        invalid = ~text_valid.bool()[:, None, None, :]  # [B, 1, 1, Lt]: padded text keys, for every query
        scores[..., lv:] = scores[..., lv:].masked_fill(invalid, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ vall
    return out[..., :lv, :].transpose(1, 2), out[..., lv:, :].transpose(1, 2)


def _impl(impl):
    def run(*args, **kwargs):
        return joint_attention(*args, impl=impl, **kwargs)

    return run


# The joint attention of each attention backend (freeloc_dist.attention.BACKENDS names them).
JOINT = {"sdpa": _impl("auto"), "sdpa-math": _impl("math"), "reference": reference_joint_attention}


def get_joint(backend: str):
    if backend not in JOINT:
        raise ValueError(f"attention_backend={backend}: joint text-video attention (HunyuanVideo) runs on "
                         f"{', '.join(JOINT)}; not on {backend} yet")
    return JOINT[backend]
