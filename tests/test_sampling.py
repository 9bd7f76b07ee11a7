"""Our DDIM/DDPM loops equal diffusers' pipelines; the guided denoiser combines terms as the paper says."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDPMPipeline

from pagkit.generate import generate
from pagkit.guidance import CFG, PAG, GuidedDenoiser, Step
from pagkit.interventions.attention import perturbed
from pagkit.models.unet import load_denoiser
from pagkit.sampling import image_generators, make_scheduler, sample
from tiny import tiny_unet2d, write_tiny_denoiser

SCHED = {"num_train_timesteps": 100, "beta_schedule": "squaredcos_cap_v2", "clip_sample": False}


@pytest.mark.parametrize("name,pipeline_cls", [("ddim", DDIMPipeline), ("ddpm", DDPMPipeline)])
def test_loop_equals_diffusers_pipeline(name: str, pipeline_cls: type) -> None:
    unet = tiny_unet2d()
    pipe = pipeline_cls(unet=unet, scheduler=make_scheduler(name, SCHED))
    ref = pipe(batch_size=3, num_inference_steps=7, generator=image_generators(4, 0, 3), output_type="np").images
    ours = sample(
        lambda x, t, s: unet(x, t).sample,
        (3, 1, 16, 16),
        make_scheduler(name, SCHED),
        7,
        image_generators(4, 0, 3),
        progress=False,
    )
    ours_np = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours_np, ref, atol=1e-6)


def test_ddim_clipping_rederives_eps_from_the_clipped_x0() -> None:
    """With clip_sample, our DDIM equals diffusers' DDIMPipeline with use_clipped_model_output=True (ADM's DDIM)
    and differs from diffusers' default, which mixes the clipped x0 with the unclipped eps."""
    sched = {**SCHED, "clip_sample": True}
    unet = tiny_unet2d()
    pipe = DDIMPipeline(unet=unet, scheduler=make_scheduler("ddim", sched))
    kw = dict(batch_size=2, num_inference_steps=6, output_type="np")
    with torch.no_grad():  # large outputs: x0 leaves [-1, 1], so clipping acts
        unet.conv_out.weight.mul_(4.0)
        unet.conv_out.bias.mul_(4.0)
        consistent = pipe(generator=image_generators(1, 0, 2), use_clipped_model_output=True, **kw).images
        mixed = pipe(generator=image_generators(1, 0, 2), **kw).images
        ours = sample(
            lambda x, t, s: unet(x, t).sample,
            (2, 1, 16, 16),
            make_scheduler("ddim", sched),
            6,
            image_generators(1, 0, 2),
            progress=False,
        )
    ours_np = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours_np, consistent, atol=1e-6)
    assert np.abs(ours_np - mixed).max() > 1e-3


def test_image_generators_reject_indices_out_of_range() -> None:
    with pytest.raises(ValueError, match="image indices"):
        image_generators(0, -1, 2)
    with pytest.raises(ValueError, match="image indices"):
        image_generators(0, 2**24 - 1, 2)


def test_seed_gives_same_images_whatever_the_batch_size(tmp_path: Path) -> None:
    model = load_denoiser(write_tiny_denoiser(tmp_path / "d.safetensors"))
    kw = dict(steps=3, seed=11, pag_scale=2.0, model=model, progress=False)
    a, _ = generate(5, batch_size=5, **kw)
    b, _ = generate(5, batch_size=2, **kw)
    c, _ = generate(2, batch_size=2, **kw)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert np.array_equal(b[:2], c)
    d, _ = generate(5, batch_size=5, **{**kw, "seed": 12})
    assert np.abs(a.astype(int) - d.astype(int)).max() > 10


def _perturbed_eps(unet: torch.nn.Module, x: torch.Tensor, t: int, y: torch.Tensor, layers: str) -> torch.Tensor:
    with perturbed(unet, layers, torch.ones(len(x), dtype=torch.bool)):
        return unet(x, t, class_labels=y).sample


def test_guided_denoiser_combines_cfg_and_pag() -> None:
    unet = tiny_unet2d(num_class_embeds=11)
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    y, null = torch.tensor([3, 7]), torch.tensor([10, 10])
    eps_c = unet(x, 5, class_labels=y).sample
    eps_u = unet(x, 5, class_labels=null).sample
    eps_p = _perturbed_eps(unet, x, 5, y, "mid")
    w, s = 2.5, 1.5
    guided = GuidedDenoiser(unet, {"class_labels": y}, {"class_labels": null}, [CFG(w), PAG.make(s, "mid")])
    expected = eps_u + w * (eps_c - eps_u) + s * (eps_c - eps_p)
    torch.testing.assert_close(guided(x, torch.tensor(5), Step()), expected, atol=1e-5, rtol=1e-5)
    only_pag = GuidedDenoiser(unet, {"class_labels": y}, None, [PAG.make(s, "mid")])
    torch.testing.assert_close(only_pag(x, torch.tensor(5), Step()), eps_c + s * (eps_c - eps_p), atol=1e-5, rtol=1e-5)


