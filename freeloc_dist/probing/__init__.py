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

Joint text-video families (DESIGN 11, HunyuanVideo): the probe runs through the family adapter like any other
(layers in forward order, text joining each layer's attention as under FreeLOC). The perturbations move and window
the video keys only (text is never sparsified) and the attention statistics above are over the video keys. The
text-phase probe reads the same baselines: per layer, the entropy of the sampled video queries' attention over the
text keys alone at T (natural phases, all in range), and at F for the rows whose frame meets the text at a different
phase under the two settings, once at phi(f) and once at f. `choose_text_phase` picks the setting whose entropy
drifts less from T's (mean over the non-full layers; phi on a tie) and writes it as the profile's `text_phase`.

The decision rule (`RuleSettings`, written into the profile): a layer is `tsa` if its context score is
at least max(tsa_min, tsa_relative * mean context score over layers); otherwise `full` if its position
score is at most full_max (positions do not matter to it, stock attention is exact and cheapest);
otherwise `vrpr`. TSA layers also re-encode positions with phi, so every position-sensitive layer is
corrected either way.

The package, by job: settings (the probing YAML, validated by the config validator), stats (per-layer
attention statistics), prober (probe processors, perturbed forwards, trajectories through the sampler),
decide (rule, score table, profile writer) and run (the distributed probe behind launch/probe.py).

Legend: B batch (1), L tokens, F frames, n tokens per frame, h heads, d head dim, m sampled query rows,
R = T - 1.
"""

from .decide import RULE_TEXT, assign_kinds, choose_text_phase, probed_profile, score_table, write_profile
from .prober import ProbeAttnProcessor, ProbeInput, Prober, trajectory_inputs
from .settings import (
    CONTEXT_SCORES,
    DEFAULT_PROMPTS,
    DEFAULT_SETTINGS_PATH,
    POSITION_SCORES,
    ProbeSettings,
    RuleSettings,
    load_probe_settings,
    parse_probe_settings,
    trajectory_steps,
)
from .stats import (
    centred_window_starts,
    context_stats,
    position_stats,
    sample_rows,
    text_entropy,
    text_phase_stats,
    window_plan,
)

__all__ = [
    "RULE_TEXT", "assign_kinds", "choose_text_phase", "probed_profile", "score_table", "write_profile",
    "ProbeAttnProcessor", "ProbeInput", "Prober", "trajectory_inputs",
    "CONTEXT_SCORES", "DEFAULT_PROMPTS", "DEFAULT_SETTINGS_PATH", "POSITION_SCORES", "ProbeSettings",
    "RuleSettings", "load_probe_settings", "parse_probe_settings", "trajectory_steps",
    "centred_window_starts", "context_stats", "position_stats", "sample_rows", "text_entropy", "text_phase_stats",
    "window_plan",
]
