#!/usr/bin/env bash
# The quality ablation of the output layers on the Bible de->en spm 8k data-bin
# (scripts/prepare_bible.py): one small recipe, same seed, every variant;
# two compare.py processes (one thread each) share the work directory, then the
# table is rendered from all finished runs.  Resumable: finished runs are reused.
#
#   scripts/ablation_bible.sh [DATABIN] [UPDATES]
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${VENV:-$REPO/.venv}/bin/python
DATA=${1:-$REPO/work/bible-de-en/bin}
UPD=${2:-500}
CODES=$REPO/work/codes
NAME=${NAME:-bible_spm8k_ablation}
[ -f "$CODES/ppmi_h2.json" ] || "$PY" "$REPO/scripts/build_codes.py" --databin "$DATA" --heads 2 --source ppmi --seed 1 --out "$CODES/ppmi_h2.json"
ARCH="--encoder-layers 2 --decoder-layers 2 --encoder-embed-dim 128 --decoder-embed-dim 128 --encoder-ffn-embed-dim 512 --decoder-ffn-embed-dim 512 --max-tokens 2048 --lr 2e-3 --validate-interval-updates 100"
VARIANTS=(
  --variant "mhe-pt=mhe:--mhce-last-head per-token"
  --variant "mhe-pt-ppmi=mhe:--mhce-last-head per-token --mhce-code-table $CODES/ppmi_h2.json"
  --variant "mhe-ppmi=mhe:--mhce-code-table $CODES/ppmi_h2.json"
  --variant "mhp-random=mhp:--mhce-code-order random"
  --variant "mhp-ppmi=mhp:--mhce-code-table $CODES/ppmi_h2.json"
)
common=(--databin "$DATA" --name "$NAME" --max-update "$UPD" --warmup $(( UPD / 4 )) --train-args "$ARCH"
        --speed-batches 0 --reuse "${VARIANTS[@]}")
export OMP_NUM_THREADS=1 SEARCH=${SEARCH:-factorized}
A=${A:-softmax,mhe-pt,mhe-pt-ppmi,mhp-ppmi}
B=${B:-mhe,mhe-ppmi,mhp,mhp-random}
"$PY" "$REPO/scripts/compare.py" "${common[@]}" --methods "$A" --out "$REPO/work/compare/$NAME.a" & pa=$!
"$PY" "$REPO/scripts/compare.py" "${common[@]}" --methods "$B" --out "$REPO/work/compare/$NAME.b" & pb=$!
wait $pa; wait $pb
"$PY" "$REPO/scripts/compare.py" "${common[@]}" --methods "$A,$B" --tables-only
