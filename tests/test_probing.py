"""Layer probing (freeloc_dist.probing, launch/probe.py): the statistics against naive references, the
window plan against the oracle, constructed layers ranked first, and a probed profile driving generate."""

import pytest
import torch
import yaml
from _scripts import load_script
from _tiny import one_thread, rel_err, tiny_transformer, transformer_inputs  # noqa: F401 (one_thread: autouse)

from freeloc_dist import apply_freeloc, load_profile
from freeloc_dist.attention.reference import reference_attention
from freeloc_dist.attention.sdpa import grouped_attention
from freeloc_dist.config import REPO_ROOT, ConfigError
from freeloc_dist.plan import expand_to_tokens, layer_plan
from freeloc_dist.probing import (
    DEFAULT_SETTINGS_PATH,
    ProbeInput,
    Prober,
    ProbeSettings,
    RuleSettings,
    assign_kinds,
    context_stats,
    load_probe_settings,
    parse_probe_settings,
    position_stats,
    probed_profile,
    sample_rows,
    score_table,
    window_plan,
    write_profile,
)
from freeloc_dist.rope import TemporalRope

pytestmark = pytest.mark.unit

T = 4  # trained frames of the tests' tiny transformer (R = 3)


def _inputs(num_frames, seed):
    d = transformer_inputs(num_frames, seed=seed)
    return ProbeInput(latents=d["hidden_states"], timestep=d["timestep"][0], text=d["encoder_hidden_states"])


def _constant_qk(block, channels, scale):
    """Make q and k of every head the same constant vector on `channels` (after RMS norm: `scale` each)."""
    attn = block.attn1
    head_dim = attn.to_q.weight.shape[0] // attn.heads
    with torch.no_grad():
        for lin, norm in ((attn.to_q, attn.norm_q), (attn.to_k, attn.norm_k)):
            lin.weight.zero_()
            lin.bias.zero_()
            for h in range(attn.heads):
                lin.bias[h * head_dim + torch.tensor(channels)] = 1.0
            norm.weight.fill_(scale)


def constructed_model():
    """4 random layers, of which layer 1 is made position-dependent and layer 2 long-context-dependent.

    head_dim 12 splits into temporal channels 0-3 (pairs at frequencies 1 and 0.01), h 4-7, w 8-11.
    Layer 1: q = k on the slow temporal pair with a huge norm, so the logit is c*cos(0.01*dt) ~ const - c*5e-5*dt^2
    (c ~ 2e4): a sharp Gaussian in the temporal distance, moved away entirely by a key shift of R.
    Layer 2: q = k on the fast h and w pairs only: each token attends to its own spatial position in
    every frame alike (no temporal channel at all), so its attention spreads evenly over the whole
    video, and cutting it to T frames changes its entropy by about 1 - log T / log F.
    """
    model = tiny_transformer(num_layers=4)
    _constant_qk(model.blocks[1], [2], 76.0)
    _constant_qk(model.blocks[2], [4, 8], 3.0)
    return model


def _probe(model, layers=None, seed=0, **kw):
    with Prober(model, trained_frames=T, query_samples=40, seed=seed, layers=layers, **kw) as prober:
        for s in range(2):
            prober.probe_position(_inputs(T, seed=s))
            prober.probe_context(_inputs(4 * T, seed=10 + s))
    return prober


def test_constructed_layers_rank_first():
    prober = _probe(constructed_model())
    scores = prober.scores()
    for name in ("position_attention", "position_output"):
        assert int(scores[name].argmax()) == 1, (name, scores[name])
    for name in ("context_entropy", "context_output"):
        assert int(scores[name].argmax()) == 2, (name, scores[name])
    assert float(scores["position_attention"][2]) == 0.0  # layer 2 has no temporal channel
    kinds, _ = assign_kinds(scores, RuleSettings())
    assert kinds[2] == "tsa" and kinds[1] == "vrpr"
    # 2 inputs per probe, 4 layers: (1 + 4 * 4 shifts) + (1 + 4 windows) forwards each
    assert prober.forward_passes == 2 * (1 + 16) + 2 * (1 + 4)


def test_layer_split_equals_single_process_and_restores_processors():
    model = constructed_model()
    before = [b.attn1.processor for b in model.blocks]
    whole = _probe(model, measure_output=False).scores()
    assert [b.attn1.processor for b in model.blocks] == before
    parts = [_probe(model, layers=[r, r + 2], measure_output=False).scores() for r in (0, 1)]
    for name, value in whole.items():
        merged = torch.stack([parts[i % 2][name][i] for i in range(4)])
        assert torch.equal(merged, value), name
        assert torch.isnan(parts[0][name][1])  # not measured on that "rank"


