"""SFT step time with and without packing, side by side, on the demo's data and stage-1 model.

    .venv/bin/kosmo demo --sections vision --out out        # makes out/runs/mllm and out/data
    .venv/bin/python benchmarks/sft_packing.py --demo out

Both arms see the same rows at every step (the same examples, so the same loss); one lays each
example in its own padded row, the other packs them into rows of seq_len tokens. Steps alternate
between the arms so that machine noise hits both alike; the medians and their ratio are printed.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from kosmo import config as C
from kosmo.model.load import load_run
from kosmo.train import sft
from kosmo.hardware import autocast


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo", required=True, help="a `kosmo demo` output folder")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    d = Path(args.demo) / "data"
    files = [d / "vqa_all.jsonl", d / "chat.jsonl", d / "captions.jsonl"]
    arms = {}
    for pack in (False, True):
        model, tok, _ = load_run(Path(args.demo) / "runs" / "mllm")
        cfg = C.load(sft.StageConfig, None, ["seq_len=128", f"pack={pack}"])
        model, loss_fn, data, _ = sft.build(cfg, files, tok, model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        arms[pack] = (model.train(), loss_fn, data, opt)

    def step(pack: bool, rows: list[int]) -> tuple[float, int, int]:
        model, loss_fn, data, opt = arms[pack]
        t0 = time.perf_counter()
        batch = data.collate(rows)
        with autocast(torch.device("cpu"), "auto"):
            loss, _ = loss_fn(model, batch)
        (loss / batch["n_targets"]).backward()
        opt.step()
        opt.zero_grad()
        return time.perf_counter() - t0, batch["input"].numel(), int((batch["input"] != 0).sum())

    rng = random.Random(0)
    times: dict[bool, list] = {False: [], True: []}
    fill: dict[bool, list] = {False: [], True: []}
    for i in range(args.steps + 3):
        rows = rng.sample(range(len(arms[False][2])), args.batch)
        for pack in (False, True):
            t, cells, real = step(pack, rows)
            if i >= 3:  # warm-up steps excluded
                times[pack].append(t)
                fill[pack].append(real / cells)
    result = {f"{'packed' if p else 'padded'}_s_per_step": round(statistics.median(times[p]), 4) for p in times}
    result.update({f"{'packed' if p else 'padded'}_real_token_share": round(statistics.mean(fill[p]), 3)
                   for p in fill})
    result["speedup"] = round(statistics.median(times[False]) / statistics.median(times[True]), 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
