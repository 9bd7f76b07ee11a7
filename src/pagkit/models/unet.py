"""The embedded denoiser: an ADM-style class-conditional ``UNet2DModel`` on 32x32 Fashion-MNIST."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from diffusers import UNet2DModel

from pagkit.weights import WeightsError, load_tensors

NULL_CLASS = 10  # the extra class index used for "no label" (trained with label dropout)
WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class DenoiserConfig:
    """Architecture and diffusion schedule of the embedded denoiser (one home for every default)."""

    sample_size: int = 32
    block_out_channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 1
    down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    attention_head_dim: int = 32
    norm_num_groups: int = 16
    num_classes: int = 10
    # diffusion schedule, in diffusers' scheduler vocabulary
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "epsilon"
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DenoiserConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for k in ("block_out_channels", "down_block_types", "up_block_types"):
            if k in known:
                known[k] = tuple(known[k])
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def scheduler_config(self) -> dict[str, Any]:
        """Keyword arguments for diffusers' DDPMScheduler / DDIMScheduler."""
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "beta_schedule": self.beta_schedule,
            "prediction_type": self.prediction_type,
            "clip_sample": True,  # x0 clipped to [-1, 1], as ADM samples pixel models
        }


def build_unet(config: DenoiserConfig) -> UNet2DModel:
    """A randomly initialised U-Net of the given configuration (self-attention at 16x16, 8x8 and mid)."""
    return UNet2DModel(
        sample_size=config.sample_size,
        in_channels=1,
        out_channels=1,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        down_block_types=config.down_block_types,
        up_block_types=config.up_block_types,
        attention_head_dim=config.attention_head_dim,
        norm_num_groups=config.norm_num_groups,
        resnet_time_scale_shift="scale_shift",
        num_class_embeds=config.num_classes + 1,
    )


def default_denoiser_path() -> Path:
    return WEIGHTS_DIR / "denoiser.safetensors"


def load_denoiser(path: str | os.PathLike[str] | None = None) -> tuple[UNet2DModel, DenoiserConfig]:
    """Load the embedded denoiser (or a file written by ``pagkit train``) in eval mode."""
    path = Path(path) if path is not None else default_denoiser_path()
    tensors, meta = load_tensors(path)
    if "denoiser" not in meta:
        raise WeightsError(f"{path} has no denoiser config in its metadata: is it a pagkit denoiser file?")
    config = DenoiserConfig.from_dict(meta["denoiser"])
    model = build_unet(config)
    try:
        model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    except RuntimeError as e:
        raise WeightsError(f"{path} does not match its config: {str(e).splitlines()[0]}") from e
    return model.eval().requires_grad_(False), config
