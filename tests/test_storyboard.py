"""Storyboards (freeloc_dist.storyboard, freeloc_dist.families.wan.frame_text): the schedule's math, the per-frame
cross-attention against a naive per-frame reference, every Wan variant in one process (a one-entry storyboard is
bitwise the plain render, a two-entry one differs), the rank-local text plan, the resume fingerprint, the
sidecar, the dry-run's count and the queue field. The parallel renders are rows of the family matrix
(tests/test_matrix_dist.py); the bad files are rows of the bad-input matrix (tests/test_bad_input.py).
"""

import dataclasses
import json

import pytest
import torch

from freeloc_dist.config import REPO_ROOT, load_render_config
from freeloc_dist.storyboard import (
    StoryboardError,
    frame_seconds,
    load_storyboard,
    parse_storyboard,
    segment_weights,
    text_plan,
)

pytestmark = pytest.mark.unit
THREE = REPO_ROOT / "configs" / "storyboards" / "tiny-three.yaml"
PROMPT = "a red fox running through fresh snow"


def board(*entries):
    return parse_storyboard(list(entries), "test.yaml")


def test_weights_blend_linearly_across_the_window_and_cut_hard_at_zero():
    b = board({"at": 0, "prompt": "a"}, {"at": 2, "prompt": "b", "transition": 1}, {"at": 5, "prompt": "c",
                                                                                      "transition": 0})
    assert segment_weights(b, 1.49) == {0: 1.0}
    assert segment_weights(b, 1.5) == {0: 1.0}  # the window starts at 2 - 0.5
    assert segment_weights(b, 1.75) == pytest.approx({0: 0.75, 1: 0.25})
    assert segment_weights(b, 2.0) == pytest.approx({0: 0.5, 1: 0.5})
    assert segment_weights(b, 2.5) == {1: 1.0}
    assert segment_weights(b, 4.999) == {1: 1.0}
    assert segment_weights(b, 5.0) == {2: 1.0}
    for t in torch.linspace(0, 7, 71).tolist():
        assert sum(segment_weights(b, t).values()) == pytest.approx(1.0)


def test_latent_frame_time_is_the_mean_of_its_video_frames():
    assert frame_seconds(0, 16) == 0.0
    assert frame_seconds(1, 16) == pytest.approx(2.5 / 16)  # video frames 1..4
    assert frame_seconds(10, 16) == pytest.approx(38.5 / 16)  # 37..40


def test_each_rank_plans_only_its_own_frames_texts():
    b = load_storyboard(THREE)
    whole = text_plan(b, 9, 16, (0, 9), "", use_cfg=True)
    assert len(whole.cond.texts) == 3 and set(whole.uncond.texts) == {"", "blurry"}
    assert whole.cond.runs == ((0, 3, 0), (3, 4, 1), (4, 5, 2), (5, 6, 3), (6, 9, 4))  # two blended frames
    ranks = [text_plan(b, 9, 16, r, "", use_cfg=True) for r in ((0, 3), (3, 6), (6, 9))]
    assert [r.cond.texts for r in ranks] == [(PROMPT,), (PROMPT, "a lighthouse in a storm"),
                                             ("a cat asleep on a windowsill",)]
    assert [r.uncond.texts for r in ranks] == [("",), ("",), ("blurry",)]
    assert [r.encodings for r in ranks] == [2, 3, 2]
    assert ranks[1].cond.runs == ((0, 1, 0), (1, 2, 1), (2, 3, 2))  # rank-local frame indices
    assert text_plan(b, 9, 16, (0, 3), "", use_cfg=False).uncond is None


