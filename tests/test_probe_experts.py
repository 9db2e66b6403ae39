"""Probing a two-expert model (Wan2.2 A14B, assets/tiny-a14b): each expert is probed on its own steps of a
trajectory that runs both experts, as a render does (freeloc_dist.probing.run, launch/probe.py --expert)."""

import pytest
import yaml
from _scripts import load_script

from freeloc_dist.config import REPO_ROOT
from freeloc_dist.probing import trajectory_steps

pytestmark = pytest.mark.unit


def _probe_script():
    return load_script("launch/probe.py")


def test_trajectory_steps_within_an_expert_range():
    assert trajectory_steps((0.2, 0.5, 0.8), 10) == [2, 5, 8]
    assert trajectory_steps((0.0, 0.5, 0.99), 10, within=(4, 10)) == [4, 7, 9]
    assert trajectory_steps((0.0, 0.5), 6, within=(0, 2)) == [0, 1]
    assert trajectory_steps((0.2, 0.3), 6, within=(5, 6)) == [5]  # one step: deduplicated


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    """Both experts of the tiny A14B probed once (attention statistics only: few forwards); also which
    loaded transformer each run measured (the Prober given layers) and which it only ran."""
    import freeloc_dist.models
    import freeloc_dist.probing

    tmp = tmp_path_factory.mktemp("probe_experts")
    seen, real_load, real_prober = {}, freeloc_dist.models.load_components, freeloc_dist.probing.Prober

    def load(*a, **k):
        seen["parts"] = real_load(*a, **k)
        return seen["parts"]

    def prober(transformer, **k):
        parts = seen["parts"]
        name = "transformer" if transformer is parts.transformer else "transformer_2"
        seen.setdefault("probers", []).append((name, bool(k.get("layers"))))
        return real_prober(transformer, **k)

    mp = pytest.MonkeyPatch()
    mp.setattr(freeloc_dist.models, "load_components", load)
    mp.setattr(freeloc_dist.probing, "Prober", prober)
    raw = yaml.safe_load((REPO_ROOT / "configs" / "tiny-random-a14b.yaml").read_text())
    raw["video"].update(height=32, width=32)
    config = tmp / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    settings = tmp / "probing.yaml"
    settings.write_text(yaml.safe_dump({"prompts": ["a cat"], "timesteps": [0.0, 0.5], "steps": 6,
                                        "query_samples": 16, "measure_output": False,
                                        "rule": {"context_score": "context_entropy",
                                                 "position_score": "position_attention"}}))
    probe = _probe_script()
    args = ["--config", str(config), "--probe-config", str(settings), "--frames", "33"]
    out = {}
    try:
        for expert in ("transformer", "transformer_2"):
            path = tmp / f"{expert}.yaml"
            seen["probers"] = []
            assert probe.main([*args, "--expert", expert, "--out", str(path)]) == 0
            out[expert] = yaml.safe_load(path.read_text())
            out[expert]["probers"] = seen["probers"]
    finally:
        mp.undo()
    return probe, args, tmp, out


def test_each_expert_is_probed_on_its_own_steps(probed):
    _, _, _, out = probed
    # 6 steps at shift 3: timesteps 999, 937 >= 875 (boundary 0.875) run the first expert; 857 ... 376 the second
    first, second = out["transformer"]["settings"], out["transformer_2"]["settings"]
    assert first["expert_steps"] == [0, 2] and second["expert_steps"] == [2, 6]
    assert first["probed_steps"] == [0, 1] and second["probed_steps"] == [2, 4]
    assert first["boundary_ratio"] == second["boundary_ratio"] == 0.875
    # The expert named is the one measured; the other only runs its steps of the trajectories.
    assert out["transformer"]["probers"] == [("transformer", True), ("transformer_2", False)]
    assert out["transformer_2"]["probers"] == [("transformer_2", True), ("transformer", False)]
    a, b = out["transformer"]["scores"], out["transformer_2"]["scores"]
    assert a.keys() == b.keys() and a != b
    # trajectories (2 lengths x up to the last probed step x 2 CFG passes, over both experts) + 2 x 2 probes
    assert first["forward_passes"] == 2 * 1 * 2 + 4 and second["forward_passes"] == 2 * 4 * 2 + 4


def test_second_expert_of_a_one_expert_model_is_refused(probed, tiny_model_dir, tmp_path, capsys):
    probe, _, _, _ = probed
    raw = yaml.safe_load((REPO_ROOT / "configs" / "tiny-random.yaml").read_text())
    raw["model"]["path"] = str(tiny_model_dir)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    assert probe.main(["--config", str(config), "--frames", "33", "--expert", "transformer_2",
                       "--out", str(tmp_path / "p.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --expert transformer_2: the model at")
    assert "has transformer (expected one of transformer)" in err[0]
    assert not (tmp_path / "p.yaml").exists()


def test_expert_without_steps_is_refused_before_loading(tmp_path, monkeypatch, capsys):
    """One step at shift 3 is timestep 999 >= 875: the second expert never runs. The schedule comes from the
    scheduler config and model_index.json's boundary_ratio, so this is refused before any weight loads, with
    a step count that does give it steps."""
    import freeloc_dist.models

    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)

    def no_load(*_a, **_k):
        raise AssertionError("weights loaded before the input was refused")

    monkeypatch.setattr(freeloc_dist.models, "load_components", no_load)
    capsys.readouterr()
    out = tmp_path / "p.yaml"
    assert _probe_script().main(["--config", str(REPO_ROOT / "configs" / "tiny-random-a14b.yaml"), "--frames", "33",
                                 "--steps", "1", "--expert", "transformer_2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --expert transformer_2: runs none of the 1 steps"), err
    assert "boundary at timestep 875" in err[0] and "with --steps 2 it runs 1 of them" in err[0], err[0]
    assert not out.exists()
    with pytest.raises(AssertionError, match="weights loaded"):  # 2 steps: 999 and 750, one for each expert
        _probe_script().main(["--config", str(REPO_ROOT / "configs" / "tiny-random-a14b.yaml"), "--frames", "33",
                              "--steps", "2", "--expert", "transformer_2", "--out", str(out)])