@pytest.fixture(params=["one chunk", "one row per chunk"])
def stats_budget(request, monkeypatch):
    if request.param == "one row per chunk":
        monkeypatch.setattr("freeloc_dist.probing.stats._STATS_BUDGET_BYTES", 1)


def test_position_stats_match_naive(stats_budget):
    torch.manual_seed(0)
    t_rope = TemporalRope(t_dim=4)
    num_frames, n, heads, dim = 4, 3, 2, 12
    q0, k0 = torch.randn(1, num_frames * n, heads, dim), torch.randn(1, num_frames * n, heads, dim)
    frames = torch.arange(num_frames).repeat_interleave(n)
    rows = sample_rows(num_frames * n, 5, seed=1)
    k_nat = t_rope.rotate(k0, frames[:, None])
    entropy, diff = position_stats(q0, k_nat, frames, rows, (3, -6), t_rope)

    def probs(key_pos):
        q = t_rope.rotate(q0, frames[:, None])[0, rows].transpose(0, 1)  # [h, m, d]
        k = t_rope.rotate(k0, key_pos[:, None])[0].transpose(0, 1)
        return torch.softmax(q @ k.transpose(1, 2) / dim**0.5, -1)

    base = probs(frames)
    assert torch.allclose(entropy, -(base * base.log()).sum(-1).mean(-1).double(), atol=1e-5)
    for j, delta in enumerate((3, -6)):
        want = (probs(frames + delta) - base).norm(dim=(1, 2)) / base.norm(dim=(1, 2))
        assert torch.allclose(diff[j], want.double(), atol=1e-5)


def test_context_stats_match_naive(stats_budget):
    torch.manual_seed(0)
    t_rope = TemporalRope(t_dim=4)
    grid, heads, dim = (13, 2, 2), 2, 12
    plan = layer_plan("vrpr", grid, T)
    num_tokens, n = 13 * 4, 4
    q0, k0 = torch.randn(1, num_tokens, heads, dim), torch.randn(1, num_tokens, heads, dim)
    rows = sample_rows(num_tokens, 9, seed=2)
    frames = torch.arange(13).repeat_interleave(n)
    q_nat, k_nat = (t_rope.rotate(x, frames[:, None]) for x in (q0, k0))  # x [1, L, h, d]
    h_full, h_win = context_stats(q_nat, k_nat, q0, k0, plan, T, rows, t_rope)

    def entropy(p):
        return -(p * p.clamp_min(1e-300).log()).sum(-1).mean(-1)

    for the_plan, got in ((plan, h_full), (window_plan(plan, T), h_win)):
        mask, offset = expand_to_tokens(the_plan)
        scores = torch.empty(heads, num_tokens, num_tokens, dtype=torch.float64)
        k = k0[0].double().transpose(0, 1)  # [h, L, d]
        for o in offset.unique().tolist():  # each pair scored under its own offset
            s_o = t_rope.rotate(q0[0].double(), o).transpose(0, 1) @ k.transpose(1, 2) / dim**0.5
            scores = torch.where(offset == o, s_o, scores)
        p = torch.softmax(scores.masked_fill(~mask, float("-inf"))[:, rows], -1)
        assert torch.allclose(got, entropy(p), atol=1e-5)


@pytest.mark.parametrize("num_frames", [5, 9])
def test_window_plan(num_frames):
    plan = layer_plan("vrpr", (num_frames, 2, 2), T)
    win = window_plan(plan, T)
    attended = win.tiers != 0
    assert attended.sum(1).tolist() == [T] * num_frames  # exactly T key frames per query frame
    a, b = torch.nonzero(attended).unbind(1)
    assert int((a - b).abs().max()) <= T - 1
    assert torch.equal(win.offsets, plan.offsets)
    for row, groups in zip(attended, win.groups):  # groups cover exactly the window
        covered = torch.zeros(num_frames, dtype=torch.bool)
        for g in groups:
            covered[g.frame_start : g.frame_end] = True
        assert torch.equal(covered, row)
    torch.manual_seed(0)
    t_rope = TemporalRope(t_dim=4)
    q0, k0, v = (torch.randn(1, 2, num_frames * 4, 12) for _ in range(3))
    frames = torch.arange(num_frames).repeat_interleave(4)
    q_nat, k_nat = (t_rope.rotate(x, frames) for x in (q0, k0))  # x [B, h, L, d]
    out, _ = grouped_attention(q_nat, k_nat, q0, k0, v, win, t_rope, impl="math")
    assert rel_err(out, reference_attention(q0, k0, v, win, t_rope)) < 1e-5


