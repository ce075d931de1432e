"""How many steps of episodes does in-context learning take? Continues a run of the demo's
architectures section on the shapes world's training episodes alone, then measures the few-shot curve.

    kosmo demo --sections flamingo --out out
    python benchmarks/fewshot_budget.py --demo out --init kosmos --steps 300
    python benchmarks/fewshot_budget.py --demo out --init kosmos --steps 1000 --task recall
    python benchmarks/fewshot_budget.py --demo out --task recall --data-only   # just the recall documents

`--task recall` trains and measures picture recall instead, the barest form of an episode: four
pictures, each named by its own nonce word, then the same four again, shuffled, named again.
Naming a picture the second time needs no rule, only matching it with the identical picture earlier
in the document and copying the word after that one. The held-out documents end at one of the
repeated pictures, whose word is ranked against the document's other three (chance 25%).

Prints one JSON line: the run, the extra steps, their wall-clock time and the curve.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from kosmo.data.world import EPISODE_EXAMPLE, EPISODE_QUERY, NONCE_WORDS, World
from kosmo.demo import BUDGETS
from kosmo.demo.flamingo import image_part
from kosmo.eval.fewshot import fewshot
from kosmo.model.load import load_run
from kosmo.train.run import run_stage

STAGES = {"mllm": "mllm", "flamingo": "flamingo"}  # run config "stage" -> the stage that continues it


def write_recall(world: World, data: Path, n_train: int = 4000, n_val: int = 200,
                 pictures: int = 4) -> tuple[Path, Path]:
    """Picture-recall documents beside the demo's data, sharing its images folder: training documents
    name every picture twice; held-out ones end at a repeated picture, with its word as the answer."""
    train, val = data / "recall.jsonl", data / "val_recall.jsonl"

    def document(i: int, split: str) -> tuple[list[tuple], list[tuple]]:
        """The pictures with their words, then the same pairs shuffled."""
        rng = random.Random(f"recall-{split}-{i}")
        named = list(zip([world.scene(pictures * i + j, split) for j in range(pictures)],
                         rng.sample(NONCE_WORDS, pictures)))
        return named, rng.sample(named, pictures)

    def parts(pairs: list[tuple]) -> list[dict]:
        return [part for scene, label in pairs
                for part in (image_part(world, data, scene), {"text": EPISODE_EXAMPLE.format(label=label)})]

    with train.open("w") as f:
        for i in range(n_train):
            named, again = document(i, "train")
            f.write(json.dumps({"content": parts(named + again)}) + "\n")
    with val.open("w") as f:
        for i in range(n_val):
            named, again = document(i, "val")
            scene, label = again[0]
            f.write(json.dumps({"content": parts(named) + [image_part(world, data, scene), {"text": EPISODE_QUERY}],
                                "answer": label, "labels": [word for _, word in named]}) + "\n")
    return train, val


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", required=True, help="output folder of `kosmo demo --sections flamingo`")
    p.add_argument("--init", default="kosmos", help="run to continue: kosmos or flamingo")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--task", default="episodes", choices=("episodes", "recall"))
    p.add_argument("--shots", default="0,2,4,8", help="for episodes; recall is measured at 0 and 4")
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--data-only", action="store_true", help="write the recall documents into DEMO/data and stop")
    args = p.parse_args()
    if args.steps < 1:
        p.error(f"--steps must be at least 1, got {args.steps}")
    if args.data_only and args.task != "recall":
        p.error("--data-only writes the recall documents, so it needs --task recall")
    demo = Path(args.demo)
    init = demo / "runs" / args.init
    for needed in (init / "config.json", demo / "data" / "images"):
        if not needed.exists():
            p.error(f"{needed} not found: --demo must be the output folder of `kosmo demo --sections flamingo`")
    stage = json.loads((init / "config.json").read_text())["stage"]
    if stage not in STAGES:
        p.error(f"{init} is a {stage} run; --init must name a kosmos (mllm) or flamingo run")
    if args.task == "recall":
        train, val = write_recall(World(image_size=BUDGETS["default"]["image_size"]), demo / "data")
        shots = [0, 4]
        if args.data_only:
            print(json.dumps({"train": str(train), "val": str(val)}))
            return
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
