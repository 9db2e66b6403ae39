"""One rank of a multi-process test, launched by test_parallel.py through torchrun (gloo on CPU).

Computes the guided prediction and a short sampling run of tiny Wan transformers under sequence/CFG
parallelism and saves rank 0's results; test_parallel.py compares them with a single process.
"""

import argparse
import faulthandler
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _tiny import tiny_transformer  # noqa: E402

from freeloc_dist import apply_freeloc  # noqa: E402
from freeloc_dist.parallel import destroy_parallel, init_parallel, parallelize  # noqa: E402

PROFILE = {
    "model": "tiny-random",
    "trained_frames": 4,
    "source": "test",
    "layers": {"tsa": [0], "vrpr": [1], "full": [2]},
    "tsa": {"dense_frames": 1, "stripe_frames": 2, "stripe_width": 3, "sink_frames": [0]},
}
GUIDANCE = 3.0


def case_inputs(num_frames, seed=5):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, num_frames, 4, 6, generator=g)
    cond = torch.randn(1, 7, 16, generator=g)
    uncond = torch.randn(1, 7, 16, generator=g)
    return latents, cond, uncond


def build(heads, backend="sdpa"):
    model = tiny_transformer(num_layers=3, heads=heads, head_dim=12, seed=0)
    apply_freeloc(model, PROFILE, backend=backend)
    return model


def strategies_for(heads, sp_degree):
    names = ["auto", "ring", "neighbour", "hybrid"]
    if heads % sp_degree == 0:
        names.append("ulysses")
    return names


@torch.no_grad()
def tsa_bytes(dims, num_frames):
    """Bytes a TSA layer receives under neighbour exchange, measured and predicted, at F and 2F."""
    from freeloc_dist.parallel.decisions import received_elements

    profile = {**PROFILE, "layers": {"tsa": [0, 1, 2]}}
    out = {}
    for frames in (num_frames, 2 * num_frames):
        latents, cond, _ = case_inputs(frames)
        model = tiny_transformer(num_layers=3, heads=6)
        apply_freeloc(model, profile)
        engine = parallelize(model, dims, strategy="neighbour")
        engine.predict(model, latents, torch.tensor(700.0), cond, None, 1.0)
        plan = model.freeloc_state.plan("tsa")
        predicted = received_elements("neighbour", plan, engine.shards, 6, 12)[dims.sp_rank] * 4 * 3  # fp32, 3 layers
        out[frames] = {"measured": engine.comm.bytes["tsa"], "predicted": predicted}
    return out


# Layers 1 (vrpr) and 2 (full) with a sparse long range: band 1, every third key frame, sinks 0 and 4.
LONG_PROFILE = {**PROFILE,
                "long_range": {"layers": [1, 2], "band_frames": 1, "stride_frames": 3, "sink_frames": [0, 4]}}


def build_long(heads, backend="sdpa"):
    model = tiny_transformer(num_layers=3, heads=heads, head_dim=12, seed=0)
    apply_freeloc(model, LONG_PROFILE, backend=backend)
    return model


@torch.no_grad()
def long_range_results(dims, num_frames, backend, heads_list, only=None):
    """Predictions of the long-range profile under every strategy (or those in `only`), and the long-range
    layers' bytes (rank 0's, measured) beside the byte model's (fp32, 2 layers, cond + uncond passes)."""
    from freeloc_dist.parallel.decisions import received_elements

    latents, cond, uncond = case_inputs(num_frames)
    results = {}
    for heads in heads_list:
        for strategy in [s for s in strategies_for(heads, dims.sp_degree) if only is None or s in only]:
            model = build_long(heads, backend)
            engine = parallelize(model, dims, backend=backend, strategy=strategy)
            results[f"pred/h{heads}/{strategy}"] = engine.predict(
                model, latents, torch.tensor(700.0), cond, uncond, GUIDANCE)
            plan = model.freeloc_state.plan("vrpr+long")
            used = engine.strategy_for(plan, 12)
            predicted = received_elements(used, plan, engine.shards, heads, 12)[dims.sp_rank] * 4 * 2 * 2
            measured = engine.comm.bytes["vrpr+long"] + engine.comm.bytes["full+long"]
            results[f"long_bytes/h{heads}/{strategy}"] = (measured, predicted, used)
    return results