def test_settings_file_holds_the_defaults_and_errors_are_one_line():
    assert load_probe_settings(DEFAULT_SETTINGS_PATH) == ProbeSettings()
    s = load_probe_settings(None, {"steps": 3, "rule.tsa_min": 0.5, "prompts": ["x"]})
    assert (s.steps, s.rule.tsa_min, s.prompts) == (3, 0.5, ("x",))
    bad = [
        ({"shifts": [0, 1]}, "probing.shifts"),
        ({"timesteps": [1.0]}, "probing.timesteps"),
        ({"frames": 20}, "probing.frames=20: must be 4k+1"),
        ({"query_samples": 0}, "probing.query_samples"),
        ({"colour": 1}, "probing.colour: unknown key"),
        ({"rule": {"context_score": "entropy"}}, "probing.rule.context_score"),
        ({"measure_output": False, "rule": {"context_score": "context_output"}}, "needs probing.measure_output"),
    ]
    for raw, needle in bad:
        with pytest.raises(ConfigError) as e:
            parse_probe_settings(raw)
        assert needle in str(e.value) and "\n" not in str(e.value)


def test_rule():
    scores = {"context_entropy": [0.5, 0.1, 0.3, 0.0], "position_attention": [0.9, 0.005, 0.4, 0.2]}
    kinds, applied = assign_kinds(scores, RuleSettings())
    assert kinds == ["tsa", "full", "tsa", "vrpr"]  # cut = max(0.02, mean 0.225)
    assert applied["tsa_cut"] == pytest.approx(0.225)
    assert assign_kinds(scores, RuleSettings(full_max=-1.0))[0][1] == "vrpr"
    assert assign_kinds(scores, RuleSettings(tsa_min=0.6))[0] == ["vrpr", "full", "vrpr", "vrpr"]


def test_written_profile_loads_through_apply_freeloc(tmp_path):
    model = constructed_model()
    prober = _probe(model, measure_output=False)
    kinds, applied = assign_kinds(prober.scores(), RuleSettings())
    profile = probed_profile(model="tiny-constructed", trained_frames=T, kinds=kinds,
                             scores=score_table(prober.scores(), (-2, -1, 1, 2), T), rule=RuleSettings(),
                             applied=applied, settings={"query_samples": 40})
    path = write_profile(tmp_path / "p.yaml", profile)
    loaded = load_profile(path)
    assert list(loaded.kinds) == kinds
    assert set(loaded.extra) == {"date", "rule", "settings", "scores"}
    assert len(loaded.extra["scores"]["position_attention_by_shift"]["+2R"]) == 4
    apply_freeloc(model, path)
    assert [b.attn1.processor.kind for b in model.blocks] == kinds
    with torch.no_grad():
        assert model(**transformer_inputs(9))[0].shape[2] == 9


def _script(name):
    return load_script(f"launch/{name}.py")


