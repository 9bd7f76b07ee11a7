"""Generate Fashion-MNIST images with the embedded denoiser (or a ``pagkit train`` output), guided or not."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from pagkit.data import to_uint8
from pagkit.guidance.guided import GuidedDenoiser
from pagkit.guidance.terms import CFG, PAG
from pagkit.models.unet import NULL_CLASS, DenoiserConfig, load_denoiser
from pagkit.sampling.loops import image_generators, make_scheduler, sample


@dataclass(frozen=True)
class Recommended:
    """pagkit's recommended PAG settings for the embedded model (the paper's s = 3 on the mid block until the
    evaluation sweep tunes them)."""

    pag_scale: float = 3.0
    pag_layers: str = "mid"
    steps: int = 50
    sampler: str = "ddim"


RECOMMENDED = Recommended()


def parse_label(label: str | int | None) -> int | None:
    """``None``/``"none"`` -> unconditional; ``0..9`` -> that class; anything else is an error."""
    if label is None or (isinstance(label, str) and label.lower() == "none"):
        return None
    try:
        value = int(label)
    except (TypeError, ValueError):
        raise ValueError(f"unknown label {label!r}: use none or a class index 0..9") from None
    if not 0 <= value <= 9:
        raise ValueError(f"unknown label {label!r}: use none or a class index 0..9")
    return value


def generate(
    n: int,
    *,
    steps: int = RECOMMENDED.steps,
    sampler: str = RECOMMENDED.sampler,
    seed: int = 0,
    label: int | None = None,
    cfg_scale: float = 1.0,
    pag_scale: float = RECOMMENDED.pag_scale,
    pag_layers: str = RECOMMENDED.pag_layers,
    pag_schedule: str | None = None,
    perturbation: str = "identity",
    batch_size: int = 64,
    weights: str | os.PathLike[str] | None = None,
    model: tuple[torch.nn.Module, DenoiserConfig] | None = None,
    progress: bool = True,
    on_batch: Callable[[int, np.ndarray], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``n`` images; returns ``uint8 [n, 28, 28]`` and labels ``int64 [n]`` (-1: unconditional).

    Image i's noise depends only on ``(seed, i)``, so results do not depend on ``batch_size``.
    ``cfg_scale = 1`` means no CFG and ``pag_scale = 0`` no PAG (diffusers' conventions).
    """
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if steps < 1:
        raise ValueError(f"the number of steps must be >= 1, got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    make_scheduler(sampler, {})  # validate the sampler name before loading anything
    terms: list[CFG | PAG] = []
    if cfg_scale != 1.0:
        if label is None:
            raise ValueError("CFG needs a class label (--label 0..9); use --cfg-scale 1 for unconditional sampling")
        terms.append(CFG(cfg_scale))
    if pag_scale != 0.0:
        terms.append(PAG.make(pag_scale, pag_layers, perturbation, pag_schedule))
    else:
        PAG.make(pag_scale, pag_layers, perturbation, pag_schedule)  # still validate the options
    unet, config = model if model is not None else load_denoiser(weights)
    scheduler = make_scheduler(sampler, config.scheduler_config())
    size = config.sample_size
    images = np.empty((n, 28, 28), dtype=np.uint8)
    bar = tqdm(total=n, desc="images", unit="img", disable=not progress)
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        y = torch.full((b,), NULL_CLASS if label is None else label, dtype=torch.long)
        denoise = GuidedDenoiser(unet, {"class_labels": y}, {"class_labels": torch.full_like(y, NULL_CLASS)}, terms)
        x = sample(denoise, (b, 1, size, size), scheduler, steps, image_generators(seed, start, b), progress=progress)
        images[start : start + b] = to_uint8(x)
        if on_batch is not None:
            on_batch(start, images[start : start + b])
        bar.update(b)
    bar.close()
    labels = np.full(n, -1 if label is None else label, dtype=np.int64)
    return images, labels
