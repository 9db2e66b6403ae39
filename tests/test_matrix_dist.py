"""The family matrix: every tiny model of every family at F > T under torchrun (gloo) writes the latents of one
process, on 2 and 3 sequence-parallel ranks and cfg 2 x sp 2.

Tolerance 1e-5 relative, as tests/test_parallel.py: the parallel paths change only the order of float32 reductions.
One torchrun world per world shape serves every case of that shape (tests/matrix_worker.py: renders in one
process group, start-up paid once); each case is its own test and reports its own ranks' logs, and a case that
fails ends its world without hiding the cases after it (a new world runs them). The one-process references
render in this process. A family adds a row to MODELS (a tiny model and a config), not a test module: the
skeleton family (tests/skeleton_family.py), registered in the workers through FREELOC_FAMILIES, is such a row.

What each row covers: image-to-video's conditioning (mask + VAE latents of the whole video) is sliced per rank
like the latents and the CLIP tokens reach every rank and both CFG groups; FLF2V's last-frame sink is fetched
across ranks; the two-expert models switch experts (4 steps cross the boundary) under every world shape;
TI2V runs per-token timesteps, 48 channels and the 16x VAE's decode over the ranks; the memory row renders the
two-expert model with `text_encoder: rank0` (the other ranks never load the encoder) and `shard_weights: true`
(FSDP2 blocks over the sp group) against the one-process render with whole weights;
the storyboard row gives each rank only its own frames' texts (a blend, a hard cut, a per-segment negative
prompt) under every world shape;
HunyuanVideo runs joint text-video attention (text replicated per rank, text queries merged across ranks)
in every layer kind; HunyuanVideo 1.5 too, with real CFG on two rank groups and its image-to-video channels;
the HunyuanVideo speed row runs an unfused LoRA, UniPC and a first block cache that skips calls, with true CFG.
"""

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from _tiny import rel_err

from freeloc_dist.config import REPO_ROOT

pytestmark = pytest.mark.dist
TOL = 1e-5
LENGTH = ["--frames", "33"]  # 33 frames = 9 latent frames: past every tiny model's T of 5; shards 5/4, 3/3/3
SMALL = [*LENGTH, "--height", "32", "--width", "32"]
SKELETON = "skeleton"  # a config written by the `written_configs` fixture
COMM_LINE = re.compile(r"^\[rank 0\] (communication: bytes received|  rank \d+: )")  # --report-comm (with --quiet)

