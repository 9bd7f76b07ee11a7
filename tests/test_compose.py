"""pagkit composes with what users stack on a pipeline: LoRA (peft), diffusers' hook-based caches, layer casting,
and a compiled denoiser; it never removes another library's hooks or instance forward."""

from __future__ import annotations

from typing import Any

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