def group_timeout(dims, timeout_s):
    """Rank 0 waits in a sequence-parallel collective that rank 1 never joins (rank 1 stays alive, so torchrun
    does not end the world for it): the collective must fail after about timeout_s, not gloo's 30 minutes."""
    import time

    import torch.distributed as dist

    if dims.rank != 0:
        time.sleep(timeout_s * 4)
        return {}
    start = time.perf_counter()
    try:
        dist.all_reduce(torch.ones(1), group=dims.sp_group)
        error = None
    except RuntimeError as e:
        error = str(e).splitlines()[0]
    return {"elapsed": time.perf_counter() - start, "error": error}


@torch.no_grad()
def equivalence_results(dims, frames, backend, heads_list):
    """Every strategy's prediction, the auto strategy's sampled latents and choices, and the bytes of a vrpr layer
    against the byte model (rank 0 saves them; test_parallel.py compares with one process)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from freeloc_dist.sampling import sample

    latents, cond, uncond = case_inputs(frames)
    results = {}
    for heads in heads_list:
        for strategy in strategies_for(heads, dims.sp_degree):
            model = build(heads, backend)
            engine = parallelize(model, dims, backend=backend, strategy=strategy)
            results[f"pred/h{heads}/{strategy}"] = engine.predict(
                model, latents, torch.tensor(700.0), cond, uncond, GUIDANCE
            )
            if dims.sp_degree > 1:  # bytes of the one vrpr layer vs the byte model (fp32; CFG passes)
                from freeloc_dist.parallel.decisions import received_elements

                passes = 1 if dims.cfg_degree == 2 else 2
                plan = model.freeloc_state.plan("vrpr")
                used = engine.strategy_for(plan, 12)
                predicted = received_elements(used, plan, engine.shards, heads, 12)[dims.sp_rank] * 4 * passes
                results[f"vrpr_bytes/h{heads}/{strategy}"] = (engine.comm.bytes["vrpr"], predicted)
            if strategy == "auto":
                chosen = {k: engine.strategy_for(model.freeloc_state.plan(k), 12) for k in ("tsa", "vrpr", "full")}
                results[f"strategy/h{heads}"] = chosen
                scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
                results[f"latents/h{heads}"] = sample(
                    model, scheduler, latents.clone(), cond, uncond, steps=2, guidance=GUIDANCE,
                    predict=engine.predict,
                )
                engine.comm.reset()
                engine.predict(model, latents, torch.tensor(700.0), cond, None, 1.0)
                results[f"bytes/h{heads}"] = dict(engine.comm.bytes)
    return results


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--frames", type=int, required=True)
    ap.add_argument("--cfg", type=int, default=1)
    ap.add_argument("--heads", default="6,5")
    ap.add_argument("--backend", default="sdpa")
    ap.add_argument("--strategies", default=None, help="--case long, flex: long-range strategies (comma-separated)")
    ap.add_argument("--fail-rank", type=int, default=-1)
    ap.add_argument("--case", choices=["equivalence", "bytes", "long", "flex", "group-timeout"], default="equivalence")
    ap.add_argument("--long-frames", type=int, default=None, help="--case flex: frames of the long-range part")
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args()
    # a hang prints every stack, then exits (group-timeout waits out the timeout on purpose, the dump comes later)
    faulthandler.dump_traceback_later(args.timeout * (8 if args.case == "group-timeout" else 1), exit=True)
    dims = init_parallel(cfg_degree=args.cfg, timeout_s=args.timeout)
    try:
        if dims.rank == args.fail_rank:
            raise RuntimeError(f"rank {dims.rank} fails on purpose")
        if args.case == "group-timeout":
            torch.save(group_timeout(dims, args.timeout), f"{args.out}.rank{dims.rank}")
            return
        if args.case == "bytes":
            torch.save(tsa_bytes(dims, args.frames), f"{args.out}.rank{dims.rank}")
            return
        if args.case == "long":
            only = None if args.strategies is None else args.strategies.split(",")
            results = long_range_results(dims, args.frames, args.backend, [int(h) for h in args.heads.split(",")], only)
            if dims.rank == 0:
                torch.save(results, args.out)
            return
        heads = [int(h) for h in args.heads.split(",")]
        if args.case == "flex":  # both flex cases in one world: flex compiles on CPU for tens of seconds
            results = {"equivalence": equivalence_results(dims, args.frames, "flex", heads),
                       "long": long_range_results(dims, args.long_frames, "flex", heads, args.strategies.split(","))}
        else:
            results = equivalence_results(dims, args.frames, args.backend, heads)
        if dims.rank == 0:
            torch.save(results, args.out)
    finally:
        destroy_parallel(dims)


if __name__ == "__main__":
    main()
    from freeloc_dist.parallel.exit import exit_process

    exit_process(0)
