"""Guidance terms on any diffusers pipeline or bare model, without copying a pipeline.

``apply_guidance(pipe, *terms)`` hooks the pipeline's denoiser (``pipe.unet`` / ``pipe.transformer``) with the
engine of :mod:`pagkit.guidance.engine`:

1. before each call, the layout (:mod:`pagkit.integrations.layouts`) names the conditional rows; the engine
   appends one copy of them per weak branch that runs at this step, marked for that branch's intervention;
2. after it, the terms' contributions are folded into the rows the pipeline combines, so that the pipeline's
   own CFG yields ``eps_u + w (eps_c - eps_u) + s (eps_c - eps_c_perturbed)`` (Ahn et al. Eq. 8), and a call
   without CFG ``eps + s (eps - eps_perturbed)`` (Eq. 7). In a per-branch layout the unconditional call of the
   step gets the contribution computed in the conditional one.

Where the pipeline reuses its conditional prediction after combining (``guidance_rescale > 0``, SD3's skip-layer
guidance), the contribution goes into the unconditional rows only, scaled by ``1 / (1 - w)``: the combined
result is the same and the pipeline sees its unperturbed conditional prediction, as diffusers' PAG pipelines do.

A rule that replaces CFG's combine (a term that reads the unconditional branch: CFG with an interval, APG,
CFG-Zero*, CFG-rescale) is folded the same way: the rows are rewritten so that the pipeline's own
``u + w (c' - u)`` (or ``u' + w (c - u')``) equals ``c + (the rule's contribution) + (the other terms')``
exactly, at every step (also where the rule's weight is 0: there the result is ``c``, CFG off). That needs the
pipeline's CFG weight ``w``: it is read from the pipeline's ``guidance_scale`` and must equal the rule's scale
(so a call cannot silently mix two weights); pipelines whose weight pagkit cannot read (``true_cfg_scale``,
no ``guidance_scale`` property) are refused.

At steps where every term's weight is 0 the call passes through untouched. ``remove()`` (also on leaving a
``with`` block, and after an exception) restores the model exactly.
"""

from __future__ import annotations

import inspect
import math
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from pagkit.attention.ops import Perturbation
from pagkit.batch import first_tensor, replace_first_tensor
from pagkit.guidance.engine import Guidance
from pagkit.guidance.rules_cfg import CFGPP, SAMPLE, X0_COEFFICIENTS, RescaledCFG
from pagkit.guidance.sag import SAG
from pagkit.guidance.schedules import Schedule, Step
from pagkit.guidance.term import COND, UNCOND, Term
from pagkit.guidance.terms import PAG
from pagkit.integrations.layouts import Halves, Layout, ModelCall, PerCall, Roles, make_layout
from pagkit.interventions.rows import BatchLayoutError

_ACTIVE: weakref.WeakKeyDictionary[nn.Module, GuidanceHandle] = weakref.WeakKeyDictionary()
_SAMPLE_KEYS = ("sample", "hidden_states", "x")
_LAZY_KEYS = ("encoder_hidden_states",)


def lazy_keys(model: nn.Module) -> tuple[str, ...]:
    """Model inputs the batched layout may pass with the pipeline's rows only: for model classes whose forward
    hands the encoder states only to cross-attention layers (which complete the rows per call) or submodules.
    Any other model gets every input copied: always correct, one input copy more memory."""
    from diffusers import PixArtTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    known = (UNet2DConditionModel, PixArtTransformer2DModel, SD3Transformer2DModel)
    return _LAZY_KEYS if type(model) in known else ()


