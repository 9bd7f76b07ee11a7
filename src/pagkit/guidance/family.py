"""The weak-branch family PAG started, each a :class:`~pagkit.guidance.term.Term` of the one engine.

Every term here has one weak branch (the conditional inputs under an intervention) and PAG's combine rule,
``s (eps_c - eps_weak)`` (Ahn et al. Eq. 7/8; ``s = 0`` is off). Only the intervention differs:

============ ================================================================== =====================================
term         weak branch                                                          intervention
============ ================================================================== =====================================
PAG          identity attention map in chosen layers (Ahn et al. 2024)             AttentionPerturbation(identity)
SoftPAG      map interpolated toward the identity, ``(1-a) P + a I``             AttentionPerturbation(soft:a)
HeadPAG      identity map on chosen heads of the chosen layers only              AttentionPerturbation(heads)
SEG          queries Gaussian-blurred over the token grid (Hong 2024)            QueryPerturbation(seg:sigma)
SLG / STG    chosen blocks or attention layers skipped (SD3.5; Hyung 2024)       SkipModules
TPG          tokens of chosen layers' hidden states shuffled (Rajabi 2025)       TokenShuffle
AutoGuidance a weaker model of the same family (Karras et al. 2024)              WeakModel
============ ================================================================== =====================================

Scales follow pagkit's convention (the contribution is ``s (eps_c - eps_weak)``, 0 is off). diffusers' guiders
agree when CFG is on; without CFG their default (``use_original_formulation=False``) computes
``eps_weak + s (eps_c - eps_weak)``, i.e. pagkit's ``s - 1``; Karras et al.'s autoguidance weight ``w`` is
pagkit's ``1 + s``. SAG (Hong et al. 2023) is :class:`pagkit.guidance.sag.SAG`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pagkit.guidance.rules import check_scale, pag_delta
from pagkit.guidance.schedules import CONSTANT, Schedule, Step, parse_schedule
from pagkit.guidance.term import COND, Branch, Term
from pagkit.guidance.terms import PAG
from pagkit.interventions.attention import AttentionPerturbation
from pagkit.interventions.base import Intervention
from pagkit.interventions.blocks import SkipModules
from pagkit.interventions.queries import Heads, QueryPerturbation, SEGBlur, SoftJoint, head_list
from pagkit.interventions.tokens import TokenShuffle
from pagkit.interventions.weak_model import WeakModel, WeakModelError

WEAK = "weak"
# SD3.5's skip-layer guidance window (diffusers' StableDiffusion3Pipeline: start 0.01, stop 0.2 of the run)
SLG_WINDOW = Schedule("interval", 0.01, 0.2)


class WeakTerm(Term):
    """A term with one weak branch and PAG's combine rule; subclasses build ``_intervention`` in ``__post_init__``."""

    scale: float
    schedule: Schedule

    def _make(self) -> Intervention:
        raise NotImplementedError

    def _init(self, what: str) -> None:
        check_scale(f"{what} scale", self.scale)
        object.__setattr__(self, "_intervention", self._make())

    @property
    def intervention(self) -> Intervention:
        return self._intervention  # type: ignore[attr-defined]

    def branches(self) -> tuple[Branch, ...]:
        return (Branch(WEAK, COND, self.intervention),)

    def scale_at(self, step: Step) -> float:
        return self.scale * self.schedule(step)

    def weight(self, step: Step) -> float:
        return self.scale_at(step)

    def combine(self, preds: Mapping[str, torch.Tensor], weight: float) -> torch.Tensor:
        return pag_delta(preds[COND], preds[WEAK], weight)


def SoftPAG(
    scale: float = 2.0, layers: str | Sequence[str] = "mid", alpha: float = 0.5, schedule: str | Schedule | None = None
) -> PAG:
    """PAG with the map interpolated toward the identity: ``(1 - alpha) softmax(QK^T) + alpha I`` (as today)."""
    return PAG.make(scale, layers, SoftJoint(alpha=alpha), schedule)


