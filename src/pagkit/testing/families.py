"""Tiny, randomly initialised diffusers pipelines for many model families (CPU, float32, offline).

Each :class:`Family` builds one pipeline from small configs modelled on the dummy components of diffusers' own
fast tests (``tests/pipelines/<name>/test_*.py``, ``get_dummy_components``) and says how to call it: per-image
seeds in, ``pipe(**kwargs)`` keyword arguments out. Text conditions are random prompt embeddings drawn with fixed
seeds, so row ``i`` of a batch is the same in every call with the same batch size; image ``i`` depends only on
``seeds[i]`` (one generator per image). Nothing is downloaded and no text encoder or tokenizer is built: every
pipeline here accepts the embeddings directly (its text encoders are ``None``).

``layers`` names one self-attention (or joint / single-stream) module of each distinct block kind of the
denoiser, as a pagkit layer spec of exact module paths; ``notes`` records how the pipeline calls its denoiser in
one step (read from the installed diffusers source), and which attention and processor classes the layers are.

The component builders (``vae_kl``, ``sd_unet``, ``sdxl_unet``, ``controlnet``, ``pixart_transformer``,
``sd3_transformer``, ``flux_transformer``, ``wan_transformer``, ``uncond_unet`` and the ``*_components`` dicts)
are public: each seeds torch, builds one component at this module's tiny sizes, and takes keyword overrides of
any config entry, so that the tests' own tiny components and ``pagkit bench``'s realistic shapes are built here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "FAMILIES",
    "UNBUILDABLE",
    "Family",
    "controlnet",
    "flow_vae",
    "flux_transformer",
    "get",
    "names",
    "output_tensor",
    "pixart_components",
    "pixart_transformer",
    "randomise_zero_convs",
    "sd3_components",
    "sd3_transformer",
    "sd_components",
    "sd_unet",
    "sdxl_components",
    "sdxl_unet",
    "uncond_unet",
    "vae_kl",
    "wan_transformer",
    "without_cfg",
]

Call = Callable[[Sequence[int]], dict[str, Any]]


@dataclass(frozen=True)
class Family:
    """One tiny pipeline: how to build it, how to call it, which attention layers to perturb."""

    name: str
    build: Callable[[], Any]
    call: Call
    layers: str
    cfg: bool
    denoiser: str = "transformer"
    notes: str = ""
    slow: bool = False


FAMILIES: dict[str, Family] = {}
UNBUILDABLE: dict[str, str] = {}
_NO_CFG: dict[str, Call] = {}


def get(name: str) -> Family:
    """The family called ``name``; ``KeyError`` listing the known names (and why, if it is unbuildable)."""
    try:
        return FAMILIES[name]
    except KeyError:
        if name in UNBUILDABLE:
            raise KeyError(f"family {name!r} cannot be built offline: {UNBUILDABLE[name]}") from None
        raise KeyError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}") from None


def names(include_slow: bool = True) -> list[str]:
    """Every family name, in registration order (optionally without the slow ones)."""
    return [n for n, f in FAMILIES.items() if include_slow or not f.slow]


def without_cfg(name: str) -> Call | None:
    """For a family whose ``call`` runs classifier-free guidance: the same call with guidance off (None if n/a)."""
    fam = get(name)
    return _NO_CFG.get(name) if fam.cfg else None


def output_tensor(result: Any) -> torch.Tensor:
    """The batch a pipeline call returned (images / frames / latents), as a float tensor with the batch first."""
    import numpy as np

    value: Any = result
    for attr in ("images", "frames", "videos"):
        if hasattr(result, attr):
            value = getattr(result, attr)
            break
    else:
        if isinstance(result, tuple):
            value = result[0]
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if isinstance(value, list):
        value = torch.stack([output_tensor(v) if not isinstance(v, torch.Tensor) else v for v in value])
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"cannot find a tensor in the pipeline output {type(result).__name__}")
    return value.float()


def _register(
    name: str,
    build: Callable[[], Any],
    call: Callable[..., dict[str, Any]],
    layers: str,
    *,
    cfg: bool,
    denoiser: str = "transformer",
    notes: str = "",
    slow: bool = False,
) -> None:
    """Register a family; ``call`` takes ``(seeds, cfg=...)`` and is bound to this family's ``cfg``."""
    FAMILIES[name] = Family(
        name=name,
        build=build,
        call=functools.partial(call, cfg=cfg),
        layers=layers,
        cfg=cfg,
        denoiser=denoiser,
        notes=" ".join(notes.split()),
        slow=slow,
    )
    if cfg:
        _NO_CFG[name] = functools.partial(call, cfg=False)


# ---------------------------------------------------------------------------------------------------------------
# shared helpers


def _gens(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, so image ``i`` depends only on ``seeds[i]``."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def _randn(*shape: int, seed: int) -> torch.Tensor:
    """A fixed random tensor (row ``i`` is the same in every call with the same shape)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _rand(*shape: int, seed: int) -> torch.Tensor:
    """A fixed uniform [0, 1) tensor (an image or a mask)."""
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def _ones_mask(n: int, tokens: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
    return torch.ones(n, tokens, dtype=dtype)


def _quiet(pipe: Any) -> Any:
    """Progress bar off, every model component in eval mode (no dropout)."""
    pipe.set_progress_bar_config(disable=True)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def vae_kl(
    channels: Sequence[int] = (8, 16),
    latent: int = 4,
    groups: int = 4,
    *,
    seed: int = 0,
    **kw: Any,
) -> Any:
    """A tiny ``AutoencoderKL`` (seeded with ``seed``); its downsampling factor is ``2 ** (len(channels) - 1)``."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    n = len(channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(channels),
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=1,
        latent_channels=latent,
        norm_num_groups=groups,
        **kw,
    ).eval()


def randomise_zero_convs(controlnet: Any) -> Any:
    """A fresh ControlNet's output convs are zero-initialised (it adds nothing): give them small weights."""
    with torch.no_grad():
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.normal_(0.0, 0.3)
            conv.bias.normal_(0.0, 0.1)
    return controlnet


# ===============================================================================================================
# U-Net text-to-image families: SD 1.5 (+ img2img, inpaint, ControlNet), SDXL (+ ControlNet), Kolors

SD_TEXT = 16  # cross-attention width of the SD-style U-Nets
SD_TOKENS = 7
SD_SIZE = 16  # pixels; the tiny VAE downsamples by 2, so latents are 8x8
XL_POOLED = 16  # SDXL's pooled text embedding
XL_TIME = 8  # SDXL's addition_time_embed_dim; 6 size/crop ids per image

UNET_LAYERS = "down_blocks.1.attentions.0.transformer_blocks.0.attn1,mid_block.attentions.0.transformer_blocks.0.attn1"


def sd_unet(seed: int = 0, **overrides: Any) -> Any:
    """A tiny SD-style ``UNet2DConditionModel``; ``overrides`` replace entries of its config."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    config: dict[str, Any] = dict(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=SD_TEXT,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    config.update(overrides)
    return UNet2DConditionModel(**config).eval()


def _sd_scheduler() -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def sd_components(unet: Any, vae: Any = None, scheduler: Any = None) -> dict[str, Any]:
    """A Stable Diffusion pipeline's components: ``unet``, ``vae`` (default :func:`vae_kl`), ``scheduler`` (default
    DDIM as in diffusers' tests), no text encoder, safety checker or image encoder."""
    return {
        "unet": unet,
        "vae": vae_kl() if vae is None else vae,
        "scheduler": _sd_scheduler() if scheduler is None else scheduler,
        "text_encoder": None,
        "tokenizer": None,
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
        "requires_safety_checker": False,
    }


def _sd_text(n: int, cfg: bool) -> dict[str, Any]:
    kw: dict[str, Any] = {"prompt_embeds": _randn(n, SD_TOKENS, SD_TEXT, seed=101)}
    if cfg:
        kw["negative_prompt_embeds"] = _randn(n, SD_TOKENS, SD_TEXT, seed=102)
    return kw


def _common(seeds: Sequence[int], guidance: float, cfg: bool, steps: int = 2, **kw: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "generator": _gens(seeds),
        "num_inference_steps": steps,
        "guidance_scale": guidance if cfg else 1.0,
    }
    out.update(kw)
    return out


def _build_sd15() -> Any:
    from diffusers import StableDiffusionPipeline

    return _quiet(StableDiffusionPipeline(**sd_components(sd_unet())))


def _call_sd15(seeds: Sequence[int], cfg: bool) -> dict[str, Any]:
    return _common(seeds, 5.0, cfg, height=SD_SIZE, width=SD_SIZE, output_type="latent", **_sd_text(len(seeds), cfg))


def _build_sd15_img2img() -> Any:
    from diffusers import StableDiffusionImg2ImgPipeline

    return _quiet(StableDiffusionImg2ImgPipeline(**sd_components(sd_unet())))


def _call_sd15_img2img(seeds: Sequence[int], cfg: bool) -> dict[str, Any]:
    # num_inference_steps=4 with strength=0.5 -> 2 denoiser steps
    return _common(
        seeds,
        5.0,
        cfg,
        steps=4,
        strength=0.5,
        image=_rand(1, 3, SD_SIZE, SD_SIZE, seed=201),
        output_type="latent",
        **_sd_text(len(seeds), cfg),
    )


def _build_sd15_inpaint() -> Any:
    from diffusers import StableDiffusionInpaintPipeline

    return _quiet(StableDiffusionInpaintPipeline(**sd_components(sd_unet(in_channels=9))))


