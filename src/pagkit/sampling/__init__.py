"""Samplers as plain functions over (denoiser, noise, scheduler): DDIM and DDPM via diffusers' schedulers."""

from pagkit.sampling.loops import image_generators, make_scheduler, sample

__all__ = ["image_generators", "make_scheduler", "sample"]
