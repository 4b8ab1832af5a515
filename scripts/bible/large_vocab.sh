#!/usr/bin/env bash
# Issue 29: the best multi-head output layer against fairseq's adaptive softmax at a
# large multilingual target vocabulary, at equal wall-clock, side by side.
#
#   scripts/bible/large_vocab.sh                 # the 128k sentencepiece setting
#   SETTING=word scripts/bible/large_vocab.sh    # the word-level 224k setting
#
# Settings (each rebuilt when its data-bin is missing):
#   spm128k  German -> TARGETS (default en,fr,es,pt,it,ro,pl) one-to-many Bible, one joint
#            unigram sentencepiece model over the source and every target at 128,000 pieces
#            (scripts/bible/prepare_bible_multi.py --tokenizer spm); data-bin work/bible-multi-spm128k;
#            every model --share-all-embeddings (below)
#   word     German -> the 14 default targets, word level, types seen twice (V = 223,947);
#            data-bin work/bible-multi-word; --share-decoder-input-output-embed (the source
#            and target dictionaries differ)
# The source line starts with the target-language token (__en__ ...), as fairseq's
# multilingual recipes write it (--encoder-langtok tgt).  The body: scripts/recipes/train.sh's
# transformer (3+3 layers, d 256, max-tokens 4096), and, as for every joint multilingual
# vocabulary (fairseq's M2M-100 and mBART recipes), --share-all-embeddings on the spm128k
# data: one V x d table for the encoder's input, the decoder's input and (softmax, MHE, MHP)
# the output vectors.
#
# PHASES (comma-separated, default probe,lanes,softmax,tables):
#   probe    scripts/benchmarks/probe_step.py: short runs of the tied softmax, tied MHE,
#            tied MHP (automatic shortlist) and adaptive softmax; step tok/s against the
#            softmax body's ceiling and peak training RSS -> results/large_vocab_SETTING_probe.md
#            (PROBE_MAX_TOKENS=8192: softmax, MHE and MHP at that batch, 2 timed batches
#            -> results/large_vocab_SETTING_probe_8192.md)
#   lanes    LANE_A (default mhe: tied per-token MHE, automatic code table) and LANE_B
#            (default adaptive) trained MINUTES (110) each side by side, one thread each
#            (compare.py, --stop-time-hours), then decoded (beam 5; MHE factorized, and on
#            its dense row on test_en) and scored per language
#   softmax  the tied softmax for SOFTMAX_MIN (15) minutes, alone, one thread: the short
#            reference row of what a softmax affords in that time
#   tables   all finished runs: the table, the valid-ppl-against-wall-clock plot, and
#            sacreBLEU's paired bootstrap per language against adaptive softmax
#            -> scripts/bible/results/compare_large_vocab_SETTING*.{md,csv,json,png},
#               large_vocab_SETTING_paired_bs.md
# Adaptive softmax: fairseq's documented cutoffs for its largest vocabulary (the
# wikitext-103 recipe, V = 267k: --adaptive-softmax-cutoff 20000,60000) and the same shared
# input embeddings, its output untied: in a translation model fairseq cannot tie it
# (--tie-adaptive-weights needs --adaptive-input, which only fairseq's language models build;
# the output projection that --share-*-embed ties is replaced by the adaptive softmax).
# ADAPTIVE_CUTOFF overrides.
#
# Resumable: finished runs in work/compare/large_vocab_SETTING are reused; an unfinished one
# is set aside and trained again (compare.py --reuse).  Other knobs: WARMUP (300),
# VALIDATE (250: --validate-interval-updates), VENV.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PY=${VENV:-$REPO/.venv}/bin/python
SETTING=${SETTING:-spm128k}
case "$SETTING" in
  spm128k)
    DATA=${DATA:-$REPO/work/bible-multi-spm128k}
    PREP=(--tokenizer spm --vocab-size 128000 --targets "${TARGETS:-en,fr,es,pt,it,ro,pl}")
    TIE=--share-all-embeddings ;;
  word)
    DATA=${DATA:-$REPO/work/bible-multi-word}
    PREP=(--tokenizer word --min-count 2 --valid-size 100 --test-size 100)
    TIE=--share-decoder-input-output-embed ;;  # source and target dictionaries differ
  *) echo "large_vocab.sh: SETTING must be spm128k or word (got '$SETTING')" >&2; exit 2 ;;
esac
NAME=large_vocab_$SETTING
MINUTES=${MINUTES:-110}
SOFTMAX_MIN=${SOFTMAX_MIN:-15}
LANE_A=${LANE_A:-mhe}
LANE_B=${LANE_B:-adaptive}
ADAPTIVE_CUTOFF=${ADAPTIVE_CUTOFF:-20000,60000}
RESULTS=$REPO/scripts/bible/results
WORK=$REPO/work/compare/$NAME
want() { [[ ",${PHASES:-probe,lanes,softmax,tables}," == *",$1,"* ]]; }
hours() { "$PY" -c "print(round($1 / 60, 4))"; }

