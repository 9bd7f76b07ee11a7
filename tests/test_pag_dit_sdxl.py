"""apply_pag on SDXL, PixArt, ControlNet and SD3 pipelines equals diffusers' own PAG pipelines (tiny components).

Each comparison runs a plain diffusers pipeline under ``pagkit.apply_pag`` and diffusers' PAG twin on identical
tiny random components, with and without CFG, and asks for the same images (max abs pixel difference 2e-3).
Where diffusers' PAG pipeline is itself wrong, the reference is written out in the test and the difference is
documented in its docstring.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    PixArtSigmaPAGPipeline,
    PixArtSigmaPipeline,
    StableDiffusion3PAGPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionControlNetPAGPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionXLPAGPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.models.attention_processor import PAGCFGIdentitySelfAttnProcessor2_0

import pagkit
from pagkit.attention.ops import make_perturbation
from pagkit.interventions.attention import PerturbationError, perturbed_joint_attention
from pagkit.interventions.rows import BatchLayoutError
from tiny import (
    pixart_components,
    pooled_embeds,
    prompt_embeds,
    sd3_components,
    sd_components,
    sdxl_components,
    tiny_controlnet,
    tiny_sd3_transformer,
    tiny_unet2d_condition,
)

TOL = 2e-3
PAG_SCALE = 2.5


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.abs(a - b).max())


# -- SDXL -------------------------------------------------------------------------------------------------------


def _sdxl_kwargs(batch: int = 2) -> dict[str, Any]:
    return dict(
        prompt_embeds=prompt_embeds(batch, 1),
        negative_prompt_embeds=prompt_embeds(batch, 2),
        pooled_prompt_embeds=pooled_embeds(batch, 3),
        negative_pooled_prompt_embeds=pooled_embeds(batch, 4),
        num_inference_steps=3,
        height=32,
        width=32,
        output_type="np",
    )


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        ("mid", "mid"),
        ("paper:sdxl", "mid"),  # the paper's SDXL choice: every self-attention layer of the mid block
        ("up_blocks.0.attentions.1", "up_blocks.0.attentions.1"),
        ("down_blocks.1.attentions.0.transformer_blocks.1.attn1", "down_blocks.1.attentions.0.transformer_blocks.1"),
    ],
)
@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_sdxl_equals_diffusers_pag_pipeline(ours: str, theirs: str, cfg: float) -> None:
    ref_pipe = StableDiffusionXLPAGPipeline(**sdxl_components(), pag_applied_layers=[theirs])
    ref = ref_pipe(**_sdxl_kwargs(), guidance_scale=cfg, pag_scale=PAG_SCALE, generator=_gen()).images
    pipe = StableDiffusionXLPipeline(**sdxl_components())
    with pagkit.apply_pag(pipe, scale=PAG_SCALE, layers=ours) as handle:
        out = pipe(**_sdxl_kwargs(), guidance_scale=cfg, generator=_gen()).images
    base = pipe(**_sdxl_kwargs(), guidance_scale=cfg, generator=_gen()).images
    if ours.startswith(("mid", "paper")):
        assert len(handle.layers) == 2  # the tiny SDXL mid block has two transformer layers
    assert _max_diff(ref, out) <= TOL
    assert _max_diff(base, out) > 1e-3


def test_sdxl_scale_zero_equals_unguided() -> None:
    pipe = StableDiffusionXLPipeline(**sdxl_components())
    base = pipe(**_sdxl_kwargs(), guidance_scale=4.0, generator=_gen()).images
    with pagkit.apply_pag(pipe, scale=0.0, layers="mid"):
        out = pipe(**_sdxl_kwargs(), guidance_scale=4.0, generator=_gen()).images
    assert np.array_equal(base, out)


# -- PixArt-Sigma -----------------------------------------------------------------------------------------------


def _pixart_kwargs(batch: int = 2) -> dict[str, Any]:
    return dict(
        prompt_embeds=prompt_embeds(batch, 1),
        negative_prompt_embeds=prompt_embeds(batch, 2),
        prompt_attention_mask=torch.ones(batch, 7),
        negative_prompt_attention_mask=torch.ones(batch, 7),
        negative_prompt=None,
        num_inference_steps=3,
        height=32,
        width=32,
        use_resolution_binning=False,
        output_type="np",
    )


@pytest.mark.parametrize("layers", ["blocks.1", "transformer_blocks.1", "transformer_blocks.0.attn1"])
@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_pixart_equals_diffusers_pag_pipeline(layers: str, cfg: float) -> None:
    """PixArt decides CFG in a local variable (no ``do_classifier_free_guidance`` property): read from its call.

    diffusers' selector is a regex search; with two blocks ``blocks.1`` matches exactly one block there too.
    """
    theirs = "blocks.0" if ".0." in layers else "blocks.1"
    ref_pipe = PixArtSigmaPAGPipeline(**pixart_components(), pag_applied_layers=[theirs])
    ref = ref_pipe(**_pixart_kwargs(), guidance_scale=cfg, pag_scale=PAG_SCALE, generator=_gen()).images
    pipe = PixArtSigmaPipeline(**pixart_components())
    with pagkit.apply_pag(pipe, scale=PAG_SCALE, layers=layers) as handle:
        out = pipe(**_pixart_kwargs(), guidance_scale=cfg, generator=_gen()).images
    base = pipe(**_pixart_kwargs(), guidance_scale=cfg, generator=_gen()).images
    assert [layer.name for layer in handle.layers] == [f"transformer_blocks.{theirs[-1]}.attn1"]
    assert _max_diff(ref, out) <= TOL
    assert _max_diff(base, out) > 1e-3


def test_pixart_explicit_cfg_flag_matches_detection() -> None:
    pipe = PixArtSigmaPipeline(**pixart_components())
    with pagkit.apply_pag(pipe, scale=PAG_SCALE, layers="blocks.1"):
        detected = pipe(**_pixart_kwargs(), guidance_scale=4.0, generator=_gen()).images
    with pagkit.apply_pag(pipe, scale=PAG_SCALE, layers="blocks.1", cfg=True):
        explicit = pipe(**_pixart_kwargs(), guidance_scale=4.0, generator=_gen()).images
    assert np.array_equal(detected, explicit)


def test_pipeline_with_unknown_cfg_state_raises() -> None:
    """A pipeline taking ``guidance_scale`` but exposing no CFG decision is refused, not guessed at."""

    class Opaque:
        def __init__(self) -> None:
            self.unet = tiny_unet2d_condition()

        def __call__(self, guidance_scale: float = 4.0) -> torch.Tensor:
            x = torch.randn(1, 4, 8, 8).repeat(2, 1, 1, 1)
            return self.unet(x, 10, encoder_hidden_states=prompt_embeds(2)).sample

    pipe = Opaque()
    with pytest.raises(BatchLayoutError, match="layout="):
        pagkit.apply_pag(pipe, layers="mid")
    assert not any(h for h in pipe.unet._forward_pre_hooks.values())  # nothing left installed
    with pagkit.apply_pag(pipe, layers="mid", cfg=True):
        assert pipe().shape == (2, 4, 8, 8)
    with pagkit.apply_pag(pipe, layers="mid", layout="cond"):
        assert pipe().shape == (2, 4, 8, 8)


# -- ControlNet -------------------------------------------------------------------------------------------------


def _control_images(multi: bool) -> Any:
    images = [torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(s)) for s in (9, 10)]
    return images if multi else images[0]


def _cn_components(multi: bool) -> dict[str, Any]:
    comps = sd_components()
    comps["controlnet"] = [tiny_controlnet(1), tiny_controlnet(2)] if multi else tiny_controlnet(1)
    comps["image_encoder"] = None
    return comps


def _cn_kwargs(multi: bool, batch: int = 2) -> dict[str, Any]:
    return dict(
        prompt_embeds=prompt_embeds(batch, 1),
        negative_prompt_embeds=prompt_embeds(batch, 2),
        image=_control_images(multi),
        num_inference_steps=3,
        height=32,
        width=32,
        output_type="np",
    )


@pytest.mark.parametrize("multi", [False, True], ids=["controlnet", "multicontrolnet"])
@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_controlnet_equals_diffusers_pag_pipeline(multi: bool, cfg: float) -> None:
    ref_pipe = StableDiffusionControlNetPAGPipeline(**_cn_components(multi), pag_applied_layers=["mid"])
    ref = ref_pipe(**_cn_kwargs(multi), guidance_scale=cfg, pag_scale=PAG_SCALE, generator=_gen()).images
    pipe = StableDiffusionControlNetPipeline(**_cn_components(multi))
    with pagkit.apply_pag(pipe, scale=PAG_SCALE, layers="mid"):
        out = pipe(**_cn_kwargs(multi), guidance_scale=cfg, generator=_gen()).images
    base = pipe(**_cn_kwargs(multi), guidance_scale=cfg, generator=_gen()).images
    assert _max_diff(ref, out) <= TOL
    assert _max_diff(base, out) > 1e-3


@pytest.mark.parametrize("prefix_sharing", [True, "replay", False])
def test_controlnet_runs_once_on_the_pipelines_own_batch(prefix_sharing: bool | str) -> None:
    """The perturbed rows reuse the conditional rows' ControlNet residuals: ControlNet never sees them. With
    prefix sharing, the down path does not see them either: the perturbed rows start at the mid block (in the
    same batched call, or in a second call that replays the down path)."""
    pipe = StableDiffusionControlNetPipeline(**_cn_components(False))
    rows: dict[str, list[int]] = {"controlnet": [], "down": [], "mid": []}

    def record(key: str):  # type: ignore[no-untyped-def]
        return lambda m, a, k: rows[key].append((a[0] if a else k["hidden_states"]).shape[0])

    hooks = [
        pipe.controlnet.register_forward_pre_hook(record("controlnet"), with_kwargs=True),
        pipe.unet.down_blocks[0].resnets[0].register_forward_pre_hook(record("down"), with_kwargs=True),
        pipe.unet.mid_block.register_forward_pre_hook(record("mid"), with_kwargs=True),
    ]
    with pagkit.apply_pag(pipe, scale=PAG_SCALE, layers="mid", prefix_sharing=prefix_sharing):
        pipe(**_cn_kwargs(False), guidance_scale=4.0, generator=_gen())
    for h in hooks:
        h.remove()
    assert rows["controlnet"] == [4, 4, 4]  # [uncond, cond] x 2 images, once per step
    if prefix_sharing == "replay":
        assert rows["down"] == [4, 4, 4]  # the down path runs once per step, on the pipeline's rows
        assert rows["mid"] == [4, 2] * 3  # the perturbed call (2 conditional rows) starts at the mid block
    elif prefix_sharing:
        assert rows["down"] == [4, 4, 4]  # the down path computes the pipeline's rows only
        assert rows["mid"] == [6, 6, 6]  # + 2 perturbed rows from the mid block on, in the same call
    else:
        assert rows["down"] == rows["mid"] == [6, 6, 6]  # + 2 perturbed rows in one batch


def _guess_mode_reference(multi: bool, cfg: float, steps: int = 3) -> np.ndarray:
    """PAG + CFG in guess mode, written out: ControlNet on the conditional rows only; the unconditional rows get
    no residuals; the perturbed rows get the conditional rows' residuals; diffusers' own PAG-CFG processor on the
    mid block and diffusers' combine ``eps_u + w (eps_c - eps_u) + s (eps_c - eps_ptb)``."""
    pipe = StableDiffusionControlNetPipeline(**_cn_components(multi))
    unet, controlnet, scheduler = pipe.unet, pipe.controlnet, pipe.scheduler
    for name, module in unet.named_modules():
        if name.startswith("mid_block") and name.endswith("attn1"):
            module.set_processor(PAGCFGIdentitySelfAttnProcessor2_0())
    cond, uncond = prompt_embeds(2, 1), prompt_embeds(2, 2)
    prep = dict(width=32, height=32, batch_size=2, num_images_per_prompt=1, device="cpu", dtype=torch.float32)
    images = [
        pipe.prepare_image(image=i, do_classifier_free_guidance=True, guess_mode=True, **prep)
        for i in (_control_images(multi) if multi else [_control_images(multi)])
    ]
    control = images if multi else images[0]
    scale = [1.0, 1.0] if multi else 1.0
    generator = _gen()
    latents = torch.randn((2, 4, 16, 16), generator=generator) * scheduler.init_noise_sigma
    scheduler.set_timesteps(steps)
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
                return_dict=False,
            )
            eps = unet(
                torch.cat([x] * 3),
                t,
                encoder_hidden_states=torch.cat([uncond, cond, cond]),
                down_block_additional_residuals=[torch.cat([torch.zeros_like(d), d, d]) for d in down],
                mid_block_additional_residual=torch.cat([torch.zeros_like(mid), mid, mid]),
            ).sample
            eps_u, eps_c, eps_ptb = eps.chunk(3)
            guided = eps_u + cfg * (eps_c - eps_u) + PAG_SCALE * (eps_c - eps_ptb)
            latents = scheduler.step(guided, t, latents, eta=0.0, generator=generator).prev_sample
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(image, output_type="np", do_denormalize=[True, True])


