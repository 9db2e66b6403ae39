"""Helpers of the in-process bad-input tests (test_family_cli, test_i2v_cli): a shipped config with edits, and
the check that a run is refused with one line, exit 2, before anything is written."""

import yaml

from freeloc_dist.config import REPO_ROOT


def edited_config(tmp_path, name, edit=None):
    """configs/NAME with its output under tmp_path/out and `edit(tmp_path, raw)` applied; returns its path."""
    raw = yaml.safe_load((REPO_ROOT / "configs" / name).read_text())
    raw["output"] = str(tmp_path / "out" / "v.mp4")
    if edit is not None:
        edit(tmp_path, raw)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def assert_refused(generate, argv, tmp_path, monkeypatch, capsys, needle):
    """generate.main(argv) from tmp_path, outside torchrun: exit 2, one stderr line `error: ...` containing
    `needle`, and nothing written under tmp_path/out."""
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.chdir(tmp_path)
    code = generate.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert needle in err[0], err[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
