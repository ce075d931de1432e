"""How many steps of episodes does in-context learning take? Continues a run of the demo's
architectures section on the shapes world's training episodes alone, then measures the few-shot curve.

    kosmo demo --sections flamingo --out out
    python benchmarks/fewshot_budget.py --demo out --init kosmos --steps 300

Prints one JSON line: the run, the extra steps, their wall-clock time and the episode curve.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from kosmo.eval.fewshot import fewshot
from kosmo.model.load import load_run
from kosmo.train.run import run_stage

STAGES = {"mllm": "mllm", "flamingo": "flamingo"}  # run config "stage" -> the stage that continues it


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", required=True, help="output folder of `kosmo demo --sections flamingo`")
    p.add_argument("--init", default="kosmos", help="run to continue: kosmos or flamingo")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--shots", default="0,2,4,8")
    p.add_argument("--limit", type=int, default=200)
    args = p.parse_args()
    demo = Path(args.demo)
    init = demo / "runs" / args.init
    stage = json.loads((init / "config.json").read_text())["stage"]
    out = demo / "runs" / f"{args.init}-episodes-{args.steps}"
    t0 = time.time()
    run_stage(STAGES[stage], [demo / "data" / "episodes.jsonl"], out, init=init,
              overrides=[f"train.max_steps={args.steps}", "train.batch_size=16", "train.lr=1e-3", "seq_len=192",
                         "train.warmup_steps=20", "train.progress=false", "train.tensorboard=false",
                         "train.eval_every=0", *(["freeze=connector+lm"] if stage == "mllm" else [])])
    seconds = time.time() - t0
    model, tok, _ = load_run(out)
    shots = [int(s) for s in args.shots.split(",")]
    curve = fewshot(model, tok, demo / "data" / "val_episodes.jsonl", shots, limit=args.limit)
    print(json.dumps({"run": str(out), "steps": args.steps, "train_s": round(seconds, 1), **curve}))


if __name__ == "__main__":
    main()
