"""Write the tiny random Wan model (freeloc_dist.tiny) in diffusers format.

    python launch/make_tiny.py --out assets/tiny-wan [--seed 0]

assets/tiny-wan/ in the repository was made with the defaults; it is the model of configs/tiny-random.yaml.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from freeloc_dist.tiny import save_tiny_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    args = parser.parse_args()
    out = save_tiny_model(args.out, seed=args.seed)
    print(out)


if __name__ == "__main__":
    main()
