"""Guidance terms: CFG and PAG (SAG lives in :mod:`pagkit.guidance.sag`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from pagkit.attention.ops import Perturbation, make_perturbation
from pagkit.guidance.rules import cfg_delta, check_scale, pag_delta
from pagkit.guidance.schedules import CONSTANT, Schedule, Step, parse_schedule
from pagkit.guidance.term import COND, UNCOND, Branch, Term
from pagkit.interventions.attention import AttentionPerturbation


@dataclass(frozen=True)
class CFG(Term):
    """Classifier-free guidance with scale ``w`` (diffusers' convention: ``w = 1`` is no guidance)."""

    scale: float
    schedule: Schedule = CONSTANT

    def __post_init__(self) -> None:
        check_scale("cfg scale", self.scale)

    def branches(self) -> tuple[Branch, ...]:
        return (Branch(UNCOND, UNCOND),)

    def scale_at(self, step: Step) -> float:
        """The multiplier of ``eps_c - eps_u`` at this step (0 means: skip the branch)."""
        return (self.scale - 1.0) * self.schedule(step)

    def weight(self, step: Step) -> float:
        return self.scale_at(step)

    def combine(self, preds: Mapping[str, torch.Tensor], weight: float) -> torch.Tensor:
        return cfg_delta(preds[COND], preds[UNCOND], 1.0 + weight)


@dataclass(frozen=True)
class PAG(Term):
    """Perturbed-attention guidance: ``s (eps_c - eps_c_perturbed)`` with ``layers`` perturbed by ``perturbation``."""

    scale: float = 3.0
    layers: str | Sequence[str] = "mid"
    perturbation: Perturbation = field(default_factory=lambda: make_perturbation("identity"))
    schedule: Schedule = CONSTANT

    def __post_init__(self) -> None:
        check_scale("pag scale", self.scale)
        object.__setattr__(self, "_intervention", AttentionPerturbation(self.layers, self.perturbation))

    @classmethod
    def make(
        cls,
        scale: float = 3.0,
        layers: str | Sequence[str] = "mid",
        perturbation: str | Perturbation = "identity",
        schedule: str | Schedule | None = None,
    ) -> PAG:
        return cls(scale, layers, make_perturbation(perturbation), parse_schedule(schedule))

    @property
    def intervention(self) -> AttentionPerturbation:
        return self._intervention  # type: ignore[attr-defined]

    def branches(self) -> tuple[Branch, ...]:
        return (Branch("perturbed", COND, self.intervention),)

    def scale_at(self, step: Step) -> float:
        return self.scale * self.schedule(step)

    def weight(self, step: Step) -> float:
        return self.scale_at(step)

    def combine(self, preds: Mapping[str, torch.Tensor], weight: float) -> torch.Tensor:
        return pag_delta(preds[COND], preds["perturbed"], weight)
