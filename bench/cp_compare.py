"""Transformer forward time on 2 gloo ranks: diffusers' own Ulysses context parallelism vs freeloc_dist.

Prints a table; not a test. The script relaunches itself under torchrun (CPU, gloo, --nproc ranks). Every
rank builds the same random mid-size WanTransformer3DModel (same seed, so the same weights) and the same
input at F = 4T latent frames (default T=21, F=84, 8x8 tokens per frame, 12 heads x 64, 4 layers), and
times one forward (whole video in, whole prediction out on every rank) of:

  diffusers CP   stock model + `enable_parallelism(config=ContextParallelConfig(ulysses_degree=P))`,
                 native (SDPA) attention backend;
  ours stock     `parallelize(model, dims)` with no FreeLOC profile (every layer full, Ulysses: auto);
  ours FreeLOC   `apply_freeloc` with the first L layers of the published Wan2.1-1.3B profile (tsa/vrpr),
                 then `parallelize`; the engine picks neighbour exchange or Ulysses per layer by bytes.

The variants run round-robin, after one warm-up each; a run's time is the slowest rank's, and the table
shows the median (and min/max) over --repeats. The two stock variants must agree with each other (their
relative difference is printed); --check also compares each with a one-process forward.
diffusers 0.42 picks a device with `rank % torch.accelerator.device_count()`, which is 0 on a CPU-only
machine; the workers patch `torch.accelerator.device_count` to return 1 (in this benchmark only; disable with
--no-accelerator-patch to see the failure).

    python bench/cp_compare.py                          # defaults: 2 ranks, F=84, 8x8, 12x64, 4 layers
    python bench/cp_compare.py --repeats 5 --layers 6 --grid 8x8 --backend sdpa --check
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Published FreeLOC assignment for Wan2.1-T2V-1.3B (DESIGN 3); a model of L layers takes its first L entries.
PUBLISHED_TSA = (0, 1, 4, 6, 7, 9, 10, 11, 13, 14, 15, 16, 18, 22, 23, 24, 25)


def build_model(args):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(args.seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=args.heads, attention_head_dim=args.head_dim,
        in_channels=16, out_channels=16, text_dim=64, freq_dim=64, ffn_dim=2 * args.heads * args.head_dim,
        num_layers=args.layers, rope_max_seq_len=1024,
    ).eval()


def freeloc_profile(args) -> dict:
    tsa = [i for i in PUBLISHED_TSA if i < args.layers]
    return {
        "model": "bench-random-wan",
        "trained_frames": args.trained_frames,
        "source": "bench/cp_compare.py: first layers of the published Wan2.1-1.3B assignment",
        "layers": {"tsa": tsa, "vrpr": [i for i in range(args.layers) if i not in tsa]},
        "tsa": {"dense_frames": 8, "stripe_frames": 24, "sink_frames": [0]},
    }


def inputs(args):
    g = torch.Generator().manual_seed(args.seed + 1)
    h, w = (int(x) for x in args.grid.split("x"))
    latents = torch.randn(1, 16, args.frames, 2 * h, 2 * w, generator=g)  # patch 1x2x2 -> h x w tokens
    cond = torch.randn(1, 16, 64, generator=g)
    return latents, cond


class AttnTimer:
    """Wall time of each self-attention module (attn1: projections + attention + its communication) by
    layer kind, per forward, on this rank, via plain torch forward hooks."""

    def __init__(self, model, kinds):
        self.kinds = kinds
        self.runs = []  # per forward: {kind: seconds summed over its layers}
        self.current = {}
        for block, kind in zip(model.blocks, kinds):
            block.attn1.register_forward_pre_hook(lambda m, a: setattr(m, "_bench_t0", time.perf_counter()))
            block.attn1.register_forward_hook(lambda m, a, o, kind=kind: self._add(kind, m))

    def _add(self, kind, module):
        self.current[kind] = self.current.get(kind, 0.0) + time.perf_counter() - module._bench_t0

    def start(self):
        self.current = {}

    def stop(self):
        self.runs.append(self.current)

    def per_layer(self) -> dict:
        """Median over forwards of the seconds per layer of each kind."""
        counts = {k: self.kinds.count(k) for k in set(self.kinds)}
        return {k: statistics.median(r[k] for r in self.runs) / counts[k] for k in sorted(counts)}


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@torch.no_grad()
def worker(args):
    import torch.distributed as dist

    from freeloc_dist import apply_freeloc
    from freeloc_dist.parallel import destroy_parallel, init_parallel, parallelize
    from freeloc_dist.sampling import predict_noise

    torch.set_num_threads(args.threads)
    dims = init_parallel(cfg_degree=1)
    say = print if dims.rank == 0 else (lambda *a, **k: None)
    try:
        latents, cond = inputs(args)
        t = torch.tensor(700.0)
        variants = {}  # name -> (fn() -> global prediction [B, C, F, H, W], engine or None)

        # diffusers' Ulysses context parallelism on a stock model.
        from diffusers import ContextParallelConfig

        if not args.no_accelerator_patch:
            torch.accelerator.device_count = lambda: 1  # diffusers: rank % device_count() (0 on CPU)
        stock_d = build_model(args)
        timers = {}
        try:
            stock_d.enable_parallelism(config=ContextParallelConfig(ulysses_degree=dims.world_size))
            variants["diffusers CP (Ulysses)"] = (lambda: predict_noise(stock_d, latents, t, cond, None, 1.0), None)
            timers["diffusers CP (Ulysses)"] = AttnTimer(stock_d, ["full"] * args.layers)
        except Exception as e:  # report and go on with our variants
            say(f"# diffusers CP could not be enabled: {type(e).__name__}: {e}")

        for name, profile in (("ours stock (all full)", None), ("ours FreeLOC", freeloc_profile(args))):
            model = build_model(args)
            if profile is not None:
                apply_freeloc(model, profile, backend=args.backend)
            engine = parallelize(model, dims, backend=args.backend, strategy=args.strategy)
            variants[name] = ((lambda m=model, e=engine: e.predict(m, latents, t, cond, None, 1.0)), engine)
            timers[name] = AttnTimer(model, list(engine.state.profile.kinds))

        outputs, warm, times = {}, {}, {name: [] for name in variants}
        for name, (fn, _) in variants.items():
            dist.barrier()
            t0 = time.perf_counter()
            try:
                outputs[name] = fn()
            except Exception as e:
                say(f"# {name}: warm-up failed: {type(e).__name__}: {e}")
                raise
            warm[name] = slowest(time.perf_counter() - t0)
        for _ in range(args.repeats):
            for name, (fn, engine) in variants.items():
                if engine is not None:
                    engine.comm.reset()
                dist.barrier()
                timers[name].start()
                t0 = time.perf_counter()
                fn()
                elapsed = time.perf_counter() - t0
                timers[name].stop()
                times[name].append(slowest(elapsed))

        checks = {}
        if args.check:
            single = build_model(args)
            checks["ours stock (all full)"] = checks["diffusers CP (Ulysses)"] = predict_noise(
                single, latents, t, cond, None, 1.0
            )
            single_freeloc = build_model(args)
            apply_freeloc(single_freeloc, freeloc_profile(args), backend=args.backend)
            checks["ours FreeLOC"] = predict_noise(single_freeloc, latents, t, cond, None, 1.0)
        if dims.rank == 0:
            report(args, dims, variants, outputs, warm, times, checks, timers)
    finally:
        destroy_parallel(dims)


def slowest(seconds: float) -> float:
    """The slowest rank's time (a forward is done when every rank is done)."""
    import torch.distributed as dist

    x = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return float(x.item())