@pytest.mark.parametrize("multi", [False, True], ids=["controlnet", "multicontrolnet"])
def test_controlnet_guess_mode_with_cfg(multi: bool) -> None:
    """Guess mode + CFG: diffusers' StableDiffusionControlNetPAGPipeline fails here (it runs ControlNet on all
    three row groups and then prepends zero residuals, giving 6B residual rows for a 3B batch: a size-mismatch
    error; diffusers PR #7944). So the reference is written out in :func:`_guess_mode_reference`."""
    pipe = StableDiffusionControlNetPipeline(**_cn_components(multi))
    with pagkit.apply_pag(pipe, scale=PAG_SCALE, layers="mid"):
        out = pipe(**_cn_kwargs(multi), guidance_scale=4.0, guess_mode=True, generator=_gen()).images
    base = pipe(**_cn_kwargs(multi), guidance_scale=4.0, guess_mode=True, generator=_gen()).images
    ref = _guess_mode_reference(multi, 4.0)
    assert _max_diff(ref, out) <= TOL
    assert _max_diff(base, out) > 1e-3
    try:  # should diffusers fix its pipeline, it must agree too
        theirs = StableDiffusionControlNetPAGPipeline(**_cn_components(multi), pag_applied_layers=["mid"])(
            **_cn_kwargs(multi), guidance_scale=4.0, guess_mode=True, pag_scale=PAG_SCALE, generator=_gen()
        ).images
    except RuntimeError:
        return
    assert _max_diff(theirs, out) <= TOL


