"""Attention statistics of one layer for the probes (position at T, context at F > T), and the sliding
window of the context probe. Pure functions of tensors and plans; at most one layer's probabilities exist
at a time, in head chunks of bounded size.

Legend: L tokens, F frames, n tokens per frame, h heads, d head dim, m sampled query rows.
"""

from __future__ import annotations

import dataclasses

import torch

from ..plan import DENSE, NONE, Group, LayerPlan

_STATS_BUDGET_BYTES = 256 << 20  # probabilities of one head chunk of one layer, float32


def sample_rows(num_tokens: int, num_samples: int, seed: int) -> torch.Tensor:
    """Seeded query rows (sorted Long[m]); all rows when there are no more than num_samples."""
    if num_tokens <= num_samples:
        return torch.arange(num_tokens)
    g = torch.Generator().manual_seed((seed * 1_000_003 + num_tokens) % (2**63))
    return torch.randperm(num_tokens, generator=g)[:num_samples].sort().values


def centred_window_starts(num_frames: int, window: int) -> torch.Tensor:
    """First frame of each query frame's window of `window` frames (centred, clamped at the ends)."""
    a = torch.arange(num_frames)
    return (a - (window - 1) // 2).clamp(0, num_frames - window)


def window_plan(plan: LayerPlan, window: int) -> LayerPlan:
    """`plan` (a vrpr LayerPlan) with each query frame's keys cut to its sliding window; same offsets."""
    num_frames = plan.num_frames
    starts = centred_window_starts(num_frames, window)
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
    window of `window` frames (centred_window_starts), both with the plan's offsets.
    """
    heads, dim = q0.shape[2], q0.shape[3]
    n, num_frames = plan.tokens_per_frame, plan.num_frames
    scale = dim**-0.5
    starts = centred_window_starts(num_frames, window).tolist()
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


def text_entropy(q0, text_keys, phases, rows, t_rope) -> torch.Tensor:
    """Mean over the video query rows `rows` of the entropy of their attention over the text keys alone, each
    row's query at temporal phase phases[i] (text sits at position 0; DESIGN 11), Float64[h].

    q0 [1, L, h, d] at temporal position 0, text_keys [Lt', h, d] (the valid ones), phases Long[m]."""
    scale = q0.shape[-1] ** -0.5
    q = t_rope.rotate(q0[0, rows].float(), phases.cpu()[:, None])  # [m, h, d]
    logits = torch.matmul(q.transpose(0, 1), text_keys.float().permute(1, 2, 0)) * scale  # [h, m, Lt']
    return _entropy_sum(torch.softmax(logits, -1)) / len(rows)


def text_phase_stats(q0, text_keys, plan, rows, t_rope) -> dict[str, torch.Tensor]:
    """The text-phase probe's statistics of one layer at the target length under a vrpr `plan`: the mean
    text-only attention entropy (`text_entropy`) of the sampled video query rows whose frame meets the text at a
    different phase under the two settings (phi(f) != f; all rows where none does), for `phi` and `natural`."""
    from ..attention.joint import TEXT_PHASES, text_phases

    frames = rows // plan.tokens_per_frame
    phases = {p: text_phases(plan, p)[frames] for p in TEXT_PHASES}
    differ = phases["phi"] != phases["natural"]
    keep = differ if bool(differ.any()) else torch.ones_like(differ)
    return {p: text_entropy(q0, text_keys, phase[keep], rows[keep], t_rope) for p, phase in phases.items()}
