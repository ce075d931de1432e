#!/usr/bin/env bash
# Reading text in pictures: how far does the KOSMOS path get at reading the world's signs, number labels and
# price tags in a few CPU minutes, beside the blind baseline? The figures and their times are in docs/reading.md.
#
#     bash research/reading.sh [OUT]        # default OUT=/tmp/reading; needs fonts-dejavu-core (make font-deps)
#
# Held-out pictures (val_signs_vqa.jsonl) are new renders, and their numbers and prices are numbers training
# never shows, so the model must read them digit by digit. That needs a tokenizer that spells a number digit by
# digit too: BPE trained on the training text would merge the numbers it sees into single tokens and write an
# unseen one with tokens it never learned to write, so the runs share a byte-level tokenizer (a vocabulary of
# the 256 bytes and the 16 special tokens, no merges).
set -euo pipefail
OUT=${1:-/tmp/reading}
KOSMO=${KOSMO:-kosmo}
D=$OUT/data
R=$OUT/runs
rm -rf "$R"  # a run left there would resume, finished, instead of training
mkdir -p "$R"
t0=$SECONDS
step() { echo "== $1 ($((SECONDS - t0)) s)" >&2; }

step "data: 6000 training signs, 600 held out"
$KOSMO world --out "$D" --n 20 --image-size 48 --signs 6000 >/dev/null
$KOSMO tokenizer --data "$D/signs.jsonl" --vocab-size 272 --out "$R/tok" >/dev/null

COMMON=(train.progress=false train.tensorboard=false)
step "image encoder: CLIP on the sign captions"
$KOSMO train clip --data "$D/signs.jsonl" --tokenizer "$R/tok" --out "$R/clip" "${COMMON[@]}" \
    vision.image_size=48 vision.patch_size=12 vision.dim=128 vision.mlp_dim=512 \
    train.max_steps=400 train.batch_size=64 train.lr=1e-3 train.warmup_steps=20 train.eval_every=400 >/dev/null

step "language model: the caption text, a small LM"
$KOSMO train lm --data "$D/signs.jsonl" --tokenizer "$R/tok" --out "$R/lm" "${COMMON[@]}" \
    model.dim=128 model.n_layers=2 model.n_heads=4 model.n_kv_heads=2 seq_len=128 \
    train.max_steps=100 train.batch_size=16 train.lr=2e-3 train.warmup_steps=10 train.eval_every=100 >/dev/null

step "stage 1: the connector alone learns to make the LM's captions true of the picture (freeze=connector)"
$KOSMO train mllm --init "$R/lm" --data "$D/signs.jsonl" --out "$R/mllm" "${COMMON[@]}" \
    vision="$R/clip" freeze=connector seq_len=80 \
    train.max_steps=250 train.batch_size=32 train.lr=2e-3 train.warmup_steps=10 train.eval_every=250 >/dev/null

step "reading: SFT on the reading questions and the captions, the encoder learning too (freeze=all)"
$KOSMO train sft --init "$R/mllm" --data "$D/signs_vqa.jsonl" "$D/signs.jsonl" --out "$R/sft" "${COMMON[@]}" \
    freeze=all seq_len=80 \
    train.max_steps=1000 train.batch_size=32 train.lr=5e-4 train.warmup_steps=20 train.eval_every=500 >/dev/null

step "reading, round 2: 1500 more SFT steps from there (a fresh warmup and cosine)"
$KOSMO train sft --init "$R/sft" --data "$D/signs_vqa.jsonl" "$D/signs.jsonl" --out "$R/sft2" "${COMMON[@]}" \
    freeze=all seq_len=80 \
    train.max_steps=1500 train.batch_size=32 train.lr=5e-4 train.warmup_steps=20 train.eval_every=500 >/dev/null

step "evaluation: held-out pictures, beside blind, after each round"
$KOSMO eval vqa --model "$R/sft" --data "$D/val_signs_vqa.jsonl" | tail -1 | tee "$OUT/reading_round1.json"
$KOSMO eval vqa --model "$R/sft2" --data "$D/val_signs_vqa.jsonl" | tail -1 | tee "$OUT/reading.json"
step "done"
