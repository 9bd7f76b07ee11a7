"""Guidance schedules: their semantics, their errors, and that apply_pag skips the perturbed branch where 0."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    StableDiffusionPipeline,
)
from diffusers.models.attention_processor import PAGIdentitySelfAttnProcessor2_0
from hypothesis import given, settings
from hypothesis import strategies as st

import pagkit
import pagkit.interventions.attention as processor_module
from pagkit.guidance.schedules import Schedule, Step, parse_schedule
from pagkit.integrations.diffusers import step_of
from tiny import prompt_embeds, sd_components, tiny_unet2d


def at(spec: str, fraction: float | None = None, sigma: float | None = None) -> float:
    return parse_schedule(spec)(Step(fraction=fraction, sigma=sigma))


# -- semantics --------------------------------------------------------------------------------------------------


def test_constant() -> None:
    for spec in (None, "constant"):
        s = parse_schedule(spec)
        assert s.kind == "constant" and not s.needs_position
        assert s(Step()) == 1.0 and s(Step(fraction=0.7, sigma=3.0)) == 1.0
    custom = Schedule("linear", 0.1, 0.9)
    assert parse_schedule(custom) is custom


@pytest.mark.parametrize(
    ("fraction", "expected"), [(0.0, 1.0), (0.25, 1.0), (0.5, 1.0), (0.5001, 0.0), (0.75, 0.0), (1.0, 0.0)]
)
def test_interval_in_fraction(fraction: float, expected: float) -> None:
    assert at("interval:0:0.5", fraction=fraction) == expected


@pytest.mark.parametrize(
    ("fraction", "expected"), [(0.0, 0.0), (0.19, 0.0), (0.2, 1.0), (0.6, 1.0), (0.8, 1.0), (0.81, 0.0), (1.0, 0.0)]
)
def test_interval_in_fraction_late_start(fraction: float, expected: float) -> None:
    assert at("interval:0.2:0.8", fraction=fraction) == expected


@pytest.mark.parametrize(
    ("sigma", "expected"),
    [(math.inf, 0.0), (20.0, 0.0), (10.0, 1.0), (3.0, 1.0), (0.5, 1.0), (0.49, 0.0), (0.01, 0.0), (0.0, 0.0)],
)
def test_interval_in_sigma(sigma: float, expected: float) -> None:
    s = parse_schedule("interval-sigma:10:0.5")
    assert (s.unit, s.start, s.end) == ("sigma", 10.0, 0.5)
    assert s(Step(sigma=sigma)) == expected


def test_linear_and_cosine_endpoints() -> None:
    for kind in ("linear", "cosine"):
        assert at(kind, fraction=0.0) == pytest.approx(1.0)
        assert at(kind, fraction=0.5) == pytest.approx(0.5)
        assert at(kind, fraction=1.0) == pytest.approx(0.0, abs=1e-12)
    assert at("linear", fraction=0.25) == pytest.approx(0.75)
    assert at("cosine", fraction=0.25) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_linear_between_bounds_is_off_outside() -> None:
    assert at("linear:0.2:0.6", fraction=0.1) == 0.0
    assert at("linear:0.2:0.6", fraction=0.2) == pytest.approx(1.0)
    assert at("linear:0.2:0.6", fraction=0.4) == pytest.approx(0.5)
    assert at("linear:0.2:0.6", fraction=0.6) == pytest.approx(0.0, abs=1e-12)
    assert at("linear:0.2:0.6", fraction=0.9) == 0.0
    assert at("cosine:0:0.5", fraction=0.25) == pytest.approx(0.5)


def test_decay_in_sigma_is_linear_in_log_sigma() -> None:
    assert at("linear-sigma:10:0.1", sigma=10.0) == pytest.approx(1.0)
    assert at("linear-sigma:10:0.1", sigma=1.0) == pytest.approx(0.5)
    assert at("linear-sigma:10:0.1", sigma=0.1) == pytest.approx(0.0, abs=1e-12)
    assert at("cosine-sigma:10:0.1", sigma=1.0) == pytest.approx(0.5)


@given(st.sampled_from(["linear", "cosine", "linear:0.1:0.7", "cosine:0.3:1"]), st.floats(0, 1), st.floats(0, 1))
@settings(max_examples=100, deadline=None)
def test_decays_stay_in_unit_interval_and_never_increase_inside(spec: str, a: float, b: float) -> None:
    lo, hi = sorted((a, b))
    s = parse_schedule(spec)
    va, vb = s(Step(fraction=lo)), s(Step(fraction=hi))
    assert 0.0 <= va <= 1.0 and 0.0 <= vb <= 1.0
    if s.start <= lo and hi <= s.end:
        assert vb <= va + 1e-12


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("sometimes", "unknown schedule"),
        ("interval:0", "both bounds"),
        ("interval:0:0.5:1", "both bounds"),
        ("interval:a:b", "must be numbers"),
        ("interval:nan:1", "finite"),
        ("linear:0:inf", "finite"),
        ("interval-sigma", "needs bounds"),
        ("interval:0.8:0.2", "after its end"),
        ("interval-sigma:0.5:10", "high sigma to a low one"),
        ("interval-sigma:1:0", "both positive"),
        ("interval-sigma:-1:-2", "both positive"),
    ],
)
def test_bad_specs(spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_schedule(spec)


def test_bad_unit_and_missing_position() -> None:
    with pytest.raises(ValueError, match="unit"):
        Schedule("interval", 0, 1, unit="steps")
    with pytest.raises(ValueError, match="fraction of the run"):
        parse_schedule("interval:0:0.5")(Step(sigma=1.0))
    with pytest.raises(ValueError, match="needs sigma"):
        parse_schedule("interval-sigma:10:1")(Step(fraction=0.5))
    with pytest.raises(ValueError, match="scheduler="):
        pagkit.apply_pag(tiny_unet2d(), schedule="interval:0:0.5")  # a bare model has no run position


# -- position of a model call in a diffusers run ----------------------------------------------------------------


@pytest.mark.parametrize("cls", [DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler])
def test_step_of_vp_schedulers(cls: type) -> None:
    sched = cls(num_train_timesteps=1000)
    sched.set_timesteps(4)
    alphas = sched.alphas_cumprod
    for i, t in enumerate(sched.timesteps):
        step = step_of(sched, t)
        assert step.fraction == pytest.approx(i / 3)
        a = float(alphas[round(float(t))])
        assert step.sigma == pytest.approx(math.sqrt((1 - a) / a))
    assert step_of(None, 10) == Step() and step_of(sched, None) == Step()


def test_step_of_flow_matching_uses_noise_to_signal_ratio() -> None:
    sched = FlowMatchEulerDiscreteScheduler()
    sched.set_timesteps(4)
    for i, t in enumerate(sched.timesteps):
        s = float(sched.sigmas[i])
        step = step_of(sched, t)
        assert step.fraction == pytest.approx(i / 3)
        assert step.sigma == (math.inf if s >= 1 else pytest.approx(s / (1 - s)))


# -- apply_pag skips the perturbed branch where the schedule is 0 -----------------------------------------------

STEPS = 4
SCALE = 2.0


def _count_perturbed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    inner = processor_module.perturbed_self_attention

    def counting(attn, hidden_states, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(hidden_states.shape[0])
        return inner(attn, hidden_states, *args, **kwargs)

    monkeypatch.setattr(processor_module, "perturbed_self_attention", counting)
    return calls


def _record_batches(model: torch.nn.Module) -> tuple[list[int], object]:
    # the batch each model call sees: with prefix_sharing=False the perturbed rows are appended to it
    seen: list[int] = []
    hook = model.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    return seen, hook


def _manual_ddim(pipe: DDIMPipeline, weights: list[float]) -> np.ndarray:
    """DDIMPipeline's loop with eps + w_i (eps - eps_ptb) written out; eps_ptb from diffusers' PAG processor."""
    unet, sched = pipe.unet, pipe.scheduler
    mid = unet.mid_block.attentions[0]
    original = mid.processor
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((2, 1, 16, 16), generator=generator)
    sched.set_timesteps(STEPS)
    with torch.no_grad():
        for t, w in zip(sched.timesteps, weights, strict=True):
            eps = unet(x, t).sample
            if w:
                mid.set_processor(PAGIdentitySelfAttnProcessor2_0())  # rows [original | perturbed]
                eps_ptb = unet(torch.cat([x, x]), t).sample[2:]
                mid.set_processor(original)
                eps = eps + w * (eps - eps_ptb)
            x = sched.step(eps, t, x, eta=0.0, generator=generator).prev_sample
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def test_interval_schedule_skips_the_perturbed_branch(monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = DDIMPipeline(unet=tiny_unet2d(), scheduler=DDIMScheduler(num_train_timesteps=1000))
    calls = _count_perturbed(monkeypatch)
    with pagkit.apply_pag(pipe, scale=SCALE, layers="mid", prefix_sharing=False, schedule="interval:0:0.5"):
        seen, hook = _record_batches(pipe.unet)
        out = pipe(
            batch_size=2, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="np"
        )
        hook.remove()  # type: ignore[attr-defined]
    # fractions 0, 1/3, 2/3, 1: PAG at the first two steps only
    assert seen == [4, 4, 2, 2]
    assert calls == [2, 2]
    ref = _manual_ddim(pipe, [SCALE, SCALE, 0.0, 0.0])
    np.testing.assert_allclose(out.images, ref, atol=1e-4, rtol=0)
    unguided = _manual_ddim(pipe, [0.0] * STEPS)
    assert np.abs(out.images - unguided).max() > 1e-3


def test_linear_schedule_equals_manual_combination(monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = DDIMPipeline(unet=tiny_unet2d(), scheduler=DDIMScheduler(num_train_timesteps=1000))
    calls = _count_perturbed(monkeypatch)
    with pagkit.apply_pag(pipe, scale=SCALE, layers="mid", schedule="linear"):
        out = pipe(
            batch_size=2, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="np"
        )
    assert len(calls) == 3  # the last step has weight 0
    ref = _manual_ddim(pipe, [SCALE * (1 - i / 3) for i in range(STEPS)])
    np.testing.assert_allclose(out.images, ref, atol=1e-4, rtol=0)


def test_sigma_interval_on_a_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(STEPS)
    sigmas = [math.sqrt((1 - a) / a) for a in (float(sched.alphas_cumprod[int(t)]) for t in sched.timesteps)]
    hi, lo = sigmas[1] * 1.01, sigmas[2] * 0.99  # the two middle steps
    pipe = DDIMPipeline(unet=tiny_unet2d(), scheduler=sched)
    calls = _count_perturbed(monkeypatch)
    with pagkit.apply_pag(pipe, scale=SCALE, layers="mid", prefix_sharing=False, schedule=f"interval-sigma:{hi}:{lo}"):
        seen, hook = _record_batches(pipe.unet)
        out = pipe(
            batch_size=2, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="np"
        )
        hook.remove()  # type: ignore[attr-defined]
    assert seen == [2, 4, 4, 2]
    assert len(calls) == 2
    np.testing.assert_allclose(out.images, _manual_ddim(pipe, [0.0, SCALE, SCALE, 0.0]), atol=1e-4, rtol=0)


def test_schedule_that_never_fires_is_bit_exact_unguided(monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = DDIMPipeline(unet=tiny_unet2d(), scheduler=DDIMScheduler(num_train_timesteps=1000))
    kw = dict(batch_size=2, num_inference_steps=STEPS, output_type="np")
    base = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    calls = _count_perturbed(monkeypatch)
    with pagkit.apply_pag(pipe, scale=SCALE, layers="mid", schedule="interval:2:3"):
        out = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert calls == []
    assert np.array_equal(base, out)


def test_schedule_with_cfg_adds_rows_only_where_on(monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = StableDiffusionPipeline(**sd_components())
    calls = _count_perturbed(monkeypatch)
    kw = dict(
        prompt_embeds=prompt_embeds(2, 1),
        negative_prompt_embeds=prompt_embeds(2, 2),
        num_inference_steps=STEPS,
        height=32,
        width=32,
        output_type="np",
        guidance_scale=4.0,
    )
    with pagkit.apply_pag(pipe, scale=SCALE, layers="mid", prefix_sharing=False, schedule="interval:0:0.5"):
        seen, hook = _record_batches(pipe.unet)
        pipe(generator=torch.Generator().manual_seed(0), **kw)
        hook.remove()  # type: ignore[attr-defined]
    assert seen == [6, 6, 4, 4]  # [uncond, cond] + 2 perturbed rows at the first two steps
    assert calls == [2, 2]
