#!/usr/bin/env bash
# One-shot check of fairseq's precisions and data-parallel training with every
# method, for a machine with one CUDA GPU (issue 30; the CPU suite covers what
# a CPU can: tests/test_distributed.py).
#
#   scripts/benchmarks/gpu_precision_check.sh                   # one GPU, a few minutes
#   DEVICE=cpu UPDATES=20 METHODS=mhs scripts/benchmarks/gpu_precision_check.sh   # smoke run of the plumbing on a CPU
#
# Data: a generated copy task (target = source; 60 word types, 6000 training
# lines of 3-10 words), preprocessed into $WORK/bin.  Model: transformer_mhce,
# 2+2 layers, d 64 (the suite's tiny model), adam lr 3e-3, 60 warm-up updates,
# $UPDATES updates (300), dropout 0, seed 1.  Methods ($METHODS): mhe (tied
# per-token, the automatic PPMI code table), mhp (tied, a 16-token shortlist),
# mhs (half the head-1 groups sampled per update).  Runs per method ($CONFIGS):
#
#   fp32   one process, float32
#   fp16   --fp16 (FP16Optimizer, dynamic loss scaling)
#   bf16   --bf16 as fairseq-hydra-train's common.bf16=true runs it: fairseq
#          0.12's fairseq-train makes --bf16 imply --tpu (torch_xla), so the
#          runs go through precision_check.py, which undoes only that
#   amp    --amp (torch.cuda.amp autocast: the heads' autocast paths)
#   uf2    float32, one process, --update-freq 2
#   ddp2   float32, two ranks on the one GPU (gloo -- NCCL refuses two ranks on
#          one device --, each --device-id 0, --ddp-backend $DDP_BACKEND):
#          the same two batches per update as uf2, so the table gives the
#          largest per-update loss difference to uf2 (GPU kernels are not
#          bit-reproducible: expect ~1e-3, not 0)
#
# Every run is decoded with fairseq-generate --beam 5 on the test split (fp16
# runs with --fp16; the others in float32: fairseq-generate has no bf16) and
# scored.  The table ($WORK/report.md, also printed): exit status, updates,
# first / last logged training loss, whether every logged loss is finite,
# valid loss, BLEU, words per second (methods run in parallel on the one GPU
# when PARALLEL=1, the default on a GPU: speeds are then not comparable).
#
# Environment: PYTHON (.venv/bin/python), WORK (work/gpu_precision; emptied
# first), UPDATES (300), METHODS ("mhe mhp mhs"), CONFIGS ("fp32 fp16 bf16
# amp uf2 ddp2"; on a CPU "fp32 bf16 uf2 ddp2": fairseq's --fp16 dies there at
# the first loss-scale overflow, on a torch.tensor(0.0).cuda() in its trainer,
# and --amp is CUDA autocast), DDP_BACKEND (pytorch_ddp), DEVICE (cuda | cpu),
# PARALLEL.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
BIN=$(dirname "$PY")
WORK=${WORK:-$REPO/work/gpu_precision}
UPDATES=${UPDATES:-300}
METHODS=${METHODS:-"mhe mhp mhs"}
DDP_BACKEND=${DDP_BACKEND:-pytorch_ddp}
DEVICE=${DEVICE:-cuda}
TOOL="$REPO/scripts/benchmarks/precision_check.py"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [ "$DEVICE" = cuda ]; then
    "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: run with DEVICE=cpu for a smoke run")'
    PARALLEL=${PARALLEL:-1}
    CONFIGS=${CONFIGS:-"fp32 fp16 bf16 amp uf2 ddp2"}
    DEV_FLAGS=()
    FP16_FLAGS=(--fp16)
else
    PARALLEL=${PARALLEL:-0}
    # no fp16: fairseq's trainer handles the first loss-scale overflow with torch.tensor(0.0).cuda(); amp is float32 here
    CONFIGS=${CONFIGS:-"fp32 bf16 uf2 ddp2"}
    DEV_FLAGS=(--cpu)
    FP16_FLAGS=(--fp16 --fp16-no-flatten-grads)  # fairseq's flat fp32 copy asks for a CUDA device
fi

rm -rf "$WORK"
mkdir -p "$WORK/text" "$WORK/runs"
{ grep -m1 'model name' /proc/cpuinfo || true; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || true; } >"$WORK/machine.txt"
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' >>"$WORK/machine.txt" 2>&1 || true

# the copy task
for split in train:6000:1 valid:200:2 test:200:3; do
    IFS=: read -r name n seed <<<"$split"
    awk -v n="$n" -v seed="$seed" 'BEGIN { srand(seed); for (i = 0; i < n; i++) {
        k = 3 + int(rand() * 8); s = ""; for (j = 0; j < k; j++) s = s (j ? " " : "") "w" int(rand() * 60); print s } }' \
        >"$WORK/text/$name.src"
    cp "$WORK/text/$name.src" "$WORK/text/$name.tgt"
