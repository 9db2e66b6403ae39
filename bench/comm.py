"""Bytes received per rank per layer: TSA neighbour exchange vs Ulysses vs ring (DESIGN 7).

Prints tables; not a test. Two parts:

(a) measured: the script relaunches itself under torchrun (gloo, CPU) with each count in --nprocs. Every
    rank builds the same tiny random WanTransformer3DModel with a FreeLOC profile (tsa, vrpr and full
    layers), runs one forward through `parallelize(model, dims, strategy=S).predict(...)` for each forced
    strategy S at F and 2F latent frames, reads `engine.comm.bytes` (bytes this rank received, tagged by
    layer kind), divides by the number of layers of that kind, and rank 0 prints it next to the byte model
    `received_elements(S, plan, shards, heads, head_dim) * element_size`. Any mismatch is flagged (a bug).
    The last column is the relative error of the prediction against a one-process forward (sanity only).
(b) model: no processes, only freeloc_dist.plan.layer_plan (frame tables) and freeloc_dist.parallel.shards,
    for Wan2.1-1.3B geometry (n = 30 x 52 = 1560 tokens per frame, T = 21, d_model = 12 x 128, default TSA
    D1=8, D2=24, sinks [0]): max over ranks of the per-layer received volume, in frames of one tensor
    (n x d_model values) and MB (1e6 bytes) at bf16, next to DESIGN 7's closed forms with s = F/P.

    python bench/comm.py                         # both parts, torchrun with 2, 3 and 4 processes
    python bench/comm.py --nprocs 2,3 --frames 12 --heads 12 --head-dim 12
    python bench/comm.py --skip-measured --model-frames 241,481 --model-ranks 4,8,16
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from freeloc_dist.parallel.decisions import received_elements  # noqa: E402
from freeloc_dist.parallel.shards import exchange_plan, frame_shards  # noqa: E402
from freeloc_dist.plan import layer_plan  # noqa: E402

STRATEGIES = ("ring", "ulysses", "neighbour")
KINDS = ("tsa", "vrpr", "full")


# ------------------------------------------------------------------------------------ (a) measured
def tiny_profile(args) -> dict:
    # Two tsa layers, so that dividing a kind's bytes by its number of layers is exercised.
    return {
        "model": "bench-tiny-random",
        "trained_frames": args.trained_frames,
        "source": "bench/comm.py",
        "layers": {"tsa": [0, 2], "vrpr": [1], "full": [3]},
        "tsa": {
            "dense_frames": args.dense_frames,
            "stripe_frames": args.stripe_frames,
            "stripe_width": args.stripe_width,
            "sink_frames": [int(s) for s in args.sinks.split(",")],
        },
    }


def tiny_model(args, profile):
    from diffusers import WanTransformer3DModel

    from freeloc_dist import apply_freeloc

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=args.heads, attention_head_dim=args.head_dim, in_channels=4,
        out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=4, rope_max_seq_len=64,
    ).eval()
    apply_freeloc(model, profile)
    return model


def inputs(args, num_frames):
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, num_frames, 2 * args.grid_h, 2 * args.grid_w, generator=g)  # patch 1x2x2
    cond = torch.randn(1, 7, 16, generator=g)
    return latents, cond


@torch.no_grad()
def worker(args):
    """One rank: per (F, strategy, kind) measured and predicted bytes per layer; rank 0 prints."""
    import torch.distributed as dist

    from freeloc_dist.parallel import destroy_parallel, init_parallel, parallelize
    from freeloc_dist.sampling import predict_noise

    dims = init_parallel(cfg_degree=1)
    try:
        profile = tiny_profile(args)
        layers_of = {k: len(v) for k, v in profile["layers"].items()}
        rows = []
        for num_frames in (args.frames, 2 * args.frames):
            latents, cond = inputs(args, num_frames)
            t = torch.tensor(700.0)
            reference = predict_noise(tiny_model(args, profile), latents, t, cond, None, 1.0)
            for strategy in STRATEGIES:
                if strategy == "ulysses" and args.heads % dims.sp_degree:
                    continue
                model = tiny_model(args, profile)
                engine = parallelize(model, dims, strategy=strategy)
                engine.comm.reset()
                out = engine.predict(model, latents, t, cond, None, 1.0)
                err = float((out - reference).norm() / reference.norm())
                state = model.freeloc_state
                assert state.grid[0] == num_frames, state.grid
                elem = next(model.parameters()).element_size()
                for kind in KINDS:
                    plan = state.plan(kind)
                    predicted = received_elements(strategy, plan, engine.shards, args.heads, args.head_dim)
                    measured = engine.comm.bytes[kind] / layers_of[kind]
                    rows.append((num_frames, strategy, kind, dims.sp_rank, measured,
                                 predicted[dims.sp_rank] * elem, plan.kind, err))
        gathered = [None] * dims.world_size
        dist.all_gather_object(gathered, rows)
        if dims.rank == 0:
            print_measured(args, dims.sp_degree, [r for part in gathered for r in part])
    finally:
        destroy_parallel(dims)


def print_measured(args, num_ranks, rows):
    n = args.grid_h * args.grid_w
    frame_bytes = n * args.heads * args.head_dim * 4
    print(f"\n## (a) measured on gloo, P={num_ranks} ranks: tiny Wan {args.heads} heads x {args.head_dim}, "
          f"4 layers (tsa 0,2 / vrpr 1 / full 3), n={n} tokens/frame, T={args.trained_frames}, "
          f"D1={args.dense_frames} D2={args.stripe_frames} Ds={args.stripe_width} sinks [{args.sinks}], fp32")
    print(f"#  bytes received per rank per layer; one frame of one tensor = {frame_bytes} B; "
          f"'plan' = the kind the planner resolved the layer to; 'vs 1 proc' = relative error of the "
          f"whole forward against one process")
    ranks = list(range(num_ranks))
    head = " ".join(f"{'rank ' + str(r):>17}" for r in ranks)
    print(f"{'F':>4} {'strategy':<10} {'kind':<5} {'plan':<5} {head} {'max frames':>10} {'match':>5} {'vs 1 proc':>9}")
    print(f"{'':>4} {'':<10} {'':<5} {'':<5} " + " ".join(f"{'measured/predicted':>17}" for _ in ranks))
    key = lambda r: (r[0], STRATEGIES.index(r[1]), KINDS.index(r[2]))
    bad = 0
    for group in sorted({key(r) for r in rows}):
        sel = sorted((r for r in rows if key(r) == group), key=lambda r: r[3])
        num_frames, strategy, kind = sel[0][0], sel[0][1], sel[0][2]
        ok = all(r[4] == r[5] for r in sel)
        bad += not ok
        cells = " ".join(f"{f'{r[4]:.0f}/{r[5]:.0f}':>17}" for r in sel)
        max_frames = max(r[4] for r in sel) / frame_bytes
        err = max(r[7] for r in sel)
        print(f"{num_frames:>4} {strategy:<10} {kind:<5} {sel[0][6]:<5} {cells} {max_frames:10.2f} "
              f"{'yes' if ok else 'NO':>5} {err:9.1e}")
    sinks = len(args.sinks.split(","))
    for num_frames in sorted({r[0] for r in rows}):
        s = num_frames / num_ranks
        print(f"#  F={num_frames}: DESIGN 7 closed forms (s = F/P = {s:.2f}): "
              f"ring 2(P-1)s = {2 * (num_ranks - 1) * s:.2f}, "
              f"Ulysses 4(P-1)s/P = {4 * (num_ranks - 1) * s / num_ranks:.2f}, "
              f"neighbour <= 2(2 D2 + sinks) = {2 * (2 * args.stripe_frames + sinks)} frames")
    print(f"#  {'all measured == predicted' if not bad else f'{bad} MISMATCH(ES): measured != predicted'}")


def run_measured(args):
    for nproc in [int(x) for x in args.nprocs.split(",")]:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               os.path.abspath(__file__), "--worker", *sys.argv[1:]]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=args.timeout)
        sys.stdout.write(proc.stdout)
        if proc.returncode:
            print(f"# torchrun with {nproc} processes failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        sys.stdout.flush()


# ---------------------------------------------------------------------------------------- (b) model
def run_model(args):
    from freeloc_dist.profile import load_profile

    prof = load_profile(os.path.join(ROOT, args.profile))
    t = prof.trained_frames
    heads, head_dim = args.model_heads, args.model_head_dim
    grid_hw = (args.model_grid_h, args.model_grid_w)
    n = grid_hw[0] * grid_hw[1]
    frame = n * heads * head_dim  # values in one frame of one tensor
    print(f"\n## (b) byte model for {prof.model}: n={grid_hw[0]}x{grid_hw[1]}={n} tokens/frame, T={t}, "
          f"d_model={heads}x{head_dim}={heads * head_dim}, tsa={prof.tsa} (profile {args.profile})")
    print("#  per rank per layer, max over ranks; 'frames' = frames of one tensor (n x d_model values); "
          "MB = 1e6 bytes at bf16; closed forms of DESIGN 7 with s = F/P")
    print("#  neighbour applies to tsa layers only; ring/Ulysses are the same for every layer kind; "
          "'auto' = what the engine picks for a tsa layer")
    print(f"#  Ulysses needs heads % P == 0: a '*' marks P where it cannot run ({heads} heads); "
          "the figure is then hypothetical")
    print("#  'peers' = most ranks one rank receives from under neighbour exchange")
    print(f"{'F':>4} {'P':>3} {'s=F/P':>7} | {'ring':>6} {'2(P-1)s':>7} {'MB':>7} | {'ulysses':>8} {'4(P-1)s/P':>9} "
          f"{'MB':>6} | {'neighbr':>7} {'bound':>5} {'MB':>6} {'peers':>5} | {'auto':>9} {'nb/ring':>7}")
    totals = []
    for num_frames in [int(x) for x in args.model_frames.split(",")]:
        plan = layer_plan("tsa", (num_frames, *grid_hw), t, prof.vrpr, prof.tsa)
        tsa = plan.tsa
        sinks = [f for f in tsa.sink_frames if f < num_frames]
        bound = 2 * (2 * tsa.stripe_frames + len(sinks))
        for num_ranks in [int(x) for x in args.model_ranks.split(",")]:
            shards = frame_shards(num_frames, num_ranks)
            s = num_frames / num_ranks
            got = {k: max(received_elements(k, plan, shards, heads, head_dim)) / frame for k in STRATEGIES}
            mb = {k: v * frame * 2 / 1e6 for k, v in got.items()}
            ex = exchange_plan(plan, shards)
            peers = max(len(r) for r in ex.recvs)  # most ranks one rank receives from
            candidates = ["ulysses" if heads % num_ranks == 0 else "ring", "neighbour"]
            auto = min(candidates, key=lambda c: (got[c], c != "neighbour"))
            flag = "" if got["neighbour"] <= bound else " OVER BOUND"
            star = " " if heads % num_ranks == 0 else "*"
            print(f"{num_frames:>4} {num_ranks:>3} {s:7.2f} | {got['ring']:6.0f} {2 * (num_ranks - 1) * s:7.1f} "
                  f"{mb['ring']:7.1f} | {got['ulysses']:7.1f}{star} {4 * (num_ranks - 1) * s / num_ranks:9.1f} "
                  f"{mb['ulysses']:6.1f} | {got['neighbour']:7.0f} {bound:5d} {mb['neighbour']:6.1f} {peers:5d} | "
                  f"{auto:>9} {got['neighbour'] / got['ring']:7.3f}{flag}")
            layers = prof.layers()
            dense = candidates[0]
            num_dense = len(layers["vrpr"]) + len(layers["full"])
            totals.append((num_frames, num_ranks, dense, auto, len(layers["tsa"]), num_dense, got[auto], got[dense]))
    print(f"\n#  whole transformer forward, per rank, as the engine runs it ('auto'): tsa layers as above, vrpr/full "
          f"layers dense ({heads} heads: Ulysses if P divides them, else ring); frames of one tensor / GB at bf16")
    print(f"{'F':>4} {'P':>3} | {'tsa':>14} {'frames':>7} | {'vrpr+full':>15} {'frames':>7} | {'total':>7} {'GB':>6} "
          f"{'tsa share':>9}")
    for num_frames, num_ranks, dense, auto, num_tsa, num_dense, per_tsa, per_dense in totals:
        tsa_total, dense_total = num_tsa * per_tsa, num_dense * per_dense
        total = tsa_total + dense_total
        print(f"{num_frames:>4} {num_ranks:>3} | {f'{num_tsa} x {auto}':>14} {tsa_total:7.0f} | "
              f"{f'{num_dense} x {dense}':>15} {dense_total:7.0f} | {total:7.0f} {total * frame * 2 / 1e9:6.2f} "
              f"{tsa_total / total:9.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    g = ap.add_argument_group("(a) measured on gloo")
    g.add_argument("--nprocs", default="2,3,4", help="torchrun process counts, comma-separated")
    g.add_argument("--frames", type=int, default=12, help="F (also run at 2F); must exceed --trained-frames")
    g.add_argument("--trained-frames", type=int, default=5)
    g.add_argument("--heads", type=int, default=12, help="12 divides 2, 3 and 4, so Ulysses runs at every P")
    g.add_argument("--head-dim", type=int, default=12)
    g.add_argument("--grid-h", type=int, default=2, help="tokens per frame along H (after 2x2 patching)")
    g.add_argument("--grid-w", type=int, default=3)
    g.add_argument("--dense-frames", type=int, default=1)
    g.add_argument("--stripe-frames", type=int, default=2)
    g.add_argument("--stripe-width", type=int, default=3)
    g.add_argument("--sinks", default="0")
    g.add_argument("--timeout", type=float, default=600)
    g.add_argument("--skip-measured", action="store_true")
    g = ap.add_argument_group("(b) byte model")
    g.add_argument("--profile", default="configs/profiles/wan2.1-t2v-1.3b.yaml")
    g.add_argument("--model-frames", default="241,481")
    g.add_argument("--model-ranks", default="4,8,16")
    g.add_argument("--model-grid-h", type=int, default=30)
    g.add_argument("--model-grid-w", type=int, default=52)
    g.add_argument("--model-heads", type=int, default=12)
    g.add_argument("--model-head-dim", type=int, default=128)
    g.add_argument("--skip-model", action="store_true")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    print(f"# bench/comm.py, torch {torch.__version__}")
    if not args.skip_measured:
        run_measured(args)
    if not args.skip_model:
        run_model(args)


if __name__ == "__main__":
    main()
    from freeloc_dist.parallel.exit import exit_process

    exit_process(0)