def report(args, dims, variants, outputs, warm, times, checks, timers):
    import diffusers

    h, w = (int(x) for x in args.grid.split("x"))
    n = h * w
    profile = freeloc_profile(args)
    print(f"# {dims.world_size} gloo ranks x {args.threads} thread(s), torch {torch.__version__}, diffusers "
          f"{diffusers.__version__}; shared 2-core CPU machine (other jobs running): timings are noisy")
    print(f"# random Wan: {args.layers} layers, {args.heads} heads x {args.head_dim} (d_model "
          f"{args.heads * args.head_dim}), F={args.frames} latent frames x {h}x{w} tokens = {args.frames * n} tokens, "
          f"T={args.trained_frames}, fp32, seed {args.seed}; ours: backend {args.backend}, strategy {args.strategy}")
    print(f"# FreeLOC profile: tsa {profile['layers']['tsa']}, vrpr {profile['layers']['vrpr']}, D1=8 D2=24 sinks [0]")
    freeloc_engine = variants.get("ours FreeLOC", (None, None))[1]
    if freeloc_engine is not None:
        state = freeloc_engine.state
        kinds = [k for k in ("tsa", "vrpr", "full") if k in state.profile.kinds]
        picks = ", ".join(f"{k} -> {freeloc_engine.strategy_for(state.plan(k), args.head_dim)}" for k in kinds)
        density = state.plan("tsa").density()
        print(f"# ours FreeLOC picks: {picks}; tsa key density {density:.3f}")
    print(f"{'variant':<24} {'median s':>9} {'min s':>7} {'max s':>7} {'x diffusers':>11} {'warm-up s':>9} "
          f"{'MB recv/rank (ours)':>20} {'check':>9}  runs")
    base = statistics.median(times["diffusers CP (Ulysses)"]) if "diffusers CP (Ulysses)" in times else None
    for name, (_, engine) in variants.items():
        med = statistics.median(times[name])
        ratio = f"{med / base:11.2f}" if base else f"{'-':>11}"
        mb = "-"
        if engine is not None:
            per_kind = {k: v / 1e6 for k, v in engine.comm.bytes.items()}
            mb = "+".join(f"{k}:{v:.1f}" for k, v in sorted(per_kind.items()))
        check = f"{rel(outputs[name], checks[name]):9.1e}" if name in checks else f"{'-':>9}"
        runs = " ".join(f"{x:.2f}" for x in times[name])
        print(f"{name:<24} {med:9.2f} {min(times[name]):7.2f} {max(times[name]):7.2f} {ratio} {warm[name]:9.2f} "
              f"{mb:>20} {check}  {runs}")
    a, b = "diffusers CP (Ulysses)", "ours stock (all full)"
    if a in outputs and b in outputs:
        print(f"# relative difference of the two stock outputs ({a} vs {b}): {rel(outputs[b], outputs[a]):.1e}")
    if checks:
        print("# check = relative error against a one-process forward of the same model (stock or FreeLOC)")
    print("# self-attention modules on rank 0 (projections + attention + communication), median s per layer by kind:")
    for name, timer in timers.items():
        print(f"#   {name:<24} " + "  ".join(f"{k} {v:.2f}" for k, v in timer.per_layer().items()))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--nproc", type=int, default=2, help="gloo ranks (sequence-parallel degree)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank (the machine has 2 cores)")
    ap.add_argument("--trained-frames", type=int, default=21)
    ap.add_argument("--frames", type=int, default=None, help="latent frames (default 4 x trained frames)")
    ap.add_argument("--grid", default="8x8", help="tokens per frame after 2x2 patching, HxW")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backend", default="sdpa", help="our attention backend (sdpa or flex)")
    ap.add_argument("--strategy", default="auto", help="our strategy: auto, ulysses, ring, neighbour")
    ap.add_argument("--check", action="store_true", help="also compare with one-process forwards (slower)")
    ap.add_argument("--no-accelerator-patch", action="store_true")
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args()
    if args.frames is None:
        args.frames = 4 * args.trained_frames
    if args.worker:
        worker(args)
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           os.path.abspath(__file__), "--worker", *sys.argv[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=args.timeout)
    sys.stdout.write(proc.stdout)
    if proc.returncode:
        print(f"# torchrun failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
    from freeloc_dist.parallel.exit import exit_process

    exit_process(0)
