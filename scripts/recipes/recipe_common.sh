# Sourced by scripts/recipes/train.sh and scripts/recipes/translate.sh (not run by itself).
#
#   recipe_setup SCRIPT_NAME TOOL "$@"    (then: shift 3)
#
# With fewer than three arguments prints the calling script's header comment
# (its usage) and exits 2.  Otherwise sets METHOD DATABIN SAVEDIR (the first
# three arguments), REPO (this checkout), BIN (the directory holding the fairseq console
# script TOOL: $FAIRSEQ_BIN, else $VENV/bin with VENV defaulting to
# REPO/.venv, else the one on PATH) and SRC / TGT (the language pair of the
# data-bin's train.SRC-TGT.*.idx).  Stops with exit status 2 and a message
# saying what to do when the tool or the data-bin is missing.
recipe_setup() {
  local me=$1 tool=$2 found pair
  shift 2
  if [ $# -lt 3 ]; then
    sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"  # the header comment, up to the first code line
    exit 2
  fi
  METHOD=$1 DATABIN=$2 SAVEDIR=$3
  REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
  VENV=${VENV:-$REPO/.venv}
  BIN=${FAIRSEQ_BIN:-$VENV/bin}
  if [ ! -x "$BIN/$tool" ]; then
    found=$(command -v "$tool" || true)
    if [ -z "$found" ]; then
      echo "$me: $tool is neither in $BIN nor on PATH; run 'make install' (creates $REPO/.venv)" \
           "or point VENV / FAIRSEQ_BIN at an environment with fairseq" >&2
      exit 2
    fi
    BIN=$(dirname "$found")
  fi
  [ -d "$DATABIN" ] || { echo "$me: no data-bin at $DATABIN" >&2; exit 2; }
  pair=$(ls "$DATABIN" | sed -n 's/^train\.\([^.]*\)-\([^.]*\)\..*\.idx$/\1-\2/p' | head -1)
  if [ -z "$pair" ]; then
    echo "$me: $DATABIN has no train.SRC-TGT.*.idx; is it a fairseq-preprocess data-bin" \
         "(e.g. from mhce-prepare-data)?" >&2
    exit 2
  fi
  SRC=${pair%-*} TGT=${pair#*-}
}

# savedir_guard SCRIPT_NAME SAVEDIR DATABIN V -- FAIRSEQ_TRAIN_ARGS...
#
# Stops with exit status 2 (and changes nothing) when SAVEDIR holds
# checkpoints (checkpoint*.pt) that are not this run's: another method
# (softmax / adaptive / mhp / mhe / mhs), other head sizes (or adaptive
# cutoffs), another architecture or another data-bin than the fairseq-train
# arguments given (read last-wins, as argparse does).  Each checkpoint's saved
# config is read (mmap) with the plugin's safe loader, fairseq_mhce/safe_load.py
# (it runs no code a checkpoint carries; FAIRSEQ_MHCE_TRUST_CHECKPOINTS=1 is the
# opt-in for a trusted one it refuses), so even large ones take a moment.
# REUSE_SAVEDIR=1 skips the check.  A save directory without checkpoints costs
# nothing (no Python is started).  The check is `python -m
# fairseq_mhce.recipes.recipe_checks savedir-guard` (the plugin of this checkout:
# PYTHONPATH).
savedir_guard() {
  local me=$1 savedir=$2 databin=$3 vocab=$4 py=$BIN/python
  shift 5  # the four above and the '--'
  [ "${REUSE_SAVEDIR:-0}" = 1 ] && return 0
  compgen -G "$savedir/checkpoint*.pt" >/dev/null || return 0
  [ -x "$py" ] || py=$(command -v python3 || echo python)
  PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" \
    "$py" -m fairseq_mhce.recipes.recipe_checks savedir-guard "$me" "$savedir" "$databin" "$vocab" "$@"
}
