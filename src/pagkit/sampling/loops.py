"""The sampling loop: ``x_T ~ N(0, I)``, then ``x_{t-1} = scheduler.step(denoise(x_t, t), t, x_t)``.

The loop knows nothing of guidance: it calls ``denoise(x, t, step) -> eps`` (a :class:`GuidedDenoiser` or any
callable) and uses diffusers' DDIM/DDPM update rules. Randomness comes in as one generator per image, so a
seed gives the same image whatever the batch size.

x0 clipping (``clip_sample``) is applied consistently: DDPM's posterior mean uses the clipped x0, and DDIM
re-derives eps from the clipped x0 (ADM's and GLIDE's DDIM; diffusers' ``use_clipped_model_output``). diffusers'
DDIMScheduler by default mixes the clipped x0 with the unclipped eps, which breaks CFG on pixel models: with the
embedded model, CFG w = 2 at 50 DDIM steps then *lowers* the share of samples classified as their label
(0.75 -> 0.48), where the consistent step raises it (0.80 -> 1.00; ``scripts/cfg_check.py``).
"""

from __future__ import annotations

import inspect
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
    if not (start >= 0 and start + count <= 2**24):
        raise ValueError("image indices must lie in [0, 2**24)")
    return [torch.Generator().manual_seed(seed * 2**24 + i) for i in range(start, start + count)]


def step_kwargs(scheduler: object, generators: list[torch.Generator]) -> dict[str, Any]:
    """Extra arguments of ``scheduler.step``: per-image generators where it draws noise, and DDIM's consistent
    x0 clipping (eps re-derived from the clipped x0) where it clips."""
    params = inspect.signature(scheduler.step).parameters  # type: ignore[attr-defined]
    kwargs: dict[str, Any] = {}
    if "generator" in params:
        kwargs["generator"] = generators
    if "use_clipped_model_output" in params:
        kwargs["use_clipped_model_output"] = True
    return kwargs


def renoised_ddim_step(
    scheduler: DDIMScheduler | DDPMScheduler, eps: torch.Tensor, eps_renoise: torch.Tensor, t: Any, x: torch.Tensor
) -> torch.Tensor:
    """One DDIM step (eta = 0) with ``x0`` predicted from ``eps`` and renoised with ``eps_renoise``.

    The sampler's hook for CFG++ (Chung et al., arXiv 2406.08070): a denoiser may return ``(eps, eps_renoise)``
    instead of ``eps``; ``x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)`` (clipped as the scheduler clips) and
    ``x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps_renoise``. With ``eps_renoise = eps`` and no clipping this
    is diffusers' DDIM step. DDPM's posterior has no such direction term: it is refused.
    """
    if not isinstance(scheduler, DDIMScheduler):
        raise ValueError(
            "CFG++ renoises the DDIM step with the unconditional prediction: use the DDIM sampler (--sampler ddim)"
        )
    config = scheduler.config
    step = int(t)
    prev = step - config.num_train_timesteps // scheduler.num_inference_steps
    a_t = scheduler.alphas_cumprod[step].to(x)
    a_prev = (scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod).to(x)
    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    if config.clip_sample:
        x0 = x0.clamp(-config.clip_sample_range, config.clip_sample_range)
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps_renoise


@torch.no_grad()
def sample(
    denoise: Denoise,
    shape: tuple[int, ...],
    scheduler: DDIMScheduler | DDPMScheduler,
    steps: int,
    generators: list[torch.Generator],
    progress: bool = True,
    callback: Callable[[int, torch.Tensor], None] | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Run ``steps`` denoising steps from per-image noise; returns ``x_0`` of ``shape`` ``[B, C, H, W]``.

    The noise is drawn from the (CPU) generators and moved to ``device``, so a seed gives the same ``x_T`` on
    every device."""
    if steps < 1:
        raise ValueError(f"the number of steps must be >= 1, got {steps}")
    if len(generators) != shape[0]:
        raise ValueError(f"need one generator per image: {len(generators)} for a batch of {shape[0]}")
    scheduler.set_timesteps(steps)
    # x_T: unit Gaussian noise, one generator per image
    x = randn_tensor(shape, generator=generators, device=torch.device(device or "cpu")) * scheduler.init_noise_sigma
    timesteps = scheduler.timesteps
    extra = step_kwargs(scheduler, generators)
    for i, t in enumerate(tqdm(timesteps, desc="sampling", leave=False, disable=not progress)):
        # where we are in the run, for guidance schedules
        step = Step(fraction=i / max(len(timesteps) - 1, 1), sigma=step_of(scheduler, t).sigma, index=i)
        # the (guided) noise prediction at x_t
        eps = denoise(x, t, step)
        if isinstance(eps, tuple):  # the renoising hook (CFG++): x0 from eps[0], DDIM's direction from eps[1]
            x = renoised_ddim_step(scheduler, eps[0], eps[1], t, x)
        else:
            # the sampler's update: DDIM (deterministic) or DDPM (ancestral noise from the per-image generators)
            x = scheduler.step(eps, t, x, **extra).prev_sample
        if callback is not None:
            callback(i, x)
    return x