# -- SD3 (joint attention) --------------------------------------------------------------------------------------


def _sd3_kwargs(batch: int = 2) -> dict[str, Any]:
    return dict(
        prompt_embeds=prompt_embeds(batch, 1),
        negative_prompt_embeds=prompt_embeds(batch, 2),
        pooled_prompt_embeds=pooled_embeds(batch, 3),
        negative_pooled_prompt_embeds=pooled_embeds(batch, 4),
        num_inference_steps=3,
        height=16,
        width=16,
        output_type="np",
    )


@pytest.mark.parametrize("layers", ["blocks.0", "blocks.1"])  # block 1 is the last one: context_pre_only
@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_sd3_equals_diffusers_pag_pipeline_without_qk_norm(layers: str, cfg: float) -> None:
    """Without qk-norm. diffusers' PAG joint-attention processors skip ``norm_q``/``norm_k`` (and the added
    ones) on every row, so with ``qk_norm="rms_norm"`` (SD3.5) its pipeline computes a different model; pagkit
    applies the norms (checked against a dense-mask reference below)."""
    ref_pipe = StableDiffusion3PAGPipeline(**sd3_components(), pag_applied_layers=[layers])
    ref = ref_pipe(**_sd3_kwargs(), guidance_scale=cfg, pag_scale=PAG_SCALE, generator=_gen()).images
    pipe = StableDiffusion3Pipeline(**sd3_components())
    with pagkit.apply_pag(pipe, scale=PAG_SCALE, layers=layers) as handle:
        out = pipe(**_sd3_kwargs(), guidance_scale=cfg, generator=_gen()).images
    base = pipe(**_sd3_kwargs(), guidance_scale=cfg, generator=_gen()).images
    assert [(layer.name, layer.kind) for layer in handle.layers] == [(f"transformer_blocks.{layers[-1]}.attn", "joint")]
    assert _max_diff(ref, out) <= TOL
    assert _max_diff(base, out) > 1e-3


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"])
def test_sd3_scale_zero_equals_unguided_bit_for_bit(qk_norm: str | None) -> None:
    pipe = StableDiffusion3Pipeline(**sd3_components(qk_norm=qk_norm))
    base = pipe(**_sd3_kwargs(), guidance_scale=4.0, generator=_gen()).images
    with pagkit.apply_pag(pipe, scale=0.0, layers="blocks.1"):
        zero = pipe(**_sd3_kwargs(), guidance_scale=4.0, generator=_gen()).images
    with pagkit.apply_pag(pipe, scale=PAG_SCALE, layers="blocks.1"):
        guided = pipe(**_sd3_kwargs(), guidance_scale=4.0, generator=_gen()).images
    assert np.array_equal(base, zero)
    assert np.isfinite(guided).all() and _max_diff(base, guided) > 1e-3


