"""Prefix sharing: the replayed or deduplicated prefix gives the full perturbed computation, computing less."""

from __future__ import annotations

import pytest
import torch

from pagkit.attention.ops import Identity
from pagkit.batch import append_rows, map_rows
from pagkit.interventions.attention import perturbed
from pagkit.layers import select_layers
from pagkit.prefix import PrefixCache, PrefixDedup
from tiny import prompt_embeds, tiny_unet2d, tiny_unet2d_condition


def _perturbed_call(model, layers, args, kwargs, n):  # type: ignore[no-untyped-def]
    with perturbed(model, [layer.name for layer in layers], torch.ones(n, dtype=torch.bool), Identity()):
        return model(*args, **kwargs).sample


@pytest.mark.parametrize("spec", ["mid", "down_blocks.1", "up_blocks.0.attentions.1", "down_blocks.0,up_blocks.1"])
def test_sd_unet_prefix_replay_equals_full(spec: str) -> None:
    unet = tiny_unet2d_condition()
    layers = select_layers(unet, spec)
    b = 4
    x = torch.randn(b, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    emb = prompt_embeds(b)
    t = torch.tensor([10, 10, 10, 10])
    rows = torch.tensor([2, 3])
    cache = PrefixCache(unet, [layer.module for layer in layers])
    cache.install()
    with torch.no_grad():
        with cache.record(b, rows):
            main = unet(x, t, encoder_hidden_states=emb).sample
        args = map_rows((x, t), b, lambda v: v[rows])
        kwargs = {"encoder_hidden_states": emb[rows]}
        calls: list[str] = []
        hooks = [m.register_forward_hook(lambda mod, a, o, n=n: calls.append(n)) for n, m in unet.named_modules()]
        with cache.replay():
            shared = cache.shared_units()
            fast = _perturbed_call(unet, layers, args, kwargs, len(rows))
        for h in hooks:
            h.remove()
        cache.remove()
        full = _perturbed_call(unet, layers, args, kwargs, len(rows))
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)
    assert torch.equal(main, unet(x, t, encoder_hidden_states=emb).sample)
    if spec == "mid":
        assert "down_blocks.0" in shared and "down_blocks.1" in shared and "time_embedding" in shared
        assert not any(c.startswith("down_blocks.") and "." in c[len("down_blocks.") + 1 :] for c in calls)
    if spec.startswith("up_blocks.0"):  # shared down to the resnet before the perturbed attention
        assert "up_blocks.0.resnets.1" in shared and "mid_block" in shared
    assert not any(name.startswith("up_blocks.1") for name in shared)


def test_unet2d_prefix_replay_equals_full() -> None:
    unet = tiny_unet2d(num_class_embeds=11)
    layers = select_layers(unet, "mid")
    x = torch.randn(3, 1, 16, 16)
    y = torch.tensor([1, 2, 10])
    rows = torch.tensor([0, 1])
    cache = PrefixCache(unet, [layer.module for layer in layers])
    cache.install()
    with torch.no_grad(), cache.record(3, rows):
        unet(x, 5, class_labels=y)
    with torch.no_grad(), cache.replay():
        fast = _perturbed_call(unet, layers, (x[rows], 5), {"class_labels": y[rows]}, 2)
    cache.remove()
    with torch.no_grad():
        full = _perturbed_call(unet, layers, (x[rows], 5), {"class_labels": y[rows]}, 2)
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)
    assert not any("forward" in vars(m) for m in unet.modules())


@pytest.mark.parametrize("spec", ["mid", "down_blocks.1", "up_blocks.0.attentions.1", "down_blocks.0,up_blocks.1"])
def test_sd_unet_prefix_dedup_equals_full(spec: str) -> None:
    """One batched call [main | perturbed copies]: the prefix runs on the main rows only, the rest on all rows,
    and the result equals computing every row throughout."""
    unet = tiny_unet2d_condition()
    layers = select_layers(unet, spec)
    b, rows = 4, torch.tensor([2, 3])
    x = torch.randn(b, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    emb = prompt_embeds(b)
    args = append_rows((x, torch.tensor([10] * b)), b, rows)
    kwargs = append_rows({"encoder_hidden_states": emb}, b, rows)
    perturbed_rows = torch.tensor([False] * b + [True] * len(rows))
    dedup = PrefixDedup(unet, [layer.module for layer in layers])
    seen: dict[str, list[int]] = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, a, k, n=n: seen.setdefault(n, []).append(_rows(a, k)), with_kwargs=True)
        for n, m in unet.named_modules()
        if n in ("down_blocks.0.resnets.0", "mid_block.resnets.0.norm1", "up_blocks.1.resnets.0")
    ]
    with torch.no_grad(), perturbed(unet, [layer.name for layer in layers], perturbed_rows, Identity()):
        full = unet(*args, **kwargs).sample
        seen.clear()
        dedup.install()
        with dedup.dedup(b, rows):
            fast = unet(*args, **kwargs).sample
        counts = {name: list(v) for name, v in seen.items()}
        dedup.remove()
        again = unet(*args, **kwargs).sample
    for h in hooks:
        h.remove()
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)
    assert torch.equal(again, full)  # removed: passive, nothing left behind
    assert "time_embedding" in dedup.deduplicated  # runs before any attention layer
    if spec == "mid":
        assert counts == {
            "down_blocks.0.resnets.0": [4],
            "mid_block.resnets.0.norm1": [4],
            "up_blocks.1.resnets.0": [6],
        }
        assert "down_blocks.1" in dedup.deduplicated and "up_blocks.0" not in dedup.deduplicated


