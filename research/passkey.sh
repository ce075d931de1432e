#!/usr/bin/env bash
# A 32k-token passkey model on CPU, as docs/long_context.md measures it: the demo's LM shape narrowed to
# 128 wide and 2 deep, with smeared keys, trained short, then at 1,024 tokens, then extended to 32,768 with
# YaRN and fine-tuned at 4,096; `kosmo eval needle` after each stage.
#   bash research/passkey.sh OUT
set -euo pipefail
OUT=${1:?usage: research/passkey.sh OUT}
KOSMO=${KOSMO:-kosmo}
OPT="train.lr=1e-3 train.min_lr_ratio=1 train.beta2=0.999 train.weight_decay=0 train.precision=fp32"
mkdir -p "$OUT"
$KOSMO world --out "$OUT/data" --n 2000 > /dev/null
# 1. 128 tokens: copy rows form the induction circuit that retrieval reads with; passkey rows use it
$KOSMO train lm --data "$OUT/data/text.jsonl" --out "$OUT/runs/short" vocab_size=1024 model.size=tiny \
    model.dim=128 model.n_layers=2 model.smear_keys=true model.max_seq_len=1024 seq_len=128 \
    copy_rows=0.5 passkey_rows=0.5 train.max_steps=1000 train.batch_size=32 train.warmup_steps=20 $OPT
# 2. 1,024 tokens, the length its RoPE is then trained at
$KOSMO train lm --init "$OUT/runs/short" --data "$OUT/data/text.jsonl" --out "$OUT/runs/1k-a" seq_len=1024 \
    copy_rows=0.25 passkey_rows=0.75 train.max_steps=300 train.batch_size=8 train.warmup_steps=10 $OPT
$KOSMO train lm --init "$OUT/runs/1k-a" --data "$OUT/data/text.jsonl" --out "$OUT/runs/1k" seq_len=1024 \
    copy_rows=0.25 passkey_rows=0.75 train.max_steps=500 train.batch_size=8 train.warmup_steps=10 $OPT
$KOSMO eval needle --model "$OUT/runs/1k" --lengths 256,512,1k --precision fp32 --plot "$OUT/needle-1k.png"
# 3. YaRN to 32,768 positions (32 x the 1,024 trained), fine-tuned at 4,096 tokens, then at 16,384
$KOSMO train lm --init "$OUT/runs/1k" --data "$OUT/data/text.jsonl" --out "$OUT/runs/4k" seq_len=4096 \
    model.max_seq_len=32768 model.rope_scaling.rope_type=yarn model.rope_scaling.factor=32 \
    model.rope_scaling.original_max_position_embeddings=1024 copy_rows=0.25 passkey_rows=0.75 \
    train.max_steps=120 train.batch_size=4 train.warmup_steps=10 $OPT
$KOSMO eval needle --model "$OUT/runs/4k" --prefill-chunk 4096 --precision fp32 --plot "$OUT/needle-4k.png"
$KOSMO train lm --init "$OUT/runs/4k" --data "$OUT/data/text.jsonl" --out "$OUT/runs/16k" seq_len=16384 \
    passkey_rows=1 train.max_steps=60 train.batch_size=2 train.warmup_steps=5 $OPT
$KOSMO eval needle --model "$OUT/runs/16k" --prefill-chunk 4096 --precision fp32 --plot "$OUT/needle-16k.png"