def _inpaint_mask() -> torch.Tensor:
    mask = torch.zeros(1, 1, SD_SIZE, SD_SIZE)
    mask[..., :, SD_SIZE // 2 :] = 1.0  # repaint the right half
    return mask


def _call_sd15_inpaint(seeds: Sequence[int], cfg: bool) -> dict[str, Any]:
    return _common(
        seeds,
        5.0,
        cfg,
        height=SD_SIZE,
        width=SD_SIZE,
        image=_rand(1, 3, SD_SIZE, SD_SIZE, seed=201),
        mask_image=_inpaint_mask(),
        output_type="latent",
        **_sd_text(len(seeds), cfg),
    )


def controlnet(
    seed: int = 1, *, xl: bool = False, cross: int = SD_TEXT, pooled: int = XL_POOLED, **overrides: Any
) -> Any:
    """A ControlNet matching :func:`sd_unet` (``xl``: :func:`sdxl_unet` with ``cross`` and ``pooled``); images at
    twice the latent size. Its output convs are still zero: :func:`randomise_zero_convs` gives them weights."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    config: dict[str, Any] = dict(
        block_out_channels=(8, 16),
        layers_per_block=1,
        in_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        cross_attention_dim=cross,
        attention_head_dim=2,
        conditioning_embedding_out_channels=(8, 16),
        norm_num_groups=4,
    )
    if xl:
        config.update(_xl_conditioning(cross, pooled))
    config.update(overrides)
    return ControlNetModel(**config).eval()


def _build_controlnet_sd() -> Any:
    from diffusers import StableDiffusionControlNetPipeline

    net = controlnet()
    comps = sd_components(sd_unet())
    comps["controlnet"] = randomise_zero_convs(net)
    return _quiet(StableDiffusionControlNetPipeline(**comps))


def _call_controlnet_sd(seeds: Sequence[int], cfg: bool) -> dict[str, Any]:
    return _common(
        seeds,
        5.0,
        cfg,
        height=SD_SIZE,
        width=SD_SIZE,
        image=_rand(1, 3, SD_SIZE, SD_SIZE, seed=202),
        output_type="latent",
        **_sd_text(len(seeds), cfg),
    )


# -- SDXL / Kolors


def _xl_conditioning(cross: int, pooled: int) -> dict[str, Any]:
    """The config entries that make an SD U-Net (or ControlNet) SDXL-style: text_time added conditioning, linear
    projections, a 2-layer transformer in the second level."""
    return dict(
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=XL_TIME,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * XL_TIME + pooled,
        cross_attention_dim=cross,
    )


def sdxl_unet(seed: int = 0, cross: int = SD_TEXT, pooled: int = XL_POOLED, **overrides: Any) -> Any:
    """A tiny SDXL-style U-Net (:func:`sd_unet` with text_time conditioning); ``overrides`` replace config entries."""
    return sd_unet(seed, **{**_xl_conditioning(cross, pooled), **overrides})


def _xl_scheduler() -> Any:
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )


def sdxl_components(unet: Any = None, vae: Any = None, scheduler: Any = None) -> dict[str, Any]:
    """An SDXL pipeline's components: ``unet`` (default :func:`sdxl_unet`), ``vae`` (default :func:`vae_kl`),
    ``scheduler`` (default Euler as in diffusers' tests), no text encoders, image encoder or watermarker."""
    return {
        "unet": sdxl_unet() if unet is None else unet,
        "vae": vae_kl() if vae is None else vae,
        "scheduler": _xl_scheduler() if scheduler is None else scheduler,
        "text_encoder": None,
        "text_encoder_2": None,
        "tokenizer": None,
        "tokenizer_2": None,
        "image_encoder": None,
        "feature_extractor": None,
        "add_watermarker": False,
    }


def _xl_text(n: int, cfg: bool, dim: int = SD_TEXT, pooled: int = XL_POOLED) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "prompt_embeds": _randn(n, SD_TOKENS, dim, seed=101),
        "pooled_prompt_embeds": _randn(n, pooled, seed=103),
    }
    if cfg:
        kw["negative_prompt_embeds"] = _randn(n, SD_TOKENS, dim, seed=102)
        kw["negative_pooled_prompt_embeds"] = _randn(n, pooled, seed=104)
    return kw


def _build_sdxl() -> Any:
    from diffusers import StableDiffusionXLPipeline

    return _quiet(StableDiffusionXLPipeline(**sdxl_components()))


def _call_sdxl(seeds: Sequence[int], cfg: bool) -> dict[str, Any]:
    return _common(seeds, 5.0, cfg, height=SD_SIZE, width=SD_SIZE, output_type="latent", **_xl_text(len(seeds), cfg))


def _build_controlnet_sdxl() -> Any:
    from diffusers import StableDiffusionXLControlNetPipeline

    net = controlnet(xl=True)
    comps = sdxl_components()
    comps["controlnet"] = randomise_zero_convs(net)
    return _quiet(StableDiffusionXLControlNetPipeline(**comps))


def _call_controlnet_sdxl(seeds: Sequence[int], cfg: bool) -> dict[str, Any]:
    return _common(
        seeds,
        5.0,
        cfg,
        height=SD_SIZE,
        width=SD_SIZE,
        image=_rand(1, 3, SD_SIZE, SD_SIZE, seed=202),
        output_type="latent",
        **_xl_text(len(seeds), cfg),
    )


KOLORS_TEXT = 16
KOLORS_POOLED = 16


def _build_kolors() -> Any:
    # imported from its module: the top-level name is a dummy that demands sentencepiece (ChatGLM's tokenizer)
    from diffusers.pipelines.kolors.pipeline_kolors import KolorsPipeline

    pipe = KolorsPipeline(
        vae=vae_kl(),
        text_encoder=None,
        tokenizer=None,
        unet=sdxl_unet(cross=KOLORS_TEXT, pooled=KOLORS_POOLED),
        scheduler=_xl_scheduler(),
        image_encoder=None,
        feature_extractor=None,
    )
    return _quiet(pipe)


def _call_kolors(seeds: Sequence[int], cfg: bool) -> dict[str, Any]:
    return _common(
        seeds,
        5.0,
        cfg,
        height=SD_SIZE,
        width=SD_SIZE,
        output_type="latent",
        **_xl_text(len(seeds), cfg, KOLORS_TEXT, KOLORS_POOLED),
    )


# ===============================================================================================================
# image DiTs: SD3 / SD3.5 (MMDiT), PixArt, Sana, HunyuanDiT, AuraFlow, Lumina2, DiT

TEXT = 16  # prompt-embedding width for the tiny transformers
TOKENS = 8  # prompt tokens
POOLED = 16


def flow_vae(latent: int = 4, channels: Sequence[int] = (4,), **kw: Any) -> Any:
    """The flow-matching test VAE: one level (downsampling factor 1), no quant convs, SD3/Flux shift and scale."""
    return vae_kl(
        channels,
        latent,
        1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
        **kw,
    )


def _flow_scheduler(**kw: Any) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**kw)


def _text(
    n: int,
    cfg: bool,
    dim: int = TEXT,
    tokens: int = TOKENS,
    *,
    mask: str = "",
    mask_dtype: torch.dtype = torch.long,
    pooled: int = 0,
) -> dict[str, Any]:
    """Random prompt embeddings (fixed seeds) and, as asked, all-ones attention masks and pooled embeddings."""
    kw: dict[str, Any] = {"prompt_embeds": _randn(n, tokens, dim, seed=101)}
    if mask:
        kw[mask] = _ones_mask(n, tokens, mask_dtype)
    if pooled:
        kw["pooled_prompt_embeds"] = _randn(n, pooled, seed=103)
    if cfg:
        kw["negative_prompt_embeds"] = _randn(n, tokens, dim, seed=102)
        if mask:
            kw["negative_" + mask] = _ones_mask(n, tokens, mask_dtype)
        if pooled:
            kw["negative_pooled_prompt_embeds"] = _randn(n, pooled, seed=104)
    return kw


# -- SD3 / SD3.5


def sd3_transformer(seed: int = 0, **overrides: Any) -> Any:
    """A tiny SD3-style MMDiT (joint attention over image and text tokens); ``overrides`` replace config entries."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    config: dict[str, Any] = dict(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_projection_dim=16,
        joint_attention_dim=TEXT,
        pooled_projection_dim=POOLED,
        out_channels=4,
        pos_embed_max_size=16,
    )
    config.update(overrides)
    return SD3Transformer2DModel(**config).eval()


def sd3_components(transformer: Any, vae: Any = None) -> dict[str, Any]:
    """An SD3 pipeline's components (also diffusers' SD3 PAG pipeline's): ``vae`` defaults to :func:`flow_vae`."""
    return {
        "transformer": transformer,
        "vae": flow_vae() if vae is None else vae,
        "scheduler": _flow_scheduler(),
        "text_encoder": None,
        "text_encoder_2": None,
        "text_encoder_3": None,
        "tokenizer": None,
        "tokenizer_2": None,
        "tokenizer_3": None,
    }


def _build_sd3(sd35: bool = False) -> Any:
    from diffusers import StableDiffusion3Pipeline

    extra: dict[str, Any] = {"qk_norm": "rms_norm", "dual_attention_layers": (0,)} if sd35 else {}
    return _quiet(StableDiffusion3Pipeline(**sd3_components(sd3_transformer(**extra))))  # no IP-Adapter encoder


def _call_sd3(seeds: Sequence[int], cfg: bool, slg: bool = False) -> dict[str, Any]:
    kw = _common(seeds, 5.0, cfg, height=8, width=8, output_type="latent", **_text(len(seeds), cfg, pooled=POOLED))
    if slg:
        # the pipeline runs the extra skip-layer call only where i > N * start and i < N * stop (strict): with
        # N = 2 steps and start=0, stop=1 that is step i = 1 only
        kw.update(
            skip_guidance_layers=[0],
            skip_layer_guidance_scale=2.8,
            skip_layer_guidance_start=0.0,
            skip_layer_guidance_stop=1.0,
        )
    return kw


