#!/usr/bin/env bash
# The quality ablation of the output layers on the Bible de->en spm 8k data-bin
# (scripts/bible/prepare_bible.py): one small recipe, same seed, every variant named
# explicitly (so a change of the plugin's defaults does not change a row).
#
#   scripts/bible/ablation_bible.sh [DATABIN] [UPDATES]
#
# 1. code tables: PPMI-SVD of the training targets (H=2, H=3), no model;
# 2. equal updates: softmax; MHE shared / per-token x identity / PPMI codes;
#    MHP identity / random / PPMI codes; MHS; per-token MHE with PPMI codes at
#    H=3; a second seed of the softmax and of per-token MHE + PPMI;
# 3. code tables from a trained model (the softmax's output projection) for
#    per-token MHE and MHP;
# 4. equal wall-clock: softmax, the best MHE, the best MHP and MHS, each given
#    WALL_MIN minutes of training (--stop-time-hours);
# 5. a longer budget (LONG_UPD updates, default 1500) for softmax, the best MHE
#    and MHP, MHS and the former default (shared last head, identity codes),
#    and a second seed of the softmax and of the best MHE;
# 6. MHP with LightRNN-style re-allocation of its PPMI code table during
#    training (--mhce-realloc-updates: every 100 updates, or once at UPD/2)
#    beside the softmax and MHP + PPMI at UPD updates (table NAME_realloc);
# 7. MHP with a shortlist (--mhce-shortlist 1024 / 2048: the most frequent
#    target types get their own output vectors beside the product) beside the
#    softmax and MHP + PPMI at UPD updates, with a second seed of the softmax
#    and of MHP + shortlist 1024 / 2048 (table NAME_shortlist);
# 8. the softmax and MHP + shortlist 1024 / 2048 at LONG_UPD updates (table
#    NAME_shortlist_LONG_UPD);
# 9. the softmax and MHP + shortlist 2048 at equal wall-clock (WALL_MIN
#    minutes each; table NAME_shortlist_wallclock);
# 10. fairseq's IWSLT recipe form with tied embeddings
#    (--share-decoder-input-output-embed) and the plugin's defaults (automatic
#    PPMI codes, per-token MHE, MHP + shortlist 2048): the tied softmax and
#    tied MHE (two seeds each) and tied MHP at LONG_UPD updates (table
#    NAME_tied_LONG_UPD); run it on another data-bin with NAME=... for the
#    second language pair (TIED_A / TIED_B: the two lanes' methods, an empty
#    one runs nothing; third seeds: softmax-tied-seed3, mhe-tied-seed3,
#    and mhp-tied-seed2; the fr-en table of the README:
#    NAME=bible_fr_en_spm8k_ablation TIED_A=softmax-tied,mhe-tied,mhp-tied
#    TIED_B=softmax-tied-seed2,mhe-tied-seed2,softmax-tied-seed3,mhe-tied-seed3,mhp-tied-seed2,
#    after the runs were made lane by lane);
# 11. the tied softmax, tied MHE and tied MHP at equal wall-clock (WALL_MIN
#    minutes each; table NAME_tied_wallclock; WALL_TIED_A / WALL_TIED_B: the
#    two lanes' methods);
# PHASES (comma-separated subset of updates,wallclock,long,realloc,shortlist,
# shortlist_long,shortlist_wallclock,tied,tied_wallclock; default: the first
# nine) picks the phases to run;
# each phase runs two compare.py processes (one thread each) side by side, then
# the tables are rendered from all finished runs (scripts/bible/results/compare_NAME*.md).
# Resumable: finished runs are reused (compare.py --reuse).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PY=${VENV:-$REPO/.venv}/bin/python
DATA=${1:-$REPO/work/bible-de-en/bin}
UPD=${2:-500}
WALL_MIN=${WALL_MIN:-8}
LONG_UPD=${LONG_UPD:-1500}
CODES=$REPO/work/codes
RESULTS=$REPO/scripts/bible/results  # the tables
NAME=${NAME:-bible_spm8k_ablation}
mkdir -p "$CODES"
# the data of make run (scripts/bible/main_job.sh) when the default data-bin is missing
if [ -z "${1:-}" ] && [ ! -f "$DATA/prepare_data.json" ]; then
  "$PY" "$REPO/scripts/bible/prepare_bible.py" --outdir "$REPO/work/bible-de-en/text" --destdir "$DATA" \
    --vocab-size 8000 --joint --quiet
