"""A DPS/PSLD-style hook for diffusers latent pipelines (Stable Diffusion and kin), with PAG.

:func:`latent_dps` runs the loop of :mod:`pagkit.inverse.dps` on a pipeline's ``unet``, ``vae`` and
``scheduler``: the measurement residual is ``||y - A(D(z0_hat))||`` with ``D`` the VAE decoder, so the gradient
flows back through the decoder and the unguided U-Net call to the latent ``z_t`` (Rout et al.'s PSLD without its
"gluing" term, i.e. latent DPS). Each step's update is driven by the U-Net under :func:`pagkit.apply_pag`
(``eps + s (eps - eps_perturbed)``, no CFG), the paper's recipe for inverse problems (Ahn et al. Sec. 5: SD 1.5,
input block 8, s = 4 to 5). The scheduler must be variance preserving without input scaling (DDIM, DDPM).

Example (a local checkpoint; nothing is downloaded)::

    pipe = StableDiffusionPipeline.from_pretrained("/path/to/stable-diffusion-v1-5")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    op = make_operator("sr4")                               # A on images [B, 3, 512, 512] in [-1, 1]
    y = op.measure(images, 0.05, [torch.Generator().manual_seed(i) for i in range(len(images))])
    x = latent_dps(pipe, op, y, prompt_embeds=empty, pag_scale=4.0, pag_layers="down_blocks.2.attentions.1",
                   zeta=1.0, generators=[torch.Generator().manual_seed(i) for i in range(len(images))])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from pagkit.guidance.schedules import Step
from pagkit.integrations.diffusers import apply_pag
from pagkit.inverse.dps import check_scheduler, dps_sample
from pagkit.inverse.operators import Operator, OperatorError


def decode(vae: Any, z: torch.Tensor) -> torch.Tensor:
    """Latents ``[B, c, h, w]`` -> images ``[B, 3, H, W]`` in [-1, 1] (differentiable; scaling and shift undone)."""
    config = vae.config
    z = z / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)
    return vae.decode(z).sample


def latent_dps(
    pipe: Any,
    operator: Operator,
    measurement: torch.Tensor,
    *,
    prompt_embeds: torch.Tensor,
    generators: list[torch.Generator],
    steps: int = 50,
    zeta: float = 1.0,
    pag_scale: float = 4.0,
    pag_layers: str = "mid",
    unet_kwargs: dict[str, Any] | None = None,
    height: int | None = None,
    width: int | None = None,
    progress: bool = False,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Latent DPS (+ PAG with ``pag_scale > 0``) on ``pipe.unet``/``pipe.vae``/``pipe.scheduler``.

    Args:
        operator, measurement: ``A`` on decoded images ``[B, 3, H, W]`` and ``y`` ``[B, ...]`` (e.g.
            ``operator.measure(images, sigma, generators)``).
        prompt_embeds: the U-Net's ``encoder_hidden_states`` ``[B, T, D]`` (an empty prompt's embedding for the
            paper's prompt-free setting). ``unet_kwargs`` adds other inputs (e.g. SDXL's ``added_cond_kwargs``).
        generators: one per image (initial latents and DDPM noise).
        zeta: DPS step size on ``grad_{z_t} ||y - A(D(z0_hat))||``; ``pag_scale`` 0 is plain latent DPS.

    Returns the decoded restorations ``[B, 3, H, W]`` in [-1, 1] (not clipped).
    """
    unet, vae, scheduler = pipe.unet, pipe.vae, pipe.scheduler
    check_scheduler(scheduler)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    size = unet.config.sample_size
    height = height or size * factor
    width = width or size * factor
    if height % factor or width % factor:
        raise OperatorError(f"image size {height}x{width} must be divisible by the VAE factor {factor}")
    b = len(generators)
    operator.check((b, vae.config.out_channels, height, width))
    expected = operator.forward(torch.zeros(1, vae.config.out_channels, height, width)).shape[1:]
    if tuple(measurement.shape) != (b, *expected):
        raise OperatorError(f"measurement must be {(b, *expected)}, got {tuple(measurement.shape)}")
    if not torch.isfinite(measurement).all():
        raise OperatorError("the measurement contains NaN or inf: nothing to restore from")
    if prompt_embeds.shape[0] != b:
        raise ValueError(f"prompt_embeds has {prompt_embeds.shape[0]} rows for {b} images")
    cond = {"encoder_hidden_states": prompt_embeds, **(unet_kwargs or {})}
    param = next(unet.parameters())

    def unguided(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return unet(z, t, **cond).sample

    def guided(z: torch.Tensor, t: torch.Tensor, step: Step) -> torch.Tensor:
        with apply_pag(unet, scale=pag_scale, layers=pag_layers, cfg=False):
            return unet(z, t, **cond).sample

    def residual(z0: torch.Tensor) -> torch.Tensor:
        image = decode(vae, z0)
        return (measurement.to(image.device, image.dtype) - operator.forward(image)).flatten(1).norm(dim=1)

    shape = (b, unet.config.in_channels, height // factor, width // factor)
    z = dps_sample(
        unguided,
        residual,
        shape,
        scheduler,
        steps,
        generators,
        zeta,
        guided if pag_scale != 0.0 else None,
        progress=progress,
        callback=callback,
        device=param.device,
        dtype=param.dtype,
    )
    with torch.no_grad():
        return decode(vae, z.to(next(vae.parameters()).dtype))
