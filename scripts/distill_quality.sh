#!/usr/bin/env bash
# Issue 13's quality targets for the distilled student, by `pagkit eval` (same seeds for every config):
#   uncond-ddim20: the student at the teacher's best 20-step scale (s = 3) and at s = 0, against the teacher
#   uncond-ddim50: the same at 50 steps (s = 2, the shipped default)
#   cond-ddim20 / cond-ddim50: cfg:1.25+pag:1 (the best conditional setting of docs/results.md) and the student's
# Targets: FID(distilled:pag:S) <= 1.05 x FID(pag:S); FID(distilled:none) within 5% of FID(none);
#          FID(distilled:cfg:W+pag:S) <= 1.05 x FID(cfg:W+pag:S).
#
#   N=2000 STUDENT=src/pagkit/distill/weights/student.safetensors scripts/distill_quality.sh [sections...]
#   N=200 STUDENT=runs/distill-student/student.safetensors scripts/distill_quality.sh uncond-ddim20   # a smoke run
#
# FULL=1 adds the other options of the quality-against-cost plot (cached-delta PAG, unguided and CFG alone in the
# conditional sections). Resumable (rerun the same command); CPU, one process with THREADS threads unless NPROC > 1 (torchrun).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-2000}
THREADS=${THREADS:-1}
NPROC=${NPROC:-1}
OUT_ROOT=${OUT_ROOT:-runs/distill-eval}
DEVICE=${DEVICE:-cpu}
export PAGKIT_STUDENT=${STUDENT:-src/pagkit/distill/weights/student.safetensors}
[ -f "$PAGKIT_STUDENT" ] || { echo "no student at $PAGKIT_STUDENT (set STUDENT=...)" >&2; exit 2; }
SECTIONS=("$@")
[ ${#SECTIONS[@]} -gt 0 ] || SECTIONS=(uncond-ddim20 uncond-ddim50 cond-ddim20 cond-ddim50)
tag=$(sha256sum "$PAGKIT_STUDENT" | cut -c1-12)

evaluate() {  # section eval-arguments...
  local section=$1; shift
  local out="$OUT_ROOT/$section-n$N"
  echo "== $section (student $PAGKIT_STUDENT, sha $tag): pagkit eval $* --num-images $N --out $out"
  if [ "$NPROC" -gt 1 ]; then
    .venv/bin/python -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m pagkit eval "$@" \
      --num-images "$N" --out "$out" --threads "$THREADS" --device "$DEVICE" --no-progress
  else
    .venv/bin/pagkit eval "$@" --num-images "$N" --out "$out" --threads "$THREADS" --device "$DEVICE" --no-progress
  fi
}

for s in "${SECTIONS[@]}"; do
  case $s in
    uncond-ddim20) evaluate "$s" --steps 20 --configs none,pag:3,distilled:none,distilled:pag:3${FULL:+,pag:3%2} ;;
    uncond-ddim50) evaluate "$s" --steps 50 --configs none,pag:2,distilled:none,distilled:pag:2${FULL:+,pag:2%2} ;;
    cond-ddim20) evaluate "$s" --steps 20 --label-mode uniform --configs cfg:1.25+pag:1,distilled:cfg:1.25+pag:1${FULL:+,none,cfg:1.5} ;;
    cond-ddim50) evaluate "$s" --steps 50 --label-mode uniform --configs cfg:1.25+pag:1,distilled:cfg:1.25+pag:1${FULL:+,none,cfg:1.5} ;;
    *) echo "unknown section $s" >&2; exit 2 ;;
  esac
done
