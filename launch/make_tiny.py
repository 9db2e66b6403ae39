"""Write the tiny random Wan model (freeloc_dist.families.wan.tiny) in diffusers format.

    python launch/make_tiny.py --out assets/tiny-wan [--seed 0] [--family t2v|a14b|...|hunyuan|hunyuan15|hunyuan15-i2v]

assets/tiny-wan/ in the repository was made with the defaults; it is the model of configs/tiny-random.yaml.
assets/tiny-a14b/ (--family a14b: two experts, Wan2.2-T2V-A14B's structure) is configs/tiny-random-a14b.yaml's.
assets/tiny-i2v/ (--family i2v: Wan2.1-I2V's, CLIP included), assets/tiny-i2v-a14b/ (--family i2v-a14b:
Wan2.2-I2V-A14B's) and assets/tiny-flf2v/ (--family flf2v: Wan2.1-FLF2V's) are configs/tiny-random-i2v*.yaml's.
assets/tiny-ti2v/ (--family ti2v: Wan2.2-TI2V-5B's 48-channel residual VAE and per-token timesteps) is
configs/tiny-random-ti2v.yaml's.
assets/tiny-hunyuan/ (--family hunyuan: HunyuanVideo's structure, freeloc_dist.families.hunyuan_video.tiny) is
configs/tiny-random-hunyuan.yaml's.
assets/tiny-hunyuan15/ (--family hunyuan15) and assets/tiny-hunyuan15-i2v/ (--family hunyuan15-i2v: HunyuanVideo 1.5's
structure, freeloc_dist.families.hunyuan_video15.tiny) are configs/tiny-random-hunyuan15*.yaml's.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from freeloc_dist.families.hunyuan_video.tiny import save_tiny_model as save_tiny_hunyuan_model  # noqa: E402
from freeloc_dist.families.hunyuan_video15.tiny import save_tiny_i2v_model as save_tiny_hunyuan15_i2v  # noqa: E402
from freeloc_dist.families.hunyuan_video15.tiny import save_tiny_model as save_tiny_hunyuan15  # noqa: E402
from freeloc_dist.families.wan.tiny import (  # noqa: E402
    save_tiny_a14b_model,
    save_tiny_flf2v_model,
    save_tiny_i2v_a14b_model,
    save_tiny_i2v_model,
    save_tiny_model,
    save_tiny_ti2v_model,
)

FAMILIES = {"hunyuan": save_tiny_hunyuan_model, "hunyuan15": save_tiny_hunyuan15,
            "hunyuan15-i2v": save_tiny_hunyuan15_i2v,
            "t2v": save_tiny_model, "a14b": save_tiny_a14b_model, "i2v": save_tiny_i2v_model,
            "i2v-a14b": save_tiny_i2v_a14b_model, "flf2v": save_tiny_flf2v_model, "ti2v": save_tiny_ti2v_model}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    parser.add_argument("--family", choices=FAMILIES, default="t2v", help="model structure (default t2v)")
    args = parser.parse_args()
    out = FAMILIES[args.family](args.out, seed=args.seed)
    print(out)


if __name__ == "__main__":
    main()
