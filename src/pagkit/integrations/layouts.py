"""Batch layouts: which rows of each denoiser call a pipeline makes are conditional, unconditional, or neither.

A layout is declared, never guessed from batch positions:

- ``"uncond-cond"``: one call on ``[uncond, cond]`` halves when the pipeline runs CFG (SD, SDXL, SD3, PixArt,
  Sana, video U-Nets, ...), all rows conditional otherwise. Whether this call runs CFG is read from the
  pipeline: its ``do_classifier_free_guidance`` property where the class has one, else the flag it passes to its
  own ``encode_prompt``. The halves are checked to hold the same latents.
- ``"cond-uncond"``: DiTPipeline's ``[cond, uncond]`` batch, told apart by the null class label.
- ``"per-call"``: one call per branch (Wan, Flux with true CFG, QwenImage, HunyuanVideo, Lumina2, Chroma):
  the call is named by the pipeline's ``cache_context("cond"/"uncond")`` where it uses one, else by its order in
  the step (the conditional call first, as those pipelines do).
- ``"cond"``: every row conditional (no CFG: DDPM, DDIM, consistency models, Sana Sprint, Flux without true
  CFG).

Calls that a pipeline adds for its own guidance (SD3's skip-layer call, ``skip_layers=``) pass through.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pagkit.interventions.rows import BatchLayoutError

LAYOUTS = ("uncond-cond", "cond-uncond", "per-call", "cond")
PER_CALL_PIPELINES = frozenset(
    {
        "WanPipeline",
        "WanImageToVideoPipeline",
        "WanVideoToVideoPipeline",
        "FluxPipeline",
        "FluxImg2ImgPipeline",
        "FluxInpaintPipeline",
        "FluxKontextPipeline",
        "FluxControlPipeline",
        "ChromaPipeline",
        "ChromaImg2ImgPipeline",
        "QwenImagePipeline",
        "QwenImageImg2ImgPipeline",
        "QwenImageInpaintPipeline",
        "QwenImageEditPipeline",
        "HunyuanVideoPipeline",
        "Lumina2Pipeline",
        "CogView4Pipeline",
        "SkyReelsV2Pipeline",
    }
)
COND_UNCOND_PIPELINES = frozenset({"DiTPipeline"})
NO_CFG_PIPELINES = frozenset(
    {
        "DDPMPipeline",
        "DDIMPipeline",
        "ConsistencyModelPipeline",
        "SanaSprintPipeline",
        "PNDMPipeline",
        "ScoreSdeVePipeline",
        "LDMPipeline",
    }
)
# halves whose latents differ by design (SVD's unconditional half has zero image latents on its channels)
UNCHECKED_HALVES = frozenset({"StableVideoDiffusionPipeline", "I2VGenXLPipeline"})


@dataclass(frozen=True)
class Roles:
    """What one denoiser call is: ``kind`` ``"main"`` (conditional rows ``cond`` and, in the same call, their
    unconditional partners ``partners``), ``"cond"``/``"uncond"`` (a per-branch call), or ``"pass"``."""

    kind: str
    cond: torch.Tensor | None = None
    partners: torch.Tensor | None = None


@dataclass
class ModelCall:
    sample: torch.Tensor
    timestep: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    @property
    def batch(self) -> int:
        return int(self.sample.shape[0])


class Layout(ABC):
    name: str

    @abstractmethod
    def roles(self, call: ModelCall) -> Roles: ...

    def attach(self, model: nn.Module, pipeline: Any | None) -> Callable[[], None]:
        """Install what the layout reads (returns its remover)."""
        return lambda: None


def _all(call: ModelCall) -> Roles:
    return Roles("main", torch.arange(call.batch, device=call.sample.device), None)


class CondOnly(Layout):
    name = "cond"

    def roles(self, call: ModelCall) -> Roles:
        return _all(call)


def _check_pairs(call: ModelCall, cond: torch.Tensor, partners: torch.Tensor, what: str) -> None:
    if not torch.equal(call.sample[cond], call.sample[partners]):
        raise BatchLayoutError(
            f"the pipeline's batch is not {what}: the conditional rows and their unconditional partners hold "
            "different latents. Declare the layout with apply_guidance(..., layout=...) (one of "
            f"{', '.join(LAYOUTS)})"
        )


class Halves(Layout):
    """``[uncond, cond]`` halves when the call runs CFG."""

    name = "uncond-cond"

    def __init__(self, cfg: Callable[[], bool | None] | None = None, check: bool = True) -> None:
        self.cfg = cfg
        self.check = check
        self._flag: bool | None = None

    def attach(self, model: nn.Module, pipeline: Any | None) -> Callable[[], None]:
        if self.cfg is not None or pipeline is None:
            return lambda: None
        if isinstance(getattr(type(pipeline), "do_classifier_free_guidance", None), property):
            self.cfg = lambda: bool(pipeline.do_classifier_free_guidance)
            return lambda: None
        encode = getattr(pipeline, "encode_prompt", None)
        if encode is None:
            raise BatchLayoutError(
                f"cannot tell when {type(pipeline).__name__} runs classifier-free guidance (it has no "
                "do_classifier_free_guidance property and no encode_prompt): pass layout='cond' (no CFG) or "
                "layout='uncond-cond' with cfg=True"
            )
        signature = inspect.signature(encode)
        if "do_classifier_free_guidance" not in signature.parameters:
            raise BatchLayoutError(
                f"cannot tell when {type(pipeline).__name__} runs classifier-free guidance: pass layout=... and cfg=..."
            )

        def recording(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind_partial(*args, **kwargs)
            flag = bound.arguments.get(
                "do_classifier_free_guidance", signature.parameters["do_classifier_free_guidance"].default
            )
            self._flag = bool(flag)
            return encode(*args, **kwargs)

        pipeline.encode_prompt = recording
        self.cfg = lambda: self._flag

        def remove() -> None:
            if pipeline.__dict__.get("encode_prompt") is recording:
                del pipeline.encode_prompt

        return remove

    def roles(self, call: ModelCall) -> Roles:
        cfg = self.cfg() if self.cfg is not None else None
        if cfg is None:
            raise BatchLayoutError(
                "cannot tell whether this denoiser call runs classifier-free guidance (the pipeline did not say): "
                "pass cfg=True/False to apply_guidance"
            )
        if not cfg:
            return _all(call)
        b = call.batch
        if b % 2:
            raise BatchLayoutError(
                f"the pipeline runs CFG but sent a batch of {b} rows; expected [uncond, cond] halves"
            )
        device = call.sample.device
        cond, partners = torch.arange(b // 2, b, device=device), torch.arange(b // 2, device=device)
        if self.check:
            _check_pairs(call, cond, partners, "[uncond, cond] halves")
        return Roles("main", cond, partners)


class ClassLabelHalves(Layout):
    """DiTPipeline: ``[cond, uncond]``, the unconditional rows carrying the null class label."""

    name = "cond-uncond"

    def __init__(self, null_label: int | None = None) -> None:
        self.null_label = null_label

    def attach(self, model: nn.Module, pipeline: Any | None) -> Callable[[], None]:
        if self.null_label is None:
            config = getattr(model, "config", None)
            n = getattr(config, "num_embeds_ada_norm", None) or getattr(config, "num_class_embeds", None)
            if not isinstance(n, int):
                raise BatchLayoutError("layout 'cond-uncond' needs the null class label: pass null_label=")
            self.null_label = n
        return lambda: None

    def roles(self, call: ModelCall) -> Roles:
        labels = call.kwargs.get("class_labels")
        if labels is None and len(call.args) > 2:
            labels = call.args[2]
        if not isinstance(labels, torch.Tensor) or labels.shape[0] != call.batch:
            raise BatchLayoutError("layout 'cond-uncond' reads class_labels, which this call does not pass per row")
        assert self.null_label is not None  # set by attach()
        null = torch.eq(labels, self.null_label)
        cond = (~null).nonzero().squeeze(1)
        uncond = null.nonzero().squeeze(1)
        if len(uncond) == 0:
            return Roles("main", cond, None)
        if len(uncond) != len(cond) or not bool((uncond > cond.max()).all()):
            raise BatchLayoutError("expected [cond, uncond] halves with the null class label in the second half")
        _check_pairs(call, cond, uncond, "[cond, uncond] halves")
        return Roles("main", cond, uncond)


class PerCall(Layout):
    """One call per branch; named by ``cache_context`` where the pipeline uses it, else conditional first."""

    name = "per-call"

    def __init__(self) -> None:
        self._context: str | None = None
        self._last_t: float | None = None
        self._count = 0

    def attach(self, model: nn.Module, pipeline: Any | None) -> Callable[[], None]:
        original = getattr(model, "cache_context", None)
        if original is None:
            return lambda: None
        layout = self
        make: Callable[..., Any] = original

        class _Named:
            def __init__(self, name: str, **kwargs: Any) -> None:
                self.inner = make(name, **kwargs)
                self.name = name

            def __enter__(self) -> Any:
                layout._context = self.name
                return self.inner.__enter__()

            def __exit__(self, *exc: Any) -> Any:
                layout._context = None
                return self.inner.__exit__(*exc)

        setattr(model, "cache_context", _Named)  # noqa: B010 (an instance attribute, removed again below)

        def remove() -> None:
            if model.__dict__.get("cache_context") is _Named:
                del model.cache_context

        return remove

    def roles(self, call: ModelCall) -> Roles:
        t = call.timestep
        value = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t) if t is not None else None
        if value != self._last_t:
            self._last_t, self._count = value, 0
        self._count += 1
        name = self._context
        if name is None:
            name = "cond" if self._count == 1 else "uncond" if self._count == 2 else None
            if name is None:
                raise BatchLayoutError(
                    f"a third denoiser call at timestep {value}: layout 'per-call' expects one conditional and at most "
                    "one unconditional call per step"
                )
        if name in ("cond", "cond_uncond"):
            return Roles("cond", torch.arange(call.batch, device=call.sample.device), None)
        if name == "uncond":
            return Roles("uncond")
        raise BatchLayoutError(f"unknown cache context {name!r}: layout 'per-call' knows 'cond' and 'uncond'")


def make_layout(name: str | Layout | None, pipeline: Any | None, cfg: bool | None = None) -> Layout:
    """The layout for ``pipeline`` (``name`` None: from the pipeline's class), or the declared one."""
    if isinstance(name, Layout):
        return name
    cls = type(pipeline).__name__ if pipeline is not None else None
    if name is None:
        if pipeline is None:
            name = "uncond-cond" if cfg else "cond"
        elif cls in PER_CALL_PIPELINES:
            name = "per-call"
        elif cls in COND_UNCOND_PIPELINES:
            name = "cond-uncond"
        elif cls in NO_CFG_PIPELINES:
            name = "cond"
        else:
            name = "uncond-cond"
    if name == "cond":
        return CondOnly()
    if name == "uncond-cond":
        return Halves(None if cfg is None else (lambda: cfg), check=cls not in UNCHECKED_HALVES)
    if name == "cond-uncond":
        return ClassLabelHalves()
    if name == "per-call":
        return PerCall()
    raise ValueError(f"unknown layout {name!r}: use one of {', '.join(LAYOUTS)}")
