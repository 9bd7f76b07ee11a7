"""Every tiny pipeline family of :mod:`pagkit.testing.families` builds, runs, and is deterministic per seed."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch

from pagkit.testing.families import FAMILIES, UNBUILDABLE, Family, get, output_tensor, without_cfg

REQUIRED = (
    "sd15",
    "sd15-img2img",
    "sd15-inpaint",
    "controlnet-sd",
    "sdxl",
    "controlnet-sdxl",
    "sd3",
    "sd35",
    "sd3-slg",
    "pixart-alpha",
    "pixart-sigma",
    "sana",
    "sana-sprint",
    "hunyuandit",
    "hunyuandit-g1",
    "kolors",
    "auraflow",
    "lumina2",
    "flux",
    "flux-kontext",
    "flux-true-cfg",
    "chroma",
    "qwenimage",
    "qwenimage-true-cfg",
    "dit",
    "wan",
    "wan-g1",
    "cogvideox",
    "ltx",
    "hunyuanvideo",
    "mochi",
    "latte",
    "allegro",
    "animatediff",
    "svd",
    "kandinsky3",
    "deepfloyd-if",
    "sd-x4-upscaler",
    "ddpm",
    "ddim",
    "consistency-model",
)
SEEDS = [3, 4]


def _params() -> list[Any]:
    return [pytest.param(n, marks=[pytest.mark.slow] if f.slow else [], id=n) for n, f in FAMILIES.items()]


def _run(pipe: Any, call: Callable[[Sequence[int]], dict[str, Any]], seeds: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return output_tensor(pipe(**call(seeds)))


def test_every_family_is_registered_or_explained() -> None:
    missing = [n for n in REQUIRED if n not in FAMILIES and n not in UNBUILDABLE]
    assert not missing
    assert all(reason for reason in UNBUILDABLE.values())
    for name, fam in FAMILIES.items():
        assert isinstance(fam, Family) and fam.name == name and get(name) is fam
        assert fam.layers and fam.notes and fam.denoiser in ("unet", "transformer")
        assert (without_cfg(name) is not None) == fam.cfg
    with pytest.raises(KeyError):
        get("no-such-family")


@pytest.mark.parametrize("name", _params())
def test_family_builds_runs_and_is_deterministic(name: str) -> None:
    fam = get(name)
    pipe = fam.build()
    denoiser = getattr(pipe, fam.denoiser)
    modules = dict(denoiser.named_modules())
    for path in fam.layers.split(","):
        assert hasattr(modules.get(path), "processor"), f"{path} is not an attention module of {type(denoiser)}"

    kwargs = fam.call(SEEDS)
    assert len(kwargs["generator"]) == len(SEEDS)
    first = _run(pipe, fam.call, SEEDS)
    assert first.shape[0] == len(SEEDS)
    assert torch.isfinite(first).all()
    assert not torch.equal(first[0], first[1]), "different seeds should give different images"
    assert torch.equal(_run(pipe, fam.call, SEEDS), first), "same seeds, different output"
    # image i depends only on seeds[i]
    other = _run(pipe, fam.call, [SEEDS[0], 99])
    torch.testing.assert_close(other[0], first[0], rtol=1e-4, atol=1e-5)

    off = without_cfg(name)
    if off is not None:
        plain = _run(pipe, off, SEEDS)
        assert plain.shape == first.shape and torch.isfinite(plain).all()
        assert not torch.allclose(plain, first), "turning guidance off changed nothing"