def _dense_masked_joint(attn: torch.nn.Module, x: torch.Tensor, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PAG on a joint-attention layer with a dense mask over ``[image | text]`` tokens: image queries see the text
    keys and their own image key only; text queries see everything. qk-norms applied as in the model."""
    h = attn.heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (h, -1)).transpose(1, 2)  # [B, N, C] -> [B, H, N, D]

    q, k, v = split(attn.to_q(x)), split(attn.to_k(x)), split(attn.to_v(x))
    tq, tk, tv = split(attn.add_q_proj(ctx)), split(attn.add_k_proj(ctx)), split(attn.add_v_proj(ctx))
    if attn.norm_q is not None:
        q, k = attn.norm_q(q), attn.norm_k(k)
    if attn.norm_added_q is not None:
        tq, tk = attn.norm_added_q(tq), attn.norm_added_k(tk)
    q_all, k_all, v_all = torch.cat([q, tq], 2), torch.cat([k, tk], 2), torch.cat([v, tv], 2)
    n, total = x.shape[1], x.shape[1] + ctx.shape[1]
    allowed = torch.ones(total, total, dtype=torch.bool)
    allowed[:n, :n] = torch.eye(n, dtype=torch.bool)
    logits = (q_all @ k_all.transpose(-1, -2)) / q.shape[-1] ** 0.5
    out = logits.masked_fill(~allowed, float("-inf")).softmax(-1) @ v_all
    out = out.transpose(1, 2).flatten(2)
    img, txt = out[:, :n], out[:, n:]
    img = attn.to_out[1](attn.to_out[0](img))
    if not attn.context_pre_only:
        txt = attn.to_add_out(txt)
    return img, txt


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"])
@pytest.mark.parametrize("block", [0, 1])  # block 1 is context_pre_only (no to_add_out)
def test_perturbed_joint_attention_equals_dense_mask(qk_norm: str | None, block: int) -> None:
    model = tiny_sd3_transformer(qk_norm=qk_norm)
    attn = model.transformer_blocks[block].attn
    if qk_norm is not None:  # give the norms non-trivial weights so that skipping them would show
        with torch.no_grad():
            for norm in (attn.norm_q, attn.norm_k, attn.norm_added_q, attn.norm_added_k):
                norm.weight.uniform_(0.5, 2.0)
    g = torch.Generator().manual_seed(4)
    x, ctx = torch.randn(3, 16, attn.query_dim, generator=g), torch.randn(3, 5, attn.query_dim, generator=g)
    with torch.no_grad():
        img, txt = perturbed_joint_attention(attn, x, ctx, make_perturbation("identity"))
        ref_img, ref_txt = _dense_masked_joint(attn, x, ctx)
    torch.testing.assert_close(img, ref_img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(txt, ref_txt, atol=1e-5, rtol=1e-5)


def test_perturbed_joint_attention_rejects_ablation_ops() -> None:
    attn = tiny_sd3_transformer().transformer_blocks[0].attn
    x = torch.randn(1, 16, attn.query_dim)
    with pytest.raises(PerturbationError, match="identity"):
        perturbed_joint_attention(attn, x, torch.randn(1, 5, attn.query_dim), make_perturbation("soft:0.5"))


def test_sd3_bare_transformer_with_qk_norm_equals_dense_mask_reference() -> None:
    """End to end with qk-norm: guided = eps + s (eps - eps_ptb), eps_ptb from the dense-mask reference layer."""
    model = tiny_sd3_transformer(qk_norm="rms_norm")
    attn = model.transformer_blocks[0].attn
    g = torch.Generator().manual_seed(5)
    inputs = dict(
        hidden_states=torch.randn(2, 4, 8, 8, generator=g),
        encoder_hidden_states=prompt_embeds(2, 6),
        pooled_projections=pooled_embeds(2, 7),
        timestep=torch.tensor([500.0, 500.0]),
    )
    original = attn.processor

    class DenseMasked:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):  # type: ignore[no-untyped-def]
            return _dense_masked_joint(attn, hidden_states, encoder_hidden_states)

    with torch.no_grad():
        eps = model(**inputs).sample
        attn.set_processor(DenseMasked())
        eps_ptb = model(**inputs).sample
        attn.set_processor(original)
        with pagkit.apply_pag(model, scale=1.5, layers="transformer_blocks.0"):
            guided = model(**inputs).sample
    torch.testing.assert_close(guided, eps + 1.5 * (eps - eps_ptb), atol=1e-4, rtol=1e-4)
    assert (eps - eps_ptb).abs().max() > 1e-3
