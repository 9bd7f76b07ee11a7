"""Diffusion posterior sampling (DPS, Chung et al. 2022) with a guided noise estimate driving the step.

One step (Chung et al. Alg. 1, with the PSLD+PAG split of Ahn et al. Sec. 5):

    eps_u    = unguided(x_t, t)                         # differentiable: the measurement gradient's path
    x0_hat   = (x_t - sqrt(1 - a_t) eps_u) / sqrt(a_t)  # Tweedie's estimate of x_0
    r        = ||y - A(x0_hat)||                        # unsquared norm, one per image
    eps_g    = guided(x_t, t)                           # e.g. eps + s (eps - eps_perturbed); no gradient
    x_{t-1}  = scheduler.step(eps_g, t, x_t) - zeta grad_{x_t} sum_i r_i

Like :func:`pagkit.sampling.loops.sample`, the loop knows nothing of guidance: ``guided`` is any
``denoise(x, t, step)`` (a :class:`~pagkit.guidance.engine.GuidedDenoiser`, a pipeline's U-Net under
``apply_pag``), or ``None`` for plain DPS (the unguided estimate then drives the step too, with no second model
call). ``residual`` maps ``x0_hat`` to the per-image measurement error, so the same loop serves pixel models
(``A(crop(x0_hat))``) and latent models (``A(decode(x0_hat))``, :mod:`pagkit.inverse.latent`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from pagkit.guidance.schedules import Step
from pagkit.integrations.diffusers import step_of
from pagkit.sampling.loops import step_kwargs

Denoise = Callable[[torch.Tensor, torch.Tensor, Step], torch.Tensor]
Unguided = Callable[[torch.Tensor, Any], torch.Tensor]  # (x_t, t): t a tensor or an int
Residual = Callable[[torch.Tensor], torch.Tensor]


def check_scheduler(scheduler: object) -> None:
    """DPS here needs a variance-preserving scheduler without input scaling (DDIM, DDPM, ...)."""
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if not isinstance(alphas, torch.Tensor) or float(getattr(scheduler, "init_noise_sigma", 1.0)) != 1.0:
        raise ValueError(
            f"DPS needs a variance-preserving scheduler with alphas_cumprod and unscaled inputs (DDIM, DDPM), "
            f"got {type(scheduler).__name__}"
        )
    kind = scheduler.config.prediction_type  # type: ignore[attr-defined]
    if kind not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"DPS: unsupported prediction type {kind!r}")


def predicted_x0(scheduler: object, x: torch.Tensor, output: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
    """Tweedie's ``x0_hat`` from the model output at ``x_t`` (epsilon, v or sample prediction), unclipped."""
    a = scheduler.alphas_cumprod[int(t)].to(x.device, x.dtype)  # type: ignore[attr-defined]
    kind = scheduler.config.prediction_type  # type: ignore[attr-defined]
    if kind == "epsilon":
        return (x - (1 - a).sqrt() * output) / a.sqrt()
    if kind == "v_prediction":
        return a.sqrt() * x - (1 - a).sqrt() * output
    return output


def measurement_gradient(
    unguided: Unguided, residual: Residual, scheduler: object, x: torch.Tensor, t: torch.Tensor | int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``grad_{x_t} sum_i ||y_i - A(x0_hat_i(x_t))||`` through one unguided model call.

    Returns the gradient ``[B, ...]``, the unguided output (detached) and the per-image residual norms ``[B]``.
    """
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        out = unguided(x_in, t)
        norms = residual(predicted_x0(scheduler, x_in, out, t))
        if norms.shape != (x.shape[0],):
            raise ValueError(f"residual must return one norm per image [{x.shape[0]}], got {tuple(norms.shape)}")
        (grad,) = torch.autograd.grad(norms.sum(), x_in)
    return grad, out.detach(), norms.detach()


def dps_sample(
    unguided: Unguided,
    residual: Residual,
    shape: tuple[int, ...],
    scheduler: object,
    steps: int,
    generators: list[torch.Generator],
    zeta: float,
    guided: Denoise | None = None,
    progress: bool = True,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Run ``steps`` DPS steps from per-image noise; returns ``x_0`` ``[B, ...]`` of ``shape``.

    ``unguided(x, t)`` is the differentiable model output, ``residual(x0_hat) -> [B]`` the measurement error
    norms, ``guided(x, t, step)`` the estimate that drives the step (``None``: the unguided one). ``callback(i,
    x, norms)`` sees each new ``x_{t-1}`` and the residual norms at ``x_t``.
    """
    if steps < 1:
        raise ValueError(f"the number of steps must be >= 1, got {steps}")
    if not zeta >= 0.0:
        raise ValueError(f"the DPS step size zeta must be >= 0, got {zeta}")
    if len(generators) != shape[0]:
        raise ValueError(f"need one generator per image: {len(generators)} for a batch of {shape[0]}")
    check_scheduler(scheduler)
    scheduler.set_timesteps(steps)  # type: ignore[attr-defined]
    # x_T: unit Gaussian noise, one generator per image
    x = randn_tensor(shape, generator=generators, device=torch.device(device or "cpu"), dtype=dtype)
    # per-image ancestral noise (DDPM); DDIM re-derives eps from the clipped x0 (see pagkit.sampling.loops)
    extra = step_kwargs(scheduler, generators)
    timesteps = scheduler.timesteps  # type: ignore[attr-defined]
    for i, t in enumerate(tqdm(timesteps, desc="DPS", leave=False, disable=not progress)):
        step = Step(fraction=i / max(len(timesteps) - 1, 1), sigma=step_of(scheduler, t).sigma, index=i)
        # the measurement-consistency gradient, through the unguided estimate's x0_hat only
        grad, out_u, norms = measurement_gradient(unguided, residual, scheduler, x, t)
        with torch.no_grad():
            # the (guided) estimate drives the sampler's update (DDIM, or DDPM with per-image noise)
            out = out_u if guided is None else guided(x, t, step)
            x = scheduler.step(out, t, x, **extra).prev_sample  # type: ignore[attr-defined]
            # the DPS correction: x_{t-1} -= zeta grad_{x_t} ||y - A(x0_hat)||
            x = x - zeta * grad
        if callback is not None:
            callback(i, x, norms)
    return x