# -- PixArt-alpha / -sigma


def pixart_transformer(seed: int = 0, **overrides: Any) -> Any:
    """A tiny PixArt-style DiT (adaLN-single, cross-attention to captions, learned sigma); ``overrides`` replace
    config entries."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    config: dict[str, Any] = dict(
        sample_size=8,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_channels=TEXT,
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


def pixart_components(transformer: Any, vae: Any = None) -> dict[str, Any]:
    """A PixArt pipeline's components: ``vae`` defaults to :func:`vae_kl`, a default DDIM scheduler, no T5."""
    from diffusers import DDIMScheduler

    vae = vae_kl() if vae is None else vae
    return {
        "transformer": transformer,
        "vae": vae,
        "scheduler": DDIMScheduler(),
        "text_encoder": None,
        "tokenizer": None,
    }


def _build_pixart(sigma: bool) -> Any:
    from diffusers import PixArtAlphaPipeline, PixArtSigmaPipeline

    cls = PixArtSigmaPipeline if sigma else PixArtAlphaPipeline
    return _quiet(cls(**pixart_components(pixart_transformer())))


def _call_pixart(seeds: Sequence[int], cfg: bool) -> dict[str, Any]:
    return _common(
        seeds,
        4.5,
        cfg,
        height=16,
        width=16,
        use_resolution_binning=False,
        negative_prompt=None,  # the default "" would clash with negative_prompt_embeds
        output_type="latent",
        **_text(len(seeds), cfg, mask="prompt_attention_mask"),
    )


# -- Sana / Sana-Sprint


def _dc_vae() -> Any:
    from diffusers import AutoencoderDC

    torch.manual_seed(0)
    return AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        encoder_qkv_multiscales=((), (5,)),
        decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=[1, 1],
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    ).eval()


def _sana_transformer(sprint: bool) -> Any:
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(0)
    extra: dict[str, Any] = {"qk_norm": "rms_norm_across_heads", "guidance_embeds": True} if sprint else {}
    return SanaTransformer2DModel(
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=4,
        num_cross_attention_heads=2,
        cross_attention_head_dim=4,
        cross_attention_dim=8,
        caption_channels=TEXT,
        sample_size=8,
        **extra,
    ).eval()


def _build_sana() -> Any:
    from diffusers import SanaPipeline

    pipe = SanaPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=_dc_vae(),
        transformer=_sana_transformer(False),
        scheduler=_flow_scheduler(shift=7.0),
    )
    return _quiet(pipe)


def _call_sana(seeds: Sequence[int], cfg: bool) -> dict[str, Any]:
    # the pipeline insists on sizes divisible by 32: 32 px -> 16x16 latents (this DC-AE downsamples by 2)
    return _common(
        seeds,
        4.5,
        cfg,
        height=32,
        width=32,
        use_resolution_binning=False,
        complex_human_instruction=None,
        negative_prompt=None,  # the default "" would clash with negative_prompt_embeds
        output_type="latent",
        **_text(len(seeds), cfg, mask="prompt_attention_mask"),
    )


def _build_sana_sprint() -> Any:
    from diffusers import SanaSprintPipeline, SCMScheduler

    pipe = SanaSprintPipeline(
        tokenizer=None, text_encoder=None, vae=_dc_vae(), transformer=_sana_transformer(True), scheduler=SCMScheduler()
    )
    return _quiet(pipe)


def _call_sana_sprint(seeds: Sequence[int], cfg: bool) -> dict[str, Any]:
    return _common(
        seeds,
        4.5,
        True,  # guidance_scale here is the distilled guidance embedding, not CFG
        height=32,
        width=32,
        use_resolution_binning=False,
        complex_human_instruction=None,
        output_type="latent",
        **_text(len(seeds), False, mask="prompt_attention_mask"),
    )


# -- HunyuanDiT

HY_T5 = 16


def _build_hunyuandit() -> Any:
    from diffusers import DDPMScheduler, HunyuanDiT2DModel, HunyuanDiTPipeline

    torch.manual_seed(0)
    # 4 layers: blocks 0-1 plain, block 3 takes the long skip from block 0 (skip_linear), a distinct block kind
    transformer = HunyuanDiT2DModel(
        sample_size=8,
        num_layers=4,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        in_channels=4,
        cross_attention_dim=TEXT,
        cross_attention_dim_t5=HY_T5,
        pooled_projection_dim=16,
        hidden_size=16,
        text_len=TOKENS,
        text_len_t5=TOKENS,
        activation_fn="gelu-approximate",
    ).eval()
    # the pipeline sizes its rotary grid as height // 8 // patch_size: the VAE must downsample by 8 (4 levels)
    pipe = HunyuanDiTPipeline(
        vae=vae_kl((4, 4, 4, 4), groups=2),
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
        scheduler=DDPMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        text_encoder_2=None,
        tokenizer_2=None,
    )
    return _quiet(pipe)


def _call_hunyuandit(seeds: Sequence[int], cfg: bool) -> dict[str, Any]:
    n = len(seeds)
    kw = _common(
        seeds,
        5.0,
        cfg,
        height=64,
        width=64,
        use_resolution_binning=False,
        output_type="latent",
        **_text(n, cfg, mask="prompt_attention_mask"),
    )
    kw["prompt_embeds_2"] = _randn(n, TOKENS, HY_T5, seed=111)
    kw["prompt_attention_mask_2"] = _ones_mask(n, TOKENS)
    if cfg:
        kw["negative_prompt_embeds_2"] = _randn(n, TOKENS, HY_T5, seed=112)
        kw["negative_prompt_attention_mask_2"] = _ones_mask(n, TOKENS)
    return kw


# -- AuraFlow


def _build_auraflow() -> Any:
    from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel

    torch.manual_seed(0)
    transformer = AuraFlowTransformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_mmdit_layers=1,
        num_single_dit_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_projection_dim=16,
        joint_attention_dim=TEXT,
        out_channels=4,
        pos_embed_max_size=64,
    ).eval()
    pipe = AuraFlowPipeline(
        tokenizer=None, text_encoder=None, vae=vae_kl(), transformer=transformer, scheduler=_flow_scheduler()
    )
    return _quiet(pipe)


def _call_auraflow(seeds: Sequence[int], cfg: bool) -> dict[str, Any]:
    return _common(
        seeds,
        3.5,
        cfg,
        height=16,
        width=16,
        output_type="latent",
        **_text(len(seeds), cfg, mask="prompt_attention_mask"),
    )


# -- Lumina2


def _build_lumina2() -> Any:
    from diffusers import Lumina2Pipeline, Lumina2Transformer2DModel

    torch.manual_seed(0)
    transformer = Lumina2Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        hidden_size=16,
        num_layers=2,
        num_refiner_layers=1,
        num_attention_heads=2,
        num_kv_heads=2,
        multiple_of=16,
        ffn_dim_multiplier=None,
        norm_eps=1e-5,
        scaling_factor=1.0,
        axes_dim_rope=(4, 2, 2),
        axes_lens=(64, 16, 16),
        cap_feat_dim=TEXT,
    ).eval()
    # the pipeline hard-codes vae_scale_factor = 8: a 4-level VAE to match (it never runs: latent output)
    pipe = Lumina2Pipeline(
        transformer=transformer,
        scheduler=_flow_scheduler(),
        vae=vae_kl((4, 4, 4, 4), groups=2),
        text_encoder=None,
        tokenizer=None,
    )
    return _quiet(pipe)


def _call_lumina2(seeds: Sequence[int], cfg: bool) -> dict[str, Any]:
    return _common(
        seeds,
        4.0,
        cfg,
        height=64,
        width=64,
        output_type="latent",
        **_text(len(seeds), cfg, mask="prompt_attention_mask"),
    )


# -- DiT (class-conditional)


def _build_dit() -> Any:
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        sample_size=8,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        in_channels=4,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
    ).eval()
    return _quiet(DiTPipeline(transformer=transformer, vae=vae_kl(), scheduler=DDIMScheduler()))


def _call_dit(seeds: Sequence[int], cfg: bool) -> dict[str, Any]:
    # DiTPipeline has no latent output: it always decodes with the (tiny) VAE; "pt" returns the tensor
    labels = [(7 * i + 1) % 1000 for i in range(len(seeds))]
    return {
        "class_labels": labels,
        "generator": _gens(seeds),
        "num_inference_steps": 2,
        "guidance_scale": 4.0 if cfg else 1.0,
        "output_type": "pt",
    }


# ===============================================================================================================
# Flux, Flux-Kontext, Chroma, QwenImage (rectified-flow MMDiTs with packed 2x2 latents)

FLUX_SIZE = 16  # pixels; the one-level VAE does not downsample, 2x2 packing -> 8x8 = 64 image tokens


