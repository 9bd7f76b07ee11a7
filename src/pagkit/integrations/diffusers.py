"""``apply_pag``: PAG on any diffusers pipeline or bare model, without copying a pipeline.

The denoiser (``pipe.unet`` / ``pipe.transformer`` or the model itself) gets two forward hooks and a perturbed
attention processor on the chosen layers:

1. before each call, the conditional rows of the batch are appended once more and declared perturbed;
2. after it, the perturbed rows are folded back into the batch the pipeline expects, so that the pipeline's own
   CFG combine yields ``eps_u + w (eps_c - eps_u) + s (eps_c - eps_c_perturbed)`` (Ahn et al. Eq. 8), and a
   pipeline without CFG (or a bare model call) gets ``eps + s (eps - eps_perturbed)`` (Eq. 7).

At steps where the scheduled scale is 0 the call passes through untouched: no perturbed rows are computed.
``remove()`` (also on leaving a ``with`` block, also after an exception) restores the model exactly.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import sys
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pagkit.attention.ops import Perturbation, make_perturbation
from pagkit.attention.processor import BatchLayoutError, RowPlan, patched_attention
from pagkit.batch import append_rows, first_tensor, map_rows, replace_first_tensor
from pagkit.guidance.delta import DeltaCache
from pagkit.guidance.rules import check_scale, pag_delta
from pagkit.guidance.schedules import Schedule, Step, parse_schedule
from pagkit.layers import AttentionLayer, select_layers
from pagkit.prefix import PrefixCache, PrefixDedup, sharing_mode

_ACTIVE: weakref.WeakKeyDictionary[nn.Module, PAGHandle] = weakref.WeakKeyDictionary()
_SAMPLE_KEYS = ("sample", "hidden_states", "x")
_LAZY_KEYS = ("encoder_hidden_states",)


def lazy_keys(model: nn.Module) -> tuple[str, ...]:
    """Model inputs the batched layout may pass with the pipeline's rows only (no copy for the perturbed rows up
    front): for model classes whose forward hands the encoder states only to cross-attention layers (which
    complete the rows per call, :class:`~pagkit.prefix.PrefixDedup`) or to submodules. Any other model gets
    every input copied: always correct, one input copy more memory."""
    from diffusers import PixArtTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    known = (UNet2DConditionModel, PixArtTransformer2DModel, SD3Transformer2DModel)
    return _LAZY_KEYS if isinstance(model, known) else ()


def denoiser_of(target: Any) -> tuple[nn.Module, Any | None]:
    """The denoising model of a pipeline (``.unet`` or ``.transformer``) or a bare model; and the pipeline."""
    for attr in ("unet", "transformer"):
        model = getattr(target, attr, None)
        if isinstance(model, nn.Module):
            return model, target
    if isinstance(target, nn.Module):
        return target, None
    raise TypeError(
        f"cannot apply PAG to a {type(target).__name__}: pass a diffusers pipeline (with .unet or .transformer) "
        "or a diffusers model"
    )


def _is_flow(scheduler: Any) -> bool:
    config = getattr(scheduler, "config", None)
    return type(scheduler).__name__.startswith("FlowMatch") or bool(getattr(config, "use_flow_sigmas", False))


def step_of(scheduler: Any, timestep: Any) -> Step:
    """Fraction of the run and sigma of ``timestep`` in a diffusers scheduler's current timesteps.

    sigma is the noise-to-signal ratio ``sqrt((1 - alpha_bar) / alpha_bar)`` (EDM's sigma) for every kind of
    scheduler, so one sigma interval means the same noise level everywhere; a flow-matching sigma ``s``
    (``x = (1 - s) x0 + s eps``) becomes ``s / (1 - s)``.
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


def pipeline_does_cfg(pipeline: Any) -> bool | None:
    """Whether ``pipeline``'s running ``__call__`` does classifier-free guidance; None if it cannot be told.

    Read from the pipeline itself: its ``do_classifier_free_guidance`` property where the class defines one
    (SD, SDXL, SD3, ControlNet, ...), else the local variable of that name in its running ``__call__``
    (PixArt, DeepFloyd IF, Kandinsky, CogVideoX, ... decide CFG in a local). Never guessed from the batch.
    """
    if isinstance(getattr(type(pipeline), "do_classifier_free_guidance", None), property):
        try:
            return bool(pipeline.do_classifier_free_guidance)
        except AttributeError:  # the property reads state that __call__ has not set: not inside a call
            return None
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_locals.get("self") is pipeline:
            value = frame.f_locals.get("do_classifier_free_guidance")
            if isinstance(value, bool):
                return value
        frame = frame.f_back
    return None


def _takes_guidance_scale(pipeline: Any) -> bool:
    try:
        return "guidance_scale" in inspect.signature(type(pipeline).__call__).parameters
    except (TypeError, ValueError):
        return False


@dataclass
class _Call:
    batch: int
    cond_rows: torch.Tensor
    weight: float
    shared: bool  # prefix sharing: the perturbed rows run in a second call that replays the prefix
    step: Step | None = None
    reused: torch.Tensor | None = None  # a cached eps_c - eps_perturbed: no perturbed rows at all


class PAGHandle:
    """An applied PAG: a context manager with ``remove()``; see :func:`apply_pag`."""

    def __init__(
        self,
        model: nn.Module,
        pipeline: Any | None,
        layers: list[AttentionLayer],
        scale: float,
        perturbation: Perturbation,
        schedule: Schedule,
        scheduler: Any | None,
        cfg: bool | None = None,
        prefix_sharing: bool | str = True,
        reuse_delta: int = 1,
    ) -> None:
        self.model = model
        self.pipeline = pipeline
        self.layers = layers
        self.scale = scale
        self.perturbation = perturbation
        self.schedule = schedule
        self.scheduler = scheduler
        self.cfg = cfg
        mode = sharing_mode(prefix_sharing)
        modules = [layer.module for layer in layers]
        self.prefix = PrefixCache(model, modules) if mode == "replay" else None
        self.dedup = PrefixDedup(model, modules) if mode == "batched" else None
        self.lazy = lazy_keys(model) if self.dedup is not None else ()
        self.deltas = DeltaCache(reuse_delta)
        self.plan = RowPlan()
        self._call: _Call | None = None
        self._stack = contextlib.ExitStack()
        self._hooks: list[Any] = []
        self.active = False

    # -- installation -------------------------------------------------------------------------------------
    def _install(self) -> None:
        if self.model in _ACTIVE:
            raise RuntimeError(
                f"PAG is already applied to this {type(self.model).__name__}: call .remove() on the first handle "
                "(or leave its `with` block) before applying again"
            )
        self._stack.enter_context(patched_attention(self.layers, self.perturbation, self.plan))
        try:
            for sharing in (self.prefix, self.dedup):
                if sharing is not None:
                    sharing.install()
                    self._stack.callback(sharing.remove)
            self._hooks = [
                self.model.register_forward_pre_hook(self._before, with_kwargs=True),
                self.model.register_forward_hook(self._after, with_kwargs=True, always_call=True),
            ]
        except BaseException:
            self._stack.close()
            raise
        _ACTIVE[self.model] = self
        self.active = True

    def remove(self) -> None:
        """Restore the model exactly: original processors, no hooks. Safe to call twice."""
        if not self.active:
            return
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._stack.close()
        self.plan.rows = None
        self._call = None
        _ACTIVE.pop(self.model, None)
        self.active = False

    def __enter__(self) -> PAGHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # -- the hooks ----------------------------------------------------------------------------------------
    def _cfg_active(self) -> bool:
        """Whether this model call's batch is ``[uncond, cond]`` halves (the pipeline runs CFG)."""
        if self.cfg is not None:
            return self.cfg
        if self.pipeline is None:
            return False
        cfg = pipeline_does_cfg(self.pipeline)
        if cfg is not None:
            return cfg
        if _takes_guidance_scale(self.pipeline):
            raise BatchLayoutError(
                f"cannot tell whether {type(self.pipeline).__name__} runs classifier-free guidance in this call "
                "(it has neither a do_classifier_free_guidance property nor such a local in __call__): "
                "pass cfg=True or cfg=False to apply_pag"
            )
        return False  # a pipeline without guidance (DDPM, DDIM, ...)

    def _before(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self._call = None
        self.plan.rows = None
        sample = args[0] if args else next((kwargs[k] for k in _SAMPLE_KEYS if k in kwargs), None)
        if not isinstance(sample, torch.Tensor):
            raise BatchLayoutError("PAG could not find the model's input sample (first argument or sample=...)")
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        weight = self.scale
        step = step_of(self.scheduler, timestep) if self.schedule.needs_position or self.deltas.every > 1 else None
        if self.schedule.needs_position:
            weight *= self.schedule(step)
        if weight == 0.0:
            return None
        batch = sample.shape[0]
        if self._cfg_active():
            if batch % 2:
                raise BatchLayoutError(
                    f"the pipeline runs CFG but sent a batch of {batch} rows; expected [uncond, cond] halves"
                )
            cond_rows = torch.arange(batch // 2, batch, device=sample.device)
        else:
            cond_rows = torch.arange(batch, device=sample.device)
        self._call = _Call(batch, cond_rows, weight, shared=self.prefix is not None, step=step)
        self._call.reused = self.deltas.get(step, len(cond_rows))
        if self._call.reused is not None:  # a step between recomputations: no perturbed rows at all
            return None
        if self.prefix is not None:  # main call as the pipeline made it; record its prefix
            self.prefix.start_recording(batch, cond_rows)
            return None
        # one batched call: the conditional rows once more, declared perturbed (and, with prefix sharing, not
        # computed before the first perturbed layer)
        rows = torch.zeros(batch + len(cond_rows), dtype=torch.bool, device=sample.device)
        rows[batch:] = True
        self.plan.rows = rows
        if self.dedup is None:
            return append_rows(args, batch, cond_rows), append_rows(kwargs, batch, cond_rows)
        self.dedup.start(batch, cond_rows)
        # known models: the encoder states keep the pipeline's rows; cross-attention completes them per call
        eager = {k: v for k, v in kwargs.items() if k not in self.lazy}
        lazy = {k: v for k, v in kwargs.items() if k in self.lazy}
        return append_rows(args, batch, cond_rows), {**append_rows(eager, batch, cond_rows), **lazy}

    def _perturbed_call(self, module: nn.Module, call: _Call, args: Any, kwargs: Any) -> torch.Tensor:
        """The conditional rows again, perturbed, with the shared prefix replayed instead of recomputed."""
        assert self.prefix is not None
        take = lambda t: t[call.cond_rows.to(t.device)]  # noqa: E731
        args_p, kwargs_p = map_rows(args, call.batch, take), map_rows(kwargs, call.batch, take)
        rows = torch.ones(len(call.cond_rows), dtype=torch.bool, device=call.cond_rows.device)
        with self.prefix.replay(), self.plan.perturb(rows):
            return first_tensor(module.forward(*args_p, **kwargs_p))  # bypasses these hooks

    def _after(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        call, self._call = self._call, None
        self.plan.rows = None
        if self.prefix is not None:
            self.prefix.stop_recording()
        if self.dedup is not None:
            self.dedup.stop()
        if call is None or output is None:  # pass-through step, or the forward raised
            return None
        out = first_tensor(output)
        if call.reused is not None:
            main = out
        elif call.shared:
            main, perturbed = out, self._perturbed_call(module, call, args, kwargs)
        else:
            if out.shape[0] != call.batch + len(call.cond_rows):
                raise BatchLayoutError(
                    f"model returned {out.shape[0]} rows, expected {call.batch + len(call.cond_rows)}"
                )
            main, perturbed = out[: call.batch], out[call.batch :]
        if call.reused is None:
            self.deltas.put(call.step, main[call.cond_rows] - perturbed)
            delta = pag_delta(main[call.cond_rows], perturbed, call.weight)
        else:
            delta = call.weight * call.reused
        # add the same delta to the rows the pipeline combines (both CFG halves, or the whole batch)
        n_cond = len(call.cond_rows)
        guided = main + delta.repeat(call.batch // n_cond, *([1] * (delta.ndim - 1)))
        return replace_first_tensor(output, guided)


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
) -> PAGHandle:
    """Add perturbed-attention guidance to a diffusers pipeline or model; returns a removable handle.

    Args:
        target: a pipeline with ``.unet`` or ``.transformer`` (its own ``__call__`` then yields PAG-guided
            results, combined with its CFG) or a bare model (a call returns ``eps + s (eps - eps_perturbed)``).
        scale: the PAG scale ``s`` (the paper's 3.0 with CFG, 5.0 without a prompt).
        layers: a layer spec (see :mod:`pagkit.layers`): ``"mid"``, ``"down.2"``, module paths, presets.
        perturbation: ``"identity"`` (PAG) or an ablation op name (see :mod:`pagkit.attention.ops`).
        schedule: ``None``/``"constant"``, ``"interval:0:0.5"``, ``"linear"``, ``"cosine"``, ... (see
            :func:`pagkit.guidance.schedules.parse_schedule`).
        scheduler: where the schedule reads the run's position; defaults to the pipeline's scheduler.
        cfg: whether each model call's batch is ``[uncond, cond]`` halves. ``None`` (default) reads it from the
            pipeline at every call (see :func:`pipeline_does_cfg`); a bare model is then taken to run without CFG.
        prefix_sharing: ``True``/``"batched"`` (default): the perturbed rows join the model call's batch, but
            every submodule before the first perturbed layer computes the unperturbed rows only
            (:class:`~pagkit.prefix.PrefixDedup`); ``"replay"``: a second call on the conditional rows that
            replays the recorded prefix (:class:`~pagkit.prefix.PrefixCache`; least memory); ``False`` appends
            them to the batch of one
            call instead (diffusers' layout, more memory and FLOPs).
        reuse_delta: ``k > 1`` computes the perturbed branch at steps 0, k, 2k, ... only and reuses the last
            ``eps_c - eps_perturbed`` in between (opt-in; trades quality for speed, see docs/results.md).
    """
    scale = check_scale("pag scale", scale)
    model, pipeline = denoiser_of(target)
    chosen = select_layers(model, layers)
    sched = parse_schedule(schedule)
    scheduler = scheduler if scheduler is not None else getattr(pipeline, "scheduler", None)
    if sched.needs_position and scheduler is None:
        raise ValueError(f"schedule {sched.kind!r} on a bare model needs scheduler=... to know the run's position")
    DeltaCache(reuse_delta)  # validate before installing anything
    if reuse_delta > 1 and scheduler is None:
        raise ValueError("reuse_delta > 1 on a bare model needs scheduler=... to know the step number")
    handle = PAGHandle(
        model,
        pipeline,
        chosen,
        scale,
        make_perturbation(perturbation),
        sched,
        scheduler,
        cfg,
        prefix_sharing,
        reuse_delta,
    )
    handle._install()
    return handle