# model case -> (config, argv after it). The id's first word is the family.
MODELS = {
    "wan-t2v-a14b": ("configs/tiny-random-a14b.yaml", [*LENGTH, "--steps", "4"]),
    "wan-i2v": ("configs/tiny-random-i2v.yaml", SMALL),
    "wan-flf2v": ("configs/tiny-random-flf2v.yaml", SMALL),
    "wan-i2v-a14b": ("configs/tiny-random-i2v-a14b.yaml", SMALL),
    "wan-ti2v": ("configs/tiny-random-ti2v.yaml", [*LENGTH, "--steps", "3"]),
    "skeleton-t2v": (SKELETON, [*SMALL, "--steps", "3"]),
    # the speed levers together (README "Fast sampling"): a LoRA in both experts, DPM++, guidance 1 (no uncond pass)
    "wan-t2v-a14b-fast": ("configs/tiny-random-a14b.yaml", [*LENGTH, "--steps", "4", "--lora", "{lora}:0.8:both",
                                                           "--scheduler", "dpm++", "--guidance-scale", "1"]),
    # memory settings (freeloc_dist.memory): one rank encodes and broadcasts, FSDP2 shards the blocks over the sp group
    "wan-t2v-a14b-memory": ("configs/tiny-random-a14b.yaml", [*LENGTH, "--steps", "4", "--text-encoder", "rank0",
                                                              "--shard-weights", "true", "--report-comm"]),
    # a three-segment storyboard (a blend, a hard cut, a per-segment negative prompt): each rank encodes only
    # its own frames' texts (freeloc_dist.storyboard), cfg 2 x sp 2 splits the per-frame cond and uncond
    "wan-t2v-storyboard": ("configs/tiny-random.yaml",
                           [*SMALL, "--steps", "3", "--storyboard",
                            str(REPO_ROOT / "configs" / "storyboards" / "tiny-three.yaml")]),
    "hunyuan-t2v": ("configs/tiny-random-hunyuan.yaml", [*SMALL, "--steps", "2"]),
    # true classifier-free guidance (HunyuanVideo's is embedded otherwise): the two passes on two rank groups
    "hunyuan-t2v-cfg": ("configs/tiny-random-hunyuan.yaml",
                        [*SMALL, "--steps", "2", "--true-cfg-scale", "1.5", "--negative-prompt", "blurry"]),
    # HunyuanVideo 1.5: classifier-free guidance (guidance 6), glyph text (ByT5 tokens join Qwen's), 54-block layout
    # in miniature; image-to-video slices the conditioning channels and sends SigLIP tokens to every rank
    "hunyuan15-t2v": ("configs/tiny-random-hunyuan15.yaml", [*SMALL, "--steps", "2", "--prompt", 'a sign says "hi"']),
    "hunyuan15-i2v": ("configs/tiny-random-hunyuan15-i2v.yaml", [*SMALL, "--steps", "2"]),
    # the speed levers on HunyuanVideo: an unfused LoRA on every kind of layer, UniPC, and the first block cache
    # (3 of 12 calls skipped) with true CFG: each pass keeps its own cache state, decided for the whole video
    "hunyuan-t2v-fast": ("configs/tiny-random-hunyuan.yaml",
                         [*SMALL, "--steps", "6", "--true-cfg-scale", "1.5", "--negative-prompt", "blurry",
                          "--lora", "{hunyuan_lora}:0.7", "--no-fuse-loras", "--scheduler", "unipc",
                          "--cache", "first_block", "--cache-threshold", "0.9"]),
    # and on HunyuanVideo 1.5 (CFG, glyph text): an unfused LoRA, UniPC (integer timesteps given to the model as
    # floats) and the text K/V cache
    "hunyuan15-t2v-fast": ("configs/tiny-random-hunyuan15.yaml",
                           [*SMALL, "--steps", "4", "--prompt", 'a sign says "hi"', "--lora", "{hunyuan15_lora}:0.7",
                            "--no-fuse-loras", "--scheduler", "unipc", "--cache", "text_kv"]),
}
# memory settings on both HunyuanVideo families: rank 0 broadcasts every field of the text (v1: Llama states, mask,
# CLIP pooled, and the negative prompt's; 1.5: Qwen and ByT5 states and masks, the negative's ByT5 ones empty);
# FSDP2 shards v1's dual- and single-stream blocks (two sizes), 1.5's blocks; 1.5's image-to-video on 3 ranks
MEMORY = ["--text-encoder", "rank0", "--shard-weights", "true", "--report-comm"]
MODELS.update({f"{model}-memory": (MODELS[model][0], [*MODELS[model][1], *MEMORY])
               for model in ("hunyuan-t2v-cfg", "hunyuan15-t2v", "hunyuan15-i2v")})
