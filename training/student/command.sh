#!/usr/bin/env bash
# The shipped student's distillation run (pagkit distill), on this project's 2-core CPU with one thread, in the
# background. The same command resumes it: every 50 steps (about 3 minutes) it writes
# runs/distill-student/checkpoint.safetensors + checkpoint-optimizer.safetensors (git-ignored, never committed),
# the EMA student runs/distill-student/student.safetensors and a line of runs/distill-student/train_log.jsonl;
# SIGTERM (kill PID) writes a checkpoint of the current step first. Steps are drawn from (seed, step) only, so a
# resumed run makes exactly the updates of an uninterrupted one.
#
#   bash training/student/command.sh          # start, or resume when the checkpoint exists
# At the end of a session the latest checkpoint pair is copied to training/student/resume/ and committed (only the
# latest: the previous one is replaced), so a new machine resumes where the last session stopped.
#   tail -f runs/distill-student/stdout.log
#
# Learning rates: steps 0-712 ran at --lr 1e-4 --guidance-lr 1e-3 (those log lines predate the lr field); the
# online loss ratio to the unguided baseline fell to 0.66 by step 450, then rose for 250 steps, so from step 712
# on: --lr 5e-5 --guidance-lr 3e-4 (a step decay; learning rates may change on resume, the log records them).
#
# --precision fp32: this CPU has no AVX512-BF16, and bf16 autocast ran the student's forward+backward 2x slower
# than fp32 (6.2 s against 3.2 s for 64 images, one thread); the teacher's targets are fp32 either way.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=runs/distill-student
# a fresh checkout has no runs/: continue from the checkpoint committed at the end of the last session
if [ ! -f "$OUT/checkpoint.safetensors" ] && [ -f training/student/resume/checkpoint.safetensors ]; then
    mkdir -p "$OUT"
    cp training/student/resume/checkpoint.safetensors training/student/resume/checkpoint-optimizer.safetensors \
        training/student/resume/train_log.jsonl "$OUT/"
fi
RESUME=()
[ -f "$OUT/checkpoint.safetensors" ] && RESUME=(--resume)
mkdir -p "$OUT"
OMP_NUM_THREADS=1 nohup nice -n 10 .venv/bin/pagkit distill --out "$OUT" --steps 4000 --batch-size 32 \
    --lr 5e-5 --guidance-lr 3e-4 --pag-max 5 --cfg-max 3 --pag-layers mid --precision fp32 \
    --checkpoint-every 50 --seed 0 --threads 1 --no-progress "${RESUME[@]}" >>"$OUT/stdout.log" 2>&1 &
echo "started PID $! (log: $OUT/stdout.log, $OUT/train_log.jsonl)"
