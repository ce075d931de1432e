"""Does Flamingo learn to name pictures from context, seed after seed? Trains the architectures
section's Flamingo arm over a frozen LM (by default the section's runs/lm-icl) once per seed, and
measures each run.

    kosmo demo --full --sections flamingo --out out
    python research/flamingo_seeds.py --demo out --seeds 1,2,3
    python research/flamingo_seeds.py --demo out --seeds 1,2 --ffw-gate-lr 30   # with gated feed-forwards, learning

Each run trains on the section's files (captions, interleaved documents, VQA documents, episodes,
picture recall) at the section's steps, batch, learning rate, Flamingo shape and gate learning rates,
unless --steps or --attn-gate-lr say otherwise; --ffw-gate-lr gives the blocks the gated feed-forwards
the section leaves out, their gates learning at that multiple of the rate. Whether the pictures reach the LM is
decided by the tanh gates of the cross-attention: they start at 0, and in a short run they either
open or stay shut. So beside the held-out few-shot accuracy (episodes and recall at 0 and 4 shots)
each line reports every gate's tanh at the end, and how often each attention gate changed sign on
the way (every step's gates are in the run's metrics.jsonl).

Prints one JSON line per seed. On 2 CPU cores a 1,200-step run takes about 7 minutes, and its
evaluation about 2 more.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from kosmo.demo.flamingo import BUDGETS as SECTION
from kosmo.errors import KosmoError
from kosmo.eval.fewshot import fewshot
from kosmo.eval.runs import metrics
from kosmo.model.load import load_run
from kosmo.train.run import run_stage


def gates(model) -> dict:
    """tanh of every gate, by block and kind: {"0.attn": 0.01, "0.ffw": -0.2, ...}."""
    return {f"{block}.{kind}": round(float(gate.tanh()), 3) for block, layer in model.xattn.items()
            for kind, gate in (("attn", layer.attn_gate), ("ffw", layer.ffw_gate)) if gate is not None}


def sign_changes(run: Path) -> dict:
    """How often each attention gate changed sign during training, from the run's metrics.jsonl. Its
    cross-attention learns in the direction the gate's sign gives, so a gate that keeps flipping
    undoes what the cross-attention learnt before the flip."""
    rows = metrics(run)
    out = {}
    for name in (k for k in rows[-1] if k.startswith("attn_gate.")):
        signs = [r[name] > 0 for r in rows if r.get(name)]
        out[name.split(".")[1]] = sum(a != b for a, b in zip(signs, signs[1:]))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", required=True, help="output folder of `kosmo demo --sections flamingo`")
    b = SECTION["full"]
    p.add_argument("--lm", default="lm-icl", help="the run under DEMO/runs whose LM Flamingo freezes")
    p.add_argument("--seeds", default="0,1", help="comma-separated train.seed values")
    p.add_argument("--steps", type=int, default=b["arch_steps"])
    p.add_argument("--attn-gate-lr", type=float, default=b["attn_gate_lr"],
                   help="learning-rate multiplier of the cross-attention gates")
    p.add_argument("--ffw-gate-lr", type=float,
                   help="add gated feed-forwards to the blocks, their gates at this learning-rate multiplier")
    p.add_argument("--limit", type=int, default=200, help="held-out documents per measurement")
    args = p.parse_args()
    demo = Path(args.demo)
    lm = demo / "runs" / args.lm
    for needed in (lm / "config.json", demo / "runs" / "clip" / "config.json", demo / "data" / "recall.jsonl"):
        if not needed.exists():
            p.error(f"{needed} not found: --demo must be the output folder of `kosmo demo --sections flamingo`")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if args.steps < 1:
        p.error(f"--steps must be at least 1, got {args.steps}")
    data = demo / "data"
    files = [data / f"{name}.jsonl" for name in ("captions", "interleaved", "vqa_docs", "episodes", "recall")]
    ffw = args.ffw_gate_lr is not None or b["gated_ffw"]
    rates = [f"train.lr_scale.*attn_gate={args.attn_gate_lr}", f"gated_ffw={str(ffw).lower()}",
             *([f"train.lr_scale.*ffw_gate={args.ffw_gate_lr}"] if args.ffw_gate_lr is not None else [])]
    for seed in seeds:
        name = f"attn{args.attn_gate_lr:g}" + (f"-ffw{args.ffw_gate_lr:g}" if args.ffw_gate_lr is not None else "")
        out = demo / "runs" / f"flamingo-{args.lm}-{name}-seed{seed}"
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
                          "gates": gates(model), "attn_sign_changes": sign_changes(out),
                          **{task: {"curve": c["curve"], "blind": c["blind"]} for task, c in curves.items()}}),
              flush=True)


if __name__ == "__main__":
    main()
