"""The family boundary (DESIGN 11, freeloc_dist.families): no family's classes are named outside its folder, the
package has no import cycle (imports inside functions count), and a second family registered by a test alone is
served by the engine, the planner and the render loop.
"""

import ast
import dataclasses
import re
from pathlib import Path

import pytest

from freeloc_dist.config import REPO_ROOT

pytestmark = pytest.mark.unit

PACKAGE = REPO_ROOT / "freeloc_dist"
# Class names of the Wan family's models and of the text and image encoders it loads.
WAN_CLASSES = re.compile(r"\b(Wan[A-Z]\w*|AutoencoderKLWan|UMT5\w*|CLIPVision\w*|CLIPImageProcessor\w*)\b")
# ... and the HunyuanVideo families' (transformers, VAEs, pipelines; Llama and CLIP text encoders; 1.5's Qwen 2.5-VL,
# ByT5 on T5EncoderModel and SigLIP).
HUNYUAN_CLASSES = re.compile(r"\b(HunyuanVideo[A-Z0-9]\w*|AutoencoderKLHunyuan\w*|Llama\w*|CLIPText\w*|Qwen2_5_VL\w*"
                             r"|T5EncoderModel|Siglip\w*)\b")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO_ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


@pytest.mark.parametrize("classes", [WAN_CLASSES, HUNYUAN_CLASSES], ids=["wan", "hunyuan_video"])
def test_no_family_class_named_outside_families(classes):
    offenders = [f"{path.relative_to(REPO_ROOT)}:{n}: {line.strip()}"
                 for path in _modules().values() if "families" not in path.relative_to(PACKAGE).parts
                 for n, line in enumerate(path.read_text().splitlines(), 1) if classes.search(line)]
    assert offenders == []


def test_the_class_name_check_sees_a_named_class():
    # the check above cannot pass by looking at nothing
    assert WAN_CLASSES.search("from diffusers import WanTransformer3DModel")
    assert WAN_CLASSES.search("encoder = UMT5EncoderModel(config)")
    assert not WAN_CLASSES.search("Wan2.2 TI2V-5B's 48-channel VAE")
    assert any(WAN_CLASSES.search(p.read_text()) for p in (PACKAGE / "families" / "wan").glob("*.py"))
    assert HUNYUAN_CLASSES.search("from diffusers import HunyuanVideoTransformer3DModel")
    assert not HUNYUAN_CLASSES.search("joint text-video attention (HunyuanVideo)")
    assert any(HUNYUAN_CLASSES.search(p.read_text()) for p in (PACKAGE / "families" / "hunyuan_video").glob("*.py"))
    assert HUNYUAN_CLASSES.search("from transformers import Qwen2_5_VLTextModel")


def import_graph() -> dict[str, set[str]]:
    """module -> package modules it imports by an import statement anywhere in it (functions included)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import name`: the submodule pkg.name when there is one, else pkg itself
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_in_the_package():
    assert find_cycle(import_graph()) is None


def test_the_cycle_finder_finds_a_cycle():
    graph = import_graph()
    assert "freeloc_dist.install" in graph["freeloc_dist.parallel.engine"]  # the graph sees real imports
    graph["freeloc_dist.install"] = graph["freeloc_dist.install"] | {"freeloc_dist.parallel.engine"}
    cycle = find_cycle(graph)
    assert cycle and cycle[0] == cycle[-1] and "freeloc_dist.parallel.engine" in cycle


# ---- a second family, registered by this test alone ----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_components():
    from freeloc_dist.families.wan.tiny import build_tiny_components

    return build_tiny_components(seed=0)


@pytest.fixture(scope="module")
def tiny_render_cfg():
    """configs/tiny-random.yaml at 9 latent frames (T = 5: FreeLOC on), 2 steps, 32x32."""
    from freeloc_dist.config import load_render_config

    return load_render_config(REPO_ROOT / "configs" / "tiny-random.yaml",
                              {"video.frames": 33, "video.height": 32, "video.width": 32, "sampling.steps": 2})


@pytest.fixture
def skeleton():
    """tests/skeleton_family.py registered for one test (importing it registers it once per process)."""
    from freeloc_dist import families

    before = families.registered()
    import skeleton_family

    families.register(skeleton_family.FAMILY)
    skeleton_family.FAMILY.calls.clear()
    yield skeleton_family.FAMILY, skeleton_family.SkeletonTransformer
    # As it was: the skeleton stays registered only if it was before (test_matrix_dist.py imports the module in
    # this process, which registers it, and may run earlier on the same xdist worker).
    families._REGISTRY[:] = before


def test_a_family_named_in_the_environment_is_registered(tmp_path, monkeypatch):
    from freeloc_dist import families
    from freeloc_dist.errors import UserError

    (tmp_path / "plugin_family_for_test.py").write_text(
        "from freeloc_dist import families\n"
        "from freeloc_dist.families.base import Family\n"
        "class PluginFamily(Family):\n"
        "    name = 'plugin'\n"
        "families.register(PluginFamily())\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(families, "_REGISTRY", list(families.registered()))
    monkeypatch.setattr(families, "_loaded", False)
    monkeypatch.setenv(families.PLUGINS_ENV, " plugin_family_for_test , ")
    names = [f.name for f in families.registered()]
    assert names[0] == "plugin" and {"wan", "hunyuan_video"} <= set(names[1:])

    monkeypatch.setattr(families, "_loaded", False)
    monkeypatch.setenv(families.PLUGINS_ENV, "no_such_family_module")
    with pytest.raises(UserError, match="FREELOC_FAMILIES: cannot import family module 'no_such_family_module'"):
        families.registered()


def test_skeleton_family_plans_and_renders_like_the_family_it_reuses(skeleton, tiny_components, tiny_render_cfg):
    import torch

    from freeloc_dist import apply_freeloc
    from freeloc_dist.families import family_of
    from freeloc_dist.planner import plan_render
    from freeloc_dist.sampling import render

    family, cls = skeleton
    wan = tiny_components
    transformer = cls.from_config(wan.transformer.config)
    transformer.load_state_dict(wan.transformer.state_dict())
    parts = dataclasses.replace(wan, transformer=transformer.eval())
    assert family_of(parts.transformer) is family and family_of(wan.transformer) is not family

    config = {**dict(parts.transformer.config), "_class_name": "SkeletonTransformer"}
    plan = plan_render(tiny_render_cfg, config, world_size=1)
    assert family.calls["transformer_params"] >= 1 and plan.tokens > 0

    profile = tiny_render_cfg.profile
    handles = [apply_freeloc(t, profile) for t in (wan.transformer, parts.transformer)]
    try:
        ours = render(parts, tiny_render_cfg, decode=False).latents
        reference = render(wan, tiny_render_cfg, decode=False).latents
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(ours, reference)
    assert {"temporal_rope", "project_qkv", "encode_prompt", "render_inputs"} <= set(family.calls)