def test_probe_cli_writes_a_profile_that_drives_generate(tmp_path, tiny_model_dir, monkeypatch, capsys):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    raw = yaml.safe_load((REPO_ROOT / "configs" / "tiny-random.yaml").read_text())
    raw["model"]["path"] = str(tiny_model_dir)
    raw["video"].update(height=32, width=32)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    settings = tmp_path / "probing.yaml"
    settings.write_text(yaml.safe_dump({"prompts": ["a cat"], "timesteps": [0.5], "steps": 2, "query_samples": 32}))
    probe = _script("probe")
    args = ["--config", str(config), "--probe-config", str(settings), "--frames", "33"]
    outs = [tmp_path / "a.yaml", tmp_path / "b.yaml"]
    for out in outs:
        assert probe.main([*args, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    # per run: trajectories 2 lengths x 1 step x 2 (CFG); position 1 + 3 layers x 4 shifts; context 1 + 3
    assert "forward passes: 21;" in err
    a, b = (yaml.safe_load(p.read_text()) for p in outs)
    assert a["scores"] == b["scores"] and a["layers"] == b["layers"]  # one seed, same scores
    assert a["model"] == "tiny-wan" and a["trained_frames"] == 5 and a["tsa"]["stripe_frames"] == 6
    assert a["settings"]["target_frames"] == 9 and a["settings"]["forward_passes"] == 21
    generate = _script("generate")
    video = tmp_path / "v.mp4"
    assert generate.main(["--config", str(config), "--profile", str(outs[0]), "--frames", "33", "--steps", "1",
                          "--out", str(video)]) == 0
    assert video.is_file()
    assert probe.main([*args, "--frames", "17", "--out", str(outs[0])]) == 2  # 5 latent frames: not > T
    assert "must exceed trained_frames=5" in capsys.readouterr().err


# ---- the probe's inputs, refused before any weight loads (every rank runs the same checks) -------------------


@pytest.fixture
def refused(tmp_path, monkeypatch, capsys):
    """run(argv) -> the one stderr line of a probe of configs/tiny-random.yaml refused with exit 2; loading
    the weights fails the test (the refusal must come first)."""
    import freeloc_dist.models

    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)

    def no_load(*_a, **_k):
        raise AssertionError("weights loaded before the input was refused")

    monkeypatch.setattr(freeloc_dist.models, "load_components", no_load)
    probe = _script("probe")

    def run(*flags, config="tiny-random.yaml"):
        capsys.readouterr()
        code = probe.main(["--config", str(REPO_ROOT / "configs" / config), "--frames", "33", *flags])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (code, err)
        return err[0]

    return run


def test_unwritable_out_is_refused_before_loading(refused, tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("")
    assert "folder: is a directory" in refused("--out", str(tmp_path / "folder"))
    assert "is not writable" in refused("--out", "/proc/x.yaml")
    assert "is not a folder" in refused("--out", str(tmp_path / "file" / "p.yaml"))
    assert not (tmp_path / "file").is_dir()


def test_absurd_steps_are_refused_before_loading(refused, tmp_path):
    from freeloc_dist.config import MAX_STEPS

    line = refused("--steps", str(10**9), "--out", str(tmp_path / "p.yaml"))
    assert f"probing.steps=1000000000: must be >= 1 and <= {MAX_STEPS}" in line
    assert parse_probe_settings({"steps": MAX_STEPS}).steps == MAX_STEPS  # a render's largest step count is probed
    assert not (tmp_path / "p.yaml").exists()


def test_profile_is_written_atomically(tmp_path, monkeypatch):
    """A write that fails half-way (a full disk, simulated) leaves the previous profile as it was and no
    temporary file."""
    import errno
    import pathlib

    out = tmp_path / "p.yaml"
    out.write_text("previous")
    profile = probed_profile(model="m", trained_frames=T, kinds=["tsa", "vrpr", "full"], scores={},
                             rule=RuleSettings(), applied={"tsa_cut": 0.1}, settings={})
    real = pathlib.Path.write_text

    def half_then_full(self, text, *a, **k):
        real(self, text[: len(text) // 2], *a, **k)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", half_then_full)
    with pytest.raises(OSError):
        write_profile(out, profile)
    monkeypatch.undo()
    assert out.read_text() == "previous" and sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml"]
    write_profile(out, profile)
    assert load_profile(out).kinds == ("tsa", "vrpr", "full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml"]


def test_profile_mapping_keeps_unset_tsa_sinks_unset():
    """A profile that leaves tsa.sink_frames unset (a conditioned render puts the sinks on its images) maps
    back to one that leaves it unset; one that names its sinks keeps them."""
    from freeloc_dist.profile import parse_profile

    unset = load_profile(REPO_ROOT / "configs" / "profiles" / "tiny-random-i2v.yaml")
    assert not unset.tsa_sinks_given and "sink_frames" not in unset.to_mapping()["tsa"]
    assert not parse_profile(unset.to_mapping()).tsa_sinks_given
    given = load_profile(REPO_ROOT / "configs" / "profiles" / "tiny-random.yaml")
    again = parse_profile(given.to_mapping())
    assert again.tsa_sinks_given and again.tsa == given.tsa
    probed = probed_profile(model="m", trained_frames=5, kinds=["tsa", "vrpr", "full"], scores={},
                            rule=RuleSettings(), applied={}, settings={}, base=unset.to_mapping())
    assert probed["tsa"] == {"dense_frames": 2, "stripe_frames": 6}