def denoiser_of(target: Any) -> tuple[nn.Module, Any | None]:
    """The denoising model of a pipeline (``.unet`` or ``.transformer``) or a bare model; and the pipeline."""
    if type(target).__name__ == "OptimizedModule" or hasattr(target, "_orig_mod"):
        raise TypeError(
            "this denoiser is a torch.compile wrapper: pagkit installs hooks on the model itself. Apply guidance "
            "first, then compile in place (model.compile()), or pass the uncompiled model"
        )
    for attr in ("unet", "transformer"):
        model = getattr(target, attr, None)
        if type(model).__name__ == "OptimizedModule":
            raise TypeError(
                f"pipe.{attr} is a torch.compile wrapper: pagkit installs hooks on the model itself. Use "
                f"pipe.{attr}.compile() (in place) instead of torch.compile(pipe.{attr}), or apply guidance first"
            )
        if isinstance(model, nn.Module):
            return model, target
    if isinstance(target, nn.Module):
        return target, None
    raise TypeError(
        f"cannot apply guidance to a {type(target).__name__}: pass a diffusers pipeline (with .unet or "
        ".transformer) or a diffusers model"
    )


def _is_flow(scheduler: Any) -> bool:
    config = getattr(scheduler, "config", None)
    return type(scheduler).__name__.startswith("FlowMatch") or bool(getattr(config, "use_flow_sigmas", False))


def step_of(scheduler: Any, timestep: Any) -> Step:
    """Fraction of the run, sigma and index of ``timestep`` in a diffusers scheduler's current timesteps.

    sigma is the noise-to-signal ratio ``sqrt((1 - alpha_bar) / alpha_bar)`` (EDM's sigma) for every kind of
    scheduler; a flow-matching sigma ``s`` (``x = (1 - s) x0 + s eps``) becomes ``s / (1 - s)``.
    """
    if scheduler is None or timestep is None:
        return Step()
    t = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
    timesteps = getattr(scheduler, "timesteps", None)
    fraction = index = None
    if isinstance(timesteps, torch.Tensor) and timesteps.numel():
        index = int((timesteps.float() - t).abs().argmin())
        fraction = index / max(len(timesteps) - 1, 1)
    sigma = None
    alphas = getattr(scheduler, "alphas_cumprod", None)
    sigmas = getattr(scheduler, "sigmas", None)
    if _is_flow(scheduler):
        if isinstance(sigmas, torch.Tensor) and index is not None:
            s = float(sigmas[index])
            sigma = s / (1.0 - s) if s < 1.0 else math.inf
    elif isinstance(alphas, torch.Tensor):
        a = float(alphas[min(max(round(t), 0), len(alphas) - 1)])
        sigma = math.sqrt((1 - a) / a)
    elif isinstance(sigmas, torch.Tensor) and index is not None:
        sigma = float(sigmas[index])
    return Step(fraction=fraction, sigma=sigma, index=index)


def x0_coefficients(scheduler: Any, step: Step) -> tuple[float, float] | None:
    """``(a, b)`` with ``x0 = a x_t + b prediction`` for the model input ``x_t`` at ``step`` (None: unknown).

    epsilon: ``sqrt(1 + sigma^2) x - sigma eps``; v-prediction: ``(x - sigma v) / sqrt(1 + sigma^2)``; flow
    velocity (``x = (1 - s) x0 + s eps``, ``v = eps - x0``): ``x - s v``. The model input of a VP scheduler
    that scales it (Euler's ``x / sqrt(1 + sigma^2)``) is the VP sample, so the same formulas hold.
    """
    sigma = step.sigma
    if scheduler is None or sigma is None:
        return None
    if _is_flow(scheduler):  # step_of's sigma = s / (1 - s); s = 1 (pure noise) is sigma = inf
        return 1.0, -(1.0 if math.isinf(sigma) else sigma / (1.0 + sigma))
    if not math.isfinite(sigma):
        return None
    kind = getattr(getattr(scheduler, "config", None), "prediction_type", None)
    if kind == "epsilon":
        return math.sqrt(1.0 + sigma**2), -sigma
    if kind == "v_prediction":
        r = math.sqrt(1.0 + sigma**2)
        return 1.0 / r, -sigma / r
    return None


