"""Time per denoising step of every guidance option on the embedded model, paired in one run (issue 13's cost).

Options: unguided (the teacher, one call), the distilled student (one call; at s = 2, and at CFG 1.25 + PAG 1),
PAG (s = 2 on mid: the conditional rows plus the perturbed rows after the shared prefix), PAG with the cached
delta (%2), CFG (w = 1.5) and CFG+PAG (w = 1.25, s = 1). Each repetition times every option once, in a rotating
order, on the same batch and seeds; the report gives the median seconds per step and the ratio to unguided.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/distill_cost.py --threads 1 --batch 32 --steps 10 --reps 5 \
        --json docs/distill/cost.json --md docs/distill/cost.md

The student's weights do not change its cost: without --student a fresh student (the teacher + a zero scale
embedding) is timed, so the numbers need no finished distillation.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from pagkit.distill.student import build_student, load_student
from pagkit.generate import generate
from pagkit.models.unet import load_denoiser

OPTIONS: list[tuple[str, str, dict[str, object]]] = [
    # name, model, generate() arguments
    ("unguided", "teacher", {"pag_scale": 0.0}),
    ("distilled pag:2", "student", {"pag_scale": 2.0}),
    ("distilled cfg:1.25+pag:1", "student", {"pag_scale": 1.0, "cfg_scale": 1.25, "label": 3}),
    ("pag:2 (full)", "teacher", {"pag_scale": 2.0}),
    ("pag:2%2 (cached delta)", "teacher", {"pag_scale": 2.0, "reuse_delta": 2}),
    ("pag:2~interval:0:0.5", "teacher", {"pag_scale": 2.0, "pag_schedule": "interval:0:0.5"}),
    ("cfg:1.5", "teacher", {"pag_scale": 0.0, "cfg_scale": 1.5, "label": 3}),
    ("cfg:1.25+pag:1", "teacher", {"pag_scale": 1.0, "cfg_scale": 1.25, "label": 3}),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", default=None, help="A student .safetensors (default: a fresh student).")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    ap.add_argument("--options", default=None, help="Comma-separated option names to time (default: all).")
    args = ap.parse_args()
    options = OPTIONS if not args.options else [o for o in OPTIONS if o[0] in args.options.split(",")]
    if not any(o[0] == "unguided" for o in options):
        raise SystemExit("--options must include unguided (the reference)")
    torch.set_num_threads(args.threads)
    teacher, config = load_denoiser()
    student = load_student(args.student)[0] if args.student else build_student(teacher).eval().requires_grad_(False)
    models = {"teacher": (teacher, config), "student": (student, config)}
    times: dict[str, list[float]] = {name: [] for name, _, _ in options}
    for _name, kind, kw in options:  # warm-up
        generate(args.batch, steps=2, model=models[kind], batch_size=args.batch, progress=False, **kw)  # type: ignore[arg-type]
    for rep in range(args.reps):
        order = options[rep % len(options) :] + options[: rep % len(options)]
        for name, kind, kw in order:
            t0 = time.perf_counter()
            generate(args.batch, steps=args.steps, model=models[kind], batch_size=args.batch, progress=False, **kw)  # type: ignore[arg-type]
            times[name].append((time.perf_counter() - t0) / args.steps)
    base = statistics.median(times["unguided"])
    rows = [
        {"option": name, "s_per_step": statistics.median(times[name]), "ratio": statistics.median(times[name]) / base,
         "times": times[name]}
        for name, _, _ in options
    ]  # fmt: skip
    head = (
        f"batch {args.batch}, {args.steps} DDIM steps per timing, median of {args.reps} paired repetitions, "
        f"{args.threads} thread(s), torch {torch.__version__}, {platform.processor() or platform.machine()}"
    )
    lines = [head, "", "| option | s/step | vs unguided |", "|---|---:|---:|"]
    lines += [f"| {r['option']} | {r['s_per_step']:.4f} | {r['ratio']:.3f}x |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"settings": vars(args), "header": head, "rows": rows}, indent=2) + "\n")
    if args.md:
        Path(args.md).write_text(text)


if __name__ == "__main__":
    main()
