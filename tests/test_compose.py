"""pagkit composes with what users stack on a pipeline: LoRA (peft), an IP-Adapter, diffusers' hook-based caches,
layer casting and a compiled denoiser; it never removes another library's hooks or instance forward."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch

import pagkit
from pagkit.testing import checks, families


def _hooks(model: torch.nn.Module) -> dict[str, Any]:
    return {
        n: (
            dict(m._forward_pre_hooks),
            dict(m._forward_hooks),
            m.__dict__.get("forward"),
            m.__dict__.get("_diffusers_hook"),
        )
        for n, m in model.named_modules()
    }


def test_peft_lora_adapter() -> None:
    from peft import LoraConfig

    fam = families.get("sd15")
    pipe = fam.build()
    unet = pipe.unet
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for name, p in unet.named_parameters():  # peft initialises lora_B to 0: give the adapter an effect
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5, generator=torch.Generator().manual_seed(0))
    before = _hooks(unet)
    checks.check_runs_changes_scale0(pipe, fam)
    checks.check_eq8(pipe, fam)  # the perturbed branch's V goes through the LoRA-adapted to_v
    unet.disable_adapters()
    without = checks.run(pipe, fam)
    unet.enable_adapters()
    assert abs(without - checks.run(pipe, fam)).max() > 1e-4  # the adapter is live
    assert _hooks(unet).keys() == before.keys()


@pytest.mark.parametrize("prefix", [True, "replay", False])
def test_diffusers_first_block_cache_hooks_survive(prefix: bool | str) -> None:
    from diffusers.hooks import FirstBlockCacheConfig

    fam = families.get("flux")
    pipe = fam.build()
    model = pipe.transformer
    model.enable_cache(FirstBlockCacheConfig(threshold=0.0))  # threshold 0: nothing is skipped, hooks run
    plain = checks.run(pipe, fam)
    before = _hooks(model)
    # a late layer: the cached blocks (instance forwards installed by diffusers) lie in the shared prefix
    with pagkit.apply_pag(pipe, scale=2.0, layers="single_transformer_blocks.0.attn", prefix_sharing=prefix):
        guided = checks.run(pipe, fam)
    assert abs(guided - plain).max() > 1e-6
    after = _hooks(model)
    assert after == before, "a diffusers hook or instance forward was removed or replaced"
    torch.testing.assert_close(torch.as_tensor(checks.run(pipe, fam)), torch.as_tensor(plain))
    model.disable_cache()


def test_layerwise_casting_hooks_survive() -> None:
    fam = families.get("wan")
    pipe = fam.build()
    model = pipe.transformer
    model.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    plain = checks.run(pipe, fam)  # (the pipeline's own cache_context gives the model a hook registry)
    before = _hooks(model)
    with pagkit.apply_pag(pipe, scale=2.0, layers=fam.layers):
        guided = checks.run(pipe, fam)
    assert abs(guided - plain).max() > 1e-6
    assert _hooks(model) == before


def test_compiled_denoiser_is_a_clear_error() -> None:
    fam = families.get("sd15")
    pipe = fam.build()
    pipe.unet = torch.compile(pipe.unet)
    with pytest.raises(TypeError, match=r"compile\(\)"):
        pagkit.apply_pag(pipe, scale=2.0, layers=fam.layers)
    with pytest.raises(TypeError, match=r"torch\.compile"):
        pagkit.apply_pag(pipe.unet, scale=2.0, layers=fam.layers)


def test_pagkit_twice_on_one_model_is_a_clear_error() -> None:
    fam = families.get("sd15")
    pipe = fam.build()
    with pagkit.apply_pag(pipe, layers=fam.layers), pytest.raises(RuntimeError, match="already applied"):
        pagkit.apply_pag(pipe, layers=fam.layers)
    with pagkit.apply_pag(pipe, layers=fam.layers):  # the first handle left nothing behind
        checks.run(pipe, fam)


# -- IP-Adapter: the U-Net gets added_cond_kwargs={"image_embeds": [tensor [rows, images, D]]}, attn2 holds
# IPAdapterAttnProcessor2_0 while PAG perturbs attn1 ---------------------------------------------------------------
IP_IMAGE_DIM = 12  # the image encoder's embedding width (unlike the text width, so a mix-up cannot pass)


def _load_random_ip_adapter(unet: Any, seed: int = 7) -> None:
    """A random IP-Adapter in the original checkpoint layout ("image_proj": the projection to 4 tokens, "ip_adapter":
    to_k_ip/to_v_ip per cross-attention layer, numbered 1, 3, 5, ... in attn_processors order), loaded offline."""
    g = torch.Generator().manual_seed(seed)
    cross, tokens = unet.config.cross_attention_dim, 4
    layers: dict[str, torch.Tensor] = {}
    key = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        width = unet.get_submodule(name.rsplit(".", 1)[0]).to_k.out_features
        for proj in ("to_k_ip", "to_v_ip"):
            layers[f"{key}.{proj}.weight"] = 0.3 * torch.randn(width, cross, generator=g)
        key += 2
    image_proj = {
        "proj.weight": 0.3 * torch.randn(tokens * cross, IP_IMAGE_DIM, generator=g),
        "proj.bias": 0.1 * torch.randn(tokens * cross, generator=g),
        "norm.weight": 1.0 + 0.1 * torch.randn(cross, generator=g),
        "norm.bias": 0.1 * torch.randn(cross, generator=g),
    }
    unet._load_ip_adapter_weights([{"image_proj": image_proj, "ip_adapter": layers}])


def _ip_adapter_sd15() -> tuple[Any, families.Family]:
    """The tiny SD pipeline with a random IP-Adapter, and its family whose call passes image embeddings as the
    pipeline documents under CFG: per adapter [negative; positive] of shape [2, images, D] (the pipeline repeats
    each per image, so the U-Net gets [2B, images, D]: negative rows, then positive ones)."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    fam = families.get("sd15")
    pipe = fam.build()
    _load_random_ip_adapter(pipe.unet)
    procs = pipe.unet.attn_processors
    assert sum(isinstance(p, IPAdapterAttnProcessor2_0) for p in procs.values()) == len(procs) // 2
    embeds = torch.randn(2, 1, IP_IMAGE_DIM, generator=torch.Generator().manual_seed(9))

    def call(seeds: Any) -> dict[str, Any]:
        return {**fam.call(seeds), "ip_adapter_image_embeds": [embeds]}

    return pipe, dataclasses.replace(fam, call=call)