# diffusers' caches through the CLI (8 steps: each skips work on the tiny model): a flag, or a config with the
# `cache:` section (written by the `written_configs` fixture); the one-process reference renders the same argv.
# First block cache at 0.102: at the 5th call the whole video's ratio is 0.1026 (compute) while the last 4 of 9
# frames alone give 0.1014 (sp 2) and the middle 3 0.0977 (sp 3): ranks deciding alone would part there.
CACHE_SECTIONS = {
    "mag": {"name": "mag", "threshold": 0.5, "mag_ratios": [1.0]},
    "taylorseer": {"name": "taylorseer", "cache_interval": 2, "disable_cache_before_step": 1,
                   "cache_identifiers": [r"blocks\.\d+\.attn\d"], "taylor_factors_dtype": "float32"},
    "pab": {"name": "pyramid_attention_broadcast", "spatial_attention_block_skip_range": 2,
            "spatial_attention_timestep_skip_range": [-1, 1001]},
}
MODELS.update({
    "cache-first-block": ("configs/tiny-random.yaml",
                          [*SMALL, "--cache", "first_block", "--cache-threshold", "0.102"]),
    "cache-sea": ("configs/tiny-random.yaml", [*SMALL, "--cache", "sea", "--cache-threshold", "0.5"]),
    "cache-text-kv": ("configs/tiny-random.yaml", [*SMALL, "--cache", "text_kv"]),
    **{f"cache-{name}": (f"cache:{name}", SMALL) for name in CACHE_SECTIONS},
})
WHOLE_PASS_CACHES = ("cache-first-block", "cache-sea", "cache-mag")  # these skip whole transformer calls
# world shape -> (ranks, argv). No world of 1: it installs no engine, so it would compare a path with itself.
WORLDS = {"sp2": (2, []), "sp3": (3, []), "cfg2xsp2": (4, ["--cfg-degree", "2"])}
MATRIX = [(model, world) for model in ("wan-t2v-a14b", "wan-i2v", "wan-ti2v") for world in WORLDS] + [
    ("wan-flf2v", "sp3"), ("wan-i2v-a14b", "sp3"), ("wan-i2v-a14b", "cfg2xsp2"),
    ("skeleton-t2v", "sp2"), ("skeleton-t2v", "cfg2xsp2"), ("wan-t2v-a14b-fast", "sp2"),
    *[("wan-t2v-a14b-memory", world) for world in WORLDS],
    *[("wan-t2v-storyboard", world) for world in WORLDS],
    ("hunyuan-t2v", "sp2"), ("hunyuan-t2v", "sp3"), ("hunyuan-t2v-cfg", "cfg2xsp2"), ("hunyuan-t2v-fast", "sp2"),
    ("hunyuan15-t2v-fast", "sp2"),
    *[("hunyuan15-t2v", world) for world in WORLDS], ("hunyuan15-i2v", "sp3"),
    *[(f"{model}-memory", world) for model in ("hunyuan-t2v-cfg", "hunyuan15-t2v") for world in WORLDS],
    ("hunyuan15-i2v-memory", "sp3"),
    # every cache on 2 and 3 ranks (the first block cache also cfg 2 x sp 2); 1 rank is the reference
    *[("cache-first-block", world) for world in WORLDS],
    *[(f"cache-{name}", world) for name in ("sea", "mag", "taylorseer", "pab", "text-kv") for world in ("sp2", "sp3")],
]
assert len(set(MATRIX)) == len(MATRIX), "a case listed twice"
# The one-process reference of a model case: its own render, except the skeleton's, which is Wan's render of the
# same weights (tests/test_families.py shows the two equal bit for bit in one process).
REFERENCE_OF = {"skeleton-t2v": "wan-t2v", **{model: model.removesuffix("-memory")  # memory: whole weights, alone
                                               for model in MODELS if model.endswith("-memory")}}
MODELS["wan-t2v"] = ("configs/tiny-random.yaml", MODELS["skeleton-t2v"][1])
MODELS["wan-t2v-plain"] = ("configs/tiny-random.yaml", SMALL)  # the cache rows without their cache


def case_argv(config: str, argv: list[str], folder: Path, name: str) -> list[str]:
    argv = [a.replace("{lora}", str(LORA)).replace("{hunyuan_lora}", str(HUNYUAN_LORA))
            .replace("{hunyuan15_lora}", str(HUNYUAN15_LORA)) for a in argv]
    return ["--config", config, *argv, "--quiet", "--out", str(folder / f"{name}.mp4"),
            "--save-latents", str(folder / f"{name}.safetensors")]


# the `{lora}` / `{hunyuan_lora}` / `{hunyuan15_lora}` of an argv: tiny random LoRA files (tests/_loras.py),
# written by the `lora` fixture
LORA = HUNYUAN_LORA = HUNYUAN15_LORA = None


@pytest.fixture(scope="module", autouse=True)
def lora(tmp_path_factory):
    global LORA, HUNYUAN_LORA, HUNYUAN15_LORA
    from _loras import make_hunyuan15_lora, make_hunyuan_loras, make_loras

    folder = tmp_path_factory.mktemp("lora")
    LORA, HUNYUAN_LORA = make_loras(folder)[0], make_hunyuan_loras(folder / "hunyuan")[0]
    HUNYUAN15_LORA = make_hunyuan15_lora(folder / "hunyuan15")
    yield LORA
    LORA = HUNYUAN_LORA = HUNYUAN15_LORA = None


@pytest.fixture(scope="module")
def written_configs(tmp_path_factory) -> dict[str, str]:
    """The configs written here: tiny-random.yaml on a copy of its tiny Wan turned into the skeleton family's model
    directory (SKELETON), and tiny-random.yaml with each of CACHE_SECTIONS ("cache:<name>")."""
    from skeleton_family import as_skeleton_dir

    folder = tmp_path_factory.mktemp("skeleton")
    tiny = yaml.safe_load((REPO_ROOT / "configs" / "tiny-random.yaml").read_text())
    model = as_skeleton_dir(shutil.copytree(REPO_ROOT / tiny["model"]["path"], folder / "tiny-skeleton"))
    written = {SKELETON: {**tiny, "model": {**tiny["model"], "path": str(model)}},
               **{f"cache:{name}": {**tiny, "cache": section} for name, section in CACHE_SECTIONS.items()}}
    paths = {}
    for key, config in written.items():
        paths[key] = folder / f"{key.replace(':', '-')}.yaml"
        paths[key].write_text(yaml.safe_dump(config))
    return {key: str(path) for key, path in paths.items()}


