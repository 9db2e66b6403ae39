"""Probing HunyuanVideo (freeloc_dist.probing through the family adapter; DESIGN 11): the probe's joint layers equal
FreeLOC's, the layers are indexed in forward order (dual-stream then single-stream blocks), the text-phase probe's
statistics equal a naive loop and its rule picks each setting, and launch/probe.py writes a profile for the family
that the renderer's checks accept.
"""

import copy

import pytest
import torch
import yaml
from _scripts import load_script
from _tiny import one_thread  # noqa: F401 (autouse)

from freeloc_dist.config import REPO_ROOT

pytestmark = pytest.mark.unit
TINY = REPO_ROOT / "assets" / "tiny-hunyuan"
TINY_PROFILE = REPO_ROOT / "configs" / "profiles" / "tiny-random-hunyuan.yaml"
T = 5  # the tiny model's declared trained frames


@pytest.fixture(scope="module")
def parts():
    from freeloc_dist.models import load_components

    return load_components(TINY, "float32", "cpu")


def _inputs(frames, seed=1):
    """One transformer input of the tiny model: latents [1, 4, frames, 8, 8] (16 tokens a frame), 6 text tokens of
    which the last 2 are padded (masked as the stock pipeline masks them), embedded guidance."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(1, 6)
    mask[:, 4:] = 0
    return dict(hidden_states=torch.randn(1, 4, frames, 8, 8, generator=g), timestep=torch.tensor([500.0]),
                encoder_hidden_states=torch.randn(1, 6, 32, generator=g), encoder_attention_mask=mask,
                pooled_projections=torch.randn(1, 16, generator=g), guidance=torch.tensor([6000.0]))


def _probe_input(frames, seed=1):
    from freeloc_dist.families.hunyuan_video.conditioning import EmbeddedGuidance
    from freeloc_dist.families.hunyuan_video.text import HunyuanText
    from freeloc_dist.probing import ProbeInput

    d = _inputs(frames, seed)
    text = HunyuanText(d["encoder_hidden_states"], d["encoder_attention_mask"], d["pooled_projections"])
    return ProbeInput(latents=d["hidden_states"], timestep=d["timestep"][0], text=text,
                      condition=EmbeddedGuidance(6.0, "cpu", torch.float32))


def test_probe_baselines_equal_stock_and_freeloc(parts):
    """Under the prober (no perturbation) the joint layers compute what a render computes: at T diffusers' stock
    joint attention, at F > T FreeLOC with every layer vrpr (text_phase phi), padded text keys masked."""
    from freeloc_dist import apply_freeloc
    from freeloc_dist.probing import Prober

    model = parts.transformer
    all_vrpr = {**yaml.safe_load(TINY_PROFILE.read_text()), "layers": {"vrpr": [0, 1, 2, 3]}}
    with torch.no_grad():
        stock = model(**_inputs(T), return_dict=False)[0]
        handle = apply_freeloc(model, all_vrpr)
        try:
            vrpr = model(**_inputs(7), return_dict=False)[0]
        finally:
            handle.remove()
        with Prober(model, trained_frames=T):
            probed = [model(**_inputs(f), return_dict=False)[0] for f in (T, 7)]
    assert (probed[0] - stock).abs().max() < 1e-5
    assert (probed[1] - vrpr).abs().max() < 1e-5
    assert (vrpr - model(**_inputs(7), return_dict=False)[0]).abs().max() > 1e-3  # FreeLOC changed it


def test_layers_are_probed_in_forward_order(parts):
    """Profile layer i is the i-th joint attention in forward order: 2 dual-stream blocks, then 2 single-stream
    blocks. The second single-stream block (layer 3) is given no temporal channel in q: moving the video keys in
    time then changes neither its attention nor the model's output, so its position scores are 0 and no other
    layer's are."""
    from freeloc_dist.probing import Prober

    model = copy.deepcopy(parts.transformer)
    attn = model.single_transformer_blocks[1].attn
    head_dim = attn.to_q.weight.shape[0] // attn.heads
    with torch.no_grad():
        for h in range(attn.heads):  # temporal RoPE channels 0-3 of every head (rope_axes_dim 4/6/6)
            attn.to_q.weight[h * head_dim : h * head_dim + 4] = 0.0
            attn.to_q.bias[h * head_dim : h * head_dim + 4] = 0.0
    with Prober(model, trained_frames=T, shifts=(1,), query_samples=24) as prober:
        prober.probe_position(_probe_input(T))
        prober.probe_context(_probe_input(9, seed=2))
    scores = prober.scores()
    assert scores["position_attention"][3] == 0.0 and bool((scores["position_attention"][:3] > 1e-3).all())
    assert scores["position_output"][3] < 1e-6 and bool((scores["position_output"][:3] > 1e-4).all())
    assert bool((scores["context_output"] > 1e-4).all())  # the window perturbs every layer's video keys
    assert all(name in scores for name in ("text_entropy_trained", "text_entropy_phi", "text_entropy_natural"))
    assert prober.forward_passes == (1 + 4) + (1 + 4)  # 1 shift, 4 layers; 1 window each


