"""Guidance terms: the extra branch each needs, how it perturbs the model, and its scale over the run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pagkit.attention.ops import Perturbation, make_perturbation
from pagkit.guidance.rules import check_scale
from pagkit.guidance.schedules import CONSTANT, Schedule, Step, parse_schedule


@dataclass(frozen=True)
class CFG:
    """Classifier-free guidance with scale ``w`` (diffusers' convention: ``w = 1`` is no guidance)."""

    scale: float
    schedule: Schedule = CONSTANT

    def __post_init__(self) -> None:
        check_scale("cfg scale", self.scale)

    def weight(self, step: Step) -> float:
        """The multiplier of ``eps_c - eps_u`` at this step (0 means: skip the branch)."""
        return (self.scale - 1.0) * self.schedule(step)


@dataclass(frozen=True)
class PAG:
    """Perturbed-attention guidance: ``s (eps_c - eps_c_perturbed)`` with ``layers`` perturbed by ``op``."""

    scale: float = 3.0
    layers: str | Sequence[str] = "mid"
    perturbation: Perturbation = field(default_factory=lambda: make_perturbation("identity"))
    schedule: Schedule = CONSTANT

    def __post_init__(self) -> None:
        check_scale("pag scale", self.scale)

    @classmethod
    def make(
        cls,
        scale: float = 3.0,
        layers: str | Sequence[str] = "mid",
        perturbation: str | Perturbation = "identity",
        schedule: str | Schedule | None = None,
    ) -> PAG:
        return cls(scale, layers, make_perturbation(perturbation), parse_schedule(schedule))

    def weight(self, step: Step) -> float:
        return self.scale * self.schedule(step)
