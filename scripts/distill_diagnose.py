"""How close a distilled student is to its teacher, per PAG scale and noise level, without sampling (issue 13).

FID needs thousands of samples; this needs one batch. On held-out Fashion-MNIST test images at fixed timesteps,
it compares the student's one-pass prediction at scale s with the teacher's PAG-guided eps at the same s
(unconditional rows, the null class):

- ``gap(s)`` = mean ||student(s) - teacher_pag(s)||^2, and ``gap / ||teacher(0) - teacher_pag(s)||^2``: the share of
  PAG's change the student has *not* learned (1.0: a fresh student; 0: exact). At s = 0 the denominator is 0, so
  the s = 0 row is given against the teacher's own denoising error ||teacher(0) - noise||^2 instead: how far the
  student's unguided prediction has drifted, in units of the error the model makes anyway.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/distill_diagnose.py runs/distill-student/snap*.safetensors \
        --json docs/distill/diagnose.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pagkit.distill.student import load_student
from pagkit.distill.train import teacher_targets
from pagkit.models.unet import NULL_CLASS, load_denoiser

BINS = ((0, 250), (250, 500), (500, 750), (750, 1000))


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("students", nargs="+")
    ap.add_argument("--n", type=int, default=256, help="Test images (each at 4 noise levels).")
    ap.add_argument("--scales", default="0,1,2,3,5")
    ap.add_argument("--layers", default="mid")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from diffusers import DDPMScheduler

    from pagkit.data import load_split, to_model_space

    teacher, config = load_denoiser()
    teacher.eval()
    images = load_split("test").images
    g = torch.Generator().manual_seed(1234)
    x0 = to_model_space(images[torch.randperm(len(images), generator=g)[: args.n].numpy()])
    sched = DDPMScheduler(**config.scheduler_config())
    rows = []  # (x_t, t, noise) at every bin
    for lo, hi in BINS:
        t = torch.randint(lo, hi, (len(x0),), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        rows.append((sched.add_noise(x0, noise, t), t, noise))
    xt = torch.cat([r[0] for r in rows])
    t = torch.cat([r[1] for r in rows])
    noise = torch.cat([r[2] for r in rows])
    y = torch.full((len(xt),), NULL_CLASS, dtype=torch.long)
    one = torch.ones(len(xt))
    scales = [float(s) for s in args.scales.split(",")]
    targets = {s: teacher_targets(teacher, xt, t, y, one * s, one, args.layers)[0] for s in scales}
    plain = targets[0.0] if 0.0 in targets else teacher_targets(teacher, xt, t, y, one * 0, one, args.layers)[0]
    per_image = lambda d: d.pow(2).flatten(1).mean(1)  # noqa: E731
    bins = torch.cat([torch.full((len(x0),), i) for i in range(len(BINS))])
    report: dict[str, object] = {"settings": vars(args), "bins": [f"t in [{lo}, {hi})" for lo, hi in BINS]}
    for path in args.students:
        student, _ = load_student(path)
        student.eval()
        result: dict[str, object] = {}
        for s in scales:
            pred = torch.cat([student(xt[i : i + 256], t[i : i + 256], y[i : i + 256], s, 1.0)
                              for i in range(0, len(xt), 256)])  # fmt: skip
            gap = per_image(pred - targets[s])
            ref = per_image(plain - noise) if s == 0.0 else per_image(plain - targets[s])
            result[f"s={s:g}"] = {
                "relative": float(gap.mean() / ref.mean()),
                "per_bin": [float(gap[bins == i].mean() / ref[bins == i].mean()) for i in range(len(BINS))],
            }
        report[str(path)] = result
        line = "  ".join(f"{k} {v['relative']:.3f}" for k, v in result.items())  # type: ignore[index]
        print(f"{path}: {line}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
