#!/usr/bin/env bash
# Reading text in pictures: how far does the KOSMOS path get at reading the world's signs, number labels and
# price tags in CPU minutes, beside the blind baseline? The figures and their times are in docs/reading.md.
#
#     bash research/reading.sh [OUT]        # default OUT=/tmp/reading; needs fonts-dejavu-core (make font-deps)
#
# Held-out pictures (val_signs_vqa.jsonl) are new renders, and their numbers and prices are two-digit numbers
# training never shows, not even inside a longer number, so the model must read them digit by digit. Four
# choices serve that:
# - a byte-level tokenizer (the 256 bytes and the 16 special tokens, no merges), so that a new number is a new
#   sequence of known tokens; BPE would merge the numbers it saw and write a new one with tokens never learnt;
# - training numbers of 2 to 4 digits (--sign-digits 4), thousands of them, too many to answer as wholes;
# - smeared keys in the LM (model.smear_keys=true) and copy rows in its pretraining, so that it has a one-layer
#   induction head ("find where the current token was, emit what followed"), the circuit that would read a plate
#   cell by cell, the key of each cell carrying the glyph of the cell to its left;
# - SFT on the reading questions alone, which read better than the questions mixed with captions.
set -euo pipefail
OUT=${1:-/tmp/reading}
KOSMO=${KOSMO:-kosmo}
D=$OUT/data
R=$OUT/runs
rm -rf "$R"  # a run left there would resume, finished, instead of training
mkdir -p "$R"
t0=$SECONDS
step() { echo "== $1 ($((SECONDS - t0)) s)" >&2; }

step "data: 6000 training signs (numbers of 2 to 4 digits), 600 held out"
$KOSMO world --out "$D" --n 20 --image-size 64 --signs 6000 --sign-digits 4 >/dev/null
$KOSMO tokenizer --data "$D/signs.jsonl" --vocab-size 272 --out "$R/tok" >/dev/null

COMMON=(train.progress=false train.tensorboard=false)
# the passkey recipe's optimiser (docs/long_context.md): a constant rate, under which the copy circuit forms
CONST=(train.lr=1e-3 train.min_lr_ratio=1 train.beta2=0.999 train.weight_decay=0)
step "image encoder: CLIP on the sign captions, 64 px pictures in 16 px patches, a character to a patch"
$KOSMO train clip --data "$D/signs.jsonl" --tokenizer "$R/tok" --out "$R/clip" "${COMMON[@]}" \
    vision.image_size=64 vision.patch_size=16 vision.dim=128 vision.mlp_dim=512 \
    train.max_steps=150 train.batch_size=64 train.lr=1e-3 train.warmup_steps=10 train.eval_every=0 >/dev/null

step "language model: the caption text and copy rows, a small LM with smeared keys"
$KOSMO train lm --data "$D/signs.jsonl" --tokenizer "$R/tok" --out "$R/lm" "${COMMON[@]}" "${CONST[@]}" \
    model.dim=128 model.n_layers=2 model.n_heads=4 model.n_kv_heads=2 model.smear_keys=true seq_len=128 \
    copy_rows=0.5 train.max_steps=300 train.batch_size=32 train.warmup_steps=20 train.eval_every=0 >/dev/null

step "stage 1: the connector alone learns to make the LM's captions true of the picture (freeze=connector)"
$KOSMO train mllm --init "$R/lm" --data "$D/signs.jsonl" --out "$R/mllm" "${COMMON[@]}" \
    vision="$R/clip" freeze=connector seq_len=80 \
    train.max_steps=120 train.batch_size=32 train.lr=2e-3 train.warmup_steps=10 train.eval_every=0 >/dev/null

step "reading: SFT on the reading questions alone, the encoder learning too (freeze=all)"
$KOSMO train sft --init "$R/mllm" --data "$D/signs_vqa.jsonl" --out "$R/sft" "${COMMON[@]}" freeze=all seq_len=80 \
    train.max_steps=2500 train.batch_size=32 train.lr=5e-4 train.warmup_steps=20 train.eval_every=0 >/dev/null

step "reading, round 2: 3000 more SFT steps from there (a fresh warmup and cosine)"
$KOSMO train sft --init "$R/sft" --data "$D/signs_vqa.jsonl" --out "$R/sft2" "${COMMON[@]}" freeze=all seq_len=80 \
    train.max_steps=3000 train.batch_size=32 train.lr=5e-4 train.warmup_steps=20 train.eval_every=0 >/dev/null

step "evaluation: held-out pictures, beside blind, after each round"
$KOSMO eval vqa --model "$R/sft" --data "$D/val_signs_vqa.jsonl" | tail -1 | tee "$OUT/reading_round1.json"
$KOSMO eval vqa --model "$R/sft2" --data "$D/val_signs_vqa.jsonl" | tail -1 | tee "$OUT/reading.json"
step "done"
