"""Peak and resident host memory (RSS) of renders under each `memory:` setting, against the planner's figures.

    python bench/memory.py [--out bench/results/memory.json]

The tiny test models (about 1 MB of weights) vanish under the ~0.5 GB a Python process with torch holds, so this
benchmark builds a *medium* random model with Wan2.2-T2V-A14B's structure first (two experts of 8 blocks at
width 512: 34 M parameters, 135 MB each in float32; a UMT5 text encoder of 4 layers at width 512; the tiny VAE and
tokenizer), then renders 9 frames at 32x32 in 2 steps (one on each expert: the swap runs) once per setting, each in
fresh processes: one process, and two gloo ranks under torchrun for the settings that act across ranks. Each rank
reports from /proc/self/status VmHWM (peak RSS of the whole run) and VmRSS at the end of sampling, with every
weight of the render still held (after malloc_trim, so memory freed before is returned), and the bytes of every
tensor storage alive then (what the settings decide, without the allocator's and the runtime's share).

On a CPU the render device *is* host memory: offloading an expert to the host or encoding on the "gpu" cannot
lower RSS there, and the text encoder and the whole transformer are loaded before anything is freed or sharded,
so peaks include them; only what a rank never loads (text_encoder: rank0 on rank 1) or stops holding (the text
encoder after encoding, shards of the blocks) can show, in the RSS at the end of sampling. The planner's figure
for each is printed beside the measured one.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MB = 2**20
WIDTH, HEADS, FFN, LAYERS = 512, 8, 2048, 8  # the experts (head_dim 64: Wan's RoPE split 32/16/16)
TEXT = {"d_model": WIDTH, "d_ff": FFN, "num_layers": 4, "num_heads": 8, "d_kv": 64}


def build_model(out: Path) -> Path:
    """assets/tiny-a14b with both experts and the text encoder replaced by medium random ones."""
    import torch
    from diffusers import WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    shutil.copytree(ROOT / "assets" / "tiny-a14b", out)
    torch.manual_seed(0)
    for sub in ("transformer", "transformer_2"):
        config = json.loads((out / sub / "config.json").read_text())
        config.update(num_attention_heads=HEADS, attention_head_dim=WIDTH // HEADS, ffn_dim=FFN, num_layers=LAYERS,
                      text_dim=WIDTH)
        for f in (out / sub).glob("*.safetensors"):
            f.unlink()
        WanTransformer3DModel.from_config(config).save_pretrained(out / sub)
    te = json.loads((out / "text_encoder" / "config.json").read_text())
    for f in (out / "text_encoder").glob("*.safetensors"):
        f.unlink()
    UMT5EncoderModel(UMT5Config(**{**te, **TEXT})).save_pretrained(out / "text_encoder")
    return out


def worker(argv: list[str], out: Path) -> int:
    """One rank: render in this process, then report its memory."""
    sys.path.insert(0, str(ROOT / "tests"))
    from _scripts import load_script

    import freeloc_dist.sampling as sampling

    seen = {}
    sample = sampling.sample

    def measured(*args, **kwargs):  # at the end of sampling, everything of the render still held
        latents = sample(*args, **kwargs)
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        seen.update(memory_kb(), held=tensor_bytes())
        return latents

    sampling.sample = measured
    code = load_script("launch/generate.py").main(argv)
    rank = os.environ.get("RANK", "0")
    (out / f"rank{rank}.json").write_text(json.dumps({"code": code, "peak_mb": memory_kb()["VmHWM"] / 1024,
                                                      "rss_mb": seen["VmRSS"] / 1024,
                                                      "tensors_mb": seen["held"] / MB}))
    return code


def tensor_bytes() -> int:
    """Bytes of every tensor storage alive in this process (a DTensor's local shard; freed storages count 0)."""
    import gc
    import warnings

    import torch

    storages = {}
    with warnings.catch_warnings():  # isinstance on torch.distributed's deprecated module attributes warns
        warnings.simplefilter("ignore")
        objects = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in objects:
        t = obj._local_tensor if hasattr(obj, "_local_tensor") else obj
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            continue
        if storage.device.type == "cpu" and storage.nbytes():
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def memory_kb() -> dict[str, int]:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {k: int(status[k].split()[0]) for k in ("VmHWM", "VmRSS")}


SETTINGS = [  # (name, ranks, flags)
    ("resident", 1, ["--experts", "resident"]),
    ("offload (default)", 1, []),
    ("text_encoder cpu + offload", 1, ["--text-encoder", "cpu"]),
    ("2 ranks resident", 2, ["--experts", "resident"]),
    ("2 ranks text_encoder rank0", 2, ["--experts", "resident", "--text-encoder", "rank0"]),
    ("2 ranks shard_weights", 2, ["--shard-weights", "true"]),
]


def predicted(model: Path) -> dict[str, float]:
    """The planner's per-rank byte differences this benchmark can observe (freeloc_dist.memory_plan)."""
    from freeloc_dist.families.wan.counts import block_params, text_encoder_params, transformer_params

    t = json.loads((model / "transformer" / "config.json").read_text())
    te = json.loads((model / "text_encoder" / "config.json").read_text())
    return {"text encoder (rank0: rank 1 never loads it)": text_encoder_params(te) * 4,
            "both experts' blocks less their 1/2 shards": 2 * t["num_layers"] * block_params(t) * 4 / 2,
            "one expert (offload: on the host either way here)": transformer_params(t) * 4}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "memory.json")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.worker is not None:
        return worker(rest, args.worker)
    scratch = Path(tempfile.mkdtemp(prefix="freeloc-memory-"))
    model = build_model(scratch / "model")
    config = scratch / "medium.yaml"
    config.write_text((ROOT / "configs" / "tiny-random-a14b.yaml").read_text().replace(
        "path: assets/tiny-a14b", f"path: {model}"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    results = {}
    for name, ranks, flags in SETTINGS:
        folder = scratch / name.replace(" ", "_")
        folder.mkdir()
        argv = ["--config", str(config), "--frames", "9", "--height", "32", "--width", "32", "--steps", "2",
                "--profile", "none", "--profile-2", "none", "--quiet", "--out", str(folder / "v.mp4"), *flags]
        launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                        "--standalone", f"--nproc_per_node={ranks}"]
        subprocess.run([*launcher, __file__, "--worker", str(folder), *argv], env=env, check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL)
        results[name] = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(ranks)]
        print(f"{name:<28}" + "  ".join(f"rank {r}: peak {x['peak_mb']:6.1f}, sampled {x['rss_mb']:6.1f}, "
                                        f"tensors {x['tensors_mb']:6.1f} MB"
                                        for r, x in enumerate(results[name])), flush=True)
    plan = predicted(model)
    for what, value in plan.items():
        print(f"planner: {what}: {value / MB:.1f} MB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"results": results, "planner_mb": {k: v / MB for k, v in plan.items()}},
                                   indent=1))
    shutil.rmtree(scratch)
    return 0


if __name__ == "__main__":
    from freeloc_dist.parallel.exit import exit_process

    exit_process(main())