def config_of(model: str, written: dict[str, str]) -> str:
    config = MODELS[model][0]
    return written.get(config, config)


@pytest.fixture(scope="module")
def reference(generate, written_configs, tmp_path_factory):
    """model case -> the latents of one plain process (rendered here, once)."""
    from safetensors.torch import load_file

    folder = tmp_path_factory.mktemp("reference")
    cache = {}

    def get(model: str):
        model = REFERENCE_OF.get(model, model)
        if model not in cache:
            argv = case_argv(config_of(model, written_configs), MODELS[model][1], folder, model)
            assert generate.main(argv) == 0, model
            cache[model] = load_file(folder / f"{model}.safetensors")["latents"]
        return cache[model]
    get.folder = folder  # the references' sidecars
    return get


def run_world(folder: Path, ranks: int, cases: list[dict]) -> dict[str, dict]:
    """Run `cases` in torchrun worlds of `ranks` until each has a result: case id -> {codes, family_calls, logs}."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "FREELOC_FAMILIES": "skeleton_family"}
    results, pending, attempt = {}, list(cases), 0
    while pending:
        attempt += 1
        spec = folder / f"cases{attempt}.json"
        spec.write_text(json.dumps(pending))
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               f"--nproc_per_node={ranks}", str(REPO_ROOT / "tests" / "matrix_worker.py"),
                               "--cases", str(spec), "--out", str(folder)],
                              capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=1500)
        ran = []
        for case in pending:
            logs = {r: (folder / f"{case['id']}.rank{r}.log").read_text()
                    for r in range(ranks) if (folder / f"{case['id']}.rank{r}.log").exists()}
            done = folder / f"{case['id']}.case.json"
            if done.exists():
                results[case["id"]] = {**json.loads(done.read_text()), "logs": logs}
                ran.append(case)
            elif logs or not ran:  # the case the world ended in (or a world that never started): failed
                results[case["id"]] = {"codes": None, "logs": logs, "world": proc.stderr[-3000:]}
                ran.append(case)
                break
            else:
                break
        pending = [c for c in pending if c not in ran]
    return results


@pytest.fixture(scope="module")
def worlds(written_configs, tmp_path_factory):
    """world shape -> its cases' results, each world run once, on first use, for every case of its shape."""
    cache = {}

    def get(world: str):
        if world not in cache:
            folder = tmp_path_factory.mktemp(f"world-{world}")
            ranks, world_argv = WORLDS[world]
            cases = [{"id": model, "argv": case_argv(config_of(model, written_configs),
                                                     [*MODELS[model][1], *world_argv], folder, model)}
                     for model, shape in MATRIX if shape == world]
            cache[world] = (folder, run_world(folder, ranks, cases))
        return cache[world]
    return get


@pytest.mark.parametrize("model, world", MATRIX, ids=[f"{m}-{w}" for m, w in MATRIX])
def test_parallel_render_equals_one_process(worlds, reference, model, world):
    from safetensors.torch import load_file

    folder, results = worlds(world)
    result = results[model]
    report = "\n".join(f"--- rank {r}:\n{text[-2000:]}" for r, text in result["logs"].items())
    assert result["codes"] is not None, f"the world ended during this case\n{report}\n{result.get('world', '')}"
    assert result["codes"] == [0] * WORLDS[world][0], report
    quiet = {r: [line for line in text.splitlines() if not COMM_LINE.match(line)]
             for r, text in result["logs"].items()}
    assert all(lines == [] for lines in quiet.values()), report  # --quiet: no line but --report-comm's
    latents = load_file(folder / f"{model}.safetensors")["latents"]
    assert rel_err(latents, reference(model)) < TOL
    assert (folder / f"{model}.mp4").stat().st_size > 0
    family = model.split("-")[0]
    counted = result["family_calls"].get(SKELETON, {})
    if family == SKELETON:  # the workers' renders went through the skeleton's adapter, not Wan's directly
        assert {"load_components", "encode_prompt", "render_inputs", "project_qkv", "temporal_rope"} <= set(counted)
    else:
        assert counted == {}


MEMORY_CASES = [(model, world) for model, world in MATRIX if model.endswith("-memory")]


