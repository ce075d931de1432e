"""How many steps of episodes does in-context learning take? Continues a run of the demo's
architectures section on the shapes world's training episodes alone, then measures the few-shot curve.

    kosmo demo --sections flamingo --out out
    python benchmarks/fewshot_budget.py --demo out --init kosmos --steps 300
    python benchmarks/fewshot_budget.py --demo out --init kosmos --steps 1000 --task recall

`--task recall` trains and measures picture recall instead, the barest form of an episode: four
pictures, each named by its own nonce word, then the same four again, shuffled, named again.
Naming a picture the second time needs no rule, only matching it with the identical picture earlier
in the document and copying the word after that one. The held-out documents end at one of the
repeated pictures, whose word is ranked against the document's other three (chance 25%). The
section writes these documents (data/recall.jsonl, data/val_recall.jsonl); for an output folder of
an older section they are written first.

Prints one JSON line: the run, the extra steps, their wall-clock time and the curve.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from kosmo.data.world import World
from kosmo.demo import BUDGETS
from kosmo.demo.flamingo import write_recall
from kosmo.eval.fewshot import fewshot
from kosmo.model.load import load_run
from kosmo.train.run import run_stage

STAGES = {"mllm": "mllm", "flamingo": "flamingo"}  # run config "stage" -> the stage that continues it


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", required=True, help="output folder of `kosmo demo --sections flamingo`")
    p.add_argument("--init", default="kosmos", help="run to continue: kosmos or flamingo")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--task", default="episodes", choices=("episodes", "recall"))
    p.add_argument("--shots", default="0,2,4,8", help="for episodes; recall is measured at 0 and 4")
    p.add_argument("--limit", type=int, default=200)
    args = p.parse_args()
    if args.steps < 1:
        p.error(f"--steps must be at least 1, got {args.steps}")
    demo = Path(args.demo)
    init = demo / "runs" / args.init
    for needed in (init / "config.json", demo / "data" / "images"):
        if not needed.exists():
            p.error(f"{needed} not found: --demo must be the output folder of `kosmo demo --sections flamingo`")
    stage = json.loads((init / "config.json").read_text())["stage"]
    if stage not in STAGES:
        p.error(f"{init} is a {stage} run; --init must name a kosmos (mllm) or flamingo run")
    if args.task == "recall":
        train, val = demo / "data" / "recall.jsonl", demo / "data" / "val_recall.jsonl"
        if not val.exists():
            write_recall(World(image_size=BUDGETS["default"]["image_size"]), demo / "data")
        shots = [0, 4]
    else:
        train, val = demo / "data" / "episodes.jsonl", demo / "data" / "val_episodes.jsonl"
        shots = [int(s) for s in args.shots.split(",")]
    out = demo / "runs" / f"{args.init}-{args.task}-{args.steps}"
    t0 = time.time()
    run_stage(STAGES[stage], [train], out, init=init,
              overrides=[f"train.max_steps={args.steps}", "train.batch_size=16", "train.lr=1e-3", "seq_len=192",
                         "train.warmup_steps=20", "train.progress=false", "train.tensorboard=false",
                         "train.eval_every=0", *(["freeze=connector+lm"] if stage == "mllm" else [])])
    seconds = time.time() - t0
    model, tok, _ = load_run(out)
    curve = fewshot(model, tok, val, shots, limit=args.limit)
    print(json.dumps({"run": str(out), "steps": args.steps, "train_s": round(seconds, 1), **curve}))


if __name__ == "__main__":
    main()
