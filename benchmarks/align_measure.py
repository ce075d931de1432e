"""The demo's vision and alignment sections with chosen knobs, for measuring the alignment recipe on a
machine too busy for the full budget.

    .venv/bin/python benchmarks/align_measure.py --out /tmp/align-measure n=1000 eval_n=100 warmup_steps=100

Knobs are those of `BUDGETS` in kosmo/demo/__init__.py, kosmo/demo/vision.py and kosmo/demo/align.py,
on top of the quick budget (or the full one with --full). The report lands in OUT/report.md.
"""

from __future__ import annotations

import argparse

import yaml

from kosmo.demo import run_demo


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--full", action="store_true", help="start from the full budget, not the quick one")
    ap.add_argument("knobs", nargs="*", metavar="key=value")
    args = ap.parse_args()
    recipe = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.knobs)}
    run_demo(args.out, budget="full" if args.full else "quick", recipe=recipe, sections=("vision", "align"))


if __name__ == "__main__":
    main()
