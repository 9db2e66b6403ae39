"""One prepared GPU check: the CUDA paths, correctness, per-layer attention and the 1.3B model, in one table.

Built to finish within 8 minutes on one H200 (issue 17) and print one markdown table (also written to
--out). Sections, each run in its own subprocess with its own time limit, so a hang, a CUDA error or an
endless compile in one cannot take the others down; every failure becomes a table cell:
  a. correctness: every registered backend (sdpa, sdpa-math, flex) against the float64 reference,
     bf16 and float32, head_dim 128, vrpr and tsa on small grids (tolerances of tests/test_attention.py:
     1e-5 float32, 1e-2 bf16); and lse.attend's fused kernel against the matmul path (out and lse);
  b. per-layer attention at Wan2.1-1.3B shapes (12 heads x 128, 30x52 tokens per frame, T = 21, the
     published profile's TSA settings) at F = 81 and 241: stock dense SDPA (flash, cuDNN), vrpr and tsa
     per backend; seconds (CUDA events, one warm-up then repeats, median), x dense flash, TFLOP/s
     (attended pairs x 4 x head_dim x heads / s), peak memory (max_memory_allocated, reset per row).
     Dense rows take pre-rotated q, k (kernel only); FreeLOC rows start from un-rotated q, k (their
     rotations included), as bench/attention.py does;
  c. a random-weight WanTransformer3DModel with the real Wan2.1-1.3B config, bf16, the published profile
     installed (apply_freeloc), at F = 81 and 241, eager and torch.compile'd: seconds per forward and
     peak memory beside the dry-run planner's prediction for the same shape;
  d. kernel calls (issue 26): one rank of 8 (the middle shard's queries against every key frame, as under
     Ulysses) at Wan2.1-1.3B shapes, F = 241 and 961, tsa, vrpr and vrpr + long range (the long profile's
     band 8, stride 12), sdpa and flex: fused kernel calls (flex: compiled-kernel calls), other aten ops,
     host ms (the call's wall time before synchronising: what the host spends issuing it) and seconds per
     layer (CUDA events); a last row per F says which backend is faster over the three kinds.
Guards: a row is skipped, with the reason in its cell, when its estimate (from the F = 81 row and the
work ratio) does not fit the section's time left, when its F = 81 row took over --row-guard-s, or when
sdpa-math's score buffers (estimated from its schedule) would exceed half the GPU memory.

On the H200 machine (python 3.12, torch 2.11, no diffusers): run scripts/gpu_wheels.sh here first (it
fills .gpu_wheels/), then with the device tool, carry [".gpu_wheels"], timeout_s 560, this command:

    python3 -m pip install -q --no-index --no-deps --target /tmp/gw .gpu_wheels/*.whl && PYTHONPATH=/tmp/gw python3 bench/gpu_check.py --out $OUT/gpu_check.md

Here: `python bench/gpu_check.py --smoke` runs the same code paths on CPU with tiny shapes (2 heads x 12,
3x4 tokens, the 3-layer tiny-random profile, F = 9 and 13; tests/test_gpu_check.py); its d. section runs
sdpa only (flex compiles each new shape for tens of seconds on CPU; section b. runs flex). Not a test itself:
it reports, it does not assert. The model is cast whole to bf16 (.to), so its few modules diffusers keeps
in float32 when loading weights run in bf16 here; nothing is downloaded, the weights are random.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SECTIONS = ("correctness", "attention", "model-eager", "model-compiled", "calls")
# shares of the time budget; sections run in this order, so calls gets what the compiled model leaves too
WEIGHTS = {"correctness": 2, "attention": 4, "model-eager": 3, "model-compiled": 2, "calls": 2}
COLUMNS = ("section", "row", "seconds", "x dense", "TFLOP/s", "peak GiB", "rel err (tol)", "planner", "result")
TOL = {"float32": 1e-5, "bfloat16": 1e-2}  # tests/test_attention.py: TOL and the bf16 tests
LSE_TOL = {"float32": 1e-5, "bfloat16": 1e-3}  # |lse - lse_math|: both accumulate q.k in float32
PROFILE = os.path.join(ROOT, "configs", "profiles", "wan2.1-t2v-1.3b.yaml")
TINY_PROFILE = os.path.join(ROOT, "configs", "profiles", "tiny-random.yaml")  # --smoke: 3 layers, T = 5
MODEL_ID = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Everything that differs between the real check and --smoke."""

    device: str
    backends: tuple[str, ...]
    dtypes: tuple[str, ...]
    # a. correctness
    c_grid_hw: tuple[int, int]
    c_frames: int
    c_trained: int
    c_heads: int
    c_head_dim: int
    c_batch: int
    c_tsa: dict
    # b. attention and c. model
    frames: tuple[int, int]
    grid_hw: tuple[int, int]
    heads: int
    head_dim: int
    profile: str  # trained frames and TSA settings of b., the profile installed in c.
    repeats: tuple[int, int]
    model: dict  # WanTransformer3DModel kwargs
    text_tokens: int
    # d. calls: frame counts, ranks, the long range of the vrpr + long rows, backends run there
    calls_frames: tuple[int, int] = (241, 961)
    calls_ranks: int = 8
    long_range: tuple = (("band_frames", 8), ("stride_frames", 12), ("sink_frames", (0,)))
    calls_backends: tuple[str, ...] = ("sdpa", "flex")


