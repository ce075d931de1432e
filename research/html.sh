#!/usr/bin/env bash
# Mockup -> HTML: a model that looks at a hand-drawn mockup and writes its page, trained on CPU and judged in
# headless Chromium beside the blind baseline. The figures, their times, and why the encoder is a new one kept
# frozen (one that learns collapses to ignoring the picture) are in docs/html.md.
#
#     bash research/html.sh [OUT]        # default OUT=/tmp/html; needs fonts-dejavu-core and chromium
#
# The encoder sees 128 px mockups in 16 px patches (64 patch tokens, a grid cell is 4 x 2 of them), the
# resolution at which the smallest text, a button's note, is still 10 px tall. The tokenizer is trained on the
# mockup chats, so a page is about 100 tokens.
set -euo pipefail
OUT=${1:-/tmp/html}
KOSMO=${KOSMO:-kosmo}
D=$OUT/data
R=$OUT/runs
rm -rf "$R"  # a run left there would resume, finished, instead of training
mkdir -p "$R"
t0=$SECONDS
step() { echo "== $1 ($((SECONDS - t0)) s)" >&2; }

step "data: 4000 training mockups, 400 held out"
# the world is a pure function of its seed, so one already written is the same and is kept
[ -f "$D/val_mockups.jsonl" ] || $KOSMO world --out "$D" --n 20 --mockups 4000 >/dev/null
$KOSMO tokenizer --data "$D/mockups.jsonl" --vocab-size 1024 --out "$R/tok" >/dev/null

COMMON=(train.progress=false train.tensorboard=false train.min_lr_ratio=1)
step "language model: the pages' text, so it knows their syntax"
$KOSMO train lm --data "$D/mockups.jsonl" --tokenizer "$R/tok" --out "$R/lm" "${COMMON[@]}" \
    model.dim=128 model.n_layers=4 model.n_heads=4 model.n_kv_heads=2 seq_len=256 \
    train.max_steps=60 train.batch_size=16 train.lr=2e-3 train.warmup_steps=10 train.eval_every=60 >/dev/null

step "SFT: mockup -> page, a new encoder, frozen at its random start, read by the connector and the LM"
$KOSMO train sft --init "$R/lm" --data "$D/mockups.jsonl" --out "$R/sft" "${COMMON[@]}" \
    new_vision.image_size=128 new_vision.patch_size=16 new_vision.dim=128 new_vision.mlp_dim=512 \
    freeze=connector+lm seq_len=256 \
    train.max_steps=1050 train.batch_size=8 train.lr=1e-3 train.warmup_steps=20 train.eval_every=100 train.save_every=50 >/dev/null

step "evaluation: 100 held-out mockups in Chromium, beside blind"
$KOSMO eval html --model "$R/sft" --data "$D/val_mockups.jsonl" --limit 100 --screenshots "$OUT/screenshots" \
    | tail -1 | tee "$OUT/html.json"
step "done"