fi
codes() { [ -f "$CODES/$1" ] || "${VENV:-$REPO/.venv}/bin/mhce-build-codes" --databin "$DATA" --seed 1 --out "$CODES/$1" "${@:2}"; }
ARCH="--encoder-layers 2 --decoder-layers 2 --encoder-embed-dim 128 --decoder-embed-dim 128 --encoder-ffn-embed-dim 512 --decoder-ffn-embed-dim 512 --max-tokens 2048 --lr 2e-3 --validate-interval-updates 100"
PT="--mhce-last-head per-token"
SH="--mhce-last-head shared"
VARIANTS=(
  --variant "mhe-shared=mhe:$SH --mhce-code-order identity"
  --variant "mhe-shared-ppmi=mhe:$SH --mhce-code-table $CODES/ppmi_h2.json"
  --variant "mhe-pt=mhe:$PT --mhce-code-order identity"
  --variant "mhe-pt-ppmi=mhe:$PT --mhce-code-table $CODES/ppmi_h2.json"
  --variant "mhe-pt-ppmi-h3=mhe:$PT --mhce-heads 3 --mhce-code-table $CODES/ppmi_h3.json"
  --variant "mhe-pt-ckpt=mhe:$PT --mhce-code-table $CODES/softmax_out_h2.json"
  --variant "mhp-identity=mhp:--mhce-code-order identity"
  --variant "mhp-random=mhp:--mhce-code-order random"
  --variant "mhp-ppmi=mhp:--mhce-code-table $CODES/ppmi_h2.json"
  --variant "mhp-ckpt=mhp:--mhce-code-table $CODES/softmax_out_h2.json"
  --variant "softmax-seed2=softmax:--seed 2"
  --variant "mhe-pt-ppmi-seed2=mhe:$PT --mhce-code-table $CODES/ppmi_h2.json --seed 2"
  --variant "mhp-ppmi-realloc=mhp:--mhce-code-table $CODES/ppmi_h2.json --mhce-realloc-updates $(seq -s, 100 100 $(( UPD - 1 ))) --mhce-realloc-window 100"
  --variant "mhp-short1024=mhp:--mhce-shortlist 1024 --mhce-code-order identity"
  --variant "mhp-ppmi-short1024=mhp:--mhce-shortlist 1024 --mhce-code-table $CODES/ppmi_h2_short1024.json"
  --variant "mhp-ppmi-short1024-seed2=mhp:--mhce-shortlist 1024 --mhce-code-table $CODES/ppmi_h2_short1024.json --seed 2"
  --variant "mhp-ppmi-short2048=mhp:--mhce-shortlist 2048 --mhce-code-table $CODES/ppmi_h2_short2048.json"
  --variant "mhp-ppmi-short2048-seed2=mhp:--mhce-shortlist 2048 --mhce-code-table $CODES/ppmi_h2_short2048.json --seed 2"
  --variant "softmax-tied=softmax:--share-decoder-input-output-embed"
  --variant "softmax-tied-seed2=softmax:--share-decoder-input-output-embed --seed 2"
  --variant "mhe-tied=mhe:--share-decoder-input-output-embed"
  --variant "mhe-tied-seed2=mhe:--share-decoder-input-output-embed --seed 2"
  --variant "mhp-tied=mhp:--share-decoder-input-output-embed"
  --variant "softmax-tied-seed3=softmax:--share-decoder-input-output-embed --seed 3"
  --variant "mhe-tied-seed3=mhe:--share-decoder-input-output-embed --seed 3"
  --variant "mhp-tied-seed2=mhp:--share-decoder-input-output-embed --seed 2"
  --variant "mhe-tied-ls05=mhe:--share-decoder-input-output-embed --label-smoothing 0.0513"
  --variant "mhe-tied-ls05-seed2=mhe:--share-decoder-input-output-embed --label-smoothing 0.0513 --seed 2"
  --variant "mhp-ppmi-realloc1=mhp:--mhce-code-table $CODES/ppmi_h2.json --mhce-realloc-updates $(( UPD / 2 )) --mhce-realloc-window $(( UPD / 2 ))"
)
want() { [[ ",${PHASES:-updates,wallclock,long,realloc,shortlist,shortlist_long,shortlist_wallclock}," == *",$1,"* ]]; }
# the phases of the untied ablation build the offline tables (phase 1 needs them)
if want updates || want realloc || want shortlist || want shortlist_long || want shortlist_wallclock || want long || want wallclock; then
  codes ppmi_h2.json --heads 2 --source ppmi
  codes ppmi_h3.json --heads 3 --source ppmi
  codes ppmi_h2_short1024.json --heads 2 --source ppmi --shortlist 1024
  codes ppmi_h2_short2048.json --heads 2 --source ppmi --shortlist 2048