def shapes(smoke: bool) -> Shapes:
    from freeloc_dist.attention import BACKENDS
    from freeloc_dist.planner import KNOWN_TRANSFORMERS

    # sdpa-math (the matmul fallback, least relevant on CUDA) last: rows run in table order
    backends = tuple(sorted((b for b in BACKENDS if b != "reference"), key=lambda b: b == "sdpa-math"))
    if smoke:
        return Shapes("cpu", backends, ("bfloat16", "float32"), (3, 4), 19, 4, 3, 12, 2,
                      {"dense_frames": 1, "stripe_frames": 3, "stripe_width": 3, "sink_frames": [0]},
                      (9, 13), (3, 4), 2, 12, TINY_PROFILE, (1, 1),
                      dict(_class_name="WanTransformer3DModel", patch_size=(1, 2, 2), num_attention_heads=2,
                           attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32,
                           num_layers=3), 7, calls_frames=(9, 13), calls_ranks=3,
                      long_range=(("band_frames", 1), ("stride_frames", 3), ("sink_frames", (0,))),
                      calls_backends=("sdpa",))
    cfg = dict(KNOWN_TRANSFORMERS[MODEL_ID])
    cfg["patch_size"] = tuple(cfg["patch_size"])
    # 8x16 tokens: one 128-token block per frame for flex (Triton tiles need whole blocks); stripes of 20.
    return Shapes("cuda", backends, ("bfloat16", "float32"), (8, 16), 19, 4, 4, 128, 1,
                  {"dense_frames": 1, "stripe_frames": 3, "stripe_width": 20, "sink_frames": [0]},
                  (81, 241), (30, 52), 12, 128, PROFILE, (3, 2), cfg, 512)


# ----------------------------------------------------------------------------------------- rows
def expected_rows(s: Shapes) -> list[tuple[str, str, str]]:
    """(id, section, label) of every row the table has, in table order."""
    rows = []
    for dtype in s.dtypes:
        for masked in (False, True):
            rows.append((f"lse/{dtype}/{'band' if masked else 'full'}", "correctness",
                         f"lse.attend vs matmul, {dtype}, {'band mask' if masked else 'no mask'}"))
    grid = f"{s.c_frames}x{s.c_grid_hw[0]}x{s.c_grid_hw[1]}, T={s.c_trained}, d={s.c_head_dim}"
    for kind in ("vrpr", "tsa"):
        for backend in s.backends:
            for dtype in s.dtypes:
                rows.append((f"a/{kind}/{backend}/{dtype}", "correctness", f"{kind} {backend} {dtype} ({grid})"))
    for f in s.frames:
        size = f"F={f} ({f}x{s.grid_hw[0]}x{s.grid_hw[1]}, {s.heads}x{s.head_dim})"
        rows.append((f"b/dense/flash/{f}", "attention", f"dense SDPA flash {size}"))
        rows.append((f"b/dense/cudnn/{f}", "attention", f"dense SDPA cuDNN {size}"))
        for backend in s.backends:
            for kind in ("vrpr", "tsa"):
                rows.append((f"b/{kind}/{backend}/{f}", "attention", f"{kind} {backend} {size}"))
    for mode in ("eager", "compiled"):
        for f in s.frames:
            rows.append((f"c/{mode}/{f}", f"model-{mode}", f"Wan {s.model['num_layers']}-layer bf16 {mode}, F={f}"))
    for f in s.calls_frames:
        for backend in ("sdpa", "flex"):
            for kind in CALL_KINDS:
                rows.append((f"d/{kind}/{backend}/{f}", "calls", f"calls {kind} {backend} F={f}, rank of {s.calls_ranks}"))
        rows.append((f"d/winner/{f}", "calls", f"calls: faster backend F={f}"))
    return rows


