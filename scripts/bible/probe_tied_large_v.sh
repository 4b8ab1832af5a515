#!/usr/bin/env bash
# Training-step speed of tied output layers at the extreme vocabulary (issue 22):
# the word-level one-to-many Bible data-bin (V = 223,947 target types, from
# scripts/bible/prepare_bible_multi.py --tokenizer word --min-count 2), the recipe of
# scripts/recipes/train.sh with --share-decoder-input-output-embed, one update each
# (a probe: only the step speed means anything), then step_speed.py's interleaved
# step timing of every checkpoint on the same real batches, with the tied
# softmax's body-only step as the ceiling.  The tied MHE run also logs how
# long its automatic PPMI code table took ("mhce: PPMI code table ...").
#
#   scripts/bible/probe_tied_large_v.sh [DATABIN] [OUT_JSON]
#
# Env: BATCHES (4), MAX_TOKENS (4096), WORK (work/probe_tied), OMP_NUM_THREADS (2).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PY=${VENV:-$REPO/.venv}/bin/python
DATA=${1:-$REPO/work/bible-multi-word}
OUT=${2:-$REPO/scripts/bible/results/extreme_vocab_tied_probe.json}
WORK=${WORK:-$REPO/work/probe_tied}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} WARMUP=100
declare -A ARGS=(
  [softmax]="softmax --share-decoder-input-output-embed"
  [mhe]="mhe --share-decoder-input-output-embed"
  [mhe-untied]="mhe"
)
declare -A CKPT
for name in softmax mhe mhe-untied; do
  read -r method flags <<< "${ARGS[$name]}"
  if [ ! -f "$WORK/$name/checkpoint_last.pt" ]; then
    # shellcheck disable=SC2086
    "$REPO/scripts/recipes/train.sh" "$method" "$DATA" "$WORK/$name" --max-update 1 --disable-validation $flags \
      > "$WORK.$name.train.out" 2>&1 || { tail -20 "$WORK.$name.train.out"; exit 1; }
  fi
  CKPT[$name]=$WORK/$name/checkpoint_last.pt
done
grep -h "mhce: PPMI code table" "$WORK.mhe.train.out" "$WORK.mhe-untied.train.out" || true
json=$(printf '{"softmax": "%s", "mhe": "%s", "mhe-untied": "%s"}' "${CKPT[softmax]}" "${CKPT[mhe]}" "${CKPT[mhe-untied]}")
"$PY" "$REPO/scripts/benchmarks/step_speed.py" --batches "${BATCHES:-4}" "$json" "$DATA" "${MAX_TOKENS:-4096}" \
  | tail -1 > "$OUT"
cat "$OUT"  # tok_per_s per method; softmax_body is the ceiling
