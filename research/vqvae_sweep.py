"""The image tokenizer's recipe measured: trains `kosmo train vqvae` once per setting and prints held-out PSNR,
codebook use, perplexity and training time as one JSON line each.

    kosmo world --out /tmp/vqw --n 4000 --image-size 36
    python research/vqvae_sweep.py --data /tmp/vqw --out /tmp/sweep "model.codebook_size=128" "model.codebook_size=256"

    python research/vqvae_sweep.py --bench    # one training step's time, fp32 and bf16 autocast, on this host

Each positional argument is one setting: space-separated overrides on top of configs/vqvae_shapes.yaml. Held-out
figures are on val_captions.jsonl (and on heldout_captions.jsonl, pictures of colour-shape pairs that training
never shows, where the world wrote them).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kosmo.eval.vqvae import reconstruction
from kosmo.model.load import load_run
from kosmo.train.run import run_stage

ROOT = Path(__file__).resolve().parents[1]


def bench(config: str, rounds: int = 5, steps: int = 10):
    """Milliseconds per training step of the recipe's model and loss on random pictures, fp32 against bf16
    autocast, the two interleaved round by round so that a busy host slows both alike; min and median."""
    from kosmo.config import read_yaml
    from kosmo.model.vqvae import VQVAE, VQVAEConfig
    from kosmo.train.vqvae import make_loss
    recipe = read_yaml(config)
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(**recipe["model"])).train()
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    loss_fn = make_loss(0.0)
    x = torch.randn(recipe["train"]["batch_size"], 3, model.cfg.image_size, model.cfg.image_size)
    times = {"fp32": [], "bf16": []}
    for _ in range(rounds):
        for precision, ts in times.items():
            for i in range(steps + 1):
                t0 = time.perf_counter()
                with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
                    loss, _ = loss_fn(model, {"images": x})
                loss.backward()
                opt.step()
                opt.zero_grad()
                if i:  # the first step of a round warms the kernels of the other precision up
                    ts.append(1000 * (time.perf_counter() - t0))
    for precision, ts in times.items():
        ts.sort()
        print(json.dumps({"precision": precision, "ms_per_step_min": round(ts[0], 1),
                          "ms_per_step_median": round(ts[len(ts) // 2], 1), "batch": x.shape[0],
                          "threads": torch.get_num_threads(), "cpu": torch.backends.cpu.get_cpu_capability()}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("settings", nargs="*", help="one string of space-separated overrides per run")
    p.add_argument("--data", help="a `kosmo world --image-size 36` folder")
    p.add_argument("--out")
    p.add_argument("--config", default=str(ROOT / "configs" / "vqvae_shapes.yaml"))
    p.add_argument("--bench", action="store_true", help="time a training step in fp32 and bf16 instead")
    args = p.parse_args()
    if args.bench:
        return bench(args.config)
    if not (args.settings and args.data and args.out):
        p.error("give --data, --out and at least one setting (\"\" for the recipe as it is)")
    data = Path(args.data)
    for i, setting in enumerate(args.settings):
        out = Path(args.out) / f"run{i}"
        overrides = ["train.progress=false", "train.tensorboard=false", *setting.split()]
        t0 = time.perf_counter()
        last = run_stage("vqvae", [data / "captions.jsonl"], out, config_file=args.config,
                         overrides=[f"val_data={data / 'val_captions.jsonl'}", *overrides])
        seconds = time.perf_counter() - t0
        row = {"setting": setting, "seconds": round(seconds, 1), "threads": torch.get_num_threads(),
               **{k: last[k] for k in last if k.startswith(("val_", "train_psnr"))}}
        model, _, _ = load_run(out)
        if (data / "heldout_captions.jsonl").is_file():
            row["heldout"] = reconstruction(model, data / "heldout_captions.jsonl")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
