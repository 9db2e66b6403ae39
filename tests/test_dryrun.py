"""The dry-run planner: shapes in, per-rank costs out, no weights loaded."""

import json
import os
import subprocess
import sys

import pytest

from freeloc_dist.config import REPO_ROOT, load_render_config
from freeloc_dist.planner import KNOWN_TRANSFORMERS, RenderPlanError, plan_render, transformer_params
from freeloc_dist.profile import load_profile

WAN13 = KNOWN_TRANSFORMERS["Wan-AI/Wan2.1-T2V-1.3B-Diffusers"]
PROFILE13 = load_profile(REPO_ROOT / "configs" / "profiles" / "wan2.1-t2v-1.3b.yaml")


def cfg13(frames, **over):
    return load_render_config(REPO_ROOT / "configs" / "wan2.1-t2v-1.3b.yaml", {"video.frames": frames, **over})


@pytest.mark.unit
def test_param_count_matches_the_built_model(tiny_model_dir):
    from diffusers import WanTransformer3DModel

    t = json.loads((tiny_model_dir / "transformer" / "config.json").read_text())
    model = WanTransformer3DModel.from_pretrained(tiny_model_dir, subfolder="transformer")
    assert transformer_params(t) == sum(p.numel() for p in model.parameters())
    assert 1.3e9 < transformer_params(WAN13) < 1.5e9


@pytest.mark.unit
def test_minute_scale_plan_on_eight_ranks():
    p = plan_render(cfg13(961), WAN13, PROFILE13, world_size=8)
    assert p.tokens == 241 * 1560 == 375_960 and p.tokens_per_rank == 31 * 1560
    assert p.layers_by_kind == {"tsa": 17, "vrpr": 13}
    assert p.strategy_by_kind == {"tsa": "neighbour", "vrpr": "hybrid"}  # 12 heads: Ulysses 4 x ring 2
    assert 0 < p.density_by_kind["tsa"] < 0.2 and p.density_by_kind["vrpr"] == 1.0
    per_layer = {k: p.attention_flops_by_kind[k] / p.layers_by_kind[k] for k in p.layers_by_kind}
    assert per_layer["tsa"] < 0.2 * per_layer["vrpr"]
    assert p.seconds > 0 and p.memory_total < 80 * 1024**3


@pytest.mark.unit
def test_tsa_bytes_do_not_grow_with_length_but_dense_do():
    a = plan_render(cfg13(961), WAN13, PROFILE13, world_size=8)
    b = plan_render(cfg13(1921), WAN13, PROFILE13, world_size=8)
    assert b.bytes_per_step["tsa"] == a.bytes_per_step["tsa"]
    assert b.bytes_per_step["vrpr"] > 1.5 * a.bytes_per_step["vrpr"]


@pytest.mark.unit
def test_more_ranks_less_activation_memory_and_refusal():
    one = plan_render(cfg13(961), WAN13, PROFILE13, world_size=1)
    eight = plan_render(cfg13(961), WAN13, PROFILE13, world_size=8)
    assert eight.memory_bytes["activations"] < one.memory_bytes["activations"] / 7
    with pytest.raises(RenderPlanError, match="does not fit: .* GiB per rank needed, 16 GiB available"):
        plan_render(cfg13(961), WAN13, PROFILE13, world_size=1, device_memory_gb=16)


@pytest.mark.cli
def test_cli_dry_run_needs_no_weights(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "launch" / "generate.py"), "--config",
                           "configs/wan2.1-t2v-1.3b.yaml", "--frames", "961", "--dry-run", "--world-size", "8",
                           "--out", str(tmp_path / "x.mp4")], capture_output=True, text=True, cwd=REPO_ROOT,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "375,960 tokens" in proc.stdout and "bytes received per rank per step" in proc.stdout
    assert "weights: transformer" in proc.stdout and "time: >=" in proc.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.unit
def test_long_profile_cuts_minute_scale_attention_three_fold():
    """Issue 18's figure: the long profile's attention (and total) FLOPs per rank per step at 961 frames on 8 ranks
    are at least 3x below the plain profile's; long-range layers run neighbour exchange and receive fewer bytes."""
    long = load_profile(REPO_ROOT / "configs" / "profiles" / "wan2.1-t2v-1.3b-long.yaml")
    plain = plan_render(cfg13(961), WAN13, PROFILE13, world_size=8)
    p = plan_render(cfg13(961), WAN13, long, world_size=8)
    assert p.layers_by_kind == {"tsa": 17, "vrpr+long": 13}
    assert p.strategy_by_kind["vrpr+long"] == "neighbour"
    assert sum(plain.attention_flops_by_kind.values()) >= 3 * sum(p.attention_flops_by_kind.values())
    assert plain.flops_per_step >= 3 * p.flops_per_step
    assert p.bytes_per_step["vrpr+long"] < plain.bytes_per_step["vrpr"]
    assert p.attention_flops_by_kind["tsa"] == plain.attention_flops_by_kind["tsa"]