def image_tokens(model: nn.Module, sample: torch.Tensor) -> int | None:
    """Tokens of the image/video stream for a model input ``sample`` (packed ``[B, N, C]``, or patches of
    ``[B, C, H, W]`` / ``[B, C, F, H, W]``)."""
    config = getattr(model, "config", None)
    p = getattr(config, "patch_size", None)
    p = p[-1] if isinstance(p, (tuple, list)) else p
    pt = getattr(config, "patch_size_t", None) or 1
    if sample.ndim == 3:
        return int(sample.shape[1])
    if not isinstance(p, int) or p < 1:
        return None
    if sample.ndim == 4:
        return int(sample.shape[2] * sample.shape[3]) // (p * p)
    if sample.ndim == 5:
        f = sample.shape[2] if model.__class__.__name__ not in _FRAMES_FIRST else sample.shape[1]
        h, w = sample.shape[-2:]
        return int(f * h * w) // (pt * p * p)
    return None


# models whose forward regroups rows (video U-Nets fold frames into the batch; Lumina2 builds per-row sequences):
# prefix sharing cannot follow their rows, so they run without it
FOLDS_FRAMES = frozenset(
    {
        "UNetMotionModel",
        "UNetSpatioTemporalConditionModel",
        "UNet3DConditionModel",
        "I2VGenXLUNet",
        "Lumina2Transformer2DModel",
    }
)
# models pagkit refuses, with the reason (docs/support.md); none today
UNSUPPORTED: dict[str, str] = {}


def _has_stateful_hooks(model: nn.Module) -> bool:
    """Whether diffusers' HookRegistry holds a stateful hook (caches) anywhere in ``model``."""
    for module in model.modules():
        registry = module.__dict__.get("_diffusers_hook")
        hooks = getattr(registry, "hooks", {}) if registry is not None else {}
        if any(getattr(hook, "_is_stateful", False) for hook in hooks.values()):
            return True
    return False


def folded_inputs(model: nn.Module, sample: torch.Tensor, kwargs: dict[str, Any]) -> dict[str, int]:
    """Inputs that a video pipeline passes per frame, ``(b f)`` rows (AnimateDiff's text states)."""
    if type(model).__name__ != "UNetMotionModel" or sample.ndim != 5:
        return {}
    states = kwargs.get("encoder_hidden_states")
    frames = int(sample.shape[2])
    if isinstance(states, torch.Tensor) and states.shape[0] == sample.shape[0] * frames and frames > 1:
        return {"encoder_hidden_states": frames}
    return {}


_FRAMES_FIRST = frozenset({"CogVideoXTransformer3DModel"})  # [B, F, C, H, W]


