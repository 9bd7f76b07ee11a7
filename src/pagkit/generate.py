"""Generate Fashion-MNIST images with the embedded denoiser (or a ``pagkit train`` output), guided or not."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pagkit.data import to_uint8
from pagkit.defaults import RECOMMENDED
from pagkit.defaults import Recommended as Recommended  # re-exported
from pagkit.guidance.engine import GuidedDenoiser
from pagkit.guidance.rules_cfg import renoising
from pagkit.guidance.sag import SAG
from pagkit.guidance.term import Term
from pagkit.guidance.terms import CFG, PAG
from pagkit.models.unet import NULL_CLASS, DenoiserConfig, load_denoiser
from pagkit.sampling.loops import image_generators, make_scheduler, sample
from pagkit.store import check_memory


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


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a precision name (None: full fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


MAX_IMAGES = 2**24  # image indices lie in [0, 2**24): the per-image generators' seed space


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device, or a one-line ``ValueError`` when this machine does not have it."""
    try:
        dev = torch.device(device)
        torch.empty(0, device=dev)
    except (RuntimeError, ValueError, AssertionError) as e:  # torch asserts when built without CUDA
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"device {str(device)!r} is not available here ({first}): use --device cpu") from None
    return dev


def check_steps(steps: int, config: DenoiserConfig) -> None:
    """The sampler's steps must lie in 1 .. the model's training steps."""
    if steps < 1:
        raise ValueError(f"the number of steps must be >= 1, got {steps}")
    if steps > config.num_train_timesteps:
        raise ValueError(
            f"--steps {steps} exceeds the model's {config.num_train_timesteps} training steps: "
            f"use at most {config.num_train_timesteps}"
        )


