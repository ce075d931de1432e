"""Does Flamingo learn to name pictures from context, seed after seed? Trains the architectures
section's Flamingo arm over a frozen LM (one that can copy, say) once per seed, and measures each run.

    kosmo demo --sections flamingo --out out
    kosmo train lm ... --out out/runs/lm-icl ...      # docs/architectures.md gives the command
    python benchmarks/flamingo_seeds.py --demo out --lm lm-icl --seeds 0,1,2 --steps 1600

Each run trains on the section's files (captions, interleaved documents, VQA documents, episodes)
plus the picture-recall documents, at the section's batch, learning rate and Flamingo shape, with
the gates' learning rate scaled by --gate-lr (--attn-gate-lr sets the attention gates' apart).
Whether the pictures reach the LM is decided by the tanh gates of the cross-attention: they start
at 0, and in a short run they either open or stay shut. So beside the held-out few-shot accuracy
(episodes at 0 and 4 shots, recall at 0 and 4) each line reports every gate's tanh.

Prints one JSON line per seed. On 2 CPU cores a 1,600-step run takes about 11 minutes, and its
evaluation about 5 more.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fewshot_budget import write_recall

from kosmo.data.world import World
from kosmo.demo import BUDGETS
from kosmo.demo.flamingo import BUDGETS as SECTION
from kosmo.errors import KosmoError
from kosmo.eval.fewshot import fewshot
from kosmo.model.load import load_run
from kosmo.train.run import run_stage


def gates(model) -> dict:
    """tanh of every gate, by block and kind: {"0.attn": 0.01, "0.ffw": -0.2, ...}."""
    return {f"{block}.{kind}": round(float(getattr(layer, f"{kind}_gate").tanh()), 3)
            for block, layer in model.xattn.items() for kind in ("attn", "ffw")}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", required=True, help="output folder of `kosmo demo --sections flamingo`")
    p.add_argument("--lm", default="lm", help="the run under DEMO/runs whose LM Flamingo freezes")
    p.add_argument("--seeds", default="0,1", help="comma-separated train.seed values")
    p.add_argument("--steps", type=int, default=1600)
    p.add_argument("--gate-lr", type=float, default=30.0, help="learning-rate multiplier of every gate")
    p.add_argument("--attn-gate-lr", type=float, help="the attention gates' multiplier, if not --gate-lr")
    p.add_argument("--limit", type=int, default=200, help="held-out documents per measurement")
    args = p.parse_args()
    demo = Path(args.demo)
    lm = demo / "runs" / args.lm
    for needed in (lm / "config.json", demo / "runs" / "clip" / "config.json", demo / "data" / "episodes.jsonl"):
        if not needed.exists():
            p.error(f"{needed} not found: --demo must be the output folder of `kosmo demo --sections flamingo`")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if args.steps < 1:
        p.error(f"--steps must be at least 1, got {args.steps}")
    data = demo / "data"
    if not (data / "val_recall.jsonl").exists():
        write_recall(World(image_size=BUDGETS["default"]["image_size"]), data)
    files = [data / f"{name}.jsonl" for name in ("captions", "interleaved", "vqa_docs", "episodes", "recall")]
    b = SECTION["default"]
    rates = [f"train.lr_scale.*_gate={args.gate_lr}"]
    if args.attn_gate_lr is not None:
        rates = [f"train.lr_scale.*ffw_gate={args.gate_lr}", f"train.lr_scale.*attn_gate={args.attn_gate_lr}"]
    for seed in seeds:
        out = demo / "runs" / f"flamingo-{args.lm}-seed{seed}"
        t0 = time.time()
        try:
            run_stage("flamingo", files, out, init=lm, overrides=[
                f"train.max_steps={args.steps}", f"train.batch_size={b['arch_batch']}", f"train.lr={b['arch_lr']}",
                "seq_len=192", "train.warmup_steps=20", f"vision={demo / 'runs' / 'clip'}",
                f"latents={b['latents']}", f"cross_every={b['cross_every']}", f"train.seed={seed}", *rates,
                "train.progress=false", "train.tensorboard=false", "train.eval_every=0"])
        except KosmoError as e:  # a bad rate, or an --lm run that is no LM: the stage's own one-line message
            p.error(str(e))
        seconds = time.time() - t0
        model, tok, _ = load_run(out)
        curves = {task: fewshot(model, tok, data / f"val_{task}.jsonl", [0, 4], limit=args.limit)
                  for task in ("episodes", "recall")}
        print(json.dumps({"run": str(out), "seed": seed, "steps": args.steps, "train_s": round(seconds, 1),
                          "gates": gates(model), **{task: {"curve": c["curve"], "blind": c["blind"]}
                                                    for task, c in curves.items()}}), flush=True)


if __name__ == "__main__":
    main()
