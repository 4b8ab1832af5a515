#!/usr/bin/env bash
# One training recipe for every output layer, identical everything else.
#
#   scripts/recipes/train.sh METHOD DATABIN SAVEDIR [extra fairseq-train args]
#
# METHOD   softmax   stock V x d projection + label_smoothed_cross_entropy
#          adaptive  fairseq's adaptive softmax (--adaptive-softmax-cutoff) +
#                    adaptive_loss (note: adaptive_loss has no label smoothing)
#          mhp|mhe|mhs  the plugin's multi-head output + mhce_label_smoothed_cross_entropy
# DATABIN  a fairseq data-bin (e.g. from scripts/bible/prepare_bible.py)
# SAVEDIR  where checkpoints and train.log go.  train.log is appended to, never
#          truncated: each start first writes a line
#            ===== train.sh start YYYY-MM-DD HH:MM:SS TZ: scripts/recipes/train.sh METHOD ... =====
#          (then '# fairseq-train: ...', the exact command), so the log of a
#          killed run survives its resume; parsers take the text after the last
#          '===== train.sh start ' line for the latest start.
#          A SAVEDIR whose checkpoints (checkpoint*.pt) are another run's --
#          another METHOD, other head sizes (--mhce-heads / --mhce-head-sizes /
#          MHCE_HEADS) or adaptive cutoffs, another --arch or another DATABIN --
#          is refused (exit 2, nothing in it changed) before anything is
#          written; resuming the same run (same METHOD, sizes and DATABIN)
#          works as before.  REUSE_SAVEDIR=1 trains in it anyway (fairseq then
#          resumes from its checkpoint_last.pt if that loads, and overwrites
#          checkpoint_best.pt).
#
# The model is fairseq's transformer_iwslt_de_en (or its _mhce twin) sized for
# a CPU: 3+3 layers, d 256, ffn 1024, 4 heads, no embedding sharing unless
# --share-decoder-input-output-embed is passed (every method but the plain
# MHP product and the shared-last-head MHE can tie).  Optimizer:
# adam (0.9, 0.98), lr 1e-3, inverse_sqrt with $WARMUP warm-up updates,
# label smoothing 0.1, dropout $DROPOUT, max-tokens 4096.
#
# Extra arguments are appended last, so they override any default here
# (argparse keeps the last value): give the budget as --max-update N,
# --max-epoch N or --stop-time-hours H.  Environment knobs: WARMUP (1000),
# DROPOUT (0.1), MAX_TOKENS (4096), LR (1e-3), SEED (1), MHCE_HEADS (2),
# ADAPTIVE_CUTOFF (default: V/4,3V/4 of the target dictionary), VENV,
# REUSE_SAVEDIR (1: skip the check of SAVEDIR's checkpoints above),
# CODES (mhp/mhe: ppmi = the model's automatic PPMI code table, built from
# the training targets when training starts and cached in
# SAVEDIR/mhce_code_table.json, the default; identity = --mhce-code-order
# identity).
set -euo pipefail
source "$(dirname "$0")/recipe_common.sh"
recipe_setup train.sh fairseq-train "$@"  # sets METHOD DATABIN SAVEDIR REPO BIN SRC TGT
START_LINE="===== train.sh start $(date '+%Y-%m-%d %H:%M:%S %Z'): $(printf '%q ' "$0" "$@")"
START_LINE="${START_LINE% } ====="
shift 3
V=$(( $(wc -l < "$DATABIN/dict.$TGT.txt") + 4 ))  # + fairseq's <s> <pad> </s> <unk>

ARCH_SIZES=(
  --encoder-layers 3 --decoder-layers 3
  --encoder-embed-dim 256 --decoder-embed-dim 256
  --encoder-ffn-embed-dim 1024 --decoder-ffn-embed-dim 1024
  --encoder-attention-heads 4 --decoder-attention-heads 4
)
COMMON=(
  "$DATABIN" --source-lang "$SRC" --target-lang "$TGT"
  --user-dir "$REPO/fairseq_mhce"
  "${ARCH_SIZES[@]}"
  --dropout "${DROPOUT:-0.1}" --weight-decay 0.0001
  --optimizer adam --adam-betas '(0.9, 0.98)' --clip-norm 0.0
  --lr "${LR:-1e-3}" --lr-scheduler inverse_sqrt --warmup-updates "${WARMUP:-1000}" --warmup-init-lr 1e-07
  --max-tokens "${MAX_TOKENS:-4096}" --seed "${SEED:-1}"
  --save-dir "$SAVEDIR" --no-epoch-checkpoints
  --log-format simple --log-interval 50 --num-workers 1
  --skip-invalid-size-inputs-valid-test
  --required-batch-size-multiple 1  # the default 8 drops a last batch of any other size (valid too)
)
case "$METHOD" in
  softmax)
    M=(--arch transformer_iwslt_de_en --criterion label_smoothed_cross_entropy --label-smoothing 0.1) ;;
  adaptive)
    CUT=${ADAPTIVE_CUTOFF:-$(( V / 4 )),$(( 3 * V / 4 ))}
    # adaptive_loss refuses --ddp-backend pytorch_ddp (the default); on one process there is no DDP
    M=(--arch transformer_iwslt_de_en --criterion adaptive_loss --adaptive-softmax-cutoff "$CUT"
       --ddp-backend legacy_ddp) ;;
  mhp|mhe|mhs)
    M=(--arch transformer_iwslt_de_en_mhce --mhce-method "$METHOD" --mhce-heads "${MHCE_HEADS:-2}"
       --criterion mhce_label_smoothed_cross_entropy --label-smoothing 0.1) ;;
  *)
    echo "train.sh: METHOD must be softmax, adaptive, mhp, mhe or mhs (got '$METHOD')" >&2; exit 2 ;;
esac

# before anything is written into SAVEDIR (train.log)
savedir_guard train.sh "$SAVEDIR" "$DATABIN" "$V" -- "${COMMON[@]}" "${M[@]}" "$@"
mkdir -p "$SAVEDIR"
# MHP / MHE: the model builds its own PPMI code table from the training
# targets when training starts (--mhce-code-order auto, cached in SAVEDIR);
# CODES=identity asks for the frequency order instead
if [[ $METHOD == mhp || $METHOD == mhe ]] && [[ ${CODES:-ppmi} == identity ]]; then
  M+=(--mhce-code-order identity)
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
echo "train.sh: $METHOD on $DATABIN ($SRC->$TGT, target V=$V) -> $SAVEDIR" >&2
CMD=("$BIN/fairseq-train" "${COMMON[@]}" "${M[@]}" "$@")
printf '%s\n# fairseq-train: %s\n' "$START_LINE" "$(printf '%q ' "${CMD[@]}")" >> "$SAVEDIR/train.log"
set -x
"${CMD[@]}" 2>&1 | tee -a "$SAVEDIR/train.log"