def flux_transformer(guidance_embeds: bool = False, *, seed: int = 0, **overrides: Any) -> Any:
    """A tiny Flux-style MMDiT (double- then single-stream blocks); ``overrides`` replace config entries."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    config: dict[str, Any] = dict(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT,
        pooled_projection_dim=POOLED,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),
    )
    config.update(overrides)
    return FluxTransformer2DModel(**config).eval()


def _flux_components() -> dict[str, Any]:
    return {
        "scheduler": _flow_scheduler(),
        "vae": flow_vae(latent=1),
        "text_encoder": None,
        "tokenizer": None,
        "text_encoder_2": None,
        "tokenizer_2": None,
        "transformer": flux_transformer(guidance_embeds=True),
        "image_encoder": None,
        "feature_extractor": None,
    }


def _build_flux() -> Any:
    from diffusers import FluxPipeline

    return _quiet(FluxPipeline(**_flux_components()))


def _call_flux(seeds: Sequence[int], cfg: bool) -> dict[str, Any]:
    """Flux-dev style: guidance_scale feeds the guidance embedding; ``cfg`` turns on true CFG (true_cfg_scale)."""
    kw = _common(
        seeds,
        3.5,
        True,
        height=FLUX_SIZE,
        width=FLUX_SIZE,
        max_sequence_length=TOKENS,
        output_type="latent",
        **_text(len(seeds), cfg, pooled=POOLED),
    )
    kw["true_cfg_scale"] = 4.0 if cfg else 1.0
    return kw


def _build_flux_kontext() -> Any:
    from diffusers import FluxKontextPipeline

    return _quiet(FluxKontextPipeline(**_flux_components()))


def _call_flux_kontext(seeds: Sequence[int], cfg: bool) -> dict[str, Any]:
    kw = _call_flux(seeds, cfg)
    kw.update(image=_rand(1, 3, FLUX_SIZE, FLUX_SIZE, seed=203), max_area=FLUX_SIZE * FLUX_SIZE, _auto_resize=False)
    return kw


def _build_chroma() -> Any:
    from diffusers import ChromaPipeline, ChromaTransformer2DModel

    torch.manual_seed(0)
    transformer = ChromaTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT,
        axes_dims_rope=(4, 4, 8),
        approximator_hidden_dim=32,
        approximator_layers=1,
        approximator_num_channels=16,
    ).eval()
    pipe = ChromaPipeline(
        scheduler=_flow_scheduler(),
        vae=flow_vae(latent=1),
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
        image_encoder=None,
        feature_extractor=None,
    )
    return _quiet(pipe)


def _call_chroma(seeds: Sequence[int], cfg: bool) -> dict[str, Any]:
    return _common(
        seeds,
        5.0,
        cfg,
        height=FLUX_SIZE,
        width=FLUX_SIZE,
        max_sequence_length=TOKENS,
        output_type="latent",
        **_text(len(seeds), cfg, mask="prompt_attention_mask", mask_dtype=torch.float32),
    )


def _build_qwenimage() -> Any:
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel

    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    ).eval()
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(
        base_dim=24,
        z_dim=4,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    ).eval()
    pipe = QwenImagePipeline(
        scheduler=_flow_scheduler(), vae=vae, text_encoder=None, tokenizer=None, transformer=transformer
    )
    return _quiet(pipe)


def _call_qwenimage(seeds: Sequence[int], cfg: bool) -> dict[str, Any]:
    # 32 px / VAE factor 4 -> 8x8 latents, 2x2 packing -> 16 image tokens
    kw = _common(
        seeds,
        1.0,
        False,
        height=32,
        width=32,
        max_sequence_length=TOKENS,
        output_type="latent",
        **_text(len(seeds), cfg, mask="prompt_embeds_mask"),
    )
    kw["guidance_scale"] = None  # no guidance embedding in this model
    kw["true_cfg_scale"] = 4.0 if cfg else 1.0
    return kw


# ===============================================================================================================
# video transformers: Wan, CogVideoX, LTX, HunyuanVideo, Mochi, Latte, Allegro


def _video_text(n: int, cfg: bool, dim: int = TEXT, *, mask: bool = True, **kw: Any) -> dict[str, Any]:
    return _text(n, cfg, dim, mask="prompt_attention_mask" if mask else "", **kw)


def wan_transformer(seed: int = 0, **overrides: Any) -> Any:
    """A tiny Wan-style video DiT (self- then cross-attention per block); ``overrides`` replace config entries."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    config: dict[str, Any] = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=TEXT,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    config.update(overrides)
    return WanTransformer3DModel(**config).eval()


def _build_wan() -> Any:
    from diffusers import AutoencoderKLWan, WanPipeline

    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()
    transformer = wan_transformer()
    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=vae,
        scheduler=_flow_scheduler(shift=7.0),
        transformer=transformer,
        transformer_2=None,
    )
    return _quiet(pipe)


def _call_wan(seeds: Sequence[int], cfg: bool) -> dict[str, Any]:
    # 5 frames -> 2 latent frames (temporal factor 4); 32 px -> 4x4 latents (spatial factor 8) -> 2x2 patches
    return _common(
        seeds,
        5.0,
        cfg,
        height=32,
        width=32,
        num_frames=5,
        max_sequence_length=TOKENS,
        output_type="latent",
        **_video_text(len(seeds), cfg, mask=False),
    )


def _build_cogvideox() -> Any:
    from diffusers import AutoencoderKLCogVideoX, CogVideoXPipeline, CogVideoXTransformer3DModel, DDIMScheduler

    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        time_embed_dim=2,
        text_embed_dim=TEXT,
        num_layers=2,
        sample_width=4,
        sample_height=4,
        sample_frames=5,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=TOKENS,
    ).eval()
    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    ).eval()
    pipe = CogVideoXPipeline(
        tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=DDIMScheduler()
    )
    return _quiet(pipe)


def _call_cogvideox(seeds: Sequence[int], cfg: bool) -> dict[str, Any]:
    return _common(
        seeds,
        6.0,
        cfg,
        height=32,
        width=32,
        num_frames=5,
        max_sequence_length=TOKENS,
        output_type="latent",
        negative_prompt=None,
        **_video_text(len(seeds), cfg, mask=False),
    )


def _build_ltx() -> Any:
    from diffusers import AutoencoderKLLTXVideo, LTXPipeline, LTXVideoTransformer3DModel

    torch.manual_seed(0)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        num_layers=2,
        caption_channels=TEXT,
    ).eval()
    torch.manual_seed(0)
    vae = AutoencoderKLLTXVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=8,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False, False, False, False, False),
        upsample_residual=(False, False, False, False),
        upsample_factor=(1, 1, 1, 1),
        timestep_conditioning=False,
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    ).eval()
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    pipe = LTXPipeline(scheduler=_flow_scheduler(), vae=vae, text_encoder=None, tokenizer=None, transformer=transformer)
    return _quiet(pipe)


def _call_ltx(seeds: Sequence[int], cfg: bool) -> dict[str, Any]:
    # height must be a multiple of 32; the VAE downsamples by 4 in space and time: 5 frames -> 2 latent frames
    return _common(
        seeds,
        3.0,
        cfg,
        height=32,
        width=32,
        num_frames=5,
        max_sequence_length=TOKENS,
        output_type="latent",
        **_video_text(len(seeds), cfg),
    )


HV_POOLED = 8


def _build_hunyuanvideo() -> Any:
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoPipeline, HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=10,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=1,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=TEXT,
        pooled_projection_dim=HV_POOLED,
        rope_axes_dim=(2, 4, 4),
    ).eval()
    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        act_fn="silu",
        norm_num_groups=4,
        scaling_factor=0.476986,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
        mid_block_add_attention=True,
    ).eval()
    pipe = HunyuanVideoPipeline(
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
        vae=vae,
        scheduler=_flow_scheduler(shift=7.0),
        text_encoder_2=None,
        tokenizer_2=None,
    )
    return _quiet(pipe)


def _call_hunyuanvideo(seeds: Sequence[int], cfg: bool) -> dict[str, Any]:
    """Guidance-distilled (guidance embedding); ``cfg`` turns on true CFG (true_cfg_scale with negatives)."""
    kw = _common(
        seeds,
        6.0,
        True,
        height=32,
        width=32,
        num_frames=5,
        max_sequence_length=TOKENS,
        output_type="latent",
        **_video_text(len(seeds), cfg, pooled=HV_POOLED),
    )
    kw["true_cfg_scale"] = 4.0 if cfg else 1.0
    return kw


def _build_mochi() -> Any:
    from diffusers import AutoencoderKLMochi, MochiPipeline, MochiTransformer3DModel

    torch.manual_seed(0)
    transformer = MochiTransformer3DModel(
        patch_size=2,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        pooled_projection_dim=16,
        in_channels=12,
        out_channels=None,
        qk_norm="rms_norm",
        text_embed_dim=TEXT,
        time_embed_dim=4,
        activation_fn="swiglu",
        max_sequence_length=TOKENS,
    ).eval()
    with torch.no_grad():  # zero-initialised (rotary = identity): give the rotary frequencies values
        transformer.pos_frequencies.normal_(0.0, 0.5)
    torch.manual_seed(0)
    vae = AutoencoderKLMochi(
        latent_channels=12,
        out_channels=3,
        encoder_block_out_channels=(32, 32, 32, 32),  # its group norms have 32 groups
        decoder_block_out_channels=(32, 32, 32, 32),
        layers_per_block=(1, 1, 1, 1, 1),
    ).eval()
    pipe = MochiPipeline(
        scheduler=_flow_scheduler(), vae=vae, text_encoder=None, tokenizer=None, transformer=transformer
    )
    return _quiet(pipe)


def _call_mochi(seeds: Sequence[int], cfg: bool) -> dict[str, Any]:
    # 7 frames -> 2 latent frames (temporal factor 6); 32 px -> 4x4 latents -> 2x2 patches
    return _common(
        seeds,
        4.5,
        cfg,
        height=32,
        width=32,
        num_frames=7,
        max_sequence_length=TOKENS,
        output_type="latent",
        **_video_text(len(seeds), cfg),
    )


LATTE_FRAMES = 2