def test_ip_adapter_runs_changes_scale0_restored() -> None:
    pipe, fam = _ip_adapter_sd15()
    unet = pipe.unet
    plain = checks.run(pipe, fam)
    without = checks.run(families.get("sd15").build(), families.get("sd15"))  # same weights, no IP-Adapter
    assert np.abs(plain - without).max() > 1e-3  # the adapter is live
    before, hooks = checks.snapshot(unet), _hooks(unet)
    checks.check_runs_changes_scale0(pipe, fam)
    checks.check_restored(pipe, fam)  # the IP-Adapter processors and their weights come back, also after a raise
    checks.assert_same_snapshot(before, checks.snapshot(unet))
    assert _hooks(unet) == hooks
    assert np.array_equal(checks.run(pipe, fam), plain)


def test_ip_adapter_eq8_every_call() -> None:
    """Every denoiser call: the guided rows equal s (eps_c - eps_perturbed) with eps_perturbed from the independent
    reference (identity attention on attn1, run on the pipeline's own inputs, image embeddings included)."""
    pipe, fam = _ip_adapter_sd15()
    checks.check_eq8(pipe, fam)


@pytest.mark.parametrize("prefix", [True, "replay", False])
def test_ip_adapter_equals_diffusers_pag_pipeline(prefix: bool | str) -> None:
    from diffusers import StableDiffusionPAGPipeline

    pipe, fam = _ip_adapter_sd15()
    ref_pipe = StableDiffusionPAGPipeline(**pipe.components, pag_applied_layers=fam.layers.split(","))
    ref_pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = checks.output_array(ref_pipe(**fam.call(checks.SEEDS), pag_scale=checks.SCALE))
    with pagkit.apply_pag(pipe, scale=checks.SCALE, layers=fam.layers, prefix_sharing=prefix):
        ours = checks.run(pipe, fam)
    assert np.abs(ref - ours).max() <= 1e-4
    assert np.abs(checks.run(pipe, fam) - ours).max() > 1e-3  # PAG changed something


def test_ip_adapter_embeds_without_a_row_per_call_row_are_a_clear_error() -> None:
    """Embeddings for every image (the pipeline repeats them again: the U-Net gets 2x its rows) cannot be mapped
    to the appended rows; diffusers alone runs them silently (as extra image tokens), pagkit raises."""
    from pagkit.interventions.rows import BatchLayoutError

    pipe, fam = _ip_adapter_sd15()
    kw = {**fam.call(checks.SEEDS), "ip_adapter_image_embeds": [torch.randn(4, 1, IP_IMAGE_DIM)]}
    for prefix in (True, "replay"):
        with (
            pagkit.apply_pag(pipe, scale=checks.SCALE, layers=fam.layers, prefix_sharing=prefix),
            pytest.raises(BatchLayoutError, match=r"image_embeds'\]\[0\] \(IP-Adapter\) has shape \(8, 1, 12\)"),
        ):
            pipe(**kw)
