#!/usr/bin/env bash
# The evaluations behind docs/results.md, on the shipped denoiser and classifier.
#
#   scripts/paper_results.sh                 # every section, in order
#   scripts/paper_results.sh sweep cond      # some sections
#   DEVICE=cuda NPROC=1 BATCH=1000 THREADS=8 scripts/paper_results.sh all   # one GPU (how docs/results was made)
#   EXTRA="--num-images 128 --steps 2" OUT_ROOT=runs/smoke DOCS=runs/smoke-docs scripts/paper_results.sh all
#
# Each section runs one `pagkit eval` command per table (NPROC processes under torchrun, bf16 autocast); its
# report (results.md, results.json, plots, sample grids) is copied to $DOCS/<section>/ (default docs/results).
# Resumable: rerun after an interruption. Sections with the same sampling settings share an output folder, so a
# config measured by one section (same guidance, steps, sampler, seed, labels, weights, device) is sampled only
# once, and a larger --num-images reuses the shards of a smaller one. $EXTRA is appended to every eval command
# (the later value of an option wins).
{ # the whole script is read before it runs, so editing it while it runs is safe
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
NPROC=${NPROC:-2}
DEVICE=${DEVICE:-cpu}
BATCH=${BATCH:-64}
THREADS=${THREADS:-1}
OUT_ROOT=${OUT_ROOT:-runs/eval}
DOCS=${DOCS:-docs/results}
EXTRA=${EXTRA:-}

evaluate() {  # section out-folder eval-arguments...
  local section=$1 out=$OUT_ROOT/$2
  shift 2
  # shellcheck disable=SC2086  # EXTRA is a list of arguments
  set -- "$@" $EXTRA
  echo "== $section: pagkit eval $* --out $out"
  OMP_WAIT_POLICY=PASSIVE "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m pagkit eval \
    --precision bf16 --threads "$THREADS" --device "$DEVICE" --batch-size "$BATCH" --no-progress --out "$out" "$@"
  mkdir -p "$DOCS/$section"
  cp "$out/results.md" "$out/results.json" "$out"/plots/*.png "$DOCS/$section/"
  mkdir -p "$DOCS/$section/grids"
  "$PY" - "$out" "$DOCS/$section/grids" <<'EOF'
import json, shutil, sys
from pathlib import Path
from pagkit.eval.configs import parse_configs
out, dest = Path(sys.argv[1]), Path(sys.argv[2])
for row in json.loads((out / "results.json").read_text())["configs"]:
    slug = parse_configs(row["name"])[0].slug()
    shutil.copy(out / "grids" / f"{slug}.png", dest / f"{slug}.png")
EOF
}

section() {
  case $1 in
    # 1. + 6. unconditional, 50-step DDIM: none vs SAG vs PAG at their best sweep scales, and the cached delta
    uncond)
      evaluate uncond-ddim50 uncond-ddim50 --num-images 2000 --configs none,sag:0.5,pag:1,pag:1%2,pag:2,pag:2%2
      ;;
    # 1b. the same with the ancestral DDPM sampler, 50 steps
    ddpm)
      evaluate uncond-ddpm50 uncond-ddpm50 --sampler ddpm --steps 50 --num-images 2000 \
        --configs none,sag:0.5,pag:1,pag:2,pag:3
      ;;
    # 2. conditional (class i % 10), 50-step DDIM: none vs CFG vs PAG vs CFG+PAG, with a CFG scale sweep
    cond)
      evaluate cond-ddim50 cond-ddim50 --label-mode uniform --num-images 2000 \
        --configs none,pag:1,pag:2,cfg:1.5,cfg:2,cfg:3,cfg:1.5+pag:1,cfg:2+pag:1,cfg:3+pag:1,cfg:2+pag:2
      ;;
    # 2b. CFG+PAG against CFG near CFG's best FID (w = 1.5): lower CFG scales with PAG added
    frontier)
      evaluate cond-frontier cond-ddim50 --label-mode uniform --num-images 2000 \
        --configs cfg:1.25,cfg:1.5,cfg:1.25+pag:0.5,cfg:1.25+pag:1,cfg:1.5+pag:0.5
      ;;
    # 2c. the conditional comparison where unguided sampling leaves more to fix: 10 DDIM steps
    cond10)
      evaluate cond-ddim10 cond-ddim10 --label-mode uniform --steps 10 --num-images 2000 \
        --configs none,pag:3,cfg:1.5,cfg:2,cfg:3,cfg:1.5+pag:1,cfg:1.5+pag:3,cfg:2+pag:1,cfg:2+pag:3
      ;;
    # 3. scale sweeps, unconditional, 50-step DDIM, and PAG on part of the run (schedules)
    sweep)
      evaluate sweep-uncond uncond-ddim50 --num-images 2000 \
        --configs none,pag:0.5,pag:1,pag:1.5,pag:2,pag:3,pag:5,sag:0.25,sag:0.5,sag:1
      evaluate schedules-uncond uncond-ddim50 --num-images 2000 \
        --configs none,pag:2~interval:0:0.5,pag:3~interval:0:0.5,pag:5~interval:0:0.3,pag:3~linear,pag:2~interval:0.5:1
      ;;
    # the headline search: PAG against unguided sampling at equal (few) DDIM steps
    fewstep)
      evaluate fewstep-ddim5 uncond-ddim5 --steps 5 --num-images 2000 --configs none,pag:1,pag:3,pag:5
      evaluate fewstep-ddim10 uncond-ddim10 --steps 10 --num-images 2000 --configs none,pag:1,pag:3,pag:5
      evaluate fewstep-ddim20 uncond-ddim20 --steps 20 --num-images 2000 --configs none,pag:1,pag:2,pag:3
      ;;
    # the headline search, further: ancestral sampling with few steps, PAG on part of a 10-step run, SoftPAG
    search)
      evaluate search-ddpm10 uncond-ddpm10 --sampler ddpm --steps 10 --num-images 2000 \
        --configs none,pag:1,pag:3,pag:5,pag:8
      evaluate search-ddpm20 uncond-ddpm20 --sampler ddpm --steps 20 --num-images 2000 \
        --configs none,pag:1,pag:3,pag:5
      evaluate search-ddim10 uncond-ddim10 --steps 10 --num-images 2000 \
        --configs none,pag:3,pag:5~interval:0:0.5,pag:8~interval:0:0.3,pag:3~linear,pag:5~linear,pag:5/soft:0.75
      ;;
    # 4. layer ablation and 5. perturbation ablation, in the regime where PAG moves FID (10-step DDIM)
    layers)
      evaluate layers-ddim10 uncond-ddim10 --steps 10 --num-images 2000 \
        --configs none,pag:3@down.1,pag:3@down.2,pag:3@mid,pag:3@up.0,pag:3@up.1,pag:3@[down.2,mid],pag:3@[mid,up.0]
      ;;
    perturbations)
      evaluate perturbations-ddim10 uncond-ddim10 --steps 10 --num-images 2000 \
        --configs none,pag:3,pag:3/mask,pag:3/dropout,pag:3/blur,pag:3/pool,pag:3/noise,pag:3/soft:0.5
      ;;
    # the headline search, training length: earlier shipped weights (from git history), 10-step DDIM
    training)
      mkdir -p runs
      [ -f runs/denoiser-2.67ep.safetensors ] ||
        git show 7edbd27:src/pagkit/models/weights/denoiser.safetensors > runs/denoiser-2.67ep.safetensors
      [ -f runs/denoiser-5.88ep.safetensors ] ||
        git show b0bf848:src/pagkit/models/weights/denoiser.safetensors > runs/denoiser-5.88ep.safetensors
      for ep in 2.67 5.88; do
        evaluate "training-${ep}ep-ddim10" "uncond-ddim10-${ep}ep" --steps 10 --num-images 2000 \
          --weights "runs/denoiser-${ep}ep.safetensors" --configs none,pag:1,pag:3,pag:5
      done
      ;;
    # the 10-step headline rerun on the device at hand (docs/results.md: on the 2-core CPU, against the GPU run)
    repro)
      evaluate repro-ddim10 uncond-ddim10 --steps 10 --num-images 2000 --configs none,pag:3,pag:5
      ;;
    # does bf16 autocast change the comparison? the same configs in fp32 (the later --precision wins)
    precision)
      evaluate precision-check-fp32 uncond-ddim10 --steps 10 --num-images 2000 --configs none,pag:3 --precision fp32
      ;;
    all)
      for s in sweep uncond cond frontier cond10 ddpm fewstep search layers perturbations training precision; do section "$s"; done
      ;;
    *) echo "unknown section $1" >&2; exit 2 ;;
  esac
}

if [ $# -eq 0 ]; then set -- all; fi
for s in "$@"; do section "$s"; done
exit
}
