"""Train the testbed's toy Wan on the procedural world (see freeloc_dist/testbed/train.py).

    python launch/train_toy.py --out runs/toy-wan --minutes 55 --decoder-every 0
    python launch/train_toy.py --decoder-only assets/toy-wan --out runs/toy-vae --minutes 75   # beside it
    cp -r runs/toy-wan/. assets/toy-wan/ && cp -r runs/toy-vae/vae/. assets/toy-wan/vae/   # ship it

Runs on one CPU thread by default; the checkpoint is rewritten every few minutes, so it is usable mid-run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from freeloc_dist.families.wan.toy_train import TrainConfig, train  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/toy-wan"))
    p.add_argument("--minutes", type=float, default=70.0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--decoder-every", type=int, default=6,
                   help="a decoder step every N transformer steps (0: none, train it with --decoder-only)")
    p.add_argument("--trained-frames", type=int, default=None, help="latent frames per clip (default: model.py's)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (default: model.py's)")
    p.add_argument("--head-dim", type=int, default=None,
                   help="attention head dim (default: model.py's); the temporal RoPE gets head_dim - 4 (head_dim // 6)")
    p.add_argument("--decoder-only", type=Path, default=None, metavar="INIT_DIR",
                   help="train only the VAE decoder, starting from INIT_DIR/vae; writes OUT/vae")
    a = p.parse_args(argv)
    if a.decoder_only is not None:
        from freeloc_dist.families.wan.toy_train import train_decoder

        train_decoder(a.decoder_only, a.out, a.minutes, threads=a.threads, seed=a.seed + 1)
        return 0
    overrides = {k: v for k, v in (("num_attention_heads", a.heads), ("attention_head_dim", a.head_dim))
                 if v is not None}
    extra = {"trained_frames": a.trained_frames} if a.trained_frames is not None else {}
    train(TrainConfig(out_dir=a.out, minutes=a.minutes, batch=a.batch, threads=a.threads, seed=a.seed,
                      max_steps=a.max_steps, decoder_every=a.decoder_every, transformer_overrides=overrides or None,
                      **extra))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