def _build_latte() -> Any:
    from diffusers import DDIMScheduler, LattePipeline, LatteTransformer3DModel

    torch.manual_seed(0)
    transformer = LatteTransformer3DModel(
        sample_size=8,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_channels=TEXT,
        in_channels=4,
        cross_attention_dim=16,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        video_length=LATTE_FRAMES,
    ).eval()
    pipe = LattePipeline(
        tokenizer=None, text_encoder=None, vae=vae_kl(), transformer=transformer, scheduler=DDIMScheduler()
    )
    return _quiet(pipe)


def _call_latte(seeds: Sequence[int], cfg: bool) -> dict[str, Any]:
    return _common(
        seeds,
        5.0,
        cfg,
        height=16,
        width=16,
        video_length=LATTE_FRAMES,
        clean_caption=False,
        mask_feature=False,
        negative_prompt=None,
        output_type="latent",
        **_video_text(len(seeds), cfg, mask=False),
    )


def _build_allegro() -> Any:
    from diffusers import AllegroPipeline, AllegroTransformer3DModel, AutoencoderKLAllegro, DDIMScheduler

    torch.manual_seed(0)
    transformer = AllegroTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        cross_attention_dim=24,
        sample_width=4,
        sample_height=4,
        sample_frames=8,
        caption_channels=TEXT,
    ).eval()
    torch.manual_seed(0)
    vae = AutoencoderKLAllegro(
        in_channels=3,
        out_channels=3,
        down_block_types=("AllegroDownBlock3D",) * 4,
        up_block_types=("AllegroUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    ).eval()
    pipe = AllegroPipeline(
        tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=DDIMScheduler()
    )
    return _quiet(pipe)


def _call_allegro(seeds: Sequence[int], cfg: bool) -> dict[str, Any]:
    return _common(
        seeds,
        7.5,
        cfg,
        height=32,
        width=32,
        num_frames=8,
        max_sequence_length=TOKENS,
        clean_caption=False,
        negative_prompt=None,
        output_type="latent",
        **_video_text(len(seeds), cfg),
    )


# ===============================================================================================================
# U-Nets with frames folded into the batch: AnimateDiff, Stable Video Diffusion

VIDEO_FRAMES = 2


def _build_animatediff() -> Any:
    from diffusers import AnimateDiffPipeline, DDIMScheduler, MotionAdapter

    torch.manual_seed(0)
    adapter = MotionAdapter(
        block_out_channels=(8, 16),
        motion_layers_per_block=1,
        motion_norm_num_groups=4,
        motion_num_attention_heads=2,
        motion_max_seq_length=32,
    ).eval()
    with torch.no_grad():  # the motion modules' output projections are zero-initialised: give them weights
        for name, param in adapter.named_parameters():
            if "proj_out" in name:
                param.normal_(0.0, 0.3)
    pipe = AnimateDiffPipeline(
        vae=vae_kl(),
        text_encoder=None,
        tokenizer=None,
        unet=sd_unet(
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")
        ),
        motion_adapter=adapter,
        scheduler=DDIMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False, steps_offset=1
        ),
        feature_extractor=None,
        image_encoder=None,
    )
    pipe.unet.eval()
    return _quiet(pipe)


def _call_animatediff(seeds: Sequence[int], cfg: bool) -> dict[str, Any]:
    return _common(
        seeds,
        7.5,
        cfg,
        height=SD_SIZE,
        width=SD_SIZE,
        num_frames=VIDEO_FRAMES,
        output_type="latent",
        **_sd_text(len(seeds), cfg),
    )


SVD_SIZE = 16


def _build_svd() -> Any:
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    unet = UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=8,
        out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=16,
        num_attention_heads=4,
        projection_class_embeddings_input_dim=3 * 8,
        addition_time_embed_dim=8,
    ).eval()
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        interpolation_type="linear",
        num_train_timesteps=1000,
        prediction_type="v_prediction",
        sigma_max=700.0,
        sigma_min=0.002,
        steps_offset=1,
        timestep_spacing="leading",
        timestep_type="continuous",
        use_karras_sigmas=True,
    )
    torch.manual_seed(0)
    vae = AutoencoderKLTemporalDecoder(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        latent_channels=4,
        layers_per_block=1,
    ).eval()
    torch.manual_seed(0)
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=16,
            projection_dim=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=SVD_SIZE,
            intermediate_size=16,
            patch_size=4,
        )
    ).eval()
    feature_extractor = CLIPImageProcessor(crop_size=SVD_SIZE, size=SVD_SIZE)
    pipe = StableVideoDiffusionPipeline(
        vae=vae, image_encoder=image_encoder, unet=unet, scheduler=scheduler, feature_extractor=feature_extractor
    )
    return _quiet(pipe)


def _call_svd(seeds: Sequence[int], cfg: bool) -> dict[str, Any]:
    n = len(seeds)
    # one conditioning image per video (the same image); its batch size sets the pipeline's batch size
    image = _rand(1, 3, SVD_SIZE, SVD_SIZE, seed=204).expand(n, -1, -1, -1).contiguous()
    return {
        "image": image,
        "generator": _gens(seeds),
        "num_inference_steps": 2,
        "num_frames": VIDEO_FRAMES,
        "decode_chunk_size": VIDEO_FRAMES,
        "height": SVD_SIZE,
        "width": SVD_SIZE,
        "min_guidance_scale": 1.0,
        "max_guidance_scale": 2.5 if cfg else 1.0,
        "output_type": "latent",
    }


# ===============================================================================================================
# other U-Nets: Kandinsky 3, DeepFloyd IF, SD x4 upscaler, DDPM, DDIM, consistency model


def _build_kandinsky3() -> Any:
    from diffusers import DDPMScheduler, Kandinsky3Pipeline, Kandinsky3UNet, VQModel

    torch.manual_seed(0)
    unet = Kandinsky3UNet(
        in_channels=4,
        time_embedding_dim=4,
        groups=2,
        attention_head_dim=4,
        layers_per_block=2,
        block_out_channels=(32, 64),
        cross_attention_dim=4,
        encoder_hid_dim=TEXT,
    ).eval()
    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        beta_schedule="squaredcos_cap_v2",
        clip_sample=True,
        thresholding=False,
    )
    torch.manual_seed(0)
    movq = VQModel(  # never runs (latent output); its spatial norms fix 32 groups
        block_out_channels=[32, 64],
        down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
        in_channels=3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        norm_type="spatial",
        num_vq_embeddings=12,
        out_channels=3,
        up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"],
        vq_embed_dim=4,
    ).eval()
    return _quiet(Kandinsky3Pipeline(tokenizer=None, text_encoder=None, unet=unet, scheduler=scheduler, movq=movq))


def _call_kandinsky3(seeds: Sequence[int], cfg: bool) -> dict[str, Any]:
    kw = _common(seeds, 3.0, cfg, height=16, width=16, output_type="latent", **_text(len(seeds), cfg))
    kw["attention_mask"] = _ones_mask(len(seeds), TOKENS)
    if cfg:
        kw["negative_attention_mask"] = _ones_mask(len(seeds), TOKENS)
    return kw


def _build_deepfloyd_if() -> Any:
    from diffusers import DDPMScheduler, IFPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16,
        layers_per_block=1,
        block_out_channels=[16, 32],
        down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
        in_channels=3,
        out_channels=6,
        cross_attention_dim=32,  # cross_attention_norm="group_norm" uses 32 groups over the text channels
        encoder_hid_dim=TEXT,
        attention_head_dim=8,
        addition_embed_type="text",
        addition_embed_type_num_heads=2,
        cross_attention_norm="group_norm",
        resnet_time_scale_shift="scale_shift",
        act_fn="gelu",
        norm_num_groups=8,
    ).eval()
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        beta_start=0.0001,
        beta_end=0.02,
        thresholding=True,
        dynamic_thresholding_ratio=0.95,
        sample_max_value=1.0,
        prediction_type="epsilon",
        variance_type="learned_range",
    )
    pipe = IFPipeline(
        tokenizer=None,
        text_encoder=None,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        watermarker=None,
        requires_safety_checker=False,
    )
    return _quiet(pipe)


def _call_deepfloyd_if(seeds: Sequence[int], cfg: bool) -> dict[str, Any]:
    # pixel space (no VAE, no latent output): "pt" returns the 16x16 images as a tensor
    return _common(
        seeds, 7.0, cfg, height=16, width=16, output_type="pt", clean_caption=False, **_text(len(seeds), cfg)
    )


def _build_sd_x4_upscaler() -> Any:
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=7,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=SD_TEXT,
        attention_head_dim=2,
        use_linear_projection=True,
        num_class_embeds=100,
        norm_num_groups=4,
    ).eval()
    pipe = StableDiffusionUpscalePipeline(
        vae=vae_kl((8, 8, 16), scaling_factor=0.08333),  # the upscaler VAE's scaling factor
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        low_res_scheduler=DDPMScheduler(),
        scheduler=DDIMScheduler(prediction_type="v_prediction"),
        max_noise_level=350,
    )
    return _quiet(pipe)


def _call_sd_x4_upscaler(seeds: Sequence[int], cfg: bool) -> dict[str, Any]:
    n = len(seeds)
    # the low-resolution image (one per prompt, the same image): latents have its size, the VAE upsamples by 4
    image = _rand(1, 3, 8, 8, seed=205).expand(n, -1, -1, -1).contiguous()
    return _common(seeds, 9.0, cfg, image=image, noise_level=20, output_type="latent", **_sd_text(n, cfg))


