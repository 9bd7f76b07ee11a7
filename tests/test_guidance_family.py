"""The guidance family (issue 12): every method a term of the one engine, on the embedded model and on SD-, SDXL-,
Flux- and Wan-shaped tiny pipelines; combine rules equal to diffusers' guiders on the same predictions; the spec
syntax and its defaults; the FLOP minimum of the weak branches; CFG++'s sampler hook; clear errors."""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import pagkit
from pagkit.batch import first_tensor
from pagkit.guidance import family as F
from pagkit.guidance import rules_cfg as R
from pagkit.guidance.engine import GuidedDenoiser
from pagkit.guidance.schedules import CONSTANT, Schedule, Step, parse_schedule
from pagkit.guidance.spec import METHODS, SpecError, guidance_terms, parse_guidance, terms_of
from pagkit.guidance.term import COND, UNCOND
from pagkit.guidance.terms import CFG, PAG
from pagkit.interventions.queries import SEGBlur, TokenGridError, blur_tokens
from pagkit.interventions.rows import BatchLayoutError, CallRows, marked
from pagkit.interventions.weak_model import WeakModelError
from pagkit.models.unet import NULL_CLASS, load_denoiser
from pagkit.testing import checks, families

STEP = Step(fraction=0.1, sigma=1.5, index=1)


@pytest.fixture(scope="module")
def embedded() -> nn.Module:
    return load_denoiser()[0]


def _weak_copy(model: nn.Module, factor: float = 0.9) -> nn.Module:
    """A 'weaker model of the same family' for tests: the model with shrunk weights."""
    weak = copy.deepcopy(model)
    with torch.no_grad():
        for p in weak.parameters():
            p.mul_(factor)
    return weak


def _inputs(b: int = 2) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any], dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, 1, 32, 32, generator=g)
    y = torch.arange(b) % 10
    return x, torch.tensor(400), {"class_labels": y}, {"class_labels": torch.full_like(y, NULL_CLASS)}


WEAK_METHODS: dict[str, Callable[[float, nn.Module], Any]] = {
    "pag": lambda s, m: PAG.make(s, "mid"),
    "softpag": lambda s, m: F.SoftPAG(s, "mid"),
    "headpag": lambda s, m: F.HeadPAG(s, "mid", (0, 2)),
    "seg": lambda s, m: F.SEG(s, "mid", 2.0),
    "seg-inf": lambda s, m: F.SEG(s, "down.1"),
    "slg": lambda s, m: F.SLG(s, "mid", schedule=CONSTANT),
    "slg-block": lambda s, m: F.SLG(s, "mid_block", schedule=CONSTANT),
    "tpg": lambda s, m: F.TPG(s, "mid"),
    "auto": lambda s, m: F.AutoGuidance(s, _weak_copy(m)),
}


# -- the embedded model, our own loop -----------------------------------------------------------------------
@pytest.mark.parametrize("name", list(WEAK_METHODS))
def test_weak_methods_on_the_embedded_model(embedded: nn.Module, name: str) -> None:
    x, t, cond, uncond = _inputs()
    plain = GuidedDenoiser(embedded, cond, uncond, [])(x, t, STEP)
    zero = GuidedDenoiser(embedded, cond, uncond, [WEAK_METHODS[name](0.0, embedded)])(x, t, STEP)
    assert torch.equal(zero, plain), "scale 0 must be bit-identical to unguided"
    term = WEAK_METHODS[name](2.0, embedded)
    denoise = GuidedDenoiser(embedded, cond, uncond, [term])
    guided = denoise(x, t, STEP)
    assert torch.isfinite(guided).all() and (guided - plain).abs().max() > 1e-4
    preds = denoise.predictions(x, t, STEP)
    weak = preds["0:perturbed" if name in ("pag", "softpag") else "0:weak"]
    torch.testing.assert_close(guided, preds[COND] + 2.0 * (preds[COND] - weak))
    # composes with CFG and PAG (on other layers: two attention terms on one layer are not supported) in one call
    both = GuidedDenoiser(embedded, cond, uncond, [CFG(2.0), PAG.make(1.0, "up.0"), term])(x, t, STEP)
    assert torch.isfinite(both).all()


@pytest.mark.parametrize("name", list(WEAK_METHODS))
def test_embedded_model_restored_after_an_exception(embedded: nn.Module, name: str) -> None:
    x, t, cond, uncond = _inputs()
    before = checks.snapshot(embedded)
    denoise = GuidedDenoiser(embedded, cond, uncond, [WEAK_METHODS[name](2.0, embedded)])

    def boom(module: nn.Module, args: Any) -> None:
        raise RuntimeError("interrupted")

    target = embedded.get_submodule("up_blocks.1")
    hook = target.register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="interrupted"):
            denoise(x, t, STEP)
    finally:
        hook.remove()
    checks.assert_same_snapshot(before, checks.snapshot(embedded))
    assert "forward" not in embedded.__dict__ and "forward" not in embedded.mid_block.__dict__
    denoise(x, t, STEP)  # applies again: nothing left behind