def check_layers(model: torch.nn.Module, pag_scale: float, pag_layers: str, sag_scale: float, sag_layer: str) -> None:
    """Resolve the layer specs of the active terms against ``model`` (a one-line error before any sampling)."""
    from pagkit.layers import select_layers

    for scale, spec, option in ((pag_scale, pag_layers, "--pag-layers"), (sag_scale, sag_layer, "--sag-layer")):
        if not str(spec).strip():
            raise ValueError(f"{option} is empty: give a layer spec such as mid (pagkit layers lists them)")
        if scale != 0.0:
            select_layers(model, spec)


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
    reuse_delta: int = 1,
    sag_scale: float = 0.0,
    sag_layer: str = "mid",
    guidance: str | None = None,
    labels: np.ndarray | None = None,
    first_index: int = 0,
    batch_size: int = 64,
    precision: str = "fp32",
    weights: str | os.PathLike[str] | None = None,
    model: tuple[torch.nn.Module, DenoiserConfig] | None = None,
    progress: bool = True,
    on_batch: Callable[[int, np.ndarray], None] | None = None,
    desc: str = "images",
    bar: Any = None,
    student: str | os.PathLike[str] | None = None,
    student_digest: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``n`` images; returns ``uint8 [n, 28, 28]`` and labels ``int64 [n]`` (-1: unconditional).

    Seeds: image i's initial noise, and every noise the sampler adds to it, come from the generator of
    ``(seed, first_index + i)`` on the CPU, whatever the batch size, device or sharding.

    What is bit-exact: with the same settings, batch size, thread count, device and torch build, the images are
    identical from run to run, and a run cut at multiples of ``batch_size`` (shards with ``first_index``, resumed
    runs, several processes) gives the same images as one call. What is not: another batch size or thread count
    makes torch's CPU kernels round differently (they pick blockings and reduction orders by batch shape and
    thread count), so a few pixels may differ by one grey level (on the embedded model at 20 DDIM steps: 2 to 4
    pixels in 50,176; ``tests/test_cli.py`` and ``tests/test_slow.py`` bound it).

    ``cfg_scale = 1`` means no CFG, ``pag_scale = 0`` no PAG and ``sag_scale = 0`` no SAG (diffusers'
    conventions). ``reuse_delta = k`` recomputes PAG's delta every k-th step only. ``precision = "bf16"`` runs
    the model under bf16 autocast (about 2x faster on CPUs with AVX512-BF16; the sampler stays in fp32).
    ``labels`` (int ``[n]``, -1: unconditional) gives each image its own class instead of ``label``.
    Progress: one bar (``desc``) counting images, with the current step as its postfix; ``bar`` hands in a
    tqdm-like bar to update instead (it is not closed here).

    A distilled student (:mod:`pagkit.distill`; ``model`` holding a ``StudentUNet``, or ``student`` naming its file:
    ``"default"`` for the shipped one; ``student_digest`` then must match the file) predicts the PAG/CFG-guided
    noise in one model call per step at the given ``pag_scale`` and ``cfg_scale``.
    """
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if steps < 1:
        raise ValueError(f"the number of steps must be >= 1, got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if first_index < 0:
        raise ValueError(f"first_index must be >= 0, got {first_index}")
    if first_index + n > MAX_IMAGES:
        raise ValueError(f"image indices must lie in [0, {MAX_IMAGES}): got {first_index} + {n} images")
    make_scheduler(sampler, {})  # validate the sampler name before loading anything
    autocast = autocast_dtype(precision)
    check_memory(n * (28 * 28 + 8), f"{n} images")  # the uint8 images and their int64 labels
    if labels is None:
        labels = np.full(n, -1 if label is None else label, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (n,) or labels.min() < -1 or labels.max() > 9:
        raise ValueError(f"labels must be {n} class indices in 0..9 (or -1: unconditional), got shape {labels.shape}")
    terms: list[Term] = []
    if cfg_scale != 1.0:
        if (labels < 0).any():
            raise ValueError("CFG needs a class label (--label 0..9); use --cfg-scale 1 for unconditional sampling")
        terms.append(CFG(cfg_scale))
    if pag_scale != 0.0:
        terms.append(PAG.make(pag_scale, pag_layers, perturbation, pag_schedule))
    else:
        PAG.make(pag_scale, pag_layers, perturbation, pag_schedule)  # still validate the options
    if sag_scale != 0.0:
        terms.append(SAG.make(sag_scale, sag_layer))
    else:
        SAG.make(sag_scale, sag_layer)
    if guidance is not None:  # a guidance spec (pagkit.guidance.spec) replaces the cfg/pag/sag arguments
        from pagkit.guidance.spec import guidance_terms

        terms, reuse_delta = guidance_terms(guidance, labels, sampler)
    unet, config = model if model is not None else load_denoiser(weights)
    if student is not None:
        from pagkit.distill.student import cached_student

        unet, config = cached_student(student, student_digest, next(unet.parameters()).device)
    is_student = bool(getattr(unet, "is_student", False))
    check_steps(steps, config)
    if is_student:
        from pagkit.distill.student import check_student_options

        check_student_options(
            unet, labels, cfg_scale, pag_scale, pag_layers, pag_schedule, perturbation, reuse_delta, sag_scale
        )
    else:
        check_layers(unet, pag_scale, pag_layers, sag_scale, sag_layer)
    device = next(unet.parameters()).device  # sample where the model is (noise comes from CPU generators)
    scheduler = make_scheduler(sampler, config.scheduler_config())
    size = config.sample_size
    images = np.empty((n, 28, 28), dtype=np.uint8)
    own_bar = bar is None
    if own_bar:
        bar = tqdm(total=n, desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
    try:
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            chunk = torch.as_tensor(labels[start : start + b], device=device)
            y = torch.where(chunk < 0, NULL_CLASS, chunk)
            uncond = {"class_labels": torch.full_like(y, NULL_CLASS)}
            denoise: Callable[..., torch.Tensor]
            if is_student:
                from pagkit.distill.student import StudentDenoiser

                denoise = StudentDenoiser(unet, y, pag_scale, cfg_scale, autocast)  # type: ignore[arg-type]
            else:
                denoise = GuidedDenoiser(
                    unet, {"class_labels": y}, uncond, terms, reuse_delta=reuse_delta, autocast=autocast
                )
            generators = image_generators(seed, first_index + start, b)

            def at_step(i: int, x: torch.Tensor) -> None:
                bar.set_postfix_str(f"step {i + 1}/{steps}", refresh=False)

            x = sample(
                renoising(denoise, terms),  # CFG++ renoises the DDIM step (pagkit.guidance.rules_cfg)
                (b, 1, size, size),
                scheduler,
                steps,
                generators,
                progress=False,
                callback=at_step,
                device=device,
            )
            images[start : start + b] = to_uint8(x)
            if on_batch is not None:
                on_batch(start, images[start : start + b])
            bar.update(b)
    finally:
        if own_bar:
            bar.close()
    return images, labels