@pytest.mark.parametrize("image_tokens", [0, 3], ids=["text", "clip-image-tokens"])
def test_frame_text_processor_equals_attending_each_frame_alone(image_tokens):
    """The grouped processor against a naive reference: every latent frame's queries run through the stock
    processor on their own with that frame's text (and, as Wan2.1 I2V, the CLIP image tokens in front; diffusers
    then takes the last 512 tokens as text). float32, the same per-token maths: 1e-6."""
    from diffusers import WanTransformer3DModel
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    from freeloc_dist.families.wan.frame_text import FrameRuns, FrameTextProcessor

    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                  out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1,
                                  image_dim=16 if image_tokens else None,
                                  added_kv_proj_dim=24 if image_tokens else None)
    attn = model.blocks[0].attn2
    assert (attn.add_k_proj is not None) == bool(image_tokens)
    g = torch.Generator().manual_seed(0)
    frames, n, length, dim = 5, 6, 512 if image_tokens else 7, attn.to_q.in_features
    hidden = torch.randn(1, frames * n, dim, generator=g)
    image = torch.randn(1, image_tokens, dim, generator=g)
    texts = torch.randn(1, 3 * length, dim, generator=g)  # 3 conditionings of `length` tokens
    runs = ((0, 2, 1), (2, 3, 0), (3, 5, 2))
    current = FrameRuns()
    current.runs, current.tokens = runs, length
    stock = WanAttnProcessor()

    def text(u):
        return torch.cat([image, texts[:, u * length:(u + 1) * length]], dim=1)

    with torch.no_grad():
        grouped = FrameTextProcessor(stock, current)(attn, hidden, torch.cat([image, texts], dim=1))
        of_frame = {f: u for a, b, u in runs for f in range(a, b)}
        naive = torch.cat([stock(attn, hidden[:, f * n:(f + 1) * n], text(of_frame[f])) for f in range(frames)], dim=1)
        assert (grouped - naive).abs().max() < 1e-6
        assert (grouped[:, :2 * n] - stock(attn, hidden[:, :2 * n], text(0))).abs().max() > 1e-3


