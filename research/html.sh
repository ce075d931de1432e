#!/usr/bin/env bash
# Mockup -> HTML: a model that looks at a hand-drawn mockup and writes its page, trained on CPU and judged in
# headless Chromium beside the blind baseline. The figures, their times, and why the new encoder is first kept
# frozen (one that learns from the start collapses to ignoring the picture) are in docs/html.md.
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

COMMON=(train.progress=false train.tensorboard=false)
step "language model: the pages' text, so it knows their syntax"
$KOSMO train lm --data "$D/mockups.jsonl" --tokenizer "$R/tok" --out "$R/lm" "${COMMON[@]}" \
    model.dim=128 model.n_layers=4 model.n_heads=4 model.n_kv_heads=2 seq_len=256 train.min_lr_ratio=1 \
    train.max_steps=60 train.batch_size=16 train.lr=2e-3 train.warmup_steps=10 train.eval_every=60 >/dev/null

step "SFT, round 1: mockup -> page, a new encoder frozen at its random start, read by the connector and the LM"
$KOSMO train sft --init "$R/lm" --data "$D/mockups.jsonl" --out "$R/sft1" "${COMMON[@]}" train.min_lr_ratio=1 \
    new_vision.image_size=128 new_vision.patch_size=16 new_vision.dim=128 new_vision.mlp_dim=512 \
    freeze=connector+lm seq_len=256 \
    train.max_steps=1050 train.batch_size=8 train.lr=1e-3 train.warmup_steps=20 train.eval_every=150 >/dev/null

# Rounds 2-5: the encoder learns too (freeze=all), each round a fresh warmup and cosine decay from the last.
# Started from round 1, where the LM already reads the random encoder's features, it did not collapse.
prev=sft1
for round in "2 2000" "3 3000" "4 4000" "5 4000"; do
    set -- $round
    step "SFT, round $1: $2 steps, the encoder learning too"
    $KOSMO train sft --init "$R/$prev" --data "$D/mockups.jsonl" --out "$R/sft$1" "${COMMON[@]}" freeze=all seq_len=256 \
        train.max_steps=$2 train.batch_size=16 train.lr=5e-4 train.warmup_steps=50 train.eval_every=250 >/dev/null
    prev=sft$1
done

step "evaluation: the first 100 held-out mockups in Chromium after each round, beside blind; all 400 at the end"
for n in 1 2 3 4 5; do
    $KOSMO eval html --model "$R/sft$n" --data "$D/val_mockups.jsonl" --limit 100 | tail -1 > "$OUT/html$n.json"
done
$KOSMO eval html --model "$R/sft5" --data "$D/val_mockups.jsonl" --screenshots "$OUT/screenshots" | tail -1 | tee "$OUT/html.json"
step "done"
