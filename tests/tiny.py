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


# -- SDXL, PixArt, ControlNet and SD3 components (appended for tests/test_pag_dit_sdxl.py) ----------------------

POOLED_DIM = 32  # SDXL's pooled text embedding (text_encoder_2's projection_dim)
TIME_EMBED_DIM = 8  # SDXL's addition_time_embed_dim; 6 size/crop ids per image


def tiny_sdxl_unet(seed: int = 0, **overrides: Any) -> UNet2DConditionModel:
    """An SDXL-style U-Net: text_time added conditioning, linear projections, a 2-layer mid transformer."""
    torch.manual_seed(seed)
    config: dict[str, Any] = dict(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + POOLED_DIM,
        cross_attention_dim=TEXT_DIM,
        norm_num_groups=8,
    )
    config.update(overrides)
    return UNet2DConditionModel(**config).eval()


def sdxl_components(seed: int = 0) -> dict[str, Any]:
    return {
        "unet": tiny_sdxl_unet(seed),
        "vae": tiny_vae(seed),
        "scheduler": EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        "text_encoder": None,
        "text_encoder_2": None,
        "tokenizer": None,
        "tokenizer_2": None,
        "add_watermarker": False,
    }


def pooled_embeds(batch: int = 1, seed: int = 3, dim: int = POOLED_DIM) -> torch.Tensor:
    return torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed))


def tiny_pixart(seed: int = 0, num_layers: int = 2, **overrides: Any) -> Any:
    """A PixArt-style DiT (ada_norm_single, cross-attention to captions, learned sigma)."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    config: dict[str, Any] = dict(
        sample_size=8,
        num_layers=num_layers,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_channels=TEXT_DIM,
        in_channels=4,
        cross_attention_dim=16,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    config.update(overrides)
    return PixArtTransformer2DModel(**config).eval()


def pixart_components(seed: int = 0) -> dict[str, Any]:
    return {
        "transformer": tiny_pixart(seed),
        "vae": tiny_vae(seed),
        "scheduler": DDIMScheduler(),
        "text_encoder": None,
        "tokenizer": None,
    }


def tiny_controlnet(seed: int = 0, **overrides: Any) -> Any:
    """A ControlNet matching :func:`tiny_unet2d_condition`; conditions on images at twice the latent size."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    config: dict[str, Any] = dict(
        block_out_channels=(16, 32),
        layers_per_block=1,
        in_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        conditioning_embedding_out_channels=(8, 16),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    config.update(overrides)
    net = ControlNetModel(**config).eval()
    # a fresh ControlNet's output convs are zero-initialised (it adds nothing yet): give them weights
    with torch.no_grad():
        for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
            conv.weight.normal_(0.0, 0.3)
            conv.bias.normal_(0.0, 0.1)
    return net


def tiny_sd3_transformer(seed: int = 0, num_layers: int = 2, **overrides: Any) -> Any:
    """An SD3-style MMDiT (joint attention over image and text tokens)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    config: dict[str, Any] = dict(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        num_layers=num_layers,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_projection_dim=16,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=POOLED_DIM,
        out_channels=4,
        pos_embed_max_size=16,
    )
    config.update(overrides)
    return SD3Transformer2DModel(**config).eval()


def sd3_components(seed: int = 0, **transformer_overrides: Any) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4, 8),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    ).eval()
    return {
        "transformer": tiny_sd3_transformer(seed, **transformer_overrides),
        "vae": vae,
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "text_encoder": None,
        "text_encoder_2": None,
        "text_encoder_3": None,
        "tokenizer": None,
        "tokenizer_2": None,
        "tokenizer_3": None,
    }


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
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    config: dict[str, Any] = dict(
        block_out_channels=(16, 32),
        layers_per_block=1,
        in_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + POOLED_DIM,
        conditioning_embedding_out_channels=(8, 16),
        cross_attention_dim=TEXT_DIM,
        norm_num_groups=8,
    )
    config.update(overrides)
    net = ControlNetModel(**config).eval()
    with torch.no_grad():  # zero-initialised output convs would make the ControlNet a no-op
        for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
            conv.weight.normal_(0.0, 0.3)
            conv.bias.normal_(0.0, 0.1)
    return net


def sdxl_controlnet_components(multi: bool = False, seed: int = 0) -> dict[str, Any]:
    """:func:`sdxl_components` plus one ControlNet (or two, for MultiControlNet) and no image encoder."""
    comps = sdxl_components(seed)
    comps["controlnet"] = [tiny_sdxl_controlnet(1), tiny_sdxl_controlnet(2)] if multi else tiny_sdxl_controlnet(1)
    comps["feature_extractor"] = None
    comps["image_encoder"] = None
    return comps