if [ ! -f "$DATA/prepare_data.json" ]; then
  /usr/bin/env time -v "$PY" "$REPO/scripts/bible/prepare_bible_multi.py" --destdir "$DATA" "${PREP[@]}" --quiet \
    2> >(grep -E "trained spm|Elapsed|Maximum resident" >&2)
fi

ADAPTIVE_TIE=""  # the adaptive softmax's output cannot be tied; its inputs are shared under share-all
[ "$TIE" = --share-all-embeddings ] && ADAPTIVE_TIE=$TIE
VARIANTS=(
  --variant "mhe=mhe:$TIE"
  --variant "mhp=mhp:$TIE"
  --variant "softmax=softmax:$TIE"
  --variant "adaptive=adaptive:$ADAPTIVE_TIE --adaptive-softmax-cutoff $ADAPTIVE_CUTOFF"
)
COMMON=(--databin "$DATA" --name "$NAME" --max-update 1000000 --warmup "${WARMUP:-300}" --reuse
        --generate-args "--max-len-a 1.2 --max-len-b 10" --dense-subset test_en "${VARIANTS[@]}")
export OMP_NUM_THREADS=1
mkdir -p "$(dirname "$WORK")"

if want probe; then
  # the recipe's batch (max-tokens 4096), every configuration; PROBE_MAX_TOKENS: another batch,
  # the softmax and the two heads (the memory ratio grows with the batch)
  probe=(--work "$REPO/work/probe/$SETTING" --out "$RESULTS/${NAME}_probe")
  [ -n "${PROBE_MAX_TOKENS:-}" ] && probe=(--work "$REPO/work/probe/$SETTING-mt$PROBE_MAX_TOKENS"
    --out "$RESULTS/${NAME}_probe_$PROBE_MAX_TOKENS" --configs softmax,mhe,mhp --batches 2 --max-tokens "$PROBE_MAX_TOKENS")
  "$PY" "$REPO/scripts/benchmarks/probe_step.py" --databin "$DATA" "${probe[@]}" \
    --adaptive-cutoff "$ADAPTIVE_CUTOFF" --tie="$TIE"
fi

if want lanes; then
  targs="--stop-time-hours $(hours "$MINUTES") --validate-interval-updates ${VALIDATE:-250}"
  "$PY" "$REPO/scripts/benchmarks/compare.py" "${COMMON[@]}" --train-args "$targs" --speed-batches 0 \
    --methods "$LANE_A" --out "$WORK.a" > "$WORK.a.out" 2>&1 & pa=$!
  "$PY" "$REPO/scripts/benchmarks/compare.py" "${COMMON[@]}" --train-args "$targs" --speed-batches 0 \
    --methods "$LANE_B" --out "$WORK.b" > "$WORK.b.out" 2>&1 & pb=$!
  wait "$pa" || { tail -20 "$WORK.a.out"; exit 1; }
  wait "$pb" || { tail -20 "$WORK.b.out"; exit 1; }
fi

if want softmax; then
  "$PY" "$REPO/scripts/benchmarks/compare.py" "${COMMON[@]}" --speed-batches 0 \
    --train-args "--stop-time-hours $(hours "$SOFTMAX_MIN") --validate-interval-updates ${VALIDATE:-250}" \
    --methods softmax --out "$WORK.softmax"
fi

if want tables; then
  # the runs as they are (--tables-only: nothing trained, decoded or timed again; a run without
  # a decode, such as a softmax row stopped before its decode finished, is shown without BLEU);
  # the step speed and memory goals are the probe's table
  methods=""
  for m in "$LANE_A" "$LANE_B" softmax; do
    grep -qs "done training" "$WORK/$m/train.log" && methods+="${methods:+,}$m"
  done
  softmax_note="the tied softmax $SOFTMAX_MIN min (one thread)"
  [[ ",$methods," == *",softmax,"* ]] || softmax_note="no tied softmax run (its step speed and memory: the probe's table)"
  "$PY" "$REPO/scripts/benchmarks/compare.py" "${COMMON[@]}" --methods "$methods" --tables-only --out "$RESULTS" \
    --note "$SETTING: ${LANE_A} and ${LANE_B} trained $MINUTES min each side by side (one thread each); $softmax_note; ${LANE_A} $TIE; adaptive softmax cutoffs $ADAPTIVE_CUTOFF (fairseq's wikitext-103 cutoffs), ${ADAPTIVE_TIE:-nothing shared}, its output untied (fairseq cannot tie it in a translation model)" \
    --note "${TABLE_NOTE:-}"
  scored=""
  for m in "$LANE_A" "$LANE_B" softmax; do [ -f "$WORK/$m/score.test.json" ] && scored+="${scored:+,}$m"; done
  "$PY" "$REPO/scripts/benchmarks/paired_bootstrap.py" --databin "$DATA" --workdir "$WORK" \
    --baseline "$LANE_B" --systems "$scored" --out "$RESULTS/${NAME}_paired_bs.md"
fi
