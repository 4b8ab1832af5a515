#!/usr/bin/env bash
# Issue 12: every output layer at V = 224k (word-level one-to-many Bible,
# German -> 14 target translations, scripts/bible/prepare_bible_multi.py), each given
# the same wall-clock training budget on this machine, then decoded (beam 5,
# factorized search for MHP / MHE, plus their dense row) and scored per target
# language.
#
#   scripts/bible/extreme_vocab.sh            # or: make extreme-vocab
#
# Environment: MINUTES (training minutes per method, default 15), METHODS
# (default softmax,adaptive,mhp,mhe,mhs), DATA (the data-bin, built here if
# missing), NAME (table name, scripts/bible/results/compare_NAME.md).
# Extra arguments go to compare.py, e.g. a longer budget continued from the
# 15-minute runs (the README's 45-minute table):
#   MINUTES=45 METHODS=softmax,adaptive,mhp NAME=extreme_vocab_word_45min \
#     scripts/bible/extreme_vocab.sh --extend-from work/compare/extreme_vocab_word
# The end writes sacreBLEU's paired bootstrap: scripts/bible/results/compare_NAME_paired_bs.txt.
# Methods run one after another on all cores: nothing else should run on the
# machine meanwhile (the table records the load average).  Resumable: methods
# already finished in work/compare/NAME are reused (compare.py --reuse).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PY=${VENV:-$REPO/.venv}/bin/python
DATA=${DATA:-$REPO/work/bible-multi-word}
NAME=${NAME:-extreme_vocab_word}
MINUTES=${MINUTES:-15}
METHODS=${METHODS:-softmax,adaptive,mhp,mhe,mhs}
CODES=$REPO/work/codes/multi_word_ppmi_h2.json
RESULTS=$REPO/scripts/bible/results  # the tables

[ -f "$DATA/prepare_data.json" ] || "$PY" "$REPO/scripts/bible/prepare_bible_multi.py" --destdir "$DATA" \
  --tokenizer word --min-count 2 --valid-size 100 --test-size 100 --quiet
# the PPMI code table (the default of mhp / mhe) once for both, not inside each run (~5 min at this V)
[ -f "$CODES" ] || "${VENV:-$REPO/.venv}/bin/mhce-build-codes" --databin "$DATA" --target-lang mul --heads 2 \
  --source ppmi --seed 1 --out "$CODES"

HOURS=$("$PY" -c "print(round($MINUTES / 60, 4))")
export WARMUP=${WARMUP:-100} ADAPTIVE_CUTOFF=${ADAPTIVE_CUTOFF:-20000,60000}
# MHP_SHORTLIST: the committed tables (and their checkpoints, for
# --extend-from) are the plain product, trained before MHP's default
# shortlist; MHP_SHORTLIST=-1 gives the model's default (2048 at this V)
"$PY" "$REPO/scripts/benchmarks/compare.py" --databin "$DATA" --name "$NAME" --methods "$METHODS" \
  --warmup "$WARMUP" --max-update 1000000 \
  --variant "mhp=mhp:--mhce-code-table $CODES --mhce-shortlist ${MHP_SHORTLIST:-0}" --variant "mhe=mhe:--mhce-code-table $CODES" \
  --train-args "--stop-time-hours $HOURS --validate-interval-updates 100" \
  --generate-args "--max-len-a 1.2 --max-len-b 10" --speed-batches 4 --dense-subset test_en --reuse --out "$RESULTS" \
  --note "adaptive softmax cutoffs $ADAPTIVE_CUTOFF; MHP and MHE read the same PPMI code table ($CODES, built once)" \
  "$@"

# is the best head's BLEU different from the baselines' beyond chance? sacreBLEU's paired bootstrap
# on the whole test set (the first system is the baseline)
W=$REPO/work/compare/$NAME
HYPS=()
for m in adaptive softmax mhp mhe mhs; do [ -f "$W/$m/hyp.test.mul" ] && HYPS+=("$m/hyp.test.mul"); done
if [ "${#HYPS[@]}" -ge 2 ]; then
  (cd "$W" && "${VENV:-$REPO/.venv}/bin/sacrebleu" "$DATA/raw/test.mul" -i "${HYPS[@]}" -m bleu chrf \
    --paired-bs --paired-bs-n 1000 -f text 2>/dev/null) > "$RESULTS/compare_${NAME}_paired_bs.txt"
  cat "$RESULTS/compare_${NAME}_paired_bs.txt"
fi
