"""diffusers' caches: the engine's whole-video decisions (freeloc_dist.parallel.caches) on simulated ranks, and the
render's `cache:` section (freeloc_dist.caches). Two ranks are two threads here, their sum over the sp group a
barrier; tests/test_citizen_dist.py and tests/test_matrix_dist.py run the same caches on real ranks."""

import threading
from types import SimpleNamespace

import pytest
import torch
from _tiny import tiny_transformer

from freeloc_dist.caches import cache_config
from freeloc_dist.config import ConfigError, parse_render_config
from freeloc_dist.parallel.caches import make_global, release

pytestmark = pytest.mark.unit


class ThreadRanks:
    """`comm.sp_sum` of two ranks that are threads: each gets the sum of both ranks' values."""

    def __init__(self, num_ranks=2):
        self.values = [None] * num_ranks
        self.barrier = threading.Barrier(num_ranks)

    def engine(self, rank):
        def sp_sum(values, tag):
            self.values[rank] = values
            self.barrier.wait()
            total = sum(self.values)
            self.barrier.wait()
            return total

        return SimpleNamespace(dims=SimpleNamespace(sp_degree=len(self.values)), comm=SimpleNamespace(sp_sum=sp_sum))


def run_ranks(fns):
    results = [None] * len(fns)

    def run(i):
        results[i] = fns[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results


def first_block_hook(transformer):
    from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK

    hook = transformer.blocks[0]._diffusers_hook.hooks[_FBC_LEADER_BLOCK_HOOK]
    hook.state_manager.set_context(SimpleNamespace(name="cond"))
    return hook


@pytest.mark.parametrize("threshold", [0.1, 0.01])
def test_first_block_cache_decides_as_one_process_on_every_rank(threshold):
    """Rank 0's frames change by 30 % of a small residual, rank 1's by 1 % of a large one: alone they decide apart,
    and the mean of their ratios (0.155) is not the whole video's (1.3 / 101 = 0.0129). Both ranks must give one
    process's decision on the whole residual, at thresholds on either side of it."""
    from diffusers import FirstBlockCacheConfig

    sizes = [(1, 6, 8), (1, 4, 8)]  # uneven shards: 6 and 4 tokens
    previous = [torch.full(sizes[0], 1.0), torch.full(sizes[1], 100.0)]
    current = [previous[0] + 0.3, previous[1] + 1.0]
    one = tiny_transformer(num_layers=3)
    one.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    single = first_block_hook(one)

    def decide(previous, current):
        single.state_manager.get_state().head_block_residual = previous
        return single._should_compute_remaining_blocks(current)

    want = decide(torch.cat(previous, dim=1), torch.cat(current, dim=1))
    alone = [decide(p, c) for p, c in zip(previous, current)]  # each rank on its own frames
    if threshold == 0.1:
        assert alone == [True, False]  # the ranks would decide apart without the engine

    ranks, hooks = ThreadRanks(), []
    for rank in range(2):
        model = tiny_transformer(num_layers=3)
        model.enable_cache(FirstBlockCacheConfig(threshold=threshold))
        make_global(model, ranks.engine(rank))
        hook = first_block_hook(model)
        hook.state_manager.get_state().head_block_residual = previous[rank]
        hooks.append((model, hook))
    got = run_ranks([lambda h=h, c=c: h._should_compute_remaining_blocks(c) for (_, h), c in zip(hooks, current)])
    assert got == [want, want], (got, want)
    release(hooks[0][0])
    assert "_should_compute_remaining_blocks" not in hooks[0][1].__dict__  # the class's own decision again


def test_sea_cache_indicator_reads_the_whole_videos_input():
    """SeaCache filters the input latents with an FFT over frames: under the engine its callback gets the whole
    video's input (every rank holds it), whatever this rank's forward was given."""
    from diffusers import SeaCacheConfig

    model = tiny_transformer()
    model.enable_cache(SeaCacheConfig())
    whole = torch.randn(1, 4, 6, 4, 4)
    engine = SimpleNamespace(dims=SimpleNamespace(sp_degree=2), global_input=lambda: whole)
    make_global(model, engine)
    hook = model._diffusers_hook.hooks["sea_cache_root"]
    local = whole[:, :, :3]
    (got,) = hook.raw_vision_callback(model, (), {"hidden_states": local, "timestep": None,
                                                  "encoder_hidden_states": None})
    assert torch.equal(got, whole[0])
    release(model)
    (got,) = hook.raw_vision_callback(model, (local,), {})
    assert torch.equal(got, local[0])


def test_mag_cache_calibration_averages_over_the_whole_video():
    """MagCache's calibration ratio is the mean over tokens of |current| / |previous| residual norms: both ranks
    record one process's mean (rank 1 holds fewer tokens, so the mean of the ranks' means would differ)."""
    from diffusers import MagCacheConfig
    from diffusers.hooks.mag_cache import MagCacheBlockHook

    g = torch.Generator().manual_seed(0)
    previous = [torch.rand(1, 6, 8, generator=g) + 0.5, torch.rand(1, 2, 8, generator=g) * 5 + 0.5]
    current = [p * torch.rand(1, p.shape[1], 1, generator=g) * 2 for p in previous]

    def state(prev):
        return SimpleNamespace(previous_residual=prev, calibration_ratios=[])

    one = state(torch.cat(previous, dim=1))
    MagCacheBlockHook._perform_calibration_step(None, one, torch.cat(current, dim=1))
    ranks, models, states = ThreadRanks(), [], [state(p) for p in previous]
    for rank in range(2):
        model = tiny_transformer(num_layers=3)
        model.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=2))
        make_global(model, ranks.engine(rank))
        models.append(model.blocks[-1]._diffusers_hook.hooks["mag_cache_block_hook"])
    run_ranks([lambda h=h, s=s, c=c: h._perform_calibration_step(s, c) for h, s, c in zip(models, states, current)])
    for s in states:
        assert s.calibration_ratios == pytest.approx(one.calibration_ratios, rel=1e-6)
    alone = [state(p) for p in previous]
    for s, c in zip(alone, current):
        MagCacheBlockHook._perform_calibration_step(None, s, c)
    assert abs(sum(s.calibration_ratios[0] for s in alone) / 2 - one.calibration_ratios[0]) > 1e-2


