"""apply_pag on StableDiffusionXLControlNetPipeline (single and multi-ControlNet) with an empty-prompt-like
embedding (zeros), the paper's prompt-free ControlNet setting, equals diffusers' StableDiffusionXLControlNetPAGPipeline
(max abs pixel difference 2e-3), without and with CFG.

diffusers' SDXL ControlNet PAG pipeline has no guess mode (its ``__call__`` takes no ``guess_mode`` and passes
``guess_mode=False`` to the ControlNet), so guess mode + CFG is compared to a reference written out here, as
tests/test_pag_dit_sdxl.py does for SD 1.5.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLControlNetPAGPipeline, StableDiffusionXLControlNetPipeline
from diffusers.models.attention_processor import PAGCFGIdentitySelfAttnProcessor2_0

import pagkit
from tiny import POOLED_DIM, TEXT_DIM, sdxl_controlnet_components

TOL = 2e-3
PAG_SCALE = 4.0  # the paper's scale for ControlNet with an empty prompt
STEPS = 3


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.abs(a - b).max())


def _control_images(multi: bool) -> Any:
    images = [torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(s)) for s in (9, 10)]
    return images if multi else images[0]


def _empty(batch: int) -> dict[str, torch.Tensor]:
    """An empty-prompt-like conditioning: zero text and pooled embeddings (also for the negative branch)."""
    zeros, pooled = torch.zeros(batch, 7, TEXT_DIM), torch.zeros(batch, POOLED_DIM)
    return dict(
        prompt_embeds=zeros,
        negative_prompt_embeds=zeros.clone(),
        pooled_prompt_embeds=pooled,
        negative_pooled_prompt_embeds=pooled.clone(),
    )


def _kwargs(multi: bool, batch: int = 2) -> dict[str, Any]:
    return dict(
        **_empty(batch),
        image=_control_images(multi),
        num_inference_steps=STEPS,
        height=32,
        width=32,
        output_type="np",
    )


@pytest.mark.parametrize("multi", [False, True], ids=["controlnet", "multicontrolnet"])
@pytest.mark.parametrize("cfg", [1.0, 4.0], ids=["no-cfg", "cfg"])
def test_sdxl_controlnet_empty_prompt_equals_diffusers_pag_pipeline(multi: bool, cfg: float) -> None:
    ref_pipe = StableDiffusionXLControlNetPAGPipeline(**sdxl_controlnet_components(multi), pag_applied_layers=["mid"])
    ref = ref_pipe(**_kwargs(multi), guidance_scale=cfg, pag_scale=PAG_SCALE, generator=_gen()).images
    pipe = StableDiffusionXLControlNetPipeline(**sdxl_controlnet_components(multi))
    processors = dict(pipe.unet.attn_processors)
    with pagkit.apply_pag(pipe, scale=PAG_SCALE, layers="mid") as handle:
        out = pipe(**_kwargs(multi), guidance_scale=cfg, generator=_gen()).images
    base = pipe(**_kwargs(multi), guidance_scale=cfg, generator=_gen()).images
    assert len(handle.layers) == 2  # the tiny SDXL mid block has two transformer layers
    assert _max_diff(ref, out) <= TOL
    assert _max_diff(base, out) > 1e-3  # PAG changes the images
    assert not handle.active
    assert all(pipe.unet.attn_processors[k] is p for k, p in processors.items())  # restored exactly


@pytest.mark.parametrize("mode", ["batched", "replay"])
def test_sdxl_controlnet_runs_once_on_the_pipelines_own_batch(mode: str) -> None:
    """The perturbed rows reuse the conditional rows' ControlNet residuals: the ControlNet sees the pipeline's
    batch only, and with prefix sharing the perturbed rows start at the mid block (in the same call, or in a
    second call that replays the prefix)."""
    pipe = StableDiffusionXLControlNetPipeline(**sdxl_controlnet_components(False))
    rows: dict[str, list[int]] = {"controlnet": [], "mid": []}

    def record(key: str):  # type: ignore[no-untyped-def]
        return lambda m, a, k: rows[key].append((a[0] if a else k["hidden_states"]).shape[0])

    hooks = [
        pipe.controlnet.register_forward_pre_hook(record("controlnet"), with_kwargs=True),
        pipe.unet.mid_block.register_forward_pre_hook(record("mid"), with_kwargs=True),
    ]
    try:
        with pagkit.apply_pag(pipe, scale=PAG_SCALE, layers="mid", prefix_sharing=mode):
            pipe(**_kwargs(False), guidance_scale=4.0, generator=_gen())
    finally:
        for h in hooks:
            h.remove()
    assert rows["controlnet"] == [4] * STEPS  # [uncond, cond] x 2 images, once per step
    assert rows["mid"] == ([4, 2] * STEPS if mode == "replay" else [6] * STEPS)


def _guess_mode_reference(multi: bool, cfg: float) -> np.ndarray:
    """SDXL ControlNet guess mode + CFG + PAG, written out: the ControlNet runs on the conditional rows only; the
    unconditional rows get zero residuals, the perturbed rows the conditional rows' residuals; diffusers' own
    PAG-CFG processor on the mid block's self-attention and the combine ``eps_u + w (eps_c - eps_u) + s (eps_c -
    eps_ptb)`` (Ahn et al. Eq. 8)."""
    pipe = StableDiffusionXLControlNetPipeline(**sdxl_controlnet_components(multi))
    unet, controlnet, scheduler = pipe.unet, pipe.controlnet, pipe.scheduler
    for name, module in unet.named_modules():
        if name.startswith("mid_block") and name.endswith("attn1"):
            module.set_processor(PAGCFGIdentitySelfAttnProcessor2_0())
    e = _empty(2)
    cond, uncond = e["prompt_embeds"], e["negative_prompt_embeds"]
    pooled, neg_pooled = e["pooled_prompt_embeds"], e["negative_pooled_prompt_embeds"]
    time_ids = pipe._get_add_time_ids(
        (32, 32), (0, 0), (32, 32), dtype=torch.float32, text_encoder_projection_dim=POOLED_DIM
    ).repeat(2, 1)
    prep = dict(width=32, height=32, batch_size=2, num_images_per_prompt=1, device="cpu", dtype=torch.float32)
    raw = _control_images(multi) if multi else [_control_images(multi)]
    images = [pipe.prepare_image(image=i, do_classifier_free_guidance=True, guess_mode=True, **prep) for i in raw]
    control = images if multi else images[0]
    scale = [1.0, 1.0] if multi else 1.0
    generator = _gen()
    scheduler.set_timesteps(STEPS)
    latents = torch.randn((2, 4, 16, 16), generator=generator) * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(latents, t)
            down, mid = controlnet(
                x,
                t,
                encoder_hidden_states=cond,
                controlnet_cond=control,
                conditioning_scale=scale,
                guess_mode=True,
                added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
                return_dict=False,
            )
            eps = unet(
                torch.cat([x] * 3),
                t,
                encoder_hidden_states=torch.cat([uncond, cond, cond]),
                added_cond_kwargs={
                    "text_embeds": torch.cat([neg_pooled, pooled, pooled]),
                    "time_ids": torch.cat([time_ids] * 3),
                },
                down_block_additional_residuals=[torch.cat([torch.zeros_like(d), d, d]) for d in down],
                mid_block_additional_residual=torch.cat([torch.zeros_like(mid), mid, mid]),
            ).sample
            eps_u, eps_c, eps_ptb = eps.chunk(3)
            guided = eps_u + cfg * (eps_c - eps_u) + PAG_SCALE * (eps_c - eps_ptb)
            latents = scheduler.step(guided, t, latents, generator=generator).prev_sample
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(image, output_type="np")


@pytest.mark.parametrize("multi", [False, True], ids=["controlnet", "multicontrolnet"])
def test_sdxl_controlnet_guess_mode_with_cfg(multi: bool) -> None:
    """Guess mode is the case where CFG has something to amplify with an empty prompt (only the conditional rows
    get the control residuals). diffusers' SDXL ControlNet PAG pipeline cannot run it (no ``guess_mode``
    argument), so the reference is :func:`_guess_mode_reference`."""
    pipe = StableDiffusionXLControlNetPipeline(**sdxl_controlnet_components(multi))
    with pagkit.apply_pag(pipe, scale=PAG_SCALE, layers="mid"):
        out = pipe(**_kwargs(multi), guidance_scale=4.0, guess_mode=True, generator=_gen()).images
    base = pipe(**_kwargs(multi), guidance_scale=4.0, guess_mode=True, generator=_gen()).images
    ref = _guess_mode_reference(multi, 4.0)
    assert _max_diff(ref, out) <= TOL
    assert _max_diff(base, out) > 1e-3
    with pytest.raises(TypeError, match="guess_mode"):  # should diffusers add it, compare to theirs instead
        StableDiffusionXLControlNetPAGPipeline(**sdxl_controlnet_components(multi), pag_applied_layers=["mid"])(
            **_kwargs(multi), guidance_scale=4.0, guess_mode=True, pag_scale=PAG_SCALE, generator=_gen()
        )


def test_sdxl_controlnet_guess_mode_without_cfg() -> None:
    """Guess mode without CFG (only changes the ControlNet's residual scaling, which diffusers' PAG pipeline
    never applies): PAG at scale 0 equals the plain guess-mode run bit for bit, and PAG changes it."""
    pipe = StableDiffusionXLControlNetPipeline(**sdxl_controlnet_components(False))
    base = pipe(**_kwargs(False), guidance_scale=1.0, guess_mode=True, generator=_gen()).images
    with pagkit.apply_pag(pipe, scale=0.0, layers="mid"):
        zero = pipe(**_kwargs(False), guidance_scale=1.0, guess_mode=True, generator=_gen()).images
    with pagkit.apply_pag(pipe, scale=PAG_SCALE, layers="mid"):
        guided = pipe(**_kwargs(False), guidance_scale=1.0, guess_mode=True, generator=_gen()).images
    assert np.array_equal(base, zero)
    assert _max_diff(base, guided) > 1e-3
