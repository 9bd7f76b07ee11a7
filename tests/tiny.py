"""Tiny randomly initialised diffusers components built from configs (no downloads), for tests."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, UNet2DConditionModel, UNet2DModel

from pagkit.testing import families

TEXT_DIM = 32
# the components here are pagkit.testing.families' builders at twice their width, 8 groups and 32-wide text
WIDE: dict[str, Any] = dict(block_out_channels=(16, 32), norm_num_groups=8)
# the SD U-Net and its ControlNet: cross-attention in both levels (families': the second only), 8-dim heads
SD_CROSS: dict[str, Any] = dict(
    WIDE, down_block_types=("CrossAttnDownBlock2D",) * 2, cross_attention_dim=TEXT_DIM, attention_head_dim=8
)


def tiny_unet2d_condition(seed: int = 0, **overrides: Any) -> UNet2DConditionModel:
    return families.sd_unet(seed, **{**SD_CROSS, "up_block_types": ("CrossAttnUpBlock2D",) * 2, **overrides})


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    return families.vae_kl((8, 16), 4, 8, seed=seed)


def tiny_unet2d(seed: int = 0, **overrides: Any) -> UNet2DModel:
    return families.uncond_unet(1, 16, seed=seed, **{**WIDE, **overrides})


def sd_components(scheduler: str = "ddim", seed: int = 0) -> dict[str, Any]:
    sched_cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}[scheduler]
    sched = sched_cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return families.sd_components(tiny_unet2d_condition(seed), tiny_vae(seed), sched)


def prompt_embeds(batch: int = 1, seed: int = 1, tokens: int = 7, dim: int = TEXT_DIM) -> torch.Tensor:
    return torch.randn(batch, tokens, dim, generator=torch.Generator().manual_seed(seed))


# -- SDXL, PixArt, ControlNet and SD3 components (appended for tests/test_pag_dit_sdxl.py) ----------------------

POOLED_DIM = 32  # SDXL's pooled text embedding (text_encoder_2's projection_dim)


def tiny_sdxl_unet(seed: int = 0, **overrides: Any) -> UNet2DConditionModel:
    """An SDXL-style U-Net: text_time added conditioning, linear projections, a 2-layer mid transformer."""
    return families.sdxl_unet(seed, TEXT_DIM, POOLED_DIM, **{**WIDE, **overrides})


def sdxl_components(seed: int = 0) -> dict[str, Any]:
    sched = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return families.sdxl_components(tiny_sdxl_unet(seed), tiny_vae(seed), sched)


def pooled_embeds(batch: int = 1, seed: int = 3, dim: int = POOLED_DIM) -> torch.Tensor:
    return torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed))


def tiny_pixart(seed: int = 0, num_layers: int = 2, **overrides: Any) -> Any:
    """A PixArt-style DiT (ada_norm_single, cross-attention to captions, learned sigma)."""
    return families.pixart_transformer(seed, **{"num_layers": num_layers, "caption_channels": TEXT_DIM, **overrides})


def pixart_components(seed: int = 0) -> dict[str, Any]:
    return families.pixart_components(tiny_pixart(seed), tiny_vae(seed))


def tiny_controlnet(seed: int = 0, **overrides: Any) -> Any:
    """A ControlNet matching :func:`tiny_unet2d_condition`; conditions on images at twice the latent size."""
    return families.randomise_zero_convs(families.controlnet(seed, **{**SD_CROSS, **overrides}))


def tiny_sd3_transformer(seed: int = 0, num_layers: int = 2, **overrides: Any) -> Any:
    """An SD3-style MMDiT (joint attention over image and text tokens)."""
    config = dict(num_layers=num_layers, joint_attention_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM)
    return families.sd3_transformer(seed, **{**config, **overrides})


def sd3_components(seed: int = 0, **transformer_overrides: Any) -> dict[str, Any]:
    vae = families.flow_vae(channels=(4, 8), seed=seed)  # two levels: downsamples by 2
    return families.sd3_components(tiny_sd3_transformer(seed, **transformer_overrides), vae)


def tiny_denoiser_config() -> Any:
    from pagkit.models.unet import DenoiserConfig

    return DenoiserConfig(block_out_channels=(8, 16, 16), norm_num_groups=4, attention_head_dim=8)


def write_tiny_denoiser(path: Any, seed: int = 0) -> Any:
    """A randomly initialised embedded-architecture denoiser file, as ``pagkit train`` writes it."""
    from pagkit.models.unet import build_unet
    from pagkit.weights import save_tensors

    config = tiny_denoiser_config()
    torch.manual_seed(seed)
    model = build_unet(config)
    save_tensors(path, model.state_dict(), {"denoiser": config.to_dict()})
    return path


def write_idx_dataset(folder: Any, n_train: int = 256, n_test: int = 64, seed: int = 0) -> Any:
    """Synthetic Fashion-MNIST-format IDX files (gzip) with class-dependent blobs."""
    import gzip
    from pathlib import Path

    import numpy as np

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = np.zeros((n, 28, 28), dtype=np.uint8)
        for i, y in enumerate(labels):
            images[i, 2 + y : 12 + y, 4 : 4 + 2 * y + 4] = 200
        img_header = bytes([0, 0, 8, 3]) + b"".join(int(d).to_bytes(4, "big") for d in images.shape)
        lab_header = bytes([0, 0, 8, 1]) + int(n).to_bytes(4, "big")
        with gzip.open(folder / f"{split}-images-idx3-ubyte.gz", "wb") as f:
            f.write(img_header + images.tobytes())
        with gzip.open(folder / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(lab_header + labels.tobytes())
    return folder


# -- SDXL ControlNet (appended for tests/test_controlnet_sdxl.py) -----------------------------------------------


def tiny_sdxl_controlnet(seed: int = 0, **overrides: Any) -> Any:
    """A ControlNet matching :func:`tiny_sdxl_unet` (text_time conditioning); images at twice the latent size."""
    net = families.controlnet(seed, xl=True, cross=TEXT_DIM, pooled=POOLED_DIM, **{**WIDE, **overrides})
    return families.randomise_zero_convs(net)


def sdxl_controlnet_components(multi: bool = False, seed: int = 0) -> dict[str, Any]:
    """:func:`sdxl_components` (no image encoder) plus one ControlNet (or two, for MultiControlNet)."""
    comps = sdxl_components(seed)
    comps["controlnet"] = [tiny_sdxl_controlnet(1), tiny_sdxl_controlnet(2)] if multi else tiny_sdxl_controlnet(1)
    return comps
