"""Per-frame text conditioning for Wan (storyboards, freeloc_dist.storyboard): each latent frame's queries attend
their own frame's text in cross-attention.

Wan's cross-attention `attn2` is per token on both sides: the text (and CLIP image) keys come from per-token
projections of the text states (the condition embedder's MLP, to_k / norm_k), and every query token attends them
independently of the other queries. So attending the queries of frames [a, b) to conditioning u is exactly the
stock processor run on those queries with conditioning u's keys. The transformer is called with
`encoder_hidden_states` a FrameText (U conditionings of L tokens stacked along tokens); a forward pre-hook hands
the forward the stacked tensor (the condition embedder maps it token by token, and a Wan2.1 I2V model puts its
CLIP image tokens in front) and the runs to the attn2 processors, which split the queries by run. One run
covering every frame calls the stock processor on the unchanged inputs, so a one-entry storyboard is bitwise
the plain render. Self-attention (FreeLOC's attn1) is not touched.
"""

from __future__ import annotations

import torch


class FrameRuns:
    """The runs of the forward under way: (first, end, conditioning) over its latent frames, and L. Shared by the
    pre-hook (which sets it) and every block's processor (which reads it)."""

    def __init__(self):
        self.runs: tuple | None = None
        self.tokens = 0


class FrameTextProcessor:
    """attn2 processor: query tokens grouped by latent frame, each run attending its conditioning's text."""

    def __init__(self, replaced, current: FrameRuns):
        self.replaced = replaced
        self.current = current

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        runs = self.current.runs
        if runs is None or len(runs) == 1:
            return self.replaced(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        # hidden_states [B, F n, D] frame-major; encoder_hidden_states [B, I + U L, D]: I image tokens, then U texts
        text_len = self.current.tokens
        frames = runs[-1][1]
        n = hidden_states.shape[1] // frames
        assert n * frames == hidden_states.shape[1], (tuple(hidden_states.shape), frames)
        count = 1 + max(u for _, _, u in runs)
        image = encoder_hidden_states.shape[1] - count * text_len
        outputs = []
        for first, end, u in runs:
            start = image + u * text_len
            context = torch.cat([encoder_hidden_states[:, :image], encoder_hidden_states[:, start:start + text_len]],
                                dim=1)
            outputs.append(self.replaced(attn, hidden_states[:, first * n:end * n], context, attention_mask,
                                         rotary_emb))
        return torch.cat(outputs, dim=1)


def install(transformer):
    """Put FrameTextProcessors on every block's attn2 and the pre-hook on the transformer; returns the undo."""
    from freeloc_dist.storyboard import FrameText

    current = FrameRuns()
    saved = [block.attn2.processor for block in transformer.blocks]
    for block, proc in zip(transformer.blocks, saved):
        block.attn2.set_processor(FrameTextProcessor(proc, current))

    def unpack(module, args, kwargs):
        text = args[2] if len(args) > 2 else kwargs.get("encoder_hidden_states")
        if not isinstance(text, FrameText):
            current.runs = None
            return None
        current.runs, current.tokens = text.runs, text.tokens
        if len(args) > 2:
            return (*args[:2], text.states, *args[3:]), kwargs
        return args, {**kwargs, "encoder_hidden_states": text.states}

    handle = transformer.register_forward_pre_hook(unpack, with_kwargs=True)

    def undo():
        handle.remove()
        for block, proc in zip(transformer.blocks, saved):
            block.attn2.set_processor(proc)

    return undo