def test_guided_scale_zero_is_exactly_unguided() -> None:
    unet = tiny_unet2d()
    x = torch.randn(2, 1, 16, 16)
    guided = GuidedDenoiser(unet, {}, None, [PAG.make(0.0, "mid")])
    assert torch.equal(guided(x, torch.tensor(9), Step()), unet(x, 9).sample)


@pytest.mark.parametrize("prefix_sharing", [True, "replay", False])
def test_interval_schedule_skips_perturbed_rows(prefix_sharing: bool | str) -> None:
    unet = tiny_unet2d()
    batches: list[int] = []
    down: list[int] = []
    unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    unet.down_blocks[0].resnets[0].register_forward_pre_hook(lambda m, args: down.append(args[0].shape[0]))
    terms = [PAG.make(2.0, "mid", schedule="interval:0:0.5")]
    guided = GuidedDenoiser(unet, {}, None, terms, prefix_sharing=prefix_sharing)
    sample(guided, (2, 1, 16, 16), make_scheduler("ddim", SCHED), 5, image_generators(0, 0, 2), progress=False)
    # fractions 0, .25, .5 guided; .75, 1 unguided (one call of 2 rows)
    if prefix_sharing == "replay":  # a second call of the 2 conditional rows, from the mid block on
        assert batches == [2, 2, 2, 2, 2, 2, 2, 2]
    else:  # the perturbed rows appended to the batch
        assert batches == [4, 4, 4, 2, 2]
    if prefix_sharing is True:  # ... but not computed before the mid block
        assert down == [2, 2, 2, 2, 2]


def test_guided_prefix_sharing_and_reuse_delta() -> None:
    unet = tiny_unet2d(num_class_embeds=11)
    y, null = torch.tensor([3, 7]), torch.tensor([10, 10])
    terms = [CFG(2.0), PAG.make(1.5, "mid")]

    def run(**kw: object) -> torch.Tensor:
        guided = GuidedDenoiser(unet, {"class_labels": y}, {"class_labels": null}, terms, **kw)  # type: ignore[arg-type]
        return sample(
            guided, (2, 1, 16, 16), make_scheduler("ddim", SCHED), 4, image_generators(0, 0, 2), progress=False
        )

    shared, batched, cached = run(), run(prefix_sharing=False), run(reuse_delta=2)
    torch.testing.assert_close(shared, batched, atol=1e-5, rtol=1e-5)
    unguided = sample(
        GuidedDenoiser(unet, {"class_labels": y}, {"class_labels": null}, [CFG(2.0)]),
        (2, 1, 16, 16),
        make_scheduler("ddim", SCHED),
        4,
        image_generators(0, 0, 2),
        progress=False,
    )
    assert 0 < (cached - shared).abs().max() < (unguided - shared).abs().max()


def test_bf16_autocast_keeps_fp32_outputs_and_stays_close() -> None:
    unet = tiny_unet2d(num_class_embeds=11)
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    y, null = torch.tensor([3, 7]), torch.tensor([10, 10])
    terms = [CFG(2.0), PAG.make(1.5, "mid")]
    full = GuidedDenoiser(unet, {"class_labels": y}, {"class_labels": null}, terms)(x, torch.tensor(5))
    half = GuidedDenoiser(unet, {"class_labels": y}, {"class_labels": null}, terms, autocast=torch.bfloat16)
    out = half(x, torch.tensor(5))
    assert out.dtype == torch.float32
    assert not torch.equal(out, full)  # autocast really ran in bf16
    assert (out - full).abs().max() < 0.05 * full.abs().max()
    assert next(unet.parameters()).dtype == torch.float32


def test_unknown_precision_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        generate(1, steps=1, precision="fp8", weights=tmp_path / "missing.safetensors", progress=False)


def test_cfg_without_uncond_rejected() -> None:
    with pytest.raises(ValueError, match="uncond"):
        GuidedDenoiser(tiny_unet2d(), {}, None, [CFG(3.0)])


def test_bad_sampler_and_steps() -> None:
    with pytest.raises(ValueError, match="unknown sampler"):
        make_scheduler("euler", SCHED)
    with pytest.raises(ValueError, match="steps"):
        sample(lambda x, t, s: x, (1, 1, 4, 4), make_scheduler("ddim", SCHED), 0, image_generators(0, 0, 1))