fi
export OMP_NUM_THREADS=1 SEARCH=${SEARCH:-factorized}
pair() {  # pair NAME UPDATES TRAIN_ARGS METHODS_A METHODS_B: two compare.py processes side by side
  local name=$1 upd=$2 targs=$3 a=$4 b=$5
  local warm=$(( UPD / 4 ))
  [ "$upd" -lt 1000000 ] && warm=$(( upd / 4 ))
  local common=(--databin "$DATA" --name "$name" --max-update "$upd" --warmup "$warm" --train-args "$targs"
                --speed-batches 0 --reuse "${VARIANTS[@]}")
  local pa= pb=  # an empty lane runs nothing (one lane leaves a core free)
  [ -n "$a" ] && { "$PY" "$REPO/scripts/benchmarks/compare.py" "${common[@]}" --methods "$a" --out "$REPO/work/compare/$name.a" & pa=$!; }
  [ -n "$b" ] && { "$PY" "$REPO/scripts/benchmarks/compare.py" "${common[@]}" --methods "$b" --out "$REPO/work/compare/$name.b" & pb=$!; }
  [ -z "$pa" ] || wait "$pa"
  [ -z "$pb" ] || wait "$pb"
  local both="$a,$b"; both=${both#,}; both=${both%,}
  "$PY" "$REPO/scripts/benchmarks/compare.py" "${common[@]}" --methods "$both" --tables-only --out "$RESULTS" "${@:6}"
}
P1A=softmax,mhe-pt-ppmi,mhp-ppmi,mhe-pt,mhs,mhe-pt-ppmi-h3
P1B=mhe-shared,mhe-shared-ppmi,mhp-identity,mhp-random,softmax-seed2,mhe-pt-ppmi-seed2
P2A=mhe-pt-ckpt
P2B=mhp-ckpt
if want updates; then
  pair "$NAME" "$UPD" "$ARCH" "$P1A" "$P1B"
  codes softmax_out_h2.json --heads 2 --source checkpoint --checkpoint "$REPO/work/compare/$NAME/softmax/checkpoint_best.pt"
  pair "$NAME" "$UPD" "$ARCH" "$P1A,$P2A" "$P1B,$P2B"
fi
# equal wall-clock: the same minutes for each (warm-up as above; the update cap is not reached)
if want wallclock; then
  pair "${NAME}_wallclock" 1000000 "$ARCH --stop-time-hours $("$PY" -c "print(round($WALL_MIN / 60, 4))")" \
    "${WALL_A:-softmax,mhe-pt-ppmi}" "${WALL_B:-mhp-ppmi,mhs}" \
    --note "equal wall-clock: every method trained for $WALL_MIN min (--stop-time-hours), two runs at a time on the 2 cores (one thread each); the update cap 1000000 is never reached"
fi
if want long; then
  pair "${NAME}_${LONG_UPD}" "$LONG_UPD" "$ARCH" "${LONG_A:-softmax,mhe-shared,softmax-seed2}" "${LONG_B:-mhe-pt-ppmi,mhp-ppmi,mhs,mhe-pt-ppmi-seed2}"
fi
if want realloc; then
  pair "${NAME}_realloc" "$UPD" "$ARCH" "softmax,mhp-ppmi-realloc" "mhp-ppmi,mhp-ppmi-realloc1" \
    --note "mhp-ppmi-realloc: --mhce-realloc-updates every 100 updates (window 100); mhp-ppmi-realloc1: once at update $(( UPD / 2 )) (window $(( UPD / 2 ))); both start from the PPMI table"
fi
if want shortlist; then
  pair "${NAME}_shortlist" "$UPD" "$ARCH" "softmax,mhp-ppmi-short1024,softmax-seed2,mhp-ppmi-short2048-seed2" \
    "mhp-ppmi,mhp-ppmi-short2048,mhp-short1024,mhp-ppmi-short1024-seed2" \
    --note "mhp-*short*: --mhce-shortlist N, the N most frequent target types with their own output vectors beside the product (codes: mhce-build-codes --shortlist N, which lists the N most frequent training targets; mhp-short1024: the model's default, the dictionary's first 1024 ids, identity order on the tail)"
fi
# the shortlist MHP against the softmax at the longer budget (its own table:
# the committed NAME_LONG_UPD table keeps its runs)
if want shortlist_long; then
  pair "${NAME}_shortlist_${LONG_UPD}" "$LONG_UPD" "$ARCH" "softmax" "mhp-ppmi-short1024,mhp-ppmi-short2048"
fi
# the IWSLT recipe form (tied embeddings) with the plugin's defaults
if want tied; then
  pair "${NAME}_tied_${LONG_UPD}" "$LONG_UPD" "$ARCH" "${TIED_A-softmax-tied,mhe-tied-seed2}" "${TIED_B-softmax-tied-seed2,mhe-tied,mhp-tied}" \
    --note "every row ties the decoder's input and output embeddings (--share-decoder-input-output-embed, as fairseq's IWSLT'14 recipe); MHE / MHP with the plugin's defaults: automatic PPMI code table, per-token last head, MHP shortlist 2048"
fi
if want tied_wallclock; then
  pair "${NAME}_tied_wallclock" 1000000 "$ARCH --stop-time-hours $("$PY" -c "print(round($WALL_MIN / 60, 4))")" \
    "${WALL_TIED_A-softmax-tied,mhp-tied}" "${WALL_TIED_B-mhe-tied}" \
    --note "equal wall-clock: each trained for $WALL_MIN min (--stop-time-hours), two at a time on the 2 cores (one thread each); every row ties the embeddings" \
    ${WALL_NOTE:+--note "$WALL_NOTE"}
fi
# the shortlist MHP against the softmax at equal wall-clock (its own table)
if want shortlist_wallclock; then
  pair "${NAME}_shortlist_wallclock" 1000000 "$ARCH --stop-time-hours $("$PY" -c "print(round($WALL_MIN / 60, 4))")" \
    "softmax" "mhp-ppmi-short2048" \
    --note "equal wall-clock: each trained for $WALL_MIN min (--stop-time-hours), the two side by side on the 2 cores (one thread each); the update cap 1000000 is never reached"
fi