class GuidanceHandle:
    """Applied guidance: a context manager with ``remove()``; see :func:`apply_guidance`."""

    def __init__(
        self,
        model: nn.Module,
        pipeline: Any | None,
        guidance: Guidance,
        layout: Layout,
        scheduler: Any | None,
    ) -> None:
        self.model = model
        self.pipeline = pipeline
        self.guidance = guidance
        self.layout = layout
        self.scheduler = scheduler
        self.lazy = lazy_keys(model) if guidance.dedup is not None else ()
        self._hooks: list[Any] = []
        self._removers: list[Any] = []
        self._call: tuple[Roles, Any, Step] | None = None
        self._step_delta: tuple[float | None, torch.Tensor] | None = None
        self._cond_t: float | None = math.nan
        self._plan: Any = None
        self.rules = [t for t in guidance.terms if t.needs_uncond]  # terms that replace the pipeline's CFG rule
        self._rule_state: tuple[Any, torch.Tensor, dict[str, torch.Tensor], float] | None = None
        self._extra: dict[str, torch.Tensor] = {}
        self._w = math.nan  # the pipeline's CFG weight, read and checked once per call (rules only)
        self.active = False
        self.calls = 0  # denoiser calls seen (for tests and reports)

    @property
    def terms(self) -> list[Term]:
        return self.guidance.terms

    @property
    def layers(self) -> list[Any]:
        """The attention layers the terms perturb (``AttentionLayer``s, model order within each term)."""
        from pagkit.interventions.attention import AttentionPerturbation

        return [
            layer
            for weak in self.guidance.weak
            if isinstance(weak.intervention, AttentionPerturbation)
            for layer in weak.intervention.resolve(self.model)
        ]

    def _install(self) -> None:
        if self.model in _ACTIVE:
            raise RuntimeError(
                f"guidance is already applied to this {type(self.model).__name__}: call .remove() on the first "
                "handle (or leave its `with` block) before applying again"
            )
        try:
            self.guidance.install()
            self._removers.append(self.layout.attach(self.model, self.pipeline))
            self._hooks = [
                self.model.register_forward_pre_hook(self._before, with_kwargs=True),
                self.model.register_forward_hook(self._after, with_kwargs=True, always_call=True),
            ]
        except BaseException:
            self.remove()
            raise
        _ACTIVE[self.model] = self
        self.active = True

    def remove(self) -> None:
        """Restore the model exactly: original processors, no hooks. Safe to call twice."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for remover in reversed(self._removers):
            remover()
        self._removers = []
        self.guidance.remove()
        self._call = None
        self._step_delta = None
        if _ACTIVE.get(self.model) is self:
            del _ACTIVE[self.model]
        self.active = False

    def __enter__(self) -> GuidanceHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # -- the hooks ----------------------------------------------------------------------------------------
    def _before(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self._call = None
        self.guidance.abort()
        self.calls += 1
        sample = args[0] if args else next((kwargs[k] for k in _SAMPLE_KEYS if k in kwargs), None)
        if not isinstance(sample, torch.Tensor):
            raise BatchLayoutError("pagkit could not find the model's input sample (first argument or sample=...)")
        if kwargs.get("skip_layers") is not None:  # a pipeline's own extra call (SD3 skip-layer guidance)
            return None
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep", kwargs.get("t"))
        roles = self.layout.roles(ModelCall(sample, timestep, args, kwargs))
        step = step_of(self.scheduler, timestep)
        if roles.kind == "uncond":
            self._call = (roles, timestep, step)
            return None
        if roles.kind == "pass":
            return None
        assert roles.cond is not None
        plan = self.guidance.plan(step, len(roles.cond))
        if roles.kind == "cond":
            self._cond_t, self._step_delta, self._rule_state = _value(timestep), None, None
        if not plan.active and not self.rules:
            return None
        if self.rules:  # the rows must be rewritten at every step, also where the rule's weight is 0
            self._w = self._cfg_weight(roles)
            self._extra = {SAMPLE: sample[roles.cond]}
            coefficients = x0_coefficients(self.scheduler, step)
            if coefficients is not None:
                self._extra[X0_COEFFICIENTS] = torch.tensor(coefficients, dtype=sample.dtype, device=sample.device)
        self._call = (roles, timestep, step)
        new_args, new_kwargs = self.guidance.begin(
            plan,
            args,
            kwargs,
            sample.shape[0],
            roles.cond,
            image_tokens(self.model, sample),
            self.lazy,
            folded_inputs(self.model, sample, kwargs),
        )
        self._plan = plan
        return new_args, new_kwargs

    def _after(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        call, self._call = self._call, None
        if call is None:
            return None
        roles, timestep, _ = call
        if output is None:  # the forward raised
            self.guidance.abort()
            return None
        out = first_tensor(output)
        if roles.kind == "uncond":
            stored = self._stored_delta(timestep, out)
            if self.rules:
                return replace_first_tensor(output, self._rule_uncond(out, stored))
            return replace_first_tensor(output, out + stored)
        main, weak = self.guidance.end(out, forward=module.forward)
        assert roles.cond is not None
        base = {COND: main[roles.cond]}
        if self.rules and roles.kind == "cond":  # per-branch: the rule waits for the unconditional call
            weak_part = self.guidance.contribution(self._plan, base, weak, uncond=False)
            self._rule_state = (self._plan, main, self._extra, self._w)
            self._step_delta = (_value(timestep), weak_part if weak_part is not None else torch.zeros_like(main))
            return replace_first_tensor(output, main if weak_part is None else main + weak_part)
        if self.rules:
            assert roles.partners is not None
            base[UNCOND] = main[roles.partners]
            total = self.guidance.contribution(self._plan, {**base, **self._extra}, weak)
            return replace_first_tensor(output, self._rule_fold(main, roles, total))
        delta = self.guidance.contribution(self._plan, base, weak)
        if delta is None:
            return replace_first_tensor(output, main)
        guided = main.clone()
        if roles.kind == "cond":
            self._step_delta = (_value(timestep), delta)
            guided += delta
        elif roles.partners is None:
            guided[roles.cond] += delta
        elif self._reuses_cond():
            w = float(getattr(self.pipeline, "guidance_scale", 1.0))
            if w == 1.0:
                raise BatchLayoutError("guidance_scale 1 with CFG on: cannot fold the guidance term")
            guided[roles.partners] += delta / (1.0 - w)
        else:
            guided[roles.cond] += delta
            guided[roles.partners] += delta
        return replace_first_tensor(output, guided)

    def _stored_delta(self, timestep: Any, out: torch.Tensor) -> torch.Tensor:
        if self._cond_t != _value(timestep):
            raise BatchLayoutError(
                "the unconditional call of this step came before the conditional one: pagkit's per-call layout "
                "needs the conditional call first (to add the same guidance term to both)"
            )
        stored = self._step_delta
        if stored is None:  # no term active at this step
            return torch.zeros_like(out)
        if stored[1].shape != out.shape:
            raise BatchLayoutError(
                f"the unconditional call has {out.shape[0]} rows but the conditional one had {stored[1].shape[0]}"
            )
        return stored[1]

    # -- rules that replace the pipeline's CFG --------------------------------------------------------------
    def _cfg_weight(self, roles: Roles) -> float:
        """The pipeline's CFG weight, checked against the rules' scales."""
        name = type(self.rules[0]).__name__
        if roles.kind == "main" and roles.partners is None:
            raise BatchLayoutError(
                f"{name} replaces CFG's combine but this denoiser call has no unconditional rows: call the pipeline "
                "with guidance_scale > 1 (its CFG on; the same value as the rule's scale)"
            )
        w = float(getattr(self.pipeline, "guidance_scale", math.nan))
        second = getattr(self.pipeline, "_guidance_scale_2", None)
        if second is not None and float(second) != w:
            raise BatchLayoutError(
                f"{type(self.pipeline).__name__} runs two CFG weights (guidance_scale {w}, guidance_scale_2 "
                f"{second}); a {name} rule has one scale: pass guidance_scale_2=None or the same value"
            )
        for rule in self.rules:
            scale = float(getattr(rule, "scale", math.nan))
            if not math.isclose(scale, w, rel_tol=1e-6):
                raise BatchLayoutError(
                    f"{type(rule).__name__}({scale:g}) on a pipeline called with guidance_scale={w:g}: call it with "
                    f"guidance_scale={scale:g} (the pipeline's CFG must be on; pagkit replaces its combine rule)"
                )
        if w == 1.0:
            raise BatchLayoutError(f"{name} with scale 1 on a pipeline: nothing to fold (use a scale > 1)")
        rescale = float(getattr(self.pipeline, "_guidance_rescale", 0.0) or 0.0)
        if rescale > 0 and any(isinstance(r, RescaledCFG) for r in self.rules):
            raise BatchLayoutError(
                f"RescaledCFG on a pipeline called with guidance_rescale={rescale:g} would rescale twice: use one "
                "(guidance_rescale=0 with the term, or the pipeline's guidance_rescale without it)"
            )
        return w

    def _rule_fold(self, main: torch.Tensor, roles: Roles, delta: torch.Tensor | None) -> torch.Tensor:
        """Rows such that the pipeline's ``u + w (c - u)`` equals ``c + delta``."""
        assert roles.cond is not None and roles.partners is not None
        w = self._w
        c, u = main[roles.cond], main[roles.partners]
        target = c if delta is None else c + delta
        guided = main.clone()
        if self._reuses_cond():  # the pipeline reads c again: keep it, rewrite u
            guided[roles.partners] = (target - w * c) / (1.0 - w)
        else:
            guided[roles.cond] = u + (target - u) / w
        return guided

    def _rule_uncond(self, u: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Per-branch layout: the unconditional prediction ``u'`` with ``u' + w (c + P - u') = c + P + R``."""
        state, self._rule_state = self._rule_state, None
        if state is None:
            raise BatchLayoutError("the unconditional call of this step came without a conditional call before it")
        plan, c, extra, w = state
        rule = self.guidance.contribution(plan, {COND: c, UNCOND: u, **extra}, {}, uncond=True)
        out = c + delta
        return out if rule is None else out + rule / (1.0 - w)

    def _reuses_cond(self) -> bool:
        """Whether the pipeline uses its conditional prediction again after combining CFG."""
        p = self.pipeline
        if p is None:
            return False
        rescale = getattr(p, "_guidance_rescale", 0.0) or 0.0
        slg = getattr(p, "_skip_layer_guidance_scale", 0.0) or 0.0
        return float(rescale) > 0.0 or (float(slg) > 0.0 and type(p).__name__.startswith("StableDiffusion3"))


def _check_rule_target(rules: list[Term], pipeline: Any | None, layout: Layout) -> None:
    """Refuse, before anything is installed, a CFG rule that pagkit could not fold into ``pipeline``'s CFG."""
    name = type(rules[0]).__name__
    if len(rules) > 1:
        raise ValueError(
            f"{', '.join(type(r).__name__ for r in rules)} each replace CFG's combine rule: give one of them"
        )
    if pipeline is None:
        raise ValueError(
            f"{name} replaces CFG's combine, and on a bare model pagkit does not know the caller's CFG weight: apply "
            "it to the pipeline, or use pagkit's own loop (GuidedDenoiser with uncond=...)"
        )
    cls = type(pipeline)
    if not isinstance(layout, (Halves, PerCall)):
        raise ValueError(
            f"{name} needs the pipeline's unconditional branch in an 'uncond-cond' or 'per-call' batch; "
            f"{cls.__name__}'s layout is {layout.name!r}: use pagkit's own loop for it"
        )
    if "true_cfg_scale" in inspect.signature(cls.__call__).parameters:
        raise ValueError(
            f"{cls.__name__} runs CFG with true_cfg_scale, a call argument pagkit cannot read, so it cannot fold "
            f"{name} into it: use weak-branch terms (PAG, SEG, SLG, TPG, autoguidance) on it"
        )
    if not isinstance(getattr(cls, "guidance_scale", None), property):
        raise ValueError(
            f"{cls.__name__} does not expose its CFG weight (no guidance_scale property), so pagkit cannot fold "
            f"{name} into its CFG: use weak-branch terms on it, or pagkit's own loop"
        )


def _value(timestep: Any) -> float | None:
    if timestep is None:
        return None
    return float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)


def apply_guidance(
    target: Any,
    *terms: Term,
    layout: str | Layout | None = None,
    cfg: bool | None = None,
    scheduler: Any | None = None,
    prefix_sharing: bool | str = True,
    reuse_delta: int = 1,
) -> GuidanceHandle:
    """Add guidance terms (PAG and kin) to a diffusers pipeline or model; returns a removable handle.

    Args:
        target: a pipeline with ``.unet`` or ``.transformer`` (its own ``__call__`` then yields guided results,
            combined with its CFG) or a bare model (a call returns ``eps + sum of contributions``).
        terms: guidance terms, e.g. ``pagkit.PAG(3.0, "mid")``. CFG is the pipeline's own (its
            ``guidance_scale``); a term that replaces its rule (``APG(w)``, ``CFGZeroStar(w)``,
            ``RescaledCFG(w)``, ``CFG(w)`` with an interval) is folded into it and needs the pipeline called with
            ``guidance_scale=w``. CFG++ needs the sampler and runs in pagkit's own loop only.
        layout: the batch layout of the denoiser calls (see :mod:`pagkit.integrations.layouts`); by default
            from the pipeline's class. A bare model: ``"cond"`` unless ``cfg=True``.
        cfg: force whether ``[uncond, cond]`` halves are present (default: read from the pipeline).
        scheduler: where schedules read the run's position; defaults to the pipeline's scheduler.
        prefix_sharing: ``True``/``"batched"`` (default), ``"replay"`` or ``False`` (see :mod:`pagkit.prefix`).
        reuse_delta: ``k > 1`` runs the weak branches at steps 0, k, 2k, ... only and reuses their
            contribution in between (opt-in; trades quality for speed).
    """
    if not terms:
        raise ValueError("give at least one guidance term, e.g. pagkit.PAG(3.0)")
    for term in terms:
        if isinstance(term, SAG):
            raise ValueError("SAG on diffusers pipelines is not supported by pagkit; use diffusers' SAG pipeline")
        if isinstance(term, CFGPP):
            raise ValueError(
                "CFG++ renoises each step with the unconditional prediction, which needs the sampler's cooperation "
                "that a pipeline's scheduler does not offer: use it in pagkit's own loop (pagkit sample --guidance "
                "cfgpp:0.6)"
            )
    model, pipeline = denoiser_of(target)
    declared = make_layout(layout, pipeline, cfg)
    rules = [t for t in terms if t.needs_uncond]
    if rules:
        _check_rule_target(rules, pipeline, declared)
    if type(model).__name__ in UNSUPPORTED:
        raise NotImplementedError(
            f"pagkit cannot guide {type(model).__name__} yet ({UNSUPPORTED[type(model).__name__]}); see docs/support.md"
        )
    scheduler = scheduler if scheduler is not None else getattr(pipeline, "scheduler", None)
    for term in terms:
        if term.schedule.needs_position and scheduler is None:
            raise ValueError(
                f"schedule {term.schedule.kind!r} on a bare model needs scheduler=... to know the run's position"
            )
    if reuse_delta > 1 and scheduler is None:
        raise ValueError("reuse_delta > 1 on a bare model needs scheduler=... to know the step number")
    if type(model).__name__ in FOLDS_FRAMES and prefix_sharing is not False:
        if prefix_sharing is not True:
            raise ValueError(
                f"{type(model).__name__} folds video frames into the batch inside its forward, which prefix sharing "
                "cannot follow: use prefix_sharing=True (the default picks no sharing for it) or False"
            )
        prefix_sharing = False
    if _has_stateful_hooks(model) and prefix_sharing in (True, "batched"):
        if prefix_sharing == "batched":
            raise ValueError(
                "this model carries diffusers' stateful hooks (a cache such as FirstBlockCache): their state spans "
                "blocks before and after the perturbed layer, which the batched prefix sharing cannot follow; use "
                "prefix_sharing=True (picks no sharing for it), 'replay' or False"
            )
        prefix_sharing = False
    guidance = Guidance(model, terms, prefix_sharing, reuse_delta)
    handle = GuidanceHandle(model, pipeline, guidance, declared, scheduler)
    handle._install()
    return handle


def apply_pag(
    target: Any,
    scale: float = 3.0,
    layers: str | Sequence[str] = "mid",
    perturbation: str | Perturbation = "identity",
    schedule: str | Schedule | None = None,
    scheduler: Any | None = None,
    cfg: bool | None = None,
    prefix_sharing: bool | str = True,
    reuse_delta: int = 1,
    layout: str | Layout | None = None,
) -> GuidanceHandle:
    """Perturbed-attention guidance on a pipeline or model: ``apply_guidance(target, PAG.make(...))``.

    ``scale`` is the paper's ``s`` (3.0 with CFG, 5.0 without a prompt); ``layers`` a layer spec
    (:mod:`pagkit.layers`); ``perturbation`` ``"identity"`` (PAG) or an ablation op; ``schedule`` e.g.
    ``"interval:0:0.5"``. The other arguments are :func:`apply_guidance`'s.
    """
    term = PAG.make(scale, layers, perturbation, schedule)
    return apply_guidance(
        target,
        term,
        layout=layout,
        cfg=cfg,
        scheduler=scheduler,
        prefix_sharing=prefix_sharing,
        reuse_delta=reuse_delta,
    )


# the old name of the handle
PAGHandle = GuidanceHandle
