"""Measures the choices of the demo's vision recipe, one full `kosmo demo` pipeline per variant.

    .venv/bin/python benchmarks/vision_ablation.py --out /tmp/ablation                  # every variant
    .venv/bin/python benchmarks/vision_ablation.py --out /tmp/ablation --only default,patch4

Each variant changes a few knobs of the vision section's full budget (`kosmo/demo/vision.py`) and prints one
JSON line; the markdown table at the end is what docs/vision.md shows. A variant takes 6-12 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kosmo.demo import run_demo

VARIANTS = {
    "default": {},
    "grid32": {"image_size": 32, "patch_size": 8},
    "patch6": {"patch_size": 6},
    "vision_lr0.1": {"sft_freeze": "all", "vision_lr_scale": 0.1},
    "no_clip": {"clip_steps": 1},
    "resampler": {"connector": "resampler"},
    "sft2x": {"sft_steps": 4800},
    "sft_lr2e-3": {"sft_lr": 2e-3, "lm_steps": 200, "sft_steps": 2500},
    "vqa8k": {"vqa_images": 8000},
    "sft_lr5e-4": {"sft_lr": 5e-4},
    "sft_lr1e-3": {"sft_lr": 1e-3},
}
DESCRIPTIONS = {
    "default": "the demo's recipe: 36 px pictures, 12 px patches (9 tokens), CLIP frozen; connector, then + LM",
    "grid32": "32 px pictures in 8 px patches (16 tokens; patch edges cut through objects)",
    "patch6": "6 px patches (36 tokens, 4 per grid cell)",
    "vision_lr0.1": "encoder also trained in SFT, at 0.1x the learning rate",
    "no_clip": "no contrastive pretraining (1 CLIP step: an untrained encoder)",
    "resampler": "a resampler connector (8 visual tokens)",
    "sft2x": "twice the SFT steps (4,800)",
    "sft_lr2e-3": "SFT at twice the learning rate, 2,500 steps, with 200 LM steps (the time traded)",
    "vqa8k": "VQA on 8,000 training pictures (48,000 questions) instead of 2,000",
    "sft_lr5e-4": "SFT at learning rate 5e-4 (the default)",
    "sft_lr1e-3": "SFT at learning rate 1e-3 (the default until 5e-4 was measured)",
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", help="comma-separated variant names")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(VARIANTS)
    rows = []
    for name in names:
        r = run_demo(Path(args.out) / name, budget="full", recipe=VARIANTS[name], sections=("vision",))
        e = r["vision"]["eval"]
        row = {"variant": name, "vqa": e["vqa_val"]["vqa_accuracy"], "vqa_blind": e["vqa_val"]["blind"]["vqa_accuracy"],
               "vqa_heldout": e["vqa_heldout"]["vqa_accuracy"], "cider": e["caption_val"]["cider"],
               "compliance": e["chat_val"]["compliance"], "by_type": e["vqa_val"]["by_type"],
               "seconds": r["timings_s"]["total"]}
        print(json.dumps(row), flush=True)
        rows.append(row)
    print("\n| variant | VQA val | blind | VQA held-out split | CIDEr | compliance | time (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {DESCRIPTIONS[row['variant']]} | {row['vqa']} | {row['vqa_blind']} | {row['vqa_heldout']} | "
              f"{row['cider']} | {row['compliance']} | {row['seconds']} |")


if __name__ == "__main__":
    main()
