"""How well does CTC pretraining teach the audio encoder to hear, in about five minutes on 2 CPU cores?
Trains `kosmo train audio` once per config on the world's spoken sentences and measures greedy CER/WER on
val_speech.jsonl, whose voices (variants m7, f4; two accents) and speeds (120, 160, 205 wpm) training never hears.

    kosmo world --out /tmp/ctcdata --n 20 --audio 4000        # 4,000 training clips, 400 held out; ~1 minute
    python research/ctc_sweep.py --data /tmp/ctcdata --out /tmp/ctcsweep
    python research/ctc_sweep.py --data /tmp/ctcdata --out /tmp/ctcsweep --only d192x4,d192x4-aug

Prints one JSON line per config as it finishes, then a markdown table: steps, training seconds (the sum of
the steps' times, without loading and evaluation) and the median step's, the last steps' mean train loss, and
the held-out figures. Runs one config at a time: two would share the two cores and distort each other's times;
anything else busy on the machine does too, which the median step time shows least.

Measured on 2 cores (AVX-512, bf16 autocast), 4,000 training clips, 400 held-out, one seed (train.seed=0).
Another job shared the machine during parts of these runs, so train_s is inflated; median_step_s x 600 is
the quiet time (4.5 to 5.7 minutes). CER and WER are greedy, without any lexicon or language model.

| config       | steps | median step s | train loss | eval loss | train CER | val CER | val WER |
|--------------|-------|---------------|------------|-----------|-----------|---------|---------|
| d192x4       | 600   | 0.446         | 0.039      | 0.591     | 0.015     | 0.137   | 0.476   |
| d192x4-speed | 600   | 0.476         | 0.046      | 0.560     | 0.018     | 0.127   | 0.467   |
| d192x4-warp  | 600   | 0.433         | 0.061      | 0.403     | 0.024     | 0.111   | 0.418   |
| d192x4-spec  | 600   | 0.436         | 0.257      | 0.367     | 0.038     | 0.113   | 0.418   |
| d192x4-all   | 600   | 0.572         | 0.321      | 0.331     | 0.052     | 0.103   | 0.396   |

Without augmentation the encoder learns the training voices (train CER 1.5%) and hears the new ones much worse;
each augmentation narrows the gap, and all of them together (the stage's defaults) narrow it most: train and
eval loss meet (0.32 and 0.33), though held-out CER is still twice the training CER, and the model no longer
fits its training clips, so longer training and more varied voices are where the rest of the error is. WER is
about four times CER because one wrong letter spoils a word. None of these reaches the 10% WER goal.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from kosmo.eval.runs import metrics
from kosmo.train.run import run_stage


def shape(dim: int, layers: int, heads: int = 4) -> list[str]:
    return [f"audio.dim={dim}", f"audio.n_layers={layers}", f"audio.n_heads={heads}", f"audio.mlp_dim={4 * dim}"]


OFF = ["augment.speed=0", "augment.warp=0", "augment.freq_masks=0", "augment.time_masks=0"]  # the stage's are on
SPEC = ["augment.freq_masks=2", "augment.freq_width=15", "augment.time_masks=2", "augment.time_width=0.05"]
SPEED = ["augment.speed=0.15"]
WARP = ["augment.warp=0.1"]

# name -> overrides; steps are sized so that each trains for roughly 5-6 minutes on 2 cores (AVX-512, bf16)
CONFIGS = {
    "d192x4": shape(192, 4) + ["train.max_steps=600", "train.lr=2e-3"],
    "d192x4-spec": shape(192, 4) + SPEC + ["train.max_steps=600", "train.lr=2e-3"],
    "d192x4-speed": shape(192, 4) + SPEED + ["train.max_steps=600", "train.lr=2e-3"],
    "d192x4-warp": shape(192, 4) + WARP + ["train.max_steps=600", "train.lr=2e-3"],
    "d192x4-all": shape(192, 4) + SPEC + SPEED + WARP + ["train.max_steps=600", "train.lr=2e-3"],
    # other shapes at about the same time, with every augmentation (not yet measured)
    "d128x4-all": shape(128, 4) + SPEC + SPEED + WARP + ["train.max_steps=1000", "train.lr=2e-3"],
    "d256x4-all": shape(256, 4) + SPEC + SPEED + WARP + ["train.max_steps=400", "train.lr=1.5e-3"],
}
COMMON = [*OFF, "train.batch_size=32", "train.warmup_steps=50", "train.eval_every=200", "train.save_every=100000",
          "train.progress=false", "train.tensorboard=false"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a `kosmo world --audio N` folder")
    p.add_argument("--out", required=True, help="a folder for the runs, one per config")
    p.add_argument("--only", default="", help="comma-separated config names (default: all)")
    p.add_argument("--set", nargs="*", default=[], help="extra overrides for every config, e.g. train.seed=1")
    args = p.parse_args()
    data = Path(args.data)
    names = args.only.split(",") if args.only else list(CONFIGS)
    rows = []
    for name in names:
        out = Path(args.out) / name
        shutil.rmtree(out, ignore_errors=True)  # a run left there would resume, finished, instead of training
        t0 = time.perf_counter()
        last = run_stage("audio", [data / "speech.jsonl"], out,
                         overrides=[*COMMON, *CONFIGS[name], f"val_data={data / 'val_speech.jsonl'}", *args.set])
        steps = metrics(out)
        tail = [r["loss"] for r in steps[-20:]]
        times = sorted(r["step_time"] for r in steps)
        row = {"config": name, "steps": last["step"], "train_s": round(sum(times)),
               "median_step_s": round(times[len(times) // 2], 3),
               "wall_s": round(time.perf_counter() - t0), "train_loss": round(sum(tail) / len(tail), 3),
               "eval_loss": round(last.get("eval_loss", float("nan")), 3),
               **{k: last[k] for k in ("train_cer", "val_cer", "val_wer")}}
        print(json.dumps(row), flush=True)
        rows.append(row)
    keys = list(rows[0])
    print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
