"""How fast the shapes world makes samples: scene, picture, captions and questions, one at a time.

    .venv/bin/python benchmarks/world_throughput.py [--n 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import time

from kosmo.data.world import World


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000, help="samples per round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    world = World()
    rates = []
    for r in range(args.rounds):
        t0 = time.perf_counter()
        for i in range(r * args.n, (r + 1) * args.n):
            scene = world.scene(i)
            world.render(scene)
            world.captions(scene)
            world.vqa(scene, i)
        rates.append(args.n / (time.perf_counter() - t0))
    print(f"shapes world: {max(rates):.0f} samples/s (best of {args.rounds} rounds of {args.n})")


if __name__ == "__main__":
    main()