def test_text_phase_stats_equal_a_naive_loop():
    from freeloc_dist.attention.joint import text_phases
    from freeloc_dist.plan import layer_plan
    from freeloc_dist.probing import text_phase_stats
    from freeloc_dist.rope import TemporalRope

    t_rope = TemporalRope(t_dim=4, theta=256.0)
    plan = layer_plan("vrpr", (24, 1, 2), T)  # phi(f) != f from frame W1 + 1 on
    g = torch.Generator().manual_seed(0)
    q0, keys = torch.randn(1, 48, 2, 16, generator=g), torch.randn(3, 2, 16, generator=g)
    rows = torch.tensor([0, 5, 17, 30, 47])
    got = text_phase_stats(q0, keys, plan, rows, t_rope)
    phases = {p: text_phases(plan, p) for p in ("phi", "natural")}
    differ = [int(r) for r in rows if phases["phi"][r // 2] != phases["natural"][r // 2]]
    assert differ and len(differ) < len(rows)  # the rows where both settings agree are left out
    for p in ("phi", "natural"):
        want = torch.zeros(2, dtype=torch.float64)
        for r in differ:
            q = t_rope.rotate(q0[0, r].double(), int(phases[p][r // 2]))  # [h, d]
            probs = torch.softmax((q[:, None, :] * keys.double().transpose(0, 1)).sum(-1) / 4.0, -1)  # [h, 3]
            want -= (probs * probs.log()).sum(-1) / len(differ)
        assert (got[p] - want).abs().max() < 1e-6, p
    assert not torch.allclose(got["phi"], got["natural"])


@pytest.mark.parametrize("closer,expected", [("natural", "natural"), ("phi", "phi"), ("tie", "phi")])
def test_text_phase_rule_picks_the_setting_closer_to_the_trained_length(closer, expected):
    """text_entropy at the target length under each setting against the trained length's: the smaller mean
    relative drift over the non-full layers wins (phi on a tie); a full layer (stock whatever the setting) does
    not vote, however large its drift."""
    from freeloc_dist.probing import choose_text_phase

    near, far = [1.01, 0.98, 5.0], [1.2, 0.7, 1.0]  # layer 2 is full: its numbers must not count
    scores = {"text_entropy_trained": [1.0, 1.0, 1.0],
              "text_entropy_phi": far if closer == "natural" else near,
              "text_entropy_natural": far if closer == "phi" else near}
    phase, drift = choose_text_phase(scores, ["vrpr", "tsa", "full"])
    assert phase == expected, drift
    assert choose_text_phase(scores, ["full", "full", "full"]) == ("phi", {})


# (config, family, layers, forward passes): trajectories 2 lengths x 1 step x passes (1: embedded guidance; 2: 1.5's
# real CFG), plus the baselines at T and at F
PROBED_FAMILIES = [("tiny-random-hunyuan.yaml", "hunyuan_video", 4, 4),
                   ("tiny-random-hunyuan15.yaml", "hunyuan_video15", 3, 6)]


@pytest.mark.parametrize("config_name, family, layers, passes", PROBED_FAMILIES, ids=["hunyuan", "hunyuan15"])
def test_probe_cli_writes_a_hunyuan_profile_the_renderer_accepts(tmp_path, monkeypatch, capsys, config_name, family,
                                                                 layers, passes):
    """launch/probe.py on the tiny HunyuanVideo and HunyuanVideo 1.5 writes a profile with the family, the decided
    text_phase and the text-phase scores, which the render preflight accepts for the model."""
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    settings = tmp_path / "probing.yaml"
    settings.write_text(yaml.safe_dump({"prompts": ["a cat"], "timesteps": [0.5], "steps": 2, "query_samples": 24,
                                        "measure_output": False}))
    out = tmp_path / "p.yaml"
    config = REPO_ROOT / "configs" / config_name
    probe = load_script("launch/probe.py")
    assert probe.main(["--config", str(config), "--probe-config", str(settings), "--frames", "33", "--height", "32",
                       "--width", "32", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"forward passes: {passes};" in err and "text_phase: " in err
    profile = yaml.safe_load(out.read_text())
    assert profile["family"] == family and profile["text_phase"] in ("phi", "natural")
    assert sorted(i for v in profile["layers"].values() for i in v) == list(range(layers))
    assert len(profile["scores"]["text_entropy_phi"]) == layers and "text_drift_phi" in profile["rule"]
    generate = load_script("launch/generate.py")
    assert generate.main(["--config", str(config), "--profile", str(out), "--frames", "33", "--dry-run"]) == 0


def test_probe_with_flex_is_refused_before_loading(tmp_path, monkeypatch, capsys):
    """The flex backend has no joint text-video attention: the probe refuses it as a render does, one line, exit 2,
    before any weight loads and without writing the profile."""
    import freeloc_dist.models

    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)

    def no_load(*_a, **_k):
        raise AssertionError("weights loaded before the input was refused")

    monkeypatch.setattr(freeloc_dist.models, "load_components", no_load)
    raw = yaml.safe_load((REPO_ROOT / "configs" / "tiny-random-hunyuan.yaml").read_text())
    raw["model"]["path"], raw["profile"] = str(TINY), str(TINY_PROFILE)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({**raw, "attention_backend": "flex"}))
    out = tmp_path / "p.yaml"
    assert load_script("launch/probe.py").main(["--config", str(config), "--frames", "33", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "attention_backend=flex: joint text-video attention" in err[0], err
    assert not out.exists()