def test_cfg_rules_on_the_embedded_model(embedded: nn.Module) -> None:
    x, t, cond, uncond = _inputs()
    d = GuidedDenoiser(embedded, cond, uncond, [CFG(1.0)])
    plain = d(x, t, STEP)
    for term in (R.APG(1.0), R.CFGZeroStar(1.0), R.CFGPP(1.0), R.RescaledCFG(1.0)):  # w = 1: off
        assert torch.equal(GuidedDenoiser(embedded, cond, uncond, [term])(x, t, STEP), plain)
    preds = GuidedDenoiser(embedded, cond, uncond, [CFG(3.0)]).predictions(x, t, STEP)
    c, u = preds[COND], preds[UNCOND]
    for term in (R.APG(3.0), R.APG(3.0, space="eps"), R.CFGZeroStar(3.0), R.CFGPP(0.5), R.RescaledCFG(3.0)):
        out = GuidedDenoiser(embedded, cond, uncond, [term, PAG.make(1.0)])(x, t, STEP)
        assert torch.isfinite(out).all() and (out - c).abs().max() > 1e-4
    # APG with eta = 1 and no threshold is CFG, in both spaces
    cfg = GuidedDenoiser(embedded, cond, uncond, [CFG(3.0)])(x, t, STEP)
    for space in ("x0", "eps"):
        apg = GuidedDenoiser(embedded, cond, uncond, [R.APG(3.0, eta=1.0, space=space)])(x, t, STEP)
        torch.testing.assert_close(apg, cfg, atol=1e-5, rtol=1e-5)
    assert c.shape == u.shape


def test_guidance_interval_skips_the_branches_outside(embedded: nn.Module) -> None:
    x, t, cond, uncond = _inputs()
    rows: list[int] = []
    hook = embedded.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    try:
        terms = terms_of("cfg:3~interval-sigma:0.3:5+pag:2~interval-sigma:5:0.3")
        d = GuidedDenoiser(embedded, cond, uncond, terms)
        out_in = d(x, t, Step(fraction=0.5, sigma=1.0, index=3))
        out_out = d(x, t, Step(fraction=0.9, sigma=0.1, index=8))
    finally:
        hook.remove()
    assert rows == [6, 2], "inside: cond + uncond + perturbed rows; outside: the conditional rows only"
    plain = GuidedDenoiser(embedded, cond, uncond, [])(x, t, STEP)
    assert torch.equal(out_out, plain) and not torch.equal(out_in, plain)


def test_slg_window_runs_no_weak_rows_outside(embedded: nn.Module) -> None:
    x, t, cond, uncond = _inputs()
    rows: list[int] = []
    hook = embedded.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    try:
        d = GuidedDenoiser(embedded, cond, uncond, terms_of("slg:2"))
        d(x, t, Step(fraction=0.1, sigma=3.0, index=2))
        d(x, t, Step(fraction=0.5, sigma=1.0, index=10))
    finally:
        hook.remove()
    assert rows == [4, 2]


# -- FLOPs: the weak branches cost their minimum -------------------------------------------------------------
def _flops(fn: Callable[[], Any]) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    return int(counter.get_total_flops())


