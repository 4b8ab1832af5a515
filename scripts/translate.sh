#!/usr/bin/env bash
# Decode the test split with beam 5 and score it with sacreBLEU.
#
#   scripts/translate.sh METHOD DATABIN SAVEDIR [extra fairseq-generate args]
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
#   scripts/translate.sh mhe DATABIN SAVEDIR --task translation_mhce --mhce-search factorized
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
  DETOK=()  # prepare_bible_multi.py's word split: undone below (its joiners)
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

WORD_JOINER=$WORD_JOINER REPO=$REPO "$PY" - "$GEN" "$GLOG" "$REF" "$SAVEDIR/hyp.$SUBSET$TAG.$TGT" "$SAVEDIR/score.$SUBSET$TAG.json" "$METHOD" "$CKPT" <<'EOF'
import json, os, re, sys
import sacrebleu
gen, glog, ref_path, hyp_path, json_path, method, ckpt = sys.argv[1:]
detok = lambda t: t
if os.environ.get("WORD_JOINER") == "1":
    sys.path.insert(0, os.path.join(os.environ["REPO"], "scripts"))
    from prepare_bible_multi import detokenize as detok
hyps = {}
speed = None
for line in open(gen, encoding="utf-8"):
    if line.startswith("D-"):  # detokenized hypothesis, best first per id
        sid, _score, *text = line.rstrip("\n").split("\t")
        hyps.setdefault(int(sid[2:]), detok(text[0]) if text else "")
for line in open(glog, encoding="utf-8", errors="replace"):
    m = re.search(r"Translated ([\d,]+) sentences .* in ([\d.]+)s \(([\d.]+) sentences/s, ([\d.]+) tokens/s\)", line)
    if m:
        speed = {"sentences": int(m.group(1).replace(",", "")), "seconds": float(m.group(2)),
                 "sentences_per_s": float(m.group(3)), "tokens_per_s": float(m.group(4))}
refs = [l.rstrip("\n") for l in open(ref_path, encoding="utf-8")]
missing = [i for i in range(len(refs)) if i not in hyps]
if missing or len(hyps) != len(refs):
    sys.exit(f"translate.sh: {len(hyps)} hypotheses for {len(refs)} references "
             f"(first missing id: {missing[:1]}); was a line skipped?")
out = [hyps[i] for i in range(len(refs))]
with open(hyp_path, "w", encoding="utf-8") as f:
    f.write("\n".join(out) + "\n")
bleu = sacrebleu.metrics.BLEU()
chrf = sacrebleu.metrics.CHRF()
b = bleu.corpus_score(out, [refs])
c = chrf.corpus_score(out, [refs])
res = {"method": method, "checkpoint": ckpt, "hypotheses": hyp_path, "reference": ref_path,
       "bleu": round(b.score, 2), "bleu_signature": str(bleu.get_signature()), "bleu_detail": str(b),
       "chrf": round(c.score, 2), "chrf_signature": str(chrf.get_signature()), "decoding": speed,
       "search": "factorized" if "--mhce-search" in open(glog, encoding="utf-8", errors="replace").read() else "dense"}
with open(json_path, "w", encoding="utf-8") as f:
    json.dump(res, f, indent=2)
    f.write("\n")
print(f"BLEU: {b}  ({res['bleu_signature']})")
print(f"chrF: {c}  ({res['chrf_signature']})")
if speed:
    print(f"decoding: {speed['sentences']} sentences in {speed['seconds']} s, "
          f"{speed['sentences_per_s']} sentences/s (beam 5)")
print(f"hypotheses: {hyp_path}")
print(f"score:      {json_path}")
EOF