def uncond_unet(channels: int = 3, sample_size: int = 8, *, seed: int = 0, **overrides: Any) -> Any:
    """A tiny unconditional ``UNet2DModel`` (attention in the second level); ``overrides`` replace config entries."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    config: dict[str, Any] = dict(
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
    )
    config.update(overrides)
    return UNet2DModel(**config).eval()


def _build_ddpm() -> Any:
    from diffusers import DDPMPipeline, DDPMScheduler

    return _quiet(DDPMPipeline(unet=uncond_unet(), scheduler=DDPMScheduler()))


def _build_ddim() -> Any:
    from diffusers import DDIMPipeline, DDIMScheduler

    return _quiet(DDIMPipeline(unet=uncond_unet(), scheduler=DDIMScheduler()))


def _call_uncond(seeds: Sequence[int], cfg: bool) -> dict[str, Any]:
    # unconditional pixel-space pipelines (no latent output): "pt" skips the numpy conversion
    return {"batch_size": len(seeds), "generator": _gens(seeds), "num_inference_steps": 2, "output_type": "pt"}


def _build_consistency_model() -> Any:
    from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline

    scheduler = CMStochasticIterativeScheduler(num_train_timesteps=40, sigma_min=0.002, sigma_max=80.0)
    return _quiet(ConsistencyModelPipeline(unet=uncond_unet(), scheduler=scheduler))


def _call_consistency_model(seeds: Sequence[int], cfg: bool) -> dict[str, Any]:
    # two-step multistep consistency sampling (timesteps [22, 0] as in diffusers' test)
    return {
        "batch_size": len(seeds),
        "generator": _gens(seeds),
        "num_inference_steps": None,
        "timesteps": [22, 0],
        "output_type": "pt",
    }


# ===============================================================================================================
# registry (notes: read from the installed diffusers 0.42 pipeline and model source, and checked at run time)

UNCOND_FIRST = (
    "One denoiser call per step on the concatenated batch [uncond, cond] (latents torch.cat([latents] * 2), "
    "embeddings torch.cat([negative, positive])), no cache_context; noise_pred.chunk(2) -> (uncond, cond)."
)
CLASSIC = "Layers: classic diffusers Attention"

_register(
    "sd15",
    _build_sd15,
    _call_sd15,
    UNET_LAYERS,
    cfg=True,
    denoiser="unet",
    notes=f"""{UNCOND_FIRST} do_classifier_free_guidance is a property (guidance_scale > 1 and
    unet.config.time_cond_proj_dim is None). guidance_rescale > 0 applies rescale_noise_cfg(noise_pred,
    noise_pred_text) right after the CFG combination (text-to-image pipeline only). {CLASSIC} with AttnProcessor2_0
    (attn1 self, attn2 cross); hidden states (2B, H*W, C).""",
)
_register(
    "sd15-img2img",
    _build_sd15_img2img,
    _call_sd15_img2img,
    UNET_LAYERS,
    cfg=True,
    denoiser="unet",
    notes=f"""{UNCOND_FIRST} do_classifier_free_guidance property as sd15; no guidance_rescale in this pipeline.
    The input image is VAE-encoded (per-image generator) and noised to the strength's first timestep;
    num_inference_steps=4 with strength=0.5 -> 2 denoiser steps. {CLASSIC}, AttnProcessor2_0.""",
)
_register(
    "sd15-inpaint",
    _build_sd15_inpaint,
    _call_sd15_inpaint,
    UNET_LAYERS,
    cfg=True,
    denoiser="unet",
    notes=f"""{UNCOND_FIRST} The 9-channel U-Net input is torch.cat([latent_model_input, mask, masked_image_latents],
    dim=1), mask and masked-image latents also duplicated with torch.cat([x] * 2) under CFG. do_classifier_free_guidance
    property; no guidance_rescale. {CLASSIC}, AttnProcessor2_0.""",
)
_register(
    "controlnet-sd",
    _build_controlnet_sd,
    _call_controlnet_sd,
    UNET_LAYERS,
    cfg=True,
    denoiser="unet",
    notes=f"""{UNCOND_FIRST} Before the U-Net, pipe.controlnet runs on the same [uncond, cond] batch (conditioning
    image torch.cat([image] * 2); with guess_mode only on the cond half, zeros for uncond) and its residuals are added
    inside the U-Net (down_block_additional_residuals / mid_block_additional_residual). The ControlNet has attention
    layers of its own (not the denoiser's). do_classifier_free_guidance property; no guidance_rescale. {CLASSIC},
    AttnProcessor2_0.""",
)
_register(
    "sdxl",
    _build_sdxl,
    _call_sdxl,
    UNET_LAYERS,
    cfg=True,
    denoiser="unet",
    notes=f"""{UNCOND_FIRST} added_cond_kwargs text_embeds (pooled) and time_ids are concatenated
    [negative, positive] too. do_classifier_free_guidance property; guidance_rescale > 0 applies rescale_noise_cfg
    after the CFG combination. {CLASSIC}, AttnProcessor2_0; down_blocks.1 has 1 transformer layer, the mid block 2
    (transformer_layers_per_block=(1, 2)).""",
)
_register(
    "controlnet-sdxl",
    _build_controlnet_sdxl,
    _call_controlnet_sdxl,
    UNET_LAYERS,
    cfg=True,
    denoiser="unet",
    notes=f"""{UNCOND_FIRST} As sdxl (pooled/time ids concatenated [negative, positive]) plus pipe.controlnet called
    first on the same [uncond, cond] batch, residuals added in the U-Net. do_classifier_free_guidance property; no
    guidance_rescale. {CLASSIC}, AttnProcessor2_0.""",
)
_register(
    "kolors",
    _build_kolors,
    _call_kolors,
    UNET_LAYERS,
    cfg=True,
    denoiser="unet",
    notes=f"""{UNCOND_FIRST} SDXL-style U-Net (text_time added conditioning concatenated [negative, positive]); the
    ChatGLM text encoder is not needed when all four embeddings are given. KolorsPipeline is imported from
    diffusers.pipelines.kolors.pipeline_kolors (the top-level name is a sentencepiece-gated dummy).
    do_classifier_free_guidance property; no guidance_rescale. {CLASSIC}, AttnProcessor2_0.""",
)

_SD3 = f"""{UNCOND_FIRST} pooled_projections concatenated [negative, positive] too; timestep t.expand(2B).
do_classifier_free_guidance property (guidance_scale > 1); no guidance_rescale. {CLASSIC} with JointAttnProcessor2_0:
transformer_blocks.N.attn gets hidden_states (2B, S_img, C) and encoder_hidden_states (2B, S_txt, C) and attends over
torch.cat([img, txt]) (image tokens first); the last block is context_pre_only (text stream not projected out), a
distinct kind, hence transformer_blocks.1.attn."""
_register("sd3", _build_sd3, _call_sd3, "transformer_blocks.0.attn,transformer_blocks.1.attn", cfg=True, notes=_SD3)
_register(
    "sd35",
    functools.partial(_build_sd3, sd35=True),
    _call_sd3,
    "transformer_blocks.0.attn,transformer_blocks.0.attn2,transformer_blocks.1.attn",
    cfg=True,
    notes=f"""{_SD3} SD3.5 variant: qk_norm="rms_norm" and dual_attention_layers=(0,): block 0 also has attn2, an
    image-only self-attention (called with hidden_states only, JointAttnProcessor2_0).""",
)
_register(
    "sd3-slg",
    _build_sd3,
    functools.partial(_call_sd3, slg=True),
    "transformer_blocks.0.attn,transformer_blocks.1.attn",
    cfg=True,
    notes=f"""{_SD3} Skip-layer guidance (skip_guidance_layers=[0]): where i > N * skip_layer_guidance_start and
    i < N * skip_layer_guidance_stop (strict; here start=0, stop=1, N=2 -> step i=1 only) an EXTRA third call runs
    on the cond half only (batch B, original prompt_embeds, skip_layers=[0]: transformer_blocks.0 is not run at all)
    and noise_pred += (noise_pred_text - noise_pred_skip) * skip_layer_guidance_scale. So step 0: one call (2B);
    step 1: calls (2B) then (B).""",
)
_PIXART = f"""{UNCOND_FIRST} encoder_attention_mask concatenated [negative, positive]; learned sigma:
noise_pred.chunk(2, dim=1)[0] taken after the CFG combination. No do_classifier_free_guidance property (a local
variable guidance_scale > 1); no guidance_rescale. {CLASSIC} with AttnProcessor2_0 (attn1 self over (2B, S, C),
attn2 cross)."""
_register(
    "pixart-alpha",
    functools.partial(_build_pixart, sigma=False),
    _call_pixart,
    "transformer_blocks.0.attn1",
    cfg=True,
    notes=_PIXART,
)
_register(
    "pixart-sigma",
    functools.partial(_build_pixart, sigma=True),
    _call_pixart,
    "transformer_blocks.0.attn1",
    cfg=True,
    notes=_PIXART,
)
_register(
    "sana",
    _build_sana,
    _call_sana,
    "transformer_blocks.0.attn1",
    cfg=True,
    notes=f"""{UNCOND_FIRST} prompt_attention_mask concatenated [negative, positive]. do_classifier_free_guidance
    property (guidance_scale > 1); no guidance_rescale. {CLASSIC}; attn1 (self) uses SanaLinearAttnProcessor2_0, a
    LINEAR (ReLU-kernel) attention with no softmax attention map; attn2 (cross) AttnProcessor2_0. Heights must be
    multiples of 32.""",
)
_register(
    "sana-sprint",
    _build_sana_sprint,
    _call_sana_sprint,
    "transformer_blocks.0.attn1",
    cfg=False,
    notes=f"""No CFG: one call per step on the batch B; guidance_scale feeds the distilled guidance embedding
    (guidance = guidance_scale * transformer.config.guidance_embeds_scale); SCM scheduler with the pipeline's own
    sin/cos timestep transform and input/output rescaling around the call. No do_classifier_free_guidance property.
    {CLASSIC}; attn1 SanaLinearAttnProcessor2_0 (linear attention), qk_norm rms_norm_across_heads.""",
)
_HYDIT = f"""do_classifier_free_guidance property (guidance_scale > 1). With CFG: {UNCOND_FIRST} Both text streams
(prompt_embeds / prompt_embeds_2 with their masks), image_meta_size (add_time_ids) and style are concatenated or
repeated to 2B. Learned sigma: noise_pred.chunk(2, dim=1)[0] BEFORE the CFG combination; guidance_rescale > 0 applies
rescale_noise_cfg after it. image_rotary_emb is a (cos, sin) pair of shape (S_img, head_dim) with NO batch
dimension, broadcast over the batch (the pipeline builds it from height // 8 // patch_size, so the VAE here
downsamples by 8). {CLASSIC} with HunyuanAttnProcessor2_0 (attn1 self + rotary, qk LayerNorm; attn2 cross).
blocks.3 is a long-skip block (skip_linear on torch.cat([x, skip from blocks.0])), a distinct kind."""
_register("hunyuandit", _build_hunyuandit, _call_hunyuandit, "blocks.0.attn1,blocks.3.attn1", cfg=True, notes=_HYDIT)
_register(
    "hunyuandit-g1",
    _build_hunyuandit,
    _call_hunyuandit,
    "blocks.0.attn1,blocks.3.attn1",
    cfg=False,
    notes=f"guidance_scale=1: one call per step on the batch B, no CFG. {_HYDIT}",
)
_register(
    "auraflow",
    _build_auraflow,
    _call_auraflow,
    "joint_transformer_blocks.0.attn,single_transformer_blocks.0.attn",
    cfg=True,
    notes=f"""{UNCOND_FIRST} No do_classifier_free_guidance property (local variable guidance_scale > 1); no
    guidance_rescale. {CLASSIC} with AuraFlowAttnProcessor2_0: joint blocks attend over torch.cat([txt, img]) (text
    first; the text stream includes 8 register tokens); single blocks get the concatenated [txt, img] sequence as
    hidden_states.""",
)
_register(
    "lumina2",
    _build_lumina2,
    _call_lumina2,
    "noise_refiner.0.attn,layers.0.attn",
    cfg=True,
    notes=f"""TWO calls per step with CFG: first cond (batch B, prompt_embeds), then uncond (batch B,
    negative_prompt_embeds), no cache_context; noise = uncond + g * (cond - uncond), then (cfg_normalization=True)
    rescaled to the cond prediction's norm over the last dim; the prediction is negated (Lumina's t runs 0 -> 1).
    cfg_trunc_ratio (default 1.0) drops the uncond call where (i + 1) / N > ratio. do_classifier_free_guidance
    property. {CLASSIC} with Lumina2AttnProcessor2_0; blocks call self.attn(hidden_states=x, encoder_hidden_states=x)
    (the SAME tensor); image_rotary_emb is BATCHED: complex128 (B, S, head_dim/2). noise_refiner: image tokens only;
    layers: the joint sequence, per sample [caption, image, padding]. context_refiner (text tokens only) is left
    out.""",
)
_register(
    "dit",
    _build_dit,
    _call_dit,
    "transformer_blocks.0.attn1",
    cfg=True,
    notes=f"""Class-conditional, ONE call per step on [cond, uncond] (COND FIRST): class_labels
    torch.cat([labels, null=1000]); the latent half is duplicated (torch.cat([half, half])) each step; only the first
    latent_channels (eps) are guided, eps_guided is written to both halves and the scheduler steps the full 2B
    batch; final latents = chunk(2)[0]. Learned sigma split after guidance. No do_classifier_free_guidance property
    (guidance_scale > 1 inline); no guidance_rescale; no latent output (always VAE-decodes). {CLASSIC},
    AttnProcessor2_0, ada_norm_zero blocks (self-attention only).""",
)

_FLUX = """Layers: FluxAttention (AttentionModuleMixin) with FluxAttnProcessor: double-stream transformer_blocks attend
over torch.cat([txt, img]) (TEXT FIRST) with hidden_states (B, S_img, C) and encoder_hidden_states (B, S_txt, C);
single_transformer_blocks get the concatenated [txt, img] sequence as hidden_states. image_rotary_emb is a (cos, sin)
pair of shape (S_txt + S_img, head_dim) with NO batch dimension (built from txt_ids/img_ids, both 2-D). Latents are
packed 2x2 tokens (output_type="latent" returns the packed (B, S, 4 * C) tensor). No do_classifier_free_guidance
property."""
_register(
    "flux",
    _build_flux,
    _call_flux,
    "transformer_blocks.0.attn,single_transformer_blocks.0.attn",
    cfg=False,
    notes=f"""Guidance-distilled (guidance_embeds=True, guidance=guidance_scale embedded); without true CFG ONE call per
    step on the batch B inside transformer.cache_context("cond"). {_FLUX}""",
)
_register(
    "flux-kontext",
    _build_flux_kontext,
    _call_flux_kontext,
    "transformer_blocks.0.attn,single_transformer_blocks.0.attn",
    cfg=False,
    notes=f"""Guidance-distilled, ONE call per step on the batch B, NO cache_context (unlike FluxPipeline). The
    reference image is VAE-encoded and its packed tokens are appended to the noise tokens: hidden_states =
    torch.cat([latents, image_latents], dim=1) (here 64 + 64 image tokens; img_ids of the reference have first
    coordinate 1), and the prediction is sliced noise_pred[:, :S_latents]. true_cfg_scale > 1 with negatives would add
    an uncond call (no cache_context). {_FLUX}""",
)
_register(
    "flux-true-cfg",
    _build_flux,
    _call_flux,
    "transformer_blocks.0.attn,single_transformer_blocks.0.attn",
    cfg=True,
    notes=f"""True CFG (true_cfg_scale > 1 and negative prompt_embeds + negative pooled given): TWO calls per step,
    first cond (batch B) inside transformer.cache_context("cond"), then uncond (batch B, negative embeddings,
    negative_text_ids) inside cache_context("uncond"); noise = neg + true_cfg_scale * (cond - neg). The distilled
    guidance embedding is still fed to both calls. {_FLUX}""",
)
_register(
    "chroma",
    _build_chroma,
    _call_chroma,
    "transformer_blocks.0.attn,single_transformer_blocks.0.attn",
    cfg=True,
    notes="""Real CFG as TWO calls per step, first cond then uncond (batch B each, negative embeddings and
    negative attention mask), NO cache_context; noise = neg + guidance_scale * (cond - neg).
    do_classifier_free_guidance property (guidance_scale > 1). attention_mask (B, 1, S, S) over [txt, img] (from the
    float prompt mask, image tokens always attended). Same attention classes as Flux (FluxAttention /
    FluxAttnProcessor, text first, rotary without batch dimension); no pooled embeddings, no guidance embedding.""",
)
_QWEN = """Layers: classic Attention with QwenDoubleStreamAttnProcessor2_0 (dual-stream: separate img/txt projections,
joint attention over torch.cat([txt, img]), TEXT FIRST); image_rotary_emb is a pair (img_freqs (S_img, head_dim/2),
txt_freqs (S_txt, head_dim/2)) of complex frequencies with NO batch dimension. All-ones prompt masks are turned into
None by the pipeline. Latents packed 2x2 (output (B, S, 4 * C)). No do_classifier_free_guidance property; no
guidance embedding here (guidance_scale=None)."""
_register(
    "qwenimage",
    _build_qwenimage,
    _call_qwenimage,
    "transformer_blocks.0.attn",
    cfg=False,
    notes=f"""true_cfg_scale=1: ONE call per step on the batch B inside transformer.cache_context("cond"). {_QWEN}""",
)
_register(
    "qwenimage-true-cfg",
    _build_qwenimage,
    _call_qwenimage,
    "transformer_blocks.0.attn",
    cfg=True,
    notes=f"""True CFG (true_cfg_scale > 1 with negative_prompt_embeds): TWO calls per step, cond in
    cache_context("cond") then uncond in cache_context("uncond") (batch B each); comb = neg + s * (cond - neg), then
    renormalised: comb * (||cond|| / ||comb||) over the last (channel) dim. {_QWEN}""",
)

_WAN = """Layers: WanAttention (AttentionModuleMixin) with WanAttnProcessor; attn1 (self) is called POSITIONALLY as
attn1(hidden_states, None, None, rotary_emb) with hidden_states (B, S, C) over all frames' tokens (3-D patches, no
frame folding) and rotary_emb a (cos, sin) pair of shape (1, S, 1, head_dim): leading dimension 1, broadcast over
the batch; attn2 is cross-attention to the text. do_classifier_free_guidance property (guidance_scale > 1). With
boundary_ratio/transformer_2 (Wan 2.2) the model switches per step; not used here."""
_register(
    "wan",
    _build_wan,
    _call_wan,
    "blocks.0.attn1",
    cfg=True,
    notes=f"""CFG as TWO calls per step: cond (batch B) inside transformer.cache_context("cond", step_index=i,
    sigma=..., num_inference_steps=N), then uncond (negative_prompt_embeds) inside cache_context("uncond", ...);
    noise = uncond + g * (cond - uncond). {_WAN}""",
)
_register(
    "wan-g1",
    _build_wan,
    _call_wan,
    "blocks.0.attn1",
    cfg=False,
    notes=f"""guidance_scale=1: ONE call per step (batch B) inside cache_context("cond", step_index, sigma,
    num_inference_steps). {_WAN}""",
)
_register(
    "cogvideox",
    _build_cogvideox,
    _call_cogvideox,
    "transformer_blocks.0.attn1",
    cfg=True,
    notes=f"""{UNCOND_FIRST.replace("no cache_context", 'inside transformer.cache_context("cond_uncond")')} No
    do_classifier_free_guidance property (local variable guidance_scale > 1); use_dynamic_cfg (off) would change the
    scale per step; no guidance_rescale. {CLASSIC} with CogVideoXAttnProcessor2_0: attn1 gets hidden_states (2B,
    S_video, C) and the text as encoder_hidden_states and attends over torch.cat([txt, video]) (TEXT FIRST), all frames'
    tokens in one sequence (no frame folding); no rotary in this config (use_rotary_positional_embeddings=False,
    CogVideoX-2b style).""",
)
_register(
    "ltx",
    _build_ltx,
    _call_ltx,
    "transformer_blocks.0.attn1",
    cfg=True,
    notes=f"""{UNCOND_FIRST.replace("no cache_context", 'inside transformer.cache_context("cond_uncond")')}
    do_classifier_free_guidance property; guidance_rescale > 0 applies rescale_noise_cfg after the CFG combination.
    Latents are packed to (B, S, C) tokens (all frames in one sequence). Layers: LTXAttention (AttentionModuleMixin)
    with LTXVideoAttnProcessor; attn1 self with image_rotary_emb a (cos, sin) pair of shape (2B, S, inner_dim) -
    BATCHED, one row per batch row; attn2 cross.""",
)
_register(
    "hunyuanvideo",
    _build_hunyuanvideo,
    _call_hunyuanvideo,
    "transformer_blocks.0.attn,single_transformer_blocks.0.attn",
    cfg=False,
    notes=f"""Guidance-distilled (guidance embedding); ONE call per step (batch B) inside
    transformer.cache_context("cond"); true CFG (true_cfg_scale > 1 with negatives) would add an uncond call in
    cache_context("uncond"). No do_classifier_free_guidance property. {CLASSIC} with HunyuanVideoAttnProcessor2_0:
    both the dual-stream (transformer_blocks) and single-stream blocks pass hidden_states (B, S_video, C) and
    encoder_hidden_states (B, S_txt, C) separately and attend over torch.cat([video, txt]) (VIDEO FIRST) with
    attention_mask (B, 1, 1, S_video + S_txt); image_rotary_emb (cos, sin) of shape (S_video, head_dim), NO batch
    dimension. The text-only token refiner (context_embedder.token_refiner) is left out.""",
)
_register(
    "mochi",
    _build_mochi,
    _call_mochi,
    "transformer_blocks.0.attn1",
    cfg=True,
    notes=f"""{UNCOND_FIRST.replace("no cache_context", 'inside transformer.cache_context("cond_uncond")')}
    do_classifier_free_guidance property; no guidance_rescale. Layers: MochiAttention (its own nn.Module class, not
    AttentionModuleMixin) with MochiAttnProcessor2_0, which LOOPS OVER BATCH ROWS: for each row it attends over
    torch.cat([video, valid text tokens]) (VIDEO FIRST, text masked by prompt_attention_mask (2B, S_txt)); rotary
    (cos, sin) of shape (S_video, heads, head_dim/2), NO batch dimension. (The model's zero-initialised
    pos_frequencies are randomised here so the rotary is not the identity.)""",
)
_register(
    "latte",
    _build_latte,
    _call_latte,
    "transformer_blocks.0.attn1,temporal_transformer_blocks.0.attn1",
    cfg=True,
    notes=f"""{UNCOND_FIRST} A do_classifier_free_guidance property exists but __call__ uses a local variable;
    no guidance_rescale. FRAMES FOLDED: spatial blocks see (2B * F, S, C), rows b-major (row = b * F + f; the
    text is repeat_interleave'd F times), temporal blocks see (2B * S, F, C) (row = b * S + s), so the [uncond, cond]
    halves stay contiguous halves of the folded batch. {CLASSIC} with AttnProcessor2_0 (spatial attn1 self, attn2
    cross; temporal attn1 self over frames).""",
)
_register(
    "allegro",
    _build_allegro,
    _call_allegro,
    "transformer_blocks.0.attn1",
    cfg=True,
    notes=f"""{UNCOND_FIRST} No do_classifier_free_guidance property (local variable); no guidance_rescale.
    {CLASSIC} with AllegroAttnProcessor2_0: attn1 self over all frames' tokens (2B, S, C) with image_rotary_emb a nested
    tuple ((freqs_t, freqs_h, freqs_w) each (cos, sin), (grid_t, grid_h, grid_w) each (1, S)): no batch dimension;
    attn2 cross.""",
)
_register(
    "animatediff",
    _build_animatediff,
    _call_animatediff,
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1,down_blocks.0.motion_modules.0.transformer_blocks.0.attn1,"
    "mid_block.attentions.0.transformer_blocks.0.attn1,mid_block.motion_modules.0.transformer_blocks.0.attn1",
    cfg=True,
    denoiser="unet",
    notes=f"""{UNCOND_FIRST} do_classifier_free_guidance property; no guidance_rescale. Denoiser is a UNetMotionModel
    built by the pipeline from the U-Net and MotionAdapter (motion modules' zero-initialised proj_out randomised here).
    FRAMES FOLDED: latents (2B, C, F, H, W) -> (2B * F, C, H, W) rows b-major, so spatial attn1 sees (2B * F, H*W, C);
    motion modules see (2B * H*W, F, C) (row = b * H*W + s) with 2 frames here. [uncond, cond] halves stay contiguous.
    {CLASSIC}, AttnProcessor2_0 for spatial and motion (temporal) attention.""",
)
_register(
    "svd",
    _build_svd,
    _call_svd,
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1,down_blocks.0.attentions.0.temporal_transformer_blocks.0.attn1,"
    "mid_block.attentions.0.transformer_blocks.0.attn1,mid_block.attentions.0.temporal_transformer_blocks.0.attn1",
    cfg=True,
    denoiser="unet",
    notes=f"""Image-to-video. {UNCOND_FIRST} The uncond half uses ZERO CLIP image embeddings and zero image latents
    (image latents concatenated on the channel dim of (2B, F, C, H, W)). The guidance scale is a per-frame tensor
    torch.linspace(min_guidance_scale, max_guidance_scale, F); do_classifier_free_guidance property is
    guidance_scale.max() > 1 (max_guidance_scale=1 turns CFG off). FRAMES FOLDED: (2B, F, ...) -> (2B * F, ...) rows
    b-major; spatial attn1 (2B * F, H*W, C), temporal attn1 (2B * H*W, F, C). {CLASSIC}, AttnProcessor2_0.""",
)
_register(
    "kandinsky3",
    _build_kandinsky3,
    _call_kandinsky3,
    "down_blocks.1.attentions.0.attention,up_blocks.0.attentions.0.attention",
    cfg=True,
    denoiser="unet",
    notes=f"""{UNCOND_FIRST} Guidance formula (g + 1) * cond - g * uncond. do_classifier_free_guidance property; no
    guidance_rescale. {CLASSIC} with AttnProcessor2_0, but Kandinsky3's SELF-attention modules are built as
    Attention(C, cross_attention_dim=C) (is_cross_attention=True) and called as attention(x, x, mask) with the SAME
    tensor as encoder_hidden_states (hidden states (2B, H*W, C)); there is no mid block, hence a down and an up
    self-attention.""",
)
_register(
    "deepfloyd-if",
    _build_deepfloyd_if,
    _call_deepfloyd_if,
    "down_blocks.1.attentions.0,mid_block.attentions.0",
    cfg=True,
    denoiser="unet",
    notes=f"""Pixel space. {UNCOND_FIRST} Learned variance: eps guided, predicted variance taken from the cond half.
    No do_classifier_free_guidance property (local variable); no guidance_rescale. {CLASSIC} with
    AttnAddedKVProcessor2_0 in SimpleCrossAttn blocks: ONE attention per block mixing self and text - keys/values are
    torch.cat([text (add_k_proj/add_v_proj), image]) (TEXT FIRST); called with 4-D hidden_states (2B, C, H, W) and
    encoder_hidden_states (2B, S_txt, C).""",
)
_register(
    "sd-x4-upscaler",
    _build_sd_x4_upscaler,
    _call_sd_x4_upscaler,
    UNET_LAYERS,
    cfg=True,
    denoiser="unet",
    notes=f"""{UNCOND_FIRST} The noised low-resolution image is concatenated on the channel dim (7 channels) and
    duplicated for CFG; noise_level is passed as class_labels. No do_classifier_free_guidance property (local
    variable); no guidance_rescale. {CLASSIC}, AttnProcessor2_0.""",
)
_UNCOND = f"""Unconditional: ONE call per step on the batch B, no CFG, no do_classifier_free_guidance property.
{CLASSIC} with AttnProcessor2_0 in a UNet2DModel: the AttnDownBlock2D / mid-block Attention modules take 4-D
hidden states (B, C, H, W) (group norm and residual inside the Attention)."""
_register(
    "ddpm",
    _build_ddpm,
    _call_uncond,
    "down_blocks.1.attentions.0,mid_block.attentions.0",
    cfg=False,
    denoiser="unet",
    notes=_UNCOND,
)
_register(
    "ddim",
    _build_ddim,
    _call_uncond,
    "down_blocks.1.attentions.0,mid_block.attentions.0",
    cfg=False,
    denoiser="unet",
    notes=_UNCOND,
)
_register(
    "consistency-model",
    _build_consistency_model,
    _call_consistency_model,
    "down_blocks.1.attentions.0,mid_block.attentions.0",
    cfg=False,
    denoiser="unet",
    notes=f"""{_UNCOND} CMStochasticIterativeScheduler with timesteps=[22, 0] (two steps); the scheduler scales the
    model input (c_in) and mixes the output (c_skip/c_out) around the call.""",
)
