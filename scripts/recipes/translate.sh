#!/usr/bin/env bash
# Decode the test split with beam 5 and score it with sacreBLEU.
#
#   scripts/recipes/translate.sh METHOD DATABIN SAVEDIR [extra fairseq-generate args]
#
# Runs fairseq-generate on SAVEDIR/checkpoint_best.pt (CKPT=... to pick
# another) with --beam 5 --gen-subset test (SUBSET=valid for the valid split),
# detokenizes (sentencepiece data-bins: --post-process sentencepiece;
# moses-word data-bins: --tokenizer moses), writes the hypotheses in the
# original line order to SAVEDIR/hyp.SUBSET.TGT and scores them against the
# untokenized references DATABIN/raw/SUBSET.TGT with the sacrebleu Python API
# (BLEU and chrF, with their signatures).  Writes:
#   SAVEDIR/generate-SUBSET.txt    fairseq-generate's full output (S/T/H/D/P lines)
#   SAVEDIR/generate-SUBSET.log    its log (stderr), with the decoding speed
#   SAVEDIR/hyp.SUBSET.TGT         detokenized hypotheses, one per test line
#   SAVEDIR/score.SUBSET.json      BLEU, chrF, signatures, decoding speed
# TAG=.dense (any suffix) names these files generate-SUBSET.dense.txt etc.,
# so a second decode of the same checkpoint does not replace the first.
# METHOD is accepted for symmetry with train.sh; the checkpoint knows its
# output layer (--user-dir is always passed, harmless for softmax models).
# Extra arguments go to fairseq-generate, e.g. the plugin's factorized search
# for mhp/mhe (same hypotheses as the default dense path, faster at large V):
#   scripts/recipes/translate.sh mhe DATABIN SAVEDIR --task translation_mhce --mhce-search factorized
set -euo pipefail
source "$(dirname "$0")/recipe_common.sh"
recipe_setup translate.sh fairseq-generate "$@"  # sets METHOD DATABIN SAVEDIR REPO BIN SRC TGT
shift 3
PY=${PYTHON:-$BIN/python}
SUBSET=${SUBSET:-test}
CKPT=${CKPT:-$SAVEDIR/checkpoint_best.pt}
[ -f "$CKPT" ] || { echo "translate.sh: no checkpoint $CKPT" >&2; exit 2; }
REF=$DATABIN/raw/$SUBSET.$TGT
[ -f "$REF" ] || { echo "translate.sh: no untokenized reference $REF" >&2; exit 2; }

WORD_JOINER=0
if ls "$DATABIN"/spm*.model >/dev/null 2>&1; then
  DETOK=(--post-process sentencepiece)
elif grep -q '"tokenizer": "word"' "$DATABIN/prepare_data.json" 2>/dev/null; then
  DETOK=()  # prepare_bible_multi.py's word split (fairseq_mhce/recipes/word_split.py): undone below (its joiners)
  WORD_JOINER=1
else
  DETOK=(--tokenizer moses)  # its languages are --source-lang / --target-lang
fi
# MHP/MHE decode through the factorization (exact, no V-wide row); SEARCH=dense for fairseq's own path
SEARCH_ARGS=()
case "$METHOD" in
  mhp|mhe) [ "${SEARCH:-factorized}" = dense ] || SEARCH_ARGS=(--task translation_mhce --mhce-search factorized) ;;
esac
TAG=${TAG:-}
GEN=$SAVEDIR/generate-$SUBSET$TAG.txt
GLOG=$SAVEDIR/generate-$SUBSET$TAG.log
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
echo "translate.sh: $METHOD $CKPT on $SUBSET, beam 5" >&2
# --required-batch-size-multiple 1: with fairseq's default (8), batch_by_size
# silently drops the last batch when its size is not a multiple of 8, i.e.
# test sentences would go missing.
# fairseq's progress goes to stderr (visible); the S/T/H/D lines to $GEN
"$BIN/fairseq-generate" "$DATABIN" --user-dir "$REPO/fairseq_mhce" --path "$CKPT" \
  --source-lang "$SRC" --target-lang "$TGT" --gen-subset "$SUBSET" \
  --beam 5 --batch-size "${BATCH_SIZE:-64}" --required-batch-size-multiple 1 \
  "${DETOK[@]}" "${SEARCH_ARGS[@]}" "$@" > "$GEN" 2> >(tee "$GLOG" >&2)
wait  # for tee
grep -E '^Generate' "$GEN" | sed 's/^/fairseq (tokenized; not the score below): /' >&2 || true

# hypotheses in test order, sacreBLEU BLEU + chrF into score.SUBSET.json:
# python -m fairseq_mhce.recipes.recipe_checks score (the plugin of this checkout: PYTHONPATH)
SCORE=(-m fairseq_mhce.recipes.recipe_checks score)
if [ "$WORD_JOINER" = 1 ]; then SCORE+=(--word-joiner); fi
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PY" "${SCORE[@]}" "$GEN" "$GLOG" "$REF" "$SAVEDIR/hyp.$SUBSET$TAG.$TGT" "$SAVEDIR/score.$SUBSET$TAG.json" "$METHOD" "$CKPT"
