"""The central abstraction: a guidance term = the branches it needs + a pure rule that combines them.

A :class:`Branch` names one prediction: which inputs it uses (the conditional or the unconditional ones) and
what is done to the model for it (an :class:`~pagkit.interventions.base.Intervention`, or nothing). The base
predictions ``"cond"`` and ``"uncond"`` are branches without an intervention. A :class:`Term` lists the branches
it needs and turns their predictions into a contribution that is *added* to the conditional prediction:

    eps = eps_c + sum_i combine_i(preds, weight_i(step))

CFG contributes ``(w - 1)(eps_c - eps_u)``, PAG ``s (eps_c - eps_perturbed)`` (Ahn et al. Eq. 7/8). The
engine (:mod:`pagkit.guidance.engine`) is generic over terms: it runs every branch whose term has a non-zero
weight, batched in one model call where it can, shares the prefix of intervened branches, and calls the rules.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from pagkit.guidance.schedules import Schedule, Step
from pagkit.interventions.base import Intervention

COND, UNCOND = "cond", "uncond"


@dataclass(frozen=True)
class Branch:
    """One prediction a term needs: ``inputs`` (``"cond"``/``"uncond"``) under ``intervention`` (None: plain)."""

    name: str
    inputs: str = COND
    intervention: Intervention | None = None

    def __post_init__(self) -> None:
        if self.inputs not in (COND, UNCOND):
            raise ValueError(f"branch {self.name!r}: inputs must be 'cond' or 'uncond', got {self.inputs!r}")
        if self.intervention is None and self.name != self.inputs:
            raise ValueError(f"a plain branch is named after its inputs ({self.inputs!r}), got {self.name!r}")


class Term(ABC):
    """A guidance term. Subclasses are frozen dataclasses with a ``schedule``."""

    schedule: Schedule

    @abstractmethod
    def branches(self) -> tuple[Branch, ...]:
        """The branches this term reads besides ``"cond"``."""

    @abstractmethod
    def scale_at(self, step: Step) -> float:
        """The term's weight at ``step`` (0: the term and its branches are skipped)."""

    @abstractmethod
    def combine(self, preds: Mapping[str, torch.Tensor], weight: float) -> torch.Tensor:
        """The contribution added to ``preds["cond"]`` (pure: no state, no side effects)."""

    def combine_carry(
        self, preds: Mapping[str, torch.Tensor], weight: float, carry: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``combine`` for a rule with memory across the steps of one run (APG's momentum): the previous step's
        ``carry`` in (None at the first step), the contribution and the new carry out. Still pure: the engine
        holds the carry and starts it afresh with every run. Default: no memory."""
        return self.combine(preds, weight), None

    @property
    def stateful(self) -> bool:
        """Whether ``combine_carry`` uses its carry (the engine then tracks the run's steps)."""
        return False

    @property
    def linear(self) -> bool:
        """Whether ``combine`` is linear in ``weight`` (its unit contribution may then be cached across steps)."""
        return True

    @property
    def needs_uncond(self) -> bool:
        return any(b.inputs == UNCOND for b in self.branches())
