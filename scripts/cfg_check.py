"""CFG on the embedded model: share of class-conditional samples that the shipped classifier labels correctly.

Compares DDIM with consistent x0 clipping (eps re-derived from the clipped x0, as ADM's DDIM does; pagkit's
sampler) against diffusers' DDIMScheduler default (clipped x0 mixed with the unclipped eps), and DDPM, over a
range of CFG scales. Image i has class i % 10 and the generator of (seed, i).

    .venv/bin/python scripts/cfg_check.py --n 200 --json docs/cfg_check.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from pagkit.data import to_uint8
from pagkit.guidance import CFG, GuidedDenoiser
from pagkit.models import load_classifier, load_denoiser
from pagkit.models.unet import NULL_CLASS
from pagkit.sampling import image_generators, make_scheduler, sample


class MixedClippingDDIM:
    """diffusers' DDIMScheduler as its own pipelines call it: ``step`` without ``use_clipped_model_output``."""

    def __init__(self, scheduler: Any) -> None:
        self._scheduler = scheduler

    def __getattr__(self, name: str) -> Any:
        return getattr(self._scheduler, name)

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor) -> Any:
        return self._scheduler.step(model_output, timestep, sample)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="images per setting (class i %% 10)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cfg-scales", default="1,1.5,2,3")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="write the table here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    unet, config = load_denoiser()
    classifier = load_classifier()
    scales = [float(w) for w in args.cfg_scales.split(",")]
    samplers = {
        "ddim (consistent clipping: pagkit)": lambda: make_scheduler("ddim", config.scheduler_config()),
        "ddim (diffusers default step)": lambda: MixedClippingDDIM(make_scheduler("ddim", config.scheduler_config())),
        "ddpm": lambda: make_scheduler("ddpm", config.scheduler_config()),
    }
    table: dict[str, dict[str, float]] = {}
    print(f"label accuracy, {args.n} images per cell, {args.steps} steps, bf16 autocast")
    print(f"{'sampler':38s}" + "".join(f"  w={w:<5g}" for w in scales))
    for name, make in samplers.items():
        row = {}
        for w in scales:
            correct = 0
            for start in range(0, args.n, args.batch_size):
                b = min(args.batch_size, args.n - start)
                y = torch.arange(start, start + b) % 10
                terms = [CFG(w)] if w != 1.0 else []
                null = {"class_labels": torch.full_like(y, NULL_CLASS)}
                denoise = GuidedDenoiser(unet, {"class_labels": y}, null, terms, autocast=torch.bfloat16)
                shape = (b, 1, config.sample_size, config.sample_size)
                x = sample(denoise, shape, make(), args.steps, image_generators(args.seed, start, b), progress=False)
                images = torch.as_tensor(to_uint8(x), dtype=torch.float32).unsqueeze(1) / 127.5 - 1.0
                with torch.no_grad():
                    correct += int((classifier(images).argmax(1) == y).sum())
            row[f"{w:g}"] = correct / args.n
        table[name] = row
        print(f"{name:38s}" + "".join(f"  {row[f'{w:g}']:<7.3f}" for w in scales), flush=True)
    if args.json:
        result = {
            "command": "python scripts/cfg_check.py "
            + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("json", "threads")),
            "label_accuracy": table,
        }
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
