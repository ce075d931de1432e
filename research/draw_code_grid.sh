#!/usr/bin/env bash
# How fine an image tokenizer a CPU-sized LM can learn to draw with: the demo's chat model (runs/sft of
# `kosmo demo --sections vision`) taught to draw for 1500 steps on prompts alone, with 9 x 9 and 6 x 6 codes a
# picture, each judged by `kosmo eval imagegen` on 120 held-out prompts. (The demo's own 3 x 3 codes are judged
# by the demo.)
#
#   research/draw_code_grid.sh DEMO_OUT WORK
set -euo pipefail
demo=$1 work=$2
py=${PYTHON:-.venv/bin/python}
mkdir -p "$work"
$py -m kosmo world --out "$work/w" --n 8000 --image-size 36 --draw 8000
$py -m kosmo world --out "$work/vqw" --n 4000 --image-size 36
$py research/vqvae_sweep.py --data "$work/vqw" --out "$work/vq" \
    "model.downsample=4 model.codebook_size=256 train.max_steps=1000" \
    "model.downsample=6 model.codebook_size=256 train.max_steps=1500"
for i in 0 1; do
    $py -m kosmo train sft --init "$demo/runs/sft" --data "$work/w/draw.jsonl" --out "$work/draw$i" \
        image_tokenizer="$work/vq/run$i" train.max_steps=1500 train.batch_size=32 seq_len=128 train.lr=1e-3 \
        train.warmup_steps=50 train.tensorboard=false
    $py -m kosmo eval imagegen --model "$work/draw$i" --data "$work/w/val_draw.jsonl" --limit 120 --cfg-scales 1,3 \
        | tail -1 > "$work/draw$i.json"
done
