"""`memory:` settings (freeloc_dist.memory, memory_plan, parallel.fsdp): where weights wait never changes a number.

In process, on the tiny two-expert model (configs/tiny-random-a14b.yaml past its T): the text encoder on the host
and the idle expert offloaded give the resident render's latents (tolerance 1e-6 relative: the same kernels on the
same weights, so anything but 0 would mean a wrong weight somewhere; measured 0), also for a second job in the same
session (the experts swap back, the encoder comes back from the host); one process with shard_weights keeps whole
weights. 2 and 3 ranks with
`text_encoder: rank0` and `shard_weights: true` are rows of the family matrix (tests/test_matrix_dist.py). The
planner's figures are checked against sums done here by hand.
"""

import dataclasses
import functools
import json

import pytest
import torch
from _tiny import rel_err

from freeloc_dist.config import REPO_ROOT, load_render_config

pytestmark = pytest.mark.unit
A14B = REPO_ROOT / "configs" / "tiny-random-a14b.yaml"
# 7 latent frames (past T = 5); step 1 on the first expert, steps 2-3 on the second
SHORT = {"video.frames": 25, "sampling.steps": 3, "video.height": 32, "video.width": 32}
GiB = 1024**3


def session_of(overrides, keep=False, log=lambda message: None):
    from freeloc_dist.parallel.dims import init_parallel
    from freeloc_dist.profile import load_profile
    from freeloc_dist.render import Session

    cfg = load_render_config(A14B, {**SHORT, **overrides})
    session = Session(cfg, load_profile(cfg.profile), init_parallel(), log,
                      profile_2=load_profile(cfg.profile_2), keep_text_encoder=keep)
    return cfg, session


def latents_of(cfg, session):
    from freeloc_dist.sampling import render

    return render(session.parts, cfg, decode=False, predict=session.predict, predict_2=session.predict_2,
                  encode_prompts=session.memory.encoder).latents


@pytest.fixture(scope="module")
def resident():
    cfg, session = session_of({"memory.experts": "resident"})
    return latents_of(cfg, session)


