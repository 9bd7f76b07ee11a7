"""The sampling loop: ``x_T ~ N(0, I)``, then ``x_{t-1} = scheduler.step(denoise(x_t, t), t, x_t)``.

The loop knows nothing of guidance: it calls ``denoise(x, t, step) -> eps`` (a :class:`GuidedDenoiser` or any
callable) and uses diffusers' DDIM/DDPM update rules. Randomness comes in as one generator per image, so a
seed gives the same image whatever the batch size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from pagkit.guidance.schedules import Step
from pagkit.integrations.diffusers import step_of

Denoise = Callable[[torch.Tensor, torch.Tensor, Step], torch.Tensor]
SAMPLERS = ("ddim", "ddpm")


def make_scheduler(name: str, config: dict[str, Any]) -> DDIMScheduler | DDPMScheduler:
    """A fresh diffusers scheduler for ``ddim`` (eta = 0) or ``ddpm`` (ancestral) from a model's schedule."""
    if name == "ddim":
        return DDIMScheduler(**config)
    if name == "ddpm":
        return DDPMScheduler(**config, variance_type="fixed_small")
    raise ValueError(f"unknown sampler {name!r}: use one of {', '.join(SAMPLERS)}")


def image_generators(seed: int, start: int, count: int) -> list[torch.Generator]:
    """One generator per image ``start .. start+count-1``; image i's noise depends only on (seed, i)."""
    if not start >= 0 and start + count <= 2**24:
        raise ValueError("image indices must lie in [0, 2**24)")
    return [torch.Generator().manual_seed(seed * 2**24 + i) for i in range(start, start + count)]


@torch.no_grad()
def sample(
    denoise: Denoise,
    shape: tuple[int, ...],
    scheduler: DDIMScheduler | DDPMScheduler,
    steps: int,
    generators: list[torch.Generator],
    progress: bool = True,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Run ``steps`` denoising steps from per-image noise; returns ``x_0`` of ``shape`` ``[B, C, H, W]``."""
    if steps < 1:
        raise ValueError(f"the number of steps must be >= 1, got {steps}")
    if len(generators) != shape[0]:
        raise ValueError(f"need one generator per image: {len(generators)} for a batch of {shape[0]}")
    scheduler.set_timesteps(steps)
    # x_T: unit Gaussian noise, one generator per image
    x = randn_tensor(shape, generator=generators) * scheduler.init_noise_sigma
    timesteps = scheduler.timesteps
    for i, t in enumerate(tqdm(timesteps, desc="sampling", leave=False, disable=not progress)):
        # where we are in the run, for guidance schedules
        step = Step(fraction=i / max(len(timesteps) - 1, 1), sigma=step_of(scheduler, t).sigma, index=i)
        # the (guided) noise prediction at x_t
        eps = denoise(x, t, step)
        # the sampler's update: DDIM (deterministic) or DDPM (ancestral noise from the per-image generators)
        x = scheduler.step(eps, t, x, generator=generators).prev_sample
        if callback is not None:
            callback(i, x)
    return x