VARIANTS = {  # config, overrides for a short render (5 latent frames, 32x32)
    "t2v": ("configs/tiny-random.yaml", {}),
    "i2v": ("configs/tiny-random-i2v.yaml", {}),
    "a14b": ("configs/tiny-random-a14b.yaml", {"sampling.steps": 4}),  # 4 steps cross the expert boundary
    "ti2v": ("configs/tiny-random-ti2v.yaml", {}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_wan_variant_one_entry_is_bitwise_plain_and_two_entries_switch(variant, tmp_path):
    from freeloc_dist.images import keep_images
    from freeloc_dist.models import load_components
    from freeloc_dist.sampling import render

    config, overrides = VARIANTS[variant]
    over = {"video.frames": 17, "sampling.steps": 2, "video.height": 32, "video.width": 32,
            "sampling.negative_prompt": "blurry", **overrides}
    cfg = load_render_config(REPO_ROOT / config, over)
    if cfg.image is not None:
        keep_images({"image": cfg.image, "last_image": cfg.last_image})
    one, two = tmp_path / "one.yaml", tmp_path / "two.yaml"
    one.write_text(f"- {{at: 0, prompt: {json.dumps(cfg.prompt)}}}\n")
    two.write_text(f"- {{at: 0, prompt: {json.dumps(cfg.prompt)}}}\n- {{at: 0.5, prompt: a lighthouse}}\n")
    parts = load_components(cfg.model.path, "float32", "cpu")
    plain = render(parts, cfg, decode=False).latents
    single = render(parts, dataclasses.replace(cfg, storyboard=one), decode=False).latents
    switched = render(parts, dataclasses.replace(cfg, storyboard=two), decode=False).latents
    assert torch.equal(single, plain)
    assert (switched - plain).abs().max() > 1e-3
    assert all(type(b.attn2.processor).__name__ == "WanAttnProcessor" for t in (parts.transformer,
               parts.transformer_2) if t is not None for b in t.blocks)  # the per-frame processors are gone


def test_cli_sidecar_fingerprint_and_dry_run_cover_the_schedule(generate, tmp_path, monkeypatch, capsys):
    """Through launch/generate.py (the bitwise equality with --prompt is the variant test's, in process)."""
    from freeloc_dist.checkpoint import fingerprint

    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    one = tmp_path / "one.yaml"
    one.write_text(f"- {{at: 0, prompt: {PROMPT}}}\n")
    base = ["--config", str(REPO_ROOT / "configs/tiny-random.yaml"), "--frames", "17", "--steps", "1",
            "--height", "32", "--width", "32", "--quiet"]
    assert generate.main([*base, "--storyboard", str(one), "--out", str(tmp_path / "story.mp4")]) == 0
    sidecar = json.loads((tmp_path / "story.json").read_text())
    assert sidecar["storyboard"] == [{"at": 0.0, "prompt": PROMPT, "negative_prompt": None, "transition": 0.0}]
    assert sidecar["prompt"] == PROMPT
    capsys.readouterr()
    assert generate.main(["--config", str(REPO_ROOT / "configs/tiny-random.yaml"), "--frames", "33",
                          "--storyboard", str(THREE), "--dry-run", "--world-size", "3"]) == 0
    assert "text encoder: 3 prompt encodings on the busiest rank" in capsys.readouterr().out
    # the fingerprint covers the schedule's content, not its path: a moved copy resumes, another transition
    # (same prompts) does not
    moved, other = tmp_path / "moved.yaml", tmp_path / "other.yaml"
    moved.write_text(THREE.read_text())
    other.write_text(THREE.read_text().replace("transition: 0.5", "transition: 0.25"))
    cfg = load_render_config(REPO_ROOT / "configs/tiny-random.yaml", {"video.frames": 33})
    key = {p: fingerprint(dataclasses.replace(cfg, storyboard=p), None) for p in (None, THREE, moved, other)}
    assert key[THREE] == key[moved] and len({key[None], key[THREE], key[other]}) == 3


def test_queue_job_takes_a_storyboard_instead_of_a_prompt(tmp_path):
    from freeloc_dist.queue import QueueError, parse_prompts

    (tmp_path / "boards").mkdir()
    path = tmp_path / "p.txt"
    path.write_text('a cat\n{"storyboard": "boards/fox.yaml", "seed": 2}\n')
    jobs = parse_prompts(path, tmp_path / "out", 0)
    assert jobs[0].storyboard is None and jobs[1].storyboard == tmp_path / "boards" / "fox.yaml"
    assert jobs[1].output.name == "fox-s2.mp4"
    path.write_text('{"storyboard": "b.yaml", "prompt": "x"}\n')
    with pytest.raises(QueueError, match="p.txt:1: prompt: not allowed with storyboard"):
        parse_prompts(path, tmp_path / "out", 0)


def test_a_family_without_per_frame_text_is_refused(monkeypatch):
    from freeloc_dist.families.wan.adapter import WanFamily
    from freeloc_dist.storyboard import check_storyboard

    cfg = load_render_config(REPO_ROOT / "configs/tiny-random.yaml", {"video.frames": 33, "storyboard": str(THREE)})
    monkeypatch.setattr(WanFamily, "per_frame_text", False)
    with pytest.raises(StoryboardError, match="the wan family has no per-frame text conditioning"):
        check_storyboard(cfg, WanFamily(), prompt_flag=False)


def test_bench_renders_with_the_method_it_reports(monkeypatch, tmp_path):
    """bench/storyboard.py renders with FreeLOC installed by default (as launch/generate.py does) and stock
    attention with --method direct; it once called sampling.render bare, measuring direct while reporting FreeLOC."""
    from types import SimpleNamespace

    import numpy as np
    from diffusers import WanTransformer3DModel

    from freeloc_dist import methods, sampling

    seen = []

    def fake_render(components, cfg, **kwargs):  # records what the model had installed; renders nothing
        seen.append((cfg.storyboard is not None, getattr(components.transformer, "freeloc_state", None) is not None))
        return sampling.RenderResult(latents=None, frames=np.zeros((cfg.video.frames, 64, 64, 3), np.uint8))

    monkeypatch.setattr(sampling, "render", fake_render)
    monkeypatch.setattr(methods, "render", fake_render)
    from _scripts import load_script

    bench = load_script("bench/storyboard.py")
    toy = SimpleNamespace(transformer=WanTransformer3DModel.from_pretrained(REPO_ROOT / "assets/toy-wan/transformer"))
    bench.load_components = lambda path, dtype: toy  # the toy's transformer is all an install needs
    common = ["--pairs", "1", "--length", "2", "--steps", "1"]
    assert bench.main([*common, "--json", str(tmp_path / "f.json")]) == 0
    assert seen == [(True, True), (False, True), (False, True)]  # the storyboard, then each prompt alone
    assert json.loads((tmp_path / "f.json").read_text())[0]["method"] == "freeloc"
    assert getattr(toy.transformer, "freeloc_state", None) is None  # uninstalled after each render
    seen.clear()
    assert bench.main([*common, "--method", "direct", "--json", str(tmp_path / "d.json")]) == 0
    assert seen == [(True, False), (False, False), (False, False)]