done
"$BIN/fairseq-preprocess" --source-lang src --target-lang tgt --trainpref "$WORK/text/train" \
    --validpref "$WORK/text/valid" --testpref "$WORK/text/test" --destdir "$WORK/bin" --workers 4 \
    >"$WORK/preprocess.log" 2>&1

method_flags() {
    case "$1" in
        mhe) echo "--mhce-method mhe --share-decoder-input-output-embed" ;;
        mhp) echo "--mhce-method mhp --share-decoder-input-output-embed --mhce-shortlist 16" ;;
        mhs) echo "--mhce-method mhs --mhce-sample-groups 0.5" ;;
        *) echo "unknown method $1" >&2; return 2 ;;
    esac
}

train_args() {  # METHOD SAVE_DIR
    # shellcheck disable=SC2046
    echo "$WORK/bin" --user-dir "$REPO/fairseq_mhce" --arch transformer_mhce $(method_flags "$1") \
        --encoder-layers 2 --decoder-layers 2 --encoder-embed-dim 64 --decoder-embed-dim 64 \
        --encoder-ffn-embed-dim 128 --decoder-ffn-embed-dim 128 \
        --encoder-attention-heads 4 --decoder-attention-heads 4 \
        --criterion mhce_label_smoothed_cross_entropy --label-smoothing 0.1 \
        --optimizer adam --lr 3e-3 --lr-scheduler inverse_sqrt --warmup-updates 60 \
        --max-tokens 2000 --required-batch-size-multiple 1 --dropout 0.0 --seed 1 \
        --max-update "$UPDATES" --no-progress-bar --log-format json --log-interval 10 \
        --num-workers 0 --no-epoch-checkpoints --save-dir "$2" "${DEV_FLAGS[@]}"
}

one_run() {  # METHOD CONFIG
    local m=$1 c=$2 d="$WORK/runs/$1-$2" rc=0 gen_flags=()
    mkdir -p "$d"
    # shellcheck disable=SC2207
    local args=($(train_args "$m" "$d"))
    case "$c" in
        fp32) "$PY" "$TOOL" train "${args[@]}" >"$d/train.log" 2>&1 || rc=$? ;;
        fp16) "$PY" "$TOOL" train "${args[@]}" "${FP16_FLAGS[@]}" >"$d/train.log" 2>&1 || rc=$?
              gen_flags=(--fp16) ;;
        bf16) "$PY" "$TOOL" train "${args[@]}" --bf16 >"$d/train.log" 2>&1 || rc=$? ;;
        amp) "$PY" "$TOOL" train "${args[@]}" --amp >"$d/train.log" 2>&1 || rc=$? ;;
        uf2) "$PY" "$TOOL" train "${args[@]}" --update-freq 2 >"$d/train.log" 2>&1 || rc=$? ;;
        ddp2)
            local port=$((20000 + RANDOM % 20000)) pids=() r
            for r in 0 1; do
                "$PY" "$TOOL" train "${args[@]}" --ddp-backend "$DDP_BACKEND" --distributed-world-size 2 \
                    --distributed-backend gloo --distributed-init-method "tcp://localhost:$port" \
                    --distributed-no-spawn --distributed-rank "$r" --device-id 0 \
                    >"$d/rank$r.log" 2>&1 &
                pids+=($!)
            done
            for r in 0 1; do wait "${pids[$r]}" || rc=$?; done
            cp "$d/rank0.log" "$d/train.log" ;;
        *) echo "unknown config $c" >&2; rc=2 ;;
    esac
    echo "$rc" >"$d/status"
    if [ "$rc" = 0 ]; then
        "$BIN/fairseq-generate" "$WORK/bin" --user-dir "$REPO/fairseq_mhce" --path "$d/checkpoint_last.pt" \
            --gen-subset test --beam 5 --batch-size 200 "${DEV_FLAGS[@]}" "${gen_flags[@]}" \
            >"$d/generate.log" 2>&1 || echo "generate failed: $d/generate.log" >&2
    else
        echo "$m $c: exit $rc, see $d/train.log" >&2
    fi
}

method_runs() {
    local c
    for c in $CONFIGS; do one_run "$1" "$c"; done
}

start=$(date +%s)
if [ "$PARALLEL" = 1 ]; then
    pids=()
    for m in $METHODS; do method_runs "$m" & pids+=($!); done
    for p in "${pids[@]}"; do wait "$p"; done
else
    for m in $METHODS; do method_runs "$m"; done
fi
{
    echo "# gpu_precision_check.sh: DEVICE=$DEVICE UPDATES=$UPDATES DDP_BACKEND=$DDP_BACKEND PARALLEL=$PARALLEL, $(( $(date +%s) - start )) s"
    echo
    sed 's/^/    /' "$WORK/machine.txt"
    echo
    "$PY" "$TOOL" report "$WORK"
} | tee "$WORK/report.md"