def _suffix_flops(model: nn.Module, term: Any, x: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> int:
    """The branch alone: every row marked, FLOPs from its first changed module on (the minimum it must cost)."""
    intervention = term.intervention
    first = intervention.targets(model)[0]
    counter = FlopCounterMode(display=False)
    state: dict[str, int] = {}

    def at_fork(module: nn.Module, args: Any) -> None:
        state.setdefault("fork", counter.get_total_flops())

    hook = first.register_forward_pre_hook(at_fork)
    stack = intervention.install(model, 7)
    try:
        with counter, torch.no_grad(), marked(CallRows(len(x), {7: torch.ones(len(x), dtype=torch.bool)})):
            model(x, t, **cond)
    finally:
        stack.close()
        hook.remove()
    return int(counter.get_total_flops()) - state["fork"]


@pytest.mark.parametrize(
    "spec", ["pag:2@mid", "pag:2@down.1", "seg:2@mid", "seg:2@down.1/sigma:2", "slg:2@mid~constant", "tpg:2@mid"]
)
def test_weak_branch_flops_are_the_minimum(embedded: nn.Module, spec: str) -> None:
    from pagkit.bench import minimum_extra_flops

    x, t, cond, uncond = _inputs(4)
    (term,) = terms_of(spec)
    plain = _flops(lambda: GuidedDenoiser(embedded, cond, uncond, [])(x, t, STEP))
    guided = _flops(lambda: GuidedDenoiser(embedded, cond, uncond, [term])(x, t, STEP))
    if spec.startswith("pag"):
        minimum = minimum_extra_flops(embedded, term.layers, lambda: embedded(x, t, **cond))
    else:
        minimum = _suffix_flops(embedded, term, x, t, cond)
    extra = guided - plain
    assert extra / minimum == pytest.approx(1.0, abs=0.03), (extra, minimum)


# -- tiny pipelines: SD, SDXL, Flux, Wan ---------------------------------------------------------------------
PIPE_LAYERS = {
    "sd15": ("mid_block.attentions.0.transformer_blocks.0.attn1", "mid_block.attentions.0.transformer_blocks.0"),
    "sdxl": ("mid_block.attentions.0.transformer_blocks.0.attn1", "mid_block.attentions.0.transformer_blocks.0"),
    "flux": ("transformer_blocks.0.attn,single_transformer_blocks.0.attn", "transformer_blocks.0"),
    "wan": ("blocks.0.attn1", "blocks.0"),
}
PIPE_METHODS: dict[str, Callable[[float, str, str, nn.Module], Any]] = {
    "pag": lambda s, a, b, m: PAG.make(s, a),
    "softpag": lambda s, a, b, m: F.SoftPAG(s, a),
    "headpag": lambda s, a, b, m: F.HeadPAG(s, a, 0),
    "seg": lambda s, a, b, m: F.SEG(s, a, 2.0),
    "slg": lambda s, a, b, m: F.SLG(s, b, schedule=CONSTANT),
    "slg-attention": lambda s, a, b, m: F.SLG(s, a, schedule=CONSTANT),
    "tpg": lambda s, a, b, m: F.TPG(s, b),
    "auto": lambda s, a, b, m: F.AutoGuidance(s, _weak_copy(m)),
}
_PIPES: dict[str, Any] = {}


def _pipe(name: str) -> Any:
    if name not in _PIPES:
        _PIPES.clear()
        _PIPES[name] = families.get(name).build()
    return _PIPES[name]


def _raise_at_second_call() -> Callable[[nn.Module, Any], None]:
    calls: list[int] = []

    def boom(module: nn.Module, args: Any) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("interrupted mid-sampling")

    return boom


@pytest.mark.parametrize("family", list(PIPE_LAYERS))
def test_every_method_on_tiny_pipelines(family: str) -> None:
    fam = families.get(family)
    pipe = _pipe(family)
    model = checks.denoiser(pipe, fam)
    attn, block = PIPE_LAYERS[family]
    plain = checks.run(pipe, fam)
    before = checks.snapshot(model)
    for name, make in PIPE_METHODS.items():
        with pagkit.apply_guidance(pipe, make(0.0, attn, block, model)):
            zero = checks.run(pipe, fam)
        assert np.array_equal(zero, plain), f"{family} {name}: scale 0 is not bit-identical"
        with pagkit.apply_guidance(pipe, make(2.0, attn, block, model)):
            guided = checks.run(pipe, fam)
        assert np.isfinite(guided).all() and np.abs(guided - plain).max() > 1e-6, f"{family} {name}: no change"
        checks.assert_same_snapshot(before, checks.snapshot(model))
        hook = model.register_forward_pre_hook(_raise_at_second_call())
        snap = checks.snapshot(model)
        try:
            with contextlib.suppress(RuntimeError), pagkit.apply_guidance(pipe, make(2.0, attn, block, model)):
                checks.run(pipe, fam)
        finally:
            hook.remove()
        snap["hooks"] = {n: (a - (n == "") * 1, b, c) for n, (a, b, c) in snap["hooks"].items()}
        checks.assert_same_snapshot(snap, checks.snapshot(model))
        assert "forward" not in model.__dict__, f"{family} {name}: instance forward left behind"


# -- CFG's combine rules on pipelines: folded into the pipeline's own CFG ---------------------------------------
W = 3.0
PIPE_RULES: dict[str, Callable[[], Any]] = {
    "apg-eps": lambda: R.APG(W, eta=0.0, norm_threshold=0.5, space="eps"),
    "apg-x0": lambda: R.APG(W, eta=0.2, space="x0"),
    "apg-momentum": lambda: R.APG(W, eta=0.0, space="x0", momentum=-0.5),
    "cfgzero": lambda: R.CFGZeroStar(W),
    "rescale": lambda: R.RescaledCFG(W, 0.7),
    "cfg-interval": lambda: CFG(W, parse_schedule("interval:0.5:1")),
    "cfgzero+pag": lambda: R.CFGZeroStar(W),  # with PAG on the family's layer beside it
}


def _x0_coefficients(pipe: Any, t: torch.Tensor) -> torch.Tensor:
    """x0 = a x_t + b pred, from the scheduler's own tables (independent of pagkit's step_of)."""
    sched = pipe.scheduler
    if hasattr(sched, "alphas_cumprod") and not getattr(sched.config, "use_flow_sigmas", False):
        a_bar = sched.alphas_cumprod[int(t)]
        return torch.tensor([1 / a_bar.sqrt(), -((1 - a_bar) / a_bar).sqrt()])
    s = sched.sigmas[int((sched.timesteps - t).abs().argmin())]
    return torch.tensor([1.0, -float(s)])


def _recorded_run(
    pipe: Any, fam: Any, call: dict[str, Any], make: Callable[[], list[Any]]
) -> tuple[list[Any], list[Any]]:
    """The denoiser's raw calls (sample, timestep, output) and what the pipeline handed to scheduler.step."""
    model = checks.denoiser(pipe, fam)
    raw: list[Any] = []
    stepped: list[torch.Tensor] = []

    def record(m: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        raw.append((sample, t, first_tensor(out).detach().clone()))

    hook = model.register_forward_hook(record, with_kwargs=True)
    original = pipe.scheduler.step

    def step(model_output: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        stepped.append(model_output.detach().clone())
        return original(model_output, *args, **kwargs)

    pipe.scheduler.step = step
    try:
        with torch.no_grad(), pagkit.apply_guidance(pipe, *make()):
            pipe(**call)
    finally:
        hook.remove()
        del pipe.scheduler.step
    return raw, stepped


@pytest.mark.parametrize("family", ["sd15", "sdxl", "wan"])
@pytest.mark.parametrize("rule", list(PIPE_RULES))
def test_cfg_rules_fold_into_the_pipelines_cfg(family: str, rule: str) -> None:
    """Every step, the prediction the pipeline hands its scheduler is c + the rule's contribution on the
    denoiser's own c and u (halves: SD, SDXL; one call per branch: Wan), at every step of an interval too."""
    fam, pipe = families.get(family), _pipe(family)
    call = {**fam.call(checks.SEEDS), "guidance_scale": W}
    pag = PAG.make(2.0, PIPE_LAYERS[family][0]) if rule.endswith("+pag") else None
    raw, stepped = _recorded_run(pipe, fam, call, lambda: [PIPE_RULES[rule](), *([pag] if pag else [])])
    per_step = len(raw) // len(stepped)
    assert len(stepped) >= 2 and per_step in (1, 2)
    term = PIPE_RULES[rule]()
    n, carry = len(stepped), None
    for i, final in enumerate(stepped):
        b = len(checks.SEEDS)
        if per_step == 1:  # [uncond, cond] halves, then PAG's perturbed copy of the cond rows
            x, t, out = raw[i]
            u, c, perturbed, x = out[:b], out[b : 2 * b], out[2 * b :], x[b : 2 * b]
        else:  # the conditional call (with the perturbed copy) first, then the unconditional one
            (x, t, out), (_, _, u) = raw[2 * i], raw[2 * i + 1]
            c, perturbed, x = out[:b], out[b:], x[:b]
        assert len(perturbed) == (b if pag else 0)
        preds = {COND: c, UNCOND: u, R.SAMPLE: x, R.X0_COEFFICIENTS: _x0_coefficients(pipe, t.flatten()[0])}
        weight = term.scale_at(Step(fraction=i / (n - 1), sigma=1.0, index=i))
        expected = c
        if weight:
            delta, carry = term.combine_carry(preds, weight, carry)
            expected = c + delta
        if pag:
            expected = expected + 2.0 * (c - perturbed)
        torch.testing.assert_close(final, expected, rtol=1e-4, atol=1e-5, msg=f"{family} {rule} step {i}")


@pytest.mark.parametrize("family", ["sd15", "wan"])
def test_cfg_rules_on_pipelines_keep_images_independent(family: str) -> None:
    """Image 0 of a folded rule (per-image projections, CFG-Zero*'s per-image scale) does not change when only
    image 1's seed does, and image 1 does."""
    fam, pipe = families.get(family), _pipe(family)
    terms = [R.APG(W, eta=0.2, space="x0"), PAG.make(2.0, PIPE_LAYERS[family][0])]
    for rule in (terms, [R.CFGZeroStar(W)]):
        with torch.no_grad(), pagkit.apply_guidance(pipe, *rule):
            a, b = (checks.output_array(pipe(**{**fam.call(seeds), "guidance_scale": W})) for seeds in ((0, 1), (0, 2)))
        np.testing.assert_allclose(a[0], b[0], atol=1e-5, err_msg=f"{family}: image 0 depends on image 1's seed")
        assert np.abs(a[1] - b[1]).max() > 1e-6, f"{family}: image 1 does not depend on its seed"


def test_cfg_rule_with_the_pipelines_guidance_rescale() -> None:
    """SD's guidance_rescale reads c after combining: the rule goes into u, and the pipeline rescales c + rule."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    fam, pipe = families.get("sd15"), _pipe("sd15")
    call = {**fam.call(checks.SEEDS), "guidance_scale": W, "guidance_rescale": 0.5}
    raw, stepped = _recorded_run(pipe, fam, call, lambda: [R.CFGZeroStar(W)])
    for (_, _, out), final in zip(raw, stepped, strict=True):
        u, c = out.chunk(2)
        guided = c + R.CFGZeroStar(W).combine({COND: c, UNCOND: u}, W - 1)
        torch.testing.assert_close(final, rescale_noise_cfg(guided, c, 0.5), rtol=1e-4, atol=1e-5)


def test_cfg_rules_on_pipelines_refuse_what_they_cannot_fold() -> None:
    sd = _pipe("sd15")
    call = {**families.get("sd15").call(checks.SEEDS), "guidance_scale": 5.0}
    with (
        pytest.raises(BatchLayoutError, match=r"guidance_scale=5: call it with guidance_scale=3"),
        pagkit.apply_guidance(sd, R.APG(3.0)),
    ):
        sd(**call)
    with pytest.raises(BatchLayoutError, match="no unconditional rows"), pagkit.apply_guidance(sd, R.APG(3.0)):
        sd(**{**call, "guidance_scale": 1.0})
    with pytest.raises(BatchLayoutError, match="rescale twice"), pagkit.apply_guidance(sd, R.RescaledCFG(5.0)):
        sd(**{**call, "guidance_rescale": 0.3})
    with pytest.raises(ValueError, match="needs the sampler"):
        pagkit.apply_guidance(sd, R.CFGPP(0.6))
    with pytest.raises(ValueError, match="give one of them"):
        pagkit.apply_guidance(sd, R.APG(3.0), R.CFGZeroStar(3.0))
    with pytest.raises(ValueError, match="bare model"):
        pagkit.apply_guidance(sd.unet, R.APG(3.0), cfg=True)
    for family, says in (
        ("flux", "true_cfg_scale"),
        ("dit", "'cond-uncond'"),
        ("pixart-alpha", "no guidance_scale property"),
    ):
        with pytest.raises(ValueError, match=says):
            pagkit.apply_guidance(_pipe(family), R.CFGZeroStar(3.0))
    assert not pagkit.integrations.diffusers._ACTIVE  # nothing left installed


# -- the combine rules equal diffusers' guiders on the same predictions ----------------------------------------
def _preds(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))  # type: ignore[return-value]


def _ours(terms: list[Any], c: torch.Tensor, u: torch.Tensor | None, weak: torch.Tensor | None) -> torch.Tensor:
    out = c.clone()
    for term in terms:
        preds = {COND: c, UNCOND: u, "weak": weak, "perturbed": weak}
        out = out + term.combine(preds, term.scale_at(Step(fraction=0.5, sigma=1.0, index=0)))
    return out


def test_cfg_and_rescale_equal_diffusers() -> None:
    from diffusers.guiders import ClassifierFreeGuidance

    c, u, _ = _preds()
    g = ClassifierFreeGuidance(guidance_scale=4.0)
    torch.testing.assert_close(_ours([CFG(4.0)], c, u, None), g.forward(c, u).pred)
    g = ClassifierFreeGuidance(guidance_scale=4.0, guidance_rescale=0.7)
    torch.testing.assert_close(_ours([R.RescaledCFG(4.0, 0.7)], c, u, None), g.forward(c, u).pred)


@pytest.mark.parametrize("name", ["pag", "slg", "seg", "auto"])
def test_weak_branch_rules_equal_diffusers(name: str) -> None:
    from diffusers.guiders import (
        AutoGuidance,
        PerturbedAttentionGuidance,
        SkipLayerGuidance,
        SmoothedEnergyGuidance,
    )

    c, u, w = _preds()
    ours: Any = {"pag": PAG.make(2.5), "slg": F.SLG(2.5, schedule=CONSTANT), "seg": F.SEG(2.5), "auto": None}[name]
    if name == "auto":  # Karras' w = 1 + s; diffusers' AutoGuidance takes the weak prediction as "uncond"
        ours = F.AutoGuidance(2.5, _weak_copy(nn.Linear(2, 2)))
        g = AutoGuidance(guidance_scale=3.5, auto_guidance_layers=[0], dropout=1.0)
        torch.testing.assert_close(_ours([ours], c, None, w), g.forward(c, w).pred)
        return
    kw = {"start": 0.0, "stop": 1.0}
    guider = {
        "pag": lambda **k: PerturbedAttentionGuidance(perturbed_guidance_scale=2.5, perturbed_guidance_layers=[0],
                                                     perturbed_guidance_start=0.0, perturbed_guidance_stop=1.0, **k),
        "slg": lambda **k: SkipLayerGuidance(skip_layer_guidance_scale=2.5, skip_layer_guidance_layers=[0],
                                             skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0, **k),
        "seg": lambda **k: SmoothedEnergyGuidance(seg_guidance_scale=2.5, seg_guidance_layers=[0], **k),
    }[name]  # fmt: skip
    # with CFG: u + w (c - u) + s (c - weak), the same in both
    g = guider(guidance_scale=4.0, **kw)
    torch.testing.assert_close(_ours([CFG(4.0), ours], c, u, w), g.forward(c, u, w).pred)
    # without CFG: the papers' eps + s (eps - weak) is diffusers' original formulation; its default shifts s by 1
    g = guider(guidance_scale=1.0, use_original_formulation=False, **kw)
    torch.testing.assert_close(_ours([ours], c, None, w), g.forward(c, None, w).pred + (c - w))
    g0 = guider(guidance_scale=0.0, use_original_formulation=True, **kw)
    torch.testing.assert_close(_ours([ours], c, None, w), g0.forward(c, None, w).pred)


def test_apg_equals_diffusers_and_follows_the_paper() -> None:
    from diffusers.guiders import AdaptiveProjectedGuidance

    c, u, _ = _preds()
    for eta, r in ((0.0, 0.0), (0.3, 5.0), (1.0, 0.0)):
        # diffusers' original formulation is the paper's D_c + (w - 1) update with guidance_scale = w - 1
        g = AdaptiveProjectedGuidance(guidance_scale=3.0, eta=eta, adaptive_projected_guidance_rescale=r,
                                      use_original_formulation=True)  # fmt: skip
        torch.testing.assert_close(_ours([R.APG(4.0, eta, r, space="eps")], c, u, None), g.forward(c, u).pred)
    # its default formulation, u + w * update, equals the paper's only for eta = 1
    g = AdaptiveProjectedGuidance(guidance_scale=4.0, eta=1.0, adaptive_projected_guidance_rescale=0.0)
    torch.testing.assert_close(_ours([R.APG(4.0, 1.0, space="eps")], c, u, None), g.forward(c, u).pred)
    g = AdaptiveProjectedGuidance(guidance_scale=4.0, eta=0.0, adaptive_projected_guidance_rescale=0.0)
    assert not torch.allclose(_ours([R.APG(4.0, 0.0, space="eps")], c, u, None), g.forward(c, u).pred)


def test_apg_momentum_equals_diffusers_over_steps() -> None:
    """APG's momentum through the engine's carry equals diffusers' MomentumBuffer step by step, and a new run
    (step index back at 0) starts it afresh."""
    from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance

    term = R.APG(4.0, eta=0.3, norm_threshold=2.0, space="eps", momentum=-0.5)
    engine = pagkit.guidance.engine.Guidance(nn.Identity(), [term])
    steps = [_preds(seed) for seed in range(4)]

    def run() -> list[torch.Tensor]:
        out = []
        for i, (c, u, _) in enumerate(steps):
            plan = engine.plan(Step(fraction=i / 3, sigma=1.0, index=i), len(c))
            delta = engine.contribution(plan, {COND: c, UNCOND: u}, {})
            assert delta is not None
            out.append(c + delta)
        return out

    buffer = MomentumBuffer(-0.5)  # the paper's D_c + (w - 1) update: diffusers' original formulation at w - 1
    ref = [normalized_guidance(c, u, 3.0, buffer, 0.3, 2.0, use_original_formulation=True) for c, u, _ in steps]
    first = run()
    for i, (ours, theirs) in enumerate(zip(first, ref, strict=True)):
        torch.testing.assert_close(ours, theirs, msg=f"step {i}")
    assert not torch.allclose(first[2], steps[2][0] + term.combine({COND: steps[2][0], UNCOND: steps[2][1]}, 3.0))
    for ours, again in zip(first, run(), strict=True):  # a second run starts the momentum afresh
        torch.testing.assert_close(ours, again)
    with pytest.raises(ValueError, match="step index"):
        engine.plan(Step(fraction=0.5, sigma=1.0), 2)


def test_cfg_zero_star_equals_diffusers() -> None:
    from diffusers.guiders import ClassifierFreeZeroStarGuidance

    c, u, _ = _preds()
    g = ClassifierFreeZeroStarGuidance(guidance_scale=4.0, zero_init_steps=0)
    g.set_state(step=3, num_inference_steps=10, timestep=torch.tensor(500))
    torch.testing.assert_close(_ours([R.CFGZeroStar(4.0)], c, u, None), g.forward(c, u).pred)


def test_seg_blur_equals_the_reference_blur() -> None:
    from diffusers.hooks.smoothed_energy_guidance_utils import _gaussian_blur_2d

    q = torch.randn(2, 64, 12, generator=torch.Generator().manual_seed(1))
    for sigma in (0.5, 1.0, 2.0, 10.0):
        k = math.ceil(6 * sigma) + 1 - math.ceil(6 * sigma) % 2
        # diffusers' branches are inverted (blur when sigma > threshold): threshold -1 takes its blur branch
        ref = _gaussian_blur_2d(q.clone(), k, sigma, -1.0)
        torch.testing.assert_close(blur_tokens(q, (8, 8), sigma), ref)
    ref = _gaussian_blur_2d(q.clone(), 7, 1.0, 9999.0)  # and its mean branch at a finite sigma
    torch.testing.assert_close(blur_tokens(q, (8, 8), math.inf), ref)


# -- CFG++ and the sampler hook ----------------------------------------------------------------------------
def test_renoised_ddim_step_is_ddim_when_the_hook_is_off() -> None:
    from diffusers import DDIMScheduler

    from pagkit.sampling.loops import renoised_ddim_step

    s = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False)
    s.set_timesteps(10)
    x, eps, _ = _preds()
    for t in s.timesteps[:3]:
        torch.testing.assert_close(renoised_ddim_step(s, eps, eps, t, x), s.step(eps, t, x).prev_sample)


def test_cfgpp_sampling_and_plain_loop_unchanged(embedded: nn.Module) -> None:
    from pagkit.generate import generate

    common: dict[str, Any] = {"steps": 4, "label": 3, "batch_size": 2, "progress": False}
    plain, _ = generate(2, guidance="none", **common)
    ref, _ = generate(2, cfg_scale=1.0, pag_scale=0.0, **common)
    assert np.array_equal(plain, ref), "guidance='none' is the plain DDIM loop"
    pp, _ = generate(2, guidance="cfgpp:0.6", **common)
    off, _ = generate(2, guidance="cfgpp:1", **common)
    assert np.array_equal(off, plain) and not np.array_equal(pp, plain)
    with pytest.raises(SpecError, match="--sampler ddim"):
        generate(2, guidance="cfgpp:0.6", sampler="ddpm", **common)


# -- the spec syntax, defaults, errors ------------------------------------------------------------------------
def test_every_method_has_a_pinned_default() -> None:
    pinned = {
        "cfg": (2.0, None, {}), "pag": (2.0, "mid", {"perturbation": "identity"}),
        "softpag": (2.0, "mid", {"alpha": 0.5}),
        "headpag": (2.0, "mid", {"heads": "0"}), "seg": (2.0, "mid", {"sigma": math.inf}), "slg": (2.0, "mid", {}),
        "stg": (2.0, "mid", {}), "tpg": (2.0, "mid", {"seed": 0}), "auto": (1.0, None, {"weights": "embedded"}),
        "sag": (0.75, "mid", {"blur": 1.0}), "apg": (4.0, None, {"eta": 0.0, "r": 0.0, "space": "x0", "momentum": 0.0}),
        "cfgzero": (2.0, None, {}), "cfgpp": (0.6, None, {}), "rescale": (3.0, None, {"phi": 0.7}),
    }  # fmt: skip
    assert set(pinned) == set(METHODS)
    for name, (scale, layers, options) in pinned.items():
        m = METHODS[name]
        assert (m.scale, m.layers, m.options) == (scale, layers, options), name
        (t,) = parse_guidance(name).terms
        assert t.scale == scale and t.layers == layers
    assert METHODS["slg"].schedule == "interval:0.01:0.2"  # SD3.5's window
    assert F.SLG().schedule == Schedule("interval", 0.01, 0.2)
    assert F.SEG().sigma == math.inf and F.HeadPAG().heads == (0,) and F.TPG().layers == "mid"
    assert R.APG().eta == 0.0 and R.CFGPP().scale == 0.6 and R.RescaledCFG().phi == 0.7


def test_spec_examples_from_the_issue() -> None:
    for text in ("cfg:3+pag:2", "seg:3", "slg:3@blocks.4", "tpg:3", "auto:2", "apg:4", "cfgzero:4+pag:2",
                 "pag:3~interval-sigma:0.3:5", "headpag:2/heads:[0,1]", "seg:2/sigma:10", "pag:2/soft:0.5",
                 "rescale:5/phi:0.7", "cfgpp:0.5+pag:1", "pag:2%2", "sag:0.5@mid/blur:2"):  # fmt: skip
        parse_guidance(text)
    (t,) = parse_guidance("pag:3~interval-sigma:0.3:5").terms
    assert t.schedule == Schedule("interval", 5.0, 0.3, "sigma")
    assert parse_guidance("pag:2%3").reuse_delta == 3
    assert parse_guidance("headpag/heads:[0,1]").build()[0].heads == (0, 1)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("foo:2", "unknown guidance 'foo'.*pagkit guidance"),
        ("apg:4+cfg:2", "both CFG rules"),
        ("seg:2/bogus:1", "no option 'bogus'"),
        ("cfg:2@mid", "takes no layers"),
        ("pag:x", "must be a number"),
        ("pag:2~sometimes", "unknown schedule"),
        ("cfgpp:2", r"lambda\) must lie in \[0, 1\]"),
    ],
)
def test_bad_specs_name_the_fix(text: str, match: str) -> None:
    with pytest.raises(SpecError, match=match):
        parse_guidance(text).build()


def test_missing_requirements_name_the_fix(embedded: nn.Module) -> None:
    with pytest.raises(WeakModelError, match="needs a weak model"):
        F.AutoGuidance(1.0, weak=None)
    with pytest.raises(WeakModelError, match=r"guided model.s family"):
        GuidedDenoiser(embedded, terms=[F.AutoGuidance(1.0, nn.Linear(2, 2))])(*_inputs()[:2], STEP)
    with pytest.raises(ValueError, match="unconditional inputs"):
        GuidedDenoiser(embedded, {"class_labels": torch.tensor([1])}, None, [R.APG(4.0)])
    with pytest.raises(SpecError, match=r"needs a class label.*--label"):
        guidance_terms("apg:4", np.full(2, -1))
    with pytest.raises(TokenGridError, match="token grid"):
        SEGBlur(sigma=1.0).grid_for(7, None)
    with pytest.raises(ValueError, match="TPG shuffles tokens"):
        from pagkit.interventions.tokens import shuffle_tokens

        shuffle_tokens(torch.zeros(2, 3), torch.arange(3))
    x, t, cond, _ = _inputs()
    with pytest.raises(ValueError, match="has 4 heads"):
        GuidedDenoiser(embedded, cond, terms=[F.HeadPAG(2.0, "mid", 7)])(x, t, STEP)
    with pytest.raises(ValueError, match=r"output .* does not have its input's shape"):
        GuidedDenoiser(embedded, cond, terms=[F.SLG(2.0, "down_blocks.1", schedule=CONSTANT)])(x, t, STEP)


def test_eval_configs_take_the_spec_syntax() -> None:
    from pagkit.eval.configs import GuidanceConfig, SpecConfig, parse_configs

    configs = parse_configs("none,pag:3,cfg:2+pag:3,seg:3,apg:4,cfgzero:4+pag:2,cfg:3~interval-sigma:0.3:5,auto:1")
    kinds = [type(c).__name__ for c in configs]
    assert kinds == ["GuidanceConfig"] * 3 + ["SpecConfig"] * 5
    assert isinstance(configs[1], GuidanceConfig) and "guidance" not in configs[1].generate_kwargs()  # keys kept
    seg = configs[3]
    assert isinstance(seg, SpecConfig) and seg.generate_kwargs()["guidance"] == "seg:3" and not seg.uses_cfg
    assert configs[4].uses_cfg and configs[6].uses_cfg and configs[5].active == ("cfgzero", "pag")
    assert seg.family() == ("seg", 3.0)


def test_cli_lists_the_methods_and_samples_with_a_spec(tmp_path: Any) -> None:
    from click.testing import CliRunner

    from pagkit.cli import main

    out = CliRunner().invoke(main, ["guidance"])
    assert out.exit_code == 0
    lines = out.output.splitlines()
    for name in METHODS:
        assert any(line.startswith(name + " ") for line in lines), name
    assert "arXiv 2408.00760" in out.output and "arXiv 2406.02507" in out.output
    res = CliRunner().invoke(
        main,
        [
            "sample",
            "--n",
            "2",
            "--steps",
            "2",
            "--guidance",
            "seg:2+tpg:1",
            "--no-progress",
            "--out",
            str(tmp_path / "a.npz"),
        ],
    )
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["sample", "--guidance", "nope:1", "--out", str(tmp_path / "b.png")])
    assert res.exit_code != 0 and "unknown guidance 'nope'" in res.output


def test_apg_in_x0_space_is_the_papers_algorithm() -> None:
    """Sadat et al. Algorithm 1 on the denoised predictions D = x0, converted back to eps, equals the term."""
    c, u, x = _preds(3)
    sigma = torch.tensor(0.8)
    a = 1 / (1 + sigma**2)  # alpha_bar of a VP model at this sigma
    d_c = (x - (1 - a).sqrt() * c) / a.sqrt()
    d_u = (x - (1 - a).sqrt() * u) / a.sqrt()
    w, eta, r = 4.0, 0.2, 2.0
    diff = d_c - d_u
    norm = diff.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    diff = diff * torch.clamp(r / norm, max=1.0)
    unit = torch.nn.functional.normalize(d_c.flatten(1).double(), dim=1).view_as(d_c)
    parallel = ((diff.double() * unit).sum(dim=(1, 2, 3), keepdim=True) * unit).float()
    d = d_c + (w - 1) * (diff - parallel + eta * parallel)
    eps = (x - a.sqrt() * d) / (1 - a).sqrt()
    term = R.APG(w, eta, r, space="x0")
    out = c + term.combine({COND: c, UNCOND: u, R.SAMPLE: x, R.SIGMA: sigma}, w - 1.0)
    torch.testing.assert_close(out, eps, atol=1e-4, rtol=1e-4)


def test_the_shipped_weak_model(embedded: nn.Module) -> None:
    """auto:S uses the shipped weak denoiser: the embedded architecture at a quarter of the width, < 5 MB."""
    from pagkit.guidance.family import weak_denoiser_path

    path = weak_denoiser_path()
    assert path.is_file() and path.stat().st_size < 5 * 2**20
    (term,) = terms_of("auto:1")
    assert type(term.model) is type(embedded)
    assert sum(p.numel() for p in term.model.parameters()) < sum(p.numel() for p in embedded.parameters()) / 3
    x, t, cond, uncond = _inputs()
    plain = GuidedDenoiser(embedded, cond, uncond, [])(x, t, STEP)
    guided = GuidedDenoiser(embedded, cond, uncond, [term])(x, t, STEP)
    assert torch.isfinite(guided).all() and (guided - plain).abs().max() > 1e-3