def test_a_deciding_cache_the_engine_cannot_adapt_is_refused_naming_it():
    """A first block cache hook without the decision function the engine replaces (another diffusers version)."""
    from diffusers.hooks import HookRegistry, ModelHook

    model = tiny_transformer()
    HookRegistry.check_if_exists_or_initialize(model.blocks[0]).register_hook(ModelHook(), "fbc_leader_block_hook")
    with pytest.raises(RuntimeError, match="^parallelize_pipeline: diffusers' first block cache decides from"):
        make_global(model, ThreadRanks().engine(0))


# ---- the render's cache: section --------------------------------------------------------------------------------

def test_cache_sections_build_diffusers_configs():
    mag = cache_config({"name": "mag", "threshold": 0.3, "mag_ratios": [1, 1.5]}, steps=4)
    assert (type(mag).__name__, mag.threshold, mag.num_inference_steps, len(mag.mag_ratios)) == (
        "MagCacheConfig", 0.3, 4, 4)  # num_inference_steps from sampling.steps, the ratios interpolated to it
    taylor = cache_config({"name": "taylorseer", "taylor_factors_dtype": "float32",
                           "cache_identifiers": [r"blocks\.\d+\.attn1"]}, steps=4)
    assert taylor.taylor_factors_dtype is torch.float32 and taylor.cache_identifiers == [r"blocks\.\d+\.attn1"]
    pab = cache_config({"name": "pyramid_attention_broadcast", "spatial_attention_block_skip_range": 2,
                        "spatial_attention_timestep_skip_range": [0, 1000]}, steps=4)
    assert pab.spatial_attention_timestep_skip_range == (0, 1000)
    assert cache_config(None, steps=4) is None
    with pytest.raises(ConfigError, match=r"^config error: cache.current_timestep_callback: unknown setting"):
        cache_config({"name": "pyramid_attention_broadcast", "current_timestep_callback": 1}, steps=4)


def test_the_cache_is_in_the_resume_fingerprint():
    from freeloc_dist.checkpoint import fingerprint_settings

    raw = {"model": {"path": "assets/tiny-wan"}, "video": {"height": 32, "width": 32, "frames": 9}}
    plain = fingerprint_settings(parse_render_config(raw), None)
    assert "cache" not in plain  # renders without a cache keep their fingerprint
    a = fingerprint_settings(parse_render_config({**raw, "cache": {"name": "first_block", "threshold": 0.1}}), None)
    b = fingerprint_settings(parse_render_config({**raw, "cache": {"name": "first_block", "threshold": 0.2}}), None)
    assert a["cache"] == {"name": "first_block", "threshold": 0.1} and a["cache"] != b["cache"]


def test_the_log_line_says_what_the_skipped_count_sees():
    """A cache that skips whole calls is counted; one that saves work inside calls (TaylorSeer, pyramid attention
    broadcast, text K/V) always shows 0 whole calls skipped, and its line says why (was: "0 of 16" alone)."""
    from freeloc_dist.caches import CACHES, WHOLE_CALL_CACHES, summary_line

    assert set(WHOLE_CALL_CACHES) < set(CACHES)
    for name in CACHES:
        line = summary_line({"name": name, "skipped": 0, "transformer_calls": 16})
        assert line.startswith(f"cache {name}: 0 of 16 transformer calls skipped")
        assert ("inside calls" in line) == (name not in WHOLE_CALL_CACHES), line


def test_timestep_ranges_take_any_finite_bound_counts_do_not():
    """A pyramid attention broadcast range from -1 covers every step (the matrix's PAB row uses [-1, 1001]); a NaN
    bound, a negative skip count and a zero interval are refused in one line."""
    pab = {"name": "pyramid_attention_broadcast", "spatial_attention_block_skip_range": 2}
    got = cache_config({**pab, "spatial_attention_timestep_skip_range": [-1, 1001]}, steps=4)
    assert got.spatial_attention_timestep_skip_range == (-1, 1001)
    for bad, needle in (({**pab, "spatial_attention_timestep_skip_range": [float("nan"), 5]}, r"range\[0\]=nan"),
                        ({**pab, "spatial_attention_block_skip_range": 0}, "must be a finite number >= 1"),
                        ({"name": "first_block", "threshold": -0.1}, "must be a finite number >= 0")):
        with pytest.raises(ConfigError, match=needle):
            cache_config(bad, steps=4)
