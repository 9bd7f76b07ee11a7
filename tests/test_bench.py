"""The speed claims in FLOPs (deterministic, unlike timings): pagkit's extra cost is the theoretical minimum."""

from __future__ import annotations

import pytest
import torch
from diffusers import PixArtSigmaPipeline, StableDiffusionPipeline

import pagkit
from pagkit.bench import Row, count_flops, markdown, minimum_extra_flops, peak_memory_mb
from tiny import pixart_components, prompt_embeds, sd_components


def _flops(pipe, kwargs, cfg: float, pag: bool, prefix: bool = True, layers: str = "mid") -> int:  # type: ignore[no-untyped-def]
    def run() -> None:
        if pag:
            with pagkit.apply_pag(pipe, scale=3.0, layers=layers, prefix_sharing=prefix):
                pipe(**kwargs, guidance_scale=cfg, num_inference_steps=1, output_type="latent")
        else:
            pipe(**kwargs, guidance_scale=cfg, num_inference_steps=1, output_type="latent")

    with torch.no_grad():
        return count_flops(run)


@pytest.mark.parametrize("layers", ["mid", "up_blocks.0", "down_blocks.1"])
def test_sd_extra_flops_at_the_minimum(layers: str) -> None:
    pipe = StableDiffusionPipeline(**sd_components())
    kw = dict(prompt_embeds=prompt_embeds(2, 1), negative_prompt_embeds=prompt_embeds(2, 2), height=32, width=32)
    cfg, both = _flops(pipe, kw, 4.0, False), _flops(pipe, kw, 4.0, True, layers=layers)
    naive = _flops(pipe, kw, 4.0, True, prefix=False, layers=layers)
    unet = pipe.unet
    x = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        minimum = minimum_extra_flops(unet, layers, lambda: unet(x, 10, encoder_hidden_states=prompt_embeds(2)))
    assert (both - cfg) <= 1.03 * minimum
    assert (both - cfg) >= 0.97 * minimum  # the minimum is a real lower bound, not a loose estimate
    assert naive - cfg > both - cfg


def test_dit_extra_flops_at_the_minimum() -> None:
    pipe = PixArtSigmaPipeline(**pixart_components())
    kw = dict(
        prompt_embeds=prompt_embeds(2, 1),
        negative_prompt_embeds=prompt_embeds(2, 2),
        height=32,
        width=32,
        prompt_attention_mask=torch.ones(2, 7),
        negative_prompt_attention_mask=torch.ones(2, 7),
        negative_prompt=None,
        use_resolution_binning=False,
    )
    cfg, both = _flops(pipe, kw, 4.0, False), _flops(pipe, kw, 4.0, True, layers="blocks.1")
    model = pipe.transformer
    x = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        minimum = minimum_extra_flops(
            model,
            "blocks.1",
            lambda: model(
                x,
                encoder_hidden_states=prompt_embeds(2),
                timestep=torch.tensor([10, 10]),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            ),
        )
    assert minimum > 0
    assert 0.97 * minimum <= (both - cfg) <= 1.03 * minimum


def test_peak_memory_and_report() -> None:
    mb = peak_memory_mb(lambda: torch.ones(1024, 1024) * 2)
    assert 3.9 < mb < 9
    text = markdown([Row("a", 1.0, 1.0, 2e9, 3.0)], 1e9)
    assert "| a | 1.0 | 1.00 | 2.000 | 3.0 |" in text and "1.000 GFLOP" in text


def test_dit_bench_report_meets_the_flop_target() -> None:
    from pagkit.bench import bench_dit

    report = bench_dit(steps=1, reps=1, latent=8)
    assert "| CFG+PAG diffusers |" in report
    line = next(x for x in report.splitlines() if x.startswith("- extra FLOPs of PAG"))
    assert 0.97 <= float(line.rsplit(":", 1)[1]) <= 1.03


def test_embedded_bench_cached_delta_halves_the_extra_flops() -> None:
    from pagkit.bench import bench_embedded

    report = bench_embedded(steps=4, reps=1, batch=1)
    line = next(x for x in report.splitlines() if x.startswith("- PAG overhead over unguided"))
    assert "extra FLOPs cut by 50.0%" in line  # 4 steps, k = 2: the perturbed branch runs at steps 0 and 2
    assert "| pagkit PAG, cached delta k=2 |" in report
    gflop = {r.split("|")[1].strip(): float(r.split("|")[4]) for r in report.splitlines() if r.startswith("| ")
             and r.split("|")[4].strip().replace(".", "").isdigit()}  # fmt: skip
    # the student: one call per step (the U-Net plus a 40k-parameter scale MLP)
    assert gflop["distilled student (one call, any s)"] / gflop["unguided"] < 1.01
    # PAG on the first half of the run (fractions 0 and 1/3 of 4 steps): half the extra FLOPs of full PAG
    extra = gflop["pagkit PAG"] - gflop["unguided"]
    assert abs(gflop["pagkit PAG, interval (first half)"] - gflop["unguided"] - extra / 2) < 0.02 * extra
    line = next(x for x in report.splitlines() if x.startswith("- distilled student per step"))
    assert "target <= 1.05x" in line


def _first_call(name: str) -> tuple[object, object, tuple, dict]:  # type: ignore[type-arg]
    from pagkit.testing import checks, families

    fam = families.get(name)
    pipe = fam.build()
    model = checks.denoiser(pipe, fam)
    calls: list[tuple] = []  # type: ignore[type-arg]
    hook = model.register_forward_pre_hook(lambda m, a, k: calls.append((a, dict(k))), with_kwargs=True)
    try:
        checks.run(pipe, fam)
    finally:
        hook.remove()
    return fam, model, *calls[0]


@pytest.mark.parametrize(
    ("name", "layers"),
    [
        ("flux", "transformer_blocks.0.attn"),
        ("flux", "single_transformer_blocks.0.attn"),
        ("flux", "transformer_blocks.0.attn,single_transformer_blocks.0.attn"),
        ("wan", "blocks.0.attn1"),
        ("wan", "blocks.1.attn1"),
    ],
)
def test_flux_and_wan_extra_flops_at_the_minimum(name: str, layers: str) -> None:
    """Flux-shaped (joint and single-stream) and Wan-shaped (self-attention with rotary embeddings) models: the
    perturbed branch costs the minimum within 3% (no Q/K for Wan's identity rows; the image-image block skipped
    in Flux's joint layers)."""
    _, model, args, kwargs = _first_call(name)

    def call() -> None:
        model(*args, **kwargs)

    def guided() -> None:
        with pagkit.apply_pag(model, scale=2.0, layers=layers, layout="cond"):
            model(*args, **kwargs)

    with torch.no_grad():
        plain, both = count_flops(call), count_flops(guided)
        minimum = minimum_extra_flops(model, layers, call)
    assert minimum > 0
    assert 0.97 * minimum <= both - plain <= 1.03 * minimum, (both - plain) / minimum