CALL_KINDS = ("tsa", "vrpr", "vrpr+long")


def one_line(e: BaseException, limit: int = 160) -> str:
    text = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return (text[: limit - 3] + "...") if len(text) > limit else text


def cell(x, fmt="{:.3g}"):
    return "" if x is None else (x if isinstance(x, str) else fmt.format(x))


def render_table(s: Shapes, results: dict, missing_reason: dict, header: list[str]) -> str:
    lines = list(header) + ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for rid, section, label in expected_rows(s):
        r = results.get(rid)
        if r is None:
            r = {"result": f"not reached: {missing_reason.get(section, 'section not run')}"}
        vals = [section, label, cell(r.get("seconds"), "{:.4g}"), cell(r.get("x_dense"), "{:.3f}"),
                cell(r.get("tflops"), "{:.3g}"), cell(r.get("peak_gib"), "{:.2f}"), cell(r.get("err")),
                cell(r.get("planner")), cell(r.get("result"))]
        lines.append("| " + " | ".join(v.replace("|", "/") for v in vals) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ measuring
class Meter:
    """Timing and peak memory on the check's device: CUDA events and max_memory_allocated on CUDA,
    perf_counter and no memory figure on CPU."""

    def __init__(self, device):
        import torch

        self.torch, self.device = torch, torch.device(device)
        self.cuda = self.device.type == "cuda"

    def reset(self):
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()

    def peak_gib(self):
        return self.torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None

    def first(self, fn):
        """Seconds of one call by wall clock (includes compilation, plan building)."""
        t0 = time.perf_counter()
        fn()
        if self.cuda:
            self.torch.cuda.synchronize()
        return time.perf_counter() - t0

    def median(self, fn, repeats):
        times = []
        for _ in range(repeats):
            if self.cuda:
                start, end = (self.torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                times.append(self.first(fn))
        return statistics.median(times)


def wan_rotary(grid, head_dim, t_rope):
    """bench/attention.py's Wan-style rotary tables (loaded from that file, not copied)."""
    spec = importlib.util.spec_from_file_location("_bench_attention", os.path.join(ROOT, "bench", "attention.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.wan_rotary(grid, head_dim, t_rope)


def wan_t_rope(head_dim):
    from freeloc_dist.rope import TemporalRope

    return TemporalRope(t_dim=head_dim - 4 * (head_dim // 6))  # Wan splits d into t / h / w like this


# --------------------------------------------------------------------------- a. correctness
def run_correctness(s: Shapes, emit, deadline):
    import torch

    from freeloc_dist.attention import get_backend
    from freeloc_dist.attention.lse import attend, attend_math, kernel_for
    from freeloc_dist.plan import layer_plan

    dev = torch.device(s.device)
    g = torch.Generator().manual_seed(0)
    for dtype_name in s.dtypes:
        dtype = getattr(torch, dtype_name)
        for masked in (False, True):
            rid = f"lse/{dtype_name}/{'band' if masked else 'full'}"
            try:
                q, k, v = (torch.randn(2, s.c_heads, 300, s.c_head_dim, generator=g).to(dev, dtype) for _ in range(3))
                bias = None
                if masked:  # a band |i - j| < 40, the shape of a stripe chunk's mask
                    i = torch.arange(300)
                    bias = torch.zeros(300, 300).masked_fill((i[:, None] - i[None]).abs() >= 40, float("-inf"))
                    bias = bias.to(dev, dtype)
                out, lse = attend(q, k, v, bias)
                ref_out, ref_lse = attend_math(q, k, v, bias)
                err = rel(out, ref_out)
                lse_err = float((lse - ref_lse).abs().max())
                ok = err < TOL[dtype_name] and lse_err < LSE_TOL[dtype_name]
                emit(rid, err=f"{err:.2e} ({TOL[dtype_name]:g}); lse {lse_err:.1e} ({LSE_TOL[dtype_name]:g})",
                     result=("pass" if ok else "FAIL") + f" [{kernel_for('auto', dev, dtype, masked)}]")
            except Exception as e:  # noqa: BLE001 - every failure becomes a cell
                emit(rid, result=f"failed: {one_line(e)}")

    num_frames = s.c_frames
    grid = (num_frames, *s.c_grid_hw)
    t_rope = wan_t_rope(s.c_head_dim)
    size = num_frames * s.c_grid_hw[0] * s.c_grid_hw[1]
    q, k, v = (torch.randn(s.c_batch, size, s.c_heads, s.c_head_dim, generator=g) for _ in range(3))
    cos, sin = wan_rotary(grid, s.c_head_dim, t_rope)
    for kind in ("vrpr", "tsa"):
        plan = layer_plan(kind, grid, s.c_trained, tsa=s.c_tsa if kind == "tsa" else None)
        ref = get_backend("reference").run(q.double(), k.double(), v.double(), (cos, sin), plan, t_rope)
        for backend in s.backends:
            run = get_backend(backend).run
            for dtype_name in s.dtypes:
                rid = f"a/{kind}/{backend}/{dtype_name}"
                if time.time() > deadline:
                    emit(rid, result="skipped: section time used up")
                    continue
                try:
                    dtype = getattr(torch, dtype_name)
                    x = [t.to(dev, dtype) for t in (q, k, v)]
                    rot = (cos.to(dev), sin.to(dev))
                    t0 = time.perf_counter()
                    print(f"gpu_check: {rid}...", file=sys.stderr, flush=True)
                    out = run(*x, rot, plan, t_rope)
                    seconds = time.perf_counter() - t0
                    err = rel(out.cpu(), ref)
                    emit(rid, seconds=seconds, err=f"{err:.2e} ({TOL[dtype_name]:g})",
                         result=("pass" if err < TOL[dtype_name] else "FAIL") + " (seconds: first call)")
                except Exception as e:  # noqa: BLE001
                    emit(rid, result=f"failed: {one_line(e)}")


def rel(a, b) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------- b. attention
def math_score_bytes(plan, bh: int, head_dim: int) -> int:
    """Largest float32 score buffer sdpa-math holds in one call (scores, their exp, the bias sum:
    three of them), from the same schedule and call budget the backend uses."""
    from freeloc_dist.attention import sdpa

    n = plan.tokens_per_frame
    frames = tuple(range(plan.num_frames))
    chunk = max(16, plan.stripe_width)
    spans = [c1 - c0 for _, _, c0, c1 in sdpa._band_chunks(n, plan.stripe_width, chunk)]
    budget = sdpa.call_budget(bh * len(frames) * n * head_dim)
    worst = 0
    for b in sdpa.batched_schedule(plan, frames, frames):
        if b.banded:
            rows, keys = min(chunk, n), b.frames * max(spans)
            per_call = max(1, budget // (bh * rows * keys))
        else:
            size, per_call = sdpa.call_items(b, budget, bh * n * b.frames * n)
            rows, keys = size * n, b.frames * n
        worst = max(worst, min(per_call, b.count) * bh * rows * keys)
    return 3 * 4 * worst


def run_attention(s: Shapes, emit, deadline, row_guard_s):
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from freeloc_dist.attention import get_backend
    from freeloc_dist.plan import layer_plan
    from freeloc_dist.profile import load_profile
    from freeloc_dist.rope import apply_rotary

    prof = load_profile(s.profile)
    dev = torch.device(s.device)
    meter = Meter(dev)
    t_rope = wan_t_rope(s.head_dim)
    total_mem = torch.cuda.get_device_properties(dev).total_memory if meter.cuda else None
    # (backend, kind) -> F=81 row's (wall seconds, warm-up seconds, median seconds, attended pairs)
    first_row: dict[tuple[str, str], tuple[float, float, float, float]] = {}
    for fi, num_frames in enumerate(s.frames):
        grid = (num_frames, *s.grid_hw)
        size = num_frames * s.grid_hw[0] * s.grid_hw[1]
        repeats = s.repeats[fi]
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(1, size, s.heads, s.head_dim, generator=g, device=dev, dtype=torch.bfloat16)
                   for _ in range(3))
        cos, sin = (t.to(dev) for t in wan_rotary(grid, s.head_dim, t_rope))
        pairs_dense = float(size) ** 2
        flop_per_pair = 4 * s.head_dim * s.heads

        qr, kr = (apply_rotary(x, cos, sin).to(torch.bfloat16).transpose(1, 2) for x in (q, k))
        vt = v.transpose(1, 2)
        dense = None
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            rid = f"b/dense/{name}/{num_frames}"
            if name == "cudnn" and not meter.cuda:
                emit(rid, result="skipped: no cuDNN attention on cpu")
                continue
            try:
                meter.reset()

                def call():
                    with sdpa_kernel([backend]):
                        return F.scaled_dot_product_attention(qr, kr, vt)

                warm = meter.first(call)
                sec = meter.median(call, repeats)
                if name == "flash":
                    dense = sec
                emit(rid, seconds=sec, x_dense=sec / dense if dense else None, tflops=pairs_dense * flop_per_pair / sec / 1e12,
                     peak_gib=meter.peak_gib(), result=f"ok (warm-up {warm:.2f} s)")
            except Exception as e:  # noqa: BLE001
                emit(rid, result=f"failed: {one_line(e)}")
        del qr, kr, vt

        for backend in s.backends:
            run = get_backend(backend).run
            for kind in ("vrpr", "tsa"):
                rid = f"b/{kind}/{backend}/{num_frames}"
                try:
                    plan = layer_plan(kind, grid, prof.trained_frames, prof.vrpr, prof.tsa)
                    density = plan.density()
                    work = density * pairs_dense
                    left = deadline - time.time()
                    reason = None
                    if (backend, kind) in first_row:
                        prev_s, prev_warm, prev_sec, prev_work = first_row[(backend, kind)]
                        # steady state scaled by the attended pairs, plus the first call's extra (compiling)
                        estimate = prev_sec * work / prev_work * (1 + repeats) + max(0.0, prev_warm - prev_sec)
                        if prev_s > row_guard_s:
                            reason = f"F={s.frames[0]} row took {prev_s:.0f} s (> {row_guard_s:g} s guard)"
                        elif estimate > left:
                            reason = f"estimated {estimate:.0f} s from F={s.frames[0]}, {left:.0f} s left"
                    if backend == "sdpa-math" and total_mem is not None:
                        need = math_score_bytes(plan, s.heads, s.head_dim)
                        if need > total_mem / 2:
                            reason = (f"sdpa-math would hold {need / 2**30:.0f} GiB of per-group scores "
                                      f"(> half of {total_mem / 2**30:.0f} GiB)")
                    if reason is None and left < 5:
                        reason = "section time used up"
                    if reason:
                        emit(rid, result=f"skipped: {reason}")
                        continue
                    meter.reset()
                    t0 = time.perf_counter()
                    print(f"gpu_check: {rid}...", file=sys.stderr, flush=True)
                    warm = meter.first(lambda: run(q, k, v, (cos, sin), plan, t_rope))
                    sec = meter.median(lambda: run(q, k, v, (cos, sin), plan, t_rope), repeats)
                    first_row.setdefault((backend, kind), (time.perf_counter() - t0, warm, sec, work))
                    emit(rid, seconds=sec, x_dense=sec / dense if dense else None, tflops=work * flop_per_pair / sec / 1e12,
                         peak_gib=meter.peak_gib(), result=f"ok (density {density:.3f}, warm-up {warm:.2f} s)")
                except Exception as e:  # noqa: BLE001
                    first_row.setdefault((backend, kind), (math.inf, math.inf, math.inf, 1.0))
                    emit(rid, result=f"failed: {one_line(e)}")
                    if meter.cuda:
                        torch.cuda.empty_cache()
        del q, k, v


# --------------------------------------------------------------------------------- c. model
def planner_prediction(s: Shapes, transformer_cfg: dict, num_frames: int, memory_gb: float):
    """(text, predicted flops per forward) from the dry-run planner for one conditional forward."""
    from freeloc_dist.config import parse_render_config
    from freeloc_dist.planner import GiB, plan_render
    from freeloc_dist.profile import load_profile

    p = transformer_cfg["patch_size"]
    cfg = parse_render_config({
        "model": {"path": "models/unused", "dtype": "bfloat16"},
        "video": {"height": s.grid_hw[0] * 8 * p[1], "width": s.grid_hw[1] * 8 * p[2], "frames": 4 * (num_frames - 1) + 1},
        "sampling": {"steps": 1, "guidance_scale": 1.0, "max_text_tokens": s.text_tokens},
    })
    plan = plan_render(cfg, transformer_cfg, load_profile(s.profile), world_size=1, device_memory_gb=memory_gb)
    # while sampling: the text encoder (memory.text_encoder: gpu) is freed after encoding, so not in memory_bytes
    mem = sum(plan.memory_bytes.values()) - plan.memory_bytes.get("weights: text encoder", 0.0)
    text = (f">= {plan.seconds:.3g} s at {plan.peak_tflops:g} TFLOP/s ({plan.flops_per_step / 1e12:.3g} TFLOP); "
            f"{mem / GiB:.2f} GiB w/o text encoder")
    return text, plan.flops_per_step


def run_model(s: Shapes, emit, deadline, compiled: bool):
    import torch
    from diffusers import WanTransformer3DModel

    from freeloc_dist import apply_freeloc

    dev = torch.device(s.device)
    meter = Meter(dev)
    mode = "compiled" if compiled else "eager"
    memory_gb = torch.cuda.get_device_properties(dev).total_memory / 2**30 if meter.cuda else 1e6
    try:
        t0 = time.perf_counter()
        torch.manual_seed(0)
        with torch.device(dev):  # random init on the device itself: seconds, not a minute on the CPU
            model = WanTransformer3DModel(**s.model)
        apply_freeloc(model, s.profile, backend="sdpa")  # before the cast: after it, install fails (issue 12)
        model = model.to(torch.bfloat16).eval()
        build_s = time.perf_counter() - t0
        fwd = torch.compile(model) if compiled else model
    except Exception as e:  # noqa: BLE001
        for f in s.frames:
            emit(f"c/{mode}/{f}", result=f"failed building the model: {one_line(e)}")
        return
    tcfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in s.model.items()}
    previous = None  # (seconds per forward at the first frame count, its flops)
    p = s.model["patch_size"]
    for fi, num_frames in enumerate(s.frames):
        rid = f"c/{mode}/{num_frames}"
        planner, flops = None, None
        try:
            planner, flops = planner_prediction(s, tcfg, num_frames, memory_gb)
        except Exception as e:  # noqa: BLE001
            planner = f"planner failed: {one_line(e, 80)}"
        try:
            left = deadline - time.time()
            if fi > 0 and previous is None:
                emit(rid, planner=planner, result=f"skipped: the F={s.frames[0]} row failed")
                continue
            if previous is not None and flops and not compiled:  # compiled: no estimate, the section limit stops it
                estimate = previous[0] * flops / previous[1]
                if estimate > left:
                    emit(rid, planner=planner, result=f"skipped: estimated {estimate:.0f} s from F={s.frames[0]}, "
                                                      f"{left:.0f} s left")
                    continue
            g = torch.Generator(device=dev).manual_seed(1)
            latents = torch.randn(1, s.model["in_channels"], num_frames, s.grid_hw[0] * p[1], s.grid_hw[1] * p[2],
                                  generator=g, device=dev, dtype=torch.bfloat16)
            text = torch.randn(1, s.text_tokens, s.model["text_dim"], generator=g, device=dev, dtype=torch.bfloat16)
            timestep = torch.tensor([500], device=dev)

            def call():
                with torch.inference_mode():
                    return fwd(hidden_states=latents, timestep=timestep, encoder_hidden_states=text, return_dict=False)

            meter.reset()
            print(f"gpu_check: {rid} first call{' (compiles)' if compiled else ''}...", file=sys.stderr, flush=True)
            warm = meter.first(call)
            if fi == 0:  # a warm-up, then one timed forward
                sec = meter.median(call, 1)
                previous = (sec, flops or 1.0)
                note = f"first call {warm:.1f} s{' incl. compiling' if compiled else ''}"
            else:  # the long video: one call only (its plans and any recompiles included), to fit the budget
                sec, note = warm, "one call, plan building" + (" and recompiling" if compiled else "") + " included"
            emit(rid, seconds=sec, tflops=flops / sec / 1e12 if flops else None, peak_gib=meter.peak_gib(),
                 planner=planner, result=f"ok ({note}; model built in {build_s:.1f} s)")
        except Exception as e:  # noqa: BLE001
            emit(rid, planner=planner, result=f"failed: {one_line(e)}")
            if meter.cuda:
                torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------- d. calls
def run_calls(s: Shapes, emit, deadline):
    """Kernel calls, other ops, host ms and seconds per layer on one rank's shard against every key frame."""
    import torch

    from freeloc_dist.attention import flex
    from freeloc_dist.attention.calls import count_calls
    from freeloc_dist.attention.sdpa import grouped_attention
    from freeloc_dist.plan import balanced_ranges, layer_plan
    from freeloc_dist.profile import load_profile
    from freeloc_dist.rope import split_rotations

    prof = load_profile(s.profile)
    dev = torch.device(s.device)
    meter = Meter(dev)
    t_rope = wan_t_rope(s.head_dim)
    dtype = torch.bfloat16 if meter.cuda else torch.float32
    compiled_calls = [0]
    real_compiled = flex._compiled_flex()

    def counting_flex(*args, **kwargs):
        compiled_calls[0] += 1
        return real_compiled(*args, **kwargs)

    flex._compiled_flex = lambda: counting_flex  # the backend fetches its compiled kernel through this
    for num_frames in s.calls_frames:
        grid = (num_frames, *s.grid_hw)
        n = s.grid_hw[0] * s.grid_hw[1]
        lo, hi = balanced_ranges(num_frames, s.calls_ranks)[s.calls_ranks // 2]
        own, every = tuple(range(lo, hi)), tuple(range(num_frames))
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(1, num_frames * n, s.heads, s.head_dim, generator=g, device=dev, dtype=dtype)
                   for _ in range(3))
        cos, sin = (t.to(dev) for t in wan_rotary(grid, s.head_dim, t_rope))
        frames = torch.arange(num_frames, device=dev).repeat_interleave(n)
        q_nat, k_nat, q0, k0 = (x.transpose(1, 2) for x in split_rotations(q, k, (cos, sin), t_rope, frames))
        q_nat, q0 = (x[:, :, lo * n:hi * n] for x in (q_nat, q0))  # the shard's queries, rotated as the whole video's
        vt = v.transpose(1, 2)
        seconds = {}
        for backend in ("sdpa", "flex"):
            for kind in CALL_KINDS:
                rid = f"d/{kind}/{backend}/{num_frames}"
                if backend not in s.calls_backends:
                    emit(rid, result="skipped: --smoke runs sdpa only here (flex compiles per shape; section b runs it)")
                    continue
                if time.time() > deadline - 5:
                    emit(rid, result="skipped: section time used up")
                    continue
                try:
                    base, _, long = kind.partition("+")
                    plan = layer_plan(base, grid, prof.trained_frames, prof.vrpr, prof.tsa,
                                      long_range={k_: (list(v_) if isinstance(v_, tuple) else v_)
                                                  for k_, v_ in s.long_range} if long else None)
                    if backend == "sdpa":
                        call = lambda plan=plan: grouped_attention(q_nat, k_nat, q0, k0, vt, plan, t_rope,
                                                                   query_frames=own, key_frames=every)
                    else:
                        call = lambda plan=plan: flex.flex_freeloc_attention(q0, k0, vt, plan, t_rope, query_frames=own,
                                                                             key_frames=every)
                    print(f"gpu_check: {rid}...", file=sys.stderr, flush=True)
                    meter.reset()
                    warm = meter.first(call)  # plans, schedules, compiling
                    if backend == "sdpa":
                        counted = count_calls(call)[0]
                        fused, other = counted.fused, f"{counted.other:,}"
                    else:
                        compiled_calls[0] = 0
                        call()
                        fused, other = compiled_calls[0], "-"
                    meter.reset()
                    t0 = time.perf_counter()
                    call()
                    host_ms = (time.perf_counter() - t0) * 1e3  # issued, not yet synchronised (CPU: all of it)
                    sec = meter.median(call, 2 if meter.cuda else 1)
                    seconds[(backend, kind)] = sec
                    emit(rid, seconds=sec, peak_gib=meter.peak_gib(),
                         result=f"ok: {fused:,} kernel calls, {other} other ops, host {host_ms:,.1f} ms; "
                                f"shard {hi - lo} frames, warm-up {warm:.1f} s")
                except Exception as e:  # noqa: BLE001
                    emit(rid, result=f"failed: {one_line(e)}")
                    if meter.cuda:
                        torch.cuda.empty_cache()
        totals = {b: sum(seconds.get((b, kind_), math.nan) for kind_ in CALL_KINDS) for b in ("sdpa", "flex")}
        measured = {b: t for b, t in totals.items() if not math.isnan(t)}
        if len(measured) == 2:
            winner = min(measured, key=measured.get)
            verdict = f"{winner} wins: sdpa {totals['sdpa']:.3g} s, flex {totals['flex']:.3g} s (sum of the three kinds)"
        else:
            verdict = f"no verdict: measured {', '.join(measured) or 'none'} ({', '.join(f'{b} {t:.3g} s' for b, t in measured.items())})"
        emit(f"d/winner/{num_frames}", result=verdict)
        del q, k, v, q_nat, k_nat, q0, k0, vt

# -------------------------------------------------------------------------------- processes
def child(args):
    """One section in this process; each finished row is appended to --rows-file as one JSON line."""
    s = shapes(args.smoke)

    def emit(rid, **cells):
        with open(args.rows_file, "a") as fh:
            fh.write(json.dumps({"id": rid, **cells}) + "\n")
        print(f"gpu_check: {rid}: {cells.get('result', '')}", file=sys.stderr, flush=True)

    if args.section == "correctness":
        run_correctness(s, emit, args.deadline)
    elif args.section == "attention":
        run_attention(s, emit, args.deadline, args.row_guard_s)
    elif args.section == "calls":
        run_calls(s, emit, args.deadline)
    else:
        run_model(s, emit, args.deadline, compiled=args.section == "model-compiled")


def environment(smoke: bool) -> list[str]:
    import torch

    versions = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for name in ("triton", "diffusers"):
        try:
            versions.append(f"{name} {__import__(name).__version__}")
        except Exception:  # noqa: BLE001
            versions.append(f"{name} absent")
    gpu = "cpu (--smoke: tiny shapes, CPU kernels)" if smoke else (
        f"{torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}" if torch.cuda.is_available() else "NO CUDA DEVICE")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return [f"# freeloc_dist GPU check, {stamp}", "", f"{gpu}; {', '.join(versions)}"]


def parent(args):
    s = shapes(args.smoke)
    out = args.out or os.path.join(ROOT, "outputs", "gpu_check_smoke.md" if args.smoke else "gpu_check.md")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    sections = [x for x in args.sections.split(",") if x]
    unknown = [x for x in sections if x not in SECTIONS]
    if unknown:
        print(f"error: --sections: unknown {', '.join(unknown)}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        sys.exit(2)
    header = environment(args.smoke)
    if not args.smoke:
        import torch

        if not torch.cuda.is_available():  # still write the table: every row says why
            header.append("**no CUDA device: nothing measured (use --smoke on CPU)**")
            sections = []
    results: dict[str, dict] = {}
    missing: dict[str, str] = {}
    start = time.time()
    rows_file = out + ".rows.jsonl"
    for i, section in enumerate(sections):
        left = args.budget_s - (time.time() - start)
        share = left * WEIGHTS[section] / sum(WEIGHTS[x] for x in sections[i:])
        if section == "model-compiled":
            share = min(share, args.compile_limit_s)
        if os.path.exists(rows_file):
            os.remove(rows_file)
        cmd = [sys.executable, os.path.abspath(__file__), "--section", section, "--rows-file", rows_file,
               "--deadline", str(time.time() + share - 10), "--row-guard-s", str(args.row_guard_s)]
        cmd += ["--smoke"] if args.smoke else []
        t0 = time.time()
        print(f"gpu_check: section {section}, {share:.0f} s", file=sys.stderr, flush=True)
        # Own process group: on timeout the section and everything it started (compile workers) are killed.
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        try:
            err = proc.communicate(timeout=share)[1]
            tail = [ln for ln in err.strip().splitlines() if ln.strip()]
            why = f"section process exited {proc.returncode}: {tail[-1][:150] if tail else ''}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            err = proc.communicate()[1]
            doing = [ln for ln in err.splitlines() if ln.startswith("gpu_check: ") and ln.endswith("...")]
            why = f"section stopped at its {share:.0f} s limit" + (f", in {doing[-1][11:-3]}" if doing else "")
        sys.stderr.write(err)
        if os.path.exists(rows_file):
            with open(rows_file) as fh:
                for line in fh:
                    if line.strip():
                        r = json.loads(line)
                        results[r.pop("id")] = r
        missing[section] = why
        print(f"gpu_check: section {section} done in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
        with open(out, "w") as fh:  # rewritten after every section: a killed run still leaves a table
            fh.write(render_table(s, results, missing, header))
    if os.path.exists(rows_file):
        os.remove(rows_file)
    header.append(f"total {time.time() - start:.0f} s of a {args.budget_s:g} s budget")
    table = render_table(s, results, missing, header)
    with open(out, "w") as fh:
        fh.write(table)
    print(table)
    print(f"gpu_check: table written to {out}", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: the same code paths in seconds")
    ap.add_argument("--out", help="markdown table file (default outputs/gpu_check[_smoke].md)")
    ap.add_argument("--budget-s", type=float, help="wall-clock budget of all sections (default 450; --smoke 1800)")
    ap.add_argument("--compile-limit-s", type=float,
                    help="cap on the model-compiled section (default: its share of the budget; --smoke 20: on CPU "
                         "the first compile takes minutes, so the smoke checks that the section runs, is stopped "
                         "at its limit and says so)")
    ap.add_argument("--row-guard-s", type=float, default=60.0,
                    help="skip a backend's F=241 row when its F=81 row took longer than this (default 60)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--section", help=argparse.SUPPRESS)  # internal: run one section in this process
    ap.add_argument("--rows-file", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=math.inf, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.budget_s is None:
        args.budget_s = 1800.0 if args.smoke else 450.0
    if args.compile_limit_s is None:
        args.compile_limit_s = 20.0 if args.smoke else math.inf
    if args.section:
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
