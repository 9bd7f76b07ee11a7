"""Measure the embedded denoiser's quality gate: class-conditional samples classified as their label.

Unguided 50-step DDIM, ``--per-class`` samples of each of the 10 classes (no CFG, no PAG); the embedded
classifier labels them; prints and writes the per-class and overall accuracy (JSON) and a per-class PNG grid.

    .venv/bin/python scripts/embedded_quality.py --per-class 100 --json docs/embedded_quality.json \
        --grid docs/samples_per_class.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from pagkit.data import CLASS_NAMES
from pagkit.generate import generate
from pagkit.models import load_classifier, load_denoiser
from pagkit.viz import grid, save_png, titled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", default=None)
    parser.add_argument("--json", default="docs/embedded_quality.json")
    parser.add_argument("--grid", default="docs/samples_per_class.png")
    args = parser.parse_args()

    model = load_denoiser(args.weights)
    classifier = load_classifier()
    per_class, rows = {}, []
    for label in range(10):
        images, _ = generate(
            args.per_class,
            steps=args.steps,
            seed=args.seed + label,
            label=label,
            pag_scale=0.0,
            model=model,
            progress=False,
        )
        with torch.no_grad():
            x = torch.as_tensor(images, dtype=torch.float32).unsqueeze(1) / 127.5 - 1.0
            pred = classifier(x).argmax(1).numpy()
        per_class[CLASS_NAMES[label]] = float(np.mean(pred == label))
        rows.append(images[:10])
        print(f"{label} {CLASS_NAMES[label]:12s} {per_class[CLASS_NAMES[label]]:.3f}", flush=True)
    overall = float(np.mean(list(per_class.values())))
    print(f"overall {overall:.4f}")
    meta = model[1].to_dict()
    result = {
        "command": f"python scripts/embedded_quality.py --per-class {args.per_class} --steps {args.steps} "
        f"--seed {args.seed}",
        "per_class": per_class,
        "overall": overall,
        "samples": 10 * args.per_class,
        "sampler": f"ddim {args.steps} steps, unguided, class-conditional",
        "denoiser": meta,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    save_png(
        titled([grid(np.concatenate(rows), ncols=10, scale=2)], ["one row per class 0..9 (unguided DDIM)"]), args.grid
    )


if __name__ == "__main__":
    main()