def _rows(args: tuple, kwargs: dict) -> int:  # type: ignore[type-arg]
    return (args[0] if args else kwargs["hidden_states"]).shape[0]


def _latents(pipe, kwargs, prefix: bool | str, layers: str, cfg: float, **extra):  # type: ignore[no-untyped-def]
    import pagkit

    with pagkit.apply_pag(pipe, scale=2.0, layers=layers, prefix_sharing=prefix):
        out = pipe(
            **kwargs, guidance_scale=cfg, output_type="latent", generator=torch.Generator().manual_seed(0), **extra
        )
    return out.images


@pytest.mark.parametrize("mode", ["batched", "replay"])
@pytest.mark.parametrize("cfg", [1.0, 4.0])
@pytest.mark.parametrize(
    "kind,layers",
    [
        ("sd", "mid"),
        ("sd", "up_blocks.0.attentions.1"),
        ("sdxl", "mid"),
        ("pixart", "blocks.1"),
        ("controlnet", "mid"),
        ("sd3", "blocks.1"),
    ],
)
def test_prefix_sharing_equals_batched_pipeline(kind: str, layers: str, cfg: float, mode: str) -> None:
    """Inside unmodified diffusers pipelines, prefix sharing (both layouts) gives the unshared batched result: per
    model call within 1e-5 (the bare-model tests); over 3 sampler steps on latents of scale up to ~14 (Euler),
    within 1e-4."""
    from diffusers import (
        PixArtSigmaPipeline,
        StableDiffusion3Pipeline,
        StableDiffusionControlNetPipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    from test_pag_dit_sdxl import _cn_components, _cn_kwargs, _pixart_kwargs, _sd3_kwargs, _sdxl_kwargs
    from tiny import pixart_components, sd3_components, sd_components, sdxl_components

    sd_kwargs = dict(
        prompt_embeds=prompt_embeds(2, 1),
        negative_prompt_embeds=prompt_embeds(2, 2),
        num_inference_steps=3,
        height=32,
        width=32,
    )
    pipe, kwargs = {
        "sd": lambda: (StableDiffusionPipeline(**sd_components()), sd_kwargs),
        "sdxl": lambda: (StableDiffusionXLPipeline(**sdxl_components()), _sdxl_kwargs()),
        "pixart": lambda: (PixArtSigmaPipeline(**pixart_components()), _pixart_kwargs()),
        "controlnet": lambda: (StableDiffusionControlNetPipeline(**_cn_components(False)), _cn_kwargs(False)),
        "sd3": lambda: (StableDiffusion3Pipeline(**sd3_components()), _sd3_kwargs()),
    }[kind]()
    kwargs = {k: v for k, v in kwargs.items() if k != "output_type"}
    shared = _latents(pipe, kwargs, mode, layers, cfg)
    batched = _latents(pipe, kwargs, False, layers, cfg)
    torch.testing.assert_close(shared, batched, atol=1e-4, rtol=1e-5)


def test_reuse_delta_skips_perturbed_steps_and_reuses_the_delta() -> None:
    """reuse_delta=2: perturbed branch at steps 0, 2; steps 1, 3 add the stored delta times the current weight."""
    import numpy as np
    from diffusers import DDIMPipeline, DDIMScheduler

    import pagkit
    from pagkit.interventions import attention as attention_module

    calls: list[int] = []
    original = attention_module.perturbed_self_attention

    def counting(attn, hidden_states, *a, **k):  # type: ignore[no-untyped-def]
        calls.append(hidden_states.shape[0])
        return original(attn, hidden_states, *a, **k)

    attention_module.perturbed_self_attention = counting  # type: ignore[assignment]
    try:
        pipe = DDIMPipeline(unet=tiny_unet2d(), scheduler=DDIMScheduler(num_train_timesteps=100))
        kw = dict(batch_size=2, num_inference_steps=4, output_type="np")
        with pagkit.apply_pag(pipe, scale=2.0, reuse_delta=2):
            cached = pipe(generator=torch.Generator().manual_seed(0), **kw).images
        assert len(calls) == 2
        with pagkit.apply_pag(pipe, scale=2.0):
            full = pipe(generator=torch.Generator().manual_seed(0), **kw).images
        assert len(calls) == 6
    finally:
        attention_module.perturbed_self_attention = original  # type: ignore[assignment]
    base = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert 0 < np.abs(cached - full).max() < np.abs(base - full).max()
    with pytest.raises(ValueError, match="reuse_delta"):
        pagkit.apply_pag(tiny_unet2d(), reuse_delta=0)


def test_delta_cache_never_reuses_across_runs() -> None:
    from pagkit.guidance.delta import DeltaCache
    from pagkit.guidance.schedules import Step

    cache = DeltaCache(2)
    d = torch.ones(2, 1)
    assert cache.get(Step(index=1), 2) is None  # nothing stored yet
    cache.put(Step(index=6), d)
    assert cache.get(Step(index=7), 2) is d
    assert cache.get(Step(index=7), 3) is None  # another batch size
    assert cache.get(Step(index=8), 2) is None  # a recomputation step
    assert cache.get(Step(index=3), 2) is None  # another run (img2img starting at an odd step)
    assert DeltaCache(1).get(Step(index=1), 2) is None
    with pytest.raises(ValueError, match="reuse_delta"):
        DeltaCache(0)


def test_batched_layout_leaves_the_encoder_states_uncopied() -> None:
    """The pipeline's text embeddings reach the U-Net with the pipeline's rows (no copy for the perturbed rows
    lives through the call); cross-attention completes them where the perturbed rows run, and the result equals
    the unshared batched layout (test_prefix_sharing_equals_batched_pipeline)."""
    from diffusers import StableDiffusionPipeline

    import pagkit
    from tiny import sd_components

    pipe = StableDiffusionPipeline(**sd_components())
    kwargs = dict(prompt_embeds=prompt_embeds(2, 1), negative_prompt_embeds=prompt_embeds(2, 2), num_inference_steps=3)
    seen: list[tuple[int, int]] = []
    with pagkit.apply_pag(pipe, scale=2.0, layers="mid"):
        hook = pipe.unet.register_forward_pre_hook(
            lambda m, a, k: seen.append((a[0].shape[0], k["encoder_hidden_states"].shape[0])), with_kwargs=True
        )
        pipe(**kwargs, height=32, width=32, guidance_scale=4.0, output_type="latent")
        hook.remove()
    assert seen == [(6, 4)] * 3  # [uncond, cond] x 2 images + 2 perturbed rows; embeddings: the pipeline's 4
    assert not any(
        type(m.processor).__name__ == "RowCompletingProcessor" for m in pipe.unet.modules() if hasattr(m, "processor")
    )


@pytest.mark.parametrize("mode", [True, "replay"])
def test_dit_with_size_conditions_and_a_batch_size_argument(mode: bool | str) -> None:
    """PixArt-Alpha-style resolution/aspect-ratio conditions, embedded with an explicit ``batch_size=`` argument,
    give the unshared result in both layouts."""
    import pagkit
    from tiny import TEXT_DIM, tiny_pixart

    model = tiny_pixart(num_attention_heads=3, cross_attention_dim=24, use_additional_conditions=True)
    x, emb = torch.randn(2, 4, 8, 8), torch.randn(2, 5, TEXT_DIM)
    cond = {"resolution": torch.tensor([[64.0, 64.0]] * 2), "aspect_ratio": torch.tensor([[1.0]] * 2)}
    out = {}
    for sharing in (mode, False):
        with torch.no_grad(), pagkit.apply_pag(model, scale=2.0, layers="blocks.1", prefix_sharing=sharing):
            out[sharing] = model(x, encoder_hidden_states=emb, timestep=torch.tensor([10, 10]), added_cond_kwargs=cond)
    torch.testing.assert_close(out[mode].sample, out[False].sample, atol=1e-5, rtol=1e-5)


def test_only_known_models_get_uncopied_encoder_states() -> None:
    from pagkit.integrations.diffusers import lazy_keys
    from tiny import tiny_pixart

    assert lazy_keys(tiny_unet2d_condition()) == ("encoder_hidden_states",)
    assert lazy_keys(tiny_pixart()) == ("encoder_hidden_states",)
    assert lazy_keys(tiny_unet2d()) == ()  # any other model: every input copied (always correct)
