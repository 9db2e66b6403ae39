"""One rank of test_citizen_dist.py: a stock diffusers WanPipeline (and HunyuanVideoPipeline) under torchrun (gloo,
CPU).

Saves this rank's results to <out>.rank<r>; the test compares every rank with one process.
"""

import argparse
import faulthandler
import importlib.util
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _hunyuan as hy  # noqa: E402
from _tiny import (  # noqa: E402
    CACHE_FRAMES,
    CACHE_STEPS,
    CACHES,
    TINY_PROFILE,
    count_full_passes,
    enable_cache,
    render,
    tiny_pipeline,
    tiny_transformer,
)

from freeloc_dist import apply_freeloc, enable_freeloc, parallelize_pipeline  # noqa: E402
from freeloc_dist.parallel import destroy_parallel, init_parallel, parallelize  # noqa: E402

FRAMES = 77  # 20 latent frames: 4x the tiny profile's trained 5


class _NoOpHook:
    """A root-level diffusers HookRegistry hook that changes nothing (it wraps transformer.forward, as caches do)."""

    @staticmethod
    def make():
        from diffusers.hooks import HookRegistry, ModelHook

        class NoOp(ModelHook):
            def __init__(self):
                super().__init__()
                self.calls = 0

            def pre_forward(self, module, *args, **kwargs):
                self.calls += 1
                return args, kwargs

        return HookRegistry, NoOp()


def _pab(pipe):
    """diffusers' pyramid attention broadcast: its hooks reuse attention outputs on steps chosen by the step count
    and timestep (the same on every rank); with skip range 2 the second of the 2 steps reuses the first's."""
    from diffusers import PyramidAttentionBroadcastConfig

    pipe.transformer.enable_cache(PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
        current_timestep_callback=lambda: pipe.current_timestep))


def other_hooks(order, cfg):
    """Model CPU offload (accelerate), a root-level diffusers hook and a diffusers cache, installed before or after
    parallelize_pipeline; two pipeline calls each, then the same after the handle's remove()."""
    out = {"plain_short": render(tiny_pipeline(), 17)}
    single = tiny_pipeline()  # this rank alone, with FreeLOC and the cache
    enable_freeloc(single, TINY_PROFILE)
    _pab(single)
    out["pab_single"] = render(single, FRAMES)
    kinds = ("offload", "registry", "pab") if importlib.util.find_spec("accelerate") else ("registry", "pab")
    for kind in kinds:
        pipe = tiny_pipeline()
        enable_freeloc(pipe, TINY_PROFILE)

        def install(kind=kind, pipe=pipe):
            if kind == "offload":
                pipe.enable_model_cpu_offload(device="cpu")
            elif kind == "pab":
                _pab(pipe)
            else:
                registry, hook = _NoOpHook.make()
                registry.check_if_exists_or_initialize(pipe.transformer).register_hook(hook, "noop")
                out[f"{kind}_hook"] = hook

        if order == "before":
            install()
        handle = parallelize_pipeline(pipe, cfg_degree=cfg)
        if order == "after":
            install()
        calls = []  # the rope runs once per forward that really runs (not for a cached uncond)
        counter = pipe.transformer.rope.register_forward_hook(lambda *a, calls=calls: calls.append(1))
        out[kind] = [render(pipe, FRAMES), render(pipe, FRAMES)]
        out[f"{kind}_forwards"] = len(calls)
        counter.remove()
        if kind == "registry":
            out["registry_calls"] = out.pop("registry_hook").calls
        handle.remove()
        if kind == "pab":
            pipe.transformer.disable_cache()
        out[f"{kind}_removed"] = render(pipe, 17)  # each rank alone again
    return out


def caches(order):
    """Every diffusers cache of _tiny.CACHES installed before or after parallelize_pipeline, two pipeline calls
    each: the latents and how many times the last block really ran (the test compares both with one process)."""
    out = {}
    for name in CACHES:
        pipe = tiny_pipeline()
        enable_freeloc(pipe, TINY_PROFILE)
        if order == "before":
            enable_cache(pipe, name)
        parallelize_pipeline(pipe)
        if order == "after":
            enable_cache(pipe, name)
        full = count_full_passes(pipe)
        out[name] = [render(pipe, CACHE_FRAMES, num_inference_steps=CACHE_STEPS) for _ in range(2)]
        out[f"{name}_full"] = len(full)
    return out


def refusals():
    """diffusers' enable_parallelism and FreeLOC / the engine, in either order: one clear error each."""
    from diffusers import ContextParallelConfig

    cp = ContextParallelConfig(ulysses_degree=int(os.environ["WORLD_SIZE"]))
    out = {}
    # diffusers picks the device as rank % accelerator count, which is 0 on a CPU-only machine
    torch.accelerator.device_count = lambda: 1
    first = tiny_transformer(num_layers=3, heads=2)
    first.enable_parallelism(config=cp)
    for name, install in (("cp_then_freeloc", lambda m: apply_freeloc(m, TINY_PROFILE)),
                          ("cp_then_parallelize", lambda m: parallelize(m, init_parallel()))):
        try:
            install(first)
            out[name] = "no error"
        except RuntimeError as e:
            out[name] = str(e)
    for name, install in (("freeloc_then_cp", lambda m: apply_freeloc(m, TINY_PROFILE)),
                          ("parallelize_then_cp", lambda m: parallelize(m, init_parallel()))):
        model = tiny_transformer(num_layers=3, heads=2)
        install(model)
        try:
            model.enable_parallelism(config=cp)
            out[name] = "no error"
        except RuntimeError as e:
            out[name] = str(e)
    return out


