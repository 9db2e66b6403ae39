"""A second model family that exists only in the test suite, standing in for the next family (DESIGN 11).

Its classes are its own (a transformer class, a pipeline name and a model directory no other family claims);
its layers are Wan's, so every result must equal the Wan render of the same weights bit for bit. Importing this
module registers it; torchrun workers import it through FREELOC_FAMILIES=skeleton_family (freeloc_dist.families),
so the CLI, the planner and the parallel engine serve it without a line changed outside families/ and tests/.
`calls` counts the adapter methods the run went through (a family that is never asked proves nothing).
"""

from __future__ import annotations

import json
from pathlib import Path

from diffusers import WanTransformer3DModel

from freeloc_dist import families
from freeloc_dist.families.wan.adapter import WanFamily

PIPELINE = "SkeletonPipeline"


class SkeletonTransformer(WanTransformer3DModel):
    pass


class SkeletonFamily(WanFamily):
    name = "skeleton"
    transformer_classes = ("SkeletonTransformer",)
    pipelines = (PIPELINE,)

    def __init__(self):
        self.calls: dict[str, int] = {}

    def _count(self, what):
        self.calls[what] = self.calls.get(what, 0) + 1

    def owns(self, transformer):
        return isinstance(transformer, SkeletonTransformer)

    def load_components(self, model_dir, dtype, device, placement=None):
        self._count("load_components")
        parts = super().load_components(model_dir, dtype, device, placement)
        for name in ("transformer", "transformer_2"):
            wan = getattr(parts, name)
            if wan is not None:
                ours = SkeletonTransformer.from_config(wan.config).to(device=wan.device, dtype=wan.dtype)
                ours.load_state_dict(wan.state_dict())
                setattr(parts, name, ours.eval())
        return parts

    def project_qkv(self, attn, hidden_states):
        self._count("project_qkv")
        return super().project_qkv(attn, hidden_states)

    def temporal_rope(self, transformer):
        self._count("temporal_rope")
        return super().temporal_rope(transformer)

    def encode_prompt(self, components, prompt, max_tokens):
        self._count("encode_prompt")
        return super().encode_prompt(components, prompt, max_tokens)

    def render_inputs(self, *args):
        self._count("render_inputs")
        return super().render_inputs(*args)

    def transformer_params(self, config):
        self._count("transformer_params")
        return super().transformer_params(config)


FAMILY = families.register(SkeletonFamily())


def as_skeleton_dir(wan_dir: Path) -> Path:
    """Turn a saved Wan model directory into the skeleton family's (in place): the pipeline and transformer
    class names are the skeleton's, so only this family recognises it."""
    wan_dir = Path(wan_dir)
    index_path = wan_dir / "model_index.json"
    index = json.loads(index_path.read_text())
    index["_class_name"] = PIPELINE
    index_path.write_text(json.dumps(index, indent=2))
    for sub in ("transformer", "transformer_2"):
        config_path = wan_dir / sub / "config.json"
        if config_path.is_file():
            config = json.loads(config_path.read_text())
            config["_class_name"] = SkeletonTransformer.__name__
            config_path.write_text(json.dumps(config, indent=2))
    return wan_dir