@dataclass(frozen=True)
class HeadPAG(WeakTerm):
    """PAG on chosen heads only: the identity map on ``heads`` of each chosen layer, the other heads attend."""

    scale: float = 2.0
    layers: str | Sequence[str] = "mid"
    heads: Any = (0,)
    schedule: Schedule = CONSTANT

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", head_list(self.heads))
        self._init("head-PAG")

    def _make(self) -> Intervention:
        return AttentionPerturbation(self.layers, Heads(heads=self.heads))


@dataclass(frozen=True)
class SEG(WeakTerm):
    """Smoothed Energy Guidance: the chosen layers' queries blurred with a Gaussian of ``sigma`` tokens
    (``inf``: every query replaced by the mean query)."""

    scale: float = 2.0
    layers: str | Sequence[str] = "mid"
    sigma: float = math.inf
    schedule: Schedule = CONSTANT

    def __post_init__(self) -> None:
        if math.isnan(self.sigma) or self.sigma <= 0:
            raise ValueError(f"SEG sigma must be positive (inf: uniform), got {self.sigma}")
        self._init("SEG")

    def _make(self) -> Intervention:
        return QueryPerturbation(self.layers, SEGBlur(sigma=self.sigma))


@dataclass(frozen=True)
class SLG(WeakTerm):
    """Skip-layer guidance (SD3.5) / spatiotemporal skip guidance: chosen blocks or attention layers skipped.

    ``layers`` names blocks (``blocks.N``, module paths) or attention layers (``mid``); the default window is
    SD3.5's, 1% to 20% of the run (``schedule``)."""

    scale: float = 2.0
    layers: str | Sequence[str] = "mid"
    schedule: Schedule = SLG_WINDOW

    def __post_init__(self) -> None:
        self._init("SLG")

    def _make(self) -> Intervention:
        return SkipModules(list(self.layers) if not isinstance(self.layers, str) else self.layers)


@dataclass(frozen=True)
class TPG(WeakTerm):
    """Token Perturbation Guidance: the tokens entering the chosen layers shuffled (a fixed permutation)."""

    scale: float = 2.0
    layers: str | Sequence[str] = "mid"
    seed: int = 0
    schedule: Schedule = CONSTANT

    def __post_init__(self) -> None:
        self._init("TPG")

    def _make(self) -> Intervention:
        return TokenShuffle(list(self.layers) if not isinstance(self.layers, str) else self.layers, self.seed)


def weak_denoiser_path() -> Path:
    from pagkit.models.unet import WEIGHTS_DIR

    return WEIGHTS_DIR / "weak_denoiser.safetensors"


def load_weak(weak: nn.Module | str | os.PathLike[str] | None) -> nn.Module:
    """The weak model: a module as given, ``"embedded"`` (the shipped weak denoiser) or a ``.safetensors`` path."""
    if isinstance(weak, nn.Module):
        return weak
    if weak is None:
        raise WeakModelError(
            "autoguidance needs a weak model: AutoGuidance(scale, weak=<a smaller or shorter-trained model of the "
            "same family>); for the embedded model use weak='embedded' (spec: auto:1)"
        )
    from pagkit.models.unet import load_denoiser

    path = weak_denoiser_path() if str(weak) == "embedded" else Path(weak)
    if not path.is_file():
        raise WeakModelError(f"autoguidance's weak model {path} not found: give a denoiser .safetensors file")
    return load_denoiser(path)[0]


@dataclass(frozen=True)
class AutoGuidance(WeakTerm):
    """Autoguidance: guide away from a weaker model of the same family, ``s (eps_c - eps_weak)`` (Karras' w = 1 + s).

    ``weak``: a module, ``"embedded"`` (the shipped weak denoiser of the embedded model) or a path."""

    scale: float = 1.0
    weak: Any = "embedded"
    schedule: Schedule = CONSTANT
    model: nn.Module | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", load_weak(self.weak))
        self._init("autoguidance")

    def _make(self) -> Intervention:
        assert self.model is not None
        return WeakModel(self.model)


def make_schedule(schedule: str | Schedule | None, default: Schedule = CONSTANT) -> Schedule:
    return default if schedule is None else parse_schedule(schedule)