@torch.no_grad()
def counted_forwards(pipe, render_it):
    """(render_it(pipe), forwards of pipe.transformer that really ran on this rank): the rope runs once per forward
    (not for a cached uncond call)."""
    calls = []
    hook = pipe.transformer.rope.register_forward_hook(lambda *a: calls.append(1))
    try:
        return render_it(pipe), len(calls)
    finally:
        hook.remove()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cfg", type=int, default=1)
    ap.add_argument("--cases", default="freeloc,stock,engine")
    args = ap.parse_args()
    faulthandler.dump_traceback_later(240, exit=True)
    cases = args.cases.split(",")
    results = {}
    dims = init_parallel(cfg_degree=args.cfg)
    try:
        if "freeloc" in cases:
            pipe = tiny_pipeline()
            enable_freeloc(pipe, TINY_PROFILE)
            handle = parallelize_pipeline(pipe, cfg_degree=args.cfg)
            results["freeloc"], results["forwards"] = counted_forwards(pipe, lambda p: render(p, FRAMES))
            handle.remove()
            results["freeloc_removed"] = render(pipe, 17)  # each rank alone again; F = T: stock
            results["plain_short"] = render(tiny_pipeline(), 17)
        if "stock" in cases:
            pipe = tiny_pipeline()
            parallelize_pipeline(pipe, cfg_degree=args.cfg)
            results["stock"] = render(pipe, FRAMES)
        if "engine" in cases:  # the engine alone (parallelize), then the stock pipeline: was a TypeError
            pipe = tiny_pipeline()
            enable_freeloc(pipe, TINY_PROFILE)
            parallelize(pipe.transformer, dims)
            results["engine"] = render(pipe, FRAMES)
        if "compile" in cases:  # compiled blocks (fullgraph) under the engine vs the same ranks eager
            pipe = tiny_pipeline()
            enable_freeloc(pipe, TINY_PROFILE)
            parallelize_pipeline(pipe, cfg_degree=args.cfg)
            results["eager"] = render(pipe, FRAMES)
            from torch._dynamo.utils import counters

            pipe.transformer.compile_repeated_blocks(fullgraph=True)
            results["compiled"] = render(pipe, FRAMES)
            results["graphs"] = counters["stats"]["unique_graphs"]
        for order in ("before", "after"):
            if f"hooks_{order}" in cases:
                results[f"hooks_{order}"] = other_hooks(order, args.cfg)
        for order in ("before", "after"):
            if f"caches_{order}" in cases:
                results[f"caches_{order}"] = caches(order)
        if "refuse" in cases:
            results["refuse"] = refusals()
        # stock HunyuanVideo pipelines (joint text-video layers, text key masks): v1 with true CFG, 1.5 with the
        # guider's CFG (text and image-to-video); "<case>_forwards": the forwards that ran on this rank
        hunyuan = {"hunyuan": (hy.tiny_hunyuan_pipeline, hy.HUNYUAN_PROFILE,
                               lambda pipe: hy.render_hunyuan(pipe, hy.HUNYUAN_LONG)),
                   "hunyuan15": (hy.tiny_hunyuan15_pipeline, hy.HUNYUAN15_PROFILE, hy.render_hunyuan15),
                   "hunyuan15_i2v": (hy.tiny_hunyuan15_i2v_pipeline, hy.HUNYUAN15_PROFILE, hy.render_hunyuan15_i2v)}
        for case, (make, profile, render_it) in hunyuan.items():
            if case not in cases:
                continue
            pipe = make()
            enable_freeloc(pipe, profile)
            handle = parallelize_pipeline(pipe, cfg_degree=args.cfg)
            results[case], results[f"{case}_forwards"] = counted_forwards(pipe, render_it)
            if case == "hunyuan":
                results["hunyuan_short"] = hy.render_hunyuan(pipe, hy.HUNYUAN_SHORT)  # F = T through the engine
            handle.remove()
        if "mismatch" in cases:  # ranks drawing different noise: refused on every rank
            pipe = tiny_pipeline()
            parallelize_pipeline(pipe, cfg_degree=args.cfg)
            try:
                render(pipe, 25, generator=torch.Generator().manual_seed(dims.rank))
                results["mismatch"] = "no error"
            except RuntimeError as e:
                results["mismatch"] = str(e)
        torch.save(results, f"{args.out}.rank{dims.rank}")
    finally:
        destroy_parallel(dims)


if __name__ == "__main__":
    main()
    from freeloc_dist.parallel.exit import exit_process

    exit_process(0)
