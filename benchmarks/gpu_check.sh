#!/usr/bin/env bash
# One short check of kosmo on a lent GPU (an H100 or H200; about 6 minutes, at most 8), writing one JSON
# report: each step's status, time and figures. A step that fails or runs out of time is recorded and the
# others still run.
#
#   1. cuda_tests  the tests marked `cuda` (pytest -m cuda)
#   2. lm_vs_hf    benchmarks/lm_vs_hf.py on the GPU: kosmo against transformers, training and decode
#   3. mfu_1b      `kosmo train lm` of the 1B model (configs/lm_1b_gpu.yaml) in bf16 under torch.compile for
#                  40 steps: tokens/s and MFU (benchmarks/gpu_check.py says how it is counted)
#   4. fsdp        a short run of the small LM under torchrun with train.parallel=fsdp on one GPU, beside
#                  the same run without it (fsdp_plain): the losses agree
#   5. serve_load  benchmarks/serve_load.py on the GPU
#
#   benchmarks/gpu_check.sh [--dry-run] [--out gpu_check.json]
#
# --dry-run runs the same steps on the CPU at tiny sizes, so that CI can check the script itself.
set -euo pipefail

cd "$(dirname "$0")/.."
DRY=0
OUT=gpu_check.json
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    --out) OUT="$2"; shift 2 ;;
    *) echo "usage: $0 [--dry-run] [--out FILE]" >&2; exit 2 ;;
  esac
done
PY=${PY:-.venv/bin/python}
[[ -x "$PY" ]] || PY=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
STEPS="$WORK/steps.jsonl"
: >"$STEPS"

# step NAME TIMEOUT_S FIGURES_CMD -- CMD...: runs CMD under a timeout with its output in NAME.log, then (if it
# passed) FIGURES_CMD, whose JSON stdout becomes the step's figures; appends the step's record to $STEPS.
step() {
  local name=$1 limit=$2 figures=$3 status=ok rc=0 start end
  shift 4
  echo "== $name" >&2
  start=$(date +%s.%N)
  timeout --kill-after=10 "$limit" "$@" >"$WORK/$name.log" 2>&1 || rc=$?
  end=$(date +%s.%N)
  if [[ $rc -eq 124 || $rc -eq 137 ]]; then status=timeout; elif [[ $rc -ne 0 ]]; then status=failed; fi
  if ! eval "$figures" >"$WORK/$name.json" 2>>"$WORK/$name.log"; then
    [[ $status == ok ]] && status=failed
    echo null >"$WORK/$name.json"
  fi
  [[ -s "$WORK/$name.json" ]] || echo null >"$WORK/$name.json"
  "$PY" - "$name" "$status" "$rc" "$start" "$end" "$WORK/$name.json" "$WORK/$name.log" >>"$STEPS" <<'EOF'
import json, sys
name, status, rc, start, end, figures, log = sys.argv[1:]
try:
    figures = json.load(open(figures))
except ValueError:
    figures = None
tail = open(log, errors="replace").read().splitlines()[-25:]
print(json.dumps({"step": name, "status": status, "exit_code": int(rc),
                  "seconds": round(float(end) - float(start), 1), "figures": figures,
                  "log_tail": tail if status != "ok" else tail[-3:]}))
EOF
  echo "   $status" >&2
}

if [[ $DRY == 1 ]]; then
  DEVICE=cpu TEXTS=600 LIMIT=300
  LM_ARGS=(--quick --layers 2 --dim 64 --heads 4 --vocab 512 --seq 32 --batch 2)
  MFU_ARGS=(model.size=tiny seq_len=64 train.batch_size=2 train.max_steps=4 train.compile=true)
  FSDP_ARGS=(model.size=tiny seq_len=64 train.batch_size=2 train.max_steps=3)
  SERVE_ARGS=(--quick)
  VOCAB=512
else
  DEVICE=cuda TEXTS=20000 LIMIT=0
  LM_ARGS=(--precision bf16 --rounds 3)
  MFU_ARGS=(train.max_steps=40 train.grad_accum=1 train.compile=true train.precision=bf16)
  FSDP_ARGS=(model.size=small seq_len=1024 train.batch_size=8 train.max_steps=20 train.precision=bf16)
  SERVE_ARGS=(--concurrency 1 16)
  VOCAB=32000
fi
lim() { if [[ $LIMIT -gt 0 ]]; then echo "$LIMIT"; else echo "$1"; fi; }
COMMON=(train.eval_every=0 train.save_every=100000 train.warmup_steps=2 train.progress=false
        train.tensorboard=false train.device=$DEVICE)

step cuda_tests "$(lim 60)" "$PY benchmarks/gpu_check.py pytest $WORK/junit.xml" -- \
  "$PY" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider --junitxml "$WORK/junit.xml"

step lm_vs_hf "$(lim 100)" "$PY benchmarks/gpu_check.py jsonlines $WORK/lm_vs_hf.log" -- \
  "$PY" benchmarks/lm_vs_hf.py --device "$DEVICE" "${LM_ARGS[@]}"

# one corpus and tokenizer for both training steps, made outside their time limits
"$PY" benchmarks/gpu_check.py corpus "$WORK/corpus.jsonl" "$TEXTS" ||
  echo "the corpus could not be written; the training steps will fail" >&2
"$PY" -m kosmo tokenizer --data "$WORK/corpus.jsonl" --vocab-size "$VOCAB" --out "$WORK/tokenizer" >/dev/null 2>&1 ||
  echo "the tokenizer could not be trained; the training steps will fail" >&2
TRAIN=("$PY" -m kosmo train lm --data "$WORK/corpus.jsonl" --tokenizer "$WORK/tokenizer")

step mfu_1b "$(lim 170)" "$PY benchmarks/gpu_check.py mfu $WORK/mfu" -- \
  "${TRAIN[@]}" --config configs/lm_1b_gpu.yaml --out "$WORK/mfu" "${COMMON[@]}" "${MFU_ARGS[@]}"

step fsdp_plain "$(lim 40)" "echo null" -- "${TRAIN[@]}" --out "$WORK/plain" "${COMMON[@]}" "${FSDP_ARGS[@]}"
step fsdp "$(lim 50)" "$PY benchmarks/gpu_check.py fsdp $WORK/plain $WORK/fsdp" -- \
  "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 -m kosmo train lm --data "$WORK/corpus.jsonl" \
  --tokenizer "$WORK/tokenizer" --out "$WORK/fsdp" "${COMMON[@]}" "${FSDP_ARGS[@]}" train.parallel=fsdp

PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])') ||
  PORT=8765
step serve_load "$(lim 60)" "$PY benchmarks/gpu_check.py jsonlines $WORK/serve_load.log" -- \
  "$PY" benchmarks/serve_load.py --device "$DEVICE" --port "$PORT" "${SERVE_ARGS[@]}"

"$PY" benchmarks/gpu_check.py report "$STEPS" "$OUT"
