"""``pagkit bench``: what PAG costs per denoising step, against its theoretical minimum and diffusers.

Every configuration runs the same pipeline (or the embedded model) for a few steps; repetitions are paired
(configurations interleaved) and medians of per-step times reported, with ratios to the unguided step.
FLOPs come from torch's ``FlopCounterMode``; peak memory from torch's profiler (CPU allocation events).

The theoretical minimum extra cost of PAG for the chosen layers is measured independently of pagkit's
implementation: the FLOPs of one conditional forward pass, minus those spent before the first perturbed layer
starts (the shared prefix), minus the Q/K projections and attention products of the perturbed layers (the
identity map needs only V and the output projection).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from pagkit.integrations.diffusers import apply_pag
from pagkit.layers import select_layers
from pagkit.testing import families


def _count_cpu_flash_attention() -> None:
    """torch counts no FLOPs for the CPU flash-attention kernel; give it the formula of the other SDPA kernels."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None and op not in flop_counter.flop_registry:
        flop_counter.register_flop_formula(op, get_raw=True)(flop_counter.sdpa_flop)


_count_cpu_flash_attention()


@dataclass
class Row:
    name: str
    ms_per_step: float
    ratio: float
    flops_per_step: float
    peak_mb: float
    note: str = ""


def count_flops(fn: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def peak_memory_mb(fn: Callable[[], Any]) -> float:
    """Peak of live CPU tensor memory during ``fn`` (torch profiler allocation events)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # an op's allocations are also reported by each enclosing op: count each op's own (self) share only
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return peak / 2**20


def minimum_extra_flops(model: torch.nn.Module, layers: str, call: Callable[[], Any]) -> int:
    """FLOPs the perturbed branch cannot avoid for ``call`` (a conditional forward of ``model``).

    Everything from the first perturbed layer on, less what the perturbation makes unnecessary: in a
    self-attention layer the Q and K projections and both attention products (the identity map needs only V);
    in a joint or single-stream layer the image-image block of both products (image queries still attend to the
    text keys, and text queries to everything)."""
    from pagkit.integrations.diffusers import image_tokens

    chosen = select_layers(model, layers)
    state: dict[str, int] = {}
    counter = FlopCounterMode(display=False)

    def at_model(module: torch.nn.Module, args: Any, kwargs: Any) -> None:
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
        state["image_tokens"] = image_tokens(model, x) or 0

    def at_fork(module: torch.nn.Module, args: Any) -> None:
        state.setdefault("prefix", counter.get_total_flops())

    def avoidable(kind: str) -> Any:
        def hook(module: Any, args: Any, kwargs: Any, output: Any) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            tokens = x.shape[-1] * x.shape[-2] if x.ndim == 4 else x.shape[1]
            batch = x.shape[0]
            inner = module.to_q.out_features
            if kind == "self":
                q_k = 2 * 2 * batch * tokens * module.to_q.in_features * inner  # to_q and to_k
                saved = q_k + 2 * 2 * batch * tokens * tokens * inner  # Q K^T and P V
            else:
                image = tokens if kind == "joint" else state.get("image_tokens", 0)
                saved = 2 * 2 * batch * image * image * inner  # the image-image block of Q K^T and P V
            state["saved"] = state.get("saved", 0) + saved

        return hook

    hooks = [model.register_forward_pre_hook(at_model, with_kwargs=True)]
    hooks += [layer.module.register_forward_pre_hook(at_fork) for layer in chosen]
    hooks += [layer.module.register_forward_hook(avoidable(layer.kind), with_kwargs=True) for layer in chosen]
    try:
        with counter:
            call()
    finally:
        for h in hooks:
            h.remove()
    return counter.get_total_flops() - state["prefix"] - state["saved"]


def _time_steps(fn: Callable[[], Any], steps: int) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) / steps * 1000


def paired_times(configs: dict[str, Callable[[], Any]], steps: int, reps: int) -> dict[str, float]:
    """Median ms per step of each config, repetitions interleaved so drift hits all alike, each repetition in a
    rotated order (a fixed order favours or penalises the configs at fixed positions: caches, frequency)."""
    times: dict[str, list[float]] = {name: [] for name in configs}
    for fn in configs.values():  # warm-up
        fn()
    items = list(configs.items())
    for rep in range(reps):
        for name, fn in items[rep % len(items) :] + items[: rep % len(items)]:
            times[name].append(_time_steps(fn, steps))
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench_pipeline(
    pipe_factory: Callable[[], Any],
    pag_pipe_factory: Callable[[], Any] | None,
    call_kwargs: dict[str, Any],
    layers: str,
    pag_scale: float,
    cfg_scale: float,
    steps: int,
    reps: int,
) -> list[Row]:
    """Bench the configurations on a diffusers pipeline; one row per configuration."""
    pipe = pipe_factory()
    kw = dict(call_kwargs, num_inference_steps=steps, output_type="latent")

    def run(cfg: float, pag: float | None, prefix: bool | str = True) -> Callable[[], Any]:
        def fn() -> Any:
            ctx = apply_pag(pipe, scale=pag, layers=layers, prefix_sharing=prefix) if pag else nullcontext()
            with torch.no_grad(), ctx:
                return pipe(**kw, guidance_scale=cfg, generator=torch.Generator().manual_seed(0))

        return fn

    configs: dict[str, Callable[[], Any]] = {
        "unguided": run(1.0, None),
        "naive PAG (two full passes)": run(1.0, pag_scale, prefix=False),
        "pagkit PAG": run(1.0, pag_scale),
        "CFG": run(cfg_scale, None),
        "CFG+PAG naive": run(cfg_scale, pag_scale, prefix=False),
        "CFG+PAG pagkit": run(cfg_scale, pag_scale),
        "CFG+PAG pagkit, replay layout": run(cfg_scale, pag_scale, prefix="replay"),
    }
    if pag_pipe_factory is not None:
        ref = pag_pipe_factory()

        def diffusers_run() -> Any:
            with torch.no_grad():
                return ref(
                    **kw, guidance_scale=cfg_scale, pag_scale=pag_scale, generator=torch.Generator().manual_seed(0)
                )

        configs["CFG+PAG diffusers"] = diffusers_run
    ms = paired_times(configs, steps, reps)
    rows = []
    for name, fn in configs.items():
        flops = count_flops(fn) / steps
        rows.append(Row(name, ms[name], ms[name] / ms["unguided"], flops, peak_memory_mb(fn)))
    return rows


def small_vae() -> Any:
    """A narrow random VAE (8x down/up-sampling, 4 latent channels): decoding stays a small share of a run."""
    return families.vae_kl((8, 8, 8, 8), latent=4, groups=4)


def pipeline_report(
    pipe_cls: Any,
    pag_pipe_cls: Any,
    comps: dict[str, Any],
    call_kwargs: dict[str, Any],
    layers: str,
    conditional_call: Callable[[torch.nn.Module], Any],
    steps: int,
    reps: int,
) -> str:
    """Bench a pipeline class against diffusers' PAG twin (PAG 3, CFG 4) and report the rows and ratios.

    ``conditional_call(model)`` runs one conditional forward of the denoiser (for the minimum extra FLOPs)."""
    rows = bench_pipeline(
        lambda: pipe_cls(**comps),
        lambda: pag_pipe_cls(**comps, pag_applied_layers=[layers]),
        call_kwargs,
        layers,
        3.0,
        4.0,
        steps,
        reps,
    )
    model = comps["unet"] if "unet" in comps else comps["transformer"]
    minimum = minimum_extra_flops(model, layers, lambda: conditional_call(model))
    return markdown(rows, minimum) + "\n\n" + "\n".join(summary(rows, minimum))


def sd_shaped_components(seed: int = 0, latent: int = 32) -> dict[str, Any]:
    """Randomly initialised components with Stable Diffusion 1.5's U-Net layout (4 levels, 2 ResNets per level,
    cross-attention in the first three, mid-block attention) at a quarter of its width, so that compute, not
    Python overhead, dominates a step on a CPU. No weights are downloaded."""
    from diffusers import DDIMScheduler

    unet = families.sd_unet(
        seed,
        sample_size=latent,
        block_out_channels=(64, 128, 256, 256),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=192,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    return families.sd_components(unet, small_vae(), scheduler)


def bench_sd(steps: int = 4, reps: int = 3, layers: str = "mid", latent: int = 32) -> str:
    """The full SD-shaped benchmark as a Markdown report."""
    from diffusers import StableDiffusionPAGPipeline, StableDiffusionPipeline

    comps = sd_shaped_components(latent=latent)
    g = torch.Generator().manual_seed(1)
    emb, neg = torch.randn(1, 77, 192, generator=g), torch.randn(1, 77, 192, generator=g)
    size = latent * 8
    kw = dict(prompt_embeds=emb, negative_prompt_embeds=neg, height=size, width=size)
    x = torch.randn(1, 4, latent, latent, generator=g)
    return pipeline_report(
        StableDiffusionPipeline,
        StableDiffusionPAGPipeline,
        comps,
        kw,
        layers,
        lambda unet: unet(x, 500, encoder_hidden_states=emb),
        steps,
        reps,
    )


def dit_shaped_components(seed: int = 0, latent: int = 32, num_layers: int = 12) -> dict[str, Any]:
    """Randomly initialised components with PixArt-Sigma's DiT layout (adaLN-single, self-attention then
    cross-attention to captions in every block, patch size 2, learned sigma) at reduced depth and width.
    No weights are downloaded."""
    transformer = families.pixart_transformer(
        seed,
        sample_size=latent,
        num_layers=num_layers,
        attention_head_dim=32,
        num_attention_heads=6,
        caption_channels=192,
        cross_attention_dim=192,
    )
    return families.pixart_components(transformer, small_vae())


def bench_dit(steps: int = 4, reps: int = 3, layers: str = "blocks.6", latent: int = 32) -> str:
    """The DiT benchmark (PixArt-Sigma-shaped transformer, diffusers' PixArtSigmaPAGPipeline) as Markdown."""
    from diffusers import PixArtSigmaPAGPipeline, PixArtSigmaPipeline

    comps = dit_shaped_components(latent=latent)
    g = torch.Generator().manual_seed(1)
    emb, neg = torch.randn(1, 16, 192, generator=g), torch.randn(1, 16, 192, generator=g)
    mask = torch.ones(1, 16)
    size = latent * 8
    kw = dict(
        prompt_embeds=emb,
        negative_prompt_embeds=neg,
        prompt_attention_mask=mask,
        negative_prompt_attention_mask=mask,
        negative_prompt=None,
        height=size,
        width=size,
        use_resolution_binning=False,
    )
    x = torch.randn(1, 4, latent, latent, generator=g)
    cond = {"resolution": None, "aspect_ratio": None}
    return pipeline_report(
        PixArtSigmaPipeline,
        PixArtSigmaPAGPipeline,
        comps,
        kw,
        layers,
        lambda dit: dit(x, encoder_hidden_states=emb, timestep=torch.tensor([500]), added_cond_kwargs=cond),
        steps,
        reps,
    )


def summary(rows: list[Row], minimum: float) -> list[str]:
    """The speed issue's ratios from a pipeline benchmark's rows."""
    flops = {r.name: r.flops_per_step for r in rows}
    ms = {r.name: r.ms_per_step for r in rows}
    mem = {r.name: r.peak_mb for r in rows}
    extra = flops["CFG+PAG pagkit"] - flops["CFG"]
    return [
        f"- extra FLOPs of PAG (pagkit CFG+PAG - CFG) / theoretical minimum: {extra / minimum:.3f}",
        f"- naive extra FLOPs / minimum: {(flops['CFG+PAG naive'] - flops['CFG']) / minimum:.3f}",
        f"- CFG+PAG wall time, pagkit / diffusers: {ms['CFG+PAG pagkit'] / ms['CFG+PAG diffusers']:.3f}",
        f"- CFG+PAG peak memory, pagkit / diffusers: {mem['CFG+PAG pagkit'] / mem['CFG+PAG diffusers']:.3f} "
        f"(replay layout: {mem['CFG+PAG pagkit, replay layout'] / mem['CFG+PAG diffusers']:.3f}, wall time "
        f"{ms['CFG+PAG pagkit, replay layout'] / ms['CFG+PAG diffusers']:.3f})",
        f"- PAG overhead over CFG, pagkit: {ms['CFG+PAG pagkit'] / ms['CFG'] - 1:.1%}, diffusers: "
        f"{ms['CFG+PAG diffusers'] / ms['CFG'] - 1:.1%}",
    ]


def bench_embedded(steps: int = 10, reps: int = 3, layers: str = "mid", batch: int = 16) -> str:
    """The same configurations on the embedded Fashion-MNIST model (bare-model ``apply_pag``), plus the cached
    delta (``reuse_delta=2``), PAG on the first half of the run only (a guidance interval) and the distilled
    student (one call per step at any scale; a fresh student costs what a trained one does), as Markdown."""
    from diffusers import DDIMScheduler

    from pagkit.distill.student import build_student
    from pagkit.guidance.terms import PAG
    from pagkit.integrations.diffusers import apply_guidance
    from pagkit.models.unet import NULL_CLASS, load_denoiser

    unet, config = load_denoiser()
    scheduler = DDIMScheduler(**config.scheduler_config())
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, config.sample_size, config.sample_size, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    null = torch.full_like(y, NULL_CLASS)
    x2, y2 = torch.cat([x, x]), torch.cat([null, y])

    def run(cfg: bool, pag: bool, prefix: bool | str = True, reuse: int = 1) -> Callable[[], Any]:
        def fn() -> Any:
            ctx = (
                apply_pag(unet, 3.0, layers, cfg=cfg, prefix_sharing=prefix, reuse_delta=reuse, scheduler=scheduler)
                if pag
                else nullcontext()
            )
            with torch.no_grad(), ctx:
                for t in scheduler.timesteps:
                    unet(x2 if cfg else x, t, class_labels=y2 if cfg else y)

        return fn

    def interval() -> Any:
        term = PAG.make(3.0, layers, schedule="interval:0:0.5")
        with torch.no_grad(), apply_guidance(unet, term, scheduler=scheduler):
            for t in scheduler.timesteps:
                unet(x, t, class_labels=y)

    student = build_student(unet).eval().requires_grad_(False)

    def distilled() -> Any:  # as pagkit sample runs it: the scale embedding once per run, then one call a step
        with torch.no_grad():
            g = student.guidance(torch.full((batch,), 3.0), torch.ones(batch))
            for t in scheduler.timesteps:
                student.with_embedding(x, t, y, g)

    configs = {
        "unguided": run(False, False),
        "naive PAG (batched)": run(False, True, prefix=False),
        "pagkit PAG": run(False, True),
        "pagkit PAG, cached delta k=2": run(False, True, reuse=2),
        "pagkit PAG, interval (first half)": interval,
        "distilled student (one call, any s)": distilled,
        "CFG": run(True, False),
        "CFG+PAG naive": run(True, True, prefix=False),
        "CFG+PAG pagkit": run(True, True),
        "CFG+PAG pagkit, replay layout": run(True, True, prefix="replay"),
    }
    ms = paired_times(configs, steps, reps)
    rows = [
        Row(name, ms[name], ms[name] / ms["unguided"], count_flops(fn) / steps, peak_memory_mb(fn))
        for name, fn in configs.items()
    ]
    minimum = minimum_extra_flops(unet, layers, lambda: unet(x, 500, class_labels=y))
    flops = {r.name: r.flops_per_step for r in rows}
    extra = flops["CFG+PAG pagkit"] - flops["CFG"]
    full = ms["pagkit PAG"] / ms["unguided"] - 1
    cached = ms["pagkit PAG, cached delta k=2"] / ms["unguided"] - 1
    base = flops["unguided"]
    flop_cut = 1 - (flops["pagkit PAG, cached delta k=2"] - base) / (flops["pagkit PAG"] - base)
    distilled_ratio = ms["distilled student (one call, any s)"] / ms["unguided"]
    return (
        markdown(rows, minimum)
        + f"\n\n- extra FLOPs of PAG / theoretical minimum: {extra / minimum:.3f}"
        + f"\n- PAG overhead over unguided: full {full:.1%}, cached delta k=2 {cached:.1%} "
        + f"(cut by {1 - cached / full:.1%}; extra FLOPs cut by {flop_cut:.1%})"
        + f"\n- distilled student per step / unguided: {distilled_ratio:.3f}x (target <= 1.05x; FLOPs "
        + f"{flops['distilled student (one call, any s)'] / base:.4f}x)"
    )


def markdown(rows: list[Row], minimum: float | None = None) -> str:
    lines = [
        "| configuration | ms/step | x unguided | GFLOP/step | peak MB |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.ms_per_step:.1f} | {r.ratio:.2f} | {r.flops_per_step / 1e9:.3f} | {r.peak_mb:.1f} |"
        )
    if minimum is not None:
        lines.append(f"\ntheoretical minimum extra FLOPs of PAG per step: {minimum / 1e9:.3f} GFLOP")
    return "\n".join(lines)


def shaped_model(name: str, seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A random Flux-shaped (2 double + 4 single blocks, 256 image + 64 text tokens) or Wan-shaped (4 blocks,
    3 x 8 x 8 video tokens, 32 text tokens) transformer and the inputs of one call with 2 images."""
    g = torch.Generator().manual_seed(seed)
    if name == "flux":
        model = families.flux_transformer(
            seed=seed,
            in_channels=64,
            num_layers=2,
            num_single_layers=4,
            attention_head_dim=32,
            num_attention_heads=4,
            joint_attention_dim=128,
            pooled_projection_dim=128,
            axes_dims_rope=(8, 12, 12),
        )
        inputs = dict(
            hidden_states=torch.randn(2, 256, 64, generator=g),
            encoder_hidden_states=torch.randn(2, 64, 128, generator=g),
            pooled_projections=torch.randn(2, 128, generator=g),
            timestep=torch.tensor([0.5, 0.5]),
            img_ids=torch.zeros(256, 3),
            txt_ids=torch.zeros(64, 3),
        )
        return model, inputs
    if name == "wan":
        model = families.wan_transformer(
            seed, num_attention_heads=4, attention_head_dim=32, text_dim=128, freq_dim=64, ffn_dim=256, num_layers=4
        )
        inputs = dict(
            hidden_states=torch.randn(2, 16, 3, 16, 16, generator=g),
            encoder_hidden_states=torch.randn(2, 32, 128, generator=g),
            timestep=torch.tensor([500, 500]),
        )
        return model, inputs
    raise ValueError(f"unknown shaped model {name!r}: use flux or wan")


def bench_family(name: str, layers: str, steps: int = 4, reps: int = 3) -> str:
    """Per denoiser call on a random Flux- or Wan-shaped model (:func:`shaped_model`): unguided, naive PAG (the
    perturbed copies computed from the first layer on) and pagkit PAG, against the theoretical minimum extra
    FLOPs. diffusers has no PAG pipeline for these families, hence the naive row."""
    model, inputs = shaped_model(name)

    def run(pag: bool, prefix: bool = True) -> Callable[[], Any]:
        def fn() -> Any:
            ctx = apply_pag(model, scale=2.0, layers=layers, layout="cond", prefix_sharing=prefix) if pag else None
            with torch.no_grad(), ctx or nullcontext():
                for _ in range(steps):
                    model(**inputs)

        return fn

    configs = {"unguided": run(False), "naive PAG": run(True, prefix=False), "pagkit PAG": run(True)}
    ms = paired_times(configs, steps, reps)
    rows = [
        Row(n, ms[n], ms[n] / ms["unguided"], count_flops(fn) / steps, peak_memory_mb(fn)) for n, fn in configs.items()
    ]
    with torch.no_grad():
        minimum = minimum_extra_flops(model, layers, lambda: model(**inputs))
    flops = {row.name: row.flops_per_step for row in rows}
    extra, naive = flops["pagkit PAG"] - flops["unguided"], flops["naive PAG"] - flops["unguided"]
    return (
        markdown(rows, minimum)
        + f"\n\n- extra FLOPs of PAG / theoretical minimum: {extra / minimum:.3f}"
        + f"\n- naive extra FLOPs / minimum: {naive / minimum:.3f}"
    )