@pytest.mark.parametrize("model, world", MEMORY_CASES, ids=[f"{m}-{w}" for m, w in MEMORY_CASES])
def test_sharded_weights_gather_every_block_at_every_pass(worlds, model, world):
    """--report-comm's weight bytes per step: every block of the running transformer (the family's weight_blocks)
    gathered at each transformer pass, each tensor's rows padded to a multiple of sp (parallel.fsdp.gathered_bytes
    over the built transformer; the planner's figure is the same less the padding: tests/test_memory.py)."""
    import diffusers

    from freeloc_dist.families import family_of
    from freeloc_dist.parallel.fsdp import gathered_bytes

    folder, results = worlds(world)
    ranks, argv = WORLDS[world]
    sp = ranks // (2 if "--cfg-degree" in argv else 1)
    path = yaml.safe_load((REPO_ROOT / MODELS[model][0]).read_text())["model"]["path"]
    config = json.loads((REPO_ROOT / path / "transformer" / "config.json").read_text())
    transformer = getattr(diffusers, config["_class_name"]).from_config(config)
    passes = 1 if sp < ranks else 2  # guidance: cond and uncond on each rank, or one each on two CFG groups
    want = sum(gathered_bytes(block, sp) for block in family_of(transformer).weight_blocks(transformer)) * passes
    log = results[model]["logs"][0]
    got = [int(n.replace(",", "")) for n in re.findall(r"rank \d+: .*weights=([\d,]+)", log)]
    assert got == [want] * ranks, log


@functools.lru_cache(maxsize=4)
def text_bytes(model_path: str, prompts: tuple[str, ...], max_tokens: int) -> int:
    """Bytes of the text conditioning of `prompts` as the model's family encodes them in one process: every field of
    its text (a tensor, or a dataclass of tensors), each in its own dtype."""
    import dataclasses

    from freeloc_dist.families import family_of
    from freeloc_dist.models import load_components

    parts = load_components(model_path, "float32", "cpu")
    texts = [family_of(parts.transformer).encode_prompt(parts, p, max_tokens) for p in prompts]
    tensors = [x for t in texts for x in ([getattr(t, f.name) for f in dataclasses.fields(t)]
                                          if dataclasses.is_dataclass(t) else [t])]
    return sum(x.numel() * x.element_size() for x in tensors)


@pytest.mark.parametrize("model, world", MEMORY_CASES, ids=[f"{m}-{w}" for m, w in MEMORY_CASES])
def test_rank0_broadcasts_every_field_of_both_prompts(worlds, model, world):
    """--report-comm's prompt bytes: every rank but 0 receives the whole text conditioning of the prompt and the
    negative prompt (every field of the family's text, masks in their own dtype, empty ByT5 tensors)."""
    folder, results = worlds(world)
    cfg = json.loads((folder / f"{model}.json").read_text())["config"]  # the render's sidecar
    s = cfg["sampling"]
    want = text_bytes(cfg["model"]["path"], (cfg["prompt"], s["negative_prompt"]), s["max_text_tokens"]) / s["steps"]
    log = results[model]["logs"][0]
    got = [int(n.replace(",", "")) for n in re.findall(r"rank \d+: .*prompts=([\d,]+)", log)]
    assert got == [0] + [round(want)] * (WORLDS[world][0] - 1), (log, want)


def test_ti2v_latents_have_its_shape(reference):
    assert reference("wan-ti2v").shape == (1, 48, 9, 4, 4)


def test_each_expert_runs_its_own_profile(generate, reference, tmp_path):
    from safetensors.torch import load_file

    config, argv = MODELS["wan-t2v-a14b"]
    same = case_argv(config, [*argv, "--profile-2", "configs/profiles/tiny-random.yaml"], tmp_path, "same")
    assert generate.main(same) == 0
    assert rel_err(load_file(tmp_path / "same.safetensors")["latents"], reference("wan-t2v-a14b")) > 1e-3


def test_a_failing_case_ends_its_world_and_the_rest_still_run(tmp_path):
    """The matrix's own machinery: a case that fails on every rank reports each rank's error, and the case after
    it runs in a new world."""
    bad = {"id": "bad", "argv": ["--config", "configs/tiny-random.yaml", "--frames", "34"]}
    good = {"id": "good", "argv": ["--config", "configs/tiny-random.yaml", "--validate-only"]}
    results = run_world(tmp_path, 2, [bad, good])
    assert results["bad"]["codes"] == [2, 2]
    assert all("video.frames=34: must be 4k+1" in results["bad"]["logs"][r] for r in (0, 1))
    assert results["good"]["codes"] == [0, 0]
    assert (tmp_path / "cases2.json").exists()  # the good case ran in a second world
