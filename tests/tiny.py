"""Tiny randomly initialised diffusers components built from configs (no downloads), for tests."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    UNet2DConditionModel,
    UNet2DModel,
)

TEXT_DIM = 32


def tiny_unet2d_condition(seed: int = 0, **overrides: Any) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    config: dict[str, Any] = dict(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    config.update(overrides)
    return UNet2DConditionModel(**config).eval()


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
    ).eval()


def tiny_unet2d(seed: int = 0, **overrides: Any) -> UNet2DModel:
    torch.manual_seed(seed)
    config: dict[str, Any] = dict(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
        norm_num_groups=8,
    )
    config.update(overrides)
    return UNet2DModel(**config).eval()


def sd_components(scheduler: str = "ddim", seed: int = 0) -> dict[str, Any]:
    sched_cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}[scheduler]
    return {
        "unet": tiny_unet2d_condition(seed),
        "vae": tiny_vae(seed),
        "scheduler": sched_cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        "text_encoder": None,
        "tokenizer": None,
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }


def prompt_embeds(batch: int = 1, seed: int = 1, tokens: int = 7, dim: int = TEXT_DIM) -> torch.Tensor:
    return torch.randn(batch, tokens, dim, generator=torch.Generator().manual_seed(seed))
