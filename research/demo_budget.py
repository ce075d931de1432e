"""The demo's default budget, measured piece by piece on the data and models of a finished `kosmo demo` run.

    python research/demo_budget.py vqvae --demo out --out /tmp/vq train.max_steps=1400 train.lr=2e-3
        an image tokenizer by the demo's recipe with these overrides: its training time, held-out PSNR and
        codebook use, and the share of its reconstructions of the held-out drawing items that the fixed
        detector judges right, which is the most a model drawing with its codes can reach

    python research/demo_budget.py section --demo out --out /tmp/audio audio ctc_steps=200
        one section run again with changed knobs (`kosmo demo KNOB=VALUE`), from the demo's data and the
        models of the sections before it, into --out; prints its stages' times and its report

    python research/demo_budget.py threads --demo out --out /tmp/threads ctc vqvae sft
        each named stage of the demo run again for a few steps with its own config, on two threads then one,
        twice over; prints each one's median step time per thread count

Each prints one JSON line first. The figures in docs/performance.md came from runs at OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

# the runs each section starts from, which it does not train itself
BEFORE = {"audio": ["sft"], "draw": ["sft"], "flamingo": ["clip"], "align": ["sft"]}


def vqvae(demo: Path, out: Path, overrides: list[str]):
    from PIL import Image

    from kosmo.data.images import preprocess
    from kosmo.eval.imagegen import read_items, score
    from kosmo.eval.vqvae import reconstruction, to_255
    from kosmo.model.load import load_run
    from kosmo.train.run import run_stage
    data = demo / "data"
    recipe = json.loads((demo / "runs" / "vqvae" / "config.json").read_text())["model"]
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    run_stage("vqvae", [data / "draw.jsonl"], out, tokenizer=data / "tokenizer.json",
              overrides=["train.batch_size=32", "train.lr=1e-3", "train.warmup_steps=50", "train.weight_decay=0",
                         f"model.codebook_size={recipe['codebook_size']}", f"model.image_size={recipe['image_size']}",
                         f"model.downsample={recipe['downsample']}", f"val_data={data / 'val_draw.jsonl'}",
                         "train.tensorboard=false", "train.progress=false", *overrides])
    seconds = time.time() - t0
    model = load_run(out)[0].eval()
    items, real = read_items(data / "val_draw.jsonl")
    with torch.no_grad():
        pixels = model.decode(model.encode(torch.stack([preprocess(p, recipe["image_size"], "crop") for p in real])))
    pictures = [Image.fromarray(to_255(p).permute(1, 2, 0).numpy().astype("uint8")) for p in pixels]
    print(json.dumps({"overrides": overrides, "train_s": round(seconds, 1),
                      **reconstruction(model, data / "val_draw.jsonl"),
                      "reconstructions_judged_right": score(items, pictures)["accuracy"]}))


def section(demo: Path, out: Path, name: str, knobs: list[str]):
    from kosmo.config import parse_overrides
    from kosmo.data.world import World
    from kosmo.demo import BUDGETS, SECTIONS, Demo, checked_recipe
    from kosmo.demo import section as module
    b = dict(BUDGETS["default"])
    for s in SECTIONS:
        b.update(module(s).BUDGETS["default"])
    b.update(checked_recipe(parse_overrides(knobs), b))
    (out / "runs").mkdir(parents=True, exist_ok=True)
    if not (out / "data").exists():
        (out / "data").symlink_to((demo / "data").resolve())
    for run in BEFORE[name]:
        if not (out / "runs" / run).exists():
            (out / "runs" / run).symlink_to((demo / "runs" / run).resolve())
    rerun = Demo(out, World(image_size=b["image_size"]), data={p.stem: p for p in (out / "data").glob("*.jsonl")},
                 report={"budget": "default", "recipe": b, "sections": ["vision", name], "timings_s": {}})
    t0 = time.time()
    report = module(name).run(rerun, b)
    print(json.dumps({"section": name, "knobs": knobs, "total_s": round(time.time() - t0, 1),
                      "timings_s": rerun.report["timings_s"]}))
    print("\n".join(module(name).render(report)))


def threads(demo: Path, out: Path, names: list[str], steps: int = 40, rounds: int = 2):
    """Median step times of demo stages on 2 and 1 threads, alternated so that a busy host slows both alike."""
    medians: dict[str, dict[int, list[float]]] = {name: {2: [], 1: []} for name in names}
    for _ in range(rounds):
        for name in names:
            run = json.loads((demo / "runs" / name / "config.json").read_text())
            out.mkdir(parents=True, exist_ok=True)
            config = out / f"{name}.yaml"
            config.write_text(json.dumps(run["config"]))  # JSON is YAML
            for n in (2, 1):
                shutil.rmtree(out / name, ignore_errors=True)
                subprocess.run([sys.executable, "-m", "kosmo.cli", "train", run["stage"], "--data", *run["data"],
                                "--out", str(out / name), "--config", str(config),
                                "--tokenizer", str(demo / "data" / "tokenizer.json"),
                                *(["--init", run["init"]] if run["init"] else []),
                                f"train.max_steps={steps}", "train.eval_every=0", "train.save_every=100000",
                                "train.progress=false", "train.tensorboard=false"],
                               check=True, env={**os.environ, "OMP_NUM_THREADS": str(n)}, capture_output=True)
                rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
                medians[name][n].append(statistics.median(r["step_time"] for r in rows[5:]))
    print(json.dumps({name: {f"{n}_threads_s": [round(x, 4) for x in m[n]] for n in m} for name, m in medians.items()}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("vqvae", "section", "threads"))
    p.add_argument("--demo", type=Path, required=True, help="the finished demo's --out folder")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("rest", nargs="*", help="vqvae: train overrides; section: NAME KNOB=VALUE ...; threads: RUN ...")
    args = p.parse_intermixed_args()
    if args.what == "vqvae":
        vqvae(args.demo, args.out, args.rest)
    elif args.what == "threads":
        threads(args.demo, args.out, args.rest)
    else:
        section(args.demo, args.out, args.rest[0], args.rest[1:])


if __name__ == "__main__":
    main()