def test_cpu_text_encoder_and_offloaded_expert_equal_the_resident_render(resident, monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    cfg, session = session_of({"memory.text_encoder": "cpu", "memory.experts": "offload"}, keep=True)
    first, second = session.parts.transformer, session.parts.transformer_2
    host = [p.data_ptr() for p in second.parameters()]  # the idle expert's host tensors
    assert rel_err(latents_of(cfg, session), resident) < 1e-6
    swap = session.memory.swap
    assert swap.swaps == 1 and swap.active == 1
    assert [p.data_ptr() for p in first.parameters()] == host  # the first expert now waits in those tensors
    encoder = session.parts.text_encoder
    assert encoder is not None and encoder.device.type == "cpu"  # a queue keeps it on the host
    # the next job starts on the first expert again: the swap back must bring its own weights
    assert rel_err(latents_of(cfg, session), resident) < 1e-6
    assert swap.swaps == 3 and [p.data_ptr() for p in first.parameters()] == host


def test_one_process_keeps_whole_weights_and_rank0_encodes_alone(resident):
    """shard_weights on one process: nothing to shard across (a warning; the experts then stay resident); rank0 with
    no other rank encodes here. FSDP2 itself is not run on a one-rank group: torch 2.13's one-rank path fails under
    inference mode (_fsdp_param_group.py: "Inference tensors do not track version counter"). 2 and 3 ranks: the
    matrix."""
    lines = []
    cfg, session = session_of({"memory.shard_weights": True, "memory.text_encoder": "rank0"}, log=lines.append)
    assert session.memory.swap is None and session.memory.sharded == []
    assert lines.count("warning: memory.shard_weights=true has no effect with one sequence-parallel rank "
                       "(whole weights)") == 1
    assert rel_err(latents_of(cfg, session), resident) < 1e-6
    assert session.parts.text_encoder is None  # one job: freed after encoding


def test_resume_fingerprint_ignores_memory_settings():
    from freeloc_dist.checkpoint import fingerprint_settings

    base = load_render_config(A14B)
    moved = load_render_config(A14B, {"memory.text_encoder": "rank0", "memory.shard_weights": True})
    assert fingerprint_settings(base, None) == fingerprint_settings(moved, None)


@pytest.mark.parametrize("flags, start", [
    (["--experts", "offload", "--shard-weights", "true"],
     "error: memory.experts=offload with memory.shard_weights=true: not supported"),
    # the default the user never set is named as such, with the setting that lifts the refusal
    (["--compile", "blocks"], "error: memory.experts=offload (the default for two experts) with model.compile=blocks: "
                              "not supported together"),
], ids=["offload-sharded", "default-offload-compiled"])
def test_unsupported_combination_is_refused_before_weights_load(generate, monkeypatch, capsys, tmp_path, flags,
                                                                start):
    import freeloc_dist.models

    def never(*args, **kwargs):
        raise AssertionError("weights loaded")

    monkeypatch.setattr(freeloc_dist.models, "load_components", never)
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    code = generate.main(["--config", str(A14B), *flags, "--out", str(tmp_path / "x.mp4")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(start), err
    if "compile" in start:
        assert err[0].endswith("set memory.experts: resident, or model.compile: none"), err
    assert list(tmp_path.iterdir()) == []


# ---- the planner ---------------------------------------------------------------------------------------------------

def a14b_720p(**memory):
    from freeloc_dist.planner import KNOWN_TRANSFORMERS, plan_render
    from freeloc_dist.profile import load_profile

    cfg = load_render_config(REPO_ROOT / "configs" / "wan2.2-t2v-a14b.yaml",
                             {"video.height": 720, "video.width": 1280, "video.frames": 961,
                              **{f"memory.{k}": v for k, v in memory.items()}})
    profile = load_profile(cfg.profile)
    return lambda world, gb=80.0: plan_render(cfg, KNOWN_TRANSFORMERS["Wan-AI/Wan2.2-T2V-A14B-Diffusers"], profile,
                                              world_size=world, device_memory_gb=gb)


def test_a14b_720p_minute_fits_with_headroom_by_default():
    """Issue 27's case: 961 frames at 1280x720 on 8 ranks, resident 79.87 GiB; by default <= 68 GiB (15% off 80)."""
    from freeloc_dist.planner import transformer_params

    resident = a14b_720p(experts="resident")(8)
    default = a14b_720p()(8)
    m = resident.memory_bytes
    expert = transformer_params(default_config()) * 2  # bf16
    assert m["weights: transformer"] == m["weights: transformer_2"] == expert
    assert round(resident.memory_total / GiB, 2) == 69.29  # 79.87 before the text encoder was freed after encoding
    assert round(resident.encoding_bytes / GiB, 2) == 10.58
    by_hand = expert + sum(m[k] for k in ("activations", "K/V buffers", "latents", "frame tables (host)"))
    assert default.memory_total == by_hand and round(by_hand / GiB, 2) == 42.67 <= 68
    assert "weights: transformer_2" not in default.memory_bytes
    assert default.host_bytes == {"idle expert (transformer_2)": expert}
    assert default.bytes_per_job == {"expert swap (host <-> device)": 2 * expert}
    assert not default.settings_chosen and a14b_720p()(8, 48).memory_total == default.memory_total


def default_config():
    from freeloc_dist.planner import KNOWN_TRANSFORMERS

    return KNOWN_TRANSFORMERS["Wan-AI/Wan2.2-T2V-A14B-Diffusers"]


def test_planner_chooses_sharded_weights_when_nothing_else_fits_and_refuses_in_one_line():
    from freeloc_dist.families.wan.counts import block_params
    from freeloc_dist.planner import RenderPlanError, transformer_params

    t = default_config()
    p, b, layers = transformer_params(t), block_params(t), t["num_layers"]
    plan = a14b_720p()(16, 24)  # 16 ranks, 24 GB cards
    assert plan.settings_chosen and plan.memory_settings.shard_weights and plan.memory_settings.experts == "resident"
    sharded = (p - layers * b + layers * b / 16) * 2
    assert plan.memory_bytes["weights: transformer"] == plan.memory_bytes["weights: transformer_2"] == sharded
    assert plan.memory_bytes["weights: gathered block"] == b * 2
    assert plan.bytes_per_step["weights"] == 15 / 16 * layers * b * 2 * 2  # two passes (cfg) per step
    with pytest.raises(RenderPlanError, match=r"^does not fit: 24\.1 GiB per rank needed, 24 GiB available even "
                                              r"with memory: text_encoder=gpu, experts=resident, shard_weights=true"):
        a14b_720p()(8, 24)


def test_block_count_and_gathered_bytes_match_the_built_model():
    """family.block_params against the built tiny expert; the planner's all-gather bytes against the shard layout
    FSDP2 uses (rows padded to a multiple of sp: the run counts a little more, never less)."""
    from diffusers import WanTransformer3DModel

    from freeloc_dist.families.wan.counts import block_params
    from freeloc_dist.memory_plan import MemorySettings, plan_weights
    from freeloc_dist.parallel.fsdp import gathered_bytes

    folder = REPO_ROOT / "assets" / "tiny-a14b" / "transformer"
    t = json.loads((folder / "config.json").read_text())
    model = WanTransformer3DModel.from_config(t)
    assert block_params(t) == sum(p.numel() for p in model.blocks[0].parameters())
    for sp in (2, 3):
        planned = plan_weights(MemorySettings("gpu", "resident", True), transformer_params=1e6,
                               block_params=[block_params(t)] * t["num_layers"], experts=1,
                               text_encoder_params=0, dtype_bytes=4, sp=sp, passes=1, prompts=1, prompt_bytes=1,
                               world=sp).per_step["weights"]
        counted = sum(gathered_bytes(block, sp) for block in model.blocks)
        pad = sum((sp - 1) * (p[0].numel() if p.ndim else 1) * 4 for b in model.blocks for p in b.parameters())
        assert planned <= counted <= planned + pad, (sp, planned, counted)


def test_placement_per_setting():
    import types

    from freeloc_dist.memory import placement

    cpu, dev = torch.device("cpu"), torch.device("meta")  # "meta" stands for the render device
    cfg = load_render_config(A14B)

    def place(rank=0, sp=2, **memory):
        c = dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory, **memory))
        return placement(c, types.SimpleNamespace(rank=rank, sp_degree=sp, device=dev), two_experts=True)

    default = place()
    assert default == place(rank=1)
    assert (default.transformer, default.idle_expert, default.text_encoder) == (dev, cpu, dev)
    assert place(experts="resident").idle_expert == dev and place(text_encoder="cpu").text_encoder == cpu
    assert place(text_encoder="rank0").text_encoder == dev and place(rank=1, text_encoder="rank0").text_encoder is None
    assert (place(shard_weights=True).transformer, place(shard_weights=True).idle_expert) == (cpu, cpu)
    assert place(shard_weights=True, sp=1).transformer == dev  # nothing to shard across: whole weights


def test_a_rank_placed_without_the_text_encoder_never_loads_it(monkeypatch):
    from transformers import UMT5EncoderModel

    from freeloc_dist.memory import Placement
    from freeloc_dist.models import load_components

    def refuse(*args, **kwargs):
        raise AssertionError("the text encoder was loaded")

    monkeypatch.setattr(UMT5EncoderModel, "from_pretrained", refuse)
    cpu = torch.device("cpu")
    parts = load_components(REPO_ROOT / "assets" / "tiny-a14b", "float32", cpu, Placement(cpu, cpu, None))
    assert parts.text_encoder is None and parts.tokenizer is not None and parts.transformer_2 is not None



# ---- HunyuanVideo and HunyuanVideo 1.5 -------------------------------------------------------------------------------
HUNYUAN = {"hunyuan_video": "tiny-hunyuan", "hunyuan_video15": "tiny-hunyuan15"}


def dual_block(d: int, mlp: int, head_dim: int) -> int:
    """Parameters of a dual-stream block, by hand: two AdaLayerNormZero (d -> 6d), q k v o and the text's own
    q k v o, four RMS norms over head_dim, two MLPs (d -> mlp -> d); the plain LayerNorms have no weights."""
    return 2 * (6 * d * d + 6 * d) + 8 * (d * d + d) + 4 * head_dim + 2 * (d * mlp + mlp + mlp * d + d)


def single_block(d: int, mlp: int, head_dim: int) -> int:
    """A single-stream block: AdaLayerNormZeroSingle (d -> 3d), q k v, two RMS norms, the MLP's input projection and
    the fused output projection (d + mlp -> d)."""
    return 3 * d * d + 3 * d + 3 * (d * d + d) + 2 * head_dim + d * mlp + mlp + (d + mlp) * d + d


def hunyuan_blocks_by_hand(t) -> list[int]:
    d, head_dim = t["num_attention_heads"] * t["attention_head_dim"], t["attention_head_dim"]
    mlp = int(d * t["mlp_ratio"])
    single = [single_block(d, mlp, head_dim)] * t.get("num_single_layers", 0)  # 1.5 has none
    return [dual_block(d, mlp, head_dim)] * t["num_layers"] + single


def family_named(name):
    from freeloc_dist.families import registered

    return next(f for f in registered() if f.name == name)


@functools.lru_cache(maxsize=2)
def tiny_parts(name):
    from freeloc_dist.models import load_components

    return load_components(REPO_ROOT / "assets" / HUNYUAN[name], "float32", "cpu")


def published(name):
    from freeloc_dist.families.hunyuan_video import counts as v1
    from freeloc_dist.families.hunyuan_video15 import counts as v15

    return {"hunyuan_video": v1.KNOWN_TRANSFORMERS[v1.MODEL_ID],
            "hunyuan_video15": v15.KNOWN_TRANSFORMERS[v15.T2V_ID]}[name]


@pytest.mark.parametrize("name", list(HUNYUAN))
def test_hunyuan_block_params_are_each_blocks_own(name):
    """weight_block_params: each block's parameters in weight_blocks' order, against sums by hand of the published
    config (meta device; v1: 20 dual-stream blocks of 339.8 M, then 40 single-stream ones of 141.6 M) and of the
    tiny model (also against its built blocks)."""
    family = family_named(name)
    t = published(name)
    assert family.weight_block_params(family.planner_config(t)) == hunyuan_blocks_by_hand(t)
    assert set(hunyuan_blocks_by_hand(t)) == ({339_831_296, 141_591_808} if name == "hunyuan_video" else {151_056_896})
    transformer = tiny_parts(name).transformer
    config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
    built = [sum(p.numel() for p in block.parameters()) for block in family.weight_blocks(transformer)]
    assert family.weight_block_params(config) == hunyuan_blocks_by_hand(config) == built


@pytest.mark.parametrize("name", list(HUNYUAN))
def test_hunyuan_planner_shards_every_block_and_holds_the_largest(name):
    """The planner on 8 ranks with shard_weights: the transformer less 7/8 of its blocks, the largest block gathered
    (v1: a dual-stream block, not the mean), every block all-gathered per pass (guidance: 2 passes per step)."""
    from freeloc_dist.planner import plan_render
    from freeloc_dist.profile import load_profile

    config, guidance = {"hunyuan_video": ("hunyuanvideo-t2v.yaml", {"sampling.true_cfg_scale": 2.0}),
                        "hunyuan_video15": ("hunyuanvideo1.5-t2v-480p.yaml", {})}[name]  # 1.5: CFG by default
    cfg = load_render_config(REPO_ROOT / "configs" / config, {"memory.shard_weights": True, **guidance})
    t = family_named(name).planner_config(published(name))
    plan = plan_render(cfg, t, load_profile(cfg.profile), world_size=8)
    blocks, whole = hunyuan_blocks_by_hand(published(name)), family_named(name).transformer_params(t)
    m = plan.memory_bytes
    assert m["weights: transformer"] == (whole - sum(blocks) + sum(blocks) / 8) * 2  # bf16
    assert m["weights: gathered block"] == max(blocks) * 2
    assert plan.bytes_per_step["weights"] == 7 / 8 * sum(blocks) * 2 * 2


@pytest.mark.parametrize("name", list(HUNYUAN))
def test_hunyuan_planned_all_gather_bytes_are_fsdp_layout_less_padding(name):
    """The planner's weights bytes per pass on the tiny models against FSDP2's layout of their blocks (what the run
    counts): equal on 2 ranks (no tensor needs padding), within the padding on 3."""
    from freeloc_dist.memory_plan import MemorySettings, plan_weights
    from freeloc_dist.parallel.fsdp import gathered_bytes

    transformer, family = tiny_parts(name).transformer, family_named(name)
    blocks = family.weight_blocks(transformer)
    config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
    for sp in (2, 3):
        planned = plan_weights(MemorySettings("gpu", "resident", True), transformer_params=1e6,
                               block_params=family.weight_block_params(config), experts=1, text_encoder_params=0,
                               dtype_bytes=4, sp=sp, passes=1, prompts=1, prompt_bytes=1,
                               world=sp).per_step["weights"]
        counted = sum(gathered_bytes(block, sp) for block in blocks)
        pad = sum((sp - 1) * (p[0].numel() if p.ndim else 1) * 4 for b in blocks for p in b.parameters())
        assert planned <= counted <= planned + pad, (sp, planned, counted)
        assert sp == 3 or counted == planned


@pytest.mark.parametrize("name", list(HUNYUAN))
def test_hunyuan_rank_without_the_text_encoders_loads_neither(name, monkeypatch):
    """Placed without a text encoder (memory.text_encoder: rank0 on a rank other than 0), the loader builds neither of
    the family's two (v1: Llama and CLIP; 1.5: Qwen and ByT5) and keeps both tokenizers."""
    from transformers import CLIPTextModel, LlamaModel, Qwen2_5_VLTextModel, T5EncoderModel

    from freeloc_dist.memory import Placement
    from freeloc_dist.models import load_components

    def refuse(*args, **kwargs):
        raise AssertionError("a text encoder was loaded")

    for encoder in (CLIPTextModel, LlamaModel, Qwen2_5_VLTextModel, T5EncoderModel):
        monkeypatch.setattr(encoder, "from_pretrained", refuse)
    cpu = torch.device("cpu")
    parts = load_components(REPO_ROOT / "assets" / HUNYUAN[name], "float32", cpu, Placement(cpu, cpu, None))
    assert parts.text_encoder is None and parts.text_encoder_2 is None
    assert parts.tokenizer is not None and parts.tokenizer_2 is not None


def test_hunyuan_one_process_with_rank0_and_sharding_equals_whole_weights(generate, monkeypatch, capsys, tmp_path):
    """One process of HunyuanVideo with true CFG (two prompts): rank0 encodes here (nothing to broadcast),
    shard_weights keeps whole weights (the warning); the latents equal the default render's within 1e-6 (the same
    kernels on the same weights: measured 0). More ranks: the matrix (tests/test_matrix_dist.py), both families."""
    from safetensors.torch import load_file

    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    latents = {}
    for run, flags in (("whole", []), ("memory", ["--text-encoder", "rank0", "--shard-weights", "true"])):
        argv = ["--config", str(REPO_ROOT / "configs" / "tiny-random-hunyuan.yaml"), "--true-cfg-scale", "1.5",
                "--negative-prompt", "blurry", "--frames", "9", "--steps", "2", "--height", "32", "--width", "32",
                "--out", str(tmp_path / f"{run}.mp4"), "--save-latents", str(tmp_path / f"{run}.safetensors"), *flags]
        assert generate.main(argv) == 0
        latents[run] = load_file(tmp_path / f"{run}.safetensors")["latents"]
    assert "warning: memory.shard_weights=true has no effect with one sequence-parallel rank" in capsys.readouterr().err
    assert rel_err(latents["memory"], latents["whole"]) < 1e-6


@pytest.mark.parametrize("name", list(HUNYUAN))
def test_hunyuan_planned_prompt_bytes_are_a_full_prompts_text(name):
    """prompt_bytes (the planner's rank-0 broadcast per prompt) against the text of a prompt that fills every token
    slot (a long prompt; for 1.5 also quoted text past ByT5's 256 tokens), encoded by the tiny model: every field,
    masks in int64, as Comm.broadcast sends them."""
    parts, family = tiny_parts(name), family_named(name)
    config = {k: v for k, v in parts.transformer.config.items() if not k.startswith("_")}
    text = family.encode_prompt(parts, "a red fox " * 40 + '"' + "hello " * 60 + '"', 16)
    sent = sum(getattr(text, f.name).numel() * getattr(text, f.name).element_size() for f in dataclasses.fields(text))
    assert family.prompt_bytes(config, 16, 4) == sent
